"""Candidate pairs, never all pairs: embedding neighbours (FAISS) and shared behaviour.

Both work on the per-term vocabulary (capped by the config), one (kind, attribute) group at a
time: a type is only compared with types, a Color value only with Color values.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from autoknow_ray.index.faiss_index import VectorIndex

PAIR_KEY = ["kind", "attribute", "term_a", "term_b"]


def knn_pairs(vocab: pl.DataFrame, vectors: np.ndarray, k: int, min_cosine: float,
              ivf_min_size: int, seed: int = 0) -> pl.DataFrame:
    """vocab: kind, attribute, term (row i has vectors[i], L2-normalised). Each term's k nearest
    terms of its group with cosine >= min_cosine, as (kind, attribute, term_a, term_b, cosine)
    with term_a < term_b."""
    rows = {"kind": [], "attribute": [], "term_a": [], "term_b": [], "cosine": []}
    idx = vocab.with_row_index("_i")
    for (kind, attr), g in idx.group_by(["kind", "attribute"], maintain_order=True):
        if g.height < 2:
            continue
        ids = g["_i"].to_numpy()
        terms = g["term"].to_list()
        index = VectorIndex("ip", ivf_min_size=ivf_min_size, seed=seed).build(vectors[ids])
        scores, nn = index.search(vectors[ids], min(k + 1, g.height))
        for i in range(len(ids)):
            for s, j in zip(scores[i], nn[i]):
                if j < 0 or j == i or s < min_cosine:
                    continue
                a, b = terms[i], terms[j]
                if a == b:
                    continue
                a, b = (a, b) if a < b else (b, a)
                rows["kind"].append(kind)
                rows["attribute"].append(attr)
                rows["term_a"].append(a)
                rows["term_b"].append(b)
                rows["cosine"].append(float(s))
    df = pl.DataFrame(rows, schema={"kind": pl.String, "attribute": pl.String, "term_a": pl.String,
                                    "term_b": pl.String, "cosine": pl.Float32})
    return df.unique(PAIR_KEY, keep="first", maintain_order=True)


def behaviour_pairs(term_contexts: pl.DataFrame, max_terms_per_context: int,
                    min_shared: int, max_pairs: int) -> pl.DataFrame:
    """term_contexts: kind, attribute, term, context, n (per (term, context) counts, from a Ray
    Data aggregation). Pairs of terms of one group seen under the same contexts (a query, or the
    basket of one product), with the number of shared contexts. A context keeps its
    `max_terms_per_context` most frequent terms, so a broad query cannot make a quadratic pair
    list."""
    empty = pl.DataFrame(schema={"kind": pl.String, "attribute": pl.String, "term_a": pl.String,
                                 "term_b": pl.String, "shared": pl.Int64})
    if term_contexts.height == 0 or max_pairs == 0:
        return empty
    top = (term_contexts.sort("n", descending=True)
           .with_columns(pl.int_range(pl.len()).over(["kind", "attribute", "context"]).alias("_r"))
           .filter(pl.col("_r") < max_terms_per_context).drop("_r", "n"))
    pairs = (top.join(top, on=["kind", "attribute", "context"], suffix="_b")
             .filter(pl.col("term") < pl.col("term_b"))
             .group_by(["kind", "attribute", "term", "term_b"])
             .agg(pl.len().cast(pl.Int64).alias("shared"))
             .filter(pl.col("shared") >= min_shared)
             .rename({"term": "term_a"})
             .sort(["shared", "kind", "attribute", "term_a", "term_b"],
                   descending=[True, False, False, False, False])
             .head(max_pairs))
    return pairs.select(empty.columns)


def _context_pairs(block, max_terms_per_context: int):
    """One key partition of (kind, attribute, context) -> its term pairs (kind, attribute,
    term_a, term_b), one row per shared context: `behaviour_pairs`' self-join, in a worker. A
    context keeps its `max_terms_per_context` most frequent terms (ties by term)."""
    import pyarrow as pa

    df = pl.from_arrow(block).select("kind", "attribute", "term", "context", "n")
    top = (df.sort(["kind", "attribute", "context", "n", "term"],
                   descending=[False, False, False, True, False], nulls_last=True)
           .with_columns(pl.int_range(pl.len()).over(["kind", "attribute", "context"]).alias("_r"))
           .filter(pl.col("_r") < max_terms_per_context).drop("_r", "n"))
    pairs = (top.join(top, on=["kind", "attribute", "context"], suffix="_b")
             .filter(pl.col("term") < pl.col("term_b"))
             .select("kind", "attribute", pl.col("term").alias("term_a"), pl.col("term_b")))
    return pairs.to_arrow().cast(pa.schema([(c, pa.string()) for c in PAIR_KEY]))


def behaviour_pairs_in_workers(term_contexts: pl.DataFrame, max_terms_per_context: int,
                               min_shared: int, max_pairs: int, rows_hint: int | None = None) -> pl.DataFrame:
    """`behaviour_pairs`, with its self-join and pair counts in the workers: the contexts are
    partitioned by (kind, attribute, context), each partition's pairs made there
    (`_context_pairs`), and the pairs counted and capped by `runtime.top_keys` (the `max_pairs`
    with most shared contexts, ties by key; pairs under `min_shared` left out), so the driver
    holds the `max_pairs` rows it returns, not every pair of every context."""
    import ray

    from autoknow_ray import runtime

    empty = pl.DataFrame(schema={"kind": pl.String, "attribute": pl.String, "term_a": pl.String,
                                 "term_b": pl.String, "shared": pl.Int64})
    if term_contexts.height == 0 or max_pairs == 0:
        return empty
    ds = ray.data.from_arrow(term_contexts.select("kind", "attribute", "term", "context", "n").to_arrow())
    pairs = runtime.map_key_blocks(ds, ["kind", "attribute", "context"], _context_pairs,
                                   fn_args=(max_terms_per_context,), n_rows=term_contexts.height,
                                   small_rows=runtime.NARROW_SMALL_ROWS)
    top = runtime.top_keys(pairs, PAIR_KEY, {"shared": ("count", None)}, cap=max_pairs,
                           order_by=[("shared", "desc")],
                           drop={"below_min_shared": pl.col("shared") < min_shared})
    if top.rows.height == 0:
        return empty
    return top.rows.select(empty.columns).cast(empty.schema).sort(
        ["shared", "kind", "attribute", "term_a", "term_b"], descending=[True, False, False, False, False])


def cosine_of(pairs: pl.DataFrame, vocab: pl.DataFrame, vectors: np.ndarray) -> np.ndarray:
    """Embedding cosine of each (term_a, term_b) pair of one group."""
    pos = {(k, a, t): i for i, (k, a, t) in enumerate(vocab.select("kind", "attribute", "term").iter_rows())}
    out = np.zeros(pairs.height, dtype=np.float32)
    for r, (k, a, x, y) in enumerate(pairs.select(PAIR_KEY).iter_rows()):
        i, j = pos.get((k, a, x)), pos.get((k, a, y))
        if i is not None and j is not None:
            out[r] = float(vectors[i] @ vectors[j])
    return out
