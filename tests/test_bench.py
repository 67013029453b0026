"""`autoknow bench` at the smallest size: the outputs exist, parse, and hold sane numbers.

The models are an untrained tagger (the bench measures speed, not quality) and no hypernym
classifier, and the matrix is one tiny rebuild (its time is the rebuild's fixed cost): the
arithmetic over several sizes and pools is tested on its own below.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from autoknow_ray.bench.flops import padded_lengths, sequence_flops
from autoknow_ray.bench.report import PLOTS
from autoknow_ray.bench.run import linear_fit, projection, scaling
from autoknow_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    from autoknow_ray.nn.tagger import SpanTagger

    models = tmp_path_factory.mktemp("bench-models")
    SpanTagger.from_encoder("default", ["type", "Brand", "Color"], max_length=32,
                            device="cpu").save(models / "taxonomy" / "tagger")
    (models / "manifest.json").write_text(json.dumps({"fingerprint": "bench-test-untrained"}))
    return models


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_smallest(ray_session, tmp_path, tiny_models):
    from autoknow_ray.bench.run import run_bench

    cfg = load_config(REPO / "configs" / "test.yaml")
    out = tmp_path / "bench"
    # --against: the same catalogue rebuilt right after under another config (module 1 left out)
    without = cfg.model_copy(update={"stages": ["ingest", "graph", "report"]})
    result = run_bench(out, sizes=[120], workers=[1], config=cfg, models=str(tiny_models),
                       compare_titles=16, compare_rounds=1, quick=True, progress=False,
                       against=without)

    data = json.loads((out / "bench.json").read_text())
    assert data["summary"] == json.loads(json.dumps(result["summary"]))
    s = data["summary"]
    assert set(s["driver_peak_rss_bytes"]) == {"120"} and set(s["driver_peak_resident_bytes"]) == {"120"}
    for key in ("ratio_vs_simple", "time_per_1k_growth", "flop_fraction"):
        assert _positive(s[key]), (key, s[key])
    assert "scaling_efficiency" in s and s["scaling_efficiency"] is None  # one pool size
    assert {t["target"] for t in data["targets"]} and all("met" in t for t in data["targets"])
    assert [(r["n"], r["workers"]) for r in data["table"]] == [(120, 1)]
    assert data["command"]["fresh_driver"] is True
    for row in data["table"] + data["against"]["table"]:
        # each rebuild ran in a driver process of its own (as a user runs one), not the bench's
        assert row["driver"] == "a process of its own"
        assert row["driver_pid"] != os.getpid()
    for row in data["table"]:
        assert _positive(row["wall_seconds"]) and _positive(row["model_titles_per_s"])
        assert row["plan"]["actors"] == 1
        assert set(row["model_ops"]) == {"TitleModels"}
        assert row["driver_memory"]["samples"] >= 1
        assert row["driver_peak_rss_bytes"] == row["driver_memory"]["peak_over_baseline_bytes"]
        assert row["driver_peak_resident_bytes"] == row["driver_memory"]["peak_bytes"]
        assert row["driver_peak_resident_bytes"] >= row["driver_peak_rss_bytes"]
        # every stage the rebuild ran has its driver figures from its manifest
        assert set(row["stage_driver_memory"]) == set(row["stage_seconds"])
        assert all(_positive(d["rss_peak_mib"]) for d in row["stage_driver_memory"].values())
        actors = row["memory"]["actors"]
        if Path("/proc/self/status").exists():
            assert {"TitleModels"} <= set(actors)
            assert all(_positive(a["peak_bytes_max"]) for a in actors.values())
    m = data["machine"]
    for key in ("host_cpus", "ray_version", "torch_version", "data_context", "gpus"):
        assert key in m
    assert m["data_context"]  # the DataContext is recorded with every result
    cmp_ = data["simple_way"]
    ag = cmp_["agreement"]
    if ag["why_not_the_hf_pipeline"] is None:  # the HF pipeline runs the same weights
        assert ag["hf_vs_ours_max_logit_diff"] < 1e-4
    else:  # the plain loop runs our model and decoding: the same spans
        assert ag["span_f1_simple_vs_ours"] == pytest.approx(1.0)
    assert all(_positive(v) for v in cmp_["rates"].values())
    assert _positive(data["flops"]["tagger"]["flops_per_title"])
    assert _positive(data["projection_100m"]["cpu_core_hours"])

    for name in PLOTS:
        blob = (out / name).read_bytes()
        assert blob[:8] == PNG, name
        import matplotlib.image

        assert matplotlib.image.imread(str(out / name)).ndim == 3
    md = (out / "bench.md").read_text()
    assert "ratio_vs_simple" in md and "autoknow bench" in md
    assert "### Worker memory" in md and "| TitleModels |" in md
    pair, = data["against"]["pairs"]
    assert (pair["n"], pair["workers"]) == (120, 1)
    assert pair["stages"]["taxonomy"]["against"] is None and pair["stages"]["taxonomy"]["config"] > 0
    assert pair["stages"]["ingest"]["ratio"] == pytest.approx(
        pair["stages"]["ingest"]["against"] / pair["stages"]["ingest"]["config"], abs=1e-3)
    assert pair["wall_ratio"] == pytest.approx(pair["wall_against"] / pair["wall_config"], abs=1e-3)
    assert [r["n"] for r in data["against"]["table"]] == [120]
    assert "### Against" in md and "| 120 | **wall** |" in md


def test_worker_classes_and_their_memory_table():
    from autoknow_ray.bench.probe import TASK_WORKERS, _worker_label
    from autoknow_ray.bench.report import actor_memory_table

    assert _worker_label("ray::MapWorker(MapBatches(TitleModels))") == "TitleModels"
    assert _worker_label("ray::_run_task()") == TASK_WORKERS
    assert _worker_label("ray::IDLE") == TASK_WORKERS
    assert _worker_label("/usr/bin/python raylet") is None
    assert _worker_label("python -m autoknow_ray.cli rebuild") is None
    g = 2 ** 30

    def run(n, w, a, b):
        return {"n": n, "workers": w, "memory": {"actors": {
            "Embed": {"peak_bytes_max": a}, TASK_WORKERS: {"peak_bytes_max": b}}}}

    lines = actor_memory_table([run(100_000, 2, 3 * g, 2 * g), run(20_000, 2, g, g),
                                run(20_000, 1, g // 2, g)])
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in lines if ln.startswith("| ") and "GiB" not in ln}
    # columns by (workers, size); growth over the same worker count, smallest size to largest
    assert rows["Embed"].rstrip(" |").endswith("| 3")
    assert "| 0.50 | 1.00 | 3.00 |" in rows["Embed"]
    assert rows[TASK_WORKERS].rstrip(" |").endswith("| 2")


def test_flops_and_padding_arithmetic():
    # one layer of width 2, 10 linear weights, two sequences of 1 and 3 tokens
    assert sequence_flops([1, 3], 10, 1, 2) == 2 * 10 * 4 + 4 * 2 * (1 + 9)
    lengths = [5, 1, 5, 1]
    assert list(padded_lengths(lengths, 2)) == [5, 5, 5, 5]  # in order: every batch pads to 5
    assert list(padded_lengths(lengths, 2, sort_within=4)) == [5, 1, 5, 1]  # sorted: none


def test_scaling_and_fit():
    rows = [{"n": 10, "workers": 1, "x": 10.0}, {"n": 10, "workers": 2, "x": 15.0}]
    sc = scaling(rows, 10, "x")
    assert sc["2"]["efficiency"] == pytest.approx(0.75)
    a, b = linear_fit([1000, 2000, 4000], [12.0, 14.0, 18.0])
    assert a == pytest.approx(10.0) and b == pytest.approx(0.002)
    assert linear_fit([5, 5], [1, 2]) is None


def test_projection_falls_back_to_the_average_when_the_fit_is_noise():
    largest = {"n": 2000, "workers": 2, "seconds_per_1k": 20.0}
    flops = {"flop_fraction": 0.5, "flops_per_title": 1e9}
    cluster = {"cpus": 2.0}
    good = projection({"marginal_seconds_per_1k": 5.0, "scaling_efficiency": 0.5}, largest,
                      flops, cluster, n_target=1_000_000)
    assert good["seconds_per_1k_used"] == 5.0
    assert good["cpu_core_hours"] == pytest.approx(1000 * 5.0 * 2 / 3600)
    assert good["cpu_core_hours_pessimistic"] == pytest.approx(good["cpu_core_hours"] / 0.5)
    assert all(h > 0 for h in good["gpu_estimate"]["gpu_hours"].values())
    noisy = projection({"marginal_seconds_per_1k": -3.0}, largest, {}, cluster, n_target=1_000_000)
    assert noisy["seconds_per_1k_used"] == 20.0 and "gpu_estimate" not in noisy


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_driver_memory_sampler_sees_the_peak_of_the_run_only():
    import time

    from autoknow_ray.bench.probe import DriverMemorySampler

    before = bytearray(64 * 2**20)  # held before the run: part of the baseline, not the peak
    with DriverMemorySampler(interval=0.05) as driver:
        block = bytearray(96 * 2**20)
        block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page: resident, not reserved
        time.sleep(0.3)
        del block
    s = driver.summary()
    assert s["samples"] >= 3
    assert 80 * 2**20 <= s["peak_over_baseline_bytes"] < 160 * 2**20, s
    assert s["baseline_bytes"] >= len(before)


def _sleepy_step(seconds: float):
    import pyarrow as pa

    from autoknow_ray.steps import Step

    class SleepyModel(Step):
        name = "sleepy_model"
        model = True  # an actor pool, as the model steps run
        columns = ("product_id",)

        def __init__(self, s: float):
            self.seconds = s

        def process_batch(self, batch: pa.Table) -> pa.Table:
            import time

            time.sleep(self.seconds)  # waits without taking a core: the answer is known
            return batch

    return SleepyModel(seconds)


def _probed(n_batches: int, rows: int, seconds: float, out: Path) -> dict:
    """One execution of a sleeping model step watched by the bench's own probe, as `run_one`
    watches the model stages; the figures the bench derives from it."""
    import ray.data

    from autoknow_ray import runtime
    from autoknow_ray.bench.probe import DatasetProbe
    from autoknow_ray.config import StageResources

    cfg = load_config(REPO / "configs" / "test.yaml")
    cfg.resources["default"] = StageResources(actors=1, cpus_per_actor=0.25, batch_size=rows,
                                              rows_per_call=rows, reserve_cpus=0.5)
    ds = ray.data.range(n_batches * rows, override_num_blocks=n_batches).map_batches(
        lambda b: {"product_id": [f"p{i}" for i in b["id"]]}, batch_format="numpy")
    probe = DatasetProbe()
    with probe.watching():
        runtime.map_step(ds, _sleepy_step(seconds), cfg, repartition=False).write_parquet(str(out))
    (w,) = probe.writes
    udf = [o for o in w["operators"] if o["name"].startswith("MapBatches(SleepyModel")]
    assert len(udf) == 1, [o["name"] for o in w["operators"]]
    return {"rows": w["rows"], "udf_s": udf[0]["udf_sum_s"], "cpu_s": udf[0]["cpu_sum_s"],
            "wall_s": udf[0]["wall_sum_s"], "seconds": w["seconds"]}


def test_bench_measures_a_known_answer(ray_session, tmp_path):
    """A model step that sleeps t seconds per batch, and the same step slowed to 2t: the bench's
    probe must attribute to the model operator (not the read or the write) the time the step
    took, t and 2t per batch, and almost no CPU (sleeping takes none). The per-CPU-second figures
    of the bench stand on this accounting; a wrong operator or a sum over the wrong stats gets it
    wrong. (Wall-time ratios between pools are not asserted: they depend on the machine's load.)"""
    batches, rows, t = 8, 4, 0.2
    base = _probed(batches, rows, t, tmp_path / "base")
    slow = _probed(batches, rows, 2 * t, tmp_path / "slow")
    assert base["rows"] == slow["rows"] == batches * rows
    assert batches * t * 0.95 <= base["udf_s"] <= batches * t * 1.5, base
    assert 1.7 <= slow["udf_s"] / base["udf_s"] <= 2.3, (base, slow)
    assert base["cpu_s"] < 0.5 * base["udf_s"], base  # sleeping is not CPU work
    assert base["seconds"] >= base["udf_s"] * 0.95  # one actor: the execution holds every call


def test_against_may_differ_in_what_each_driver_decides_not_in_how_ray_starts():
    """`bench --against` compares two configs on one Ray: a driver's own choices (its shuffle
    kind, its combine bound) may differ between them, the cluster they start or join may not."""
    from autoknow_ray.bench.run import check_against

    cfg = load_config(REPO / "configs" / "default.yaml")
    other = cfg.model_copy(deep=True)
    other.ray.shuffle, other.ray.driver_combine_rows = "shuffle_v2", 1000
    check_against(cfg, other)  # accepted
    for key, value in (("num_cpus", 1), ("object_store_memory_mb", 300), ("address", "auto")):
        bad = cfg.model_copy(deep=True)
        setattr(bad.ray, key, value)
        with pytest.raises(ValueError, match="start Ray alike"):
            check_against(cfg, bad)
