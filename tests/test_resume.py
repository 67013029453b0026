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


def test_a_stage_killed_late_resumes_after_its_finished_chunks(ray_session, tmp_path, monkeypatch,
                                                               capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from autoknow_ray import progress, runtime

    monkeypatch.setenv(progress.ENV, "1")
    from autoknow_ray.steps import Step

    class Tag(Step):
        name = "tag"
        columns = ("product_id", "title")

        def __init__(self, fail_on: str | None = None):
            self.fail_on = fail_on

        def process_batch(self, batch):
            if self.fail_on is not None and self.fail_on in batch.column("product_id").to_pylist():
                raise RuntimeError("killed mid-stage")
            return batch.append_column("tag", pa.array(["x"] * batch.num_rows))

    src = tmp_path / "products"
    src.mkdir()
    for i in range(6):
        pq.write_table(pa.table({"product_id": [f"p{i}-{j}" for j in range(50)],
                                 "title": ["t"] * 50}), src / f"part-{i:05d}.parquet")
    files = sorted(str(p) for p in src.glob("*.parquet"))
    resume, out = tmp_path / "resume", tmp_path / "out"
    # 2 files per chunk: chunks 0 and 1 finish, chunk 2 dies
    try:
        runtime.map_step_checkpointed(files, Tag(fail_on="p5-7"), Config(), out, resume, chunk_rows=100)
    except Exception as e:
        assert "killed mid-stage" in str(e)
    else:
        raise AssertionError("the step should have died")
    assert sorted(p.name for p in resume.glob("*.done")) == ["chunk-00000.done", "chunk-00001.done"]
    stats = runtime.map_step_checkpointed(files, Tag(), Config(), out, resume, chunk_rows=100)
    assert (stats["chunks"], stats["skipped"], stats["rows"]) == (3, 2, 300)
    # the run's own progress line for the chunk it ran, counting the resumed ones
    assert "  tag: chunk 3/3, 300/300 rows (100%)" in capsys.readouterr().err
    got = pq.read_table(out).column("product_id").to_pylist()
    assert sorted(got) == sorted(f"p{i}-{j}" for i in range(6) for j in range(50))  # no row twice


def test_the_runner_keeps_a_killed_stages_chunks_for_the_same_inputs_only(tmp_path):
    seen = []

    class Chunky(pipeline.Stage):
        name = "chunky"

        def __init__(self, die: bool):
            self.die = die

        def run(self, ctx):
            seen.append(sorted(p.name for p in ctx.resume.glob("*")) if ctx.resume.exists() else [])
            ctx.resume.mkdir(parents=True, exist_ok=True)
            (ctx.resume / "chunk-00000.done").write_text("{}")
            if self.die:
                raise RuntimeError("killed")
            return {"rows_in": 1}

    ctx = pipeline.RunContext(run_dir=tmp_path / "run", catalogue=tmp_path, cfg=Config())
    try:
        pipeline.run_stages([Chunky(die=True)], ctx)
    except RuntimeError:
        pass
    pipeline.run_stages([Chunky(die=False)], ctx)
    assert seen == [[], ["chunk-00000.done"]], "the second run found the first run's marker"
    assert not (ctx.run_dir / ".chunky.resume").exists(), "markers are removed once the stage is done"
    other = pipeline.RunContext(run_dir=tmp_path / "run", catalogue=tmp_path,
                                cfg=Config.model_validate({"seed": 1}))
    (other.run_dir / ".chunky.resume" / "stale-fingerprint").mkdir(parents=True)
    pipeline.run_stages([Chunky(die=False)], other)
    assert seen[-1] == [], "chunks of another config are not reused"
