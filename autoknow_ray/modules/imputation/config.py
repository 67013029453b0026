"""Configuration of module 3, data imputation (pydantic v2, unknown keys rejected).

The defaults run on a laptop CPU in minutes (training capped in products, windows and epochs);
a GPU cluster raises the caps, never changes the code path.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ImputationTaggerConfig(BaseModel):
    """The type-conditioned tagger over free text, trained by distant supervision."""

    model_config = ConfigDict(extra="forbid")

    encoder: str = "default"  # "default" = the packaged MiniLM; or a local folder
    condition_on_type: bool = True  # False: the same tagger without the type input (ablation)
    context_features: int = Field(32, ge=1)  # type features concatenated to every token
    context_dropout: float = Field(0.1, ge=0.0, le=1.0)  # windows trained without their type
    max_length: int = Field(128, ge=16, le=512)  # tokens per window
    stride: int = Field(32, ge=0)  # tokens of overlap between windows
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    shape_dim: int = Field(16, ge=0)
    epochs: int = Field(4, ge=1)
    lr: float = Field(3e-4, gt=0)
    head_lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    weight_decay: float = Field(0.01, ge=0.0)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    # validation windows drawn by product (every text of a product on one side, as a rebuild's
    # products are unseen) or by window (a product's title may train while its description
    # validates: the calibration then reads the tagger on values it was taught)
    val_split: Literal["product", "window"] = "product"
    patience: int = Field(2, ge=0)
    seed: int = 0
    bf16: bool | Literal["auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int | None = Field(2, ge=1)
    # taggers trained with seeds seed … seed + ensemble - 1 on the same windows and decoded
    # together (their word tag log-probabilities averaged; module 1's title tagger does the same):
    # a disputed span scores low, so the threshold fit calibrates for precision keeps more spans
    ensemble: int = Field(1, ge=1)
    # copies of each training text (never a validation one) with every labelled value replaced
    # by another value the training texts give that attribute (mention replacement): the tagger
    # learns where a value is written, not only which values it saw (docs/imputation.md)
    mention_replacement: int = Field(1, ge=0)
    # distant supervision: the catalogue's filled values located in its own texts
    max_train_products: int = Field(2000, ge=1)  # seeded sample of the training catalogue
    max_train_windows: int = Field(3000, ge=1)
    empty_keep_fraction: float = Field(0.1, ge=0.0, le=1.0)  # windows with no value kept
    min_attribute_count: int = Field(3, ge=1)  # attributes located in fewer texts are not learned
    max_value_chars: int = Field(100, ge=1)


class ClusterConfig(BaseModel):
    """Embedding clusters of candidate value terms (FAISS k-means): an uncertain span in a
    cluster dominated by one attribute, for the product's type, takes that attribute."""

    model_config = ConfigDict(extra="forbid")

    # off by default: fit does not calibrate this path, and on WDC-PAVE its additions were right
    # 0.80-0.83 of the time held out, under the 0.95 the module's other additions are certified
    # at (docs/imputation.md, "Mention replacement")
    enabled: bool = False
    n_clusters: int = Field(256, ge=1)  # upper bound; at most one cluster per `terms_per_cluster`
    terms_per_cluster: int = Field(4, ge=1)
    purity: float = Field(0.8, gt=0.0, le=1.0)  # share of the dominant attribute in (cluster, type)
    min_support: int = Field(5, ge=1)  # labelled occurrences behind that share
    min_span_score: float = Field(0.3, ge=0.0, le=1.0)  # uncertain spans below are ignored
    max_terms: int = Field(50_000, ge=1)  # the most frequent terms are embedded and clustered
    # (type, term, attribute) rows that reach the driver, the most frequent first (ties by key):
    # capped in the workers; the rows left out are counted (`truncated.cluster_term_rows`)
    max_term_rows: int = Field(200_000, ge=1)
    niter: int = Field(20, ge=1)
    known_values_max: int = Field(50_000, ge=0)  # training values kept in the model as labelled terms


class ImputationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tagger: ImputationTaggerConfig = Field(default_factory=ImputationTaggerConfig)
    clusters: ClusterConfig = Field(default_factory=ClusterConfig)
    # which texts are read: product fields and the customer texts (reviews, questions, answers)
    fields: list[Literal["title", "description", "bullets", "texts"]] = Field(
        default_factory=lambda: ["title", "description", "bullets", "texts"])
    max_text_chars: int = Field(20_000, ge=100)  # longer texts are cut (and counted)
    max_texts_per_product: int = Field(20, ge=1)  # customer texts read per product
    # the threshold for `added` facts: a number, or `auto` = the one fit calibrated on its
    # validation windows (the lowest span score whose precision lower bound reaches
    # `precision_target`); where fit found none, the module writes nothing and says why. Models
    # fitted before calibration existed use 0.9
    min_confidence: float | Literal["auto"] = "auto"
    precision_target: float = Field(0.95, gt=0, lt=1)
    # what makes a validation span right when fit calibrates: `value` = its (attribute, value)
    # is one its product gives (wherever the text writes it; what the graph gains and what
    # `autoknow eval` scores); `span` = it is exactly where distant supervision located a value
    # (a right value read at another mention, or with the text's own spelling of the same
    # words, counts as wrong). Either way a span of an attribute the product does not fill
    # counts as wrong, so the estimate errs low
    calibration_match: Literal["value", "span"] = "value"
    # a second threshold for known values: a candidate whose (attribute, value) another product
    # of the fit's sample gives is admitted from `threshold_known` (fit calibrates it jointly
    # with the threshold for other values, known <= unknown, one precision bound over both;
    # calibration.json). Only with `min_confidence: auto`; false, or a model fitted before it:
    # the one threshold. Fit always calibrates both
    known_value_threshold: bool = True
    # (attribute, term) pairs fit ships as known values, the most frequent first
    # (MODELS/imputation/known_attribute_values.parquet; the rebuild holds them as a set)
    known_value_terms_max: int = Field(50_000, ge=0)
    # a catalogue unlike the fit's: where the rebuild's titles hold fewer than 1/shift_factor of
    # the sure spans (score >= fit's threshold, per 1,000 title tokens) that fit's validation
    # titles held, over at least `shift_min_titles` titles, fit's precision says nothing about
    # it and nothing is written (`shift_guard` in the manifest). Only fit's own threshold
    # (`auto`) is guarded: a number here is the user's. None: no guard
    shift_factor: float | None = Field(3.0, gt=1)
    shift_min_titles: int = Field(50, ge=1)
    # a value that disagrees with one already in the graph is added beside it (both stay, for
    # module 4 to judge) only at this confidence; below it is counted, not written
    emit_conflicts: bool = True
    conflict_min_confidence: float = Field(0.97, ge=0.0, le=1.0)
    infer_batch_size: int = Field(32, ge=1)
