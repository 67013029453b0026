"""Type names written in titles: the open world's second signal, beside the tagger's type spans.

A title usually names its type in words a public taxonomy knows ("Banana Boat Sport Performance
Sunscreen Lotion SPF 100": "Sunscreen"), whether or not the catalogue being rebuilt has that type.
A tagger trained on a catalogue with a handful of types rarely marks such a word as a type span
(measured: docs/taxonomy.md), so the words are looked up in a vocabulary of type names instead:

- **The vocabulary** is built by `fit`: the fit catalogue's own type names, plus the short
  word-only names of the public taxonomies beside the project (`type_names.load`: Google's product
  taxonomy and Open Food Facts' categories), minus every name that is one of the fit catalogue's
  attribute values ("Banana" is a flavour there, "Green" a colour, not a type). It is written to
  the model folder (`type_vocabulary.json`), so a rebuild needs no shared data.
- **Per product, in the workers** (`TitleTypeNames`, in the title-models chain): the vocabulary
  keys that occur as whole-word runs of the title, outside the spans the tagger labelled as a
  brand ("Banana Boat" names a brand, not bananas), longest first, left to right, without
  overlaps.
- **Per key, on the driver**: how many products with neither a catalogue type nor a tagger type
  mention each key (a per-key aggregate, bounded by the vocabulary). A key the taxonomy lacks with
  at least `min_support` of them is a new-type name.
- **The decision** (`ResolveTypes`): a product that the tagger did not type and the kNN vote
  refused (its neighbours too far, or no agreement) takes the name its title writes with the
  most support: a known type (also a known type's head word, when one known type alone ends in
  it: "Mask" names "Safety Mask"), else an accepted new one.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import pyarrow as pa

from autoknow_ray.modules.taxonomy import type_names
from autoknow_ray.steps import Step
from autoknow_ray.text import type_key

VOCABULARY_FILE = "type_vocabulary.json"
MAX_NOT_TYPES = 50_000  # attribute value keys kept with the vocabulary (a capped fit sample's)
MAX_WORDS = 4  # type_names.usable keeps names of one to four words
EVIDENCE_PREFIX = "title names "
# what exporters write for a missing field ("… 7.2K 3.5 NHP SAT Null", "Null Price"): no type
MISSING_WORDS = frozenset({"null", "none", "nan", "nil", "undefined", "n/a", "na"})


def build_vocabulary(catalogue_types: Iterable[str], public_names: Iterable[str],
                     attribute_values: Iterable[str]) -> dict[str, str]:
    """{type key: name}: the catalogue's types first, then the public names whose key is none of
    the catalogue's attribute values."""
    attr_keys = {type_key(v) for v in attribute_values if isinstance(v, str)}
    vocab: dict[str, str] = {}
    for name in catalogue_types:
        n = type_names.usable(name) if isinstance(name, str) else None
        k = type_key(n) if n else ""
        if k:
            vocab.setdefault(k, n)
    for name in public_names:
        n = type_names.usable(name)
        k = type_key(n) if n else ""
        if k and k not in attr_keys:
            vocab.setdefault(k, n)
    return vocab


def not_type_keys(attribute_values: Iterable[str], vocab: dict[str, str]) -> list[str]:
    """The keys of the fit catalogue's attribute values that are none of its type names: a
    title's head word that is one of them ("Black", "Vanilla") names no type."""
    keys = {type_key(v) for v in attribute_values if isinstance(v, str)} - set(vocab) - {""}
    return sorted(keys)[:MAX_NOT_TYPES]


def save_vocabulary(vocab: dict[str, str], out: Path, source: str,
                    not_types: list[str] | None = None) -> dict:
    (Path(out) / VOCABULARY_FILE).write_text(json.dumps(
        {"source": source, "names": vocab, "not_types": list(not_types or [])}, sort_keys=True))
    return {"names": len(vocab), "not_types": len(not_types or []), "source": source}


def _read(model_dir: Path) -> dict:
    p = Path(model_dir) / VOCABULARY_FILE
    if not p.exists():
        return {}
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not a type vocabulary ({e}); run `autoknow fit` again") from None
    if not isinstance(d, dict) or not isinstance(d.get("names", {}), dict):
        raise ValueError(f"{p} is not a type vocabulary (no names table); run `autoknow fit` again")
    return d


def load_vocabulary(model_dir: Path) -> dict[str, str]:
    """The fit's vocabulary ({} for a model folder from before it, or a fit without one)."""
    return dict(_read(model_dir).get("names") or {})


def load_vocabulary_and_not_types(model_dir: Path) -> tuple[dict[str, str], frozenset[str]]:
    """Both tables of the fit's vocabulary file, from one read of it."""
    d = _read(model_dir)
    return dict(d.get("names") or {}), frozenset(d.get("not_types") or ())


def _is_brand(label: str | None) -> bool:
    return bool(label) and label.strip().lower() in ("brand", "brand name", "manufacturer")


def name_keys(title: str | None, spans, vocab: dict[str, str] | frozenset) -> list[str]:
    """The vocabulary keys written in `title` outside its brand spans: longest first, then left
    to right, without overlapping words; returned in title order."""
    if not title or not vocab:
        return []
    brand = sorted((sp["start"], sp["end"]) for sp in spans or ()
                   if _is_brand(sp.get("label")) and sp.get("start") is not None)
    segments, pos = [], 0
    for s, e in brand:
        if s > pos:
            segments.append(title[pos:s])
        pos = max(pos, e)
    segments.append(title[pos:])
    found: list[tuple[int, int, str]] = []
    offset = 0
    for seg in segments:
        words = type_key(seg).split()
        taken = [False] * len(words)
        for length in range(min(MAX_WORDS, len(words)), 0, -1):
            for i in range(len(words) - length + 1):
                if any(taken[i:i + length]):
                    continue
                k = " ".join(words[i:i + length])
                if k in vocab:
                    found.append((offset + i, length, k))
                    for j in range(i, i + length):
                        taken[j] = True
        offset += len(words) + 1
    seen, out = set(), []
    for _, _, k in sorted(found):
        if k not in seen:
            seen.add(k)
            out.append(k)
    return out


# where a title's first noun phrase ends: a list separator, a bracket, a dash between spaces, or
# the English words that start a complement ("… Sneaker with Memory Foam", "… Shampoo for Men")
_PHRASE_END = re.compile(r"[,;|(\[/]|\s[-–—]\s|\b(?:with|for|by|in|from|and|or|of)\b", re.I)
_WORD = re.compile(r"[^\W\d_][^\W\d_'’-]*(?:['’-][^\W\d_]+)*")


def head_word(title: str | None, spans, not_types: frozenset | set = frozenset()) -> tuple[str, str] | None:
    """(key, surface) of the last word of the title's first noun phrase, outside its brand spans:
    where an English product title writes its type ("Pleaser Men's Tempo 08 Platform Sneaker,
    Black" → "Sneaker"). None when that word has fewer than three letters, is a possessive or a
    missing-field placeholder ("Null"), follows a number (a unit), or is one of `not_types` (the
    fit catalogue's attribute values), or ends a run of words that is one ("Sugar Free")."""
    if not title:
        return None
    chars = list(title)
    for sp in spans or ():
        if _is_brand(sp.get("label")) and sp.get("start") is not None:
            for i in range(max(0, sp["start"]), min(len(chars), sp["end"])):
                chars[i] = " "
    masked = "".join(chars)
    first = _PHRASE_END.split(masked.strip(), maxsplit=1)[0]
    tokens = first.split()
    upper = title.isupper()
    w, before, at = None, None, -1
    for j in range(len(tokens) - 1, -1, -1):
        found = _WORD.findall(tokens[j])
        if not found:
            continue
        cand = found[-1]
        if not upper and cand.isupper() and len(cand) <= 4:
            continue  # an acronym ends no noun phrase ("… Sunscreen Lotion SPF 100")
        w, before, at = cand, tokens[j - 1] if j else None, j
        break
    if w is None or len(w) < 3 or w.lower().endswith(("'s", "’s")) or w.lower() in MISSING_WORDS:
        return None
    if before is not None and any(ch.isdigit() for ch in before):
        return None  # a measure's unit ("… 500 Mcg", "… 12 Ounce"), not a type
    k = type_key(w)
    if not k or k in not_types:
        return None
    # the phrase ends in one of the fit catalogue's attribute values ("… French Vanilla Sugar
    # Free": "Sugar Free" is a claim there): it ends in an attribute, not in the type
    for m in range(2, MAX_WORDS + 1):
        if at - m + 1 < 0:
            break
        if type_key(" ".join(tokens[at - m + 1:at] + [w])) in not_types:
            return None
    return k, w[0].upper() + w[1:] if w.islower() else w


def attribute_free_keys(title: str | None, spans, keys: list[str]) -> list[str]:
    """Those of `keys` (a title's `name_keys`) written outside every attribute span the tagger
    found in it (its type spans excepted): a colour or a flavour ("… Face Mask, White / Cream")
    is no type."""
    if not keys:
        return []
    masked = [dict(sp, label="brand") for sp in spans or () if sp.get("label") != "type"]
    return name_keys(title, masked, frozenset(keys))


class TitleTypeNames(Step):
    """Appends `name_keys` (list of strings: the vocabulary's type names written in each title,
    outside its brand spans), `free_name_keys` (those outside every attribute span,
    `attribute_free_keys`) and `head_key` / `head_value` (the last word of its first noun
    phrase, `head_word`), after `TagTitles`, in the same actor."""

    name = "title_type_names"
    resources = "taxonomy"
    columns = ("title", "spans")

    def __init__(self, vocab: dict[str, str], not_types: frozenset | set = frozenset()):
        self.vocab = frozenset(vocab)
        self.not_types = frozenset(not_types)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        titles = batch.column("title").to_pylist()
        spans = batch.column("spans").to_pylist()
        keys = [name_keys(t, s, self.vocab) for t, s in zip(titles, spans)]
        free = [attribute_free_keys(t, s, k) for t, s, k in zip(titles, spans, keys)]
        heads = [head_word(t, s, self.not_types) for t, s in zip(titles, spans)]
        return (batch.append_column("name_keys", pa.array(keys, pa.list_(pa.string())))
                .append_column("free_name_keys", pa.array(free, pa.list_(pa.string())))
                .append_column("head_key", pa.array([h[0] if h else None for h in heads], pa.string()))
                .append_column("head_value", pa.array([h[1] if h else None for h in heads], pa.string())))


def pick(keys: Iterable[str], resolve, support: dict[str, int]) -> tuple[str, str] | None:
    """The (key, type) a product's title names, among `keys` that `resolve` maps to a type: the
    most supported key, then the longest, then the first."""
    best, best_rank = None, None
    for order, k in enumerate(keys or ()):
        t = resolve(k)
        if t is None:
            continue
        rank = (support.get(k, 0), len(k.split()), -order)
        if best_rank is None or rank > best_rank:
            best, best_rank = (k, t), rank
    return best
