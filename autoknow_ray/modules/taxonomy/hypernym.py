"""Hypernym classifier: attach new (or orphan) product types to their parent(s) in a taxonomy.

`HypernymClassifier.fit` learns from the existing taxonomy itself: every child → parent edge (at
every level) and a sample of product → type edges is a training list, made of the true parents
and hard negatives — the other candidates the same candidate generator proposes. Each
(child, candidate parent) pair is described by dataset-agnostic features (FEATURES); a small
torch MLP scores them with a pointwise (BCE) plus a listwise (softmax over a child's candidates)
loss. Whatever describes the candidate through its members (children names, subtree products,
neighbours' parents) is computed leave-one-out in training, so the child never sees itself.

Candidate parents of a child: the union of FAISS top-k lists (child name vs type names, child
name vs the centroid of each type's members, child products' centroid vs each type's subtree
products' centroid), the parents of the child's nearest members (types and typed products), the
types of its products' nearest products, and lexical matches (a type whose name is a contiguous
n-gram of the child's name).

Artifact: `model.safetensors` (MLP weights) + `config.json` (feature names, normalisation stats,
config, thresholds). The taxonomy context (embeddings, indexes) is rebuilt from the inputs:
after `load`, call `set_context(...)` or pass the inputs to `predict`.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from rapidfuzz import fuzz

from autoknow_ray import progress
from autoknow_ray.index.faiss_index import VectorIndex
from autoknow_ray.index.vectors import as_matrix
from autoknow_ray.modules.taxonomy.hypernym_config import HypernymConfig
from autoknow_ray.modules.taxonomy.types import (
    ancestors_map,
    stem_tokens,
    taxonomy_maps,
    type_key,
)

ARTIFACT_VERSION = 2
MAX_NGRAM = 6
MAX_OVERFETCH = 1024  # extra neighbours fetched to make up for excluded ones
# the grids fit chooses the type-edge share of the loss and the placement's ancestor credit on
# (HypernymClassifier._choose_placement), and the values taken where it cannot choose
TYPE_EDGE_SHARES = (0.2, 0.5)
ANCESTOR_CREDITS = (0.0, 0.1, 0.25, 0.5)
DEFAULT_TYPE_EDGE_SHARE = 0.2
DEFAULT_ANCESTOR_CREDIT = 0.1
# how cross-validation scores a placement: the true parent 1, one of its ancestors (too high: a
# smaller mistake than a wrong branch, a mistake still) this, elsewhere 0
CV_ANCESTOR_SCORE = 0.25

FEATURES = [
    # text: the child's name against the candidate's name and members
    "cos_name",  # cosine(child name, parent name)
    "cos_name_gap",  # cos_name minus the best cos_name among the child's candidates
    "cos_children_mean",  # cosine(child name, centroid of the parent's members' names/titles)
    "cos_children_mean_gap",
    "no_children",  # the parent has no members (indicator)
    # the child name's nearest existing types ("siblings") vote for their parents
    "tn_max",  # highest cosine between the child name and a child type of the parent
    "tn_max_gap",
    "tn_vote",  # softmax-weighted share of the nearest types whose parent it is
    "tn_vote_gap",
    "tn_sub_vote",  # share of the nearest types lying anywhere below it
    "tn_count",  # fraction of the nearest types that are its children
    # the child name's nearest product titles vote for their type (and its parents)
    "pn_max",
    "pn_vote",
    "pn_vote_gap",
    "pn_parent_vote",
    "pn_sub_vote",
    # products: the child's products against the parent's subtree products
    "cos_products",  # cosine(child products' title centroid, parent subtree products' centroid)
    "cos_products_gap",
    "no_products_signal",  # the child or the parent has no products (indicator)
    "prod_vote",  # share of the child's products' nearest products typed with the parent
    "prod_vote_gap",
    "prod_parent_vote",  # … whose type has the candidate as parent
    "prod_sub_vote",  # … lying in the parent's subtree
    "child_name_product_cos",  # cosine(child name, its products' centroid): ~1 for a product
    "child_log_products",
    "child_is_product",  # a product → type training edge (1), a type → parent edge or a new type (0)
    # behaviour
    "cp_share",  # share of the child's products' co-purchase neighbours typed with the parent
    "cp_sub_share",  # … lying in the parent's subtree
    "no_copurchase",  # indicator: no co-purchase signal for this child
    "query_share",  # same-query neighbours typed with the parent
    "query_sub_share",
    "no_query",
    # lexical
    "head_match",  # last token (stemmed) equal
    "parent_in_child",  # all the parent's tokens occur in the child's name
    "parent_head_in_child",  # the parent's last token occurs in the child's name
    "jaccard",  # token Jaccard
    "fuzz_ratio",  # rapidfuzz ratio / 100
    "fuzz_token_set",  # rapidfuzz token_set_ratio / 100
    # structure
    "depth",  # the parent's depth (0 = root), capped
    "log_type_children",
    "log_direct_products",
    "log_subtree_products",
    "is_root",
]
F = {name: i for i, name in enumerate(FEATURES)}


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


def _encode(encoder, texts: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros((0, 0), np.float32)
    return _normalize_rows(np.asarray(encoder.encode([t or "" for t in texts]), dtype=np.float32))


@dataclass
class _Child:
    key: str
    name: str
    vec: np.ndarray
    prod_pids: list[str] = field(default_factory=list)  # for behaviour (sampled)
    prod_vecs: np.ndarray | None = None  # sampled product title vectors
    prod_sum: np.ndarray | None = None  # sum of all its products' vectors
    prod_cnt: int = 0
    excl_types: set[int] = field(default_factory=set)
    excl_rows: set[int] = field(default_factory=set)
    n_excl_prods: int = 0  # products excluded through excl_types (for over-fetching)
    pos: set[int] = field(default_factory=set)
    loo_member_of: tuple[int, ...] = ()  # types whose members include the child …
    loo_member_vec: np.ndarray | None = None  # … with this vector
    loo_is_type: bool = False  # … as a child type (else as a direct product)
    loo_sub_of: tuple[int, ...] = ()  # types whose subtree products include the child's …
    loo_sub_vec: np.ndarray | None = None
    loo_sub_cnt: int = 0
    loo_direct_of: tuple[int, ...] = ()  # types the child is a direct product of
    hit: bool = False  # a true parent was among the generated candidates (training)
    is_product: bool = False  # a product → type edge (training), not a type to place


class _Context:
    """The existing taxonomy as arrays: names, embeddings, members, subtree sums, indexes."""

    def __init__(self, taxonomy, products, behavior, copurchase, encoder, cfg: HypernymConfig,
                 type_stats: pl.DataFrame | None = None):
        self.cfg = cfg
        self.encoder = encoder
        parents_map, _children_map = taxonomy_maps(taxonomy)
        anc_map = ancestors_map(parents_map)
        self.types: list[str] = sorted(parents_map)
        self.tidx = {t: i for i, t in enumerate(self.types)}
        T = len(self.types)
        if T == 0:
            raise ValueError("the taxonomy is empty")
        self.parents = [sorted(self.tidx[p] for p in parents_map[t]) for t in self.types]
        self.children: list[list[int]] = [[] for _ in range(T)]
        for c, ps in enumerate(self.parents):
            for p in ps:
                self.children[p].append(c)
        self.anc = [frozenset(self.tidx[a] for a in anc_map.get(t, ())) for t in self.types]
        self.desc: list[set[int]] = [set() for _ in range(T)]
        for t in range(T):
            for a in self.anc[t]:
                self.desc[a].add(t)
        # depth: hops from a root (BFS), roots (and cycle members) 0
        depth = np.full(T, -1, dtype=np.int64)
        frontier = [t for t in range(T) if not self.parents[t]]
        for t in frontier:
            depth[t] = 0
        while frontier:
            nxt = []
            for t in frontier:
                for c in self.children[t]:
                    if depth[c] < 0:
                        depth[c] = depth[t] + 1
                        nxt.append(c)
            frontier = nxt
        depth[depth < 0] = 0
        self.depth = depth
        # lexical
        self.tok = [stem_tokens(t) for t in self.types]
        self.tokset = [set(x) for x in self.tok]
        self.lower = [t.lower() for t in self.types]
        self.by_key: dict[str, list[int]] = defaultdict(list)
        for i, toks in enumerate(self.tok):
            if toks:
                self.by_key[" ".join(toks)].append(i)
        self.name_emb = _encode(encoder, self.types)
        self.dim = self.name_emb.shape[1]

        # ---- products typed with a known type ------------------------------------------------
        # `products`: a (capped) sample of the catalogue's products with `product_id`,
        # `product_type` and `title` or a precomputed `embedding` (title vectors from the workers)
        self.all_titles: dict[str, str] = {}
        key_to_type: dict[str, int] = {}
        for i, t in enumerate(self.types):
            key_to_type.setdefault(type_key(t), i)

        def type_index(pt) -> int | None:
            if pt is None:
                return None
            ti = self.tidx.get(pt)
            return key_to_type.get(type_key(pt)) if ti is None else ti

        rows_pid, rows_title, rows_type, rows_at = [], [], [], []
        given_vecs = None  # the sample's title vectors as one matrix (never a float per object)
        if products is not None and products.height:
            # in product-id order: the sample arrives in the workers' block order, and the rows'
            # order moves float sums and the product index's search in the last bits (an
            # incremental rebuild's blocks are not a full rebuild's: a new type's placement
            # confidence differed by 1e-6 at 20,000 products)
            products = products.sort("product_id", nulls_last=True, maintain_order=True)
            cols = products.columns
            n_rows = products.height
            ptypes = products.get_column("product_type").to_list() if "product_type" in cols else [None] * n_rows
            titles = products.get_column("title").to_list() if "title" in cols else [None] * n_rows
            if "embedding" in cols and products.get_column("embedding").null_count() == 0:
                given_vecs = as_matrix(products.get_column("embedding"), np.float32)
            for i, (pid, title, pt) in enumerate(zip(products.get_column("product_id").to_list(),
                                                     titles, ptypes)):
                if pid is None:
                    continue
                if title is not None:
                    self.all_titles[pid] = title
                ti = type_index(pt)
                if ti is None:
                    continue
                rows_pid.append(pid)
                rows_title.append(title or "")
                rows_type.append(ti)
                rows_at.append(i)
        self.prod_ids = rows_pid
        self.prow = {p: i for i, p in enumerate(rows_pid)}
        self.prod_type = np.asarray(rows_type, dtype=np.int64)
        P = len(rows_pid)
        if P and given_vecs is not None:
            self.prod_emb = _normalize_rows(given_vecs[np.asarray(rows_at, dtype=np.int64)])
        else:
            self.prod_emb = _encode(encoder, rows_title) if P else np.zeros((0, self.dim), np.float32)

        d = self.dim
        self.direct_sum = np.zeros((T, d), np.float32)
        self.direct_cnt = np.zeros(T, np.int64)
        if P:
            np.add.at(self.direct_sum, self.prod_type, self.prod_emb)
            self.direct_cnt = np.bincount(self.prod_type, minlength=T).astype(np.int64)
        if type_stats is not None and type_stats.height:
            # every typed product's count and title-vector sum per type, aggregated by the
            # workers: the centroids and sizes of the whole catalogue, not of the sample
            for pt, n, vsum in type_stats.select("type", "n", "sum").iter_rows():
                ti = type_index(pt)
                if ti is not None and n:
                    self.direct_cnt[ti] = int(n)
                    self.direct_sum[ti] = np.asarray(vsum, dtype=np.float32)
        self.prods_of_type: list[np.ndarray] = [np.zeros(0, np.int64)] * T
        if P:
            order = np.argsort(self.prod_type, kind="stable")
            bounds = np.searchsorted(self.prod_type[order], np.arange(T + 1))
            self.prods_of_type = [order[bounds[t] : bounds[t + 1]] for t in range(T)]
        # members of a type: its child types (names) and its direct products (titles)
        self.mem_sum = self.direct_sum.copy()
        self.mem_cnt = self.direct_cnt.copy()
        for c in range(T):
            for p in self.parents[c]:
                self.mem_sum[p] += self.name_emb[c]
                self.mem_cnt[p] += 1
        # subtree products
        self.sub_sum = self.direct_sum.copy()
        self.sub_cnt = self.direct_cnt.copy()
        for t in range(T):
            if self.direct_cnt[t]:
                for a in self.anc[t]:
                    self.sub_sum[a] += self.direct_sum[t]
                    self.sub_cnt[a] += self.direct_cnt[t]
        self.n_type_children = np.asarray([len(c) for c in self.children], np.int64)

        # ---- indexes ------------------------------------------------------------------------
        mk = lambda: VectorIndex(metric="ip", seed=cfg.seed)  # noqa: E731
        self.ix_name = mk().build(self.name_emb)
        self.cent_types = np.flatnonzero(self.mem_cnt > 0)
        self.ix_cent = mk().build(_normalize_rows(self.mem_sum[self.cent_types]))
        self.sub_types = np.flatnonzero(self.sub_cnt > 0)
        self.ix_sub = mk().build(_normalize_rows(self.sub_sum[self.sub_types])) if len(self.sub_types) else None
        self.ix_prod = mk().build(self.prod_emb) if P else None
        self.T, self.P = T, P

        # ---- behaviour ----------------------------------------------------------------------
        self.cp = self._copurchase_neighbors(copurchase)
        self.q_of, self.q_members = self._query_groups(behavior)

    # behaviour: neighbours restricted to typed products
    def _copurchase_neighbors(self, copurchase) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if copurchase is None or copurchase.height == 0 or self.P == 0:
            return {}
        cp = copurchase.select(
            pl.col("src").cast(pl.String), pl.col("dst").cast(pl.String),
            pl.col("count").cast(pl.Float64).fill_null(1.0),
        )
        both = pl.concat([
            cp.rename({"src": "a", "dst": "b"}),
            cp.rename({"dst": "a", "src": "b"}).select("a", "b", "count"),
        ])
        typed = pl.DataFrame({"b": self.prod_ids, "row": np.arange(self.P)})
        g = (
            both.filter(pl.col("a") != pl.col("b"))
            .group_by("a", "b").agg(pl.col("count").sum())
            .join(typed, on="b", how="inner")
            # ties in count broken by the neighbour's id: group_by gives its rows in no fixed
            # order, so a product with more than 100 neighbours kept another 100 from run to run
            .sort(["a", "count", "b"], descending=[False, True, False])
            .group_by("a", maintain_order=True)
            .agg(pl.col("row").head(100), pl.col("count").head(100))
        )
        return {
            a: (np.asarray(r, np.int64), np.log1p(np.asarray(c, np.float64)))
            for a, r, c in g.iter_rows()
        }

    def _query_groups(self, behavior):
        if behavior is None or behavior.height == 0 or self.P == 0:
            return {}, []
        b = behavior.select(
            pl.col("query").cast(pl.String), pl.col("product_id").cast(pl.String),
            pl.col("count").cast(pl.Float64).fill_null(1.0),
        ).filter(pl.col("query").is_not_null() & pl.col("product_id").is_not_null())
        g = (
            b.group_by("query", "product_id").agg(pl.col("count").sum())
            # ties in count broken by the product's id (as for co-purchases): a query with more
            # than `behavior_max_query_products` products kept another set, in another order,
            # from run to run, and the `query_share` features with it
            .sort(["query", "count", "product_id"], descending=[False, True, False])
            .group_by("query", maintain_order=True)
            .agg(pl.col("product_id").head(self.cfg.behavior_max_query_products), pl.col("count").head(self.cfg.behavior_max_query_products))
        )
        q_of: dict[str, list[int]] = defaultdict(list)
        members = []
        for _q, pids, counts in g.iter_rows():
            if len(pids) < 2:
                continue
            qi = len(members)
            rows = np.asarray([self.prow.get(p, -1) for p in pids], np.int64)
            w = np.log1p(np.asarray(counts, np.float64))
            keep = rows >= 0
            members.append((rows[keep], w[keep], list(pids)))
            for p in pids:
                q_of[p].append(qi)
        return dict(q_of), members

    # ---- children ---------------------------------------------------------------------------
    def type_child(self, c: int, rng: np.random.Generator) -> _Child:
        """A training child from an existing edge: type c (its subtree excluded)."""
        cfg = self.cfg
        sub = self.desc[c] | {c}
        rows = np.concatenate([self.prods_of_type[t] for t in sub]) if self.P else np.zeros(0, np.int64)
        ch = _Child(key=self.types[c], name=self.types[c], vec=self.name_emb[c])
        ch.excl_types = sub
        ch.n_excl_prods = len(rows)
        ch.pos = set(self.parents[c])
        ch.loo_member_of = tuple(self.parents[c])
        ch.loo_member_vec = self.name_emb[c]
        ch.loo_is_type = True
        if len(rows):
            ch.prod_sum = self.sub_sum[c].copy()
            ch.prod_cnt = int(self.sub_cnt[c])
            take = rows if len(rows) <= cfg.max_child_products else rng.choice(rows, cfg.max_child_products, replace=False)
            ch.prod_vecs = self.prod_emb[take]
            ch.prod_pids = [self.prod_ids[r] for r in take]
            ch.loo_sub_of = tuple(self.anc[c])
            ch.loo_sub_vec = ch.prod_sum
            ch.loo_sub_cnt = ch.prod_cnt
        return ch

    def product_child(self, r: int) -> _Child:
        """A training child from a product → type edge."""
        t = int(self.prod_type[r])
        v = self.prod_emb[r]
        ch = _Child(key=self.prod_ids[r], name=self.all_titles.get(self.prod_ids[r], ""), vec=v)
        ch.prod_pids = [self.prod_ids[r]]
        ch.prod_vecs = v[None, :]
        ch.prod_sum = v.copy()
        ch.prod_cnt = 1
        ch.excl_rows = {r}
        ch.pos = {t}
        ch.loo_member_of = (t,)
        ch.loo_member_vec = v
        ch.loo_sub_of = tuple(sorted({t} | set(self.anc[t])))
        ch.loo_sub_vec = v
        ch.loo_sub_cnt = 1
        ch.loo_direct_of = (t,)
        ch.is_product = True
        return ch

    def new_children(self, children: pl.DataFrame, rng: np.random.Generator) -> list[_Child]:
        """Children to place: `type` (+ optional `name`, `product_ids`, `titles`)."""
        cols = children.columns
        keys = children.get_column("type").to_list()
        names = children.get_column("name").to_list() if "name" in cols else keys
        pid_lists = children.get_column("product_ids").to_list() if "product_ids" in cols else [None] * len(keys)
        title_lists = children.get_column("titles").to_list() if "titles" in cols else [None] * len(keys)
        # `vectors`: the products' title vectors, aligned with `product_ids` (from the workers)
        vec_lists = children.get_column("vectors").to_list() if "vectors" in cols else [None] * len(keys)
        name_vecs = _encode(self.encoder, [n or k for n, k in zip(names, keys)])
        # product titles to embed (not in the context, no vector given)
        todo: dict[str, str] = {}
        per_child_titles: list[list[tuple[str | None, str, object]]] = []
        for pids, titles, given in zip(pid_lists, title_lists, vec_lists):
            pids = list(pids or [])
            titles = list(titles or [])
            given = list(given or [])
            items: list[tuple[str | None, str, object]] = []
            for j, p in enumerate(pids):
                t = titles[j] if j < len(titles) else self.all_titles.get(p)
                items.append((p, t if t is not None else "", given[j] if j < len(given) else None))
            for t in titles[len(pids):]:
                items.append((None, t, None))
            if len(items) > self.cfg.max_child_products:
                idx = rng.choice(len(items), self.cfg.max_child_products, replace=False)
                all_items = items
                items = [all_items[i] for i in sorted(idx)]
            per_child_titles.append(items)
            for p, t, v in items:
                if v is None and (p is None or p not in self.prow):
                    todo.setdefault(p or f"\0title:{t}", t)
        extra = dict(zip(todo, _encode(self.encoder, list(todo.values())))) if todo else {}
        out = []
        for key, name, vec, items in zip(keys, names, name_vecs, per_child_titles):
            ch = _Child(key=key, name=name or key, vec=vec)
            ti = self.tidx.get(key)
            if ti is not None:  # an orphan (or re-placed) type: never its own parent
                ch.excl_types = {ti} | self.desc[ti]
            vecs = []
            for p, t, v in items:
                if p is not None and p in self.prow:
                    r = self.prow[p]
                    ch.excl_rows.add(r)
                    vecs.append(self.prod_emb[r])
                elif v is not None:
                    vecs.append(_normalize_rows(np.asarray([v], dtype=np.float32))[0])
                else:
                    vecs.append(extra[p or f"\0title:{t}"])
                if p is not None:
                    ch.prod_pids.append(p)
            if vecs:
                ch.prod_vecs = np.stack(vecs)
                ch.prod_sum = ch.prod_vecs.sum(0)
                ch.prod_cnt = len(vecs)
            out.append(ch)
        return out

    # ---- candidates and features ------------------------------------------------------------
    def featurize(self, children: list[_Child], force_positive: bool = False, chunk: int = 512):
        """For each child: (candidate type indices [L], features [L, len(FEATURES)]).

        Children are searched in batches of similar over-fetch (the number of excluded
        vectors that may sit among their neighbours), capped at `MAX_OVERFETCH`."""
        out: list = [None] * len(children)
        over = np.asarray([len(c.excl_types) + c.n_excl_prods + len(c.excl_rows) for c in children])
        over = np.minimum(over, MAX_OVERFETCH)
        bucket = np.ceil(np.log2(over + 1)).astype(int)
        order = np.lexsort((over, bucket))
        groups: list[np.ndarray] = []
        for b in np.unique(bucket):
            idx = order[bucket[order] == b]
            groups += [idx[s : s + chunk] for s in range(0, len(idx), chunk)]
        for idx in groups:
            batch = [children[i] for i in idx]
            for i, res in zip(idx, self._featurize_batch(batch, int(over[idx].max()), force_positive)):
                out[i] = res
        return out

    def _search_types(self, index, id_map, q, k, excl_lists, need: int | None = None):
        if index is None or index.ntotal == 0 or len(q) == 0:
            return [[] for _ in range(len(q))], [[] for _ in range(len(q))]
        s, ids = index.search(q, min(k, index.ntotal))
        out_i, out_s = [], []
        for row in range(len(q)):
            ex = excl_lists[row]
            keep_i, keep_s = [], []
            for sc, j in zip(s[row], ids[row]):
                if j < 0:
                    continue
                t = int(id_map[j]) if id_map is not None else int(j)
                if t in ex:
                    continue
                keep_i.append(t)
                keep_s.append(float(sc))
                if need is not None and len(keep_i) >= need:
                    break
            out_i.append(keep_i)
            out_s.append(keep_s)
        return out_i, out_s

    def _featurize_batch(self, batch: list[_Child], over: int, force_positive: bool):
        cfg = self.cfg
        K = cfg.candidate_k
        n = len(batch)
        Q = np.stack([c.vec for c in batch]).astype(np.float32)
        excl = [c.excl_types for c in batch]
        over_t = min(over, self.T)
        kn = max(K, cfg.neighbor_k)
        name_i, name_s = self._search_types(self.ix_name, None, Q, kn + over_t, excl, need=kn)
        cent_i, _ = self._search_types(self.ix_cent, self.cent_types, Q, K + over_t, excl, need=K)
        # child product centroids vs subtree centroids (leave-one-out is applied in features)
        has_p = [c.prod_cnt > 0 for c in batch]
        sub_i = [[] for _ in range(n)]
        if self.ix_sub is not None and any(has_p):
            rows = [i for i in range(n) if has_p[i]]
            M = _normalize_rows(np.stack([batch[i].prod_sum for i in rows]))
            si, _ = self._search_types(self.ix_sub, self.sub_types, M, K + over_t, [excl[i] for i in rows], need=K)
            for i, lst in zip(rows, si):
                sub_i[i] = lst
        # the child name's nearest product titles, and its products' nearest products
        prod_nb = self._product_neighbors(batch, [c.vec[None, :] for c in batch], cfg.neighbor_k)
        pprod_nb = self._product_neighbors(
            batch, [c.prod_vecs if c.prod_vecs is not None else None for c in batch], cfg.product_neighbor_k
        )
        results = []
        for i, c in enumerate(batch):
            tnb = list(zip(name_i[i][: cfg.neighbor_k], name_s[i][: cfg.neighbor_k]))
            tv = self._vote(tnb, kind="type")
            pv = self._vote(prod_nb[i], kind="product")
            ppv = self._vote(pprod_nb[i], kind="product")
            cands: dict[int, None] = {}
            for lst in (name_i[i][:K], cent_i[i][:K], sub_i[i][:K]):
                for t in lst:
                    cands[t] = None
            for t in tv["vote"]:
                cands[t] = None
            for votes in (pv["vote"], ppv["vote"]):
                for t in sorted(votes, key=lambda t: -votes[t])[:K]:
                    cands[t] = None
                    for p in self.parents[t]:
                        if p not in c.excl_types:
                            cands[p] = None
            for t in self._lexical(c.name):
                if t not in c.excl_types:
                    cands[t] = None
            c.hit = any(t in cands for t in c.pos)
            if force_positive:
                for t in c.pos:
                    cands[t] = None
            cand = np.fromiter(cands.keys(), dtype=np.int64, count=len(cands))
            if len(cand) == 0:
                results.append((cand, np.zeros((0, len(FEATURES)), np.float32)))
                continue
            results.append((cand, self._features(c, cand, tv, pv, ppv)))
        return results

    def _product_neighbors(self, batch: list[_Child], queries: list, k: int) -> list[list[tuple[int, float]]]:
        """Per child: up to k nearest typed products (row, cosine) over all its query vectors,
        skipping its own products and products typed inside its excluded subtree."""
        out: list[list[tuple[int, float]]] = [[] for _ in batch]
        if self.ix_prod is None:
            return out
        rows, owner = [], []
        for i, q in enumerate(queries):
            if q is not None and len(q):
                rows.append(q)
                owner += [i] * len(q)
        if not rows:
            return out
        over = min(max(batch[i].n_excl_prods + len(batch[i].excl_rows) for i in set(owner)), MAX_OVERFETCH)
        s, ids = self.ix_prod.search(np.concatenate(rows).astype(np.float32), min(k + over, self.ix_prod.ntotal))
        for q, i in enumerate(owner):
            c = batch[i]
            got = 0
            for sc, r in zip(s[q], ids[q]):
                if r < 0 or r in c.excl_rows or int(self.prod_type[r]) in c.excl_types:
                    continue
                out[i].append((int(r), float(sc)))
                got += 1
                if got >= k:
                    break
        return out

    def _vote(self, nbrs, kind: str) -> dict:
        """Softmax-weighted votes of neighbours (types or typed products): `vote` for a
        neighbour's parent (a type's parents, a product's type), `parent` one level above that
        (products only), `sub` for every type above the neighbour; `max` the best cosine and
        `count` the number of neighbours per voted type."""
        vote: dict[int, float] = defaultdict(float)
        parent: dict[int, float] = defaultdict(float)
        sub: dict[int, float] = defaultdict(float)
        best: dict[int, float] = {}
        cnt: dict[int, int] = defaultdict(int)
        res = {"vote": vote, "parent": parent, "sub": sub, "max": best, "count": cnt}
        if not nbrs:
            return res
        tau = self.cfg.vote_temperature
        top = max(s for _, s in nbrs)
        total = 0.0
        for j, s in nbrs:
            w = math.exp((s - top) / tau)
            total += w
            if kind == "type":
                direct = self.parents[j]
                ancs = self.anc[j]
            else:
                t = int(self.prod_type[j])
                direct = (t,)
                ancs = self.anc[t] | {t}
                for p in self.parents[t]:
                    parent[p] += w
            for p in direct:
                vote[p] += w
                cnt[p] += 1
                if s > best.get(p, -2.0):
                    best[p] = s
            for a in ancs:
                sub[a] += w
        for d in (vote, parent, sub):
            for k in d:
                d[k] /= total
        return res

    def _lexical(self, name: str) -> list[int]:
        toks = stem_tokens(name)
        out = []
        for L in range(1, min(MAX_NGRAM, len(toks)) + 1):
            for s in range(0, len(toks) - L + 1):
                out += self.by_key.get(" ".join(toks[s : s + L]), [])
        return out

    def _behaviour(self, c: _Child):
        """(copurchase type weights, query type weights) over the child's products' neighbours."""
        cp_w: dict[int, float] = defaultdict(float)
        q_w: dict[int, float] = defaultdict(float)
        own = set(c.prod_pids)

        def add(rows, weights, acc: dict[int, float]) -> None:
            # neighbours outside the child itself vote for their type
            for r, w in zip(rows, weights):
                if r in c.excl_rows or self.prod_ids[r] in own:
                    continue
                t = int(self.prod_type[r])
                if t not in c.excl_types:
                    acc[t] += w

        for p in c.prod_pids:
            nb = self.cp.get(p)
            if nb is not None:
                add(*nb, cp_w)
            for qi in self.q_of.get(p, ()):
                rows, ws, _ = self.q_members[qi]
                add(rows, ws, q_w)
        return cp_w, q_w

    def _shares(self, tw: dict[int, float], cand: np.ndarray):
        total = sum(tw.values())
        direct = np.zeros(len(cand), np.float32)
        sub = np.zeros(len(cand), np.float32)
        if total <= 0:
            return direct, sub, False
        subw: dict[int, float] = defaultdict(float)
        for t, w in tw.items():
            subw[t] += w
            for a in self.anc[t]:
                subw[a] += w
        for k, p in enumerate(cand):
            direct[k] = tw.get(int(p), 0.0) / total
            sub[k] = subw.get(int(p), 0.0) / total
        return direct, sub, True

    def _features(self, c: _Child, cand, tv: dict, pv: dict, ppv: dict) -> np.ndarray:
        L = len(cand)
        X = np.zeros((L, len(FEATURES)), np.float32)
        v = c.vec
        X[:, F["cos_name"]] = self.name_emb[cand] @ v
        # members centroid, leave-one-out
        S = self.mem_sum[cand].copy()
        cnt = self.mem_cnt[cand].astype(np.float64).copy()
        if c.loo_member_of:
            pos = {p: k for k, p in enumerate(cand.tolist())}
            for p in c.loo_member_of:
                k = pos.get(p)
                if k is not None:
                    S[k] -= c.loo_member_vec
                    cnt[k] -= 1
        has = cnt > 0.5
        norms = np.linalg.norm(S, axis=1)
        cm = np.where(has, (S @ v) / np.maximum(norms, 1e-12), 0.0)
        X[:, F["cos_children_mean"]] = cm
        X[:, F["no_children"]] = (~has).astype(np.float32)
        # kNN votes
        cl = cand.tolist()
        X[:, F["tn_max"]] = [tv["max"].get(p, 0.0) for p in cl]
        X[:, F["tn_vote"]] = [tv["vote"].get(p, 0.0) for p in cl]
        X[:, F["tn_sub_vote"]] = [tv["sub"].get(p, 0.0) for p in cl]
        X[:, F["tn_count"]] = [tv["count"].get(p, 0) / self.cfg.neighbor_k for p in cl]
        X[:, F["pn_max"]] = [pv["max"].get(p, 0.0) for p in cl]
        X[:, F["pn_vote"]] = [pv["vote"].get(p, 0.0) for p in cl]
        X[:, F["pn_parent_vote"]] = [pv["parent"].get(p, 0.0) for p in cl]
        X[:, F["pn_sub_vote"]] = [pv["sub"].get(p, 0.0) for p in cl]
        # products
        if c.prod_cnt > 0:
            m = c.prod_sum / max(np.linalg.norm(c.prod_sum), 1e-12)
            SS = self.sub_sum[cand].astype(np.float64).copy()
            sc = self.sub_cnt[cand].astype(np.float64).copy()
            if c.loo_sub_of:
                pos = {p: k for k, p in enumerate(cl)}
                for p in c.loo_sub_of:
                    k = pos.get(p)
                    if k is not None:
                        SS[k] -= c.loo_sub_vec
                        sc[k] -= c.loo_sub_cnt
            hp = sc > 0.5
            cp = np.where(hp, (SS @ m) / np.maximum(np.linalg.norm(SS, axis=1), 1e-12), 0.0)
            X[:, F["cos_products"]] = cp
            X[:, F["no_products_signal"]] = (~hp).astype(np.float32)
            X[:, F["prod_vote"]] = [ppv["vote"].get(p, 0.0) for p in cl]
            X[:, F["prod_parent_vote"]] = [ppv["parent"].get(p, 0.0) for p in cl]
            X[:, F["prod_sub_vote"]] = [ppv["sub"].get(p, 0.0) for p in cl]
            X[:, F["child_name_product_cos"]] = float(m @ v)
        else:
            X[:, F["no_products_signal"]] = 1.0
        # behaviour
        cp_w, q_w = self._behaviour(c) if (self.cp or self.q_of) and c.prod_pids else ({}, {})
        d, s, ok = self._shares(cp_w, cand)
        X[:, F["cp_share"]], X[:, F["cp_sub_share"]], X[:, F["no_copurchase"]] = d, s, 0.0 if ok else 1.0
        d, s, ok = self._shares(q_w, cand)
        X[:, F["query_share"]], X[:, F["query_sub_share"]], X[:, F["no_query"]] = d, s, 0.0 if ok else 1.0
        # lexical
        ctoks = stem_tokens(c.name)
        cset = set(ctoks)
        chead = ctoks[-1] if ctoks else None
        clow = (c.name or "").lower()
        for k, p in enumerate(cl):
            ptoks = self.tok[p]
            pset = self.tokset[p]
            if ptoks and chead is not None:
                X[k, F["head_match"]] = float(ptoks[-1] == chead)
                X[k, F["parent_in_child"]] = float(pset <= cset)
                X[k, F["parent_head_in_child"]] = float(ptoks[-1] in cset)
                X[k, F["jaccard"]] = len(pset & cset) / len(pset | cset)
            X[k, F["fuzz_ratio"]] = fuzz.ratio(clow, self.lower[p]) / 100.0
            X[k, F["fuzz_token_set"]] = fuzz.token_set_ratio(clow, self.lower[p]) / 100.0
        # structure
        X[:, F["depth"]] = np.minimum(self.depth[cand], 10)
        n_kids = self.n_type_children[cand].astype(np.float64)
        if c.loo_is_type:
            for k, p in enumerate(cl):
                if p in c.loo_member_of:
                    n_kids[k] -= 1
        X[:, F["log_type_children"]] = np.log1p(np.maximum(n_kids, 0))
        direct = self.direct_cnt[cand].astype(np.float64)
        sub_cnt = self.sub_cnt[cand].astype(np.float64)
        if c.loo_direct_of:
            for k, p in enumerate(cl):
                if p in c.loo_direct_of:
                    direct[k] -= 1
        if c.loo_sub_of:
            loo = set(c.loo_sub_of)
            for k, p in enumerate(cl):
                if p in loo:
                    sub_cnt[k] -= c.loo_sub_cnt
        X[:, F["log_direct_products"]] = np.log1p(np.maximum(direct, 0))
        X[:, F["log_subtree_products"]] = np.log1p(np.maximum(sub_cnt, 0))
        X[:, F["is_root"]] = [float(not self.parents[p]) for p in cl]
        X[:, F["child_log_products"]] = math.log1p(c.prod_cnt)
        X[:, F["child_is_product"]] = float(c.is_product)
        # gaps to the child's best candidate
        for f in ("cos_name", "cos_children_mean", "tn_max", "tn_vote", "pn_vote", "cos_products", "prod_vote"):
            col = X[:, F[f]]
            X[:, F[f + "_gap"]] = col - col.max()
        return X


# the features in which a monotone model's score may only rise (`HypernymConfig.model`): the share
# of the child's neighbours (its products' nearest products, its name's nearest titles and types,
# its co-purchases and queries) lying in the candidate's subtree or among its children. Their
# role flips between the two kinds of training edge: for a product, the node above its nearest
# products' type is a negative (its type's parent); for a type, it is the parent (the nearest
# products are a sibling's). The product edges are many, the taxonomy's type edges few (18 on
# AE-110K under Google's branches), so an unconstrained model learns the products' sign and
# may put a new type anywhere but under the node its products point at (docs/taxonomy.md). The
# other features, and `child_is_product` which tells the two kinds apart, act either way.
MONOTONE_FEATURES = ["pn_parent_vote", "pn_sub_vote", "tn_sub_vote", "prod_parent_vote",
                     "prod_sub_vote", "cp_sub_share", "query_sub_share"]


class _MLP(torch.nn.Module):
    def __init__(self, n_in: int, hidden: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_in, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class _MonotoneMLP(torch.nn.Module):
    """The MLP's shape, non-decreasing in the MONOTONE_FEATURES: their first-layer weights and
    every later layer's are taken in absolute value, so only the other features can turn a score
    down (through the first layer, where they gate the units). Half the hidden units bend up
    (ReLU), half down (-ReLU(-x)), so a sum of them can follow a monotone curve of either shape
    (constrained monotonic networks, Runje & Shankaranarayana 2023). Features are standardised
    by a positive std, which keeps the direction."""

    def __init__(self, n_in: int, hidden: int):
        super().__init__()
        self.l1 = torch.nn.Linear(n_in, hidden)
        self.l2 = torch.nn.Linear(hidden, hidden)
        self.l3 = torch.nn.Linear(hidden, 1)
        mono = torch.zeros(n_in, dtype=torch.bool)
        mono[[F[f] for f in MONOTONE_FEATURES]] = True
        self.register_buffer("mono", mono, persistent=False)

    @staticmethod
    def _act(h: torch.Tensor) -> torch.Tensor:
        k = h.shape[-1] // 2
        return torch.cat([torch.relu(h[..., :k]), -torch.relu(-h[..., k:])], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1 = torch.where(self.mono, self.l1.weight.abs(), self.l1.weight)
        h = self._act(torch.nn.functional.linear(x, w1, self.l1.bias))
        h = self._act(torch.nn.functional.linear(h, self.l2.weight.abs(), self.l2.bias))
        return torch.nn.functional.linear(h, self.l3.weight.abs(), self.l3.bias).squeeze(-1)


class _Pair(torch.nn.Module):
    """An unconstrained MLP and a monotone one, trained apart, scoring by the mean of their logits
    (`HypernymConfig.model: pair`)."""

    def __init__(self, n_in: int, hidden: int, free: _MLP | None = None,
                 monotone: _MonotoneMLP | None = None):
        super().__init__()
        self.free = free if free is not None else _MLP(n_in, hidden)
        self.monotone = monotone if monotone is not None else _MonotoneMLP(n_in, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.free(x) + self.monotone(x)) / 2


MODELS = {"mlp": _MLP, "monotone": _MonotoneMLP, "pair": _Pair}


def _new_model(kind: str, hidden: int) -> torch.nn.Module:
    return MODELS[kind](len(FEATURES), hidden)


class HypernymClassifier:
    """Scores (child, candidate parent) pairs; see the module docstring."""

    def __init__(self, cfg: HypernymConfig | None = None):
        self.cfg = cfg or HypernymConfig()
        self.model: torch.nn.Module | None = None
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.ctx: _Context | None = None
        self.train_stats: dict = {}
        # the share of the taxonomy's type → parent edges whose parent has products of its own
        # (smoothed; fit measures it): how often a product type is a parent in this catalogue
        self.product_parent_share: float = 0.5

    # ---- context ----------------------------------------------------------------------------
    def set_context(self, taxonomy, products=None, behavior=None, copurchase=None, encoder=None,
                    type_stats: pl.DataFrame | None = None):
        """Index the taxonomy (and typed products, behaviour) that predictions attach to.
        `type_stats` (type, n, sum): per-type product counts and title-vector sums of the whole
        catalogue, where `products` is only a sample of it."""
        if encoder is None:
            raise ValueError("an encoder (TextEncoder-like) is needed")
        self.ctx = _Context(taxonomy, products, behavior, copurchase, encoder, self.cfg, type_stats)
        return self

    # ---- training ---------------------------------------------------------------------------
    def fit(self, taxonomy, products=None, behavior=None, copurchase=None, encoder=None,
            cfg: HypernymConfig | None = None, type_stats: pl.DataFrame | None = None):
        if cfg is not None:
            self.cfg = cfg
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        self.set_context(taxonomy, products, behavior, copurchase, encoder, type_stats)
        ctx = self.ctx
        children = [ctx.type_child(c, rng) for c in range(ctx.T) if ctx.parents[c]]
        n_type_edges = len(children)
        if ctx.P and cfg.product_edges:
            rows = rng.choice(ctx.P, min(cfg.product_edges, ctx.P), replace=False)
            children += [ctx.product_child(int(r)) for r in np.sort(rows)]
        if not children:
            raise ValueError("no edges to learn from: the taxonomy has no parent rows and no typed products")
        edges = [(c, p) for c in range(ctx.T) for p in ctx.parents[c]]
        with_products = sum(1 for _, p in edges if ctx.direct_cnt[p] > 0)
        self.product_parent_share = (with_products + 1) / (len(edges) + 2)
        feats = ctx.featurize(children, force_positive=True)
        lists = []
        for ch, (cand, X) in zip(children, feats):
            y = np.asarray([t in ch.pos for t in cand.tolist()], dtype=np.float32)
            neg = np.flatnonzero(y == 0)
            if len(neg) > cfg.negatives:
                neg = np.sort(rng.choice(neg, cfg.negatives, replace=False))
            keep = np.concatenate([np.flatnonzero(y == 1), neg])
            lists.append((X[keep], y[keep], ch.is_product))
        allX = np.concatenate([x for x, _, _ in lists])
        self.mean = allX.mean(0)
        self.std = allX.std(0) + 1e-6
        choice = self._choose_placement(children, feats, lists, rng)
        self.cfg = cfg = cfg.model_copy(update={"type_edge_share": choice["type_edge_share"],
                                                "ancestor_credit": choice["ancestor_credit"]})
        self.model, loss_hist = self._train(lists, cfg.type_edge_share)
        self.train_stats = {
            "type_edges": n_type_edges,
            "product_edges": len(children) - n_type_edges,
            "pairs": int(len(allX)),
            "mean_candidates": float(np.mean([len(c) for c, _ in feats])),
            "candidate_recall": float(np.mean([ch.hit for ch in children])),
            "final_loss": loss_hist[-1] if loss_hist else None,
            "product_parent_share": round(self.product_parent_share, 4),
            "placement": choice,
        }
        return self

    def _train(self, lists, share: float, verbose: bool = True) -> tuple[torch.nn.Module, list[float]]:
        """A fresh model of `cfg.model` trained on `lists` ([features, labels, is_product] per
        child), on one torch thread (a small MLP: a second thread only waits, nn/threads.py). A
        pair's two models are trained apart, each as it would be alone."""
        from autoknow_ray.nn.threads import torch_threads

        with torch_threads(1):
            if self.cfg.model != "pair":
                return self._train_one_thread(lists, share, verbose, self.cfg.model)
            free, _ = self._train_one_thread(lists, share, verbose, "mlp")
            monotone, hist = self._train_one_thread(lists, share, verbose, "monotone")
            return _Pair(len(FEATURES), self.cfg.hidden, free, monotone), hist

    def _train_one_thread(self, lists, share: float, verbose: bool,
                          kind: str) -> tuple[torch.nn.Module, list[float]]:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = _new_model(kind, cfg.hidden)
        Lmax = max(len(y) for _, y, _ in lists)
        N = len(lists)
        # the type → parent edges carry `share` of the loss, the product → type edges the rest
        # (these are many more, and teach a neighbouring task: a new type's parent is not the
        # type its products resemble most, which is a sibling)
        n_prod = sum(1 for *_, p in lists if p)
        n_type = N - n_prod
        share = share if n_prod and n_type else (0.0 if n_type == 0 else 1.0)
        W = np.asarray([(1 - share) / n_prod if p else share / n_type for *_, p in lists], np.float32) * N
        X = np.zeros((N, Lmax, len(FEATURES)), np.float32)
        Y = np.zeros((N, Lmax), np.float32)
        M = np.zeros((N, Lmax), bool)
        for i, (x, y, _) in enumerate(lists):
            X[i, : len(y)] = (x - self.mean) / self.std
            Y[i, : len(y)] = y
            M[i, : len(y)] = True
        X, Y, M, W = torch.from_numpy(X), torch.from_numpy(Y), torch.from_numpy(M), torch.from_numpy(W)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
        g = torch.Generator().manual_seed(cfg.seed)
        hist = []
        model.train()
        for _epoch in range(cfg.epochs):
            perm = torch.randperm(N, generator=g)
            tot = 0.0
            for s in range(0, N, cfg.batch_size):
                b = perm[s : s + cfg.batch_size]
                xb, yb, mb, wb = X[b], Y[b], M[b], W[b]
                logit = model(xb)
                wel = wb[:, None].expand_as(yb)[mb]
                bce = (torch.nn.functional.binary_cross_entropy_with_logits(
                    logit[mb], yb[mb], reduction="none") * wel).sum() / wel.sum()
                loss = bce
                if cfg.listwise_weight > 0:
                    lm = logit.masked_fill(~mb, -1e9)
                    lpos = lm.masked_fill(yb < 0.5, -1e9)
                    has_pos = (yb * mb).sum(1) > 0
                    lw_i = (torch.logsumexp(lm, 1) - torch.logsumexp(lpos, 1))[has_pos]
                    lw = (lw_i * wb[has_pos]).sum() / wb[has_pos].sum().clamp_min(1e-9)
                    loss = loss + cfg.listwise_weight * lw
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(b)
            sched.step()
            hist.append(tot / N)
            if verbose:
                progress.epoch_line("hypernym" if cfg.model != "pair" else f"hypernym ({kind})",
                                    _epoch + 1, cfg.epochs, {"loss": hist[-1]})
        model.eval()
        return model, hist

    def _choose_placement(self, children: list[_Child], feats, lists, rng) -> dict:
        """The type-edge share of the loss and the ancestor credit of `_decide_type`, chosen by
        cross-validation over the taxonomy's own type → parent edges (leaves and inner nodes, at
        every depth): each fold's types are left out of training and placed by a model trained on
        the rest, and each pair on the grids is scored by where those types land (their parent:
        1, an ancestor of it: CV_ANCESTOR_SCORE, elsewhere: 0). Where the config sets a value, it
        is kept; too few type edges for `calibration_folds` folds of two: the config's or the
        defaults."""
        cfg, ctx = self.cfg, self.ctx
        shares = [cfg.type_edge_share] if cfg.type_edge_share is not None else list(TYPE_EDGE_SHARES)
        credits = [cfg.ancestor_credit] if cfg.ancestor_credit is not None else list(ANCESTOR_CREDITS)
        type_rows = [i for i, ch in enumerate(children) if not ch.is_product]
        folds = cfg.calibration_folds
        out = {"type_edge_share": shares[0] if len(shares) == 1 else DEFAULT_TYPE_EDGE_SHARE,
               "ancestor_credit": credits[0] if len(credits) == 1 else DEFAULT_ANCESTOR_CREDIT,
               "source": "config or default"}
        if folds < 2 or len(type_rows) < 2 * folds or (len(shares) == 1 and len(credits) == 1):
            return out
        order = rng.permutation(len(type_rows))
        fold_of = {type_rows[int(j)]: k % folds for k, j in enumerate(order)}
        score = np.zeros((len(shares), len(credits)))
        for si, share in enumerate(shares):
            for f in range(folds):
                train = [lst for i, lst in enumerate(lists) if fold_of.get(i, -1) != f]
                held = [i for i in type_rows if fold_of[i] == f]
                model, _ = self._train(train, share, verbose=False)
                for i in held:
                    cand, X = feats[i]
                    if not len(cand):
                        continue
                    p = self.score(X, model)
                    ch = children[i]
                    for ci, credit in enumerate(credits):
                        t = ctx.tidx[self._decide_type(ch, cand, p, X, credit)[0][1]]
                        score[si, ci] += 1.0 if t in ch.pos else (
                            CV_ANCESTOR_SCORE if any(t in ctx.anc[q] for q in ch.pos) else 0.0)
        si, ci = np.unravel_index(int(np.argmax(score)), score.shape)  # ties: the first on the grids
        n = len(type_rows)
        return {"type_edge_share": float(shares[si]), "ancestor_credit": float(credits[ci]),
                "source": f"{folds}-fold cross-validation over {n} type edges",
                "score": round(float(score[si, ci]) / n, 4),
                "grid": {f"{a}/{b}": round(float(score[i, j]) / n, 4)
                         for i, a in enumerate(shares) for j, b in enumerate(credits)}}

    # ---- prediction -------------------------------------------------------------------------
    def score(self, X: np.ndarray, model: torch.nn.Module | None = None) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(((X - self.mean) / self.std).astype(np.float32))
            return torch.sigmoid((model or self.model)(x)).numpy()

    def predict(
        self,
        children,
        taxonomy=None,
        products=None,
        behavior=None,
        copurchase=None,
        encoder=None,
        cfg: HypernymConfig | None = None,
        type_stats: pl.DataFrame | None = None,
        kind: str = "type",
    ) -> pl.DataFrame:
        """Ranked parents of each child: [type, parent, score, rank, accepted].

        `children`: a DataFrame with `type` (and optional `name`, `product_ids` list, `titles`
        list), or a list of type names. `kind`: "type" (new or orphan types: `_decide_type`,
        placed anywhere in the tree, inner nodes included) or "product" (a product's type:
        `_decide_product`). Rows: the accepted parents first (rank 1 is the attachment), then the
        rest of the ranking, at least keep_top_k rows per child.
        Pass taxonomy/products/… (and encoder) to predict against another taxonomy than the one
        fitted (required after `load`)."""
        if self.model is None:
            raise RuntimeError("fit() or load() first")
        if kind not in ("type", "product"):
            raise ValueError(f"kind must be 'type' or 'product', got {kind!r}")
        if cfg is not None:
            self.cfg = cfg
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        if taxonomy is not None:
            self.set_context(taxonomy, products, behavior, copurchase,
                             encoder or (self.ctx.encoder if self.ctx else None), type_stats)
        if self.ctx is None:
            raise RuntimeError("no taxonomy context: pass taxonomy= (and encoder=) or call set_context")
        ctx = self.ctx
        if not isinstance(children, pl.DataFrame):
            children = pl.DataFrame({"type": list(children)}, schema={"type": pl.String})
        schema = {"type": pl.String, "parent": pl.String, "score": pl.Float32, "rank": pl.Int32, "accepted": pl.Boolean}
        if children.height == 0:
            return pl.DataFrame(schema=schema)
        rng = np.random.default_rng(cfg.seed)
        chs = ctx.new_children(children, rng)
        if kind == "product":
            for ch in chs:
                ch.is_product = True
        feats = ctx.featurize(chs)
        sizes = [len(c) for c, _ in feats]
        allX = np.concatenate([X for _, X in feats]) if sum(sizes) else np.zeros((0, len(FEATURES)), np.float32)
        probs = self.score(allX) if len(allX) else np.zeros(0, np.float32)
        rows = []
        off = 0
        for ch, (cand, X), L in zip(chs, feats, sizes):
            p = probs[off : off + L]
            off += L
            if L == 0:
                continue
            if kind == "product":
                rows += self._decide_product(ch, cand, p)
            else:
                rows += self._decide_type(ch, cand, p, X)
        return pl.DataFrame(rows, schema=schema, orient="row")

    def _decide_product(self, ch: _Child, cand: np.ndarray, p: np.ndarray) -> list[tuple]:
        """A product's type: every candidate with probability ≥ multi_parent_threshold (always the
        best one), an ancestor dropped where one of its descendants is accepted."""
        cfg, ctx = self.cfg, self.ctx
        order = np.argsort(-p, kind="stable")
        acc = [int(j) for j in order if p[j] >= cfg.multi_parent_threshold] or [int(order[0])]
        if cfg.prefer_specific and len(acc) > 1:
            acc_t = {int(cand[j]) for j in acc}
            acc = [j for j in acc if not any(int(cand[j]) in ctx.anc[o] for o in acc_t)]
        acc_set = set(acc)
        ranked = acc + [int(j) for j in order if int(j) not in acc_set]
        n_out = max(cfg.keep_top_k, len(acc))
        return [(ch.key, ctx.types[int(cand[j])], float(p[j]), r + 1, j in acc_set)
                for r, j in enumerate(ranked[:n_out])]

    def _decide_type(self, ch: _Child, cand: np.ndarray, p: np.ndarray, X: np.ndarray,
                     credit: float | None = None) -> list[tuple]:
        """Where a type goes in the whole tree, inner nodes included.

        The candidates' scores become a distribution (softmax over their logits). A candidate that
        is a product type with no types under it is more likely the child's sibling than its
        parent: the share of its mass that the catalogue's own taxonomy does not support (fit's
        `product_parent_share`: how many of its type → parent edges have a parent with products
        of its own) moves to that candidate's parents, unless the child's name ends in the
        candidate's head word ("Herbal Tea" under "Tea"). The parent is the node of highest
        expected worth: its own mass plus `credit` times the mass below it (attaching one or more
        levels too high is worth `credit` of the right attachment, a wrong branch nothing); its
        confidence, the mass of its subtree. A second parent is accepted only where its own mass
        reaches `second_parent_mass`, outside the first one's line."""
        cfg, ctx = self.cfg, self.ctx
        if credit is None:
            credit = cfg.ancestor_credit if cfg.ancestor_credit is not None else DEFAULT_ANCESTOR_CREDIT
        logit = np.log(np.clip(p, 1e-6, 1 - 1e-6)) - np.log(np.clip(1 - p, 1e-6, 1 - 1e-6))
        q = np.exp(logit - logit.max())
        q = q / q.sum()
        keep = self.product_parent_share
        mass: dict[int, float] = defaultdict(float)
        head_in = X[:, F["parent_head_in_child"]]
        for j, t in enumerate(cand.tolist()):
            sibling_like = ctx.direct_cnt[t] > 0 and ctx.n_type_children[t] == 0 and head_in[j] < 0.5
            ps = [a for a in ctx.parents[t] if a not in ch.excl_types]
            if sibling_like and ps:
                mass[t] += q[j] * keep
                for a in ps:
                    mass[a] += q[j] * (1 - keep) / len(ps)
            else:
                mass[t] += q[j]
        below: dict[int, float] = defaultdict(float)
        for t, m in mass.items():
            for a in ctx.anc[t]:
                if a not in ch.excl_types:
                    below[a] += m
        worth = {t: mass.get(t, 0.0) + credit * below.get(t, 0.0) for t in set(mass) | set(below)}
        # ties: the deeper node, then the index
        best = max(worth, key=lambda t: (worth[t], int(ctx.depth[t]), -t))
        acc = [best]
        for t in sorted(mass, key=lambda t: (-mass[t], t)):
            if mass[t] < cfg.second_parent_mass:
                break
            if all(t != a and t not in ctx.anc[a] and a not in ctx.anc[t] for a in acc):
                acc.append(t)
        support = {t: mass.get(t, 0.0) + below.get(t, 0.0) for t in acc}
        rest = sorted((t for t in worth if t not in acc), key=lambda t: (-worth[t], t))
        n_out = max(cfg.keep_top_k, len(acc))
        out = [(ch.key, ctx.types[t], float(support[t]), r + 1, True) for r, t in enumerate(acc)]
        out += [(ch.key, ctx.types[t], float(worth[t]), len(acc) + r + 1, False)
                for r, t in enumerate(rest[: n_out - len(acc)])]
        return out

    # ---- artifact ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        if self.model is None:
            raise RuntimeError("nothing to save: fit() first")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(path / "model.safetensors"))
        conf = {
            "kind": "hypernym_classifier",
            "version": ARTIFACT_VERSION,
            "features": FEATURES,
            "mean": [float(x) for x in self.mean],
            "std": [float(x) for x in self.std],
            "hidden": self.cfg.hidden,
            "multi_parent_threshold": self.cfg.multi_parent_threshold,
            "keep_top_k": self.cfg.keep_top_k,
            "product_parent_share": self.product_parent_share,
            "config": self.cfg.model_dump(),
            "train_stats": self.train_stats,
        }
        (path / "config.json").write_text(json.dumps(conf, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HypernymClassifier":
        from safetensors.torch import load_file

        path = Path(path)
        conf = json.loads((path / "config.json").read_text())
        if conf.get("features") != FEATURES:
            raise ValueError(f"{path}: the hypernym artifact was written by another version of "
                             f"this code (its features differ); fit the models again with `autoknow fit`")
        # a model saved before `model` was a setting is the unconstrained MLP
        self = cls(HypernymConfig(**{"model": "mlp", **conf["config"]}))
        self.mean = np.asarray(conf["mean"], np.float32)
        self.std = np.asarray(conf["std"], np.float32)
        self.model = _new_model(self.cfg.model, int(conf["hidden"]))
        try:
            self.model.load_state_dict(load_file(str(path / "model.safetensors")))
        except RuntimeError as e:  # weights of another kind or size than config.json says
            raise ValueError(f"{path}: model.safetensors does not hold the {self.cfg.model!r} "
                             f"classifier its config.json names; fit the models again with "
                             f"`autoknow fit`") from e
        self.model.eval()
        self.train_stats = conf.get("train_stats", {})
        self.product_parent_share = float(conf.get("product_parent_share", 0.5))
        return self
