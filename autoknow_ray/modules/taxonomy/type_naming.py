"""A new type named by what most of its titles write, once the spread has given it its titles.

A new type takes its first name from the spans that found it: a tagger span or a title name of a
few products. The spread then gives it the nearby titles that wrote no type (`SpreadNewTypes`).
Where those first spans were a stray word, the type is named by a word most of its products
never write, and placed by it: on AE-110K with fishing lures withheld from fit, the tagger read
"Eyes" as a type in two lure titles ("Vivid 3D Eyes Hard Bait … Fishing Lure"), the spread gave
"Eyes" 104 more lure titles, and the type hung under Clothing.

After the spread, each new type's titles (a capped sample) are read against the other typed
titles of this catalogue (a capped sample per type). A type keeps its name where at least
`min_share` of its titles write it or one of its variants (stemmed words, in order). Otherwise
it takes the phrase of one to three words that the most of its titles write, where that is at
least `min_share` of them and `min_lift` times the share of the other titles that write it: a
phrase of this type's titles, not of the catalogue's ("Women", "New" are everywhere). A
candidate must be a type name of fit's vocabulary (the public taxonomies' names and the
catalogue's own, as a title name must be: "Lure" is one, the shoe sizes' "US" is not), and is
never a taxonomy node's name, another new type's name, a word with digits, or a word of an
attribute value the tagger read in that title (a brand, a model number). Of phrases written by
equally many titles, the shorter (a head word before the phrases it ends: "Lure", not "Fishing
Lure"), then the one whose share stands out most over the other titles'. The surface is the
phrase as its titles write it most often.

Bounded: the caller passes capped samples; the counts are per (type, phrase) over them.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa

from autoknow_ray.modules.taxonomy.types import renamed_type
from autoknow_ray.schema import HAS_TYPE
from autoknow_ray.text import type_key

MAX_WORDS = 3
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?", re.UNICODE)


@dataclass
class TypeNaming:
    rename: dict[str, str] = field(default_factory=dict)  # old name -> the name its titles write
    kept: int = 0  # new types whose titles write their name (or a variant's)
    too_few_titles: int = 0  # new types with fewer than `min_titles` sampled titles: not judged
    no_phrase: int = 0  # names written by too few titles, and no phrase that passes either
    shares: dict[str, dict] = field(default_factory=dict)  # renamed: old / new share, lift

    def report(self) -> dict:
        return {"renamed": len(self.rename), "kept": self.kept, "too_few_titles": self.too_few_titles,
                "no_phrase": self.no_phrase, "renames": self.shares}


def _words(title: str) -> list[tuple[str, str]]:
    """(surface, stemmed key) of each word of a title, in order (type_key's folding)."""
    out = []
    for m in _WORD.finditer(title):
        key = type_key(m.group(0))
        if key:
            out.append((m.group(0), key))
    return out


def _phrases(title: str, blocked: set[str]) -> dict[str, str]:
    """Every run of one to MAX_WORDS words of `title` whose words are letters only and none of
    them in `blocked` (stemmed words of the title's attribute spans): key -> surface."""
    words = _words(title)
    out: dict[str, str] = {}
    for i in range(len(words)):
        for j in range(i + 1, min(len(words), i + MAX_WORDS) + 1):
            run = words[i:j]
            if any(not w.isalpha() or len(w) < 2 or k in blocked for w, k in run):
                break
            out.setdefault(" ".join(k for _, k in run), " ".join(w for w, _ in run))
    return out


def _writes(title_keys: str, key: str) -> bool:
    return f" {key} " in title_keys


def _surface(forms: Counter) -> str:
    best = min(forms, key=lambda s: (-forms[s], s))
    return best if any(c.isupper() for c in best) else " ".join(w[:1].upper() + w[1:] for w in best.split())


def name_new_types(titles: dict[str, list[str]], new: set[str],
                   variants: dict[str, list[str]] | None = None, reserved: set[str] = frozenset(),
                   blocked: dict[str, list[set[str]]] | None = None, min_share: float = 0.5,
                   min_lift: float = 4.0, min_titles: int = 10,
                   type_names: set[str] | None = None) -> TypeNaming:
    """`titles`: every typed type (known and new) -> its sampled titles; `new`: the new types
    to judge; a new type's titles are read against every other type's. `variants`: a type's
    other names; `reserved`: type keys no new type may take (the taxonomy's; the new types'
    own names are added here); `blocked`: per new type and title, the stemmed words of that
    title's attribute values (`blocked_words`); `type_names`: the keys of the names a type may
    take (fit's vocabulary of type names; None: any phrase)."""
    variants = variants or {}
    blocked = blocked or {}
    taken = set(reserved) | {type_key(t) for t in new}
    keyed = {t: [f" {' '.join(k for _, k in _words(x))} " for x in xs if isinstance(x, str)]
             for t, xs in titles.items()}
    n_all = sum(len(v) for v in keyed.values())
    all_cache: dict[str, int] = {}

    def count_all(key: str) -> int:
        if key not in all_cache:
            all_cache[key] = sum(_writes(x, key) for v in keyed.values() for x in v)
        return all_cache[key]

    out = TypeNaming()
    for t in sorted(new):
        texts = [x for x in titles.get(t, ()) if isinstance(x, str)]
        n = len(texts)
        if n < min_titles:
            out.too_few_titles += 1
            continue
        mine = keyed[t]
        names = {type_key(v) for v in [t, *variants.get(t, ())]} - {""}
        own = sum(any(_writes(x, k) for k in names) for x in mine) / n
        if own >= min_share:
            out.kept += 1
            continue
        counts: Counter = Counter()
        forms: dict[str, Counter] = defaultdict(Counter)
        spans = blocked.get(t) or [set()] * n
        for x, stop in zip(texts, spans):
            for key, surface in _phrases(x, stop or set()).items():
                counts[key] += 1
                forms[key][surface] += 1
        n_rest = n_all - n
        best = None
        for key, c in counts.items():
            share = c / n
            if share < min_share or key in taken or (type_names is not None and key not in type_names):
                continue
            rest = count_all(key) - sum(_writes(x, key) for x in mine)
            lift = share / ((rest + 1) / (n_rest + 1))
            if lift < min_lift:
                continue
            rank = (-c, len(key.split()), -lift, key)
            if best is None or rank < best[0]:
                best = (rank, key, share, lift)
        if best is None:
            out.no_phrase += 1
            continue
        _, key, share, lift = best
        name = _surface(forms[key])
        out.rename[t] = name
        taken.add(key)
        out.shares[t] = {"name": name, "old_share": round(own, 4), "share": round(share, 4),
                         "lift": round(lift, 2), "titles": n}
    return out


def blocked_words(edits) -> set[str]:
    """Stemmed words of the attribute values a product's title gave (its title edits other than
    `has_type`): no name is read there."""
    words: set[str] = set()
    for e in edits or ():
        relation, value = e.get("relation"), e.get("object")
        if relation and value and relation != HAS_TYPE:
            words.update(type_key(value).split())
    return words


def renamed(batch: pa.Table, rename: dict[str, str]) -> pa.Table:
    """Resolved products (`_decisions` rows) with every new type in `rename` under its new name:
    the type, its evidence (which says so), its `has_type` edit and its ranked candidates."""
    types = batch.column("type").to_pylist()
    hit = [i for i, t in enumerate(types) if t in rename]
    ranked = batch.column("ranked").to_pylist() if "ranked" in batch.column_names else None
    if not hit and not (ranked and any(r.get("type") in rename for rs in ranked for r in rs or ())):
        return batch
    evidence = batch.column("type_evidence").to_pylist()
    edits = batch.column("edits").to_pylist()
    for i in hit:
        old = types[i]
        types[i], evidence[i], edits[i] = renamed_type(
            old, rename[old], evidence[i], edits[i],
            f"; named '{rename[old]}' as most of its titles write it (was '{old}')")
    out = batch.set_column(batch.column_names.index("type"), "type", pa.array(types, pa.string()))
    out = out.set_column(out.column_names.index("type_evidence"), "type_evidence",
                         pa.array(evidence, pa.string()))
    out = out.set_column(out.column_names.index("edits"), "edits",
                         pa.array(edits, batch.schema.field("edits").type))
    if ranked is not None:
        ranked = [[dict(r, type=rename.get(r.get("type"), r.get("type"))) for r in rs]
                  if rs is not None else None for rs in ranked]
        out = out.set_column(out.column_names.index("ranked"), "ranked",
                             pa.array(ranked, batch.schema.field("ranked").type))
    return out


def renamed_candidates(candidates: pl.DataFrame, rename: dict[str, str]) -> pl.DataFrame:
    """The new-type table with each renamed type under its new name, the old one among its
    variants (first)."""
    if not rename or not candidates.height:
        return candidates
    if "variants" not in candidates.columns:
        candidates = candidates.with_columns(pl.lit([], dtype=pl.List(pl.String)).alias("variants"))
    rows = []
    for r in candidates.iter_rows(named=True):
        old = r["type"]
        if old in rename:
            r = dict(r, type=rename[old], variants=[old, *(r["variants"] or [])])
        rows.append(r)
    return pl.DataFrame(rows, schema=candidates.schema)
