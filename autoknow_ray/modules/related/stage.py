"""The related-products stage: the product graph, two-hop dual embeddings, FAISS top-k.

Read the catalogue's co-purchases and behaviour -> check and aggregate them into directed and
similarity edge lists -> embed every product's metadata -> cap each node's neighbours -> source
and target embeddings in the workers -> each product's top-k targets -> `graph_related/`.
Each table a later step loads in its setup() (`nodes/`, `neighbours/`, `embeddings/`) is written
in full and marked complete (`steps.mark_complete`) before that step is built, and the step's
setup() refuses a table without the marker or with fewer rows than it records, so no actor reads
what an earlier operator is still writing. The model's weights come from `fit`; the embeddings are derived again for the catalogue given,
since the graph is the catalogue's own. Products without any edge (cold start) get both
embeddings from their metadata through the same layers. Without trained weights (a catalogue
with no co-purchases to learn from) source and target are the title embedding itself.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from autoknow_ray import progress, runtime, storage
from autoknow_ray.graph.state import TITLE_VECTOR, count_rows, n_products, typed_products_files
from autoknow_ray.incremental import (
    CachedStep, DropColumns, file_digest, manifest_counts, run_cached, source_digest)
from autoknow_ray.modules.related import graph_build as gb
from autoknow_ray.modules.related.model import WEIGHTS
from autoknow_ray.modules.related.steps import DualEmbed, EmbedProducts, Recommend, mark_complete
from autoknow_ray.pipeline import RunContext, Stage, check_balance, parquet_files
from autoknow_ray.steps import CHEAP_ROWS_PER_CALL, Chain, Step

NODES = "nodes"
EMBEDDINGS = "embeddings"


def _text_as_embeddings(batch: pa.Table) -> pa.Table:
    text = batch.column("text")
    return pa.table({"product_id": batch.column("product_id"), "source": text, "target": text})


def _first_ranks(batch: pa.Table) -> pa.Table:
    """One row per product that has related rows: its rank-1 row (ranks start at 1)."""
    return batch.filter(pc.equal(batch.column("rank"), 1))


EMBED_STEP = "related_embed"
# the modules whose source computes the cached title vectors and h0
EMBED_CODE = ("autoknow_ray.modules.related.steps", "autoknow_ray.modules.related.model",
              "autoknow_ray.nn.encoder")


class CatalogueType(Step):
    """`type` = the catalogue's own `product_type` (no module 1 in the run)."""

    name = "catalogue_type"
    resources = "related"
    rows_per_call = CHEAP_ROWS_PER_CALL
    columns = ("product_id", "title", "product_type")

    def process_batch(self, batch: pa.Table) -> pa.Table:
        return batch.append_column("type", batch.column("product_type"))


def embed_step(step: EmbedProducts, model_dir, rc, ctx: RunContext,
               from_catalogue: bool = False) -> CachedStep:
    """`EmbedProducts` as a cached step: its outputs (title vector, type bucket, h0) depend on
    the product's title and type, the encoder, the trained model's weights, the settings it
    reads, the run's precision and the code. `from_catalogue`: the products are the ingested
    ones, typed by their own `product_type`."""
    from autoknow_ray.nn.encoder import resolve_encoder

    device = runtime.plan_actors(ctx.cfg, "related", n_products(ctx)).device
    type_col = "product_type" if from_catalogue else "type"
    fresh = Chain(EMBED_STEP, [CatalogueType(), step]) if from_catalogue else step
    return CachedStep(
        name=EMBED_STEP, fresh=fresh,
        reuse=DropColumns(("title", type_col, *([step.vector_column] if step.vector_column else []))),
        inputs=("title", type_col),
        outputs=("text", "type_bucket", "h0") if model_dir else ("text", "type_bucket"),
        fingerprint={"encoder": file_digest([Path(resolve_encoder(rc.encoder))]),
                     "model": file_digest([Path(model_dir)]) if model_dir else None,
                     "text_max_length": rc.text_max_length, "type_buckets": rc.type_buckets,
                     "title_vectors": "taxonomy" if step.vector_column else "encoded",
                     "bf16": bool(runtime.model_bf16(device)), "device": device,
                     "code": source_digest(list(EMBED_CODE))})


def title_vectors_source(ctx: RunContext, files, from_catalogue: bool, n: int) -> tuple[str | None, str]:
    """(the typed products' column holding module 1's title vectors, or None; why). They are
    read instead of encoding every title again where they are what this stage would compute:
    the same encoder files, the same token length, the same device (so the same precision, one
    decision per run) and the GNN's text width."""
    from autoknow_ray.modules.related.steps import TEXT_DIM
    from autoknow_ray.nn.encoder import TITLE_MAX_LENGTH, resolve_encoder

    rc = ctx.cfg.related
    if not rc.title_vectors_from_taxonomy:
        return None, "related.title_vectors_from_taxonomy is off"
    if from_catalogue or not files:
        return None, "no module 1 in this run"
    if rc.text_max_length != TITLE_MAX_LENGTH:
        return None, f"related.text_max_length {rc.text_max_length} is not module 1's {TITLE_MAX_LENGTH}"
    if resolve_encoder(rc.encoder) != resolve_encoder(ctx.cfg.taxonomy.tagger.encoder):
        return None, "module 1's title encoder is another"
    devices = {runtime.plan_actors(ctx.cfg, s, n).device for s in ("taxonomy", "related")}
    if len(devices) > 1:
        return None, "module 1's title models ran on another device (another precision)"
    schema = pq.read_schema(str(storage.path(files[0])))
    if TITLE_VECTOR not in schema.names:
        return None, "module 1 wrote no title vectors"
    width = getattr(schema.field(TITLE_VECTOR).type, "list_size", None)
    if width != TEXT_DIM:
        return None, f"module 1's title vectors are {width} wide, the model reads {TEXT_DIM}"
    return TITLE_VECTOR, "module 1's title vectors: the same encoder, length and device"


def _model_config(model_dir) -> dict:
    """The saved model settings: the co-purchase count prior's weights that fit picked on its
    validation pairs (`prior_bucket_weights` per bucket of a product's co-purchase events,
    `prior_buckets`; models saved before the buckets have `prior_weight` alone) and `symmetric`."""
    import json

    from autoknow_ray.modules.related.model import CONFIG

    return json.loads((model_dir / CONFIG).read_text())


class RelatedStage(Stage):
    name = "related"
    config_sections = ("related", "resources")
    needs = ("ingest", "taxonomy")
    uses_models = True
    # not one row per product: up to top_k related rows each; the quarantine holds the
    # behaviour and co-purchase rows the edge checks rejected
    units = {"rows_in": "products", "rows_out": "related pairs (product, related product)",
             "rows_quarantined": "behaviour and co-purchase rows"}

    def fingerprint(self, ctx: RunContext) -> str:
        self.needs = tuple(s for s in ("ingest", "taxonomy") if s in ctx.cfg.stages)
        return super().fingerprint(ctx)

    def run(self, ctx: RunContext) -> dict:
        import time

        cfg, rc, out = ctx.cfg, ctx.cfg.related, ctx.out
        timer = progress.Phases()  # wall seconds of each pass, for the manifest
        lap = timer.done

        n = n_products(ctx)
        model_dir = (ctx.models / "related") if ctx.models else None
        trained = model_dir is not None and (model_dir / WEIGHTS).exists()
        products = ctx.table_path("ingest", "products")
        counts = gb.copurchase_edges(cfg, ctx.table_path("ingest", "copurchase"), products, out)
        lap("copurchase_edges")
        counts.update(gb.coview_edges(cfg, ctx.table_path("ingest", "behavior"), products, out))
        lap("coview_edges")

        # a cached step: `rebuild --previous RUN` reuses RUN's title vectors and h0 of every
        # product whose title and type are unchanged (autoknow_ray/incremental.py); the type is
        # module 1's where it ran, else the catalogue's own
        files, from_catalogue = typed_products_files(ctx), False
        if files is None:
            files, from_catalogue = parquet_files(ctx.table_path("ingest", "products")), True
        vectors, why = title_vectors_source(ctx, files, from_catalogue, n)
        step = EmbedProducts(rc.encoder, rc.text_max_length, rc.type_buckets,
                             model_dir if trained else None, vector_column=vectors)
        counts["title_vectors"] = {"from": "taxonomy" if vectors else "encoded here", "why": why}
        cache: dict = {}
        if files and vectors:
            # module 1's title vectors are read, so what is left per product is h0, a few small
            # matrix products: a cache join costs more than the step (20k products, incremental
            # bench: cached path 17.6 s against 8.9 s for every product), so it is not cached
            runtime.map_step_checkpointed(files, step, cfg, out / NODES, ctx.resume)
            counts["cache_not_used"] = "title vectors read from module 1: the step is cheaper than its cache"
        elif files:
            cache = run_cached(embed_step(step, model_dir if trained else None, rc, ctx, from_catalogue),
                               files, cfg, out / NODES, out, ctx.resume,
                               ctx.previous_stage(self.name))
        mark_complete(out / NODES)
        lap("embed_products")
        counts["text_edges"] = 0
        if counts["coview_edges"] == 0 or rc.text_knn_always:
            counts["text_edges"] = gb.text_edges(cfg, out / NODES, out, n)
        lap("text_edges")
        counts.update(gb.neighbour_table(cfg, out))
        mark_complete(out / gb.NEIGHBOURS)
        lap("neighbour_table")

        if trained and n > rc.max_nodes_per_actor:
            from autoknow_ray.modules.related.sharded import dual_embed_sharded

            counts["dual_embed"] = dual_embed_sharded(cfg, model_dir, out / NODES, out / gb.NEIGHBOURS,
                                                      out, out / EMBEDDINGS, n)
        elif trained:
            embed = DualEmbed(model_dir, out / NODES, out / gb.NEIGHBOURS, rc.fanout)
            runtime.map_step(runtime.read_parquet(out / NODES, ["product_id"]), embed, cfg, n
                             ).write_parquet(str(out / EMBEDDINGS))
        else:
            runtime.read_parquet(out / NODES, ["product_id", "text"]).map_batches(
                _text_as_embeddings, batch_format="pyarrow").write_parquet(str(out / EMBEDDINGS))
        mark_complete(out / EMBEDDINGS)
        lap("dual_embed")
        settings = _model_config(model_dir) if trained else {}
        prior = float(settings.get("prior_weight", 0.0))
        recommend = Recommend(out / EMBEDDINGS, rc.top_k, rc.ivf_min_size, rc.nprobe, cfg.seed,
                              out / gb.NEIGHBOURS, prior, rc.prior_candidates,
                              settings.get("prior_buckets"), settings.get("prior_bucket_weights"),
                              settings.get("popularity_bucket_weights"),
                              settings.get("neighbour_bucket_weights"), rc.fanout,
                              settings.get("walk_bucket_weights"))
        if n > rc.max_nodes_per_actor:
            # over shards of the targets and node tables (related/sharded.py): the same lists
            from autoknow_ray.modules.related.sharded import recommend_sharded

            counts["recommend"] = recommend_sharded(cfg, recommend, out, out / "graph_related", n)
        else:
            runtime.map_step(runtime.read_parquet(out / EMBEDDINGS, ["product_id", "source"]), recommend,
                             cfg, n).write_parquet(str(out / "graph_related"))
        lap("recommend")
        counts["quarantine_reasons"] = gb.quarantine_reasons(out / gb.QUARANTINE_TABLE)
        n_rows = count_rows(out / "graph_related")
        n_bad = count_rows(out / gb.QUARANTINE_TABLE)
        # every product gets its two embeddings (its metadata where it has no edge)
        n_embedded = count_rows(out / EMBEDDINGS)
        check_balance("related: products embedded", n, n_embedded)
        with_related = (runtime.read_parquet(out / "graph_related", ["rank"]).map_batches(
            _first_ranks, batch_format="pyarrow").count() if n_rows else 0)
        if n_bad == 0:
            gb.write_shards(None, out / gb.QUARANTINE_TABLE, gb.QUARANTINE)
        lap("counts")
        return {
            "rows_in": n,
            "rows_out": n_rows,
            "rows_quarantined": n_bad,
            "products_embedded": n_embedded,
            "products_with_related": with_related,
            # a product whose search found no other product (a catalogue of one, or every
            # neighbour filtered out)
            "products_without_related": n - with_related,
            "model": ("symmetric-gnn" if settings.get("symmetric") else "dual-gnn") if trained
            else "title-similarity (no trained weights)",
            "prior_weight": prior,
            "prior_buckets": settings.get("prior_buckets"),
            "prior_bucket_weights": settings.get("prior_bucket_weights"),
            "popularity_bucket_weights": settings.get("popularity_bucket_weights"),
            "neighbour_bucket_weights": settings.get("neighbour_bucket_weights"),
            "walk_bucket_weights": settings.get("walk_bucket_weights"),
            # per-product title vectors and h0 reused from --previous, recomputed, added, removed
            **manifest_counts(EMBED_STEP, cache),
            **counts,
            "step_seconds": timer.seconds,
        }
