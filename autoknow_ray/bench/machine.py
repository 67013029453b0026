"""What the benchmark ran on, and what that hardware can do: matmul rates measured with torch.

The rate is measured, not read from a datasheet: square matmuls (2048² by default), best of a
few timed rounds after a warm-up, at the thread count given. On a shared machine the best round
is the one least disturbed by neighbours, which is what a FLOP floor should be measured against.
"""
from __future__ import annotations

import os
import platform
import time

import torch

from autoknow_ray.nn.encoder import cpu_flags, cpu_has_bf16  # noqa: F401  (re-exported)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_rate(dtype: torch.dtype = torch.float32, device: str = "cpu", threads: int | None = None,
                n: int = 2048, rounds: int = 5, min_seconds: float = 0.3) -> float:
    """FLOP/s of an n×n @ n×n matmul (2n³ FLOPs), best of `rounds` timed rounds."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        a @ b  # warm-up: kernels chosen, pages touched
        sync()
        best = 0.0
        for _ in range(rounds):
            reps, t0 = 0, time.perf_counter()
            while True:
                a @ b
                reps += 1
                sync()
                dt = time.perf_counter() - t0
                if dt >= min_seconds:
                    break
            best = max(best, 2.0 * n**3 * reps / dt)
        return best
    finally:
        torch.set_num_threads(before)


def hardware_rates(threads_used: list[int], quick: bool = False) -> dict:
    """Measured matmul FLOP/s: fp32 (and bf16 where native) per thread count; bf16 on GPU."""
    rounds = 3 if quick else 5
    out: dict = {"matmul_n": 2048, "rounds": rounds, "cpu": {}}
    for t in sorted(set(threads_used)):
        row = {"fp32": matmul_rate(torch.float32, threads=t, rounds=rounds)}
        if cpu_has_bf16():
            row["bf16"] = matmul_rate(torch.bfloat16, threads=t, rounds=rounds)
        out["cpu"][str(t)] = row
    if torch.cuda.is_available():
        out["gpu"] = {"bf16": matmul_rate(torch.bfloat16, device="cuda", n=8192, rounds=rounds),
                      "fp32": matmul_rate(torch.float32, device="cuda", n=8192, rounds=rounds)}
    return out


def data_context_settings() -> dict:
    """The Ray Data DataContext fields that shape a run (ray-project/ray#59144: record them)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    keep = {}
    for k, v in sorted(vars(ctx).items()):
        if k.startswith("_"):
            continue
        if isinstance(v, (bool, int, float, str)) or v is None:
            keep[k] = v
        elif k in ("execution_options", "autoscaling_config"):
            keep[k] = repr(v)
    return keep


def machine_info(cluster: dict) -> dict:
    import ray
    import transformers

    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "host_cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_bf16": cpu_has_bf16(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads_default": torch.get_num_threads(),
        "gpus": gpus,
        "ray_cluster": cluster,
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
