"""The graph stage: the catalogue's facts as `kept` triples, with every module's edits applied.

A module stage hands the graph its work through tables in its own stage folder (each a Parquet
file or a folder of shards):
- `edits` (TRIPLES schema): `added` and `corrected` triples, and `removed` rows naming the
  (subject, relation, object) of an existing fact they retract;
- `graph_<name>` for name in taxonomy | attributes | synonyms | related: rows for that graph
  table. Taxonomy rows for a type replace that type's `parent = null` placeholder.

The triples are built by the workers: the catalogue's facts are a map over the product shards,
then they and every module's edits are hash-partitioned by subject, and each partition applies
the edits module by module in flow order (`apply_edits`: every rule is about one subject) and
writes its rows sorted, to `graph/triples/` (a folder of shards). The driver sees only the
per-relation and per-status counts. The same inputs and config give the same triples.
"""
from __future__ import annotations

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from autoknow_ray import runtime
from autoknow_ray.pipeline import RunContext, Stage, count_rows, ensure_shards
from autoknow_ray.schema import GRAPH_TABLES, HAS_TYPE, TRIPLES, conform

MODULE_STAGES = ("taxonomy", "relations", "imputation", "cleaning", "synonyms", "related")
KEY = ["subject", "relation", "object"]
# which input a triple row comes from: -1 the catalogue, else the module's place in the flow
ORIGIN = "_origin"
TRIPLES_WITH_ORIGIN = pa.schema(list(TRIPLES) + [pa.field(ORIGIN, pa.int32())])
PRODUCT_COLUMNS = ["product_id", "product_type", "attributes", "brand"]
# rows per partition of the subject shuffle (a partition is sorted and edited in one worker)
PARTITION_MAX_ROWS = 1_000_000
PARTITION_MIN_ROWS = 20_000


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


# ---- worker functions ------------------------------------------------------------------------
def catalogue_triples_batch(batch: pa.Table) -> pa.Table:
    """A batch of products → their catalogue triples (one product's rows stay in one batch)."""
    out = conform(catalogue_triples(pl.from_arrow(batch)).to_arrow(), TRIPLES)
    return out.append_column(ORIGIN, pa.array([-1] * out.num_rows, pa.int32()))


def tag_edits(batch: pa.Table, origin: int) -> pa.Table:
    out = conform(batch, TRIPLES)
    return out.append_column(ORIGIN, pa.array([origin] * out.num_rows, pa.int32()))


def edit_partition(batch: pa.Table) -> pa.Table:
    """One subject partition (every row of its subjects): the catalogue facts with each module's
    edits applied in flow order, sorted. Edits are sorted first, so that which of two equal-
    confidence additions wins does not depend on the order the shuffle delivered them in."""
    df = pl.from_arrow(conform(batch, TRIPLES_WITH_ORIGIN))
    triples = df.filter(pl.col(ORIGIN) == -1).drop(ORIGIN)
    for origin in sorted(o for o in df[ORIGIN].unique().to_list() if o >= 0):
        edits = df.filter(pl.col(ORIGIN) == origin).drop(ORIGIN).sort(
            [*KEY, "status", "confidence", "module", "evidence"],
            descending=[False, False, False, False, True, False, False], nulls_last=True)
        triples = apply_edits(triples, edits)
    triples = triples.sort([*KEY, "status"], nulls_last=True)
    return conform(triples.to_arrow(), TRIPLES)


def live_only(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.not_equal(batch.column("status"), "removed"))


def _counts(ds, column: str) -> dict[str, int]:
    agg = runtime.count_by(ds, [column])
    if agg.height == 0:
        return {}
    return {k: int(n) for k, n in agg.sort(["n", column], descending=[True, False]).select(
        column, "n").iter_rows()}


class GraphStage(Stage):
    name = "graph"
    needs = ("ingest", *MODULE_STAGES)

    def fingerprint(self, ctx: RunContext) -> str:
        self.needs = tuple(s for s in ("ingest", *MODULE_STAGES) if s in ctx.cfg.stages)
        return super().fingerprint(ctx)

    def run(self, ctx: RunContext) -> dict:
        modules = [m for m in MODULE_STAGES if m in ctx.cfg.stages]
        products_path = ctx.table_path("ingest", "products")
        n_products = count_rows(products_path)
        catalogue = runtime.read_parquet(products_path, PRODUCT_COLUMNS).map_batches(
            catalogue_triples_batch, batch_format="pyarrow")
        before = _counts(catalogue, "relation") if n_products else {}
        parts, n_edits, n_rows = [catalogue], {}, sum(before.values())
        for order, m in enumerate(modules):
            path = ctx.table_path(m, "edits")
            if path.exists():
                n_edits[m] = count_rows(path)
                n_rows += n_edits[m]
                if n_edits[m]:
                    parts.append(runtime.read_parquet(path).map_batches(
                        tag_edits, fn_kwargs={"origin": order}, batch_format="pyarrow"))
        out = ctx.out / "triples"
        if n_rows:
            ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
            ds = ds.repartition(
                runtime.hash_partitions(n_rows, PARTITION_MAX_ROWS, PARTITION_MIN_ROWS),
                keys=["subject"])
            # batch_size=None: each partition whole, as GroupedData.map_groups relies on
            ds.map_batches(edit_partition, batch_format="pyarrow",
                           batch_size=None).write_parquet(str(out))
        ensure_shards(out, TRIPLES)
        triples = runtime.read_parquet(out)
        status_counts = _counts(triples, "status") if n_rows else {}
        after = _counts(triples.map_batches(live_only, batch_format="pyarrow"),
                        "relation") if n_rows else {}

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
        for name in ("attributes", "synonyms"):
            parts_ = [ctx.read(m, f"graph_{name}") for m in modules if ctx.has(m, f"graph_{name}")]
            table = pl.concat(parts_, how="vertical_relaxed") if parts_ else GRAPH_TABLES[name].empty_table()
            ctx.write(name, table, GRAPH_TABLES[name])
        # related: per product, so as shards written by the workers
        related = [runtime.read_parquet(ctx.table_path(m, "graph_related")).map_batches(
            conform, fn_kwargs={"schema": GRAPH_TABLES["related"]}, batch_format="pyarrow")
            for m in modules if count_rows(ctx.table_path(m, "graph_related"))]
        if related:
            (related[0].union(*related[1:]) if len(related) > 1 else related[0]).write_parquet(
                str(ctx.out / "related"))
        ensure_shards(ctx.out / "related", GRAPH_TABLES["related"])
        return {
            "rows_in": n_products,
            "rows_out": count_rows(out),
            "rows_quarantined": 0,
            "edits": n_edits,
            "facts_before": before,
            "facts_after": after,
            "status_counts": status_counts,
            "taxonomy_rows": 0 if tax is None else tax.height,
        }
