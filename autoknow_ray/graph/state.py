"""What downstream modules read of the graph so far, without reaching into another module.

Every function returns a Ray Dataset (the per-product tables stay distributed) or a small
aggregate. A module reads the products with their current type from here, never from
`RUN/taxonomy/` directly, and the edits of the modules before it in the flow.
"""
from __future__ import annotations

from pathlib import Path


from autoknow_ray.pipeline import RunContext, count_rows, parquet_files  # noqa: F401 (re-exported)

# module 1 writes every ingested product once, with its resolved type, to this table
TYPED_PRODUCTS = ("taxonomy", "typed_products")
# module 1's title vector of each typed product (fp16, fixed width; absent where module 1 wrote
# none): the related stage reads it instead of encoding the titles again
TITLE_VECTOR = "title_vector"


def _has_rows(path: Path) -> bool:
    return path.exists() and count_rows(path) > 0


def typed_products(ctx: RunContext, columns: list[str] | None = None):
    """Every ingested product with a `type` column: module 1's resolved type where the taxonomy
    stage ran (null where it could not resolve one), else the catalogue's own `product_type`.
    Columns: those of the products table (or `columns`), plus `type`."""
    import ray.data

    stage, name = TYPED_PRODUCTS
    path = ctx.table_path(stage, name)
    if stage in ctx.cfg.stages and _has_rows(path):
        ds = ray.data.read_parquet(str(path))
        return ds.select_columns(list(dict.fromkeys([*(columns or ds.columns()), "type"])))
    ds = ray.data.read_parquet(str(ctx.table_path("ingest", "products")))
    if columns:
        ds = ds.select_columns(list(dict.fromkeys([*columns, "product_type"])))

    def add_type(batch):
        return batch.append_column("type", batch.column("product_type"))

    ds = ds.map_batches(add_type, batch_format="pyarrow")
    return ds.select_columns(list(dict.fromkeys([*columns, "type"]))) if columns else ds


def typed_products_files(ctx: RunContext) -> list[Path] | None:
    """The Parquet files of module 1's typed products (every product with `title` and `type`),
    for a step that runs over them file by file (a cached step, `incremental.run_cached`); None
    where the taxonomy stage did not run and `typed_products` derives the type instead."""
    stage, name = TYPED_PRODUCTS
    path = ctx.table_path(stage, name)
    if stage not in ctx.cfg.stages or not _has_rows(path):
        return None
    return parquet_files(path)


def n_products(ctx: RunContext) -> int:
    return count_rows(ctx.table_path("ingest", "products"))


def upstream_edits(ctx: RunContext, before: str):
    """The `edits` tables (TRIPLES schema) of every module stage that runs before `before` in the
    flow, as one Ray Dataset (None when there are none)."""
    import ray.data

    paths = _upstream_edit_paths(ctx, before)
    if not paths:
        return None
    return ray.data.read_parquet([str(p) for p in paths])


def _upstream_edit_paths(ctx: RunContext, before: str) -> list[Path]:
    from autoknow_ray.graph.assemble import MODULE_STAGES

    stages = [s for s in MODULE_STAGES[: MODULE_STAGES.index(before)] if s in ctx.cfg.stages]
    return [ctx.table_path(s, "edits") for s in stages if _has_rows(ctx.table_path(s, "edits"))]


def upstream_edit_rows(ctx: RunContext, before: str) -> int:
    """Rows of `upstream_edits(ctx, before)`, from the Parquet metadata (nothing is read)."""
    return sum(count_rows(p) for p in _upstream_edit_paths(ctx, before))


def current_taxonomy(ctx: RunContext):
    """The taxonomy so far as a small polars DataFrame (type, parent): the catalogue's edges plus
    the new types module 1 placed in this run (a type placed there loses its parentless row)."""
    import polars as pl

    tax = ctx.read("ingest", "taxonomy", ["type", "parent"]) if ctx.has("ingest", "taxonomy") \
        else pl.DataFrame(schema={"type": pl.String, "parent": pl.String})
    if "taxonomy" in ctx.cfg.stages and ctx.has("taxonomy", "graph_taxonomy"):
        placed = ctx.read("taxonomy", "graph_taxonomy", ["type", "parent"])
        if placed.height:
            tax = pl.concat([tax.filter(~(pl.col("type").is_in(placed["type"].implode())
                                          & pl.col("parent").is_null())), placed],
                            how="vertical_relaxed")
    return tax.unique(maintain_order=True)


# module 2 writes one row per (type, attribute) to this table (GRAPH_ATTRIBUTES)
ATTRIBUTE_APPLICABILITY = ("relations", "graph_attributes")


def attribute_applicability(ctx: RunContext):
    """Module 2's table (type, attribute, applicability, applicable, importance, rank) as a small
    polars DataFrame (types x attributes), or None where the relations stage did not run. For
    imputation (extract only applicable attributes) and cleaning (what a type should have)."""
    stage, name = ATTRIBUTE_APPLICABILITY
    if stage not in ctx.cfg.stages or not ctx.has(stage, name):
        return None
    return ctx.read(stage, name)
