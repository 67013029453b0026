"""`runtime.bounded_sample`: a uniform sample without replacement keyed by a hash of each row's
key and the seed, the same whatever the blocks, their order or the parallelism."""
from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from autoknow_ray import runtime


def _products(n: int) -> pa.Table:
    return pa.table({"product_id": [f"p{i:04d}" for i in range(n)],
                     "title": [f"title {i}" for i in range(n)],
                     "score": [float(i % 7) for i in range(n)]})


def _global_bottom_k(t: pa.Table, cap: int, seed: int, key="product_id") -> pl.DataFrame:
    """The sample computed in one piece, without Ray."""
    got = runtime._smallest(t, runtime.row_draws(t, key, seed), cap, seed)
    return pl.from_arrow(got.drop_columns([runtime._DRAW]))


def test_bounded_sample_is_the_same_whatever_the_blocks(ray_session):
    import ray

    t = _products(400)
    slices = [t.slice(i, 37) for i in range(0, 400, 37)]  # 11 blocks
    layouts = {
        "one block": ray.data.from_arrow(t),
        "7 blocks": ray.data.from_arrow(t).repartition(7),
        "blocks reversed": ray.data.from_arrow(slices[::-1]),
        "rows shuffled": ray.data.from_arrow(t.take(pa.array(np.random.default_rng(3).permutation(400)))
                                             ).repartition(5),
    }
    want = _global_bottom_k(t, 50, 7)
    assert want.height == 50 and want.columns == ["product_id", "title", "score"]
    for name, ds in layouts.items():
        got = runtime.bounded_sample(ds, 50, seed=7, n_rows=400)
        assert got.equals(want), name  # same rows, same order, no draw column
    # more partials than the driver merges at once: tasks merge them first, to the same rows
    before = runtime.DRIVER_COMBINE_ROWS
    try:
        runtime.DRIVER_COMBINE_ROWS = 0  # groups of 4 partials: 11 blocks -> 3 tasks -> driver
        assert runtime.bounded_sample(ray.data.from_arrow(slices), 50, seed=7).equals(want)
    finally:
        runtime.DRIVER_COMBINE_ROWS = before
    other = runtime.bounded_sample(layouts["7 blocks"], 50, seed=8)
    assert other.height == 50 and set(other["product_id"]) != set(want["product_id"])
    # all rows when there are fewer than cap (in draw order); nothing for cap <= 0
    every = runtime.bounded_sample(layouts["7 blocks"], 1000, seed=7)
    assert every.height == 400 and sorted(every["product_id"]) == t.column("product_id").to_pylist()
    assert every.equals(_global_bottom_k(t, 1000, 7))
    assert runtime.bounded_sample(layouts["7 blocks"], 0, seed=7).height == 0
    assert runtime.bounded_sample(layouts["7 blocks"], -1, seed=7).height == 0
    assert runtime.bounded_sample(ray.data.from_arrow(t.slice(0, 0)), 5, seed=7).height == 0


def test_bounded_sample_keys_rows_by_columns_or_the_whole_row(ray_session):
    """Behaviour-like rows keyed by a list of columns, duplicates included, and an edge table
    without product_id (the whole row): the same sample from any blocks; an unknown key column
    is an error."""
    import ray

    rng = np.random.default_rng(0)
    n = 300
    behavior = pa.table({"query": [f"q{i}" for i in rng.integers(0, 20, n)],
                         "product_id": [f"p{i}" for i in rng.integers(0, 30, n)],
                         "action": [["view", "click", "purchase"][i] for i in rng.integers(0, 3, n)],
                         "count": rng.integers(1, 4, n).tolist()})
    key = ["query", "product_id", "action"]
    want = _global_bottom_k(behavior, 40, 1, key)
    assert want.height == 40
    for ds in (ray.data.from_arrow(behavior).repartition(6),
               ray.data.from_arrow(behavior.take(pa.array(rng.permutation(n)))).repartition(4)):
        assert runtime.bounded_sample(ds, 40, seed=1, key=key).equals(want)
    # keyed by product: every row of a drawn product shares its draw (not a row sample)
    by_product = runtime.bounded_sample(ray.data.from_arrow(behavior).repartition(3), 40, seed=1)
    assert by_product.equals(_global_bottom_k(behavior, 40, 1, "product_id"))
    edges = pa.table({"src": [f"a{i % 13}" for i in range(200)], "dst": [f"b{i}" for i in range(200)],
                      "count": [i % 5 for i in range(200)]})
    whole = runtime.bounded_sample(ray.data.from_arrow(edges).repartition(5), 30, seed=2)
    assert whole.equals(_global_bottom_k(edges, 30, 2, None)) and whole.height == 30
    with pytest.raises(Exception, match="nope"):
        runtime.bounded_sample(ray.data.from_arrow(edges), 30, seed=2, key=["src", "nope"])


def test_bounded_sample_draws_every_row_alike():
    """Over many seeds each row is drawn about cap/n of the time: the first block's rows no more
    than the last block's (a sample that kept the first rows to arrive would fail this). The
    draws and the per-block bottom-k merge run here without Ray; the Ray path gives the same
    rows (the tests above)."""
    n, cap, seeds, block = 200, 20, 300, 50
    t = _products(n)
    hits = np.zeros(n)
    for seed in range(seeds):
        parts = [runtime._sample_block(t.slice(i, block), cap, seed, "product_id")
                 for i in range(0, n, block)]
        got = runtime._merge_samples(cap, seed, *parts)
        assert got.num_rows == cap
        hits[[int(p[1:]) for p in got.column("product_id").to_pylist()]] += 1
    freq = hits / seeds
    assert abs(freq.mean() - cap / n) < 1e-12
    assert abs(freq[:block].mean() - freq[-block:].mean()) < 0.02, (freq[:block].mean(), freq[-block:].mean())
    assert freq.min() > 0.02 and freq.max() < 0.2, (freq.min(), freq.max())
