"""Seconds of every Ray Data execution of a finished run's stages from STAGE on.

    python docs/bench/stage_profile.py RUN CATALOGUE MODELS OUT STAGE

Copies RUN to OUT, deletes STAGE and the stages after it, rebuilds OUT with RUN's resolved config
(the stages before STAGE are reused where their fingerprint still matches: a change to their code
recomputes them) and prints each stage line and every Ray Data execution over 0.05 s with its
three innermost call sites (a write's own execution and the materialize inside it are both
listed). `docs/bench/stage_fixed_cost.py --compare RUN OUT` then checks every table is equal.
"""
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stage_fixed_cost import EXECUTIONS, time_executions  # noqa: E402


def main(run, cat, models, out, first):
    import ray

    from autoknow_ray.config import Config
    from autoknow_ray.rebuild import rebuild

    if os.path.exists(out):
        shutil.rmtree(out)
    shutil.copytree(run, out)
    with open(os.path.join(run, "config.resolved.json")) as f:
        cfg = Config.model_validate(json.load(f))
    stages = list(cfg.stages)
    for s in stages[stages.index(first):]:
        p = os.path.join(out, s)
        if os.path.isdir(p):
            shutil.rmtree(p)
    log = time_executions((*EXECUTIONS, "write_parquet", "iter_rows", "to_pandas", "schema"), depth=3)
    ray.init(num_cpus=2, object_store_memory=600 * 2**20, include_dashboard=False)
    t0 = time.time()
    rebuild(cat, out, models=models, config=cfg)
    print("TOTAL", round(time.time() - t0, 1))
    ray.shutdown()
    tot = 0
    for s, n, w in log:
        tot += s
        if s > 0.05:
            print(f"EXEC {s:6.2f} {n:14s} {w}")
    print("EXEC SUM", round(tot, 1))


if __name__ == "__main__":
    main(*sys.argv[1:6])
