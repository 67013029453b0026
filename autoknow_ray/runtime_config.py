"""The sections of the configuration the shared layers read: how Ray is started or joined and
how a stage's actor pool is sized. `runtime` takes these (through `JobSettings`), never the
root `Config`, which brings every module's section with it; `config.Config` re-exports them.
"""
from __future__ import annotations

from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RayConfig(Strict):
    address: str | None = None  # None: RAY_ADDRESS if set, else an embedded local cluster
    num_cpus: int | None = None  # embedded cluster only; None = all cores
    num_gpus: int | None = None
    # GPUs the job may use, started or not: plans GPU pools on a cluster whose GPU workers scale
    # from zero (None: the autoscaler's limit where it states one, else the GPUs there now)
    max_gpus: int | None = None
    object_store_memory_mb: int | None = 1024
    include_dashboard: bool = False
    dashboard_host: str = "127.0.0.1"  # never 0.0.0.0 unless the user says so
    # per-key partial aggregates (one row per key per block) up to this many rows are combined
    # on the driver, above it by a Ray Data groupby in the workers (a shuffle: seconds of fixed
    # cost); the most rows of partials the driver holds at once (runtime.aggregate)
    driver_combine_rows: int = Field(200_000, ge=0)
    # Ray Data's shuffle for joins, groupbys and keyed repartitions: `hash_shuffle` (aggregator
    # actors) or `shuffle_v2` (Ray 2.60's default, map and reduce tasks). On 2 cores a shuffle of
    # a few rows took 2.1 s (groupby) / 3.0 s (join) with the first and 4.5 / 7.3 s with the
    # second (docs/benchmarks.md, "Ray Data's shuffle kind")
    shuffle: Literal["hash_shuffle", "shuffle_v2"] = "hash_shuffle"


class StageResources(Strict):
    """How one stage's actor pool is sized. `auto` values are derived from the cluster."""

    actors: int | Literal["auto"] = "auto"
    cpus_per_actor: float = 0.5
    gpus_per_actor: float | Literal["auto"] = "auto"  # auto: 1/actors_per_gpu where GPUs exist
    actors_per_gpu: int = 2
    # a GPU actor's CPUs: few, so its node keeps CPUs for the read and tokenize tasks
    cpus_per_gpu_actor: float = 1.0
    batch_size: int = 64  # model batch (rows per forward pass)
    rows_per_call: int = Field(1024, ge=1)  # rows per actor call; the model sorts them by length
    reserve_cpus: float = 1.0  # left free for read and write tasks (an all-actor plan hangs)
    # a long per-product step commits its output in chunks of about this many input rows, each
    # with a completion marker, so a killed job resumes after the last finished chunk
    checkpoint_rows: int = Field(1_000_000, ge=1)


class JobSettings(Protocol):
    """What the runtime reads of a job's configuration (`config.Config` is one)."""

    ray: RayConfig
    device: str

    def stage_resources(self, stage: str) -> StageResources: ...
