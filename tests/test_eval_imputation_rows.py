"""`autoknow eval`'s imputation rows: a run without the imputation stage gets no module rows
(they would read as a model that found nothing), only what the other modules added."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from autoknow_ray.eval import imputation
from autoknow_ray.schema import TRIPLES


def _run(tmp_path, with_stage: bool):
    run, gold = tmp_path / "run", tmp_path / "gold"
    (run / "graph").mkdir(parents=True)
    gold.mkdir()
    triples = [
        # the title tagger added a value the catalogue lacked: right
        ("p1", "Color", "red", 0.9, "taxonomy", "added", "title span"),
    ]
    if with_stage:  # the imputation tagger added one: wrong
        triples.append(("p2", "Color", "green", 0.8, "imputation", "added", "description span"))
    cols = list(zip(*triples))
    pq.write_table(pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(cols, TRIPLES)],
                                        schema=TRIPLES), run / "graph" / "triples.parquet")
    pq.write_table(pa.table({"product_id": ["p1", "p2"], "attribute": ["Color", "Color"],
                             "value": ["red", "blue"]}), gold / "held_out_values.parquet")
    if with_stage:
        (run / "imputation").mkdir()
        (run / "imputation" / "manifest.json").write_text(json.dumps({"stage": "imputation"}))
    return run, gold


def test_a_run_without_imputation_has_no_module_rows(tmp_path):
    res = imputation.score(*_run(tmp_path, with_stage=False))
    assert res["imputation.held_out"] == 2
    assert not any(k.startswith(("imputation.precision", "imputation.recall", "imputation.f1",
                                 "imputation.attr.", "imputation.at_")) for k in res)
    # the other modules' additions are still scored: one of the two held-out values found
    assert res["imputation.all_modules.recall"] == 0.5
    assert res["imputation.all_modules.precision"] == 1.0


def test_a_run_with_imputation_scores_the_module(tmp_path):
    res = imputation.score(*_run(tmp_path, with_stage=True))
    assert res["imputation.predicted"] == 1 and res["imputation.correct"] == 0
    assert res["imputation.recall"] == 0.0
    assert res["imputation.all_modules.recall"] == 0.5
    assert res["imputation.attr.color.support"] == 2
