"""A catalogue unlike the fit's, for module 5: how many embedding-neighbour pairs the shipped
scorer accepts per 1,000 terms, fit's catalogue against the rebuild's.

Fit's precision is shown on pairs of its own catalogue's terms. A rebuild whose terms the scorer
accepts far more often than it accepted fit's (a classifier trained on unit spellings and codes,
asked about type names; on brands that merely look alike) merges on evidence fit never
validated. The figure is measured the same way on both sides, so the two compare:

- a seeded sample of terms (fit: its training vocabulary; rebuild: as many of its vocabulary's
  terms as fit sampled, so the neighbourhoods are as dense), per kind (types, values);
- each sampled term's `knn_k` nearest sampled terms of its (kind, attribute) at cosine at least
  `knn_min_cosine`: the stage's embedding candidates;
- those pairs scored by the shipped scorer (fit: a pair it trained on keeps its out-of-fold
  score, so the reference is not lowered by pairs the classifier was taught to reject) and
  counted at the shipped threshold.

The guard is one-sided: a rebuild that accepts fewer pairs than fit merges less, which costs
recall, not precision.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import polars as pl

from autoknow_ray.modules.synonyms.candidates import knn_pairs

KINDS = ("type", "value")


def sample_index(n: int, cap: int, seed: int) -> np.ndarray:
    """Row positions of a seeded sample of at most `cap` of `n` rows, in order."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed + 11).choice(n, cap, replace=False))


def accepted_rate(vocab: pl.DataFrame, vectors: np.ndarray, score: Callable[[pl.DataFrame], np.ndarray],
                  threshold: float, cfg, seed: int) -> dict:
    """Per kind: sampled terms, candidate pairs, accepted pairs and accepted pairs per 1,000
    terms. `vocab` (kind, attribute, term) is the sample, row i with vectors[i] (L2-normalised);
    `score` gives each candidate pair (kind, attribute, term_a, term_b, cosine) its score."""
    pairs = knn_pairs(vocab.select("kind", "attribute", "term"), vectors, cfg.knn_k,
                      cfg.knn_min_cosine, cfg.ivf_min_size, seed)
    s = score(pairs) if pairs.height else np.zeros(0, np.float32)
    pairs = pairs.with_columns(pl.Series("accepted", np.asarray(s) >= threshold))
    out = {}
    for kind in KINDS:
        terms = int((vocab["kind"] == kind).sum()) if vocab.height else 0
        if terms == 0:
            continue
        mine = pairs.filter(pl.col("kind") == kind)
        accepted = int(mine["accepted"].sum()) if mine.height else 0
        out[kind] = {"terms": terms, "candidates": mine.height, "accepted": accepted,
                     "per_1000_terms": round(1000.0 * accepted / terms, 3)}
    return out


def judge(reference: dict | None, observed: dict, factor: float | None, min_pairs: int,
          min_terms: int) -> dict:
    """Per kind observed: whether its merges are held back, with both figures and the reason.

    Held back where the rebuild accepts more than `factor` times fit's pairs per 1,000 terms
    (fit's figure taken as at least one pair over its sampled terms, so a fit that accepted
    none still compares), with at least `min_pairs` accepted. A kind fit sampled fewer than
    `min_terms` terms of is compared with fit's figure over every kind."""
    out = {}
    if factor is None or not reference:
        return out
    total_terms = sum(r["terms"] for r in reference.values())
    total_accepted = sum(r["accepted"] for r in reference.values())
    for kind, obs in observed.items():
        ref = reference.get(kind)
        basis = kind
        if ref is None or ref["terms"] < min_terms:
            ref = {"terms": total_terms, "accepted": total_accepted}
            basis = "every kind"
        if ref["terms"] == 0:
            continue
        ref_rate = 1000.0 * max(ref["accepted"], 1) / ref["terms"]
        held = obs["accepted"] >= min_pairs and obs["per_1000_terms"] > factor * ref_rate
        g = {"fit_per_1000_terms": round(1000.0 * ref["accepted"] / ref["terms"], 3),
             "fit_terms": ref["terms"], "fit_basis": basis,
             "rebuild_per_1000_terms": obs["per_1000_terms"], "rebuild_terms": obs["terms"],
             "rebuild_accepted": obs["accepted"], "held_back": bool(held)}
        if held:
            g["reason"] = (f"the scorer accepts {obs['per_1000_terms']:.1f} neighbour pairs per 1,000 "
                           f"{kind} terms here against {g['fit_per_1000_terms']:.1f} in fit's catalogue "
                           f"(over {factor:g}x): a catalogue unlike the one its precision was shown on")
        out[kind] = g
    return out
