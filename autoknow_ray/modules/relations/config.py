"""Configuration of module 2, relation discovery (pydantic v2, unknown keys rejected).

The defaults run on a laptop: the counting is one Ray Data pass over the products (and one join
of the customer texts), the models are two small MLPs over a few hundred to a few hundred thousand
(type, attribute) pairs.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RelationsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # ---- the vocabulary shipped to the workers: attributes and a bounded sample of their values
    max_attributes: int = Field(500, ge=1)  # the most frequent attribute names
    values_per_attribute: int = Field(200, ge=1)  # the most frequent values of each
    vocabulary_sample: int = Field(50_000, ge=1)  # products sampled to build the vocabulary
    max_value_tokens: int = Field(4, ge=1)  # longer values are not looked up in text
    max_text_chars: int = Field(5_000, ge=100)  # per product / customer text, the rest is cut
    # customer texts and queries are counted for a seeded sample of at most this many typed
    # products (their product -> type map travels to the workers)
    customer_products: int = Field(200_000, ge=1)

    # ---- neighbours of a type (taxonomy and name embedding)
    encoder: str = "default"  # "default" = packaged MiniLM; or a local folder
    neighbours: int = Field(5, ge=1)  # nearest known types by name embedding

    # ---- labels at fit: an attribute applies to a type filled for at least this many products
    min_fill_products: int = Field(1, ge=1)
    # weak importance label = fill rate, blended with the customer mention rate at this weight
    importance_customer_weight: float = Field(0.25, ge=0.0, le=1.0)

    # ---- the two models
    # auto: the best out-of-fold AUC-PR in fit; ridge: linear with `ridge_weight_decay`;
    # gbt: gradient-boosted trees (`gbt_*` below)
    model: Literal["auto", "mlp", "linear", "ridge", "gbt"] = "auto"
    hidden: int = Field(32, ge=1)
    epochs: int = Field(400, ge=1)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(1e-3, ge=0)
    ridge_weight_decay: float = Field(0.1, ge=0)
    gbt_rounds: int = Field(100, ge=1)  # trees
    gbt_depth: int = Field(3, ge=1, le=8)  # levels of splits per tree
    gbt_learning_rate: float = Field(0.1, gt=0, le=1)
    # the model kind and the threshold are picked on out-of-fold predictions: the labelled types
    # are split into this many folds, each predicted by models trained on the other folds' types
    # (its neighbour features from those types only: every type is then "never seen")
    folds: int = Field(5, ge=2)
    max_train_pairs: int = Field(300_000, ge=1)  # (type, attribute) pairs, seeded sample beyond
    # applicable = applicability >= threshold; None: the threshold of best out-of-fold F1 in fit
    threshold: float | None = Field(None, gt=0, lt=1)
    # a type fit never labelled is decided by what the catalogue being rebuilt shows of it, where
    # it shows anything: attributes its products fill, and those module 1 reads in its titles
    # above the tagger's noise (`evidence.py`); false: the model alone
    catalogue_evidence: bool = True
