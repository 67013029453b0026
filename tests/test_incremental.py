"""Incremental rebuilds (`rebuild --previous RUN`): the graph a full rebuild gives, at the cost of
what changed. A small catalogue is rebuilt in full (A); then 2% of its titles are edited, 1% of
products added and 1% removed (B); B is rebuilt incrementally from A's run and in full from
scratch with the same models, and the two must agree on every graph table and every per-product
model output, with the manifest counting what was reused and what was recomputed."""
from __future__ import annotations

import hashlib
import json
import shutil

import polars as pl
import pytest

from autoknow_ray.cli import main
from autoknow_ray.pipeline import read_parquet_any, table_file
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "test.yaml")
N, EDITED, ADDED, REMOVED = 300, 6, 3, 3  # 2% edited, 1% added, 1% removed


def _catalogue(folder, products: pl.DataFrame, taxonomy_file):
    folder.mkdir(parents=True)
    products.write_parquet(folder / "products.parquet")
    shutil.copy(taxonomy_file, folder / "taxonomy.parquet")


def _tree_digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, taxonomy_models):
    """A, B and module 1's models: the session's fit (tests/conftest.py, test.yaml) on 400
    generated products, A its first N (by id), B's added products and new titles from the rest."""
    root = tmp_path_factory.mktemp("incremental")
    train = taxonomy_models / "train"
    products = pl.read_parquet(train / "products" / "*.parquet").sort("product_id")
    assert products.height >= N + ADDED + 40
    tax = train / "taxonomy.parquet"
    # ROOT/models: the session's models (every rebuild here only reads them)
    (root / "models").symlink_to(taxonomy_models / "models", target_is_directory=True)
    a = products.head(N)
    # B: the first REMOVED products gone, ADDED new ones, EDITED titles replaced by the titles
    # of products further on (other types, other attributes: the models' outputs change)
    others = products.tail(40)["title"].to_list()
    edited_ids = a["product_id"].to_list()[100:100 + EDITED]
    new_titles = dict(zip(edited_ids, others[:EDITED]))
    b = pl.concat([a.tail(N - REMOVED), products.slice(N, ADDED)]).with_columns(
        pl.when(pl.col("product_id").is_in(edited_ids))
        .then(pl.col("product_id").replace(new_titles)).otherwise(pl.col("title")).alias("title"))
    _catalogue(root / "a", a, tax)
    _catalogue(root / "b", b, tax)
    return root, edited_ids


def _rebuild(root, catalogue: str, out: str, *previous: str) -> dict:
    args = ["rebuild", "--catalogue", str(root / catalogue), "--out", str(root / out),
            "--models", str(root / "models"), "--config", CONFIG]
    if previous:
        args += ["--previous", str(root / previous[0])]
    assert main(args) == 0
    return json.loads((root / out / "taxonomy" / "manifest.json").read_text())


def _graph(run) -> dict[str, pl.DataFrame]:
    """Every graph table and the per-product taxonomy outputs, in one row order."""
    out = {}
    for name in ("triples", "taxonomy", "attributes"):
        path = table_file(run / "graph", name)
        if path.exists():
            t = read_parquet_any(path)
            out[name] = t.sort(t.columns) if t.height else t
    for name in ("typed_products", "edits", "product_type_candidates", "new_types",
                 "graph_taxonomy"):
        path = table_file(run / "taxonomy", name)
        if not path.exists():  # an empty table: Ray Data writes no shard
            out[name] = None
            continue
        t = read_parquet_any(path)
        sortable = [c for c, d in t.schema.items() if not isinstance(d, (pl.List, pl.Struct, pl.Array))]
        out[name] = t.sort(sortable) if t.height else t
    return out


@pytest.fixture(scope="module")
def rebuilt(world):
    """A in full; B incrementally from A's run; B in full from scratch (same models)."""
    root, edited_ids = world
    manifests = {"a": _rebuild(root, "a", "run_a")}
    before = _tree_digest(root / "run_a")
    manifests["inc"] = _rebuild(root, "b", "run_b_inc", "run_a")
    manifests["full"] = _rebuild(root, "b", "run_b_full")
    return root, edited_ids, manifests, before


def test_incremental_rebuild_gives_the_full_rebuilds_graph(rebuilt):
    root, edited_ids, m, before = rebuilt
    inc, full = m["inc"], m["full"]
    assert m["a"]["products_recomputed"] == N and m["a"]["products_reused"] == 0

    # the previous run is only read
    assert _tree_digest(root / "run_a") == before
    # what the manifest counts is what changed
    assert inc["products_reused"] == N - REMOVED - EDITED
    assert inc["products_recomputed"] == EDITED + ADDED
    assert inc["products_added"] == ADDED and inc["products_removed"] == REMOVED
    assert inc["cache"]["title_models"]["changed"] == EDITED
    assert full["products_reused"] == 0 and full["products_recomputed"] == N - REMOVED + ADDED
    assert inc["rows_in"] == full["rows_in"] == N - REMOVED + ADDED

    # the per-product model outputs: cached and fresh equal what a full rebuild computes
    cols = ["product_id", "cache_key", "spans", "embedding"]
    cache_inc = read_parquet_any(root / "run_b_inc" / "taxonomy" / "cache" / "title_models", cols)
    cache_full = read_parquet_any(root / "run_b_full" / "taxonomy" / "cache" / "title_models", cols)
    assert cache_inc.height == N - REMOVED + ADDED
    assert cache_inc.sort("product_id").equals(cache_full.sort("product_id"))

    # the graph: identical content
    g_inc, g_full = _graph(root / "run_b_inc"), _graph(root / "run_b_full")
    assert g_inc.keys() == g_full.keys()
    for name in g_full:
        assert (g_inc[name] is None and g_full[name] is None) or g_inc[name].equals(g_full[name]), name
    assert g_full["triples"].height > N

    # the edits mattered: an edited product's model outputs changed since A, so reusing A's
    # outputs for it would have given another graph (this test can fail)
    cache_a = read_parquet_any(root / "run_a" / "taxonomy" / "cache" / "title_models", cols)
    old = cache_a.filter(pl.col("product_id").is_in(edited_ids)).sort("product_id")
    new = cache_full.filter(pl.col("product_id").is_in(edited_ids)).sort("product_id")
    assert not old["spans"].equals(new["spans"]) and not old["embedding"].equals(new["embedding"])


def test_a_killed_incremental_run_leaves_its_previous_run_intact_and_resumes(rebuilt, monkeypatch):
    """Killed in the taxonomy stage after its cache was written (into the stage's tmp folder):
    the previous run's files are as they were, nothing of the stage is committed, and the re-run
    finishes with the full rebuild's graph."""
    from autoknow_ray.modules.taxonomy.stage import TaxonomyStage

    root, _, _, before = rebuilt

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as mp:
        mp.setattr(TaxonomyStage, "_write_products", staticmethod(killed))
        with pytest.raises(KeyboardInterrupt):
            _rebuild(root, "b", "run_k", "run_a")
    assert _tree_digest(root / "run_a") == before
    assert (root / "run_k" / "ingest" / "manifest.json").exists()
    assert not (root / "run_k" / "taxonomy").exists()
    assert (root / "run_k" / ".taxonomy.tmp" / "cache" / "title_models").is_dir()
    resumed = _rebuild(root, "b", "run_k", "run_a")
    assert resumed["products_reused"] == N - REMOVED - EDITED
    assert _tree_digest(root / "run_a") == before
    g_k, g_full = _graph(root / "run_k"), _graph(root / "run_b_full")
    for name in g_full:
        assert (g_k[name] is None and g_full[name] is None) or g_k[name].equals(g_full[name]), name


@pytest.mark.parametrize("bf16", [False, True])
def test_a_titles_model_outputs_do_not_depend_on_its_batch(world, bf16):
    """What makes reuse exact: the tagger and the encoder batch titles of one token length
    (no padding), so a title's spans, scores and vector are the same bits alone as among
    others. With padded batches of similar character length they were not. Measured as the
    actors run on a 2-core plan: one torch thread (with two, the fp32 vectors differed in the
    last bits between batch sizes: docs/incremental.md)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _same_alone_and_together(world[0], bf16)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_short_texts_vector_does_not_depend_on_its_batch(threads):
    """A synonyms term is a few tokens: encoded alone (the one new term of an incremental
    rebuild) it ran a batch of one, whose CPU kernels sum in another order than a fuller
    batch's, and its vector differed in the last bits from a full rebuild's (torch 2.13). The
    encoder tops small batches up (`min_batch_rows`): the same bits alone, among a few, among
    many, at any row."""
    import numpy as np
    import torch

    from autoknow_ray.nn.encoder import TextEncoder

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        encoder = TextEncoder("default", device="cpu", bf16=False)
        for text in ("Greyish", "Navy blue striped", "Men Hot Swimwear Swimming Pants Briefs Shorts"):
            ref = encoder.encode([text] * 48)[0]
            for k in (1, 2, 3, 5, 9):
                got = encoder.encode([text] * k)
                assert all(np.array_equal(got[i], ref) for i in range(k)), (text, k)
    finally:
        torch.set_num_threads(before)


def _same_alone_and_together(root, bf16: bool):
    import numpy as np

    from autoknow_ray.nn.encoder import TextEncoder
    from autoknow_ray.nn.tagger import SpanTagger

    titles = pl.read_parquet(root / "a" / "products.parquet")["title"].to_list()[:150]
    picked = list(range(0, len(titles), 7))
    encoder = TextEncoder("default", device="cpu", bf16=bf16)
    together = encoder.encode(titles)
    alone = np.stack([encoder.encode([titles[i]])[0] for i in picked])
    assert np.array_equal(together[picked], alone)
    tagger = SpanTagger.load(root / "models" / "taxonomy" / "tagger", device="cpu", bf16=bf16,
                             cpu_threads=1)
    together = tagger.predict(titles)
    assert [tagger.predict([titles[i]])[0] for i in picked] == [together[i] for i in picked]
    assert sum(len(together[i]) for i in picked) > 0


def test_a_changed_model_setting_recomputes_every_product(rebuilt, tmp_path):
    """Another span floor for the tagger changes the title models' fingerprint: the previous
    cache is not used (the manifest says why), every product goes through the models, and the
    products added and removed since the previous run are still counted."""
    import yaml

    root = rebuilt[0]
    cfg = yaml.safe_load((REPO / "configs" / "test.yaml").read_text())
    cfg["taxonomy"]["tagger"]["min_score"] = 0.3
    cfg["stages"] = ["ingest", "taxonomy", "graph"]  # what is checked: the taxonomy stage's cache
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["rebuild", "--catalogue", str(root / "b"), "--out", str(tmp_path / "run"),
                 "--models", str(root / "models"), "--config", str(tmp_path / "cfg.yaml"),
                 "--previous", str(root / "run_a")]) == 0
    m = json.loads((tmp_path / "run" / "taxonomy" / "manifest.json").read_text())
    cache = m["cache"]["title_models"]
    assert "changed" in cache["previous_not_used"]
    assert m["products_reused"] == 0 and m["products_recomputed"] == N - REMOVED + ADDED
    assert m["products_added"] == ADDED and m["products_removed"] == REMOVED


def test_an_incremental_run_never_writes_into_its_previous_run(world, capsys):
    root, _ = world
    (root / "run_x").mkdir(exist_ok=True)
    assert main(["rebuild", "--catalogue", str(root / "b"), "--out", str(root / "run_x"),
                 "--models", str(root / "models"), "--config", CONFIG,
                 "--previous", str(root / "run_x")]) == 2
    assert "same run" in capsys.readouterr().err
    assert not any((root / "run_x").iterdir())


def test_the_incremental_bench_changes_the_catalogue_as_it_says(tmp_path):
    """`autoknow bench --incremental`'s night: B has A's products less the removed ones, the
    added ones, and the edited titles (changed), every other title as it was."""
    from autoknow_ray.bench.incremental import changed_catalogues

    got = changed_catalogues(tmp_path, 200, seed=0)
    c = got["counts"]
    assert (c["edited"], c["added"], c["removed"]) == (4, 2, 2)
    a = pl.read_parquet(got["a"] / "products.parquet")
    b = pl.read_parquet(got["b"] / "products.parquet")
    assert a.height == 200 and b.height == 200
    ids_a, ids_b = set(a["product_id"]), set(b["product_id"])
    assert len(ids_a - ids_b) == 2 and len(ids_b - ids_a) == 2
    both = a.join(b, on="product_id", suffix="_b")
    assert both.filter(pl.col("title") != pl.col("title_b")).height == 4
    assert (got["b"] / "taxonomy.parquet").exists() and not (got["b"] / "gold").exists()


def test_a_driver_cache_reads_only_the_previous_rows_tonight_needs(tmp_path, monkeypatch):
    """`incremental.reuse_on_driver` (synonyms' term vectors and pair scores): tonight's rows
    found in the previous run's cache are reused, the rest computed, and the driver keeps only
    the cached rows tonight needs, not the previous run's whole table."""
    from autoknow_ray import incremental
    from autoknow_ray.incremental import cache_dir, fingerprint_digest, reuse_on_driver

    fp = {"model": "m"}
    prev = tmp_path / "prev"
    folder = cache_dir(prev, "vec")
    folder.mkdir(parents=True)
    pl.DataFrame({"term": [f"t{i}" for i in range(100)], "v": [float(i) for i in range(100)]}
                 ).write_parquet(folder / "part-0.parquet")
    (prev / "manifest.json").write_text(json.dumps(
        {"complete": True, "cache": {"vec": {"fingerprint": fingerprint_digest(fp)}}}))
    held = []
    real = incremental._cached_rows_of
    monkeypatch.setattr(incremental, "_cached_rows_of",
                        lambda *a: held.append(real(*a)) or held[-1])
    computed = []

    def compute(rows):
        computed.append(rows["term"].to_list())
        return rows.with_columns(pl.lit(-1.0).alias("v"))

    rows = pl.DataFrame({"term": ["t3", "t7", "new"]})
    out, counts = reuse_on_driver("vec", rows, ["term"], ["v"], fp, compute, tmp_path / "now", prev)
    assert computed == [["new"]] and counts["reused"] == 2 and counts["recomputed"] == 1
    assert held[0].height == 2  # of the previous cache's 100 rows
    assert dict(out.sort("term").iter_rows()) == {"new": -1.0, "t3": 3.0, "t7": 7.0}
    # tonight's cache holds tonight's rows; another fingerprint reuses nothing and says why
    assert pl.read_parquet(cache_dir(tmp_path / "now", "vec")).height == 3
    _, other = reuse_on_driver("vec", rows, ["term"], ["v"], {"model": "m2"}, compute,
                               tmp_path / "now2", prev)
    assert other["reused"] == 0 and "changed" in other["previous_not_used"]


def test_added_and_removed_products_are_counted_alike_in_one_task_and_by_the_shuffle(
        tmp_path, ray_session, monkeypatch):
    """A changed fingerprint counts the products added and removed since the previous run: below
    `runtime.SMALL_SHUFFLE_ROWS` ids in one task, above by two anti joins; the same counts."""
    from types import SimpleNamespace

    from autoknow_ray import incremental, runtime
    from autoknow_ray.config import Config

    prev = tmp_path / "prev"
    folder = incremental.cache_dir(prev, "title_models")
    folder.mkdir(parents=True)
    pl.DataFrame({"product_id": [f"p{i}" for i in range(50)]}).write_parquet(folder / "part-0.parquet")
    pl.DataFrame({"product_id": [f"p{i}" for i in range(50, 60)]}).write_parquet(folder / "part-1.parquet")
    now = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    pl.DataFrame({"product_id": [f"p{i}" for i in range(7, 40)]}).write_parquet(now[0])
    pl.DataFrame({"product_id": [f"p{i}" for i in range(40, 64)]}).write_parquet(now[1])
    step = SimpleNamespace(name="title_models")
    small = incremental._added_removed(now, prev, step, 57, Config())
    monkeypatch.setattr(runtime, "SMALL_SHUFFLE_ROWS", 10)
    shuffled = incremental._added_removed(now, prev, step, 57, Config())
    assert small == shuffled == {"added": 4, "removed": 7}
