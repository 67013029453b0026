"""The driver's own memory, sampled while something runs.

A Ray driver's resident set mixes three kinds of page (Linux `/proc/self/status`):
- `RssAnon`: its heap — Python objects, numpy/Arrow buffers it allocated. This is what grows when
  the driver holds per-product data, the thing the house forbids.
- `RssShmem`: pages of the node's shared object store it has mapped and touched (`ray.get` of a
  block maps it; `ray.put` writes into it). They belong to the object store, which spills and
  evicts them, and are shared with every worker on the node.
- `RssFile`: mapped files (libraries, memory-mapped Parquet).
`VmRSS` is their sum. A scale check reads the heap (`RssAnon`); the resident total is kept
beside it for comparison with tools that show only that.
"""
from __future__ import annotations

import threading

FIELDS = {"VmRSS": "rss", "RssAnon": "anon", "RssShmem": "shmem", "RssFile": "file"}


def process_memory() -> dict[str, int] | None:
    """This process's memory now, in bytes: {"rss", "anon", "shmem", "file"}; None where
    /proc is absent (then only "rss", from psutil, when it is installed)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in FIELDS:
                    out[FIELDS[key]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    if "rss" in out:
        return out
    try:
        import psutil

        return {"rss": int(psutil.Process().memory_info().rss)}
    except Exception:
        return None


def release_freed_memory() -> dict[str, int | None]:
    """Hand back to the OS what this process has freed but its allocators keep: a garbage
    collection, Arrow's memory pool's unused pages, and glibc's free heap pages (`malloc_trim`,
    where the C library has it). A driver runs one stage after another; without this, each
    stage starts from the high-water mark of the heaviest before it. Returns the resident set
    before and after, in bytes (None where unknown); never raises."""
    import gc

    before = (process_memory() or {}).get("rss")
    gc.collect()
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except Exception:
        pass
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return {"rss_before": before, "rss_after": (process_memory() or {}).get("rss")}


class MemorySampler:
    """This process's memory while a block of code runs: sampled every `interval` s by a
    background thread; the peak of each kind (`FIELDS`) and the values just before, so a
    stage's figure is its own, not the process's lifetime high-water mark."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.baseline: dict[str, int] = {}
        self.peaks: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peak(self) -> int | None:
        return self.peaks.get("rss")

    def _sample(self):
        m = process_memory()
        if m:
            for k, v in m.items():
                self.peaks[k] = max(self.peaks.get(k, v), v)
            self.samples += 1

    def _loop(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self.baseline = process_memory() or {}
        self.peaks = dict(self.baseline)
        self._thread = threading.Thread(target=self._loop, name="driver-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._sample()

    def summary(self) -> dict:
        base, peak = self.baseline.get("rss"), self.peaks.get("rss")
        out = {"baseline_bytes": base, "peak_bytes": peak,
               "peak_over_baseline_bytes": peak - base if peak is not None and base is not None
               else None,
               "samples": self.samples,
               "method": f"/proc/self/status of the driver every {self.interval}s while it ran, "
                         "peak minus the value just before it"}
        for k in ("anon", "shmem", "file"):
            if k in self.peaks and k in self.baseline:
                out[f"{k}_peak_bytes"] = self.peaks[k]
                out[f"{k}_peak_over_baseline_bytes"] = self.peaks[k] - self.baseline[k]
        return out

    def stage_figures(self) -> dict:
        """The figures a stage manifest keeps, in MiB: peak resident, peak heap and peak shared
        object-store pages, each over the value when the stage started."""
        mib = 2 ** 20

        def over(k):
            if k in self.peaks and k in self.baseline:
                return round((self.peaks[k] - self.baseline[k]) / mib, 1)
            return None

        return {"rss_peak_mib": round(self.peaks["rss"] / mib, 1) if "rss" in self.peaks else None,
                "rss_growth_mib": over("rss"), "heap_growth_mib": over("anon"),
                "object_store_pages_growth_mib": over("shmem")}
