"""The ordered stages of a rebuild, the run directory, manifests, resume and timings.

Each stage writes into `RUN/.<stage>.tmp/` and is moved to `RUN/<stage>/` only when it is
complete, with `manifest.json` last. A stage whose manifest fingerprint matches its inputs,
config and code is skipped on re-run; a stage killed mid-way left only a tmp folder, which the
next run discards. So a killed job resumes without duplicating output. The run directory may be
an object-store URI (`autoknow_ray.storage`): there the move is a copy with the manifest last.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from autoknow_ray import __version__, progress, storage
from autoknow_ray.config import Config
from autoknow_ray.memory import MemorySampler, release_freed_memory

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass
class RunContext:
    # local Paths, or storage.RemotePath for object-store URIs
    run_dir: Path
    catalogue: Path
    cfg: Config
    models: Path | None = None
    cluster: dict = field(default_factory=dict)
    # the tmp folder of the stage now running (set by the runner)
    out: Path | None = None
    # where the running stage keeps per-chunk outputs and completion markers that outlive a kill
    # (kept while the stage's fingerprint stays the same; removed when the stage completes)
    resume: Path | None = None
    # `rebuild --previous`: an earlier run whose committed stages' caches of per-product model
    # outputs this run may reuse (read only; autoknow_ray/incremental.py)
    previous: Path | None = None

    def previous_stage(self, stage: str) -> Path | None:
        """The previous run's folder of `stage`, or None without a previous run."""
        return None if self.previous is None else storage.path(self.previous) / stage

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def table_path(self, stage: str, name: str) -> Path:
        return table_file(self.stage_dir(stage), name)

    def read(self, stage: str, name: str, columns: list[str] | None = None) -> pl.DataFrame:
        return read_parquet_any(self.table_path(stage, name), columns)

    def has(self, stage: str, name: str) -> bool:
        p = self.table_path(stage, name)
        return p.exists()

    def write(self, name: str, table: pa.Table | pl.DataFrame, schema: pa.Schema | None = None):
        assert self.out is not None, "write() is only for the stage that is running"
        write_table(self.out / f"{name}.parquet", table, schema)


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def table_file(folder: Path, name: str) -> Path:
    """Where table `name` lives in `folder`: `name.parquet`, else the shard folder `name/`."""
    folder = storage.path(folder)
    single = folder / f"{name}.parquet"
    return single if single.exists() else folder / name


def read_parquet_any(path: Path, columns: list[str] | None = None) -> pl.DataFrame:
    """A Parquet file or a folder of Parquet shards, as one polars DataFrame."""
    path = storage.path(path)
    if path.is_dir():
        fs, files = storage.dataset_files(sorted(path.rglob("*.parquet")))
        if not files:
            return pl.DataFrame()
        return pl.from_arrow(pq.ParquetDataset(files, filesystem=fs).read(columns=columns))
    return pl.from_arrow(pq.read_table(str(path), columns=columns))


def parquet_files(path: Path) -> list[Path]:
    """The Parquet files of a file or folder of shards (every level below it), sorted; [] when
    absent."""
    path = storage.path(path)
    if not path.exists():
        return []
    return sorted(path.rglob("*.parquet")) if path.is_dir() else [path]


def count_rows(path: Path) -> int:
    """Rows of a Parquet file or folder of shards, from the footers alone (0 when absent)."""
    return sum(pq.ParquetFile(str(f)).metadata.num_rows for f in parquet_files(path))


def column_names(path: Path) -> set[str]:
    """Column names of a Parquet file or folder of shards, from the footers alone (the union
    over shards; empty when absent)."""
    path = storage.path(path)
    if not path.exists():
        return set()
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    return {n for f in files for n in pq.read_schema(str(f)).names}


def ensure_shards(folder: Path, schema: pa.Schema) -> None:
    """A shard folder that readers can open: Ray writes no file for an empty dataset, so an
    empty one gets one empty shard with the table's schema."""
    folder = storage.path(folder)
    if folder.is_dir() and any(folder.rglob("*.parquet")):
        return
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(schema.empty_table(), str(folder / "part-00000.parquet"))


def write_table(path: Path, table: pa.Table | pl.DataFrame, schema: pa.Schema | None = None):
    from autoknow_ray.schema import conform

    if isinstance(table, pl.DataFrame):
        table = table.to_arrow()
    if schema is not None:
        table = conform(table, schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path))


@lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """A hash of the package's own source (every .py and shipped .yaml under autoknow_ray/): a
    stage re-runs when the code that made its output changed, not only when the version did."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256(__version__.encode())
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


class BalanceError(RuntimeError):
    """Rows went missing (or appeared) between a stage's input and its outputs."""


def check_balance(what: str, rows_in: int, rows_out: int, rows_quarantined: int = 0,
                  dropped: dict[str, int] | None = None, error: type[BalanceError] = BalanceError) -> None:
    """rows in = rows out + rows quarantined + rows dropped (each reason counted), or `error`
    naming `what` and every figure."""
    n_dropped = sum((dropped or {}).values())
    gap = rows_in - rows_out - rows_quarantined - n_dropped
    if gap:
        named = (" and " + ", ".join(f"{n} dropped ({why})" for why, n in dropped.items())
                 if n_dropped else "")
        raise error(f"{what}: {rows_in} rows read but {rows_out} written and {rows_quarantined} "
                    f"quarantined{named} ({gap:+d} unaccounted)")


def stage_balance(name: str, counts: dict) -> None:
    """A balanced stage's own figures: rows_in = rows_out + rows_quarantined + the sum of
    `rows_dropped` (reason -> rows), all in the stage's `units`."""
    check_balance(f"stage {name!r}", int(counts.get("rows_in") or 0), int(counts.get("rows_out") or 0),
                  int(counts.get("rows_quarantined") or 0), counts.get("rows_dropped"))


class Stage:
    """One step of the rebuild. Subclasses set `name`, `config_sections`, `needs` and `run`.

    `run(ctx)` writes its outputs with `ctx.write` (or into `ctx.out`) and returns counts:
    rows_in, rows_out, rows_quarantined (only where the stage has a quarantine), rows_dropped
    (reason -> input rows that left no output row and no quarantine row), plus anything worth
    reporting. `units` says what a row of each figure is (the stage may return its own);
    `per_product`: one output row per input product; `balanced`: rows_in = rows_out +
    rows_quarantined + rows_dropped holds in those units, and `run_stages` checks it
    (`BalanceError` names the stage otherwise).
    """

    name: str = ""
    config_sections: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()  # upstream stages whose outputs this stage reads
    uses_models: bool = False
    units: dict[str, str] | None = None  # rows_in / rows_out / rows_quarantined -> what a row is
    per_product: bool = False
    balanced: bool = False

    def run(self, ctx: RunContext) -> dict:
        raise NotImplementedError

    def fingerprint(self, ctx: RunContext) -> str:
        parts = {
            "stage": self.name,
            "code": source_fingerprint(),
            "config": ctx.cfg.section_hash("seed", "device", *self.config_sections),
            "upstream": {n: read_manifest(ctx.stage_dir(n)).get("fingerprint") for n in self.needs},
        }
        if self.uses_models and ctx.models is not None:
            parts["models"] = read_manifest(ctx.models).get("fingerprint")
        parts.update(self.extra_fingerprint(ctx))
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]

    def extra_fingerprint(self, ctx: RunContext) -> dict:
        return {}


def read_manifest(d: Path) -> dict:
    p = storage.path(d) / MANIFEST
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return {}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def run_stages(stages: list[Stage], ctx: RunContext, *, force: bool = False) -> list[dict]:
    """Run the stages in order, skipping the ones already done with the same fingerprint."""
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for stage in stages:
        fp = stage.fingerprint(ctx)
        final = ctx.stage_dir(stage.name)
        done = read_manifest(final)
        if not force and done.get("fingerprint") == fp and done.get("complete"):
            log.info("stage %s: up to date, skipped", stage.name)
            progress.stage_skipped(stage.name)
            results.append({**done, "skipped": True})
            continue
        tmp = ctx.run_dir / f".{stage.name}.tmp"
        if tmp.exists():
            storage.rmtree(tmp)  # the remains of a run that was killed mid-stage
        tmp.mkdir(parents=True)
        resume_root = ctx.run_dir / f".{stage.name}.resume"
        for old in resume_root.glob("*"):
            if old.name != fp:  # finished chunks of other inputs, config or code: not reusable
                storage.rmtree(old)
        ctx.out, ctx.resume = tmp, resume_root / fp
        log.info("stage %s: running", stage.name)
        progress.stage_started(stage.name)
        t0 = time.perf_counter()
        with MemorySampler(interval=0.25) as driver_memory:
            counts = stage.run(ctx)
        seconds = time.perf_counter() - t0
        released = release_freed_memory()  # the next stage starts from what this one holds
        ctx.out = ctx.resume = None
        if stage.units is not None:
            counts.setdefault("units", stage.units)
        if stage.per_product:
            counts.setdefault("per_product", True)
        if stage.balanced:
            stage_balance(stage.name, counts)
            counts["balance_checked"] = True
        rows = counts.get("rows_in") or counts.get("rows_out") or 0
        skipped = counts.get("skipped")
        progress.stage_finished(stage.name, seconds, rows, skipped if isinstance(skipped, str) else None)
        manifest = {
            "stage": stage.name,
            "fingerprint": fp,
            "complete": True,
            "seconds": round(seconds, 3),
            "rows_per_s": round(rows / seconds, 1) if seconds > 0 else None,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            # what the stage cost the driver (autoknow_ray/memory.py: heap vs object-store pages)
            "driver_memory": {**driver_memory.stage_figures(),
                              "rss_after_release_mib": _mib(released.get("rss_after"))},
            **counts,
        }
        _write_json_atomic(tmp / MANIFEST, manifest)
        storage.replace_dir(tmp, final, last=MANIFEST)
        storage.rmtree(resume_root)
        results.append({**manifest, "skipped": False})
    return results
