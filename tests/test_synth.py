"""The synthetic catalogue generator: schemas, sharding, determinism, gold consistency, shape."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from autoknow_ray.catalogue.synth import World, generate_block, n_types_for, synthesize
from autoknow_ray.schema import (
    BEHAVIOR,
    COPURCHASE,
    GOLD_COPURCHASE,
    GOLD_HYPERNYMS,
    GOLD_SPANS,
    GOLD_SYNONYMS,
    GOLD_TYPES,
    GOLD_WRONG_VALUES,
    PRODUCTS,
    TAXONOMY,
    TEXTS,
)

N = 2500
SHARD = 1000
SHARDED = {
    "products": PRODUCTS,
    "texts": TEXTS,
    "behavior": BEHAVIOR,
    "copurchase": COPURCHASE,
    "gold/types": GOLD_TYPES,
    "gold/spans": GOLD_SPANS,
    "gold/wrong_values": GOLD_WRONG_VALUES,
    "gold/copurchase": GOLD_COPURCHASE,
}
SINGLE = {
    "taxonomy.parquet": TAXONOMY,
    "gold/hypernyms.parquet": GOLD_HYPERNYMS,
    "gold/synonyms.parquet": GOLD_SYNONYMS,
}


@pytest.fixture(scope="module")
def cat(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "cat"
    summary = synthesize(N, out, seed=7, shard_rows=SHARD)
    return out, summary


def _read(out: Path, name: str):
    p = out / name
    if p.is_dir():
        return pq.ParquetDataset(sorted(str(f) for f in p.glob("part-*.parquet"))).read()
    return pq.read_table(p)


def test_layout_and_schemas(cat):
    out, summary = cat
    for name, schema in SHARDED.items():
        files = sorted((out / name).glob("part-*.parquet"))
        assert [f.name for f in files] == [f"part-{i:05d}.parquet" for i in range(3)], name
        for f in files:
            assert pq.read_schema(f).remove_metadata().equals(schema), (name, f)
    for name, schema in SINGLE.items():
        assert pq.read_schema(out / name).remove_metadata().equals(schema), name
    rows = [pq.ParquetFile(f).metadata.num_rows for f in sorted((out / "products").glob("*.parquet"))]
    assert rows == [1000, 1000, 500]
    manifest = json.loads((out / "gold" / "manifest.json").read_text())
    assert manifest["generator"] and manifest["seed"] == 7 and manifest["n_products"] == N
    assert manifest["counts"]["products"] == N == summary["counts"]["products"]
    for name in SHARDED:
        assert manifest["counts"][name] == _read(out, name).num_rows, name


def test_ids_unique_and_stable(cat):
    out, _ = cat
    ids = _read(out, "products").column("product_id").to_pylist()
    assert len(set(ids)) == N
    assert ids[:2] == ["p0000000000", "p0000000001"] and ids[-1] == f"p{N - 1:010d}"
    for name in ("texts", "behavior", "gold/types", "gold/spans", "gold/wrong_values"):
        assert set(_read(out, name).column("product_id").to_pylist()) <= set(ids), name
    co = _read(out, "copurchase")
    assert set(co.column("src").to_pylist()) | set(co.column("dst").to_pylist()) <= set(ids)


def test_deterministic_bytes(cat, tmp_path):
    out, _ = cat
    again = tmp_path / "again"
    synthesize(N, again, seed=7, shard_rows=SHARD)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    other = tmp_path / "other"
    synthesize(300, other, seed=8, shard_rows=SHARD)
    a = _read(out, "products").slice(0, 300).column("title").to_pylist()
    assert a != _read(other, "products").column("title").to_pylist()


def test_block_does_not_depend_on_n_or_shards(tmp_path):
    # memory stays flat: a block depends on the world (taxonomy size), not on N or shard_rows
    w = World(seed=1, n_types=40)
    a = generate_block(w, 0, n_total=1_000, n=300)
    b = generate_block(w, 0, n_total=10_000_000, n=500)
    for name in ("products", "gold/types", "gold/spans", "gold/wrong_values", "texts", "behavior"):
        tab, owner = b[name]
        assert a[name][0].equals(tab.slice(0, int(np.searchsorted(owner, 300)))), name
    synthesize(700, tmp_path / "x", seed=1, shard_rows=250, n_types=40)
    synthesize(1500, tmp_path / "y", seed=1, shard_rows=1000, n_types=40)
    x = _read(tmp_path / "x", "products")
    y = _read(tmp_path / "y", "products").slice(0, 700)
    assert x.equals(y)
    assert n_types_for(10_000) < n_types_for(1_000_000) < n_types_for(100_000_000) <= 400


def test_spans_slice_values(cat):
    out, _ = cat
    prods = _read(out, "products").to_pydict()
    title = dict(zip(prods["product_id"], prods["title"]))
    desc = dict(zip(prods["product_id"], prods["description"]))
    spans = _read(out, "gold/spans").to_pylist()
    located = 0
    for s in spans:
        if s["field"] is None:
            assert s["start"] == s["end"] == -1
            continue
        text = title[s["product_id"]] if s["field"] == "title" else desc[s["product_id"]]
        assert text[s["start"]: s["end"]].lower() == s["value"].lower(), s
        located += 1
    assert located > 2 * N  # several values per product sit in the text
    fields = Counter(s["field"] for s in spans)
    assert fields["title"] > 0 and fields["description"] > 0 and fields[None] > 0
    # types: a title slice, or null when the title does not name the type
    gt = _read(out, "gold/types").to_pylist()
    assert [g["product_id"] for g in gt] == prods["product_id"]
    in_title = 0
    for g in gt:
        if g["start"] is None:
            assert g["end"] is None
        else:
            assert title[g["product_id"]][g["start"]: g["end"]].lower() == g["type"]
            in_title += 1
    assert 0.8 * N < in_title < N


def test_missing_values_to_impute(cat):
    out, _ = cat
    prods = _read(out, "products").to_pylist()
    struct = {(p["product_id"], a["name"]) for p in prods for a in p["attributes"]}
    desc_only = {(s["product_id"], s["attribute"]) for s in _read(out, "gold/spans").to_pylist()
                 if s["field"] == "description" and s["attribute"] != "Brand"}
    assert len(desc_only - struct) > 0.2 * N


def test_wrong_values_and_synonyms(cat):
    out, _ = cat
    prods = _read(out, "products").to_pylist()
    attrs = {p["product_id"]: {(a["name"], a["value"]) for a in p["attributes"]} for p in prods}
    wrong = _read(out, "gold/wrong_values").to_pylist()
    assert 0.03 * N < len(wrong) < 0.07 * N
    gold_vals = {(s["product_id"], s["attribute"], s["value"])
                 for s in _read(out, "gold/spans").to_pylist()}
    for w in wrong:
        assert (w["attribute"], w["value"]) in attrs[w["product_id"]], w
        assert w["value"] != w["correct_value"]
        assert (w["product_id"], w["attribute"], w["correct_value"]) in gold_vals
        assert (w["product_id"], w["attribute"], w["value"]) not in gold_vals
    syn = _read(out, "gold/synonyms.parquet").to_pylist()
    kinds = Counter(s["kind"] for s in syn)
    assert kinds["value"] > 20 and kinds["type"] > 0
    terms = {(s["attribute"], s["term"]) for s in syn if s["kind"] == "value"}
    used = sum((name, v) in terms for a in attrs.values() for name, v in a)
    n_values = sum(len(a) for a in attrs.values())
    assert 0.02 * n_values < used < 0.1 * n_values
    for s in syn:
        assert s["term"] != s["canonical"]


def test_taxonomy_withheld_types_and_labels(cat):
    out, summary = cat
    tax = _read(out, "taxonomy.parquet").to_pylist()
    types = {r["type"] for r in tax}
    parents: dict[str, set] = {}
    for r in tax:
        parents.setdefault(r["type"], set()).add(r["parent"])
    roots = {t for t, p in parents.items() if p == {None}}
    # 3 levels: leaf -> category -> department (a root)
    gt = _read(out, "gold/types").to_pylist()
    leaves = {g["type"] for g in gt} & types
    for leaf in leaves:
        for p in parents[leaf]:
            assert parents[p] <= roots, (leaf, p)
    assert any(len(parents[t]) > 1 for t in leaves)  # a DAG
    hyp = _read(out, "gold/hypernyms.parquet").to_pylist()
    withheld = {h["child"] for h in hyp}
    assert withheld and all(h["child_kind"] == "type" and h["depth"] == 1 for h in hyp)
    assert not withheld & types
    assert all(h["parent"] in types for h in hyp)
    prods = {p["product_id"]: p for p in _read(out, "products").to_pylist()}
    seen = 0
    for g in gt:
        p = prods[g["product_id"]]
        if g["type"] in withheld:
            seen += 1
            assert p["product_type"] is None and g["type"] in p["title"].lower()
    assert seen > 0
    labels = Counter(
        "null" if p["product_type"] is None else "ok" if p["product_type"] == g["type"] else "other"
        for g in gt for p in [prods[g["product_id"]]])
    assert 0.07 * N < labels["null"] < 0.25 * N
    assert 0.02 * N < labels["other"] < 0.12 * N  # wrong types and type synonyms


def test_types_are_zipf(cat):
    out, _ = cat
    counts = Counter(_read(out, "gold/types").column("type").to_pylist())
    freq = sorted(counts.values(), reverse=True)
    assert freq[0] >= 10 * np.median(freq)


def test_texts_behavior_copurchase(cat):
    out, _ = cat
    tx = _read(out, "texts").to_pylist()
    assert {t["kind"] for t in tx} == {"review", "question", "answer"}
    assert 0.2 * N < len({t["product_id"] for t in tx}) < 0.4 * N
    beh = _read(out, "behavior").to_pylist()
    assert {b["action"] for b in beh} == {"view", "click", "purchase"}
    assert all(b["count"] > 0 for b in beh)
    by_q = Counter(b["query"] for b in beh if b["action"] == "view")
    assert by_q.most_common(1)[0][1] > 20  # queries are shared across products
    # co-purchases: directed, typed, ~10% held out
    ptype = {g["product_id"]: g["type"] for g in _read(out, "gold/types").to_pylist()}
    co = _read(out, "copurchase").to_pylist()
    held = _read(out, "gold/copurchase").to_pylist()
    assert 0.05 < len(held) / (len(co) + len(held)) < 0.15
    pairs = Counter((ptype[c["src"]], ptype[c["dst"]]) for c in co + held)
    assert all(c["src"] != c["dst"] and c["count"] > 0 for c in co + held)
    assert len({(c["src"], c["dst"]) for c in co + held}) == len(co) + len(held)
    cross = {k: v for k, v in pairs.items() if k[0] != k[1]}
    same = sum(v for k, v in pairs.items() if k[0] == k[1])
    assert same > 0 and cross
    reverse = sum(v for (a, b), v in cross.items() if (b, a) in cross)
    assert reverse < 0.02 * sum(cross.values())  # dst follows src, not the other way round


def test_single_shard_is_a_folder(tmp_path):
    s = synthesize(50, tmp_path / "c", seed=0)
    assert [f.name for f in (tmp_path / "c" / "products").iterdir()] == ["part-00000.parquet"]
    assert s["counts"]["products"] == 50
    s = synthesize(0, tmp_path / "e", seed=0)
    assert s["counts"]["products"] == 0
    assert (tmp_path / "e" / "products" / "part-00000.parquet").exists()
