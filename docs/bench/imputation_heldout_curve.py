"""Ad hoc: module 3's held-out precision / recall curve, read off a rebuild's decisions.

Every candidate a rebuild decided on (RUN/imputation/decisions, written or not, with its score),
cluster-assigned ones left out; per product and attribute the best-scored one (what DecideValues
writes); judged with `autoknow eval`'s matching (norm_text; an attribute counts where the gold
labels it anywhere; right where the gold gives the product that value). Prints, per precision
target, the lowest score whose cumulative precision still reaches it and the recall there; and
what fit's rule (one-sided 95% Wilson lower bound, `calibration.threshold_for_precision`, floor
0.5) would choose were these decisions its validation set. A reading of the held-out gold, not a
choice any fit can make.

    python docs/bench/imputation_heldout_curve.py RUN GOLD
"""
from __future__ import annotations

import sys

import polars as pl

from autoknow_ray.calibration import threshold_for_precision
from autoknow_ray.eval.metrics import norm_text


def main(run: str, gold: str) -> None:
    dec = pl.read_parquet(f"{run}/imputation/decisions/")
    held = pl.read_parquet(f"{gold}/held_out_values.parquet")
    spans = pl.read_parquet(f"{gold}/spans.parquet")
    fact = lambda p, a, v: (p, norm_text(a), norm_text(v))  # noqa: E731
    held_set = {fact(*r) for r in held.select("product_id", "attribute", "value").iter_rows()}
    truth = {fact(*r) for r in spans.select("product_id", "attribute", "value").iter_rows()} | held_set
    attrs = {a for _, a, _ in truth}
    best: dict[tuple, tuple] = {}
    for p, a, v, s, ev in dec.select("subject", "relation", "object", "confidence",
                                     "evidence").iter_rows():
        f = fact(p, a, v)
        if " cluster " in (ev or "") or f[1] not in attrs:
            continue
        if (p, a) not in best or s > best[(p, a)][0]:
            best[(p, a)] = (s, f)
    ranked = sorted(best.values(), key=lambda x: -x[0])
    right = hits = 0
    curve = []
    for i, (s, f) in enumerate(ranked):
        right += f in truth
        hits += f in held_set
        curve.append((s, right / (i + 1), hits / len(held_set)))
    for target in (0.95, 0.955, 0.96, 0.965, 0.97):
        pts = [c for c in curve if c[1] >= target]
        if pts:
            s, p, r = pts[-1]
            print(f"P >= {target}: down to score {s:.4f}, P {p:.4f}, R {r:.4f}")
    c = threshold_for_precision([s for s, _ in ranked], [f in truth for _, f in ranked], 0.95,
                                floor=0.5)
    if c.threshold is not None:
        r = sum(f in held_set for s, f in ranked if s >= c.threshold) / len(held_set)
        print(f"fit's rule on these decisions: threshold {c.threshold:.4f}, P {c.precision:.4f}, "
              f"lower bound {c.precision_lower:.4f}, R {r:.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
