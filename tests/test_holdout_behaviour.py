"""New listings for judging related products (`autoknow holdout-behaviour`) and the counting
baselines a new listing is judged against (popularity, the type's own co-purchases), on a small
catalogue whose answers are known: phones are bought with cases, never the other way, and two
best-sellers are bought with everything."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from autoknow_ray.catalogue.holdout_behaviour import holdout_behaviour
from autoknow_ray.eval import related as related_eval
from autoknow_ray.eval.baselines_related import (
    run_copurchase,
    run_popularity,
    run_type_copurchase,
)
from autoknow_ray.pipeline import read_parquet_any, write_table
from autoknow_ray.schema import BEHAVIOR, COPURCHASE, PRODUCTS


def _catalogue(path, seed=0):
    rng = np.random.default_rng(seed)
    phones = [f"phone-{i:02d}" for i in range(30)]
    cases = [f"case-{i:02d}" for i in range(30)]
    laptops = [f"laptop-{i:02d}" for i in range(20)]
    bags = [f"bag-{i:02d}" for i in range(10)]
    best = ["gift-card", "usb-cable"]
    products = pl.DataFrame({
        "product_id": phones + cases + laptops + bags + best,
        "title": [f"Phone model {i}" for i in range(30)] + [f"Phone case {i}" for i in range(30)]
        + [f"Laptop {i}" for i in range(20)] + [f"Laptop bag {i}" for i in range(10)]
        + ["Gift card", "USB cable"],
        "product_type": ["Phone"] * 30 + ["Phone Case"] * 30 + ["Laptop"] * 20 + ["Laptop Bag"] * 10
        + ["Gift Card", "Cable"],
    })
    rows = []
    w = 1.0 / np.arange(1, 31)
    for p in phones:  # each phone bought with 4 cases, drawn by a Zipf law (best-selling cases)
        for c in rng.choice(cases, size=4, replace=False, p=w / w.sum()):
            rows.append((p, str(c), int(rng.integers(1, 4))))
    for p in laptops:  # laptops with bags, more often than phones with cases
        for c in rng.choice(bags, size=4, replace=False, p=w[:10] / w[:10].sum()):
            rows.append((p, str(c), int(rng.integers(4, 7))))
    for p in phones + cases:  # the best-sellers go with everything, more often than any case
        for b in best:
            rows.append((p, b, 6))
    rows.append(("phone-00", None, 1))  # malformed: no product bought; kept for ingest to quarantine
    cp = pl.DataFrame(rows, schema={"src": pl.String, "dst": pl.String, "count": pl.Int64}, orient="row")
    behaviour = pl.DataFrame({"query": ["phone"] * 30 + ["case"] * 30, "product_id": phones + cases,
                              "action": ["view"] * 60, "count": [1] * 60})  # queries: phones, cases
    write_table(path / "products.parquet", products, PRODUCTS)
    write_table(path / "copurchase.parquet", cp, COPURCHASE)
    write_table(path / "behavior.parquet", behaviour, BEHAVIOR)
    write_table(path / "gold" / "copurchase.parquet",
                pl.DataFrame({"src": ["phone-00", "case-00"], "dst": ["case-29", "gift-card"], "count": [1, 1]}),
                COPURCHASE)
    (path / "taxonomy.parquet").write_bytes(b"")  # any other table is copied as it is
    return products, cp


def test_new_listings_lose_every_behaviour_row_and_their_purchases_become_gold(tmp_path):
    _products, cp = _catalogue(tmp_path / "cat")
    s = holdout_behaviour(tmp_path / "cat", tmp_path / "new", products=8, seed=1)
    withheld = json.loads((tmp_path / "new" / "gold" / "holdout_behaviour.json").read_text())["withheld"]
    assert len(withheld) == 8 == s["withheld_products"]
    kept = read_parquet_any(tmp_path / "new" / "copurchase.parquet")
    assert not kept.filter(pl.col("src").is_in(withheld) | pl.col("dst").is_in(withheld)).height
    assert kept.height + s["copurchase_rows_removed"] == cp.height  # no row lost
    assert kept.filter(pl.col("dst").is_null()).height == 1
    assert kept.height == cp.filter(~(pl.col("src").is_in(withheld) | pl.col("dst").is_in(withheld)).fill_null(False)).height
    bh = read_parquet_any(tmp_path / "new" / "behavior.parquet")
    assert not bh.filter(pl.col("product_id").is_in(withheld)).height and bh.height == 60 - s["behavior_rows_removed"]
    gold = read_parquet_any(tmp_path / "new" / "gold" / "copurchase.parquet")
    assert set(gold["src"].to_list()) == set(withheld)
    # gold: what each withheld product was bought with, from the catalogue and the old gold
    want = (pl.concat([cp, pl.DataFrame({"src": ["phone-00"], "dst": ["case-29"], "count": [1]})])
            .filter(pl.col("src").is_in(withheld)).group_by("src", "dst").agg(pl.col("count").sum()))
    assert gold.sort("src", "dst").equals(want.sort("src", "dst").select(gold.columns))
    assert (tmp_path / "new" / "taxonomy.parquet").exists()
    # the same draw for the same seed; another seed draws others
    again = holdout_behaviour(tmp_path / "cat", tmp_path / "again", products=8, seed=1)
    assert again == {**s, "out": str(tmp_path / "again")}
    other = json.loads((tmp_path / "new" / "gold" / "holdout_behaviour.json").read_text())
    holdout_behaviour(tmp_path / "cat", tmp_path / "other", products=8, seed=2)
    assert json.loads((tmp_path / "other" / "gold" / "holdout_behaviour.json").read_text())["withheld"] != other["withheld"]


def test_holdout_behaviour_refuses_unclear_requests(tmp_path):
    _catalogue(tmp_path / "cat")
    with pytest.raises(ValueError, match="one of"):
        holdout_behaviour(tmp_path / "cat", tmp_path / "x", fraction=0.1, products=3)
    with pytest.raises(ValueError, match="only"):
        holdout_behaviour(tmp_path / "cat", tmp_path / "x", products=1000)
    with pytest.raises(ValueError, match="differ"):
        holdout_behaviour(tmp_path / "cat", tmp_path / "cat", products=3)


def test_a_types_own_copurchases_beat_popularity_for_new_listings(tmp_path):
    """New listings (every behaviour row withheld; phones and laptops have 5 co-purchase rows or
    more) ask for what they were bought with: cases or bags, and the best-sellers. Co-purchase
    counts know nothing of them; popularity answers the best-sellers and the laptop bags (bought
    more often than cases) to every product; the type's own co-purchases answer each type's."""
    _catalogue(tmp_path / "cat")
    products = read_parquet_any(tmp_path / "cat" / "products.parquet")
    sources = products.filter(pl.col("product_type").is_in(["Phone", "Laptop"]))["product_id"].to_list()
    holdout_behaviour(tmp_path / "cat", tmp_path / "new", products=12, seed=0, min_pairs=5)
    gold = read_parquet_any(tmp_path / "new" / "gold" / "copurchase.parquet")
    assert set(gold["src"].to_list()) <= set(sources)
    assert gold["src"].str.starts_with("phone").any()
    scores = {}
    for name, run in (("copurchase", run_copurchase), ("popularity", run_popularity),
                      ("type", run_type_copurchase)):
        run(tmp_path / "new", tmp_path / name, top_k=5)
        scores[name] = related_eval.score(tmp_path / name, tmp_path / "new" / "gold")
    assert scores["copurchase"]["related.coverage"] == 0.0 and scores["copurchase"]["related.hr@5"] == 0.0
    assert scores["popularity"]["related.coverage"] == 1.0
    print({k: v.get("related.hr@5") for k, v in scores.items()})
    assert scores["type"]["related.hr@5"] >= scores["popularity"]["related.hr@5"] + 0.1
    # a product never lists itself; a list holds at most top_k
    lists = read_parquet_any(tmp_path / "type" / "graph" / "related.parquet")
    assert not lists.filter(pl.col("product_id") == pl.col("related_id")).height
    assert lists.group_by("product_id").len()["len"].max() <= 5
