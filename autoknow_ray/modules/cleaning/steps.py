"""The cleaning module's per-product work: judge every triple of a product with the cross-encoder.

One input row is one product (its text, current type, catalogue attributes and the edits the
modules before cleaning made to it), so the product text is tokenised once for all its claims and
a replacement for a removed value is found without a second pass.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from autoknow_ray.modules.cleaning.model import (TYPE_RELATION, claim_text, product_text,
                                                 text_features)
from autoknow_ray.schema import CLEANING_SCORES
from autoknow_ray.steps import Step, WorkerEnv

CATALOGUE = "catalogue"
LIVE_UPSTREAM = ("added", "corrected")


def _col(batch: pa.Table, name: str) -> list:
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows


def product_claims(product_type, attributes, brand, up_rel, up_obj, up_status, up_module):
    """[(relation, object, origin)] of one product: its catalogue facts (the graph's `kept`
    triples: type, attributes, brand) and the live upstream edits; plus the set of catalogue facts
    an upstream module already retracted."""
    claims: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str]] = set()

    def add(rel, obj, origin):
        if rel is None or obj is None or (rel, obj) in seen:
            return
        seen.add((rel, obj))
        claims.append((rel, obj, origin))

    add(TYPE_RELATION, product_type, CATALOGUE)
    for a in attributes or []:
        if a:
            add(a.get("name"), a.get("value"), CATALOGUE)
    add("Brand", brand, CATALOGUE)
    retracted = set()
    for rel, obj, status, module in zip(up_rel or [], up_obj or [], up_status or [], up_module or []):
        if status == "removed":
            retracted.add((rel, obj))
        elif status in LIVE_UPSTREAM and (rel, obj) not in seen:
            seen.add((rel, obj))
            claims.append((rel, obj, f"{module}:{status}"))
    return claims, retracted


def _evidence(**kw) -> str:
    return json.dumps(kw, ensure_ascii=False, sort_keys=True)


def decide(pid: str, claims: list, scores: list, retracted: set, threshold: float,
           correct: bool, type_threshold: float | None = None) -> list[dict]:
    """The scores-table rows of one product: each claim kept or removed, and `corrected` rows for
    a removed catalogue value an upstream module can replace, or a catalogue type restored when
    module 1's correction of it is rejected."""
    rows = []
    live_up = {}
    type_t = threshold if type_threshold is None else type_threshold

    def limit(rel):
        return type_t if rel == TYPE_RELATION else threshold

    for (rel, obj, origin), s in zip(claims, scores):
        if origin != CATALOGUE and s is not None and s < limit(rel):
            if rel not in live_up or s < live_up[rel][1]:
                live_up[rel] = (obj, s, origin)
    rejected_type_fix = False
    for (rel, obj, origin), s in zip(claims, scores):
        row = dict(subject=pid, relation=rel, object=obj, origin=origin, score=s,
                   module="cleaning", status="kept", confidence=None, evidence=None)
        if s is None:
            row["evidence"] = _evidence(reason="not scored: empty value")
        elif origin == CATALOGUE and (rel, obj) in retracted:
            row["status"] = "upstream_removed"
        elif s >= limit(rel):
            row.update(status="removed", confidence=s)
            if origin == CATALOGUE:
                row["evidence"] = _evidence(score=round(s, 4), reason="misassigned catalogue value",
                                            replacement=live_up.get(rel, (None,))[0] if correct else None)
            else:
                row["evidence"] = _evidence(score=round(s, 4), reason=f"rejected {origin} edit")
                rejected_type_fix |= rel == TYPE_RELATION and origin.endswith(":corrected")
        else:
            row["confidence"] = 1.0 - s
        rows.append(row)
    if correct:
        for row in list(rows):
            rel = row["relation"]
            if row["status"] == "removed" and row["origin"] == CATALOGUE and rel in live_up:
                obj, s, origin = live_up[rel]
                rows.append(dict(subject=pid, relation=rel, object=obj, origin=origin, score=s,
                                 module="cleaning", status="corrected", confidence=1.0 - s,
                                 evidence=_evidence(replaces=row["object"], score=round(s, 4),
                                                    source=origin)))
    if rejected_type_fix:
        for row in list(rows):
            if (row["relation"] == TYPE_RELATION and row["status"] == "upstream_removed"
                    and row["score"] is not None and row["score"] < type_t):
                rows.append(dict(row, status="corrected", confidence=1.0 - row["score"],
                                 evidence=_evidence(score=round(row["score"], 4),
                                                    reason="module 1's type correction rejected; "
                                                           "catalogue type restored")))
    return rows


# the product columns the scorer reads (claims, text, current type); the stage fills absent ones
# with nulls, so a cached step can name them
CLAIM_INPUTS = ("product_id", "title", "description", "type", "product_type", "attributes",
                "brand", "up_relation", "up_object", "up_status", "up_module")
CLAIM_SCORES = "claim_scores"


def _claims_of(cols: dict, i: int, judge_types: bool) -> tuple[list, set]:
    """`product_claims` of the batch's `i`-th product (columns as lists), less its type claim
    where types are not judged."""
    cl, retracted = product_claims(cols["product_type"][i], cols["attributes"][i], cols["brand"][i],
                                   cols["up_relation"][i], cols["up_object"][i],
                                   cols["up_status"][i], cols["up_module"][i])
    if not judge_types:
        cl = [c for c in cl if c[0] != TYPE_RELATION]
    return cl, retracted


class ScoreTriples(Step):
    """Products (with their upstream edits as lists) → one scores row per judged triple."""

    name = "score_triples"
    resources = "cleaning"
    columns = ()  # every column: the upstream lists are absent when no module ran before
    model = True

    def __init__(self, model_dir: str | Path, threshold: float | None, judge_types: bool,
                 correct_from_upstream: bool, bf16, device: str = "auto",
                 type_threshold: float | None = None, fold_rule: str = "own_fold"):
        self.model_dir = str(model_dir)
        self.threshold_override = threshold
        self.type_threshold_override = type_threshold
        self.judge_types = judge_types
        self.correct = correct_from_upstream
        self.bf16 = bf16
        self.device = device
        self.fold_rule = fold_rule
        self.scorer = None

    def setup(self, env: WorkerEnv) -> None:
        from autoknow_ray.modules.cleaning.model import MisassignmentScorer
        from autoknow_ray.nn.encoder import set_cpu_threads

        set_cpu_threads(env.cpu_threads)
        device = "cpu" if env.device == "cpu" else self.device
        self.scorer = MisassignmentScorer(self.model_dir, device=device, bf16=self.bf16,
                                          batch_size=env.batch_size, rule=self.fold_rule)

    @property
    def threshold(self) -> float:
        return self.scorer.threshold if self.threshold_override is None else self.threshold_override

    @property
    def type_threshold(self) -> float:
        return (self.scorer.type_threshold if self.type_threshold_override is None
                else self.type_threshold_override)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        per_product, product_scores = self._score(batch)
        rows = []
        for (pid, cl, _judged, retracted), s in zip(per_product, product_scores):
            rows.extend(decide(pid, cl, s, retracted, self.threshold, self.correct,
                               self.type_threshold))
        return pa.Table.from_pylist(rows, schema=CLEANING_SCORES)

    def _score(self, batch: pa.Table) -> tuple[list, list[list[float | None]]]:
        """Per product of the batch: (product id, claims, judged, retracted) and each claim's
        score (None where its value is empty)."""
        meta = self.scorer.meta
        cols = {c: _col(batch, c) for c in CLAIM_INPUTS}
        per_product, claims, texts, text_of, feats = [], [], [], [], []
        use_f = self.scorer.uses_features
        for i, pid in enumerate(cols["product_id"]):
            cl, retracted = _claims_of(cols, i, self.judge_types)
            texts.append(product_text(cols["title"][i], cols["description"][i],
                                      meta["max_text_chars"]))
            current = cols["type"][i] or cols["product_type"][i]
            ftext = product_text(cols["title"][i], cols["description"][i],
                                 meta.get("feature_text_chars", meta["max_text_chars"])) if use_f else ""
            judged = []
            for rel, obj, origin in cl:
                if isinstance(obj, str) and obj.strip():
                    judged.append(len(claims))
                    claims.append(claim_text(rel, obj, current, meta["max_value_chars"]))
                    text_of.append(i)
                    if use_f:
                        feats.append(text_features(obj, cols["title"][i] or "", ftext))
                else:
                    judged.append(None)
            per_product.append((pid, cl, judged, retracted))
        # under `own_fold` each product is judged by the fold model that fit calibrated for it
        text_fold = [self.scorer.fold(pid) for pid in cols["product_id"]]
        scores = self.scorer.score(claims, texts, text_of, feats if use_f else None, text_fold)
        return per_product, [[None if j is None else float(scores[j]) for j in judged]
                             for _pid, _cl, judged, _r in per_product]




class ClaimScores(ScoreTriples):
    """The scorer alone, as a cached step's model (`rebuild --previous`): each product row with
    `claim_scores`, its claims' scores in `product_claims` order (None where unscored). A
    claim's score does not depend on the rest of its batch, so a reused list is the one a full
    rebuild computes; `DecideClaims` turns it into the scores rows."""

    name = "cleaning_claim_scores"
    columns = CLAIM_INPUTS

    def process_batch(self, batch: pa.Table) -> pa.Table:
        _per_product, product_scores = self._score(batch)
        return batch.append_column(CLAIM_SCORES, pa.array(product_scores, pa.list_(pa.float32())))


class DecideClaims(Step):
    """Product rows with `claim_scores` → one scores row per judged triple (`decide`), at the
    thresholds given: what `ScoreTriples` writes, from scores computed before."""

    name = "cleaning_decide"
    resources = "cleaning"
    columns = (*CLAIM_INPUTS, CLAIM_SCORES)

    def __init__(self, threshold: float | None, type_threshold: float | None, judge_types: bool,
                 correct_from_upstream: bool):
        # None: no threshold (fit found none reaching its target): nothing of that kind removed
        inf = float("inf")
        self.threshold = inf if threshold is None else float(threshold)
        self.type_threshold = inf if type_threshold is None else float(type_threshold)
        self.judge_types, self.correct = judge_types, correct_from_upstream

    def process_batch(self, batch: pa.Table) -> pa.Table:
        cols = {c: _col(batch, c) for c in self.columns}
        rows = []
        for i, pid in enumerate(cols["product_id"]):
            cl, retracted = _claims_of(cols, i, self.judge_types)
            scores = cols[CLAIM_SCORES][i] or []
            if len(scores) != len(cl):
                raise ValueError(f"{pid}: {len(scores)} cached scores for {len(cl)} claims")
            rows.extend(decide(pid, cl, scores, retracted, self.threshold, self.correct,
                               self.type_threshold))
        return pa.Table.from_pylist(rows, schema=CLEANING_SCORES)
