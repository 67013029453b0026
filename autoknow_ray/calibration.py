"""Thresholds chosen for a precision target, or abstention: how a module that adds or removes
facts decides, on a validation split of the catalogue it trains from, whether it is safe at all.

A module's validation gives scores and labels (1 = the claim the module would act on is right to
act on: a misassigned value for cleaning, a true value for imputation, a true synonym pair). The
threshold shipped is the one of most recall (of equal recall, the highest score) at which a
one-sided lower confidence bound of precision reaches the target; where no threshold does, the module abstains and says
why, with the best bound it reached. The bound, not the point estimate, decides: a threshold
that is right on 6 of 6 validation claims has not shown 0.95.

`base_rate` is for validations whose class balance is not the graph's (cleaning trains on as many
planted errors as correct claims; a catalogue holds a few per cent of errors): precision is then
computed from the true-positive rate and the false-positive rate at that base rate, with the
lower bound of the first and the upper bound of the second.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

Z_ONE_SIDED_95 = 1.645


def wilson(k: float, n: float, z: float = Z_ONE_SIDED_95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n: (lower, upper); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = p + z * z / (2 * n)
    r = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return max(0.0, (c - r) / d), min(1.0, (c + r) / d)


@dataclass
class PrecisionChoice:
    """What a module ships: `threshold` (None: it abstains), with the validation figures."""

    target: float
    threshold: float | None
    precision: float | None = None  # point estimate at the threshold
    precision_lower: float | None = None  # the bound that met the target
    recall: float | None = None
    acted: int = 0  # validation claims at or above the threshold
    positives: int = 0
    negatives: int = 0
    best_precision_lower: float | None = None  # the best bound any threshold reached
    base_rate: float | None = None
    abstain_reason: str | None = None

    @property
    def abstains(self) -> bool:
        return self.threshold is None

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def threshold_for_precision(scores, labels, target: float, *, base_rate: float | None = None,
                            floor: float = 0.0, z: float = Z_ONE_SIDED_95) -> PrecisionChoice:
    """The threshold >= `floor` of most recall whose precision lower bound reaches `target` (of
    equal recall, the highest; see module doc); `threshold` None, with the reason, where none
    does."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    choice = PrecisionChoice(target=float(target), threshold=None, positives=n1, negatives=n0,
                             base_rate=base_rate)
    if n1 == 0:
        choice.abstain_reason = "the validation split holds no claim the module should act on"
        return choice
    if base_rate is not None and n0 == 0:
        choice.abstain_reason = "the validation split holds no claim the module should leave alone"
        return choice
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]  # a threshold acts on every claim of its score or above
    best, found = -1.0, None
    for i in np.flatnonzero(last & (s >= floor)):
        t_p, f_p = float(tp[i]), float(fp[i])
        if base_rate is None:
            point = t_p / (t_p + f_p)
            lower = wilson(t_p, t_p + f_p, z)[0]
        else:
            tpr, fpr = t_p / n1, f_p / n0
            tpr_lo, fpr_hi = wilson(t_p, n1, z)[0], wilson(f_p, n0, z)[1]
            point = _at_base(tpr, fpr, base_rate)
            lower = _at_base(tpr_lo, fpr_hi, base_rate)
        best = max(best, lower)
        # a lower threshold is taken only where it finds more: one that adds wrong claims alone
        # is never shipped
        if lower >= target and (found is None or t_p / n1 > found[3]):
            found = (float(s[i]), point, lower, t_p / n1, int(i + 1))
    choice.best_precision_lower = round(best, 4) if best >= 0 else None
    if found is None:
        choice.abstain_reason = (f"no threshold reaches precision {target:g} on the validation split "
                                 f"(best lower bound {max(best, 0.0):.3f}, {n1} positives, "
                                 f"{n0} negatives)")
        return choice
    choice.threshold, choice.precision, choice.precision_lower, choice.recall, choice.acted = found
    return choice


def _at_base(tpr: float, fpr: float, base_rate: float) -> float:
    num = base_rate * tpr
    den = num + (1 - base_rate) * fpr
    return num / den if den > 0 else 0.0


def wilson_lower(k, n, z: float = Z_ONE_SIDED_95) -> np.ndarray:
    """`wilson(k, n, z)[0]` over arrays (0 where n is 0)."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    safe = np.where(n > 0, n, 1.0)
    p = k / safe
    d = 1 + z * z / safe
    c = p + z * z / (2 * safe)
    r = z * np.sqrt(np.maximum(p * (1 - p) / safe + z * z / (4 * safe * safe), 0.0))
    return np.where(n > 0, np.maximum(0.0, (c - r) / d), 0.0)


def two_thresholds_for_precision(scores, labels, in_group, target: float, *, floor: float = 0.0,
                                 z: float = Z_ONE_SIDED_95, block_cells: int = 4_000_000) -> dict:
    """Two thresholds chosen together: `group` for the claims in `in_group`, `other` for the
    rest, `group` <= `other`, both >= `floor` and among the claims' own scores: of all pairs whose
    one lower bound of precision over every claim acted on (either threshold) reaches `target`,
    the one of most recall; of equal recall the fewest claims acted on, then the highest `group`
    threshold, then the highest `other` (so where the group earns no lower threshold both stay
    equal). The pairs are scored in blocks of at most `block_cells` (cumulative counts, no loop
    per claim). `group` None, with the reason, where no pair reaches the target."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    g = np.asarray(in_group).astype(bool)
    n1 = int(y.sum())
    out = {"target": float(target), "threshold_group": None, "threshold_other": None,
           "positives": n1, "negatives": int((~y).sum()), "group_claims": int(g.sum()),
           "group_positives": int((g & y).sum())}
    t = np.unique(s[s >= floor])[::-1]  # candidate thresholds, highest first
    if n1 == 0 or t.size == 0:
        out["abstain_reason"] = "no claim the module should act on at or above the floor"
        return out

    def at_or_above(mask):  # claims of `mask` scoring >= each threshold of t
        v = np.sort(s[mask])
        return (v.size - np.searchsorted(v, t, side="left")).astype(np.float64)

    tp_g, fp_g = at_or_above(g & y), at_or_above(g & ~y)
    tp_o, fp_o = at_or_above(~g & y), at_or_above(~g & ~y)
    m = t.size
    rows = max(1, block_cells // m)
    best = None  # (tp, -acted, -j, -i) of the best pair: i the other threshold, j the group's
    best_lower = -1.0
    jj = np.arange(m)
    for i0 in range(0, m, rows):
        ii = np.arange(i0, min(m, i0 + rows))[:, None]
        tp = tp_o[ii] + tp_g[None, :]
        acted = tp + fp_o[ii] + fp_g[None, :]
        lower = wilson_lower(tp, acted, z)
        ok = (jj[None, :] >= ii) & (acted > 0)  # the group's threshold at most the other's
        best_lower = max(best_lower, float(lower[ok].max()) if ok.any() else -1.0)
        ok &= lower >= target
        if not ok.any():
            continue
        bi, bj = np.nonzero(ok)
        bi = bi + i0
        k = np.lexsort((-bi, -bj, -acted[bi - i0, bj], tp[bi - i0, bj]))[-1]
        cand = (float(tp[bi[k] - i0, bj[k]]), -float(acted[bi[k] - i0, bj[k]]), -int(bj[k]),
                -int(bi[k]))
        if best is None or cand > best:
            best = cand
    out["best_precision_lower"] = round(best_lower, 4) if best_lower >= 0 else None
    if best is None:
        out["abstain_reason"] = (f"no pair of thresholds reaches precision {target:g} (best lower "
                                 f"bound {max(best_lower, 0.0):.3f})")
        return out
    tp, acted, j, i = best[0], -best[1], -best[2], -best[3]
    out.update({
        "threshold_group": float(t[j]), "threshold_other": float(t[i]),
        "precision": round(tp / acted, 4), "precision_lower": round(float(wilson_lower(tp, acted, z)), 4),
        "recall": round(tp / n1, 4), "acted": int(acted),
        "group_acted": int(tp_g[j] + fp_g[j]), "group_right": int(tp_g[j]),
        "other_acted": int(tp_o[i] + fp_o[i]), "other_right": int(tp_o[i]),
    })
    return out
