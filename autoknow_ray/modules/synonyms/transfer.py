"""What the fit catalogue's own duplicate listings normalised, as evidence for a pair it never saw.

A catalogue that lists one item twice, once as the supplier wrote it and once as its own data team
normalised it, teaches more than "these two strings name one thing": it teaches its conventions.
"Xeon E5430", "Intel Xeon E5-2603" and "Xeon-mp" were each listed beside "Intel Xeon Series";
"Ultra320 SCSI" and "U160 SCSI" beside "SCSI Interfaces". No string or sentence similarity sees
that a new "Xeon E5530" belongs with "Intel Xeon Series", but its nearest fit terms all went there.

Fit keeps, per (kind, attribute), each co-listed term of its sample with its **canonical**: the
partner the catalogue writes most often, where that partner is written more often than the term
itself (else the term is its own canonical). Only direct partners count, never chains through
several listings, so one messy listing cannot pull a whole attribute into one term. The pair
feature `canonical_vote` of (a, b) is then the share of a's `k` nearest fit terms (cosine-weighted,
never a or b themselves) whose canonical is b, or of b's whose canonical is a, whichever is larger.
Fit computes it for its own training pairs the same way (a pair's own two terms never vote), so
the classifier learns what the vote is worth beside the string and embedding features, and the
calibrated threshold covers it. A catalogue whose terms are unlike the fit's gets votes near 0,
and the pair classifier is left with its other features.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl

TABLE = "canonical_votes.parquet"  # kind, attribute, term, canonical
VECTORS = "canonical_votes.safetensors"  # the terms' encoder vectors, in TABLE's row order
FEATURE = "canonical_vote"
CHUNK = 4096  # query rows per similarity block (4,096 x a 20,000-term group: 330 MB)


def canonical_table(rows: pl.DataFrame, colisted: set[tuple[str, str, str, str]],
                    max_terms: int, seed: int) -> pl.DataFrame:
    """(kind, attribute, term, canonical) of every co-listed term of `rows` (title_key, kind,
    attribute, term): its most often written partner where that is written more often than the
    term (ties by the term's string), else the term. At most `max_terms` rows (a seeded sample)."""
    counts = Counter((k, a, t) for k, a, t in rows.select("kind", "attribute", "term").iter_rows())
    partners: dict[tuple[str, str, str], set[str]] = {}
    for k, a, x, y in colisted:
        partners.setdefault((k, a, x), set()).add(y)
        partners.setdefault((k, a, y), set()).add(x)
    out = []
    for (k, a, t), ps in sorted(partners.items()):
        best = max(ps, key=lambda p: (counts[(k, a, p)], p))
        out.append((k, a, t, best if (counts[(k, a, best)], best) > (counts[(k, a, t)], t) else t))
    df = pl.DataFrame(out, schema={"kind": pl.String, "attribute": pl.String, "term": pl.String,
                                   "canonical": pl.String}, orient="row")
    if df.height > max_terms:
        df = df.sample(max_terms, seed=seed).sort(["kind", "attribute", "term"])
    return df


class CanonicalVotes:
    """The fit table with its vectors, grouped by (kind, attribute), and the vote of term pairs."""

    def __init__(self, table: pl.DataFrame, vectors: np.ndarray, k: int):
        self.k = int(k)
        self.table = table
        self.vectors = np.asarray(vectors, np.float32)
        self.groups: dict[tuple[str, str], tuple[list[str], list[str], np.ndarray, np.ndarray]] = {}
        for (kind, attr), g in table.with_row_index("_i").group_by(["kind", "attribute"],
                                                                    maintain_order=True):
            idx = g["_i"].to_numpy()
            self.groups[(kind, attr)] = (g["term"].to_list(), g["canonical"].to_list(),
                                         self.vectors[idx], self.vectors[idx].astype(np.float64))

    def __len__(self) -> int:
        return self.table.height

    def _neighbours(self, kind: str, attr: str, vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Each row's k + 2 nearest fit terms of the group (indices, cosines), best first; the two
        spare places let a pair drop its own two terms."""
        g = self.groups.get((kind, attr))
        if g is None or len(vecs) == 0:
            return None
        m = min(self.k + 2, len(g[0]))
        vecs = np.asarray(vecs, np.float32)
        idx = np.zeros((len(vecs), m), np.int64)
        top = np.zeros((len(vecs), m), np.float32)
        for a in range(0, len(vecs), CHUNK):  # a chunk's similarities at a time, never all of them
            # in float64, rounded to float32: a block's product otherwise moves in the last bits
            # with the other rows of its block, and a pair's vote is part of its cached score's key
            sims = (vecs[a:a + CHUNK].astype(np.float64) @ g[3].T).astype(np.float32)
            # the m best, equal cosines (one uncased vector for "Black" and "black") taken in the
            # table's row order: every term above the m-th best cosine, then the ties at it
            kth = -np.partition(-sims, m - 1, axis=1)[:, m - 1]
            for r in range(len(sims)):
                cand = np.flatnonzero(sims[r] >= kth[r])
                best = cand[np.lexsort((cand, -sims[r, cand]))[:m]]
                idx[a + r] = best
                top[a + r] = sims[r, best]
        return idx, top

    def _one_way(self, terms_g, canon_g, idx, sims, own: str, other: str) -> float:
        total, used = 0.0, 0
        for j, s in zip(idx.tolist(), sims.tolist()):
            t = terms_g[j]
            if t == own or t == other:
                continue
            if canon_g[j] == other:
                total += max(float(s), 0.0)
            used += 1
            if used == self.k:
                break
        return total / self.k

    def pair_votes(self, kind: list[str], attribute: list[str], term_a: list[str], term_b: list[str],
                   vec_a: np.ndarray, vec_b: np.ndarray) -> np.ndarray:
        """`canonical_vote` of each pair (row i: term_a[i] with vec_a[i], term_b[i] with vec_b[i],
        vectors L2-normalised), 0 where the pair's group has no fit term."""
        out = np.zeros(len(term_a), np.float32)
        if not len(term_a) or not self.groups:
            return out
        keys = list(zip(kind, attribute))
        by: dict[tuple[str, str], list[int]] = {}
        for i, key in enumerate(keys):
            if key in self.groups:
                by.setdefault(key, []).append(i)
        for (k, a), rows in by.items():
            terms_g, canon_g = self.groups[(k, a)][:2]
            # each distinct term's neighbours once, however many pairs it is in
            first: dict[str, np.ndarray] = {}
            for i in rows:
                first.setdefault(term_a[i], vec_a[i])
                first.setdefault(term_b[i], vec_b[i])
            names = list(first)
            idx, sims = self._neighbours(k, a, np.stack([first[t] for t in names]))
            at = {t: r for r, t in enumerate(names)}
            for i in rows:
                x, y = term_a[i], term_b[i]
                out[i] = max(self._one_way(terms_g, canon_g, idx[at[x]], sims[at[x]], x, y),
                             self._one_way(terms_g, canon_g, idx[at[y]], sims[at[y]], y, x))
        return out


def save(folder: Path, table: pl.DataFrame, vectors: np.ndarray) -> None:
    from safetensors.numpy import save_file

    table.write_parquet(Path(folder) / TABLE)
    save_file({"vectors": np.ascontiguousarray(vectors, np.float32)}, str(Path(folder) / VECTORS))


def load(folder: Path, k: int) -> CanonicalVotes | None:
    """The fit's table, or None where the model has none (fitted before, or without co-listings)."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / TABLE).exists() or not (folder / VECTORS).exists():
        return None
    return CanonicalVotes(pl.read_parquet(folder / TABLE), load_file(str(folder / VECTORS))["vectors"], k)


def votes_of(cv: CanonicalVotes | None, pairs: pl.DataFrame, vocab: pl.DataFrame,
             vectors: np.ndarray) -> np.ndarray | None:
    """`canonical_vote` of `pairs` (kind, attribute, term_a, term_b) whose terms are rows of
    `vocab` (kind, attribute, term; row i has vectors[i]); None without a fit table."""
    if cv is None:
        return None
    if pairs.height == 0:
        return np.zeros(0, np.float32)
    pos = {key: i for i, key in enumerate(vocab.select("kind", "attribute", "term").iter_rows())}
    kind, attr = pairs["kind"].to_list(), pairs["attribute"].to_list()
    a, b = pairs["term_a"].to_list(), pairs["term_b"].to_list()
    ia = np.array([pos[(k, t, x)] for k, t, x in zip(kind, attr, a)], dtype=np.int64)
    ib = np.array([pos[(k, t, x)] for k, t, x in zip(kind, attr, b)], dtype=np.int64)
    return cv.pair_votes(kind, attr, a, b, vectors[ia], vectors[ib])
