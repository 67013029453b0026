"""Two simple cleaning rules, as runs that `autoknow eval` scores beside the cleaning module.

- `frequency`: a value is suspect when it is rare for its type — no other product of the type
  carries it for that attribute (leave-one-out counts); a type is suspect when none of the
  title's words is mostly seen on products of that type.
- `embedding`: a value is suspect when it lies far from the type's other values of the attribute
  (cosine to their leave-one-out centroid, MiniLM); a type when the title lies nearer another
  type's titles than its own type's.

Each writes RUN/graph/{triples,taxonomy}.parquet (the catalogue's facts, flagged ones `removed`)
and RUN/cleaning/scores.parquet (every fact's score, for AUC-PR). Both read the whole catalogue
in one process: they are yardsticks for evaluation-sized catalogues, not pipeline stages.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl

from autoknow_ray.eval.baselines import _graph_taxonomy, _products, read_catalogue_table
from autoknow_ray.graph.assemble import catalogue_triples
from autoknow_ray.pipeline import write_table
from autoknow_ray.schema import CLEANING_SCORES, GRAPH_TAXONOMY, HAS_TYPE, TRIPLES

WORD = re.compile(r"\w+")
MIN_GROUP = 5  # a (type, attribute) with fewer values is too small to call anything rare or far


def _facts(products: pl.DataFrame) -> pl.DataFrame:
    """The catalogue facts with each product's type beside them."""
    triples = catalogue_triples(products)
    types = products.select(pl.col("product_id").alias("subject"), pl.col("product_type").alias("type"))
    return triples.join(types, on="subject", how="left")


def _words(text: str | None) -> set[str]:
    return set(WORD.findall((text or "").lower()))


def frequency_scores(products: pl.DataFrame) -> pl.DataFrame:
    facts = _facts(products)
    values = facts.filter(pl.col("relation") != HAS_TYPE).with_columns(
        pl.col("object").str.to_lowercase().alias("_v"))
    values = values.with_columns(
        (pl.len().over("type", "relation", "_v") - 1).alias("_others"),
        pl.col("subject").n_unique().over("type", "relation").alias("_group"),
    ).with_columns(
        (1.0 / (1.0 + pl.col("_others")) * (1.0 - 1.0 / pl.col("_group"))).alias("score"),
        ((pl.col("_others") == 0) & (pl.col("_group") >= MIN_GROUP)).alias("flag"))
    # types: P(type | word) over the other products, best word of the title
    typed = products.filter(pl.col("product_type").is_not_null()).select("product_id", "title",
                                                                         "product_type")
    word_type: dict[tuple[str, str], int] = {}
    word_n: dict[str, int] = {}
    bags = []
    for pid, title, t in typed.iter_rows():
        ws = _words(title)
        bags.append((pid, t, ws))
        for w in ws:
            word_type[(w, t)] = word_type.get((w, t), 0) + 1
            word_n[w] = word_n.get(w, 0) + 1
    rows = []
    for pid, t, ws in bags:
        best = max(((word_type[(w, t)] - 1) / (word_n[w] - 1) for w in ws if word_n[w] > 1),
                   default=0.0)
        rows.append((pid, HAS_TYPE, t, 1.0 - best, best < 0.5))
    types = pl.DataFrame(rows, schema=["subject", "relation", "object", "score", "flag"], orient="row")
    return pl.concat([values.select("subject", "relation", "object", "score", "flag"), types],
                     how="vertical_relaxed")


def _loo_cosine(vectors: np.ndarray, groups: list) -> np.ndarray:
    """Cosine of each row to the mean of the other rows of its group (NaN for a lone row)."""
    out = np.full(len(vectors), np.nan, dtype=np.float32)
    by: dict = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    for idx in by.values():
        if len(idx) < 2:
            continue
        v = vectors[idx]
        total = v.sum(0)
        rest = (total[None, :] - v) / (len(idx) - 1)
        rest /= np.maximum(np.linalg.norm(rest, axis=1, keepdims=True), 1e-6)
        out[idx] = (v * rest).sum(1)
    return out


def embedding_scores(products: pl.DataFrame, encoder) -> pl.DataFrame:
    facts = _facts(products)
    values = facts.filter(pl.col("relation") != HAS_TYPE)
    texts = values["object"].to_list()
    uniq = sorted(set(texts))
    vec = encoder.encode(uniq) if uniq else np.zeros((0, 384), np.float32)
    pos = {t: i for i, t in enumerate(uniq)}
    v = vec[[pos[t] for t in texts]] if texts else vec
    groups = list(zip(values["type"].to_list(), values["relation"].to_list()))
    cos = _loo_cosine(v, groups)
    values = values.with_columns(pl.Series("_d", 1.0 - np.nan_to_num(cos, nan=0.0)),
                                 pl.len().over("type", "relation").alias("_n"))
    stats = values.group_by("type", "relation").agg(pl.col("_d").mean().alias("_m"),
                                                    pl.col("_d").std().alias("_s"))
    values = values.join(stats, on=["type", "relation"], how="left").with_columns(
        pl.col("_d").alias("score"),
        ((pl.col("_n") >= MIN_GROUP) & (pl.col("_d") > pl.col("_m") + 2 * pl.col("_s").fill_null(0))).alias("flag"))
    typed = products.filter(pl.col("product_type").is_not_null())
    rows = []
    if typed.height:
        tv = encoder.encode([t or "" for t in typed["title"].to_list()])
        types = typed["product_type"].to_list()
        names = sorted(set(types))
        tix = np.array([names.index(t) for t in types])
        sums = np.zeros((len(names), tv.shape[1]), np.float32)
        np.add.at(sums, tix, tv)
        counts = np.bincount(tix, minlength=len(names)).astype(np.float32)
        for i, (pid, t) in enumerate(zip(typed["product_id"].to_list(), types)):
            c = sums.copy()
            c[tix[i]] -= tv[i]
            n = counts.copy()
            n[tix[i]] -= 1
            ok = n > 0
            cent = c[ok] / n[ok, None]
            cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-6)
            sims = cent @ tv[i]
            own_pos = int(ok[: tix[i]].sum())
            own = sims[own_pos] if ok[tix[i]] else -1.0
            other = np.max(np.delete(sims, own_pos)) if ok[tix[i]] and len(sims) > 1 else own
            margin = float(other - own)
            rows.append((pid, HAS_TYPE, t, margin, margin > 0))
    types_df = pl.DataFrame(rows, schema=["subject", "relation", "object", "score", "flag"], orient="row")
    return pl.concat([values.select("subject", "relation", "object", "score", "flag"), types_df],
                     how="vertical_relaxed")


def run_cleaning_baseline(method: str, catalogue: str | Path, out: str | Path,
                          encoder: str = "default") -> dict:
    out = Path(out)
    products = _products(catalogue)
    if method == "frequency":
        scored = frequency_scores(products)
    elif method == "embedding":
        from autoknow_ray.nn.encoder import TextEncoder

        scored = embedding_scores(products, TextEncoder(encoder))
    else:
        raise ValueError(f"unknown cleaning baseline {method!r}; known: frequency, embedding")
    scored = scored.with_columns(pl.col("score").cast(pl.Float32), pl.col("flag").fill_null(False))
    triples = catalogue_triples(products)
    flags = scored.filter(pl.col("flag")).select("subject", "relation", "object",
                                                 pl.lit(True).alias("_f")).unique(["subject", "relation", "object"])
    triples = triples.join(flags, on=["subject", "relation", "object"], how="left").with_columns(
        pl.when(pl.col("_f")).then(pl.lit("removed")).otherwise(pl.col("status")).alias("status"),
        pl.when(pl.col("_f")).then(pl.lit(f"baseline_{method}")).otherwise(pl.col("module")).alias("module"),
    ).drop("_f")
    write_table(out / "graph" / "triples.parquet", triples, TRIPLES)
    write_table(out / "graph" / "taxonomy.parquet",
                _graph_taxonomy(read_catalogue_table(catalogue, "taxonomy")), GRAPH_TAXONOMY)
    write_table(out / "cleaning" / "scores.parquet", scored.with_columns(
        pl.lit("catalogue").alias("origin"), pl.lit(f"baseline_{method}").alias("module"),
        pl.when(pl.col("flag")).then(pl.lit("removed")).otherwise(pl.lit("kept")).alias("status")),
        CLEANING_SCORES)
    return {"method": method, "facts": triples.height, "flagged": flags.height}
