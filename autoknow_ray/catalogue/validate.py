"""Row validation for every input table: each raw row becomes a clean row or a quarantine reason.

Pure functions over Python rows, so the same rules serve Parquet, JSON Lines and CSV inputs, and
are tested without Ray. A rule names the field and what was expected.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable

from autoknow_ray.catalogue.config import IngestConfig
from autoknow_ray.schema import BEHAVIOR_ACTIONS, TEXT_KINDS


class RowError(ValueError):
    pass


def _has_surrogates(s: str) -> bool:
    """Whether `s` holds a surrogate code point (U+D800..U+DFFF): bytes that were not UTF-8 come
    back as lone surrogates (surrogateescape). Strict UTF-8 refuses exactly those code points, so
    one C-level encode answers it (a Python loop per character cost a fifth of ingest)."""
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _text(row: dict, field: str, *, required: bool, max_chars: int) -> str | None:
    v = row.get(field)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        if required:
            raise RowError(f"missing {field}")
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(int(v)) if float(v).is_integer() else str(v)
    if not isinstance(v, str):
        raise RowError(f"{field}: expected a string, got {type(v).__name__}")
    if _has_surrogates(v):
        raise RowError(f"{field}: non-UTF-8 bytes")
    v = " ".join(v.split())  # control characters, tabs and newlines collapse to single spaces
    if not v:
        if required:
            raise RowError(f"empty {field}")
        return None
    if len(v) > max_chars:
        raise RowError(f"{field}: absurd length ({len(v)} chars > {max_chars})")
    return v


def _maybe_json(v: Any) -> Any:
    if isinstance(v, str):
        s = v.strip()
        if s[:1] in "[{":
            try:
                return json.loads(s)
            except json.JSONDecodeError as e:
                raise RowError(f"unparseable JSON in field ({e.msg})") from None
    return v


def _bullets(row: dict, cfg: IngestConfig) -> list[str] | None:
    v = _maybe_json(row.get("bullets"))
    if v is None:
        return None
    if isinstance(v, str):
        v = [b for b in v.split("|")]
    if not isinstance(v, (list, tuple)):
        raise RowError(f"bullets: expected a list of strings, got {type(v).__name__}")
    if len(v) > cfg.max_bullets:
        raise RowError(f"bullets: {len(v)} items > {cfg.max_bullets}")
    out = []
    for b in v:
        if b is None:
            continue
        b = _text({"b": b}, "b", required=False, max_chars=cfg.max_description_chars)
        if b:
            out.append(b)
    return out


def _attributes(row: dict, cfg: IngestConfig) -> list[dict] | None:
    v = _maybe_json(row.get("attributes"))
    if v is None:
        return None
    if isinstance(v, dict):  # {name: value} is accepted as a shorthand
        v = [{"name": k, "value": x} for k, x in v.items()]
    if not isinstance(v, (list, tuple)):
        raise RowError(f"attributes: expected a list of {{name, value}}, got {type(v).__name__}")
    if len(v) > cfg.max_attributes:
        raise RowError(f"attributes: {len(v)} items > {cfg.max_attributes}")
    out = []
    for a in v:
        if not isinstance(a, dict) or "name" not in a or "value" not in a:
            raise RowError("attributes: each item must be {name, value}")
        name = _text(a, "name", required=False, max_chars=200)
        values = a["value"] if isinstance(a["value"], (list, tuple)) else [a["value"]]
        for x in values:
            val = _text({"value": x}, "value", required=False, max_chars=cfg.max_value_chars)
            if name and val:
                out.append({"name": name, "value": val})
    return out


def validate_product(row: dict, cfg: IngestConfig) -> dict:
    return {
        "product_id": _text(row, "product_id", required=True, max_chars=cfg.max_id_chars),
        "title": _text(row, "title", required=True, max_chars=cfg.max_title_chars),
        "description": _text(
            row, "description", required=False, max_chars=cfg.max_description_chars
        ),
        "bullets": _bullets(row, cfg),
        "product_type": _text(row, "product_type", required=False, max_chars=200),
        "attributes": _attributes(row, cfg),
        "brand": _text(row, "brand", required=False, max_chars=cfg.max_value_chars),
    }


def validate_taxonomy(row: dict, cfg: IngestConfig) -> dict:
    t = _text(row, "type", required=True, max_chars=300)
    p = _text(row, "parent", required=False, max_chars=300)
    if p is not None and p == t:
        raise RowError("parent: a type cannot be its own parent")
    return {"type": t, "parent": p}


def validate_text(row: dict, cfg: IngestConfig) -> dict:
    kind = _text(row, "kind", required=False, max_chars=20) or "review"
    kind = kind.lower()
    if kind not in TEXT_KINDS:
        raise RowError(f"kind: expected one of {TEXT_KINDS}, got {kind!r}")
    return {
        "product_id": _text(row, "product_id", required=True, max_chars=cfg.max_id_chars),
        "kind": kind,
        "text": _text(row, "text", required=True, max_chars=cfg.max_description_chars),
    }


def _count(row: dict) -> int:
    v = row.get("count")
    if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
        return 1
    try:
        c = int(float(v))
    except (TypeError, ValueError):
        raise RowError(f"count: expected a number, got {v!r}") from None
    if c < 0:
        raise RowError(f"count: negative ({c})")
    return c


def validate_behavior(row: dict, cfg: IngestConfig) -> dict:
    action = (_text(row, "action", required=False, max_chars=20) or "view").lower()
    if action not in BEHAVIOR_ACTIONS:
        raise RowError(f"action: expected one of {BEHAVIOR_ACTIONS}, got {action!r}")
    return {
        "query": _text(row, "query", required=True, max_chars=cfg.max_value_chars),
        "product_id": _text(row, "product_id", required=True, max_chars=cfg.max_id_chars),
        "action": action,
        "count": _count(row),
    }


def validate_copurchase(row: dict, cfg: IngestConfig) -> dict:
    src = _text(row, "src", required=True, max_chars=cfg.max_id_chars)
    dst = _text(row, "dst", required=True, max_chars=cfg.max_id_chars)
    if src == dst:
        raise RowError("dst: same product as src")
    return {"src": src, "dst": dst, "count": _count(row)}


VALIDATORS: dict[str, Callable[[dict, IngestConfig], dict]] = {
    "products": validate_product,
    "taxonomy": validate_taxonomy,
    "texts": validate_text,
    "behavior": validate_behavior,
    "copurchase": validate_copurchase,
}
# the key whose duplicates are rejected (first occurrence kept)
UNIQUE_KEYS = {"products": "product_id"}
