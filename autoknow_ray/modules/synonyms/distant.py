"""Training pairs from a catalogue alone (distant supervision; gold/ is never read).

Positives:
- co-listed terms: the same item listed twice (same normalised title) with two different
  values of one attribute, or two type names: the catalogue itself says they name one thing;
- rewritten terms: a catalogue term rewritten the ways people write one name differently —
  unit spelling and conversion, code separators, initialism, abbreviation, case, hyphens,
  "&"/"and", singular/plural, a transposed letter.
Negatives:
- near neighbours: two catalogue terms of one attribute that are close in embedding or string
  space but are neither co-listed nor rewrites of each other (mostly different things);
- hard rewrites: a term changed in the one place that changes its meaning — another number
  ("16 oz" -> "12 oz", "Model X1" -> "Model X2"), another unit of the same dimension
  ("16 oz" -> "16 lb"), one character of a code.
"""
from __future__ import annotations

import re

import numpy as np

from autoknow_ray.modules.synonyms.features import (_CONVERTIBLE, _UNITS, fold, key, quantity,
                                                    tokens)

# unit spellings grouped by (dimension, factor): "oz" <-> "ounce" <-> "ounces"
_SPELLINGS: dict[tuple[str, float], list[str]] = {}
for _u, _df in _UNITS.items():
    _SPELLINGS.setdefault(_df, []).append(_u)
_QTY_SPLIT = re.compile(r"^\s*(\d+(?:[.,]\d+)?)\s*[-]?\s*([^\d\s].*?)\s*$")
_VOWELS = set("aeiou")


def _fmt(v: float) -> str:
    return str(int(round(v))) if abs(v - round(v)) < 1e-9 else f"{v:.2f}".rstrip("0").rstrip(".")


def positive_rewrites(term: str, rng: np.random.Generator) -> list[str]:
    out: list[str] = []
    m = _QTY_SPLIT.match(term)
    q = quantity(term)
    if m and q is not None and q[0] != "number":
        num, unit = m.group(1), m.group(2)
        dim_factor = _UNITS.get(fold(unit).rstrip("."))
        if dim_factor:
            spellings = [u for u in _SPELLINGS[dim_factor] if u != fold(unit)]
            for u in rng.permutation(spellings)[:2]:
                out.append(f"{num} {u}" if rng.random() < 0.7 else f"{num}{u}")
            out.append(f"{num}{unit}" if " " in term else f"{num} {unit}")
            # the same amount in another unit of the dimension, where it comes out round
            others = {df for df in _SPELLINGS if df[0] == q[0] and df != dim_factor}
            for df in sorted(others, key=lambda x: x[1]):
                v = q[1] / df[1]
                if 0.1 <= v < 10000 and abs(v * 100 - round(v * 100)) < 1e-6:
                    out.append(f"{_fmt(v)} {_SPELLINGS[df][0]}")
            # the amount in another unit, written bare where the attribute implies the unit
            sensible = [df for df in sorted(others) if 0.1 <= q[1] / df[1] < 10000]
            if q[0] in _CONVERTIBLE and sensible:
                df = sensible[int(rng.integers(len(sensible)))]
                out.insert(1, f"{q[1] / df[1]:.1f}")  # early: fit keeps the first few rewrites
    k = key(term)
    if any(c.isdigit() for c in k) and any(c.isalpha() for c in k) and len(k) >= 5:
        out.append(re.sub(r"[\s\-_/.]+", "", term))  # 435952-B21 -> 435952B21
        if not re.search(r"[\s\-]", term):
            cut = int(rng.integers(2, len(term) - 1))
            out.append(term[:cut] + "-" + term[cut:])
    words = re.findall(r"[A-Za-z]+", term)
    if 2 <= len(words) <= 5 and not any(c.isdigit() for c in term):
        out.append("".join(w[0] for w in words).upper())
    if len(words) == 1 and len(words[0]) >= 5 and not any(c.isdigit() for c in term):
        w = words[0]
        out.append(w[0] + "".join(c for c in w[1:] if c.lower() not in _VOWELS))
        out.append(w[: int(rng.integers(3, 5))] + ("." if rng.random() < 0.5 else ""))
    out.append(term.upper() if rng.random() < 0.5 else term.lower())
    if "-" in term:
        out.append(term.replace("-", " "))
    elif " " in term.strip() and rng.random() < 0.5:
        out.append(term.replace(" ", "-", 1))
    if "&" in term:
        out.append(term.replace("&", "and"))
    elif " and " in term:
        out.append(term.replace(" and ", " & "))
    toks = term.split()
    if toks and toks[-1].isalpha() and len(toks[-1]) > 3:
        last = toks[-1]
        plural = last[:-1] + "ies" if last.endswith("y") else (last[:-1] if last.endswith("s") else last + "s")
        out.append(" ".join(toks[:-1] + [plural]))
    alpha = [i for i, w in enumerate(toks) if w.isalpha() and len(w) >= 6]
    if alpha:
        i = alpha[int(rng.integers(len(alpha)))]
        w = toks[i]
        j = int(rng.integers(1, len(w) - 2))
        toks2 = list(toks)
        toks2[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        out.append(" ".join(toks2))
    return [o for o in dict.fromkeys(out) if o and o != term and o.strip()]


def negative_rewrites(term: str, rng: np.random.Generator) -> list[str]:
    out: list[str] = []
    nums = list(re.finditer(r"\d+", term))
    if nums:
        m = nums[int(rng.integers(len(nums)))]
        v = int(m.group())
        new = v + int(rng.choice([-2, -1, 1, 2, 10])) if v > 2 else v + int(rng.integers(1, 4))
        if new != v and new >= 0:
            out.append(term[: m.start()] + str(new) + term[m.end():])
    m = _QTY_SPLIT.match(term)
    q = quantity(term)
    if m and q is not None and q[0] != "number":
        num, unit = m.group(1), m.group(2)
        own = _UNITS.get(fold(unit).rstrip("."))
        others = [df for df in _SPELLINGS if df[0] == q[0] and df != own]
        if others:
            df = others[int(rng.integers(len(others)))]
            out.append(f"{num} {_SPELLINGS[df][0]}")
            if q[0] in _CONVERTIBLE:  # a bare number that is not the amount in that unit
                v = q[1] / df[1] * float(rng.choice([0.8, 0.9, 1.1, 1.25]))
                if 0.1 <= v < 10000:
                    out.insert(1, f"{v:.1f}")  # early: fit keeps the first few rewrites
    k = key(term)
    if any(c.isdigit() for c in k) and any(c.isalpha() for c in k) and len(k) >= 5:
        chars = list(term)
        pos = [i for i, c in enumerate(chars) if c.isalnum()]
        i = pos[int(rng.integers(len(pos)))]
        chars[i] = str((int(chars[i]) + 1) % 10) if chars[i].isdigit() else (
            "B" if chars[i].upper() != "B" else "C")
        out.append("".join(chars))
    return [o for o in dict.fromkeys(out) if o and key(o) != key(term)]


def colisted_pairs(rows: list[tuple[str, str, str, str]]) -> set[tuple[str, str, str, str]]:
    """rows: (title_key, kind, attribute, term) of sampled products. Pairs of different terms of
    one (kind, attribute) that the same title carries: (kind, attribute, a, b) with a < b."""
    by: dict[tuple[str, str, str], set[str]] = {}
    for t, kind, attr, term in rows:
        if t:
            by.setdefault((t, kind, attr), set()).add(term)
    out = set()
    for (_, kind, attr), terms in by.items():
        if 2 <= len(terms) <= 4:  # more values than that under one title is a messy listing
            ts = sorted(terms)
            for i in range(len(ts)):
                for j in range(i + 1, len(ts)):
                    out.add((kind, attr, ts[i], ts[j]))
    return out


def title_key(title: str | None) -> str:
    return " ".join(tokens(title or ""))[:300]
