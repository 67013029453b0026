"""A taxonomy's structure from its (type, parent) rows: parents and children, ancestors, the
types still to be placed. Shared by module 1, the graph and the eval; depends on no module."""
from __future__ import annotations

from collections import defaultdict

import polars as pl


def taxonomy_maps(taxonomy: pl.DataFrame) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(parents, children) of every type named in the taxonomy (as type or as parent)."""
    parents: dict[str, set[str]] = defaultdict(set)
    children: dict[str, set[str]] = defaultdict(set)
    if taxonomy is None or taxonomy.height == 0:
        return {}, {}
    for t, p in taxonomy.select("type", "parent").iter_rows():
        if t is None:
            continue
        parents[t]
        children[t]
        if p is not None and p != t:
            parents[t].add(p)
            children[p].add(t)
            parents[p]
    return dict(parents), dict(children)


def ancestors_map(parents: dict[str, set[str]]) -> dict[str, set[str]]:
    """Every type's strict ancestors (cycles tolerated)."""
    memo: dict[str, set[str]] = {}

    def walk(t: str, visiting: set[str]) -> set[str]:
        if t in memo:
            return memo[t]
        visiting.add(t)
        out: set[str] = set()
        for p in parents.get(t, ()):
            if p in visiting:
                continue
            out.add(p)
            out |= walk(p, visiting)
        visiting.discard(t)
        memo[t] = out
        return out

    for t in parents:
        walk(t, set())
    return memo


def orphan_types(taxonomy: pl.DataFrame, typed: set[str] | None = None) -> list[str]:
    """Types still to be placed: no parent row, not the parent of anything, and no product typed
    under them (`typed`: the catalogue types products carry). A parentless type with children,
    or with products, is a root."""
    parents, children = taxonomy_maps(taxonomy)
    typed = typed or set()
    return sorted(t for t in parents if not parents[t] and not children.get(t) and t not in typed)
