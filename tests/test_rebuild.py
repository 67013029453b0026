"""End to end, as a user runs it: fit on one catalogue, rebuild another (untyped) one, eval."""
from __future__ import annotations

import json
import shutil

import polars as pl
import pyarrow.parquet as pq
import pytest

from autoknow_ray.catalogue.synth import synthesize
from autoknow_ray.cli import main
from autoknow_ray.pipeline import read_parquet_any, table_file
from autoknow_ray.schema import GRAPH_TABLES
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "test.yaml")


@pytest.fixture(scope="module")
def fitted(taxonomy_models):
    # the session's fit (tests/conftest.py): 400 generated products (seed 0, 12 types), test.yaml
    root = taxonomy_models
    train = root / "train"
    # the held-out catalogue: the same world, every product's type and attributes hidden
    blind = root / "blind"
    (blind / "gold").mkdir(parents=True)
    products = pl.read_parquet(train / "products" / "*.parquet").head(150)
    products = products.with_columns(pl.lit(None, pl.String).alias("product_type"),
                                     pl.lit(None, pl.String).alias("brand"),
                                     pl.col("attributes").list.head(0))
    products.write_parquet(blind / "products.parquet")
    shutil.copy(train / "taxonomy.parquet", blind / "taxonomy.parquet")
    gold_types = pl.read_parquet(train / "gold" / "types" / "*.parquet")
    gold_types.filter(pl.col("product_id").is_in(products["product_id"].to_list())).write_parquet(
        blind / "gold" / "types.parquet")
    return root


def test_fit_writes_safetensors_artifacts_only(fitted):
    models = fitted / "models"
    manifest = json.loads((models / "manifest.json").read_text())
    assert manifest["modules"]["taxonomy"]["tagger"]["n_examples_with_spans"] > 0
    files = [p.name for p in models.rglob("*") if p.is_file()]
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".pkl", ".pickle"))]
    assert not (models / "_work").exists()  # fit's ingested copy of the catalogue is gone


def test_rebuild_with_models_then_eval(fitted, capsys):
    run = fitted / "run"
    assert main(["rebuild", "--catalogue", str(fitted / "blind"), "--out", str(run),
                 "--models", str(fitted / "models"), "--config", CONFIG]) == 0
    out = capsys.readouterr().out
    assert "graph:" in out and "report:" in out
    for name, schema in GRAPH_TABLES.items():
        path = table_file(run / "graph", name)
        shards = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
        assert shards, name
        for shard in shards:
            assert pq.read_schema(shard).equals(schema, check_metadata=False), (name, shard)
    triples = read_parquet_any(table_file(run / "graph", "triples"))
    types = triples.filter(pl.col("relation") == "has_type")
    assert set(types["status"].to_list()) <= {"added"}
    assert types["subject"].n_unique() >= 140  # nearly every untyped product gets a type
    attrs = triples.filter(pl.col("relation") != "has_type")
    assert attrs.height > 0 and set(attrs["module"].to_list()) == {"taxonomy"}
    report = json.loads((run / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["ingest", "taxonomy", "graph"]
    # one CPU precision for the run: fit's, on this machine
    precision = json.loads((run / "precision.json").read_text())
    assert precision == {"cpu_bf16": json.loads((fitted / "models" / "precision.json").read_text())["cpu_bf16"],
                         "decided_by": "the models' fit, on this kind of CPU"}
    assert report["stages"][1]["rows_in"] == 150
    floors = json.loads((run / "taxonomy" / "manifest.json").read_text())["knn_floors"]
    assert floors["source"] == "fit" and floors["untyped_sample"] < 50  # too few to estimate from
    assert main(["eval", "--run", str(run), "--gold", str(fitted / "blind" / "gold")]) == 0
    results = json.loads((run / "eval.json").read_text())
    # 12 types; chance is ~0.1. Short training still has to find most of them.
    assert results["type_extraction.f1"] > 0.6, results


def test_knn_floors_follow_the_catalogues_own_share_of_known_type_products(fitted, tmp_path):
    """With no tagger type to lean on, every blind product goes to the kNN vote. They are all of
    known types (the blind catalogue is the fit's own products, labels hidden), which the rebuild
    reads off a sample of them: their floors come from fit's grid at a high known share."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text((REPO / "configs" / "test.yaml").read_text()
                   + "  types: {min_span_score: 1.0, title_names: false, title_heads: false}\n")
    run = tmp_path / "run"
    assert main(["rebuild", "--catalogue", str(fitted / "blind"), "--out", str(run),
                 "--models", str(fitted / "models"), "--config", str(cfg)]) == 0
    manifest = json.loads((run / "taxonomy" / "manifest.json").read_text())
    floors = manifest["knn_floors"]
    assert floors["source"].startswith("fit grid") and floors["untyped_sample"] >= 140, floors
    assert floors["known_share"] > 0.8, floors
    # with a known share above one half, the choice answers at least as many known-type
    # validation titles right as fit's balanced choice (and pays for it in forced ones)
    fit_floors = json.loads((fitted / "models" / "taxonomy" / "knn_floors.json").read_text())
    assert floors["known_answered_right"] >= fit_floors["known_answered_right"] - 1e-3, floors
    # the grid lives in the models folder, not in the manifest `autoknow fit` prints
    fit_manifest = json.loads((fitted / "models" / "manifest.json").read_text())
    assert "grid" in fit_floors and "grid" not in fit_manifest["modules"]["taxonomy"]["knn_floors"]
    assert manifest["types_unresolved"] <= 5, manifest["types_unresolved_reasons"]


def test_rebuild_rerun_skips_finished_stages(fitted, capsys):
    run = fitted / "run"
    assert main(["rebuild", "--catalogue", str(fitted / "blind"), "--out", str(run),
                 "--models", str(fitted / "models"), "--config", CONFIG]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped (up to date)") == 3  # ingest, taxonomy, graph; report always runs


def test_bad_inputs_give_clear_errors(tmp_path, capsys, ray_session):
    assert main(["rebuild", "--catalogue", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "catalogue directory not found" in capsys.readouterr().err
    (tmp_path / "cfg.yaml").write_text("taxonomy:\n  tagger:\n    epoks: 3\n")
    assert main(["rebuild", "--catalogue", str(tmp_path), "--out", str(tmp_path / "r"),
                 "--config", str(tmp_path / "cfg.yaml")]) == 2
    assert "epoks" in capsys.readouterr().err  # unknown keys are rejected, by name


def test_taxonomy_only_catalogue_fits_and_places_its_orphans(tmp_path, capsys, ray_session):
    """A catalogue with a taxonomy and no products (an Open Food Facts-like import): fit learns the
    hypernym classifier from the type edges and skips the tagger; the rebuild places the orphans
    and eval scores them from the run's files."""
    parents = {"coffee": "drinks", "tea": "drinks", "juice": "drinks", "soda": "drinks",
               "cheese": "dairy", "milk": "dairy", "yogurt": "dairy", "butter": "dairy",
               "apples": "fruit", "pears": "fruit", "bananas": "fruit", "cherries": "fruit"}
    hidden = {"green tea": "drinks", "cheddar cheese": "dairy", "plums": "fruit"}
    cat = tmp_path / "cat"
    (cat / "gold").mkdir(parents=True)
    rows = [(t, p) for t, p in parents.items()] + [(p, None) for p in set(parents.values())]
    rows += [(t, None) for t in hidden]
    pl.DataFrame(rows, schema={"type": pl.String, "parent": pl.String}, orient="row").write_parquet(
        cat / "taxonomy.parquet")
    pl.DataFrame({"product_id": [], "title": []}, schema={"product_id": pl.String, "title": pl.String}
                 ).write_parquet(cat / "products.parquet")
    pl.DataFrame({"child": list(hidden), "child_kind": ["type"] * 3, "parent": list(hidden.values()),
                  "depth": [1] * 3}, schema_overrides={"depth": pl.Int32}).write_parquet(
        cat / "gold" / "hypernyms.parquet")
    models, run = tmp_path / "models", tmp_path / "run"
    assert main(["fit", "--catalogue", str(cat), "--out", str(models), "--config", CONFIG]) == 0
    manifest = json.loads((models / "manifest.json").read_text())["modules"]["taxonomy"]
    assert "skipped" in manifest["tagger"] and manifest["hypernym"]["type_edges"] > 0
    assert main(["rebuild", "--catalogue", str(cat), "--out", str(run), "--models", str(models),
                 "--config", CONFIG]) == 0
    ranked = pl.read_parquet(run / "taxonomy" / "hypernym_candidates.parquet")
    assert set(ranked["type"].to_list()) == set(hidden)
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--gold", str(cat / "gold")]) == 0
    scores = json.loads((run / "eval.json").read_text())
    assert scores["hypernym.type.children"] == 3
    # three candidate parents, so acc@3 is 1.0 for any ranking: the first place is the test
    assert scores["hypernym.type.acc@1"] >= 2 / 3, scores


def _edits_shards(folder, products: pl.DataFrame) -> pl.DataFrame:
    """Module edits over a product table, in three shards: corrections, retractions, additions,
    and ties (equal-confidence additions of one fact) whose winner must not depend on order."""
    from autoknow_ray.schema import TRIPLES

    ids = products["product_id"].to_list()
    rows = []
    for i, pid in enumerate(ids):
        if i % 3 == 0:
            rows.append((pid, "has_type", "retyped", 0.9, "taxonomy", "corrected", f"e{i}"))
        if i % 4 == 0:
            rows += [(pid, "Flavor", "Mint", 0.5, "taxonomy", "added", "tie-b"),
                     (pid, "Flavor", "Mint", 0.5, "taxonomy", "added", "tie-a")]
        if i % 5 == 0:
            t = products["product_type"][i]
            if t is not None:
                rows.append((pid, "has_type", t, 0.8, "taxonomy", "removed", "wrong"))
    edits = pl.DataFrame(rows, schema=["subject", "relation", "object", "confidence", "module",
                                       "status", "evidence"], orient="row").with_columns(
        pl.col("confidence").cast(pl.Float32))
    folder.mkdir(parents=True)
    for k, part in enumerate(edits.sample(fraction=1.0, shuffle=True, seed=1).iter_slices(
            n_rows=edits.height // 3 + 1)):
        pq.write_table(part.to_arrow().cast(TRIPLES), folder / f"part-{k}.parquet")
    return edits


def test_two_graph_builds_give_identical_triples(tmp_path, ray_session):
    """The graph is written by the workers, hash-partitioned by subject: two builds of the same
    catalogue and edits give the same content, and it equals the edit rules applied in one frame."""
    from autoknow_ray.catalogue.ingest import IngestStage
    from autoknow_ray.config import Config
    from autoknow_ray.graph.assemble import GraphStage, apply_edits, catalogue_triples
    from autoknow_ray.pipeline import RunContext, run_stages

    cat = tmp_path / "cat"
    synthesize(300, cat, seed=3, n_types=8)
    cfg = Config(stages=["ingest", "taxonomy", "graph"])
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        ctx = RunContext(run_dir=run, catalogue=cat, cfg=cfg)
        run_stages([IngestStage()], ctx)
        products = ctx.read("ingest", "products")
        # a finished module stage folder, as module 1 leaves it
        edits = _edits_shards(run / "taxonomy" / "edits", products)
        (run / "taxonomy" / "manifest.json").write_text(json.dumps(
            {"stage": "taxonomy", "fingerprint": "fixed", "complete": True}))
        run_stages([GraphStage()], ctx)
        assert (run / "graph" / "triples").is_dir()
        runs.append(read_parquet_any(table_file(run / "graph", "triples")))
    order = ["subject", "relation", "object", "status", "module", "evidence"]
    a, b = (t.sort(order) for t in runs)
    assert a.height > products.height and a.equals(b)
    expected = apply_edits(catalogue_triples(products), edits.sort(
        ["subject", "relation", "object", "status", "confidence", "module", "evidence"],
        descending=[False, False, False, False, True, False, False]))
    assert a.equals(expected.sort(order).select(a.columns))
    ties = a.filter(pl.col("relation") == "Flavor", pl.col("status") == "added")
    assert set(ties["evidence"].to_list()) == {"tie-a"}
    m = json.loads((tmp_path / "a" / "graph" / "manifest.json").read_text())
    assert m["status_counts"] == dict(a.group_by("status").len().rows())
    assert m["facts_after"]["has_type"] == a.filter(pl.col("relation") == "has_type",
                                                    pl.col("status") != "removed").height


def test_edit_partition_matches_apply_edits_in_any_row_order():
    """One subject partition, rows in two different orders: the same sorted triples, equal to
    the edit rules applied in one frame."""
    import pyarrow as pa

    from autoknow_ray.graph.assemble import (ORIGIN, TRIPLES_WITH_ORIGIN, apply_edits,
                                             edit_partition)

    rows = [("p1", "has_type", "tea", 1.0, "catalogue", "kept", "catalogue", -1),
            ("p1", "Flavor", "Mint", 1.0, "catalogue", "kept", "catalogue", -1),
            ("p1", "has_type", "tea", 0.8, "taxonomy", "removed", "x", 0),
            ("p1", "has_type", "coffee", 0.9, "taxonomy", "corrected", "x", 0),
            ("p1", "Size", "12 oz", 0.5, "taxonomy", "added", "tie-b", 0),
            ("p1", "Size", "12 oz", 0.5, "taxonomy", "added", "tie-a", 0),
            ("p1", "has_type", "coffee", 0.7, "cleaning", "removed", "y", 3)]
    cols = [*TRIPLES_WITH_ORIGIN.names]
    table = pa.Table.from_pylist([dict(zip(cols, r)) for r in rows], schema=TRIPLES_WITH_ORIGIN)
    one = pl.from_arrow(edit_partition(table))
    two = pl.from_arrow(edit_partition(table.take(list(reversed(range(len(rows)))))))
    assert one.equals(two)
    frame = pl.from_arrow(table)
    base = frame.filter(pl.col(ORIGIN) == -1).drop(ORIGIN)
    for origin in (0, 3):
        base = apply_edits(base, frame.filter(pl.col(ORIGIN) == origin).drop(ORIGIN).sort(
            "evidence"))
    assert one.equals(base.sort(["subject", "relation", "object", "status"]))
    status = {(r, o): s for r, o, s in one.select("relation", "object", "status").iter_rows()}
    assert status == {("has_type", "tea"): "removed", ("has_type", "coffee"): "removed",
                      ("Flavor", "Mint"): "kept", ("Size", "12 oz"): "added"}
    assert one.filter(pl.col("relation") == "Size")["evidence"].to_list() == ["tie-a"]


def _hostile_catalogue(blind, d):
    """The blind catalogue with rows a real one has: an id listed twice (the second listing
    different), an empty and a blank title, a product stating one fact twice, texts and
    behaviour about products the catalogue lacks, an empty text."""
    (d / "products").mkdir(parents=True)
    products = pl.read_parquet(blind / "products.parquet")
    products.write_parquet(d / "products" / "part-0.parquet")
    first = products["product_id"][0]
    hostile = [
        {"product_id": first, "title": "Second listing under a taken id", "brand": "Dupe Co",
         "attributes": [{"name": "Flavor", "value": "Cherry"}]},
        {"product_id": "empty-title", "title": ""},
        {"product_id": "blank-title", "title": "   "},
        {"product_id": "twice", "title": "Acme Mint Tea 20 Count", "brand": "Acme",
         "attributes": [{"name": "Flavor", "value": "Mint"}, {"name": "Flavor", "value": "Mint"}]},
    ]
    # after part-0 by (file, row): the first listing of the taken id stays the kept one
    (d / "products" / "part-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hostile))
    shutil.copy(blind / "taxonomy.parquet", d / "taxonomy.parquet")
    (d / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"product_id": first, "kind": "review", "text": "tastes right"},
        {"product_id": first, "kind": "review", "text": ""},
        {"product_id": "ghost", "kind": "review", "text": "about nothing we sell"}]))
    (d / "behavior.csv").write_text(f"query,product_id,action,count\ntea,{first},view,2\n"
                                    "tea,ghost,click,1\ntea,phantom,view,4\n")
    return d, first


def test_a_hostile_catalogue_balances_at_every_stage(fitted, tmp_path):
    """Rebuilt with modules 1 and 2 (and the stages around them): each stage that checks its balance
    holds it, the counts name every drop, and the duplicate listing keeps its content in the
    quarantine."""
    cat, first = _hostile_catalogue(fitted / "blind", tmp_path / "cat")
    cfg = tmp_path / "cfg.yaml"
    # module 2's fit is short (what is checked is each stage's balance with a fitted model, not
    # the model's quality): 50 epochs, 2 folds and 20 trees instead of 400, 5 and 100
    cfg.write_text((REPO / "configs" / "test.yaml").read_text().replace(
        "stages: [ingest, taxonomy, graph, report]",
        "stages: [ingest, taxonomy, relations, imputation, graph, report]")
        + "relations: {epochs: 50, folds: 2, gbt_rounds: 20}\n")
    # module 2's model beside the shared fixture's module 1
    models = tmp_path / "models"
    shutil.copytree(fitted / "models", models)
    assert main(["fit", "--catalogue", str(fitted / "train"), "--out", str(models),
                 "--config", str(cfg), "--modules", "relations"]) == 0
    run = tmp_path / "run"
    assert main(["rebuild", "--catalogue", str(cat), "--out", str(run),
                 "--models", str(models), "--config", str(cfg)]) == 0
    relations = json.loads((run / "relations" / "manifest.json").read_text())
    assert relations["rows_in"] == 151 and relations["rows_out"] > 0
    m = {s: json.loads((run / s / "manifest.json").read_text())
         for s in ("ingest", "taxonomy", "imputation", "graph", "report")}
    products = m["ingest"]["tables"]["products"]
    # 150 + 4 rows: the duplicate and both empty titles quarantined, 151 products kept
    assert (products["rows_in"], products["rows_out"], products["rows_quarantined"]) == (154, 151, 3)
    assert m["ingest"]["tables"]["texts"]["unknown_product"] == 1
    assert m["ingest"]["tables"]["behavior"]["unknown_product"] == 2
    for name, manifest in m.items():
        assert manifest["units"]["rows_in"] and manifest["units"]["rows_out"], name
        assert manifest["balance_checked"], name
        dropped = sum((manifest.get("rows_dropped") or {}).values())
        assert manifest["rows_in"] == (manifest["rows_out"] + (manifest.get("rows_quarantined") or 0)
                                       + dropped), name
    # per product: one typed product per product; imputation had no model and says so per product
    assert m["taxonomy"]["per_product"] and m["taxonomy"]["rows_in"] == m["taxonomy"]["rows_out"] == 151
    assert "rows_quarantined" not in m["taxonomy"]  # it has no quarantine to count
    assert m["imputation"]["rows_out"] == 0 and m["imputation"]["rows_dropped"] == {
        "no imputation model": 151}
    # the graph: catalogue facts as stated (the repeated Mint too) and module 1's edits in
    graph = m["graph"]
    assert graph["rows_dropped"]["duplicate catalogue fact (one kept)"] == 1
    assert graph["rows_in"] == graph["catalogue_facts_stated"] + sum(graph["edits"].values())
    dropped = read_parquet_any(table_file(run / "graph", "dropped"))
    assert dropped.filter(pl.col("reason").str.starts_with("duplicate catalogue fact"))[
        "subject"].to_list() == ["twice"]
    # the duplicate listing: its reason and its whole row, not its id alone
    q = read_parquet_any(table_file(run, "quarantine"))
    dup = q.filter(pl.col("reason").str.starts_with("duplicate product_id"))
    assert dup.height == 1 and dup["product_id"][0] == first
    raw = json.loads(dup["raw"][0])
    assert raw["title"] == "Second listing under a taken id" and raw["brand"] == "Dupe Co"
    assert raw["attributes"] == [{"name": "Flavor", "value": "Cherry"}]
    # the report page shows every stage's balance and units
    report = json.loads((run / "report.json").read_text())
    assert all(s["balanced"] for s in report["stages"] if s["stage"] in m), report["stages"]
    page = (run / "report.html").read_text()
    assert "products → typed products; one out per product" in page
    assert "duplicate catalogue fact (one kept)" in page
