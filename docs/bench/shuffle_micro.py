"""Fixed cost of one Ray Data shuffle on a few rows, per shuffle kind (docs/benchmarks.md,
"Ray Data's shuffle kind"). Warm Ray, the house's Ray Data settings, three rounds per kind:

    .venv/bin/python docs/bench/shuffle_micro.py shuffle_v2 hash_shuffle sort_shuffle_pull_based
"""
import logging
import sys
import time

import pyarrow as pa
import ray
import ray.data.context as c

from autoknow_ray.runtime import configure_data_context

ray.init(num_cpus=2, object_store_memory=400 * 1024 * 1024, include_dashboard=False,
         log_to_driver=False)
ctx = ray.data.DataContext.get_current()
configure_data_context(ctx)
logging.getLogger("ray.data").setLevel(logging.ERROR)


def rounds(label: str) -> None:
    for i in range(3):
        ds = ray.data.from_arrow(pa.table({"k": ["a", "b", "c"] * 10, "v": list(range(30))}))
        t = time.perf_counter()
        ds.map_batches(lambda b: b, batch_format="pyarrow").take_all()
        t0 = time.perf_counter()
        ds.groupby("k", num_partitions=2).sum("v").take_all()
        t1 = time.perf_counter()
        ds.join(ray.data.from_arrow(pa.table({"k": ["a", "b"], "w": [1, 2]})), "inner", 2,
                on=("k",)).take_all()
        print(f"{label} round {i}: map {t0 - t:.2f} s, groupby {t1 - t0:.2f} s, "
              f"join {time.perf_counter() - t1:.2f} s", flush=True)


for kind in sys.argv[1:] or ["shuffle_v2", "hash_shuffle"]:
    ctx.shuffle_strategy = c.ShuffleStrategy(kind)
    rounds(kind)
