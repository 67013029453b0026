"""Seeded line-level split of a JSON Lines / text file into train and held-out parts.

Public sets ship training splits only; `autoknow split` holds part of one out so that a model is
fitted on one file and judged on another, exactly as on a real held-out split.
"""
from __future__ import annotations

import random
from pathlib import Path


def split_file(path: str | Path, out: str | Path, *, fraction: float = 0.2, seed: int = 0) -> dict:
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise FileNotFoundError(f"not a file: {path}")
    if not 0 < fraction < 1:
        raise ValueError(f"--fraction must be in (0, 1), got {fraction}")
    lines = [ln for ln in path.read_bytes().split(b"\n") if ln.strip()]
    idx = list(range(len(lines)))
    random.Random(seed).shuffle(idx)
    n_test = int(round(len(lines) * fraction))
    test = set(idx[:n_test])
    out.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix or ".txt"
    train_p, test_p = out / f"train{suffix}", out / f"test{suffix}"
    train_p.write_bytes(b"\n".join(lines[i] for i in range(len(lines)) if i not in test) + b"\n")
    test_p.write_bytes(b"\n".join(lines[i] for i in sorted(test)) + b"\n")
    return {"train": str(train_p), "test": str(test_p), "n_train": len(lines) - n_test, "n_test": n_test}
