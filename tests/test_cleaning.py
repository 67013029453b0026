"""Module 4 (cleaning): training pairs, decisions, planted errors, eval, baselines, and the stage
end to end on a tiny synthetic catalogue with upstream edits (CPU, short training)."""
from __future__ import annotations

import json
import random

import polars as pl
import pyarrow.parquet as pq
import pytest

from autoknow_ray.catalogue.plant import plant
from autoknow_ray.catalogue.synth import synthesize
from autoknow_ray.config import Config
from autoknow_ray.eval import cleaning as cleaning_eval
from autoknow_ray.modules.cleaning.config import CleaningConfig
from autoknow_ray.modules.cleaning.steps import decide, product_claims
from autoknow_ray.modules.cleaning.training_data import make_pairs
from autoknow_ray.pipeline import read_parquet_any, table_file, write_table
from autoknow_ray.schema import CLEANING_SCORES, TRIPLES


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("cleaning")
    synthesize(160, root / "cat", seed=1, n_types=6)
    return root


def _products(cat):
    return read_parquet_any(cat / "products")


def test_pairs_follow_the_article(catalogue):
    products = _products(catalogue / "cat")
    cfg = CleaningConfig(max_train_pairs=400)
    pairs, stats = make_pairs(products, cfg, seed=0)
    assert 300 <= len(pairs) <= 400
    labels = [p.label for p in pairs]
    assert 0.4 < sum(labels) / len(labels) < 0.6  # one negative per positive
    assert (stats["other_type"] and stats["swap"] and stats["other_attribute"] and stats["corrupt"]
            and stats["type"])
    # a negative never repeats a value its type really has for the attribute; a swap (another
    # product's value) never repeats one the product itself has
    positives = {p.claim for p in pairs if p.label == 0}
    assert not [p for p in pairs if p.label == 1 and p.claim in positives
                and p.kind not in ("type", "swap")]
    own = {(p.product_id, p.claim) for p in pairs if p.label == 0}
    assert not [p for p in pairs if p.kind == "swap" and (p.product_id, p.claim) in own]
    # every pair carries its value and title for the text features
    assert all(p.value and p.title for p in pairs)
    # the same seed gives the same pairs
    again, _ = make_pairs(products, cfg, seed=0)
    assert [p.claim for p in again] == [p.claim for p in pairs]


def test_pairs_on_a_catalogue_without_values_learn_types_only(catalogue):
    products = _products(catalogue / "cat").with_columns(pl.col("attributes").list.head(0),
                                                         pl.lit(None, pl.String).alias("brand"))
    pairs, stats = make_pairs(products, CleaningConfig(max_train_pairs=100), seed=0)
    assert pairs and {p.kind for p in pairs} == {"type", "type_positive"}


def test_decide_removes_corrects_and_judges_type_fixes():
    claims, retracted = product_claims(
        "Tea", [{"name": "Flavor", "value": "16 oz"}, {"name": "Size", "value": "16 oz"}], "Lipton",
        ["Flavor", "has_type", "has_type"], ["Lemon", "Coffee", "Tea"],
        ["added", "corrected", "removed"], ["imputation", "taxonomy", "taxonomy"])
    assert ("has_type", "Tea") in retracted
    scores = {("has_type", "Tea"): 0.1, ("Flavor", "16 oz"): 0.95, ("Size", "16 oz"): 0.05,
              ("Brand", "Lipton"): 0.2, ("Flavor", "Lemon"): 0.1, ("has_type", "Coffee"): 0.9}
    rows = decide("p1", claims, [scores[(r, o)] for r, o, _ in claims], retracted, 0.5, True)
    by = {(r["relation"], r["object"], r["status"]): r for r in rows}
    assert ("Flavor", "16 oz", "removed") in by
    assert json.loads(by[("Flavor", "16 oz", "removed")]["evidence"])["replacement"] == "Lemon"
    assert ("Flavor", "Lemon", "corrected") in by  # the upstream value replaces it
    assert ("has_type", "Coffee", "removed") in by  # module 1's weak type correction rejected
    assert ("has_type", "Tea", "corrected") in by  # and the catalogue type restored
    assert ("Size", "16 oz", "kept") in by and ("Brand", "Lipton", "kept") in by
    # types have their own threshold: at 0.95 module 1's type correction (0.9) stands, the
    # catalogue type stays retracted, and values are judged as before
    rows = decide("p1", claims, [scores[(r, o)] for r, o, _ in claims], retracted, 0.5, True,
                  type_threshold=0.95)
    by = {(r["relation"], r["object"], r["status"]): r for r in rows}
    assert ("has_type", "Coffee", "kept") in by and ("has_type", "Tea", "corrected") not in by
    assert ("Flavor", "16 oz", "removed") in by
    # an empty value is reported, not lost
    claims2, _ = product_claims(None, [{"name": "Color", "value": ""}], None, None, None, None, None)
    rows2 = decide("p2", claims2, [None], set(), 0.5, True)
    assert rows2[0]["status"] == "kept" and "not scored" in rows2[0]["evidence"]


def test_plant_records_what_it_changed(catalogue, tmp_path):
    out = plant(catalogue / "cat", tmp_path / "planted", rate=0.1, type_rate=0.1, seed=3)
    assert out["wrong_values"] > 0 and out["wrong_types"] > 0
    orig = {r["product_id"]: r for r in _products(catalogue / "cat").to_dicts()}
    planted = pl.read_parquet(tmp_path / "planted" / "products.parquet")
    wrong = pl.read_parquet(tmp_path / "planted" / "gold" / "wrong_values.parquet")
    for pid, attr, value, correct in wrong.iter_rows():
        row = planted.filter(pl.col("product_id") == pid).to_dicts()[0]
        values = {a["value"] for a in row["attributes"] if a["name"] == attr}
        if attr == "Brand":
            values.add(row["brand"])
        assert value in values and value != correct
        assert correct in {a["value"] for a in orig[pid]["attributes"] if a["name"] == attr} | {orig[pid]["brand"]}
    wt = pl.read_parquet(tmp_path / "planted" / "gold" / "wrong_types.parquet")
    for pid, t, correct in wt.iter_rows():
        assert orig[pid]["product_type"] == correct != t
    # seeded slices are disjoint
    a = plant(catalogue / "cat", tmp_path / "a", rate=0, seed=0, take=50)
    b = plant(catalogue / "cat", tmp_path / "b", rate=0, seed=0, skip=50, take=50)
    ids_a = set(pl.read_parquet(tmp_path / "a" / "products.parquet")["product_id"].to_list())
    ids_b = set(pl.read_parquet(tmp_path / "b" / "products.parquet")["product_id"].to_list())
    assert a["products"] == b["products"] == 50 and not ids_a & ids_b
    with pytest.raises(ValueError):
        plant(catalogue / "cat", tmp_path / "c", rate=1.5)


def test_eval_scores_removals_against_the_planted_list(tmp_path):
    t = pl.DataFrame({"subject": ["a", "a", "b", "b", "c"],
                      "relation": ["Color", "Size", "Color", "has_type", "Color"],
                      "object": ["Red", "XL", "Blue", "Tea", "Green"],
                      "status": ["removed", "kept", "removed", "removed", "kept"]})
    write_table(tmp_path / "run" / "graph" / "triples.parquet", t, TRIPLES)
    s = t.with_columns(pl.lit("catalogue").alias("origin"),
                       pl.Series("score", [0.9, 0.1, 0.8, 0.7, 0.3], dtype=pl.Float32))
    write_table(tmp_path / "run" / "cleaning" / "scores.parquet", s, CLEANING_SCORES)
    write_table(tmp_path / "gold" / "wrong_values.parquet",
                pl.DataFrame({"product_id": ["a", "c"], "attribute": ["Color", "Color"],
                              "value": ["red", "Green"], "correct_value": ["x", "y"]}))
    write_table(tmp_path / "gold" / "wrong_types.parquet",
                pl.DataFrame({"product_id": ["b"], "type": ["Tea"], "correct_type": ["Coffee"]}))
    r = cleaning_eval.score(tmp_path / "run", tmp_path / "gold")
    assert r["cleaning.values.tp"] == 1 and r["cleaning.values.fp"] == 1 and r["cleaning.values.fn"] == 1
    assert r["cleaning.values.false_removal_rate"] == 0.5  # Blue of 2 clean values
    assert r["cleaning.values.auc_pr"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-3)  # ranks 1 and 3
    assert r["cleaning.types.precision"] == 1.0 and r["cleaning.types.recall"] == 1.0


def test_frequency_baseline_is_a_scored_run(catalogue, tmp_path):
    from autoknow_ray.eval.baselines_cleaning import run_cleaning_baseline

    plant(catalogue / "cat", tmp_path / "p", rate=0.1, type_rate=0.05, seed=0)
    run_cleaning_baseline("frequency", tmp_path / "p", tmp_path / "run")
    r = cleaning_eval.score(tmp_path / "run", tmp_path / "p" / "gold")
    # 61 planted of 525 value facts (0.116) and 11 of 145 types (0.076): a scorer at random
    # ranks them at about that share. The frequency baseline (rare values of a type first) gives
    # values AUC-PR 0.439, recall 0.70, types AUC-PR 0.80, recall 1.0 (deterministic).
    assert r["cleaning.values.planted"] == 61 and r["cleaning.types.planted"] == 11
    assert r["cleaning.values.auc_pr"] > 0.3 and r["cleaning.values.recall"] > 0.5
    assert r["cleaning.types.auc_pr"] > 0.5 and r["cleaning.types.recall"] >= 0.9


def test_fit_and_stage_with_upstream_edits(catalogue, tmp_path, ray_session):
    from autoknow_ray.catalogue.ingest import IngestStage
    from autoknow_ray.graph.assemble import GraphStage
    from autoknow_ray.modules.cleaning.fit import fit_cleaning
    from autoknow_ray.modules.cleaning.stage import CleaningStage
    from autoknow_ray.pipeline import RunContext, run_stages

    cfg = Config.model_validate({
        "stages": ["ingest", "taxonomy", "imputation", "cleaning", "graph"],
        "resources": {"cleaning": {"actors": 1, "cpus_per_actor": 1, "batch_size": 32}},
        # out-of-fold validation: at most 200 pairs a fold (claims and as many planted ones), not
        # every claim of the fold's products (546 and 686 pairs: most of fit's time)
        "cleaning": {"max_train_pairs": 96, "epochs": 1, "max_length": 48, "train_layers": 1,
                     "judge_types": True, "max_validation_pairs": 200},
    })
    ctx = RunContext(run_dir=tmp_path / "fit", catalogue=catalogue / "cat", cfg=cfg)
    run_stages([IngestStage()], ctx)
    stats = fit_cleaning(ctx, tmp_path / "models" / "cleaning")
    assert stats["train_pairs"] > 0
    # out-of-fold claims of 160 products, scored by one-epoch fold models, cannot show
    # precision 0.95 at a 5% error rate, so fit ships no value threshold: the module abstains
    # rather than act on a model it could not validate
    assert stats["threshold"] is None and "0.95" in stats["abstains"]["values"]
    assert stats["calibration"]["best_precision_lower"] < 0.95
    files = [p.name for p in (tmp_path / "models").rglob("*") if p.is_file()]
    assert "head.safetensors" in files and "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    (tmp_path / "models" / "manifest.json").write_text(json.dumps({"fingerprint": "test"}))

    # the catalogue to clean: bad input rows beside planted errors
    planted = plant(catalogue / "cat", tmp_path / "cat", rate=0.1, seed=1, take=40)
    products = pl.read_parquet(tmp_path / "cat" / "products.parquet").to_dicts()
    products[0]["title"] = ""
    products[1]["description"] = "<p>" + "x" * 1_000_000 + "</p>"
    products[2]["attributes"] = [{"name": "Color", "value": ""}]
    pl.DataFrame(products).write_parquet(tmp_path / "cat" / "products.parquet")
    run = RunContext(run_dir=tmp_path / "run", catalogue=tmp_path / "cat", cfg=cfg,
                     models=tmp_path / "models")
    run_stages([IngestStage()], run)
    p0 = products[3]
    tax = pl.DataFrame({"subject": [p0["product_id"]] * 2, "relation": ["has_type"] * 2,
                        "object": [p0["product_type"], "Definitely Not A Type"],
                        "module": ["taxonomy"] * 2, "status": ["removed", "corrected"]})
    write_table(tmp_path / "run" / "taxonomy" / "edits.parquet", tax, TRIPLES)
    imp = pl.DataFrame({"subject": [p0["product_id"], "unknown-product"], "relation": ["Color", "Color"],
                        "object": ["Red", "Blue"], "module": ["imputation"] * 2, "status": ["added"] * 2})
    write_table(tmp_path / "run" / "imputation" / "edits.parquet", imp, TRIPLES)

    # as fitted (`auto`): fit found no threshold reaching the target for values or types, so
    # the stage scores nothing, removes nothing, and says why
    auto = run_stages([CleaningStage()], run)[0]
    assert set(auto["abstained"]) == {"values", "types"} and auto["removed"] == 0
    assert read_parquet_any(run.table_path("cleaning", "edits")).height == 0
    # every claim is counted, dropped as abstained (the scored run below judges the same claims)
    assert auto["rows_out"] == 0 and auto["rows_dropped"] == {"abstained": auto["rows_in"]}
    assert auto["balance_checked"] and "rows_quarantined" not in auto and auto["rows_in"] > 100
    # thresholds a user sets are used as given: every claim is scored and judged
    run = RunContext(run_dir=tmp_path / "run", catalogue=tmp_path / "cat", models=tmp_path / "models",
                     cfg=cfg.model_copy(update={"cleaning": cfg.cleaning.model_copy(
                         update={"threshold": 0.99, "type_threshold": 0.99})}))
    results = run_stages([CleaningStage(), GraphStage()], run)
    counts = results[0]
    # ingest quarantined the product without a title and the one with a 1 MB description
    kept = set(read_parquet_any(run.table_path("ingest", "products"))["product_id"].to_list())
    assert len(kept) == 38
    assert counts["products"] == len(kept) and counts["triples_per_s"] > 0
    scores = read_parquet_any(run.table_path("cleaning", "scores"))
    # counts: scores rows in, edits out, each scores row without an edit dropped with its reason
    edits = read_parquet_any(run.table_path("cleaning", "edits"))
    assert counts["balance_checked"] and "rows_quarantined" not in counts
    assert (counts["rows_in"], counts["rows_out"]) == (scores.height, edits.height)
    assert scores.filter(pl.col("status") != "corrected").height == auto["rows_in"]
    unscored = scores["score"].is_null()
    assert counts["rows_dropped"] == {k: v for k, v in {
        "kept (scored under the threshold)": scores.filter(~unscored & (pl.col("status") == "kept")).height,
        "not scored (empty value)": int(unscored.sum()),
        "already removed upstream": scores.filter(pl.col("status") == "upstream_removed").height,
    }.items() if v}
    n_claims = sum(1 + len({(a["name"], a["value"]) for a in p["attributes"] or []})
                   for p in products if p["product_id"] in kept)
    # every catalogue claim is judged or reported (brand may repeat an attribute value)
    assert scores.filter(pl.col("origin") == "catalogue").height >= n_claims - planted["products"]
    assert scores.filter(pl.col("origin") == "taxonomy:corrected").height == 1
    assert scores.filter(pl.col("origin") == "imputation:added")["subject"].to_list() == [p0["product_id"]]
    # an empty value that reaches the stage is reported unscored, never judged (ingest may
    # already have dropped it)
    empty = scores.filter(pl.col("object").fill_null("").str.strip_chars() == "")
    assert empty.filter(pl.col("score").is_not_null()).height == 0
    assert pq.read_schema(next(run.table_path("cleaning", "edits").glob("*.parquet"))).equals(
        TRIPLES, check_metadata=False)
    assert set(edits["status"].to_list()) <= {"removed", "corrected"}
    for ev in edits.filter(pl.col("status") == "removed")["evidence"].to_list():
        assert "score" in json.loads(ev)
    triples = read_parquet_any(table_file(tmp_path / "run" / "graph", "triples"))
    # every removal names a fact of the graph, which keeps it with status removed
    removed = edits.filter(pl.col("status") == "removed").height
    assert triples.filter((pl.col("module") == "cleaning") & (pl.col("status") == "removed")).height == removed
    # the planted wrong values (gold/wrong_values) all reach the graph as catalogue facts and
    # are each judged: scored by the classifier and either kept or removed, never lost. A stage
    # that drops, skips or leaves claims unscored fails here.
    wrong = pl.read_parquet(tmp_path / "cat" / "gold" / "wrong_values.parquet")
    r = cleaning_eval.score(tmp_path / "run", tmp_path / "cat" / "gold")
    assert wrong.height == planted["wrong_values"] == 8
    assert r["cleaning.values.planted"] == wrong.height and r["cleaning.values.facts"] > 100
    judged = scores.filter(pl.col("origin") == "catalogue").join(
        wrong.rename({"product_id": "subject", "attribute": "relation", "value": "object"}),
        on=["subject", "relation", "object"], how="semi")
    assert judged.select("subject", "relation", "object").unique().height == wrong.height
    assert judged["score"].null_count() == 0
    # One epoch on 92 pairs ranks the planted values at chance (observed AUC-PR 0.065 against
    # their 8/117 = 0.068 share; with the older weighted-F1 threshold it removed 3 of 8 beside
    # 68 of 109 right values): the reason fit abstains above.
    assert counts["thresholds_used"] == {"value": 0.99, "type": 0.99} and "abstained" not in counts


# A catalogue whose every value is written in its title, so the right answer is known: a value
# the planter swaps in (another type's value of the same attribute, or, for an attribute only
# its type has, another type's attribute value) is misassigned, every other claim is right.
KNOWN_TYPES = {
    "Tea": ("Flavor", ["Peppermint", "Chamomile", "Earl Grey", "Jasmine", "Hibiscus", "Rooibos"],
            ["20 Bags", "40 Bags", "100 Bags"], ["Twinings", "Bigelow", "Yogi", "Pukka"]),
    "Shampoo": ("Scent", ["Lavender", "Coconut", "Tea Tree", "Argan Oil", "Citrus", "Rose"],
                ["12 oz", "16 oz", "33.8 oz"], ["Pantene", "Dove", "Herbal Essences", "Suave"]),
    "Socks": ("Color", ["Black", "Navy", "Grey", "White", "Red", "Olive"],
              ["Medium", "Large", "Small"], ["Hanes", "Bombas", "Darn Tough", "Gold Toe"]),
    "Coffee": ("Roast", ["Dark Roast", "Medium Roast", "Light Roast", "French Roast"],
               ["1 lb Bag", "2 lb Bag", "5 lb Bag"], ["Folgers", "Lavazza", "Peet's", "Starbucks"]),
}
# the model judges these few products on a catalogue where a quarter of the claims may be wrong,
# so a few hundred out-of-fold claims can show the target (at 5% errors it would need about a
# thousand: docs/safety.md); the type kind, one claim a product, needs about 200 products to
# show it (with none wrong: a 95% bound of 0.961 at 200, 0.937 at 120)
KNOWN_PRODUCTS = 200
KNOWN_CFG = {"max_train_pairs": 400, "epochs": 4, "max_length": 40, "train_layers": 1, "head_lr": 1e-2,
             "expected_error_rate": 0.25, "calibration_folds": 2}


def known_catalogue(n: int, seed: int, plant_every: int = 0, plant_type_every: int = 0):
    """`n` products (ids prefixed by the seed) and the planted set: (product, attribute, value)
    for every `plant_every`-th value claim replaced by a value its product's title does not say,
    or (product, "has_type", type) for every `plant_type_every`-th product moved to another type
    (its title and values unchanged)."""
    rng = random.Random(seed)
    names = sorted(KNOWN_TYPES)
    rows, planted, k = [], set(), 0
    for i in range(n):
        t = names[i % len(names)]
        attr, vals, sizes, brands = KNOWN_TYPES[t]
        v, size, brand = rng.choice(vals), rng.choice(sizes), rng.choice(brands)
        title = rng.choice([f"{brand} {v} {t}, {size}", f"{brand} {t} - {v} - {size}",
                            f"{v} {t} by {brand} ({size})"])
        facts = [(attr, v), ("Size", size), ("Brand", brand)]
        if plant_every:
            for j, (a, _) in enumerate(facts):
                k += 1
                if k % plant_every:
                    continue
                o = KNOWN_TYPES[rng.choice([x for x in names if x != t])]
                wrong = rng.choice(o[1] if a == attr else o[2] if a == "Size" else o[3])
                facts[j] = (a, wrong)
                planted.add((f"s{seed}-{i}", a, wrong))
        shown = t
        if plant_type_every and i % plant_type_every == plant_type_every - 1:
            shown = rng.choice([x for x in names if x != t])
            planted.add((f"s{seed}-{i}", "has_type", shown))
        rows.append({"product_id": f"s{seed}-{i}", "title": title, "description": None,
                     "product_type": shown,
                     "attributes": [{"name": a, "value": x} for a, x in facts if a != "Brand"],
                     "brand": dict(facts)["Brand"]})
    return pl.DataFrame(rows), planted


@pytest.fixture(scope="module")
def known_fit(tmp_path_factory):
    from autoknow_ray.modules.cleaning.fit import fit_on_products

    out = tmp_path_factory.mktemp("known") / "cleaning"
    products, _ = known_catalogue(KNOWN_PRODUCTS, seed=0)
    stats = fit_on_products(products, CleaningConfig(**KNOWN_CFG), out, seed=0, device="cpu")
    return products, stats, out


def test_cleaning_removes_the_planted_values_and_no_correct_one(known_fit):
    """What the module is for, through the stage's own step (no Ray): fitted on a clean
    catalogue, it removes exactly the values planted in another one and keeps every right claim."""
    import pyarrow as pa

    from autoknow_ray.modules.cleaning.steps import ScoreTriples
    from autoknow_ray.steps import WorkerEnv

    _, stats, model_dir = known_fit
    assert stats["threshold"] is not None and "values" not in stats.get("abstains", {})
    products, planted = known_catalogue(40, seed=1, plant_every=5)
    assert len(planted) == 24 and {a for _, a, _ in planted} >= {"Size", "Brand", "Flavor"}
    step = ScoreTriples(model_dir, None, True, False, False, "cpu")
    step.setup(WorkerEnv(cpu_threads=2))
    rows = pl.from_arrow(step.process_batch(pa.Table.from_pylist(products.to_dicts())))
    assert rows.height == 40 * 4 and rows["score"].null_count() == 0  # type + three values each
    removed = rows.filter(pl.col("status") == "removed")
    assert set(removed.select("subject", "relation", "object").iter_rows()) == planted
    assert removed.filter(pl.col("relation") == "has_type").height == 0


def test_out_of_fold_calibration_pools_every_product(known_fit):
    """The thresholds are calibrated on every claim of every fitted product, each scored by a
    model that never saw the product: more claims than one held-out split has."""
    from autoknow_ray.modules.cleaning.fit import _held_out
    from autoknow_ray.modules.cleaning.training_data import facts_of

    products, stats, _ = known_fit
    n = KNOWN_PRODUCTS
    on = stats["calibrated_on"]
    assert on["folds"] == 2 and on["products"] == products.height == n
    assert on["values"] == {"claims": facts_of(products).height, "planted": 3 * n}
    assert on["types"] == {"claims": n, "planted": n}
    assert stats["calibration"]["negatives"] == 3 * n  # the correct value claims calibrated on
    folds = stats["calibration_folds"]
    assert [f["fold"] for f in folds] == [0, 1] and not [f for f in folds if "skipped" in f]
    assert sum(f["claims"] for f in folds) == 4 * n
    assert all(0 < f["products"] < n and f["train_products"] == n - f["products"]
               and 0 < f["train_pairs"] <= KNOWN_CFG["max_train_pairs"] for f in folds)
    assert all(f["values_auc_pr"] > 0.9 for f in folds)
    held = sum(_held_out(p, 0, CleaningConfig().val_fraction) for p in products["product_id"])
    assert 4 * held < 4 * n  # the single split's claims (a type and three values per product)


def test_the_shipped_models_are_the_calibrated_fold_models(known_fit):
    """What ships is exactly what the calibration scored: one model per fold (no model trained
    on every product), and each fitted product is judged by the fold model that never saw it,
    so a rebuild on fit's own products gives each claim its out-of-fold score."""
    from autoknow_ray.modules.cleaning.model import MisassignmentScorer, fold_of

    products, stats, model_dir = known_fit
    assert stats["fold_models"] == 2 and stats["fold_seed"] == 0
    assert sorted(p.name for p in (model_dir / "folds").iterdir()) == ["0", "1"]
    assert not (model_dir / "encoder").exists() and not (model_dir / "head.safetensors").exists()
    scorer = MisassignmentScorer(model_dir, device="cpu", bf16=False)
    assert scorer.n_models == 2
    pids = products["product_id"].to_list()
    assert [scorer.fold(p) for p in pids] == [fold_of(p, 0, 2) for p in pids]
    # the fold sizes fit recorded are those of the products each fold model judges
    sizes = [sum(scorer.fold(p) == f for p in pids) for f in (0, 1)]
    assert sizes == [f["products"] for f in stats["calibration_folds"]]
    assert all(f["train_products"] == len(pids) - s for f, s in zip(stats["calibration_folds"], sizes))


def test_cleaning_removes_the_planted_types_and_no_correct_one(known_fit):
    """Product types judged by the shipped fold models at the calibrated type threshold: every
    product moved to another type loses that type, and no correctly typed product loses its type
    or a value. Both fold rules; `all_agree` removes a subset of what `own_fold` removes."""
    import pyarrow as pa

    from autoknow_ray.modules.cleaning.steps import ScoreTriples
    from autoknow_ray.steps import WorkerEnv

    _, stats, model_dir = known_fit
    assert stats["type_threshold"] is not None and "types" not in stats.get("abstains", {})
    products, planted = known_catalogue(40, seed=2, plant_type_every=4)
    assert len(planted) == 10
    moved = {pid for pid, _, _ in planted}
    removed = {}
    for rule in ("own_fold", "all_agree"):
        step = ScoreTriples(model_dir, None, True, False, False, "cpu", fold_rule=rule)
        step.setup(WorkerEnv(cpu_threads=2))
        rows = pl.from_arrow(step.process_batch(pa.Table.from_pylist(products.to_dicts())))
        assert rows.height == 40 * 4 and rows["score"].null_count() == 0
        gone = rows.filter(pl.col("status") == "removed")
        types = set(gone.filter(pl.col("relation") == "has_type")
                    .select("subject", "relation", "object").iter_rows())
        removed[rule] = set(gone.select("subject", "relation", "object").iter_rows())
        if rule == "own_fold":
            assert types == planted
        else:
            assert types <= planted and len(types) >= 8
        # no claim of a correctly typed product is removed
        assert gone.filter(~pl.col("subject").is_in(list(moved))).height == 0
    assert removed["all_agree"] <= removed["own_fold"]


def test_text_features_tell_a_written_value_from_a_typo_and_an_absent_one():
    from autoknow_ray.modules.cleaning.model import TEXT_FEATURES, text_features

    title = "Hills Bros. Mint Chocolate Drink Mix, 12 Count"
    text = title + " . Ships fast. UPC: 012345678905"
    exact = text_features("Mint Chocolate", title, text)
    typo = text_features("Mnit Chocolaet", title, text)
    absent = text_features("Vanilla Bean", title, text)
    upc = text_features("012345678905", title, text)
    assert len(exact) == len(TEXT_FEATURES)
    assert exact[:4] == [1.0, 1.0, 1.0, 1.0]
    assert typo[0] == 0.0 and absent[0] == 0.0 and typo[1] > absent[1]
    assert upc[0] == 1.0 and upc[3] == 0.0  # in the description, not in the title
    assert text_features("", title, text) == [0.0] * len(TEXT_FEATURES)


def test_auto_threshold_prefers_the_highest_of_near_equal_ones():
    import numpy as np

    from autoknow_ray.modules.cleaning.fit import choose_threshold

    # clean claims score up to 0.6, misassigned ones from 0.7: every threshold in (0.6, 0.7]
    # separates them; with a tolerance the highest such one is taken
    scores = np.array([0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    low, stats = choose_threshold(scores, labels, 0.05, 0.5)
    assert low == 0.7 and stats["val_weighted_f1"] == 1.0
    high, _ = choose_threshold(scores, labels, 0.05, 0.5, tolerance=0.2)
    assert high > low  # a little recall traded for fewer removals
    assert choose_threshold(scores, np.zeros(8), 0.05, 0.5)[0] == 0.5


def test_edits_held_back_by_the_shift_guard_are_counted_as_dropped():
    """The stage's balance where the guard holds a kind back: scores rows = edits written +
    rows dropped, the held kind's removals and corrections under their own reason."""
    import pyarrow as pa

    from autoknow_ray.modules.cleaning.stage import _edits_only, _status_kind, dropped_rows
    from autoknow_ray.pipeline import check_balance
    from autoknow_ray.schema import CLEANING_SCORES

    def row(rel, obj, origin, score, status):
        return {"subject": "p", "relation": rel, "object": obj, "origin": origin, "score": score,
                "module": "cleaning", "status": status, "confidence": None, "evidence": None}

    scores = pa.Table.from_pylist([
        row("has_type", "Tea", "catalogue", 0.9, "removed"),
        row("has_type", "Mug", "taxonomy:corrected", 0.95, "removed"),
        row("has_type", "Tea", "catalogue", 0.9, "corrected"),
        row("Flavor", "Mint", "catalogue", 0.8, "removed"),
        row("Flavor", "Lemon", "imputation:added", 0.1, "kept"),
        row("Flavor", "Lemon", "imputation:added", 0.1, "corrected"),
        row("Size", "", "catalogue", None, "kept"),
        row("Color", "Red", "catalogue", 0.2, "upstream_removed"),
        row("Brand", "Yogi", "catalogue", 0.3, "kept"),
    ], schema=CLEANING_SCORES)
    kinds = pl.from_arrow(_status_kind(scores))
    counts = {f"{s}.{k}": n for s, k, n in kinds.group_by("status", "kind").len().iter_rows()}
    for held, written in (([], 5), (["types"], 2), (["values"], 3), (["types", "values"], 0)):
        edits = _edits_only(scores, "types" in held, "values" in held)
        dropped = dropped_rows(counts, held)
        assert edits.num_rows == written
        check_balance("cleaning", scores.num_rows, edits.num_rows, dropped=dropped)
        assert dropped["kept (scored under the threshold)"] == 2
        assert dropped["not scored (empty value)"] == dropped["already removed upstream"] == 1
    assert dropped["held back by the shift guard (types)"] == 3
    assert dropped["held back by the shift guard (values)"] == 2


def test_shift_guard_holds_back_a_kind_flagged_far_above_fits_expectation():
    from autoknow_ray.modules.cleaning.config import CleaningConfig
    from autoknow_ray.modules.cleaning.stage import shift_guard

    meta = {"expected_flagged_share": 0.02, "type_expected_flagged_share": 0.05}
    cfg = CleaningConfig()  # shift_factor 3
    # values: 60 of 1,000 flagged = 3x the expected 2% -> not over; types: 40 of 200 = 4x -> held
    counts = {"removed.catalogue_value": 50, "removed.upstream_value": 10, "kept.catalogue_value": 940,
              "removed.catalogue_type": 30, "removed.upstream_type": 10, "kept.catalogue_type": 160}
    g = shift_guard(counts, meta, cfg, (True, True))
    assert not g["values"]["held_back"] and g["values"]["flagged_share"] == 0.06
    assert g["types"]["held_back"] and "unlike the fit's" in g["types"]["reason"]
    # a threshold the user set is the user's: never held back
    assert not shift_guard(counts, meta, cfg, (True, False))["types"]["held_back"]
    # under 5 flagged claims say nothing about a shift
    small = {"removed.catalogue_type": 4, "kept.catalogue_type": 6}
    assert not shift_guard(small, meta, cfg, (True, True))["types"]["held_back"]


def test_guard_holds_back_a_kind_whose_flagged_share_implies_too_few_errors():
    """Fit shows precision 0.95 at 5% misassigned claims; a rebuild that flags far fewer shows a
    catalogue with far fewer errors, where the same false-removal rate makes most removals false
    alarms (the AE-110K types: 1 of 305 flagged, a correct type). Such a kind is held back; one
    flagging about what fit expects is not."""
    from autoknow_ray.modules.cleaning.stage import precision_at_rate, shift_guard

    # fit's out-of-fold figures at the type threshold (AE-110K): recall 0.9482 of 1,254 planted,
    # no false removal among 1,254 correct claims; 0.0474 flagged expected at 5% errors
    meta = {"type_calibration": {"recall": 0.9482, "positives": 1254, "negatives": 1254},
            "type_val_false_removal_rate": 0.0, "type_expected_flagged_share": 0.04741}
    cfg = CleaningConfig()
    at_fit = precision_at_rate(round(0.04741 * 3000), 3000, meta, "type_")
    assert abs(at_fit["implied_error_rate"] - 0.05) < 0.002  # fit's own rate is recovered
    assert at_fit["precision_lower_at_rate"] >= 0.95
    one = shift_guard({"removed.upstream_type": 1, "kept.upstream_type": 304}, meta, cfg, (True, True))
    assert one["types"]["held_back"] and "too few errors" in one["types"]["reason"]
    assert one["types"]["implied_error_rate"] < 0.005 and one["types"]["precision_lower_at_rate"] < 0.7
    many = shift_guard({"removed.upstream_type": 20, "kept.upstream_type": 285}, meta, cfg, (True, True))
    assert not many["types"]["held_back"] and many["types"]["precision_lower_at_rate"] >= 0.95
    # a threshold the user set is the user's; nothing flagged holds nothing back
    assert not shift_guard({"removed.upstream_type": 1, "kept.upstream_type": 304}, meta, cfg,
                           (True, False))["types"]["held_back"]
    assert not shift_guard({"kept.upstream_type": 305}, meta, cfg, (True, True))["types"]["held_back"]


@pytest.mark.parametrize("bf16", [False, True])
def test_a_claims_score_does_not_depend_on_the_other_claims_of_its_batch(known_fit, bf16, monkeypatch):
    """The scorer batches only pairs of one token length (no padding), runs its per-claim heads
    one row at a time and turns logits into probabilities one at a time (`model.probabilities`),
    so a claim's score is bit-identical whatever else the batch holds and in whatever order the
    products arrive:
    rows in another order, or another split into blocks, give the same removals and the same
    confidences (which an incremental rebuild that reuses scores needs too)."""
    import random

    import pyarrow as pa

    from autoknow_ray.modules.cleaning import model as cleaning_model
    from autoknow_ray.modules.cleaning.steps import ScoreTriples
    from autoknow_ray.nn.encoder import same_length_batches
    from autoknow_ray.steps import WorkerEnv

    _, _, model_dir = known_fit
    # the whole table's length buckets must fill batches and leave tails (at 40 products and
    # batches of 64 none did, and a vectorised sigmoid's tail still moved 11 of 800 scores by an
    # ulp). Each fold model scores its own products' pairs, so a bucket holds a few dozen pairs:
    # at 200 products (800 claims) the largest held 50, and batches of 64 never filled. Batches
    # of 16 on 100 products fill and leave tails (checked below), on half the claims
    n, batch = 100, 16
    products, _ = known_catalogue(n, seed=1, plant_every=5)
    step = ScoreTriples(model_dir, None, True, False, bf16, "cpu")
    step.setup(WorkerEnv(cpu_threads=2, batch_size=batch))
    calls = []  # per call of the scorer (one fold model's pairs): (token length, pairs) per batch

    def spy(lengths, batch_size):
        out = same_length_batches(lengths, batch_size)
        calls.append([(lengths[b[0]], len(b)) for b in out])
        return out

    monkeypatch.setattr(cleaning_model, "same_length_batches", spy)

    def scores(rows: list[dict], blocks: int) -> dict:
        out = {}
        for b in range(blocks):
            part = rows[b::blocks]
            got = pl.from_arrow(step.process_batch(pa.Table.from_pylist(part)))
            for s, r, o, score in got.select("subject", "relation", "object", "score").iter_rows():
                out[(s, r, o)] = score
        return out

    rows = products.to_dicts()
    whole = scores(rows, 1)
    assert len(whole) == n * 4
    buckets = {}
    for k, call in enumerate(calls):
        for length, size in call:
            buckets.setdefault((k, length), []).append(size)
    filled = [b for b in buckets.values() if b[0] == batch]
    assert len(filled) >= 3 and any(0 < b[-1] < batch for b in filled), sorted(buckets.values())
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    # one pass changes both: another order, and 17 blocks of 5-6 products (batches of other
    # sizes and other neighbours than the whole table's)
    other = scores(shuffled, 17)
    assert other.keys() == whole.keys()
    differ = [k for k in whole if other[k] != whole[k]]
    assert not differ, (len(differ), differ[:3])


def test_an_incremental_rebuild_reuses_claim_scores_and_gives_the_full_rebuilds_edits(known_fit, tmp_path,
                                                                                     ray_session):
    """`rebuild --previous`: the scorer's claim scores are reused for every product whose claims,
    text and type are unchanged and recomputed for the rest (changed values, new products);
    the scores and edits equal a full rebuild's with the same models, and a planted value the
    change introduced is removed."""
    from autoknow_ray.catalogue.ingest import IngestStage
    from autoknow_ray.modules.cleaning.stage import CleaningStage
    from autoknow_ray.pipeline import RunContext, run_stages

    _, _, model_dir = known_fit
    products, _ = known_catalogue(60, seed=4, plant_every=7)
    extra, _ = known_catalogue(3, seed=5)
    rows = products.to_dicts()
    # B: 3 products with a value replaced by another type's, 2 removed, 3 added
    changed = [rows[i]["product_id"] for i in (10, 20, 30)]
    names = sorted(KNOWN_TYPES)
    for i in (10, 20, 30):
        a = rows[i]["attributes"]
        other = KNOWN_TYPES[names[(names.index(rows[i]["product_type"]) + 1) % len(names)]][1][0]
        rows[i]["attributes"] = [{"name": a[0]["name"], "value": other}, *a[1:]]
    b_rows = rows[2:] + extra.to_dicts()

    def write(folder, table):
        folder.mkdir()
        pl.DataFrame(table).write_parquet(folder / "products.parquet")

    write(tmp_path / "a", products.to_dicts())
    write(tmp_path / "b", b_rows)
    cfg = Config.model_validate({
        "stages": ["ingest", "cleaning"],
        "resources": {"cleaning": {"actors": 1, "cpus_per_actor": 1, "batch_size": 32}},
        "cleaning": {**KNOWN_CFG, "threshold": 0.5, "type_threshold": 0.5, "judge_types": True}})
    models = model_dir.parent
    if not (models / "manifest.json").exists():
        (models / "manifest.json").write_text(json.dumps({"fingerprint": "test"}))
    results = {}
    for run, cat, previous in (("run_a", "a", None), ("run_inc", "b", "run_a"), ("run_full", "b", None)):
        ctx = RunContext(run_dir=tmp_path / run, catalogue=tmp_path / cat, cfg=cfg, models=models,
                         previous=tmp_path / previous if previous else None)
        results[run] = run_stages([IngestStage(), CleaningStage()], ctx)[1]
    inc, full = results["run_inc"], results["run_full"]
    assert results["run_a"]["products_recomputed"] == 60
    assert inc["products_reused"] == 60 - 2 - 3 and inc["products_recomputed"] == 3 + 3
    assert inc["products_added"] == 3 and inc["products_removed"] == 2
    assert full["products_reused"] == 0 and full["triples_scored"] == inc["triples_scored"]

    def table(run, name):
        t = read_parquet_any(table_file(tmp_path / run / "cleaning", name))
        return t.sort([c for c in t.columns]) if t.height else t

    for name in ("scores", "edits"):
        assert table("run_inc", name).equals(table("run_full", name)), name
    # the changed products were scored again, not taken from A: their cached scores differ
    from autoknow_ray.incremental import cache_dir

    def cached(run):
        return read_parquet_any(cache_dir(tmp_path / run / "cleaning", "claim_scores"),
                                ["product_id", "cache_key", "claim_scores"]).sort("product_id")

    assert cached("run_inc").equals(cached("run_full"))
    old, new = (cached(r).filter(pl.col("product_id").is_in(changed)) for r in ("run_a", "run_full"))
    assert old.height == new.height == 3 and not old["claim_scores"].equals(new["claim_scores"])
    # and the stage still does its work on them: most of the swapped-in values are removed
    removed = table("run_full", "edits").filter(pl.col("status") == "removed")
    assert len(set(removed["subject"].to_list()) & set(changed)) >= 2
