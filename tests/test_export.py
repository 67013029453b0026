"""`autoknow export`: the N-Triples load into a real RDF store and answer SPARQL queries that
match the Parquet graph; the Neo4j import CSVs have the headers and rows neo4j-admin expects;
a sharded graph exports the same; memory follows the batch, not the graph."""
from __future__ import annotations

import csv
import tracemalloc
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autoknow_ray.cli import main
from autoknow_ray.graph import export as ex
from autoknow_ray.pipeline import read_parquet_any, table_file
from autoknow_ray.schema import HAS_TYPE, TRIPLES
from tests.report_fixtures import EVIL_TITLE, TRICKY_VALUE, build_run, shard_graph_table

pyoxigraph = pytest.importorskip("pyoxigraph")

PREFIXES = """PREFIX ak: <urn:autoknow:vocab:>
PREFIX rdfs: <http://www.w3.org/2000/01/rdf-schema#>
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def store(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("nt")
    assert main(["--quiet", "export", "--run", str(run), "--format", "nt", "--out", str(out)]) == 0
    s = pyoxigraph.Store()
    s.load(path=str(out / "graph.nt"), format=pyoxigraph.RdfFormat.N_TRIPLES)
    return s


def _select(store, query: str) -> list[tuple]:
    return [tuple(None if v is None else v.value for v in row) for row in store.query(PREFIXES + query)]


def _graph(run: Path, name: str) -> pl.DataFrame:
    return read_parquet_any(table_file(run / "graph", name))


def test_types_under_a_parent_match_the_taxonomy(run, store):
    tax = _graph(run, "taxonomy")
    for parent in ("chips", "snacks", "food"):
        expected = set(tax.filter(pl.col("parent") == parent)["type"].to_list())
        got = {t for (t,) in _select(store, f"""SELECT ?name WHERE {{
            ?t rdfs:subClassOf <{ex.BASE}type:{parent}> ; rdfs:label ?name }}""")}
        assert got == expected and got
    new = {t for (t,) in _select(store, "SELECT ?name WHERE { ?t ak:isNew true ; rdfs:label ?name }")}
    assert new == {"veggie chips", "kettle chips", "dry shampoo"}
    # the whole subtree, through a property path
    under_food = {t for (t,) in _select(store, f"""SELECT ?name WHERE {{
        ?t rdfs:subClassOf+ <{ex.BASE}type:food> ; rdfs:label ?name }}""")}
    assert {"veggie chips", "chips", "snacks", "cereal"} <= under_food and "shampoo" not in under_food


def test_a_products_attributes_match_the_live_triples(run, store):
    triples = _graph(run, "triples").filter(pl.col("status") != "removed")
    for pid in ("p000", "p002", "p003", "p004"):
        expected = {(r, o) for r, o in triples.filter(
            (pl.col("subject") == pid) & (pl.col("relation") != HAS_TYPE)).select("relation", "object").iter_rows()}
        rows = _select(store, f"""SELECT ?attr ?value WHERE {{
            <{ex.BASE}product:{pid}> ?p ?value .
            FILTER(STRSTARTS(STR(?p), "{ex.BASE}attribute:"))
            BIND(STRAFTER(STR(?p), "{ex.BASE}attribute:") AS ?attr) }}""")
        assert set(rows) == expected, pid
    # the removed fact is history, not exported; the correction is
    assert ("Flavor", "cheese") not in set(_select(store, f"""SELECT ?a ?v WHERE {{
        <{ex.BASE}product:p004> ?p ?v . BIND(STRAFTER(STR(?p), "attribute:") AS ?a) }}"""))
    n_types = triples.filter(pl.col("relation") == HAS_TYPE).height
    assert _select(store, "SELECT (COUNT(*) AS ?n) WHERE { ?p ak:hasType ?t }")[0][0] == str(n_types)


def test_untrusted_text_round_trips_exactly(store):
    assert _select(store, f"SELECT ?v WHERE {{ <{ex.BASE}product:p000> <{ex.BASE}attribute:Color> ?v }}") == [
        (TRICKY_VALUE,)]
    assert _select(store, f"SELECT ?t WHERE {{ <{ex.BASE}product:p000> rdfs:label ?t }}") == [(EVIL_TITLE,)]


def test_synonyms_related_and_attribute_importance(store):
    assert _select(store, f"SELECT ?c WHERE {{ <{ex.BASE}type:crisps> ak:synonymOf ?c }}") == [
        (f"{ex.BASE}type:chips",)]
    assert _select(store, """SELECT ?c WHERE { ?t ak:synonymOf ?v . ?t rdfs:label "bbq" .
        ?v rdfs:label ?c ; ak:attribute ?a . ?a rdfs:label "Flavor" }""") == [("smoky bbq",)]
    related = _select(store, f"SELECT ?r WHERE {{ <{ex.BASE}product:p001> ak:relatedTo ?r }}")
    assert sorted(r for (r,) in related) == [f"{ex.BASE}product:p002", f"{ex.BASE}product:p003"]
    ranked = _select(store, f"""SELECT ?name WHERE {{ ?x ak:ofType <{ex.BASE}type:chips> ;
        ak:attribute ?a ; ak:importanceRank ?rank . ?a rdfs:label ?name }} ORDER BY ?rank""")
    assert ranked == [("Flavor",), ("Brand",)]


def test_literal_and_iri_escaping():
    assert ex.nt_literal('a"b\\c\nd\re\tf\x01') == '"a\\"b\\\\c\\nd\\re\\tf\\u0001"'
    # the column forms the per-product tables use say exactly the same
    texts = ["plain", 'a"b\\c\nd\re\tf\x01g\x0bh\x7f', "café ☕", "", "x\bz\fq"]
    assert ex.literal_column(pa.array(texts)).to_pylist() == [ex.nt_literal(t) for t in texts]
    names = ["p001", "a b<c>", "Size/Fit", "ü", ""]
    assert ex.iri_column("type", pa.array(names)).to_pylist() == [ex.iri("type", n) for n in names]
    assert ex.nt_literal("café ☕") == '"café ☕"'
    assert ex.iri("type", "a b<c>") == "<urn:autoknow:type:a%20b%3Cc%3E>"
    assert ex.iri("value", "Size/Fit", "x") == "<urn:autoknow:value:Size%2FFit/x>"
    assert ex.value_id("Pack Size", "12 oz") == "Pack Size=12 oz"
    assert ex.value_id("a=b", "c") != ex.value_id("a", "b=c")


def test_sharded_graph_exports_the_same_statements(run, tmp_path):
    import shutil

    single = ex.export_ntriples(run, tmp_path / "a")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for name in ("triples", "taxonomy", "related"):
        shard_graph_table(copy, name)
    sharded = ex.export_ntriples(copy, tmp_path / "b")
    assert sharded["statements"] == single["statements"]
    lines = lambda p: sorted(Path(p).read_text(encoding="utf-8").splitlines())  # noqa: E731
    assert lines(single["files"][0]) == lines(sharded["files"][0])


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_neo4j_import_files(run, tmp_path):
    res = ex.export(run, "neo4j", tmp_path)
    assert "--skip-duplicate-nodes=true" in res["import"] and "--multiline-fields=true" in res["import"]
    header, products = _read_csv(tmp_path / "products.csv")
    assert header == ["productId:ID(Product)", "title", ":LABEL"]
    assert len(products) == 40 and [EVIL_TITLE] == [t for p, t, _ in products if p == "p000"]
    header, types = _read_csv(tmp_path / "types.csv")
    assert header[0] == "name:ID(Type)"
    new_types = {t for t, is_new, _ in types if is_new == "true"}
    assert new_types == {"veggie chips", "kettle chips", "dry shampoo"}
    header, sub = _read_csv(tmp_path / "subtype_of.csv")
    assert header[:2] == [":START_ID(Type)", ":END_ID(Type)"] and header[-1] == ":TYPE"
    assert ["veggie chips", "chips"] in [r[:2] for r in sub]
    type_ids = {t for t, _, _ in types}
    assert {r[0] for r in sub} | {r[1] for r in sub} <= type_ids  # no dangling endpoint
    _, has_value = _read_csv(tmp_path / "has_value.csv")
    _, values = _read_csv(tmp_path / "values.csv")
    value_ids = {r[0] for r in values}
    assert {r[1] for r in has_value} <= value_ids
    assert TRICKY_VALUE in {r[2] for r in values}  # quotes, a backslash, a newline: one field
    live = _graph(run, "triples").filter(pl.col("status") != "removed")
    _, has_type = _read_csv(tmp_path / "has_type.csv")
    assert len(has_type) == live.filter(pl.col("relation") == HAS_TYPE).height
    assert len(has_value) == live.filter(pl.col("relation") != HAS_TYPE).height
    _, related = _read_csv(tmp_path / "related_to.csv")
    assert related == [["p001", "p002", "1", "0.8", "RELATED_TO"], ["p001", "p003", "2", "0.6", "RELATED_TO"]]


def _triples_run(root: Path, n: int, shards: int = 4) -> Path:
    folder = root / "graph" / "triples"
    folder.mkdir(parents=True)
    for s in range(shards):
        ids = [f"prod{i:07d}" for i in range(s * n // shards, (s + 1) * n // shards)]
        t = pa.table({"subject": ids, "relation": ["Flavor"] * len(ids),
                      "object": [f"flavour number {i}" for i in range(len(ids))],
                      "confidence": pa.array([0.5] * len(ids), pa.float32()),
                      "module": ["m"] * len(ids), "status": ["added"] * len(ids),
                      "evidence": ["e"] * len(ids)}, schema=TRIPLES)
        pq.write_table(t, folder / f"part-{s:05d}.parquet", row_group_size=2_000)
    return root


def test_export_memory_follows_the_batch_not_the_graph(tmp_path, monkeypatch):
    """Four times the triples, in shards, take about the same Python memory to export: the peak
    follows the batch, and stays well under the size of what is written."""
    monkeypatch.setattr(ex, "BATCH_ROWS", 2_000)
    peaks, sizes = {}, {}
    for n in (10_000, 40_000):
        run = _triples_run(tmp_path / f"run{n}", n)
        tracemalloc.start()
        res = ex.export(run, "nt", tmp_path / f"out{n}")
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert res["statements"]["triples"] == n
        sizes[n] = Path(res["files"][0]).stat().st_size
    assert peaks[40_000] < 1.3 * peaks[10_000], peaks
    assert peaks[40_000] < sizes[40_000] / 3, (peaks, sizes)


def test_export_errors(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path), "--format", "nt", "--out", str(tmp_path / "o")]) == 2
    assert "no graph/triples" in capsys.readouterr().err
    (tmp_path / "graph").mkdir()
    pq.write_table(TRIPLES.empty_table(), tmp_path / "graph" / "triples.parquet")
    with pytest.raises(ValueError, match="export format"):
        ex.export(tmp_path, "csv", tmp_path / "o")
