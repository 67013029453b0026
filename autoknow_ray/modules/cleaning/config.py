"""Configuration of the cleaning module (pydantic v2, unknown keys rejected).

Defaults are sized for a 2-core laptop: a few thousand training pairs, one or two epochs of
MiniLM, minutes of CPU. On a GPU the same recipe runs with bf16 inference.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class NegativeMix(BaseModel):
    """How negatives (misassigned values) are made from a valid pair; shares, normalised."""

    model_config = ConfigDict(extra="forbid")

    other_type: float = Field(0.25, ge=0)  # a value of the same attribute from another type
    swap: float = Field(0.25, ge=0)  # the same attribute's value of another product (any type)
    other_attribute: float = Field(0.25, ge=0)  # a value of another attribute
    corrupt: float = Field(0.25, ge=0)  # character edits, a token replaced, letters scrambled

    @model_validator(mode="after")
    def _some(self):
        if self.other_type + self.swap + self.other_attribute + self.corrupt <= 0:
            raise ValueError("cleaning.negatives: at least one share must be > 0")
        return self


class CleaningConfig(BaseModel):
    """The cleaning cross-encoder: training data, training, and the removal threshold."""

    model_config = ConfigDict(extra="forbid")

    # model
    encoder: str = "default"  # "default" = packaged MiniLM; or a local folder / cached hub id
    max_length: int = Field(64, ge=16, le=512)  # tokens of (attribute: value | type) + product text
    max_value_chars: int = Field(120, ge=1)  # a value longer than this is cut before tokenising
    max_text_chars: int = Field(1200, ge=1)  # title + description, cut before tokenising
    feature_text_chars: int = Field(20_000, ge=1)  # the text the text features search (string
    # matching is cheap, so it reads far past what the transformer sees: a UPC at the end counts)
    # training data (the article: positives recur across a type's products; negatives swap values)
    max_train_products: int = Field(3000, ge=1)  # products sampled from the catalogue for fit
    max_train_pairs: int = Field(4000, ge=2)  # positives + negatives, in total
    min_attribute_products: int = Field(3, ge=1)  # an attribute is valid for a type when it is
    # set on at least this many of the type's products
    min_value_products: int = Field(1, ge=1)  # and a value counts as a positive when this many
    # of the type's products carry it (1: any value of a valid attribute; see docs/cleaning.md)
    negatives_per_positive: float = Field(1.0, gt=0)
    negatives: NegativeMix = Field(default_factory=NegativeMix)
    type_share: float = Field(0.25, ge=0, le=1)  # share of the pairs that judge the product type
    # the claim's text features (TEXT_FEATURES in model.py) beside the transformer: an exact or
    # fuzzy match of the value in the product's text; their weight is learned from the pairs
    text_features: bool = True
    # training
    epochs: int = Field(4, ge=1)
    # fine-tune only the top N transformer layers (and the head): the lower layers and the
    # embeddings stay frozen, so backward passes cost a fraction; 0 = fine-tune every layer
    train_layers: int = Field(2, ge=0)
    lr: float = Field(1e-4, gt=0)
    head_lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    # cross-fitted calibration: the sampled products are split into this many folds; a model
    # trained on the other folds scores every claim of each fold's products, and the thresholds
    # are calibrated on the pooled out-of-fold scores (every product counts, not a held-out
    # share). The fold models are what ships: a rebuild judges each product with the fold model
    # of its fold (`fold_rule`), so the thresholds describe the models that judge. 1: one
    # held-out split (`val_fraction`) and a model trained on the rest instead (docs/cleaning.md)
    calibration_folds: int = Field(2, ge=1, le=10)
    # training pairs of each fold model, at most `max_train_pairs` (None: `max_train_pairs`).
    # On OA-Mine 2,000 gave the same calibrated recall as 4,000 and a fit 40% faster
    # (docs/cleaning.md)
    calibration_fold_pairs: int | None = Field(2000, ge=2)
    # how the shipped fold models judge a claim at rebuild: `own_fold` = the fold model of the
    # claim's product alone (a seeded hash of its id, as in fit: exactly the out-of-fold score
    # distribution the thresholds were calibrated on, and for a product fit sampled, the model
    # that never saw it); `all_agree` = the lowest fold-model score (removed only when every fold
    # model flags it: a subset of `own_fold`'s removals, K forward passes per claim)
    fold_rule: Literal["own_fold", "all_agree"] = "own_fold"
    val_fraction: float = Field(0.15, ge=0.05, lt=0.5)  # products held out to set the threshold
    # when `calibration_folds` is 1
    # every claim of the held-out products is judged in validation (with as many planted
    # misassignments), up to this many pairs per fold (or held-out split): inference only, a few
    # seconds per thousand on CPU
    max_validation_pairs: int = Field(10_000, ge=2)
    cpu_threads: int | None = Field(2, ge=1)
    # the removal threshold: a number, or `auto` = the one `fit` chose on its held-out pairs,
    # re-weighted to `expected_error_rate` misassigned values (the base rate the graph will see)
    threshold: float | Literal["auto"] = "auto"
    type_threshold: float | Literal["auto"] = "auto"  # the same, for product-type claims
    expected_error_rate: float = Field(0.05, gt=0, lt=0.5)
    # `auto` ships the lowest threshold whose precision (one-sided 95% lower bound, at
    # `expected_error_rate` misassigned claims) reaches this on the held-out pairs; where none
    # does, the module removes nothing of that kind (values, types) and says so. None: the
    # older weighted-F1 rule below
    precision_target: float | None = Field(0.95, gt=0, lt=1)
    # a rebuild whose flagged share of claims is over this multiple of what fit expects at the
    # expected error rate judges a catalogue unlike the fit's: it writes no edit and says so
    shift_factor: float | None = Field(3.0, gt=1)
    min_threshold: float = Field(0.5, ge=0, le=1)  # `auto` never goes below this
    # `auto` takes the highest threshold whose weighted F1 is within this of the best: of
    # thresholds that do about as well on the held-out pairs, the one that removes least
    threshold_tolerance: float = Field(0.02, ge=0, le=1)
    # what the stage judges
    # score has_type triples (catalogue types and module 1's). They are judged by the fold
    # models the type threshold was calibrated on, and held back where the rebuild flags too few
    # to reach the precision target at the error rate it shows (stage.shift_guard): on AE-110K
    # the model trained on every product had removed 3 correct types of 305, the fold models
    # flag 1 and the guard holds it back (docs/cleaning.md)
    judge_types: bool = True
    correct_from_upstream: bool = True  # a removed catalogue value with an upstream value
    # for the same product and attribute gets it as `corrected`
    bf16: bool | Literal["auto"] = "auto"  # inference only: on GPU, or a CPU with native bf16
