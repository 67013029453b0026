"""Module 5 settings: vocabulary caps, candidate search, the pair classifier and clustering."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SynonymsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    encoder: str = "default"  # the packaged MiniLM, or a local folder
    # vocabulary: terms per (kind, attribute) by product count; the rest are reported, not merged
    max_terms_per_attribute: int = Field(20_000, ge=1)
    max_terms: int = Field(200_000, ge=1)
    max_term_chars: int = Field(200, ge=1)
    # candidates: embedding neighbours (FAISS, exact below ivf_min_size terms in one attribute)
    knn_k: int = Field(10, ge=1)
    knn_min_cosine: float = 0.5
    ivf_min_size: int = Field(50_000, ge=1)
    # candidates: terms whose products share a query or a co-purchase (behaviour)
    max_terms_per_context: int = Field(30, ge=2)
    # (term, context) rows kept in all, the most frequent first (ties by key), after each
    # context's `max_terms_per_context`: capped in the workers, so the driver holds at most this
    # many; the rows left out are counted in the manifest (`truncated.term_contexts`)
    max_term_contexts: int = Field(500_000, ge=1)
    min_shared_contexts: int = Field(1, ge=1)
    max_behaviour_pairs: int = Field(1_000_000, ge=0)
    # candidates from duplicate listings: the values of one attribute under one normalised
    # title listed 2..max_products_per_title times
    colisted: bool = True
    max_products_per_title: int = Field(8, ge=2)
    # decision: None = the threshold `fit` chose on its validation pairs: the lowest whose
    # precision lower bound reaches `precision_target` (None: the older best-F1 rule); where
    # fit found none, the module merges nothing and says so
    threshold: float | None = None
    precision_target: float | None = Field(0.95, gt=0, lt=1)
    calibration_folds: int = Field(5, ge=2)  # out-of-fold scores for the threshold
    # candidates whose terms share no context (embedding neighbours only) need fit's own
    # threshold for such pairs (`knn_threshold`, calibrated on its neighbour pairs); False: the
    # one threshold for every candidate (models fitted before it have one only)
    knn_only_threshold: bool = True
    # a catalogue unlike the fit's (shift.py): where the rebuild's sampled terms get more than
    # `shift_factor` times the accepted embedding-neighbour pairs per 1,000 terms that fit's
    # got (at least `shift_min_pairs` of them), that kind's merges are held back
    # (`shift_guard` in the manifest). A kind fit sampled under `shift_min_terms` terms of is
    # compared with fit's figure over every kind. Only fit's own threshold is guarded; None: off
    shift_factor: float | None = Field(3.0, gt=1)
    shift_min_pairs: int = Field(5, ge=1)
    shift_min_terms: int = Field(50, ge=1)
    # the stage merges no pair under this embedding cosine, whatever it scores. None: fit's
    # `cosine_floor`, the lowest cosine at which it drew negatives (with `random_negatives`, pairs
    # of unrelated terms of one attribute, at any cosine; without them, `train_min_cosine`);
    # models fitted before it: 0.3. Below where fit drew a negative the classifier has never
    # learnt "no", and behaviour candidates of unrelated terms score anything there
    min_pair_cosine: float | None = Field(None, ge=-1, le=1)
    # fit's neighbour pairs are drawn at or above this cosine
    train_min_cosine: float = Field(0.3, ge=-1, le=1)
    # per sampled term, pairs with this many other terms of its (kind, attribute) drawn at random
    # (labelled by the rewrite rules: a "no" unless one is a spelling or conversion of the other)
    random_negatives: int = Field(1, ge=0)
    # a pair feature from the fit catalogue's own duplicate listings (transfer.py): the share of a
    # term's `canonical_vote_k` nearest fit terms whose co-listed canonical is the other term
    # ("Xeon E5530" / "Intel Xeon Series": its neighbours were all listed beside it). Off: the
    # classifier has its string and embedding features only (as models fitted before it)
    canonical_vote: bool = True
    canonical_vote_k: int = Field(5, ge=1)
    canonical_vote_max_terms: int = Field(20_000, ge=1)  # fit terms kept for it (a seeded sample)
    # False: synonyms go to graph/synonyms and the catalogue's values stay as written; True: each
    # merged value in the triples is also rewritten to its canonical (`removed` + `corrected`)
    rewrite_values: bool = False
    # clusters: a member must itself score >= threshold against the cluster's canonical (no
    # chaining a ~ b ~ c into a ~ c), and a cluster holds at most this many terms
    max_cluster_size: int = Field(50, ge=2)
    # a term whose pair with the cluster's canonical was never a candidate joins only if the
    # classifier, asked about that pair, accepts it (measured to chain; off: direct pairs only)
    rescore_members: bool = False
    # training (fit)
    max_train_products: int = Field(20_000, ge=1)  # seeded product sample for co-listed pairs
    max_train_terms: int = Field(3_000, ge=1)  # seeded term sample for rewrites and neighbours
    train_knn_k: int = Field(3, ge=1)
    val_fraction: float = Field(0.2, gt=0, lt=1)  # held out by term (precision_target null only)
    hidden: int = Field(32, ge=1)
    # MLPs trained alike with consecutive seeds, their probabilities averaged (out-of-fold
    # calibration too): one MLP's calibrated threshold moved with its seed
    members: int = Field(3, ge=1)
    epochs: int = Field(60, ge=1)
    lr: float = 3e-3
    batch_size: int = Field(256, ge=1)
