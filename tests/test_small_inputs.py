"""Keyed passes and model steps over small inputs skip Ray Data's fixed costs (a shuffle's worker
processes, an actor pool's fresh processes) and give what the shuffle and the pool give."""
from __future__ import annotations

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


def _first_and_count(group: pa.Table) -> pa.Table:
    return pa.table({"k": [group.column("k")[0].as_py()], "n": [group.num_rows],
                     "vs": [group.column("v").to_pylist()]})


def test_map_groups_small_equals_the_shuffle(ray_session):
    ds = _edges(200)
    small = _sorted(_frame(runtime.map_groups(ds, "k", _first_and_count, n_rows=200)))
    shuffled = _sorted(_frame(ds.groupby("k").map_groups(_first_and_count, batch_format="pyarrow")))
    assert small.equals(shuffled)
    # each group's rows in input order, as the shuffle's stable sort of one block gives them
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


def test_sums_and_keyed_blocks_small_equal_ray(ray_session):
    import ray.data.aggregate as A

    ds = _edges(300)
    got = _sorted(_frame(runtime.groupby_sum(ds, ["k"], {"sv": "v", "sw": "w"}, 2, n_rows=300)))
    want = _sorted(_frame(ds.groupby("k", num_partitions=2).aggregate(
        A.Sum("v", alias_name="sv"), A.Sum("w", alias_name="sw"))))
    assert got.schema == want.schema and got.equals(want)
    blocks = runtime.keyed_blocks(ds, ["k"], 3, n_rows=300).materialize()
    assert blocks.num_blocks() == 1 and blocks.count() == 300
    sums = runtime.column_sums(ds, ["v", "w"])
    assert sums["v"] == sum(range(300)) and sums["w"] == pytest.approx(sum(range(300)) / 3)
    assert runtime.column_sums(ds.filter(lambda r: False), ["v"]) == {}


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
