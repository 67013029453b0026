"""The directed dual-embedding GNN (papers/related-products-gnn-article.txt), in plain torch.

Each product has a source and a target embedding. Layer 0 is the product metadata (title embedding
+ a hashed type embedding), the same for both roles. Each of the two hops then updates

    source(v) <- self source, mean target(u) over co-purchase OUT-neighbours u, mean source(w)
                 over similar products w
    target(v) <- self target, mean source(u) over co-purchase IN-neighbours u, mean target(w)
                 over similar products w

and a product bought with B scores B by source(A) . target(B). Neighbourhoods are padded index
arrays [nodes, fanout] (-1 = none), so a batch computes only its own two-hop neighbourhood: the
same code trains on a sampled subgraph and embeds a 10M-node catalogue batch by batch.
With `symmetric=True` it is the one-embedding ablation: co-purchase neighbours of both directions
feed one embedding that serves as source and target.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from torch import nn

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
N_DEGREE = 2  # log1p of the out- and in-co-purchase counts of a node


@dataclass
class GNNSettings:
    text_dim: int = 384
    type_buckets: int = 2048
    type_dim: int = 16
    dim: int = 64
    symmetric: bool = False
    encoder: str = "default"
    text_max_length: int = 32
    fanout: int = 10
    prior_weight: float = 0.0  # weight of log1p(co-purchase count) added to the score (fit picks it)
    # per bucket of the source's co-purchase events (lower bounds, from 0): the weight of its
    # bucket replaces `prior_weight`; absent in models saved before the buckets
    prior_buckets: list[int] | None = None
    prior_bucket_weights: list[float] | None = None
    # per bucket (the same buckets): the weight of log1p(B's co-purchase events as the product
    # bought) added to the score — popularity, for the products counts know little or nothing
    # of (fit picks it; bucket 0 on products stripped of their edges, as new listings are)
    popularity_bucket_weights: list[float] | None = None
    # … and of log1p(mean co-purchase events of B with A's similar products), the same buckets
    neighbour_bucket_weights: list[float] | None = None
    # … and of the two-step walk term, log1p(WALK_SCALE * P2(A, B)) (`walk_scores`), the same buckets
    walk_bucket_weights: list[float] | None = None
    # a learnt embedding per product (`RelatedConfig.id_embedding_rows`): rows of the source and
    # target tables added to the two-hop embeddings (0: none, as in models saved before them)
    id_rows: int = 0


def id_rows_of(settings: GNNSettings, base: np.ndarray, events: np.ndarray) -> np.ndarray:
    """Each product's learnt row: `base` (its id hash, or any stable non-negative number) mod
    the model's rows where it has co-purchase events (`events` > 0), -1 (none) where it has none
    (a new listing) or the model has no rows."""
    if not settings.id_rows:
        return np.full(len(events), -1, np.int64)
    rows = (np.asarray(base).astype(np.uint64) % np.uint64(settings.id_rows)).astype(np.int64)
    return np.where(np.asarray(events) > 0, rows, -1)


def type_bucket(types: list[str | None], buckets: int) -> np.ndarray:
    """Hash type names into `buckets` rows (0 = no type); stable across processes and catalogues,
    so a model fitted on one catalogue embeds the types of another it shares names with."""
    s = pl.Series("t", types, dtype=pl.String).str.to_lowercase().str.strip_chars()
    h = s.hash(seed=17).to_numpy().astype(np.uint64)
    out = (h % np.uint64(max(buckets - 1, 1))).astype(np.int64) + 1
    out[s.is_null().to_numpy()] = 0
    return out


def bucket_of(events: np.ndarray, buckets) -> np.ndarray:
    """Index of the bucket (lower bounds, rising from 0) that each co-purchase event count is in."""
    return np.clip(np.searchsorted(np.asarray(buckets), np.asarray(events), side="right") - 1, 0, None)


def prior_weights_of(settings: dict, events: np.ndarray) -> np.ndarray:
    """The count prior's weight for products with these co-purchase events: their bucket's weight
    where the model has buckets, else its one `prior_weight` (models saved before the buckets)."""
    buckets, weights = settings.get("prior_buckets"), settings.get("prior_bucket_weights")
    if buckets and weights and len(buckets) == len(weights):
        return np.asarray(weights, np.float64)[bucket_of(events, buckets)]
    return np.full(len(events), float(settings.get("prior_weight", 0.0) or 0.0))


def term_weights_of(settings: dict, events: np.ndarray, key: str) -> np.ndarray:
    """A score term's weight (`key`: `popularity_bucket_weights`, `neighbour_bucket_weights` or
    `walk_bucket_weights`) for
    products with these co-purchase events (their bucket's; 0 for a model without the term)."""
    buckets, weights = settings.get("prior_buckets"), settings.get(key)
    if buckets and weights and len(buckets) == len(weights):
        return np.asarray(weights, np.float64)[bucket_of(events, buckets)]
    return np.zeros(len(events))


# a two-step walk probability read as co-purchases per WALK_SCALE of the source's (the walk term
# is log1p(WALK_SCALE * P2)); on Instacart's validation pairs 50, 100 and 200 were within 0.001
WALK_SCALE = 100.0


def walk_lists(out_i: np.ndarray, out_w: np.ndarray, in_i: np.ndarray, in_w: np.ndarray,
               events: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two-step walk from each product of `rows` (-1: none) over the capped co-purchase lists
    (`out_i`/`in_i` [n, width] neighbour rows, -1 padded; `out_w`/`in_w` their counts; `events`
    each product's co-purchase events out + in): one step goes from A to a product C it was bought
    with, with probability count(A, C) / events(A), the next from C to B likewise. Returns the
    walk's entries per row of `rows` as ([len(rows), (2 width)^2] ids of B, -1 padded; their step
    probability products): `summed_lists` sums them per candidate into P2(A, B)."""
    r = np.clip(rows, 0, None)
    known = (rows >= 0)[:, None]
    first = np.concatenate([np.where(known, out_i[r], -1), np.where(known, in_i[r], -1)], 1)
    p1 = np.concatenate([out_w[r], in_w[r]], 1) / np.maximum(events[r], 1.0)[:, None]
    has = first >= 0
    c = np.clip(first, 0, None)
    p1 = np.where(has, p1 / np.maximum(events[c], 1.0), 0.0)
    hop = has[:, :, None]
    ids = np.concatenate([np.where(hop, out_i[c], -1), np.where(hop, in_i[c], -1)], 2)
    w = np.concatenate([out_w[c], in_w[c]], 2) * p1[:, :, None]
    w = np.where(ids >= 0, w, 0.0)
    return ids.reshape(len(rows), -1), w.reshape(len(rows), -1)


def summed_lists(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's list (`ids` [n, L], -1 padded; `weights` alike) with every id once and its
    weights summed, smallest first as `list_weights` sums them, so a row's sums depend on its
    entries and not on their order: ([n, U] ids, -1 padded, U the most distinct ids of a row;
    their sums). The walk's (2 width)^2 entries a row name the same best-sellers many times:
    summed once, the re-ranking scores each candidate once."""
    n = ids.shape[0]
    ok = ids >= 0
    if not ok.any():
        return np.full((n, 1), -1, np.int64), np.zeros((n, 1))
    rows = np.broadcast_to(np.arange(n)[:, None], ids.shape)[ok]
    vals = ids[ok]
    wt = np.broadcast_to(weights, ids.shape)[ok].astype(np.float64)
    order = np.lexsort((wt, vals, rows))
    r, v, w = rows[order], vals[order], wt[order]
    starts = np.flatnonzero(np.r_[True, (r[1:] != r[:-1]) | (v[1:] != v[:-1])])
    sums = np.add.reduceat(w, starts)
    ur, uv = r[starts], v[starts]
    rank = np.arange(len(ur)) - np.searchsorted(ur, ur, side="left")
    width = int(rank.max()) + 1
    out_i = np.full((n, width), -1, np.int64)
    out_w = np.zeros((n, width))
    out_i[ur, rank] = uv
    out_w[ur, rank] = sums
    return out_i, out_w


def list_weights(cand: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row r and column j: the sum of `weights[r, l]` over the entries l of row r's list with
    `ids[r, l] == cand[r, j]` (-1 pads a list and matches nothing; a -1 candidate gets 0).

    One sort of the lists and one binary search per candidate, row by row through a row offset
    on the ids: O((C + L) log) a row where comparing every candidate with every entry is
    O(C * L), which at the related stage's widths (~480 candidates against ~400 neighbour-list
    entries a product) was most of its top-k search. Each key's entries are summed smallest
    first, whatever the candidates and the list's order, so a row's figures do not depend on the
    batch it came in."""
    out = np.zeros(cand.shape, np.float64)
    if cand.size == 0 or ids.size == 0:
        return out
    n = ids.shape[0]
    span = np.int64(max(int(ids.max()), int(cand.max()), 0) + 1)
    offset = np.arange(n, dtype=np.int64)[:, None] * span
    ok = ids >= 0
    key = (ids + offset)[ok]
    if not key.size:
        return out
    wt = np.broadcast_to(weights, ids.shape)[ok].astype(np.float64)
    # a key's entries summed smallest first: the sum depends on the entries, not on their order
    # in the list (the sharded search gathers the same entries in another order)
    order = np.lexsort((wt, key))
    sk = key[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    keys = sk[starts]
    sums = np.add.reduceat(wt[order], starts)
    q = cand + offset
    pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    hit = (keys[pos] == q) & (cand >= 0)
    out[hit] = sums[pos[hit]]
    return out


PAIR_CHUNK = 65_536  # (row, candidate) pairs gathered at once


def pair_dots(q: np.ndarray, targets: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """`q[r] . targets[cand[r, j]]` for every listed candidate (`cand >= 0`), 0 where a slot is
    empty (-1). Only the listed targets are gathered: most of a re-ranking's slots are padding
    (a product's co-purchase and neighbour lists are mostly shorter than their width), and
    gathering a target vector for every slot (rows × ~480 × dim floats a batch) was most of the
    top-k step once its list sums were cheap. Each pair's dot product is computed alone, so it
    does not depend on the other pairs of the batch."""
    out = np.zeros(cand.shape, np.result_type(q.dtype, targets.dtype))
    r, c = np.nonzero(cand >= 0)
    for lo in range(0, len(r), PAIR_CHUNK):
        rr, cc = r[lo:lo + PAIR_CHUNK], c[lo:lo + PAIR_CHUNK]
        out[rr, cc] = np.einsum("nd,nd->n", q[rr], targets[cand[rr, cc]])
    return out


def id_hash(ids) -> np.ndarray:
    """64-bit hashes of product ids (a list or an Arrow string array): how workers match ids
    without holding a dict of strings."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    return pl.Series("id", ids, dtype=pl.String).hash(seed=3).to_numpy().astype(np.uint64)


def rows_by_hash(sorted_hash: np.ndarray, order: np.ndarray, ids) -> np.ndarray:
    """Row of each id (-1 where unknown) in a table whose id hashes, sorted, are `sorted_hash`
    (`order`: the argsort that sorted them)."""
    if not len(ids) or not len(sorted_hash):
        return np.full(len(ids), -1, np.int64)
    h = id_hash(ids)
    pos = np.clip(np.searchsorted(sorted_hash, h), 0, len(sorted_hash) - 1)
    return np.where(sorted_hash[pos] == h, order[pos], -1).astype(np.int64)


def masked_mean(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Mean of rows x[idx] over the last axis of idx [n, f], ignoring -1; zeros where none."""
    mask = (idx >= 0).unsqueeze(-1).to(x.dtype)
    g = x[idx.clamp(min=0)] * mask
    return g.sum(1) / mask.sum(1).clamp(min=1.0)


class DualGNN(nn.Module):
    def __init__(self, s: GNNSettings):
        super().__init__()
        self.settings = s
        d = s.dim
        self.type_emb = nn.Embedding(s.type_buckets, s.type_dim)
        self.inp = nn.Linear(s.text_dim + s.type_dim, d)
        self.l1_src = nn.Linear(3 * d + N_DEGREE, d)
        self.l2_src = nn.Linear(3 * d, d)
        if not s.symmetric:
            self.l1_tgt = nn.Linear(3 * d + N_DEGREE, d)
            self.l2_tgt = nn.Linear(3 * d, d)
        if s.id_rows:
            # zero at the start: a row no product trained stays zero (Adam moves no parameter
            # whose gradient was always zero), so it adds nothing to a product it was not fit on
            self.id_src = nn.Embedding(s.id_rows, d)
            nn.init.zeros_(self.id_src.weight)
            if not s.symmetric:
                self.id_tgt = nn.Embedding(s.id_rows, d)
                nn.init.zeros_(self.id_tgt.weight)

    def id_parameters(self) -> list:
        return [p for name, p in self.named_parameters() if name.startswith("id_")]

    def id_vectors(self, rows: torch.Tensor, table: str = "id_src") -> torch.Tensor:
        """[len(rows), dim]: each product's learnt row (`rows`, -1 = none: zeros)."""
        emb = getattr(self, table) if hasattr(self, table) else self.id_src
        have = (rows >= 0).unsqueeze(-1).to(emb.weight.dtype)
        return emb(rows.clamp(min=0)) * have

    def with_ids(self, nodes: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor,
                 id_rows: torch.Tensor | None):
        """The two-hop embeddings of `nodes` with their learnt rows added (`id_rows` [n]: every
        node's row, -1 = none; the symmetric model's one embedding takes the source table's)."""
        if id_rows is None or not self.settings.id_rows:
            return src, tgt
        r = id_rows[nodes]
        if self.settings.symmetric:
            e = src + self.id_vectors(r)
            return e, e
        return src + self.id_vectors(r), tgt + self.id_vectors(r, "id_tgt")

    def metadata(self, text: torch.Tensor, types: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        """Layer 0: the product's own metadata, its source and target embedding alike.
        `per_row`: at inference, one row at a time (`nn.encoder.per_row`): a row's h0 then does
        not depend on the other rows of its batch."""
        x = torch.cat([text, self.type_emb(types)], -1)
        if per_row:
            from autoknow_ray.nn.encoder import per_row as rows

            return torch.tanh(rows(self.inp, x))
        return torch.tanh(self.inp(x))

    def forward(self, nodes: torch.Tensor, h0: torch.Tensor, degree: torch.Tensor,
                out_nb: torch.Tensor, in_nb: torch.Tensor, sim_nb: torch.Tensor,
                id_rows: torch.Tensor | None = None):
        """Source and target embeddings [len(nodes), dim] after two hops.

        `h0` [n, dim] and `degree` [n, 2] cover every node that `nodes` reach in two hops;
        `out_nb`, `in_nb`, `sim_nb` [n, fanout] index into them (-1 = no neighbour); `id_rows`
        [n]: each node's learnt row (-1 = none) where the model has them."""
        # hop 1 runs on the nodes and their neighbours, hop 2 on the nodes alone
        nb = torch.cat([nodes[:, None], out_nb[nodes], in_nb[nodes], sim_nb[nodes]], 1)
        ring = torch.unique(nb[nb >= 0])
        pos = torch.full((h0.shape[0],), -1, dtype=torch.long, device=h0.device)
        pos[ring] = torch.arange(len(ring), device=h0.device)
        s1, t1 = self._hop1(ring, h0, degree, out_nb, in_nb, sim_nb)

        def local(idx):
            return torch.where(idx >= 0, pos[idx.clamp(min=0)], idx)

        src, tgt = self._hop2(pos[nodes], s1, t1, local(out_nb[nodes]), local(in_nb[nodes]),
                              local(sim_nb[nodes]))
        return self.with_ids(nodes, src, tgt, id_rows)

    def hop1_all(self, h0, degree, out_nb, in_nb, sim_nb, chunk: int = 65_536):
        """Hop-1 source and target embeddings of every node, chunk by chunk: computed once, they
        serve every batch (`forward_from_hop1`) instead of each batch recomputing the hop-1
        ring of its neighbourhood, which on a dense graph is most of the graph."""
        parts = [self._hop1(torch.arange(a, min(a + chunk, h0.shape[0]), device=h0.device),
                            h0, degree, out_nb, in_nb, sim_nb)
                 for a in range(0, h0.shape[0], chunk)]
        if not parts:
            empty = h0.new_zeros((0, self.settings.dim))
            return empty, empty
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def forward_from_hop1(self, nodes, s1, t1, out_nb, in_nb, sim_nb, id_rows=None):
        """What `forward` gives, from the hop-1 embeddings of every node (`hop1_all`)."""
        src, tgt = self._hop2(nodes, s1, t1, out_nb[nodes], in_nb[nodes], sim_nb[nodes])
        return self.with_ids(nodes, src, tgt, id_rows)

    def _hop2(self, me, s1, t1, o, i, w):
        if self.settings.symmetric:
            both = torch.cat([o, i], 1)
            e = self.l2_src(torch.cat([s1[me], masked_mean(s1, both), masked_mean(s1, w)], -1))
            return e, e
        src = self.l2_src(torch.cat([s1[me], masked_mean(t1, o), masked_mean(s1, w)], -1))
        tgt = self.l2_tgt(torch.cat([t1[me], masked_mean(s1, i), masked_mean(t1, w)], -1))
        return src, tgt

    def _hop1(self, ring, h0, degree, out_nb, in_nb, sim_nb):
        x, deg = h0[ring], degree[ring]
        o, i, w = out_nb[ring], in_nb[ring], sim_nb[ring]
        sim = masked_mean(h0, w)
        if self.settings.symmetric:
            e = torch.relu(self.l1_src(torch.cat([x, masked_mean(h0, torch.cat([o, i], 1)), sim, deg], -1)))
            return e, e
        # at layer 0 a node's source and target embeddings are both h0
        s1 = torch.relu(self.l1_src(torch.cat([x, masked_mean(h0, o), sim, deg], -1)))
        t1 = torch.relu(self.l1_tgt(torch.cat([x, masked_mean(h0, i), sim, deg], -1)))
        return s1, t1


def degree_features(out_weight: np.ndarray, in_weight: np.ndarray) -> np.ndarray:
    return np.stack([np.log1p(out_weight), np.log1p(in_weight)], 1).astype(np.float32)


def save(model: DualGNN, out: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps({**asdict(model.settings), **(extra or {})}, indent=2))


def load(folder: Path, device: str = "cpu") -> DualGNN:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS).exists():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS}; run `autoknow fit` with the related module")
    cfg = json.loads((folder / CONFIG).read_text())
    fields = GNNSettings.__dataclass_fields__
    model = DualGNN(GNNSettings(**{k: v for k, v in cfg.items() if k in fields}))
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model.to(device).eval()


def padded_neighbours(n: int, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, fanout: int,
                      rng: np.random.Generator | None = None) -> np.ndarray:
    """[n, fanout] neighbour indices per row, strongest first (ties, and with `rng` a small
    jitter, broken at random so a training epoch sees other neighbours of hubs)."""
    out = np.full((n, fanout), -1, dtype=np.int64)
    if len(rows) == 0:
        return out
    key = -np.log1p(weights.astype(np.float64))
    if rng is not None:
        key = key - rng.random(len(rows)) * 0.5
    order = np.lexsort((key, rows))
    r, c = rows[order], cols[order]
    start = np.searchsorted(r, r, side="left")
    rank = np.arange(len(r)) - start
    keep = rank < fanout
    out[r[keep], rank[keep]] = c[keep]
    return out
