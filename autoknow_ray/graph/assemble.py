"""The graph stage: the catalogue's facts as `kept` triples, with every module's edits applied.

A module stage hands the graph its work through files in its own stage folder:
- `edits.parquet` (TRIPLES schema): `added` and `corrected` triples, and `removed` rows naming
  the (subject, relation, object) of an existing fact they retract;
- `graph_<name>.parquet` for name in taxonomy | attributes | synonyms | related: rows for that
  graph table. Taxonomy rows for a type replace that type's `parent = null` placeholder.
"""
from __future__ import annotations

import polars as pl

from autoknow_ray.pipeline import RunContext, Stage
from autoknow_ray.schema import GRAPH_TABLES, HAS_TYPE, TRIPLES, conform

MODULE_STAGES = ("taxonomy", "relations", "imputation", "cleaning", "synonyms", "related")
KEY = ["subject", "relation", "object"]


def catalogue_triples(products: pl.DataFrame) -> pl.DataFrame:
    """The facts already in the catalogue: type, attribute values, brand."""
    if products.height == 0:
        return pl.from_arrow(TRIPLES.empty_table())
    base = dict(confidence=pl.lit(1.0, pl.Float32), module=pl.lit("catalogue"),
                status=pl.lit("kept"), evidence=pl.lit("catalogue"))
    types = products.filter(pl.col("product_type").is_not_null()).select(
        pl.col("product_id").alias("subject"), pl.lit(HAS_TYPE).alias("relation"),
        pl.col("product_type").alias("object"), **base)
    attrs = (
        products.select("product_id", "attributes").explode("attributes")
        .filter(pl.col("attributes").is_not_null())
        .select(pl.col("product_id").alias("subject"),
                pl.col("attributes").struct.field("name").alias("relation"),
                pl.col("attributes").struct.field("value").alias("object"), **base)
    )
    brand = products.filter(pl.col("brand").is_not_null()).select(
        pl.col("product_id").alias("subject"), pl.lit("Brand").alias("relation"),
        pl.col("brand").alias("object"), **base)
    out = pl.concat([types, attrs, brand], how="vertical_relaxed")
    return out.unique(subset=KEY, keep="first", maintain_order=True)


def apply_edits(base: pl.DataFrame, edits: pl.DataFrame) -> pl.DataFrame:
    """Mark retracted facts `removed`, append new ones; an addition that repeats a fact is dropped."""
    if edits.height == 0:
        return base
    removed = edits.filter(pl.col("status") == "removed").unique(subset=KEY, keep="first")
    if removed.height:
        r = removed.select(*KEY, pl.col("module").alias("_m"), pl.col("evidence").alias("_e"),
                           pl.col("confidence").alias("_c"), pl.lit(True).alias("_rm"))
        base = base.join(r, on=KEY, how="left").with_columns(
            pl.when(pl.col("_rm")).then(pl.lit("removed")).otherwise(pl.col("status")).alias("status"),
            pl.when(pl.col("_rm")).then(pl.col("_m")).otherwise(pl.col("module")).alias("module"),
            pl.when(pl.col("_rm")).then(pl.col("_e")).otherwise(pl.col("evidence")).alias("evidence"),
            pl.when(pl.col("_rm")).then(pl.col("_c")).otherwise(pl.col("confidence")).alias("confidence"),
        ).drop("_m", "_e", "_c", "_rm")
    new = edits.filter(pl.col("status").is_in(["added", "corrected"]))
    new = new.sort("confidence", descending=True, maintain_order=True).unique(
        subset=KEY, keep="first", maintain_order=True)
    live = base.filter(pl.col("status") != "removed").select(KEY)
    new = new.join(live, on=KEY, how="anti")
    return pl.concat([base, new.select(base.columns)], how="vertical_relaxed")


class GraphStage(Stage):
    name = "graph"
    needs = ("ingest", *MODULE_STAGES)

    def fingerprint(self, ctx: RunContext) -> str:
        self.needs = tuple(s for s in ("ingest", *MODULE_STAGES) if s in ctx.cfg.stages)
        return super().fingerprint(ctx)

    def run(self, ctx: RunContext) -> dict:
        products = ctx.read("ingest", "products")
        triples = catalogue_triples(products)
        before = triples.group_by("relation").len().rows()
        modules = [m for m in MODULE_STAGES if m in ctx.cfg.stages]
        n_edits = {}
        for m in modules:
            if ctx.has(m, "edits"):
                edits = ctx.read(m, "edits")
                n_edits[m] = edits.height
                triples = apply_edits(triples, pl.from_arrow(conform(edits.to_arrow(), TRIPLES)))
        ctx.write("triples", triples, TRIPLES)

        taxonomy = ctx.read("ingest", "taxonomy")
        tax = taxonomy.select("type", "parent", pl.lit(False).alias("is_new"),
                              pl.lit(1.0, pl.Float32).alias("confidence")) if taxonomy.height else None
        placed = []
        for m in modules:
            if ctx.has(m, "graph_taxonomy"):
                placed.append(ctx.read(m, "graph_taxonomy"))
        if placed:
            new_rows = pl.concat(placed, how="vertical_relaxed")
            placed_types = new_rows.filter(pl.col("parent").is_not_null()).select("type").unique()
            if tax is not None:
                tax = tax.join(
                    placed_types.with_columns(pl.lit(True).alias("_placed")), on="type", how="left"
                ).filter(~(pl.col("_placed").fill_null(False) & pl.col("parent").is_null())).drop("_placed")
                tax = pl.concat([tax, new_rows.select(tax.columns)], how="vertical_relaxed")
            else:
                tax = new_rows
        ctx.write("taxonomy", tax if tax is not None else GRAPH_TABLES["taxonomy"].empty_table(),
                  GRAPH_TABLES["taxonomy"])
        for name in ("attributes", "synonyms", "related"):
            parts = [ctx.read(m, f"graph_{name}") for m in modules if ctx.has(m, f"graph_{name}")]
            table = pl.concat(parts, how="vertical_relaxed") if parts else GRAPH_TABLES[name].empty_table()
            ctx.write(name, table, GRAPH_TABLES[name])
        live = triples.filter(pl.col("status") != "removed")
        return {
            "rows_in": products.height,
            "rows_out": triples.height,
            "rows_quarantined": 0,
            "edits": n_edits,
            "facts_before": dict(before),
            "facts_after": dict(live.group_by("relation").len().rows()),
            "status_counts": dict(triples.group_by("status").len().rows()),
            "taxonomy_rows": 0 if tax is None else tax.height,
        }
