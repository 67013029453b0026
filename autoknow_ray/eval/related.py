"""Related products against held-out co-purchases (gold/copurchase: src, dst, count).

Read from RUN/graph/related (a file or a folder of shards) alone, as a user of the graph would:
- hit rate @k: the share of held-out pairs A -> B whose B is in A's top k;
- MRR @k: the mean of 1/rank of B in A's list (0 beyond k);
- source hit @k: the share of source products with at least one of their held-out B in their
  top k (a shopper's view: did the list show anything they bought);
- asymmetry: for one-way held-out pairs (A -> B held out, B -> A not), how often B ranks for A
  above A for B (a product missing from a list ranks below every listed one; pairs where
  neither appears are left out and counted apart).
Pairs whose source product has no list count as misses (coverage says how many had one).
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from autoknow_ray.pipeline import read_parquet_any, table_file

KS = (5, 10, 20)


def score(run: Path, gold: Path) -> dict:
    run, gold = Path(run), Path(gold)
    gpath = table_file(gold, "copurchase")
    rpath = table_file(run / "graph", "related")
    if not gpath.exists() or not rpath.exists():
        return {}
    held = read_parquet_any(gpath, ["src", "dst"]).unique()
    if held.height == 0:
        return {}
    ranked = read_parquet_any(rpath, ["product_id", "related_id", "rank"])
    if ranked.height == 0:
        ranked = pl.DataFrame(schema={"product_id": pl.String, "related_id": pl.String, "rank": pl.Int32})
    ranked = ranked.group_by("product_id", "related_id").agg(pl.col("rank").min())
    hits = held.join(ranked, left_on=["src", "dst"], right_on=["product_id", "related_id"], how="left")
    out = {"related.pairs": held.height,
           "related.coverage": round(held["src"].is_in(ranked["product_id"].unique().implode()).mean(), 4)}
    rank = hits["rank"]
    for k in KS:
        within = rank.fill_null(10**9) <= k
        out[f"related.hr@{k}"] = round(float(within.mean()), 4)
        out[f"related.mrr@{k}"] = round(float((within.cast(pl.Float64) / rank.fill_null(1).cast(pl.Float64)).mean()), 4)
        per_source = hits.with_columns(_hit=within).group_by("src").agg(pl.col("_hit").any())
        out[f"related.source_hit@{k}"] = round(float(per_source["_hit"].mean()), 4)
    out["related.sources"] = int(held["src"].n_unique())
    reverse = held.select(src="dst", dst="src").with_columns(pl.lit(True).alias("_rev"))
    one_way = held.join(reverse, on=["src", "dst"], how="left").filter(pl.col("_rev").is_null())
    fwd = one_way.join(ranked, left_on=["src", "dst"], right_on=["product_id", "related_id"], how="left") \
        .rename({"rank": "fwd"})
    both = fwd.join(ranked, left_on=["dst", "src"], right_on=["product_id", "related_id"], how="left") \
        .rename({"rank": "rev"})
    seen = both.filter(pl.col("fwd").is_not_null() | pl.col("rev").is_not_null())
    wins = seen.filter(pl.col("fwd").fill_null(10**9) < pl.col("rev").fill_null(10**9)).height
    out["related.asymmetry.one_way_pairs"] = one_way.height
    out["related.asymmetry.pairs_ranked"] = seen.height
    out["related.asymmetry.forward_above_reverse"] = round(wins / seen.height, 4) if seen.height else None
    return {k: v for k, v in out.items() if v is not None}
