"""Hold out a share of a catalogue's attribute values, for judging imputation.

`autoknow holdout-values --catalogue DIR --out NEW --fraction 0.3 --seed 0` copies the catalogue
with a seeded share of its (product, attribute, value) facts removed from `products.attributes`
(and `brand`, as the attribute `Brand`); the removed facts go to `NEW/gold/held_out_values`.
Fraction 1.0 removes every value (product types stay): the catalogue of titles and
descriptions without attributes that imputation is judged on. The other tables, and `gold/`,
are copied as they are.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl

from autoknow_ray.pipeline import read_parquet_any, table_file, write_table
from autoknow_ray.schema import GOLD_TABLES, PRODUCTS

HELD_OUT = "held_out_values"


def holdout_values(catalogue: str | Path, out: str | Path, *, fraction: float,
                   seed: int = 0) -> dict:
    catalogue, out = Path(catalogue), Path(out)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
    src = table_file(catalogue, "products")
    if not src.exists():
        raise FileNotFoundError(f"{catalogue}: no products table (products.parquet or products/)")
    if out.resolve() == catalogue.resolve():
        raise ValueError("--out must differ from --catalogue")
    products = read_parquet_any(src)
    if products.height == 0:
        raise ValueError(f"{src}: no products")
    if "attributes" not in products.columns or "brand" not in products.columns:
        raise ValueError(f"{src}: needs the columns attributes and brand (the catalogue format)")
    rng = np.random.default_rng(seed)
    kept_attrs, kept_brand, held = [], [], []
    for pid, attrs, brand in products.select("product_id", "attributes", "brand").iter_rows():
        keep = []
        for pair in attrs or []:
            if rng.random() < fraction:
                held.append({"product_id": pid, "attribute": pair["name"], "value": pair["value"]})
            else:
                keep.append(pair)
        kept_attrs.append(keep)
        if brand is not None and rng.random() < fraction:
            held.append({"product_id": pid, "attribute": "Brand", "value": brand})
            brand = None
        kept_brand.append(brand)
    products = products.with_columns(
        pl.Series("attributes", kept_attrs, dtype=products.schema["attributes"]),
        pl.Series("brand", kept_brand, dtype=pl.Utf8))
    out.mkdir(parents=True, exist_ok=True)
    for item in catalogue.iterdir():
        if item.name.startswith("products"):
            continue
        dest = out / item.name
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, dest)
    for stale in (out / "products.parquet", out / "products"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    write_table(out / "products.parquet", products, PRODUCTS)
    write_table(out / "gold" / f"{HELD_OUT}.parquet",
                pl.DataFrame(held, schema={"product_id": pl.Utf8, "attribute": pl.Utf8,
                                           "value": pl.Utf8}), GOLD_TABLES[HELD_OUT])
    summary = {"catalogue": str(catalogue), "out": str(out), "fraction": fraction, "seed": seed,
               "products": products.height, "held_out_values": len(held),
               "products_with_held_out": len({h["product_id"] for h in held})}
    (out / "gold" / f"{HELD_OUT}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
