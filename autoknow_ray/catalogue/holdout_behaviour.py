"""Withhold every behaviour row of a share of products, for judging related products on new
listings.

`autoknow holdout-behaviour --catalogue DIR --out NEW --products 300 --seed 0` (or
`--fraction 0.01`) copies the catalogue with a seeded draw of its products that were bought with
others (the source of at least `min_pairs` co-purchase rows) made into new listings: every
co-purchase row that touches one of them (either end) and every behaviour row of theirs leaves
the catalogue. What those products were bought with goes to `NEW/gold/copurchase` (the removed
rows whose source is a withheld product, with the catalogue's held-out gold rows from those
products, counts summed): `autoknow eval` then scores `graph/related` on the new listings alone,
each asking for the products it was bought with, which the model never saw. The other tables and
gold tables are copied as they are; `NEW/gold/holdout_behaviour.json` records the draw.

The draw is a seeded choice over the eligible products sorted by id, so the same catalogue,
share and seed give the same new listings.

An evaluation tool (one process, polars), like the baselines: meant for evaluation catalogues,
not for a 100M-product rebuild.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl

from autoknow_ray.pipeline import read_parquet_any, table_file, write_table
from autoknow_ray.schema import BEHAVIOR, COPURCHASE, GOLD_TABLES

SUMMARY = "holdout_behaviour.json"


def _read(folder: Path, name: str) -> pl.DataFrame | None:
    p = table_file(folder, name)
    return read_parquet_any(p) if p.exists() else None


def _copy_except(src: Path, dest: Path, skip: set[str]) -> None:
    """Copy `src` into `dest` (made) but the entries named in `skip` (a table's file or folder)."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name in skip:
            continue
        target = dest / item.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, target)


def holdout_behaviour(catalogue: str | Path, out: str | Path, *, fraction: float | None = None,
                      products: int | None = None, seed: int = 0, min_pairs: int = 1) -> dict:
    catalogue, out = Path(catalogue), Path(out)
    if (fraction is None) == (products is None):
        raise ValueError("give one of --fraction (share of the eligible products) or --products (a count)")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
    if products is not None and products < 1:
        raise ValueError(f"--products must be at least 1, got {products}")
    if min_pairs < 1:
        raise ValueError(f"--min-pairs must be at least 1, got {min_pairs}")
    if not catalogue.is_dir():
        raise FileNotFoundError(f"catalogue folder not found: {catalogue}")
    if out.resolve() == catalogue.resolve():
        raise ValueError("--out must differ from --catalogue")
    copurchase = _read(catalogue, "copurchase")
    if copurchase is None or copurchase.height == 0:
        raise ValueError(f"{catalogue}: no copurchase table: no product has behaviour to withhold")
    copurchase = copurchase.select("src", "dst", "count")
    eligible = (copurchase.filter(pl.col("src") != pl.col("dst")).group_by("src").len()
                .filter(pl.col("len") >= min_pairs)["src"].sort().to_list())
    if not eligible:
        raise ValueError(f"{catalogue}: no product is the source of {min_pairs} co-purchase rows")
    k = products if products is not None else max(1, int(round(fraction * len(eligible))))
    if k > len(eligible):
        raise ValueError(f"--products {k}: only {len(eligible)} products have {min_pairs} "
                         f"co-purchase rows or more")
    rng = np.random.default_rng(seed)
    chosen = sorted(eligible[i] for i in rng.choice(len(eligible), size=k, replace=False))
    withheld = pl.Series("id", chosen).implode()

    # a row with a missing end touches no withheld product: it stays, for ingest to quarantine
    # (a null comparison would drop it from both halves)
    touches = (pl.col("src").is_in(withheld) | pl.col("dst").is_in(withheld)).fill_null(False)
    kept_cp = copurchase.filter(~touches)
    removed_cp = copurchase.filter(touches)
    gold_parts = [removed_cp.filter(pl.col("src").is_in(withheld) & (pl.col("src") != pl.col("dst")))]
    old_gold = _read(catalogue / "gold", "copurchase")
    if old_gold is not None and old_gold.height:
        gold_parts.append(old_gold.select("src", "dst", "count").filter(
            pl.col("src").is_in(withheld) & (pl.col("src") != pl.col("dst"))))
    gold = (pl.concat(gold_parts).group_by("src", "dst").agg(pl.col("count").sum())
            .sort("src", "dst"))
    behaviour = _read(catalogue, "behavior")
    removed_bh = 0
    if behaviour is not None:
        keep = ~pl.col("product_id").is_in(withheld).fill_null(False)
        removed_bh = behaviour.filter(~keep).height
        behaviour = behaviour.filter(keep)

    skip = {"copurchase.parquet", "copurchase", "behavior.parquet", "behavior", "gold"}
    _copy_except(catalogue, out, skip)
    write_table(out / "copurchase.parquet", kept_cp, COPURCHASE)
    if behaviour is not None:
        write_table(out / "behavior.parquet", behaviour, BEHAVIOR)
    if (catalogue / "gold").is_dir():
        _copy_except(catalogue / "gold", out / "gold", {"copurchase.parquet", "copurchase"})
    write_table(out / "gold" / "copurchase.parquet", gold, GOLD_TABLES["copurchase"])
    summary = {"catalogue": str(catalogue), "out": str(out), "seed": seed, "min_pairs": min_pairs,
               "eligible_products": len(eligible), "withheld_products": k,
               "copurchase_rows_removed": removed_cp.height, "copurchase_rows_kept": kept_cp.height,
               "behavior_rows_removed": removed_bh, "gold_pairs": gold.height,
               "withheld": chosen}
    (out / "gold" / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return {k: v for k, v in summary.items() if k != "withheld"}
