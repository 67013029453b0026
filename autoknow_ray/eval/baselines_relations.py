"""The frequency-threshold baseline for relation discovery, scored by `autoknow eval` beside a run.

An attribute applies to a type when at least `threshold` of the type's products mention one of
the attribute's known values (taken from a training catalogue's structured attributes) in their
title, description or bullets; the rate itself is both the applicability and the importance.
It writes RUN/graph/attributes.parquet (plus empty triples and the catalogue's taxonomy, so that
`autoknow eval` reads it like any run).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import polars as pl

from autoknow_ray.eval.baselines import _graph_taxonomy, _products, read_catalogue_table
from autoknow_ray.pipeline import write_table
from autoknow_ray.schema import GRAPH_ATTRIBUTES, GRAPH_TAXONOMY, TRIPLES

DEFAULT_THRESHOLD = 0.1
VALUES_PER_ATTRIBUTE = 200


def _value_patterns(train: pl.DataFrame) -> dict[str, re.Pattern]:
    counts: dict[str, Counter] = {}
    for attrs in train["attributes"].to_list():
        for a in attrs or []:
            if a and a.get("name") and a.get("value") and len(a["value"].strip()) > 1:
                counts.setdefault(a["name"], Counter())[a["value"].strip().casefold()] += 1
    pats = {}
    for name, c in sorted(counts.items()):
        vals = [v for v, _ in c.most_common(VALUES_PER_ATTRIBUTE)]
        vals.sort(key=len, reverse=True)
        pats[name] = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(v) for v in vals) + r")(?!\w)")
    return pats


def run_frequency(train: str | Path, catalogue: str | Path, out: str | Path,
                  threshold: float = DEFAULT_THRESHOLD) -> dict:
    if not 0 < threshold < 1:
        raise ValueError(f"--threshold must be in (0, 1), got {threshold}")
    out = Path(out)
    pats = _value_patterns(_products(train))
    if not pats:
        raise ValueError(f"{train}: no structured attribute values to learn a vocabulary from")
    prods = _products(catalogue).filter(pl.col("product_type").is_not_null())
    texts = prods.select(
        "product_type",
        pl.concat_str([pl.col("title").fill_null(""), pl.col("description").fill_null(""),
                       pl.col("bullets").list.join(" ").fill_null("")], separator=" \n ")
        .str.to_lowercase().alias("text"))
    hits = texts.with_columns([pl.col("text").map_elements(lambda s, p=p: p.search(s) is not None,
                                                           return_dtype=pl.Boolean).alias(a)
                               for a, p in pats.items()])
    rates = (hits.group_by("product_type").agg([pl.col(a).mean() for a in pats])
             .unpivot(index="product_type", variable_name="attribute", value_name="applicability")
             .rename({"product_type": "type"})
             .with_columns(pl.col("applicability").cast(pl.Float32),
                           (pl.col("applicability") >= threshold).alias("applicable"),
                           pl.col("applicability").cast(pl.Float32).alias("importance")))
    rates = rates.with_columns(
        pl.struct(pl.col("applicable").not_(), -pl.col("importance"), "attribute")
        .rank("ordinal").over("type").cast(pl.Int32).alias("rank"))
    graph = out / "graph"
    write_table(graph / "attributes.parquet", rates, GRAPH_ATTRIBUTES)
    write_table(graph / "triples.parquet", TRIPLES.empty_table(), TRIPLES)
    write_table(graph / "taxonomy.parquet",
                _graph_taxonomy(read_catalogue_table(catalogue, "taxonomy")), GRAPH_TAXONOMY)
    summary = {"method": "relations-frequency", "threshold": threshold, "attributes": len(pats),
               "types": rates["type"].n_unique(), "pairs": rates.height,
               "applicable_pairs": int(rates["applicable"].sum())}
    (out / "baseline.json").write_text(json.dumps(summary, indent=2))
    return summary
