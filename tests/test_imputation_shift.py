"""Module 3 on a catalogue unlike the one it was fitted on: fit measures how often its tagger is
sure on its validation titles; a rebuild whose titles hold far fewer sure spans writes nothing
and says why, one whose titles are like the fit's acts as before."""
from __future__ import annotations

import json
import shutil

import polars as pl
import pyarrow as pa
import pytest

from autoknow_ray.modules.imputation.fit import title_reference
from autoknow_ray.modules.imputation.stage import shift_guard
from autoknow_ray.modules.imputation.steps import (
    CANDIDATES, HELD_BACK, DecideValues, written)
from autoknow_ray.modules.imputation.texts import SEP


def test_fits_title_reference_counts_sure_spans_per_title_token_with_empty_titles_weighted_back():
    # texts 0 and 2 are titles, 1 a description (left out); window 3 is a title with no
    # catalogue value, kept at 0.25 of such windows: it stands for 4
    val = {"empty_keep_fraction": 0.25,
           "windows": {"text": [0, 1, 2, 3], "tokens": [10, 100, 20, 10],
                       "empty": [False, False, False, True],
                       "scores": [[0.99, 0.5], [0.99, 0.99], [0.95, 0.91, 0.2], [0.97]]}}
    fields = ["title", "description", "title", "title"]
    ref = title_reference(val, fields, threshold=0.9)
    # sure spans: 1 + 2 + 4 x 1 = 7 over 10 + 20 + 4 x 10 = 70 tokens -> 100 per 1,000
    assert ref == {"confident_spans_per_1k_tokens": 100.0, "titles": 3, "tokens": 70,
                   "weighted_titles": 6.0}
    assert title_reference(val, fields, threshold=None) is None  # fit abstained
    assert title_reference(val, ["description"] * 4, threshold=0.9) is None  # no title
    assert title_reference(None, fields, threshold=0.9) is None


def test_fit_says_whether_it_had_no_validation_window_or_no_span_in_them():
    from autoknow_ray.modules.imputation.fit import calibrate

    assert calibrate(None, 0.95)["abstain_reason"] == "no validation windows to calibrate on"
    quiet = {"scores": [], "correct": [], "n_gold": 4,
             "windows": {"text": [0, 1, 2], "tokens": [9, 9, 9], "empty": [False] * 3,
                         "scores": [[], [], []]}}
    c = calibrate(quiet, 0.95)
    assert c["threshold"] is None and "no span in its 3 validation windows" in c["abstain_reason"]


def test_the_guard_holds_back_only_a_catalogue_far_below_fits_titles():
    ref = {"confident_spans_per_1k_tokens": 90.0}
    # 12 sure spans over 1,000 title tokens: under a third of fit's 90
    g = shift_guard(ref, titles=200, title_tokens=1000, sure=12, factor=3.0, min_titles=50,
                    auto=True)
    assert g["held_back"] and g["confident_spans_per_1k_tokens"] == 12.0
    assert "unlike the fit's catalogue" in g["reason"] and "90" in g["reason"]
    # 31 per 1,000: within a factor of 3
    assert not shift_guard(ref, 200, 1000, 31, 3.0, 50, True)["held_back"]
    # the same low rate, but: too few titles to judge / a threshold the user set / no guard /
    # a model fitted before the guard
    for args in ((ref, 20, 1000, 12, 3.0, 50, True), (ref, 200, 1000, 12, 3.0, 50, False),
                 (ref, 200, 1000, 12, None, 50, True), (None, 200, 1000, 12, 3.0, 50, True)):
        g = shift_guard(*args)
        assert not g["held_back"] and g["reason"]


def _c(attr, value, score, field="title"):
    return {"attribute": attr, "value": value, "score": score, "field": field, "start": 0,
            "end": len(value)}


def test_held_back_decisions_write_nothing_and_keep_every_candidate_decided():
    rows = [{"product_id": "p1", "type": "tea", "filled": [f"Brand{SEP}acme"],
             "cands": [_c("Flavor", "mint", 0.99), _c("Brand", "Other", 0.99),
                       _c("Size", "2 oz", 0.4)]},
            {"product_id": "p2", "type": "tea", "filled": [], "cands": [_c("Flavor", "lemon", 0.95)]}]
    extra = {c: [0] * len(rows) for c in CANDIDATES.names if c not in rows[0]}
    batch = pa.Table.from_pylist([{**r, **{k: 0 for k in extra}} for r in rows], schema=CANDIDATES)

    def decide(hold_back):
        step = DecideValues(0.9, 0.3, None, None, emit_conflicts=True, conflict_min_confidence=0.97,
                            hold_back=hold_back)
        return pl.from_arrow(step.process_batch(batch))

    acting, held = decide(False), decide(True)
    assert sum(written(d) for d in acting["decision"]) == 3  # two added, one conflict
    assert not any(written(d) for d in held["decision"])
    assert held.height == acting.height == 4  # every candidate still leaves one row
    was = acting.filter(pl.Series([written(d) for d in acting["decision"]]))
    now = held.filter(pl.col("decision") == HELD_BACK)
    assert sorted(now["object"]) == sorted(was["object"]) and now["status"].is_null().all()


FIT = """
seed: 0
stages: [ingest, imputation, graph]
ray: {num_cpus: 2, object_store_memory_mb: 400}
imputation:
  min_confidence: auto
  precision_target: 0.6
  shift_min_titles: 30
  fields: [title]
  tagger: {epochs: 3, max_train_products: 120, max_train_windows: 120, patience: 0, max_length: 32}
  clusters: {enabled: false}
"""


def test_a_rebuild_on_titles_unlike_the_fits_writes_nothing_and_says_why(tmp_path, ray_session):
    from autoknow_ray.catalogue.holdout_values import holdout_values
    from autoknow_ray.catalogue.synth import synthesize
    from autoknow_ray.cli import main
    from autoknow_ray.pipeline import read_parquet_any

    cat = tmp_path / "cat"
    synthesize(160, cat, seed=0, n_types=4)
    held = tmp_path / "held"
    holdout_values(cat, held, fraction=0.6, seed=0)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(FIT)
    models = tmp_path / "models"
    assert main(["fit", "--catalogue", str(cat), "--out", str(models), "--config", str(cfg)]) == 0
    cal = json.loads((models / "imputation" / "calibration.json").read_text())
    assert cal["threshold"] is not None, cal  # a target of 0.6 is reachable on these titles
    ref = cal["title_reference"]
    assert ref["titles"] > 0 and ref["confident_spans_per_1k_tokens"] > 0

    # unlike: the same products, every title replaced by words that name no value
    unlike = tmp_path / "unlike"
    shutil.copytree(held, unlike)
    products = read_parquet_any(held / "products.parquet")
    filler = "the and of with for from this that into over under about"
    products.with_columns(pl.lit(filler).alias("title")).write_parquet(unlike / "products.parquet")

    manifests = {}
    for name, catalogue in (("like", held), ("unlike", unlike)):
        run = tmp_path / f"run_{name}"
        assert main(["rebuild", "--catalogue", str(catalogue), "--out", str(run), "--models",
                     str(models), "--config", str(cfg)]) == 0
        manifests[name] = json.loads((run / "imputation" / "manifest.json").read_text())
        edits = run / "imputation" / "edits"
        manifests[name]["edits"] = (read_parquet_any(edits).height
                                    if edits.exists() and any(edits.glob("*.parquet")) else 0)
    like, far = manifests["like"], manifests["unlike"]
    assert like["shift_guard"]["titles"] == 160 and not like["shift_guard"]["held_back"]
    assert like["facts_added"] > 0 and like["edits"] == like["facts_added"]
    assert "abstained" not in like
    g = far["shift_guard"]
    assert g["held_back"] and g["titles"] == 160
    assert g["confident_spans_per_1k_tokens"] * 3 < ref["confident_spans_per_1k_tokens"]
    assert far["facts_added"] == 0 and far["edits"] == 0
    assert "unlike the fit's catalogue" in far["abstained"]
    # every candidate is still decided, the ones it would have written recorded as held back
    assert sum(far["decisions"].values()) == far["input"]["candidate_values"]
    assert set(far["decisions"]) <= {HELD_BACK, "below_threshold", "lost_to_better_candidate",
                                     "known", "conflict_not_written"}


@pytest.mark.parametrize("factor", [None])
def test_the_guard_can_be_switched_off(factor):
    g = shift_guard({"confident_spans_per_1k_tokens": 90.0}, 200, 1000, 0, factor, 50, True)
    assert not g["held_back"] and "null" in g["reason"]
