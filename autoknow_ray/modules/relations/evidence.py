"""What the catalogue being rebuilt shows about a type fit never labelled.

The applicability model judges a new type from indirect evidence: value and name mentions, and
what its nearest known types say. On OA-Mine's withheld types it says "applies" to nearly every
attribute of a type whose neighbours are broad (Tea took Coffee's and Vitamin's attributes). The
rebuilt catalogue often shows more directly which attributes a new type has:

- **filled**: its products carry the attribute in the catalogue: the very label fit learns from
  (`min_fill_products`), so it applies;
- **tagged**: module 1 read a value of the attribute in its products' titles. The tagger also
  tags some titles wrongly, so a count is evidence only where it stands above the tagger's noise:
  the one-sided Poisson tail P(X >= k) at rate `noise × products` is below `alpha / m`
  (Bonferroni over the m attributes the tagger can read, tested per type). k is the products
  tagged, each weighed by its span's confidence (`tagged_score`, rounded): a tag the tagger
  doubts counts for less;
- **not tagged enough**: an attribute the titles did not show is decided "does not apply" only
  where the opposite test rejects too: P(X <= k) at the rate the tagger reads attributes that
  do apply (the median over the known types' applicable pairs here) below the same `alpha / m`.
  A type of a few products shows little either way: there the model decides.

The noise rate is measured in the same rebuild wherever it can be: over the types labelled in fit
that have products here, the share of (product, attribute) pairs tagged with an attribute fit says
does not apply to the product's type (add-one smoothed). A rebuild without such a type takes the
rate implied by the tagger's own validation figures in fit: its false spans per title
(`(1 - precision) × spans per title`) spread over the attributes it reads.

Attributes the tagger cannot read (not among its labels) are left to the model, as are types
without a single tag (module 1 read nothing in their titles: absence is no evidence there).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

ALPHA = 0.05  # the family-wise level per type, as the one-sided 95% bounds of the safety rule


def poisson_tail(k: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """P(X >= k) for X ~ Poisson(lam), elementwise (1 where k <= 0). The Poisson tail bounds the
    binomial one of the same mean from above for small rates: the test errs on "not shown"."""
    import torch

    k = np.asarray(k, dtype=np.float64)
    lam = np.clip(np.asarray(lam, dtype=np.float64), 1e-300, None)
    out = np.ones_like(k)
    pos = k > 0
    if pos.any():
        out[pos] = torch.special.gammainc(torch.from_numpy(k[pos]),
                                          torch.from_numpy(lam[pos])).numpy()
    return out


@dataclass
class NoiseRate:
    rate: float | None
    source: str  # "known types here", "tagger validation in fit" or why there is none
    pairs: int = 0  # (product, attribute) pairs the rate was measured on
    # the rate at which the tagger reads an attribute that applies (the median over the known
    # types' applicable pairs here); None: an attribute it did not show is left to the model
    applies_rate: float | None = None


def noise_from_known(df: pl.DataFrame, known_types: set[str], known_applies: dict[str, set[str]],
                     readable: set[str]) -> NoiseRate:
    """The tagger's false-tag rate on this catalogue's products of types labelled in fit, over
    the attributes fit says do not apply to them (only attributes the tagger reads)."""
    part = df.filter(pl.col("type").is_in(list(known_types)) & (pl.col("products") > 0)
                     & pl.col("attribute").is_in(list(readable)))
    if part.height == 0:
        return NoiseRate(None, "no type labelled in fit has products here")
    applies = pl.DataFrame([(t, a) for t, attrs in known_applies.items() for a in attrs],
                           schema={"type": pl.String, "attribute": pl.String}, orient="row")
    neg = part.join(applies, on=["type", "attribute"], how="anti")
    n = int(neg["products"].sum() or 0)
    if n == 0:
        return NoiseRate(None, "no pair of a known type that fit says does not apply")
    tagged = float(neg["tagged_score"].sum() or 0.0)
    pos = part.join(neg.select("type", "attribute"), on=["type", "attribute"], how="anti")
    applies_rate = (float((pos["tagged_score"] / pos["products"]).median())
                    if pos.height else None)
    return NoiseRate((tagged + 1) / (n + 2), "known types here", n, applies_rate)


def noise_from_fit(tagger: dict | None) -> NoiseRate:
    """The rate the tagger's validation figures in fit imply: false spans per title spread over
    the attributes it reads (the type label excluded)."""
    if not tagger:
        return NoiseRate(None, "no tagger figures in the models")
    try:
        precision = float(tagger["val_precision"])
        spans_per_title = float(tagger["n_spans"]) / max(1.0, float(tagger["n_examples"]))
        labels = [x for x in tagger.get("labels", []) if x != "type"]
    except (KeyError, TypeError, ValueError):
        return NoiseRate(None, "tagger figures incomplete in the models")
    if not labels:
        return NoiseRate(None, "the tagger reads no attribute")
    return NoiseRate(max(1e-6, (1.0 - precision) * spans_per_title / len(labels)),
                     "tagger validation in fit")


def title_evidence(df: pl.DataFrame, new_types: list[str], readable: set[str], noise: NoiseRate,
                   min_fill_products: int, alpha: float = ALPHA) -> tuple[pl.DataFrame, dict]:
    """Per (type, attribute) of `new_types` in `df` (`products`, `filled`, `tagged`,
    `tagged_score`): `decided`
    (the evidence decides this pair), `evidence_applies` and `evidence_score` (1 - the tail
    probability; 1 for a filled attribute). Returns the rows and a report."""
    rows = df.filter(pl.col("type").is_in(list(new_types)) & (pl.col("products") > 0)).select(
        "type", "attribute", "products", "filled", "tagged", "tagged_score")
    report = {"noise_rate": None if noise.rate is None else round(noise.rate, 6),
              "applies_rate": None if noise.applies_rate is None else round(noise.applies_rate, 6),
              "noise_source": noise.source, "noise_pairs": noise.pairs, "alpha": alpha,
              "readable_attributes": len(readable)}
    if rows.height == 0:
        return rows.with_columns(decided=pl.lit(False), evidence_applies=pl.lit(False),
                                 evidence_score=pl.lit(0.0)), {**report, "types": 0}
    filled = rows["filled"].to_numpy() >= min_fill_products
    tagged = np.round(rows["tagged_score"].to_numpy().astype(np.float64))
    products = rows["products"].to_numpy().astype(np.float64)
    is_readable = rows["attribute"].is_in(list(readable)).to_numpy()
    # a type whose titles module 1 read at all (one tag of any attribute)
    read = rows.group_by("type").agg((pl.col("tagged") > 0).any().alias("_read"))
    type_read = rows.join(read, on="type", how="left")["_read"].fill_null(False).to_numpy()
    rejected = np.zeros(rows.height, dtype=bool)
    if noise.rate is not None:
        p = poisson_tail(tagged, products * noise.rate)
        m = rows.with_columns(pl.lit(is_readable).alias("_r")).group_by("type").agg(
            pl.col("_r").sum().alias("_m"))
        tests = np.clip(rows.join(m, on="type", how="left")["_m"].to_numpy().astype(np.float64),
                        1, None)
        shown = p < alpha / tests
        if noise.applies_rate is not None:  # P(X <= k) = 1 - P(X >= k + 1)
            below = 1.0 - poisson_tail(tagged + 1, products * noise.applies_rate)
            rejected = ~shown & (below < alpha / tests)
        by_tags = is_readable & type_read & (shown | rejected)
    else:
        p = np.ones(rows.height)
        shown = np.zeros(rows.height, dtype=bool)
        by_tags = np.zeros(rows.height, dtype=bool)
    decided = filled | by_tags
    applies = filled | (by_tags & shown)
    score = np.where(filled, 1.0, 1.0 - p)
    out = rows.with_columns(decided=pl.Series(decided), evidence_applies=pl.Series(applies),
                            evidence_score=pl.Series(score))
    report.update({
        "types": int(out.filter(pl.col("decided"))["type"].n_unique()),
        "pairs_decided": int(decided.sum()),
        "pairs_filled": int(filled.sum()),
        "pairs_tagged_applicable": int((by_tags & shown & ~filled).sum()),
        "pairs_tagged_too_few": int((by_tags & rejected & ~filled).sum()),
        "pairs_left_to_model": int((~decided).sum()),
    })
    return out, report
