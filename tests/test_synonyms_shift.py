"""Module 5 on a catalogue unlike the fit's: the accepted neighbour pairs per 1,000 terms, fit's
against the rebuild's, and a rebuild that holds a kind's merges back (shift.py)."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from autoknow_ray.modules.synonyms import shift

CFG = SimpleNamespace(knn_k=3, knn_min_cosine=0.5, ivf_min_size=50_000)


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_accepted_rate_counts_the_scorers_neighbour_pairs_per_kind():
    vocab = pl.DataFrame({"kind": ["value"] * 4 + ["type"] * 2,
                          "attribute": ["Color"] * 4 + ["__type__"] * 2,
                          "term": ["Grey", "Gray", "Red", "Blue", "Sofa", "Couch"]})
    # Grey / Gray near each other, Red / Blue apart from them and from each other
    vectors = _unit([[1, 0.05, 0], [1, 0, 0.05], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0.9, 0]])
    seen = []

    def score(pairs):
        seen.extend(pairs.select("term_a", "term_b").iter_rows())
        return np.array([1.0 if {a, b} in ({"Gray", "Grey"}, {"Couch", "Sofa"}) else 0.1
                         for a, b in pairs.select("term_a", "term_b").iter_rows()])

    out = shift.accepted_rate(vocab, vectors, score, 0.5, CFG, 0)
    # only pairs of one (kind, attribute) at cosine >= 0.5 are candidates: never Red / Blue,
    # never a colour with a type
    assert set(seen) == {("Gray", "Grey"), ("Couch", "Sofa")}
    assert out["value"] == {"terms": 4, "candidates": 1, "accepted": 1, "per_1000_terms": 250.0}
    assert out["type"] == {"terms": 2, "candidates": 1, "accepted": 1, "per_1000_terms": 500.0}


def test_sample_index_is_seeded_and_capped():
    assert shift.sample_index(5, 10, 0).tolist() == [0, 1, 2, 3, 4]
    a, b = shift.sample_index(1000, 100, 3), shift.sample_index(1000, 100, 3)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 100 and list(a) == sorted(a)


def _obs(terms, accepted):
    return {"terms": terms, "candidates": 5 * terms, "accepted": accepted,
            "per_1000_terms": 1000.0 * accepted / terms}


def test_a_kind_is_held_back_over_the_factor_and_only_with_enough_pairs():
    ref = {"value": {"terms": 1000, "accepted": 20}, "type": {"terms": 200, "accepted": 2}}
    g = shift.judge(ref, {"value": _obs(1000, 59), "type": _obs(200, 7)}, 3.0, 5, 50)
    assert g["value"]["held_back"] is False  # 59 per 1,000 against 20: under 3x
    assert g["type"]["held_back"] is True and "unlike" in g["type"]["reason"]  # 35 against 10
    assert g["type"]["fit_per_1000_terms"] == 10.0 and g["type"]["rebuild_per_1000_terms"] == 35.0
    g = shift.judge(ref, {"value": _obs(1000, 61)}, 3.0, 5, 50)
    assert g["value"]["held_back"] is True
    # under shift_min_pairs accepted pairs nothing is judged unlike, whatever the rate
    assert shift.judge(ref, {"type": _obs(20, 4)}, 3.0, 5, 50)["type"]["held_back"] is False
    # off, or a model without a reference: no guard
    assert shift.judge(ref, {"value": _obs(1000, 900)}, None, 5, 50) == {}
    assert shift.judge(None, {"value": _obs(1000, 900)}, 3.0, 5, 50) == {}


def test_a_fit_that_accepted_nothing_compares_as_one_pair_and_a_thin_kind_with_every_kind():
    ref = {"value": {"terms": 1000, "accepted": 0}, "type": {"terms": 10, "accepted": 0}}
    g = shift.judge(ref, {"value": _obs(1000, 3), "type": _obs(300, 6)}, 3.0, 2, 50)
    assert g["value"]["held_back"] is False  # 3 per 1,000 against fit's floor of 1: within 3x
    # fit sampled 10 type names (< 50): compared with every kind, 1 pair per 1,010 terms
    assert g["type"]["fit_basis"] == "every kind" and g["type"]["fit_terms"] == 1010
    assert g["type"]["held_back"] is True  # 20 per 1,000 against about 1


@pytest.fixture(scope="module")
def fitted(ray_session, tmp_path_factory):
    """A fit on the synonyms test catalogue (duplicate listings of spellings), rebuilt as is."""
    from autoknow_ray.config import Config
    from autoknow_ray.rebuild import fit
    from tests.test_synonyms import _catalogue

    root = tmp_path_factory.mktemp("synshift")
    _catalogue(root / "cat")
    cfg = Config.model_validate({
        "stages": ["ingest", "synonyms", "graph"],
        "ray": {"num_cpus": 2, "object_store_memory_mb": 400},
        # one MLP, as test_synonyms.py's fit of the same catalogue (why there)
        "synonyms": {"max_train_terms": 200, "epochs": 40, "knn_k": 5, "precision_target": 0.75,
                     "members": 1}})
    manifest = fit(root / "cat", root / "models", config=cfg)
    return root, cfg, manifest


def _rebuild(root, models, cfg, out):
    from autoknow_ray.rebuild import rebuild

    rebuild(root / "cat", out, models=models, config=cfg)
    manifest = json.loads((out / "synonyms" / "manifest.json").read_text())
    return manifest, pl.read_parquet(out / "graph" / "synonyms.parquet"), pl.read_parquet(
        out / "synonyms" / "pairs.parquet")


def test_fit_records_its_reference_and_the_same_catalogue_is_not_held_back(fitted, tmp_path):
    root, cfg, manifest = fitted
    meta = json.loads((root / "models" / "synonyms" / "config.json").read_text())
    ref = meta["shift_reference"]
    assert ref == manifest["modules"]["synonyms"]["shift_reference"]
    assert ref["value"]["terms"] > 0 and ref["value"]["candidates"] >= ref["value"]["accepted"]
    out, syn, _ = _rebuild(root, root / "models", cfg, tmp_path / "run")
    assert out["shift_guard"]["value"]["held_back"] is False and "abstained" not in out
    assert syn.filter(pl.col("kind") == "value").height > 0


def test_a_rebuild_accepting_far_more_than_fit_holds_that_kinds_merges_back(fitted, tmp_path):
    """The same catalogue against a reference in which fit's scorer accepted no value pair over
    many terms: its value merges go nowhere, their pairs stay scored in `pairs` for eval, and the
    manifest says why."""
    root, cfg, _ = fitted
    models = tmp_path / "models"
    shutil.copytree(root / "models", models)
    path = models / "synonyms" / "config.json"
    meta = json.loads(path.read_text())
    base, _, _ = _rebuild(root, root / "models", cfg, tmp_path / "base")
    n = base["shift_guard"]["value"]["rebuild_terms"]
    meta["shift_reference"]["value"] = {"terms": 100 * n, "candidates": 0, "accepted": 0,
                                        "per_1000_terms": 0.0}
    path.write_text(json.dumps(meta))
    # this small catalogue's neighbour pairs are few: every accepted one counts here
    assert base["shift_guard"]["value"]["rebuild_accepted"] >= 1
    held_cfg = cfg.model_copy(update={"synonyms": cfg.synonyms.model_copy(update={"shift_min_pairs": 1})})
    out, syn, pairs = _rebuild(root, models, held_cfg, tmp_path / "held")
    g = out["shift_guard"]["value"]
    assert g["held_back"] is True and "unlike" in out["abstained"]["value"]
    assert syn.filter(pl.col("kind") == "value").height == 0
    # the catalogue's 3 type names are judged against fit's figure over every kind, now also tiny
    held = sum(k.get("pairs_held_back", 0) for k in out["shift_guard"].values())
    assert g["pairs_held_back"] > 0 and held == base["accepted_pairs"] - out["accepted_pairs"]
    assert pairs.filter(pl.col("kind") == "value", pl.col("accepted")).height == 0
    assert pairs.filter(pl.col("kind") == "value").height == base["candidate_pairs"] - (
        pairs.filter(pl.col("kind") == "type").height)
    # a threshold the user set is not guarded
    mine = cfg.model_copy(update={"synonyms": cfg.synonyms.model_copy(
        update={"threshold": json.loads((root / "models" / "synonyms" / "config.json").read_text())["threshold"]})})
    out, syn, _ = _rebuild(root, models, mine, tmp_path / "user")
    assert out["shift_guard"] == {} and syn.filter(pl.col("kind") == "value").height > 0
