"""`autoknow bench --incremental`: a nightly change, rebuilt incrementally and in full.

A synthetic catalogue (A) is rebuilt in full; a changed copy (B: a share of titles replaced by
other products' titles, products added, products removed; every other table as it was) is
rebuilt incrementally from A's run (`rebuild --previous`) and then in full from scratch with
the same models. Reports both wall times (and per stage), the share of per-product model work
reused, and whether the two graphs have the same content.

Writes OUT/incremental.json and OUT/incremental.md; catalogues under OUT/data/, runs under
OUT/runs/ (replaced by each bench).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

SIZE = {True: 2_000, False: 20_000}
EDITED, ADDED, REMOVED = 0.02, 0.01, 0.01


def changed_catalogues(root: Path, n: int, seed: int, edited: float = EDITED, added: float = ADDED,
                       removed: float = REMOVED) -> dict:
    """Catalogues A (n products) and B (A with `removed` of them gone, `added` new ones and
    `edited` of its titles replaced by other products' titles) under root; the other tables
    (taxonomy, behaviour, co-purchases, texts) are A's in both."""
    import polars as pl

    from autoknow_ray.catalogue.synth import synthesize

    n_add, n_rem, n_edit = (max(1, round(n * f)) for f in (added, removed, edited))
    world = root / f"world-{n}-seed{seed}"
    if not (world / "gold" / "manifest.json").exists():
        shutil.rmtree(world, ignore_errors=True)
        synthesize(n + n_add, world, seed=seed)
    products = pl.read_parquet(world / "products" / "*.parquet").sort("product_id")
    a = products.head(n)
    kept = a.tail(n - n_rem)
    ids = kept["product_id"].to_list()
    step = max(1, len(ids) // n_edit)
    edit_ids = ids[::step][:n_edit]
    # each edited product takes the title of a product half the catalogue away
    titles = dict(zip(kept["product_id"].to_list(), kept["title"].to_list()))
    new_titles = {p: titles[ids[(ids.index(p) + len(ids) // 2) % len(ids)]] for p in edit_ids}
    b = pl.concat([kept, products.slice(n, n_add)]).with_columns(
        pl.when(pl.col("product_id").is_in(edit_ids))
        .then(pl.col("product_id").replace(new_titles)).otherwise(pl.col("title")).alias("title"))
    out = {}
    for name, table in (("a", a), ("b", b)):
        d = root / f"catalogue-{name}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for item in world.iterdir():
            if item.name in ("products", "gold"):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy)(item, d / item.name)
        table.write_parquet(d / "products.parquet")
        out[name] = d
    out["counts"] = {"products_a": a.height, "products_b": b.height, "edited": len(edit_ids),
                     "added": n_add, "removed": n_rem}
    return out


def graph_content(run: Path) -> dict:
    """The graph tables' content, each sorted on every column it can be sorted on."""
    import polars as pl

    from autoknow_ray.pipeline import read_parquet_any, table_file

    out = {}
    for name in ("triples", "taxonomy", "attributes", "synonyms", "related"):
        path = table_file(run / "graph", name)
        if not path.exists():
            continue
        t = read_parquet_any(path)
        keys = [c for c, d in t.schema.items() if not isinstance(d, (pl.List, pl.Struct, pl.Array))]
        out[name] = t.sort(keys) if t.height and keys else t
    return out


def run_incremental_bench(out: str | Path, *, quick: bool = False, n: int | None = None, config=None,
                          models: str | None = None, address: str | None = None, seed: int = 0) -> dict:
    from autoknow_ray.bench.run import ensure_models
    from autoknow_ray.config import Config, load_config
    from autoknow_ray.rebuild import rebuild

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config if isinstance(config, Config) else load_config(config)
    n = int(n or SIZE[quick])
    model_info = ensure_models(out, models, cfg, quick, seed, address)  # fitted: short training
    cats = changed_catalogues(out / "data", n, seed)
    runs = out / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    timings = {}
    for name, catalogue, previous in (("full_a", cats["a"], None), ("incremental_b", cats["b"], "full_a"),
                                      ("full_b", cats["b"], None)):
        t0 = time.perf_counter()
        r = rebuild(catalogue, runs / name, models=model_info["path"], config=cfg, address=address,
                    previous=runs / previous if previous else None)
        timings[name] = {"wall_seconds": round(time.perf_counter() - t0, 2),
                         "stages": {s["stage"]: s["seconds"] for s in r["stages"]}}
    tax = json.loads((runs / "incremental_b" / "taxonomy" / "manifest.json").read_text())
    g_inc, g_full = graph_content(runs / "incremental_b"), graph_content(runs / "full_b")
    same = {k: bool(k in g_inc and g_inc[k].equals(g_full[k])) for k in g_full}
    identical = g_inc.keys() == g_full.keys() and all(same.values())
    cache = tax.get("cache", {}).get("title_models", {})
    full_cache = json.loads((runs / "full_b" / "taxonomy" / "manifest.json").read_text()
                            ).get("cache", {}).get("title_models", {})
    products = cache.get("products") or 0
    # every cached step of every stage: its seconds (step, join, cache write) and reuse counts
    steps = {}
    for stage in cfg.stages:
        mi, mf = (runs / r_ / stage / "manifest.json" for r_ in ("incremental_b", "full_b"))
        if not mi.exists():
            continue
        ci = json.loads(mi.read_text()).get("cache") or {}
        cf = (json.loads(mf.read_text()).get("cache") or {}) if mf.exists() else {}
        for step, c in ci.items():
            steps[f"{stage}.{step}"] = {
                "seconds": {"incremental_b": c.get("seconds"),
                            "full_b": (cf.get(step) or {}).get("seconds")},
                "reused": c.get("reused"), "recomputed": c.get("recomputed"),
                "products": c.get("products"),
                # a per-term or per-pair cache (synonyms): its rows, not products
                "rows": c.get("rows")}
    result = {
        "products": cats["counts"],
        "models": model_info,
        "stages": list(cfg.stages),
        "timings": timings,
        "incremental_over_full": round(timings["incremental_b"]["wall_seconds"]
                                       / timings["full_b"]["wall_seconds"], 3),
        "taxonomy_incremental_over_full": round(
            timings["incremental_b"]["stages"]["taxonomy"] / timings["full_b"]["stages"]["taxonomy"], 3)
        if "taxonomy" in timings["full_b"]["stages"] else None,
        # the cached step itself (the title models, with the join and the cache write)
        "title_models_seconds": {"incremental_b": cache.get("seconds"),
                                 "full_b": full_cache.get("seconds")},
        "reused": {k: cache.get(k) for k in ("reused", "recomputed", "added", "changed", "removed")},
        "share_reused": round(cache.get("reused", 0) / products, 4) if products else None,
        "cached_steps": list(steps) or ["taxonomy.title_models"],
        "cached_step_detail": steps,
        "graphs_identical": bool(identical),
        "tables_identical": same,
        "graph_rows": {k: v.height for k, v in g_full.items()},
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "incremental.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "incremental.md").write_text(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    t = r["timings"]
    stages = list(t["full_b"]["stages"])
    lines = [
        "# Incremental rebuild vs full rebuild",
        "",
        f"Catalogue A: {r['products']['products_a']:,} products; B: {r['products']['edited']} titles "
        f"edited, {r['products']['added']} products added, {r['products']['removed']} removed "
        f"({r['products']['products_b']:,} products). Stages: {', '.join(r['stages'])}. Cached: "
        f"{', '.join(r['cached_steps'])}.",
        "",
        "| stage | full A (s) | incremental B (s) | full B (s) |",
        "|---|---|---|---|",
        *[f"| {s} | {t['full_a']['stages'].get(s)} | {t['incremental_b']['stages'].get(s)} | "
          f"{t['full_b']['stages'].get(s)} |" for s in stages],
        f"| **wall** | {t['full_a']['wall_seconds']} | {t['incremental_b']['wall_seconds']} | "
        f"{t['full_b']['wall_seconds']} |",
        "",
        f"Incremental / full (wall): {r['incremental_over_full']}; taxonomy stage: "
        f"{r['taxonomy_incremental_over_full']}; the cached step itself (title models, join, cache "
        f"write): {r['title_models_seconds']['incremental_b']} s against "
        f"{r['title_models_seconds']['full_b']} s. Per-product title-model work reused: "
        f"{r['share_reused']} ({r['reused']}). Graphs identical: {r['graphs_identical']} (per table: {r['tables_identical']}).",
        "",
        *[f"- `{name}`: {d['seconds']['incremental_b']} s incremental against "
          f"{d['seconds']['full_b']} s full; {d['reused']} of "
          + (f"{d['products']} products" if d.get("products") is not None else f"{d.get('rows')} rows")
          + " reused."
          for name, d in (r.get("cached_step_detail") or {}).items()],
        "",
    ]
    return "\n".join(lines)


def main(args) -> int:
    r = run_incremental_bench(args.out, quick=bool(args.quick), n=(args.sizes or [None])[0],
                              config=args.config, models=args.models, address=args.address,
                              seed=int(args.seed))
    print(f"bench: {args.out}/incremental.json, incremental.md ({r['wall_seconds']:.0f} s)")
    for k in ("incremental_over_full", "taxonomy_incremental_over_full", "share_reused",
              "graphs_identical"):
        print(f"  {k}: {r[k]}")
    return 0
