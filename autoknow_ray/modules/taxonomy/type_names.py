"""Product-type names from public taxonomies, for training the title tagger on where and how a
type stands in a title rather than on which few words a catalogue's types are.

A catalogue with a handful of types teaches a tagger those words ("Coffee", "Tea"), not the
position and form of a type in a title; a type it never saw is then tagged as nothing. Swapping
the type span of some training titles for other type names (`distant.swap_types`) makes the
position and the form the signal. The names come from two public taxonomies (Google's product
taxonomy and the English names of Open Food Facts' categories), read at fit time from where the
shared data lies ($AUTOKNOW_SHARED_DATA, else ../shared/data beside the project): the data keeps
its own licence and is never copied into the package. Where neither file is found, the caller
falls back to the catalogue's own type names.

Only short names made of words are kept (1 to 4 words, letters, spaces, hyphens, apostrophes):
the way titles name a type ("Ground Coffee", "Ballpoint Pen"), not "Vitamins & Supplements".
"""
from __future__ import annotations

import gzip
import json
import os
import re
from functools import lru_cache
from pathlib import Path

GOOGLE = ("google-taxonomy", "taxonomy_nested_set.en-US.txt")
OFF = ("off-taxonomy", "categories.full.json.gz")
_WORDY = re.compile(r"^[A-Za-z][A-Za-z' -]*[A-Za-z]$")


def usable(name: str) -> str | None:
    """The name cleaned, or None when it is not a short run of words."""
    n = " ".join(str(name).split())
    if not _WORDY.match(n) or not 1 <= len(n.split()) <= 4 or len(n) > 40:
        return None
    return n


def from_google(path: str | Path) -> list[str]:
    """The last segment of every category (`id | [l-r] | name` lines; '#' lines skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("#") or line.count("|") < 2:
            continue
        name = line.split("|", 2)[2].split(">")[-1].strip()
        out.append(name)
    return out


def from_off(path: str | Path) -> list[str]:
    """The English name and synonyms of every Open Food Facts category."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        nodes = json.load(f)
    out = []
    for node in nodes.values():
        out.append((node.get("name") or {}).get("en") or "")
        out += (node.get("synonyms") or {}).get("en") or []
    return out


def build(names: list[str]) -> list[str]:
    seen, out = set(), []
    for raw in names:
        n = usable(raw)
        if n is not None and n.lower() not in seen:
            seen.add(n.lower())
            out.append(n)
    return sorted(out, key=str.lower)


def shared_data_dir() -> Path | None:
    """$AUTOKNOW_SHARED_DATA, else ../shared/data beside the project's checkout, if present."""
    env = os.environ.get("AUTOKNOW_SHARED_DATA")
    for d in ([Path(env)] if env else []) + [Path(__file__).resolve().parents[4] / "shared" / "data"]:
        if d.is_dir():
            return d
    return None


@lru_cache(maxsize=4)
def load(source: str = "auto") -> tuple[str, ...]:
    """The names of `source`: "auto" (the public taxonomies of the shared data, () when they
    are not there), "none" (no names), or a text file (one name a line, gzipped when it ends in
    .gz)."""
    if source == "none":
        return ()
    if source == "auto":
        d = shared_data_dir()
        if d is None:
            return ()
        google, off = d.joinpath(*GOOGLE), d.joinpath(*OFF)
        return tuple(build((from_google(google) if google.exists() else [])
                           + (from_off(off) if off.exists() else [])))
    path = Path(source)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return tuple(n for n in (usable(x) for x in f) if n)
