"""Module 3 as a pipeline stage: values missing from the graph, found in the products' texts.

  read     products with their current type (graph.state), their customer texts and the values
           earlier modules added (joined per product by Ray Data)
  tag      TagProducts in an actor pool: the type-conditioned tagger over every text, in windows
           -> RUN/imputation/candidates/ (one row per product)
  cluster  per-term aggregate, capped in the workers (`clusters.max_term_rows`) -> MiniLM +
           FAISS k-means on the driver (bounded by that cap)
  decide   DecideValues as tasks -> RUN/imputation/decisions/; the written ones -> edits/
  count    per decision and relation (Ray Data groupby)
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import ray

from autoknow_ray import runtime, storage
from autoknow_ray.graph import state
from autoknow_ray.modules.imputation.clusters import build_cluster_map
from autoknow_ray.modules.imputation.model import (
    TAGGER, known_value_thresholds, load_known_attribute_values, load_known_values,
    shipped_threshold, title_reference)
from autoknow_ray.modules.imputation.steps import (
    CANDIDATES, INPUT_COUNTS, PRODUCT_COLUMNS, DecideValues, TagProducts, TermRows, written)
from autoknow_ray.modules.imputation.texts import SEP
from autoknow_ray.incremental import (
    CachedStep, DropColumns, file_digest, manifest_counts, run_cached, source_digest)
from autoknow_ray.pipeline import RunContext, Stage, check_balance, ensure_shards, parquet_files
from autoknow_ray.schema import HAS_TYPE, TRIPLES

MODULE = "imputation"


def _partitions(n: int) -> int:
    return max(1, min(64, n // 20_000 + 1))


CUSTOMER_LISTS = pa.schema([("product_id", pa.string()), ("customer_kinds", pa.list_(pa.string())),
                            ("customer_texts", pa.list_(pa.string())),
                            ("customer_texts_dropped", pa.int64())])
UPSTREAM_LISTS = pa.schema([("product_id", pa.string()), ("upstream", pa.list_(pa.string()))])


def _customer_texts(block: pa.Table, cap: int) -> pa.Table:
    """Per product of a key partition (sorted by product: `runtime.map_key_blocks`): its texts
    as lists (the first `cap`, in their order, and how many were left out)."""
    df = pl.from_arrow(block.select(["product_id", "kind", "text"]))
    out = df.group_by("product_id", maintain_order=True).agg(
        pl.col("kind").head(cap).alias("customer_kinds"),
        pl.col("text").head(cap).alias("customer_texts"),
        (pl.len().cast(pl.Int64) - cap).clip(lower_bound=0).alias("customer_texts_dropped"))
    return out.to_arrow().cast(CUSTOMER_LISTS)


def _upstream_items(batch: pa.Table) -> pa.Table:
    keep = pc.and_(pc.not_equal(batch.column("relation"), HAS_TYPE),
                   pc.is_in(batch.column("status"), pa.array(["added", "corrected"])))
    b = batch.filter(keep)
    items = pc.binary_join_element_wise(b.column("relation").cast(pa.string()),
                                        b.column("object").cast(pa.string()), SEP)
    return pa.table({"product_id": b.column("subject").cast(pa.string()), "item": items})


def _upstream_lists(block: pa.Table) -> pa.Table:
    """Per product of a key partition: the values earlier modules added, as one list."""
    df = pl.from_arrow(block.select(["product_id", "item"]))
    return df.group_by("product_id", maintain_order=True).agg(
        pl.col("item").alias("upstream")).to_arrow().cast(UPSTREAM_LISTS)


def _fill_missing(batch: pa.Table) -> pa.Table:
    """Columns the steps read that this catalogue lacks (no texts table, no upstream edits)."""
    types = {"bullets": pa.list_(pa.string()), "customer_kinds": pa.list_(pa.string()),
             "customer_texts": pa.list_(pa.string()), "upstream": pa.list_(pa.string()),
             "customer_texts_dropped": pa.int64(),
             "attributes": pa.list_(pa.struct([("name", pa.string()), ("value", pa.string())]))}
    for name in PRODUCT_COLUMNS:
        if name not in batch.column_names:
            batch = batch.append_column(name, pa.nulls(batch.num_rows, types.get(name, pa.string())))
    return batch


TAG_STEP = "tagger_candidates"
# the modules whose source computes the cached candidates
TAG_CODE = ("autoknow_ray.modules.imputation.steps", "autoknow_ray.modules.imputation.model",
            "autoknow_ray.modules.imputation.texts", "autoknow_ray.nn.conditioned_tagger",
            "autoknow_ray.nn.encoder")


def tag_step(tag: TagProducts, model_dir, ctx: RunContext) -> CachedStep:
    """The type-conditioned tagger as a cached step: a product's candidates depend on the
    columns it reads (the key), and on the fitted tagger and type vectors, the fields and caps
    it reads them with, its span floor, the encoder, the precision, the device and the code."""
    from autoknow_ray.nn.encoder import resolve_encoder

    device = runtime.plan_actors(ctx.cfg, MODULE, state.n_products(ctx)).device
    try:
        encoder = file_digest([Path(resolve_encoder(tag.encoder))])
    except Exception:  # an encoder only a conditioned tagger loads; name it instead
        encoder = str(tag.encoder)
    return CachedStep(
        name=TAG_STEP, fresh=tag,
        reuse=DropColumns(tuple(c for c in PRODUCT_COLUMNS if c not in ("product_id", "type"))),
        inputs=PRODUCT_COLUMNS[1:],
        outputs=tuple(c for c in CANDIDATES.names if c not in ("product_id", "type")),
        fingerprint={"model": file_digest([Path(model_dir)]), "fields": list(tag.fields),
                     "max_chars": tag.max_chars, "max_customer_texts": tag.max_customer_texts,
                     "min_span_score": float(tag.min_span_score), "encoder": encoder,
                     "bf16": bool(runtime.model_bf16(device)), "device": device,
                     "code": source_digest(list(TAG_CODE))})


def products_with_context(ctx: RunContext, n: int):
    """typed products + their customer texts + the values earlier modules added, as one Ray
    Dataset with PRODUCT_COLUMNS (one row per product)."""
    cfg = ctx.cfg.imputation
    ds = state.typed_products(ctx, ["product_id", "title", "description", "bullets",
                                    "attributes", "brand"])
    texts_path = ctx.table_path("ingest", "texts")
    n_texts = state.count_rows(texts_path)
    if "texts" in cfg.fields and n_texts > 0:
        texts = ray.data.read_parquet(str(texts_path)).select_columns(["product_id", "kind", "text"])
        cap = cfg.max_texts_per_product
        # small inputs are grouped and joined in one task (runtime.map_key_blocks / join);
        # larger ones take the shuffles as before
        per_product = runtime.map_key_blocks(texts, "product_id", _customer_texts, fn_args=(cap,),
                                             n_rows=n_texts)
        ds = runtime.join(ds, per_product, ("product_id",), "left_outer", _partitions(n),
                          left_rows=n, right_rows=n_texts)
    upstream = state.upstream_edits(ctx, before=MODULE)
    if upstream is not None:
        n_up = state.upstream_edit_rows(ctx, before=MODULE)
        items = upstream.map_batches(_upstream_items, batch_format="pyarrow")
        lists = runtime.map_key_blocks(items, "product_id", _upstream_lists, n_rows=n_up)
        # every upstream edit may be a type (module 1 wrote no attribute): no list at all
        ds = runtime.join(ds, lists, ("product_id",), "left_outer", _partitions(n), left_rows=n,
                          right_rows=n_up, right_schema=UPSTREAM_LISTS)
    return ds.map_batches(_fill_missing, batch_format="pyarrow")


def _with_title_sure(batch: pa.Table, threshold: float) -> pa.Table:
    """The input counts, and per product its title's spans scoring at least `threshold` (the
    candidates keep every span at or above the stage's span floor, at most the threshold)."""
    out = [sum(1 for c in cands or [] if c["field"] == "title" and c["score"] >= threshold)
           for cands in batch.column("cands").to_pylist()]
    return batch.select(list(INPUT_COUNTS)).append_column("title_sure", pa.array(out, pa.int64()))


def shift_guard(reference: dict | None, titles: int, title_tokens: int, sure: int,
                factor: float | None, min_titles: int, auto: bool) -> dict:
    """Is the rebuilt catalogue like the one fit measured its precision on? Fit counted, on its
    validation titles, the spans scoring at least its threshold per 1,000 title tokens; a
    catalogue whose titles hold under 1/`factor` of that is one the tagger is seldom sure about:
    its precision there is unknown, and what it would write is held back."""
    rate = round(1000.0 * sure / title_tokens, 3) if title_tokens else None
    out = {"titles": titles, "title_tokens": title_tokens, "confident_spans": sure,
           "confident_spans_per_1k_tokens": rate, "fit": reference, "factor": factor,
           "held_back": False}
    if not auto:
        out["reason"] = "the threshold is set in the config: not guarded"
    elif factor is None:
        out["reason"] = "imputation.shift_factor is null: not guarded"
    elif not reference:
        out["reason"] = "the model's fit measured no titles (fitted before the guard): not guarded"
    elif titles < min_titles or rate is None:
        out["reason"] = f"{titles} titles, fewer than {min_titles}: too few to judge"
    else:
        ref = float(reference["confident_spans_per_1k_tokens"])
        if rate * factor < ref:
            out["held_back"] = True
            out["reason"] = (f"unlike the fit's catalogue: {rate:g} spans scoring at least the "
                             f"threshold per 1,000 title tokens against fit's {ref:g} (under "
                             f"1/{factor:g} of it) over {titles} titles; nothing written")
        else:
            out["reason"] = (f"like the fit's catalogue: {rate:g} sure spans per 1,000 title "
                             f"tokens against fit's {ref:g}")
    return out


def applicable_attributes(ctx: RunContext) -> dict[str, set[str]] | None:
    table = state.attribute_applicability(ctx)
    if table is None or table.height == 0:
        return None
    out: dict[str, set[str]] = {}
    for t, a, ok in table.select("type", "attribute", "applicable").iter_rows():
        out.setdefault(t, set())
        if ok:
            out[t].add(a)
    return out


class ImputationStage(Stage):
    name = MODULE
    config_sections = (MODULE, "resources")
    needs = ("ingest", "taxonomy", "relations")
    uses_models = True
    # candidates/: one row per product (its value candidates as a list, maybe empty)
    units = {"rows_in": "products", "rows_out": "products tagged (candidates rows)"}
    per_product = True
    balanced = True

    def fingerprint(self, ctx: RunContext) -> str:
        self.needs = tuple(s for s in ("ingest", "taxonomy", "relations") if s in ctx.cfg.stages)
        return super().fingerprint(ctx)

    def run(self, ctx: RunContext) -> dict:
        cfg = ctx.cfg.imputation
        n = state.n_products(ctx)
        model_dir = None if ctx.models is None else ctx.models / MODULE
        if model_dir is None or not (model_dir / TAGGER / "config.json").exists():
            return {"rows_in": n, "rows_out": 0, "rows_dropped": {"no imputation model": n},
                    "skipped": f"no imputation model in {model_dir} (fit found nothing to learn)"}
        min_confidence, abstain = shipped_threshold(model_dir, cfg.min_confidence)
        if min_confidence is None:
            # nothing is written: an empty edits table says so to the stages after
            ctx.write("edits", TRIPLES.empty_table(), TRIPLES)
            return {"rows_in": n, "rows_out": 0, "rows_dropped": {"abstained": n}, "facts_added": 0,
                    "abstained": abstain, "min_confidence": None}
        # fit's one threshold; with its pair for known values (calibration.json) the others are
        # admitted from the pair's `threshold_unknown` and fit's known values from `threshold_known`
        single = min_confidence
        pair = known_value_thresholds(model_dir, cfg.min_confidence, cfg.known_value_threshold)
        known_threshold, known_terms = None, frozenset()
        if pair is not None:
            known_threshold, min_confidence = pair
            known_terms = load_known_attribute_values(model_dir, cfg.known_value_terms_max)
        products = products_with_context(ctx, n)
        tag = TagProducts(model_dir, cfg.fields, cfg.max_text_chars, cfg.max_texts_per_product,
                          cfg.infer_batch_size, cfg.clusters.min_span_score
                          if cfg.clusters.enabled else min(min_confidence, known_threshold or 1.0),
                          cfg.tagger.encoder)
        t0 = time.perf_counter()
        # the tagger as a cached step (`rebuild --previous RUN` reuses RUN's candidates of every
        # product whose texts, type and upstream values are unchanged; incremental.py), over the
        # products written once with every column it reads
        scratch, cache = ctx.out / "_products", {}
        products.select_columns(list(PRODUCT_COLUMNS)).write_parquet(str(scratch))
        if state.count_rows(scratch):
            cache = run_cached(tag_step(tag, model_dir, ctx), parquet_files(scratch),
                               ctx.cfg, ctx.out / "candidates", ctx.out, ctx.resume,
                               ctx.previous_stage(self.name))
        ensure_shards(ctx.out / "candidates", CANDIDATES)
        storage.rmtree(scratch)
        tag_seconds = time.perf_counter() - t0
        cands = runtime.read_parquet(ctx.out / "candidates")
        sums = runtime.column_sums(cands.map_batches(
            _with_title_sure, fn_args=(float(single),), batch_format="pyarrow"),
            [*INPUT_COUNTS, "title_sure"]) if n else {}
        input_counts = {k: int(sums.get(k) or 0) for k in INPUT_COUNTS} if sums else {}
        rows_out = state.count_rows(ctx.out / "candidates")

        guard = shift_guard(title_reference(model_dir), input_counts.get("titles", 0),
                            input_counts.get("title_tokens", 0), int(sums.get("title_sure") or 0)
                            if sums else 0, cfg.shift_factor,
                            cfg.shift_min_titles, cfg.min_confidence == "auto")

        cluster_map, cluster_stats = {}, {"enabled": cfg.clusters.enabled}
        if cfg.clusters.enabled and rows_out:
            cluster_map, stats = self._clusters(ctx, cands, model_dir, min_confidence,
                                                known_threshold, known_terms)
            cluster_stats.update(stats)
        decide = DecideValues(min_confidence, cfg.clusters.min_span_score, cluster_map,
                              applicable_attributes(ctx), cfg.emit_conflicts,
                              cfg.conflict_min_confidence, hold_back=guard["held_back"],
                              known_threshold=known_threshold, known_values=known_terms)
        decisions = runtime.map_step(cands, decide, ctx.cfg, n, repartition=False)
        decisions.write_parquet(str(ctx.out / "decisions"))
        per = None
        if state.count_rows(ctx.out / "decisions"):  # no candidate anywhere: no file either
            dec = runtime.read_parquet(ctx.out / "decisions")
            edits = dec.filter(lambda r: written(r["decision"]))
            edits.select_columns([f.name for f in TRIPLES]).write_parquet(str(ctx.out / "edits"))
            per = runtime.aggregate(dec, ["decision", "relation"], {"n": ("count", None)})
        decisions_count: Counter = Counter()
        added_per_relation: Counter = Counter()
        if per is not None and per.height:
            for d, rel, k in per.select("decision", "relation", "n").iter_rows():
                decisions_count[d] += int(k)
                if written(d):
                    added_per_relation[rel] += int(k)
        tokens = input_counts.get("tokens", 0)
        # every candidate value leaves one decision row, written or not, each with its reason
        check_balance("imputation candidate values", input_counts.get("candidate_values", 0),
                      sum(decisions_count.values()))
        return {
            "rows_in": n,
            "rows_out": rows_out,
            "input": input_counts,
            "tag_seconds": round(tag_seconds, 2),
            "tokens_per_s": round(tokens / tag_seconds, 1) if tag_seconds > 0 else None,
            "decisions": dict(decisions_count),
            "facts_added": sum(added_per_relation.values()),
            "facts_added_per_relation": dict(added_per_relation.most_common()),
            "clusters": cluster_stats,
            # keyed tables cut by their caps: rows left out
            "truncated": {"cluster_term_rows": cluster_stats.get("term_rows_left_out", 0)},
            "min_confidence": min_confidence,
            "min_confidence_setting": cfg.min_confidence,
            # fit's one threshold, and where its pair for known values is used, the known one
            # (min_confidence is then the pair's threshold for the other values)
            "min_confidence_single": single,
            "min_confidence_known": known_threshold,
            "known_value_terms": len(known_terms),
            "shift_guard": guard,
            **({"abstained": guard["reason"]} if guard["held_back"] else {}),
            "conditioned_on_type": self._conditioned(model_dir),
            # per-product candidates reused from --previous, recomputed, added, removed
            **manifest_counts(TAG_STEP, cache),
        }

    def _clusters(self, ctx: RunContext, cands, model_dir, min_confidence: float,
                  known_threshold: float | None = None, known_terms=frozenset()):
        import polars as pl

        from autoknow_ray.nn.encoder import TextEncoder

        cfg = ctx.cfg.imputation
        rows = runtime.map_step(cands, TermRows(min_confidence, known_threshold, known_terms),
                                ctx.cfg, repartition=False)
        # capped in the workers: the most frequent (type, term, attribute) rows, ties by key
        top = runtime.top_keys(rows, ["type", "term", "attribute"], {"n": ("count", None)},
                               cap=cfg.clusters.max_term_rows, order_by=[("n", "desc")])
        terms = top.rows
        term_rows = {"term_rows": top.keys, "term_rows_kept": terms.height,
                     "term_rows_left_out": top.left_out}
        known = load_known_values(model_dir)
        parts = [p.select("type", "term", "attribute", pl.col("n").cast(pl.Int64))
                 for p in (terms, known) if p.height]
        if not parts:
            return {}, {"terms": 0, **term_rows}
        table = pl.concat(parts, how="vertical_relaxed").with_columns(pl.col("type").fill_null(""))
        encoder = TextEncoder(cfg.tagger.encoder, device=ctx.cfg.device)
        mapping, stats = build_cluster_map(table, encoder, cfg.clusters, ctx.cfg.seed)
        return mapping, {**stats, **term_rows}

    @staticmethod
    def _conditioned(model_dir) -> bool:
        import json

        return bool(json.loads((model_dir / TAGGER / "config.json").read_text()).get("context_dim"))
