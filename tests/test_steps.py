"""The stage protocol and its one adapter onto Ray Data."""
from __future__ import annotations

import os

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from autoknow_ray import runtime
from autoknow_ray.config import Config
from autoknow_ray.steps import Chain, Step, WorkerEnv


class Upper(Step):
    name = "upper"
    columns = ("product_id", "title")

    def process_batch(self, batch: pa.Table) -> pa.Table:
        return batch.set_column(1, "title", pc.utf8_upper(batch.column("title")))


class CountingModel(Step):
    """A "model" step: records which process set it up and how often."""

    name = "counting_model"
    model = True
    columns = ("product_id", "title")

    def __init__(self, suffix: str):
        self.suffix = suffix
        self.loads = 0

    def setup(self, env: WorkerEnv) -> None:
        self.loads += 1
        self.env = env

    def process_batch(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        return pa.table({
            "product_id": batch.column("product_id"),
            "title": pc.binary_join_element_wise(batch.column("title"), pa.scalar(self.suffix), ""),
            "pid": pa.array([os.getpid()] * n, pa.int64()),
            "loads": pa.array([self.loads] * n, pa.int64()),
            "threads": pa.array([self.env.cpu_threads] * n, pa.int64()),
        })


def _collect(ds) -> pl.DataFrame:
    import ray

    return pl.concat([pl.from_arrow(t) for t in ray.get(ds.to_arrow_refs())], how="vertical_relaxed")


def _ds(n: int):
    import ray

    return ray.data.from_arrow(pa.table({"product_id": [f"p{i}" for i in range(n)],
                                         "title": [f"t{i}" for i in range(n)],
                                         "ignored": list(range(n))}))


def test_task_step_reads_only_its_columns_and_keeps_every_row(ray_session):
    out = _collect(runtime.map_step(_ds(500), Upper(), Config(), n_rows=500))
    assert out.columns == ["product_id", "title"]
    assert out.height == 500
    assert sorted(out["title"].to_list()) == sorted(f"T{i}" for i in range(500))


def test_model_step_is_set_up_once_per_actor(ray_session):
    cfg = Config.model_validate({"resources": {"default": {"actors": 2, "cpus_per_actor": 0.5,
                                                           "batch_size": 16, "rows_per_call": 32}}})
    out = _collect(runtime.map_step(_ds(640), CountingModel("!"), cfg, n_rows=640))
    assert out.height == 640
    assert set(out["title"].to_list()) == {f"t{i}!" for i in range(640)}
    # 20 calls of 32 rows over at most 2 actors: every call saw a step set up exactly once
    assert out["loads"].unique().to_list() == [1]
    assert 1 <= out["pid"].n_unique() <= 2


def test_chain_runs_its_steps_in_order_on_one_worker(ray_session):
    chain = Chain("both", [Upper(), CountingModel("?")])
    assert chain.model and chain.columns == ("product_id", "title")
    out = _collect(runtime.map_step(_ds(100), chain, Config(), n_rows=100))
    assert set(out["title"].to_list()) == {f"T{i}?" for i in range(100)}


def test_a_step_whose_rows_are_cheap_is_not_split_before_its_pool(ray_session):
    """`map_step` splits its input into blocks of a call's rows before a model step's pool,
    except for a step that says its work per row costs less than the split (`split_input`); a
    chain splits where one of its model steps asks for it. Every row comes out either way."""
    class Cheap(CountingModel):
        split_input = False

    def ops(step) -> str:  # the names of the logical plan's operators, last to first
        def walk(op):
            return [op.name, *(n for d in op.input_dependencies for n in walk(d))]
        return " ".join(walk(runtime.map_step(_ds(640), step, Config(), n_rows=640)._logical_plan.dag))

    assert "Repartition" in ops(CountingModel("!"))
    assert "Repartition" not in ops(Cheap("!"))
    assert Chain("c", [Upper(), Cheap("!")]).split_input is False
    assert Chain("c", [Cheap("!"), CountingModel("?")]).split_input is True
    assert Chain("c", [Upper()]).split_input is True
    out = _collect(runtime.map_step(_ds(640), Cheap("!"), Config(), n_rows=640))
    assert sorted(out["title"].to_list()) == sorted(f"t{i}!" for i in range(640))


def test_a_cheap_step_takes_larger_calls_and_keeps_every_row(ray_session):
    """A step that says its rows are cheap (`rows_per_call`) gets calls of that many rows, still
    at least four per worker; other steps keep the plan's `rows_per_call`."""
    class CallSize(Step):
        name = "call_size"
        columns = ("product_id",)

        def process_batch(self, batch: pa.Table) -> pa.Table:
            return batch.append_column("call_rows", pa.array([batch.num_rows] * batch.num_rows))

    class CheapCallSize(CallSize):
        rows_per_call = 80

    cfg = Config.model_validate({"resources": {"default": {"actors": 2, "cpus_per_actor": 0.5,
                                                           "batch_size": 16, "rows_per_call": 32}}})
    plain = _collect(runtime.map_step(_ds(640), CallSize(), cfg, n_rows=640))
    cheap = _collect(runtime.map_step(_ds(640), CheapCallSize(), cfg, n_rows=640))
    assert plain["call_rows"].max() == 32
    # 640 rows over 2 workers, at least 4 calls each: 80 rows a call, not the step's cap alone
    assert cheap["call_rows"].max() == 80
    for out in (plain, cheap):
        assert sorted(out["product_id"].to_list()) == sorted(f"p{i}" for i in range(640))


def test_chain_names_a_missing_column():
    class NeedsBrand(Upper):
        name = "needs_brand"
        columns = ("brand",)

    with pytest.raises(KeyError, match="needs_brand.*brand"):
        Chain("c", [Upper(), NeedsBrand()]).process_batch(
            pa.table({"product_id": ["a"], "title": ["x"]}))


def test_aggregate_and_bounded_sample(ray_session):
    import ray

    t = pa.table({"type": ["a", "b", "a", "c", "a"] * 200, "score": [1.0, 2.0, 3.0, 4.0, 5.0] * 200})
    ds = ray.data.from_arrow(t).repartition(4)
    agg = runtime.aggregate(ds, ["type"], {"n": ("count", None), "mean_score": ("mean", "score")})
    got = {r["type"]: (r["n"], round(r["mean_score"], 6)) for r in agg.to_dicts()}
    assert got == {"a": (600, 3.0), "b": (200, 2.0), "c": (200, 4.0)}
    sample = runtime.bounded_sample(ds, 50, seed=0, n_rows=1000)
    assert 0 < sample.height <= 50
    with pytest.raises(ValueError, match="unknown function"):
        runtime.aggregate(ds, ["type"], {"x": ("median", "score")})


def test_aggregate_combines_partials_the_same_on_the_driver_and_in_the_workers(ray_session):
    """Per-block partials combined on the driver (few partials) and by a Ray Data groupby (the
    cap forced to 0, as for a catalogue with many keys) give the same figures as polars on the
    whole table, nulls and multi-column keys included; vector sums likewise."""
    import ray

    from autoknow_ray.modules.taxonomy import sample

    rng = np.random.default_rng(0)
    n = 900
    t = pa.table({"type": [f"t{i}" for i in rng.integers(0, 7, n)],
                  "attr": [None if i % 11 == 0 else f"a{i % 3}" for i in range(n)],
                  "hits": rng.integers(0, 5, n).tolist(),
                  "score": [None if i % 13 == 0 else float(x) for i, x in enumerate(rng.normal(size=n))]})
    ds = ray.data.from_arrow(t).repartition(5)
    aggs = {"n": ("count", None), "hits": ("sum", "hits"), "mean": ("mean", "score"),
            "lo": ("min", "score"), "hi": ("max", "score")}
    want = (pl.from_arrow(t).group_by(["type", "attr"])
            .agg(pl.len().cast(pl.Int64).alias("n"), pl.col("hits").sum(), pl.col("score").mean().alias("mean"),
                 pl.col("score").min().alias("lo"), pl.col("score").max().alias("hi"))
            .sort(["type", "attr"], nulls_last=True))
    for cap in (runtime.DRIVER_COMBINE_ROWS, 0):
        got = runtime.aggregate(ds, ["type", "attr"], aggs, 2, driver_rows=cap).sort(
            ["type", "attr"], nulls_last=True)
        assert got.columns == ["type", "attr", *aggs]
        assert got.select("type", "attr", "n", "hits").equals(want.select("type", "attr", "n", "hits")), cap
        for c in ("mean", "lo", "hi"):
            assert np.allclose(got[c].to_numpy(), want[c].to_numpy()), (cap, c)
    vecs = pa.table({"type": ["a", "b", "a", None], "v": pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [9.0, 9.0]],
                                                                   pa.list_(pa.float32(), 2))})
    sums = sample.vector_sums(ray.data.from_arrow(vecs).repartition(2), "type", "v").sort("type")
    assert sums["type"].to_list() == ["a", "b"] and sums["n"].to_list() == [2, 1]
    assert sums["sum"].to_list() == [[6.0, 8.0], [3.0, 4.0]]
    assert runtime.aggregate(ray.data.from_arrow(t.slice(0, 0)), ["type"], {"n": ("count", None)}).height == 0
    # the driver's share is the config's (`ray.driver_combine_rows`), set where a run connects;
    # with 0 the partials are combined by a groupby in the workers, to the same figures
    from autoknow_ray.config import Config

    before = runtime.DRIVER_COMBINE_ROWS
    try:
        runtime.connect(Config.model_validate({"ray": {"driver_combine_rows": 0}}))
        assert runtime.DRIVER_COMBINE_ROWS == 0
        got = runtime.aggregate(ds, ["type", "attr"], aggs, 2).sort(["type", "attr"], nulls_last=True)
        assert got.select("type", "attr", "n", "hits").equals(want.select("type", "attr", "n", "hits"))
    finally:
        runtime.DRIVER_COMBINE_ROWS = before


def test_per_key_sample_keeps_the_dataset_column_order(ray_session):
    """A per-type sample stacks with a plain row sample of the same dataset (the hypernym
    context joins the two): same columns, same order."""
    import ray

    from autoknow_ray.modules.taxonomy import sample

    ds = ray.data.from_arrow(pa.table({"product_id": [f"p{i}" for i in range(30)],
                                       "product_type": [f"t{i % 3}" for i in range(30)],
                                       "score": [float(i) for i in range(30)]}))
    rows, counts = sample.per_key_sample(ds, "product_type", "product_id", 4, 100, seed=0)
    assert rows.columns == ["product_id", "product_type", "score"]
    assert rows.group_by("product_type").len()["len"].max() <= 4
    assert sorted(counts["n"].to_list()) == [10, 10, 10]
    more = runtime.bounded_sample(ds, 5, seed=0)
    assert pl.concat([rows, more], how="vertical_relaxed").height == rows.height + 5
    # the counts a caller already has (the hypernym context's vector sums): the same sample
    given, same = sample.per_key_sample(ds, "product_type", "product_id", 4, 100, seed=0,
                                        counts=counts.select("product_type", "n"))
    assert given.equals(rows) and same.equals(counts)


def test_knn_reference_is_written_by_the_workers_and_read_in_setup(ray_session, tmp_path):
    """The kNN reference never reaches the driver: the workers write a capped, hash-drawn
    sample; each resolve worker reads it in setup(). The same rows run after run, at most `cap`."""
    import ray

    from autoknow_ray.modules.taxonomy.hypernym_config import TypeResolutionConfig
    from autoknow_ray.modules.taxonomy.types import ResolveTypes, TypeNames, read_reference, write_reference

    n, cap = 600, 100
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(n, 4)).astype(np.float32)
    t = pa.table({"product_id": [f"p{i:04d}" for i in range(n)],
                  "ref_type": ["Tea" if i % 2 else "Coffee" for i in range(n)],
                  "from_catalogue": [True] * n,
                  "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), 4)})
    ds = ray.data.from_arrow(t).repartition(4)
    a = read_reference(write_reference(ds, n, cap, 7, tmp_path / "a"), cap)
    b = read_reference(write_reference(ds.random_shuffle(seed=3), n, cap, 7, tmp_path / "b"), cap)
    assert a.height == cap and a["product_id"].to_list() == b["product_id"].to_list()
    assert a.columns == ["product_id", "ref_type", "from_catalogue", "embedding"]
    counted = read_reference(write_reference(ds, None, cap, 7, tmp_path / "c"), cap)  # rows counted
    assert counted["product_id"].to_list() == a["product_id"].to_list()
    small = read_reference(write_reference(ds, n, 10_000, 7, tmp_path / "all"), 10_000)
    assert small.height == n  # under the cap: every row
    assert read_reference(str(tmp_path / "none"), cap).height == 0  # no row was drawn
    cfg = TypeResolutionConfig(knn_min_similarity=0.5, knn_min_share=0.5)
    names = TypeNames(["Coffee", "Tea"])
    by_path = ResolveTypes(cfg, names, {}, {}, str(tmp_path / "a"), None, add_attributes=False,
                           min_attribute_score=0.5, reference_cap=cap)
    assert by_path.ref_ids == []  # nothing of it travels with the step
    by_path.setup(WorkerEnv())
    by_frame = ResolveTypes(cfg, names, {}, {}, a, None, add_attributes=False, min_attribute_score=0.5)
    by_frame.setup(WorkerEnv())
    assert by_path.ref_ids == by_frame.ref_ids and np.array_equal(by_path.ref_vecs, by_frame.ref_vecs)
    assert by_path.ref_types == by_frame.ref_types


class PrecisionSeen(Step):
    """Reports the CPU inference precision `auto` resolves to in the worker that runs it."""

    name = "precision_seen"
    columns = ("product_id",)

    def __init__(self, model: bool):
        self.model = model
        self.bf16 = None

    def setup(self, env: WorkerEnv) -> None:
        import torch

        from autoknow_ray.nn.encoder import inference_bf16

        self.bf16 = inference_bf16("auto", torch.device("cpu"))

    def process_batch(self, batch: pa.Table) -> pa.Table:
        return pa.table({"product_id": batch.column("product_id"),
                         "bf16": pa.array([self.bf16] * batch.num_rows, pa.bool_()),
                         "pid": pa.array([os.getpid()] * batch.num_rows, pa.int64())})


def test_every_worker_infers_at_the_runs_one_precision(ray_session):
    """The run's bf16 / fp32 decision reaches every actor and task of a step (a timing probe
    per process used to tip either way on a loaded machine); cleared, a worker decides alone."""
    import torch

    from autoknow_ray.nn.encoder import inference_bf16, run_cpu_bf16

    cfg = Config.model_validate({"resources": {"default": {"actors": 2, "batch_size": 8}}})
    try:
        for decided in (True, False):
            runtime.set_run_precision(decided)
            assert inference_bf16("auto", torch.device("cpu")) is decided  # the driver
            for model in (True, False):
                seen = _collect(runtime.map_step(_ds(40), PrecisionSeen(model), cfg, 40))
                assert seen.height == 40
                assert seen["bf16"].to_list() == [decided] * 40, (decided, model)
            # an explicit setting still wins over the run's decision
            assert inference_bf16(not decided, torch.device("cpu")) is (not decided)
    finally:
        runtime.set_run_precision(None)
    assert run_cpu_bf16() is None and runtime.RUN_CPU_BF16 is None


def test_the_run_precision_is_decided_once_and_kept_on_resume_and_by_the_next_run(tmp_path, monkeypatch):
    import json

    from autoknow_ray.nn import encoder

    probe = {"pays": True}
    monkeypatch.setattr(encoder, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(encoder, "cpu_bf16_pays", lambda rounds=2: probe["pays"])
    cfg = Config()
    first = tmp_path / "first"
    first.mkdir()
    got = runtime.run_precision(cfg, first)
    assert got == {"cpu_bf16": True, "decided_by": "probe on the driver"}
    assert json.loads((first / runtime.PRECISION_FILE).read_text())["cpu_bf16"] is True
    probe["pays"] = False  # the probe now tips the other way (a loaded machine)
    assert runtime.run_precision(cfg, first)["cpu_bf16"] is True  # the run, resumed
    nightly = tmp_path / "nightly"
    nightly.mkdir()
    got = runtime.run_precision(cfg, nightly, previous=first)
    assert got == {"cpu_bf16": True, "decided_by": "previous run"}  # its caches stay reusable
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert runtime.run_precision(cfg, fresh)["cpu_bf16"] is False
    # fit records its probe with its models: every rebuild with them on this kind of CPU
    # infers at it, whatever the probe says on the night; on another kind of CPU it probes
    models = tmp_path / "models"
    models.mkdir()
    probe["pays"] = True
    assert runtime.fit_precision(cfg, models)["cpu_bf16"] is True
    probe["pays"] = False
    for night in ("mon", "tue"):
        (tmp_path / night).mkdir()
        got = runtime.run_precision(cfg, tmp_path / night, models=models)
        assert got == {"cpu_bf16": True, "decided_by": "the models' fit, on this kind of CPU"}
    monkeypatch.setattr(runtime, "cpu_kind", lambda: "another CPU")
    (tmp_path / "wed").mkdir()
    assert runtime.run_precision(cfg, tmp_path / "wed", models=models)["cpu_bf16"] is False
    monkeypatch.setattr(encoder, "cpu_has_bf16", lambda: False)
    other = tmp_path / "other"
    other.mkdir()
    assert runtime.run_precision(cfg, other)["decided_by"] == "no bf16 units"


def test_first_per_key_keeps_each_keys_smallest_draws_whatever_the_blocks(ray_session):
    """Module 1's examples and hypernym children: per key the `n` rows of smallest hashed draw
    (ties by id), the same in one block or many and in any order of rows, in the dataset's
    column order; a key with fewer rows keeps them all."""
    import ray

    from autoknow_ray.modules.taxonomy import sample

    ids = [f"p{i}" for i in range(60)]
    t = pa.table({"product_id": ids, "type": [f"t{i % 4}" if i < 57 else "rare" for i in range(60)]})
    u = sample.uniform(ids, 7)
    want = {}
    for pid, typ, draw in sorted(zip(ids, t.column("type").to_pylist(), u), key=lambda r: (r[2], r[0])):
        want.setdefault(typ, [])
        if len(want[typ]) < 5:
            want[typ].append(pid)
    order = np.random.default_rng(0).permutation(60)
    for ds in (ray.data.from_arrow(t), ray.data.from_arrow(t.take(pa.array(order))).repartition(6)):
        got = sample.first_per_key(ds, "type", "product_id", 5, seed=7)
        assert got.columns == ["product_id", "type"]
        per = {k: sorted(v) for k, v in got.group_by("type").agg(pl.col("product_id")).iter_rows()}
        assert per == {k: sorted(v) for k, v in want.items()}
    assert len(per["rare"]) == 3
    assert sample.first_per_key(ray.data.from_arrow(t), "type", "product_id", 0, seed=7).height == 0
