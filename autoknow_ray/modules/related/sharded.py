"""The related stage's two-hop embeddings, title kNN and top-k search with no worker holding
every product.

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

The top-k search (`Recommend`: every target vector, its FAISS index and, with a count prior, every
node's co-purchase lists in each actor) shards the same way, `recommend_sharded`:

1. Keyed passes attach to each source row what its score reads, never on the driver: by node
   (`lists_by_node`), each node's first `prior_candidates` co-purchase neighbours out and in with
   their counts, its events (out + in) and its events as the product bought, for each of the
   first `fanout` similar products a source names, that product's lists (the two-hop join), and
   with a walk term, for each co-purchase neighbour it lists, that neighbour's lists and events;
   by source (`queries_by_source`), its vector with its own lists, its similar products' lists
   and its walk's second steps.
   The (k + 1) most bought products (`runtime.top_keys`, ties by id) go to the steps as an argument.
2. Per shard s, `RecommendShard` holds shard s's targets (its FAISS index) and their bought counts
   and lists each source's candidates in the shard: the shard's FAISS top (k + 1 +
   prior_candidates) and every extra candidate (its lists, the most bought, its similar products'
   lists) that is a product of s, each with its FAISS score and the full score of
   `Recommend._rerank` (the same terms over the same lists).
3. `merge_recommend` (one call per key partition of the source): the FAISS candidates cut to the
   best (k + 1 + prior_candidates) of all shards, the extra candidates joined, each product once,
   the source left out, the k best by full score: `Recommend`'s lists. Without a prior, the
   FAISS top k of every shard merged.
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
    """The rows of `src` (a table's path, or a Ray Dataset: product_id and `columns`) written
    once, one folder per shard (`shard_folder(dest, s)`), so a shard's worker reads its own rows
    and not every file of the table: one pass over the table instead of one per shard."""
    import ray

    from autoknow_ray import runtime

    from autoknow_ray.modules.related.steps import mark_complete

    storage.rmtree(storage.path(dest))
    ds = src.select_columns(["product_id", *columns]) if isinstance(src, ray.data.Dataset) \
        else runtime.read_parquet(src, ["product_id", *columns])
    ds.map_batches(
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
    nodes, sums, counts, weights = _means(block, 2 * dim)
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
        if gnn.settings.id_rows:  # each product's learnt row, by its id hash (none without events)
            from autoknow_ray.modules.related.model import id_hash, id_rows_of

            rows = id_rows_of(gnn.settings, id_hash(nodes.to_arrow().cast(pa.string())),
                              weights[DEGREE_OUT] + weights[DEGREE_IN])
            src, tgt = gnn.with_ids(torch.arange(n), src, tgt, t(rows))
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


# ---- the top-k search over shards of the targets (`Recommend` with no worker holding every
# product): scratch tables of `recommend_sharded`, removed once the lists are written
REC_LISTS = "rec_lists"  # pass 1: each node's own co-purchase lists, and those its similar products lend it
REC_QUERIES = "rec_queries"  # pass 2: each source row, its vector and every list its score reads
REC_TARGETS = "rec_targets"  # the target vectors, one folder per shard
REC_BOUGHT = "rec_bought"  # each node's co-purchase events as the product bought, one folder per shard
REC_PARTIALS = "rec_partials"  # each shard's candidates per source, before the merge

LISTS_IN_SCHEMA = pa.schema([("key", pa.string()), ("role", pa.string()), ("src", pa.string()),
                             ("ids", pa.list_(pa.string())), ("w", pa.list_(pa.float64())),
                             ("total", pa.float64())])
LISTS_SCHEMA = pa.schema([("src", pa.string()), ("role", pa.string()),
                          ("out_ids", pa.list_(pa.string())), ("out_w", pa.list_(pa.float64())),
                          ("in_ids", pa.list_(pa.string())), ("in_w", pa.list_(pa.float64())),
                          ("events", pa.float64()), ("bought", pa.float64()), ("step", pa.float64())])
QUERY_COLUMNS = ["product_id", "source", "out_ids", "out_w", "in_ids", "in_w", "events",
                 "nb_ids", "nb_w", "n_sim", "wk_ids", "wk_w"]
CANDIDATES_SCHEMA = pa.schema([("src", pa.string()), ("dst", pa.string()), ("model", pa.float32()),
                               ("score", pa.float64()), ("faiss", pa.bool_()), ("extra", pa.bool_())])
RELATED_SCHEMA = pa.schema([("product_id", pa.string()), ("related_id", pa.string()),
                            ("rank", pa.int32()), ("score", pa.float32())])


def _chunked(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _head(lists, width: int):
    """The first `width` values of each list (a null list: none), as (flat values, parent row)."""
    lists = _chunked(lists)
    flat = pc.list_flatten(lists)
    parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    rank = np.arange(len(flat)) - starts[parent] if len(flat) else np.zeros(0, np.int64)
    keep = rank < width
    return flat.filter(pa.array(keep)), parent[keep], rank[keep]


def _sliced(lists, width: int, value_type) -> pa.Array:
    """Each list cut to its first `width` values (a null list: an empty one)."""
    flat, parent, _ = _head(lists, width)
    n = len(lists)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(parent, minlength=n))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), flat.cast(value_type))


def list_rows(batch: pa.Table, prior_candidates: int, fanout: int, has_weights: bool,
              walk: bool = False) -> pa.Table:
    """Neighbour-table rows -> the rows of the first keyed pass (`LISTS_IN_SCHEMA`): a
    co-purchase list (out, in) as its first `prior_candidates` neighbours with their counts and
    its weight_sum, as `NodeTables` keeps them (no counts without a `weights` column: no prior
    list); with `fanout` each of the first `fanout` similar products of a list as an `ask` row
    keyed by that product, for its co-purchase lists; with `walk` each of a co-purchase list's
    first `prior_candidates` neighbours as a `wask` row keyed by that neighbour (its count in
    `total`), for its co-purchase lists: the walk term's second step."""
    kinds = _chunked(batch.column("kind")).to_numpy(zero_copy_only=False)
    ids, lists = batch.column("product_id"), batch.column("neighbours")
    parts = []
    co = np.flatnonzero(np.isin(kinds, ["out", "in"]))
    if len(co):
        take = pa.array(co)
        width = prior_candidates if has_weights else 0
        parts.append(pa.table({
            "key": ids.take(take), "role": pa.array(kinds[co].tolist(), pa.string()),
            "src": pa.nulls(len(co), pa.string()),
            "ids": _sliced(_chunked(lists).take(take), width, pa.string()),
            "w": _sliced(_chunked(batch.column("weights")).take(take), width, pa.float64())
            if has_weights else _sliced(pa.nulls(len(co), pa.list_(pa.float64())), 0, pa.float64()),
            "total": batch.column("weight_sum").take(take).cast(pa.float64())}, schema=LISTS_IN_SCHEMA))
        if walk and has_weights and prior_candidates:
            flat, parent, _ = _head(_chunked(lists).take(take), prior_candidates)
            wf, _, _ = _head(_chunked(batch.column("weights")).take(take), prior_candidates)
            parts.append(pa.table({
                "key": flat.cast(pa.string()), "role": pa.array(["wask"] * len(flat), pa.string()),
                "src": ids.take(pa.array(co[parent])),
                "ids": pa.nulls(len(flat), pa.list_(pa.string())),
                "w": pa.nulls(len(flat), pa.list_(pa.float64())),
                "total": wf.cast(pa.float64())}, schema=LISTS_IN_SCHEMA))
    sim = np.flatnonzero(kinds == "similar") if fanout else np.zeros(0, np.int64)
    if len(sim):
        flat, parent, _ = _head(_chunked(lists).take(pa.array(sim)), fanout)
        parts.append(pa.table({
            "key": flat.cast(pa.string()), "role": pa.array(["ask"] * len(flat), pa.string()),
            "src": ids.take(pa.array(sim[parent])),
            "ids": pa.nulls(len(flat), pa.list_(pa.string())),
            "w": pa.nulls(len(flat), pa.list_(pa.float64())),
            "total": pa.nulls(len(flat), pa.float64())}, schema=LISTS_IN_SCHEMA))
    return pa.concat_tables(parts) if parts else LISTS_IN_SCHEMA.empty_table()


def node_rows(batch: pa.Table) -> pa.Table:
    """A `node` row per product of the embeddings (the products a list may name)."""
    n = batch.num_rows
    return pa.table({"key": batch.column("product_id"), "role": pa.array(["node"] * n, pa.string()),
                     "src": pa.nulls(n, pa.string()), "ids": pa.nulls(n, pa.list_(pa.string())),
                     "w": pa.nulls(n, pa.list_(pa.float64())), "total": pa.nulls(n, pa.float64())},
                    schema=LISTS_IN_SCHEMA)


def lists_by_node(block: pa.Table) -> pa.Table:
    """A key partition of the first pass -> per node an `own` row (its out and in lists, its
    co-purchase events out + in, and in as the product bought), per `ask` row naming a node a
    `sim` row (that node's out and in lists, lent to the product that asked, `src`) and per
    `wask` row naming a node a `walk` row (its lists and its events, with the asking product's
    count with it as `step`)."""
    df = pl.from_arrow(block)
    nodes = df.filter(pl.col("role") == "node").select("key").unique(maintain_order=True)
    lists = {}
    for kind in ("out", "in"):
        # one list per node and kind (the last, as NodeTables keeps it)
        lists[kind] = df.filter(pl.col("role") == kind).unique("key", keep="last", maintain_order=True).select(
            "key", pl.col("ids").alias(f"{kind}_ids"), pl.col("w").alias(f"{kind}_w"),
            pl.col("total").alias(f"{kind}_total"))
    own = nodes.join(lists["out"], on="key", how="left", maintain_order="left").join(
        lists["in"], on="key", how="left", maintain_order="left")
    own = own.select(pl.col("key").alias("src"), pl.lit("own").alias("role"), "out_ids", "out_w",
                     "in_ids", "in_w",
                     (pl.col("out_total").fill_null(0.0) + pl.col("in_total").fill_null(0.0)).alias("events"),
                     pl.col("in_total").fill_null(0.0).alias("bought"), pl.lit(None, pl.Float64).alias("step"))
    ask = df.filter(pl.col("role") == "ask").select("key", "src")
    sim = ask.join(own.select(pl.col("src").alias("key"), "out_ids", "out_w", "in_ids", "in_w"),
                   on="key", how="inner", maintain_order="left")
    sim = sim.select("src", pl.lit("sim").alias("role"), "out_ids", "out_w", "in_ids", "in_w",
                     pl.lit(None, pl.Float64).alias("events"), pl.lit(None, pl.Float64).alias("bought"),
                     pl.lit(None, pl.Float64).alias("step"))
    wask = df.filter(pl.col("role") == "wask").select("key", "src", pl.col("total").alias("step"))
    walk = wask.join(own.select(pl.col("src").alias("key"), "out_ids", "out_w", "in_ids", "in_w", "events"),
                     on="key", how="inner", maintain_order="left")
    walk = walk.select("src", pl.lit("walk").alias("role"), "out_ids", "out_w", "in_ids", "in_w",
                       "events", pl.lit(None, pl.Float64).alias("bought"), "step")
    both = pl.concat([own, sim, walk], how="vertical_relaxed")
    if both.height == 0:
        return LISTS_SCHEMA.empty_table()
    return both.to_arrow().cast(LISTS_SCHEMA)


def _with_source(batch: pa.Table, source_type) -> pa.Table:
    """A first-pass row with a null `source`, or an embedding row as a `vec` row: the two kinds of
    row of the second pass, keyed by `src`."""
    if "source" in batch.column_names:
        n = batch.num_rows
        cols = {"src": batch.column("product_id"), "role": pa.array(["vec"] * n, pa.string())}
        cols.update({f.name: pa.nulls(n, f.type) for f in LISTS_SCHEMA if f.name not in cols})
        cols["source"] = batch.column("source")
    else:
        batch = batch.select(LISTS_SCHEMA.names).cast(LISTS_SCHEMA)
        cols = {f.name: batch.column(f.name) for f in LISTS_SCHEMA}
        cols["source"] = pa.nulls(batch.num_rows, source_type)
    return pa.table(cols, schema=pa.schema(list(LISTS_SCHEMA) + [pa.field("source", source_type)]))


def _query_schema(source_type) -> pa.Schema:
    return pa.schema([("product_id", pa.string()), ("source", source_type),
                      ("out_ids", pa.list_(pa.string())), ("out_w", pa.list_(pa.float64())),
                      ("in_ids", pa.list_(pa.string())), ("in_w", pa.list_(pa.float64())),
                      ("events", pa.float64()), ("nb_ids", pa.list_(pa.string())),
                      ("nb_w", pa.list_(pa.float64())), ("n_sim", pa.int64()),
                      ("wk_ids", pa.list_(pa.string())), ("wk_w", pa.list_(pa.float64()))])


def queries_by_source(block: pa.Table, source_type) -> pa.Table:
    """A key partition of the second pass -> one row per source (`QUERY_COLUMNS`): its vector,
    its own out and in lists and events, the out and in lists of its similar products
    (concatenated: `nb_ids`, `nb_w`) with how many of them are products (`n_sim`), and the walk
    term's second steps (`wk_ids`, `wk_w`: the entries `model.walk_lists` gives, each weight
    computed as there)."""
    schema = _query_schema(source_type)
    is_vec = np.asarray(pc.equal(block.column("role"), "vec").to_numpy(zero_copy_only=False), bool)
    vec = block.filter(pa.array(is_vec))
    if vec.num_rows == 0:
        return schema.empty_table()
    df = pl.from_arrow(block.filter(pa.array(~is_vec)).drop_columns(["source"]))
    own = df.filter(pl.col("role") == "own").unique("src", keep="first", maintain_order=True).select(
        "src", "out_ids", "out_w", "in_ids", "in_w", "events")
    sim = df.filter(pl.col("role") == "sim")
    n_sim = sim.group_by("src").agg(pl.len().cast(pl.Int64).alias("n_sim"))
    lent = pl.concat([sim.select("src", pl.col(f"{k}_ids").alias("nb_ids"), pl.col(f"{k}_w").alias("nb_w"))
                      .explode(["nb_ids", "nb_w"]) for k in ("out", "in")], how="vertical_relaxed")
    nb = lent.filter(pl.col("nb_ids").is_not_null()).group_by("src").agg("nb_ids", "nb_w")
    # the walk: A -> C with count(A, C) / events(A), C -> B with count(C, B) / events(C), the
    # operations in `model.walk_lists`' order so each entry is the same float
    walk = df.filter(pl.col("role") == "walk").join(
        own.select("src", pl.col("events").alias("ev_a")), on="src", how="left").with_columns(
        p1=(pl.col("step") / pl.max_horizontal(pl.col("ev_a").fill_null(0.0), pl.lit(1.0)))
        / pl.max_horizontal(pl.col("events"), pl.lit(1.0)))
    steps = pl.concat([walk.select("src", "p1", pl.col(f"{k}_ids").alias("wk_ids"), pl.col(f"{k}_w").alias("wk_w"))
                       .explode(["wk_ids", "wk_w"]) for k in ("out", "in")], how="vertical_relaxed")
    wk = (steps.filter(pl.col("wk_ids").is_not_null())
          .select("src", "wk_ids", (pl.col("wk_w") * pl.col("p1")).alias("wk_w"))
          .group_by("src").agg("wk_ids", "wk_w"))
    q = pl.DataFrame({"src": pl.from_arrow(vec.column("src"))}).join(
        own, on="src", how="left", maintain_order="left").join(
        nb, on="src", how="left", maintain_order="left").join(
        n_sim, on="src", how="left", maintain_order="left").join(
        wk, on="src", how="left", maintain_order="left")
    q = q.with_columns(pl.col("events").fill_null(0.0), pl.col("n_sim").fill_null(0))
    t = q.to_arrow()
    cols = {"product_id": vec.column("src"), "source": vec.column("source")}
    for f in schema:
        if f.name not in cols:
            cols[f.name] = t.column(f.name).cast(f.type)
    return pa.table(cols, schema=schema)


class RecommendShard(Step):
    """One shard of `Recommend`: the worker holds the target vectors of the products of shard
    `shard` only (its FAISS index, as `Recommend` builds it over every product) and, for the
    popularity term, their co-purchase events as the product bought. For each source row
    (`QUERY_COLUMNS`: its vector and the lists its score reads, attached by the keyed passes of
    `recommend_sharded`) it lists as candidates the shard's FAISS top (k + 1 + prior_candidates)
    and every extra candidate (the source's co-purchase lists, the most bought products, its
    similar products' lists) that lies in the shard, each with the model's FAISS score and the
    full score `Recommend._rerank` gives it. Without a prior, the shard's FAISS top k + 1."""

    name = "related_recommend_shard"
    resources = "related"
    model = True

    def __init__(self, recommend, targets_path: Path, bought_path: Path | None, shard: int,
                 shards: int, popular: list[str] | None = None):
        self.k, self.ivf_min_size, self.nprobe, self.seed = (recommend.k, recommend.ivf_min_size,
                                                             recommend.nprobe, recommend.seed)
        self.prior = dict(recommend.prior)
        self.prior_candidates = recommend.prior_candidates
        self.uses_prior, self.uses_popularity = recommend.uses_prior, recommend.uses_popularity
        self.uses_neighbours = recommend.uses_neighbours
        self.uses_walk = recommend.uses_walk
        self.targets_path = str(targets_path)
        self.bought_path = str(bought_path) if bought_path else None
        self.shard, self.shards = int(shard), int(shards)
        self.popular = list(popular or [])
        self.columns = tuple(QUERY_COLUMNS if self.uses_prior else ("product_id", "source"))
        self.index = self.ids = self.targets = self.bought = None

    def setup(self, env: WorkerEnv) -> None:
        from autoknow_ray.index.faiss_index import VectorIndex
        from autoknow_ray.modules.related.model import id_hash, rows_by_hash
        from autoknow_ray.modules.related.steps import _vectors, require_complete

        # this shard's folder of the targets (`write_by_shard`), read whole: its marker says the
        # write finished, and its row count that nothing was missed
        require_complete(self.targets_path, None)
        t = read_shard(self.targets_path, ["target"], self.shard, self.shards)
        require_complete(self.targets_path, t.num_rows)
        # rows in product id order, as `Recommend` orders every product's
        self.ids = t.column("product_id").combine_chunks() if t.num_rows else pa.array([], pa.string())
        dim = t.schema.field("target").type.list_size if t.num_rows else 1
        targets = _vectors(t.column("target"), dim) if t.num_rows else np.zeros((0, dim), np.float32)
        del t
        self.index = VectorIndex("ip", ivf_min_size=self.ivf_min_size, nprobe=self.nprobe,
                                 seed=self.seed).build(targets)
        h = id_hash(self.ids)
        self.order = np.argsort(h, kind="stable")
        self.sorted_hash = h[self.order]
        self._rows_by_hash = rows_by_hash
        if self.uses_prior:
            rows = self.index.stored_rows()
            self.targets = targets if rows is None else rows
            self.bought = np.zeros(len(self.ids))
            if self.uses_popularity and self.bought_path:
                require_complete(self.bought_path, None)
                b = read_shard(self.bought_path, ["bought"], self.shard, self.shards)
                require_complete(self.bought_path, b.num_rows)
                at = self.rows_of(b.column("product_id"))
                vals = b.column("bought").to_numpy(zero_copy_only=False).astype(np.float64)
                self.bought[at[at >= 0]] = vals[at >= 0]
            self.popular_rows = self.rows_of(pa.array(self.popular, pa.string()))
        del targets

    def rows_of(self, ids) -> np.ndarray:
        """Row in this shard of each id (-1: another shard's, or no product)."""
        return self._rows_by_hash(self.sorted_hash, self.order, _chunked(ids))

    def _padded(self, ids_col, w_col) -> tuple[np.ndarray, np.ndarray]:
        """A list column -> (rows in this shard, weights) per source row, padded with -1 and 0."""
        flat, parent, rank = _head(ids_col, np.iinfo(np.int64).max)
        n = len(ids_col)
        width = max(int(rank.max()) + 1 if len(rank) else 0, 1)
        rows = np.full((n, width), -1, np.int64)
        w = np.zeros((n, width))
        if len(flat):
            rows[parent, rank] = self.rows_of(flat)
            wf, wp, wr = _head(w_col, np.iinfo(np.int64).max)
            w[wp, wr] = np.asarray(wf.to_numpy(zero_copy_only=False), np.float64)
        w[rows < 0] = 0.0
        return rows, w

    def process_batch(self, batch: pa.Table) -> pa.Table:
        from autoknow_ray.modules.related.steps import _vectors

        q = _vectors(batch.column("source"), batch.schema.field("source").type.list_size)
        if self.index.ntotal == 0:  # a shard with no product: no candidate
            return CANDIDATES_SCHEMA.empty_table()
        top = self.k + 1 + (self.prior_candidates if self.uses_prior else 0)
        scores, ids = self.index.search(q, top)
        if not self.uses_prior:
            keep = ids >= 0
            r, c = np.nonzero(keep)
            return self._rows(batch, r, ids[keep], scores[keep], scores[keep].astype(np.float64),
                              np.ones(len(r), bool))
        return self._rerank(batch, q, scores, ids)

    def _rows(self, batch, r, cand, model, score, faiss) -> pa.Table:
        return pa.table({"src": batch.column("product_id").take(pa.array(r, pa.int64())),
                         "dst": self.ids.take(pa.array(cand, pa.int64())),
                         "model": pa.array(np.asarray(model, np.float32)),
                         "score": pa.array(np.asarray(score, np.float64)),
                         "faiss": pa.array(faiss), "extra": pa.array(~np.asarray(faiss, bool))},
                        schema=CANDIDATES_SCHEMA)

    def _rerank(self, batch: pa.Table, q: np.ndarray, faiss_scores: np.ndarray, ids: np.ndarray):
        """`Recommend._rerank`'s scores, for the candidates in this shard: the same terms over
        the same lists, a candidate of another shard left to that shard's worker."""
        from autoknow_ray.modules.related.model import (WALK_SCALE, list_weights, pair_dots,
                                                         prior_weights_of, summed_lists,
                                                         term_weights_of)

        n = batch.num_rows
        oi, ow = self._padded(batch.column("out_ids"), batch.column("out_w"))
        ii, iw = self._padded(batch.column("in_ids"), batch.column("in_w"))
        extra = [np.broadcast_to(self.popular_rows, (n, len(self.popular_rows)))]
        if self.uses_neighbours:
            nb_i, nb_w = self._padded(batch.column("nb_ids"), batch.column("nb_w"))
            n_sim = np.maximum(batch.column("n_sim").to_numpy(zero_copy_only=False).astype(np.float64), 1)
            extra.append(nb_i)
        if self.uses_walk:
            wk_i, wk_w = summed_lists(*self._padded(batch.column("wk_ids"), batch.column("wk_w")))
            extra.append(wk_i)
        cand = np.concatenate([ids, oi, ii, *extra], 1)
        is_faiss = np.zeros(cand.shape[1], bool)
        is_faiss[:ids.shape[1]] = True
        events = batch.column("events").to_numpy(zero_copy_only=False).astype(np.float64)
        pw = prior_weights_of(self.prior, events)
        wp = term_weights_of(self.prior, events, "popularity_bucket_weights") if self.uses_popularity else None
        wn = term_weights_of(self.prior, events, "neighbour_bucket_weights") if self.uses_neighbours else None
        count = list_weights(cand, oi, ow) + list_weights(cand, ii, iw)
        mean = list_weights(cand, nb_i, nb_w) / n_sim[:, None] if wn is not None else None
        score = pair_dots(q, self.targets, cand) + pw[:, None] * np.log1p(count)
        if wp is not None:
            score += wp[:, None] * np.log1p(self.bought[np.clip(cand, 0, None)])
        if wn is not None:
            score += wn[:, None] * np.log1p(mean)
        if self.uses_walk:
            ww = term_weights_of(self.prior, events, "walk_bucket_weights")
            score += ww[:, None] * np.log1p(WALK_SCALE * list_weights(cand, wk_i, wk_w))
        model = np.full(cand.shape, -np.inf, np.float32)
        model[:, :ids.shape[1]] = faiss_scores
        keep = cand >= 0
        r, col = np.nonzero(keep)
        return self._rows(batch, r, cand[keep], model[keep], score[keep], is_faiss[col])


def merge_recommend(block: pa.Table, k: int, faiss_top: int, uses_prior: bool) -> pa.Table:
    """A key partition of every shard's candidates -> each source's top k, as `Recommend` lists
    them over one index of every product: the FAISS candidates cut to the `faiss_top` best of all
    shards by the model's score (the search `Recommend` runs), the extra candidates joined,
    each product once, the source itself left out, the k best by full score (ties by id),
    ranks 1..k. Without a prior the FAISS candidates alone, by their score."""
    df = pl.from_arrow(block)
    if df.height == 0:
        return RELATED_SCHEMA.empty_table()
    by = ["src", "model", "dst"]
    faiss = (df.filter(pl.col("faiss")).sort(by, descending=[False, True, False])
             .group_by("src", maintain_order=True).head(faiss_top))
    cand = pl.concat([faiss.select("src", "dst", "score"),
                      df.filter(pl.col("extra")).select("src", "dst", "score")]) if uses_prior \
        else faiss.select("src", "dst", "score")
    top = (cand.unique(["src", "dst"], keep="first", maintain_order=True)
           .filter(pl.col("src") != pl.col("dst"))
           .sort(["src", "score", "dst"], descending=[False, True, False])
           .group_by("src", maintain_order=True).head(k)
           .with_columns(pl.int_range(1, pl.len() + 1).over("src").alias("rank")))
    return top.select(pl.col("src").alias("product_id"), pl.col("dst").alias("related_id"),
                      "rank", "score").to_arrow().cast(RELATED_SCHEMA)


def _first_schema(path, column: str):
    from autoknow_ray.pipeline import parquet_files

    for f in parquet_files(path):
        schema = pq.read_schema(str(f))
        if column in schema.names:
            return schema.field(column).type
    raise ValueError(f"{path}: no column {column!r}")


def _own_bought(batch: pa.Table) -> pa.Table:
    return pa.table({"product_id": batch.column("src"), "bought": batch.column("bought")})


def recommend_sharded(cfg, recommend, out: Path, dest: Path, n_nodes: int) -> dict:
    """`Recommend`'s related lists (product_id, related_id, rank, score), written to `dest`, with
    no worker holding more than one shard of the targets or of the node tables. `recommend` is
    the configured step: its settings (k, the prior's weights, the lists' widths) and tables."""
    from ray.data.expressions import col

    from autoknow_ray import runtime
    from autoknow_ray.pipeline import column_names, count_rows

    rc = cfg.related
    shards = shard_count(n_nodes, rc.max_nodes_per_actor)
    out, dest = storage.path(out), storage.path(dest)
    emb = storage.path(recommend.path)
    targets, bought, lists, queries, parts = (out / REC_TARGETS, out / REC_BOUGHT, out / REC_LISTS,
                                              out / REC_QUERIES, out / REC_PARTIALS)
    for p in (bought, lists, queries, parts, dest):
        storage.rmtree(p)
    write_by_shard(emb, ["target"], shards, targets)  # each shard's index reads its own folder
    popular: list[str] = []
    has_bought = False
    if recommend.uses_prior:
        # pass 1, keyed by node: each node's co-purchase lists (own rows), and the lists of the
        # similar products each source names (sim rows, keyed by the similar product)
        nb_path = storage.path(recommend.neighbours_path)
        has_weights = "weights" in column_names(nb_path)
        fanout = recommend.fanout if recommend.uses_neighbours else 0
        nb_cols = ["product_id", "kind", "neighbours", "weight_sum"] + (["weights"] if has_weights else [])
        rows_in = runtime.read_parquet(nb_path, nb_cols).map_batches(
            list_rows, fn_kwargs={"prior_candidates": recommend.prior_candidates, "fanout": fanout,
                                  "has_weights": has_weights, "walk": recommend.uses_walk},
            batch_format="pyarrow"
        ).union(runtime.read_parquet(emb, ["product_id"]).map_batches(node_rows, batch_format="pyarrow"))
        # at most: ask rows are <= fanout a list, walk asks <= prior_candidates
        n_in = count_rows(nb_path) * (max(1, fanout) + (recommend.prior_candidates if recommend.uses_walk
                                                         else 0)) + n_nodes
        runtime.map_key_blocks(rows_in, "key", lists_by_node, n_rows=n_in).write_parquet(str(lists))
        n_lists = count_rows(lists)
        if recommend.uses_popularity:
            own = runtime.read_parquet(lists, ["src", "role", "bought"]).filter(expr=col("role") == "own")
            # the (k + 1) most bought products, ties by id: Recommend's `popular`, capped in the workers
            top = runtime.top_keys(own, ["src"], {"bought": ("max", "bought")}, recommend.k + 1,
                                   [("bought", "desc")])
            popular = top.rows["src"].to_list() if top.rows.height else []
            write_by_shard(own.map_batches(_own_bought, batch_format="pyarrow"), ["bought"], shards, bought)
            has_bought = True
        # pass 2, keyed by source: its vector with every list its score reads
        source_type = _first_schema(emb, "source")
        width = getattr(source_type, "list_size", 64) or 64
        runtime.map_key_blocks(
            runtime.read_parquet(lists, list(LISTS_SCHEMA.names)).map_batches(
                _with_source, fn_kwargs={"source_type": source_type}, batch_format="pyarrow").union(
                runtime.read_parquet(emb, ["product_id", "source"]).map_batches(
                    _with_source, fn_kwargs={"source_type": source_type}, batch_format="pyarrow")),
            "src", queries_by_source, fn_args=(source_type,), n_rows=n_lists + n_nodes,
            max_rows=runtime.KEY_BLOCK_MAX_ROWS // max(1, width // 16)).write_parquet(str(queries))
        storage.rmtree(lists)
        q_path, q_cols = queries, QUERY_COLUMNS
    else:
        q_path, q_cols = emb, ["product_id", "source"]
    for s in range(shards):  # one shard pass at a time: a worker holds one shard's targets
        step = RecommendShard(recommend, shard_folder(targets, s),
                              shard_folder(bought, s) if has_bought else None, s, shards, popular)
        runtime.map_step(runtime.read_parquet(q_path, q_cols), step, cfg, n_nodes
                         ).write_parquet(str(parts / f"shard={s}"))
    for p in (targets, bought, queries):
        storage.rmtree(p)
    n_parts = count_rows(parts)
    faiss_top = recommend.k + 1 + (recommend.prior_candidates if recommend.uses_prior else 0)
    runtime.map_key_blocks(runtime.read_parquet(parts, list(CANDIDATES_SCHEMA.names)), "src",
                           merge_recommend, fn_args=(recommend.k, faiss_top, recommend.uses_prior),
                           n_rows=n_parts).write_parquet(str(dest))
    storage.rmtree(parts)
    return {"shards": shards, "candidate_rows": n_parts, "popular": len(popular)}
