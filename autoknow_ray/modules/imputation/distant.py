"""Distant supervision: a product's filled values, located in its own texts, label those texts.

A value is matched case-insensitively on whole words, any run of spaces matching any run of
spaces; the longest match wins where matches overlap. Values not found anywhere teach nothing;
texts where no value is found teach "O" (sampled by the trainer), which is what keeps the
tagger precise on catalogues whose attributes are incomplete.
"""
from __future__ import annotations

import re
from collections import Counter

from autoknow_ray.modules.imputation.texts import filled_values, is_null_value, product_texts

Span = tuple[str, int, int]


class ValueMatcher:
    """Compiled patterns, cached per value (catalogues repeat values a lot)."""

    def __init__(self, max_value_chars: int):
        self.max_value_chars = max_value_chars
        self.cache: dict[str, re.Pattern | None] = {}

    def find(self, text: str, value: str) -> list[tuple[int, int]]:
        if is_null_value(value) or len(value) > self.max_value_chars:
            return []
        key = " ".join(value.lower().split())
        if key not in self.cache:
            body = r"\s+".join(re.escape(p) for p in key.split(" "))
            left = r"(?<!\w)" if re.match(r"\w", key) else ""
            right = r"(?!\w)" if re.search(r"\w$", key) else ""
            self.cache[key] = re.compile(left + body + right, re.IGNORECASE) if key else None
        pat = self.cache[key]
        return [(m.start(), m.end()) for m in pat.finditer(text)] if pat else []


def locate(text: str, values: list[tuple[str, str]], matcher: ValueMatcher) -> list[Span]:
    cands = [(a, s, e) for a, v in values for s, e in matcher.find(text, v)]
    taken: list[Span] = []
    for a, s, e in sorted(cands, key=lambda c: (-(c[2] - c[1]), c[1], c[0])):
        if not any(s < te and e > ts for _, ts, te in taken):
            taken.append((a, s, e))
    return sorted(taken, key=lambda x: x[1])


def build_examples(rows: list[dict], fields: list[str], max_chars: int, max_customer_texts: int,
                   max_value_chars: int, min_attribute_count: int, *, with_rows: bool = False):
    """(texts, types, spans, labels, stats, fields) from product rows (with `type`, the product fields,
    `customer_kinds` / `customer_texts`). Only products with a type and at least one filled value
    are used: an untyped product cannot teach the type-conditioned model, and a product with no
    value would teach O on every value its texts mention. `fields[i]` names the field text i
    came from ("title", "description", "bullets[0]", …). With `with_rows` a seventh item,
    `text_rows[i]`, is the index in `rows` of the product text i belongs to."""
    matcher = ValueMatcher(max_value_chars)
    counts: Counter = Counter()
    texts, types, spans, text_fields, text_rows = [], [], [], [], []
    label_texts: Counter = Counter()
    for r, row in enumerate(rows):
        values = filled_values(row)
        if not values:
            counts["products_without_values"] += 1
            continue
        for field, text in product_texts(row, fields, max_chars, max_customer_texts, counts):
            sp = locate(text, values, matcher)
            texts.append(text)
            text_fields.append(field)
            text_rows.append(r)
            types.append(row.get("type"))
            spans.append(sp)
            label_texts.update({a for a, _, _ in sp})
            counts["values_located"] += len(sp)
    labels = sorted((a for a, c in label_texts.items() if c >= min_attribute_count),
                    key=lambda a: (-label_texts[a], a))
    keep = set(labels)
    spans = [[x for x in sp if x[0] in keep] for sp in spans]
    stats = {"texts": len(texts), "texts_with_values": sum(1 for sp in spans if sp),
             "labels": labels,
             "dropped_attributes": sorted(a for a in label_texts if a not in keep),
             **dict(counts)}
    if with_rows:
        return texts, types, spans, labels, stats, text_fields, text_rows
    return texts, types, spans, labels, stats, text_fields
