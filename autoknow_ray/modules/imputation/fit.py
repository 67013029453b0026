"""`autoknow fit` for module 3: the type-conditioned tagger, by distant supervision.

The training set is a seeded sample of at most `tagger.max_train_products` products (and their
customer texts), drawn in the workers: the catalogue never comes to this process whole. The
known values (the labelled terms of the embedding clusters) are counted over the same sample.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from autoknow_ray import runtime
from autoknow_ray.calibration import (
    PrecisionChoice, threshold_for_precision, two_thresholds_for_precision)
from autoknow_ray.graph import state
from autoknow_ray.modules.imputation.config import ImputationConfig
from autoknow_ray.modules.imputation.distant import build_examples
from autoknow_ray.modules.imputation.model import (
    CALIBRATION, KNOWN_ATTRIBUTE_VALUES, KNOWN_VALUES, TAGGER, save_type_vectors)
from autoknow_ray.modules.imputation.texts import filled_values, value_key
from autoknow_ray.nn.conditioned_tagger import ConditionedTrainSettings, train_conditioned_tagger
from autoknow_ray.pipeline import RunContext
from autoknow_ray.schema import TEXTS_KEY

PRODUCT_FIELDS = ["product_id", "title", "description", "bullets", "attributes", "brand",
                  "product_type"]


def train_settings(cfg: ImputationConfig, dim: int) -> ConditionedTrainSettings:
    t = cfg.tagger
    return ConditionedTrainSettings(
        encoder=t.encoder, max_length=t.max_length, stride=t.stride,
        context_dim=dim if t.condition_on_type else 0, context_features=t.context_features,
        context_dropout=t.context_dropout, epochs=t.epochs, lr=t.lr, head_lr=t.head_lr,
        batch_size=t.batch_size, weight_decay=t.weight_decay, dropout=t.dropout,
        shape_dim=t.shape_dim, val_fraction=t.val_fraction, patience=t.patience, seed=t.seed,
        bf16=t.bf16, device=t.device, cpu_threads=t.cpu_threads,
        eval_batch_size=cfg.infer_batch_size, ensemble=t.ensemble,
        mention_replacement=t.mention_replacement)


def _sample_rows(ctx: RunContext, cfg: ImputationConfig) -> list[dict]:
    """A seeded sample of products, each with its customer texts (capped per product)."""
    path = ctx.table_path("ingest", "products")
    n = state.count_rows(path)
    products = runtime.bounded_sample(runtime.read_parquet(path, PRODUCT_FIELDS),
                                      cfg.tagger.max_train_products, ctx.cfg.seed, n)
    if products.height == 0:
        return []
    rows = products.rename({"product_type": "type"}).to_dicts()
    texts_path = ctx.table_path("ingest", "texts")
    if "texts" in cfg.fields and state.count_rows(texts_path) > 0:
        ids = pa.array(products["product_id"].to_list())
        texts = runtime.read_parquet(texts_path, ["product_id", "kind", "text"]).map_batches(
            lambda b: b.filter(pc.is_in(b.column("product_id"), ids)), batch_format="pyarrow")
        cap = len(rows) * cfg.max_texts_per_product
        sample = runtime.bounded_sample(texts, cap, ctx.cfg.seed, key=TEXTS_KEY)
        by_product: dict[str, list] = {}
        for pid, kind, text in (sample.iter_rows() if sample.height else []):
            by_product.setdefault(pid, []).append((kind, text))
        for r in rows:
            got = by_product.get(r["product_id"], [])[: cfg.max_texts_per_product]
            r["customer_kinds"] = [k for k, _ in got]
            r["customer_texts"] = [t for _, t in got]
    return rows


def known_values(rows: list[dict], cap: int) -> pl.DataFrame:
    """(type, attribute, term, n) of the sampled products' filled values, the `cap` most
    frequent: the labelled terms the embedding clusters start from."""
    recs = [(r.get("type") or "", a, value_key(v)) for r in rows for a, v in filled_values(r)]
    recs = [x for x in recs if x[2]]
    if cap <= 0 or not recs:
        return pl.DataFrame()
    df = pl.DataFrame(recs, schema=["type", "attribute", "term"], orient="row")
    agg = df.group_by("type", "attribute", "term").len("n").with_columns(pl.col("n").cast(pl.Int64))
    return agg.sort(["n", "type", "attribute", "term"], descending=[True, False, False, False]).head(cap)


def _product_pairs(row: dict) -> set[tuple[str, str]]:
    return {(a, k) for a, v in filled_values(row) if (k := value_key(v))}


def known_attribute_values(rows: list[dict], cap: int) -> pl.DataFrame:
    """(attribute, term, n) of the sampled products' filled values, n the products that give the
    attribute that value (each product once), the `cap` most frequent (ties by key): the known
    values the second threshold is for."""
    recs = [pair for r in rows for pair in _product_pairs(r)]
    if cap <= 0 or not recs:
        return pl.DataFrame(schema={"attribute": pl.Utf8, "term": pl.Utf8, "n": pl.Int64})
    df = pl.DataFrame(recs, schema=["attribute", "term"], orient="row")
    agg = df.group_by("attribute", "term").len("n").with_columns(pl.col("n").cast(pl.Int64))
    return agg.sort(["n", "attribute", "term"], descending=[True, False, False]).head(cap)


def known_spans(val_spans: dict, text_rows: list[int], rows: list[dict],
                known: pl.DataFrame) -> np.ndarray:
    """Per validation span: is its (label, value key) a known value (in `known`, the table fit
    ships) that *another* sampled product gives? Validation windows are split by window, not by
    product, so a product's own value must not make its own span known."""
    counts = {(a, t): int(n) for a, t, n in known.select("attribute", "term", "n").iter_rows()}
    own: dict[int, set] = {}
    out = np.zeros(len(val_spans["scores"]), dtype=bool)
    for i, (lab, value, t) in enumerate(zip(val_spans["labels"], val_spans["values"],
                                            val_spans["text_index"])):
        k = (lab, value_key(value))
        n = counts.get(k, 0)
        if not n:
            continue
        r = text_rows[t]
        if r not in own:
            own[r] = _product_pairs(rows[r])
        out[i] = n - (1 if k in own[r] else 0) >= 1
    return out


def judge_by_value(val_spans: dict, text_rows: list[int], rows: list[dict]) -> dict:
    """The validation spans judged as the graph is: a span is right where its (label, value
    key) is a value its product gives that attribute, whichever mention of it the span reads
    (distant supervision marks the mentions it located; a right value read at another one, or
    the same words written with other punctuation, would count as wrong). Returns a copy with
    `correct` replaced and the by-position flags kept as `correct_span`."""
    own: dict[int, set] = {}
    correct = []
    for ok, lab, value, t in zip(val_spans["correct"], val_spans["labels"], val_spans["values"],
                                 val_spans["text_index"]):
        r = text_rows[t]
        if r not in own:
            own[r] = _product_pairs(rows[r])
        correct.append(bool(ok) or (lab, value_key(value)) in own[r])
    return {**val_spans, "correct": correct, "correct_span": list(val_spans["correct"])}


def calibrate_known(val_spans: dict, known: np.ndarray, target: float) -> dict:
    """The thresholds for known values and for the others, chosen together on the validation
    spans (`calibration.two_thresholds_for_precision`, floor 0.5, known <= unknown): the pair of
    most recall whose one precision lower bound over both reaches `target`."""
    c = two_thresholds_for_precision(val_spans["scores"], val_spans["correct"], known, target,
                                     floor=0.5)
    out = {"threshold_known": c.pop("threshold_group"),
           "threshold_unknown": c.pop("threshold_other"),
           # every known validation span and the right ones among them; `known_acted` /
           # `known_right` (and `unknown_*`) are those at the pair
           "known_spans": c.pop("group_claims"), "known_positives": c.pop("group_positives"),
           **{k.replace("group_", "known_").replace("other_", "unknown_"): v for k, v in c.items()}}
    if out["threshold_known"] is not None and val_spans.get("n_gold"):
        out["recall_of_labelled_spans"] = round(
            sum(1 for s, ok, kn in zip(val_spans["scores"],
                                       val_spans.get("correct_span", val_spans["correct"]), known)
                if ok and s >= (out["threshold_known"] if kn else out["threshold_unknown"]))
            / val_spans["n_gold"], 4)
    return out


def title_reference(val_spans: dict | None, fields: list[str], threshold: float | None) -> dict | None:
    """How often the tagger is sure on titles like the fit's: spans scoring at least `threshold`
    per 1,000 tokens of the validation titles (a title is one window), with the titles that hold
    no catalogue value weighted back up by the share of such windows training kept. A rebuild
    measures the same on its own titles (`stage.shift_guard`). None without a threshold or a
    validation title."""
    win = (val_spans or {}).get("windows")
    if threshold is None or not win:
        return None
    keep = float(val_spans.get("empty_keep_fraction") or 1.0)
    spans = tokens = titles = weight_sum = 0.0
    for t, n_tok, empty, scores in zip(win["text"], win["tokens"], win["empty"], win["scores"]):
        if t >= len(fields) or fields[t] != "title":
            continue
        w = 1.0 / keep if empty and keep > 0 else 1.0
        spans += w * sum(1 for x in scores if x >= threshold)
        tokens += w * n_tok
        titles += 1
        weight_sum += w
    if not titles or tokens <= 0:
        return None
    return {"confident_spans_per_1k_tokens": round(1000.0 * spans / tokens, 3),
            "titles": int(titles), "tokens": int(tokens), "weighted_titles": round(weight_sum, 1)}


def calibrate(val_spans: dict | None, target: float) -> dict:
    """The span score from which the tagger's values reach `target` precision on the held-out
    windows (a span counts as right where it is the span the catalogue's own value marks, or,
    judged by value (`judge_by_value`), where its value is one its product gives the
    attribute), or the reason there is none. A span of an attribute the catalogue does not fill
    counts as wrong, so the estimate errs low."""
    if not val_spans or not val_spans["scores"]:
        n = len((val_spans or {}).get("windows", {}).get("text", []))
        why = (f"the tagger found no span in its {n} validation windows" if n
               else "no validation windows to calibrate on")
        return PrecisionChoice(target=target, threshold=None, abstain_reason=why).as_dict()
    c = threshold_for_precision(val_spans["scores"], val_spans["correct"], target, floor=0.5)
    out = c.as_dict()
    if not c.abstains and val_spans.get("n_gold"):
        out["recall_of_labelled_spans"] = round(
            sum(1 for s, ok in zip(val_spans["scores"],
                                   val_spans.get("correct_span", val_spans["correct"]))
                if ok and s >= c.threshold) / val_spans["n_gold"], 4)
    return out


def fit_imputation(ctx: RunContext, out: Path) -> dict:
    from autoknow_ray.nn.encoder import TextEncoder

    cfg = ctx.cfg.imputation
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = _sample_rows(ctx, cfg)
    texts, types, spans, labels, stats, fields, text_rows = build_examples(
        rows, cfg.fields, cfg.max_text_chars, cfg.max_texts_per_product,
        cfg.tagger.max_value_chars, cfg.tagger.min_attribute_count, with_rows=True)
    if not labels:
        return {"skipped": "no filled attribute value was found in any product text: nothing to learn",
                "products_sampled": len(rows), "distant_supervision": stats}
    encoder = TextEncoder(cfg.tagger.encoder, device=ctx.cfg.device)
    names = sorted({t for t in types if isinstance(t, str) and t.strip()})
    vectors = encoder.encode(names) if names else np.zeros((0, encoder.dim), np.float32)
    save_type_vectors(out, names, vectors)
    index = {n: i for i, n in enumerate(names)}
    contexts = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    for i, t in enumerate(types):
        if t in index:
            contexts[i] = vectors[index[t]]
    settings = train_settings(cfg, encoder.dim)
    _, metrics = train_conditioned_tagger(
        texts, contexts, spans, labels, settings, out / TAGGER,
        max_windows=cfg.tagger.max_train_windows,
        empty_keep_fraction=cfg.tagger.empty_keep_fraction,
        artifact_extra={"task": "imputation-tagger", "distant_supervision": stats},
        groups=text_rows if cfg.tagger.val_split == "product" else None)
    val_spans = metrics.pop("val_spans", None)
    first = metrics.pop("val_spans_first_member", None)
    by_span = None
    if cfg.calibration_match == "value" and val_spans and "labels" in val_spans:
        by_span = calibrate(val_spans, cfg.precision_target)
        val_spans = judge_by_value(val_spans, text_rows, rows)
        if first is not None and "labels" in first:
            first = judge_by_value(first, text_rows, rows)
    calibration = calibrate(val_spans, cfg.precision_target)
    calibration["judged_by"] = cfg.calibration_match if by_span is not None else "span"
    if by_span is not None:  # what the by-position judgement would have shipped
        calibration["by_span"] = {k: by_span.get(k) for k in (
            "threshold", "precision", "precision_lower", "acted", "positives", "negatives",
            "recall_of_labelled_spans")}
    ref = title_reference(val_spans, fields, calibration.get("threshold"))
    if ref is not None:  # what a rebuild's titles are compared with (stage.shift_guard)
        calibration["title_reference"] = ref
    known_terms = known_attribute_values(rows, cfg.known_value_terms_max)
    if known_terms.height:
        known_terms.write_parquet(out / KNOWN_ATTRIBUTE_VALUES)
    if calibration.get("threshold") is not None and known_terms.height and "labels" in val_spans:
        # the second threshold, for values another product of the sample gives the attribute
        kv = calibrate_known(val_spans, known_spans(val_spans, text_rows, rows, known_terms),
                             cfg.precision_target)
        calibration["threshold_known"] = kv.pop("threshold_known")
        calibration["threshold_unknown"] = kv.pop("threshold_unknown")
        calibration["known_values"] = {**kv, "terms": known_terms.height}
    if first is not None:  # an ensemble: what its first tagger alone would have shipped
        metrics["calibration_first_member"] = calibrate(first, cfg.precision_target)
    (out / CALIBRATION).write_text(json.dumps(calibration, indent=2))
    known = known_values(rows, cfg.clusters.known_values_max)
    if known.height:
        known.write_parquet(out / KNOWN_VALUES)
    metrics.pop("history", None)
    return {"products_sampled": len(rows), "labels": labels,
            "conditioned_on_type": cfg.tagger.condition_on_type, "types": len(names),
            "known_values": known.height, "known_attribute_values": known_terms.height,
            "distant_supervision": stats, "calibration": calibration,
            **metrics,
            "seconds": round(time.perf_counter() - t0, 2)}
