"""The run report page: its figures, its bounded samples, escaping of catalogue text, the eval
re-render, and the page in a real headless browser (no console error, every section, a
screenshot); and the progress lines every long step prints."""
from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autoknow_ray import progress
from autoknow_ray.cli import main
from autoknow_ray.eval.report import edit_samples, rerender
from autoknow_ray.eval.report_html import SECTIONS
from tests.report_fixtures import EVIL_TITLE, N_PRODUCTS, build_run, shard_graph_table

SCREENSHOT_DIR = Path(__file__).resolve().parents[1] / "runs" / "screenshots"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("report"))


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def test_report_figures(run):
    r = _report(run)
    assert [s["stage"] for s in r["stages"]] == ["ingest", "cleaning", "graph"]
    ingest = r["stages"][0]
    assert ingest["balanced"] is True and ingest["rows_quarantined"] == 2
    facts = {f["relation"]: f for f in r["facts"]}
    # 40 products: type, Flavor and Brand each; the module added a Color and a Flavor, corrected
    # a Flavor and a type, removed a Flavor
    assert facts["has_type"]["before"] == N_PRODUCTS and facts["has_type"]["after"] == N_PRODUCTS + 1
    assert facts["Color"] == {"relation": "Color", "before": 0, "after": 1, "ratio": None}
    assert r["facts_total"]["before"] == 3 * N_PRODUCTS
    assert r["facts_total"]["ratio"] == round(r["facts_total"]["after"] / (3 * N_PRODUCTS), 3)
    assert r["triple_status"] == {"kept": 119, "added": 2, "corrected": 2, "removed": 1}
    q = r["quarantine"]
    assert q["total"] == 2 and {x["reason"] for x in q["by_reason"]} == {
        "duplicate product_id (first seen in products.jsonl row 1)", "missing title"}
    cleaning = next(s for s in r["stages"] if s["stage"] == "cleaning")
    assert cleaning["figures"]["flagged"] == 2
    assert cleaning["quarantine_reasons"] == {"empty description": 1}
    assert cleaning["tables"]["edits"] == 5  # a folder of two shards, counted from the footers
    assert set(r["graph_tables"]) == {"triples", "taxonomy", "attributes", "synonyms", "related",
                                      "dropped"}
    assert r["graph_tables"]["related"]["rows"] == 2
    # the graph's rows: 120 catalogue facts and 5 edits in, 124 triples out, and the removal
    # that marked its fact removed counted as such
    graph = next(s for s in r["stages"] if s["stage"] == "graph")
    assert (graph["rows_in"], graph["rows_out"], graph["balanced"]) == (125, 124, True)
    assert {k: v for k, v in graph["rows_dropped"].items() if v} == {
        "removal applied (marks the fact it retracts removed)": 1}
    assert graph["units"]["rows_out"] == "triples" and graph["rows_quarantined"] is None
    assert r["graph_tables"]["dropped"]["rows"] == 1
    # a stage that checks no balance (the stand-in module) gets no balance line
    assert cleaning["balanced"] is None
    page = (run / "report.html").read_text()
    assert "rows in = rows out + rows quarantined + rows dropped (125 = 124 + 0 + 1)" in page


def test_samples_carry_titles_and_evidence(run):
    s = _report(run)["samples"]["cleaning"]
    assert {k: len(v) for k, v in s.items()} == {"added": 2, "corrected": 2, "removed": 1}
    added = {x["subject"]: x for x in s["added"]}
    assert added["p000"]["title"] == EVIL_TITLE
    assert added["p002"]["evidence"] == "span 'smoky bbq' in description"
    assert s["removed"][0]["evidence"] == "score 0.97 misassigned"


def test_new_types_are_placed_as_a_tree(run):
    nt = _report(run)["new_types"]
    assert nt["new_types"] == 3 and nt["unplaced"] == []
    chips = nt["tree"]["food"]["children"]["snacks"]["children"]["chips"]
    assert chips["new"] is False
    assert set(chips["children"]) == {"veggie chips", "kettle chips"}
    assert chips["children"]["veggie chips"]["new"] is True
    assert chips["children"]["veggie chips"]["confidence"] == pytest.approx(0.9)
    assert "dry shampoo" in nt["tree"]["beauty"]["children"]["shampoo"]["children"]


def test_catalogue_markup_shows_as_text(run):
    page = (run / "report.html").read_text()
    assert "<script" not in page and "onerror=alert" not in page.replace("onerror=alert(1)&gt;", "")
    assert html.escape(EVIL_TITLE, quote=True) in page
    assert "&lt;b&gt;bold&lt;/b&gt; evidence" in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    # self-contained: no URL the page would fetch
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", page)


def test_sharded_graph_tables_and_the_sample_cap(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for name in ("triples", "taxonomy"):
        shard_graph_table(copy, name)
    assert rerender(copy)
    r, before = _report(copy), _report(run)
    assert r["samples"] == before["samples"] and r["new_types"] == before["new_types"]
    assert r["graph_tables"]["triples"]["rows"] == 124
    one = edit_samples(copy, per_group=1)
    assert {k: len(v) for k, v in one["cleaning"].items()} == {"added": 1, "corrected": 1, "removed": 1}
    # the scan stops at its cap: with the module's edits spread over both shards, the first
    # batch alone cannot hold them all
    folder = copy / "graph" / "triples"
    t = pq.read_table(folder)
    for f in folder.glob("*.parquet"):
        f.unlink()
    pq.write_table(t.take(list(range(0, t.num_rows, 2))), folder / "part-00000.parquet")
    pq.write_table(t.take(list(range(1, t.num_rows, 2))), folder / "part-00001.parquet")
    capped = edit_samples(copy, per_group=50, max_scan=1)
    assert sum(len(v) for v in capped["cleaning"].values()) < 5


def test_eval_rerenders_the_page_with_published_anchors(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    gold = tmp_path / "gold"
    gold.mkdir()
    pq.write_table(pa.table({"product_id": ["p001", "p002", "p005"], "type": ["crackers", "cereal", "chips"],
                             "start": pa.array([None] * 3, pa.int32()),
                             "end": pa.array([None] * 3, pa.int32())}), gold / "types.parquet")
    assert main(["eval", "--run", str(copy), "--gold", str(gold)]) == 0
    assert "report page updated" in capsys.readouterr().out
    rows = {m["metric"]: m for m in _report(copy)["eval"]}
    # p005's type was corrected to "veggie chips": 2 of 3 right
    assert rows["type_extraction.f1"]["value"] == pytest.approx(2 / 3, abs=1e-4)
    assert rows["type_extraction.f1"]["anchor"] == 0.877
    page = (copy / "report.html").read_text()
    assert "type_extraction.f1" in page and "0.877" in page
    assert _report(copy)["catalogue"] == _report(run)["catalogue"]  # the run's facts are kept


# ---- the page in a real browser --------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium() -> str:
    from tests.headless_browser import ensure_chromium

    path, why = ensure_chromium()
    if path is None:
        pytest.skip(f"no headless browser: {why}")
    return path


SECTION_PROBE = """JSON.stringify({
  sections: [...document.querySelectorAll('section')].map(s => [s.id, s.innerText.length]),
  svgs: document.querySelectorAll('svg rect').length,
  scripts: document.querySelectorAll('script, img, iframe').length,
  evil: [...document.querySelectorAll('td')].some(td => td.textContent === %s),
  treeNew: document.querySelectorAll('ul.tree .new').length,
})"""


def test_page_in_a_headless_browser(run, chromium):
    from tests.headless_browser import load_page

    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOT_DIR / "report.png"
    res = load_page(chromium, (run / "report.html").resolve().as_uri(),
                    SECTION_PROBE % json.dumps(EVIL_TITLE), shot)
    assert res.problems == []
    dom = json.loads(res.value)
    ids = [sid for sid, _ in dom["sections"]]
    assert ids == [sid for sid, _ in SECTIONS] + ["stage-ingest", "stage-cleaning", "stage-graph"]
    assert all(n > 20 for _, n in dom["sections"]), dom["sections"]
    assert dom["svgs"] > 5  # the charts drew bars
    assert dom["scripts"] == 0  # the script and img in a title stayed text ...
    assert dom["evil"] is True  # ... shown whole in a cell
    assert dom["treeNew"] == 3
    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_browser_check_sees_errors(tmp_path, chromium):
    """The check above is not vacuous: a script error, a console error, a blocked load and a
    script the report's policy forbids are all reported."""
    from autoknow_ray.eval.report_html import CSP
    from tests.headless_browser import load_page

    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); notDefined();</script></body></html>")
    problems = load_page(chromium, bad.as_uri(), "1").problems
    assert any("boom" in p for p in problems) and any("notDefined" in p for p in problems)
    blocked = tmp_path / "blocked.html"
    blocked.write_text(f"<html><head><meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
                       "</head><body><script>console.log('ran')</script></body></html>")
    problems = load_page(chromium, blocked.as_uri(), "1").problems
    assert any("Content Security Policy" in p for p in problems)


# ---- progress lines --------------------------------------------------------------------------
def test_progress_lines_are_bounded_and_quiet_turns_them_off(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "1")
    progress._last_epoch_line.clear()
    for epoch in range(1, 41):  # a fast fit: first, last, and no more than one line per interval
        progress.epoch_line("hypernym", epoch, 40, {"loss": 1.0 / epoch})
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "hypernym epoch 1/40: loss 1.0000"
    assert lines[-1] == "hypernym epoch 40/40: loss 0.0250"
    assert len(lines) == 2
    progress.epoch_line("tagger", 1, 3, {"epoch": 1, "loss": 0.5, "val_f1": 0.81234, "seconds": 12.0})
    assert capsys.readouterr().err == "tagger epoch 1/3: loss 0.5000 val_f1 0.8123 (12.0 s)\n"

    # not a terminal (pytest captures stderr): plain lines, no carriage returns
    with progress.bar(1000, "synth", "products", interval_s=0.0) as b:
        for _ in range(4):
            b.update(250)
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1].startswith("synth: 1,000/1,000 products (100%)")
    progress.stage_started("graph")
    progress.stage_finished("graph", 2.0, 100)
    assert capsys.readouterr().err == "stage graph: running …\nstage graph: done in 2.0 s, 50 rows/s\n"
    # a stage that found nothing to do says why, and shows no rate for rows it never looked at
    progress.stage_finished("relations", 0.001, 30, "no relations model")
    assert capsys.readouterr().err == "stage relations: done in 0.00 s, nothing to do: no relations model\n"

    progress.set_enabled(False)
    progress.epoch_line("tagger", 1, 3, {"loss": 0.5})
    progress.stage_started("graph")
    with progress.bar(10, "synth") as b:
        b.update(10)
    assert capsys.readouterr().err == ""


def test_quiet_flag_silences_the_synth_bar(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "1")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    assert main(["synth", "--products", "30", "--out", str(tmp_path / "a")]) == 0
    assert "synth: 30/30 products (100%)" in capsys.readouterr().err
    assert main(["--quiet", "synth", "--products", "30", "--out", str(tmp_path / "b")]) == 0
    assert "synth:" not in capsys.readouterr().err
    # in a log, the model-loading bars of the Hugging Face libraries are off as well
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"


def test_ray_datas_own_bars_are_off_unless_asked_for(monkeypatch):
    """A run shows its own progress lines; Ray Data's operator bars ("Running Dataset …",
    "Parquet dataset sampling") only with AUTOKNOW_RAY_BARS=1."""
    import logging

    import ray.data

    from autoknow_ray import runtime

    ctx = ray.data.DataContext.get_current()
    before = ctx.enable_progress_bars
    try:
        monkeypatch.delenv(runtime.RAY_BARS_ENV, raising=False)
        runtime.configure_data_context(ctx)
        assert ctx.enable_progress_bars is False
        # and no warning that they are off, nor the false "will hang" one of a busy moment
        assert not logging.getLogger("ray.data._internal.progress").isEnabledFor(logging.WARNING)
        dataset_log = logging.getLogger("ray.data.dataset")
        busy = dataset_log.makeRecord("ray.data.dataset", logging.WARNING, __file__, 1,
                                      "Warning: The Ray cluster currently does not have any "
                                      "available CPUs. The Dataset job will hang", None, None)
        other = dataset_log.makeRecord("ray.data.dataset", logging.WARNING, __file__, 1,
                                       "another warning", None, None)
        assert not dataset_log.filter(busy) and dataset_log.filter(other)
        monkeypatch.setenv(runtime.RAY_BARS_ENV, "1")
        runtime.configure_data_context(ctx)
        assert ctx.enable_progress_bars is True
    finally:
        ctx.enable_progress_bars = before
