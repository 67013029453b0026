"""Module 1 as a pipeline stage: tag titles, decide types, find new types, attach them.

Per-product work (tagging, title embeddings) runs as Ray Data actor pools sized by the runtime
plan; per-type work (resolution, hypernyms) runs on the aggregates in this process.
Outputs in RUN/taxonomy/: tags, product_types, new_types, hypernym_candidates (ranked, for @k
metrics), and for the graph: edits (has_type and title-attribute triples) and graph_taxonomy.
"""
from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import ray

from autoknow_ray import runtime
from autoknow_ray.modules.taxonomy.fit import load_type_reference
from autoknow_ray.modules.taxonomy.hypernym import HypernymClassifier
from autoknow_ray.modules.taxonomy.infer import TitleTagger
from autoknow_ray.modules.taxonomy.types import hypernym_children, orphan_types, resolve_types
from autoknow_ray.nn.encoder import EmbedTitles, LookupEncoder
from autoknow_ray.pipeline import RunContext, Stage, read_parquet_any
from autoknow_ray.schema import GRAPH_TAXONOMY, HAS_TYPE, TAGS, TRIPLES

MODULE = "taxonomy"


def _count_rows(path) -> int:
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _titles_dataset(ctx: RunContext, plan: runtime.ActorPlan, n: int):
    ds = ray.data.read_parquet(str(ctx.table_path("ingest", "products"))).select_columns(["product_id", "title"])
    # a small file arrives as one block: split it so every actor gets work
    per_block = rows_per_call(plan, n)
    return ds.repartition(target_num_rows_per_block=per_block)


def rows_per_call(plan: runtime.ActorPlan, n: int) -> int:
    """Rows per actor call: large enough for length-sorted model batches (less padding), small
    enough that every actor gets several calls."""
    return max(plan.batch_size, min(plan.rows_per_call, -(-n // max(1, plan.actors * 4))))


def edits_from_types(product_types: pl.DataFrame, products: pl.DataFrame) -> pl.DataFrame:
    old = products.select("product_id", pl.col("product_type").alias("_old"))
    pt = product_types.join(old, on="product_id", how="left")
    added = pt.filter(pl.col("status").is_in(["added", "corrected"])).select(
        pl.col("product_id").alias("subject"), pl.lit(HAS_TYPE).alias("relation"),
        pl.col("type").alias("object"), pl.col("confidence").cast(pl.Float32),
        pl.lit(MODULE).alias("module"), pl.col("status"), pl.col("evidence"))
    removed = pt.filter((pl.col("status") == "corrected") & pl.col("_old").is_not_null()).select(
        pl.col("product_id").alias("subject"), pl.lit(HAS_TYPE).alias("relation"),
        pl.col("_old").alias("object"), pl.col("confidence").cast(pl.Float32),
        pl.lit(MODULE).alias("module"), pl.lit("removed").alias("status"),
        (pl.lit("corrected to ") + pl.col("type")).alias("evidence"))
    return pl.concat([added, removed], how="vertical_relaxed")


def edits_from_attribute_spans(tags: pl.DataFrame, min_score: float) -> pl.DataFrame:
    spans = tags.filter((pl.col("label") != "type") & (pl.col("score") >= min_score))
    return spans.select(
        pl.col("product_id").alias("subject"), pl.col("label").alias("relation"),
        pl.col("value").alias("object"), pl.col("score").cast(pl.Float32).alias("confidence"),
        pl.lit(MODULE).alias("module"), pl.lit("added").alias("status"),
        pl.format("title[{}:{}]", pl.col("start"), pl.col("end")).alias("evidence"),
    ).unique(subset=["subject", "relation", "object"], keep="first", maintain_order=True)


def _ranked_product_types(voted: dict[str, list[tuple[str, float]]], top: int = 5) -> pl.DataFrame:
    """The kNN vote's alternatives per product (rank 1 is the type written to the graph)."""
    rows = [(pid, t, float(share), r + 1) for pid, lst in voted.items() for r, (t, share) in enumerate(lst[:top])]
    return pl.DataFrame(rows, schema={"product_id": pl.String, "type": pl.String, "score": pl.Float32,
                                      "rank": pl.Int32}, orient="row")


class TaxonomyStage(Stage):
    name = "taxonomy"
    config_sections = ("taxonomy", "resources")
    needs = ("ingest",)
    uses_models = True

    def run(self, ctx: RunContext) -> dict:
        cfg = ctx.cfg.taxonomy
        if ctx.models is None:
            raise ValueError("the taxonomy stage needs models (autoknow fit, or rebuild without --models)")
        art = ctx.models / "taxonomy"
        n = _count_rows(ctx.table_path("ingest", "products"))
        plan = runtime.plan_actors(ctx.cfg, self.name, n)
        threads = max(1, int(plan.num_cpus)) if plan.device == "cpu" else 1

        tags_dir = ctx.out / "tags"
        if n:
            titles = _titles_dataset(ctx, plan, n)
        if n and (art / "tagger" / "config.json").exists():  # fit skips a tagger with nothing to learn
            titles.map_batches(
                TitleTagger,
                fn_constructor_kwargs={"artifact_dir": str(art / "tagger"), "device": plan.device,
                                       "batch_size": plan.batch_size, "cpu_threads": threads},
                batch_format="pyarrow", **runtime.actor_pool_kwargs(plan, rows_per_call(plan, n)),
            ).write_parquet(str(tags_dir))
        if n:
            emb_dir = ctx.out / "_title_embeddings"
            titles.map_batches(
                EmbedTitles,
                fn_constructor_kwargs={"encoder": cfg.tagger.encoder, "device": plan.device,
                                       "batch_size": plan.batch_size * 2, "cpu_threads": threads},
                batch_format="pyarrow", **runtime.actor_pool_kwargs(plan, rows_per_call(plan, n)),
            ).write_parquet(str(emb_dir))
        tags = read_parquet_any(tags_dir) if tags_dir.exists() else pl.DataFrame()
        if tags.height == 0:
            tags = pl.from_arrow(TAGS.empty_table())

        products = ctx.read("ingest", "products")
        taxonomy = ctx.read("ingest", "taxonomy")
        behavior = ctx.read("ingest", "behavior")
        copurchase = ctx.read("ingest", "copurchase")
        if n:
            emb = read_parquet_any(emb_dir)
            vecs = np.asarray(emb["embedding"].to_list(), dtype=np.float32) if emb.height else np.zeros((0, 384), np.float32)
            title_of = dict(zip(products["product_id"].to_list(), products["title"].to_list()))
            encoder = LookupEncoder([title_of[p] for p in emb["product_id"].to_list()], vecs,
                                    encoder=cfg.tagger.encoder, device=ctx.cfg.device)
            for p in emb_dir.glob("*"):
                p.unlink()
            emb_dir.rmdir()
        else:
            encoder = LookupEncoder([], np.zeros((0, 384), np.float32), encoder=cfg.tagger.encoder,
                                    device=ctx.cfg.device)

        reference = load_type_reference(art)
        voted: dict[str, list[tuple[str, float]]] = {}
        product_types, candidates = resolve_types(products, tags, taxonomy, cfg.types, encoder,
                                                  reference=reference, ranked=voted)
        has_edges = taxonomy.height > 0 and taxonomy["parent"].is_not_null().any()
        # without any parent edge the taxonomy is flat: its parentless types are roots
        orphans = orphan_types(taxonomy, products) if has_edges else []
        children = hypernym_children(candidates, product_types, orphans)

        ranked = pl.DataFrame(schema={"type": pl.String, "parent": pl.String, "score": pl.Float32,
                                      "rank": pl.Int32, "accepted": pl.Boolean})
        if children.height and (art / "hypernym" / "config.json").exists():
            hyp = HypernymClassifier.load(art / "hypernym")
            # the context is the catalogue as given: its typed products and behaviour
            ranked = hyp.predict(children, taxonomy=taxonomy, products=products,
                                 behavior=behavior if behavior.height else None,
                                 copurchase=copurchase if copurchase.height else None,
                                 encoder=encoder)
        known = set(taxonomy["type"].to_list()) if taxonomy.height else set()
        graph_tax = ranked.filter(pl.col("accepted")).select(
            "type", "parent", (~pl.col("type").is_in(list(known))).alias("is_new"),
            pl.col("score").alias("confidence"))
        # a new type the classifier could not place still enters the taxonomy, as a root
        unplaced = candidates.filter(~pl.col("type").is_in(graph_tax["type"].to_list())).select(
            "type", pl.lit(None, pl.String).alias("parent"), pl.lit(True).alias("is_new"),
            pl.lit(None, pl.Float32).alias("confidence"))
        graph_tax = pl.concat([graph_tax, unplaced], how="vertical_relaxed")

        edits = [edits_from_types(product_types, products)]
        if cfg.add_title_attributes:
            edits.append(edits_from_attribute_spans(tags, cfg.min_attribute_score))
        edits_df = pl.concat(edits, how="vertical_relaxed")

        ctx.write("product_types", product_types)
        ctx.write("new_types", candidates)
        ctx.write("hypernym_candidates", ranked)
        ctx.write("product_type_candidates", _ranked_product_types(voted))
        ctx.write("edits", edits_df, TRIPLES)
        ctx.write("graph_taxonomy", graph_tax, GRAPH_TAXONOMY)
        status = dict(product_types.group_by("status").len().rows()) if product_types.height else {}
        return {
            "rows_in": n,
            "rows_out": n,
            "rows_quarantined": 0,
            "resources": plan.as_dict(),
            "tagger_spans": tags.height,
            "types_kept": status.get("kept", 0),
            "types_added": status.get("added", 0),
            "types_corrected": status.get("corrected", 0),
            "types_unresolved": n - product_types.height,
            "new_types": candidates.height,
            "hypernym_children": children.height,
            "hypernym_edges": graph_tax.filter(pl.col("parent").is_not_null()).height,
        }
