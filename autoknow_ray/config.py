"""Typed configuration, loaded from YAML; unknown keys are rejected at load time.

Defaults run on a laptop (embedded Ray, CPU). A cluster config changes only numbers and the
address, never the code path.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from autoknow_ray.modules.relations.config import RelationsConfig
from autoknow_ray.modules.imputation.config import ImputationConfig
from autoknow_ray.modules.cleaning.config import CleaningConfig
from autoknow_ray.modules.synonyms.config import SynonymsConfig
from autoknow_ray.modules.related.config import RelatedConfig
from autoknow_ray.modules.taxonomy.config import TaggerConfig
from autoknow_ray.modules.taxonomy.hypernym_config import HypernymConfig, TypeResolutionConfig


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


class IngestConfig(Strict):
    max_id_chars: int = 256
    max_title_chars: int = 1000
    max_description_chars: int = 100_000
    max_bullets: int = 100
    max_attributes: int = 500
    max_value_chars: int = 1000
    rows_per_block: int = 2000
    max_rows_per_file: int = 500_000
    # a table (and the product ids it is checked against) at most this large is de-duplicated
    # and checked by one Ray task instead of a hash shuffle and a join: the shuffles' fixed cost
    # (actor pools, several executions) dominates small catalogues. 0 = always shuffle.
    single_task_rows: int = Field(100_000, ge=0)
    single_task_bytes: int = Field(64 * 2**20, ge=0)  # on-disk bytes of the staged table


class TaxonomyStageConfig(Strict):
    tagger: TaggerConfig = Field(default_factory=TaggerConfig)
    types: TypeResolutionConfig = Field(default_factory=TypeResolutionConfig)
    hypernym: HypernymConfig = Field(default_factory=HypernymConfig)
    add_title_attributes: bool = True  # tagger attribute spans become `added` triples
    min_attribute_score: float = 0.5
    # typed training titles kept in the model (embeddings) so an untyped catalogue can be typed
    # by nearest neighbours; capped per type and in total to bound the artifact
    # the tagger learns from a seeded sample of at most this many products (training cost is
    # per example; the catalogue can be far larger)
    max_train_products: int = 20_000
    reference_per_type: int = 200
    reference_max: int = 100_000


class Config(Strict):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # every stage: modules 3-5 (imputation, cleaning, synonyms) act only where fit showed, on the
    # catalogue it trained from, that they reach their precision target, and abstain otherwise
    # (docs/safety.md); synonyms list merges without rewriting the catalogue's values unless asked
    stages: list[str] = Field(default_factory=lambda: [
        "ingest", "taxonomy", "relations", "imputation", "cleaning", "synonyms", "related",
        "graph", "report"])
    ray: RayConfig = Field(default_factory=RayConfig)
    resources: dict[str, StageResources] = Field(
        default_factory=lambda: {"default": StageResources()}
    )
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    taxonomy: TaxonomyStageConfig = Field(default_factory=TaxonomyStageConfig)
    relations: RelationsConfig = Field(default_factory=RelationsConfig)
    imputation: ImputationConfig = Field(default_factory=ImputationConfig)
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig)
    synonyms: SynonymsConfig = Field(default_factory=SynonymsConfig)
    related: RelatedConfig = Field(default_factory=RelatedConfig)

    def stage_resources(self, stage: str) -> StageResources:
        return self.resources.get(stage) or self.resources.get("default") or StageResources()

    def section_hash(self, *names: str) -> str:
        """Fingerprint of the config sections a stage depends on (for manifests)."""
        data = self.model_dump(mode="json")
        picked = {n: data.get(n) for n in names}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path | None = None) -> Config:
    if path is None:
        return Config()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return Config.model_validate(data)
