"""Accepted pairs -> synonym clusters with a canonical name, guarded against chaining.

Connected components alone chain: "16 oz" ~ "16 oz." ~ "1 lb" is fine, but "Model X1" ~
"Model X 1" ~ "Model X" ~ "Model X2" is not. So a component is split around its canonical (the
most frequent term): a member stays only if its own candidate pair with the canonical was
accepted (or, when a scorer is given, the classifier accepts it against the canonical when that
pair was never a candidate); the rest form their own components and are split the same way.
Clusters are capped. Scoring never-proposed pairs was measured to chain: the classifier meets
pairs unlike any it was trained on ("1" against "100") and accepts some (docs/synonyms.md).
"""
from __future__ import annotations

from typing import Callable


def _components(nodes: set[str], edges: dict[tuple[str, str], float]) -> list[set[str]]:
    parent = {n: n for n in nodes}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        if a in nodes and b in nodes:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, set[str]] = {}
    for n in nodes:
        groups.setdefault(find(n), set()).add(n)
    return [g for g in groups.values() if len(g) > 1]


def clusters(edges: dict[tuple[str, str], float], counts: dict[str, int], threshold: float,
             score_pairs: Callable[[list[tuple[str, str]]], list[float]] | None,
             max_size: int) -> list[tuple[str, str, float]]:
    """edges: (a, b) with a < b -> score, the accepted pairs of one (kind, attribute).
    Returns (term, canonical, score) for every merged term other than its canonical."""
    out: list[tuple[str, str, float]] = []
    nodes = {t for e in edges for t in e}
    todo = _components(nodes, edges)
    while todo:
        comp = todo.pop()
        canon = min(comp, key=lambda t: (-counts.get(t, 0), len(t), t))
        others = sorted(comp - {canon})
        known = {t: edges.get((t, canon) if t < canon else (canon, t)) for t in others}
        missing = [t for t in others if known[t] is None]
        if missing and score_pairs is not None:
            for t, s in zip(missing, score_pairs([(t, canon) for t in missing])):
                known[t] = float(s)
        known = {t: (-1.0 if s is None else s) for t, s in known.items()}
        members = sorted((t for t in others if known[t] >= threshold),
                         key=lambda t: (-known[t], t))[: max_size - 1]
        out += [(t, canon, known[t]) for t in members]
        rest = comp - {canon} - set(members)
        todo += _components(rest, edges)
    return out
