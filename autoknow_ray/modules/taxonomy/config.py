"""Configuration of the taxonomy module's models (pydantic v2, unknown keys rejected)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TaggerConfig(BaseModel):
    """The title tagger (type + attribute spans): distant supervision, training, decoding.

    The defaults are the recipe measured on a 2-core CPU (about 1.2k titles in a few minutes);
    on a GPU the same recipe runs with bf16 autocast.
    """

    model_config = ConfigDict(extra="forbid")

    # model
    encoder: str = "default"  # "default" = packaged MiniLM; or a local folder / cached hub id
    max_length: int = Field(96, ge=8, le=512)  # tokens; longer titles are truncated
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    shape_dim: int = Field(16, ge=0)  # word-shape (case, digits) embedding; 0 = off
    # training
    epochs: int = Field(12, ge=1)
    lr: float = Field(3e-4, gt=0)  # encoder (MiniLM is small: a higher rate than BERT-base recipes)
    head_lr: float = Field(3e-3, gt=0)  # linear head
    batch_size: int = Field(16, ge=1)
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    o_weight: float = Field(1.0, gt=0.0)  # loss weight of the "O" tag
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    patience: int = Field(4, ge=0)  # 0: no early stopping
    seed: int = 0
    # taggers trained with seeds seed, seed+1, …, each on its own validation split; inference
    # averages their word tag log-probabilities before one Viterbi (nn/tagger.py). Fit and the
    # title tagging cost this many times one tagger's: the built-in default (a first look, the
    # test suite's small fits) trains one; the recipes for real catalogues (configs/cpu.yaml,
    # configs/cluster.yaml) train three: OA-Mine attribute F1 0.732 -> 0.752 (docs/taxonomy.md).
    ensemble: int = Field(1, ge=1)
    # copies of each training title with its attribute values replaced by other values of the
    # same attribute from the training titles (mention replacement; the type span keeps its
    # words unless `mention_replace_type`); the validation titles are untouched. OA-Mine README
    # protocol, three taggers: attribute F1 0.761 -> 0.790, at 2.6x the taggers' training time
    mention_replacement: int = Field(1, ge=0)
    mention_replace_type: bool = False
    # distant supervision
    min_attribute_count: int = Field(3, ge=1)  # attributes matched in fewer titles are dropped
    # an attribute whose fit titles carry two or more distinct values in at most this share of
    # the titles that carry it is written once per title: where the tagger reads several values
    # of it in one title, the best-scored value's spans are kept (OA-Mine's, AE-110K's and most
    # of WDC-PAVE's attributes are; docs/taxonomy.md). None: every span is kept.
    single_value_share: float | None = Field(0.05, ge=0.0, le=1.0)
    empty_keep_fraction: float = Field(0.2, ge=0.0, le=1.0)  # titles with no match kept
    max_value_chars: int = Field(200, ge=1)
    use_type: bool = True
    use_attributes: bool = True
    # gazetteer input: the fit catalogue's attribute values found in its titles enter the
    # tagger as per-word match features (cross-fold during training, so values it never saw are
    # still found; nn/gazetteer.py). The type label stays out: a gazetteer of the catalogue's few
    # types would teach that a type is one of those names, against the open world.
    gazetteer: bool = False
    gazetteer_folds: int = Field(4, ge=2)
    gazetteer_max_entries: int = Field(200_000, ge=1)
    # type-name swaps: this share of the training titles that name their type get another type
    # name in its place, so a type's position and form are learnt, not its identity. Names from
    # `type_names`: "auto" = the public taxonomies beside the project (Google's product taxonomy
    # and Open Food Facts' categories under $AUTOKNOW_SHARED_DATA or ../shared/data; read at fit
    # time, never copied into the package), else the catalogue's own taxonomy; "none"; or a
    # text file, one name a line. Off (0) until measured end to end (docs/taxonomy.md).
    type_swap: float = Field(0.0, ge=0.0, le=1.0)
    type_names: str = "auto"
    # hardware
    bf16: bool | Literal["auto"] = "auto"  # auto: on GPU only
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int | None = Field(2, ge=1)
    # inference
    min_score: float = Field(0.0, ge=0.0, le=1.0)  # spans scored below are not written
    infer_batch_size: int = Field(64, ge=1)
    # Ray Train (cluster scale); the in-process path is the default
    use_ray_train: bool = False
    ray_num_workers: int = Field(1, ge=1)
    ray_use_gpu: bool | Literal["auto"] = "auto"
    ray_cpus_per_worker: float = Field(1.0, gt=0)
