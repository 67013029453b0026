"""Spans of a title shared by the tagger's training data, the dictionary baseline and the
modules: null values, the simple plural forms of a type name, and overlap resolution.
Nothing here depends on a module."""
from __future__ import annotations

import re

NULL_VALUES = frozenset({"", "n/a", "na", "none", "null", "nan", "-", "--", "unknown", "other"})

Span = tuple[str, int, int]


def type_variants(product_type: str) -> list[str]:
    """The type and simple singular / plural forms of its last word (English rules of thumb)."""
    t = " ".join(product_type.replace("_", " ").split())
    if not t:
        return []
    head, _, last = t.rpartition(" ")
    pre = head + " " if head else ""
    low = last.lower()
    forms = [last]
    if len(low) > 3 and low.endswith("ies"):
        forms.append(last[:-3] + "y")
    elif low.endswith(("ches", "shes", "sses", "xes", "zes")):
        forms.append(last[:-2])
    elif low.endswith("s") and not low.endswith("ss") and len(low) > 3:
        forms.append(last[:-1])
    elif low.endswith("y") and len(low) > 2 and low[-2] not in "aeiou":
        forms.append(last[:-1] + "ies")
    elif low.endswith(("ch", "sh", "ss", "x", "z")):
        forms.append(last + "es")
    elif re.search(r"[a-z]$", low):
        forms.append(last + "s")
    out, seen = [], set()
    for f in forms:
        v = pre + f
        if v.lower() not in seen:
            seen.add(v.lower())
            out.append(v)
    return out


def resolve_overlaps(cands, allowed: set[str] | None = None) -> list[Span]:
    """Longest first (then leftmost, then the type before attributes); drop what overlaps."""
    taken: list[tuple[int, int]] = []
    out: list[Span] = []
    seen = set()
    for lab, s, e, _ in sorted(cands, key=lambda c: (-(c[2] - c[1]), c[1], c[3])):
        if allowed is not None and lab not in allowed:
            continue
        if (s, e) in seen or any(s < te and e > ts for ts, te in taken):
            continue
        taken.append((s, e))
        seen.add((s, e))
        out.append((lab, s, e))
    return sorted(out, key=lambda x: x[1])
