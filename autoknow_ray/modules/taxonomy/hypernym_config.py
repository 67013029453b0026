"""Settings of type resolution and of the hypernym classifier (module 1, second half).

Laptop defaults; every threshold is dataset-agnostic (no lists of names, nothing tuned to one
catalogue). Unknown keys are rejected.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


# the kNN vote's floors where fit chose none (knn_floors.py chooses them on its own validation:
# known types against withheld ones); low values, a vote below them is near chance
KNN_MIN_SIMILARITY = 0.3
KNN_MIN_SHARE = 0.3


class TypeResolutionConfig(BaseModel):
    """How a product's type is decided from the catalogue label and the tagger's type spans."""

    model_config = ConfigDict(extra="forbid")

    # new-type candidates: extracted type strings not in the taxonomy
    min_support: int = Field(3, ge=1, description="products whose best type span is the candidate")
    min_score: float = Field(0.6, ge=0, le=1, description="mean tagger score of the candidate")
    max_examples: int = Field(5, ge=0, description="example product ids kept per candidate")
    # a type span is used only from this tagger score on
    min_span_score: float = Field(0.3, ge=0, le=1)
    # corrections of a catalogue type: conservative
    correct_min_score: float = Field(0.9, ge=0, le=1, description="tagger score needed to correct")
    correct_max_cosine: float = Field(
        0.45, ge=-1, le=1, description="old and new type names must be less similar than this"
    )
    correct_title_margin: float = Field(
        0.0, description="the title must be closer to the new type than to the old one by this"
    )
    # fallback for untyped products without a usable type span: kNN over typed products' titles
    # (the training reference kept by fit + a capped sample of this catalogue's typed titles).
    # The vote answers only where the neighbours are close and agree; otherwise the product
    # stays untyped, its reason counted in the manifest.
    knn_k: int = Field(10, ge=1)
    # null (the default): the floors fit chose on its own known-against-withheld-type validation
    # (models/taxonomy/knn_floors.json), else the constants above (a model folder without one);
    # with `knn_prior_sample` > 0, re-chosen on fit's grid for the share of this catalogue's
    # untyped products that look like products of known types (below).
    # Measured end to end on OA-Mine with types withheld from fit: the products of the withheld
    # types forced into a known type fell from 0.95 to 0.01, at a cost in the known types'
    # accuracy (docs/taxonomy.md); 0.3 / 0.3 restores the old, forcing behaviour
    knn_min_similarity: float | None = Field(
        None, ge=-1, le=1, description="below this cosine to the nearest typed title: no type")
    knn_min_share: float | None = Field(
        None, ge=0, le=1, description="below this vote share of the best type: no type")
    # with the floors from fit (both null above): this many untyped titles of the rebuilt
    # catalogue, sampled, tell which share of its untyped products look like products of known
    # types (their nearest-neighbour cosines against fit's two validation distributions), and the
    # floors are chosen on fit's grid for that share (knn_floors.floors_for); 0: fit's floors
    knn_prior_sample: int = Field(2000, ge=0)
    knn_catalogue_sample: int = Field(
        50_000, ge=0, description="typed titles of this catalogue in the kNN reference (a cap)")
    catalogue_confidence: float = Field(1.0, ge=0, le=1)
    # a product the tagger did not type and the kNN vote refused takes the type name its title
    # writes (a vocabulary of type names kept by fit: modules/taxonomy/title_names.py); a new
    # name needs `min_support` such products
    title_names: bool = True
    # … else the last word of its title's first noun phrase, where `min_support` such products
    # end their first phrase in it ("… Platform Sneaker, Black" → "Sneaker"; English word order)
    title_heads: bool = True
    # at most this many new types from title names and head words, the best supported (a bound
    # on what the driver ships to the workers and on the hypernym step's children, whatever the
    # catalogue's size)
    max_title_types: int = Field(2000, ge=0)
    # the catalogue's own type labels the driver receives (their counts, ranked in the workers):
    # every label the taxonomy names, then at most this many others, the most used first
    max_catalogue_labels: int = Field(20_000, ge=0)
    # a product the kNN vote refused and whose title names no type takes a new type where its
    # nearest titles are of that new type's products (types.SpreadNewTypes; the same floors):
    # this many of each new type's products, and in all, join the vote's reference
    spread_new_types: bool = True
    # … after new types closer to each other than any two known types of this catalogue are
    # merged into one, named by the member with the most support (modules/taxonomy/type_groups.py)
    group_new_types: bool = True
    # the spread vote's floors chosen in the rebuild on its own new types (right - forced -
    # taken: knn_floors.choose_spread_floors); off: the first vote's floors
    spread_floors: bool = True
    # … where this catalogue's own products of known types (a capped sample per type) join the
    # reference: a refused product nearest them takes their known type (outcome `second_vote`)
    spread_own_known: bool = True
    # … under floors chosen in the rebuild on its own typed titles, each voting as a refused
    # product would (knn_floors.choose_second_vote_floors); off: the first vote's floors
    second_vote_floors: bool = True
    # a kNN answer of a known type gives way to an accepted new type the title names where that
    # type's titles in fit's reference (at least knn_k of them) do not write that name (at most
    # `new_name_written_share` of them do; types.ResolveTypes._new_name_conflict)
    new_name_overrides_vote: bool = True
    # … a name counts as written by a type where more than this share of that type's reference
    # titles write it (0: where any one does: 4 of AE-110K's 232 shorts titles name swimwear,
    # which kept the swimsuits the vote put among the shorts there; docs/taxonomy.md)
    new_name_written_share: float = Field(0.05, ge=0, lt=1)
    # the same for the tagger's own span of a known type: a title that also names an accepted new
    # type, outside its attribute spans, that the known type's titles do not write (as above)
    # takes the new type ("… Swimwear Swimming Pants Briefs Shorts" read as Shorts). Off: it
    # found more withheld-type titles but cost known types more ("Breakfast Cereal … B Vitamins")
    new_name_overrides_tagger: bool = False
    spread_per_type: int = Field(200, ge=1)
    spread_max: int = Field(20_000, ge=1)
    # after the spread, a new type whose name fewer than `name_min_share` of its titles write
    # takes the phrase (one to three words) that the most of them write, where that is at least
    # `name_min_share` of them and `name_min_lift` times the share of the other typed titles
    # (type_naming.py; a sample of `name_titles_per_type` titles per type, `spread_max` in all;
    # a type with fewer than `name_min_titles` is not judged)
    name_from_titles: bool = True
    name_min_share: float = Field(0.5, gt=0, le=1)
    name_min_lift: float = Field(4.0, ge=1)
    name_min_titles: int = Field(10, ge=1)
    name_titles_per_type: int = Field(100, ge=1)
    # the public names fit adds to the catalogue's own: "auto" (Google's product taxonomy and
    # Open Food Facts' categories beside the project, as `tagger.type_names`), "none", or a file
    vocabulary: str = "auto"
    title_name_confidence: float = Field(0.5, ge=0, le=1)
    seed: int = 0


class HypernymConfig(BaseModel):
    """Candidate generation, features and training of the hypernym (parent-type) classifier."""

    model_config = ConfigDict(extra="forbid")

    # candidate parents: union of FAISS top-k lists (name, children centroid, products centroid),
    # the parents of the nearest existing members (types and products), and lexical matches
    candidate_k: int = Field(20, ge=1, description="top-k per candidate source")
    neighbor_k: int = Field(30, ge=1, description="nearest members voted over")
    vote_temperature: float = Field(0.05, gt=0, description="softmax temperature of kNN votes")
    max_child_products: int = Field(32, ge=1, description="products sampled per child")
    product_neighbor_k: int = Field(10, ge=1, description="nearest products per child product")
    behavior_max_query_products: int = Field(50, ge=1, description="products kept per query")
    # the context read from the catalogue: bounded samples, never the whole catalogue
    context_per_type: int = Field(200, ge=1, description="typed products sampled per type")
    context_max: int = Field(50_000, ge=1, description="typed products sampled in all")
    behavior_max_rows: int = Field(200_000, ge=0, description="behaviour / co-purchase rows read")
    linked_max: int = Field(50_000, ge=0, description="products those rows link to, added to the "
                            "context (a seeded uniform draw where more)")
    # training
    product_edges: int = Field(3000, ge=0, description="product → type edges sampled for training")
    negatives: int = Field(40, ge=1, description="hard negatives per child (from its candidates)")
    hidden: int = Field(64, ge=4)
    # the classifier: "mlp" (unconstrained), "monotone" (a score that only rises with the share of
    # the child's neighbours under the candidate, hypernym.MONOTONE_FEATURES, which the many
    # product edges teach the opposite sign of), or "pair": both, trained apart, the mean of
    # their logits (docs/taxonomy.md). Models fitted before the setting load as "mlp"
    model: Literal["mlp", "monotone", "pair"] = "pair"
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(256, ge=1, description="children per step (each with its candidates)")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    # the share of the training loss carried by the taxonomy's own type → parent edges (the
    # rest: product → type edges, many more, a neighbouring task that teaches what the products'
    # neighbours say); new types are placed like types. null: fit chooses it, with the ancestor
    # credit below, by cross-validation over the taxonomy's own type edges (`calibration_folds`
    # folds; hypernym.TYPE_EDGE_SHARES, ANCESTOR_CREDITS)
    type_edge_share: float | None = Field(None, gt=0, le=1)
    calibration_folds: int = Field(3, ge=0, description="0 or 1: no cross-validation")
    listwise_weight: float = Field(1.0, ge=0, description="weight of the softmax-over-candidates loss")
    # output. A new type goes under the node of highest expected worth: its own share of the
    # classifier's mass plus `ancestor_credit` times the mass below it (a candidate that looks
    # like a sibling gives its mass to its parents: HypernymClassifier._decide_type); null: fit
    # chooses it. A second parent needs `second_parent_mass` of its own. A product's type: every
    # candidate scoring multi_parent_threshold
    ancestor_credit: float | None = Field(None, ge=0, le=1)
    second_parent_mass: float = Field(0.4, gt=0, le=1)
    multi_parent_threshold: float = Field(0.5, ge=0, le=1)
    keep_top_k: int = Field(3, ge=1)
    prefer_specific: bool = True
    threads: int = Field(2, ge=1, description="torch CPU threads")
    seed: int = 0
