"""Where the driver's memory goes in a rebuild: its peak resident set between and during every
Ray Data execution, with the call sites.

    python docs/bench/driver_memory_profile.py CATALOGUE MODELS OUT CONFIG [--top N]

Rebuilds CATALOGUE into OUT with MODELS and CONFIG (a YAML file) in this process (an embedded
Ray of 2 CPUs), and logs, for every Ray Data execution, the driver's peak resident set (VmHWM,
reset with /proc/self/clear_refs before each interval) in the driver work since the previous
execution ("gap") and during the execution itself, and the resident set after it, in MiB. Prints
the N intervals with the highest peaks and writes every row to OUT.driver_memory.json. Run it at
two catalogue sizes and compare the call sites: what grows with the catalogue is there.
Linux only (/proc).
"""
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stage_fixed_cost import EXECUTIONS  # noqa: E402

MIB = 2 ** 20


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def watch(names, depth: int = 3) -> list:
    from ray.data import Dataset

    log = []
    state = {"since": time.time(), "where": "start"}

    def wrap(name):
        f = getattr(Dataset, name)

        def g(self, *a, **k):
            st = [fr for fr in traceback.extract_stack() if "autoknow_ray" in fr.filename]
            where = " < ".join(f"{x.filename.split('autoknow_ray/')[-1]}:{x.lineno} {x.name}"
                               for x in st[-depth:][::-1]) or "?"
            before = _status()
            log.append({"kind": "gap", "after": state["where"], "until": where,
                        "peak_mib": round(before["VmHWM"] / MIB, 1),
                        "rss_mib": round(before["VmRSS"] / MIB, 1),
                        "seconds": round(time.time() - state["since"], 2)})
            _reset_peak()
            t = time.time()
            try:
                return f(self, *a, **k)
            finally:
                after = _status()
                log.append({"kind": name, "where": where, "peak_mib": round(after["VmHWM"] / MIB, 1),
                            "rss_mib": round(after["VmRSS"] / MIB, 1),
                            "rss_before_mib": round(before["VmRSS"] / MIB, 1),
                            "seconds": round(time.time() - t, 2)})
                _reset_peak()
                state["since"], state["where"] = time.time(), where

        g.__wrapped__ = f
        setattr(Dataset, name, g)

    for n in names:
        wrap(n)
    return log


def main(cat, models, out, config, top=25):
    import ray

    from autoknow_ray.rebuild import rebuild

    log = watch((*EXECUTIONS, "write_parquet", "iter_rows", "to_pandas", "schema"))
    ray.init(num_cpus=2, object_store_memory=1000 * MIB, include_dashboard=False)
    _reset_peak()
    t0 = time.time()
    res = rebuild(cat, out, models=models, config=config, force=True)
    end = _status()
    log.append({"kind": "gap", "after": log[-1].get("where") if log else "start", "until": "end",
                "peak_mib": round(end["VmHWM"] / MIB, 1), "rss_mib": round(end["VmRSS"] / MIB, 1)})
    print("TOTAL", round(time.time() - t0, 1))
    for s in res["stages"]:
        print("STAGE", s["stage"], s.get("seconds"), s.get("driver_memory"))
    ray.shutdown()
    with open(str(out).rstrip("/") + ".driver_memory.json", "w") as f:
        json.dump(log, f, indent=1)
    for row in sorted(log, key=lambda r: -r["peak_mib"])[:top]:
        where = row.get("where") or f"{row['after']} -> {row['until']}"
        print(f"{row['peak_mib']:8.1f} {row['rss_mib']:8.1f} {row['kind']:14s} {where}")


if __name__ == "__main__":
    args = sys.argv[1:]
    n_top = 25
    if "--top" in args:
        i = args.index("--top")
        n_top = int(args[i + 1])
        del args[i:i + 2]
    main(*args[:4], top=n_top)
