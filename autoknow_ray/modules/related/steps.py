"""Per-product steps of the related-products module (the stage protocol, autoknow_ray.steps).

Workers load what they need in `setup()` from files on disk: the trained weights, and for the two
steps that look across products (text kNN, the two-hop embedding, the top-k search) the capped
per-node tables the stage wrote before them (vectors in fp16, at most `fanout` neighbours per node
and edge kind). That is per-worker memory of O(nodes x (dim + 3 fanout)), not the catalogue's text.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from autoknow_ray import storage
from autoknow_ray.index.vectors import as_matrix
from autoknow_ray.pipeline import column_names
from autoknow_ray.steps import CHEAP_ROWS_PER_CALL, Step, WorkerEnv

TEXT_DIM = 384
COMPLETE = "_COMPLETE.json"  # a table folder's marker: fully written, with its row count


def mark_complete(path: Path) -> int:
    """Marks a table folder as fully written, with its rows: the stage writes the marker once the
    write that fills the folder has returned, before it builds the step that reads the folder in
    its setup(). An empty dataset leaves no folder behind (Ray writes no file), so one is made."""
    import json

    from autoknow_ray.pipeline import count_rows

    path = storage.path(path)
    path.mkdir(parents=True, exist_ok=True)
    n = count_rows(path)
    (path / COMPLETE).write_text(json.dumps({"rows": n}))
    return n


def require_complete(path: Path, rows_read: int) -> None:
    """A setup() that loads a table another step writes reads it whole or not at all: without the
    marker the writer has not finished (a step of the same execution still writing it), and a row
    count other than the marker's is a partial read."""
    import json

    path = storage.path(path)
    marker = path / COMPLETE
    if not marker.exists():
        raise RuntimeError(f"{path}: not marked complete (no {COMPLETE}): the step reading it started "
                           "before the table was fully written; write it and mark_complete() it first")
    written = json.loads(marker.read_text())["rows"]
    if rows_read is not None and rows_read != written:  # None: a shard of the table was read
        raise RuntimeError(f"{path}: {rows_read} rows read, {written} written")


def _read(path: Path, columns: list[str]) -> pa.Table:
    path = storage.path(path)
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    tables = [pq.read_table(str(f), columns=columns) for f in files]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.table({c: [] for c in columns})
    return pa.concat_tables(tables)


def _vectors(col: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """`as_matrix`, with the width an empty column of a variable-length list type lacks."""
    m = as_matrix(col)
    return m if len(m) else np.zeros((0, dim), np.float32)


def _fixed(vecs: np.ndarray) -> pa.FixedSizeListArray:
    v = np.ascontiguousarray(vecs.astype(np.float16))
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])


class CheckEdges(Step):
    """Marks edges that cannot enter the graph (`_reason`): an endpoint that is not a product of
    the catalogue, a self-loop, a negative or zero count. The known ids arrive as 64-bit hashes
    loaded once per worker from the ingested products."""

    name = "related_check_edges"
    resources = "related"
    rows_per_call = CHEAP_ROWS_PER_CALL  # a hash and a sorted search per row
    model = True

    def __init__(self, products_path: Path, src: str, dst: str | None, count: str):
        self.products_path = str(products_path)
        self.src, self.dst, self.count = src, dst, count
        self.columns = tuple(c for c in (src, dst, count) if c) + (("query",) if dst is None else ())
        self.known = None

    def setup(self, env: WorkerEnv) -> None:
        from autoknow_ray.modules.related.model import id_hash

        ids = _read(storage.path(self.products_path), ["product_id"]).column("product_id")
        self.known = np.unique(id_hash(ids.to_pylist()))

    def _unknown(self, ids: pa.ChunkedArray) -> np.ndarray:
        from autoknow_ray.modules.related.model import id_hash

        h = id_hash(ids.to_pylist())
        pos = np.clip(np.searchsorted(self.known, h), 0, max(len(self.known) - 1, 0))
        found = (self.known[pos] == h) if len(self.known) else np.zeros(len(h), bool)
        return ~found

    def process_batch(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        reasons = np.full(n, None, dtype=object)
        counts = batch.column(self.count).to_numpy(zero_copy_only=False).astype(np.float64)
        counts = np.nan_to_num(counts, nan=1.0)
        src = batch.column(self.src)
        checks = [(self._unknown(src), f"unknown product in {self.src}")]
        if self.dst:
            dst = batch.column(self.dst)
            checks.append((self._unknown(dst), f"unknown product in {self.dst}"))
            checks.append((pc.equal(src, dst).to_numpy(zero_copy_only=False), "self-loop"))
        checks += [(counts < 0, "negative count"), (counts == 0, "zero count")]
        for mask, reason in checks:
            reasons[np.asarray(mask, bool) & (reasons == None)] = reason  # noqa: E711
        return batch.append_column("_reason", pa.array(reasons.tolist(), pa.string()))


class EmbedProducts(Step):
    """Title embedding (MiniLM, fp16 out), hashed type, and with a trained model its layer-0
    metadata embedding `h0`: the only per-product input the GNN needs."""

    name = "related_embed"
    resources = "related"
    columns = ("product_id", "title", "type")
    model = True

    def __init__(self, encoder: str, max_length: int, type_buckets: int, model_dir: Path | None,
                 vector_column: str | None = None):
        self.encoder_name, self.max_length = encoder, max_length
        self.type_buckets = type_buckets
        self.model_dir = str(model_dir) if model_dir else None
        # `vector_column`: the title vectors are already in the rows (module 1's title models
        # ran the same encoder at the same length and precision): read, not encoded again
        self.vector_column = vector_column
        if vector_column:
            self.columns = (*type(self).columns, vector_column)
            # no encoder: a few milliseconds per thousand rows, less than splitting the input
            self.split_input = False
        # the loaded GNN is `gnn`: `model` is the Step's flag (an actor pool, one setup per actor)
        self.encoder = self.gnn = None

    def setup(self, env: WorkerEnv) -> None:
        import torch

        from autoknow_ray.modules.related.model import load
        from autoknow_ray.nn.encoder import TextEncoder, set_cpu_threads

        set_cpu_threads(env.cpu_threads)
        self.env = env
        if not self.vector_column:
            self.encoder = TextEncoder(self.encoder_name, device=env.device,
                                       max_length=self.max_length, batch_size=max(env.batch_size, 64))
        if self.model_dir:
            self.gnn = load(Path(self.model_dir), "cpu")
            self.type_buckets = self.gnn.settings.type_buckets
        self.torch = torch

    def process_batch(self, batch: pa.Table) -> pa.Table:
        from autoknow_ray.modules.related.model import type_bucket

        from autoknow_ray.incremental import KEY

        # fp16 as written (and as fit trains on, from the nodes table): h0 is then the same
        # whether a vector was encoded here or read from module 1's table
        text = self._title_vectors(batch).astype(np.float16).astype(np.float32)
        types = type_bucket(batch.column("type").to_pylist(), self.type_buckets)
        cols = {"product_id": batch.column("product_id"), "text": _fixed(text),
                "type_bucket": pa.array(types, pa.int32())}
        if self.gnn is not None:
            with self.torch.inference_mode():
                # one row at a time: a product's h0 is the same whatever else is in its batch,
                # so a cached h0 (`rebuild --previous`) is the one a full rebuild computes
                h0 = self.gnn.metadata(self.torch.from_numpy(text), self.torch.from_numpy(types),
                                       per_row=True)
            cols["h0"] = _fixed(h0.numpy())
        if KEY in batch.column_names:  # a cached step's key passes through
            cols[KEY] = batch.column(KEY)
        return pa.table(cols)

    def _title_vectors(self, batch: pa.Table) -> np.ndarray:
        """[rows, dim] float32: the rows' own title vectors where `vector_column` gives them
        (a row without one, a title module 1 did not embed, is encoded here), else every title
        encoded (batch-invariant: same-length batches)."""
        titles = [t or "" for t in batch.column("title").to_pylist()]
        if not self.vector_column:
            return self.encoder.encode(titles)
        col = batch.column(self.vector_column).combine_chunks()
        if not col.null_count:
            return as_matrix(col)
        have = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), bool)
        vecs = np.zeros((len(titles), col.type.list_size), np.float32)
        vecs[have] = as_matrix(col.filter(pa.array(have)))
        if self.encoder is None:  # once per worker, as setup() would have
            from autoknow_ray.nn.encoder import TextEncoder

            self.encoder = TextEncoder(self.encoder_name, device=self.env.device, max_length=self.max_length)
        missing = np.flatnonzero(~have)
        vecs[missing] = self.encoder.encode([titles[i] for i in missing])
        return vecs


class TextNeighbours(Step):
    """Similarity edges where the logs have no co-views: each product's nearest titles (FAISS
    inner product over the normalised title embeddings; IVF past `ivf_min_size`)."""

    name = "related_text_knn"
    resources = "related"
    columns = ("product_id", "text")
    model = True

    def __init__(self, nodes_path: Path, k: int, ivf_min_size: int, nprobe: int, seed: int,
                 shard: int = 0, shards: int = 1):
        self.nodes_path, self.k = str(nodes_path), k
        self.ivf_min_size, self.nprobe, self.seed = ivf_min_size, nprobe, seed
        # with shards > 1 the worker indexes the products of one shard only
        # (related/sharded.py) and lists each query's k + 1 nearest of them, itself included:
        # `sharded.top_per_source` merges the shards' lists as one index over every product would
        self.shard, self.shards = int(shard), int(shards)
        self.index = self.ids = None

    def setup(self, env: WorkerEnv) -> None:
        from autoknow_ray.index.faiss_index import VectorIndex

        if getattr(self, "shards", 1) > 1:
            from autoknow_ray.modules.related.sharded import read_shard

            # the shard's own folder (sharded.write_by_shard): read whole, as its marker counts
            require_complete(self.nodes_path, None)
            t = read_shard(self.nodes_path, ["text"], self.shard, self.shards)
            require_complete(self.nodes_path, t.num_rows)
        else:
            t = _read(storage.path(self.nodes_path), ["product_id", "text"])
            require_complete(self.nodes_path, t.num_rows)
        # rows in product id order, not the order the shards were written in: index ids, and
        # so ties, are the same from run to run
        t = t.sort_by("product_id") if t.num_rows else t
        self.ids = t.column("product_id").combine_chunks() if t.num_rows else pa.array([], pa.string())
        self.index = VectorIndex("ip", ivf_min_size=self.ivf_min_size, nprobe=self.nprobe,
                                 seed=self.seed).build(_vectors(t.column("text"), TEXT_DIM))

    # candidates searched past k + 1: an exact index's scores (a matrix product over the batch)
    # move in their last bits with the batch they are computed in, so the nearest are re-scored
    # one pair at a time and cut again
    MARGIN = 5

    def _pair_scores(self, q: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Each candidate's inner product with its query alone, from the vectors the index
        holds (no second copy); an index that cannot give them back (IVF, whose list scans
        already score pair by pair) keeps its own scores."""
        try:
            rows = self.index.index.reconstruct_batch(np.clip(ids, 0, None).reshape(-1))
        except RuntimeError:
            return scores
        return np.einsum("nd,nkd->nk", q, rows.reshape(*ids.shape, -1))

    def process_batch(self, batch: pa.Table) -> pa.Table:
        q = _vectors(batch.column("text"), TEXT_DIM)
        scores, ids = self.index.search(q, self.k + 1 + self.MARGIN)
        # the best first, ties by product id (the index's row order); missing slots last
        if ids.size and self.index.ntotal:
            scores = self._pair_scores(q, ids, scores)
        scores = np.where(ids >= 0, scores, -np.inf)
        order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -scores))[:, :self.k + 1] \
            if ids.size else np.zeros((len(ids), 0), np.int64)
        ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
        src = np.repeat(np.arange(batch.num_rows), ids.shape[1])
        ids, scores = ids.reshape(-1), scores.reshape(-1)
        dst_ids = self.ids.take(pa.array(np.clip(ids, 0, None)))
        src_ids = batch.column("product_id").take(pa.array(src))
        keep = ids >= 0
        if getattr(self, "shards", 1) <= 1:  # sharded lists keep the query itself for the merge
            keep &= ~np.asarray(pc.equal(src_ids, dst_ids).to_numpy(zero_copy_only=False), bool)
        keep_a = pa.array(keep)
        return pa.table({"src": src_ids.filter(keep_a), "dst": dst_ids.filter(keep_a),
                         "weight": pa.array(scores[keep].astype(np.float32))})


def _read_neighbours(path: Path) -> pa.Table:
    cols = ["product_id", "kind", "neighbours", "weight_sum"]
    path = storage.path(path)
    return _read(path, cols + (["weights"] if "weights" in column_names(path) else []))


class NodeTables:
    """Every node's h0 and degree, with its capped neighbour lists, as index arrays: what a worker
    holds to compute two-hop embeddings for any batch of nodes. With `prior_width` it also holds
    up to that many co-purchase neighbours out and in with their counts (`out_prior`, `in_prior`:
    indices and weights), for re-ranking by the count prior."""

    def __init__(self, nodes_path: Path, neighbours_path: Path, fanout: int, with_h0: bool = True,
                 prior_width: int = 0):
        from autoknow_ray.modules.related.model import degree_features, id_hash

        cols = ["product_id", "h0"] if with_h0 else ["product_id"]
        t = _read(nodes_path, cols)
        require_complete(nodes_path, t.num_rows)
        # rows in product id order, not the order the shards were written in (a cached and a
        # fresh half, chunks): node indices, and so ties and FAISS ids, are the same however the
        # table was written
        t = t.sort_by("product_id") if t.num_rows else t
        self.ids = t.column("product_id").combine_chunks() if t.num_rows else pa.array([], pa.string())
        h = id_hash(self.ids.to_pylist())
        self.order = np.argsort(h, kind="stable")
        self.sorted_hash = h[self.order]
        n = len(self.ids)
        if with_h0:
            col = t.column("h0")
            dim = col.type.list_size
            self.h0 = _vectors(col, dim)
        nb = _read_neighbours(neighbours_path)
        require_complete(neighbours_path, nb.num_rows)
        self.out_nb = np.full((n, fanout), -1, np.int64)
        self.in_nb = np.full((n, fanout), -1, np.int64)
        self.sim_nb = np.full((n, fanout), -1, np.int64)
        if prior_width:
            self.out_prior = (np.full((n, prior_width), -1, np.int64), np.zeros((n, prior_width)))
            self.in_prior = (np.full((n, prior_width), -1, np.int64), np.zeros((n, prior_width)))
        out_w, in_w = np.zeros(n), np.zeros(n)
        for kind, arr, w in (("out", self.out_nb, out_w), ("in", self.in_nb, in_w),
                             ("similar", self.sim_nb, None)):
            rows = nb.filter(pc.equal(nb.column("kind"), kind))
            if rows.num_rows == 0:
                continue
            me = self.index_of(rows.column("product_id").to_pylist())
            lists = rows.column("neighbours").combine_chunks()
            flat = self.index_of(lists.flatten().to_pylist())
            offsets = lists.offsets.to_numpy()
            lengths = np.diff(offsets)
            r = np.repeat(me, lengths)
            rank = np.arange(len(flat)) - np.repeat(offsets[:-1], lengths)
            ok = (r >= 0) & (flat >= 0) & (rank < fanout)
            arr[r[ok], rank[ok]] = flat[ok]
            if w is not None:
                ws = rows.column("weight_sum").to_numpy(zero_copy_only=False)
                w[me[me >= 0]] = ws[me >= 0]
            if prior_width and kind != "similar" and "weights" in nb.column_names:
                idx, wt = self.out_prior if kind == "out" else self.in_prior
                per = rows.column("weights").combine_chunks().flatten().to_numpy(zero_copy_only=False)
                ok = (r >= 0) & (flat >= 0) & (rank < prior_width)
                idx[r[ok], rank[ok]] = flat[ok]
                wt[r[ok], rank[ok]] = per[ok]
        self.degree = degree_features(out_w, in_w)
        self.events = out_w + in_w  # co-purchase events out and in (the count prior's bucket)
        self.bought = in_w  # co-purchase events as the product bought (the popularity term)

    def index_of(self, ids: list) -> np.ndarray:
        """Row of each id (-1 where unknown)."""
        from autoknow_ray.modules.related.model import rows_by_hash

        return rows_by_hash(self.sorted_hash, self.order, ids)


# a worker computes the hop-1 embeddings of every node once (2 × dim floats a node) when the
# graph has at most this many nodes; past it, each batch computes its own hop-1 neighbourhood
HOP1_ONCE_MAX_NODES = 4_000_000


class DualEmbed(Step):
    """A batch of products -> their source and target embeddings after two hops."""

    name = "related_dual_embed"
    resources = "related"
    columns = ("product_id",)
    model = True

    def __init__(self, model_dir: Path, nodes_path: Path, neighbours_path: Path, fanout: int):
        self.model_dir, self.nodes_path = str(model_dir), str(nodes_path)
        self.neighbours_path, self.fanout = str(neighbours_path), fanout
        self.gnn = self.tables = None  # not `model`: the Step's flag

    def setup(self, env: WorkerEnv) -> None:
        import torch

        from autoknow_ray.modules.related.model import load
        from autoknow_ray.nn.encoder import set_cpu_threads

        set_cpu_threads(env.cpu_threads)
        self.torch = torch
        self.device = env.device
        self.gnn = load(Path(self.model_dir), env.device)
        self.tables = NodeTables(storage.path(self.nodes_path), storage.path(self.neighbours_path), self.fanout)
        t = self.tables
        self.t = {k: torch.from_numpy(getattr(t, k)).to(env.device)
                  for k in ("h0", "degree", "out_nb", "in_nb", "sim_nb")}
        # each product's learnt row (a model with `id_rows`): by its id hash, none without
        # co-purchase events (a new listing), as fit trained it
        self.id_rows = None
        if self.gnn.settings.id_rows:
            from autoknow_ray.modules.related.model import id_hash, id_rows_of

            self.id_rows = torch.from_numpy(id_rows_of(self.gnn.settings, id_hash(t.ids),
                                                       t.events)).to(env.device)
        self.hop1 = None
        if self.t["h0"].shape[0] <= HOP1_ONCE_MAX_NODES:
            with torch.inference_mode():
                self.hop1 = self.gnn.hop1_all(self.t["h0"], self.t["degree"], self.t["out_nb"],
                                                self.t["in_nb"], self.t["sim_nb"])

    def process_batch(self, batch: pa.Table) -> pa.Table:
        torch = self.torch
        idx = self.tables.index_of(batch.column("product_id").to_pylist())
        if (idx < 0).any():
            raise KeyError(f"{int((idx < 0).sum())} products of the batch are not in the node table")
        nodes = torch.from_numpy(idx).to(self.device)
        with torch.inference_mode():
            if self.hop1 is not None:
                s, t = self.gnn.forward_from_hop1(nodes, *self.hop1, self.t["out_nb"],
                                                    self.t["in_nb"], self.t["sim_nb"], self.id_rows)
            else:
                s, t = self.gnn(nodes, self.t["h0"], self.t["degree"], self.t["out_nb"],
                                  self.t["in_nb"], self.t["sim_nb"], self.id_rows)
        return pa.table({"product_id": batch.column("product_id"), "source": _fixed(s.float().cpu().numpy()),
                         "target": _fixed(t.float().cpu().numpy())})


class Recommend(Step):
    """Top-k related products of a batch: FAISS inner product of each source embedding against
    every target embedding (GPU index where FAISS has one; IVF past `ivf_min_size`).

    With a count prior (picked by `fit` on its validation pairs) the FAISS candidates and the
    product's co-purchase neighbours (up to `prior_candidates` each way) are re-ranked by
    source(A) . target(B) + w(A) * log1p(co-purchases of A and B, both directions), where w(A) is
    the weight of A's bucket of co-purchase events (`prior_buckets`, `prior_bucket_weights`), or
    the one `prior_weight` of a model saved before the buckets. With a popularity term
    (`popularity_bucket_weights`, picked by fit per bucket) the most bought products join the
    candidates and each candidate B adds wp(A) * log1p(B's co-purchase events as the product
    bought): where A has no behaviour its list leans on what sells. With a neighbour term
    (`neighbour_bucket_weights`) the co-purchase neighbours of A's similar products (up to
    `fanout` of them, `prior_candidates` each way) join the candidates, and each candidate B adds
    wn(A) * log1p(mean co-purchases of B with A's similar products): what products like A were
    bought with. With a walk term (`walk_bucket_weights`) the products reached in two steps over
    the co-purchase lists (A's partners' partners, `model.walk_lists`) join the candidates, and
    each candidate B adds ww(A) * log1p(WALK_SCALE * P2(A, B)), the chance that a walk of two
    co-purchase steps from A ends at B. Above `related.max_nodes_per_actor` products the stage
    lists the same with no worker holding every product (`sharded.recommend_sharded`)."""

    name = "related_recommend"
    resources = "related"
    columns = ("product_id", "source")
    model = True

    def __init__(self, embeddings_path: Path, k: int, ivf_min_size: int, nprobe: int, seed: int,
                 neighbours_path: Path | None = None, prior_weight: float = 0.0,
                 prior_candidates: int = 0, prior_buckets: list[int] | None = None,
                 prior_bucket_weights: list[float] | None = None,
                 popularity_bucket_weights: list[float] | None = None,
                 neighbour_bucket_weights: list[float] | None = None, fanout: int = 10,
                 walk_bucket_weights: list[float] | None = None):
        self.path, self.k = str(embeddings_path), k
        self.ivf_min_size, self.nprobe, self.seed = ivf_min_size, nprobe, seed
        self.neighbours_path = str(neighbours_path) if neighbours_path else None
        self.prior = {"prior_weight": float(prior_weight), "prior_buckets": prior_buckets,
                      "prior_bucket_weights": prior_bucket_weights,
                      "popularity_bucket_weights": popularity_bucket_weights,
                      "neighbour_bucket_weights": neighbour_bucket_weights,
                      "walk_bucket_weights": walk_bucket_weights}
        self.fanout = int(fanout)
        self.prior_candidates = int(prior_candidates)
        self.index = self.ids = self.tables = None

    @property
    def uses_popularity(self) -> bool:
        return bool(self.neighbours_path and max(self.prior.get("popularity_bucket_weights") or [0.0]) > 0)

    @property
    def uses_neighbours(self) -> bool:
        return bool(self.neighbours_path and self.prior_candidates
                    and max(self.prior.get("neighbour_bucket_weights") or [0.0]) > 0)

    @property
    def uses_walk(self) -> bool:
        return bool(self.neighbours_path and self.prior_candidates
                    and max(self.prior.get("walk_bucket_weights") or [0.0]) > 0)

    @property
    def uses_prior(self) -> bool:
        weights = self.prior["prior_bucket_weights"] or [self.prior["prior_weight"]]
        return (bool(max(weights) > 0 and self.prior_candidates and self.neighbours_path)
                or self.uses_popularity or self.uses_neighbours or self.uses_walk)

    def setup(self, env: WorkerEnv) -> None:
        from autoknow_ray.index.faiss_index import VectorIndex

        t = _read(storage.path(self.path), ["product_id", "target"])
        require_complete(self.path, t.num_rows)
        t = t.sort_by("product_id") if t.num_rows else t  # as NodeTables orders its rows
        self.ids = t.column("product_id").combine_chunks() if t.num_rows else pa.array([], pa.string())
        dim = t.schema.field("target").type.list_size if t.num_rows else 1
        targets = _vectors(t.column("target"), dim)
        self.index = VectorIndex("ip", ivf_min_size=self.ivf_min_size, nprobe=self.nprobe,
                                 seed=self.seed).build(targets)
        if self.uses_prior:
            # the index's own rows where it keeps them on the CPU (an exact index): no second
            # float32 copy of every target beside it
            self.targets = self.index.stored_rows()
            self.targets = targets if self.targets is None else self.targets
            # the node table is indexed like the embeddings, so its rows are the FAISS ids
            self.tables = NodeTables(storage.path(self.path), storage.path(self.neighbours_path),
                                     getattr(self, "fanout", 1) if self.uses_neighbours else 1, with_h0=False,
                                     prior_width=self.prior_candidates)
            # the most bought products (ties by row), candidates of every list with a popularity term
            self.popular = (np.argsort(-self.tables.bought, kind="stable")[:self.k + 1]
                            if self.uses_popularity else np.zeros(0, np.int64))
        del targets

    def process_batch(self, batch: pa.Table) -> pa.Table:
        q = _vectors(batch.column("source"), batch.schema.field("source").type.list_size)
        extra = self.prior_candidates if self.uses_prior else 0
        scores, ids = self.index.search(q, self.k + 1 + extra)
        if self.uses_prior:
            scores, ids = self._rerank(batch, q, ids)
        n, kk = ids.shape
        src = batch.column("product_id").take(pa.array(np.repeat(np.arange(n), kk)))
        flat = ids.reshape(-1)
        dst = self.ids.take(pa.array(np.clip(flat, 0, None)))
        keep = (flat >= 0) & ~np.asarray(pc.equal(src, dst).to_numpy(zero_copy_only=False), bool)
        keep = keep.reshape(n, kk)
        keep &= np.cumsum(keep, 1) <= self.k  # the k best other than the product itself
        rank = np.cumsum(keep, 1).astype(np.int32)
        m = pa.array(keep.reshape(-1))
        return pa.table({"product_id": src.filter(m), "related_id": dst.filter(m),
                         "rank": pa.array(rank.reshape(-1)[keep.reshape(-1)]),
                         "score": pa.array(scores.reshape(-1)[keep.reshape(-1)].astype(np.float32))})

    def _rerank(self, batch: pa.Table, q: np.ndarray, ids: np.ndarray):
        """Candidates = FAISS hits + co-purchase neighbours out and in; each scored by the model
        plus the count prior; duplicates and missing slots sink to the end (-1 ids)."""
        from autoknow_ray.modules.related.model import (WALK_SCALE, list_weights, pair_dots,
                                                         prior_weights_of, summed_lists,
                                                         term_weights_of, walk_lists)

        me = self.tables.index_of(batch.column("product_id").to_pylist())
        n = len(me)
        out_i, out_w = self.tables.out_prior
        in_i, in_w = self.tables.in_prior
        rows = np.clip(me, 0, None)
        known = (me >= 0)[:, None]
        oi, ow = np.where(known, out_i[rows], -1), np.where(known, out_w[rows], 0.0)
        ii, iw = np.where(known, in_i[rows], -1), np.where(known, in_w[rows], 0.0)
        extra = [np.broadcast_to(self.popular, (n, len(self.popular)))]
        if self.uses_neighbours:  # what A's similar products were bought with, both ways
            sims = np.where(known, self.tables.sim_nb[rows], -1)
            has = (sims >= 0)[:, :, None]
            at = np.clip(sims, 0, None)
            nb_i = np.concatenate([np.where(has, out_i[at], -1), np.where(has, in_i[at], -1)], 2).reshape(n, -1)
            nb_w = np.concatenate([np.where(has, out_w[at], 0.0), np.where(has, in_w[at], 0.0)], 2).reshape(n, -1)
            n_sim = np.maximum((sims >= 0).sum(1), 1)
            extra.append(nb_i)
        if self.uses_walk:  # two steps over the co-purchase lists: what A's partners were bought with
            wk_i, wk_w = summed_lists(*walk_lists(out_i, out_w, in_i, in_w, self.tables.events, me))
            extra.append(wk_i)
        cand = np.concatenate([ids, oi, ii, *extra], 1)
        count = list_weights(cand, oi, ow) + list_weights(cand, ii, iw)
        model = pair_dots(q, self.targets, cand)
        events = np.where(me >= 0, self.tables.events[rows], 0.0)
        score = model + prior_weights_of(self.prior, events)[:, None] * np.log1p(count)
        if self.uses_popularity:
            score += term_weights_of(self.prior, events, "popularity_bucket_weights")[:, None] * np.log1p(
                self.tables.bought[np.clip(cand, 0, None)])
        if self.uses_neighbours:
            wn = term_weights_of(self.prior, events, "neighbour_bucket_weights")
            score += wn[:, None] * np.log1p(list_weights(cand, nb_i, nb_w) / n_sim[:, None])
        if self.uses_walk:
            ww = term_weights_of(self.prior, events, "walk_bucket_weights")
            score += ww[:, None] * np.log1p(WALK_SCALE * list_weights(cand, wk_i, wk_w))
        srt = np.sort(cand, 1)
        dup = np.zeros_like(cand, bool)
        order = np.argsort(cand, 1, kind="stable")
        dup_sorted = np.zeros_like(srt, bool)
        dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
        np.put_along_axis(dup, order, dup_sorted, 1)
        score[(cand < 0) | dup] = -np.inf
        best = np.argsort(-score, 1, kind="stable")[:, :self.k + 1]
        out_ids = np.take_along_axis(cand, best, 1)
        out_sc = np.take_along_axis(score, best, 1)
        out_ids[~np.isfinite(out_sc)] = -1
        return out_sc, out_ids
