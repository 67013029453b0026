"""Module 3's second threshold for known values (7 Dec 2026): the joint choice of the two
thresholds, which validation spans count as known (leave one product out), and the rebuild's
steps admitting a known value between the two thresholds."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa

from autoknow_ray.calibration import (
    threshold_for_precision, two_thresholds_for_precision, wilson, wilson_lower)
from autoknow_ray.modules.imputation.distant import build_examples
from autoknow_ray.modules.imputation.fit import (
    calibrate, calibrate_known, judge_by_value, known_attribute_values, known_spans)
from autoknow_ray.modules.imputation.model import (
    CALIBRATION, KNOWN_ATTRIBUTE_VALUES, known_value_thresholds, load_known_attribute_values)
from autoknow_ray.modules.imputation.steps import CANDIDATES, DecideValues, TermRows
from autoknow_ray.modules.imputation.texts import SEP


def test_the_vectorised_wilson_bound_is_wilsons():
    k = np.array([0, 3, 50, 99, 100, 0])
    n = np.array([0, 3, 60, 100, 100, 10])
    assert np.allclose(wilson_lower(k, n), [wilson(a, b)[0] for a, b in zip(k, n)])


def _group(right: dict[float, int], wrong: dict[float, int], known: bool):
    s, y = [], []
    for score, n in right.items():
        s += [score] * n
        y += [True] * n
    for score, n in wrong.items():
        s += [score] * n
        y += [False] * n
    return s, y, [known] * len(s)


def _joint(*groups, target=0.95, floor=0.5, **kw):
    s, y, g = (sum((x[i] for x in groups), []) for i in range(3))
    return s, y, g, two_thresholds_for_precision(s, y, g, target, floor=floor, **kw)


def test_known_values_more_often_right_earn_a_lower_threshold():
    # unknown values: sure and right at 0.95-0.97, a wrong tail at 0.6-0.7; known values: right
    # down to 0.7, where one threshold for all would admit the unknown wrong ones too
    unknown = _group({0.97: 60, 0.95: 40, 0.7: 5}, {0.7: 15, 0.6: 20}, False)
    known = _group({0.9: 50, 0.8: 40, 0.7: 30, 0.55: 2}, {0.55: 10}, True)
    s, y, g, c = _joint(unknown, known)
    one = threshold_for_precision(s, y, 0.95, floor=0.5)
    assert one.threshold == 0.8
    assert c["threshold_group"] == 0.7 and c["threshold_other"] == 0.95
    assert c["acted"] == 220 and c["precision"] == 1.0 and c["precision_lower"] >= 0.95
    assert c["recall"] > one.recall
    assert c["group_acted"] == c["group_right"] == 120 and c["other_right"] == 100
    # the same in small blocks of pairs
    assert _joint(unknown, known, block_cells=3)[3] == c


def test_known_values_no_more_often_right_keep_one_threshold():
    # the same two distributions: lowering the known threshold admits as many wrong as right
    a = _group({0.9: 50}, {0.6: 10}, False)
    b = _group({0.9: 50}, {0.6: 10}, True)
    s, y, g, c = _joint(a, b)
    assert c["threshold_group"] == c["threshold_other"] == 0.9
    assert c["threshold_other"] == threshold_for_precision(s, y, 0.95, floor=0.5).threshold
    # known values more often wrong: the known threshold never rises above the other
    unknown = _group({0.95: 200, 0.7: 5}, {0.6: 5}, False)
    known = _group({0.75: 20}, {0.75: 20}, True)
    s, y, g, c = _joint(unknown, known)
    assert c["threshold_group"] == c["threshold_other"] == 0.95
    assert c["acted"] == 200


def test_no_pair_reaches_the_target_abstains_with_the_reason():
    s, y, g, c = _joint(_group({0.9: 5}, {0.9: 5}, False), _group({0.8: 5}, {0.8: 5}, True))
    assert c["threshold_group"] is None and "no pair" in c["abstain_reason"]
    assert c["best_precision_lower"] < 0.95
    # below the floor nothing is a threshold
    s, y, g, c = _joint(_group({0.4: 50}, {}, False), floor=0.5)
    assert c["threshold_group"] is None


def _rows():
    return [
        {"type": "shirt", "title": "Red cotton shirt", "description": "Soft red shirt",
         "attributes": [{"name": "Color", "value": "Red"}, {"name": "Material", "value": "Cotton"}]},
        {"type": "shirt", "title": "Red linen shirt",
         "attributes": [{"name": "Color", "value": "red"}]},
        {"type": "shirt", "title": "no values here", "attributes": []},
        {"type": "shirt", "title": "Blue wool shirt",
         "attributes": [{"name": "Color", "value": "Blue"}, {"name": "Material", "value": "Wool"}]},
    ]


def test_known_spans_leave_the_products_own_value_out():
    rows = _rows()
    texts, types, spans, labels, stats, fields, text_rows = build_examples(
        rows, ["title", "description"], 1000, 0, 100, 1, with_rows=True)
    # the product without a value gives no text; the others' texts point back at their rows
    assert text_rows == [0, 0, 1, 3] and texts[3] == "Blue wool shirt"
    assert build_examples(rows, ["title"], 1000, 0, 100, 1)[0] == [texts[0], texts[2], texts[3]]
    known = known_attribute_values(rows, 100)
    assert known.row(0) == ("Color", "red", 2)  # two products give it (each product once)
    assert set(known["n"]) == {2, 1} and known.height == 4
    val = {"scores": [0.9] * 6, "correct": [True] * 6,
           "labels": ["Color", "Color", "Color", "Material", "Color", "Material"],
           "values": ["Red", "red", "Blue", "Cotton", "Red", "Red"],
           "text_index": [0, 2, 3, 0, 3, 3]}
    got = known_spans(val, text_rows, rows, known).tolist()
    # "Red" of product 0 and of product 1: the other one gives it; product 3's own "Blue" and
    # product 0's own "Cotton" only their own product gives; product 3's "Red" two others give;
    # "Red" as a Material nobody gives
    assert got == [True, True, False, False, True, False]
    # capped: only the most frequent (attribute, term) stays known
    capped = known_attribute_values(rows, 1)
    assert capped.height == 1
    assert known_spans(val, text_rows, rows, capped).tolist() == got
    assert known_attribute_values(rows, 0).height == 0


def test_validation_spans_judged_by_value_count_a_right_value_at_an_unmarked_mention():
    rows = _rows()
    _, _, _, _, _, _, text_rows = build_examples(
        rows, ["title", "description"], 1000, 0, 100, 1, with_rows=True)
    # by position: product 0's "red" in its description (text 1) was not where distant
    # supervision marked it, "Red-" is the same words; "Cotton" as a Color and "Wool" of
    # product 1 (which gives no Material) are wrong either way
    val = {"scores": [0.9, 0.8, 0.7, 0.65, 0.6], "correct": [True, False, False, False, False],
           "labels": ["Color", "Color", "Color", "Color", "Material"],
           "values": ["Red", "red", "Red-", "Cotton", "Wool"],
           "text_index": [0, 1, 2, 0, 2], "n_gold": 4}
    got = judge_by_value(val, text_rows, rows)
    assert got["correct"] == [True, True, True, False, False]
    assert got["correct_span"] == val["correct"] and val["correct"][1] is False  # a copy
    # twenty of each: by value the right spans reach down to 0.7, by position only 0.9 is sure;
    # the labelled-span recall is counted by position either way
    many = {k: (v * 20 if isinstance(v, list) else v * 20) for k, v in got.items()}
    by_value = calibrate(many, 0.8)
    by_span = calibrate({**many, "correct": many["correct_span"]}, 0.8)
    assert by_value["threshold"] == 0.7 and by_span["threshold"] == 0.9
    assert by_value["positives"] == 60 and by_span["positives"] == 20
    assert by_value["recall_of_labelled_spans"] == by_span["recall_of_labelled_spans"] == 0.25


def test_calibrate_known_reports_the_pair_with_labelled_span_recall():
    unknown = _group({0.97: 60, 0.95: 40, 0.7: 5}, {0.7: 15, 0.6: 20}, False)
    known = _group({0.9: 50, 0.8: 40, 0.7: 30}, {0.55: 10}, True)
    s, y, g = (unknown[i] + known[i] for i in range(3))
    c = calibrate_known({"scores": s, "correct": y, "n_gold": 250}, np.array(g), 0.95)
    assert c["threshold_known"] == 0.7 and c["threshold_unknown"] == 0.95
    assert c["recall_of_labelled_spans"] == round(220 / 250, 4)
    assert c["known_spans"] == 130 and c["known_positives"] == 120
    assert c["known_acted"] == c["known_right"] == 120 and c["unknown_acted"] == 100


def _cands(rows):
    base = {k: 0 for k in ("texts_seen", "texts_empty", "texts_html_stripped", "texts_capped",
                           "customer_texts_over_cap", "tokens")}
    return pa.Table.from_pylist([{**base, **r} for r in rows], schema=CANDIDATES)


def _c(attr, value, score, start=0):
    return {"attribute": attr, "value": value, "score": score, "field": "title",
            "start": start, "end": start + len(value)}


def test_decide_admits_a_known_value_between_the_thresholds_and_refuses_an_unknown_one():
    batch = _cands([
        {"product_id": "p1", "type": "shirt", "filled": [],
         "cands": [_c("Color", "Red", 0.9), _c("Material", "Silk", 0.9, 4),
                   _c("Size", "XL", 0.97, 9), _c("Material", "Wool", 0.7, 12)]},
        {"product_id": "p2", "type": "shirt", "filled": [f"Color{SEP}blue"],
         "cands": [_c("Color", "Blue", 0.85)]},
    ])
    known = frozenset({("Color", "red"), ("Color", "blue"), ("Material", "wool")})
    step = DecideValues(0.95, 0.3, None, None, True, 0.97, known_threshold=0.8, known_values=known)
    d = pl.from_arrow(step.process_batch(batch))
    got = {(r["subject"], r["relation"], r["object"]): r for r in d.iter_rows(named=True)}
    assert got[("p1", "Color", "Red")]["decision"] == "added"
    assert got[("p1", "Color", "Red")]["evidence"] == "title[0:3] tagger, known value"
    assert got[("p1", "Material", "Silk")]["decision"] == "below_threshold"
    assert got[("p1", "Size", "XL")]["decision"] == "added"
    assert got[("p1", "Size", "XL")]["evidence"] == "title[9:11] tagger"
    assert got[("p1", "Material", "Wool")]["decision"] == "below_threshold"  # known, under 0.8
    assert got[("p2", "Color", "Blue")]["decision"] == "known"  # the catalogue has it already
    # without the second threshold (switched off, or an older model): one threshold, as before
    old = pl.from_arrow(DecideValues(0.95, 0.3, None, None, True, 0.97).process_batch(batch))
    assert old.filter(pl.col("decision") == "added")["object"].to_list() == ["XL"]
    # the cluster terms label the known value the same way
    terms = pl.from_arrow(TermRows(0.95, 0.8, known).process_batch(batch))
    labelled = {(r[1], r[2]) for r in terms.iter_rows()}
    assert ("red", "Color") in labelled and ("silk", "") in labelled and ("wool", "") in labelled
    assert ("red", "") in set(map(tuple, pl.from_arrow(TermRows(0.95).process_batch(batch))
                                  .select("term", "attribute").iter_rows()))


def test_the_rebuild_reads_the_pair_only_where_fit_shipped_it_and_it_is_switched_on(tmp_path):
    (tmp_path / CALIBRATION).write_text(json.dumps({"threshold": 0.9}))
    assert known_value_thresholds(tmp_path, "auto", True) is None  # a model from before
    (tmp_path / CALIBRATION).write_text(json.dumps(
        {"threshold": 0.9, "threshold_known": 0.8, "threshold_unknown": 0.92}))
    assert known_value_thresholds(tmp_path, "auto", True) is None  # no known table shipped
    known_attribute_values(_rows(), 10).write_parquet(tmp_path / KNOWN_ATTRIBUTE_VALUES)
    assert known_value_thresholds(tmp_path, "auto", True) == (0.8, 0.92)
    assert known_value_thresholds(tmp_path, "auto", False) is None
    assert known_value_thresholds(tmp_path, 0.9, True) is None  # the user's own threshold
    assert ("Color", "red") in load_known_attribute_values(tmp_path, 50_000)
    # a run's cap binds at load too: the most frequent first, as fit wrote them
    assert len(load_known_attribute_values(tmp_path, 1)) == 1


def test_the_conditioned_taggers_validation_spans_name_their_label_value_and_text():
    import torch

    from autoknow_ray.nn.conditioned_tagger import ConditionedTrainSettings, train_conditioned_tagger
    from tests.test_imputation import tea_texts

    torch.set_num_threads(1)
    texts, spans = tea_texts()
    s = ConditionedTrainSettings(max_length=24, stride=8, context_dim=0, epochs=1, batch_size=8,
                                 val_fraction=0.25, cpu_threads=1, device="cpu", bf16=False)
    _, metrics = train_conditioned_tagger(texts, None, spans, ["Brand", "Flavor"], s)
    v = metrics["val_spans"]
    n = len(v["scores"])
    assert len(v["labels"]) == len(v["values"]) == len(v["text_index"]) == n
    for lab, value, t, ok in zip(v["labels"], v["values"], v["text_index"], v["correct"]):
        assert lab in ("Brand", "Flavor") and value and value in texts[t]
        if ok:
            assert any(texts[t][a:b] == value and lab == x for x, a, b in spans[t])
