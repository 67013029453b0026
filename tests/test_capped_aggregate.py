"""`runtime.top_keys`: keyed aggregation capped in the workers, checked against polars on the
whole table (exact under the cap; the same top-N, ties by key, over it), whatever the blocks."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from autoknow_ray import runtime

BY = ["group", "term"]


def _table(rows: int = 3000, seed: int = 7) -> pl.DataFrame:
    """Keys with many equal counts (a cap cuts through ties), a null key value, a value column."""
    rng = np.random.default_rng(seed)
    groups = rng.choice(["a", "b", "c", None], size=rows, p=[0.5, 0.3, 0.15, 0.05])
    terms = [f"t{int(x):03d}" for x in rng.zipf(1.6, size=rows) % 400]
    terms = [None if i % 97 == 0 else t for i, t in enumerate(terms)]
    return pl.DataFrame({"group": groups.tolist(), "term": terms,
                         "v": rng.integers(0, 10, size=rows).astype(np.int64)},
                        schema={"group": pl.String, "term": pl.String, "v": pl.Int64})


def _whole(df: pl.DataFrame) -> pl.DataFrame:
    return df.group_by(BY).agg(pl.len().cast(pl.Int64).alias("n"), pl.col("v").sum().alias("s"),
                               pl.col("v").mean().alias("m"))


def _top(whole: pl.DataFrame, cap: int, per_group: int | None = None) -> pl.DataFrame:
    """The reference: rank by n descending, then the keys ascending (nulls last), per-group cap,
    then the first `cap`."""
    ranked = whole.sort(["n", "group", "term"], descending=[True, False, False], nulls_last=True)
    if per_group is not None:
        ranked = (ranked.with_row_index("_i").with_columns(
            pl.col("_i").rank("ordinal").over("group").alias("_r"))
            .filter(pl.col("_r") <= per_group).sort("_i").drop("_i", "_r"))
    return ranked.head(cap)


def _cut_in_a_tie(ranked: pl.DataFrame, at_least: int) -> int:
    """The first cap from `at_least` on that cuts between two keys of equal count."""
    n = ranked["n"].to_list()
    return next(i for i in range(at_least, len(n)) if n[i - 1] == n[i])


def _dataset(df: pl.DataFrame, blocks: int, reverse: bool = False):
    import ray.data

    table = (df.reverse() if reverse else df).to_arrow()
    return ray.data.from_arrow(table).repartition(blocks)


AGGS = {"n": ("count", None), "s": ("sum", "v"), "m": ("mean", "v")}
ORDER = [("n", "desc")]


def _same(got: pl.DataFrame, want: pl.DataFrame) -> None:
    """Same rows in the same order (means compared to 1e-9)."""
    assert got.columns == want.columns
    assert got.select(BY + ["n", "s"]).rows() == want.select(BY + ["n", "s"]).rows()
    assert np.allclose(got["m"].to_numpy(), want["m"].to_numpy(), rtol=0, atol=1e-9)


def test_under_the_cap_every_key_equals_polars_on_the_whole_table(ray_session):
    df = _table()
    whole = _whole(df)
    got = runtime.top_keys(_dataset(df, 4), BY, AGGS, cap=10_000, order_by=ORDER)
    assert got.keys == whole.height and got.left_out == 0 and not got.truncated
    _same(got.rows, _top(whole, whole.height))


def test_over_the_cap_the_top_n_by_count_ties_by_key_and_the_count_left_out(ray_session):
    df = _table()
    whole = _whole(df)
    # the cap cuts through keys of equal count: arrival order would decide without the key rule
    cap = _cut_in_a_tie(_top(whole, whole.height), 20)
    want = _top(whole, cap)
    got = runtime.top_keys(_dataset(df, 3), BY, AGGS, cap=cap, order_by=ORDER)
    _same(got.rows, want)
    assert got.keys == whole.height
    assert got.left_out == whole.height - cap and got.truncated


def test_the_same_answer_whatever_the_blocks_their_order_or_the_combine_path(ray_session):
    """Driver-combined partials and the workers' groupby with two-level merges (more capped
    blocks than one merge takes), over 1, 5 and 11 blocks, rows forwards and backwards."""
    df = _table(rows=4000, seed=11)
    whole = _whole(df)
    per_group = 15
    # the per-group cap and the total cap both cut, through ties
    assert whole.group_by("group").len()["len"].max() > per_group
    cap = _cut_in_a_tie(_top(whole, whole.height, per_group), 30)
    want = _top(whole, cap, per_group)
    for blocks, reverse in ((1, False), (5, True), (11, False)):
        got = runtime.top_keys(_dataset(df, blocks, reverse), BY, AGGS, cap=cap, order_by=ORDER,
                               per_group=(["group"], per_group))
        _same(got.rows, want)
        assert got.left_out == whole.height - want.height
    for blocks, reverse in ((5, False), (11, True)):
        got = runtime.top_keys(_dataset(df, blocks, reverse), BY, AGGS, cap=cap, order_by=ORDER,
                               per_group=(["group"], per_group), driver_rows=0,
                               num_partitions=6, merge_group=2)
        _same(got.rows, want)
        assert got.keys == whole.height
        assert got.left_out == whole.height - want.height


def test_dropped_keys_are_counted_per_reason_before_the_cap(ray_session):
    df = _table(rows=2000, seed=3)
    whole = _whole(df)
    drop = {"no_term": pl.col("term").is_null(), "rare": pl.col("n") < 2}
    no_term = whole.filter(pl.col("term").is_null()).height
    rare = whole.filter(pl.col("term").is_not_null() & (pl.col("n") < 2)).height
    assert no_term and rare
    kept = whole.filter(pl.col("term").is_not_null() & (pl.col("n") >= 2))
    cap = _cut_in_a_tie(_top(kept, kept.height), 10)
    want = _top(kept, cap)
    for kw in ({}, {"driver_rows": 0, "num_partitions": 3, "merge_group": 2}):
        got = runtime.top_keys(_dataset(df, 4), BY, AGGS, cap=cap, order_by=ORDER, drop=drop, **kw)
        assert got.dropped == {"no_term": no_term, "rare": rare}
        assert got.keys == whole.height
        assert got.left_out == kept.height - cap
        _same(got.rows, want)


def test_an_empty_table_and_a_function_without_partials(ray_session):
    import ray.data

    empty = ray.data.from_arrow(_table(rows=10).head(0).to_arrow())
    got = runtime.top_keys(empty, BY, {"n": ("count", None)}, cap=5, order_by=ORDER)
    assert (got.rows.height, got.keys, got.left_out) == (0, 0, 0)
    with pytest.raises(ValueError, match="no partial form"):
        runtime.top_keys(empty, BY, {"u": ("unique", "v")}, cap=5, order_by=ORDER)
