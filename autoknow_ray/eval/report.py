"""The run report: what a rebuild did, as RUN/report.json and a self-contained RUN/report.html.

It reads only manifests, per-type tables and bounded samples: the graph's triples and the
products are scanned batch by batch (a file or a folder of shards) and only the first rows per
(module, status) and those rows' product titles are kept, so the report costs the same driver
memory for a 100M-product graph as for a toy one. Stages and graph tables are discovered from
the run folder, so a new module's stage and tables show up without changes here.
`autoknow eval` re-renders the page with the metrics beside their published anchors.
The quarantine (a folder of shards, one sub-folder per input table) is published as
RUN/quarantine/ beside the report.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from autoknow_ray import storage
from autoknow_ray.graph.export import scan_batches, table_dataset
from autoknow_ray.pipeline import RunContext, Stage, count_rows, read_manifest, table_file
from autoknow_ray.schema import GRAPH_TABLES

# How much of the per-product tables the page shows: bounded, whatever the catalogue's size.
SAMPLES_PER_GROUP = 25  # triples per (module, status)
SAMPLE_SCAN_ROWS = 2_000_000  # edited triples scanned at most to fill the groups
SAMPLE_SETTLED_ROWS = 500_000  # ... and the scan stops once this many bring no new group
TABLE_SAMPLE_ROWS = 15  # first rows shown of each graph table
QUARANTINE_SAMPLE_ROWS = 20
MAX_REASONS = 200  # distinct quarantine reasons counted; the rest are summed as "(other)"
MAX_NEW_TYPES = 300  # new types drawn in the taxonomy tree
MAX_TAXONOMY_ROWS = 1_000_000  # a taxonomy is per type; a larger one is not drawn
EDIT_STATUSES = ("added", "corrected", "removed")
STANDARD_KEYS = ("stage", "fingerprint", "complete", "seconds", "rows_per_s", "finished_at",
                 "rows_in", "rows_out", "rows_quarantined", "resources", "tables",
                 "quarantine_reasons", "units", "rows_dropped", "per_product",
                 "balance_checked")  # shown in their own tables

# Figures published for the same tasks (README "Results"; papers/autoknow-article.txt). Not the
# same test sets: shown for orientation beside ours, never as a pass mark.
PUBLISHED_ANCHORS: list[tuple[str, float | None, str]] = [
    (r"^type_extraction\.(f1|accuracy)$", 0.877,
     "AutoKnow article: product types identified with 87.7% accuracy"),
    (r"^type_span_extraction\.f1$", 0.877, "AutoKnow article: product type accuracy 87.7%"),
    (r"^attribute_extraction\.f1$", 0.83,
     "GPT-4 prompting on OA-Mine test titles (value-level F1; another test set)"),
    (r"^attribute_values\.f1$", 0.91, "GPT-4 on WDC-PAVE titles + descriptions (another test set)"),
    (r"^synonyms?\..*auc_pr$", 0.83, "AutoKnow article: synonym finding, area under the P-R curve"),
    (r"^related\..*(hr|hit|mrr)", None,
     "related-products GNN article: +30% to +160% HR/MRR over the best earlier methods"),
]
FACTS_ANCHOR = (2.98, "AutoKnow article: facts in the consumables graph up almost 200% (≈ ×3)")


def anchor_for(metric: str) -> tuple[float | None, str] | None:
    for pattern, value, source in PUBLISHED_ANCHORS:
        if re.search(pattern, metric):
            return value, source
    return None


# ---- what the run folder holds -----------------------------------------------------------------
def stage_names_in(run: Path) -> list[str]:
    """The stages that wrote a manifest in `run`, in flow order, any unknown ones after."""
    from autoknow_ray.rebuild import STAGE_ORDER

    found = [p.parent.name for p in run.glob("*/manifest.json")
             if not p.parent.name.startswith(".")]
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return sorted((s for s in found if s not in ("report", "models")),
                  key=lambda s: (order.get(s, len(order)), s))


def _table_names(folder: Path) -> list[str]:
    names = {p.stem for p in folder.glob("*.parquet")}
    names |= {p.name for p in folder.iterdir()
              if p.is_dir() and not p.name.startswith((".", "_")) and any(p.rglob("*.parquet"))}
    return sorted(names)


def table_rows(path: Path) -> int:
    """Rows of a table from the Parquet footers alone."""
    ds = table_dataset(path)
    if ds is None:
        return 0
    return sum(pq.ParquetFile(f, filesystem=ds.filesystem).metadata.num_rows for f in ds.files)


def _scalar(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def _flatten(d: dict, prefix: str = "", out: dict | None = None, limit: int = 60) -> dict:
    """A manifest's figures as flat `a.b.c` keys: scalars only, at most `limit` of them."""
    out = {} if out is None else out
    for k, v in d.items():
        if len(out) >= limit:
            break
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _flatten(v, key + ".", out, limit)
        elif _scalar(v):
            out[key] = v
        elif isinstance(v, list) and len(v) <= 8 and all(_scalar(x) for x in v):
            out[key] = ", ".join(str(x) for x in v)
    return out


def _stage_entry(run: Path, name: str) -> dict | None:
    m = read_manifest(run / name)
    if not m:
        return None
    rows_in, rows_out, rows_q = m.get("rows_in"), m.get("rows_out"), m.get("rows_quarantined")
    dropped = m.get("rows_dropped") or {}
    # a stage that checks its balance says so (ingest always did); the others' figures are in
    # units that do not add up (products in, pairs out) and get no balance line
    checked = bool(m.get("balance_checked")) or name == "ingest"
    entry = {
        "stage": name,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_quarantined": rows_q,  # None: the stage has no quarantine
        "rows_dropped": dropped,
        "units": m.get("units"),
        "per_product": bool(m.get("per_product")),
        "seconds": m.get("seconds"),
        "rows_per_s": m.get("rows_per_s"),
        "resources": m.get("resources"),
        "balanced": ((rows_in or 0) == (rows_out or 0) + (rows_q or 0) + sum(dropped.values())
                     if checked else None),
        "finished_at": m.get("finished_at"),
        "figures": _flatten({k: v for k, v in m.items() if k not in STANDARD_KEYS}),
        "tables": m["tables"] if name == "ingest" and "tables" in m else
        {t: table_rows(table_file(run / name, t)) for t in _table_names(run / name)},
    }
    if m.get("quarantine_reasons"):
        entry["quarantine_reasons"] = m["quarantine_reasons"]
    if m.get("abstained"):  # a module that judged itself unsafe here wrote nothing (of a kind)
        a = m["abstained"]
        entry["abstained"] = a if isinstance(a, dict) else {"all": a}
    # the module-1 figures earlier reports carried at the top level
    entry.update({k: m[k] for k in m if k.startswith(("types_", "new_", "tagger_", "hypernym_"))
                  and _scalar(m[k])})
    return entry


# ---- bounded reads of the per-product tables ---------------------------------------------------
def quarantine_summary(run: Path) -> dict:
    path = table_file(run / "ingest", "quarantine")
    counts: dict[tuple, int] = {}
    sample, total = [], 0
    cols = ["table", "source", "row", "product_id", "reason", "raw"]
    for b in scan_batches(path, cols):
        total += b.num_rows
        if len(sample) < QUARANTINE_SAMPLE_ROWS:
            for r in b.slice(0, QUARANTINE_SAMPLE_ROWS - len(sample)).to_pylist():
                r["raw"] = (r.get("raw") or "")[:300]
                sample.append(r)
        for (table, reason), n in zip(*_group_counts(b, ["table", "reason"])):
            key = (table, reason) if (table, reason) in counts or len(counts) < MAX_REASONS \
                else (table, "(other reasons)")
            counts[key] = counts.get(key, 0) + n
    by_reason = [{"table": t, "reason": r, "rows": n}
                 for (t, r), n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return {"total": total, "by_reason": by_reason, "sample": sample}


def _group_counts(batch, keys: list[str]):
    import pyarrow as pa

    t = pa.Table.from_batches([batch]).select(keys).group_by(keys).aggregate([([], "count_all")])
    groups = list(zip(*(t.column(k).to_pylist() for k in keys)))
    return groups, t.column("count_all").to_pylist()


def edit_samples(run: Path, per_group: int = SAMPLES_PER_GROUP,
                 max_scan: int = SAMPLE_SCAN_ROWS) -> dict[str, dict[str, list[dict]]]:
    """The first `per_group` added / corrected / removed triples per module, with the product's
    title, from a scan of the edited triples that stops at `max_scan` rows, or earlier when
    every group is full and SAMPLE_SETTLED_ROWS more rows brought no new (module, status)."""
    path = table_file(run / "graph", "triples")
    groups: dict[tuple[str, str], list[dict]] = {}
    scanned = last_new_group = 0
    flt = pc.field("status").isin(list(EDIT_STATUSES))
    for b in scan_batches(path, None, flt, GRAPH_TABLES["triples"]):
        scanned += b.num_rows
        wanted: dict[tuple[str, str], list[int]] = {}
        keys = zip(b.column("module").to_pylist(), b.column("status").to_pylist())
        for i, (module, status) in enumerate(keys):  # two columns only; rows are taken below
            key = (module or "?", status)
            rows = wanted.setdefault(key, [])
            if len(groups.get(key, ())) + len(rows) < per_group:
                rows.append(i)
        if any(key not in groups for key in wanted):
            last_new_group = scanned
        for key, idx in wanted.items():
            groups.setdefault(key, []).extend(b.take(idx).to_pylist() if idx else [])
        full = all(len(g) >= per_group for g in groups.values())
        if scanned >= max_scan or (full and scanned - last_new_group >= SAMPLE_SETTLED_ROWS):
            break
    ids = {r["subject"] for g in groups.values() for r in g if r["subject"] is not None}
    titles = product_titles(run, ids)
    out: dict[str, dict[str, list[dict]]] = {}
    for (module, status), rows in sorted(groups.items()):
        for r in rows:
            r["title"] = titles.get(r["subject"])
        out.setdefault(module, {})[status] = rows
    return out


def product_titles(run: Path, ids: set[str]) -> dict[str, str]:
    """Titles of just these products (a filtered scan of ingest/products)."""
    if not ids:
        return {}
    titles: dict[str, str] = {}
    flt = pc.field("product_id").isin(sorted(ids))
    for b in scan_batches(table_file(run / "ingest", "products"), ["product_id", "title"], flt):
        titles.update(zip(b.column("product_id").to_pylist(), b.column("title").to_pylist()))
    return titles


def graph_tables(run: Path) -> dict[str, dict]:
    """Every table in RUN/graph: its rows (from the footers) and its first rows."""
    gdir = run / "graph"
    if not gdir.is_dir():
        return {}
    out = {}
    for name in _table_names(gdir):
        path = table_file(gdir, name)
        ds = table_dataset(path)
        head = []
        for f in ds.files if ds else []:  # the first file's first row group (tiny scanner
            # batches would make the dataset scanner cut a whole shard into them first)
            first = next(pq.ParquetFile(f, filesystem=ds.filesystem).iter_batches(
                batch_size=TABLE_SAMPLE_ROWS), None)
            if first is not None and first.num_rows:
                head = first.to_pylist()
                break
        out[name] = {"rows": table_rows(path), "columns": ds.schema.names if ds else [],
                     "head": head}
    return out


def new_types_tree(run: Path) -> dict:
    """The new types with their ancestors, as nested {name: {"new": bool, "confidence": x,
    "children": {...}}} from the roots down; only paths that lead to a new type."""
    path = table_file(run / "graph", "taxonomy")
    parents: dict[str, list[str]] = {}
    new: dict[str, float | None] = {}
    rows = 0
    cols = ["type", "parent", "is_new", "confidence"]
    for b in scan_batches(path, cols, None, GRAPH_TABLES["taxonomy"]):
        rows += b.num_rows
        if rows > MAX_TAXONOMY_ROWS:
            return {"too_large": rows, "tree": {}, "new_types": len(new)}
        for t, p, is_new, conf in zip(*(b.column(c).to_pylist() for c in cols)):
            if t is None:
                continue
            if p is not None and p not in parents.setdefault(t, []):
                parents[t].append(p)
            if is_new:
                new[t] = conf
    tree: dict = {}
    orphans = []

    def path_to_root(t: str, seen: set) -> list[str]:
        ps = parents.get(t) or []
        if not ps or ps[0] in seen:
            return [t]
        return path_to_root(ps[0], seen | {t}) + [t]

    for t in sorted(new)[:MAX_NEW_TYPES]:
        if not parents.get(t):
            orphans.append(t)
            continue
        for p in parents[t]:  # a type with several parents appears under each
            node = tree
            chain = path_to_root(p, {t}) + [t]
            for i, name in enumerate(chain):
                entry = node.setdefault(name, {"new": name in new, "confidence": None, "children": {}})
                if i == len(chain) - 1:
                    entry["confidence"] = new.get(t)
                node = entry["children"]
    return {"tree": tree, "unplaced": orphans, "new_types": len(new),
            "shown": min(len(new), MAX_NEW_TYPES)}


def eval_rows(run: Path) -> list[dict]:
    p = run / "eval.json"
    if not p.exists():
        return []
    try:
        metrics = json.loads(p.read_text())
    except json.JSONDecodeError:
        return []
    rows = []
    for k, v in sorted(metrics.items()):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        a = anchor_for(k)
        rows.append({"metric": k, "value": v, "anchor": a[0] if a else None,
                     "anchor_source": a[1] if a else None})
    return rows


# ---- the report ----------------------------------------------------------------------------------
def build_report(run: Path, stage_names: list[str] | None = None, meta: dict | None = None) -> dict:
    run = storage.path(run)
    names = stage_names if stage_names is not None else stage_names_in(run)
    stages = [e for e in (_stage_entry(run, n) for n in names if n != "report") if e]
    g = read_manifest(run / "graph")
    before, after = g.get("facts_before", {}), g.get("facts_after", {})
    facts = [
        {"relation": r, "before": before.get(r, 0), "after": after.get(r, 0),
         "ratio": round(after.get(r, 0) / before[r], 3) if before.get(r) else None}
        for r in sorted(set(before) | set(after), key=lambda r: -(after.get(r, 0) + before.get(r, 0)))
    ]
    total_before, total_after = sum(before.values()), sum(after.values())
    meta = meta or {}
    return {
        "run_dir": str(meta.get("run_dir", run)),
        "catalogue": meta.get("catalogue"),
        "models": meta.get("models"),
        "cluster": meta.get("cluster", {}),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stages": stages,
        "facts": facts,
        "facts_total": {"before": total_before, "after": total_after,
                        "ratio": round(total_after / total_before, 3) if total_before else None,
                        "anchor": FACTS_ANCHOR[0], "anchor_source": FACTS_ANCHOR[1]},
        "triple_status": g.get("status_counts", {}),
        "edits_per_module": g.get("edits", {}),
        "taxonomy_rows": g.get("taxonomy_rows"),
        "eval": eval_rows(run),
        "quarantine": quarantine_summary(run),
        "samples": edit_samples(run),
        "new_types": new_types_tree(run),
        "graph_tables": graph_tables(run),
    }


def write_report(run: Path, stage_names: list[str] | None = None, meta: dict | None = None) -> dict:
    from autoknow_ray.eval.report_html import render_html

    run = storage.path(run)
    report = build_report(run, stage_names, meta)
    (run / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (run / "report.html").write_text(render_html(report), encoding="utf-8")
    return report


def rerender(run: str | Path) -> bool:
    """Write the report again (after `autoknow eval` added RUN/eval.json); False when `run` has
    no report yet (a baseline's folder, a run that did not reach the report stage)."""
    run = storage.path(run)
    p = run / "report.json"
    if not p.exists():
        return False
    try:
        old = json.loads(p.read_text())
    except json.JSONDecodeError:
        old = {}
    names = [s["stage"] for s in old.get("stages", []) if isinstance(s, dict) and "stage" in s]
    write_report(run, names or None, {k: old[k] for k in ("run_dir", "catalogue", "models", "cluster")
                                      if k in old})
    return True


class ReportStage(Stage):
    name = "report"
    needs = ("ingest", "graph")
    units = {"rows_in": "stages of the run", "rows_out": "stages in the report"}
    balanced = True

    def fingerprint(self, ctx: RunContext) -> str:
        return f"always-{time.time_ns()}"  # cheap, and it must describe this run

    def run(self, ctx: RunContext) -> dict:
        meta = {"run_dir": str(ctx.run_dir), "catalogue": str(ctx.catalogue),
                "models": str(ctx.models) if ctx.models else None, "cluster": ctx.cluster}
        names = [s for s in ctx.cfg.stages if s != "report"]
        report = write_report(ctx.run_dir, names, meta)
        q = ctx.table_path("ingest", "quarantine")
        published = table_file(ctx.run_dir, "quarantine")
        if published.is_dir():
            storage.rmtree(published)
        elif published.exists():
            published.unlink()
        if q.is_dir():
            storage.copytree(q, ctx.run_dir / "quarantine")
        elif q.exists():
            storage.copy_file(q, ctx.run_dir / "quarantine.parquet")
        shown = {e["stage"] for e in report["stages"]}
        return {"rows_in": len(names), "rows_out": len(report["stages"]),
                "rows_dropped": {"stage without a manifest": sum(n not in shown for n in names)},
                "quarantine_rows_published": count_rows(table_file(ctx.run_dir, "quarantine"))}
