"""Synonym finding against gold synonym pairs (gold/synonyms: kind, attribute, term, canonical).

Two views, each per kind (type | value):
- pairs: the stage's scored candidates (RUN/synonyms/pairs), labelled by the gold: a pair of
  terms with the same gold canonical is positive, a pair of gold terms with different canonicals
  is a negative (these are the hard negatives: candidates are near strings or near vectors);
  pairs with a term the gold does not know are not judged. The positives are every gold pair
  whose two terms are in the run's vocabulary, so a positive the candidate search missed counts
  as missed. AUC-PR (average precision) for the classifier score and for the two single-feature
  baselines (edit similarity, embedding cosine), F1 at the shipped threshold for the classifier
  and the best F1 over all thresholds for each (an oracle threshold, favourable to the baselines).
- graph: the merges a user sees, from RUN/graph/synonyms alone: every two terms of one cluster
  form a predicted pair, judged the same way; recall over the same gold positives.
"""
from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import polars as pl

from autoknow_ray.eval.metrics import prf
from autoknow_ray.pipeline import read_parquet_any, table_file

SCORERS = {"classifier": "score", "edit_distance": "edit_sim", "cosine": "cosine"}


def _attr(kind: str, attribute) -> str:
    return "" if kind == "type" or attribute is None else str(attribute)


def _canon_map(gold: pl.DataFrame) -> dict[tuple[str, str, str], str]:
    canon = {}
    for kind, attr, term, c in gold.select("kind", "attribute", "term", "canonical").iter_rows():
        a = _attr(kind, attr)
        canon.setdefault((kind, a, c), c)
        canon.setdefault((kind, a, term), c)
    return canon


def _label(canon: dict, kind: str, attr: str, a: str, b: str) -> int | None:
    ca, cb = canon.get((kind, attr, a)), canon.get((kind, attr, b))
    if ca is None or cb is None:
        return None
    return int(ca == cb)


def _gold_positives(canon: dict, vocab: set[tuple[str, str, str]]) -> set[tuple]:
    groups: dict[tuple[str, str, str], list[str]] = {}
    for (kind, attr, term), c in canon.items():
        if (kind, attr, term) in vocab:
            groups.setdefault((kind, attr, c), []).append(term)
    out = set()
    for (kind, attr, _), terms in groups.items():
        for a, b in combinations(sorted(set(terms)), 2):
            out.add((kind, attr, a, b))
    return out


def average_precision(labels: np.ndarray, scores: np.ndarray, n_positive: int) -> float:
    """Average precision over the ranked judged pairs; positives never ranked count as missed."""
    if n_positive == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    y = labels[order]
    precision = np.cumsum(y) / np.arange(1, len(y) + 1)
    return round(float((precision * y).sum() / n_positive), 4)


def best_f1(labels: np.ndarray, scores: np.ndarray, n_positive: int) -> float:
    if n_positive == 0 or len(labels) == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    y = labels[order]
    tp = np.cumsum(y)
    k = np.arange(1, len(y) + 1)
    f1 = 2 * tp / (k + n_positive)
    return round(float(f1.max()), 4)


def score(run: Path, gold: Path) -> dict:
    run, gold = Path(run), Path(gold)
    gp = table_file(gold, "synonyms")
    if not gp.exists():
        return {}
    g = read_parquet_any(gp)
    if g.height == 0:
        return {}
    canon = _canon_map(g)
    out: dict = {}
    vp = table_file(run / "synonyms", "vocabulary")
    vocab = read_parquet_any(vp) if vp.exists() else pl.DataFrame()
    vocab_keys = {(k, _attr(k, a), t) for k, a, t in vocab.select("kind", "attribute", "term").iter_rows()} \
        if vocab.height else set()
    positives = _gold_positives(canon, vocab_keys)
    pp = table_file(run / "synonyms", "pairs")
    pairs = read_parquet_any(pp) if pp.exists() else pl.DataFrame()
    for kind in sorted({k for k, *_ in canon}):
        pos_k = {p for p in positives if p[0] == kind}
        n_pos = len(pos_k)
        out[f"synonyms.{kind}.gold_pairs_in_vocabulary"] = n_pos
        if pairs.height:
            pk = pairs.filter(pl.col("kind") == kind)
            rows = [(_label(canon, kind, _attr(kind, a), x, y), s, e, c, acc)
                    for a, x, y, s, e, c, acc in pk.select("attribute", "term_a", "term_b", "score",
                                                           "edit_sim", "cosine", "accepted").iter_rows()]
            rows = [r for r in rows if r[0] is not None]
            y = np.array([r[0] for r in rows], dtype=np.int64)
            out[f"synonyms.{kind}.pairs_judged"] = len(rows)
            out[f"synonyms.{kind}.hard_negatives"] = int((y == 0).sum())
            out[f"synonyms.{kind}.candidate_recall"] = round(int(y.sum()) / n_pos, 4) if n_pos else 0.0
            for name, i in (("classifier", 1), ("edit_distance", 2), ("cosine", 3)):
                s = np.array([r[i] if r[i] is not None else 0.0 for r in rows], dtype=np.float64)
                out[f"synonyms.{kind}.{name}.auc_pr"] = average_precision(y, s, n_pos)
                out[f"synonyms.{kind}.{name}.f1_best"] = best_f1(y, s, n_pos)
            acc = np.array([bool(r[4]) for r in rows], dtype=bool)
            tp = int((acc & (y == 1)).sum())
            r = prf(tp, int((acc & (y == 0)).sum()), n_pos - tp)
            for m in ("precision", "recall", "f1"):
                out[f"synonyms.{kind}.classifier.{m}"] = r[m]
        gs = table_file(run / "graph", "synonyms")
        merged = read_parquet_any(gs) if gs.exists() else pl.DataFrame()
        clusters: dict[tuple[str, str, str], set[str]] = {}
        if merged.height:
            for k, a, t, c in merged.select("kind", "attribute", "term", "canonical").iter_rows():
                if k == kind:
                    clusters.setdefault((k, _attr(k, a), c), {c}).add(t)
        tp = fp = 0
        for (k, a, _), terms in clusters.items():
            for x, y in combinations(sorted(terms), 2):
                lab = _label(canon, k, a, x, y)
                if lab is None:
                    continue
                tp += lab == 1 and (k, a, x, y) in pos_k
                fp += lab == 0
        r = prf(tp, fp, n_pos - tp)
        for m in ("precision", "recall", "f1", "tp", "fp"):
            out[f"synonyms.{kind}.graph.{m}"] = r[m]
    return out
