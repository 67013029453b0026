"""Resume that can be trusted: a stage re-runs when the code changed, and RUN/models is fitted
again when the catalogue or config it was fitted on changed."""
from __future__ import annotations

import json
import os

import polars as pl

from autoknow_ray import pipeline, rebuild
from autoknow_ray.config import Config


def _catalogue(tmp_path):
    cat = tmp_path / "cat"
    cat.mkdir()
    pl.DataFrame({"product_id": ["a", "b"], "title": ["green tea 20 bags", "black coffee"]}) \
        .write_ndjson(cat / "products.jsonl")
    return cat


def test_fit_inputs_follow_catalogue_config_and_code(tmp_path, monkeypatch):
    cat = _catalogue(tmp_path)
    cfg = Config()
    first = rebuild.fit_inputs(cat, cfg, ["taxonomy"])
    assert rebuild.fit_inputs(cat, cfg, ["taxonomy"]) == first
    other = Config.model_validate({"taxonomy": {"max_train_products": 10}})
    assert rebuild.fit_inputs(cat, other, ["taxonomy"]) != first
    # a section the fit does not read leaves it alone
    assert rebuild.fit_inputs(cat, Config.model_validate({"ray": {"num_cpus": 1}}), ["taxonomy"]) == first
    st = os.stat(cat / "products.jsonl")
    os.utime(cat / "products.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert rebuild.fit_inputs(cat, cfg, ["taxonomy"]) != first
    changed = rebuild.fit_inputs(cat, cfg, ["taxonomy"])
    monkeypatch.setattr(pipeline, "source_fingerprint", lambda: "other code")
    assert rebuild.fit_inputs(cat, cfg, ["taxonomy"]) != changed


def test_rebuild_refits_models_fitted_on_another_catalogue(tmp_path, monkeypatch):
    cat = _catalogue(tmp_path)
    fits = []

    def fake_fit(catalogue, out, *, config=None, modules=None, address=None):
        fits.append(str(catalogue))
        out.mkdir(parents=True, exist_ok=True)
        inputs = rebuild.fit_inputs(catalogue, config, rebuild.modules_with_models(config))
        (out / "manifest.json").write_text(json.dumps({"inputs": inputs}))

    monkeypatch.setattr(rebuild, "fit", fake_fit)
    monkeypatch.setattr(rebuild.runtime, "connect", lambda cfg, address=None: {})
    monkeypatch.setattr(rebuild, "run_stages", lambda stages, ctx, force=False: [])
    run = tmp_path / "run"
    rebuild.rebuild(cat, run, config=Config())
    rebuild.rebuild(cat, run, config=Config())
    assert len(fits) == 1, "the same catalogue and config reuse RUN/models"
    (cat / "products.jsonl").write_text('{"product_id": "c", "title": "oolong tea"}\n')
    rebuild.rebuild(cat, run, config=Config())
    assert len(fits) == 2, "a changed catalogue is fitted again"
    rebuild.rebuild(cat, run, config=Config.model_validate({"taxonomy": {"max_train_products": 7}}))
    assert len(fits) == 3, "a changed fit config is fitted again"


def test_stage_fingerprint_covers_the_source(monkeypatch, tmp_path):
    from autoknow_ray.catalogue.ingest import IngestStage

    ctx = pipeline.RunContext(run_dir=tmp_path / "run", catalogue=_catalogue(tmp_path), cfg=Config())
    before = IngestStage().fingerprint(ctx)
    monkeypatch.setattr(pipeline, "source_fingerprint", lambda: "edited")
    assert IngestStage().fingerprint(ctx) != before
