"""A label vote of the nearest labelled vectors, that answers only where the neighbours are close
and agree.

Any module that labels an item by its neighbours (a product's type by its nearest typed titles, a
value by its nearest valued products) uses this: search a `VectorIndex` of labelled reference
vectors, weight each neighbour's label by its similarity, and answer the best label with its vote
share — or no label, with the reason, when the nearest neighbour is below the similarity floor
("too far") or the best label's share is below the share floor ("no agreement"). A vote that
cannot answer must say so: forcing every item into a known label hides the unknown ones.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from autoknow_ray.index.faiss_index import VectorIndex

TOO_FAR = "knn: neighbours too far"
NO_AGREEMENT = "knn: no agreement"
NO_NEIGHBOURS = "knn: no labelled neighbours"


@dataclass(frozen=True)
class Vote:
    label: str | None  # the answer, None where the vote abstains
    share: float  # the best label's share of the similarity-weighted vote
    similarity: float  # cosine of the nearest neighbour
    ranked: list[tuple[str, float]] = field(default_factory=list)  # labels with shares, best first
    reason: str | None = None  # why there is no answer


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or not len(x):
        return x.reshape(len(x), -1) if x.ndim else x
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class LabelIndex:
    """Labelled reference vectors (L2-normalised) behind an inner-product index."""

    def __init__(self, vectors: np.ndarray, labels: list[str], keys: list[str] | None = None,
                 seed: int = 0):
        if len(vectors) != len(labels):
            raise ValueError(f"{len(vectors)} vectors but {len(labels)} labels")
        self.labels = list(labels)
        self.keys = list(keys) if keys is not None else None  # e.g. product ids, to skip self
        self.index = VectorIndex(metric="ip", seed=seed).build(normalize(vectors)) if len(labels) else None

    def __len__(self) -> int:
        return len(self.labels)

    def votes(self, queries: np.ndarray, k: int, exclude: list[str | None] | None = None
              ) -> list[tuple[dict[str, float], float]]:
        """Per query: (similarity-weighted label votes of its k nearest references, the nearest
        reference's cosine). A reference whose key equals the query's `exclude` entry (the item
        itself) is skipped."""
        n = len(queries)
        if self.index is None or n == 0:
            return [({}, -1.0) for _ in range(n)]
        extra = 1 if exclude is not None and self.keys is not None else 0
        scores, ids = self.index.search(normalize(queries), min(k + extra, len(self.labels)))
        out = []
        for row in range(n):
            own = exclude[row] if extra else None
            votes: dict[str, float] = defaultdict(float)
            nearest, taken = -1.0, 0
            for s, j in zip(scores[row], ids[row]):
                if j < 0 or taken == k or (own is not None and self.keys[j] == own):
                    continue
                nearest = max(nearest, float(s))
                votes[self.labels[j]] += max(float(s), 0.0)
                taken += 1
            out.append((dict(votes), nearest))
        return out


def decide(votes: dict[str, float], nearest: float, min_similarity: float, min_share: float) -> Vote:
    """The vote's answer, or no answer with its reason."""
    total = sum(votes.values())
    if not votes or total <= 0:
        return Vote(None, 0.0, nearest, [], NO_NEIGHBOURS)
    order = sorted(votes, key=lambda t: (-votes[t], t))
    ranked = [(t, votes[t] / total) for t in order]
    share = ranked[0][1]
    if nearest < min_similarity:
        return Vote(None, share, nearest, ranked, TOO_FAR)
    if share < min_share:
        return Vote(None, share, nearest, ranked, NO_AGREEMENT)
    return Vote(order[0], share, nearest, ranked)


def knn_vote(index: LabelIndex, queries: np.ndarray, k: int, min_similarity: float = -1.0,
             min_share: float = 0.0) -> list[Vote]:
    """Each query's label by its k nearest references (see the module doc)."""
    return [decide(v, s, min_similarity, min_share) for v, s in index.votes(queries, k)]
