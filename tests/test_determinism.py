"""Same inputs, same graph: one small generated catalogue rebuilt twice with the same models and
every default stage gives identical graph content, table by table.

The caps that decide which rows a stage reads (products per type in the hypernym context,
products kept per query and per co-purchase source, the products behaviour links to, samples of
the kNN and spread references) are set low here so that they bind on a few hundred products, as the defaults do on a large
catalogue: a cap that keeps rows in arrival order, or breaks ties by it, gives another graph
from one rebuild to the next and fails this test. Modules 3-5 act only where fit showed their precision,
which a few hundred products and a short fit cannot show: here they are given fixed thresholds,
so that they act and their decisions are compared too. Their models are left at `bf16: auto`:
each rebuild decides its CPU precision once on the driver (RUN/precision.json), where each
worker used to time bf16 against fp32 for itself and a loaded machine tipped the probe either
way (docs/incremental.md)."""
from __future__ import annotations

import json
import random

import numpy as np
import polars as pl
import pytest
import yaml

from autoknow_ray.pipeline import read_parquet_any, table_file
from autoknow_ray.schema import GRAPH_TABLES
from tests.conftest import REPO

N = 240


def _config():
    from autoknow_ray.config import Config

    stages = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())["stages"]
    return Config.model_validate({
        "seed": 0,
        "stages": stages,  # every default stage
        "ray": {"num_cpus": 2, "object_store_memory_mb": 400},
        "taxonomy": {
            "tagger": {"epochs": 2, "patience": 0},
            "types": {"knn_catalogue_sample": 60, "knn_prior_sample": 60, "spread_per_type": 3,
                      "spread_max": 40},
            "hypernym": {"epochs": 5, "product_edges": 200, "calibration_folds": 0,
                         "context_per_type": 3, "context_max": 80,
                         "max_child_products": 4, "behavior_max_query_products": 3,
                         "behavior_max_rows": 500, "linked_max": 6},
        },
        "relations": {"epochs": 50, "folds": 2},
        "imputation": {"min_confidence": 0.5,
                       "tagger": {"epochs": 1, "max_train_products": 100, "max_train_windows": 200,
                                  "patience": 0, "max_length": 48},
                       "clusters": {"n_clusters": 16, "min_support": 2}},
        # fixed thresholds: fit's out-of-fold calibration scores only what its report needs
        "cleaning": {"threshold": 0.5, "type_threshold": 0.5, "shift_factor": None, "max_train_pairs": 96, "epochs": 1, "max_length": 48,
                     "train_layers": 1, "max_validation_pairs": 100},
        "synonyms": {"threshold": 0.5, "rewrite_values": True, "max_train_terms": 200, "epochs": 20,
                     "calibration_folds": 2},
        "related": {"epochs": 2, "max_train_seconds": 10, "dim": 16, "negatives": 64,
                    "coview_max_per_query": 3},
    })


def _graph(run) -> dict[str, pl.DataFrame]:
    """Every graph table, its rows in one canonical order (sorted on every sortable column)."""
    out = {}
    for name in GRAPH_TABLES:
        path = table_file(run / "graph", name)
        if not path.exists():  # an empty table: no shard written
            out[name] = None
            continue
        t = read_parquet_any(path)
        t = t.select(sorted(t.columns))
        keys = [c for c, d in t.schema.items() if not isinstance(d, (pl.List, pl.Struct, pl.Array))]
        out[name] = t.sort(keys, nulls_last=True) if t.height and keys else t
    return out


@pytest.fixture(scope="module")
def two_rebuilds(tmp_path_factory, ray_session):
    from autoknow_ray.catalogue.synth import synthesize
    from autoknow_ray.rebuild import fit, rebuild

    root = tmp_path_factory.mktemp("determinism")
    synthesize(N, root / "cat", seed=3)
    cfg = _config()
    fit(root / "cat", root / "models", config=cfg)
    runs = []
    for name in ("run_1", "run_2"):
        rebuild(root / "cat", root / name, models=root / "models", config=cfg)
        runs.append(root / name)
    return runs


def test_two_rebuilds_of_one_catalogue_give_the_same_graph(two_rebuilds):
    a, b = (_graph(run) for run in two_rebuilds)
    assert a.keys() == b.keys() == set(GRAPH_TABLES)
    for name in a:
        assert (a[name] is None) == (b[name] is None), name
        if a[name] is not None:
            assert a[name].equals(b[name]), (name, a[name].height, b[name].height)
    # the comparison covers what every stage decides: module 1's types and new types placed
    # under parents, module 2's attributes, recommendations
    triples = a["triples"]
    assert triples.filter(pl.col("relation") == "has_type").height >= N // 2
    assert set(triples["module"].unique().to_list()) >= {"catalogue", "taxonomy"}
    tax = a["taxonomy"]
    assert tax.filter(pl.col("is_new") & pl.col("parent").is_not_null()).height > 0
    assert a["attributes"].height > 0 and a["related"].height > 0
    # module 3 writes no fact on this catalogue (its one-epoch tagger is unsure of every span):
    # its decisions, every candidate with its score and reason, are compared instead
    runs = [read_parquet_any(run / "imputation" / "decisions") for run in two_rebuilds]
    assert runs[0].height > 0
    runs = [d.sort(sorted(d.columns), nulls_last=True) for d in runs]
    assert runs[0].equals(runs[1])


def test_the_hypernym_contexts_behaviour_linked_products_are_capped(two_rebuilds):
    """The products behaviour links to the new types' products join the hypernym context up to
    `linked_max` of them (6 here), the same draw in both rebuilds, counted in the manifest."""
    counts = [json.loads((run / "taxonomy" / "manifest.json").read_text())["hypernym_context"]
              for run in two_rebuilds]
    assert counts[0]["linked"] == counts[1]["linked"] and counts[0]["kept"] == counts[1]["kept"]
    assert counts[0]["task_heap_peak_mib"]["context"] > 0  # the placing task's memory is recorded
    assert counts[0]["linked"] > 6  # the cap binds on this catalogue
    assert counts[0]["kept"] == 6


class _HashEncoder:
    """A stand-in title encoder: a fixed vector per text (no model to load)."""

    def encode(self, texts):
        out = []
        for t in texts:
            rng = np.random.default_rng(abs(hash_text(t)))
            out.append(rng.standard_normal(8).astype(np.float32))
        return np.stack(out) if out else np.zeros((0, 8), np.float32)


def hash_text(t: str) -> int:
    import zlib

    return zlib.crc32(t.encode())


def test_hypernym_context_keeps_the_same_behaviour_rows_whatever_their_order():
    """A query with more products than the context keeps, all bought as often, and a product
    with more co-purchase partners than it keeps: the rows kept do not depend on the order the
    behaviour rows arrive in (ties in count go to the smaller product id)."""
    from autoknow_ray.modules.taxonomy.hypernym import _Context
    from autoknow_ray.modules.taxonomy.hypernym_config import HypernymConfig

    taxonomy = pl.DataFrame({"type": ["food", "tea", "coffee"], "parent": [None, "food", "food"]})
    ids = [f"p{i:03d}" for i in range(150)]
    products = pl.DataFrame({"product_id": ids, "title": [f"item {i}" for i in range(150)],
                             "product_type": ["tea" if i % 2 else "coffee" for i in range(150)]})
    behavior = pl.DataFrame({"query": ["drink"] * 150 + ["leaf"] * 20, "product_id": ids + ids[:20],
                             "count": [1] * 150 + [2] * 20})
    copurchase = pl.DataFrame({"src": ["p000"] * 149, "dst": ids[1:], "count": [1] * 149})
    cfg = HypernymConfig(behavior_max_query_products=10)

    def context(seed: int):
        rows = list(range(behavior.height))
        random.Random(seed).shuffle(rows)
        cp_rows = list(range(copurchase.height))
        random.Random(seed).shuffle(cp_rows)
        return _Context(taxonomy, products, behavior[rows], copurchase[cp_rows], _HashEncoder(), cfg)

    first = context(0)
    rows_of = lambda c: [(m[0].tolist(), m[1].tolist(), m[2]) for m in c.q_members]  # noqa: E731
    kept = {q: m[2] for q, m in zip(("drink", "leaf"), first.q_members)}
    assert kept["drink"] == ids[:10]  # the ten smallest ids of the tied 150
    assert len(first.cp["p000"][0]) == 100 and first.cp["p000"][0].tolist() == list(range(1, 101))
    for seed in range(1, 6):
        other = context(seed)
        assert rows_of(other) == rows_of(first)
        assert other.q_of == first.q_of
        assert other.cp.keys() == first.cp.keys()
        for k in first.cp:
            assert np.array_equal(other.cp[k][0], first.cp[k][0])
            assert np.array_equal(other.cp[k][1], first.cp[k][1])


def test_the_related_stage_reads_module_1s_title_vectors(two_rebuilds):
    """Module 1 embedded every title already (same encoder, length and device): the related
    stage reads those vectors from `typed_products` instead of encoding every title again."""
    run = two_rebuilds[0]
    m = json.loads((run / "related" / "manifest.json").read_text())
    assert m["title_vectors"]["from"] == "taxonomy", m["title_vectors"]
    typed = read_parquet_any(run / "taxonomy" / "typed_products",
                             ["product_id", "title_vector"]).sort("product_id")
    nodes = read_parquet_any(run / "related" / "nodes", ["product_id", "text"]).sort("product_id")
    # with module 1's vectors the step is not cached (it costs less than its cache's join)
    assert "cache_not_used" in m and not (run / "related" / "cache").exists()
    assert typed.height == N and typed["title_vector"].null_count() == 0
    assert typed["product_id"].equals(nodes["product_id"])
    assert typed["title_vector"].to_list() == nodes["text"].to_list()


def test_the_stages_time_their_passes(two_rebuilds):
    """Module 1, 2 and 5 and the related stage give wall seconds per pass in their manifests, the
    figures `autoknow bench` reads to say where a large catalogue's time goes."""
    run = two_rebuilds[0]
    want = {"taxonomy": ("phase_seconds", {"title_models"}),
            "relations": ("phase_seconds", {"vocabulary", "count_provider_mentions",
                                            "count_customer_mentions", "score_pairs", "write"}),
            "synonyms": ("phase_seconds", {"occurrences_and_vocabulary", "embed_terms",
                                           "candidates", "score_pairs", "clusters", "write"}),
            "related": ("step_seconds", {"embed_products", "dual_embed", "recommend"})}
    for stage, (key, phases) in want.items():
        m = json.loads((run / stage / "manifest.json").read_text())
        got = m[key]
        assert phases <= set(got), (stage, sorted(got))
        assert all(v >= 0 for v in got.values()), (stage, got)
        assert sum(got.values()) <= m["seconds"] + 1.0, (stage, got, m["seconds"])
