"""Ad hoc: module 3's added values by the path that admitted them, right or wrong.

Reads RUN/graph/triples (module imputation, status added) and GOLD's spans and held-out values,
judges each value with `autoknow eval`'s matching (norm_text; attributes the gold labels), and
counts per path (cluster, known value, tagger) and score band (at or above THRESHOLD_OTHER, the
threshold for values not known, or below it) how many are right. A reading of the held-out
gold, not an `eval` key.

    python docs/bench/imputation_added_by_path.py RUN GOLD THRESHOLD_OTHER
"""
from __future__ import annotations

import sys
from collections import Counter

import polars as pl

from autoknow_ray.eval.metrics import norm_text


def main(run: str, gold: str, threshold: float) -> None:
    tr = pl.read_parquet(f"{run}/graph/triples/").filter(
        (pl.col("module") == "imputation") & (pl.col("status") == "added"))
    held = pl.read_parquet(f"{gold}/held_out_values.parquet")
    spans = pl.read_parquet(f"{gold}/spans.parquet")
    fact = lambda p, a, v: (p, norm_text(a), norm_text(v))  # noqa: E731
    truth = ({fact(*r) for r in spans.select("product_id", "attribute", "value").iter_rows()}
             | {fact(*r) for r in held.select("product_id", "attribute", "value").iter_rows()})
    attrs = {a for _, a, _ in truth}
    counts: Counter = Counter()
    for p, a, v, s, ev in tr.select("subject", "relation", "object", "confidence",
                                    "evidence").iter_rows():
        f = fact(p, a, v)
        if f[1] not in attrs:
            continue
        path = "cluster" if " cluster" in ev else "known value" if "known value" in ev else "tagger"
        band = "at or above" if s >= threshold else "below"
        counts[(path, band, f in truth)] += 1
    for path in ("tagger", "known value", "cluster"):
        for band in ("at or above", "below"):
            right, wrong = counts[(path, band, True)], counts[(path, band, False)]
            if right + wrong:
                print(f"{path:12s} {band:12s} {right:5d} right of {right + wrong:5d} "
                      f"({right / (right + wrong):.3f})")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
