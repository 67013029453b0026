"""Ingest: every bad row is quarantined with a reason, no good row is lost, re-runs resume."""
from __future__ import annotations

import json
import shutil

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autoknow_ray.catalogue.ingest import IngestBalanceError, IngestStage, break_cycles, check_balance
from autoknow_ray.catalogue.validate import RowError, validate_product
from autoknow_ray.config import Config, IngestConfig
from autoknow_ray.eval.report import ReportStage
from autoknow_ray.graph.assemble import GraphStage, apply_edits, catalogue_triples
from autoknow_ray.pipeline import RunContext, read_manifest, read_parquet_any, run_stages, table_file

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


def _triples(run):
    """The graph's triples (a file or a folder of shards) in a stable order."""
    return read_parquet_any(table_file(run / "graph", "triples")).sort(
        ["subject", "relation", "object", "status"])


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


def test_surrogate_check_finds_exactly_the_surrogate_code_points():
    """The one-encode check agrees with the definition (a code point in U+D800..U+DFFF) on
    ASCII, other scripts, astral characters and lone or paired surrogates."""
    from autoknow_ray.catalogue.validate import _has_surrogates

    def by_definition(s: str) -> bool:
        return any(0xD800 <= ord(c) <= 0xDFFF for c in s)

    cases = ["", "abc", "é", "日本語", "😀 ok", "\U0010ffff", "\ud7ff\ue000", "\udcff",
             "ab\ud800c", "x\udc80y", "a\ud83d\ude00", "caf\udce9"]
    assert [_has_surrogates(s) for s in cases] == [by_definition(s) for s in cases]
    assert [by_definition(s) for s in cases].count(True) == 5


def test_a_quarantined_parquet_row_keeps_its_raw_content(tmp_path):
    """Parquet rows are validated without a JSON copy each; a quarantined one still gets its
    content as JSON in `_raw`, every good row none, and every row comes out once."""
    from autoknow_ray.catalogue.reader import parse_parquet_units

    path = tmp_path / "products.parquet"
    pq.write_table(pa.table({"product_id": ["p1", "p2", None], "title": ["Tea", "", "Mug"]}), path)
    units = pa.table({"path": [str(path)], "row_group": [0], "first_row": [0],
                      "columns": [["product_id", "title"]]})
    out = pl.concat([pl.from_arrow(t) for t in
                     parse_parquet_units(units, "products", IngestConfig(), str(tmp_path))])
    assert out.height == 3
    assert out["_reason"][0] is None and out["_raw"][0] is None
    assert "empty title" in out["_reason"][1]
    assert json.loads(out["_raw"][1]) == {"product_id": "p2", "title": ""}
    assert "missing product_id" in out["_reason"][2]
    assert json.loads(out["_raw"][2]) == {"product_id": None, "title": "Mug"}


def test_planted_bad_rows_are_quarantined_and_good_rows_kept(tmp_path, ray_session):
    cat = _planted_catalogue(tmp_path / "cat")
    ctx = RunContext(run_dir=tmp_path / "run", catalogue=cat, cfg=_cfg())
    run_stages([IngestStage(), GraphStage(), ReportStage()], ctx)
    products = ctx.read("ingest", "products")
    assert sorted(products["product_id"].to_list()) == ["g1", "g2", "g3"]
    assert products.filter(pl.col("product_id") == "g1")["title"][0].startswith("Acme")  # first wins
    q = read_parquet_any(table_file(tmp_path / "run", "quarantine"))
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
    triples = _triples(tmp_path / "run")
    assert set(triples["status"].to_list()) == {"kept"}
    assert triples.filter(pl.col("relation") == "Size")["object"].to_list() == ["12 oz"]
    assert triples.filter(pl.col("relation") == "Brand").height == 2


def test_rerun_skips_done_stages_and_resumes_after_a_kill(tmp_path, ray_session):
    cat = _planted_catalogue(tmp_path / "cat")
    ctx = RunContext(run_dir=tmp_path / "run", catalogue=cat, cfg=_cfg())
    first = run_stages([IngestStage(), GraphStage()], ctx)
    triples1 = _triples(tmp_path / "run")
    again = run_stages([IngestStage(), GraphStage()], ctx)
    assert [r["skipped"] for r in again] == [True, True]
    # a kill during the graph stage leaves a tmp folder and no finished graph
    shutil.rmtree(tmp_path / "run" / "graph")
    (tmp_path / "run" / ".graph.tmp").mkdir()
    (tmp_path / "run" / ".graph.tmp" / "triples.parquet").write_bytes(b"partial")
    resumed = run_stages([IngestStage(), GraphStage()], ctx)
    assert [r["skipped"] for r in resumed] == [True, False]
    assert not (tmp_path / "run" / ".graph.tmp").exists()
    triples2 = _triples(tmp_path / "run")
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


BOM = b"\xef\xbb\xbf"


def _faulty_catalogue(d):
    """Parquet shards and a BOM-prefixed JSON Lines file in one products folder, BOM-prefixed
    CSV and JSON Lines side tables, a taxonomy with a cycle, and rows about unknown products."""
    (d / "products").mkdir(parents=True)
    pq.write_table(pa.table({
        "product_id": ["p1", "p2", None, "p3"], "title": ["Mint Tea", "Dark Coffee", "no id", "Milk"],
        "product_type": ["tea", "coffee", None, "milk"], "unused": ["x"] * 4}),
        d / "products" / "part-0.parquet", row_group_size=2)
    pq.write_table(pa.table({"product_id": ["p1"], "title": ["Mint Tea again"]}),
                   d / "products" / "part-1.parquet")
    (d / "products" / "sheet.jsonl").write_bytes(
        BOM + json.dumps({"product_id": "p4", "title": "Oat Bar"}).encode() + b"\n")
    (d / "taxonomy.csv").write_bytes(
        BOM + b'"type","parent"\ntea,drinks\ncoffee,drinks\ndrinks,food\nfood,tea\nmilk,drinks\n')
    (d / "texts.jsonl").write_bytes(BOM + b"\n".join(json.dumps(r).encode() for r in [
        {"product_id": "p1", "kind": "review", "text": "lovely"},
        {"product_id": "zz", "kind": "review", "text": "about nothing we sell"}]) + b"\n")
    (d / "behavior.csv").write_bytes(
        BOM + b'"query","product_id","action","count"\ntea,p1,view,2\ntea,gone,click,1\n')
    pq.write_table(pa.table({"src": ["p1", "p2", "ghost"], "dst": ["p2", "nope", "p1"],
                             "count": [3, 1, 1]}), d / "copurchase.parquet")
    return d


@pytest.mark.parametrize("single_task_rows", [0, 100_000], ids=["shuffle-and-join", "one-task"])
def test_bom_cycles_unknown_products_and_row_numbers(tmp_path, ray_session, single_task_rows):
    """The same answers from both ways of de-duplicating and checking product references: the
    hash shuffle and join a large catalogue takes, and the one task a small one takes."""
    cat = _faulty_catalogue(tmp_path / "cat")
    run = tmp_path / "run"
    cfg = _cfg()
    cfg.ingest.single_task_rows = single_task_rows
    ctx = RunContext(run_dir=run, catalogue=cat, cfg=cfg)
    run_stages([IngestStage(), GraphStage(), ReportStage()], ctx)
    m = read_manifest(run / "ingest")
    for name, t in m["tables"].items():
        assert t["rows_in"] == t["rows_out"] + t["rows_quarantined"], name
    q = read_parquet_any(table_file(run, "quarantine"))
    # a byte-order mark costs no row: the JSONL product and the first CSV rows are kept
    products = ctx.read("ingest", "products")
    assert sorted(products["product_id"].to_list()) == ["p1", "p2", "p3", "p4"]
    assert set(products.columns) == {"product_id", "title", "description", "bullets",
                                     "product_type", "attributes", "brand"}
    assert ctx.read("ingest", "behavior")["query"].to_list() == ["tea"]
    assert ctx.read("ingest", "texts")["text"].to_list() == ["lovely"]
    # Parquet rows keep their number in the file, and sources their path in the catalogue
    bad = {(s, r): reason for s, r, reason in q.filter(pl.col("table") == "products")
           .select("source", "row", "reason").iter_rows()}
    assert "missing product_id" in bad[("products/part-0.parquet", 2)]
    assert "duplicate product_id (first seen in products/part-0.parquet row 0)" == bad[
        ("products/part-1.parquet", 0)]
    # the cycle drinks → food → tea → drinks is broken at the row that closes it, in file order
    cycle = q.filter(pl.col("reason").str.starts_with("taxonomy cycle"))
    assert cycle.select("table", "row").rows() == [("taxonomy", 4)]
    assert "food → tea → drinks → food" in cycle["reason"][0]
    graph_tax = read_parquet_any(table_file(run / "graph", "taxonomy"))
    parents = dict(graph_tax.filter(pl.col("parent").is_not_null()).select("type", "parent").rows())
    for t in parents:
        seen, node = set(), t
        while node in parents:
            assert node not in seen, f"cycle through {node}"
            seen.add(node)
            node = parents[node]
    # rows about products the catalogue lacks: quarantined, and counted per table
    unknown = q.filter(pl.col("reason").str.starts_with("unknown product_id"))
    assert sorted(unknown["table"].to_list()) == ["behavior", "copurchase", "copurchase", "texts"]
    assert {r for r in unknown["raw"].to_list()} == {"product_id=zz", "product_id=gone",
                                                     "src=ghost", "dst=nope"}
    assert {t: m["tables"][t]["unknown_product"] for t in ("texts", "behavior", "copurchase")} == {
        "texts": 1, "behavior": 1, "copurchase": 2}
    assert m["quarantine_reasons"]["unknown product_id"] == 4
    assert m["tables"]["taxonomy"]["taxonomy_cycles_broken"] == 1


def test_break_cycles_keeps_a_forest_and_names_the_cycle():
    rows = pl.DataFrame({"type": ["a", "b", "c", "d", "c"], "parent": ["b", "c", "a", "a", "d"],
                         "_reason": [None] * 5, "_raw": [None] * 5},
                        schema_overrides={"_reason": pl.String, "_raw": pl.String})
    out = break_cycles(rows)
    reasons = out["_reason"].to_list()
    assert reasons[:2] == [None, None] and reasons[3] is None
    assert reasons[2].startswith("taxonomy cycle (c → a → b → c)")
    assert reasons[4].startswith("taxonomy cycle (c → d → a → b → c)")
    assert out["_raw"].to_list()[2] == "c → a"


def test_unbalanced_table_is_a_named_error():
    check_balance("texts", 10, 7, 3)
    with pytest.raises(IngestBalanceError, match=r"'behavior': 10 rows read but 7 written and 2 quarantined"):
        check_balance("behavior", 10, 7, 2)


def test_partition_functions_without_ray():
    """The worker functions of ingest, on one hand-made partition: the first row by (source, row)
    wins whatever order the shuffle delivered, and unknown references get their reason."""
    from autoknow_ray.catalogue.ingest import first_occurrence, mark_unknown
    from autoknow_ray.catalogue.reader import validated_schema

    schema = validated_schema("products")
    rows = [{"product_id": "p1", "title": "late", "_source": "b.jsonl", "_row": 0},
            {"product_id": "p1", "title": "early", "_source": "a.jsonl", "_row": 5},
            {"product_id": "p2", "title": "bad", "_source": "a.jsonl", "_row": 1,
             "_reason": "empty title"},
            {"product_id": "p2", "title": "good", "_source": "a.jsonl", "_row": 2}]
    out = pl.from_arrow(first_occurrence(pa.Table.from_pylist(rows, schema=schema), "products",
                                         "product_id"))
    assert out.height == 4
    kept = out.filter(pl.col("_reason").is_null())
    assert sorted(kept["title"].to_list()) == ["early", "good"]
    dup = out.filter(pl.col("title") == "late")["_reason"][0]
    assert dup == "duplicate product_id (first seen in a.jsonl row 5)"
    # the duplicate keeps its own content, not just its id
    raw = json.loads(out.filter(pl.col("title") == "late")["_raw"][0])
    assert raw["product_id"] == "p1" and raw["title"] == "late"
    joined = pa.table({"src": ["p1", "zz"], "dst": ["p2", "p1"], "count": [1, 1],
                       "_source": ["c.csv"] * 2, "_row": [1, 2], "_reason": [None, None],
                       "_raw": pa.array([None, None], pa.large_string()),
                       "_known": pa.array([True, None], pa.bool_())})
    marked = mark_unknown(joined, "src", "unknown product_id (src)")
    assert marked.column("_reason").to_pylist() == [None, "unknown product_id (src)"]
    assert marked.column("_raw").to_pylist() == [None, "src=zz"]
    assert "_known" not in marked.column_names
