"""The related stage's two-hop embeddings and title kNN with no worker holding every product.

`DualEmbed` loads every node's h0, hop-1 embeddings and neighbour lists into each actor: about
1 KB a node, 10 GB an actor at 10M products. Above `related.max_nodes_per_actor` nodes the stage
computes the same embeddings as a dataflow instead, in which a worker holds one shard of the node
vectors (`shards` = ceil(nodes / max_nodes_per_actor), a node's shard a hash of its id):

1. `edge_rows`: the neighbour lists as rows (v, kind, nb) — the first `fanout` of each list, as
   `NodeTables` keeps them —, a `self` row per node (v, "self", v), and a `degree` row per
   co-purchase list (its `weight_sum`, the node's degree feature).
2. Per hop, per shard s: `NeighbourSums` holds the vectors of shard s (hop 1: h0; hop 2: the hop-1
   source and target embeddings) and maps every edge row whose neighbour is in shard s to a
   partial sum per (v, kind): the sum of the neighbours' vectors and their count.
3. `hop_reduce` (one call per key partition of v, `runtime.map_key_blocks`): the partials of a
   node summed over shards and batches (in float64, so the order they arrive in does not move
   the result), the masked means `DualGNN._hop1` / `_hop2` take, and the layer.

What a worker holds is one shard of vectors, an edge batch and a key partition; the edges pass
through each shard once per hop (S passes). The means equal the in-memory ones up to float
rounding (float64 sums against float32 ones); the embeddings are written in fp16 either way.

The title kNN (similarity edges for catalogues without co-views) shards the same way: each
`TextNeighbours` worker indexes one shard and lists every query's k + 1 nearest there;
`top_per_source` keeps, per query, the k + 1 best of all shards' lists (score, then product id:
the order of one index over every product, whose rows are in product-id order) and drops the
query itself.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from autoknow_ray import storage
from autoknow_ray.steps import Step, WorkerEnv

EDGES = "dual_edges"  # scratch: the edge rows of step 1
HOP1 = "dual_hop1"  # scratch: every node's hop-1 source and target embeddings
VECTORS = "dual_vectors"  # scratch: a hop's input vectors, one folder per shard
SELF, DEGREE_OUT, DEGREE_IN = "self", "degree_out", "degree_in"
EDGE_SCHEMA = pa.schema([("v", pa.string()), ("kind", pa.string()), ("nb", pa.string()),
                         ("w", pa.float64()), ("shard", pa.int32())])


def shard_count(n_nodes: int, max_nodes_per_actor: int) -> int:
    return max(1, -(-int(n_nodes) // max(int(max_nodes_per_actor), 1)))


def shard_of(ids, shards: int) -> np.ndarray:
    """Each id's shard: its 64-bit hash (`model.id_hash`) modulo `shards`."""
    from autoknow_ray.modules.related.model import id_hash

    if shards <= 1:
        return np.zeros(len(ids), np.int64)
    return (id_hash(ids) % np.uint64(shards)).astype(np.int64)


def edge_rows(batch: pa.Table, fanout: int, shards: int = 1) -> pa.Table:
    """Neighbour-table rows -> (v, kind, nb, w): the first `fanout` neighbours of each list (an
    unknown neighbour keeps its slot, as in `NodeTables`), and per co-purchase list a degree row
    (nb null, w = the list's weight_sum)."""
    lists = batch.column("neighbours").combine_chunks()
    flat = pc.list_flatten(lists)
    parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    offsets = lists.offsets.to_numpy()
    rank = np.arange(len(flat)) - offsets[:-1][parent]
    keep = pa.array(rank < fanout)
    parent_kept = pa.array(parent).filter(keep)
    ids, kinds = batch.column("product_id"), batch.column("kind")
    nb = flat.filter(keep)
    nb_rows = pa.table({"v": ids.take(parent_kept), "kind": kinds.take(parent_kept), "nb": nb,
                        "w": pa.nulls(len(parent_kept), pa.float64()),
                        # the shard that holds the neighbour's vector: its pass reads this row
                        "shard": pa.array(shard_of(nb, shards).astype(np.int32))}, schema=EDGE_SCHEMA)
    k = kinds.to_numpy(zero_copy_only=False) if isinstance(kinds, pa.Array) else \
        kinds.combine_chunks().to_numpy(zero_copy_only=False)
    co = np.isin(k, ["out", "in"])
    rows = np.flatnonzero(co)
    deg = pa.table({"v": ids.take(pa.array(rows)),
                    "kind": pa.array(np.where(k[rows] == "out", DEGREE_OUT, DEGREE_IN).tolist(), pa.string()),
                    "nb": pa.nulls(len(rows), pa.string()),
                    "w": batch.column("weight_sum").take(pa.array(rows)).cast(pa.float64()),
                    "shard": pa.array(np.zeros(len(rows), np.int32))}, schema=EDGE_SCHEMA)
    return pa.concat_tables([nb_rows, deg])


def self_rows(batch: pa.Table, shards: int = 1) -> pa.Table:
    ids = batch.column("product_id")
    return pa.table({"v": ids, "kind": pa.array([SELF] * len(ids), pa.string()), "nb": ids,
                     "w": pa.nulls(len(ids), pa.float64()),
                     "shard": pa.array(shard_of(ids, shards).astype(np.int32))}, schema=EDGE_SCHEMA)


def _matrix(table: pa.Table, columns: list[str]) -> np.ndarray:
    from autoknow_ray.index.vectors import as_matrix

    parts = [as_matrix(table.column(c)).astype(np.float32) for c in columns]
    return np.concatenate(parts, 1) if parts else np.zeros((table.num_rows, 0), np.float32)


def with_shard(batch: pa.Table, shards: int) -> pa.Table:
    """`batch` with each row's `shard` (of its product_id) as a column."""
    return batch.append_column("shard", pa.array(
        shard_of(batch.column("product_id").combine_chunks(), shards).astype(np.int32)))


def shard_folder(root, shard: int):
    """The folder of one shard's rows in a table written by `write_by_shard`."""
    return storage.path(root) / f"shard={int(shard)}"


def write_by_shard(src, columns: list[str], shards: int, dest) -> None:
    """The rows of `src` (product_id and `columns`) written once, one folder per shard
    (`shard_folder(dest, s)`), so a shard's worker reads its own rows and not every file of the
    table: one pass over the table instead of one per shard."""
    from autoknow_ray import runtime

    from autoknow_ray.modules.related.steps import mark_complete

    storage.rmtree(storage.path(dest))
    runtime.read_parquet(src, ["product_id", *columns]).map_batches(
        with_shard, fn_kwargs={"shards": shards}, batch_format="pyarrow"
    ).write_parquet(str(dest), partition_cols=["shard"])
    for s in range(shards):  # every shard's folder, an empty one too, marked as fully written
        mark_complete(shard_folder(dest, s))


def read_shard(path, columns: list[str], shard: int, shards: int) -> pa.Table:
    """The rows of a table whose product_id is in `shard`, read file by file (never the whole
    table at once), in product-id order. `path` is best one shard's folder of `write_by_shard`
    (a shard with no row has none); the shard of every row is checked either way."""
    path = storage.path(path)
    if not path.exists():  # an empty shard of a table written some other way
        return pa.table({"product_id": pa.array([], pa.string())})
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    parts = []
    for f in files:  # one written block at a time
        b = pq.read_table(str(f), columns=["product_id", *columns])
        if b.num_rows == 0:
            continue
        mine = shard_of(b.column("product_id").combine_chunks(), shards) == shard
        if mine.any():
            parts.append(b.filter(pa.array(mine)))
    if not parts:
        return pa.table({"product_id": pa.array([], pa.string())})
    t = pa.concat_tables(parts)
    return t.sort_by("product_id")


class NeighbourSums(Step):
    """Edge rows -> per (v, kind) the sum of the vectors of the neighbours in this worker's shard
    and their count; degree rows pass through (shard 0 only, so each is counted once)."""

    name = "related_neighbour_sums"
    resources = "related"
    columns = ("v", "kind", "nb", "w")
    model = True

    def __init__(self, vectors_path: Path, vector_columns: list[str], shard: int, shards: int):
        self.path, self.vector_columns = str(vectors_path), list(vector_columns)
        self.shard, self.shards = int(shard), int(shards)
        self.matrix = self.sorted_hash = self.order = None

    def setup(self, env: WorkerEnv) -> None:
        from autoknow_ray.modules.related.model import id_hash
        from autoknow_ray.modules.related.steps import require_complete

        # this shard's folder of the hop's vectors (`write_by_shard`), read whole: its marker
        # says the write finished, and its row count that nothing was missed
        require_complete(self.path, None)
        t = read_shard(self.path, self.vector_columns, self.shard, self.shards)
        require_complete(self.path, t.num_rows)
        if t.num_rows:
            self.matrix = _matrix(t, self.vector_columns)
            h = id_hash(t.column("product_id").combine_chunks())
        else:
            self.matrix, h = None, np.zeros(0, np.uint64)
        self.order = np.argsort(h, kind="stable")
        self.sorted_hash = h[self.order]

    def process_batch(self, batch: pa.Table) -> pa.Table:
        from autoknow_ray.modules.related.model import rows_by_hash

        nb = batch.column("nb")
        is_nb = np.asarray(pc.is_valid(nb).to_numpy(zero_copy_only=False), bool)
        out = []
        if self.shard == 0 and (~is_nb).any():
            deg = batch.filter(pa.array(~is_nb))
            out.append(pa.table({"v": deg.column("v"), "kind": deg.column("kind"),
                                 "n": pa.array(np.zeros(deg.num_rows, np.int64)), "w": deg.column("w"),
                                 "sum": pa.nulls(deg.num_rows, pa.list_(pa.float32()))},
                                schema=PARTIALS_SCHEMA))
        rows = np.full(batch.num_rows, -1, np.int64)
        if is_nb.any() and self.matrix is not None:
            sel = np.flatnonzero(is_nb)
            rows[sel] = rows_by_hash(self.sorted_hash, self.order, nb.take(pa.array(sel)))
        hit = np.flatnonzero(rows >= 0)
        if len(hit):
            df = pl.from_arrow(batch.select(["v", "kind"]).take(pa.array(hit))).with_columns(
                pl.Series("row", rows[hit]))
            df = df.sort(["v", "kind"], maintain_order=True)
            g = df.group_by(["v", "kind"], maintain_order=True).agg(pl.len().alias("n"))
            counts = g["n"].to_numpy().astype(np.int64)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            sums = np.add.reduceat(self.matrix[df["row"].to_numpy()].astype(np.float64), starts, axis=0)
            width = sums.shape[1]
            offsets = pa.array(np.arange(len(g) + 1, dtype=np.int32) * width)
            out.append(pa.table({"v": g["v"].to_arrow().cast(pa.string()),
                                 "kind": g["kind"].to_arrow().cast(pa.string()),
                                 "n": pa.array(counts), "w": pa.nulls(len(g), pa.float64()),
                                 "sum": pa.ListArray.from_arrays(offsets, pa.array(sums.reshape(-1).astype(np.float32)))},
                                schema=PARTIALS_SCHEMA))
        if not out:
            return PARTIALS_SCHEMA.empty_table()
        return pa.concat_tables(out)


PARTIALS_SCHEMA = pa.schema([("v", pa.string()), ("kind", pa.string()), ("n", pa.int64()),
                             ("w", pa.float64()), ("sum", pa.list_(pa.float32()))])


_MODELS: dict = {}


def _model(model_dir: str):
    """The GNN, loaded once per worker process (a key-partition call loads it at most once)."""
    if model_dir not in _MODELS:
        from autoknow_ray.modules.related.model import load

        _MODELS[model_dir] = load(Path(model_dir), "cpu").eval()
    return _MODELS[model_dir]


def _means(block: pa.Table, width: int) -> tuple[pl.Series, dict, dict, dict]:
    """Per node (in key order): per kind the float64 sum of its neighbours' vectors and their
    count, over every partial of the node; the degree weights."""
    df = pl.from_arrow(block.select(["v", "kind", "n", "w"]))
    nodes = df["v"].unique(maintain_order=True)  # this key partition's nodes, in key order
    node_index = nodes.to_frame("v").with_row_index("i")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    weights = {DEGREE_OUT: np.zeros(len(nodes)), DEGREE_IN: np.zeros(len(nodes))}
    has = np.asarray(pc.is_valid(block.column("sum")).to_numpy(zero_copy_only=False), bool)
    vec = df.filter(pl.Series(has))
    if vec.height:
        idx = vec.select("v").join(node_index, on="v", how="left", maintain_order="left")["i"].to_numpy().astype(np.int64)
        flat = pc.list_flatten(block.column("sum").filter(pa.array(has)))
        mat = np.asarray(flat.to_numpy(zero_copy_only=False), np.float64).reshape(vec.height, width)
        kinds = vec["kind"].to_numpy()
        n = vec["n"].to_numpy()
        for kind in np.unique(kinds):
            m = kinds == kind
            s = np.zeros((len(nodes), width))
            c = np.zeros(len(nodes))
            np.add.at(s, idx[m], mat[m])
            np.add.at(c, idx[m], n[m])
            sums[str(kind)], counts[str(kind)] = s, c
    deg = df.filter(pl.Series(~has) & pl.col("w").is_not_null()).select("v", "kind", "w").join(
        node_index, on="v", how="left", maintain_order="left")
    for kind in weights:
        d = deg.filter(pl.col("kind") == kind)
        if d.height:
            weights[kind][d["i"].to_numpy().astype(np.int64)] = d["w"].to_numpy()
    # a node is what has a self row: neighbour lists of products not in the node table give none
    if SELF in counts:
        keep = counts[SELF] > 0
        nodes = nodes.filter(pl.Series(keep))
        sums = {k: s[keep] for k, s in sums.items()}
        counts = {k: c[keep] for k, c in counts.items()}
        weights = {k: w[keep] for k, w in weights.items()}
    return nodes, sums, counts, weights


def _mean(sums, counts, kinds, n, width, cols=slice(None)):
    s = np.zeros((n, width))[:, cols]
    c = np.zeros(n)
    for k in kinds:
        if k in sums:
            s = s + sums[k][:, cols]
            c = c + counts[k]
    return (s / np.maximum(c, 1.0)[:, None]).astype(np.float32)


def hop1_reduce(block: pa.Table, model_dir: str, dim: int) -> pa.Table:
    """Partials of h0 (width `dim`) -> each node's hop-1 source and target embeddings."""
    import torch

    from autoknow_ray.modules.related.model import degree_features

    gnn = _model(model_dir)
    nodes, sums, counts, weights = _means(block, dim)
    n = len(nodes)
    if SELF not in sums:  # every node has its self row; a block without one has no node
        return _hop_table(nodes, np.zeros((0, gnn.settings.dim)), np.zeros((0, gnn.settings.dim)))
    x = _mean(sums, counts, [SELF], n, dim)
    deg = degree_features(weights[DEGREE_OUT], weights[DEGREE_IN])
    sim = _mean(sums, counts, ["similar"], n, dim)
    t = torch.from_numpy
    with torch.inference_mode():
        if gnn.settings.symmetric:
            both = _mean(sums, counts, ["out", "in"], n, dim)
            s1 = torch.relu(gnn.l1_src(torch.cat([t(x), t(both), t(sim), t(deg)], -1)))
            t1 = s1
        else:
            o, i = _mean(sums, counts, ["out"], n, dim), _mean(sums, counts, ["in"], n, dim)
            s1 = torch.relu(gnn.l1_src(torch.cat([t(x), t(o), t(sim), t(deg)], -1)))
            t1 = torch.relu(gnn.l1_tgt(torch.cat([t(x), t(i), t(sim), t(deg)], -1)))
    return _hop_table(nodes, s1.float().numpy(), t1.float().numpy(), names=("s1", "t1"), fp16=False)


def hop2_reduce(block: pa.Table, model_dir: str, dim: int) -> pa.Table:
    """Partials of [s1 | t1] (width 2 `dim`) -> each node's source and target embeddings."""
    import torch

    gnn = _model(model_dir)
    nodes, sums, counts, _ = _means(block, 2 * dim)
    n = len(nodes)
    if SELF not in sums:
        return _hop_table(nodes, np.zeros((0, dim)), np.zeros((0, dim)))
    S, T = slice(0, dim), slice(dim, 2 * dim)
    s1, t1 = _mean(sums, counts, [SELF], n, 2 * dim, S), _mean(sums, counts, [SELF], n, 2 * dim, T)
    t = torch.from_numpy
    with torch.inference_mode():
        if gnn.settings.symmetric:
            both = _mean(sums, counts, ["out", "in"], n, 2 * dim, S)
            w = _mean(sums, counts, ["similar"], n, 2 * dim, S)
            src = gnn.l2_src(torch.cat([t(s1), t(both), t(w)], -1))
            tgt = src
        else:
            src = gnn.l2_src(torch.cat([t(s1), t(_mean(sums, counts, ["out"], n, 2 * dim, T)),
                                        t(_mean(sums, counts, ["similar"], n, 2 * dim, S))], -1))
            tgt = gnn.l2_tgt(torch.cat([t(t1), t(_mean(sums, counts, ["in"], n, 2 * dim, S)),
                                        t(_mean(sums, counts, ["similar"], n, 2 * dim, T))], -1))
    return _hop_table(nodes, src.float().numpy(), tgt.float().numpy())


def _hop_table(nodes, a: np.ndarray, b: np.ndarray, names=("source", "target"), fp16: bool = True):
    def fixed(m):
        m = np.ascontiguousarray(m.astype(np.float16 if fp16 else np.float32))
        width = m.shape[1] if m.ndim == 2 else 0
        return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), width)

    ids = nodes.to_arrow().cast(pa.string()) if len(a) == len(nodes) else pa.array([], pa.string())
    return pa.table({"product_id": ids, names[0]: fixed(a), names[1]: fixed(b)})


def dual_embed_sharded(cfg, model_dir: Path, nodes_path: Path, neighbours_path: Path, out: Path,
                       embeddings_path: Path, n_nodes: int) -> dict:
    """Every node's source and target embeddings (what `DualEmbed` gives), written to
    `embeddings_path`, with no worker holding more than one shard of the node vectors."""
    from ray.data.expressions import col

    import json

    from autoknow_ray import runtime
    from autoknow_ray.modules.related.model import CONFIG, GNNSettings
    from autoknow_ray.pipeline import count_rows

    rc = cfg.related
    shards = shard_count(n_nodes, rc.max_nodes_per_actor)
    # the width of the vectors, from the model's settings (the weights load in the workers)
    dim = int(json.loads((Path(model_dir) / CONFIG).read_text()).get("dim", GNNSettings.dim))
    out = storage.path(out)
    edges = out / EDGES
    storage.rmtree(edges)
    runtime.read_parquet(neighbours_path).map_batches(
        edge_rows, fn_kwargs={"fanout": rc.fanout, "shards": shards}, batch_format="pyarrow"
    ).write_parquet(str(edges))
    runtime.read_parquet(nodes_path, ["product_id"]).map_batches(
        self_rows, fn_kwargs={"shards": shards}, batch_format="pyarrow").write_parquet(str(edges))
    n_edges = count_rows(edges)

    def hop(vectors_path, columns, reduce, dest):
        # one shard pass at a time, each written before the next: a worker holds one shard,
        # and reads only its own folder of the hop's vectors
        vectors = out / VECTORS
        write_by_shard(vectors_path, columns, shards, vectors)
        parts = out / "dual_partials"
        storage.rmtree(parts)
        for s in range(shards):
            # the edge rows whose neighbour is in shard s: every edge passes through one
            # shard's workers per hop
            mine = runtime.read_parquet(edges, [*NeighbourSums.columns, "shard"]).filter(
                expr=col("shard") == s)
            runtime.map_step(mine, NeighbourSums(shard_folder(vectors, s), columns, s, shards),
                             cfg, max(1, n_edges // shards)).write_parquet(str(parts / f"shard={s}"))
        storage.rmtree(vectors)
        # partitions sized by bytes, not rows: a partial row carries `width` floats (64 to 128),
        # so a partition takes width / 16 times fewer of them than the key-partition cap (at 100k
        # products, 2 partitions by rows held 1.7 GB in one task)
        width = dim * len(columns)
        runtime.map_key_blocks(runtime.read_parquet(parts, list(PARTIALS_SCHEMA.names)), "v", reduce,
                               fn_args=(str(model_dir), dim), n_rows=count_rows(parts),
                               max_rows=runtime.KEY_BLOCK_MAX_ROWS // max(1, width // 16)
                               ).write_parquet(str(dest))
        storage.rmtree(parts)

    hop1 = out / HOP1
    for p in (hop1, embeddings_path):
        storage.rmtree(storage.path(p))
    hop(nodes_path, ["h0"], hop1_reduce, hop1)
    hop(hop1, ["s1", "t1"], hop2_reduce, embeddings_path)
    storage.rmtree(edges)
    storage.rmtree(hop1)
    return {"shards": shards, "edge_rows": n_edges}


def top_per_source(block: pa.Table, k: int) -> pa.Table:
    """Per `src` (a key partition): the `k` + 1 best (src, dst, weight) rows of every shard's lists,
    by weight and then dst, less the row of src itself, in the order one index gives."""
    df = pl.from_arrow(block)
    top = (df.sort(["src", "weight", "dst"], descending=[False, True, False])
           .group_by("src", maintain_order=True).head(k + 1)
           .filter(pl.col("src") != pl.col("dst")))
    return top.to_arrow().cast(pa.schema([("src", pa.string()), ("dst", pa.string()),
                                          ("weight", pa.float32())]))


def text_knn_sharded(cfg, step_args: dict, nodes_path, out, n_nodes: int) -> "object":
    """The title kNN over `shards` index shards: a dataset of (src, dst, weight), every product's
    k nearest others, as `TextNeighbours` over one index of every product lists them."""
    from autoknow_ray import runtime
    from autoknow_ray.modules.related.steps import TextNeighbours
    from autoknow_ray.pipeline import count_rows

    shards = shard_count(n_nodes, cfg.related.max_nodes_per_actor)
    parts = storage.path(out) / "text_knn_partials"
    vectors = storage.path(out) / "text_knn_vectors"
    storage.rmtree(parts)
    write_by_shard(nodes_path, ["text"], shards, vectors)  # each shard's index reads its folder
    for s in range(shards):
        step = TextNeighbours(shard_folder(vectors, s), **step_args, shard=s, shards=shards)
        runtime.map_step(runtime.read_parquet(nodes_path, ["product_id", "text"]), step, cfg,
                         n_nodes).write_parquet(str(parts / f"shard={s}"))
    storage.rmtree(vectors)
    ds = runtime.map_key_blocks(runtime.read_parquet(parts, ["src", "dst", "weight"]), "src",
                                top_per_source, fn_args=(step_args["k"],), n_rows=count_rows(parts))
    return ds, parts
