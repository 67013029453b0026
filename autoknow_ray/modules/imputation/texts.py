"""The free texts of a product, cleaned for the tagger, and the values it already has.

Catalogue text is untrusted: HTML tags and entities are removed (tag text is never a value),
whitespace is collapsed, and a text over `max_chars` is cut. Each of these is counted, so the
stage reports how much of its input needed repair. Offsets in evidence refer to the cleaned text.
"""
from __future__ import annotations

import html
import re
from collections import Counter

from autoknow_ray.text import fold, tokens

_TAG = re.compile(r"<\s*(script|style)\b.*?<\s*/\s*\1\s*>|<!--.*?-->|<[^<>]{0,2000}>",
                  re.IGNORECASE | re.DOTALL)
_WS = re.compile(r"\s+")
NULL_VALUES = frozenset({"", "n/a", "na", "none", "null", "nan", "-", "--", "unknown"})
SEP = "\x1f"  # joins attribute and value key in the compact `filled` column


def clean_text(text, max_chars: int, counts: Counter | None = None) -> str:
    """HTML stripped, entities decoded, whitespace collapsed, cut at `max_chars`."""
    if not isinstance(text, str):
        return ""
    if "<" in text and ">" in text:
        stripped = _TAG.sub(" ", text)
        if stripped != text and counts is not None:
            counts["texts_html_stripped"] += 1
        text = stripped
    if "&" in text:
        text = html.unescape(text)
    text = _WS.sub(" ", text).strip()
    if len(text) > max_chars:
        if counts is not None:
            counts["texts_capped"] += 1
        cut = text.rfind(" ", 0, max_chars)
        text = text[: cut if cut > max_chars // 2 else max_chars]
    return text


def product_texts(row: dict, fields: list[str], max_chars: int, max_customer_texts: int,
                  counts: Counter) -> list[tuple[str, str]]:
    """[(field, cleaned text)] of one product, in a fixed order: title, description, bullets[i],
    then customer texts (<kind>[i]). Empty texts are counted and left out."""
    out: list[tuple[str, str]] = []

    def add(field: str, raw) -> None:
        counts["texts_seen"] += 1
        t = clean_text(raw, max_chars, counts)
        if t:
            out.append((field, t))
        else:
            counts["texts_empty"] += 1

    if "title" in fields:
        add("title", row.get("title"))
    if "description" in fields and row.get("description") is not None:
        add("description", row.get("description"))
    if "bullets" in fields:
        for i, b in enumerate(row.get("bullets") or []):
            add(f"bullets[{i}]", b)
    if "texts" in fields:
        kinds = row.get("customer_kinds") or []
        texts = row.get("customer_texts") or []
        over = max(0, len(texts) - max_customer_texts) + int(row.get("customer_texts_dropped") or 0)
        if over:
            counts["customer_texts_over_cap"] += over
        for i, (k, t) in enumerate(zip(kinds, texts)):
            if i >= max_customer_texts:
                break
            add(f"{k or 'text'}[{i}]", t)
    return out


def value_key(value) -> str:
    """Comparison key of a value: lower-cased, accent-folded word tokens."""
    return " ".join(tokens(value)) if isinstance(value, str) else ""


def is_null_value(value) -> bool:
    return not isinstance(value, str) or fold(value).strip() in NULL_VALUES


def filled_values(row: dict) -> list[tuple[str, str]]:
    """[(attribute, value)] the product already has: catalogue attributes, brand, and the
    facts earlier modules added (`upstream`: "attribute\\x1fvalue")."""
    out = []
    for pair in row.get("attributes") or []:
        if pair and isinstance(pair.get("name"), str) and not is_null_value(pair.get("value")):
            out.append((pair["name"].strip(), pair["value"]))
    if not is_null_value(row.get("brand")):
        out.append(("Brand", row["brand"]))
    for item in row.get("upstream") or []:
        if isinstance(item, str) and SEP in item:
            a, v = item.split(SEP, 1)
            out.append((a, v))
    return out
