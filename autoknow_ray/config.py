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
from pydantic import Field

from autoknow_ray.catalogue.config import IngestConfig  # noqa: F401 (re-exported)
from autoknow_ray.runtime_config import RayConfig, StageResources, Strict  # noqa: F401
from autoknow_ray.modules.relations.config import RelationsConfig
from autoknow_ray.modules.imputation.config import ImputationConfig
from autoknow_ray.modules.cleaning.config import CleaningConfig
from autoknow_ray.modules.synonyms.config import SynonymsConfig
from autoknow_ray.modules.related.config import RelatedConfig
from autoknow_ray.modules.taxonomy.config import TaggerConfig
from autoknow_ray.modules.taxonomy.hypernym_config import HypernymConfig, TypeResolutionConfig


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
