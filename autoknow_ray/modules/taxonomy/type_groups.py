"""Surface variants of one new type grouped into one type, at the catalogue's own granularity.

A rebuild on titles of a type the taxonomy lacks finds it through the words its titles write, and
titles write many words for one type: the shoes of a catalogue become "Shoes", "Sneaker",
"Oxford", "Loafer", "Slip-On", "Sandal"… and words that are no type at all ("champagne", a
colour) hang on the same titles. Left apart, they are a dozen siblings of a few products each:
each one is placed from a handful of titles, and a title whose nearest titles are split between
them finds no agreement in the spread vote and stays untyped.

Whether two new types are one is decided by how the catalogue's **known** types relate to each
other. For every sampled product (the new types' products and the known types' reference
titles), its k nearest titles are looked up; the flow from type A to type B is the share of A's
products' neighbour slots that fall on B's products. Two distinct known types of this catalogue
send each other at most `threshold` of their slots (the largest flow between two known types
with at least k sampled products, and never below 1/k: one neighbour per product): that is how
close two types of this catalogue's granularity come. New types whose flow exceeds it are closer than any two types the catalogue keeps apart,
and are merged, the closest pair first (agglomerative, flows recomputed over the merged groups),
until no pair passes.

A group takes the name most of its titles write (`group_name`): of its members' names and their
head words ("Dust Masks" -> "Masks"), the one the most of its sampled titles contain, word for
word after stemming; a longer member name ending in that word is preferred where more than half
of the titles write it ("Laundry Detergent" over "Detergents"). Without titles, the member most
products took. The other names are its variants.

Without two known types of k sampled products there is nothing to calibrate on: new types are
merged only where the flow is a majority of the slots (`DEFAULT_THRESHOLD`).

Bounded: the caller passes a capped sample per type (the spread reference); the flows are a
types x types count matrix.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from autoknow_ray.index.faiss_index import VectorIndex
from autoknow_ray.index.knn_vote import normalize
from autoknow_ray.text import stem_tokens, type_key

DEFAULT_THRESHOLD = 0.5  # no known types to calibrate on: a majority of the neighbour slots


@dataclass
class TypeGroups:
    rename: dict[str, str] = field(default_factory=dict)  # member -> its group's name (members only)
    threshold: float | None = None  # the flow above which two new types merge
    source: str = "none"  # "known types" | "default" | "none" (nothing to group)
    known_types: int = 0  # known types the threshold was measured on

    def variants(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for member, rep in sorted(self.rename.items()):
            out.setdefault(rep, []).append(member)
        return out

    def report(self) -> dict:
        return {"threshold": None if self.threshold is None else round(float(self.threshold), 4),
                "source": self.source, "known_types": self.known_types,
                "types_merged": len(self.rename), "groups": len(set(self.rename.values()))}


def neighbour_counts(labels: list[str], vectors: np.ndarray, k: int, seed: int = 0
                     ) -> tuple[list[str], np.ndarray]:
    """(names, C): C[a, b] = how many of the k nearest other items of a's items are b's."""
    names = sorted(set(labels))
    pos = {t: i for i, t in enumerate(names)}
    lab = np.array([pos[t] for t in labels], dtype=np.int64)
    n = len(labels)
    counts = np.zeros((len(names), len(names)), dtype=np.int64)
    k = min(k, n - 1)
    if k < 1:
        return names, counts
    x = normalize(vectors)
    _, ids = VectorIndex(metric="ip", seed=seed).build(x).search(x, k + 1)
    ids = np.where(ids == np.arange(n)[:, None], -1, ids)  # the item itself is no neighbour
    order = np.argsort(ids < 0, axis=1, kind="stable")  # misses to the end, order kept
    ids = np.take_along_axis(ids, order, axis=1)[:, :k]
    valid = ids >= 0
    rows = np.repeat(lab, k)[valid.ravel()]
    np.add.at(counts, (rows, lab[ids[valid]]), 1)
    return names, counts


def group_name(members: set[str], titles: list[str], support: dict[str, float],
               reserved: set[str] = frozenset()) -> str:
    """The name most of a group's titles write (see the module's docstring). A head word that
    is a known type's key (`reserved`) is no candidate: the group is a new type."""
    by_support = sorted(members, key=lambda t: (-support.get(t, 0), t))
    keyed = [f" {type_key(t)} " for t in titles if isinstance(t, str)]
    if not keyed:
        return by_support[0]
    surfaces: dict[str, str] = {}  # key -> its surface: a member's own, else a member's head word
    for t in by_support:
        surfaces.setdefault(type_key(t), t)
    for t in by_support:
        words = t.split()
        if len(words) > 1 and len(stem_tokens(words[-1])) == 1 and type_key(words[-1]) not in reserved:
            surfaces.setdefault(type_key(words[-1]), words[-1])
    cover = {key: sum(f" {key} " in x for x in keyed) for key in surfaces if key}
    if not cover:
        return by_support[0]
    best = min(cover, key=lambda key: (-cover[key], surfaces[key] not in members, surfaces[key]))
    longer = [key for key in cover if key != best and key.endswith(f" {best}")
              and surfaces[key] in members and 2 * cover[key] > len(keyed)]
    if longer:
        best = min(longer, key=lambda key: (-cover[key], surfaces[key]))
    return surfaces[best]


def group_new_types(new_labels: list[str], new_vectors: np.ndarray, known_labels: list[str],
                    known_vectors: np.ndarray | None, support: dict[str, int], k: int,
                    seed: int = 0, titles: list[str] | None = None,
                    reserved: set[str] | None = None) -> TypeGroups:
    """Which new types are variants of one (see the module's docstring), and each group's
    name. `titles` (one per new-type vector) name the groups; `reserved`: the keys of the
    taxonomy's types (default: the known labels'), which no group may be named."""
    new_names = set(new_labels)
    if len(new_names) < 2:
        return TypeGroups()
    clash = new_names & set(known_labels)
    if clash:
        raise ValueError(f"new types also among the known: {sorted(clash)[:5]}")
    labels = list(new_labels) + list(known_labels)
    vecs = [np.asarray(new_vectors, np.float32)]
    if known_vectors is not None and len(known_labels):
        vecs.append(np.asarray(known_vectors, np.float32))
    names, counts = neighbour_counts(labels, np.concatenate(vecs), k, seed)
    slots = counts.sum(axis=1).astype(np.float64)
    pos = {t: i for i, t in enumerate(names)}
    sizes = np.zeros(len(names), dtype=np.int64)
    for t in labels:
        sizes[pos[t]] += 1
    flow = counts / np.maximum(slots, 1.0)[:, None]
    calib = [pos[t] for t in sorted(set(known_labels)) if sizes[pos[t]] >= k]
    if len(calib) >= 2:
        sub = flow[np.ix_(calib, calib)].copy()
        np.fill_diagonal(sub, -1.0)
        # never below one of each product's k nearest on average: known types that never touch
        # must not let a single stray neighbour merge two new ones
        threshold, source = max(float(sub.max()), 1.0 / k), "known types"
    else:
        threshold, source = DEFAULT_THRESHOLD, "default"

    ordered = sorted(new_names)
    new_idx = [pos[t] for t in ordered]
    c = counts[np.ix_(new_idx, new_idx)].astype(np.float64)
    s = slots[new_idx].copy()
    members = {i: {t} for i, t in enumerate(ordered)}
    active = np.ones(len(new_idx), dtype=bool)

    def pair_flows() -> np.ndarray:
        f = c / np.maximum(s, 1.0)[:, None]
        m = np.maximum(f, f.T)
        np.fill_diagonal(m, -1.0)
        m[~active, :] = -1.0
        m[:, ~active] = -1.0
        return m

    m = pair_flows()
    while True:
        a, b = np.unravel_index(int(np.argmax(m)), m.shape)
        if m[a, b] <= threshold:
            break
        c[a, :] += c[b, :]
        c[:, a] += c[:, b]
        s[a] += s[b]
        members[a] |= members.pop(b)
        active[b] = False
        m = pair_flows()

    keep_out = set(reserved) if reserved is not None else {type_key(t) for t in set(known_labels)}
    rename: dict[str, str] = {}
    for group in members.values():
        if len(group) < 2:
            continue
        texts = [x for x, t in zip(titles, new_labels) if t in group] if titles is not None else []
        rank = {t: support.get(t, 0) + sizes[pos[t]] / (1.0 + sizes.max()) for t in group}
        rep = group_name(group, texts, rank, keep_out)
        for t in group:
            if t != rep:
                rename[t] = rep
    return TypeGroups(rename, threshold, source, len(calib))


def merge_candidates(candidates: pl.DataFrame, groups: TypeGroups, max_examples: int) -> pl.DataFrame:
    """The new-type table with each group as one row (support and products summed, examples
    pooled) and its members' names in `variants`."""
    if not candidates.height:
        return candidates.with_columns(pl.lit([], dtype=pl.List(pl.String)).alias("variants"))
    rename = groups.rename
    cols = candidates.columns
    keyed = candidates.with_columns(
        pl.col("type").replace_strict(rename, default=pl.col("type")).alias("_group"))
    merged = (keyed.sort(["support", "type"], descending=[True, False])
              .group_by("_group", maintain_order=True)
              .agg(pl.col("support").sum(), pl.col("n_products").sum(),
                   pl.col("example_product_ids").list.explode(keep_nulls=False, empty_as_null=False)
                   .unique(maintain_order=True)
                   .head(max_examples).sort().alias("example_product_ids"),
                   pl.col("mean_score").mean().cast(pl.Float32),
                   pl.col("type").filter(pl.col("type") != pl.col("_group")).alias("variants"))
              .rename({"_group": "type"}))
    return (merged.select([*cols, "variants"]).cast({c: candidates.schema[c] for c in cols})
            .sort(["support", "type"], descending=[True, False]))
