"""Module 2, relation discovery: counting steps, neighbour features, type split, eval, baseline,
and fit -> rebuild on a catalogue whose held-out types were never in fit."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from autoknow_ray.catalogue.type_split import type_split
from autoknow_ray.eval.relations import score
from autoknow_ray.modules.relations.features import (
    CountCustomerMentions, CountProviderMentions, Known, Matcher, Vocabulary, build_vocabulary,
    neighbour_features, NEIGHBOUR_FEATURES, value_template, wide_counts,
)
from autoknow_ray.modules.relations.model import best_threshold
from autoknow_ray.modules.relations.stage import ranked, with_fit_labels
from autoknow_ray.pipeline import write_table
from autoknow_ray.schema import GRAPH_ATTRIBUTES, PRODUCTS, conform

VOCAB = Vocabulary(["Flavor", "Color(s)", "Roast type"],
                   {"Flavor": ["vanilla", "black cherry"], "Color(s)": ["red", "navy blue"],
                    "Roast type": ["dark roast"]})


def products_table(rows: list[dict]) -> pa.Table:
    return conform(pa.Table.from_pylist(rows), PRODUCTS.append(pa.field("type", pa.string())))


def test_matcher_finds_names_and_values_by_whole_tokens():
    m = Matcher(VOCAB, max_value_tokens=4)
    named, valued = m.match("Black Cherry coffee, DARK roast; colors: Navy Blue")
    assert {VOCAB.attributes[i] for i in valued} == {"Flavor", "Roast type", "Color(s)"}
    assert {VOCAB.attributes[i] for i in named} == {"Color(s)"}  # "colors" names Color(s)
    assert m.match("reddish vanillas") == (set(), set())  # no partial words


def test_value_templates_find_unseen_values_of_the_same_form():
    vocab = Vocabulary(["Net content", "Count"], {"Net content": ["16 capsules", "12 oz"],
                                                  "Count": ["12", "30"]},
                       value_types={"Net content": {"16 capsules": ["Coffee"], "12 oz": ["Tea"]}})
    assert value_template(("16", "capsules")) == ("0", "capsules")
    assert value_template(("12",)) is None and value_template(("vanilla",)) is None
    m = Matcher(vocab, max_value_tokens=4)
    named, valued, templated = m.match_all("Vitamin D3, 60 Capsules")
    assert templated == {0} and valued == set()  # a new number of capsules; bare numbers never
    assert m.match_all("60 capsules", own_type="Coffee")[2] == set()  # carried by Coffee only
    assert m.match_all("8 oz cup", own_type="Coffee")[2] == {0}  # Tea carries "12 oz"
    assert m.match("60 capsules") == (set(), set())  # `match` is unchanged


def test_best_threshold_is_picked_on_f1():
    y = np.array([1, 1, 1, 0, 0, 0], np.float32)
    s = np.array([0.9, 0.3, 0.25, 0.2, 0.1, 0.05], np.float32)
    t, f1 = best_threshold(y, s)
    assert 0.2 < t <= 0.25 and f1 == 1.0
    assert best_threshold(np.zeros(3), s[:3]) == (0.5, 0.0)


def test_boosted_trees_learn_an_interaction_a_linear_model_cannot_and_load_back_the_same(tmp_path):
    """The trees family: an attribute that applies where exactly one of two features is high
    (an XOR, no linear boundary); the trees learn it, the linear network cannot, and the saved
    trees predict the same probabilities after a round trip through safetensors. A soft target
    (importance) is ranked in its own order."""
    from autoknow_ray.modules.relations.model import (
        TreeScorer, load_scorer, predict, save_scorer, train_scorer, train_trees,
    )

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(1200, 4)).astype(np.float32)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(np.float32)
    tr, te = slice(0, 800), slice(800, None)
    trees = train_trees(x[tr], y[tr], rounds=60, depth=2, learning_rate=0.3, binary=True)
    linear = train_scorer(x[tr], y[tr], hidden=0, epochs=200, lr=0.05, weight_decay=0.0, seed=0,
                          binary=True)
    acc = lambda m: float(((predict(m, x[te]) >= 0.5) == (y[te] > 0.5)).mean())  # noqa: E731
    assert acc(trees) >= 0.95 and acc(linear) <= 0.65
    save_scorer(trees, tmp_path / "app", {"n_features": 4, "hidden": 0})
    back, meta = load_scorer(tmp_path / "app")
    assert isinstance(back, TreeScorer) and meta["family"] == "trees"
    assert np.array_equal(predict(back, x[te]), predict(trees, x[te]))
    # split points are training values, and a row equal to one goes where its training rows went
    b = np.repeat([[0.0], [1.0]], 50, axis=0).astype(np.float32)
    step = train_trees(b, b[:, 0], rounds=20, depth=1, learning_rate=0.5, binary=True)
    assert set(step.threshold[step.feature == 0].tolist()) == {0.0}
    assert predict(step, np.array([[0.0], [1.0]], np.float32)).round().tolist() == [0.0, 1.0]
    soft = (x[:, 2] + 1) / 2                       # importance: a rate in [0, 1]
    imp = train_trees(x[tr], soft[tr], rounds=60, depth=2, learning_rate=0.3, binary=False)
    order = np.argsort(predict(imp, x[te]))
    save_scorer(imp, tmp_path / "imp", {"n_features": 4, "hidden": 0})
    assert np.array_equal(load_scorer(tmp_path / "imp")[0].logits(x[te]), imp.logits(x[te]))
    assert np.corrcoef(np.argsort(order), np.argsort(np.argsort(soft[te])))[0, 1] > 0.95


def test_provider_counts_survive_bad_rows_and_count_every_product():
    rows = [
        {"product_id": "a", "type": "Coffee", "title": "Vanilla dark roast coffee",
         "attributes": [{"name": "Flavor", "value": "Vanilla"}]},
        {"product_id": "b", "type": "Coffee", "title": "", "description": None},  # empty text
        {"product_id": "c", "type": None, "title": "<b>red</b> mug"},  # untyped, HTML
        {"product_id": "d", "type": "Coffee", "title": "x" * 1_000_000 + " vanilla"},  # huge
    ]
    step = CountProviderMentions(VOCAB, 4, max_chars=5000)
    out = pl.from_arrow(step.process_batch(products_table(rows)))
    got = {(t, a, s): h for t, a, s, h in out.iter_rows()}
    assert got[("Coffee", "", "products")] == 3 and got[("", "", "products")] == 1
    assert got[("Coffee", "", "empty")] == 1
    assert got[("Coffee", "Flavor", "value")] == 1  # the huge title is cut before "vanilla"
    assert got[("Coffee", "Flavor", "filled")] == 1
    assert got[("", "Color(s)", "value")] == 1
    assert not any(src == "shape" for _, _, src in got)  # no value of VOCAB has a number


def test_customer_counts_report_texts_of_unknown_products():
    batch = pa.table({"product_id": ["a", "a", "zz", "b"], "source": ["text", "text", "text", "query"],
                      "text": ["love the vanilla", "", "red", "dark roast coffee"]})
    step = CountCustomerMentions(VOCAB, 4, 5000, {"a": "Coffee", "b": "Coffee"})
    totals, hits = wide_counts(pl.from_arrow(step.process_batch(batch)), VOCAB.attributes)
    coffee = totals.filter(pl.col("type") == "Coffee").row(0, named=True)
    assert coffee["text"] == 2 and coffee["text_empty"] == 1 and coffee["query"] == 1
    assert totals.filter(pl.col("type") == "")["text_unmatched"].item() == 1
    h = {(t, a): (x, q) for t, a, x, q in hits.select("type", "attribute", "text", "query").iter_rows()}
    assert h[("Coffee", "Flavor")] == (1, 0) and h[("Coffee", "Roast type")] == (0, 1)


def test_vocabulary_is_capped():
    sample = pl.DataFrame({"product_id": ["1", "2", "3"], "attributes": [
        [{"name": "A", "value": "x"}, {"name": "B", "value": "y"}],
        [{"name": "A", "value": "z"}], [{"name": "A", "value": "x"}, {"name": "", "value": "q"}]]})
    v = build_vocabulary(sample, max_attributes=1, per_attribute=1)
    assert v.attributes == ["A"] and v.values == {"A": ["x"]} and v.products == {"A": 3}


def test_neighbours_are_leave_one_out_and_a_new_type_inherits_from_its_parent_and_siblings():
    attrs = ["Flavor", "Roast type", "Size"]
    known = Known(["coffee", "tea", "shoes"], np.eye(3, dtype=np.float32),
                  np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]], np.float32), attrs)
    tax = pl.DataFrame({"type": ["coffee", "tea", "cold brew", "shoes"],
                        "parent": ["beverages", "beverages", "beverages", "apparel"]})
    types = ["coffee", "cold brew"]
    emb = np.array([[1, 0, 0], [0.9, 0.1, 0]], np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    f = neighbour_features(types, attrs, known.types, known.labels, known.embeddings, emb,
                           np.eye(3, dtype=np.float32), tax, k=2)
    col = {n: i for i, n in enumerate(NEIGHBOUR_FEATURES)}
    # coffee's own labels never reach its features: its taxonomy neighbours are tea (and cold
    # brew, unknown), so "Roast type" (coffee only) scores 0 there
    assert f[0, 1, col["tax_mean"]] == 0.0 and f[0, 0, col["tax_mean"]] == 1.0
    # cold brew (never in fit) inherits what coffee and tea, its siblings, have; not shoes' Size
    assert f[1, 0, col["tax_mean"]] == 1.0 and f[1, 1, col["tax_mean"]] == 0.5
    assert f[1, 2, col["tax_mean"]] == 0.0
    assert f[1, 1, col["knn_mean"]] > 0.4  # its nearest known name is coffee


def test_a_type_seen_in_fit_keeps_its_fit_labels_and_a_new_one_the_model_score():
    known = Known(["coffee", "tea"], np.eye(2, dtype=np.float32),
                  np.array([[1, 0, 1], [0, 1, 0]], np.float32), ["Flavor", "Size", "Roast"])
    app = np.full(6, 0.2, np.float32)
    out = with_fit_labels(app, ["coffee", "cold brew"], known)
    assert out.tolist() == pytest.approx([1.0, 0.2, 1.0, 0.2, 0.2, 0.2])


def test_rank_puts_applicable_attributes_first_by_importance():
    df = ranked(pl.DataFrame({"type": ["t"] * 3, "attribute": ["a", "b", "c"],
                              "applicable": [True, False, True], "importance": [0.2, 0.9, 0.5]}))
    assert dict(zip(df["attribute"], df["rank"])) == {"c": 1, "a": 2, "b": 3}


def _gold(tmp: Path) -> Path:
    gold = tmp / "gold"
    gold.mkdir(parents=True)
    types = [(f"p{i}", "Coffee" if i < 3 else "Shoes") for i in range(6)]
    pl.DataFrame({"product_id": [p for p, _ in types], "type": [t for _, t in types],
                  "start": [None] * 6, "end": [None] * 6},
                 schema={"product_id": pl.String, "type": pl.String, "start": pl.Int32,
                         "end": pl.Int32}).write_parquet(gold / "types.parquet")
    spans = [("p0", "Flavor"), ("p1", "Flavor"), ("p2", "Roast type"), ("p3", "Size"),
             ("p4", "Size"), ("p5", "Color"), ("p0", "Product Type")]
    pl.DataFrame({"product_id": [p for p, _ in spans], "attribute": [a for _, a in spans],
                  "value": ["v"] * len(spans)}).write_parquet(gold / "spans.parquet")
    pl.DataFrame({"type": ["coffee"]}).write_parquet(gold / "fit_types.parquet")
    return gold


def test_score_splits_seen_and_unseen_types(tmp_path):
    gold = _gold(tmp_path)
    run = tmp_path / "run"
    rows = [("Coffee", "Flavor", 0.9), ("Coffee", "Roast type", 0.2), ("Coffee", "Size", 0.1),
            ("Coffee", "Color", 0.6), ("shoe", "Size", 0.8), ("shoe", "Color", 0.7),
            ("shoe", "Flavor", 0.1)]
    df = pl.DataFrame({"type": [r[0] for r in rows], "attribute": [r[1] for r in rows],
                       "applicability": [r[2] for r in rows]}).with_columns(
        applicable=pl.col("applicability") >= 0.5, importance=pl.col("applicability"),
        rank=pl.lit(1))
    write_table(run / "graph" / "attributes.parquet", df, GRAPH_ATTRIBUTES)
    r = score(run, gold)
    # Coffee (seen): Flavor tp, Roast type fn, Color fp, Size tn
    assert (r["relations.seen.tp"], r["relations.seen.fp"], r["relations.seen.fn"]) == (1, 1, 1)
    # Shoes (unseen, named "shoe" by the run): Size, Color tp, Flavor and Roast type tn
    assert (r["relations.unseen.tp"], r["relations.unseen.fp"], r["relations.unseen.fn"]) == (2, 0, 0)
    assert r["relations.unseen.auc_pr"] == 1.0 and r["relations.all.types"] == 2


def test_type_split_holds_out_whole_types_without_attributes(tmp_path):
    from autoknow_ray.catalogue.synth import synthesize

    synthesize(200, tmp_path / "cat", seed=1, n_types=8)
    s = type_split(tmp_path / "cat", tmp_path / "split", types=0.25, products=0.2, seed=3)
    fit = pl.read_parquet(tmp_path / "split" / "fit" / "products.parquet")
    held = pl.read_parquet(tmp_path / "split" / "heldout" / "products.parquet")
    assert fit.height + held.height == 200
    assert held["attributes"].null_count() == held.height and held["product_type"].null_count() < held.height
    fit_types = set(pl.read_parquet(tmp_path / "split" / "heldout" / "gold" / "fit_types.parquet")["type"])
    assert fit_types == set(fit["product_type"].drop_nulls())
    unseen = set(held["product_type"].drop_nulls()) - fit_types
    assert unseen and len(s["heldout_types"]) == 2
    texts = pl.read_parquet(tmp_path / "split" / "heldout" / "texts.parquet")
    assert set(texts["product_id"]) <= set(held["product_id"])
    with pytest.raises(ValueError):
        type_split(tmp_path / "cat", tmp_path / "bad", types=1.5)


def test_fit_then_rebuild_on_types_never_seen(tmp_path, ray_session):
    from autoknow_ray.catalogue.synth import synthesize
    from autoknow_ray.eval.baselines_relations import run_frequency
    from autoknow_ray.eval.evaluate import evaluate
    from autoknow_ray.graph import state
    from autoknow_ray.pipeline import RunContext
    from autoknow_ray.config import load_config
    from autoknow_ray.rebuild import fit, rebuild

    synthesize(300, tmp_path / "cat", seed=0, n_types=10)
    type_split(tmp_path / "cat", tmp_path / "split", types=0.3, products=0.2, seed=0)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("seed: 0\nstages: [ingest, relations, graph]\n"
                        "ray: {num_cpus: 2, object_store_memory_mb: 400}\n"
                        "relations: {epochs: 150, hidden: 16}\n")
    m = fit(tmp_path / "split" / "fit", tmp_path / "models", config=cfg_file)
    stats = m["modules"]["relations"]
    assert stats["types"] >= 5 and set(stats["comparison"]) == {"mlp", "linear", "ridge", "gbt"}
    # model and threshold picked on out-of-fold predictions over the fit's types
    assert stats["folds"] == 5 and 0 < stats["threshold"] < 1
    assert all(0 <= c["oof_auc_pr"] <= 1 for c in stats["comparison"].values())
    # applicability's kind on out-of-fold AUC-PR, importance's on its own out-of-fold Spearman
    cmp = stats["comparison"]
    assert cmp[stats["model"]]["oof_auc_pr"] == max(c["oof_auc_pr"] for c in cmp.values())
    assert cmp[stats["importance_model"]]["oof_importance_spearman"] == max(
        c["oof_importance_spearman"] for c in cmp.values() if c["oof_importance_spearman"] is not None)
    imp_meta = json.loads((tmp_path / "models" / "relations" / "importance" / "config.json").read_text())
    assert imp_meta["kind"] == stats["importance_model"]
    assert (tmp_path / "models" / "relations" / "applicability" / "model.safetensors").exists()
    run = tmp_path / "run"
    rebuild(tmp_path / "split" / "heldout", run, models=tmp_path / "models", config=cfg_file)
    manifest = json.loads((run / "relations" / "manifest.json").read_text())
    held = pl.read_parquet(tmp_path / "split" / "heldout" / "products.parquet")
    assert manifest["types_new"] >= 1 and manifest["rows_in"] == held.height
    assert manifest["customer_rows_not_counted"] == 0
    attrs = pl.read_parquet(run / "graph" / "attributes.parquet")
    assert attrs.columns == GRAPH_ATTRIBUTES.names and attrs["applicable"].sum() > 0
    # counts: products in, one row per (type, attribute) out; every held-out product is typed
    # (its catalogue type) and summed into its type's rows; no quarantine, no stage balance
    typed = held.filter(pl.col("product_type").is_not_null() & (pl.col("product_type") != ""))
    assert manifest["units"]["rows_in"] == "products" and "rows_quarantined" not in manifest
    assert manifest["rows_out"] == attrs.height == manifest["types"] * manifest["attributes"]
    assert manifest["types_with_products"] == typed["product_type"].n_unique()
    assert manifest["products_in_rows"] == typed.height
    assert sum(manifest["rows_dropped"].values()) == manifest["untyped_products"] \
        == held.height - typed.height
    assert "balance_checked" not in manifest and "per_product" not in manifest
    ctx = RunContext(run_dir=run, catalogue=tmp_path / "split" / "heldout", cfg=load_config(cfg_file))
    table = state.attribute_applicability(ctx)
    assert table is not None and table.height == attrs.height
    r = evaluate(run, tmp_path / "split" / "heldout" / "gold")
    # the held-out types' gold: 3 types never in fit, 30 judged (type, attribute) pairs of which
    # 8 apply. Observed: recall 7/8, precision 7/15, F1 0.61, AUC-PR 0.92. A module whose
    # scores are random or constant ranks at about the positives' share (0.27); one that says
    # nothing applies has recall 0; one that says everything applies has F1 2p/(1+p) = 0.42.
    assert (r["relations.unseen.types"], r["relations.unseen.pairs"],
            r["relations.unseen.positive_pairs"]) == (3, 30, 8)
    share = r["relations.unseen.positive_pairs"] / r["relations.unseen.pairs"]
    assert r["relations.unseen.recall"] >= 0.75
    assert r["relations.unseen.f1"] >= 2 * share / (1 + share) + 0.1
    # the synthetic attributes are shared by type families: new types recover most of them
    assert r["relations.unseen.auc_pr"] > 0.75 > 2 * share
    # no floor against the frequency baseline: on this catalogue it is ahead (unseen F1 0.94,
    # AUC-PR 1.0), as its text patterns are the synthetic values themselves
    run_frequency(tmp_path / "split" / "fit", tmp_path / "split" / "heldout", tmp_path / "base")
    b = evaluate(tmp_path / "base", tmp_path / "split" / "heldout" / "gold")
    assert "relations.unseen.f1" in b


def test_a_catalogue_without_attributes_fits_no_model_and_rebuilds_with_an_empty_table(tmp_path, ray_session):
    """Instacart's catalogue has types and no structured attribute: fit has no label to learn
    relations from, and a rebuild with those models still runs to the end, saying why the
    attributes table is empty (it used to stop with 'no relations models')."""
    from autoknow_ray.rebuild import fit, rebuild

    cat = tmp_path / "cat"
    cat.mkdir()
    rows = [{"product_id": f"p{i}", "title": f"Organic {t} {i}", "product_type": t}
            for i, t in enumerate(["Milk", "Bread", "Coffee"] * 10)]
    pl.DataFrame(rows).write_parquet(cat / "products.parquet")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("seed: 0\nstages: [ingest, relations, graph]\n"
                        "ray: {num_cpus: 2, object_store_memory_mb: 400}\n")
    m = fit(cat, tmp_path / "models", config=cfg_file)
    assert "structured attribute" in m["modules"]["relations"]["skipped"]
    run = tmp_path / "run"
    rebuild(cat, run, models=tmp_path / "models", config=cfg_file)
    manifest = json.loads((run / "relations" / "manifest.json").read_text())
    assert "structured attribute" in manifest["skipped"] and manifest["rows_in"] == 30
    # every product is counted, as dropped for want of a model; no quarantine figure
    assert manifest["rows_dropped"] == {"no relations model": 30} and manifest["rows_out"] == 0
    assert "rows_quarantined" not in manifest and manifest["units"]["rows_in"] == "products"
    attrs = pl.read_parquet(run / "graph" / "attributes.parquet")
    assert attrs.height == 0 and attrs.columns == GRAPH_ATTRIBUTES.names
    # a models folder whose fit never ran relations is still an error, not an empty table
    other = tmp_path / "models2"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"modules": {}}))
    with pytest.raises(FileNotFoundError, match="no relations models"):
        rebuild(cat, tmp_path / "run2", models=other, config=cfg_file)


# ---- the rebuilt catalogue's own evidence for types fit never labelled ---------------------
def test_title_attributes_are_the_distinct_attributes_of_a_titles_triples_with_best_confidence():
    from autoknow_ray.modules.taxonomy.types import TRIPLE, with_title_attributes

    def t(rel, conf):
        return {"subject": "p", "relation": rel, "object": "x", "confidence": conf,
                "module": "taxonomy", "status": "added", "evidence": "title[0:1]"}

    batch = pa.table({"product_id": ["p", "q"], "edits": pa.array(
        [[t("has_type", 0.9), t("Flavor", 0.6), t("Flavor", 0.8), t("Brand", 0.99)], None],
        pa.list_(TRIPLE))})
    out = with_title_attributes(batch).column("title_attributes").to_pylist()
    assert [(x["name"], round(x["confidence"], 2)) for x in out[0]] == [("Brand", 0.99), ("Flavor", 0.8)]
    assert out[1] == []


def test_provider_counts_count_module_1s_title_attributes_when_asked():
    rows = [{"product_id": "a", "type": "Tea", "title": "Green tea"},
            {"product_id": "b", "type": "Tea", "title": "Mint tea"}]
    table = products_table(rows).append_column("title_attributes", pa.array(
        [[{"name": "Flavor", "confidence": 0.9}, {"name": "Unknown", "confidence": 1.0}],
         [{"name": "Flavor", "confidence": 0.6}]],
        pa.list_(pa.struct([("name", pa.string()), ("confidence", pa.float32())]))))
    on = CountProviderMentions(VOCAB, 4, 5000, title_attributes=True)
    assert "title_attributes" in on.columns and "title_attributes" not in CountProviderMentions.columns
    _, hits = wide_counts(pl.from_arrow(on.process_batch(table)), VOCAB.attributes)
    h = hits.filter((pl.col("type") == "Tea") & (pl.col("attribute") == "Flavor")).row(0, named=True)
    assert h["tagged"] == 2 and h["tagged_score"] == 1500  # thousandths of 0.9 + 0.6
    assert hits.filter(pl.col("attribute") == "Unknown").height == 0  # outside the vocabulary
    off = CountProviderMentions(VOCAB, 4, 5000)  # the column is read only when asked for
    _, hits = wide_counts(pl.from_arrow(off.process_batch(products_table(rows))), VOCAB.attributes)
    assert hits["tagged"].sum() == 0


def test_poisson_tail_matches_its_closed_form():
    from autoknow_ray.modules.relations.evidence import poisson_tail

    lam = np.array([0.1, 1.0, 3.0, 3.0])
    k = np.array([1, 1, 0, 2])
    want = [1 - np.exp(-0.1), 1 - np.exp(-1.0), 1.0, 1 - np.exp(-3.0) * (1 + 3.0)]
    assert np.allclose(poisson_tail(k, lam), want, atol=1e-9)


def _evidence_frame(rows):
    return pl.DataFrame(rows, schema={"type": pl.String, "attribute": pl.String, "products": pl.Int64,
                                      "filled": pl.Int64, "tagged": pl.Int64, "tagged_score": pl.Float64},
                        orient="row")


def test_a_new_types_title_tags_decide_where_they_stand_above_the_taggers_noise():
    from autoknow_ray.modules.relations.evidence import noise_from_fit, noise_from_known, title_evidence

    attrs = ["Brand", "Flavor", "Color", "Size", "Scent"]
    rows = []
    # a known type: Brand and Flavor apply (fit); 200 products, one stray Color tag, one Size tag
    for a, k in zip(attrs, [190, 150, 1, 1, 0]):
        rows.append(("Coffee", a, 200, 0, k, 0.9 * k))
    # a new type with 60 products: Brand and Scent written in many titles, Color once (noise),
    # Flavor never, Size filled in the catalogue itself on two products
    for a, k, filled in zip(attrs, [55, 0, 1, 0, 20], [0, 0, 0, 2, 0]):
        rows.append(("Detergent", a, 60, filled, k, 0.9 * k))
    # a new type whose titles module 1 read nothing in: left to the model
    for a in attrs:
        rows.append(("Mystery", a, 40, 0, 0, 0.0))
    # a new type of three products: Brand on all three; the others' absence shows nothing
    for a, k in zip(attrs, [3, 0, 0, 0, 0]):
        rows.append(("Tiny", a, 3, 0, k, 0.9 * k))
    df = _evidence_frame(rows)
    noise = noise_from_known(df, {"Coffee"}, {"Coffee": {"Brand", "Flavor"}}, set(attrs))
    # 2 stray tags (0.9 each, 1.8) over 600 (product, attribute) pairs that do not apply, add-one smoothed
    assert noise.source == "known types here" and noise.pairs == 600
    assert noise.rate == pytest.approx((1.8 + 1) / 602)
    # the rate it reads attributes that apply: the median of Brand's 0.855 and Flavor's 0.675
    assert noise.applies_rate == pytest.approx(0.765)
    out, report = title_evidence(df, ["Detergent", "Mystery", "Tiny"], set(attrs), noise,
                                 min_fill_products=1)
    got = {(t, a): (d, y) for t, a, d, y in out.select("type", "attribute", "decided",
                                                         "evidence_applies").iter_rows()}
    assert got[("Detergent", "Brand")] == (True, True) and got[("Detergent", "Scent")] == (True, True)
    assert got[("Detergent", "Color")] == (True, False)  # one tag in 60: the tagger's noise
    assert got[("Detergent", "Flavor")] == (True, False)  # 0 of 60, where ~46 would apply
    assert got[("Detergent", "Size")] == (True, True)  # filled in the catalogue: the fit label's rule
    assert not any(got[("Mystery", a)][0] for a in attrs)
    assert got[("Tiny", "Brand")] == (True, True)
    assert not any(got[("Tiny", a)][0] for a in attrs[1:])  # 0 of 3 rejects neither way
    assert report["types"] == 2 and report["pairs_tagged_applicable"] == 3
    assert report["pairs_tagged_too_few"] == 2  # Detergent's Color and Flavor
    # without a known type here, the rate the tagger's validation in fit implies
    fit_noise = noise_from_fit({"val_precision": 0.8, "n_spans": 500, "n_examples": 100,
                                "labels": ["type", *attrs]})
    assert fit_noise.rate == pytest.approx(0.2 * 5 / 5)
    assert noise_from_known(df, set(), {}, set(attrs)).rate is None
    assert noise_from_fit(None).rate is None


def test_importance_takes_the_share_of_titles_that_write_the_attribute_where_module_1_read_them():
    from autoknow_ray.modules.relations.stage import with_title_share

    df = _evidence_frame([("Tea", "Flavor", 10, 0, 8, 8.0), ("Tea", "Color", 10, 0, 0, 0.0),
                          ("Tea", "Size", 10, 0, 0, 0.0),  # the tagger does not read Size
                          ("Mug", "Flavor", 4, 0, 0, 0.0), ("Mug", "Color", 4, 0, 0, 0.0)])
    model = np.array([0.2, 0.6, 0.3, 0.5, 0.5])
    out = with_title_share(df, model, {"Flavor", "Color"})
    # Tea: the mean of the model's and the title share (Size: the tagger does not read it, and
    # its count here is not module 1's); Mug (no tag at all): the model's
    assert np.allclose(out, [0.5, 0.3, 0.15, 0.5, 0.5])
    assert np.allclose(with_title_share(df, model, set()), model)
