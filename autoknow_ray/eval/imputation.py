"""Scores of module 3 (imputation), from the run's graph triples and the gold folder alone.

What was held out: `gold/held_out_values` (written by `autoknow holdout-values`) when present,
else every non-type value of `gold/spans` when the import was `--blind` (the catalogue has
none); otherwise nothing is known to be missing and only precision is reported.
What is true: the held-out values plus every value of `gold/spans` (a product may have several).

- imputation.precision: of the values imputation added (live `added` triples of module
  imputation, conflicts left aside) on held-out products, for attributes the gold labels, the
  share that is true;
- imputation.recall: the share of held-out values that imputation added; `recall_in_text`: the
  same over held-out values the gold locates in a title or description (the ones text can give);
- precision / recall at confidence thresholds from the shipped one (the run's config) up;
- imputation.added.<relation>: facts imputation added, per relation (whole graph);
- imputation.conflicts (+ .precision): values added beside a different catalogue value;
- imputation.all_modules.*: the same precision / recall over every module's added values (module
  1 may take title values first; imputation then leaves those slots alone).
"""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from autoknow_ray.eval.metrics import norm_text, set_prf
from autoknow_ray.pipeline import read_parquet_any, table_file
from autoknow_ray.schema import HAS_TYPE

TYPE_ATTRIBUTES = {"product type"}
CONFLICT = "conflicts with catalogue"


def _gold(gold: Path, name: str) -> pl.DataFrame | None:
    p = table_file(gold, name)
    df = read_parquet_any(p) if p.exists() else None
    return df if df is not None and df.height else None


def _facts(df: pl.DataFrame, cols=("product_id", "attribute", "value")) -> set:
    return {(p, norm_text(a), norm_text(v)) for p, a, v in df.select(*cols).iter_rows()
            if norm_text(a) not in TYPE_ATTRIBUTES}


def _blind(gold: Path) -> bool:
    p = gold / "manifest.json"
    return p.exists() and bool(json.loads(p.read_text()).get("blind"))


def _shipped_threshold(run: Path) -> float | None:
    """The threshold the stage used (its manifest; fit's calibrated one under `auto`), else a
    number in the run's config; None where the module abstained or never ran."""
    m = run / "imputation" / "manifest.json"
    if m.exists():
        t = json.loads(m.read_text()).get("min_confidence")
        return float(t) if isinstance(t, (int, float)) else None
    p = run / "config.resolved.json"
    if not p.exists():
        return None
    t = json.loads(p.read_text()).get("imputation", {}).get("min_confidence")
    return float(t) if isinstance(t, (int, float)) else None


def score(run: Path, gold: Path) -> dict:
    run, gold = Path(run), Path(gold)
    spans = _gold(gold, "spans")
    held_df = _gold(gold, "held_out_values")
    if spans is None and held_df is None:
        return {}
    truth = _facts(spans) if spans is not None else set()
    held = _facts(held_df) if held_df is not None else set(truth)
    if held_df is not None:
        truth |= held
    if not held:
        return {}
    recall_known = held_df is not None or _blind(gold)
    located = set()
    if spans is not None:
        located = _facts(spans.filter(pl.col("start") >= 0)) & held
    triples = read_parquet_any(table_file(run / "graph", "triples"))
    live = triples.filter((pl.col("status") == "added") & (pl.col("relation") != HAS_TYPE))
    products = {p for p, _, _ in held}
    attrs = {a for _, a, _ in truth}
    mine = live.filter(pl.col("module") == "imputation")
    conflict = mine.filter(pl.col("evidence").str.starts_with(CONFLICT))
    imputed = mine.filter(~pl.col("evidence").str.starts_with(CONFLICT))

    def judged(df: pl.DataFrame) -> list[tuple[tuple, float]]:
        df = df.filter(pl.col("subject").is_in(list(products)))
        out = []
        for s, r, o, c in df.select("subject", "relation", "object", "confidence").iter_rows():
            fact = (s, norm_text(r), norm_text(o))
            if fact[1] in attrs:
                out.append((fact, float(c)))
        return out

    def prf(pred: set, prefix: str) -> dict:
        tp = len(pred & truth)
        p = tp / len(pred) if pred else 0.0
        r = len(pred & held) / len(held)
        f = 2 * p * r / (p + r) if p + r else 0.0
        out = {f"{prefix}.precision": round(p, 4), f"{prefix}.recall": round(r, 4),
               f"{prefix}.f1": round(f, 4), f"{prefix}.predicted": len(pred),
               f"{prefix}.correct": tp}
        if located:
            out[f"{prefix}.recall_in_text"] = round(len(pred & located) / len(located), 4)
        return out

    res = {"imputation.held_out": len(held), "imputation.held_out_in_text": len(located)}
    if not (run / "imputation" / "manifest.json").exists():
        # no imputation stage in this run: only what the other modules added is scored (the
        # module's own rows would read as a model that found nothing)
        res.update(prf({f for f, _ in judged(live)}, "imputation.all_modules"))
        return _drop_recall(res) if not recall_known else res
    pred = judged(imputed)
    pred_set = {f for f, _ in pred}
    res.update(prf(pred_set, "imputation"))
    shipped = _shipped_threshold(run)
    if shipped is not None:
        res["imputation.shipped_threshold"] = shipped
    for th in sorted({t for t in (shipped, 0.95, 0.99) if t is not None and t >= (shipped or 0)}):
        at = {f for f, c in pred if c >= th}
        r = prf(at, f"imputation.at_{th:g}")
        res.update({k: v for k, v in r.items() if k.rsplit(".", 1)[1] in ("precision", "recall")})
    for a in sorted({a for _, a, _ in held}):
        g = {x for x in held if x[1] == a}
        pa_ = {x for x in pred_set if x[1] == a}
        m = set_prf(pa_, g)
        res[f"imputation.attr.{a}.precision"] = (round(len(pa_ & truth) / len(pa_), 4)
                                                 if pa_ else 0.0)
        res[f"imputation.attr.{a}.recall"] = m["recall"]
        res[f"imputation.attr.{a}.support"] = len(g)
    for rel, n in mine.filter(~pl.col("evidence").str.starts_with(CONFLICT)) \
            .group_by("relation").len().sort("relation").iter_rows():
        res[f"imputation.added.{rel}"] = int(n)
    cf = {f for f, _ in judged(conflict)}
    res["imputation.conflicts"] = conflict.height
    if cf:
        res["imputation.conflicts.precision"] = round(len(cf & truth) / len(cf), 4)
    res.update(prf({f for f, _ in judged(live)}, "imputation.all_modules"))
    return _drop_recall(res) if not recall_known else res


def _drop_recall(res: dict) -> dict:
    """Without a record of which values the catalogue lacked, recall (and F1) are unknowable."""
    return {k: v for k, v in res.items() if "recall" not in k and "f1" not in k
            and "held_out" not in k}
