"""Module 5 (synonym finding): features, training pairs, clusters, and fit + rebuild end to end."""
from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest

from autoknow_ray.modules.synonyms import distant
from autoknow_ray.modules.synonyms.cluster import clusters
from autoknow_ray.modules.synonyms.features import (FEATURES, conversion_ratio, converted_equal,
                                                   pair_features, quantity, same_quantity)


def feats(a, b):
    return dict(zip(FEATURES, pair_features(a, b)))


def test_quantities_compare_after_unit_conversion():
    assert feats("16 oz", "1 lb")["quantity_equal"] == 1.0
    assert feats("1TB", "1000 GB")["quantity_equal"] == 1.0
    assert feats("8-TB", "8 Terabytes")["quantity_equal"] == 1.0
    f = feats("16 oz", "16 lb")
    assert f["quantity_equal"] == 0.0 and f["quantity_conflict"] == 1.0
    assert quantity("Model X1") is None
    assert not same_quantity(quantity("12 in"), quantity("12 cm"))
    assert same_quantity(quantity("12 in"), quantity("1 ft"))


def test_a_bare_number_may_be_the_amount_in_another_unit():
    # an attribute that implies its unit writes "16 in" as 40.6 (cm), "8.4 oz" as 238 (g)
    assert converted_equal('16"', "40.6") and converted_equal("8.4 oz", "238")
    assert converted_equal('11-3/4"', "29.8")  # a mixed number is 11.75 in
    assert not converted_equal("16 in", "41.6") and not converted_equal("16 oz", "17")
    assert not converted_equal("24 ports", "24")  # a count is not converted
    # two bare numbers a unit apart, rounded as written (at least one decimal shown)
    assert conversion_ratio("6", "15.2") and conversion_ratio("9 1/4", "23.5")
    assert not conversion_ratio("7", "27.9") and not conversion_ratio("2", "5")
    assert not conversion_ratio("12", "12")
    assert quantity("3/4") == ("number", 0.75) and quantity("1/2 in") == ("length", 12.7)
    assert quantity("104/Pack") == ("count", 104.0)  # a per-pack count, not a fraction
    assert feats('16"', "40.6")["converted_equal"] == 1.0


def test_numbers_without_a_unit_are_not_taken_for_each_other():
    # no unit, nothing to convert: a bare number equals only itself
    assert not same_quantity(quantity("30"), quantity("30.5"))
    assert same_quantity(quantity("30"), quantity("30.0"))
    # two significant digits match some conversion factor by chance ("17.1" oz is 1.07 lb);
    # three identify one ("6" in is "15.2" cm)
    assert not conversion_ratio("1.1", "17.1") and not conversion_ratio("1", "2.5")
    assert conversion_ratio("6", "15.2")
    # an initialism is made of letters: "1.1" is not one of "17.1"
    assert feats("1.1", "17.1")["initialism"] == 0.0 and feats("USB", "Universal Serial Bus")["initialism"] == 1.0
    # a number too long for a float is read, never an error
    for long_number in ("9" * 400 + ".5", "9" * 400 + " 1/2", "9" * 400 + " oz"):
        assert np.isfinite(pair_features(long_number, "1.25")).all()


def test_codes_initialisms_abbreviations():
    assert feats("435952-B21", "435952B21")["key_equal"] == 1.0
    assert feats("435952-B21", "435952-B22")["key_equal"] == 0.0
    assert feats("HP", "Hewlett-Packard")["initialism"] == 1.0
    assert feats("HP", "Dell")["initialism"] == 0.0
    assert feats("Blk", "Black")["abbreviation"] == 1.0
    assert feats("Model X1", "Model X2")["numbers_conflict"] == 1.0
    assert feats("Cereal bar", "Cereal bars")["singular_equal"] == 1.0
    # empty and very long strings give finite features, never an error
    assert np.isfinite(pair_features("", "x" * 1_000_000)).all()


def test_rewrites_keep_meaning_and_hard_rewrites_change_it():
    rng = np.random.default_rng(0)
    pos = distant.positive_rewrites("16 oz", rng)
    units = [p for p in pos if quantity(p) is not None and quantity(p)[0] != "number"]
    bare = [p for p in pos if quantity(p) is not None and quantity(p)[0] == "number"]
    assert "1 lb" in pos and all(same_quantity(quantity(p), quantity("16 oz")) for p in units)
    # the amount in another unit, written bare, is the same amount
    assert bare and all(converted_equal("16 oz", b) for b in bare)
    neg = distant.negative_rewrites("16 oz", rng)
    assert neg and all(not same_quantity(quantity(n), quantity("16 oz")) for n in neg)
    assert not any(converted_equal("16 oz", n) for n in neg)
    assert "435952B21" in distant.positive_rewrites("435952-B21", rng)
    assert "HP" in distant.positive_rewrites("Hewlett Packard", rng)
    pairs = distant.colisted_pairs([("t1", "value", "Color", "Grey"), ("t1", "value", "Color", "Gray"),
                                    ("t2", "value", "Color", "Red")])
    assert pairs == {("value", "Color", "Gray", "Grey")}


def test_clusters_do_not_chain():
    # a~b and b~c are accepted but the classifier rejects a~c: c must not join a's cluster
    edges = {("X1", "X1 "): 0.9, ("X1 ", "X2"): 0.9}
    counts = {"X1": 10, "X1 ": 2, "X2": 5}
    out = clusters(edges, counts, 0.5, lambda pairs: [0.1 for _ in pairs], max_size=10)
    merged = {(t, c) for t, c, _ in out}
    assert ("X1 ", "X1") in merged
    assert not any(t == "X2" and c == "X1" for t, c in merged)
    # without a scorer only direct pairs count: b~c accepted, a~c never proposed, c stays out
    out = clusters(edges, counts, 0.5, None, max_size=10)
    assert {(t, c) for t, c, _ in out} == {("X1 ", "X1")}
    # a cluster holds at most max_size terms
    star = {("a", f"b{i}"): 0.9 for i in range(10)}
    out = clusters(star, {"a": 100}, 0.5, lambda p: [0.9] * len(p), max_size=4)
    assert len(out) == 3 and {c for _, c, _ in out} == {"a"}


# the catalogue's known answers: each spelling pair is one value written two ways; every other
# value (near misses among them: 16 lb, Model X2, 435952-B22) is a synonym of none of them
SPELLINGS = [("Size", "16 oz", "1 lb"), ("Size", "32 oz", "2 lb"), ("Color", "Grey", "Gray"),
             ("Brand", "Hewlett-Packard", "HP"), ("Part Number", "435952-B21", "435952B21"),
             ("Part Number", "581284-S21", "581284S21"), ("Color", "Black", "Blk"),
             ("Size", "1TB", "1000 GB"), ("Color", "Navy Blue", "navy blue")]
OTHERS = ["16 lb", "12 oz", "Model X1", "Model X2", "Red", "Green", "White", "64 GB", "2TB",
          "Dell", "Lenovo", "435952-B22", "8 oz", "Blue", "Brown"]


def _catalogue(path):
    """Duplicate listings (same title, two spellings of a value) teach the classifier; behaviour
    links spellings through shared queries; near misses (16 oz / 16 lb, X1 / X2) must stay apart."""
    rows, behavior = [], []
    spell, others = SPELLINGS, OTHERS
    n = 0
    for i, (attr, a, b) in enumerate(spell):
        for rep in range(3):
            title = f"Item {i} variant {rep} with {attr.lower()}"
            for v in (a, b):
                n += 1
                rows.append({"product_id": f"p{n}", "title": title, "product_type": "Widget" if v != b or i % 2 else "Widgets",
                             "attributes": [{"name": attr, "value": v}], "brand": None})
                behavior.append({"query": f"q{i}", "product_id": f"p{n}", "action": "view", "count": 1})
    for j, v in enumerate(others):
        attr = "Size" if any(c.isdigit() for c in v) and "Model" not in v and "-" not in v else (
            "Part Number" if "-" in v or "Model" in v else ("Brand" if v in ("Dell", "Lenovo") else "Color"))
        n += 1
        rows.append({"product_id": f"p{n}", "title": f"Other thing {j}", "product_type": "Gadget",
                     "attributes": [{"name": attr, "value": v}], "brand": None})
    # bad input: an empty value, a megabyte value, HTML, an unknown id in behaviour
    n += 1
    rows.append({"product_id": f"p{n}", "title": "Broken listing", "product_type": None,
                 "attributes": [{"name": "Color", "value": "   "}, {"name": "Color", "value": "z" * 1_000_000},
                                {"name": "Color", "value": "<b>Red</b>"}], "brand": None})
    behavior.append({"query": "q0", "product_id": "no-such-product", "action": "view", "count": 3})
    path.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows).write_parquet(path / "products.parquet")
    pl.DataFrame({"type": ["Widget", "Widgets", "Gadget"], "parent": [None, None, None]},
                 schema={"type": pl.String, "parent": pl.String}).write_parquet(path / "taxonomy.parquet")
    pl.DataFrame(behavior).write_parquet(path / "behavior.parquet")
    gold = pl.DataFrame({"kind": ["value"] * 5 + ["type"], "attribute": ["Size", "Color", "Brand", "Part Number", "Size", None],
                         "term": ["1 lb", "Gray", "HP", "435952B21", "1000 GB", "Widgets"],
                         "canonical": ["16 oz", "Grey", "Hewlett-Packard", "435952-B21", "1TB", "Widget"]})
    (path / "gold").mkdir(exist_ok=True)
    gold.write_parquet(path / "gold" / "synonyms.parquet")
    return len(rows)


@pytest.fixture(scope="module")
def fitted(ray_session, tmp_path_factory):
    from autoknow_ray.config import Config
    from autoknow_ray.rebuild import fit, rebuild

    root = tmp_path_factory.mktemp("syn")
    n = _catalogue(root / "cat")
    cfg = Config.model_validate({
        "stages": ["ingest", "synonyms", "graph"],
        "ray": {"num_cpus": 2, "object_store_memory_mb": 400},
        # the threshold is calibrated on co-listed and neighbour pairs: this catalogue has 10
        # positive ones, and 10 of 10 right bound precision at 0.79, so it cannot show the
        # default 0.95 (it abstains at that target); it is fitted for 0.75, with one MLP: the
        # default three's averaged out-of-fold scores rank one neighbour negative among those 10
        # (bound 0.747), which a catalogue this small cannot tell from noise
        "synonyms": {"max_train_terms": 200, "epochs": 40, "knn_k": 5, "max_term_chars": 200,
                     "precision_target": 0.75, "rewrite_values": True, "members": 1}})
    manifest = fit(root / "cat", root / "models", config=cfg)
    rebuild(root / "cat", root / "run", models=root / "models", config=cfg)
    return root, n, manifest


def test_fit_writes_a_trained_classifier(fitted):
    root, _, manifest = fitted
    stats = manifest["modules"]["synonyms"]
    assert (root / "models" / "synonyms" / "classifier.safetensors").exists()
    meta = json.loads((root / "models" / "synonyms" / "config.json").read_text())
    assert 0.0 < meta["threshold"] < 1.0 and meta["features"] == list(FEATURES)
    # the duplicate listings' canonicals ship with the classifier that was trained on their vote
    assert meta["extra_features"] == ["canonical_vote"] and stats["canonical_vote_terms"] > 0
    assert (root / "models" / "synonyms" / "canonical_votes.parquet").exists()
    pairs = pl.read_parquet(root / "run" / "synonyms" / "pairs.parquet")
    assert "canonical_vote" in pairs.columns and pairs["canonical_vote"].null_count() == 0
    cal = meta["calibration"]
    assert cal["target"] == 0.75 and cal["precision_lower"] >= 0.75 and cal["threshold"] == pytest.approx(meta["threshold"], abs=1e-4)
    # the shipped scorer ranks the validation pairs at least as well as the cosine alone
    assert meta["scorer"] in ("classifier", "cosine")
    assert stats["val_auc_pr"] >= stats["val_auc_pr_cosine"] or meta["scorer"] == "cosine"
    assert stats["origins"].get("colisted.1", 0) >= 9  # the duplicate listings were found
    assert stats["val_f1"] > 0.7


def test_rebuild_merges_spellings_and_keeps_near_misses_apart(fitted):
    root, _, _ = fitted
    syn = pl.read_parquet(root / "run" / "graph" / "synonyms.parquet")
    assert syn.columns == ["kind", "attribute", "term", "canonical", "score"]
    canon = {(a, t): c for a, t, c in syn.select("attribute", "term", "canonical").iter_rows()}
    same = lambda a, x, y: canon.get((a, x), x) == canon.get((a, y), y)  # noqa: E731
    assert same("Part Number", "435952-B21", "435952B21")
    assert not same("Size", "16 oz", "16 lb")
    assert not same("Part Number", "Model X1", "Model X2")
    assert not same("Part Number", "435952-B21", "435952-B22")
    # the catalogue's known answers: most of the 9 spelling pairs are merged (observed: 6 at the
    # threshold calibrated for precision 0.85, 8 with the older best-F1 threshold, which also
    # merged near misses once the target rule took the lowest passing threshold; one pair of
    # margin), and no other value joins any cluster. Merging nothing fails the first, merging
    # near strings (16 oz / 16 lb, Model X1 / X2) the second.
    assert sum(same(attr, a, b) for attr, a, b in SPELLINGS) >= 5
    merged_terms = set(syn["term"].to_list()) | set(syn["canonical"].to_list())
    assert not merged_terms & set(OTHERS)
    # every merged term points at a canonical that is itself a term, never at another merged term
    assert not set(syn["canonical"].to_list()) & set(syn["term"].to_list())


def test_pairs_sharing_no_context_need_fits_threshold_for_such_pairs(fitted):
    """Fit calibrates embedding-neighbour pairs apart (its pooled threshold is carried by
    co-listed positives): the stage accepts a pair with no shared context only at that
    threshold, never under the pooled one."""
    root, _, manifest = fitted
    meta = json.loads((root / "models" / "synonyms" / "config.json").read_text())
    knn = meta["knn_threshold"]
    assert meta["knn_calibration"]["target"] == 0.75
    assert knn is None or knn >= meta["threshold"]
    pairs = pl.read_parquet(root / "run" / "synonyms" / "pairs.parquet")
    run = json.loads((root / "run" / "synonyms" / "manifest.json").read_text())
    assert run["knn_threshold"] == (None if knn is None else round(knn, 4))
    knn_only = pairs.filter(pl.col("source") == "knn")
    assert knn_only.height > 0
    bar = float("inf") if knn is None else knn
    assert knn_only.filter(pl.col("accepted") != (pl.col("score") >= bar)).height == 0
    shared = pairs.filter(pl.col("source") != "knn", pl.col("cosine") >= run["min_pair_cosine"])
    assert shared.filter(pl.col("accepted") != (pl.col("score") >= meta["threshold"])).height == 0


def test_edits_carry_the_canonical_with_the_original_in_evidence(fitted):
    root, n, _ = fitted
    manifest = json.loads((root / "run" / "synonyms" / "manifest.json").read_text())
    assert manifest["balance_checked"] and manifest["units"]["rows_out"] == "vocabulary terms"
    assert manifest["rows_in"] == manifest["rows_out"] + sum(manifest["rows_dropped"].values())
    # the megabyte value is cut or rejected by ingest; no over-long term reaches the vocabulary
    vocab = pl.read_parquet(root / "run" / "synonyms" / "vocabulary.parquet")
    assert vocab["term"].str.len_chars().max() <= 200 and "" not in vocab["term"].to_list()
    from autoknow_ray.pipeline import read_parquet_any, table_file

    triples = read_parquet_any(table_file(root / "run" / "graph", "triples"))
    corrected = triples.filter((pl.col("module") == "synonyms") & (pl.col("status") == "corrected"))
    removed = triples.filter((pl.col("module") == "synonyms") & (pl.col("status") == "removed"))
    assert corrected.height > 0 and removed.height > 0
    syn = pl.read_parquet(root / "run" / "graph" / "synonyms.parquet")
    canonicals = set(syn["canonical"].to_list())
    assert set(corrected["object"].to_list()) <= canonicals
    for obj, ev in corrected.select("object", "evidence").iter_rows():
        assert ev.startswith("synonym: original ")
    assert not (set(removed["object"].to_list()) & canonicals)


def test_eval_scores_pairs_and_graph(fitted):
    from autoknow_ray.eval.synonyms import score

    root, _, _ = fitted
    r = score(root / "run", root / "cat" / "gold")
    assert r["synonyms.value.gold_pairs_in_vocabulary"] == 5
    # the graph merges at least 3 of the 5 gold pairs (observed: 4, Gray/Grey is missed; one of
    # margin) and no wrong one; a module that merges nothing gives tp 0, one that merges
    # everything fp > 0
    assert r["synonyms.value.graph.tp"] >= 3 and r["synonyms.value.graph.fp"] == 0
    assert r["synonyms.type.graph.tp"] == 1  # Widgets -> Widget
    # The eval's gold judges only the 5 positives (no gold negative is a candidate pair), so its
    # AUC-PRs are 1.0 for any scorer. Judge every candidate pair of catalogue values instead, by
    # the catalogue's known answers: the 9 spelling pairs are positive, every other pair (16 oz /
    # 16 lb, Model X1 / X2, 435952-B21 / -B22, ...) negative; edit similarity (rapidfuzz) on
    # the same pairs is the baseline. Random or constant classifier scores rank the positives
    # at about their share of the pairs (9 of 64), far under the floor.
    from rapidfuzz import fuzz

    from autoknow_ray.eval.synonyms import average_precision
    from autoknow_ray.pipeline import read_parquet_any, table_file

    pairs = read_parquet_any(table_file(root / "run" / "synonyms", "pairs")).filter(pl.col("kind") == "value")
    known = {t for _, a, b in SPELLINGS for t in (a, b)} | set(OTHERS)
    positive = {frozenset((a, b)) for _, a, b in SPELLINGS}
    judged = [(int(frozenset((x, y)) in positive), s, fuzz.ratio(x, y) / 100)
              for x, y, s in pairs.select("term_a", "term_b", "score").iter_rows()
              if x in known and y in known]
    y = np.array([j[0] for j in judged])
    clf = average_precision(y, np.array([j[1] for j in judged], np.float64), len(positive))
    edit = average_precision(y, np.array([j[2] for j in judged], np.float64), len(positive))
    # observed over 64 judged pairs (9 positive): classifier 0.934, edit similarity 0.454;
    # random scores average 0.19 (best of 20 seeds 0.39), constant ones 0.18
    assert len(judged) >= 40 and y.sum() == len(positive)  # every spelling pair is a candidate
    assert clf >= 0.8 and clf >= edit + 0.25


def test_duplicate_titles_become_contexts_only_when_listed_more_than_once():
    import pyarrow as pa

    from autoknow_ray.modules.synonyms.stage import _duplicate_titles, _title_keys

    keys = _title_keys(pa.table({"product_id": ["a", "b", "c"],
                                 "title": ["HP 4GB DDR3 Memory", "hp 4gb  ddr3 memory", None]}))
    assert keys.column("title_key").to_pylist()[0] == keys.column("title_key").to_pylist()[1]
    twice = _duplicate_titles(keys.slice(0, 2), 8)
    assert twice.column("product_id").to_pylist() == ["a", "b"]
    assert len(set(twice.column("context").to_pylist())) == 1
    assert _duplicate_titles(keys.slice(0, 1), 8).num_rows == 0  # listed once
    many = pa.table({"product_id": [str(i) for i in range(9)], "title_key": ["x"] * 9})
    assert _duplicate_titles(many, 8).num_rows == 0  # a generic title, not one item twice


def test_a_classifier_without_a_threshold_merges_nothing(fitted, tmp_path):
    """Where fit found no threshold reaching the precision target, the stage writes no synonym
    and no edit, and its manifest says why."""
    import shutil

    from autoknow_ray.config import Config
    from autoknow_ray.pipeline import read_parquet_any, table_file
    from autoknow_ray.rebuild import rebuild

    root, _, _ = fitted
    models = tmp_path / "models"
    shutil.copytree(root / "models", models)
    meta_path = models / "synonyms" / "config.json"
    meta = json.loads(meta_path.read_text())
    meta.update(threshold=None, calibration={**meta["calibration"], "threshold": None,
                                             "abstain_reason": "no threshold reaches 0.95 (test)"})
    meta_path.write_text(json.dumps(meta))
    cfg = Config.model_validate({"stages": ["ingest", "synonyms", "graph"],
                                 "ray": {"num_cpus": 2, "object_store_memory_mb": 400}})
    rebuild(root / "cat", tmp_path / "run", models=models, config=cfg)
    manifest = json.loads((tmp_path / "run" / "synonyms" / "manifest.json").read_text())
    assert "(test)" in manifest["abstained"] and manifest["edits"] == 0
    triples = read_parquet_any(table_file(tmp_path / "run" / "graph", "triples"))
    assert triples.filter(pl.col("module") == "synonyms").height == 0


def test_by_default_synonyms_are_listed_and_values_stay_as_written(fitted, tmp_path):
    """rewrite_values is off by default: graph/synonyms holds the merges (the same as the
    rewriting run's), and no triple of the graph is removed or corrected by the module."""
    from autoknow_ray.config import Config
    from autoknow_ray.pipeline import read_parquet_any, table_file
    from autoknow_ray.rebuild import rebuild

    root, _, _ = fitted
    cfg = Config.model_validate({"stages": ["ingest", "synonyms", "graph"],
                                 "ray": {"num_cpus": 2, "object_store_memory_mb": 400},
                                 "synonyms": {"knn_k": 5, "max_term_chars": 200}})
    rebuild(root / "cat", tmp_path / "run", models=root / "models", config=cfg)
    syn = pl.read_parquet(tmp_path / "run" / "graph" / "synonyms.parquet")
    rewriting = pl.read_parquet(root / "run" / "graph" / "synonyms.parquet")
    assert syn.height > 0 and syn.sort("term").equals(rewriting.sort("term"))
    triples = read_parquet_any(table_file(tmp_path / "run" / "graph", "triples"))
    assert triples.filter(pl.col("module") == "synonyms").height == 0
    manifest = json.loads((tmp_path / "run" / "synonyms" / "manifest.json").read_text())
    assert manifest["edits"] == 0 and manifest["values_rewritten"] is False


def test_vocabulary_and_term_contexts_are_capped_in_the_workers_and_counted(fitted, tmp_path):
    """Under small caps the vocabulary is the full run's vocabulary ranked by count (ties by
    key), at most `max_terms_per_attribute` per attribute and `max_terms` in all, and the
    manifest counts what the caps left out; the (term, context) rows stop at their cap."""
    from autoknow_ray.config import Config
    from autoknow_ray.rebuild import rebuild

    root, _, _ = fitted
    full_manifest = json.loads((root / "run" / "synonyms" / "manifest.json").read_text())
    full = pl.read_parquet(root / "run" / "synonyms" / "vocabulary.parquet")
    assert full_manifest["truncated"]["vocabulary"] == 0  # the default caps are not reached
    tc = full_manifest["term_contexts"]
    assert tc["kept"] > 0 and tc["left_out"] == tc["keys"] - tc["kept"]
    assert full_manifest["truncated"]["term_contexts"] == tc["left_out"]
    per_attribute, cap, contexts = 3, 12, 4
    cfg = Config.model_validate({"stages": ["ingest", "synonyms", "graph"],
                                 "ray": {"num_cpus": 2, "object_store_memory_mb": 400},
                                 "synonyms": {"knn_k": 5, "max_term_chars": 200,
                                              "max_terms_per_attribute": per_attribute,
                                              "max_terms": cap, "max_term_contexts": contexts}})
    rebuild(root / "cat", tmp_path / "run", models=root / "models", config=cfg)
    manifest = json.loads((tmp_path / "run" / "synonyms" / "manifest.json").read_text())
    vocab = pl.read_parquet(tmp_path / "run" / "synonyms" / "vocabulary.parquet")
    want = (full.sort(["n", "kind", "attribute", "term"], descending=[True, False, False, False])
            .with_columns(pl.int_range(pl.len()).over(["kind", "attribute"]).alias("_r"))
            .filter(pl.col("_r") < per_attribute).drop("_r").head(cap))
    assert vocab.sort(["kind", "attribute", "term"]).equals(want.sort(["kind", "attribute", "term"]))
    assert manifest["truncated"]["vocabulary"] == full.height - vocab.height > 0
    assert manifest["rows_dropped"]["over_vocabulary_cap"] == full.height - vocab.height
    assert manifest["rows_in"] == full_manifest["rows_in"]
    assert manifest["rows_in"] == manifest["rows_out"] + sum(manifest["rows_dropped"].values())
    tc = manifest["term_contexts"]
    assert tc["kept"] == contexts and tc["cap_reached"]
    assert manifest["truncated"]["term_contexts"] == tc["left_out"] == tc["keys"] - contexts > 0


@pytest.mark.parametrize("max_pairs", [10_000, 40])
def test_behaviour_pairs_made_in_the_workers_equal_the_driver_self_join(ray_session, max_pairs):
    """The pairs of terms sharing contexts are made per context partition and counted in the
    workers (`behaviour_pairs_in_workers`): the same rows, in the same order, as the self-join on
    the driver (`behaviour_pairs`), with the pair cap reached and not, contexts over the
    per-context cap, ties in shared counts, and null attributes (types)."""
    import numpy as np
    import polars as pl

    from autoknow_ray.modules.synonyms.candidates import behaviour_pairs, behaviour_pairs_in_workers

    rng = np.random.default_rng(5)
    rows = []
    for kind, attr in (("value", "Color"), ("value", "Brand"), ("type", None)):
        terms = [f"{attr or 't'}{i}" for i in range(25)]
        for c in range(60):
            for t in rng.choice(terms, int(rng.integers(1, 9)), replace=False):
                # distinct counts within a context: its cap keeps the same terms either way
                rows.append((kind, attr, str(t), f"q{c}", int(rng.integers(1, 50)) * 100 + len(rows)))
    tc = pl.DataFrame(rows, schema={"kind": pl.String, "attribute": pl.String, "term": pl.String,
                                    "context": pl.String, "n": pl.Int64}, orient="row")
    want = behaviour_pairs(tc, 6, 2, max_pairs)
    got = behaviour_pairs_in_workers(tc, 6, 2, max_pairs)
    assert want.height > 0 and (max_pairs > want.height or want.height == max_pairs)
    assert got.equals(want)


def test_an_incremental_rebuild_reuses_term_vectors_and_pair_scores(fitted, tmp_path):
    """`rebuild --previous`: the vocabulary's vectors and the candidate pairs' scores the
    previous run computed are reused, new terms and pairs go through the models, and every
    table equals a full rebuild's (a product added with a new spelling and one removed)."""
    from autoknow_ray.config import Config
    from autoknow_ray.rebuild import rebuild

    root, _, _ = fitted
    cfg = Config.model_validate(json.loads((root / "run" / "config.resolved.json").read_text()))
    products = pl.read_parquet(root / "cat" / "products.parquet")
    cat = tmp_path / "cat"
    shutil.copytree(root / "cat", cat)
    new = products.head(1).with_columns(
        pl.lit("p-new").alias("product_id"),
        pl.Series("attributes", [[{"name": "Color", "value": "Greyish"}]],
                  dtype=products.schema["attributes"]))
    pl.concat([products.slice(1), new], how="vertical_relaxed").write_parquet(cat / "products.parquet")
    rebuild(cat, tmp_path / "inc", models=root / "models", config=cfg, previous=root / "run")
    rebuild(cat, tmp_path / "full", models=root / "models", config=cfg)

    def manifest(run):
        return json.loads((run / "synonyms" / "manifest.json").read_text())

    inc, full, before = manifest(tmp_path / "inc"), manifest(tmp_path / "full"), manifest(root / "run")
    vocab = full["cache"]["term_vectors"]
    assert full["cache"]["term_vectors"]["reused"] == 0 and full["cache"]["pair_scores"]["reused"] == 0
    # the new spelling is the one new term; the removed product's term is still held by others
    assert inc["cache"]["term_vectors"]["recomputed"] == 1
    assert inc["cache"]["term_vectors"]["reused"] == vocab["recomputed"] - 1
    assert 0 < inc["cache"]["pair_scores"]["recomputed"] < full["cache"]["pair_scores"]["recomputed"]
    assert inc["cache"]["pair_scores"]["reused"] > 0
    assert before["cache"]["term_vectors"]["fingerprint"] == vocab["fingerprint"]
    from autoknow_ray.pipeline import read_parquet_any, table_file

    for name in ("pairs", "vocabulary", "graph_synonyms", "edits"):
        a = read_parquet_any(table_file(tmp_path / "inc" / "synonyms", name))
        b = read_parquet_any(table_file(tmp_path / "full" / "synonyms", name))
        assert a.sort(a.columns).equals(b.sort(b.columns)), name
    # what made the pairs: the new term is among them, scored
    pairs = pl.read_parquet(tmp_path / "inc" / "synonyms" / "pairs.parquet")
    assert pairs.filter((pl.col("term_a") == "Greyish") | (pl.col("term_b") == "Greyish")).height


@pytest.mark.parametrize("members", [1, 3])
def test_a_pairs_score_does_not_depend_on_the_pairs_scored_beside_it(members, tmp_path):
    """The classifier scores a pair the same alone, in a batch, and at the batch's tail: what a
    reused score of `rebuild --previous` needs (a matrix product over one row and a vectorised
    sigmoid's tail took other code paths and moved scores in the last bits). Several members
    average their probabilities, and save and load back to the same scores."""
    import torch

    from autoknow_ray.modules.synonyms.model import PairClassifier, load, save

    torch.manual_seed(0)
    model = PairClassifier.averaged([PairClassifier(len(FEATURES), 16).eval() for _ in range(members)])
    assert model.members == members
    x = np.random.default_rng(0).normal(size=(203, len(FEATURES))).astype(np.float32)
    together = model.score(x)
    alone = np.concatenate([model.score(x[i:i + 1]) for i in range(len(x))])
    shifted = model.score(x[5:])
    assert np.array_equal(together, alone) and np.array_equal(together[5:], shifted)
    assert together.dtype == np.float32 and 0 < together.min() and together.max() < 1
    save(model, tmp_path, {"hidden": 16, "members": members})
    loaded, _ = load(tmp_path)
    assert loaded.members == members and np.array_equal(loaded.score(x), together)
    if members > 1:  # the mean of the members' probabilities
        one = [_member(model, net) for net in [model.net, *model.extra]]
        assert np.allclose(together, np.mean([m.score(x) for m in one], axis=0), atol=1e-6)


def _member(model, net):
    from autoknow_ray.modules.synonyms.model import PairClassifier

    out = PairClassifier(model.mean.shape[0], net[0].out_features)
    out.mean.copy_(model.mean)
    out.std.copy_(model.std)
    out.net.load_state_dict(net.state_dict())
    return out.eval()
