"""Module 1 as a pipeline stage: tag titles, decide types, find new types, attach them.

The driver holds only per-type aggregates and capped samples; per-product work runs in the
workers as steps of the stage protocol:

1. `title_models` (one actor hosting the tagger and the encoder, one read of the titles): each
   product's spans, best type span and fp16 title vector → `_title_models/` (scratch).
2. aggregates: new-type candidates (support, mean score per type key), example ids, per-type
   name support; the kNN reference, a capped sample written by the workers to `_knn_reference/`.
3. `resolve_types` (second pass, with the accepted names; each worker reads the reference in its
   setup()): each product's type, edits and kNN alternatives.
4. written by the workers: `typed_products/` (every product with its type columns), `edits/`,
   `product_type_candidates/`.
5. hypernyms, in one Ray task (`runtime.run_task`): the new types' sampled products, the capped
   context (per-type samples, per-type title-vector sums, behaviour rows) and the classifier over
   them; the driver gets the ranked parents and writes (small) `new_types`,
   `hypernym_candidates`, `graph_taxonomy`.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from autoknow_ray import progress, runtime, storage
from autoknow_ray.graph.state import TITLE_VECTOR, count_rows
from autoknow_ray.index.vectors import as_matrix
from autoknow_ray.incremental import manifest_counts, run_cached
from autoknow_ray.modules.taxonomy import knn_floors, sample
from autoknow_ray.modules.taxonomy.cache import title_models_step, title_precision
from autoknow_ray.modules.taxonomy.fit import (
    load_type_reference, load_type_reference_titles, load_type_reference_types)
from autoknow_ray.modules.taxonomy.hypernym_config import KNN_MIN_SHARE, KNN_MIN_SIMILARITY
from autoknow_ray.modules.taxonomy.hypernym import HypernymClassifier
from autoknow_ray.modules.taxonomy.infer import TagTitles
from autoknow_ray.modules.taxonomy.title_names import (
    EVIDENCE_PREFIX, TitleTypeNames, build_vocabulary, load_vocabulary_and_not_types, name_keys,
)
from autoknow_ray.modules.taxonomy.type_groups import TypeGroups, group_new_types, merge_candidates
from autoknow_ray.modules.taxonomy.type_naming import (
    TypeNaming, blocked_words, name_new_types, renamed, renamed_candidates)
from autoknow_ray.modules.taxonomy.types import (
    CANDIDATES_SCHEMA, SECOND_VOTE, SPREAD, TITLE_ATTRIBUTES, TYPE_COLUMNS, BestTypeSpan, ResolveTypes,
    SpreadNewTypes, TypeNames, accept_candidates, ancestors_map, lower_case_taxonomy,
    orphan_types, taxonomy_maps, unsold_types, with_title_attributes, write_reference,
)
from autoknow_ray.nn.encoder import EmbedTitles, TextEncoder
from autoknow_ray.pipeline import RunContext, Stage, parquet_files
from autoknow_ray.schema import BEHAVIOR_KEY, COPURCHASE_KEY, GRAPH_TAXONOMY, PRODUCTS, TRIPLES
from autoknow_ray.text import type_key

JOIN_ROWS_PER_PARTITION = 200_000  # rows per hash partition when typed_products is joined


def _explode(column: str, schema: pa.Schema):
    """A task that turns a list<struct> column into rows of `schema`."""

    def run(batch: pa.Table) -> pa.Table:
        col = batch.column(column).combine_chunks()
        flat = pc.list_flatten(col)
        if len(flat) == 0:
            return schema.empty_table()
        cols = [flat.field(f.name).cast(f.type) if f.name in [x.name for x in flat.type]
                else pc.take(batch.column("product_id"), pc.list_parent_indices(col)).cast(f.type)
                for f in schema]
        return pa.Table.from_arrays(cols, schema=schema)

    return run


PRODUCT_TYPE_CANDIDATES = pa.schema([("product_id", pa.string()), ("type", pa.string()),
                                     ("score", pa.float32()), ("rank", pa.int32())])


class TaxonomyStage(Stage):
    name = "taxonomy"
    config_sections = ("taxonomy", "resources")
    needs = ("ingest",)
    uses_models = True
    # typed_products: every product once, with its type columns (null where none was decided)
    units = {"rows_in": "products", "rows_out": "typed products"}
    per_product = True
    balanced = True

    def run(self, ctx: RunContext) -> dict:
        cfg = ctx.cfg.taxonomy
        if ctx.models is None:
            raise ValueError("the taxonomy stage needs models (autoknow fit, or rebuild without --models)")
        art = ctx.models / "taxonomy"
        products_path = ctx.table_path("ingest", "products")
        n = count_rows(products_path)
        taxonomy = ctx.read("ingest", "taxonomy")  # per-type, small
        tax_types = taxonomy["type"].drop_nulls().to_list() if taxonomy.height else []
        parents, _children = taxonomy_maps(taxonomy)
        names = TypeNames(list(parents))
        plan = runtime.plan_actors(ctx.cfg, self.name, n)
        parts = runtime.shuffle_partitions(n)
        phases = progress.Phases()  # the manifest's `phase_seconds`

        # ---- 1. one read of the titles: spans + best type span + title vector ----------------
        scratch = ctx.out / "_title_models"
        tagger_dir = art / "tagger"
        # the type names a title may write: the fit's vocabulary and this taxonomy's own names
        fitted, not_types = load_vocabulary_and_not_types(art)  # one read of the file
        vocab = {**build_vocabulary(tax_types, (), ()), **fitted} if cfg.types.title_names else {}
        # the title models (tagger, then encoder) as a cached step: `rebuild --previous RUN`
        # reuses RUN's spans and vectors of every product whose title is unchanged
        # (autoknow_ray/incremental.py, docs/incremental.md)
        previous = ctx.previous_stage(self.name)
        bf16 = title_precision(plan.device, previous)
        tagger = str(tagger_dir) if (tagger_dir / "config.json").exists() else None
        models = title_models_step(
            TagTitles(tagger, min_score=cfg.tagger.min_score, bf16=bf16),
            [BestTypeSpan(set(names.known), cfg.types.min_span_score),
             TitleTypeNames(vocab, not_types if cfg.types.title_heads else ())],
            EmbedTitles(cfg.tagger.encoder, bf16=bf16),
            tagger_dir=tagger_dir if tagger else None, encoder=cfg.tagger.encoder,
            min_score=cfg.tagger.min_score, bf16=bf16, device=plan.device)
        chunks, cache = {"chunks": 0, "skipped": 0}, {}
        if n:
            # committed chunk by chunk into ctx.resume: a job killed late in tagging resumes
            # after the last finished chunk
            cache = run_cached(models, parquet_files(products_path), ctx.cfg, scratch, ctx.out,
                               ctx.resume, previous)
            cache.update(bf16=bf16, device=plan.device)
            chunks = {"chunks": cache["chunks"], "skipped": cache["chunks_resumed"]}
        phases.done("title_models")
        counts: dict = {}
        spread_counts: dict = {}
        if n:
            # the driver's encoder embeds type names only (a few thousand at most)
            # fp32: a timing probe choosing bf16 differently in another process would change
            # the names' vectors, and the rebuild would not be the same twice (incremental.md)
            encoder = TextEncoder(cfg.tagger.encoder, device=ctx.cfg.device, bf16=False)
            tm = runtime.read_parquet(scratch)
            labels = self._type_counts(tm, {type_key(t) for t in tax_types},
                                       cfg.types.max_catalogue_labels, parts)
            typed_types = set(labels.rows["product_type"].to_list()) if labels.rows.height else set()
            phases.done("type_counts")
            label_counts = {"labels": labels.keys, "left_out": labels.left_out}
            # the taxonomy's nodes no product carries (in fit or here): one with children is a
            # category, which no title or span names
            unsold = unsold_types(list(parents), load_type_reference_types(art) | typed_types)
            names = TypeNames(list(parents), unsold=unsold, children=_children)
            candidates, accepted = self._candidates(tm, names, tax_types, cfg.types, ctx.cfg.seed, parts)
            phases.done("candidates")
            name_support, name_accepted = self._title_name_support(
                tm, names, vocab, accepted, cfg.types, lower_case_taxonomy(tax_types), parts)
            names = TypeNames(list(parents), {**name_accepted, **accepted}, unsold, _children)
            phases.done("title_names")
            resolve, floors_report = self._resolve_step(ctx, tm, names, parents, art, encoder, typed_types,
                                         name_support, vocab)
            phases.done("knn_reference_and_floors")
            decisions_dir = ctx.out / "_decisions"
            runtime.map_step(tm, resolve, ctx.cfg, n).write_parquet(str(decisions_dir))
            phases.done("resolve")
            known_reference = resolve.train_ref
            spread_cfg = resolve.cfg  # the floors as resolved for this catalogue
            del resolve  # its reference index lives on in the workers only
            if name_accepted:
                candidates = self._with_title_name_types(ctx, candidates, set(names.known.values()),
                                                         cfg.types, parts)
                phases.done("title_name_types")
            if cfg.types.spread_new_types and candidates.height:
                spread_counts, groups = self._spread_new_types(
                    ctx, candidates, spread_cfg, known_reference, decisions_dir, n, parts,
                    {type_key(t) for t in parents})
                if groups.rename:  # variants of one new type are one row, their names kept
                    candidates = merge_candidates(candidates, groups, cfg.types.max_examples)
                phases.done("spread")
            if cfg.types.name_from_titles and candidates.height:
                candidates, naming = self._name_new_types(
                    ctx, candidates, decisions_dir, cfg.types, parts, {type_key(t) for t in parents},
                    set(vocab))
                spread_counts = {**spread_counts, "naming": naming}
                phases.done("naming")
            counts = self._write_products(ctx, products_path, decisions_dir, n, parts)
            phases.done("write_products")
        else:
            candidates, typed_types, floors_report = pl.DataFrame(schema=CANDIDATES_SCHEMA), set(), None
            label_counts = {"labels": 0, "left_out": 0}
            for name, schema in (("typed_products", _typed_schema()), ("edits", TRIPLES),
                                 ("product_type_candidates", PRODUCT_TYPE_CANDIDATES)):
                ctx.write(name, schema.empty_table(), schema)

        # ---- hypernyms: new types and orphans, against a sampled context ----------------------
        has_edges = taxonomy.height > 0 and taxonomy["parent"].is_not_null().any()
        # without any parent edge the taxonomy is flat: its parentless types are roots
        orphans = orphan_types(taxonomy, typed_types) if has_edges else []
        # in one Ray task: the children's sampled products, the capped context and the
        # classifier over them; the driver gets the ranked parents (a few rows per new type)
        n_children, ranked, context_counts = runtime.run_task(
            _place_types, self, ctx, candidates, orphans, taxonomy, has_edges, art, bool(n), parts,
            cfg=ctx.cfg)
        phases.done("hypernyms")
        known = set(tax_types)
        graph_tax = ranked.filter(pl.col("accepted")).select(
            "type", "parent", (~pl.col("type").is_in(list(known))).alias("is_new"),
            pl.col("score").alias("confidence"))
        # a new type the classifier could not place still enters the taxonomy, as a root
        unplaced = candidates.filter(~pl.col("type").is_in(graph_tax["type"].to_list())).select(
            "type", pl.lit(None, pl.String).alias("parent"), pl.lit(True).alias("is_new"),
            pl.lit(None, pl.Float32).alias("confidence"))
        graph_tax = pl.concat([graph_tax, unplaced], how="vertical_relaxed")

        ctx.write("new_types", candidates)
        ctx.write("hypernym_candidates", ranked)
        ctx.write("graph_taxonomy", graph_tax, GRAPH_TAXONOMY)
        for d in ("_title_models", "_decisions", "_decisions_spread", "_knn_reference"):
            storage.rmtree(ctx.out / d)
        outcomes = counts.get("outcomes", {})
        unresolved = {k: v for k, v in outcomes.items()
                      if k not in ("kept", "added", "corrected", SPREAD, SECOND_VOTE)}
        return {
            "rows_in": n,
            # the catalogue's distinct type labels, and those past `types.max_catalogue_labels`
            "catalogue_labels": label_counts,
            "rows_out": counts.get("typed_products", 0),
            # a product the decision pass did not return is still a typed product, untyped
            "products_without_decision": n - counts.get("decisions", 0),
            "resources": plan.as_dict(),
            # per-product model outputs reused from --previous, recomputed, added, removed
            **manifest_counts("title_models", cache),
            "title_chunks": chunks["chunks"],
            "title_chunks_resumed": chunks["skipped"],
            "tagger_spans": counts.get("spans", 0),
            "types_kept": outcomes.get("kept", 0),
            "types_added": outcomes.get("added", 0),
            "types_corrected": outcomes.get("corrected", 0),
            "types_spread": outcomes.get(SPREAD, 0),  # new types taken from nearby titles
            # known types taken in the spread pass among this catalogue's own typed titles
            "types_second_vote": outcomes.get(SECOND_VOTE, 0),
            "types_unresolved": sum(unresolved.values()),
            "types_unresolved_reasons": unresolved,
            "edits": counts.get("edits", 0),
            "spread_new_types": spread_counts,
            "new_types": candidates.height,
            "hypernym_children": n_children,
            # the products the children's behaviour leads to, those kept in the context
            # (`hypernym.linked_max`, a seeded uniform draw), and the placing task's peak heap
            # per phase (its process runs off the driver)
            "hypernym_context": context_counts,
            "hypernym_edges": graph_tax.filter(pl.col("parent").is_not_null()).height,
            # the kNN vote's floors this rebuild used, and where they came from
            "knn_floors": floors_report,
            # wall seconds per phase of this stage (the title models, each aggregate and pass after)
            "phase_seconds": phases.seconds,
        }

    # ---- 2. aggregates and samples --------------------------------------------------------------
    @staticmethod
    def _candidates(tm, names: TypeNames, tax_types: list[str], cfg, seed: int, parts: int):
        """New-type candidates: per (key, surface) aggregates of the best type spans the
        taxonomy lacks; for the accepted keys, the products mentioning them and example ids."""
        new = tm.select_columns(["product_id", "span_key", "span_value", "span_score", "span_new",
                                 "mention_keys"]).map_batches(
            sample.where_true("span_new"), batch_format="pyarrow")
        surfaces = runtime.aggregate(new, ["span_key", "span_value"],
                                     {"n": ("count", None), "score_sum": ("sum", "span_score")}, parts)
        acc = accept_candidates(surfaces, cfg, lower_case_taxonomy(tax_types))
        if acc.height == 0:
            return pl.DataFrame(schema=CANDIDATES_SCHEMA), {}
        keys = set(acc["key"].to_list())

        def mentioned(batch: pa.Table) -> pa.Table:
            flat = pc.list_flatten(batch.column("mention_keys")).to_pylist()
            return pa.table({"key": pa.array([k for k in flat if k in keys], pa.string())})

        mentions = runtime.aggregate(
            tm.select_columns(["mention_keys"]).map_batches(mentioned, batch_format="pyarrow"),
            ["key"], {"n_products": ("count", None)}, parts)
        examples = sample.first_per_key(
            sample.where_in(new.select_columns(["product_id", "span_key"]), "span_key", keys),
            "span_key", "product_id", cfg.max_examples, seed)
        ex = (examples.group_by("span_key").agg(pl.col("product_id").sort().alias("example_product_ids"))
              if examples.height else pl.DataFrame(schema={"span_key": pl.String,
                                                            "example_product_ids": pl.List(pl.String)}))
        if mentions.height == 0:
            mentions = pl.DataFrame(schema={"key": pl.String, "n_products": pl.Int64})
        out = (acc.join(mentions, on="key", how="left")
               .join(ex.rename({"span_key": "key"}), on="key", how="left")
               .with_columns(pl.max_horizontal(pl.col("n_products").fill_null(0), pl.col("support"))
                             .cast(pl.Int64).alias("n_products"),
                             pl.col("example_product_ids").fill_null(pl.lit([], dtype=pl.List(pl.String)))))
        accepted = dict(out.select("key", "type").iter_rows())
        cands = out.select(list(CANDIDATES_SCHEMA)).cast(CANDIDATES_SCHEMA).sort(
            ["support", "type"], descending=[True, False])
        return cands, accepted

    @staticmethod
    def _title_name_support(tm, names: TypeNames, vocab: dict[str, str], accepted: dict[str, str],
                            cfg, lower: bool, parts: int) -> tuple[dict[str, int], dict[str, str]]:
        """Per name key: the products with neither a catalogue type nor a tagger type span whose
        title writes it (a per-key aggregate, bounded by the vocabulary); and the new names among
        them (a key neither the taxonomy nor the tagger's candidates name, with `min_support`)."""
        if not (cfg.title_names or cfg.title_heads):
            return {}, {}

        def keys(batch: pa.Table) -> pa.Table:
            old = batch.column("product_type").to_pylist()
            span = batch.column("span_key").to_pylist()
            free = [not (isinstance(o, str) and o.strip()) and not sk for o, sk in zip(old, span)]
            rows = [("name", k, None) for f, ks in zip(free, batch.column("name_keys").to_pylist())
                    if f for k in ks or ()]
            rows += [("head", hk, hv) for f, hk, hv in zip(free, batch.column("head_key").to_pylist(),
                                                        batch.column("head_value").to_pylist())
                     if f and hk]
            return pa.table({c: pa.array([r[i] for r in rows], pa.string())
                             for i, c in enumerate(("kind", "key", "value"))})

        counts = runtime.aggregate(
            tm.select_columns(["product_type", "span_key", "name_keys", "head_key", "head_value"])
            .map_batches(keys, batch_format="pyarrow"), ["kind", "key", "value"],
            {"n": ("count", None)}, parts)
        support: dict[str, int] = {}  # per vocabulary name
        heads: dict[str, list[tuple[int, str]]] = {}  # per head key: (count, surface)
        for kind, k, value, n in (counts.select("kind", "key", "value", "n").iter_rows()
                                  if counts.height else ()):
            if kind == "name":
                support[k] = int(n)
            else:
                heads.setdefault(k, []).append((int(n), value))
        new: dict[str, tuple[int, str]] = {}  # key: (support, name)
        # a taxonomy node's own name is never a new name (a category, "Fishing", names no type)
        for k, n in support.items():
            if (n >= cfg.min_support and k not in accepted and k not in names.known
                    and names.key_type(k) is None):
                new[k] = (n, vocab[k])
        if cfg.title_heads:
            for k, surfaces in heads.items():
                n = sum(c for c, _ in surfaces)
                if (n >= cfg.min_support and k not in accepted and k not in new
                        and k not in names.known and names.key_type(k) is None):
                    new[k] = (n, min(surfaces, key=lambda x: (-x[0], x[1]))[1])
        best = sorted(new, key=lambda k: (-new[k][0], k))[:cfg.max_title_types]
        return support, {k: new[k][1].lower() if lower else new[k][1] for k in best}

    @staticmethod
    def _with_title_name_types(ctx, candidates: pl.DataFrame, known: set[str], cfg,
                               parts: int) -> pl.DataFrame:
        """The new types that products took from their titles' words (`title names …` in their
        evidence), with those products as support; a name no product took is no type."""
        decisions = runtime.read_parquet(ctx.out / "_decisions", ["product_id", "type", "type_evidence"])

        def named(batch: pa.Table) -> pa.Table:
            ev = pc.fill_null(pc.starts_with(batch.column("type_evidence"), EVIDENCE_PREFIX), False)
            new = pc.invert(pc.fill_null(pc.is_in(batch.column("type"),
                                                  value_set=pa.array(sorted(known), pa.string())), False))
            return batch.filter(pc.and_(ev, new)).select(["product_id", "type"])

        took = decisions.map_batches(named, batch_format="pyarrow")
        # the examples: the first and last product id per type, in the same aggregate (a
        # per-group sample would cost a second shuffle)
        counts = runtime.aggregate(took, ["type"], {"support": ("count", None),
                                                    "first": ("min", "product_id"),
                                                    "last": ("max", "product_id")}, parts)
        if not counts.height:
            return candidates
        n_ex = min(cfg.max_examples, 2)
        rows = (counts.with_columns(
                    pl.col("support").cast(pl.Int64),
                    pl.col("support").cast(pl.Int64).alias("n_products"),
                    pl.concat_list("first", "last").list.unique(maintain_order=True).list.head(n_ex)
                    .alias("example_product_ids"),
                    pl.lit(None, pl.Float32).alias("mean_score"))
                .select(list(CANDIDATES_SCHEMA)).cast(CANDIDATES_SCHEMA))
        both = set(candidates["type"].to_list()) & set(rows["type"].to_list())
        if both:  # a tagger candidate that titles also named: one row, the supports added
            add = dict(rows.filter(pl.col("type").is_in(list(both))).select("type", "support").iter_rows())
            candidates = candidates.with_columns(
                (pl.col("support") + pl.col("type").replace_strict(add, default=0, return_dtype=pl.Int64))
                .alias("support"))
            rows = rows.filter(~pl.col("type").is_in(list(both)))
        return pl.concat([candidates, rows], how="vertical_relaxed").cast(CANDIDATES_SCHEMA).sort(
            ["support", "type"], descending=[True, False])

    def _resolve_step(self, ctx, tm, names: TypeNames, parents, art, encoder,
                      typed_types: set[str], name_support: dict[str, int] | None = None,
                      vocab: dict[str, str] | None = None) -> tuple[ResolveTypes, dict]:
        cfg = ctx.cfg.taxonomy

        def first_pass(batch: pa.Table) -> pa.Table:
            olds = batch.column("product_type").to_pylist()
            spans = batch.column("span_value").to_pylist()
            ref = [names.first_pass(o, s) for o, s in zip(olds, spans)]
            cat = [names.catalogue(o) is not None for o in olds]
            keep = pa.array([r is not None for r in ref])
            return (pa.table({"product_id": batch.column("product_id"), "ref_type": pa.array(ref, pa.string()),
                              "from_catalogue": pa.array(cat), "embedding": batch.column("embedding")})
                    .filter(keep))

        # the kNN reference: a capped sample of this catalogue's typed titles with their vectors,
        # written by the workers and read by each resolve worker in its setup(): never the driver's
        reference = write_reference(
            tm.select_columns(["product_id", "product_type", "span_value", "embedding"])
            .map_batches(first_pass, batch_format="pyarrow"),
            None, cfg.types.knn_catalogue_sample, ctx.cfg.seed, ctx.out / "_knn_reference")
        # every name a correction compares: the taxonomy's, the accepted new ones, the catalogue's
        type_names = sorted(set(names.known.values()) | set(names.accepted.values())
                            | {c for c in map(names.catalogue, typed_types) if c is not None})
        vectors = dict(zip(type_names, encoder.encode(type_names))) if type_names else {}
        step = ResolveTypes(resolved_floors(cfg.types, art), names, ancestors_map(parents), vectors,
                            reference, load_type_reference(art), cfg.add_title_attributes,
                            cfg.min_attribute_score, name_support,
                            reference_cap=cfg.types.knn_catalogue_sample,
                            names_written=names_written_by_type(art, vocab or {}, names, cfg.types.knn_k,
                                                                cfg.types.new_name_written_share))
        return step, self._floors_for_catalogue(ctx, step, names, art)

    @staticmethod
    def _floors_for_catalogue(ctx, step: ResolveTypes, names: TypeNames, art: Path) -> dict:
        """Where fit's floors are used and fit kept its grid: re-choose them for this catalogue's
        own mix of known- and new-type products (estimated in one Ray task from a capped sample
        of its untyped titles), in place on `step`. Returns what the manifest records."""
        tcfg = ctx.cfg.taxonomy.types
        set_here = [tcfg.knn_min_similarity is not None, tcfg.knn_min_share is not None]
        report = {"source": "config" if all(set_here) else "config and fit" if any(set_here) else "fit"}
        fitted = knn_floors.load(art)
        if (tcfg.knn_prior_sample > 0 and not any(set_here) and fitted
                and all(k in fitted for k in knn_floors.REBUILD_KEYS)):
            share, n_sample = runtime.run_task(
                _known_share_of_untyped, step, names, str(ctx.out / "_title_models"), fitted,
                tcfg.knn_prior_sample, ctx.cfg.seed, cfg=ctx.cfg)
            if n_sample >= MIN_PRIOR_SAMPLE:
                chosen = knn_floors.floors_for(fitted, share)
                step.cfg = step.cfg.model_copy(update={k: chosen[k] for k in
                                                       ("knn_min_similarity", "knn_min_share")})
                report = {"source": "fit grid, this catalogue's known share",
                          "known_share": round(share, 4), **chosen}
            report["untyped_sample"] = n_sample
        report.update({k: getattr(step.cfg, k) for k in ("knn_min_similarity", "knn_min_share")})
        return report

    @staticmethod
    def _type_counts(tm, tax_keys: set[str], cap: int, parts: int) -> runtime.TopKeys:
        """The catalogue's type labels with their product counts, capped in the workers: every
        label the taxonomy names (`tax_keys`, `type_key` form), then the `cap` most used others
        (a catalogue with a label per product sends the driver `cap` rows, not its products)."""
        def mark(batch: pa.Table) -> pa.Table:
            keys = [int(type_key(t) in tax_keys) for t in batch.column("product_type").to_pylist()]
            return batch.append_column("in_taxonomy", pa.array(keys, pa.int8()))

        valid = sample.where_valid(tm.select_columns(["product_type"]), "product_type")
        return runtime.top_keys(valid.map_batches(mark, batch_format="pyarrow"),
                                ["product_type", "in_taxonomy"], {"n": ("count", None)},
                                cap=len(tax_keys) + cap,
                                order_by=[("in_taxonomy", "desc"), ("n", "desc")],
                                num_partitions=parts)

    # ---- 4. per-product outputs, written by the workers ------------------------------------------
    @staticmethod
    def _write_products(ctx, products_path, decisions_dir, n: int, parts: int) -> dict:
        decisions = runtime.read_parquet(decisions_dir)
        decisions.map_batches(_explode("edits", TRIPLES), batch_format="pyarrow").write_parquet(
            str(ctx.out / "edits"))
        decisions.map_batches(_explode("ranked", PRODUCT_TYPE_CANDIDATES), batch_format="pyarrow"
                              ).write_parquet(str(ctx.out / "product_type_candidates"))
        products = runtime.read_parquet(products_path)
        # the title vector goes along (`title_vector`): the related stage reads it instead of
        # encoding every title a second time with the same encoder (related/stage.py)
        dim = _vector_size(decisions.schema(), "embedding")
        kept = ["product_id", *TYPE_COLUMNS, "title_attributes", *(["embedding"] if dim else [])]
        # at most `n` rows a side (one decision per product): a small catalogue joins in one task
        typed = runtime.join(products, decisions.map_batches(with_title_attributes, batch_format="pyarrow")
                             .select_columns(kept).map_batches(_vector_renamed, batch_format="pyarrow"),
                             ("product_id",), "left_outer",
                             max(1, math.ceil(n / JOIN_ROWS_PER_PARTITION)), left_rows=n, right_rows=n)
        schema = _typed_schema(dim)
        typed.map_batches(lambda b: _conform(b, schema), batch_format="pyarrow").write_parquet(
            str(ctx.out / "typed_products"))
        outcomes = runtime.aggregate(decisions.select_columns(["outcome", "n_spans"]), ["outcome"],
                                     {"n": ("count", None), "spans": ("sum", "n_spans")}, parts)
        return {
            "outcomes": {k or "none": int(v) for k, v in outcomes.select("outcome", "n").iter_rows()}
            if outcomes.height else {},
            "spans": int(outcomes["spans"].sum()) if outcomes.height else 0,
            "typed_products": count_rows(ctx.out / "typed_products"),
            "decisions": count_rows(decisions_dir),
            "edits": count_rows(ctx.out / "edits"),
        }

    @staticmethod
    def _spread_new_types(ctx, candidates: pl.DataFrame, types_cfg, known_reference, decisions_dir,
                          n: int, parts: int, reserved: set[str]) -> tuple[dict, TypeGroups]:
        """The refused products near the products of a new type take it (`SpreadNewTypes`):
        the new types' products (a capped sample per type, with their title vectors) join the
        first vote's reference of known types; `_decisions` is rewritten in place. Before the
        vote, new types closer to each other than any two known types are one type
        (`type_groups`): the same pass renames their products to the group's name."""
        new = set(candidates["type"].to_list())
        phases = progress.Phases()
        decisions = runtime.read_parquet(decisions_dir, ["product_id", "type", "embedding"])
        # every type's product count, once: the new types' reference and the known types' own
        # sample below each read their share of it (one pass over the decisions fewer)
        type_counts = runtime.aggregate(sample.where_valid(decisions.select_columns(["type"]), "type"),
                                        ["type"], {"n": ("count", None)}, parts)
        if not type_counts.height:
            type_counts = pl.DataFrame(schema={"type": pl.String, "n": pl.Int64})
        new_counts = type_counts.filter(pl.col("type").is_in(sorted(new)))
        ref, _counts = sample.per_key_sample(sample.where_in(decisions, "type", new), "type", "product_id",
                                             types_cfg.spread_per_type, types_cfg.spread_max,
                                             ctx.cfg.seed, parts, counts=new_counts)
        phases.done("reference")
        if not ref.height:
            return {"spread_reference": 0}, TypeGroups()
        groups = TypeGroups()
        known_types, known_vecs = _capped_known(known_reference, new, types_cfg.spread_per_type,
                                                ctx.cfg.seed)
        if types_cfg.group_new_types:
            support = dict(candidates.select("type", "support").iter_rows())
            ids = set(ref["product_id"].to_list())  # the sample's titles name the groups
            got = runtime.bounded_sample(sample.where_in(runtime.read_parquet(
                ctx.table_path("ingest", "products"), ["product_id", "title"]), "product_id", ids),
                len(ids), ctx.cfg.seed)
            title_of = dict(zip(got["product_id"].to_list(), got["title"].to_list())) if got.height else {}
            groups = group_new_types(ref["type"].to_list(), as_matrix(ref["embedding"]), known_types,
                                     known_vecs, support, types_cfg.knn_k, ctx.cfg.seed,
                                     titles=[title_of.get(p) for p in ref["product_id"].to_list()],
                                     reserved=reserved)
            phases.done("groups")
        floors: dict = {"skipped": "taxonomy.types.spread_floors is off: the first vote's floors"}
        if types_cfg.spread_floors:  # the spread vote's own floors, from this rebuild's new types
            floors = knn_floors.choose_spread_floors(
                [groups.rename.get(t, t) for t in ref["type"].to_list()], as_matrix(ref["embedding"]),
                known_types, known_vecs, types_cfg.knn_k, seed=ctx.cfg.seed)
            phases.done("floors")
        spread_cfg = types_cfg if "skipped" in floors else types_cfg.model_copy(update={
            "knn_min_similarity": floors["knn_min_similarity"], "knn_min_share": floors["knn_min_share"]})
        own = None
        if types_cfg.spread_own_known:  # this catalogue's products of known types, capped per type
            new_values = pa.array(sorted(new), pa.string())

            def known_typed(batch: pa.Table) -> pa.Table:
                t = batch.column("type")
                return batch.filter(pc.and_(pc.is_valid(t), pc.invert(
                    pc.fill_null(pc.is_in(t, value_set=new_values), False))))

            own, _c = sample.per_key_sample(
                decisions.map_batches(known_typed, batch_format="pyarrow"), "type", "product_id",
                types_cfg.spread_per_type, types_cfg.spread_max, ctx.cfg.seed, parts,
                counts=type_counts.filter(~pl.col("type").is_in(sorted(new))))
            phases.done("own_known")
        known_floors = (types_cfg.knn_min_similarity, types_cfg.knn_min_share)
        second: dict = {"skipped": "taxonomy.types.second_vote_floors is off: the first vote's floors"}
        if own is not None and own.height and types_cfg.second_vote_floors:
            # the second vote's own floors, from this catalogue's typed titles voting as refused
            # products would (knn_floors.choose_second_vote_floors)
            second = knn_floors.choose_second_vote_floors(
                own["type"].to_list(), as_matrix(own["embedding"]),
                [groups.rename.get(t, t) for t in ref["type"].to_list()], as_matrix(ref["embedding"]),
                known_types, known_vecs,
                (types_cfg.knn_min_similarity, spread_cfg.knn_min_similarity),
                types_cfg.knn_k, seed=ctx.cfg.seed)
            if "skipped" not in second:
                known_floors = (second["knn_min_similarity"], second["knn_min_share"])
            phases.done("second_vote_floors")
        step = SpreadNewTypes(spread_cfg, new, ref.select("type", "embedding"), known_reference,
                              rename=groups.rename,
                              own_known=own.select("type", "embedding")
                              if own is not None and own.height else None,
                              known_floors=known_floors)
        out = ctx.out / "_decisions_spread"
        runtime.map_step(runtime.read_parquet(decisions_dir), step, ctx.cfg, n).write_parquet(str(out))
        storage.replace_dir(out, decisions_dir)
        phases.done("vote")
        return {"spread_reference": int(ref.height), "groups": groups.report(), "floors": floors,
                "phase_seconds": phases.seconds,
                "second_vote_floors": second,
                "own_known_reference": int(own.height) if own is not None else 0}, groups

    @staticmethod
    def _name_new_types(ctx, candidates: pl.DataFrame, decisions_dir, types_cfg, parts: int,
                        reserved: set[str], type_names: set[str]) -> tuple[pl.DataFrame, dict]:
        """Each new type named by what most of its titles write, now that the spread has given
        it its titles (`type_naming`): a capped sample of every type's products and their
        titles reaches the driver; where a type is renamed, one pass over the resolved products
        renames it there (`_decisions` is rewritten in place)."""
        new = set(candidates["type"].to_list())
        typed = runtime.read_parquet(decisions_dir, ["product_id", "type", "edits"])
        got, _counts = sample.per_key_sample(typed, "type", "product_id", types_cfg.name_titles_per_type,
                                             types_cfg.spread_max, ctx.cfg.seed, parts)
        if not got.height or not new & set(got["type"].to_list()):
            return candidates, TypeNaming().report()
        ids = set(got["product_id"].to_list())
        found = runtime.bounded_sample(sample.where_in(runtime.read_parquet(
            ctx.table_path("ingest", "products"), ["product_id", "title"]), "product_id", ids),
            len(ids), ctx.cfg.seed)
        title_of = dict(zip(found["product_id"].to_list(), found["title"].to_list())) if found.height else {}
        titles: dict[str, list[str]] = {}
        blocked: dict[str, list[set[str]]] = {}
        for pid, t, edits in got.sort("product_id").select("product_id", "type", "edits").iter_rows():
            title = title_of.get(pid)
            if not isinstance(title, str):
                continue
            titles.setdefault(t, []).append(title)
            if t in new:
                blocked.setdefault(t, []).append(blocked_words(edits))
        variants = dict(candidates.select("type", "variants").iter_rows()) \
            if "variants" in candidates.columns else {}
        naming = name_new_types(titles, new, variants, reserved, blocked, types_cfg.name_min_share,
                                types_cfg.name_min_lift, types_cfg.name_min_titles, type_names)
        if naming.rename:
            out = ctx.out / "_decisions_named"
            runtime.read_parquet(decisions_dir).map_batches(
                renamed, fn_args=(naming.rename,), batch_format="pyarrow").write_parquet(str(out))
            storage.replace_dir(out, decisions_dir)
            candidates = renamed_candidates(candidates, naming.rename)
        return candidates, naming.report()

    # ---- hypernym context: bounded -------------------------------------------------------------
    def _children(self, ctx, candidates: pl.DataFrame, orphans: list[str], parts: int) -> pl.DataFrame:
        """Each accepted new type with a capped sample of the products it typed (ids and title
        vectors), and each orphan type with its name only."""
        schema = {"type": pl.String, "product_ids": pl.List(pl.String),
                  "vectors": pl.List(pl.List(pl.Float32))}
        rows = []
        new = sorted(candidates["type"].to_list()) if candidates.height else []
        if new:
            decisions = sample.where_in(runtime.read_parquet(ctx.out / "_decisions", ["product_id", "type"]),
                                  "type", set(new))
            cap = ctx.cfg.taxonomy.hypernym.max_child_products
            picked = sample.first_per_key(decisions, "type", "product_id", cap, ctx.cfg.seed)
            vecs = self._vectors_of(ctx, picked["product_id"].to_list() if picked.height else [])
            by_type: dict[str, list[str]] = {}
            for pid, t in (picked.select("product_id", "type").iter_rows() if picked.height else ()):
                by_type.setdefault(t, []).append(pid)
            for t in new:
                pids = sorted(p for p in by_type.get(t, []) if p in vecs)
                rows.append({"type": t, "product_ids": pids, "vectors": [vecs[p] for p in pids]})
        rows += [{"type": o, "product_ids": [], "vectors": []} for o in orphans if o not in set(new)]
        return pl.DataFrame(rows, schema=schema)

    @staticmethod
    def _vectors_of(ctx, pids: list[str]) -> dict[str, list[float]]:
        if not pids:
            return {}
        got = runtime.bounded_sample(
            sample.where_in(runtime.read_parquet(ctx.out / "_title_models", ["product_id", "embedding"]),
                      "product_id", set(pids)), len(set(pids)), ctx.cfg.seed)
        return dict(zip(got["product_id"].to_list(), got["embedding"].to_list())) if got.height else {}

    def _hypernym_context(self, ctx, typed, children: pl.DataFrame, hcfg, parts: int):
        """What the hypernym classifier reads of the catalogue: a per-type capped sample of its
        typed products (`typed`: product_id, product_type as this rebuild decided it, title
        vector), every type's product count and title-vector sum (aggregated by the workers), and
        the behaviour rows of the children's sampled products with the typed products they lead
        to (capped). Products of new types are skipped by the classifier's context.

        The products that behaviour links to the children's products join the context (their
        types are what the behaviour features count) up to `linked_max` of them, a seeded
        uniform draw: up to `behavior_max_rows` rows of each kind link up to twice as many
        products, each with its title vector (400,000 products' rows made this task the largest
        worker of a 400k-product rebuild, 2.3 GiB). Returns the counts with the tables."""
        linked_counts = {"linked": 0, "kept": 0}
        if typed is None:
            return None, None, None, None, linked_counts
        sums = sample.vector_sums(typed, "product_type", "embedding", parts)
        # the sums' per-type counts are the sample's: one pass over the typed products fewer
        context, _counts = sample.per_key_sample(typed, "product_type", "product_id", hcfg.context_per_type,
                                                 hcfg.context_max, ctx.cfg.seed, parts,
                                                 counts=sums.select("product_type", "n"))
        stats = sums.rename({"product_type": "type"})
        child_pids = sorted({p for lst in children["product_ids"].to_list() for p in lst})
        behavior = copurchase = None
        cap = hcfg.behavior_max_rows
        if child_pids and cap:
            linked: set[str] = set()
            if ctx.has("ingest", "copurchase") and count_rows(ctx.table_path("ingest", "copurchase")):
                cp = sample.where_in(runtime.read_parquet(ctx.table_path("ingest", "copurchase")),
                               ("src", "dst"), set(child_pids))
                copurchase = runtime.bounded_sample(cp, cap, ctx.cfg.seed, key=COPURCHASE_KEY)
                if copurchase.height:
                    linked |= set(copurchase["src"].to_list()) | set(copurchase["dst"].to_list())
            if ctx.has("ingest", "behavior") and count_rows(ctx.table_path("ingest", "behavior")):
                bh = runtime.read_parquet(ctx.table_path("ingest", "behavior"))
                queries = runtime.aggregate(sample.where_in(bh, "product_id", set(child_pids)),
                                            ["query"], {"n": ("count", None)}, parts)
                if queries.height:
                    qs = sorted(q for q in queries["query"].to_list() if q is not None)
                    behavior = runtime.bounded_sample(sample.where_in(bh, "query", set(qs)), cap,
                                                      ctx.cfg.seed, key=BEHAVIOR_KEY)
                    if behavior.height:
                        linked |= set(behavior["product_id"].drop_nulls().to_list())
            have = set(context["product_id"].to_list()) if context.height else set()
            extra = sorted(linked - have - set(child_pids))
            counts = {"linked": len(extra), "kept": len(extra)}
            if len(extra) > hcfg.linked_max:
                draws = runtime.row_draws(pa.table({"product_id": extra}), "product_id", ctx.cfg.seed)
                extra = sorted(extra[i] for i in np.argsort(draws, kind="stable")[:hcfg.linked_max])
                counts["kept"] = len(extra)
            if extra:
                more = runtime.bounded_sample(
                    sample.where_in(typed, "product_id", set(extra)), len(extra), ctx.cfg.seed)
                more = more.filter(pl.col("product_type").is_not_null()) if more.height else more
                if more.height:
                    context = pl.concat([context, more], how="vertical_relaxed") if context.height else more
            linked_counts = counts
        if context.height:
            context = context.sort("product_id")
        return context, behavior, copurchase, stats, linked_counts


def names_written_by_type(art: Path, vocab: dict[str, str], names: TypeNames,
                          min_titles: int, share: float = 0.0) -> dict[str, frozenset[str]]:
    """Per known type with at least `min_titles` titles in fit's kNN reference (a capped per-type
    sample, saved with the models): the vocabulary's name keys more than `share` of those titles
    write (0: any one). Bounded by the reference; read on the driver."""
    from collections import Counter

    titles = load_type_reference_titles(art)
    if not titles or not vocab:
        return {}
    keys = frozenset(vocab)
    by_type: dict[str, list[str]] = {}
    for t, title in titles:
        by_type.setdefault(names.canonical(t) or t, []).append(title)
    out = {}
    for t, ts in by_type.items():
        if len(ts) < min_titles:
            continue
        n = Counter(k for title in ts for k in set(name_keys(title, None, keys)))
        out[t] = frozenset(k for k, c in n.items() if c > share * len(ts))
    return out


def _capped_known(known_reference, exclude: set[str], per_type: int, seed: int
                  ) -> tuple[list[str], np.ndarray | None]:
    """At most `per_type` reference titles of each known type (a seeded draw), for the flows
    that calibrate which new types are one (`type_groups`)."""
    if known_reference is None or not len(known_reference[0]):
        return [], None
    types = list(known_reference[0])
    rng = np.random.default_rng(seed)
    by_type: dict[str, list[int]] = {}
    for i, t in enumerate(types):
        if t is not None and t not in exclude:
            by_type.setdefault(t, []).append(i)
    keep = sorted(i for rows in by_type.values()
                  for i in (rows if len(rows) <= per_type else rng.choice(rows, per_type, replace=False)))
    if not keep:
        return [], None
    return [types[i] for i in keep], np.asarray(known_reference[1], np.float32)[keep]


def _place_types(stage: TaxonomyStage, ctx, candidates: pl.DataFrame, orphans: list[str],
                 taxonomy: pl.DataFrame, has_edges: bool, art: Path, tagged: bool,
                 parts: int) -> tuple[int, pl.DataFrame, dict]:
    """The hypernyms of the new and orphan types (run by `runtime.run_task`, off the driver):
    (children placed, ranked parents, what the task read: the counts of behaviour-linked
    products and the task process's peak heap per phase, MiB, for the manifest)."""
    from autoknow_ray.memory import MemorySampler

    heap: dict[str, float] = {}
    seconds: dict[str, float] = {}

    def phase(name: str, fn, *args):
        t0 = time.perf_counter()
        with MemorySampler(0.1) as m:
            out = fn(*args)
        heap[name] = round(m.peaks.get("anon", m.peaks.get("rss", 0)) / 2**20, 1)
        seconds[name] = round(time.perf_counter() - t0, 2)
        return out

    children = phase("children", stage._children, ctx, candidates, orphans, parts)
    ranked = pl.DataFrame(schema={"type": pl.String, "parent": pl.String, "score": pl.Float32,
                                  "rank": pl.Int32, "accepted": pl.Boolean})
    linked = {"linked": 0, "kept": 0}
    # a flat taxonomy (no parent edge) has nothing to attach under: its new types are roots,
    # like its own types
    if children.height and has_edges and (art / "hypernym" / "config.json").exists():
        hyp = HypernymClassifier.load(art / "hypernym")
        # the types this rebuild decided (kept, corrected, added: a blind catalogue has no
        # catalogue types) with their title vectors
        typed = (runtime.read_parquet(ctx.out / "_decisions", ["product_id", "type", "embedding"])
                 .rename_columns({"type": "product_type"}) if tagged else None)
        # fp32, as the driver's type-name encoder: with `auto`, a timing probe in this task's
        # process picks bf16 or fp32, and the names' vectors, so the placements, would follow it
        # (docs/incremental.md, "Same inputs, same graph")
        encoder = TextEncoder(ctx.cfg.taxonomy.tagger.encoder, device=ctx.cfg.device, bf16=False)
        context, behavior, copurchase, stats, linked = phase(
            "context", stage._hypernym_context, ctx, typed, children, hyp.cfg, parts)
        ranked = phase("classifier", lambda: hyp.predict(
            children, taxonomy=taxonomy, products=context, behavior=behavior,
            copurchase=copurchase, encoder=encoder, type_stats=stats))
    return children.height, ranked, {**linked, "task_heap_peak_mib": heap, "task_seconds": seconds}


MIN_PRIOR_SAMPLE = 50  # fewer untyped titles than this: fit's floors as they are


def _known_share_of_untyped(step: ResolveTypes, names: TypeNames, title_models: str, floors: dict,
                            cap: int, seed: int) -> tuple[float, int]:
    """(share of this catalogue's untyped titles that look like titles of known types, sample
    size). Run by `runtime.run_task`. The untyped titles are those the kNN vote would answer (no
    catalogue type, no tagger type); their nearest-neighbour cosines are taken against a draw of
    the vote's reference as large as fit's validation reference, so they compare with the
    distributions fit measured there (a larger reference has closer neighbours)."""
    from autoknow_ray.index.knn_vote import normalize

    def untyped(batch: pa.Table) -> pa.Table:
        olds = batch.column("product_type").to_pylist()
        spans = batch.column("span_value").to_pylist()
        keep = pa.array([names.first_pass(o, sp) is None for o, sp in zip(olds, spans)])
        return batch.select(["product_id", "embedding"]).filter(keep)

    ds = runtime.read_parquet(title_models, ["product_id", "product_type", "span_value", "embedding"])
    got = runtime.bounded_sample(ds.map_batches(untyped, batch_format="pyarrow"), cap, seed)
    if got.height == 0:
        return 0.5, 0
    ref = step.vote_reference()
    if not len(ref):
        return 0.5, 0
    rng = np.random.default_rng(seed)
    size = min(len(ref), int(floors.get("rows") or len(ref)))
    ref = normalize(ref[np.sort(rng.choice(len(ref), size=size, replace=False))].astype(np.float32))
    q = normalize(as_matrix(got["embedding"], np.float32))
    nearest = np.concatenate([(q[i:i + 1024] @ ref.T).max(axis=1) for i in range(0, len(q), 1024)])
    share = knn_floors.known_share(knn_floors.nearest_histogram(nearest), floors["nearest_known"],
                                   floors["nearest_withheld"])
    return share, int(got.height)


def resolved_floors(types_cfg, art: Path):
    """The type-resolution settings with the kNN floors filled in: the config's where it sets
    them, else the ones fit chose on its validation (knn_floors.json), else the constants."""
    chosen = knn_floors.load(art) or {}
    update = {}
    for key, default in (("knn_min_similarity", KNN_MIN_SIMILARITY), ("knn_min_share", KNN_MIN_SHARE)):
        if getattr(types_cfg, key) is None:
            update[key] = float(chosen.get(key, default))
    return types_cfg.model_copy(update=update) if update else types_cfg


def _typed_schema(vector_dim: int | None = None) -> pa.Schema:
    """`typed_products`' columns; with `vector_dim`, also `title_vector` (the title models'
    fp16 title vector, null where a product's title was not embedded)."""
    return pa.schema([*PRODUCTS, ("type", pa.string()), ("type_status", pa.string()),
                      ("type_confidence", pa.float32()), ("type_evidence", pa.string()),
                      ("title_attributes", TITLE_ATTRIBUTES),
                      *([(TITLE_VECTOR, pa.list_(pa.float16(), vector_dim))] if vector_dim else [])])


def _vector_size(schema, column: str) -> int | None:
    """The list size of a fixed-size list column of a Ray Dataset's schema (None: no such
    column)."""
    if schema is None or column not in schema.names:
        return None
    t = schema.types[schema.names.index(column)]
    return int(t.list_size) if pa.types.is_fixed_size_list(t) else None


def _vector_renamed(batch: pa.Table) -> pa.Table:
    if "embedding" not in batch.column_names:
        return batch
    return batch.rename_columns([TITLE_VECTOR if c == "embedding" else c for c in batch.column_names])


def _conform(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    from autoknow_ray.schema import conform

    return conform(batch, schema)

