"""Keyed passes written over a whole key partition (`runtime.map_key_blocks`) give what the
per-group functions they replace gave, group by group (a Python call per group cost about a
millisecond: 21 s for one pass over 20,000 products)."""
from __future__ import annotations

import random

import polars as pl
import pyarrow as pa

from autoknow_ray import runtime
from autoknow_ray.runtime import _sorted_key_block, key_order
from autoknow_ray.schema import conform


def _per_group(table: pa.Table, fn, keys: list[str], *args) -> pa.Table:
    """The reference: `fn` once per group, as map_groups calls it, over rows in `key_order`."""
    from ray.data.grouped_data import _apply_udf_to_groups

    parts = list(_apply_udf_to_groups(fn, key_order(table, keys), keys, "pyarrow", *args))
    return pa.concat_tables(parts, promote_options="permissive")


def test_a_partitions_rows_come_in_one_order_whatever_order_they_arrived_in():
    """A hash shuffle's reduce concatenates blocks as they arrive: a pass that keeps a key's
    first rows (imputation's capped customer texts) or lists them gives the same result for
    every arrival order, and every key's rows stay together in key order."""
    from autoknow_ray.modules.imputation.stage import _customer_texts

    rng = random.Random(5)
    texts = pa.Table.from_pylist([{"product_id": rng.choice([None, "a", "b", "c"]),
                                   "kind": rng.choice(["review", "qa"]), "text": f"t{i}"}
                                  for i in range(60)])
    first = _sorted_key_block(texts, _customer_texts, ["product_id"], (3,))
    for _ in range(5):
        order = list(range(texts.num_rows))
        rng.shuffle(order)
        assert _sorted_key_block(texts.take(pa.array(order)), _customer_texts, ["product_id"],
                                 (3,)).equals(first)
    assert first.column("product_id").to_pylist() == ["a", "b", "c", None]
    # nested columns are carried, not sorted on; the keys and sortable columns order the rows
    nested = texts.append_column("tags", pa.array([[i] for i in range(60)]))
    got = key_order(nested, ["product_id"])
    assert got.column("tags").type == pa.list_(pa.int64()) and got.num_rows == 60
    assert got.select(["product_id", "kind", "text"]).equals(
        key_order(texts, ["product_id"]).select(["product_id", "kind", "text"]))


def _rows(t: pa.Table, ordered: bool = True) -> list:
    rows = pl.from_arrow(t).rows()
    return rows if ordered else sorted(rows, key=repr)


def _occurrences(seed: int = 0) -> pa.Table:
    rng = random.Random(seed)
    ids = [None] + [f"p{i:03d}" for i in range(40)]
    rows = []
    for _ in range(400):
        rows.append({"product_id": rng.choice(ids), "kind": "value", "attribute": rng.choice("ab"),
                     "relation": rng.choice(["color", "brand", None]),
                     "term": rng.choice(["red", "blue", "acme", None]), "retracted": None})
    for _ in range(60):  # retracted facts, some of them matching a live occurrence
        rows.append({"product_id": rng.choice(ids), "kind": None, "attribute": None,
                     "relation": rng.choice(["color", "brand"]), "term": rng.choice(["red", "acme"]),
                     "retracted": True})
    rng.shuffle(rows)
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("product_id", pa.string()), ("kind", pa.string()), ("attribute", pa.string()),
        ("relation", pa.string()), ("term", pa.string()), ("retracted", pa.bool_())]))


def test_synonyms_retractions_per_partition_equal_per_product():
    from autoknow_ray.modules.synonyms.stage import _drop_retracted
    from autoknow_ray.modules.synonyms.steps import OCCURRENCE

    def reference(group):
        df = pl.from_arrow(group)
        gone = df.filter(pl.col("retracted").fill_null(False)).select("relation", "term")
        live = df.filter(~pl.col("retracted").fill_null(False)).join(
            gone, on=["relation", "term"], how="anti")
        return conform(live.drop("retracted").to_arrow(), OCCURRENCE)

    occ = _occurrences()
    want = _per_group(occ, reference, ["product_id"])
    got = _sorted_key_block(occ, _drop_retracted, ["product_id"], ())
    assert got.schema == want.schema
    assert _rows(got) == _rows(want)  # the same rows, in the same order
    assert 0 < got.num_rows < occ.num_rows - 60  # retractions removed live rows


def test_synonyms_terms_in_contexts_and_duplicate_titles_per_partition_equal_per_group():
    from autoknow_ray.modules.synonyms.stage import (
        TERM_CONTEXT, _duplicate_titles, _terms_in_contexts)

    def reference_tc(group):
        df = pl.from_arrow(group)
        terms = df.filter(pl.col("term").is_not_null()).select("kind", "attribute", "term").unique()
        contexts = df.filter(pl.col("context").is_not_null()).select("context").unique()
        return conform(terms.join(contexts, how="cross").to_arrow(), TERM_CONTEXT)

    rng = random.Random(1)
    ids = [None] + [f"p{i}" for i in range(25)]
    rows = [{"product_id": rng.choice(ids), "kind": "value", "attribute": "a",
             "term": rng.choice(["x", "y", "z"]), "context": None} for _ in range(120)]
    rows += [{"product_id": rng.choice(ids), "kind": None, "attribute": None, "term": None,
              "context": rng.choice(["q:1", "q:2", "p:p3"])} for _ in range(150)]
    rng.shuffle(rows)
    table = pa.Table.from_pylist(rows)
    want = _per_group(table, reference_tc, ["product_id"])
    got = _sorted_key_block(table, _terms_in_contexts, ["product_id"], ())
    assert got.num_rows > 0
    assert _rows(got, ordered=False) == _rows(want, ordered=False)

    def reference_dup(group, max_products):
        key = group.column("title_key")[0].as_py()
        if not key or not 2 <= group.num_rows <= max_products:
            group = group.slice(0, 0)
        n = group.num_rows
        return pa.table({"product_id": group.column("product_id"), "kind": pa.nulls(n, pa.string()),
                         "attribute": pa.nulls(n, pa.string()), "term": pa.nulls(n, pa.string()),
                         "context": pa.array([f"t:{key}"] * n, pa.string())})

    keys = pa.table({"product_id": [f"p{i}" for i in range(30)],
                     "title_key": [rng.choice(["a b", "c", "", None] + [f"u{i}"]) for i in range(30)]})
    want = _per_group(keys, reference_dup, ["title_key"], 4)
    got = _sorted_key_block(keys, _duplicate_titles, ["title_key"], (4,))
    assert _rows(got) == _rows(want)


def test_imputation_and_cleaning_lists_per_partition_equal_per_product():
    from autoknow_ray.modules.cleaning.stage import _collect_edits
    from autoknow_ray.modules.imputation.stage import _customer_texts, _upstream_lists

    rng = random.Random(2)
    texts = pa.Table.from_pylist([{"product_id": rng.choice([None, "a", "b", "c", "d"]),
                                   "kind": rng.choice(["review", "qa"]), "text": f"t{i}"}
                                  for i in range(50)])

    def reference_texts(group, cap):
        kinds = group.column("kind").to_pylist()
        texts = group.column("text").to_pylist()
        return pa.table({"product_id": [group.column("product_id")[0].as_py()],
                         "customer_kinds": [kinds[:cap]], "customer_texts": [texts[:cap]],
                         "customer_texts_dropped": [max(0, len(texts) - cap)]})

    want = _per_group(texts, reference_texts, ["product_id"], 3)
    got = _sorted_key_block(texts, _customer_texts, ["product_id"], (3,))
    assert _rows(got) == _rows(want)
    assert max(got.column("customer_texts_dropped").to_pylist()) > 0

    items = pa.Table.from_pylist([{"product_id": rng.choice(["a", "b", "c"]), "item": f"i{i}"}
                                  for i in range(20)])
    want = _per_group(items, lambda g: pa.table({"product_id": [g.column("product_id")[0].as_py()],
                                                 "upstream": [g.column("item").to_pylist()]}),
                      ["product_id"])
    assert _rows(_sorted_key_block(items, _upstream_lists, ["product_id"], ())) == _rows(want)

    edits = pa.Table.from_pylist([{"subject": rng.choice(["a", "b", "c"]), "relation": "color",
                                   "object": f"v{i}", "status": rng.choice(["added", "removed"]),
                                   "module": "imputation"} for i in range(30)])

    def reference_edits(group):
        return pa.table({
            "product_id": [group.column("subject")[0].as_py()],
            **{f"up_{c}": [group.column(c).to_pylist()]
               for c in ("relation", "object", "status", "module")}})

    want = _per_group(edits, reference_edits, ["subject"])
    assert _rows(_sorted_key_block(edits, _collect_edits, ["subject"], ())) == _rows(want)


def _group_sizes(block: pa.Table) -> pa.Table:
    df = pl.from_arrow(block).group_by("k", maintain_order=True).agg(
        pl.len().alias("n"), pl.col("v").alias("vs"))
    return df.to_arrow()


def test_map_key_blocks_keeps_every_key_whole_small_and_shuffled(ray_session, monkeypatch):
    import ray

    monkeypatch.setattr(runtime, "KEY_BLOCK_MIN_ROWS", 10)  # several partitions of 300 rows
    rows = [{"k": None if i % 17 == 0 else f"k{i % 7}", "v": i} for i in range(300)]
    ds = ray.data.from_items(rows, override_num_blocks=5)
    for n_rows in (300, runtime.SMALL_SHUFFLE_ROWS + 1):  # one task; the keyed shuffle
        got = pl.concat([pl.from_arrow(t) for t in ray.get(
            runtime.map_key_blocks(ds, "k", _group_sizes, n_rows=n_rows).to_arrow_refs())
            if t.num_rows])
        # one row per key: no key split over two partitions
        assert got.height == 8 and got["k"].n_unique() == 8
        assert dict(zip(got["k"].to_list(), got["n"].to_list()))["k1"] == sum(
            1 for i in range(300) if i % 17 and i % 7 == 1)


def test_related_coview_pairs_per_partition_equal_per_query():
    import numpy as np

    from autoknow_ray.modules.related.graph_build import coview_pairs

    def reference(batch, cap, least):  # the per-query function coview_pairs replaces
        top = pl.from_arrow(batch).sort(["n", "product_id"], descending=[True, False]).head(cap)
        if top.height < least:
            return pa.table({"src": pa.array([], pa.string()), "dst": pa.array([], pa.string()),
                             "w": pa.array([], pa.float64())})
        ids = top["product_id"].to_numpy()
        i, j = np.meshgrid(np.arange(len(ids)), np.arange(len(ids)), indexing="ij")
        m = i != j
        return pa.table({"src": pa.array(ids[i[m]], pa.string()),
                         "dst": pa.array(ids[j[m]], pa.string()),
                         "w": pa.array(np.ones(int(m.sum())))})

    rng = random.Random(3)
    rows = {}
    for _ in range(300):  # (query, product) unique, as the per-query sums give them
        q, p = rng.choice([None, "q1", "q2", "q3", "q4", "q5"]), f"p{rng.randrange(30):02d}"
        rows[(q, p)] = rng.choice([1, 1, 2, 3])  # ties in views
    table = pa.Table.from_pylist([{"query": q, "product_id": p, "n": n}
                                  for (q, p), n in rows.items()])
    for cap, least in ((4, 2), (50, 2), (6, 7)):
        want = _per_group(table, reference, ["query"], cap, least)
        got = _sorted_key_block(table, coview_pairs, ["query"], (cap, least))
        assert _rows(got) == _rows(want)
    assert _sorted_key_block(table, coview_pairs, ["query"], (4, 2)).num_rows == 6 * 4 * 3


def test_related_coview_pairs_from_raw_views_equal_those_from_summed_views():
    """The co-view edges' one partition by query: behaviour rows summed per (query, product) in
    the block give the pairs the per-key sums gave (ties in views, null queries, null counts)."""
    from autoknow_ray.modules.related.graph_build import coview_pairs, coview_pairs_of_views

    rng = random.Random(11)
    raw = [{"query": rng.choice([None, "q1", "q2", "q3"]), "product_id": f"p{rng.randrange(12):02d}",
            "count": rng.choice([1, 1, 2, None])} for _ in range(200)]
    summed: dict = {}
    for r in raw:
        key = (r["query"], r["product_id"])
        if r["count"] is not None:
            summed[key] = (summed.get(key) or 0) + r["count"]
        else:
            summed.setdefault(key, None)
    views = pa.Table.from_pylist([{"query": q, "product_id": p, "n": n} for (q, p), n in summed.items()],
                                 schema=pa.schema([("query", pa.string()), ("product_id", pa.string()),
                                                   ("n", pa.int64())]))
    table = pa.Table.from_pylist(raw, schema=pa.schema([("query", pa.string()), ("product_id", pa.string()),
                                                        ("count", pa.int64())]))
    order = list(range(table.num_rows))
    rng.shuffle(order)
    for cap, least in ((4, 2), (50, 2), (5, 9)):
        want = _sorted_key_block(views, coview_pairs, ["query"], (cap, least))
        got = _sorted_key_block(table.take(pa.array(order)), coview_pairs_of_views, ["query"], (cap, least))
        assert _rows(got) == _rows(want)
    assert _rows(_sorted_key_block(table, coview_pairs_of_views, ["query"], (4, 2)))
