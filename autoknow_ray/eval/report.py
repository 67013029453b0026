"""The run report: rows in/out/quarantined and time per stage, facts per relation before/after.

Written as RUN/report.json and RUN/report.html; the quarantine table (a folder of shards, one
sub-folder per input table) is published as RUN/quarantine/ beside them.
"""
from __future__ import annotations

import html
import json
import shutil
import time

from autoknow_ray.pipeline import RunContext, Stage, read_manifest, table_file


def build_report(ctx: RunContext, stage_names: list[str]) -> dict:
    stages = []
    for name in stage_names:
        m = read_manifest(ctx.stage_dir(name))
        if not m:
            continue
        stages.append({
            "stage": name,
            "rows_in": m.get("rows_in"),
            "rows_out": m.get("rows_out"),
            "rows_quarantined": m.get("rows_quarantined", 0),
            "seconds": m.get("seconds"),
            "rows_per_s": m.get("rows_per_s"),
            "resources": m.get("resources"),
            "balanced": (m.get("rows_in") or 0) == (m.get("rows_out") or 0) + (m.get("rows_quarantined") or 0)
            if name == "ingest" else None,
            **({"tables": m["tables"], "quarantine_reasons": m.get("quarantine_reasons")} if name == "ingest" else {}),
            **({k: m[k] for k in m if k.startswith(("types_", "new_", "tagger_", "hypernym_"))}),
        })
    g = read_manifest(ctx.stage_dir("graph"))
    before, after = g.get("facts_before", {}), g.get("facts_after", {})
    facts = [
        {"relation": r, "before": before.get(r, 0), "after": after.get(r, 0)}
        for r in sorted(set(before) | set(after), key=lambda r: -(after.get(r, 0) + before.get(r, 0)))
    ]
    return {
        "run_dir": str(ctx.run_dir),
        "catalogue": str(ctx.catalogue),
        "models": str(ctx.models) if ctx.models else None,
        "cluster": ctx.cluster,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stages": stages,
        "facts": facts,
        "triple_status": g.get("status_counts", {}),
        "taxonomy_rows": g.get("taxonomy_rows"),
    }


def _table(rows: list[dict], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: dict) -> str:
    return (
        "<!doctype html><meta charset='utf-8'><title>autoknow run report</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}</style>"
        f"<h1>autoknow run report</h1><p>{html.escape(report['run_dir'])} — catalogue "
        f"{html.escape(report['catalogue'])} — {html.escape(report['created_at'])}</p>"
        f"<p>cluster: {html.escape(json.dumps(report['cluster']))}</p>"
        "<h2>Stages</h2>"
        + _table(report["stages"], ["stage", "rows_in", "rows_out", "rows_quarantined", "seconds", "rows_per_s"])
        + "<h2>Facts per relation</h2>"
        + _table(report["facts"][:200], ["relation", "before", "after"])
        + "<h2>Triples by status</h2>"
        + _table([{"status": k, "count": v} for k, v in report["triple_status"].items()], ["status", "count"])
    )


class ReportStage(Stage):
    name = "report"
    needs = ("ingest", "graph")

    def fingerprint(self, ctx: RunContext) -> str:
        return f"always-{time.time_ns()}"  # cheap, and it must describe this run

    def run(self, ctx: RunContext) -> dict:
        report = build_report(ctx, [s for s in ctx.cfg.stages if s != "report"])
        (ctx.run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (ctx.run_dir / "report.html").write_text(render_html(report))
        q = ctx.table_path("ingest", "quarantine")
        published = table_file(ctx.run_dir, "quarantine")
        if published.is_dir():
            shutil.rmtree(published)
        elif published.exists():
            published.unlink()
        if q.is_dir():
            shutil.copytree(q, ctx.run_dir / "quarantine")
        elif q.exists():
            shutil.copyfile(q, ctx.run_dir / "quarantine.parquet")
        return {"rows_in": len(report["stages"]), "rows_out": len(report["stages"]), "rows_quarantined": 0}
