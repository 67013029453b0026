"""Seconds per stage and per Ray Data execution of one rebuild of a finished run's catalogue.

    python docs/bench/stage_fixed_cost.py BASE OUT [--pin-fp32]
    python docs/bench/stage_fixed_cost.py --compare RUN_A RUN_B

BASE holds `cat/`, `models/` and `run_1/` (a copy of tests/test_determinism.py's tmp folder:
pytest deletes it). OUT gets a copy of `run_1` with every stage deleted, then the rebuild with
`run_1`'s resolved config; the stage lines and every Ray Data execution over 0.05 s (seconds,
operation, call site) are printed. `--pin-fp32` records fp32 as the run's CPU precision first
(the run's one probe may tip either way on a loaded machine, and the scores with it).
`--compare` checks that every Parquet table of two runs is equal, rows sorted.
"""
import functools
import json
import os
import shutil
import sys
import time
import traceback


EXECUTIONS = ("materialize", "to_arrow_refs", "count", "take", "take_all", "iter_batches", "sum")


def time_executions(names=EXECUTIONS, depth: int = 1) -> list:
    """Wraps the Ray Data methods that run an execution: each call appends (seconds, method,
    its `depth` innermost call sites in the package) to the list returned."""
    from ray.data import Dataset

    log = []

    def wrap(name):
        f = getattr(Dataset, name)

        @functools.wraps(f)
        def g(self, *a, **k):
            st = [fr for fr in traceback.extract_stack() if "autoknow_ray" in fr.filename]
            where = " < ".join(f"{x.filename.split('autoknow_ray/')[-1]}:{x.lineno} {x.name}"
                               for x in st[-depth:][::-1]) or "?"
            t = time.time()
            try:
                return f(self, *a, **k)
            finally:
                log.append((time.time() - t, name, where))
        setattr(Dataset, name, g)

    for n in names:
        wrap(n)
    return log


def profile(base: str, out: str, pin_fp32: bool) -> None:
    import ray

    from autoknow_ray.config import Config
    from autoknow_ray.rebuild import rebuild

    if os.path.exists(out):
        shutil.rmtree(out)
    shutil.copytree(os.path.join(base, "run_1"), out)
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif name.startswith("report."):
            os.remove(path)
    if pin_fp32:
        with open(os.path.join(out, "precision.json"), "w") as f:
            json.dump({"cpu_bf16": False, "decided_by": "pinned by stage_fixed_cost.py"}, f)
    log = time_executions()
    with open(os.path.join(base, "run_1", "config.resolved.json")) as f:
        cfg = Config.model_validate(json.load(f))
    ray.init(num_cpus=2, object_store_memory=400 * 2**20, include_dashboard=False)
    t0 = time.time()
    rebuild(os.path.join(base, "cat"), out, models=os.path.join(base, "models"), config=cfg)
    print("TOTAL", round(time.time() - t0, 1))
    ray.shutdown()
    for s, n, w in log:
        if s > 0.05:
            print(f"EXEC {s:6.2f} {n:14s} {w}")


def compare(a: str, b: str) -> int:
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    def tables(root):
        found = {}
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                if f.endswith(".parquet"):
                    found.setdefault(os.path.relpath(dirpath, root), []).append(os.path.join(dirpath, f))
        return found

    def load(files):
        df = pl.from_arrow(pa.concat_tables([pq.read_table(f) for f in sorted(files)],
                                            promote_options="permissive"))
        return sorted(map(repr, df.select(sorted(df.columns)).rows()))

    ta, tb = tables(a), tables(b)
    bad = 0
    for k in sorted(set(ta) | set(tb)):
        same = k in ta and k in tb and load(ta[k]) == load(tb[k])
        print("OK  " if same else "DIFF", k)
        bad += not same
    print("tables that differ:", bad)
    return bad


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        sys.exit(1 if compare(sys.argv[2], sys.argv[3]) else 0)
    profile(sys.argv[1], sys.argv[2], "--pin-fp32" in sys.argv[3:])
