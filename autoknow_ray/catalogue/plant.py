"""Planted errors for judging data cleaning: a copy of a catalogue with some values and types made
wrong on purpose, and the list of what was planted in `gold/`.

Values (attributes and brand): each is planted with probability `rate`, as one of three kinds —
`swap` (the same attribute's value from another product), `other_attribute` (another attribute's
value from another product), `typo` (two character edits). Types: a `type_rate` share of the typed
products is moved to another type of the catalogue (e.g. Instacart products to a wrong aisle).
`gold/wrong_values` and `gold/wrong_types` say what was planted and what was right.
`take`/`skip` select a seeded slice of the products first, so two calls with the same seed give
disjoint training and evaluation catalogues.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import polars as pl

from autoknow_ray.pipeline import read_parquet_any, table_file, write_table
from autoknow_ray.schema import GOLD_TABLES, PRODUCTS, conform
from autoknow_ray.text import char_edits

KINDS = ("swap", "other_attribute", "typo")


def _typo(value: str, rng: random.Random) -> str:
    return char_edits(value, rng, 2)


def _read_products(catalogue: Path) -> pl.DataFrame:
    p = table_file(catalogue, "products")
    if not p.exists():
        raise FileNotFoundError(f"{catalogue}: no products.parquet (or products/ shards); plant "
                                f"reads catalogues written by `autoknow import` or `autoknow synth`")
    return pl.from_arrow(conform(read_parquet_any(p).to_arrow(), PRODUCTS))


def plant(catalogue: str | Path, out: str | Path, *, rate: float = 0.05, type_rate: float = 0.0,
          seed: int = 0, take: int | None = None, skip: int = 0) -> dict:
    catalogue, out = Path(catalogue), Path(out)
    if not 0 <= rate < 1 or not 0 <= type_rate < 1:
        raise ValueError(f"--rate and --type-rate must be in [0, 1), got {rate}, {type_rate}")
    if catalogue.resolve() == out.resolve():
        raise ValueError("--out must differ from --catalogue (plant writes a copy)")
    products = _read_products(catalogue)
    rng = random.Random(seed)
    order = list(range(products.height))
    rng.shuffle(order)
    order = order[skip : None if take is None else skip + take]
    products = products[sorted(order)]
    rows = products.to_dicts()

    facts_by_attr: dict[str, list[tuple[int, str]]] = {}
    all_facts: list[tuple[int, str, str]] = []
    for i, r in enumerate(rows):
        for a in r["attributes"] or []:
            if a and a.get("name") and a.get("value"):
                facts_by_attr.setdefault(a["name"], []).append((i, a["value"]))
                all_facts.append((i, a["name"], a["value"]))
        if r["brand"] and not any(a and a.get("name") == "Brand" for a in r["attributes"] or []):
            facts_by_attr.setdefault("Brand", []).append((i, r["brand"]))
            all_facts.append((i, "Brand", r["brand"]))

    def wrong_value(i: int, attr: str, value: str, kind: str) -> str | None:
        for _ in range(20):
            if kind == "swap":
                j, w = rng.choice(facts_by_attr[attr])
            elif kind == "other_attribute":
                j, a2, w = rng.choice(all_facts)
                if a2 == attr:
                    continue
            else:
                j, w = -1, _typo(value, rng)
            if j != i and w.strip() and w.casefold() != value.casefold():
                return w
        return None

    wrong_values, wrong_types, kinds = [], [], {k: 0 for k in KINDS}
    for i, r in enumerate(rows):
        attrs = [dict(a) for a in r["attributes"] or [] if a]
        for a in attrs:
            if a.get("name") and a.get("value") and rng.random() < rate:
                kind = rng.choice(KINDS)
                w = wrong_value(i, a["name"], a["value"], kind)
                if w is None:
                    continue
                wrong_values.append({"product_id": r["product_id"], "attribute": a["name"],
                                     "value": w, "correct_value": a["value"]})
                kinds[kind] += 1
                if a["name"] == "Brand" and r["brand"] == a["value"]:
                    r["brand"] = w
                a["value"] = w
        if r["brand"] and not any(a.get("name") == "Brand" for a in attrs) and rng.random() < rate:
            kind = rng.choice(KINDS)
            w = wrong_value(i, "Brand", r["brand"], kind)
            if w is not None:
                wrong_values.append({"product_id": r["product_id"], "attribute": "Brand",
                                     "value": w, "correct_value": r["brand"]})
                kinds[kind] += 1
                r["brand"] = w
        r["attributes"] = attrs
    types = sorted({r["product_type"] for r in rows if r["product_type"]})
    if type_rate > 0 and len(types) > 1:
        for r in rows:
            if r["product_type"] and rng.random() < type_rate:
                w = rng.choice([t for t in types if t != r["product_type"]])
                wrong_types.append({"product_id": r["product_id"], "type": w,
                                    "correct_type": r["product_type"]})
                r["product_type"] = w

    out.mkdir(parents=True, exist_ok=True)
    for f in catalogue.iterdir():
        if f.name.startswith("products") or f.name == "gold":
            continue
        (shutil.copytree if f.is_dir() else shutil.copy2)(f, out / f.name)
    if (catalogue / "gold").is_dir():
        shutil.copytree(catalogue / "gold", out / "gold", dirs_exist_ok=True)
    write_table(out / "products.parquet", pl.DataFrame(rows, schema=products.schema), PRODUCTS)
    write_table(out / "gold" / "wrong_values.parquet",
                pl.DataFrame(wrong_values, schema={k: pl.String for k in GOLD_TABLES["wrong_values"].names}),
                GOLD_TABLES["wrong_values"])
    write_table(out / "gold" / "wrong_types.parquet",
                pl.DataFrame(wrong_types, schema={k: pl.String for k in GOLD_TABLES["wrong_types"].names}),
                GOLD_TABLES["wrong_types"])
    n_values = len(all_facts)
    return {"products": len(rows), "values": n_values, "wrong_values": len(wrong_values),
            "wrong_value_kinds": kinds, "typed_products": sum(1 for r in rows if r["product_type"]),
            "wrong_types": len(wrong_types), "out": str(out)}
