"""`autoknow fit` for module 1: the title tagger and the hypernym classifier, from one catalogue.

Every training set is a capped sample read through Ray, never the whole catalogue: the tagger's
(`max_train_products`, uniform), the hypernym context and the kNN type reference (per type and in
total), and the behaviour rows of the sampled products.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import polars as pl

from autoknow_ray import runtime
from autoknow_ray.graph.state import count_rows
from autoknow_ray.index.vectors import as_matrix
from autoknow_ray.modules.taxonomy import knn_floors, sample, type_names
from autoknow_ray.modules.taxonomy.title_names import build_vocabulary, not_type_keys, save_vocabulary
from autoknow_ray.modules.taxonomy.hypernym import HypernymClassifier
from autoknow_ray.modules.taxonomy.tagger_fit import fit_tagger
from autoknow_ray.nn.encoder import TextEncoder
from autoknow_ray.pipeline import RunContext
from autoknow_ray.schema import BEHAVIOR_KEY, COPURCHASE_KEY


def fit_taxonomy(ctx: RunContext, out: Path) -> dict:
    cfg = ctx.cfg.taxonomy
    seed = ctx.cfg.seed
    products_path = ctx.table_path("ingest", "products")
    n = count_rows(products_path)
    taxonomy = ctx.read("ingest", "taxonomy")  # per-type, small
    out.mkdir(parents=True, exist_ok=True)
    products = runtime.read_parquet(products_path) if n else None
    train = runtime.bounded_sample(products, cfg.max_train_products, seed, n) if n else pl.DataFrame()
    try:
        if train.height == 0:
            raise ValueError("the catalogue has no products: no titles to learn from")
        result = {"tagger": fit_tagger(train, cfg.tagger, out / "tagger")}
    except ValueError as e:
        # no title names its type or a value (e.g. a taxonomy-only catalogue): no tagger; the
        # rebuild then types products by the kNN vote and still places the taxonomy's types
        result = {"tagger": {"skipped": str(e)}}
    result["tagger"]["train_products"] = train.height
    result["vocabulary"] = _save_vocabulary(train, taxonomy, cfg.types, out)
    del train

    t0 = time.perf_counter()
    encoder = TextEncoder(cfg.tagger.encoder, device=ctx.cfg.device)
    hcfg = cfg.hypernym
    typed, type_counts = _typed_sample(products, max(hcfg.context_per_type, cfg.reference_per_type),
                                       max(hcfg.context_max, cfg.reference_max), seed,
                                       runtime.shuffle_partitions(n))
    vectors = encoder.encode(typed["title"].to_list()) if typed.height else np.zeros((0, 384), np.float32)
    typed = typed.with_columns(pl.Series("embedding", vectors.astype(np.float32))) if typed.height else typed
    context = _head_per_type(typed, hcfg.context_per_type, hcfg.context_max)
    behavior, copurchase = _behaviour_of(ctx, context, hcfg.behavior_max_rows, seed)
    hyp = HypernymClassifier(hcfg)
    try:
        hyp.fit(taxonomy, context if context.height else None, behavior, copurchase, encoder,
                type_stats=_scaled_stats(context, type_counts))
    except ValueError as e:  # a flat taxonomy without typed products has no edges to learn
        result["hypernym"] = {"skipped": str(e)}
    else:
        hyp.save(out / "hypernym")
        result["hypernym"] = {**hyp.train_stats, "context_products": context.height,
                              "seconds": round(time.perf_counter() - t0, 2)}
    reference = _head_per_type(typed, cfg.reference_per_type, cfg.reference_max)
    result["reference"] = save_type_reference(reference, out)
    floors = (knn_floors.choose_floors(reference["product_type"].to_list(),
                                       as_matrix(reference["embedding"], np.float32),
                                       k=cfg.types.knn_k, seed=seed)
              if reference.height else {"skipped": "no typed products"})
    knn_floors.save(floors, out)
    # the manifest (printed by `autoknow fit`) keeps the choice and its figures; the grid and the
    # histograms a rebuild re-chooses from stay in knn_floors.json
    result["knn_floors"] = {k: v for k, v in floors.items() if k not in knn_floors.REBUILD_KEYS}
    result["tagger"].pop("history", None)
    return result


def _save_vocabulary(train: pl.DataFrame, taxonomy: pl.DataFrame, tcfg, out: Path) -> dict:
    """The type names a rebuild looks for in titles (title_names.py), from the taxonomy, the
    sampled products' types and attribute values, and the public names."""
    types = taxonomy["type"].drop_nulls().to_list() if taxonomy.height else []
    values: list[str] = []
    if train.height:
        if "product_type" in train.columns:
            types += train["product_type"].drop_nulls().unique().to_list()
        if "attributes" in train.columns:
            values = (train.select(pl.col("attributes").list.eval(pl.element().struct.field("value")))
                      .to_series().explode().drop_nulls().unique().to_list())
    public = type_names.load(tcfg.vocabulary) if tcfg.title_names else ()
    vocab = build_vocabulary(types, public, values)
    return save_vocabulary(vocab, out, tcfg.vocabulary if public else "catalogue",
                           not_type_keys(values, vocab))


def _typed_sample(products, per_type: int, cap: int, seed: int,
                  parts: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A per-type capped sample of the typed products (id, title, type, draw order) and every
    type's product count."""
    empty = pl.DataFrame(schema={"product_id": pl.String, "title": pl.String, "product_type": pl.String})
    if products is None:
        return empty, pl.DataFrame(schema={"product_type": pl.String, "n": pl.Int64})
    ds = products.select_columns(["product_id", "title", "product_type"])
    got, counts = sample.per_key_sample(ds, "product_type", "product_id", per_type, cap, seed, parts)
    if got.height == 0:
        return empty, counts
    return got.with_row_index("_draw"), counts


def _head_per_type(typed: pl.DataFrame, per_type: int, cap: int) -> pl.DataFrame:
    """The first `per_type` rows of each type in draw order, at most `cap` in all."""
    if typed.height == 0:
        return typed
    return typed.sort("_draw").group_by("product_type", maintain_order=True).head(per_type).head(cap)


def _scaled_stats(context: pl.DataFrame, counts: pl.DataFrame) -> pl.DataFrame | None:
    """Per-type (type, n, sum) for the hypernym context: the catalogue's real product counts, and
    the sample's title-vector sum scaled to them (the centroid's direction is the sample's)."""
    if context.height == 0 or counts.height == 0:
        return None
    full = dict(counts.select("product_type", "n").iter_rows())
    rows = []
    for (t,), grp in context.group_by(["product_type"], maintain_order=True):
        vec = as_matrix(grp["embedding"], np.float64).sum(0)
        n_full = int(full.get(t, grp.height))
        rows.append({"type": t, "n": n_full, "sum": (vec * n_full / grp.height).tolist()})
    return pl.DataFrame(rows, schema={"type": pl.String, "n": pl.Int64, "sum": pl.List(pl.Float64)})


def _behaviour_of(ctx: RunContext, context: pl.DataFrame, cap: int, seed: int):
    """Co-purchase and search-behaviour rows that touch the sampled products (at most `cap` each):
    the hypernym features only count neighbours inside the context."""
    if context.height == 0 or cap <= 0:
        return None, None
    ids = set(context["product_id"].to_list())
    tables = {}
    for name, cols, key in (("behavior", ("product_id",), BEHAVIOR_KEY),
                            ("copurchase", ("src", "dst"), COPURCHASE_KEY)):
        path = ctx.table_path("ingest", name)
        if not path.exists() or count_rows(path) == 0:
            tables[name] = None
            continue
        got = runtime.bounded_sample(sample.where_in(runtime.read_parquet(path), cols, ids), cap, seed,
                                     key=key)
        tables[name] = got if got.height else None
    return tables["behavior"], tables["copurchase"]


REFERENCE_WEIGHTS = "type_reference.safetensors"
REFERENCE_META = "type_reference.json"


def save_type_reference(sample_rows: pl.DataFrame, out: Path) -> dict:
    """Title embeddings of a capped per-type sample of typed products, with their types."""
    from safetensors.numpy import save_file

    if sample_rows.height == 0:
        return {"rows": 0}
    rows = sample_rows.sort(["product_type", "title"])
    vecs = as_matrix(rows["embedding"], np.float16)
    save_file({"vectors": vecs}, str(out / REFERENCE_WEIGHTS))
    (out / REFERENCE_META).write_text(json.dumps({"types": rows["product_type"].to_list(),
                                                  "titles": rows["title"].to_list()}))
    return {"rows": rows.height, "types": rows["product_type"].n_unique()}


def load_type_reference_titles(model_dir: Path) -> list[tuple[str, str]]:
    """(type, title) of every reference row ([] for a model folder without a reference)."""
    p = Path(model_dir) / REFERENCE_META
    if not p.exists():
        return []
    meta = json.loads(p.read_text())
    return [(t, x) for t, x in zip(meta.get("types", []), meta.get("titles", []))
            if isinstance(t, str) and isinstance(x, str)]


def load_type_reference_types(model_dir: Path) -> set[str]:
    """The types of fit's typed reference titles (set() for a model folder without them)."""
    p = Path(model_dir) / REFERENCE_META
    if not p.exists():
        return set()
    return {t for t in json.loads(p.read_text()).get("types", []) if isinstance(t, str)}


def load_type_reference(model_dir: Path) -> tuple[list[str], np.ndarray] | None:
    from safetensors.numpy import load_file

    if not (model_dir / REFERENCE_WEIGHTS).exists():
        return None
    meta = json.loads((model_dir / REFERENCE_META).read_text())
    return meta["types"], load_file(str(model_dir / REFERENCE_WEIGHTS))["vectors"].astype(np.float32)
