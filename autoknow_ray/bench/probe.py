"""Watching a real rebuild from the outside: per-operator timings, actor memory, object store.

- `DatasetProbe` wraps `ray.data.Dataset.write_parquet` in this process for the duration of a
  run (the stages call it from the driver), and records, for each write, the wall time of the
  whole execution (read + repartition + actor pool start + map + write) and Ray Data's own stats
  of it (`Dataset._write_ds`, the executed write plan: per-operator wall and CPU time, rows,
  bytes, spilled bytes). Nothing in the stage changes; the bench measures the stage as it runs.
- `MemorySampler` polls, every `interval` s, the peak resident set (VmHWM) and RSS of this node's
  Ray worker processes from /proc, keyed by their process title (Ray Data actors are titled
  `ray::MapWorker(MapBatches(TitleTagger))`), and the object store's use and spill counters
  from the raylet (what `ray memory --stats-only` prints), and the node's 1-minute load average
  (how busy the neighbours were). Other nodes' workers are not seen: on a multi-node cluster the
  per-actor figures cover the driver's node only.
"""
from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from autoknow_ray.memory import MemorySampler as DriverMemorySampler  # noqa: F401 (the bench's name)

_TITLE = re.compile(r"MapBatches\((\w+)\)")
# Ray's task workers (Ray Data's read / map / shuffle tasks, `runtime.run_task`'s model tasks):
# their titles change with the task they run, so they are one class here
TASK_WORKERS = "task workers"


def _worker_label(title: str) -> str | None:
    """The class a Ray worker process is counted under: its step for a Ray Data actor, every
    other Ray worker as TASK_WORKERS (VmHWM there is the process's lifetime peak over every task
    it ran); None for what is not a Ray worker (the raylet, GCS, dashboard, the driver)."""
    if title.startswith("ray::MapWorker("):
        m = _TITLE.search(title)
        return m.group(1) if m else None
    if title.startswith("ray::") and not title.startswith(("ray::IDLE_SPILL",)):
        return TASK_WORKERS
    return None


class DatasetProbe:
    def __init__(self):
        self.writes: list[dict] = []

    @contextmanager
    def watching(self):
        import ray.data

        original = ray.data.Dataset.write_parquet
        probe = self

        def write_parquet(ds, path, *args, **kwargs):
            t0 = time.perf_counter()
            result = original(ds, path, *args, **kwargs)
            probe.writes.append(probe._describe(ds, path, time.perf_counter() - t0))
            return result

        ray.data.Dataset.write_parquet = write_parquet
        try:
            yield self
        finally:
            ray.data.Dataset.write_parquet = original

    @staticmethod
    def _describe(ds, path: str, seconds: float) -> dict:
        rec: dict = {"path": str(path), "seconds": seconds, "udf": None, "rows": None,
                     "operators": [], "stats": ""}
        names = _TITLE.findall(str(getattr(ds, "_logical_plan", "")) or "")
        written = getattr(ds, "_write_ds", None)
        if written is not None:
            try:
                summary = written._get_stats_summary()
                rec["stats"] = written.stats()
                rec["dataset_bytes_spilled"] = summary.dataset_bytes_spilled
                rec["global_bytes_spilled"] = summary.global_bytes_spilled
                for op in _flatten(summary):
                    names += _TITLE.findall(op.operator_name)
                    rows = op.output_num_rows.sum if op.output_num_rows else None
                    rec["operators"].append({
                        "name": op.operator_name,
                        "time_total_s": op.time_total_s,
                        "wall_sum_s": op.wall_time.sum if op.wall_time else None,
                        "cpu_sum_s": op.cpu_time.sum if op.cpu_time else None,
                        "udf_sum_s": op.function_body_time.sum if op.function_body_time else None,
                        "rows_out": rows,
                        "bytes_out": op.output_size_bytes.sum if op.output_size_bytes else None,
                    })
            except Exception as e:  # stats are a private API: record why, keep the timing
                rec["stats_error"] = f"{type(e).__name__}: {e}"
        rec["udf"] = names[0] if names else Path(str(path)).name
        rows = [o["rows_out"] for o in rec["operators"] if "MapBatches" in o["name"]]
        if rows and rows[0] is not None:
            rec["rows"] = int(rows[0])
        return rec


def _flatten(summary) -> list:
    out = []
    for p in summary.parents or []:
        out += _flatten(p)
    return out + list(summary.operators_stats)


def _proc_memory(pid: str) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in bytes, or None if the process is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        return None
    return rss, hwm


def _proc_title(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def object_store_stats() -> dict | None:
    """Cluster-wide object store use and spill counters from a raylet, or None."""
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        s = get_memory_info_reply(get_state_from_address(None), timeout_seconds=10).store_stats
        return {"used": int(s.object_store_bytes_used), "spilled": int(s.spilled_bytes_total),
                "restored": int(s.restored_bytes_total),
                "fallback": int(s.object_store_bytes_fallback)}
    except Exception:
        return None


class MemorySampler:
    def __init__(self, interval: float = 0.5, store_interval: float = 2.0):
        self.interval = interval
        self.store_interval = store_interval
        self.actors: dict[str, dict] = {}  # pid -> {label, peak_rss, hwm}
        self.store_peak: int | None = None
        self.store_start: dict | None = None
        self.store_end: dict | None = None
        self.loads: list[float] = []  # 1-minute load average, sampled with the processes
        self.proc_available = Path("/proc/self/status").exists()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        self.store_start = object_store_stats()
        self._thread = threading.Thread(target=self._loop, name="bench-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._sample_procs()
        self.store_end = object_store_stats()
        if self.store_end:
            self.store_peak = max(self.store_peak or 0, self.store_end["used"])

    def _loop(self):
        next_store = 0.0
        while not self._stop.is_set():
            self._sample_procs()
            now = time.monotonic()
            if now >= next_store:
                s = object_store_stats()
                if s:
                    self.store_peak = max(self.store_peak or 0, s["used"])
                next_store = now + self.store_interval
            self._stop.wait(self.interval)

    def _sample_procs(self):
        if not self.proc_available:
            return
        try:
            with open("/proc/loadavg") as f:
                self.loads.append(float(f.read().split()[0]))
        except (OSError, ValueError, IndexError):
            pass
        for pid in (p.name for p in Path("/proc").iterdir() if p.name.isdigit()):
            title = _proc_title(pid)
            label = _worker_label(title)
            if label is None:
                continue
            mem = _proc_memory(pid)
            if mem is None:
                continue
            rec = self.actors.setdefault(pid, {"label": label, "peak_rss": 0, "hwm": 0})
            if rec["label"] == TASK_WORKERS and label != TASK_WORKERS:
                rec["label"] = label  # a task worker that became an actor is that actor
            if not title.startswith("ray::IDLE"):
                rec["last_task"] = title[:120]
            if mem[0] > rec["peak_rss"]:
                # what the process ran when its sampled resident set was highest (a task
                # worker's title names its task: `ray::_map_task`, `ray::run_model_task` …); an
                # idle worker keeps the memory of its last task, so that task is named
                rec["peak_rss"] = mem[0]
                rec["peak_title"] = rec.get("last_task") or title[:120]
            rec["hwm"] = max(rec["hwm"], mem[1])

    def summary(self) -> dict:
        """Per actor class: how many processes, peak memory of the largest (VmHWM, else RSS)."""
        per: dict[str, dict] = {}
        for rec in self.actors.values():
            peak = max(rec["hwm"], rec["peak_rss"])
            s = per.setdefault(rec["label"], {"processes": 0, "peak_bytes_max": 0, "peak_bytes": [],
                                              "sampled_peak_title": None, "sampled_peak_rss": 0})
            s["processes"] += 1
            s["peak_bytes_max"] = max(s["peak_bytes_max"], peak)
            s["peak_bytes"].append(peak)
            if rec["peak_rss"] > s["sampled_peak_rss"]:
                s["sampled_peak_rss"], s["sampled_peak_title"] = rec["peak_rss"], rec.get("peak_title")
        spilled = None
        if self.store_start and self.store_end:
            spilled = self.store_end["spilled"] - self.store_start["spilled"]
        return {
            "actors": per,
            "object_store_peak_bytes": self.store_peak,
            "object_store_spilled_bytes": spilled,
            "load_average_mean": sum(self.loads) / len(self.loads) if self.loads else None,
            "load_average_max": max(self.loads) if self.loads else None,
            "method": ("/proc VmHWM+VmRSS of ray::MapWorker(MapBatches(…)) processes (each step's "
                       "actors) and of every other ray:: worker process ('task workers') every "
                       f"{self.interval}s; object store from the raylet every {self.store_interval}s"
                       if self.proc_available else "unavailable (/proc not present)"),
        }

