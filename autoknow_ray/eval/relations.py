"""Scoring module 2 (relation discovery) from RUN/graph/attributes alone.

Gold pairs come from the held-out gold labels: for each gold type with at least
`MIN_GOLD_PRODUCTS` annotated products, an attribute annotated for one of its products applies;
an attribute annotated for other types but never for it does not. Pairs are judged over the
attributes the run names (an attribute the run has never heard of cannot be scored as a decision;
how many gold attributes lie outside its vocabulary is reported as `*.gold_attributes_unknown`
and `*.recall_all_gold` counts them as misses).

Types are split into `seen` (in gold/fit_types, written by `autoknow type-split`) and `unseen`;
without fit_types every type counts as `all` only. Importance: the Spearman correlation, per
type, between the run's importance and each applicable gold attribute's annotation frequency
(share of the type's products annotated with it), averaged over types with >= 3 such attributes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from autoknow_ray.eval.metrics import average_precision, norm_text, norm_type, prf, spearman
from autoknow_ray.pipeline import read_parquet_any, table_file

MIN_GOLD_PRODUCTS = 3  # fewer annotated products say too little about what never applies
TYPE_ATTRIBUTES = {"product type"}  # span attributes that name the type, not an attribute of it


def _read(folder: Path, name: str) -> pl.DataFrame | None:
    p = table_file(folder, name)
    if not p.exists():
        return None
    df = read_parquet_any(p)
    return df if df.height else None


def gold_pairs(gold: Path, min_products: int = MIN_GOLD_PRODUCTS) -> pl.DataFrame | None:
    """(type_key, attribute_key, products, annotated, frequency, label) over the gold attribute
    universe, for gold types with at least `min_products` products."""
    types, spans = _read(gold, "types"), _read(gold, "spans")
    if types is None or spans is None:
        return None
    t = types.select("product_id", pl.col("type").map_elements(norm_type, return_dtype=pl.String)
                     .alias("type_key")).unique("product_id")
    n = t.group_by("type_key").agg(pl.len().alias("products")).filter(
        pl.col("products") >= min_products)
    s = (spans.select("product_id", pl.col("attribute").map_elements(norm_text, return_dtype=pl.String)
                      .alias("attribute_key"))
         .filter(~pl.col("attribute_key").is_in(list(TYPE_ATTRIBUTES)) & (pl.col("attribute_key") != ""))
         .unique().join(t, on="product_id"))
    ann = s.group_by("type_key", "attribute_key").agg(pl.len().alias("annotated"))
    universe = s.select("attribute_key").unique()
    if n.height == 0 or universe.height == 0:
        return None
    return (n.join(universe, how="cross").join(ann, on=["type_key", "attribute_key"], how="left")
            .with_columns(pl.col("annotated").fill_null(0))
            .with_columns(frequency=pl.col("annotated") / pl.col("products"),
                          label=pl.col("annotated") > 0))


def _scores(run: Path) -> pl.DataFrame | None:
    p = table_file(run / "graph", "attributes")
    if not p.exists():
        return None
    a = read_parquet_any(p)
    if a.height == 0:
        return None
    return (a.with_columns(pl.col("type").map_elements(norm_type, return_dtype=pl.String).alias("type_key"),
                           pl.col("attribute").map_elements(norm_text, return_dtype=pl.String)
                           .alias("attribute_key"))
            .group_by("type_key", "attribute_key")
            .agg(pl.col("applicability").max(), pl.col("applicable").any(), pl.col("importance").max()))


def _group(df: pl.DataFrame, prefix: str) -> dict:
    out = {}
    known = df.filter(pl.col("in_vocabulary"))
    if known.height:
        y = known["label"].to_numpy()
        pred = known["applicable"].to_numpy()
        tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
        out.update({f"{prefix}.{k}": v for k, v in prf(tp, fp, fn).items()})
        out[f"{prefix}.auc_pr"] = round(average_precision(y, known["applicability"].to_numpy()), 4)
        out[f"{prefix}.pairs"] = known.height
        out[f"{prefix}.positive_pairs"] = int(y.sum())
    out[f"{prefix}.types"] = df["type_key"].n_unique()
    allpos = df.filter(pl.col("label"))
    out[f"{prefix}.gold_attributes_unknown"] = int((~allpos["in_vocabulary"]).sum())
    out[f"{prefix}.recall_all_gold"] = round(float(
        (allpos["applicable"] & allpos["in_vocabulary"]).sum()) / max(1, allpos.height), 4)
    rs = []
    for _, g in known.filter(pl.col("label")).group_by("type_key"):
        if g.height >= 3:
            r = spearman(g["frequency"].to_numpy(), g["importance"].to_numpy())
            if r is not None:
                rs.append(r)
    if rs:
        out[f"{prefix}.importance_spearman"] = round(float(np.mean(rs)), 4)
        out[f"{prefix}.importance_types"] = len(rs)
    return out


def score(run: str | Path, gold: str | Path, min_products: int = MIN_GOLD_PRODUCTS) -> dict:
    run, gold = Path(run), Path(gold)
    pairs = gold_pairs(gold, min_products)
    scores = _scores(run)
    if pairs is None or scores is None:
        return {}
    vocab = set(scores["attribute_key"].to_list())
    df = (pairs.join(scores, on=["type_key", "attribute_key"], how="left")
          .with_columns(pl.col("applicability").fill_null(0.0), pl.col("applicable").fill_null(False),
                        pl.col("importance").fill_null(0.0),
                        pl.col("attribute_key").is_in(list(vocab)).alias("in_vocabulary")))
    fit = _read(gold, "fit_types")
    out = _group(df, "relations.all")
    if fit is not None:
        seen = {norm_type(t) for t in fit["type"].to_list()}
        df = df.with_columns(pl.col("type_key").is_in(list(seen)).alias("seen"))
        for name, flag in (("seen", True), ("unseen", False)):
            part = df.filter(pl.col("seen") == flag)
            if part.height:
                out.update(_group(part, f"relations.{name}"))
    return out
