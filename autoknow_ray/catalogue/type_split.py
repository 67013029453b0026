"""`autoknow type-split CATALOGUE --out DIR`: hold out whole product types, for judging what a
model does with types it never saw in fit.

From one catalogue (with gold/) it writes two:

    DIR/fit/       the products of the fit types (minus a held-out share of each), with their
                   attributes; its gold/ filtered to them
    DIR/heldout/   every product of the held-out types, plus the held-out share of the fit types'
                   products, with type labels kept and attributes (and brand) removed; gold/ has
                   their labels and `fit_types` (the types fit saw, so eval can report seen and
                   unseen types apart)

With `untyped=True` (`--untyped`) the held-out catalogue is what a new catalogue with unseen types
looks like: its products carry no type label (gold/types keeps them), its taxonomy is the fit's
(the held-out types removed), and gold/hypernyms holds each held-out type's parents in the whole
taxonomy (none: a root), so eval can judge where a new type found in titles was attached.

Type names that differ only by case, spacing or a plural ending ("Wedding band", "wedding bands")
are one type for the split, so a held-out type is never seen in fit under another spelling.
Texts, behaviour and co-purchases follow their products; the taxonomy is kept whole in both.
The split is a pure function of the catalogue, `types`, `products` and `seed`.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from autoknow_ray.pipeline import read_parquet_any, table_file
from autoknow_ray.schema import CATALOGUE_TABLES, GOLD_TABLES, PRODUCTS, conform

FIT_TYPES = "fit_types"


def type_key(name: str) -> str:
    """Case, spacing and a final plural 's' do not make another type."""
    s = " ".join(re.findall(r"\w+", name.casefold()))
    return s[:-1] if len(s) > 3 and s.endswith("s") and not s.endswith("ss") else s


def _read(folder: Path, name: str) -> pl.DataFrame | None:
    p = table_file(folder, name)
    return read_parquet_any(p) if p.exists() else None


def _write(df: pl.DataFrame, path: Path, schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(conform(df.to_arrow(), schema), path)


def type_split(catalogue: str | Path, out: str | Path, *, types: float = 0.3,
               products: float = 0.2, seed: int = 0, untyped: bool = False) -> dict:
    catalogue, out = Path(catalogue), Path(out)
    if not catalogue.is_dir():
        raise FileNotFoundError(f"catalogue folder not found: {catalogue}")
    if not 0 < types < 1 or not 0 <= products < 1:
        raise ValueError(f"--types must be in (0, 1) and --products in [0, 1); got {types}, {products}")
    prods = _read(catalogue, "products")
    if prods is None or prods.height == 0:
        raise ValueError(f"{catalogue}: no products to split")
    prods = pl.from_arrow(conform(prods.to_arrow(), PRODUCTS))
    keys = sorted({type_key(t) for t in prods["product_type"].drop_nulls().to_list()} - {""})
    if len(keys) < 2:
        raise ValueError(f"{catalogue}: {len(keys)} product type(s); a type split needs at least 2")
    rng = np.random.default_rng(seed)
    n_held = min(len(keys) - 1, max(1, int(round(types * len(keys)))))
    held = {keys[i] for i in rng.choice(len(keys), size=n_held, replace=False)}
    key = prods["product_type"].map_elements(type_key, return_dtype=pl.String)
    draw = pl.Series(rng.random(prods.height))
    unseen = key.is_in(list(held)).fill_null(False)
    typed = prods["product_type"].is_not_null()
    to_held = unseen | (typed & ~unseen & (draw < products))
    fit_p, held_p = prods.filter(~to_held), prods.filter(to_held)
    held_p = held_p.drop("attributes", "brand")  # written as nulls by conform
    if untyped:
        held_p = held_p.drop("product_type")
    taxonomy = _read(catalogue, "taxonomy")
    if out.exists():
        shutil.rmtree(out)
    counts = {}
    fit_types = sorted(set(fit_p["product_type"].drop_nulls().to_list()))
    for part, p in (("fit", fit_p), ("heldout", held_p)):
        d = out / part
        ids = p["product_id"]
        _write(p, d / "products.parquet", PRODUCTS)
        counts[part] = {"products": p.height}
        for name, schema in CATALOGUE_TABLES.items():
            if name == "products":
                continue
            df = taxonomy if name == "taxonomy" else _read(catalogue, name)
            if df is None:
                continue
            if name == "taxonomy" and untyped and part == "heldout":
                df = df.filter(~pl.col("type").map_elements(type_key, return_dtype=pl.String)
                               .is_in(list(held)))
            if "product_id" in df.columns:
                df = df.filter(pl.col("product_id").is_in(ids.implode()))
            elif name == "copurchase":
                df = df.filter(pl.col("src").is_in(ids.implode()) & pl.col("dst").is_in(ids.implode()))
            _write(df, d / f"{name}.parquet", schema)
            counts[part][name] = df.height
        for name, schema in GOLD_TABLES.items():
            df = _read(catalogue / "gold", name)
            if df is None:
                continue
            if "product_id" in df.columns:
                df = df.filter(pl.col("product_id").is_in(ids.implode()))
            if name == "hypernyms" and untyped and part == "heldout":
                df = pl.concat([df, _held_parents(taxonomy, held)], how="diagonal_relaxed")
            _write(df, d / "gold" / f"{name}.parquet", schema)
            counts[part][f"gold/{name}"] = df.height
        if untyped and part == "heldout" and _read(catalogue / "gold", "hypernyms") is None:
            _write(_held_parents(taxonomy, held), d / "gold" / "hypernyms.parquet",
                   GOLD_TABLES["hypernyms"])
        _write(pl.DataFrame({"type": fit_types}, schema={"type": pl.String}),
               d / "gold" / f"{FIT_TYPES}.parquet", GOLD_TABLES[FIT_TYPES])
    summary = {"catalogue": str(catalogue.resolve()), "types": len(keys),
               "heldout_types": sorted(held), "fit_types": len(fit_types),
               "options": {"types": types, "products": products, "seed": seed, "untyped": untyped}, "counts": counts}
    (out / "split.json").write_text(json.dumps(summary, indent=2))
    return summary


def _held_parents(taxonomy: pl.DataFrame | None, held: set[str]) -> pl.DataFrame:
    """gold/hypernyms rows of the held-out types: each type's parents in the whole taxonomy."""
    schema = {"child": pl.String, "parent": pl.String, "child_kind": pl.String, "depth": pl.Int32}
    if taxonomy is None or taxonomy.height == 0:
        return pl.DataFrame(schema=schema)
    rows = {(t, p) for t, p in taxonomy.select("type", "parent").iter_rows()
            if t is not None and p is not None and type_key(t) in held and p != t}
    return pl.DataFrame([(t, p, "type", 1) for t, p in sorted(rows)], schema=schema, orient="row")
