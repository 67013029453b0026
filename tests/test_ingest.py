"""Ingest: every bad row is quarantined with a reason, no good row is lost, re-runs resume."""
from __future__ import annotations

import json
import shutil

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autoknow_ray.catalogue.ingest import IngestStage
from autoknow_ray.catalogue.validate import RowError, validate_product
from autoknow_ray.config import Config, IngestConfig
from autoknow_ray.eval.report import ReportStage
from autoknow_ray.graph.assemble import GraphStage, apply_edits, catalogue_triples
from autoknow_ray.pipeline import RunContext, read_manifest, run_stages

GOOD = [
    {"product_id": "g1", "title": "Acme Green Tea, Mint, 20 Count", "product_type": "green tea",
     "attributes": [{"name": "Brand", "value": "Acme"}, {"name": "Flavor", "value": "Mint"}]},
    {"product_id": "g2", "title": "Bolt Dark Roast Coffee 12 oz", "product_type": "coffee",
     "attributes": {"Size": "12 oz"}, "brand": "Bolt"},
    {"product_id": "g3", "title": "Plain title with no type"},
]


def _planted_catalogue(d):
    d.mkdir()
    with open(d / "products.jsonl", "wb") as f:
        for r in GOOD:
            f.write(json.dumps(r).encode() + b"\n")
        f.write(json.dumps({"product_id": "b1", "title": ""}).encode() + b"\n")  # empty title
        f.write(b'{"product_id": "b2", "title": "broken\n')  # broken JSON
        f.write(json.dumps({"product_id": "g1", "title": "same id again"}).encode() + b"\n")
        f.write(json.dumps({"product_id": "b4", "title": "x" * 1_000_000}).encode() + b"\n")
        f.write(b'{"product_id": "b5", "title": "caf\xe9 bytes"}\n')  # latin-1, not UTF-8
        f.write(json.dumps({"title": "no id"}).encode() + b"\n")
        f.write(json.dumps({"product_id": "b7", "title": "t", "attributes": 5}).encode() + b"\n")
    pq.write_table(pa.table({"type": ["green tea", "coffee", "beverages", "tea"],
                             "parent": ["tea", "beverages", None, "tea"]}), d / "taxonomy.parquet")
    (d / "behavior.csv").write_text(
        "query,product_id,action,count\ngreen tea,g1,view,3\nx,g1,teleport,1\ncoffee,g2,purchase,\n"
        "too,many,fields,1,2\n")
    return d


def _cfg():
    return Config(stages=["ingest", "graph", "report"])


def test_validate_product_rules():
    cfg = IngestConfig()
    ok = validate_product({"product_id": 7, "title": "  a\tb \n c ", "bullets": '["x", null]'}, cfg)
    assert ok["product_id"] == "7" and ok["title"] == "a b c" and ok["bullets"] == ["x"]
    for bad, reason in [({"title": "t"}, "missing product_id"), ({"product_id": "1"}, "missing title"),
                        ({"product_id": "1", "title": "t", "attributes": [1]}, "attributes")]:
        with pytest.raises(RowError, match=reason):
            validate_product(bad, cfg)


def test_planted_bad_rows_are_quarantined_and_good_rows_kept(tmp_path, ray_session):
    cat = _planted_catalogue(tmp_path / "cat")
    ctx = RunContext(run_dir=tmp_path / "run", catalogue=cat, cfg=_cfg())
    run_stages([IngestStage(), GraphStage(), ReportStage()], ctx)
    products = ctx.read("ingest", "products")
    assert sorted(products["product_id"].to_list()) == ["g1", "g2", "g3"]
    assert products.filter(pl.col("product_id") == "g1")["title"][0].startswith("Acme")  # first wins
    q = pl.read_parquet(tmp_path / "run" / "quarantine.parquet")
    reasons = dict(zip(q.filter(pl.col("table") == "products")["row"].to_list(),
                       q.filter(pl.col("table") == "products")["reason"].to_list()))
    assert "empty title" in reasons[3]
    assert "unparseable JSON" in reasons[4]
    assert "duplicate product_id" in reasons[5]
    assert "absurd length" in reasons[6]
    assert "non-UTF-8" in reasons[7]
    assert "missing product_id" in reasons[8]
    assert "attributes" in reasons[9]
    behavior_q = q.filter(pl.col("table") == "behavior")["reason"].to_list()
    assert any("action" in r for r in behavior_q) and any("fields" in r for r in behavior_q)
    m = read_manifest(tmp_path / "run" / "ingest")
    for t in m["tables"].values():
        assert t["rows_in"] == t["rows_out"] + t["rows_quarantined"]
    assert m["tables"]["products"] == {"rows_in": 10, "rows_out": 3, "rows_quarantined": 7}
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"][0]["balanced"] is True
    triples = pl.read_parquet(tmp_path / "run" / "graph" / "triples.parquet")
    assert set(triples["status"].to_list()) == {"kept"}
    assert triples.filter(pl.col("relation") == "Size")["object"].to_list() == ["12 oz"]
    assert triples.filter(pl.col("relation") == "Brand").height == 2


def test_rerun_skips_done_stages_and_resumes_after_a_kill(tmp_path, ray_session):
    cat = _planted_catalogue(tmp_path / "cat")
    ctx = RunContext(run_dir=tmp_path / "run", catalogue=cat, cfg=_cfg())
    first = run_stages([IngestStage(), GraphStage()], ctx)
    triples1 = pl.read_parquet(tmp_path / "run" / "graph" / "triples.parquet")
    again = run_stages([IngestStage(), GraphStage()], ctx)
    assert [r["skipped"] for r in again] == [True, True]
    # a kill during the graph stage leaves a tmp folder and no finished graph
    shutil.rmtree(tmp_path / "run" / "graph")
    (tmp_path / "run" / ".graph.tmp").mkdir()
    (tmp_path / "run" / ".graph.tmp" / "triples.parquet").write_bytes(b"partial")
    resumed = run_stages([IngestStage(), GraphStage()], ctx)
    assert [r["skipped"] for r in resumed] == [True, False]
    assert not (tmp_path / "run" / ".graph.tmp").exists()
    triples2 = pl.read_parquet(tmp_path / "run" / "graph" / "triples.parquet")
    assert triples2.equals(triples1)
    assert first[0]["fingerprint"] == resumed[0]["fingerprint"]
    # a changed input file invalidates ingest and everything downstream
    with open(cat / "products.jsonl", "ab") as f:
        f.write(json.dumps({"product_id": "g9", "title": "New Tea"}).encode() + b"\n")
    changed = run_stages([IngestStage(), GraphStage()], ctx)
    assert [r["skipped"] for r in changed] == [False, False]


def test_apply_edits_marks_removed_and_appends_new():
    products = pl.DataFrame({
        "product_id": ["p1", "p2"], "title": ["a", "b"], "description": [None, None],
        "bullets": [None, None], "product_type": ["tea", None],
        "attributes": [[{"name": "Flavor", "value": "Mint"}], []], "brand": [None, None]},
        schema_overrides={"bullets": pl.List(pl.String), "description": pl.String, "brand": pl.String})
    base = catalogue_triples(products)
    edits = pl.DataFrame({
        "subject": ["p1", "p1", "p2", "p1"], "relation": ["has_type", "has_type", "has_type", "Flavor"],
        "object": ["tea", "coffee", "tea", "Mint"], "confidence": [0.9, 0.9, 0.8, 0.7],
        "module": ["taxonomy"] * 4, "status": ["removed", "corrected", "added", "added"],
        "evidence": ["x"] * 4}, schema_overrides={"confidence": pl.Float32})
    out = apply_edits(base, edits)
    rows = {(s, r, o): st for s, r, o, st in out.select("subject", "relation", "object", "status").iter_rows()}
    assert rows[("p1", "has_type", "tea")] == "removed"
    assert rows[("p1", "has_type", "coffee")] == "corrected"
    assert rows[("p2", "has_type", "tea")] == "added"
    assert rows[("p1", "Flavor", "Mint")] == "kept"  # an addition that repeats a fact is no news
    assert out.height == 4
