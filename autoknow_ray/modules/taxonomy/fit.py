"""`autoknow fit` for module 1: the title tagger and the hypernym classifier, from one catalogue."""
from __future__ import annotations

import time
from pathlib import Path

import json

import numpy as np
import polars as pl

from autoknow_ray.modules.taxonomy.hypernym import HypernymClassifier
from autoknow_ray.modules.taxonomy.tagger_fit import fit_tagger
from autoknow_ray.nn.encoder import TextEncoder
from autoknow_ray.pipeline import RunContext


def fit_taxonomy(ctx: RunContext, out: Path) -> dict:
    cfg = ctx.cfg.taxonomy
    products = ctx.read("ingest", "products")
    taxonomy = ctx.read("ingest", "taxonomy")
    behavior = ctx.read("ingest", "behavior")
    copurchase = ctx.read("ingest", "copurchase")
    out.mkdir(parents=True, exist_ok=True)
    train = products.sample(cfg.max_train_products, seed=ctx.cfg.seed) \
        if products.height > cfg.max_train_products else products
    try:
        result = {"tagger": fit_tagger(train, cfg.tagger, out / "tagger")}
    except ValueError as e:
        # no title names its type or a value (e.g. a taxonomy-only catalogue): no tagger; the
        # rebuild then types products by the kNN vote and still places the taxonomy's types
        result = {"tagger": {"skipped": str(e)}}
    t0 = time.perf_counter()
    encoder = TextEncoder(cfg.tagger.encoder, device=ctx.cfg.device)
    hyp = HypernymClassifier(cfg.hypernym)
    try:
        hyp.fit(taxonomy, products, behavior if behavior.height else None,
                copurchase if copurchase.height else None, encoder)
    except ValueError as e:  # a flat taxonomy without typed products has no edges to learn
        result["hypernym"] = {"skipped": str(e)}
    else:
        hyp.save(out / "hypernym")
        result["hypernym"] = {**hyp.train_stats, "seconds": round(time.perf_counter() - t0, 2)}
    result["reference"] = save_type_reference(products, encoder, out, cfg.reference_per_type,
                                              cfg.reference_max, ctx.cfg.seed)
    result["tagger"].pop("history", None)
    return result


REFERENCE_WEIGHTS = "type_reference.safetensors"
REFERENCE_META = "type_reference.json"


def save_type_reference(products: pl.DataFrame, encoder, out: Path, per_type: int, max_rows: int,
                        seed: int) -> dict:
    """Title embeddings of a capped sample of typed products, with their types."""
    from safetensors.numpy import save_file

    typed = products.filter(pl.col("product_type").is_not_null()).select("title", "product_type")
    if typed.height == 0:
        return {"rows": 0}
    sample = (typed.with_columns(pl.int_range(pl.len()).shuffle(seed=seed).over("product_type").alias("_r"))
              .filter(pl.col("_r") < per_type).drop("_r"))
    if sample.height > max_rows:
        sample = sample.sample(max_rows, seed=seed)
    sample = sample.sort(["product_type", "title"])
    vecs = encoder.encode(sample["title"].to_list()).astype(np.float16)
    save_file({"vectors": vecs}, str(out / REFERENCE_WEIGHTS))
    (out / REFERENCE_META).write_text(json.dumps({"types": sample["product_type"].to_list(),
                                                  "titles": sample["title"].to_list()}))
    return {"rows": sample.height, "types": sample["product_type"].n_unique()}


def load_type_reference(model_dir: Path) -> tuple[list[str], np.ndarray] | None:
    from safetensors.numpy import load_file

    if not (model_dir / REFERENCE_WEIGHTS).exists():
        return None
    meta = json.loads((model_dir / REFERENCE_META).read_text())
    return meta["types"], load_file(str(model_dir / REFERENCE_WEIGHTS))["vectors"].astype(np.float32)
