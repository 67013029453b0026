"""Module 4 as a stage: score every triple of the graph so far, retract the misassigned ones.

Read the products with their current type and the edits of modules 1–3 (grouped per product and
joined on), run the cross-encoder over each product's claims in an actor pool, write every score
(`scores/`) and the edits (`edits/`: `removed` with score and reason, `corrected` replacements).
Nothing is deleted: the graph keeps removed triples with their status.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from autoknow_ray import runtime, storage
from autoknow_ray.graph import state
from autoknow_ray.incremental import (
    CachedStep, file_digest, manifest_counts, run_cached, source_digest)
from autoknow_ray.modules.cleaning.steps import (
    CLAIM_INPUTS, CLAIM_SCORES, TYPE_RELATION, ClaimScores, DecideClaims, _col,
    product_claims)
from autoknow_ray.pipeline import RunContext, Stage, ensure_shards, parquet_files
from autoknow_ray.schema import CLEANING_SCORES, TRIPLES

PRODUCT_COLUMNS = ["product_id", "title", "description", "type", "product_type", "attributes", "brand"]
UPSTREAM_LISTS = ("up_relation", "up_object", "up_status", "up_module")


UPSTREAM_EDIT_LISTS = pa.schema([("product_id", pa.string()),
                                 *[(f"up_{c}", pa.list_(pa.string()))
                                   for c in ("relation", "object", "status", "module")]])


def _collect_edits(block: pa.Table) -> pa.Table:
    """Per product of a key partition (sorted by subject: `runtime.map_key_blocks`): all its
    upstream edits as one row of lists, in their order."""
    df = pl.from_arrow(block.select(["subject", "relation", "object", "status", "module"]))
    out = df.group_by("subject", maintain_order=True).agg(
        *[pl.col(c).cast(pl.String).alias(f"up_{c}") for c in ("relation", "object", "status", "module")])
    return out.rename({"subject": "product_id"}).to_arrow().cast(UPSTREAM_EDIT_LISTS)


def upstream_per_product(ctx: RunContext):
    edits = state.upstream_edits(ctx, before="cleaning")
    if edits is None:
        return None
    edits = edits.select_columns(["subject", "relation", "object", "status", "module"]).map_batches(
        lambda b: b.filter(pc.is_valid(b.column("subject"))), batch_format="pyarrow")
    # a small input is grouped in one task, a larger one by a keyed shuffle (map_key_blocks)
    return runtime.map_key_blocks(edits, "subject", _collect_edits,
                                  n_rows=state.upstream_edit_rows(ctx, before="cleaning"))


class CleaningStage(Stage):
    name = "cleaning"
    config_sections = ("cleaning", "resources")
    needs = ("ingest", "taxonomy", "relations", "imputation")
    uses_models = True
    # rows in: the scores rows, one per claim of a product (catalogue fact or live upstream
    # edit; see steps.product_claims) plus one per correction it proposes; rows out: the edits
    # written. Every scores row without an edit is in rows_dropped with its reason (kept, not
    # scored, already removed upstream, held back by the shift guard, abstained). Not per
    # product (a product has several claims); no quarantine.
    units = {"rows_in": "claims (one per catalogue fact or live upstream edit of a product) "
                        "and corrections proposed: scores rows",
             "rows_out": "edits written (removed, corrected)"}
    balanced = True

    def fingerprint(self, ctx: RunContext) -> str:
        self.needs = tuple(s for s in ("ingest", "taxonomy", "relations", "imputation")
                           if s in ctx.cfg.stages)
        return super().fingerprint(ctx)

    def run(self, ctx: RunContext) -> dict:
        cfg = ctx.cfg.cleaning
        model_dir = ctx.models / "cleaning" if ctx.models else None
        if model_dir is None or not (model_dir / "config.json").exists():
            raise FileNotFoundError(f"cleaning: no fitted model in {model_dir}; run `autoknow fit`")
        n = state.n_products(ctx)
        products = state.typed_products(ctx)
        products = products.select_columns([c for c in PRODUCT_COLUMNS if c in products.columns()])
        upstream = upstream_per_product(ctx)
        if upstream is not None:
            parts = max(1, min(32, n // 5000 + 1))
            # one row per product with an edit: at most the upstream edits' rows
            products = runtime.join(products, upstream, ("product_id",), "left_outer", parts,
                                    left_rows=n,
                                    right_rows=state.upstream_edit_rows(ctx, before="cleaning"))
        step = ClaimScores(model_dir, None if cfg.threshold == "auto" else float(cfg.threshold),
                            cfg.judge_types, cfg.correct_from_upstream, cfg.bf16, ctx.cfg.device,
                            None if cfg.type_threshold == "auto" else float(cfg.type_threshold),
                            cfg.fold_rule)
        meta = json.loads((model_dir / "config.json").read_text())
        step_thresholds = (
            meta["threshold"] if cfg.threshold == "auto" else float(cfg.threshold),
            meta.get("type_threshold", meta["threshold"]) if cfg.type_threshold == "auto"
            else float(cfg.type_threshold))
        fit_abstains = meta.get("abstains") or {}
        if step_thresholds[0] is None and step_thresholds[1] is None:
            # fit found no threshold reaching the target for either kind: nothing can be
            # removed, so nothing is scored
            ctx.write("edits", TRIPLES.empty_table(), TRIPLES)
            claims = n_claims(products, cfg.judge_types) if n else 0
            return {"rows_in": claims, "rows_out": 0,
                    "rows_dropped": {"abstained": claims} if claims else {},
                    "products": n, "triples_scored": 0,
                    "removed": 0, "corrected": 0, "thresholds_used": {"value": None, "type": None},
                    "abstained": fit_abstains or {"all": "fit found no threshold"}}
        t0 = time.perf_counter()
        cache: dict = {}
        # the scorer as a cached step (`rebuild --previous RUN` reuses RUN's claim scores of every
        # product whose claims, text and type are unchanged; incremental.py), over the products
        # written once with every column it reads; then the decisions at this run's thresholds
        scratch, scored = ctx.out / "_products", ctx.out / "_claim_scores"
        products.map_batches(_claim_inputs, batch_format="pyarrow").write_parquet(str(scratch))
        if state.count_rows(scratch):
            cache = run_cached(claims_step(step, model_dir, cfg, ctx), parquet_files(scratch),
                               ctx.cfg, scored,
                               ctx.out, ctx.resume, ctx.previous_stage(self.name))
            decide = DecideClaims(step_thresholds[0], step_thresholds[1], cfg.judge_types,
                                  cfg.correct_from_upstream)
            runtime.map_step(runtime.read_parquet(scored), decide, ctx.cfg, n).write_parquet(
                str(ctx.out / "scores"))
        ensure_shards(ctx.out / "scores", CLEANING_SCORES)
        for d in (scratch, scored):
            storage.rmtree(d)
        seconds = time.perf_counter() - t0
        scores = runtime.read_parquet(ctx.out / "scores")
        by = runtime.aggregate(scores.map_batches(_status_kind, batch_format="pyarrow"),
                               ["status", "kind"], {"n": ("count", None)})
        counts = {f"{s}.{k}": int(c) for s, k, c in by.select("status", "kind", "n").iter_rows()} \
            if by.height else {}
        guard = shift_guard(counts, meta, cfg, (cfg.threshold == "auto", cfg.type_threshold == "auto"))
        held = [kind for kind, g in guard.items() if g["held_back"]]
        scores.map_batches(_edits_only, fn_kwargs={"hold_types": "types" in held,
                                                   "hold_values": "values" in held},
                           batch_format="pyarrow").write_parquet(str(ctx.out / "edits"))
        ensure_shards(ctx.out / "edits", TRIPLES)  # no edit anywhere: Ray writes no file
        scored = sum(v for k, v in counts.items() if not k.startswith(("corrected.", "unscored.")))
        removed = sum(v for k, v in counts.items() if k.startswith("removed."))
        corrected = sum(v for k, v in counts.items() if k.startswith("corrected."))
        out = {
            # the balance (run_stages checks it): scores rows = edits written + rows_dropped
            "rows_in": state.count_rows(ctx.out / "scores"),
            "rows_out": state.count_rows(ctx.out / "edits"),
            "rows_dropped": dropped_rows(counts, held),
            "products": n,
            "triples_scored": scored,
            "triples_per_s": round(scored / seconds, 1) if seconds > 0 else None,
            "scoring_seconds": round(seconds, 2),
            "removed": removed,
            "corrected": corrected,
            "type_corrections_rejected": counts.get("removed.upstream_type_correction", 0),
            "by_status": counts,
            "threshold": cfg.threshold,
            "type_threshold": cfg.type_threshold,
            # the numbers used: the config's, or those `fit` chose (`auto`; None = fit found no
            # threshold reaching the precision target, so nothing of that kind is removed)
            "thresholds_used": {"value": step_thresholds[0], "type": step_thresholds[1]},
            "shift_guard": guard,
            # per-product claim scores reused from --previous, recomputed, added, removed
            **manifest_counts(CLAIMS_STEP, cache),
        }
        abstains = {k: v for k, v in fit_abstains.items()
                    if (k == "values" and cfg.threshold == "auto")
                    or (k == "types" and cfg.type_threshold == "auto")}
        abstains.update({k: g["reason"] for k, g in guard.items() if g["held_back"]})
        if abstains:
            out["abstained"] = abstains
        return out


CLAIMS_STEP = "claim_scores"
# the modules whose source computes the cached claim scores
CLAIMS_CODE = ("autoknow_ray.modules.cleaning.steps", "autoknow_ray.modules.cleaning.model",
               "autoknow_ray.nn.encoder")
_CLAIM_INPUT_TYPES = {
    "attributes": pa.list_(pa.struct([("name", pa.string()), ("value", pa.string())])),
    **{c: pa.list_(pa.string()) for c in UPSTREAM_LISTS}}


def _claim_inputs(batch: pa.Table) -> pa.Table:
    """The columns the scorer reads, in one order, absent ones as nulls (no module before
    cleaning, no description in this catalogue)."""
    cols = {}
    for c in CLAIM_INPUTS:
        cols[c] = batch.column(c) if c in batch.column_names else pa.nulls(
            batch.num_rows, _CLAIM_INPUT_TYPES.get(c, pa.string()))
    return pa.table(cols)


def claims_step(step: ClaimScores, model_dir, cfg, ctx: RunContext) -> CachedStep:
    """The scorer as a cached step: a product's claim scores depend on its claims, text and
    current type (the key), and on the fitted models, the claims judged, the fold rule, the
    precision, the device and the code (the fingerprint); not on the thresholds."""

    device = runtime.plan_actors(ctx.cfg, "cleaning", state.n_products(ctx)).device
    bf16 = cfg.bf16 if isinstance(cfg.bf16, bool) else runtime.model_bf16(device)
    return CachedStep(
        name=CLAIMS_STEP, fresh=step, reuse=None, inputs=CLAIM_INPUTS[1:],
        outputs=(CLAIM_SCORES,),
        fingerprint={"model": file_digest([Path(model_dir)]), "judge_types": bool(cfg.judge_types),
                     "fold_rule": cfg.fold_rule, "bf16": bool(bf16), "device": device,
                     "code": source_digest(list(CLAIMS_CODE))})


TYPE_KINDS = ("catalogue_type", "upstream_type", "upstream_type_correction")
VALUE_KINDS = ("catalogue_value", "upstream_value")


def dropped_rows(counts: dict, held: list[str]) -> dict:
    """Reason -> scores rows that wrote no edit, from the `status.kind` counts: a claim kept
    (scored under its threshold), one not scored (empty value), a catalogue fact a module before
    already removed, and the removals and corrections of a kind the shift guard held back."""
    def total(status, kinds=None):
        return sum(v for k, v in counts.items() if k.startswith(f"{status}.")
                   and (kinds is None or k.split(".", 1)[1] in kinds))

    out = {"kept (scored under the threshold)": total("kept"),
           "not scored (empty value)": total("unscored"),
           "already removed upstream": total("upstream_removed")}
    for kind in held:
        kinds = TYPE_KINDS if kind == "types" else VALUE_KINDS
        out[f"held back by the shift guard ({kind})"] = total("removed", kinds) + total("corrected", kinds)
    return {k: v for k, v in out.items() if v}


def _claim_counts(batch: pa.Table, judge_types: bool = True) -> pa.Table:
    """Per product, the claims the scoring step would judge (one scores row each)."""
    cols = [_col(batch, c) for c in ("product_type", "attributes", "brand", "up_relation",
                                     "up_object", "up_status", "up_module")]
    n = []
    for row in zip(*cols):
        claims, _ = product_claims(*row)
        n.append(sum(1 for c in claims if judge_types or c[0] != TYPE_RELATION))
    return pa.table({"claims": pa.array(n, pa.int64())})


def n_claims(products, judge_types: bool) -> int:
    """The claims of the products (with their upstream edits joined on), unscored: what an
    abstaining stage leaves unjudged."""
    per_block = products.map_batches(_claim_counts, fn_kwargs={"judge_types": judge_types},
                                     batch_format="pyarrow")
    # per-block sums added on the driver (`Dataset.sum` runs a shuffle: 3.7 s at 20k products)
    return int(runtime.column_sums(per_block, ["claims"]).get("claims") or 0)


def shift_guard(counts: dict, meta: dict, cfg, auto: tuple[bool, bool]) -> dict:
    """Per kind of claim (values, types): the share this rebuild flagged against the share fit
    expects at its expected error rate, and the precision fit's calibration gives at the error
    rate this rebuild shows. A kind's edits are held back (only for thresholds fit chose, `auto`)
    where
    - it flags over `shift_factor` times the expected share (and at least 5 claims): the
      catalogue is unlike the ones the model was validated on;
    - or the error rate its flagged share implies is so low that fit's precision bound, recomputed
      at that rate, is under `precision_target`: fit showed the target at `expected_error_rate`
      misassigned claims, but in a catalogue with far fewer errors the same false-removal rate
      makes most of what is flagged a false alarm (`precision_at_rate`)."""
    out = {}
    for kind, is_auto, prefix in (("values", auto[0], ""), ("types", auto[1], "type_")):
        kinds = TYPE_KINDS if kind == "types" else ("catalogue_value", "upstream_value")
        flagged = sum(counts.get(f"removed.{k}", 0) for k in kinds)
        judged = flagged + sum(counts.get(f"kept.{k}", 0) for k in kinds)
        expected = meta.get(f"{prefix}expected_flagged_share")
        g = {"judged": judged, "flagged": flagged,
             "flagged_share": round(flagged / judged, 5) if judged else 0.0,
             "expected_share": expected, "held_back": False}
        at_rate = precision_at_rate(flagged, judged, meta, prefix)
        if at_rate is not None:
            g.update(at_rate)
        if not is_auto:
            out[kind] = g
            continue
        if (expected is not None and cfg.shift_factor is not None and flagged >= 5
                and flagged > cfg.shift_factor * expected * judged):
            g["held_back"] = True
            g["reason"] = (f"catalogue unlike the fit's: {flagged} of {judged} {kind} flagged "
                           f"({g['flagged_share']:.3f}), over {cfg.shift_factor:g} x the "
                           f"{expected:.4f} fit expects; no {kind} edit written")
        elif (at_rate is not None and cfg.precision_target is not None
              and at_rate["precision_lower_at_rate"] < cfg.precision_target):
            g["held_back"] = True
            g["reason"] = (f"too few errors for the removals to be trusted: {flagged} of {judged} "
                           f"{kind} flagged implies {at_rate['implied_error_rate']:.4f} misassigned, "
                           f"where fit's calibration bounds precision at "
                           f"{at_rate['precision_lower_at_rate']:.3f} (< {cfg.precision_target:g}); "
                           f"no {kind} edit written")
        out[kind] = g
    return out


def precision_at_rate(flagged: int, judged: int, meta: dict, prefix: str) -> dict | None:
    """The error rate a rebuild's flagged share implies (flagged = e·TPR + (1 − e)·FPR, with
    fit's out-of-fold TPR and FPR at the threshold), and fit's precision lower bound at that rate
    (the lower bound of the TPR and the upper bound of the FPR, as fit's rule computes it at
    `expected_error_rate`). None where nothing was flagged or fit recorded no calibration."""
    from autoknow_ray.calibration import _at_base, wilson

    c = meta.get(f"{prefix}calibration") or {}
    fpr = meta.get(f"{prefix}val_false_removal_rate")
    tpr, n1, n0 = c.get("recall"), c.get("positives"), c.get("negatives")
    if not flagged or not judged or fpr is None or not tpr or not n1 or not n0 or tpr <= fpr:
        return None
    rate = min(1.0, max(0.0, (flagged / judged - fpr) / (tpr - fpr)))
    lower = _at_base(wilson(round(tpr * n1), n1)[0], wilson(round(fpr * n0), n0)[1], rate)
    return {"implied_error_rate": round(rate, 5), "precision_lower_at_rate": round(lower, 4)}


def _edits_only(batch: pa.Table, hold_types: bool = False, hold_values: bool = False) -> pa.Table:
    """The `removed` and `corrected` rows, as graph edits (TRIPLES), less the kinds of claim the
    shift guard holds back."""
    keep = pc.fill_null(pc.is_in(batch.column("status"), pa.array(["removed", "corrected"])), False)
    is_type = pc.fill_null(pc.equal(batch.column("relation"), TYPE_RELATION), False)
    if hold_types:
        keep = pc.and_(keep, pc.invert(is_type))
    if hold_values:
        keep = pc.and_(keep, is_type)
    return batch.filter(keep).select([f.name for f in TRIPLES]).cast(TRIPLES)


def _status_kind(batch: pa.Table) -> pa.Table:
    """status (`unscored` where the value was empty) × kind of claim, for the stage's counts."""
    origin = batch.column("origin").to_pylist()
    relation = batch.column("relation").to_pylist()
    kind = []
    for o, r in zip(origin, relation):
        if o == "catalogue":
            kind.append("catalogue_type" if r == "has_type" else "catalogue_value")
        elif r == "has_type":
            kind.append("upstream_type_correction" if o.endswith(":corrected") else "upstream_type")
        else:
            kind.append("upstream_value")
    status = pc.if_else(pc.is_null(batch.column("score")), "unscored", batch.column("status"))
    return pa.table({"status": status, "kind": kind})
