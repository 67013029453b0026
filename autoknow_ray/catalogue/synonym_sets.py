"""Catalogues for checking synonym finding as a user would: `autoknow synonym-sets SOURCE PATH`.

Each source becomes two catalogues, `OUT/train` and `OUT/test`, split with a seed by offer
(WDC-PAVE) or by synonym group (Open Food Facts), so no term pair of the test side was seen in
training. Each has `gold/synonyms` for its own side only.

- wdc-pave: every offer appears twice, once with its raw values (`wdc-<id>-raw`) and once with
  its normalized values (`wdc-<id>-norm`), same title and description; gold/synonyms holds the
  raw -> normalized value pairs (the importer's pairing). Product Type keeps the raw value on
  both (the normalized one is a coarse class, a hypernym rather than a synonym).
- off-taxonomy: one product per category name and per English synonym of it, typed with that
  name (title = the name); as many categories without synonyms are added, so near names that
  are not synonyms ("Retsina of Pikermi" / "Retsina of Peania") are in the vocabulary too.
  gold/synonyms holds the taxonomy's English synonyms.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from autoknow_ray.catalogue.importers import (
    PRODUCT_TYPE_ATTR, _Ctx, _iter_jsonl, _synonym_pairs, _wdc_companion, _wdc_values,
    import_source)
from autoknow_ray.pipeline import write_table
from autoknow_ray.schema import GOLD_SYNONYMS, PRODUCTS, TAXONOMY

SOURCES = ("wdc-pave", "off-taxonomy")


def _in_test(key: str, seed: int, fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def _write(out: Path, products: list[dict], taxonomy: list[dict], synonyms: list[dict]) -> dict:
    write_table(out / "products.parquet", pl.DataFrame(products, schema=pl.from_arrow(
        PRODUCTS.empty_table()).schema, orient="row") if products else PRODUCTS.empty_table(), PRODUCTS)
    write_table(out / "taxonomy.parquet", pl.DataFrame(taxonomy, schema={"type": pl.String,
                                                                         "parent": pl.String}),
                TAXONOMY)
    write_table(out / "gold" / "synonyms.parquet",
                pl.DataFrame(synonyms, schema={"kind": pl.String, "attribute": pl.String,
                                               "term": pl.String, "canonical": pl.String}),
                GOLD_SYNONYMS)
    return {"products": len(products), "gold_synonyms": len(synonyms)}


def _wdc(path: Path, out: Path, seed: int, fraction: float) -> dict:
    files = [path] if path.is_file() else sorted(
        f for f in path.iterdir() if f.suffix == ".jsonl" and "normalized" not in f.name)
    sides = {"train": ([], set(), []), "test": ([], set(), [])}
    seen: set[tuple] = set()
    ctx = _Ctx(source="wdc-pave", path=path, out=out, blind=False, holdout=0.0, seed=seed)
    for file in files:
        comp = _wdc_companion(file)
        if comp is None:
            raise ValueError(f"wdc-pave: {file} has no *_normalized_* companion file")
        norm = {str(r["id"]): r.get("target_scores") or {} for _, r in _iter_jsonl(ctx, comp)
                if r.get("id") is not None}
        for _, rec in _iter_jsonl(ctx, file):
            oid, title = rec.get("id"), rec.get("input_title")
            ts, other = rec.get("target_scores") or {}, norm.get(str(rec.get("id")))
            if oid is None or not isinstance(title, str) or not title.strip() or other is None:
                continue
            side = "test" if _in_test(str(oid), seed, fraction) else "train"
            products, types, synonyms = sides[side]
            raw_vals = {a: _wdc_values(v) for a, v in ts.items() if isinstance(v, dict)}
            norm_vals = {a: _wdc_values(v) for a, v in other.items() if isinstance(v, dict)}
            ptype = next((v for v, _ in raw_vals.get(PRODUCT_TYPE_ATTR, [])), None)
            desc = rec.get("input_description") if isinstance(rec.get("input_description"), str) else None
            for suffix, vals in (("raw", raw_vals), ("norm", norm_vals)):
                attrs = [{"name": a, "value": v} for a, vs in vals.items() if a != PRODUCT_TYPE_ATTR
                         for v, _ in vs]
                brand = next((v for v, _ in vals.get("Brand", [])), None)
                products.append((f"wdc-{oid}-{suffix}", title.strip(), desc, None, ptype, attrs, brand))
            if ptype:
                types.add(ptype)
            for a, vs in raw_vals.items():
                if a == PRODUCT_TYPE_ATTR or a not in norm_vals:
                    continue
                pairs, _ = _synonym_pairs(vs, norm_vals[a])
                for term, canon in pairs:
                    if term.casefold().split() == canon.casefold().split():
                        continue
                    if (side, a, term, canon) not in seen:
                        seen.add((side, a, term, canon))
                        synonyms.append({"kind": "value", "attribute": a, "term": term,
                                         "canonical": canon})
    return {side: _write(out / side, [dict(zip(PRODUCTS.names, p)) for p in prods],
                         [{"type": t, "parent": None} for t in sorted(types)], syn)
            for side, (prods, types, syn) in sides.items()}


def _off(path: Path, out: Path, seed: int, fraction: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        import_source("off-taxonomy", path, tmp, holdout=0.0, seed=seed)
        gold = pl.read_parquet(Path(tmp) / "gold" / "synonyms.parquet")
        names = pl.read_parquet(Path(tmp) / "taxonomy.parquet")["type"].unique().sort().to_list()
    groups: dict[str, list[str]] = {}
    for term, canon in gold.select("term", "canonical").iter_rows():
        groups.setdefault(canon, []).append(term)
    rng = np.random.default_rng(seed)
    plain = [n for n in names if n not in groups]
    plain = [plain[i] for i in sorted(rng.choice(len(plain), min(len(plain), len(groups)), replace=False))]
    sides = {"train": ([], []), "test": ([], [])}
    for canon in sorted(groups) + plain:
        side = "test" if _in_test(canon, seed, fraction) else "train"
        products, synonyms = sides[side]
        terms = [canon] + sorted(set(groups.get(canon, [])) - {canon})
        for t in terms:
            products.append({"product_id": "off-" + hashlib.sha1(t.encode()).hexdigest()[:12],
                             "title": t, "description": None, "bullets": None, "product_type": t,
                             "attributes": [], "brand": None})
        synonyms += [{"kind": "type", "attribute": None, "term": t, "canonical": canon}
                     for t in terms[1:]]
    result = {}
    for side, (products, synonyms) in sides.items():
        uniq = list({p["product_id"]: p for p in products}.values())
        types = sorted({p["product_type"] for p in uniq})
        result[side] = _write(out / side, uniq, [{"type": t, "parent": None} for t in types], synonyms)
    return result


def synonym_sets(source: str, path: str | Path, out: str | Path, *, seed: int = 0,
                 test_fraction: float = 0.5) -> dict:
    src = str(source).strip().lower()
    if src not in SOURCES:
        raise ValueError(f"synonym-sets: unknown source {source!r}; expected one of {SOURCES}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    path, out = Path(path).expanduser(), Path(out).expanduser()
    if not path.exists():
        raise ValueError(f"{src}: path not found: {path}")
    summary = (_wdc if src == "wdc-pave" else _off)(path, out, seed, test_fraction)
    meta = {"source": src, "path": str(path.resolve()), "seed": seed, "test_fraction": test_fraction,
            "counts": summary}
    (out / "manifest.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
