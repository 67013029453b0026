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
from pathlib import Path
from typing import Iterable

import pyarrow as pa

from autoknow_ray.modules.taxonomy import type_names
from autoknow_ray.steps import Step
from autoknow_ray.text import type_key

VOCABULARY_FILE = "type_vocabulary.json"
MAX_WORDS = 4  # type_names.usable keeps names of one to four words
EVIDENCE_PREFIX = "title names "


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


def save_vocabulary(vocab: dict[str, str], out: Path, source: str) -> dict:
    (Path(out) / VOCABULARY_FILE).write_text(json.dumps({"source": source, "names": vocab},
                                                        sort_keys=True))
    return {"names": len(vocab), "source": source}


def load_vocabulary(model_dir: Path) -> dict[str, str]:
    """The fit's vocabulary ({} for a model folder from before it, or a fit without one)."""
    p = Path(model_dir) / VOCABULARY_FILE
    if not p.exists():
        return {}
    return dict(json.loads(p.read_text()).get("names") or {})


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


class TitleTypeNames(Step):
    """Appends `name_keys` (list of strings): the vocabulary's type names written in each title,
    outside its brand spans (after `TagTitles`, in the same actor)."""

    name = "title_type_names"
    resources = "taxonomy"
    columns = ("title", "spans")

    def __init__(self, vocab: dict[str, str]):
        self.vocab = frozenset(vocab)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        titles = batch.column("title").to_pylist()
        spans = batch.column("spans").to_pylist()
        keys = [name_keys(t, s, self.vocab) for t, s in zip(titles, spans)]
        return batch.append_column("name_keys", pa.array(keys, pa.list_(pa.string())))


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
