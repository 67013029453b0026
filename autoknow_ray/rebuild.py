"""The two jobs users run: `fit` (train module models on a catalogue) and `rebuild` (the graph).

The stage list is read from the config (`stages:`), in the order of STAGE_ORDER.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from autoknow_ray import runtime, storage
from autoknow_ray.config import Config, load_config
from autoknow_ray.pipeline import RunContext, Stage, read_manifest, run_stages

log = logging.getLogger(__name__)

STAGE_ORDER = ("ingest", "taxonomy", "relations", "imputation", "cleaning", "synonyms",
               "related", "graph", "report")
# Each module: its stage class and its `fit` function (fit(ctx, out_dir) -> dict, or None for a
# module without a model), as "module:attribute" imported on use. A module whose package is not
# in this version is reported as not available.
MODULES: dict[str, tuple[str, str | None]] = {
    "taxonomy": ("autoknow_ray.modules.taxonomy.stage:TaxonomyStage",
                 "autoknow_ray.modules.taxonomy.fit:fit_taxonomy"),
    "relations": ("autoknow_ray.modules.relations.stage:RelationsStage",
                  "autoknow_ray.modules.relations.fit:fit_relations"),
    "imputation": ("autoknow_ray.modules.imputation.stage:ImputationStage",
                   "autoknow_ray.modules.imputation.fit:fit_imputation"),
    "cleaning": ("autoknow_ray.modules.cleaning.stage:CleaningStage",
                 "autoknow_ray.modules.cleaning.fit:fit_cleaning"),
    "synonyms": ("autoknow_ray.modules.synonyms.stage:SynonymsStage",
                 "autoknow_ray.modules.synonyms.fit:fit_synonyms"),
    "related": ("autoknow_ray.modules.related.stage:RelatedStage",
                "autoknow_ray.modules.related.fit:fit_related"),
}
HOUSE_STAGES = {
    "ingest": "autoknow_ray.catalogue.ingest:IngestStage",
    "graph": "autoknow_ray.graph.assemble:GraphStage",
    "report": "autoknow_ray.eval.report:ReportStage",
}


def _load(ref: str):
    import importlib

    mod, attr = ref.split(":")
    return getattr(importlib.import_module(mod), attr)


def _available(ref: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(ref.split(":")[0]) is not None
    except ModuleNotFoundError:  # the module's package itself is absent
        return False


def stage_registry() -> dict[str, type[Stage]]:
    refs = {**HOUSE_STAGES, **{m: stage for m, (stage, _fit) in MODULES.items()}}
    return {name: _load(ref) for name, ref in refs.items() if _available(ref)}


def modules_with_models(cfg: Config) -> list[str]:
    return [m for m in STAGE_ORDER if m in cfg.stages and m in MODULES and MODULES[m][1]
            and _available(MODULES[m][1])]


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


def fit_inputs(catalogue: Path, cfg: Config, modules: list[str]) -> str:
    """What a models folder was fitted on: the catalogue's files (name, size, mtime), the config
    sections the fit reads and the package's source. `rebuild` without `--models` fits again
    when this changes, instead of reusing models fitted on another catalogue or config."""
    from autoknow_ray.catalogue.reader import find_table_files
    from autoknow_ray.pipeline import source_fingerprint
    from autoknow_ray.schema import CATALOGUE_TABLES

    files = {}
    for table in CATALOGUE_TABLES:
        for f, _ in find_table_files(catalogue, table):
            st = f.stat()
            files[str(f.relative_to(catalogue))] = [st.st_size, st.st_mtime_ns]
    parts = {"catalogue": str(catalogue.resolve()), "files": files, "modules": sorted(modules),
             "config": cfg.section_hash("seed", "device", "ingest", *modules),
             "code": source_fingerprint()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _as_config(config: Config | str | Path | None) -> Config:
    return config if isinstance(config, Config) else load_config(config)


def fit(catalogue: str | Path, out: str | Path, *, config: Config | str | Path | None = None,
        modules: list[str] | None = None, address: str | None = None) -> dict:
    """Train the module models on `catalogue`, write artifacts to `out`."""
    cfg = _as_config(config)
    storage.require_local(out, "models")
    catalogue, out = storage.path(catalogue), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cluster = runtime.connect(cfg, address)
    runtime.check_shared_storage({"catalogue": catalogue, "models": out})
    # the training data is the validated catalogue: ingest it into out/_ingest first
    ctx = RunContext(run_dir=out / "_work", catalogue=catalogue, cfg=cfg, cluster=cluster)
    from autoknow_ray.catalogue.ingest import IngestStage

    run_stages([IngestStage()], ctx)
    trainable = modules_with_models(cfg)
    unknown = [m for m in modules or [] if m not in trainable]
    if unknown:
        raise ValueError(f"no trainable module named {unknown} in this config; known: {trainable}")
    # in flow order, so a later module may read an earlier one's artifacts in `out`
    modules = [m for m in STAGE_ORDER if m in (modules or trainable)]
    results = {}
    # the CPU precision every rebuild with these models infers at on this kind of CPU; fit's own
    # inference (calibration, embeddings) runs at it too
    precision = runtime.fit_precision(cfg, out)
    runtime.set_run_precision(precision["cpu_bf16"])
    try:
        for m in modules:
            t0 = time.perf_counter()
            results[m] = _load(MODULES[m][1])(ctx, out / m)
            results[m]["seconds"] = round(time.perf_counter() - t0, 2)
    finally:
        runtime.set_run_precision(None)
    manifest = {
        "inputs": fit_inputs(catalogue, cfg, modules),
        "catalogue": str(catalogue.resolve()),
        "modules": results,
        "config": cfg.model_dump(mode="json"),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    manifest["fingerprint"] = hashlib.sha256(
        json.dumps({k: manifest[k] for k in ("catalogue", "modules", "created_at")}, sort_keys=True,
                   default=str).encode()).hexdigest()[:20]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    # the ingested copy of the training catalogue was fit's scratch: a models folder holds
    # models only (a models URI would otherwise copy a catalogue to every node)
    shutil.rmtree(out / "_work", ignore_errors=True)
    return manifest


def rebuild(catalogue: str | Path, out: str | Path, *, models: str | Path | None = None,
            config: Config | str | Path | None = None, address: str | None = None,
            force: bool = False, previous: str | Path | None = None) -> dict:
    """The full job. Without `models`, fits on this catalogue first (into RUN/models). The
    catalogue, `out` and `models` may be object-store URIs (autoknow_ray.storage); models are
    read from a copy on each node's disk, and a fit (no `models`) writes to a local folder.

    `previous`: an earlier run (read only) whose cached per-product model outputs are reused
    for every product whose inputs and model are unchanged (docs/incremental.md); the graph is
    the one a full rebuild gives."""
    cfg = _as_config(config)
    catalogue, out = storage.path(catalogue), storage.path(out)
    if not catalogue.is_dir():
        raise FileNotFoundError(f"catalogue directory not found: {catalogue}")
    if previous is not None:
        previous = storage.path(previous)
        if not previous.is_dir():
            raise FileNotFoundError(f"--previous: run directory not found: {previous}")
        if _same_place(previous, out):
            raise ValueError("--previous and --out are the same run: an incremental rebuild "
                             "writes a new run and only reads the previous one")
    needs_models = bool(modules_with_models(cfg))
    if models is None and needs_models:  # fit writes its models locally
        storage.require_local(out / "models", "models")
    out.mkdir(parents=True, exist_ok=True)
    if needs_models and models is None:
        models = out / "models"
        fitted = read_manifest(models)
        if fitted.get("inputs") != fit_inputs(catalogue, cfg, modules_with_models(cfg)):
            if fitted:
                log.info("models in %s were fitted on another catalogue, config or code: fitting again",
                         models)
            fit(catalogue, models, config=cfg, address=address)
    if models is not None and not (storage.path(models) / "manifest.json").exists():
        raise FileNotFoundError(f"{models}: not a models folder (no manifest.json); run `autoknow fit`")
    cluster = runtime.connect(cfg, address)
    runtime.check_shared_storage({"catalogue": catalogue, "run": out,
                                  **({"models": storage.path(models)} if models else {})})
    # models in an object store: read from a copy on each node's disk
    local_models = runtime.use_models(storage.path(models) if models else None)
    ctx = RunContext(run_dir=out, catalogue=catalogue, cfg=cfg,
                     models=Path(local_models) if local_models else None, cluster=cluster,
                     previous=previous)
    (out / "config.resolved.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    # one bf16 / fp32 decision for every model this run infers with on CPU (RUN/precision.json)
    precision = runtime.run_precision(cfg, out, previous, local_models) if needs_models else {}
    runtime.set_run_precision(precision.get("cpu_bf16"))
    try:
        results = run_stages(build_stages(cfg), ctx, force=force)
    finally:
        runtime.set_run_precision(None)
    return {
        "run_dir": str(out),
        "graph": str(out / "graph"),
        "report": str(out / "report.json"),
        "stages": [{k: r.get(k) for k in ("stage", "skipped", "seconds", "rows_in", "rows_out",
                                           "rows_quarantined", "rows_dropped", "driver_memory")}
                   for r in results],
    }


def _same_place(a, b) -> bool:
    if storage.is_remote(a) or storage.is_remote(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()
