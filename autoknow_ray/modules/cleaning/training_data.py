"""Training pairs for the cleaning model, as the AutoKnow article makes them.

Positives: attribute values of attributes that recur across a type's products (and, when asked,
values that recur themselves), and each product's own type. Negatives: the same claim with the
value replaced by a mismatched one — a value of the same attribute from another type, a value of
another attribute (half the time from the same product, so "the value is in the title" is not
enough), or the value with a token replaced or its letters scrambled — and, for types, another
type. Everything here works on a bounded sample of products (the config caps it).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import polars as pl

from autoknow_ray.modules.cleaning.config import CleaningConfig
from autoknow_ray.modules.cleaning.model import TYPE_RELATION, claim_text, product_text
from autoknow_ray.text import char_edits, fold


@dataclass
class Pair:
    product_id: str
    claim: str
    text: str
    label: int  # 1 = misassigned
    kind: str  # positive | other_type | swap | other_attribute | corrupt | type
    value: str = ""  # the claim's value (or type), for the text features
    title: str = ""
    feature_text: str = ""  # title + description up to `feature_text_chars`, for the features


def facts_of(products: pl.DataFrame) -> pl.DataFrame:
    """(product_id, type, attribute, value) of typed products: attributes, and the brand column
    where no attribute already says it."""
    typed = products.filter(pl.col("product_type").is_not_null())
    if typed.height == 0:
        return pl.DataFrame(schema={"product_id": pl.String, "type": pl.String,
                                    "attribute": pl.String, "value": pl.String})
    attrs = (typed.select("product_id", pl.col("product_type").alias("type"), "attributes")
             .explode("attributes").filter(pl.col("attributes").is_not_null())
             .select("product_id", "type", pl.col("attributes").struct.field("name").alias("attribute"),
                     pl.col("attributes").struct.field("value").alias("value")))
    brand = typed.filter(pl.col("brand").is_not_null()).select(
        "product_id", pl.col("product_type").alias("type"), pl.lit("Brand").alias("attribute"),
        pl.col("brand").alias("value"))
    out = pl.concat([attrs, brand], how="vertical_relaxed").filter(
        pl.col("attribute").is_not_null() & pl.col("value").is_not_null()
        & (pl.col("value").str.strip_chars() != ""))
    return out.unique(["product_id", "attribute", "value"], keep="first", maintain_order=True)


def valid_facts(facts: pl.DataFrame, cfg: CleaningConfig) -> pl.DataFrame:
    """Facts whose attribute recurs across the type's products (and whose value recurs, as set)."""
    attr_n = facts.group_by("type", "attribute").agg(pl.col("product_id").n_unique().alias("_an"))
    value_n = facts.group_by("type", "attribute", "value").agg(
        pl.col("product_id").n_unique().alias("_vn"))
    return (facts.join(attr_n, on=["type", "attribute"]).join(value_n, on=["type", "attribute", "value"])
            .filter((pl.col("_an") >= cfg.min_attribute_products)
                    & (pl.col("_vn") >= cfg.min_value_products))
            .drop("_an", "_vn"))


def _corrupt(value: str, vocab: list[str], rng: random.Random) -> str:
    tokens = value.split()
    if rng.random() < 0.5:
        return char_edits(value, rng, rng.choice((1, 2, 2, 3)))
    if len(tokens) > 1 and vocab:
        i = rng.randrange(len(tokens))
        tokens[i] = rng.choice(vocab)
        out = " ".join(tokens)
    elif len(value) > 3 and rng.random() < 0.5:
        mid = list(value[1:-1])
        rng.shuffle(mid)
        out = value[0] + "".join(mid) + value[-1]
    else:
        out = rng.choice(vocab) if vocab else value[::-1]
    return out


def make_pairs(products: pl.DataFrame, cfg: CleaningConfig, seed: int) -> tuple[list[Pair], dict]:
    """Balanced positive / negative claims about the sampled products, capped by the config."""
    rng = random.Random(seed)
    facts = facts_of(products)
    valid = valid_facts(facts, cfg)
    texts = {pid: product_text(t, d, cfg.max_text_chars) for pid, t, d in
             products.select("product_id", "title", "description").iter_rows()}
    titles = {pid: t if isinstance(t, str) else "" for pid, t in
              products.select("product_id", "title").iter_rows()}
    ftexts = {pid: product_text(t, d, cfg.feature_text_chars) for pid, t, d in
              products.select("product_id", "title", "description").iter_rows()}
    types = sorted(set(products["product_type"].drop_nulls().to_list()))
    by_attr: dict[str, list[tuple[str, str]]] = {}
    for _, t, a, v in facts.iter_rows():
        by_attr.setdefault(a, []).append((t, v))
    values_of: dict[tuple[str, str], set[str]] = {}
    for _, t, a, v in facts.iter_rows():
        values_of.setdefault((t, a), set()).add(fold(v))
    by_product: dict[str, list[tuple[str, str]]] = {}
    for pid, _, a, v in facts.iter_rows():
        by_product.setdefault(pid, []).append((a, v))
    all_facts = facts.select("attribute", "value").rows()
    vocab = sorted({w for v in facts["value"].to_list() for w in v.split() if len(w) > 1})

    per_pos = cfg.negatives_per_positive
    type_pairs = int(cfg.max_train_pairs * (cfg.type_share if valid.height else 1.0)) \
        if len(types) > 1 else 0  # a catalogue without attribute values learns types only
    n_type_pos = min(int(type_pairs / (1 + per_pos)), products.filter(
        pl.col("product_type").is_not_null()).height)
    n_attr_pos = min(int((cfg.max_train_pairs - type_pairs) / (1 + per_pos)), valid.height)
    mix = cfg.negatives
    kinds = ["other_type", "swap", "other_attribute", "corrupt"]
    weights = [mix.other_type, mix.swap, mix.other_attribute, mix.corrupt]

    def mismatched(pid: str, t: str, a: str, v: str, kind: str) -> str | None:
        # a swap is wrong for this product, not for the type: only the product's own values for
        # the attribute are off limits; the other kinds avoid every value the type has
        own = ({fold(x) for b, x in by_product.get(pid, []) if b == a} if kind == "swap"
               else values_of.get((t, a), set()))
        for _ in range(12):
            if kind == "swap":
                pool = by_attr.get(a, [])
                if not pool:
                    return None
                _, w = rng.choice(pool)
            elif kind == "other_type":
                pool = by_attr.get(a, [])
                if not pool:
                    return None
                t2, w = rng.choice(pool)
                if t2 == t:
                    continue
            elif kind == "other_attribute":
                mine = [x for x in by_product.get(pid, []) if x[0] != a]
                a2, w = rng.choice(mine) if mine and rng.random() < 0.5 else rng.choice(all_facts)
                if a2 == a:
                    continue
            else:
                w = _corrupt(v, vocab, rng)
            if w and fold(w) not in own:
                return w
        return None

    pairs: list[Pair] = []
    stats = {k: 0 for k in ["positive", *kinds, "type_positive", "type", "no_negative"]}
    rows = valid.sample(n_attr_pos, seed=seed).rows() if n_attr_pos else []
    for pid, t, a, v in rows:
        text, title = texts.get(pid, ""), titles.get(pid, "")
        ftext = ftexts.get(pid, "")
        pairs.append(Pair(pid, claim_text(a, v, t, cfg.max_value_chars), text, 0, "positive", v, title,
                          ftext))
        stats["positive"] += 1
        n_neg = int(per_pos) + (1 if rng.random() < per_pos - int(per_pos) else 0)
        for _ in range(n_neg):
            order = rng.choices(kinds, weights)[:1] + kinds  # the drawn kind, then fallbacks
            for kind in order:
                w = mismatched(pid, t, a, v, kind)
                if w is not None:
                    pairs.append(Pair(pid, claim_text(a, w, t, cfg.max_value_chars), text, 1, kind,
                                      w, title, ftext))
                    stats[kind] += 1
                    break
            else:
                stats["no_negative"] += 1
    if n_type_pos:
        typed = products.filter(pl.col("product_type").is_not_null()).sample(n_type_pos, seed=seed)
        for pid, t in typed.select("product_id", "product_type").iter_rows():
            text, title, ftext = texts.get(pid, ""), titles.get(pid, ""), ftexts.get(pid, "")
            pairs.append(Pair(pid, claim_text(TYPE_RELATION, t, None, cfg.max_value_chars), text, 0,
                              "type_positive", t, title, ftext))
            stats["type_positive"] += 1
            n_neg = int(per_pos) + (1 if rng.random() < per_pos - int(per_pos) else 0)
            for _ in range(n_neg):
                other = rng.choice([x for x in types if x != t])
                pairs.append(Pair(pid, claim_text(TYPE_RELATION, other, None, cfg.max_value_chars),
                                  text, 1, "type", other, title, ftext))
                stats["type"] += 1
    rng.shuffle(pairs)
    stats.update(facts=facts.height, valid_facts=valid.height, types=len(types))
    return pairs, stats
