"""The distributed part of module 2: one Ray Data pass over the typed products, one join of the
customer texts and queries to their product's type, and a groupby sum of the sparse counts.

Shared by `fit` (on the training catalogue) and the stage (on the catalogue being rebuilt), so a
model is trained on exactly the features it is later run on.
"""
from __future__ import annotations

import polars as pl

from autoknow_ray import runtime
from autoknow_ray.graph import state
from autoknow_ray.modules.relations.config import RelationsConfig
from autoknow_ray.modules.relations.features import (
    TEXT, QUERY, CountCustomerMentions, CountProviderMentions, Vocabulary, build_vocabulary,
)
from autoknow_ray.pipeline import RunContext, column_names

PRODUCT_COLUMNS = ["product_id", "title", "description", "bullets", "attributes"]
TITLE_COLUMN = "title_attributes"


def sample_vocabulary(ctx: RunContext, cfg: RelationsConfig) -> Vocabulary:
    """Attribute names and values (with the types that carry them) from a bounded, seeded sample
    of the products."""
    n = state.n_products(ctx)
    if n == 0:
        return Vocabulary([])
    ds = state.typed_products(ctx, ["product_id", "attributes"])
    sample = runtime.bounded_sample(ds, cfg.vocabulary_sample, ctx.cfg.seed, n)
    return build_vocabulary(sample, cfg.max_attributes, cfg.values_per_attribute)


def _customer_rows(ctx: RunContext):
    """Texts and queries as one dataset of (product_id, source, text) and its row count (None, 0
    when both are empty)."""
    parts, n = [], 0
    for table, source, column in (("texts", TEXT, "text"), ("behavior", QUERY, "query")):
        path = ctx.table_path("ingest", table)
        rows = state.count_rows(path)
        if rows == 0:
            continue

        def to_rows(batch, source=source, column=column):
            import pyarrow as pa

            return pa.table({"product_id": batch.column("product_id").cast(pa.string()),
                             "source": pa.array([source] * batch.num_rows, pa.string()),
                             "text": batch.column(column).cast(pa.string())})

        ds = runtime.read_parquet(path, ["product_id", column])
        parts.append(ds.map_batches(to_rows, batch_format="pyarrow"))
        n += rows
    if not parts:
        return None, 0
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]), n


def _has_title_attributes(ctx: RunContext) -> bool:
    """Whether this run's typed products carry module 1's `title_attributes` (a schema read)."""
    stage, name = state.TYPED_PRODUCTS
    return stage in ctx.cfg.stages and TITLE_COLUMN in column_names(ctx.table_path(stage, name))


def count_mentions(ctx: RunContext, vocab: Vocabulary, cfg: RelationsConfig,
                   timer=None) -> pl.DataFrame:
    """Summed sparse counts (type, attribute, source, hits) over every product and the customer
    texts of a bounded sample of typed products (`customer_products`) of the catalogue in `ctx`.

    The sample's product -> type map travels inside the customer step (a bounded reference), so
    no join of two per-product tables is needed (a hash join's shuffle actors starve the read
    tasks on a small cluster)."""
    n_products = state.n_products(ctx)
    parts = []
    if n_products:
        # module 1's title attributes, where the taxonomy stage wrote them
        tagged = _has_title_attributes(ctx)
        typed = state.typed_products(ctx, PRODUCT_COLUMNS + ([TITLE_COLUMN] if tagged else []))
        step = CountProviderMentions(vocab, cfg.max_value_tokens, cfg.max_text_chars, tagged)
        counts = runtime.map_step(typed, step, ctx.cfg, n_products)
        parts.append(runtime.aggregate(counts, ["type", "attribute", "source"],
                                       {"hits": ("sum", "hits")}))
        if timer is not None:
            timer.done("count_provider_mentions")
        customer, n_customer = _customer_rows(ctx)
        if customer is not None:
            sample = runtime.bounded_sample(state.typed_products(ctx, ["product_id"]),
                                            cfg.customer_products, ctx.cfg.seed, n_products)
            sample = sample.filter(pl.col("type").is_not_null())
            types = dict(zip(sample["product_id"].to_list(), sample["type"].to_list()))
            if timer is not None:
                timer.done("customer_products_sample")
            step = CountCustomerMentions(vocab, cfg.max_value_tokens, cfg.max_text_chars, types)
            counts = runtime.map_step(customer, step, ctx.cfg, n_customer)
            parts.append(runtime.aggregate(counts, ["type", "attribute", "source"],
                                           {"hits": ("sum", "hits")}))
            if timer is not None:
                timer.done("count_customer_mentions")
    parts = [p for p in parts if p.height]
    if not parts:
        return pl.DataFrame(schema={"type": pl.String, "attribute": pl.String,
                                    "source": pl.String, "hits": pl.Int64})
    return pl.concat([p.with_columns(pl.col("hits").cast(pl.Int64)) for p in parts],
                     how="vertical_relaxed")
