"""Scores for data cleaning (module 4) against planted errors (`autoknow plant`).

Removals are read from `graph/triples.parquet` alone: a catalogue fact the run marked `removed`
is a flag. Precision and recall are against `gold/wrong_values` (attribute values) and
`gold/wrong_types` (product types); the false-removal rate is the share of clean facts removed.
AUC-PR needs every fact's score, which the cleaning stage (and each baseline) keeps beside its
outputs in `cleaning/scores`; without it only the thresholded figures are given.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from autoknow_ray.eval.metrics import average_precision, norm_text, prf
from autoknow_ray.pipeline import read_parquet_any, table_file
from autoknow_ray.schema import HAS_TYPE


def _gold(gold: Path, name: str) -> pl.DataFrame | None:
    p = table_file(gold, name)
    df = read_parquet_any(p) if p.exists() else None
    return df if df is not None and df.height else None


def _keys(df: pl.DataFrame, s: str, r: str | None, o: str) -> set:
    rel = df[r].to_list() if r else [HAS_TYPE] * df.height
    return {(a, norm_text(b), norm_text(c)) for a, b, c in zip(df[s].to_list(), rel, df[o].to_list())}


def _score_part(facts: pl.DataFrame, wrong: set, scores: pl.DataFrame | None, prefix: str) -> dict:
    """facts: the catalogue facts of one kind in the graph (subject, relation, object, status)."""
    keys = _keys(facts, "subject", "relation", "object")
    removed = _keys(facts.filter(pl.col("status") == "removed"), "subject", "relation", "object")
    planted = wrong & keys
    tp = len(removed & planted)
    out = {f"{prefix}.{k}": v for k, v in prf(tp, len(removed - planted), len(planted - removed)).items()}
    clean = len(keys - planted)
    out[f"{prefix}.false_removal_rate"] = round(len(removed - planted) / clean, 4) if clean else 0.0
    out[f"{prefix}.planted"] = len(planted)
    out[f"{prefix}.facts"] = len(keys)
    if scores is not None and scores.height:
        s = scores.unique(["subject", "relation", "object"], keep="first")
        labels = [int((a, norm_text(b), norm_text(c)) in planted) for a, b, c in
                  s.select("subject", "relation", "object").iter_rows()]
        out[f"{prefix}.auc_pr"] = round(average_precision(labels, s["score"].fill_null(0.0).to_list()), 4)
    return out


def score(run: str | Path, gold: str | Path) -> dict:
    run, gold = Path(run), Path(gold)
    wrong_values, wrong_types = _gold(gold, "wrong_values"), _gold(gold, "wrong_types")
    if wrong_values is None and wrong_types is None:
        return {}
    triples = read_parquet_any(table_file(run / "graph", "triples"))
    # catalogue facts: kept ones, and removed ones (a removal names an existing fact)
    facts = triples.filter(pl.col("status").is_in(["kept", "removed"]))
    sp = table_file(run / "cleaning", "scores")
    scores = read_parquet_any(sp) if sp.exists() else None
    if scores is not None and scores.height:
        scores = scores.filter(pl.col("origin") == "catalogue")
    out = {}
    if wrong_values is not None:
        out.update(_score_part(
            facts.filter(pl.col("relation") != HAS_TYPE),
            _keys(wrong_values, "product_id", "attribute", "value"),
            None if scores is None else scores.filter(pl.col("relation") != HAS_TYPE),
            "cleaning.values"))
    if wrong_types is not None:
        out.update(_score_part(
            facts.filter(pl.col("relation") == HAS_TYPE),
            _keys(wrong_types, "product_id", None, "type"),
            None if scores is None else scores.filter(pl.col("relation") == HAS_TYPE),
            "cleaning.types"))
    return out
