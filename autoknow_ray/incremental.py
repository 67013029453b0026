"""Incremental rebuilds: a content-addressed cache of a stage's per-product model outputs.

A rebuild keeps, inside the stage folder it commits, each cached step's per-product outputs as
Parquet shards: `RUN/<stage>/cache/<step>/` with `product_id`, `cache_key` and the step's output
columns. `cache_key` hashes the product's input columns the step's models read (the title, for
the taxonomy stage's title models) with the step's fingerprint (model artifacts, the config the
step reads, the precision it runs at, the source of the code that computes it). A later
`rebuild --previous RUN` joins tonight's products with RUN's cache in the workers (a left outer
join on product_id: one task where both sides are small, else Ray Data's hash join; never on the
driver): a product whose key is unchanged takes the cached
outputs, the rest (new products, changed inputs, everything when the fingerprint changed) go
through the models, and every aggregate and decision after the step is computed from the cached
and fresh outputs together. A product gone from the catalogue is counted and not joined further.
The new run writes its own cache (the union it used), so the next night can chain.

The previous run is only read. Its cache is used only when its stage manifest says complete; the
new run's cache lives in the new stage's tmp folder until the stage commits (manifest last), so
a killed incremental run leaves the previous run as it was and resumes or starts over like any
rebuild. See docs/incremental.md.

Reusing a cached output gives exactly the graph a full rebuild gives because the cached models
are batch-invariant: `nn.encoder.same_length_batches` batches only texts of one token length, so
a title's spans, scores and vector are bit-identical whatever else is in its batch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from autoknow_ray import runtime, storage
from autoknow_ray.pipeline import read_manifest
from autoknow_ray.steps import Chain, Step

log = logging.getLogger(__name__)

CACHE = "cache"  # RUN/<stage>/cache/<step>/
KEY = "cache_key"
PREV_KEY = "_previous_key"
STATE = "_cache_state"
REUSED, CHANGED, ADDED = "reused", "changed", "added"
JOIN_ROWS_PER_PARTITION = 200_000


def cache_dir(stage_dir: Path, step: str) -> Path:
    return storage.path(stage_dir) / CACHE / step


def file_digest(paths: list[Path]) -> str:
    """A content hash of model artifact files (every file under each folder, by relative name)."""
    h = hashlib.sha256()
    for root in paths:
        root = Path(root)
        if not root.exists():
            h.update(f"absent:{root.name}".encode())
            continue
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(root)).encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:20]


def source_digest(modules: list[str]) -> str:
    """A hash of the source files of the modules that compute a cached step's outputs: a change
    to that code invalidates the cache; a change anywhere else in the package does not."""
    import importlib

    h = hashlib.sha256()
    for name in sorted(modules):
        mod = importlib.import_module(name)
        h.update(name.encode())
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:20]


@dataclass
class CachedStep:
    """One cached per-product step of a stage.

    `fresh`: what a product with no usable cached output goes through (the models, and the cheap
    steps the stage runs on their outputs in the same worker); `reuse`: what a cached row (the
    product's `fresh` input columns, `cache_key` and the cached `outputs`) goes through to give
    the same per-product row (the cheap steps; they may read what the key does not cover, such
    as this catalogue's taxonomy); `inputs`: the product columns the models read, hashed into
    the key; `outputs`: the models' columns, kept in the cache; `fingerprint`: everything else
    the outputs depend on (model artifacts, config, precision, code), hashed.
    """

    name: str
    fresh: Step
    reuse: Step | None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    fingerprint: dict = field(default_factory=dict)

    def digest(self) -> str:
        return fingerprint_digest(self.fingerprint)


def fingerprint_digest(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:20]


class DropColumns(Step):
    """Drops `drop` (a cached row's copy of what the models drop, such as the title)."""

    name = "drop_columns"

    def __init__(self, drop: tuple[str, ...]):
        self.drop = tuple(drop)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        return batch.drop_columns([c for c in self.drop if c in batch.column_names])


class ProductKey(Step):
    """Appends `cache_key`: a hash of the step's fingerprint and the product's input columns."""

    name = "cache_key"

    def __init__(self, digest: str, inputs: tuple[str, ...], columns: tuple[str, ...]):
        self.digest = digest
        self.inputs = tuple(inputs)
        self.columns = tuple(columns)  # what passes through (the model chain's input columns)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        values = [batch.column(c).to_pylist() for c in self.inputs]
        keys = [hashlib.sha256(json.dumps([self.digest, *row], ensure_ascii=False).encode()
                               ).hexdigest()[:32] for row in zip(*values)]
        return batch.append_column(KEY, pa.array(keys, pa.string()))


def _classify(types: dict[str, pa.DataType]):
    """A task over the left outer join of tonight's keyed products with the previous cache: each
    row's state (added, reused, changed), and tonight's columns cast back to their own types."""

    def run(batch: pa.Table) -> pa.Table:
        now, before = batch.column(KEY), batch.column(PREV_KEY)
        state = pc.if_else(pc.is_null(before), ADDED,
                           pc.if_else(pc.equal(now, before), REUSED, CHANGED))
        for name, t in types.items():
            if name in batch.column_names and batch.schema.field(name).type != t:
                i = batch.column_names.index(name)
                batch = batch.set_column(i, name, batch.column(name).cast(t))
        return batch.append_column(STATE, state.cast(pa.string()))

    return run


def _where_state(states: set[str]):
    def run(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.is_in(batch.column(STATE), pa.array(sorted(states), pa.string())))

    return run


def previous_cache(previous_stage: Path | None, step: CachedStep) -> tuple[Path | None, str]:
    """(the previous run's cache folder for `step`, why not when None). Usable only where that
    stage committed (manifest complete) with the same step fingerprint."""
    return _previous_folder(previous_stage, step.name, step.digest())


def _previous_folder(previous_stage: Path | None, name: str, digest: str) -> tuple[Path | None, str]:
    if previous_stage is None:
        return None, "no previous run"
    done = read_manifest(previous_stage)
    if not done.get("complete"):
        return None, f"{previous_stage}: no complete stage"
    meta = (done.get("cache") or {}).get(name) or {}
    if meta.get("fingerprint") != digest:
        return None, "model, config or code changed since the previous run"
    folder = cache_dir(previous_stage, name)
    if not folder.is_dir():
        return None, f"{folder}: absent"
    return folder, ""


def run_cached(step: CachedStep, files: list, cfg, out: Path, stage_out: Path, resume: Path | None,
               previous_stage: Path | None) -> dict:
    """The stage's per-product table of `step` in `out` (what `step.fresh` gives for every
    product of `files`), reusing `previous_stage`'s cache where a product's key is unchanged;
    writes this run's cache to `stage_out/cache/<step>/`. Returns the counts for the manifest:
    products reused, recomputed, added (not in the previous cache), changed (in it, with another
    key), removed (in it, not in this catalogue)."""
    from autoknow_ray.pipeline import count_rows

    t0 = time.perf_counter()
    digest = step.digest()
    fresh = Chain(step.fresh.name, [ProductKey(digest, step.inputs, step.fresh.columns), step.fresh],
                  resources=step.fresh.resources)
    n = sum(count_rows(storage.path(f)) for f in files)
    prev, why = previous_cache(previous_stage, step)
    counts = {"fingerprint": digest, "previous": str(previous_stage) if previous_stage else None}
    if prev is None:
        if previous_stage is not None:
            log.info("%s: previous cache not used: %s", step.name, why)
            counts["previous_not_used"] = why
        # every product through the models (chunk by chunk, resumable)
        chunks = runtime.map_step_checkpointed(files, fresh, cfg, out, resume)
        counts.update({"products": n, "reused": 0, "recomputed": n, "added": n, "changed": 0,
                       "removed": 0, "chunks": chunks["chunks"], "chunks_resumed": chunks["skipped"]})
        if previous_stage is not None:  # added / removed against the previous run's products
            counts.update(_added_removed(files, previous_stage, step, n, cfg))
    else:
        counts.update(_incremental(step, fresh, digest, files, cfg, out, stage_out, prev, n))
    # this run's cache: every product's key and model outputs, cached and fresh alike
    runtime.read_parquet(out, ["product_id", KEY, *step.outputs]).write_parquet(
        str(cache_dir(stage_out, step.name)))
    counts["seconds"] = round(time.perf_counter() - t0, 2)  # the step, its join and its cache
    return counts


def _split_small(files: list[str], prev_files: list[str], digest: str, key_inputs: tuple[str, ...],
                 inputs: list[str], outputs: list[str], misses: str, reused: str) -> dict:
    """In one task (tonight's products and the previous cache both small): each product's key
    against the previous cache's, the products to recompute (their input columns) written to
    `misses`, the reused ones (input columns, key and cached outputs) to `reused`, tonight's
    order and column types kept. Returns the counts of each state and of the cache's rows."""
    import pyarrow.parquet as pq

    products = pa.concat_tables([pq.read_table(f, columns=inputs) for f in files]) if files else None
    keyed = ProductKey(digest, key_inputs, tuple(inputs)).process_batch(products)
    cache = pa.concat_tables([pq.read_table(f, columns=["product_id", KEY, *outputs])
                              for f in prev_files]) if prev_files else None
    n_cached = cache.num_rows if cache is not None else 0
    if cache is not None and n_cached:
        at = pc.index_in(keyed.column("product_id"), value_set=cache.column("product_id"))
        before = cache.column(KEY).take(at)
    else:
        at, before = None, pa.nulls(keyed.num_rows, pa.string())
    hit = pc.fill_null(pc.equal(keyed.column(KEY), before), False)
    added = pc.is_null(before)
    changed = pc.and_(pc.invert(added), pc.invert(hit))
    pq.write_table(products.filter(pc.invert(hit)), misses)
    rows = keyed.filter(hit)
    if at is not None:
        taken = cache.select(outputs).take(pc.filter(at, hit))
        for name in outputs:
            rows = rows.append_column(taken.schema.field(name), taken.column(name))
    pq.write_table(rows, reused)
    return {ADDED: int(pc.sum(added).as_py() or 0), CHANGED: int(pc.sum(changed).as_py() or 0),
            REUSED: rows.num_rows, "cached_rows": n_cached}


def _incremental(step: CachedStep, fresh_step: Step, digest: str, files: list, cfg, out: Path,
                 stage_out: Path, prev: Path, n: int) -> dict:
    from autoknow_ray.pipeline import count_rows

    n_cached = count_rows(prev)  # one row per product
    if (max(n, n_cached) <= runtime.SMALL_SHUFFLE_ROWS and not storage.is_remote(stage_out)
            and not storage.is_remote(prev) and not any(storage.is_remote(f) for f in files)):
        return _incremental_small(step, fresh_step, digest, files, cfg, out, stage_out, prev, n)
    t0 = time.perf_counter()
    inputs = list(step.fresh.columns)
    products = runtime.read_parquet([str(f) for f in files]).select_columns(inputs)
    types = {f.name: f.type for f in pa.schema(products.schema().base_schema)}
    keyed = products.map_batches(_run_key(ProductKey(digest, step.inputs, tuple(inputs))),
                                 batch_format="pyarrow")
    cached = runtime.read_parquet(prev, ["product_id", KEY, *step.outputs]).rename_columns(
        {KEY: PREV_KEY})
    parts = max(1, math.ceil(max(n, n_cached, 1) / JOIN_ROWS_PER_PARTITION))
    # tonight's products with their previous outputs, where cached: a left outer join (in one
    # task where both sides are small, runtime.join); a cached product not matched is removed
    joined = runtime.join(keyed, cached, ("product_id",), "left_outer", parts, left_rows=n,
                          right_rows=n_cached)
    scratch = stage_out / "_cache_join"
    joined.map_batches(_classify({**types, KEY: pa.string(), PREV_KEY: pa.string()}),
                       batch_format="pyarrow").write_parquet(str(scratch))
    states = runtime.aggregate(runtime.read_parquet(scratch, [STATE]), [STATE],
                               {"n": ("count", None)}, 1)
    by_state = {s: int(c) for s, c in states.select(STATE, "n").iter_rows()} if states.height else {}
    n_miss = by_state.get(ADDED, 0) + by_state.get(CHANGED, 0)
    n_hit = by_state.get(REUSED, 0)
    removed = n_cached - n_hit - by_state.get(CHANGED, 0)
    seconds = {"join": round(time.perf_counter() - t0, 2)}
    fresh = out / "fresh"
    # fresh: new products and changed inputs, through the models and the steps after them
    t0 = time.perf_counter()
    if n_miss:
        misses = stage_out / "_cache_misses"
        (runtime.read_parquet(scratch).map_batches(_where_state({ADDED, CHANGED}),
                                                   batch_format="pyarrow")
         .select_columns(inputs).write_parquet(str(misses)))
        runtime.map_step_checkpointed(sorted(storage.path(misses).rglob("*.parquet")), fresh_step,
                                      cfg, fresh, None)
        storage.rmtree(misses)
    seconds["fresh"] = round(time.perf_counter() - t0, 2)
    # cached: the previous outputs, through the steps after the models, in the column order the
    # models' chain writes (one pass, one write)
    t0 = time.perf_counter()
    if n_hit:
        _write_reused(runtime.read_parquet(scratch).map_batches(_where_state({REUSED}),
                                                                batch_format="pyarrow")
                      .select_columns([*inputs, KEY, *step.outputs]),
                      step, inputs, cfg, n_hit, fresh if n_miss else None, out)
    seconds["cached"] = round(time.perf_counter() - t0, 2)
    storage.rmtree(scratch)
    return {"products": n, "reused": n_hit, "recomputed": n_miss, "added": by_state.get(ADDED, 0),
            "changed": by_state.get(CHANGED, 0), "removed": removed,
            "chunks": 1 if n_miss else 0, "chunks_resumed": 0, "phase_seconds": seconds}


def _write_reused(ds, step: CachedStep, inputs: list[str], cfg, n_hit: int, fresh: Path | None,
                  out: Path) -> None:
    """The reused rows (input columns, key, cached outputs) through the steps after the models,
    written to `out/cached` in the column order the fresh rows were written in (one pass)."""
    if step.reuse is not None:
        ds = runtime.map_step(ds, _Passing(step.reuse, [*inputs, KEY, *step.outputs]), cfg, n_hit)
    order = runtime.read_parquet(fresh).schema().names if fresh is not None else None
    (ds.select_columns(order) if order else ds).write_parquet(str(out / "cached"))


def _incremental_small(step: CachedStep, fresh_step: Step, digest: str, files: list, cfg,
                       out: Path, stage_out: Path, prev: Path, n: int) -> dict:
    """`_incremental` where tonight's products and the previous cache are both small
    (`runtime.SMALL_SHUFFLE_ROWS`): the keys, the join with the previous cache and the split
    into products to recompute and products reused in one task (`_split_small`) instead of a
    join, a classification pass, a count and a filter pass; the same rows."""
    t0 = time.perf_counter()
    inputs = list(step.fresh.columns)
    scratch = storage.path(stage_out) / "_cache_split"
    storage.rmtree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    misses, reused = scratch / "misses.parquet", scratch / "reused.parquet"
    by_state = runtime.run_task(
        _split_small, [str(storage.path(f)) for f in files],
        [str(f) for f in sorted(storage.path(prev).rglob("*.parquet"))], digest, step.inputs,
        inputs, list(step.outputs), str(misses), str(reused), cfg=cfg)
    n_miss, n_hit = by_state[ADDED] + by_state[CHANGED], by_state[REUSED]
    removed = by_state["cached_rows"] - n_hit - by_state[CHANGED]
    seconds = {"join": round(time.perf_counter() - t0, 2)}
    fresh = out / "fresh"
    t0 = time.perf_counter()
    if n_miss:
        runtime.map_step_checkpointed([str(misses)], fresh_step, cfg, fresh, None)
    seconds["fresh"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    if n_hit:
        _write_reused(runtime.read_parquet(reused), step, inputs, cfg, n_hit,
                      fresh if n_miss else None, out)
    seconds["cached"] = round(time.perf_counter() - t0, 2)
    storage.rmtree(scratch)
    return {"products": n, "reused": n_hit, "recomputed": n_miss, "added": by_state[ADDED],
            "changed": by_state[CHANGED], "removed": removed,
            "chunks": 1 if n_miss else 0, "chunks_resumed": 0, "phase_seconds": seconds,
            "split": "one task (small inputs)"}


def manifest_counts(step: str, cache: dict) -> dict:
    """A stage manifest's view of a cached step's run (`run_cached`'s counts): products reused
    from --previous, recomputed, added and removed, and the counts under `cache.<step>`."""
    return {**{f"products_{k}": cache.get(k, 0) for k in ("reused", "recomputed", "added", "removed")},
            "cache": {step: cache} if cache else {}}


def _run_key(step: ProductKey):
    def run(batch: pa.Table) -> pa.Table:
        return step.process_batch(batch)

    return run


class _Passing(Step):
    """`inner` (the steps after the model) with every column of the batch passed to it."""

    def __init__(self, inner: Step, columns: list[str]):
        self.inner = inner
        self.name = inner.name
        self.resources = inner.resources
        self.model = inner.model
        self.columns = tuple(columns)

    def setup(self, env) -> None:
        self.inner.setup(env)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        return self.inner.process_batch(batch)


def _added_removed(files: list, previous_stage: Path, step: CachedStep, n: int, cfg) -> dict:
    """Products added and removed since the previous run, where its cache could not be used
    (fingerprint changed): a join of product ids, in the workers."""
    from autoknow_ray.pipeline import count_rows

    folder = cache_dir(previous_stage, step.name)
    if not folder.is_dir():
        return {}
    if (max(n, count_rows(folder)) <= runtime.SMALL_SHUFFLE_ROWS and not storage.is_remote(folder)
            and not any(storage.is_remote(f) for f in files)):
        # both id lists small: two sets in one task, where each anti join's shuffle costs seconds
        return runtime.run_task(_added_removed_small, [str(storage.path(f)) for f in files],
                                [str(f) for f in sorted(storage.path(folder).rglob("*.parquet"))],
                                cfg=cfg)
    ids = runtime.read_parquet([str(f) for f in files], ["product_id"])
    before = runtime.read_parquet(folder, ["product_id"])
    parts = max(1, math.ceil(max(n, 1) / JOIN_ROWS_PER_PARTITION))
    return {"added": ids.join(before, "left_anti", parts, on=("product_id",)).count(),
            "removed": before.join(ids, "left_anti", parts, on=("product_id",)).count()}


def _added_removed_small(files: list[str], cached: list[str]) -> dict:
    """`_added_removed` for small inputs, in one task: the product ids as two sets."""
    import pyarrow.parquet as pq

    now, before = ({v for f in paths for v in pq.read_table(f, columns=["product_id"])
                    .column("product_id").to_pylist()} for paths in (files, cached))
    return {"added": len(now - before), "removed": len(before - now)}


def reuse_on_driver(name: str, rows, key: list[str], values: list[str], fingerprint: dict,
                    compute, stage_out: Path, previous_stage: Path | None):
    """A cache of a per-term (or per-pair) model output for a stage whose rows are already on
    the driver, bounded by a cap (the synonyms vocabulary and its candidate pairs): `rows` (a
    polars frame, unique on `key`) whose `values` the previous run computed with the same
    `fingerprint` are taken from its cache (`RUN/<stage>/cache/<name>/`), the rest go through
    `compute(frame) -> frame` (the model step, in the workers); this run's cache is written to
    `stage_out`. Returns (every row with its values, in no particular order; counts for the
    manifest). The models are batch-invariant, so a reused value is the one a full rebuild
    computes."""
    import polars as pl

    from autoknow_ray.pipeline import write_table

    t0 = time.perf_counter()
    digest = fingerprint_digest(fingerprint)
    counts = {"fingerprint": digest, "previous": str(previous_stage) if previous_stage else None}
    folder, why = _previous_folder(previous_stage, name, digest)
    cached = _cached_rows_of(folder, rows, key, values) if folder is not None else None
    if folder is None and previous_stage is not None:
        counts["previous_not_used"] = why
    if cached is not None and rows.height:
        hit = rows.join(cached, on=key, how="inner", nulls_equal=True)
        miss = rows.join(cached.select(key), on=key, how="anti", nulls_equal=True)
    else:
        hit, miss = None, rows
    fresh = compute(miss) if miss.height else None
    parts = [p for p in (hit, fresh) if p is not None and p.height]
    out = (pl.concat([p.select(fresh.columns if fresh is not None else p.columns) for p in parts],
                     how="vertical_relaxed") if parts else (fresh if fresh is not None else miss))
    if parts:
        write_table(cache_dir(stage_out, name) / "part-0.parquet", out.select(*key, *values))
    counts.update(reused=hit.height if hit is not None else 0, recomputed=miss.height,
                  rows=rows.height, seconds=round(time.perf_counter() - t0, 2))
    return out, counts


def _cached_rows_of(folder: Path, rows, key: list[str], values: list[str]):
    """The previous cache's rows whose key is among `rows` (tonight's capped vocabulary or
    pairs), read batch by batch: the driver holds at most as many cached rows as it holds rows
    tonight, whatever the previous run's caps were."""
    import polars as pl
    import pyarrow.dataset as pds

    fs, paths = storage.dataset_files([f for f in storage.files(folder) if str(f).endswith(".parquet")])
    data = pds.dataset(paths, format="parquet", filesystem=fs)
    wanted = rows.select(key).unique()
    parts = [pl.from_arrow(data.schema.empty_table().select([*key, *values]))]
    for batch in data.to_batches(columns=[*key, *values]):
        part = pl.from_arrow(pa.Table.from_batches([batch])).join(wanted, on=key, how="semi",
                                                                  nulls_equal=True)
        if part.height:
            parts.append(part)
    return pl.concat(parts, how="vertical_relaxed")
