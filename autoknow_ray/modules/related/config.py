"""Settings of the related-products module (the directed dual-embedding GNN).

Defaults fit a 2-core laptop on a 50k-product catalogue in minutes; a GPU cluster raises the caps.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RelatedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # ---- the product graph
    encoder: str = "default"  # text encoder for the product metadata (the packaged MiniLM)
    # title tokens; at module 1's title-vector length (nn.encoder.TITLE_MAX_LENGTH) the stage
    # reads module 1's title vectors where the encoder and precision are also the same, and
    # encodes no title a second time (padding costs nothing: same-length batches)
    text_max_length: int = Field(64, ge=4)
    # read module 1's title vectors (`taxonomy/typed_products` `title_vector`) where they are
    # this stage's own (same encoder, length, device); false: encode every title here
    title_vectors_from_taxonomy: bool = True
    text_knn: int = Field(10, ge=0)  # similarity edges from title embeddings (no co-view logs)
    coview_max_per_query: int = Field(30, ge=2)  # most-viewed products of one query kept
    coview_min_products: int = Field(2, ge=2)  # a query needs this many products to link them
    text_knn_always: bool = False  # also add text kNN edges where co-views exist
    rows_per_partition: int = Field(500_000, ge=1)  # groupby shuffle partitions: rows / this
    fanout: int = Field(10, ge=1)  # neighbours per node and edge kind (strongest first)
    # ---- the model
    type_buckets: int = Field(2048, ge=1)  # product types hashed into this many embeddings
    type_dim: int = Field(16, ge=1)
    dim: int = Field(64, ge=4)
    symmetric: bool = False  # one embedding per node (the ablation baseline), no asymmetry term
    # ---- training (self-supervised on the catalogue's own graph)
    # co-purchase edges sampled for training: the whole graph of a mid-sized catalogue, so the
    # neighbour lists and degree features seen in training are those of inference
    max_train_edges: int = Field(2_000_000, ge=1)
    max_train_nodes: int = Field(60_000, ge=1)  # products whose titles fit encodes
    epochs: int = Field(6, ge=1)
    max_train_seconds: float = Field(240.0, gt=0)  # stop early on a slow machine
    batch_size: int = Field(4096, ge=2)  # a batch's two-hop ring spans most of a small graph: big batches
    negatives: int = Field(512, ge=1)  # uniform random products per batch (non-edges)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    supervision_fraction: float = Field(0.3, gt=0, le=1)  # edges hidden from message passing
    asymmetry_weight: float = Field(0.5, ge=0)  # outbound over inbound on one-way edges
    augment_prob: float = Field(0.2, ge=0, le=1)  # target swapped for a product similar to it
    augment_weight: float = Field(0.5, ge=0)
    in_batch_negatives: bool = False  # also the batch's other targets (popularity-sampled) as negatives
    # share of each batch's negatives drawn by popularity (in-degree ** popular_negatives_power)
    # rather than uniformly: popular non-edges, so the model does not learn popularity alone
    popular_negatives: float = Field(0.5, ge=0, le=1)
    popular_negatives_power: float = Field(0.75, ge=0)
    # subtract each candidate's log chance of being drawn as a negative from its logit (the
    # sampled-softmax correction): the model then scores log p(B | A) as the full softmax would,
    # popular products included, however the negatives were drawn
    logq_correction: bool = True
    # cold-start training: each epoch this share of the products loses its co-purchase edges in
    # message passing (and its degree features), so the hidden edges from them are predicted from
    # metadata and similar products alone, as for a new listing
    cold_start_fraction: float = Field(0.15, ge=0, lt=1)
    # a learnt embedding per product, pair memory that titles and types cannot hold: this many
    # rows (0: none, the default) in a source and a target table, a product's row its id hash
    # mod the rows, added to its two-hop source and target embeddings (a matrix-factorisation
    # term u(A) . v(B) beside the GNN's score). Only products with co-purchase events get one:
    # a new listing, and each epoch's cold-start share in training, get none. Off: on Instacart's
    # validation pairs rows gave the model alone ~+0.005 at 10-20 epochs (~0.054, counts ~0.10)
    # and the blend nothing (docs/related.md, "A learnt embedding per product, trained longer")
    id_embedding_rows: int = Field(0, ge=0)
    id_lr: float | None = Field(None, gt=0)  # the tables' learning rate (None: `lr`)
    id_weight_decay: float = Field(0.0, ge=0)  # the tables' weight decay (not `weight_decay`)
    # data-parallel training through Ray Train (`TorchTrainer`): this many workers, each taking
    # its share of every epoch's batches, their gradients averaged before each step (one batch
    # of `batch_size` edges per worker: the step sees workers x batch_size); 1 trains in fit's
    # own process. GPU workers where the cluster has one for each (auto)
    train_workers: int = Field(1, ge=1)
    train_use_gpu: bool | Literal["auto"] = "auto"
    train_cpus_per_worker: float = Field(1.0, gt=0)
    # ---- validation inside fit: a share of the co-purchase events (not of the edges: a pair
    # bought again is what the future holds) is taken out of training and scored as hit rate @10
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    validation_pairs: int = Field(4000, ge=1)  # held-out pairs scored (a seeded sample)
    # co-purchase count prior: score(A, B) = source(A) . target(B) + w * log1p(count A-B, both
    # directions); w picked on the validation pairs from these multiples of the scores' spread
    prior_weights: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 100.0])
    # the weight is picked per bucket of the source product's co-purchase events in the training
    # graph (lower bounds: 0, 1-2, 3-9, 10+ by default): counts for the head, the model for the
    # tail; a bucket with fewer than `prior_bucket_min_pairs` validation pairs takes the weight
    # picked on all pairs
    prior_buckets: list[int] = Field(default_factory=lambda: [0, 1, 3, 10])
    prior_bucket_min_pairs: int = Field(30, ge=1)
    prior_candidates: int = Field(20, ge=0)  # co-purchase neighbours per product re-ranked
    # a popularity term beside the count prior: weight per bucket of log1p(B's co-purchase
    # events as the product bought), picked by fit (bucket 0, no events, on validation sources
    # stripped of their edges, as new listings are); 0 wherever it does not pay on validation
    popularity_term: bool = True
    # … and a neighbour term: log1p(mean co-purchase events of B with A's similar products),
    # what products like A were bought with, weighted per bucket by fit in the same way
    neighbour_term: bool = True
    # … and a walk term: log1p(WALK_SCALE * P2(A, B)), the chance that two steps over the
    # co-purchase lists (each `prior_candidates` wide, out and in) lead from A to B: what A's
    # partners were bought with, weighted per bucket by fit in the same way
    walk_term: bool = True

    @field_validator("prior_buckets")
    @classmethod
    def _buckets_start_at_zero(cls, v: list[int]) -> list[int]:
        if not v or v[0] != 0 or any(b >= c for b, c in zip(v, v[1:])):
            raise ValueError(f"prior_buckets must rise strictly from 0 (lower bounds of co-purchase events): {v}")
        return v
    # ---- recommendations
    top_k: int = Field(20, ge=1)
    ivf_min_size: int = Field(200_000, ge=1)  # exact search below, IVF above
    # products whose node tables one worker may hold (about 1 KB each: h0, hop-1 embeddings,
    # neighbour lists); above it the two-hop embeddings are computed over shards of this many
    # nodes (related/sharded.py), so no worker holds every product
    max_nodes_per_actor: int = Field(500_000, ge=1)
    nprobe: int = Field(32, ge=1)
