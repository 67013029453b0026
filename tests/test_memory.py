"""The driver-memory sampler tells the driver's heap from the shared pages it has mapped."""
import mmap
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import polars as pl
import pytest

from autoknow_ray.index.vectors import as_matrix
from autoknow_ray.memory import MemorySampler

MiB = 2**20


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_heap_and_shared_pages_are_told_apart():
    shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
    if shm_dir is None:
        pytest.skip("no /dev/shm")
    with tempfile.NamedTemporaryFile(dir=shm_dir) as f:
        f.truncate(64 * MiB)
        with MemorySampler(interval=0.05) as heap_run:
            block = bytearray(96 * MiB)
            block[::4096] = b"x" * len(block[::4096])  # touch every page: resident
            time.sleep(0.3)
            del block
        with MemorySampler(interval=0.05) as shm_run:
            m = mmap.mmap(f.fileno(), 64 * MiB)
            for i in range(0, 64 * MiB, 4096):
                m[i] = 1
            time.sleep(0.3)
            m.close()
    heap = heap_run.stage_figures()
    assert 80 <= heap["heap_growth_mib"] < 160, heap
    assert abs(heap["object_store_pages_growth_mib"]) < 16, heap
    shm = shm_run.stage_figures()
    assert 56 <= shm["object_store_pages_growth_mib"] < 96, shm
    assert shm["heap_growth_mib"] < 32, shm
    assert shm["rss_growth_mib"] >= 56, shm


def test_vector_columns_become_one_matrix_whatever_their_form():
    rows = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    want = np.asarray(rows, np.float32)
    polars_list = pl.DataFrame({"e": rows}, schema={"e": pl.List(pl.Float32)})["e"]
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(want.reshape(-1)), 2)
    for col in (polars_list, fixed, pa.chunked_array([fixed.slice(0, 1), fixed.slice(1)]),
                pa.array(rows)):
        np.testing.assert_array_equal(as_matrix(col), want)
    np.testing.assert_array_equal(as_matrix(polars_list[1:]), want[1:])  # a slice keeps its rows
    np.testing.assert_array_equal(as_matrix(fixed.slice(1)), want[1:])
    assert as_matrix(fixed.slice(0, 0)).shape == (0, 2)
    assert as_matrix(polars_list, np.float16).dtype == np.float16
    with pytest.raises(ValueError, match="unequal length"):
        as_matrix(pa.array([[1.0, 2.0], [1.0, 2.0, 3.0], [1.0]]))
    with pytest.raises(ValueError, match="null"):
        as_matrix(pa.array([[1.0], None]))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_release_hands_back_heap_pages_the_allocator_kept():
    """200 MB of 4 KB buffers freed while the last one stays alive: glibc cannot shrink its heap
    past the live buffer, so the pages stay resident until `release_freed_memory` trims them."""
    import subprocess
    import sys

    code = (
        "from autoknow_ray.memory import process_memory, release_freed_memory\n"
        "bufs = [bytearray(4096) for _ in range(50_000)]\n"
        "for b in bufs: b[::512] = b'x' * len(b[::512])\n"
        "last = bufs[-1]\n"
        "del bufs\n"
        "kept = process_memory()['rss']\n"
        "r = release_freed_memory()\n"
        "print(kept, r['rss_before'], r['rss_after'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    kept, before, after = (int(x) for x in out.stdout.split())
    assert before >= kept - 16 * 2**20
    assert before - after > 100 * 2**20, (kept, before, after)
