"""The importers (`autoknow import`): small synthetic files in every source format, then one check
per source on the real sets in shared/data (skipped when they are not there)."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from autoknow_ray.catalogue.importers import (
    SOURCES,
    import_source,
    locate,
    locate_type,
    parse_record,
)
from autoknow_ray.schema import CATALOGUE_TABLES, GOLD_TABLES

DATA = Path(os.environ.get("AUTOKNOW_SHARED_DATA",
                           Path(__file__).resolve().parents[2] / "shared" / "data"))


def real(*parts: str) -> Path:
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not present: {p}")
    return p


def read(out: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(out / f"{name}.parquet")


def check_schemas(out: Path) -> None:
    """Every written table has exactly its schema; product ids are unique."""
    for name, schema in CATALOGUE_TABLES.items():
        f = out / f"{name}.parquet"
        if f.exists():
            assert pq.read_schema(f).remove_metadata() == schema, name
    for name, schema in GOLD_TABLES.items():
        f = out / "gold" / f"{name}.parquet"
        if f.exists():
            assert pq.read_schema(f).remove_metadata() == schema, f"gold/{name}"
    ids = read(out, "products")["product_id"]
    assert ids.null_count() == 0 and ids.n_unique() == len(ids)
    manifest = json.loads((out / "gold" / "manifest.json").read_text())
    assert manifest["counts"]["products"] == len(ids)


def skipped(out: Path) -> list[dict]:
    f = out / "import_skipped.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


# ---- helpers ---------------------------------------------------------------------------------
def test_locate_and_locate_type():
    assert locate("Crocs Women's Jayna Ballet Flat", "ballet flat") == (20, 31)
    assert locate("Teapot with tea", "tea") == (12, 15)  # whole word preferred
    assert locate("abc", "xyz") == (-1, -1)
    t = "Nature Made Vitamins C 500 mg"
    s, e = locate_type(t, "Vitamin")
    assert t[s:e] == "Vitamins"
    s, e = locate_type("Disposable safety-masks 50 pcs", "Safety Mask")
    assert (s, e) == (11, 23)
    assert locate_type("Running shoe, red", "Shoes") == (8, 12)
    assert locate_type("Green tea", "Coffee") == (None, None)


def test_parse_record():
    r = parse_record("COL title VAL sony tv 40 COL brand VAL sony COL price VAL  ")
    assert r == [("title", "sony tv 40"), ("brand", "sony"), ("price", "")]
    assert parse_record("title sony") is None


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown source"):
        import_source("nope", tmp_path, tmp_path / "o")
    with pytest.raises(ValueError, match="not found"):
        import_source("oa-mine", tmp_path / "missing", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no JSON Lines file"):
        import_source("oa-mine", tmp_path / "empty", tmp_path / "o")
    with pytest.raises(ValueError, match="products.csv"):
        import_source("instacart", tmp_path / "empty", tmp_path / "o")
    with pytest.raises(ValueError, match="holdout"):
        import_source("oa-mine", tmp_path / "empty", tmp_path / "o", holdout=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{broken\n")
    with pytest.raises(ValueError, match="no valid records"):
        import_source("oa-mine", bad, tmp_path / "o")
    assert set(SOURCES) == {"instacart", "oa-mine", "ae-110k", "wdc-pave", "off-taxonomy",
                            "google-taxonomy", "entity-matching"}


# ---- instacart -------------------------------------------------------------------------------
def write_instacart(d: Path) -> Path:
    d.mkdir()
    (d / "aisles.csv").write_text("1,vitamins\n2,tea\n3,other\n100,missing\n222,abc\n")
    (d / "departments.csv").write_text("1,personal care\n2,beverages\n3,other\n21,missing\n")
    (d / "products.csv").write_text(
        "1,Vitamin C Tablets,1,1\n"
        "2,Green Tea Bags,2,2\n"
        '3,"""\\""""Constant Comment\\"""" Black Tea""",2,2\n'
        "4,Mystery Item,100,21\n"
        "5,Odd Thing,3,3\n"
        "6,broken line,2\n"  # malformed: 3 fields
        "7,Herbal Teas,2,2\n"
        "8,Multi Vitamins,1,1\n"
    )
    header = ",order_id,user_id,order_number,order_dow,order_hour_of_day,days_since_prior_order," \
             "product_id,add_to_cart_order,reordered\n"
    rows = [  # order, user, number, product, cart
        (10, 1, 1, 1, 1), (10, 1, 1, 2, 2), (10, 1, 1, 3, 3),
        (11, 1, 2, 2, 1), (11, 1, 2, 4, 2),
        (20, 2, 1, 1, 1), (20, 2, 1, 4, 2),
    ]
    lines = [f"{i},{o},{u},{n},1,9,,{p},{c}.0,0.0" for i, (o, u, n, p, c) in enumerate(rows)]
    lines.insert(3, "99,10,1")  # malformed: too few fields (file line 5)
    lines.insert(5, "98,10,1,1,1,9,,xx,4.0,0.0")  # product id not a number (file line 7)
    with gzip.open(d / "order_lines.csv.gz", "wt") as f:
        f.write(header + "\n".join(lines) + "\n")
    return d


def test_instacart_synthetic(tmp_path):
    src = write_instacart(tmp_path / "ic")
    out = tmp_path / "out"
    s = import_source("instacart", src, out, holdout=0.0)
    check_schemas(out)
    p = read(out, "products").sort("product_id")
    assert p.height == 7 and s["counts"]["products"] == 7
    titles = dict(zip(p["product_id"], p["title"]))
    assert titles["ic-3"] == '"Constant Comment" Black Tea'
    types = dict(zip(p["product_id"], p["product_type"]))
    assert types["ic-1"] == "vitamins" and types["ic-4"] is None  # the "missing" aisle
    assert types["ic-5"] == "other > other"  # aisle named like its department
    tax = {(t, q) for t, q in read(out, "taxonomy").iter_rows()}
    assert tax == {("vitamins", "personal care"), ("tea", "beverages"), ("other > other", "other"),
                   ("personal care", None), ("beverages", None), ("other", None)}
    assert not (out / "behavior.parquet").exists()

    cop = {(a, b): c for a, b, c in read(out, "copurchase").iter_rows()}
    assert cop == {("ic-1", "ic-2"): 1, ("ic-1", "ic-3"): 1, ("ic-2", "ic-3"): 1}
    gold = {(a, b): c for a, b, c in read(out / "gold", "copurchase").iter_rows()}
    assert gold == {("ic-1", "ic-2"): 1, ("ic-1", "ic-4"): 2, ("ic-2", "ic-4"): 2,
                    ("ic-3", "ic-2"): 1, ("ic-3", "ic-4"): 1}

    gt = read(out / "gold", "types")
    assert set(gt["product_id"]) == {"ic-1", "ic-2", "ic-3", "ic-5", "ic-7", "ic-8"}
    row = gt.filter(pl.col("product_id") == "ic-7").row(0, named=True)
    assert "Herbal Teas"[row["start"]:row["end"]] == "Teas"
    assert read(out / "gold", "hypernyms").height == 0  # holdout 0

    sk = skipped(out)
    assert s["skipped_lines"] == len(sk) == 3
    by_file = {(Path(x["file"]).name, x["line"]) for x in sk}
    assert by_file == {("products.csv", 6), ("order_lines.csv.gz", 5), ("order_lines.csv.gz", 7)}


def test_instacart_holdout_and_blind(tmp_path):
    src = write_instacart(tmp_path / "ic")
    out = tmp_path / "out"
    import_source("instacart", src, out, holdout=0.5, seed=3)
    p = read(out, "products")
    typed = {"ic-1", "ic-2", "ic-3", "ic-5", "ic-7", "ic-8"}
    hidden = set(p.filter(pl.col("product_type").is_null())["product_id"]) & typed
    assert len(hidden) == 3
    h = read(out / "gold", "hypernyms")
    assert set(h["child"]) == hidden and h.height == 6
    assert set(h.filter(pl.col("depth") == 2)["parent"]) <= {"personal care", "beverages", "other"}
    first = (out / "products.parquet").read_bytes()
    import_source("instacart", src, out, holdout=0.5, seed=3)
    assert (out / "products.parquet").read_bytes() == first  # deterministic

    import_source("instacart", src, out, blind=True)
    assert read(out, "products")["product_type"].null_count() == 7
    assert read(out / "gold", "types").height == 6


# ---- OA-Mine / AE-110K -----------------------------------------------------------------------
def test_oa_mine_synthetic(tmp_path):
    f = tmp_path / "test.jsonl"
    recs = [
        {"input": "Nature Made Vitamins C 500 mg", "category": "Vitamin",
         "target_scores": {"Brand": {"Nature Made": 1}, "Dosage": {"500 mg": 1, "n/a": 1},
                           "Flavor": {"n/a": 1}, "Zero": {"x": 0}}},
        {"input": "Folgers Classic Roast", "category": "Coffee",
         "target_scores": {"Brand": {"Folgers": 1}, "Roast": {"classic roast": 1, "dark": 1}}},
    ]
    f.write_text(json.dumps(recs[0]) + "\n{not json\n\n" + json.dumps({"category": "Tea"}) + "\n"
                 + json.dumps(recs[1]) + "\n")
    out = tmp_path / "out"
    s = import_source("oa-mine", f, out)
    check_schemas(out)
    p = read(out, "products")
    assert p["product_id"].to_list() == ["oa-test-000001", "oa-test-000005"]
    first = p.row(0, named=True)
    assert first["product_type"] == "Vitamin" and first["brand"] == "Nature Made"
    assert first["attributes"] == [{"name": "Brand", "value": "Nature Made"},
                                   {"name": "Dosage", "value": "500 mg"}]
    assert read(out, "taxonomy").to_dicts() == [{"type": "Coffee", "parent": None},
                                                {"type": "Vitamin", "parent": None}]
    sp = read(out / "gold", "spans")
    roast = sp.filter(pl.col("value") == "classic roast").row(0, named=True)
    assert (roast["start"], roast["end"]) == (8, 21)
    assert sp.filter(pl.col("value") == "dark")["start"].to_list() == [-1]
    t = read(out / "gold", "types").row(0, named=True)
    assert "Nature Made Vitamins C 500 mg"[t["start"]:t["end"]] == "Vitamins"
    assert s["skipped_lines"] == 2
    assert [x["line"] for x in skipped(out)] == [2, 4]

    import_source("ae-110k", f, out, blind=True)
    p = read(out, "products")
    assert p["product_id"][0].startswith("ae-test-")
    assert p["product_type"].null_count() == 2 and p["attributes"].list.len().sum() == 0
    assert p["brand"].null_count() == 2
    assert read(out / "gold", "spans").height == 5


# ---- --branches: the categories placed under a nested-set taxonomy ------------------------
NESTED = """# a small Google-style taxonomy
 1 | [ 1-14] | Health & Beauty
   2 | [ 2-13] | Personal Care
     3 | [ 3- 8] | Hair Care
       4 | [ 4- 5] | Shampoo & Conditioner
       5 | [ 6- 7] | Hair Dryers
     6 | [ 9-12] | Oral Care
       7 | [10-11] | Toothbrushes
 8 | [15-20] | Food, Beverages & Tobacco
   9 | [16-19] | Beverages
     10 | [17-18] | Coffee
"""


def write_branch_files(tmp_path: Path) -> tuple[Path, Path]:
    nested = tmp_path / "nested.txt"
    nested.write_text(NESTED)
    titles = [("Pantene Pro-V Conditioner 12 oz", "Conditioner"),  # a part of a node's name
              ("Oral-B Pro Toothbrush Soft", "Toothbrush"),         # a node's name (plural)
              ("Folgers Classic Roast Coffee", "Coffee"),           # a node's name
              ("Aqua Net Extra Hold Hair Spray", "Hair Spray"),     # token overlap: under Hair Care
              ("Crocs Classic Clog", "Shoes"),                      # no match: stays a root
              ("Dove Conditioner Daily Moisture", "Conditioner")]
    f = tmp_path / "oa.jsonl"
    f.write_text("".join(json.dumps({"input": t, "category": c,
                                     "target_scores": {"Brand": {t.split()[0]: 1}}}) + "\n"
                         for t, c in titles))
    return nested, f


def test_branches_place_categories(tmp_path):
    nested, f = write_branch_files(tmp_path)
    out = tmp_path / "out"
    s = import_source("oa-mine", f, out, branches=nested)
    check_schemas(out)
    rows = sorted((r["type"], r["parent"]) for r in read(out, "taxonomy").to_dicts())
    assert rows == sorted([
        ("Conditioner", "Hair Care"),            # takes the place of "Shampoo & Conditioner"
        ("Toothbrush", "Oral Care"),             # is "Toothbrushes"
        ("Coffee", "Beverages"),                 # is "Coffee"
        ("Hair Spray", "Hair Care"),             # under the node with "hair" (the shallowest)
        ("Shoes", None),
        ("Hair Care", "Personal Care"), ("Oral Care", "Personal Care"),
        ("Personal Care", "Health & Beauty"), ("Health & Beauty", None),
        ("Beverages", "Food, Beverages & Tobacco"), ("Food, Beverages & Tobacco", None),
    ])
    n = s["notes"]
    assert n["unplaced_categories"] == ["Shoes"]
    assert n["placements"]["Conditioner"]["path"] == \
        "Health & Beauty > Personal Care > Hair Care > Conditioner"
    assert n["placements"]["Conditioner"]["match"] == "part"
    assert n["placements"]["Toothbrush"]["match"] == "name"
    assert n["placements"]["Hair Spray"]["match"] == "overlap"
    assert s["branches"] == str(nested.resolve()) and str(nested.resolve()) in s["files"]
    # deterministic
    before = (out / "taxonomy.parquet").read_bytes()
    import_source("oa-mine", f, out, branches=nested)
    assert (out / "taxonomy.parquet").read_bytes() == before
    # without the option: the flat taxonomy, as before
    import_source("oa-mine", f, out)
    assert read(out, "taxonomy")["parent"].null_count() == read(out, "taxonomy").height


def test_branches_errors(tmp_path):
    nested, f = write_branch_files(tmp_path)
    with pytest.raises(ValueError, match="--branches .*no such file"):
        import_source("oa-mine", f, tmp_path / "o", branches=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="--branches is for the tagging sets"):
        import_source("google-taxonomy", nested, tmp_path / "o", branches=nested)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="--branches: no `id"):
        import_source("oa-mine", f, tmp_path / "o", branches=empty)
    from autoknow_ray.cli import main
    with pytest.raises(SystemExit):  # the option without its file
        main(["import", "oa-mine", str(f), "--out", str(tmp_path / "o"), "--branches"])


def test_branches_type_split_gold_parents(tmp_path):
    from autoknow_ray.catalogue.type_split import type_key, type_split

    nested, f = write_branch_files(tmp_path)
    cat = tmp_path / "cat"
    import_source("oa-mine", f, cat, branches=nested, holdout=0)
    parent = {r["type"]: r["parent"] for r in read(cat, "taxonomy").to_dicts()}
    s = type_split(cat, tmp_path / "split", types=0.4, products=0.0, seed=0, untyped=True)
    held = s["heldout_types"]
    assert held
    gold = read(tmp_path / "split" / "heldout" / "gold", "hypernyms")
    got = {(r["child"], r["parent"]) for r in gold.filter(pl.col("child_kind") == "type").to_dicts()}
    want = {(t, p) for t, p in parent.items() if p is not None and type_key(t) in held}
    assert got == want and got  # each held-out type's parent in the deep taxonomy
    tax = read(tmp_path / "split" / "heldout", "taxonomy")
    assert not set(tax["type"]) & {t for t, _ in got}



def test_instacart_type_split_untyped_keeps_gold_hypernyms(tmp_path):
    """Instacart's gold hypernyms hold product rows, in their own column order; the untyped
    split adds the held-out types' parents to them (it failed on the column order before)."""
    from autoknow_ray.catalogue.type_split import type_split

    cat = tmp_path / "cat"
    import_source("instacart", write_instacart(tmp_path / "ic"), cat, holdout=0.0)
    s = type_split(cat, tmp_path / "split", types=0.5, products=0.0, seed=0, untyped=True)
    assert s["heldout_types"]
    gold = read(tmp_path / "split" / "heldout" / "gold", "hypernyms")
    assert "type" in set(gold["child_kind"].to_list())
    types = gold.filter(pl.col("child_kind") == "type")
    assert types.height and types["parent"].null_count() == 0

# ---- WDC-PAVE --------------------------------------------------------------------------------
def wdc_rec(oid, pt, extra, norm=False):
    ts = {"Product Type": pt, "Brand": {"Acme": {"pid": [0], "score": 1}}, "Pack Quantity":
          {"n/a": 1}}
    ts.update(extra)
    return {"id": oid, "cluster_id": 1.0, "category": "Office Products",
            "input_title": "Acme Shipping Tags 12/Box", "url": "x",
            "input_description": "Strong tags. Width: 1 inch. Color manila.", "target_scores": ts}


def write_wdc(d: Path) -> Path:
    d.mkdir()
    raw = [
        wdc_rec(1, {"tags": {"pid": [1], "score": 1}, "Shipping Tags": {"pid": [0], "score": 1}},
                {"Width": {"1 inch": {"pid": [1], "score": 1}},
                 "Color(s)": {"manila": {"pid": [1], "score": 1}}}),
        wdc_rec(2, {"Tags": {"pid": [1], "score": 1}}, {"Width": {"n/a": 1}}),
    ]
    norm = [
        wdc_rec(1, {"Shipping Supplies": {"pid": [0, 1], "score": 1}},
                {"Width": {"2.5": {"pid": [1], "score": 1}},
                 "Color(s)": {"Beige": {"pid": [1], "score": 1}}}),
        wdc_rec(2, {"Shipping Supplies": {"pid": [1], "score": 1}}, {"Width": {"n/a": 1}}),
    ]
    (d / "all_attrs_test_large.jsonl").write_text(
        "\n".join(json.dumps(r) for r in raw) + "\n[1, 2]\n")
    (d / "all_attrs_normalized_test_large.jsonl").write_text(
        "\n".join(json.dumps(r) for r in norm) + "\n")
    return d


def test_wdc_synthetic(tmp_path):
    src = write_wdc(tmp_path / "wdc")
    out = tmp_path / "out"
    s = import_source("wdc-pave", src, out)
    check_schemas(out)
    assert s["skipped_lines"] == 1
    p = read(out, "products").sort("product_id")
    r1 = p.row(0, named=True)
    assert r1["product_id"] == "wdc-1" and r1["product_type"] == "Shipping Tags"  # pid 0 wins
    assert r1["brand"] == "Acme" and r1["description"].startswith("Strong")
    assert {a["name"] for a in r1["attributes"]} == {"Brand", "Width", "Color(s)"}
    assert p.row(1, named=True)["product_type"] == "Tags"
    tax = {(t, q) for t, q in read(out, "taxonomy").iter_rows()}
    assert tax == {("Shipping Tags", "Office Products"), ("Tags", "Office Products"),
                   ("Office Products", None)}
    sp = read(out / "gold", "spans")
    w = sp.filter(pl.col("attribute") == "Width").row(0, named=True)
    desc = r1["description"]
    assert w["field"] == "description" and desc[w["start"]:w["end"]] == "1 inch"
    assert sp.filter(pl.col("attribute") == "Product Type").height == 3
    syn = {(a, t, c) for _, a, t, c in read(out / "gold", "synonyms").iter_rows()}
    # Product Type normalizations are classes, not synonyms: left out
    assert syn == {("Width", "1 inch", "2.5"), ("Color(s)", "manila", "Beige")}
    t = read(out / "gold", "types").sort("product_id").row(0, named=True)
    assert "Acme Shipping Tags 12/Box"[t["start"]:t["end"]] == "Shipping Tags"

    # the offers file alone finds its companion; blind keeps labels out
    import_source("wdc-pave", src / "all_attrs_test_large.jsonl", out, blind=True)
    p = read(out, "products")
    assert p["product_type"].null_count() == 2 and p["brand"].null_count() == 2
    assert p["attributes"].list.len().sum() == 0
    assert read(out / "gold", "synonyms").height == 2


# ---- taxonomies ------------------------------------------------------------------------------
def test_off_synthetic(tmp_path):
    nodes = {
        "en:foods": {"name": {"en": "Foods"}, "synonyms": {"en": ["Foods", "foods", "Food"]}},
        "en:drinks": {"name": {"en": "Drinks", "fr": "Boissons"}, "parents": [],
                      "synonyms": {"en": ["Beverages"]}},
        "en:juices": {"name": {"en": "Juices"}, "parents": ["en:drinks", "en:foods"]},
        "en:apple-juices": {"name": {"en": "Apple juices"}, "parents": ["en:juices"]},
        "fr:jus-de-pomme": {"name": {"fr": "Jus de pomme"}, "parents": ["en:juices"]},
        "en:teas": {"name": {"en": "Teas"}, "parents": ["en:drinks"]},
        "de:teas": {"name": {"en": "Teas"}, "parents": ["en:drinks"]},
    }
    f = tmp_path / "categories.full.json.gz"
    with gzip.open(f, "wt") as g:
        json.dump(nodes, g)
    out = tmp_path / "out"
    s = import_source("off-taxonomy", tmp_path, out, holdout=0.0)
    check_schemas(out)
    assert read(out, "products").height == 0
    tax = read(out, "taxonomy")
    names = set(tax["type"])
    assert names == {"Foods", "Drinks", "Juices", "Apple juices", "jus-de-pomme",
                     "Teas [de:teas]", "Teas [en:teas]"}
    assert set(tax.filter(pl.col("type") == "Juices")["parent"]) == {"Drinks", "Foods"}
    syn = {(t, c) for _, _, t, c in read(out / "gold", "synonyms").iter_rows()}
    assert syn == {("Food", "Foods"), ("Beverages", "Drinks")}
    assert s["counts"]["gold/hypernyms"] == 0

    import_source("off-taxonomy", f, out, holdout=1.0)
    tax = read(out, "taxonomy")
    leaves = {"Apple juices", "jus-de-pomme", "Teas [de:teas]", "Teas [en:teas]"}
    assert set(tax.filter(pl.col("type").is_in(list(leaves)))["parent"].to_list()) == {None}
    h = read(out / "gold", "hypernyms")
    assert set(h["child"]) == leaves and set(h["child_kind"]) == {"type"}
    assert set(h["depth"]) == {1} and h.height == 4


def test_google_synthetic(tmp_path):
    f = tmp_path / "taxonomy_nested_set.en-US.txt"
    f.write_text(
        "# Google Product Taxonomy with Nested Set Model\n\n"
        "   1 | [   1-  10] | Apparel\n"
        "     2 | [   2-   5] | Shoes\n"
        "       3 | [   3-   4] | Accessories\n"
        "     4 | [   6-   9] | Bags\n"
        "       5 | [   7-   8] | Accessories\n"
        "this line is broken\n"
        "   6 | [  11-  12] | Toys\n"
    )
    out = tmp_path / "out"
    s = import_source("google-taxonomy", tmp_path, out, holdout=0.0)
    check_schemas(out)
    assert s["skipped_lines"] == 1 and skipped(out)[0]["line"] == 8
    tax = {(t, q) for t, q in read(out, "taxonomy").iter_rows()}
    assert tax == {("Apparel", None), ("Shoes", "Apparel"), ("Bags", "Apparel"), ("Toys", None),
                   ("Shoes > Accessories", "Shoes"), ("Bags > Accessories", "Bags")}
    import_source("google-taxonomy", f, out, holdout=0.5, seed=1)
    h = read(out / "gold", "hypernyms")
    assert h.height == 1 and h["child"][0] in {"Shoes > Accessories", "Bags > Accessories"}
    t = read(out, "taxonomy")
    assert t.filter(pl.col("type") == h["child"][0])["parent"].to_list() == [None]


# ---- entity matching -------------------------------------------------------------------------
def test_entity_matching_synthetic(tmp_path):
    d = tmp_path / "Bench"
    d.mkdir()
    left = "COL title VAL sony tv 40 COL manufacturer VAL sony COL price VAL 99.0 "
    right = "COL title VAL sony bravia 40in COL manufacturer VAL  COL price VAL "
    other = "COL name VAL  COL description VAL canon camera kit"
    (d / "test.txt").write_text(
        f"{left}\t{right}\t1\n"
        f"{left}\t{other}\t0\n"
        f"{left}\tno columns here\t0\n"       # malformed record
        f"{left}\t{right}\n"                  # wrong field count
        f"{left}\t{right}\tmaybe\n"           # bad label
        f"{left}\t{right}\t1\n"               # exact duplicate
    )
    out = tmp_path / "out"
    s = import_source("entity-matching", tmp_path, out)
    check_schemas(out)
    assert s["skipped_lines"] == 3
    p = read(out, "products")
    assert p.height == 3 and read(out, "taxonomy").height == 0
    tv = p.filter(pl.col("title") == "sony tv 40").row(0, named=True)
    assert tv["brand"] == "sony" and tv["attributes"] == [{"name": "price", "value": "99.0"}]
    cam = p.filter(pl.col("description") == "canon camera kit").row(0, named=True)
    assert cam["title"] == "canon camera kit"  # no title/name: the first non-empty value
    m = read(out / "gold", "matches")
    assert m["label"].to_list() == [1, 0]
    assert m["left_id"][0] == tv["product_id"]
    # the same record gets the same id in another file
    (d / "valid.txt").write_text(f"{right}\t{left}\t1\n")
    import_source("entity-matching", d / "valid.txt", out)
    assert read(out / "gold", "matches")["right_id"][0] == tv["product_id"]


# ---- the real sets ---------------------------------------------------------------------------
def test_real_oa_mine(tmp_path):
    s = import_source("oa-mine", real("oa-mine"), tmp_path, blind=True)
    check_schemas(tmp_path)
    assert s["counts"]["products"] == 1452 and s["counts"]["taxonomy"] == 10
    assert s["counts"]["gold/types"] == 1452 and s["skipped_lines"] == 0
    sp = read(tmp_path / "gold", "spans")
    assert (sp["start"] >= 0).mean() > 0.95
    assert read(tmp_path, "products")["product_type"].null_count() == 1452


def test_real_wdc_pave(tmp_path):
    s = import_source("wdc-pave", real("wdc-pave"), tmp_path)
    check_schemas(tmp_path)
    assert s["counts"]["products"] == 1066 and s["skipped_lines"] == 0
    assert s["counts"]["gold/synonyms"] > 500
    tax = read(tmp_path, "taxonomy")
    assert tax.filter(pl.col("parent").is_null()).height == 5  # the 5 categories
    sp = read(tmp_path / "gold", "spans")
    assert set(sp["field"]) == {"title", "description"}


def test_real_off_taxonomy(tmp_path):
    s = import_source("off-taxonomy", real("off-taxonomy"), tmp_path)
    check_schemas(tmp_path)
    tax = read(tmp_path, "taxonomy")
    assert tax["type"].n_unique() == 12538 and s["counts"]["products"] == 0
    assert 0.09 < s["notes"]["hidden_leaves"] / s["notes"]["leaf_candidates"] < 0.11
    h = read(tmp_path / "gold", "hypernyms")
    assert h.height >= s["notes"]["hidden_leaves"]
    assert set(h["parent"]) <= set(tax["type"])
    assert s["counts"]["gold/synonyms"] > 1000


def test_real_google_taxonomy(tmp_path):
    s = import_source("google-taxonomy", real("google-taxonomy"), tmp_path)
    check_schemas(tmp_path)
    tax = read(tmp_path, "taxonomy")
    assert tax.height == 5595 and tax["type"].n_unique() == 5595
    assert 0 < s["counts"]["gold/hypernyms"] < 600


def test_real_entity_matching(tmp_path):
    s = import_source("entity-matching", real("entity-matching", "Abt-Buy", "valid.txt"),
                      tmp_path)
    check_schemas(tmp_path)
    m = read(tmp_path / "gold", "matches")
    assert m.height > 1900 and 0 < m["label"].sum() < m.height
    ids = set(read(tmp_path, "products")["product_id"])
    assert set(m["left_id"]) | set(m["right_id"]) <= ids


def test_real_instacart(tmp_path):
    s = import_source("instacart", real("instacart"), tmp_path)
    check_schemas(tmp_path)
    p = read(tmp_path, "products")
    assert p.height == 49688
    tax = read(tmp_path, "taxonomy")
    roots = tax.filter(pl.col("parent").is_null())
    assert roots.height == 20 and "missing" not in set(tax["type"])
    assert 130 <= tax.height - roots.height <= 134
    assert set(tax["parent"].drop_nulls()) <= set(roots["type"])
    assert s["counts"]["copurchase"] > 100_000 and s["counts"]["gold/copurchase"] > 10_000
    typed = read(tmp_path / "gold", "types").height
    hidden = s["notes"]["hidden_types"]
    assert hidden == round(0.1 * typed)
    h = read(tmp_path / "gold", "hypernyms")
    assert h.height == 2 * hidden and h["child"].n_unique() == hidden
    assert p["product_type"].null_count() == hidden + (p.height - typed)
