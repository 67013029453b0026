"""The dictionary and centroid baselines on tiny catalogues, scored by the real `evaluate`."""
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autoknow_ray.cli import main
from autoknow_ray.eval.baselines import (
    PhraseTrie,
    format_comparison,
    learn_dictionary,
    phrase_key,
    run_centroid,
    run_dictionary,
)
from autoknow_ray.eval.evaluate import evaluate
from autoknow_ray.pipeline import read_parquet_any, table_file
from autoknow_ray.schema import (
    GOLD_HYPERNYMS,
    GOLD_SPANS,
    GOLD_TYPES,
    GRAPH_TAXONOMY,
    PRODUCTS,
    TAXONOMY,
    TRIPLES,
)


def _write(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _attrs(**kv: str) -> list[dict]:
    return [{"name": k.replace("_", " "), "value": v} for k, v in kv.items()]


TRAIN = [
    {"product_id": "tr1", "title": "Acme Green Tea 20 ct", "product_type": "Tea",
     "attributes": _attrs(Brand="Acme", Flavor="Green Tea", Size="20 ct")},
    {"product_id": "tr2", "title": "Acme Green Mug", "product_type": "Mug",
     "attributes": _attrs(Brand="Acme", Color="Green")},
    # Acme once under Manufacturer (Brand wins 2:1); Decaf is in no training title (dropped)
    {"product_id": "tr3", "title": "Bolt Dark Roast Coffee", "product_type": "Coffee",
     "attributes": _attrs(Manufacturer="Acme", Brand="Bolt", Roast="Dark Roast", Caffeine="Decaf")},
    {"product_id": "tr4", "title": "Bolt Espresso Coffee Beans", "product_type": "Coffee",
     "attributes": [], "brand": "Bolt"},
]
TEST = [
    {"product_id": "te1", "title": "Acme Green Tea Bags 40 ct"},
    {"product_id": "te2", "title": "Zesto Decaf Coffee Mugs"},
    {"product_id": "te3", "title": "acme  green mug 20 ct"},
    {"product_id": "te4", "title": "Gift Card"},
]


def _span(pid: str, attribute: str, value: str) -> dict:
    return {"product_id": pid, "attribute": attribute, "value": value, "field": "title",
            "start": -1, "end": -1}


@pytest.fixture
def dict_setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    train, test, gold = tmp_path / "train", tmp_path / "test", tmp_path / "test" / "gold"
    _write(train / "products" / "part-00000.parquet", TRAIN, PRODUCTS)  # sharded, as ingest writes
    _write(train / "taxonomy.parquet", [{"type": t, "parent": None} for t in ("Tea", "Mug", "Coffee")],
           TAXONOMY)
    _write(test / "products.parquet", TEST, PRODUCTS)
    _write(gold / "types.parquet", [{"product_id": p, "type": t} for p, t in
                                    (("te1", "Tea"), ("te2", "Mug"), ("te3", "Mug"), ("te4", "Gift Card"))],
           GOLD_TYPES)
    _write(gold / "spans.parquet", [
        _span("te1", "Brand", "Acme"), _span("te1", "Flavor", "Green Tea"), _span("te1", "Size", "40 ct"),
        _span("te2", "Brand", "Zesto"), _span("te2", "Caffeine", "Decaf"),
        _span("te3", "Brand", "Acme"), _span("te3", "Color", "Green"),
    ], GOLD_SPANS)
    return train, test, gold


def test_phrase_trie_whole_words_and_whitespace():
    trie = PhraseTrie()
    for v in ("usb-c", "green tea", "tea"):
        trie.add(phrase_key(v), v)
    found = {(p, s, e) for p, s, e in trie.find_all("USB-C cable, Green   tea; teapot")}
    assert found == {("usb-c", 0, 5), ("green tea", 13, 24), ("tea", 21, 24)}
    assert trie.find_all("usb c cable") == []


def test_dictionary_learning_and_extraction():
    model = learn_dictionary(pl.from_arrow(pa.Table.from_pylist(TRAIN, schema=PRODUCTS)))
    spans, best = model.extract("Acme Green Tea Bags 40 ct")
    title = "Acme Green Tea Bags 40 ct"
    assert [(a, title[s:e]) for a, s, e in spans] == [("Brand", "Acme"), ("Flavor", "Green Tea")]
    assert best is not None and best[0] == "Tea"
    spans, best = model.extract("Zesto Decaf Coffee Mugs")
    assert spans == []  # Zesto never seen, Decaf never in a training title
    assert best[0] == "Coffee"  # "Coffee" is longer than "Mugs"
    assert model.extract("Gift Card") == ([], None)
    assert model.default_type == "Coffee" and model.default_share == 0.5


def test_dictionary_run_scores_by_hand(dict_setup):
    train, test, gold = dict_setup
    run = test.parent / "run_dict"
    summary = run_dictionary(train, test, run)
    assert summary["values_kept"] == 6  # acme, green tea, 20 ct, green, bolt, dark roast (not decaf)
    triples = read_parquet_any(table_file(run / "graph", "triples"))
    assert (run / "graph" / "triples").is_dir()  # shards, as the graph stage writes them
    assert triples.columns == TRIPLES.names
    got = set(triples.select("subject", "relation", "object").iter_rows())
    assert got == {
        ("te1", "Brand", "Acme"), ("te1", "Flavor", "Green Tea"), ("te1", "has_type", "Tea"),
        ("te2", "has_type", "Coffee"),
        ("te3", "Brand", "acme"), ("te3", "Color", "green"), ("te3", "Size", "20 ct"),
        ("te3", "has_type", "Mug"),
        ("te4", "has_type", "Coffee"),
    }
    assert set(triples["status"]) == {"added"} and set(triples["module"]) == {"baseline:dictionary"}
    assert pl.read_parquet(run / "graph" / "taxonomy.parquet").height == 3

    r = evaluate(run, gold)
    # types: te1, te3 right; te2 (Coffee for Mug) and te4 (Coffee for Gift Card) wrong
    assert (r["type_extraction.tp"], r["type_extraction.fp"], r["type_extraction.fn"]) == (2, 2, 2)
    # attributes: 4 right, te3's Size 20 ct not in gold, 40 ct / Zesto / Decaf missed
    for prefix in ("attribute_extraction", "attribute_values"):
        assert (r[f"{prefix}.tp"], r[f"{prefix}.fp"], r[f"{prefix}.fn"]) == (4, 1, 3)
        assert r[f"{prefix}.precision"] == 0.8 and r[f"{prefix}.recall"] == round(4 / 7, 4)
        assert r[f"{prefix}.f1"] == round(2 * 0.8 * (4 / 7) / (0.8 + 4 / 7), 4)


def test_cli_baseline_and_against(dict_setup, capsys):
    train, test, gold = dict_setup
    base, other = test.parent / "base", test.parent / "ours"
    assert main(["baseline", "dictionary", "--catalogue", str(test), "--out", str(base)]) == 2
    assert main(["baseline", "dictionary", "--catalogue", str(test), "--out", str(base),
                 "--train", str(train)]) == 0
    # a second "run": every product typed right, no attributes
    _write(other / "graph" / "triples.parquet", [
        {"subject": p, "relation": "has_type", "object": t, "confidence": 1.0, "status": "kept"}
        for p, t in (("te1", "Tea"), ("te2", "Mug"), ("te3", "Mug"), ("te4", "Gift Card"))], TRIPLES)
    _write(other / "graph" / "taxonomy.parquet", [], GRAPH_TAXONOMY)
    capsys.readouterr()
    assert main(["eval", "--run", str(other), "--gold", str(gold), "--against", str(base)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["metric", "ours", "base"]
    row = {ln.split()[0]: ln.split()[1:] for ln in lines[2:] if ln.strip() and not ln.startswith("written")}
    assert row["type_extraction.f1"] == ["1.0000", "0.5000"]
    assert row["attribute_extraction.tp"] == ["0", "4"]
    assert (other / "eval.json").exists() and (base / "eval.json").exists()


def test_format_comparison_missing_keys():
    table = format_comparison({"a": {"x.f1": 0.5, "n": 3}, "b": {"x.f1": 1.0}})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "a", "b"]
    assert lines[2].split() == ["n", "3", "-"] and lines[3].split() == ["x.f1", "0.5000", "1.0000"]


def test_centroid_places_type_and_product(tmp_path: Path):
    cat, gold = tmp_path / "cat", tmp_path / "cat" / "gold"
    edges = [("latte", "coffee"), ("cappuccino", "coffee"), ("boots", "footwear"),
             ("sandals", "footwear"), ("coffee", None), ("footwear", None), ("espresso", None)]
    _write(cat / "taxonomy.parquet", [{"type": t, "parent": p} for t, p in edges], TAXONOMY)
    products = [("p1", "Vanilla latte 12 fl oz bottle", "latte"), ("p2", "Caramel iced latte drink", "latte"),
                ("p3", "Instant cappuccino mix sachets", "cappuccino"),
                ("p4", "Men's leather hiking boots", "boots"),
                ("p5", "Women's waterproof snow boots", "boots"),
                ("p6", "Beach flip flop sandals", "sandals"),
                ("u1", "Hazelnut latte coffee drink 12 oz", None),
                ("u2", "Kids rubber rain boots size 4", None)]
    _write(cat / "products.parquet",
           [{"product_id": p, "title": t, "product_type": ty} for p, t, ty in products], PRODUCTS)
    _write(gold / "hypernyms.parquet", [
        {"child": "espresso", "child_kind": "type", "parent": "coffee", "depth": 1},
        {"child": "u1", "child_kind": "product", "parent": "latte", "depth": 1},
        {"child": "u1", "child_kind": "product", "parent": "coffee", "depth": 2},
        {"child": "u2", "child_kind": "product", "parent": "boots", "depth": 1},
        {"child": "u2", "child_kind": "product", "parent": "footwear", "depth": 2},
    ], GOLD_HYPERNYMS)
    run = tmp_path / "run_centroid"
    summary = run_centroid(cat, run, device="cpu")
    assert summary["types_placed"] == 1 and summary["products_typed"] == 2

    hyp = pl.read_parquet(run / "taxonomy" / "hypernym_candidates.parquet")
    assert hyp.schema == {"type": pl.String, "parent": pl.String, "rank": pl.Int32, "score": pl.Float32}
    assert hyp.sort("rank").rows()[0][:3] == ("espresso", "coffee", 1)
    assert hyp.height == 2  # two candidate parents
    ptc = pl.read_parquet(run / "taxonomy" / "product_type_candidates.parquet")
    best = dict(ptc.filter(pl.col("rank") == 1).select("product_id", "type").rows())
    assert best == {"u1": "latte", "u2": "boots"}
    tax = pl.read_parquet(run / "graph" / "taxonomy.parquet")
    assert tax.filter(pl.col("type") == "espresso").select("parent").to_series().to_list() == ["coffee"]

    r = evaluate(run, gold)
    assert r["hypernym.type.acc@1"] == 1.0
    assert r["hypernym.product.depth1.acc@1"] == 1.0
    assert r["hypernym.product.depth2.acc@1"] == 1.0
