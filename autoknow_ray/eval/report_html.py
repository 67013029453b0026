"""RUN/report.html from the report dict: one self-contained page, charts as inline SVG.

Catalogue text is untrusted: every string from the run goes through `esc` (html.escape, quotes
too), and the page's Content-Security-Policy allows no script and no network at all, so even a
string that slipped through could neither run nor fetch anything.
"""
from __future__ import annotations

import html
import json

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
MAX_UNFOLDED_METRICS = 12  # deeper keys of one metric family shown before they are folded away
COLORS = ("#9aa5b1", "#2f6fde", "#e07b39", "#3a9d5d", "#c2417c", "#7a5cc7")
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2630;background:#f6f7f9}
header{background:#1d2630;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:2px 0;color:#c8d0d9;font-size:13px;word-break:break-all}
nav{padding:8px 32px;background:#e9edf1;font-size:13px;position:sticky;top:0;z-index:1}
nav a{margin-right:14px;color:#2f6fde;text-decoration:none}
main{padding:8px 32px 40px;max-width:1300px}
section{background:#fff;border:1px solid #dde3e9;border-radius:8px;padding:12px 20px;margin:16px 0}
h2{font-size:18px;margin:6px 0 10px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
td,th{border:1px solid #dde3e9;padding:3px 8px;text-align:left;vertical-align:top;max-width:480px;
overflow-wrap:anywhere}th{background:#f0f3f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
.big{font-size:30px;font-weight:600}.muted{color:#6b7785;font-size:12px}
.cards{display:flex;gap:14px;flex-wrap:wrap}.card{border:1px solid #dde3e9;border-radius:8px;padding:10px 16px;min-width:160px}
details{margin:4px 0}summary{cursor:pointer;font-weight:500}
ul.tree{list-style:none;padding-left:18px;margin:2px 0}ul.tree li{margin:2px 0}
.new{background:#e6f4ea;color:#1e6b35;border-radius:4px;padding:0 6px;font-weight:600}
.ok{color:#1e6b35}.bad{color:#b3261e}
"""


def esc(x) -> str:
    """Any value as HTML text (markup in catalogue strings shows as text)."""
    if x is None:
        return ""
    if isinstance(x, float):
        return esc(f"{x:.4g}" if abs(x) < 1e6 else f"{x:,.0f}")
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, (dict, list)):
        return html.escape(json.dumps(x, default=str, ensure_ascii=False)[:2000])
    return html.escape(str(x), quote=True)


def table(rows: list[dict], cols: list[str], numeric: tuple[str, ...] = ()) -> str:
    if not rows:
        return "<p class='muted'>(none)</p>"
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td class='n'>{esc(r.get(c))}</td>" if c in numeric or isinstance(r.get(c), (int, float))
                         and not isinstance(r.get(c), bool) else f"<td>{esc(r.get(c))}</td>"
                         for c in cols) + "</tr>"
        for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def bar_chart(labels: list[str], series: list[list[float]], names: list[str], unit: str = "",
              width: int = 760) -> str:
    """Horizontal grouped bars as inline SVG: one group per label, one bar per series."""
    if not labels:
        return ""
    top = max([v for s in series for v in s if v is not None] + [1e-9])
    label_w, bar_h, gap = 190, 12, 8
    group_h = bar_h * len(series) + gap
    legend_h = 22 if len(series) > 1 else 0
    height = legend_h + group_h * len(labels) + 6
    plot_w = width - label_w - 110
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             f"role='img' font-family='sans-serif' font-size='11'>"]
    if legend_h:
        x = label_w
        for i, name in enumerate(names):
            parts.append(f"<rect x='{x}' y='5' width='10' height='10' fill='{COLORS[i % len(COLORS)]}'/>"
                         f"<text x='{x + 14}' y='14'>{esc(name)}</text>")
            x += 20 + 7 * len(name)
    for gi, label in enumerate(labels):
        y0 = legend_h + gi * group_h
        short = label if len(label) <= 30 else label[:29] + "…"
        parts.append(f"<text x='{label_w - 6}' y='{y0 + group_h / 2 + 1:.0f}' text-anchor='end'>"
                     f"<title>{esc(label)}</title>{esc(short)}</text>")
        for si, s in enumerate(series):
            v = s[gi] or 0
            w = max(0.0, plot_w * v / top)
            y = y0 + si * bar_h
            parts.append(f"<rect x='{label_w}' y='{y}' width='{w:.1f}' height='{bar_h - 2}' "
                         f"fill='{COLORS[si % len(COLORS)]}'><title>{esc(names[si])}: {esc(v)}</title></rect>"
                         f"<text x='{label_w + w + 4:.1f}' y='{y + bar_h - 3}' fill='#333'>{esc(v)}{esc(unit)}</text>")
    parts.append("</svg>")
    return "".join(parts)


# ---- sections ----------------------------------------------------------------------------------
def _section(sid: str, title: str, body: str) -> str:
    return f"<section id='{esc(sid)}'><h2>{esc(title)}</h2>{body}</section>"


def _facts(report: dict) -> str:
    tot = report.get("facts_total") or {}
    facts = report.get("facts") or []
    ratio = tot.get("ratio")
    cards = (
        "<div class='cards'>"
        f"<div class='card'><div class='muted'>facts before</div><div class='big'>{esc(tot.get('before', 0))}</div></div>"
        f"<div class='card'><div class='muted'>facts after</div><div class='big'>{esc(tot.get('after', 0))}</div></div>"
        f"<div class='card'><div class='muted'>facts ×</div><div class='big'>"
        f"{'×' + esc(ratio) if ratio is not None else '—'}</div>"
        f"<div class='muted'>published: ×{esc(tot.get('anchor'))} — {esc(tot.get('anchor_source'))}</div></div>"
        "</div>"
    )
    top = facts[:25]
    chart = bar_chart([f["relation"] for f in top], [[f["before"] for f in top], [f["after"] for f in top]],
                      ["before", "after"])
    more = (f"<details><summary>all {len(facts)} relations</summary>"
            + table(facts, ["relation", "before", "after", "ratio"]) + "</details>") if len(facts) > 25 else \
        table(facts, ["relation", "before", "after", "ratio"])
    status = report.get("triple_status") or {}
    edits = report.get("edits_per_module") or {}
    status_chart = bar_chart(list(status), [list(status.values())], ["triples"])
    return (cards + "<h3>Facts per relation (live triples: kept, added, corrected)</h3>" + chart + more
            + "<h3>Triples by status</h3>" + status_chart
            + ("<h3>Edits handed to the graph, per module</h3>"
               + table([{"module": m, "edits": n} for m, n in edits.items()], ["module", "edits"])
               if edits else ""))


def _metrics(report: dict) -> str:
    rows = report.get("eval") or []
    if not rows:
        return ("<p class='muted'>No gold-label metrics for this run yet: "
                "<code>autoknow eval --run RUN --gold GOLD</code> scores it and re-renders this page.</p>")
    # a family with many deep keys (one per attribute) is folded away; headline keys stay
    deep: dict[str, int] = {}
    for r in rows:
        if r["metric"].count(".") >= 2:
            family = r["metric"].split(".")[0]
            deep[family] = deep.get(family, 0) + 1
    main_rows = [r for r in rows if r.get("anchor_source") or r["metric"].count(".") < 2
                 or deep[r["metric"].split(".")[0]] <= MAX_UNFOLDED_METRICS]
    rest = [r for r in rows if r not in main_rows]
    cols = ["metric", "value", "anchor", "anchor_source"]
    with_anchor = [r for r in main_rows if r.get("anchor") is not None]
    chart = bar_chart([r["metric"] for r in with_anchor],
                      [[r["anchor"] for r in with_anchor], [r["value"] for r in with_anchor]],
                      ["published anchor", "this run"])
    return ("<p class='muted'>Anchors are published figures for the same task on other test sets: "
            "for orientation, not a pass mark.</p>" + chart + table(main_rows, cols)
            + (f"<details><summary>{len(rest)} more metrics (per attribute)</summary>"
               + table(rest, cols) + "</details>" if rest else ""))


def _stages(report: dict) -> str:
    stages = report.get("stages") or []
    chart = bar_chart([s["stage"] for s in stages], [[s.get("seconds") or 0 for s in stages]], ["seconds"], " s")
    rows = []
    for s in stages:
        res = s.get("resources")
        dropped = s.get("rows_dropped") or {}
        rows.append({**s, "resources": json.dumps(res, default=str) if res else "",
                     "rows_dropped": sum(dropped.values()) if dropped else None,
                     "units": _units(s), "balance": _balance_mark(s),
                     "abstained": ", ".join(sorted(s.get("abstained") or {}))})
    return (chart + table(rows, ["stage", "rows_in", "rows_out", "rows_quarantined", "rows_dropped",
                                 "balance", "units", "seconds", "rows_per_s", "abstained",
                                 "resources", "finished_at"])
            + "<p class='muted'>balance: rows in = rows out + rows quarantined + rows dropped "
            "(each drop with its reason on the stage's section), checked by the stage; a stage "
            "whose rows in and out are in different units has none.</p>"
            + f"<p class='muted'>cluster: {esc(report.get('cluster'))}</p>")


def _units(s: dict) -> str:
    u = s.get("units") or {}
    if not u:
        return ""
    text = f"{u.get('rows_in', '?')} → {u.get('rows_out', '?')}"
    if u.get("rows_quarantined"):
        text += f"; quarantined: {u['rows_quarantined']}"
    return text + ("; one out per product" if s.get("per_product") else "")


def _balance_mark(s: dict) -> str:
    return {True: "✓", False: "✗ unbalanced"}.get(s.get("balanced"), "")


def _stage_detail(s: dict) -> str:
    figures = s.get("figures") or {}
    tables = s.get("tables") or {}
    trows = [{"table": k, **(v if isinstance(v, dict) else {"rows": v})} for k, v in tables.items()]
    tcols = ["table"] + sorted({k for r in trows for k in r if k != "table"})
    balance = f"<p>Rows: {esc(_units(s))}</p>" if s.get("units") else ""
    dropped = s.get("rows_dropped") or {}
    terms = "rows out + rows quarantined" + (" + rows dropped" if dropped else "")
    if s.get("balanced") is not None:
        figures_line = (f" ({esc(s.get('rows_in') or 0)} = {esc(s.get('rows_out') or 0)} + "
                        f"{esc(s.get('rows_quarantined') or 0)}"
                        + (f" + {esc(sum(dropped.values()))}" if dropped else "") + ")")
        balance += (f"<p class='ok'>rows in = {terms}{figures_line}</p>" if s["balanced"]
                    else f"<p class='bad'>rows in ≠ {terms}{figures_line}</p>")
    if dropped:
        balance += "<h3>Rows dropped, by reason</h3>" + table(
            [{"reason": k, "rows": v} for k, v in dropped.items()], ["reason", "rows"])
    for kind, why in sorted((s.get("abstained") or {}).items()):
        what = "nothing" if kind == "all" else f"no {esc(kind)} edit"
        balance += f"<p class='bad'>Abstained: wrote {what}. {esc(why)}</p>"
    return (balance
            + table([{"figure": k, "value": v} for k, v in figures.items()], ["figure", "value"])
            + ("<h3>Tables</h3>" + table(trows, tcols) if trows else ""))


def _quarantine(report: dict) -> str:
    q = report.get("quarantine") or {}
    stage_rows = [{"stage": s["stage"], "rows_quarantined": s.get("rows_quarantined") or 0,
                   "reasons": s.get("quarantine_reasons") or ""}
                  for s in report.get("stages") or [] if s.get("rows_quarantined")]
    return (f"<p><span class='big'>{esc(q.get('total', 0))}</span> input rows quarantined "
            "(published as <code>quarantine.parquet</code> beside this page)</p>"
            + "<h3>By reason</h3>" + table(q.get("by_reason") or [], ["table", "reason", "rows"])
            + "<h3>Per stage</h3>" + table(stage_rows, ["stage", "rows_quarantined", "reasons"])
            + "<details><summary>first quarantined rows</summary>"
            + table(q.get("sample") or [], ["table", "source", "row", "product_id", "reason", "raw"])
            + "</details>")


def _samples(report: dict) -> str:
    samples = report.get("samples") or {}
    if not samples:
        return "<p class='muted'>No module added, corrected or removed a fact in this run.</p>"
    cols = ["subject", "title", "relation", "object", "confidence", "evidence"]
    out = ["<p class='muted'>The first rows per module and status, with the product's title and "
           "the evidence (a span, a score or the source) the module gave.</p>"]
    for module, by_status in samples.items():
        out.append(f"<h3>{esc(module)}</h3>")
        for status, rows in by_status.items():
            out.append(f"<details{' open' if status == 'added' else ''}><summary>{esc(status)} "
                       f"({esc(len(rows))} shown)</summary>" + table(rows, cols) + "</details>")
    return "".join(out)


def _tree_html(tree: dict) -> str:
    items = []
    for name, node in tree.items():
        mark = (f" <span class='new'>new</span> <span class='muted'>confidence {esc(node.get('confidence'))}</span>"
                if node.get("new") else "")
        kids = _tree_html(node.get("children") or {})
        items.append(f"<li>{esc(name)}{mark}{kids}</li>")
    return f"<ul class='tree'>{''.join(items)}</ul>" if items else ""


def _taxonomy(report: dict) -> str:
    nt = report.get("new_types") or {}
    if nt.get("too_large"):
        return f"<p class='muted'>The taxonomy has {esc(nt['too_large'])}+ rows: too large to draw here.</p>"
    if not nt.get("new_types"):
        return "<p class='muted'>No new types were added to the taxonomy in this run.</p>"
    unplaced = nt.get("unplaced") or []
    return (f"<p>{esc(nt['new_types'])} new types ({esc(nt.get('shown'))} drawn), each under the "
            "path from its root:</p>" + _tree_html(nt.get("tree") or {})
            + (f"<h3>New types without a parent</h3><p>{esc(', '.join(unplaced))}</p>" if unplaced else ""))


def _graph_tables(report: dict) -> str:
    out = []
    for name, t in (report.get("graph_tables") or {}).items():
        out.append(f"<details id='table-{esc(name)}'><summary>{esc(name)} — {esc(t.get('rows'))} rows</summary>"
                   + table(t.get("head") or [], list(t.get("columns") or [])) + "</details>")
    return "".join(out) or "<p class='muted'>(no graph tables)</p>"


SECTIONS = (("facts", "Facts before and after"), ("metrics", "Metrics against gold"),
            ("stages", "Stages: time and throughput"), ("quarantine", "Rows quarantined"),
            ("samples", "Samples of the edits"), ("taxonomy", "New types in the taxonomy"),
            ("graph-tables", "Graph tables"))


def render_html(report: dict) -> str:
    bodies = {"facts": _facts(report), "metrics": _metrics(report), "stages": _stages(report),
              "quarantine": _quarantine(report), "samples": _samples(report),
              "taxonomy": _taxonomy(report), "graph-tables": _graph_tables(report)}
    stage_sections = "".join(
        _section(f"stage-{s['stage']}", f"Stage {s['stage']}", _stage_detail(s))
        for s in report.get("stages") or [])
    nav = "".join(f"<a href='#{sid}'>{esc(title)}</a>" for sid, title in SECTIONS)
    nav += "".join(f"<a href='#stage-{esc(s['stage'])}'>{esc(s['stage'])}</a>" for s in report.get("stages") or [])
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>autoknow run report</title><style>{STYLE}</style></head><body>"
        f"<header><h1>autoknow run report</h1><p>run {esc(report.get('run_dir'))}</p>"
        f"<p>catalogue {esc(report.get('catalogue'))} · models {esc(report.get('models') or '—')}"
        f" · written {esc(report.get('created_at'))}</p></header>"
        f"<nav>{nav}</nav><main>"
        + "".join(_section(sid, title, bodies[sid]) for sid, title in SECTIONS)
        + stage_sections
        + "</main></body></html>"
    )
