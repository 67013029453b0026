"""Metrics shared by every module's evaluation."""
from __future__ import annotations

import re
import unicodedata

from autoknow_ray.text import type_key

_WS = re.compile(r"\s+")
_PUNCT_EDGE = re.compile(r"^[\W_]+|[\W_]+$")


def norm_text(s: str | None) -> str:
    """Case-, width- and whitespace-insensitive form used to compare values and type names."""
    if s is None:
        return ""
    s = unicodedata.normalize("NFKC", str(s)).lower()
    s = _WS.sub(" ", s).strip()
    return _PUNCT_EDGE.sub("", s)


def norm_type(s: str | None) -> str:
    """Type names compare by their type key: case, punctuation, spacing and plural endings
    folded ("Tea Bags" = "tea bag"), the same key module 1 resolves types with."""
    return type_key(s)


def prf(tp: int, fp: int, fn: int) -> dict:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4),
            "tp": tp, "fp": fp, "fn": fn}


def set_prf(pred: set, gold: set) -> dict:
    return prf(len(pred & gold), len(pred - gold), len(gold - pred))


def accuracy_at_k(ranked: dict, gold: dict, k: int) -> float:
    """ranked: child -> ordered candidates; gold: child -> set of right answers."""
    if not gold:
        return 0.0
    hits = sum(1 for c, g in gold.items() if set(ranked.get(c, [])[:k]) & g)
    return round(hits / len(gold), 4)


def average_precision(labels, scores) -> float:
    """Area under the precision-recall curve, as average precision: sum over score thresholds of
    (recall gain) x precision. Tied scores form one threshold, so the order of ties never
    matters."""
    import numpy as np

    y = np.asarray(labels, dtype=bool)
    if y.sum() == 0:
        return 0.0
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s, hits = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the end of each run of equal scores
    tp = np.cumsum(hits)[last]
    precision = tp / (last + 1)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def spearman(a, b) -> float | None:
    """Spearman rank correlation (average ranks for ties); None when either side is constant."""
    import numpy as np
    import polars as pl

    if len(a) < 2:
        return None
    ra = pl.Series(np.asarray(a, dtype=np.float64)).rank("average").to_numpy()
    rb = pl.Series(np.asarray(b, dtype=np.float64)).rank("average").to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])
