"""Distant supervision for the title tagger: the catalogue labels its own titles.

For each product, the known `product_type` and attribute values are looked up in the title
(case-insensitive, whole words only, any run of spaces matching any run of spaces, simple
singular/plural variants for the type); the matches become character spans labelled "type" or
with the attribute name. Longest match first, no overlapping spans. Titles without any match are
kept at a sampled rate (they teach "O"); untyped products' titles are left out (their type
may be named in them). Attributes matched in fewer than `min_attribute_count`
titles are dropped from the label set.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from autoknow_ray.spans import NULL_VALUES, Span, resolve_overlaps, type_variants  # noqa: F401
from autoknow_ray.text import fold_words

TYPE_LABEL = "type"


@dataclass
class DistantSet:
    examples: list[tuple[str, list[Span]]]
    labels: list[str]  # "type" first (when matched at all), then attributes by frequency
    stats: dict = field(default_factory=dict)


def _pattern(value: str) -> re.Pattern | None:
    value = " ".join(value.split())
    if value.lower() in NULL_VALUES:
        return None
    body = r"\s+".join(re.escape(part) for part in value.split(" "))
    left = r"(?<!\w)" if re.match(r"\w", value) else ""
    right = r"(?!\w)" if re.search(r"\w$", value) else ""
    return re.compile(left + body + right, re.IGNORECASE)


class _Matcher:
    """Compiled patterns, cached per value (catalogues repeat values a lot)."""

    def __init__(self, max_value_chars: int):
        self.cache: dict[str, re.Pattern | None] = {}
        self.max_value_chars = max_value_chars

    def find(self, text: str, value: str) -> list[tuple[int, int]]:
        if not isinstance(value, str) or len(value) > self.max_value_chars:
            return []
        key = value.strip().lower()
        if key not in self.cache:
            self.cache[key] = _pattern(value.strip()) if key else None
        pat = self.cache[key]
        return [(m.start(), m.end()) for m in pat.finditer(text)] if pat is not None else []


def _candidates(title: str, product_type, attributes, matcher: _Matcher):
    """All (label, start, end, priority) matches in one title; priority breaks length ties."""
    cands = []
    if isinstance(product_type, str) and product_type.strip():
        for form in type_variants(product_type):
            for s, e in matcher.find(title, form):
                cands.append((TYPE_LABEL, s, e, 0))
    for pri, pair in enumerate(attributes or [], start=1):
        if not pair:
            continue
        name, value = pair.get("name"), pair.get("value")
        if not isinstance(name, str) or not name.strip() or name.strip() == TYPE_LABEL:
            continue
        for s, e in matcher.find(title, value):
            cands.append((name.strip(), s, e, pri))
    return cands


def build_examples(
    products: pl.DataFrame,
    *,
    min_attribute_count: int = 3,
    empty_keep_fraction: float = 0.2,
    max_value_chars: int = 200,
    use_type: bool = True,
    use_attributes: bool = True,
    seed: int = 0,
) -> DistantSet:
    """(title, spans) training examples from a products table (PRODUCTS columns)."""
    if "title" not in products.columns:
        raise ValueError("products needs a `title` column")
    titles = products["title"].to_list()
    n = len(titles)
    types = (products["product_type"].to_list() if use_type and "product_type" in products.columns
             else [None] * n)
    attrs = (products["attributes"].to_list() if use_attributes and "attributes" in products.columns
             else [None] * n)
    matcher = _Matcher(max_value_chars)

    per_title = []
    for title, ptype, pairs in zip(titles, types, attrs):
        if not isinstance(title, str) or not title.strip():
            per_title.append(None)
            continue
        per_title.append(_candidates(title, ptype, pairs, matcher))

    # how many titles each label would be matched in (after overlaps, all labels allowed)
    counts: Counter = Counter()
    for cands in per_title:
        if cands:
            counts.update({lab for lab, _, _ in resolve_overlaps(cands)})
    kept = {lab for lab, c in counts.items() if lab == TYPE_LABEL or c >= min_attribute_count}
    dropped = sorted(lab for lab in counts if lab not in kept)
    labels = sorted(kept, key=lambda lab: (lab != TYPE_LABEL, -counts[lab], lab))

    # an untyped product's title may well name its type (one the taxonomy lacks: the open world
    # the tagger is for): as an example it would teach "O" on that name. Leave such titles out
    # whenever the catalogue types some of its products.
    has_type = [isinstance(t, str) and bool(t.strip()) for t in types]
    skip_untyped = any(has_type)
    rng = np.random.default_rng(seed)
    examples: list[tuple[str, list[Span]]] = []
    n_empty = n_empty_kept = n_spans = n_untyped = 0
    span_counts: Counter = Counter()
    # per attribute: titles that carry a value of it, and those that carry two or more distinct
    # values (a title naming one value twice carries one): which attributes the catalogue
    # writes once per title (single_valued_labels)
    titles_with: Counter = Counter()
    titles_multi: Counter = Counter()
    for title, cands, typed in zip(titles, per_title, has_type):
        if cands is None:
            continue
        if skip_untyped and not typed:
            n_untyped += 1
            continue
        spans = resolve_overlaps(cands, kept) if cands else []
        if not spans:
            n_empty += 1
            if rng.random() >= empty_keep_fraction:
                continue
            n_empty_kept += 1
        examples.append((title, spans))
        n_spans += len(spans)
        span_counts.update(lab for lab, _, _ in spans)
        values: dict[str, set[str]] = {}
        for lab, s, e in spans:
            values.setdefault(lab, set()).add(fold_words(title[s:e]))
        titles_with.update(values.keys())
        titles_multi.update(lab for lab, v in values.items() if len(v) > 1)
    stats = {
        "n_products": n,
        "n_titles": sum(c is not None for c in per_title),
        "n_examples": len(examples),
        "n_with_spans": len(examples) - n_empty_kept,
        "n_without_spans": n_empty,
        "n_without_spans_kept": n_empty_kept,
        "n_spans": n_spans,
        "n_untyped_left_out": n_untyped,
        "span_counts": dict(span_counts.most_common()),
        "dropped_attributes": dropped,
        "titles_with_label": dict(titles_with.most_common()),
        "titles_with_several_values": dict(titles_multi.most_common()),
    }
    return DistantSet(examples, labels, stats)


def single_valued_labels(stats: dict, max_share: float, min_titles: int = 1) -> list[str]:
    """Attributes whose values the catalogue writes once per title: at most `max_share` of the
    example titles that carry one of its values carry two or more distinct ones. The type label
    is never one (a title may name its type in several words, the stage weighs them)."""
    with_label = stats.get("titles_with_label") or {}
    multi = stats.get("titles_with_several_values") or {}
    return sorted(
        lab for lab, n in with_label.items()
        if lab != TYPE_LABEL and n >= min_titles and multi.get(lab, 0) <= max_share * n
    )


def _cased_like(name: str, surface: str) -> str:
    """`name` written the way the title wrote its own type: upper, lower or word-capitalised."""
    letters = [c for c in surface if c.isalpha()]
    if letters and all(c.isupper() for c in letters) and len(letters) > 1:
        return name.upper()
    if letters and all(c.islower() for c in letters):
        return name.lower()
    if all(w[:1].isupper() for w in surface.split() if w[:1].isalpha()):
        return " ".join(w[:1].upper() + w[1:] for w in name.split())
    return name


def swap_types(examples: list[tuple[str, list[Span]]], names: tuple[str, ...] | list[str],
               share: float, seed: int = 0) -> tuple[list[tuple[str, list[Span]]], int]:
    """Replace the type span(s) of a `share` of the examples that have one by another type name
    (drawn from `names`, cased like the title's own), the other spans shifted to match: the tagger
    then learns where and how a type stands in a title, not the few words of this catalogue's
    types. Returns the new examples (same count and order) and how many were swapped."""
    if not names or share <= 0:
        return examples, 0
    rng = np.random.default_rng(seed + 7919)
    out, swapped = [], 0
    for title, spans in examples:
        if not any(lab == TYPE_LABEL for lab, _, _ in spans) or rng.random() >= share:
            out.append((title, spans))
            continue
        name = names[int(rng.integers(len(names)))]
        parts, new_spans, pos, shift = [], [], 0, 0
        for lab, s, e in spans:  # sorted, not overlapping
            if lab == TYPE_LABEL:
                sub = _cased_like(name, title[s:e])
                parts.append(title[pos:s] + sub)
                new_spans.append((lab, s + shift, s + shift + len(sub)))
                shift += len(sub) - (e - s)
            else:
                parts.append(title[pos:e])
                new_spans.append((lab, s + shift, e + shift))
            pos = e
        parts.append(title[pos:])
        out.append(("".join(parts), new_spans))
        swapped += 1
    return out, swapped
