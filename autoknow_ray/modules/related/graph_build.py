"""The product graph, built with Ray Data passes over the catalogue's behaviour tables.

Written as Parquet edge lists (folders of shards, written by the workers):
- `edges_copurchase/`: `src`, `dst`, `count`, `two_way` — directed co-purchase edges, duplicate
  rows summed; `two_way` where both directions were bought, one-way otherwise;
- `edges_similar/`: `src`, `dst`, `weight`, `kind` (coview | text) — similarity, both directions:
  products seen under the same query, else (no co-view logs) the nearest titles by FAISS kNN;
- `neighbours/`: `product_id`, `kind` (out | in | similar), `neighbours` (at most
  max(`fanout`, `prior_candidates`), the strongest first) with their `weights`, `weight_sum` —
  the capped adjacency the GNN's workers load (its first `fanout`) and the co-purchase counts the
  recommendations re-rank with;
- `quarantine/` (QUARANTINE schema): edges to unknown products, self-loops, negative or zero
  counts, behaviour rows of unknown products, each with its reason.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from autoknow_ray import runtime, storage
from autoknow_ray.config import Config
from autoknow_ray.graph.state import count_rows
from autoknow_ray.modules.related.steps import CheckEdges, TextNeighbours
from autoknow_ray.schema import QUARANTINE

COPURCHASE_EDGES = "edges_copurchase"
SIMILAR_EDGES = "edges_similar"
NEIGHBOURS = "neighbours"
QUARANTINE_TABLE = "quarantine"
COPURCHASE_SCHEMA = pa.schema([("src", pa.string()), ("dst", pa.string()), ("count", pa.int64()),
                               ("two_way", pa.bool_())])
SIMILAR_SCHEMA = pa.schema([("src", pa.string()), ("dst", pa.string()), ("weight", pa.float32()),
                            ("kind", pa.string())])
NEIGHBOURS_SCHEMA = pa.schema([("product_id", pa.string()), ("kind", pa.string()),
                               ("neighbours", pa.list_(pa.string())), ("weights", pa.list_(pa.float64())),
                               ("weight_sum", pa.float64())])
RAW_CHARS = 300


def write_shards(ds, path: Path, schema: pa.Schema) -> int:
    """Write `ds` as shards in `path`; an empty result still leaves a readable empty shard."""
    path.mkdir(parents=True, exist_ok=True)
    if ds is not None:
        ds.write_parquet(str(path))
    n = count_rows(path)
    if n == 0:
        import pyarrow.parquet as pq

        pq.write_table(schema.empty_table(), str(path / "empty.parquet"))
    return n


def _quarantine_rows(table: str, source: str, id_col: str, raw_cols: list[str]):
    def to_rows(batch: pa.Table) -> pa.Table:
        raw = pc.binary_join_element_wise(
            *[pc.cast(pc.fill_null(pc.cast(batch.column(c), pa.string()), ""), pa.string())
              for c in raw_cols], " | ")
        n = batch.num_rows
        return pa.table({
            "table": pa.array([table] * n, pa.string()),
            "source": pa.array([source] * n, pa.string()),
            "row": pa.nulls(n, pa.int64()),
            "product_id": batch.column(id_col).cast(pa.string()),
            "reason": batch.column("_reason"),
            "raw": pc.utf8_slice_codeunits(raw, 0, RAW_CHARS),
        }, schema=QUARANTINE)
    return to_rows


def quarantine_reasons(path: Path) -> dict:
    """Rows per reason, streamed from the quarantine shards (one column, a few keys)."""
    if count_rows(path) == 0:
        return {}
    counts = pl.scan_parquet(str(path / "*.parquet")).group_by("reason").len().collect()
    return dict(counts.sort("reason").rows())


def _partitions(cfg: Config, n_rows: int) -> int:
    """Hash-shuffle partitions for a groupby: Ray's default (200) costs minutes of task overhead
    on a small graph; one partition per `rows_per_partition` rows keeps large ones spread."""
    return max(1, -(-int(n_rows) // cfg.related.rows_per_partition))


def _rejected(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch.column("_reason")))


def _accepted(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch.column("_reason"))).drop_columns(["_reason"])


def _checked(cfg: Config, path: Path, products: Path, src: str, dst: str | None, count: str):
    n = count_rows(path)
    if n == 0:
        return None, 0
    ds = runtime.read_parquet(path)
    step = CheckEdges(products, src, dst, count)
    return runtime.map_step(ds, step, cfg, n).materialize(), n


def copurchase_edges(cfg: Config, copurchase: Path, products: Path, out: Path) -> dict:
    """Directed co-purchase edges with counts and their direction (one-way / two-way)."""
    checked, n_in = _checked(cfg, copurchase, products, "src", "dst", "count")
    if checked is None:
        write_shards(None, out / COPURCHASE_EDGES, COPURCHASE_SCHEMA)
        return {"copurchase_rows_in": 0, "copurchase_quarantined": 0, "copurchase_edges": 0}
    bad = checked.map_batches(_rejected, batch_format="pyarrow")
    bad.map_batches(_quarantine_rows("copurchase", "ingest/copurchase", "src", ["src", "dst", "count"]),
                    batch_format="pyarrow").write_parquet(str(out / QUARANTINE_TABLE))
    n_bad = count_rows(out / QUARANTINE_TABLE)

    def canonical(batch: pa.Table) -> pa.Table:
        src, dst = batch.column("src"), batch.column("dst")
        forward = pc.less(src, dst)
        count = batch.column("count").cast(pa.int64())
        zero = pa.scalar(0, pa.int64())
        return pa.table({"a": pc.if_else(forward, src, dst), "b": pc.if_else(forward, dst, src),
                         "fwd": pc.if_else(forward, count, zero), "bwd": pc.if_else(forward, zero, count)})

    def directed(batch: pa.Table) -> pa.Table:
        a, b = batch.column("a"), batch.column("b")
        f, r = batch.column("fwd"), batch.column("bwd")
        both = pc.and_(pc.greater(f, 0), pc.greater(r, 0))
        one = pa.table({"src": a, "dst": b, "count": f, "two_way": both}).filter(pc.greater(f, 0))
        two = pa.table({"src": b, "dst": a, "count": r, "two_way": both}).filter(pc.greater(r, 0))
        return pa.concat_tables([one, two])

    good = checked.map_batches(_accepted, batch_format="pyarrow")
    # a small input is summed in one task, a larger one by Ray's groupby (runtime.groupby_sum)
    pairs = runtime.groupby_sum(good.map_batches(canonical, batch_format="pyarrow"), ["a", "b"],
                                {"fwd": "fwd", "bwd": "bwd"}, _partitions(cfg, n_in), n_rows=n_in)
    n_edges = write_shards(pairs.map_batches(directed, batch_format="pyarrow"), out / COPURCHASE_EDGES,
                     COPURCHASE_SCHEMA)
    return {"copurchase_rows_in": n_in, "copurchase_quarantined": n_bad, "copurchase_edges": n_edges,
            "quarantine_reasons": quarantine_reasons(out / QUARANTINE_TABLE)}


def coview_pairs(block: pa.Table, cap: int, least: int) -> pa.Table:
    """Per query of a key partition (`runtime.map_key_blocks`; rows: query, product_id, n views):
    its `cap` most viewed products, ties in views broken by product id (the rows of a query
    arrive in no fixed order), and every ordered pair of them, weight 1, where the query kept at
    least `least`."""
    top = (pl.from_arrow(block.select(["query", "product_id", "n"]))
           .sort(["query", "n", "product_id"], descending=[False, True, False], nulls_last=True)
           .group_by("query", maintain_order=True).head(cap)
           .filter(pl.len().over("query") >= least))
    pairs = top.join(top, on="query", how="inner", suffix="_b", maintain_order="left_right",
                     nulls_equal=True).filter(pl.col("product_id") != pl.col("product_id_b"))
    return pa.table({"src": pairs["product_id"].to_arrow().cast(pa.string()),
                     "dst": pairs["product_id_b"].to_arrow().cast(pa.string()),
                     "w": pa.array(np.ones(pairs.height))})


def coview_pairs_of_views(block: pa.Table, cap: int, least: int) -> pa.Table:
    """`coview_pairs` over a key partition of the behaviour rows themselves (query, product_id,
    count): each (query, product) summed first, as the per-key sum before it gave (nulls
    skipped; null where every count is null). One partition by query does both: the per-key sum
    had been a shuffle of its own over every behaviour row."""
    views = (pl.from_arrow(block.select(["query", "product_id", "count"]))
             .group_by(["query", "product_id"], maintain_order=True)
             .agg(pl.when(pl.col("count").is_not_null().any()).then(pl.col("count").sum())
                  .alias("n")))
    return coview_pairs(views.to_arrow(), cap, least)


def coview_edges(cfg: Config, behavior: Path, products: Path, out: Path) -> dict:
    """Products seen under the same query, linked both ways (weight: queries they share)."""
    rc = cfg.related
    checked, n_in = _checked(cfg, behavior, products, "product_id", None, "count")
    if checked is None:
        return {"behavior_rows_in": 0, "behavior_quarantined": 0, "coview_edges": 0}
    bad = checked.map_batches(_rejected, batch_format="pyarrow")
    qdir = out / QUARANTINE_TABLE
    before = count_rows(qdir)
    bad.map_batches(_quarantine_rows("behavior", "ingest/behavior", "product_id",
                                     ["query", "product_id", "count"]),
                    batch_format="pyarrow").write_parquet(str(qdir))
    n_bad = count_rows(qdir) - before
    good = checked.map_batches(_accepted, batch_format="pyarrow")
    cap, least = rc.coview_max_per_query, rc.coview_min_products

    def as_similar(batch: pa.Table) -> pa.Table:
        return pa.table({"src": batch.column("src"), "dst": batch.column("dst"),
                         "weight": batch.column("weight").cast(pa.float32()),
                         "kind": pa.array(["coview"] * batch.num_rows, pa.string())})

    # every query's rows in one partition (one task for a small input, else one shuffle), its
    # per-product views summed and its pairs made in one polars pass (not a call per query)
    pairs = runtime.map_key_blocks(good.select_columns(["query", "product_id", "count"]), "query",
                                   coview_pairs_of_views, fn_args=(cap, least), n_rows=n_in,
                                   small_rows=runtime.NARROW_SMALL_ROWS)
    # the pairs' count is bounded by n_in x cap; where that bound is loose, the pairs of a small
    # input are counted (`rows_hint`) and summed in one task when few
    edges = runtime.groupby_sum(pairs, ["src", "dst"], {"weight": "w"}, _partitions(cfg, n_in * cap),
                                n_rows=n_in * cap, rows_hint=n_in, small_rows=runtime.NARROW_SMALL_ROWS
                                ).map_batches(as_similar, batch_format="pyarrow")
    n_edges = write_shards(edges, out / SIMILAR_EDGES, SIMILAR_SCHEMA)
    return {"behavior_rows_in": n_in, "behavior_quarantined": n_bad, "coview_edges": n_edges}


def text_edges(cfg: Config, nodes: Path, out: Path, n_nodes: int) -> int:
    """Each product's nearest titles, both directions (the kNN of one side is not symmetric)."""
    rc = cfg.related
    if rc.text_knn == 0 or n_nodes < 2:
        return 0
    args = {"k": rc.text_knn, "ivf_min_size": rc.ivf_min_size, "nprobe": rc.nprobe, "seed": cfg.seed}
    scratch = None
    if n_nodes > rc.max_nodes_per_actor:  # no worker indexes every product (related/sharded.py)
        from autoknow_ray.modules.related.sharded import text_knn_sharded

        knn, scratch = text_knn_sharded(cfg, args, nodes, out, n_nodes)
    else:
        knn = runtime.map_step(runtime.read_parquet(nodes, ["product_id", "text"]),
                               TextNeighbours(nodes, **args), cfg, n_nodes)

    def both_ways(batch: pa.Table) -> pa.Table:
        w = batch.column("weight")
        kind = pa.array(["text"] * batch.num_rows, pa.string())
        return pa.concat_tables([
            pa.table({"src": batch.column("src"), "dst": batch.column("dst"), "weight": w, "kind": kind}),
            pa.table({"src": batch.column("dst"), "dst": batch.column("src"), "weight": w, "kind": kind})])

    before = count_rows(out / SIMILAR_EDGES)
    knn.map_batches(both_ways, batch_format="pyarrow").write_parquet(str(out / SIMILAR_EDGES))
    if scratch is not None:
        storage.rmtree(scratch)
    return count_rows(out / SIMILAR_EDGES) - before


def top_neighbours(batch: pa.Table, kind: str, key: str, other: str, weight: str, fanout: int) -> pa.Table:
    """Every node of `batch` (whose rows hold each of its nodes' edges whole) with at most
    `fanout` neighbours of `kind`: an edge listed twice counts once at its largest weight; the
    strongest first, ties by neighbour id; `weight_sum` over its distinct neighbours. One
    vectorised pass per block (a Python call per node cost minutes on a 50k-product graph)."""
    df = pl.from_arrow(batch.select([key, other, weight]))
    if isinstance(df, pl.Series):
        df = df.to_frame()
    g = (df.group_by([key, other]).agg(pl.col(weight).max())
         .sort([key, weight, other], descending=[False, True, False]))
    rows = g.group_by(key, maintain_order=True).agg(
        pl.col(other).head(fanout).alias("neighbours"),
        pl.col(weight).head(fanout).cast(pl.Float64).alias("weights"),
        pl.col(weight).sum().cast(pl.Float64).alias("weight_sum"))
    return pa.table({"product_id": rows[key].to_arrow().cast(pa.string()),
                     "kind": pa.array([kind] * rows.height, pa.string()),
                     "neighbours": rows["neighbours"].to_arrow().cast(pa.list_(pa.string())),
                     "weights": rows["weights"].to_arrow().cast(pa.list_(pa.float64())),
                     "weight_sum": rows["weight_sum"].to_arrow().cast(pa.float64())},
                    schema=NEIGHBOURS_SCHEMA)


def neighbour_table(cfg: Config, out: Path) -> dict:
    """At most max(`fanout`, `prior_candidates`) neighbours per node and kind, strongest first,
    with their weights and the total weight. The edges are hash-partitioned by node (as a
    groupby is: every node's edges in one block, `rows_per_partition` rows a partition) and each
    block is ranked whole by `top_neighbours`."""
    fanout = max(cfg.related.fanout, cfg.related.prior_candidates)
    counts = {}
    for kind, table, key, other, weight in (("out", COPURCHASE_EDGES, "src", "dst", "count"),
                                             ("in", COPURCHASE_EDGES, "dst", "src", "count"),
                                             ("similar", SIMILAR_EDGES, "src", "dst", "weight")):
        n_edges = count_rows(out / table)
        if n_edges == 0:
            counts[kind] = 0
            continue
        ds = runtime.read_parquet(out / table, [key, other, weight])
        # every node's edges in one block: hash-partitioned, or a small table as one block
        rows = runtime.keyed_blocks(ds, [key], _partitions(cfg, n_edges), n_rows=n_edges,
                                    small_rows=runtime.NARROW_SMALL_ROWS).map_batches(
            top_neighbours, fn_kwargs={"kind": kind, "key": key, "other": other, "weight": weight,
                                       "fanout": fanout},
            batch_size=None, batch_format="pyarrow")
        before = count_rows(out / NEIGHBOURS)
        rows.write_parquet(str(out / NEIGHBOURS))
        counts[kind] = count_rows(out / NEIGHBOURS) - before
    if count_rows(out / NEIGHBOURS) == 0:
        write_shards(None, out / NEIGHBOURS, NEIGHBOURS_SCHEMA)
    return {f"nodes_with_{k}_neighbours": v for k, v in counts.items()}
