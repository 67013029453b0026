"""Same inputs, same graph: what a stage reads of the catalogue does not depend on the order its
rows arrive in."""
from __future__ import annotations

import random

import numpy as np
import polars as pl


class _HashEncoder:
    """A stand-in title encoder: a fixed vector per text (no model to load)."""

    def encode(self, texts):
        out = []
        for t in texts:
            rng = np.random.default_rng(abs(hash_text(t)))
            out.append(rng.standard_normal(8).astype(np.float32))
        return np.stack(out) if out else np.zeros((0, 8), np.float32)


def hash_text(t: str) -> int:
    import zlib

    return zlib.crc32(t.encode())


def test_hypernym_context_keeps_the_same_behaviour_rows_whatever_their_order():
    """A query with more products than the context keeps, all bought as often, and a product
    with more co-purchase partners than it keeps: the rows kept do not depend on the order the
    behaviour rows arrive in (ties in count go to the smaller product id)."""
    from autoknow_ray.modules.taxonomy.hypernym import _Context
    from autoknow_ray.modules.taxonomy.hypernym_config import HypernymConfig

    taxonomy = pl.DataFrame({"type": ["food", "tea", "coffee"], "parent": [None, "food", "food"]})
    ids = [f"p{i:03d}" for i in range(150)]
    products = pl.DataFrame({"product_id": ids, "title": [f"item {i}" for i in range(150)],
                             "product_type": ["tea" if i % 2 else "coffee" for i in range(150)]})
    behavior = pl.DataFrame({"query": ["drink"] * 150 + ["leaf"] * 20, "product_id": ids + ids[:20],
                             "count": [1] * 150 + [2] * 20})
    copurchase = pl.DataFrame({"src": ["p000"] * 149, "dst": ids[1:], "count": [1] * 149})
    cfg = HypernymConfig(behavior_max_query_products=10)

    def context(seed: int):
        rows = list(range(behavior.height))
        random.Random(seed).shuffle(rows)
        cp_rows = list(range(copurchase.height))
        random.Random(seed).shuffle(cp_rows)
        return _Context(taxonomy, products, behavior[rows], copurchase[cp_rows], _HashEncoder(), cfg)

    first = context(0)
    rows_of = lambda c: [(m[0].tolist(), m[1].tolist(), m[2]) for m in c.q_members]  # noqa: E731
    kept = {q: m[2] for q, m in zip(("drink", "leaf"), first.q_members)}
    assert kept["drink"] == ids[:10]  # the ten smallest ids of the tied 150
    assert len(first.cp["p000"][0]) == 100 and first.cp["p000"][0].tolist() == list(range(1, 101))
    for seed in range(1, 6):
        other = context(seed)
        assert rows_of(other) == rows_of(first)
        assert other.q_of == first.q_of
        assert other.cp.keys() == first.cp.keys()
        for k in first.cp:
            assert np.array_equal(other.cp[k][0], first.cp[k][0])
            assert np.array_equal(other.cp[k][1], first.cp[k][1])
