"""The measurement behind `runtime.parquet_reads_without_listing_tasks`: read and materialise
one 100-row Parquet file three times each way, with Ray Data's ListFiles -> ReadFiles chain
(its default) and with the first datasource. Not part of the package or the suite.

    .venv/bin/python docs/bench/parquet_read_micro.py
"""
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data as rd


def main() -> None:
    ray.init(num_cpus=2, object_store_memory=400 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    ctx = rd.DataContext.get_current()
    ctx.enable_progress_bars = False
    folder = Path(tempfile.mkdtemp())
    pq.write_table(pa.table({"a": list(range(100))}), folder / "x.parquet")
    for listing_task in (True, False, True, False, True, False):
        ctx.use_datasource_v2 = listing_task
        t = time.perf_counter()
        rd.read_parquet(str(folder)).materialize()
        print(f"listing task {listing_task!s:5}: {time.perf_counter() - t:.2f} s", flush=True)


if __name__ == "__main__":
    main()
