"""The per-product steps of imputation (autoknow_ray.steps protocol; no Ray here).

TagProducts   (model)  one row per product in, one row out: its value candidates from every text
                       (tagger spans with score, field and character span), the values it already
                       has (`filled`), and its input counts (texts, HTML, caps, tokens).
TermRows      (task)   candidates and filled values as (type, term, attribute) rows, for the
                       per-term aggregate the embedding clusters are built from.
DecideValues  (task)   per product and attribute, the best candidate: `added` where the graph has
                       no value, a conflict where it has another one, nothing where it agrees.
                       Every candidate leaves one decision row, the ones not written included
                       (below threshold, not applicable, known, conflict not written, lost to a
                       better candidate of the same attribute, held back where the stage's
                       shift guard found the catalogue unlike the fit's).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa

from autoknow_ray.incremental import KEY
from autoknow_ray.modules.imputation.texts import SEP, filled_values, product_texts, value_key
from autoknow_ray.steps import Step, WorkerEnv

PRODUCT_COLUMNS = ("product_id", "type", "title", "description", "bullets", "attributes", "brand",
                   "customer_kinds", "customer_texts", "customer_texts_dropped", "upstream")
CANDIDATE = pa.struct([("attribute", pa.string()), ("value", pa.string()), ("score", pa.float32()),
                       ("field", pa.string()), ("start", pa.int32()), ("end", pa.int32())])
INPUT_COUNTS = ("texts_seen", "texts_empty", "texts_html_stripped", "texts_capped",
                "customer_texts_over_cap", "tokens", "spans_below_min_score", "candidate_values",
                "titles", "title_tokens")
CANDIDATES = pa.schema([("product_id", pa.string()), ("type", pa.string()),
                        ("filled", pa.list_(pa.string())), ("cands", pa.list_(CANDIDATE)),
                        *[(c, pa.int64()) for c in INPUT_COUNTS]])
TERMS = pa.schema([("type", pa.string()), ("term", pa.string()), ("attribute", pa.string())])
DECISIONS = pa.schema([("subject", pa.string()), ("relation", pa.string()), ("object", pa.string()),
                       ("confidence", pa.float32()), ("module", pa.string()),
                       ("status", pa.string()), ("evidence", pa.string()),
                       ("decision", pa.string())])
UNLABELLED = ""  # attribute of a term the tagger was unsure about


class TagProducts(Step):
    name = "imputation_tag"
    resources = "imputation"
    columns = PRODUCT_COLUMNS
    model = True

    def __init__(self, model_dir: Path, fields: list[str], max_chars: int, max_customer_texts: int,
                 batch_size: int, min_span_score: float, encoder: str):
        self.model_dir = Path(model_dir)
        self.fields = list(fields)
        self.max_chars = max_chars
        self.max_customer_texts = max_customer_texts
        self.batch_size = batch_size
        self.min_span_score = min_span_score
        self.encoder = encoder

    def setup(self, env: WorkerEnv) -> None:
        from autoknow_ray.modules.imputation.model import TypeVectors, load_tagger

        self.tagger = load_tagger(self.model_dir, env.device, env.cpu_threads)
        self.type_vectors = (TypeVectors(self.model_dir, self.encoder, self.tagger.context_dim,
                                         env.device) if self.tagger.context_dim else None)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        units, owners, counts = [], [], []
        for i, row in enumerate(rows):
            c: Counter = Counter()
            for field, text in product_texts(row, self.fields, self.max_chars,
                                             self.max_customer_texts, c):
                units.append((field, text))
                owners.append(i)
            counts.append(c)
        texts = [t for _, t in units]
        ctx = self.type_vectors([rows[o].get("type") for o in owners]) if self.type_vectors else None
        preds, tokens = self.tagger.predict(texts, ctx, self.batch_size)
        cands: list[list[dict]] = [[] for _ in rows]
        for (field, text), owner, spans, n_tok in zip(units, owners, preds, tokens):
            counts[owner]["tokens"] += n_tok
            if field == "title":  # what the stage's shift guard compares with fit's titles
                counts[owner]["titles"] += 1
                counts[owner]["title_tokens"] += n_tok
            for label, s, e, score in spans:
                if score >= self.min_span_score:
                    cands[owner].append({"attribute": label, "value": text[s:e], "score": score,
                                         "field": field, "start": s, "end": e})
                else:
                    counts[owner]["spans_below_min_score"] += 1
        for owner, c in enumerate(cands):
            counts[owner]["candidate_values"] = len(c)
        filled = [[f"{a}{SEP}{value_key(v)}" for a, v in filled_values(r)] for r in rows]
        cols = {
            "product_id": [r.get("product_id") for r in rows],
            "type": [r.get("type") for r in rows],
            "filled": filled,
            "cands": cands,
            **{k: [int(c.get(k, 0)) for c in counts] for k in INPUT_COUNTS},
        }
        out = pa.Table.from_pydict(cols, schema=CANDIDATES)
        if KEY in batch.column_names:  # a cached step's key passes through
            out = out.append_column(KEY, batch.column(KEY))
        return out


class TermRows(Step):
    """Each product's terms: confident spans and filled values labelled with their attribute,
    uncertain spans unlabelled."""

    name = "imputation_terms"
    resources = "imputation"
    columns = ("type", "filled", "cands")

    def __init__(self, min_confidence: float, known_threshold: float | None = None,
                 known_values: frozenset[tuple[str, str]] | None = None):
        self.min_confidence = min_confidence
        self.known_threshold = known_threshold
        self.known_values = known_values or frozenset()

    def process_batch(self, batch: pa.Table) -> pa.Table:
        rows: list[tuple[str, str, str]] = []
        for t, filled, cands in zip(batch.column("type").to_pylist(), batch.column("filled").to_pylist(),
                                    batch.column("cands").to_pylist()):
            t = t or ""
            for item in filled or []:
                a, key = item.split(SEP, 1)
                if key:
                    rows.append((t, key, a))
            for c in cands or []:
                key = value_key(c["value"])
                if key:
                    sure = c["score"] >= threshold_for(self, c["attribute"], key)[0]
                    label = c["attribute"] if sure else UNLABELLED
                    rows.append((t, key, label))
        cols = list(zip(*rows)) if rows else [(), (), ()]
        return pa.Table.from_arrays([pa.array(list(c), pa.string()) for c in cols], schema=TERMS)


class DecideValues(Step):
    """Candidates → decisions; only `added` rows (and conflicts above their own threshold) go to
    the graph. `cluster_map`: (type, term) → (attribute, purity, cluster) for uncertain spans;
    `applicable`: type → attributes module 2 found applicable (None: no restriction).
    `known_threshold`: the threshold for a candidate whose (attribute, value key) is in
    `known_values` (fit's known values, calibrated with `min_confidence` for the others); None:
    one threshold for all."""

    name = "imputation_decide"
    resources = "imputation"
    columns = ("product_id", "type", "filled", "cands")

    def __init__(self, min_confidence: float, min_span_score: float,
                 cluster_map: dict[tuple[str, str], tuple[str, float, int]] | None,
                 applicable: dict[str, set[str]] | None, emit_conflicts: bool,
                 conflict_min_confidence: float, hold_back: bool = False,
                 known_threshold: float | None = None,
                 known_values: frozenset[tuple[str, str]] | None = None):
        self.min_confidence = min_confidence
        self.known_threshold = known_threshold
        self.known_values = known_values or frozenset()
        self.hold_back = hold_back  # the shift guard fired: what would be written is recorded only
        self.min_span_score = min_span_score
        self.cluster_map = cluster_map or {}
        self.applicable = applicable
        self.emit_conflicts = emit_conflicts
        self.conflict_min_confidence = conflict_min_confidence

    def process_batch(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list] = {f.name: [] for f in DECISIONS}

        def emit(pid, attr, value, conf, evidence, decision, status="added"):
            if self.hold_back and written(decision):
                decision, status = HELD_BACK, None
            for k, v in (("subject", pid), ("relation", attr), ("object", value),
                         ("confidence", conf), ("module", "imputation"), ("status", status),
                         ("evidence", evidence), ("decision", decision)):
                out[k].append(v)

        for pid, t, filled, cands in zip(*(batch.column(c).to_pylist() for c in self.columns)):
            t = t or ""
            have: dict[str, set[str]] = {}
            for item in filled or []:
                a, key = item.split(SEP, 1)
                have.setdefault(a, set()).add(key)
            allowed = self.applicable.get(t) if self.applicable is not None and t else None
            best: dict[str, tuple] = {}
            for c in cands or []:
                key = value_key(c["value"])
                where = f"{c['field']}[{c['start']}:{c['end']}]"
                threshold, known = threshold_for(self, c["attribute"], key)
                if c["score"] >= threshold:
                    attr, conf = c["attribute"], float(c["score"])
                    how = f"{where} tagger, known value" if known else f"{where} tagger"
                elif (t, key) in self.cluster_map:
                    attr, purity, cl = self.cluster_map[(t, key)]
                    conf, how = float(purity), f"{where} cluster {cl} (span score {c['score']:.2f})"
                else:
                    emit(pid, c["attribute"], c["value"], float(c["score"]), where,
                         "below_threshold", None)
                    continue
                if allowed is not None and attr not in allowed:
                    emit(pid, attr, c["value"], conf, how, "not_applicable", None)
                    continue
                if attr not in best or conf > best[attr][1]:
                    if attr in best:  # the earlier best loses to this one
                        lost = best[attr]
                        emit(pid, attr, lost[0], lost[1], lost[2], LOST, None)
                    best[attr] = (c["value"], conf, how, key)
                else:
                    emit(pid, attr, c["value"], conf, how, LOST, None)
            for attr, (value, conf, how, key) in best.items():
                if attr not in have:
                    emit(pid, attr, value, conf, how, "added_cluster" if " cluster " in how else "added")
                elif key in have[attr]:
                    emit(pid, attr, value, conf, how, "known", None)
                elif self.emit_conflicts and conf >= self.conflict_min_confidence:
                    emit(pid, attr, value, conf, f"conflicts with catalogue: {how}", "conflict")
                else:
                    emit(pid, attr, value, conf, how, "conflict_not_written", None)
        return pa.Table.from_pydict(out, schema=DECISIONS)


def threshold_for(step, attribute: str, key: str) -> tuple[float, bool]:
    """(the threshold a candidate of `attribute` with value key `key` is admitted from, whether
    it is a known value): the step's `known_threshold` for fit's known values, else its
    `min_confidence`."""
    if step.known_threshold is not None and (attribute, key) in step.known_values:
        return step.known_threshold, True
    return step.min_confidence, False


LOST = "lost_to_better_candidate"  # another candidate of the product's attribute scored higher
HELD_BACK = "held_back_unlike_fit"  # would be written; the catalogue is unlike the fit's


def written(decision: str) -> bool:
    return decision in ("added", "added_cluster", "conflict")

