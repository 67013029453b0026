"""Embedding clusters of value terms: an uncertain span takes the attribute its cluster is
dominated by, for the product's type.

Input: the per-term aggregate (type, term, attribute, n) — labelled terms are filled values and
confident tagger spans, unlabelled terms (attribute "") are spans the tagger was unsure about.
The `max_terms` most frequent terms are embedded with the packaged MiniLM and clustered with
FAISS k-means (GPU when FAISS sees one). For each (cluster, type), the labelled occurrences vote
for an attribute; where the winner holds at least `purity` of `min_support` or more votes, every
unlabelled term of that type in the cluster takes it, with the winner's share as confidence.
Runs on the driver: its input is capped in the workers (`max_term_rows`, `runtime.top_keys`),
never by products.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from autoknow_ray.index.faiss_index import gpu_available, kmeans
from autoknow_ray.modules.imputation.config import ClusterConfig
from autoknow_ray.modules.imputation.steps import UNLABELLED


def build_cluster_map(terms: pl.DataFrame, encoder, cfg: ClusterConfig, seed: int):
    """((type, term) -> (attribute, purity, cluster), stats)."""
    stats = {"terms": 0, "clusters": 0, "dominated_cluster_types": 0, "unlabelled_terms": 0,
             "terms_assigned": 0, "faiss_gpu": gpu_available()}
    if terms.height == 0:
        return {}, stats
    totals = terms.group_by("term").agg(pl.col("n").sum()).sort(["n", "term"], descending=[True, False])
    vocab = totals.head(cfg.max_terms)["term"].to_list()
    stats["terms"] = len(vocab)
    k = max(1, min(cfg.n_clusters, len(vocab) // cfg.terms_per_cluster))
    vectors = encoder.encode(vocab)
    _, assign = kmeans(vectors, k, niter=cfg.niter, seed=seed, spherical=True)
    stats["clusters"] = int(len(set(assign.tolist())))
    cluster_of = pl.DataFrame({"term": vocab, "cluster": assign.astype(np.int64)})
    t = terms.join(cluster_of, on="term", how="inner")
    votes = (t.filter(pl.col("attribute") != UNLABELLED)
             .group_by("cluster", "type", "attribute").agg(pl.col("n").sum()))
    winners = (votes.with_columns(pl.col("n").sum().over("cluster", "type").alias("support"))
               .sort(["n", "attribute"], descending=[True, False])
               .group_by("cluster", "type", maintain_order=True).first()
               .with_columns((pl.col("n") / pl.col("support")).alias("purity"))
               .filter((pl.col("support") >= cfg.min_support) & (pl.col("purity") >= cfg.purity)))
    stats["dominated_cluster_types"] = winners.height
    unlabelled = t.filter(pl.col("attribute") == UNLABELLED).select("type", "term", "cluster").unique()
    stats["unlabelled_terms"] = unlabelled.height
    assigned = unlabelled.join(winners.select("cluster", "type", "attribute", "purity"),
                               on=["cluster", "type"], how="inner")
    stats["terms_assigned"] = assigned.height
    mapping = {(ty, term): (a, float(p), int(c)) for ty, term, c, a, p in
               assigned.select("type", "term", "cluster", "attribute", "purity").iter_rows()}
    return mapping, stats
