"""The two jobs users run: `fit` (train module models on a catalogue) and `rebuild` (the graph).

The stage list is read from the config (`stages:`), in the order of STAGE_ORDER.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from autoknow_ray import runtime
from autoknow_ray.config import Config, load_config
from autoknow_ray.pipeline import RunContext, Stage, run_stages

log = logging.getLogger(__name__)

STAGE_ORDER = ("ingest", "taxonomy", "relations", "imputation", "cleaning", "synonyms",
               "related", "graph", "report")
MODULES_WITH_MODELS = ("taxonomy",)


def stage_registry() -> dict[str, type[Stage]]:
    from autoknow_ray.catalogue.ingest import IngestStage
    from autoknow_ray.eval.report import ReportStage
    from autoknow_ray.graph.assemble import GraphStage
    from autoknow_ray.modules.taxonomy.stage import TaxonomyStage

    return {s.name: s for s in (IngestStage, TaxonomyStage, GraphStage, ReportStage)}


def build_stages(cfg: Config) -> list[Stage]:
    registry = stage_registry()
    unknown = [s for s in cfg.stages if s not in STAGE_ORDER]
    if unknown:
        raise ValueError(f"config stages: unknown {unknown}; known: {list(STAGE_ORDER)}")
    missing = [s for s in cfg.stages if s not in registry]
    if missing:
        raise ValueError(f"config stages: {missing} are not available in this version")
    for required in ("ingest", "graph"):
        if required not in cfg.stages:
            raise ValueError(f"config stages: '{required}' is required")
    return [registry[s]() for s in STAGE_ORDER if s in cfg.stages]


def _as_config(config: Config | str | Path | None) -> Config:
    return config if isinstance(config, Config) else load_config(config)


def fit(catalogue: str | Path, out: str | Path, *, config: Config | str | Path | None = None,
        modules: list[str] | None = None, address: str | None = None) -> dict:
    """Train the module models on `catalogue`, write artifacts to `out`."""
    cfg = _as_config(config)
    catalogue, out = Path(catalogue), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cluster = runtime.connect(cfg, address)
    # the training data is the validated catalogue: ingest it into out/_ingest first
    ctx = RunContext(run_dir=out / "_work", catalogue=catalogue, cfg=cfg, cluster=cluster)
    from autoknow_ray.catalogue.ingest import IngestStage

    run_stages([IngestStage()], ctx)
    modules = modules or [m for m in MODULES_WITH_MODELS if m in cfg.stages]
    results = {}
    for m in modules:
        if m not in MODULES_WITH_MODELS:
            raise ValueError(f"no trainable module named {m!r}; known: {list(MODULES_WITH_MODELS)}")
        t0 = time.perf_counter()
        if m == "taxonomy":
            from autoknow_ray.modules.taxonomy.fit import fit_taxonomy

            results[m] = fit_taxonomy(ctx, out / "taxonomy")
        results[m]["seconds"] = round(time.perf_counter() - t0, 2)
    manifest = {
        "catalogue": str(catalogue.resolve()),
        "modules": results,
        "config": cfg.model_dump(mode="json"),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    manifest["fingerprint"] = hashlib.sha256(
        json.dumps({k: manifest[k] for k in ("catalogue", "modules", "created_at")}, sort_keys=True,
                   default=str).encode()).hexdigest()[:20]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def rebuild(catalogue: str | Path, out: str | Path, *, models: str | Path | None = None,
            config: Config | str | Path | None = None, address: str | None = None,
            force: bool = False) -> dict:
    """The full job. Without `models`, fits on this catalogue first (into RUN/models)."""
    cfg = _as_config(config)
    catalogue, out = Path(catalogue), Path(out)
    if not catalogue.is_dir():
        raise FileNotFoundError(f"catalogue directory not found: {catalogue}")
    out.mkdir(parents=True, exist_ok=True)
    needs_models = any(m in cfg.stages for m in MODULES_WITH_MODELS)
    if needs_models and models is None:
        models = out / "models"
        if not (models / "manifest.json").exists():
            fit(catalogue, models, config=cfg, address=address)
    if models is not None and not (Path(models) / "manifest.json").exists():
        raise FileNotFoundError(f"{models}: not a models folder (no manifest.json); run `autoknow fit`")
    cluster = runtime.connect(cfg, address)
    ctx = RunContext(run_dir=out, catalogue=catalogue, cfg=cfg,
                     models=Path(models) if models else None, cluster=cluster)
    (out / "config.resolved.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    results = run_stages(build_stages(cfg), ctx, force=force)
    return {
        "run_dir": str(out),
        "graph": str(out / "graph"),
        "report": str(out / "report.json"),
        "stages": [{k: r.get(k) for k in ("stage", "skipped", "seconds", "rows_in", "rows_out",
                                           "rows_quarantined")} for r in results],
    }
