"""Keyed passes and model steps over small inputs skip Ray Data's fixed costs (a shuffle's worker
processes, an actor pool's fresh processes) and give what the shuffle and the pool give."""
from __future__ import annotations

import json

import polars as pl
import pyarrow as pa
import pytest

from autoknow_ray import runtime
from autoknow_ray.config import Config
from autoknow_ray.steps import Step, WorkerEnv


def _frame(ds) -> pl.DataFrame:
    import ray

    parts = [pl.from_arrow(t) for t in ray.get(ds.to_arrow_refs())]
    parts = [p for p in parts if p.height]
    return pl.concat(parts, how="vertical_relaxed") if parts else pl.DataFrame()


def _sorted(df: pl.DataFrame) -> pl.DataFrame:
    df = df.select(sorted(df.columns))
    return df.sort([c for c in df.columns if not isinstance(df[c].dtype, pl.List)], nulls_last=True)


def _edges(n: int):
    import ray

    # several blocks, repeated keys, a null key, a key in every block
    rows = [{"k": None if i % 17 == 0 else f"k{i % 7}", "v": i, "w": float(i) / 3}
            for i in range(n)]
    return ray.data.from_items(rows, override_num_blocks=4)


def _first_and_count(block: pa.Table) -> pa.Table:
    """Per key of a partition: its first row's value, its count and its values in order (a pass
    whose result depends on the order of a key's rows)."""
    df = pl.from_arrow(block).group_by("k", maintain_order=True).agg(
        pl.col("v").first().alias("first"), pl.len().cast(pl.Int64).alias("n"),
        pl.col("v").alias("vs"))
    return df.to_arrow()


def test_map_key_blocks_small_equals_the_shuffle(ray_session):
    ds = _edges(200)
    small = _frame(runtime.map_key_blocks(ds, "k", _first_and_count, n_rows=200))
    shuffled = [_frame(runtime.map_key_blocks(ds, "k", _first_and_count)) for _ in range(2)]
    # every key once; the same first row and the same order of its rows on both paths and in
    # every run (the shuffle's reduce gets its blocks in whatever order they arrive)
    assert small["k"].to_list() == sorted(small["k"].drop_nulls().to_list()) + [None]
    for got in shuffled:
        assert _sorted(got).equals(_sorted(small))
    assert small.filter(pl.col("k") == "k1")["vs"].to_list()[0] == [i for i in range(200)
                                                                   if i % 17 and i % 7 == 1]
    # a count over the limit, or none known, takes the shuffle
    assert runtime.small_input(ds, n_rows=runtime.SMALL_SHUFFLE_ROWS + 1) is None
    assert runtime.small_input(ds) is None
    assert runtime.small_input(ds, rows_hint=10) is not None  # counted: 200 rows


def test_join_small_equals_the_shuffle_join(ray_session):
    import ray

    left = ray.data.from_items([{"id": f"p{i:03d}", "x": i} for i in range(120)],
                               override_num_blocks=3)
    right = ray.data.from_items([{"id": f"p{i:03d}", "y": [str(i)]} for i in range(0, 200, 3)],
                                override_num_blocks=2)
    got = _frame(runtime.join(left, right, ("id",), "left_outer", 1, left_rows=120, right_rows=67))
    want = _frame(left.join(right, join_type="left_outer", num_partitions=1, on=("id",)))
    assert got.columns == want.columns
    assert _sorted(got).equals(_sorted(want))
    assert got["id"].to_list() == sorted(got["id"].to_list())  # left rows in their order
    inner = _frame(runtime.join(left, right, ("id",), "inner", 1, left_rows=120, right_rows=67))
    assert inner.height == 40 and inner["y"].null_count() == 0


def test_a_join_whose_right_side_came_out_of_an_empty_map_keeps_the_left_rows(ray_session):
    """A right side mapped from no rows has no block and no columns (module 1 wrote only types:
    imputation's per-product lists of upstream values are such a side). Ray's join fails on it;
    with its schema given, a left outer join keeps every left row with the right's columns
    null, an inner join none, on the one-task path and the shuffle path alike."""
    import ray

    from autoknow_ray.modules.imputation.stage import (
        UPSTREAM_LISTS, _upstream_items, _upstream_lists)

    left = ray.data.from_items([{"product_id": f"p{i}", "x": i} for i in range(5)])
    edits = ray.data.from_items([{"subject": f"p{i}", "relation": "has_type", "object": "tea",
                                  "status": "added"} for i in range(3)])
    items = edits.map_batches(_upstream_items, batch_format="pyarrow")
    lists = runtime.map_key_blocks(items, "product_id", _upstream_lists, n_rows=3)
    # row bounds within and over the one-task limit: the one-task join and the shuffle join's path
    for path, rows in (("one task", 5), ("shuffle", runtime.SMALL_SHUFFLE_ROWS + 1)):
        got = _frame(runtime.join(left, lists, ("product_id",), "left_outer", 1, left_rows=rows,
                                  right_rows=rows, right_schema=UPSTREAM_LISTS))
        assert got.sort("product_id")["product_id"].to_list() == [f"p{i}" for i in range(5)], path
        assert got.columns == ["product_id", "x", "upstream"] and got["upstream"].null_count() == 5
        inner = _frame(runtime.join(left, lists, ("product_id",), "inner", 1, left_rows=rows,
                                    right_rows=rows, right_schema=UPSTREAM_LISTS))
        assert inner.height == 0, path


def test_sums_and_keyed_blocks_small_equal_ray(ray_session):
    import ray.data.aggregate as A

    ds = _edges(300)
    got = _sorted(_frame(runtime.groupby_sum(ds, ["k"], {"sv": "v", "sw": "w"}, 2, n_rows=300)))
    want = _sorted(_frame(ds.groupby("k", num_partitions=2).aggregate(
        A.Sum("v", alias_name="sv"), A.Sum("w", alias_name="sw"))))
    # the same keys, integer sums and types; float sums to the last bits of their summing order,
    # which Ray's shuffle does not fix (its aggregator actors add the blocks as they arrive)
    assert got.schema == want.schema and got.drop("sw").equals(want.drop("sw"))
    assert got["sw"].to_list() == pytest.approx(want["sw"].to_list(), rel=1e-12)
    blocks = runtime.keyed_blocks(ds, ["k"], 3, n_rows=300).materialize()
    assert blocks.num_blocks() == 1 and blocks.count() == 300
    sums = runtime.column_sums(ds, ["v", "w"])
    assert sums["v"] == sum(range(300)) and sums["w"] == pytest.approx(sum(range(300)) / 3)
    assert runtime.column_sums(ds.filter(lambda r: False), ["v"]) == {}
    # a loose bound over the limit with a hint under it: counted, then summed in one task
    seen = []
    real = runtime.small_input
    hinted = runtime.groupby_sum(ds, ["k"], {"sv": "v", "sw": "w"}, 2, n_rows=10**9, rows_hint=300,
                                 small_rows=1000)
    assert _sorted(_frame(hinted)).equals(got)  # the same one-task sums
    try:
        runtime.small_input = lambda *a, **k: seen.append(real(*a, **k)) or seen[-1]
        runtime.groupby_sum(ds, ["k"], {"sv": "v"}, 2, n_rows=10**9, rows_hint=300, small_rows=1000)
        runtime.groupby_sum(ds, ["k"], {"sv": "v"}, 2, n_rows=10**9, rows_hint=300, small_rows=100)
        runtime.map_key_blocks(ds, "k", lambda b: b, n_rows=300, small_rows=100)
    finally:
        runtime.small_input = real
    assert [x is not None for x in seen] == [True, False, False]


class Loads(Step):
    """A model step that says which process set it up, and how often, for each batch."""

    name = "loads"
    model = True
    columns = ("product_id",)

    def setup(self, env: WorkerEnv) -> None:
        import os

        self.loads = getattr(self, "loads", 0) + 1
        self.pid = os.getpid()

    def process_batch(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        return batch.append_column("loads", pa.array([self.loads] * n)).append_column(
            "pid", pa.array([self.pid] * n)).append_column("rows", pa.array([n] * n))


def test_a_small_model_step_runs_as_warm_tasks_with_the_pools_calls(ray_session):
    import ray

    cfg = Config.model_validate({"resources": {"default": {"actors": "auto", "cpus_per_actor": 0.5,
                                                           "batch_size": 16, "rows_per_call": 32}}})
    plan = runtime.plan_actors(cfg, "default", 60)
    assert plan.actors == 2  # (2 CPUs - 1 reserved) / 0.5
    assert runtime.warm_tasks(plan, 60) and not runtime.warm_tasks(plan, 65)
    assert not runtime.warm_tasks(plan, None)
    ds = ray.data.from_items([{"product_id": f"p{i}"} for i in range(60)])
    warm = _frame(runtime.map_step(ds, Loads(), cfg, 60))
    # one setup per worker process however many calls it served; which of Ray's warm worker
    # processes serve the calls is Ray's choice (two or three of them, from run to run)
    assert warm.height == 60 and warm["loads"].unique().to_list() == [1]
    # the pool's calls: `rows_per_call` rows each (here the model batch, 16), then the rest
    assert runtime.rows_per_call(plan, 60) == 16
    assert sorted(warm["rows"].unique().to_list()) == [12, 16]
    # larger: the actor pool, one setup per actor
    pooled = _frame(runtime.map_step(ray.data.from_items([{"product_id": f"p{i}"} for i in range(80)]),
                                     Loads(), cfg, 80))
    assert pooled.height == 80 and pooled["loads"].unique().to_list() == [1]
    # a pool of a fixed size (`autoknow bench`) is an actor pool whatever the input
    fixed = Config.model_validate({"resources": {"default": {"actors": 1, "cpus_per_actor": 0.5,
                                                             "batch_size": 16, "rows_per_call": 32}}})
    assert runtime.fixed_pool(fixed, Loads()) and not runtime.fixed_pool(cfg, Loads())


class _TitleLength(Step):
    """A stand-in for a cached model step: the title's length as its output."""

    name = "title_length"
    columns = ("product_id", "title", "brand")

    def process_batch(self, batch: pa.Table) -> pa.Table:
        n = pa.array([len(t or "") for t in batch.column("title").to_pylist()], pa.int64())
        return batch.append_column("length", n)


class _Brand(Step):
    """A stand-in for the cheap steps after the model: reads what the key does not cover."""

    name = "brand_upper"

    def process_batch(self, batch: pa.Table) -> pa.Table:
        up = pa.array([(b or "").upper() for b in batch.column("brand").to_pylist()], pa.string())
        return batch.append_column("brand_upper", up)


def _cached_step():
    from autoknow_ray.incremental import CachedStep
    from autoknow_ray.steps import Chain

    return CachedStep(name="title_length", fresh=Chain("title_length", [_TitleLength(), _Brand()]),
                      reuse=_Brand(), inputs=("title",), outputs=("length",),
                      fingerprint={"model": "m1"})


def test_a_small_cache_split_in_one_task_equals_the_join_path(ray_session, tmp_path, monkeypatch):
    """`rebuild --previous` over small inputs splits products into reused and recomputed in one
    task (`incremental._split_small`); the join path for large inputs gives the same per-product
    table and the same counts (a product added, one removed, a title edited, a brand edited:
    not in the key, so reused, and the cheap step after the model sees tonight's brand)."""
    import pyarrow.parquet as pq

    from autoknow_ray.incremental import run_cached
    from autoknow_ray.pipeline import read_parquet_any

    cfg = Config.model_validate({})
    a = pa.table({"product_id": [f"p{i}" for i in range(40)],
                  "title": [f"title {i}" + "x" * (i % 5) for i in range(40)],
                  "brand": [f"b{i % 3}" for i in range(40)]})
    titles, brands = a.column("title").to_pylist(), a.column("brand").to_pylist()
    titles[5], brands[7] = "an edited title, longer", "zz"
    b = pa.concat_tables([a.set_column(1, "title", pa.array(titles))
                          .set_column(2, "brand", pa.array(brands)).slice(1),
                          pa.table({"product_id": ["new"], "title": ["added"], "brand": ["b9"]})])
    for name, t in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        pq.write_table(t.slice(0, 20), tmp_path / name / "0.parquet")
        pq.write_table(t.slice(20), tmp_path / name / "1.parquet")

    def files(name):
        return sorted(str(p) for p in (tmp_path / name).glob("*.parquet"))

    stage_a = tmp_path / "stage_a"
    run_cached(_cached_step(), files("a"), cfg, stage_a / "out", stage_a, None, None)
    (stage_a / "manifest.json").write_text(json.dumps(
        {"complete": True, "cache": {"title_length": {"fingerprint": _cached_step().digest()}}}))
    got = {}
    for path, limit in (("small", runtime.SMALL_SHUFFLE_ROWS), ("join", 0)):
        monkeypatch.setattr(runtime, "SMALL_SHUFFLE_ROWS", limit)
        stage = tmp_path / f"stage_{path}"
        counts = run_cached(_cached_step(), files("b"), cfg, stage / "out", stage, None, stage_a)
        table = read_parquet_any(stage / "out").sort("product_id")
        got[path] = (table, {k: counts[k] for k in ("reused", "recomputed", "added", "changed",
                                                    "removed")})
        assert ("split" in counts) == (path == "small")
    assert got["small"][1] == got["join"][1] == {"reused": 38, "recomputed": 2, "added": 1,
                                                 "changed": 1, "removed": 1}
    assert got["small"][0].equals(got["join"][0])
    row = got["small"][0].filter(pl.col("product_id") == "p7").row(0, named=True)
    assert row["brand_upper"] == "ZZ" and row["length"] == len(titles[7])
    assert got["small"][0].filter(pl.col("product_id") == "p5")["length"][0] == len(titles[5])
