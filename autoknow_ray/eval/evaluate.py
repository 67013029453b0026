"""`autoknow eval`: score a run's graph files against a gold folder, print a table.

Everything is read from RUN/graph/*.parquet (plus ranked candidate lists a stage keeps beside
its outputs for @k metrics), so the figures are what a user of the graph would see.
Keys are flat (`type_extraction.f1`, `attribute_extraction.Brand.f1`, `hypernym.type.acc@1`).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import polars as pl

from autoknow_ray.eval.metrics import accuracy_at_k, norm_text, norm_type, prf, set_prf
from autoknow_ray.pipeline import read_parquet_any, table_file
from autoknow_ray.schema import HAS_TYPE

TYPE_SPAN_ATTRIBUTES = {"product type"}  # gold span attributes that name the product type
# eval/<module>.py of each module after the first, each with score(run, gold) -> flat dict
MODULE_SCORERS = ("relations", "imputation", "cleaning", "synonyms", "related")


def _read_gold(gold: Path, name: str) -> pl.DataFrame | None:
    p = table_file(gold, name)
    df = read_parquet_any(p) if p.exists() else None
    return df if df is not None and df.height else None


def _live(triples: pl.DataFrame) -> pl.DataFrame:
    return triples.filter(pl.col("status") != "removed")


def eval_types(triples: pl.DataFrame, gold: pl.DataFrame) -> dict:
    pred = (
        _live(triples).filter(pl.col("relation") == HAS_TYPE)
        .sort("confidence", descending=True).unique("subject", keep="first")
    )
    pred_map = dict(zip(pred["subject"].to_list(), pred["object"].to_list()))
    tp = fp = fn = 0
    for pid, t in zip(gold["product_id"].to_list(), gold["type"].to_list()):
        p = pred_map.get(pid)
        if p is None:
            fn += 1
        elif norm_type(p) == norm_type(t):
            tp += 1
        else:
            fp += 1
            fn += 1
    out = {f"type_extraction.{k}": v for k, v in prf(tp, fp, fn).items()}
    out["type_extraction.products"] = gold.height
    return out


def _predicted_types(triples: pl.DataFrame) -> dict[str, str]:
    pred = (_live(triples).filter(pl.col("relation") == HAS_TYPE)
            .sort("confidence", descending=True, nulls_last=True).unique("subject", keep="first"))
    return dict(zip(pred["subject"].to_list(), pred["object"].to_list()))


def eval_open_world(triples: pl.DataFrame, taxonomy: pl.DataFrame, gold: pl.DataFrame,
                    fit_types: pl.DataFrame, hypernyms: pl.DataFrame | None) -> dict:
    """Types on a split where whole types were withheld from fit (`autoknow type-split`): the
    products of the fit types (`types.known.*`: accuracy, share typed) and of the withheld types
    (`types.unseen.*`): the share that got a new type (a type neither fit nor the run's taxonomy
    knew), with the gold name, forced into a known type (wrong by construction), or left untyped.

    Where the new type was attached, against the gold parents of its type in the whole taxonomy
    (gold/hypernyms; no parent row: a root), each a share of the withheld-type products:
    `attached_right` (under a gold parent, or under a new type that is itself under one),
    `attached_too_high` (under a proper ancestor of a gold parent; `attached_one_level_high`
    the part one level above), `attached_wrong_branch` (anywhere else), `unattached` (a root
    where gold has a parent) and `attached_under_leaf` (under a known type with no type below
    it, with products of its own, that is not a gold parent: a sibling taken for a parent).

    Variant names merged: per withheld type, the new-type names its products were given
    (`names_per_type`, the mean over withheld types that got any; 1.0 when each is one name), and
    the share of its new-typed products under its most common one (`variants_merged`, over all
    withheld-type products given a new type; 1.0 when no withheld type is split)."""
    fit_keys = {norm_type(t) for t in fit_types["type"].to_list() if t}
    known = set(fit_keys)
    if taxonomy.height:
        known |= {norm_type(t) for t in taxonomy.filter(~pl.col("is_new"))["type"].to_list()}
    parents: dict[str, set[str]] = {}
    known_parents: dict[str, set[str]] = {}
    for t, p, new_t in taxonomy.filter(pl.col("parent").is_not_null()).select(
            "type", "parent", "is_new").iter_rows():
        parents.setdefault(norm_type(t), set()).add(norm_type(p))
        if not new_t:
            known_parents.setdefault(norm_type(t), set()).add(norm_type(p))
    has_child = {p for ps in known_parents.values() for p in ps}
    # a product type: a known type with products of its own in the graph (an inner node left
    # without children by the split is no product type)
    with_products = {norm_type(o) for o in _live(triples).filter(pl.col("relation") == HAS_TYPE)
                     .get_column("object").unique().to_list() if o is not None}

    def ancestors(t: str, edges: dict[str, set[str]]) -> set[str]:
        out, todo = set(), list(edges.get(t, ()))
        while todo:
            a = todo.pop()
            if a not in out:
                out.add(a)
                todo += edges.get(a, ())
        return out

    gold_parents: dict[str, set[str]] = {}
    if hypernyms is not None:
        for c, p in hypernyms.filter((pl.col("child_kind") == "type") & (pl.col("depth") == 1)) \
                .select("child", "parent").iter_rows():
            gold_parents.setdefault(norm_type(c), set()).add(norm_type(p))
    pred = _predicted_types(triples)
    n_known = known_right = known_typed = 0
    n_unseen = new = named = forced = untyped = 0
    place = dict.fromkeys(("right", "too_high", "one_level_high", "wrong_branch", "unattached",
                           "under_leaf"), 0)
    new_names: dict[str, dict[str, int]] = {}  # withheld gold type -> new name -> products
    for pid, t in zip(gold["product_id"].to_list(), gold["type"].to_list()):
        g = norm_type(t)
        p = pred.get(pid)
        pk = norm_type(p) if p is not None else None
        if g in fit_keys:
            n_known += 1
            known_typed += pk is not None
            known_right += pk == g
            continue
        n_unseen += 1
        if pk is None:
            untyped += 1
        elif pk in known:
            forced += 1
        else:
            new += 1
            named += pk == g
            per = new_names.setdefault(g, {})
            per[pk] = per.get(pk, 0) + 1
            want, got = gold_parents.get(g, set()), parents.get(pk, set())
            # a new type under a new type under a gold parent: right
            reach = got | {a for x in got - known for a in ancestors(x, parents)}
            above = {a for w in want for a in ancestors(w, known_parents)}
            one_up = {a for w in want for a in known_parents.get(w, ())}
            if (want & reach) if want else not got:
                place["right"] += 1
            elif not got:
                place["unattached"] += 1
            elif got & above:
                place["too_high"] += 1
                place["one_level_high"] += bool(got & one_up)
            else:
                place["wrong_branch"] += 1
            place["under_leaf"] += any(x in known and x not in has_child and x in with_products
                                       and x not in want for x in got)

    def share(x: int, n: int) -> float:
        return round(x / n, 4) if n else 0.0

    out = {"types.known.products": n_known, "types.unseen.products": n_unseen}
    if n_known:
        out["types.known.accuracy"] = share(known_right, n_known)
        out["types.known.typed"] = share(known_typed, n_known)
    if n_unseen:
        out.update({
            "types.unseen.new_type": share(new, n_unseen),
            "types.unseen.new_type_gold_name": share(named, n_unseen),
            "types.unseen.attached_right": share(place["right"], n_unseen),
            "types.unseen.attached_too_high": share(place["too_high"], n_unseen),
            "types.unseen.attached_one_level_high": share(place["one_level_high"], n_unseen),
            "types.unseen.attached_wrong_branch": share(place["wrong_branch"], n_unseen),
            "types.unseen.unattached": share(place["unattached"], n_unseen),
            "types.unseen.attached_under_leaf": share(place["under_leaf"], n_unseen),
            "types.unseen.forced_known": share(forced, n_unseen),
            "types.unseen.untyped": share(untyped, n_unseen),
        })
        if new_names:
            out["types.unseen.names_per_type"] = round(
                sum(len(v) for v in new_names.values()) / len(new_names), 4)
            out["types.unseen.variants_merged"] = share(
                sum(max(v.values()) for v in new_names.values()), new)
    return out


def eval_attributes(triples: pl.DataFrame, spans: pl.DataFrame, field: str | None) -> dict:
    g = spans.filter(~pl.col("attribute").str.to_lowercase().is_in(list(TYPE_SPAN_ATTRIBUTES)))
    if field:
        g = g.filter(pl.col("field") == field)
    if g.height == 0:
        return {}
    products = set(g["product_id"].to_list())
    gold = {(p, norm_text(a), norm_text(v)) for p, a, v in g.select("product_id", "attribute", "value").iter_rows()}
    attrs = {a for _, a, _ in gold}
    live = _live(triples).filter(
        (pl.col("relation") != HAS_TYPE) & pl.col("subject").is_in(list(products)))
    pred = {(s, norm_text(r), norm_text(o)) for s, r, o in live.select("subject", "relation", "object").iter_rows()}
    pred = {x for x in pred if x[1] in attrs}  # attributes the gold does not label cannot be judged
    prefix = "attribute_extraction" if field == "title" else "attribute_values"
    out = {f"{prefix}.{k}": v for k, v in set_prf(pred, gold).items()}
    # each module's own facts against the same gold (module 1's figure is `by_module.taxonomy`):
    # the figures above mix modules, and a value module 3 reads in a description is not a
    # title span, so a title-only score counts it wrong whatever module 1 did
    for m in sorted(x for x in live.get_column("module").unique().to_list() if x is not None):
        mine = {(s, norm_text(r), norm_text(o)) for s, r, o in live.filter(pl.col("module") == m)
                .select("subject", "relation", "object").iter_rows()}
        mine = {x for x in mine if x[1] in attrs}
        if mine:
            r = set_prf(mine, gold)
            out.update({f"{prefix}.by_module.{m}.{k}": r[k] for k in ("precision", "recall", "f1")})
    for a in sorted(attrs):
        r = set_prf({x for x in pred if x[1] == a}, {x for x in gold if x[1] == a})
        out[f"{prefix}.{a}.f1"] = r["f1"]
        out[f"{prefix}.{a}.support"] = r["tp"] + r["fn"]
    return out


def _ranked_parents(run: Path, taxonomy: pl.DataFrame) -> dict[str, list[str]]:
    cand = table_file(run / "taxonomy", "hypernym_candidates")
    ranked: dict[str, list[str]] = {}
    if cand.exists():
        c = read_parquet_any(cand).sort(["type", "rank"])
        for t, p in c.select("type", "parent").iter_rows():
            ranked.setdefault(t, []).append(p)
    t = taxonomy.filter(pl.col("parent").is_not_null()).sort("confidence", descending=True)
    for ty, p in t.select("type", "parent").iter_rows():
        lst = ranked.setdefault(ty, [])
        if p not in lst and not cand.exists():
            lst.append(p)
    return ranked


def eval_hypernyms(run: Path, triples: pl.DataFrame, taxonomy: pl.DataFrame, gold: pl.DataFrame) -> dict:
    ranked_types = _ranked_parents(run, taxonomy)
    parents_of: dict[str, list[str]] = {}
    for ty, p in taxonomy.filter(pl.col("parent").is_not_null()).sort("confidence", descending=True).select("type", "parent").iter_rows():
        parents_of.setdefault(ty, []).append(p)
    out = {}
    tg = gold.filter(pl.col("child_kind") == "type")
    if tg.height:
        # type names compare like type_extraction does (case, spacing, a plural ending): a new
        # type written "Golf Ball" from titles is the gold's "golf ball"
        g = {}
        for c, p in tg.filter(pl.col("depth") == 1).select("child", "parent").iter_rows():
            g.setdefault(norm_type(c), set()).add(norm_type(p))
        ranked_norm: dict[str, list[str]] = {}
        for c, lst in ranked_types.items():
            ranked_norm.setdefault(norm_type(c), [norm_type(x) for x in lst])
        for k in (1, 3):
            out[f"hypernym.type.acc@{k}"] = accuracy_at_k(ranked_norm, g, k)
        out["hypernym.type.children"] = len(g)
    pg = gold.filter(pl.col("child_kind") == "product")
    if pg.height:
        # a product's ranked types: the product candidates a stage kept, else its has_type
        cand = table_file(run / "taxonomy", "product_type_candidates")
        ranked: dict[str, list[str]] = {}
        if cand.exists() and (c := read_parquet_any(cand)).height:
            for pid, t in c.sort(["product_id", "rank"]).select("product_id", "type").iter_rows():
                ranked.setdefault(pid, []).append(t)
        for pid, t in _live(triples).filter(pl.col("relation") == HAS_TYPE).sort("confidence", descending=True).select("subject", "object").iter_rows():
            lst = ranked.setdefault(pid, [])
            if t not in lst:
                lst.insert(0, t)
        known = set(taxonomy.filter(~pl.col("is_new"))["type"].to_list()) if taxonomy.height else set()

        def expand(types: list[str]) -> list[str]:
            # a new type stands for the parents it was attached to
            out_l = []
            for t in types:
                for x in ([t] if t in known else ranked_types.get(t, parents_of.get(t, []))):
                    if x not in out_l:
                        out_l.append(x)
            return out_l

        level1 = {pid: expand(ts) for pid, ts in ranked.items()}
        level2 = {}
        for pid, ts in level1.items():
            lst = []
            for t in ts:
                for p in parents_of.get(t, []):
                    if p not in lst:
                        lst.append(p)
            level2[pid] = lst
        for depth, ranked_d in ((1, level1), (2, level2)):
            ranked_d = {c: [norm_type(x) for x in lst] for c, lst in ranked_d.items()}
            g = {}
            for c, p in pg.filter(pl.col("depth") == depth).select("child", "parent").iter_rows():
                g.setdefault(c, set()).add(norm_type(p))
            if g:
                for k in (1, 3):
                    out[f"hypernym.product.depth{depth}.acc@{k}"] = accuracy_at_k(ranked_d, g, k)
                out[f"hypernym.product.depth{depth}.children"] = len(g)
    return out


def evaluate(run: str | Path, gold: str | Path) -> dict:
    run, gold = Path(run), Path(gold)
    gdir = run / "graph"
    if not table_file(gdir, "triples").exists():
        raise FileNotFoundError(f"{run}: no graph/triples (file or folder) — is this a finished run?")
    if not gold.is_dir():
        raise FileNotFoundError(f"gold folder not found: {gold}")
    triples = read_parquet_any(table_file(gdir, "triples"))
    taxonomy = read_parquet_any(table_file(gdir, "taxonomy"))
    results: dict = {}
    types = _read_gold(gold, "types")
    if types is not None:
        results.update(eval_types(triples, types))
        fit_types = _read_gold(gold, "fit_types")
        if fit_types is not None:
            results.update(eval_open_world(triples, taxonomy, types, fit_types,
                                           _read_gold(gold, "hypernyms")))
    spans = _read_gold(gold, "spans")
    if spans is not None:
        results.update(eval_attributes(triples, spans, "title"))
        results.update(eval_attributes(triples, spans, None))
        tspans = spans.filter(pl.col("attribute").str.to_lowercase().is_in(list(TYPE_SPAN_ATTRIBUTES))
                              & (pl.col("field") == "title"))
        if tspans.height:
            pred = {(s, norm_type(o)) for s, o in _live(triples).filter(pl.col("relation") == HAS_TYPE)
                    .filter(pl.col("subject").is_in(tspans["product_id"].unique().to_list()))
                    .select("subject", "object").iter_rows()}
            g = {(p, norm_type(v)) for p, v in tspans.select("product_id", "value").iter_rows()}
            # any of a product's gold type spans counts; one prediction per product
            hit = {p for p, t in pred if (p, t) in g}
            tp = len(hit)
            fp = len({p for p, _ in pred} - hit)
            fn = len({p for p, _ in g} - hit)
            results.update({f"type_span_extraction.{k}": v for k, v in prf(tp, fp, fn).items()})
    hyp = _read_gold(gold, "hypernyms")
    if hyp is not None:
        results.update(eval_hypernyms(run, triples, taxonomy, hyp))
    for module in MODULE_SCORERS:  # each module scores its own graph tables against gold/
        results.update(importlib.import_module(f"autoknow_ray.eval.{module}").score(run, gold))
    (run / "eval.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    return results


def format_table(results: dict) -> str:
    rows = [(k, v) for k, v in sorted(results.items()) if not isinstance(v, (dict, list))]
    if not rows:
        return "(no gold labels that this run can be scored on)"
    w = max(len(k) for k, _ in rows)
    lines = [f"{'metric'.ljust(w)}  value", f"{'-' * w}  -----"]
    lines += [f"{k.ljust(w)}  {v:.4f}" if isinstance(v, float) else f"{k.ljust(w)}  {v}" for k, v in rows]
    return "\n".join(lines)
