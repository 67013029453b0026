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

from autoknow_ray import runtime, storage
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


# Why an input row of the graph stage (a catalogue fact or a module's edit) left no triple row of
# its own; the stage counts each in its manifest (`rows_dropped`) and keeps the rows in
# `graph/dropped/` with the reason.
DUPLICATE_FACT = "duplicate catalogue fact (one kept)"
REMOVAL_APPLIED = "removal applied (marks the fact it retracts removed)"
REMOVAL_REPEATED = "removal repeated in the module's edits"
REMOVAL_NO_FACT = "removal matching no fact"
ADDITION_REPEATED = "addition repeated in the module's edits (highest confidence kept)"
ADDITION_KNOWN = "addition repeating a live fact"
OTHER_STATUS = "edit status not added, corrected or removed"
DROP_REASONS = (DUPLICATE_FACT, REMOVAL_APPLIED, REMOVAL_REPEATED, REMOVAL_NO_FACT,
                ADDITION_REPEATED, ADDITION_KNOWN, OTHER_STATUS)
DROP = "_drop"  # the reason column of the stage's scratch rows (null: a triple written)
DROPPED = pa.schema(list(TRIPLES) + [pa.field("reason", pa.string())])
TRIPLES_OR_DROPPED = pa.schema(list(TRIPLES) + [pa.field(DROP, pa.string())])
DUPLICATE_ORIGIN = -2  # ORIGIN of a catalogue fact repeated within its product


def catalogue_triples(products: pl.DataFrame, unique: bool = True) -> pl.DataFrame:
    """The facts already in the catalogue: type, attribute values, brand. `unique=False` keeps a
    fact the product states twice (same subject, relation and object) as often as it does."""
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
    return out.unique(subset=KEY, keep="first", maintain_order=True) if unique else out


def _with_reason(rows: pl.DataFrame, reason: str) -> pl.DataFrame:
    return rows.select(*(f.name for f in TRIPLES)).with_columns(pl.lit(reason, pl.String).alias("reason"))


def apply_edits_counted(base: pl.DataFrame, edits: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """`apply_edits`, and every edit row that left no row of its own, with its reason (one of
    DROP_REASONS): base rows out = base rows in + additions kept, and edits in = additions kept +
    the rows returned second."""
    dropped: list[pl.DataFrame] = []
    if edits.height == 0:
        return base, _with_reason(edits, OTHER_STATUS).head(0)
    status = pl.col("status")
    known = status.is_in(["removed", "added", "corrected"]).fill_null(False)
    dropped.append(_with_reason(edits.filter(~known), OTHER_STATUS))
    removals = edits.filter(status == "removed")
    first = pl.struct(KEY).is_first_distinct()
    removed = removals.filter(first)
    dropped.append(_with_reason(removals.filter(~first), REMOVAL_REPEATED))
    if removed.height:
        facts = base.select(KEY).unique()
        dropped.append(_with_reason(removed.join(facts, on=KEY, how="semi"), REMOVAL_APPLIED))
        dropped.append(_with_reason(removed.join(facts, on=KEY, how="anti"), REMOVAL_NO_FACT))
        r = removed.select(*KEY, pl.col("module").alias("_m"), pl.col("evidence").alias("_e"),
                           pl.col("confidence").alias("_c"), pl.lit(True).alias("_rm"))
        base = base.join(r, on=KEY, how="left").with_columns(
            pl.when(pl.col("_rm")).then(pl.lit("removed")).otherwise(pl.col("status")).alias("status"),
            pl.when(pl.col("_rm")).then(pl.col("_m")).otherwise(pl.col("module")).alias("module"),
            pl.when(pl.col("_rm")).then(pl.col("_e")).otherwise(pl.col("evidence")).alias("evidence"),
            pl.when(pl.col("_rm")).then(pl.col("_c")).otherwise(pl.col("confidence")).alias("confidence"),
        ).drop("_m", "_e", "_c", "_rm")
    additions = edits.filter(status.is_in(["added", "corrected"])).sort(
        "confidence", descending=True, maintain_order=True)
    new = additions.filter(first)
    dropped.append(_with_reason(additions.filter(~first), ADDITION_REPEATED))
    live = base.filter(pl.col("status") != "removed").select(KEY)
    dropped.append(_with_reason(new.join(live, on=KEY, how="semi"), ADDITION_KNOWN))
    new = new.join(live, on=KEY, how="anti")
    return (pl.concat([base, new.select(base.columns)], how="vertical_relaxed"),
            pl.concat(dropped, how="vertical_relaxed"))


def apply_edits(base: pl.DataFrame, edits: pl.DataFrame) -> pl.DataFrame:
    """Mark retracted facts `removed`, append new ones; an addition that repeats a fact is dropped."""
    return apply_edits_counted(base, edits)[0]


# ---- worker functions ------------------------------------------------------------------------
def catalogue_triples_batch(batch: pa.Table) -> pa.Table:
    """A batch of products → their catalogue triples (one product's rows stay in one batch); a
    fact its product states again is kept with ORIGIN `DUPLICATE_ORIGIN`, to be counted."""
    facts = catalogue_triples(pl.from_arrow(batch), unique=False)
    origin = pl.when(pl.struct(KEY).is_first_distinct()).then(-1).otherwise(DUPLICATE_ORIGIN)
    facts = facts.with_columns(origin.cast(pl.Int32).alias(ORIGIN)) if facts.height else \
        facts.with_columns(pl.lit(-1, pl.Int32).alias(ORIGIN))
    return conform(facts.to_arrow(), TRIPLES_WITH_ORIGIN)


def catalogue_facts_only(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch.column(ORIGIN), -1))


def tag_edits(batch: pa.Table, origin: int) -> pa.Table:
    out = conform(batch, TRIPLES)
    return out.append_column(ORIGIN, pa.array([origin] * out.num_rows, pa.int32()))


def assemble_partition(df: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One subject partition: (its triples sorted, the input rows that left no triple, with
    their reason). Edits are sorted first, so that which of two equal-confidence additions wins
    does not depend on the order the shuffle delivered them in."""
    triples = df.filter(pl.col(ORIGIN) == -1).drop(ORIGIN)
    dropped = [_with_reason(df.filter(pl.col(ORIGIN) == DUPLICATE_ORIGIN), DUPLICATE_FACT)]
    for origin in sorted(o for o in df[ORIGIN].unique().to_list() if o >= 0):
        edits = df.filter(pl.col(ORIGIN) == origin).drop(ORIGIN).sort(
            [*KEY, "status", "confidence", "module", "evidence"],
            descending=[False, False, False, False, True, False, False], nulls_last=True)
        triples, gone = apply_edits_counted(triples, edits)
        dropped.append(gone)
    return (triples.sort([*KEY, "status"], nulls_last=True),
            pl.concat(dropped, how="vertical_relaxed"))


def edit_partition(batch: pa.Table) -> pa.Table:
    """One subject partition (every row of its subjects): the catalogue facts with each module's
    edits applied in flow order, sorted."""
    triples, _ = assemble_partition(pl.from_arrow(conform(batch, TRIPLES_WITH_ORIGIN)))
    return conform(triples.to_arrow(), TRIPLES)


def edit_partition_counted(batch: pa.Table) -> pa.Table:
    """`edit_partition`'s triples (`_drop` null) followed by the rows that left none (`_drop`:
    the reason), for the stage to write apart and count."""
    triples, dropped = assemble_partition(pl.from_arrow(conform(batch, TRIPLES_WITH_ORIGIN)))
    cols = [*TRIPLES.names, DROP]
    out = pl.concat([triples.with_columns(pl.lit(None, pl.String).alias(DROP)).select(cols),
                     dropped.rename({"reason": DROP}).select(cols)], how="vertical_relaxed")
    return conform(out.to_arrow(), TRIPLES_OR_DROPPED)


def written_rows(batch: pa.Table) -> pa.Table:
    return conform(batch.filter(pc.is_null(batch.column(DROP))), TRIPLES)


def dropped_rows(batch: pa.Table) -> pa.Table:
    return conform(batch.filter(pc.is_valid(batch.column(DROP))).rename_columns(
        [*TRIPLES.names, "reason"]), DROPPED)


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
    units = {"rows_in": "catalogue facts (as stated, repeats included) and module edit rows",
             "rows_out": "triples"}
    balanced = True

    def fingerprint(self, ctx: RunContext) -> str:
        self.needs = tuple(s for s in ("ingest", *MODULE_STAGES) if s in ctx.cfg.stages)
        return super().fingerprint(ctx)

    def run(self, ctx: RunContext) -> dict:
        modules = [m for m in MODULE_STAGES if m in ctx.cfg.stages]
        products_path = ctx.table_path("ingest", "products")
        n_products = count_rows(products_path)
        catalogue = runtime.read_parquet(products_path, PRODUCT_COLUMNS).map_batches(
            catalogue_triples_batch, batch_format="pyarrow")
        # one pass: facts per relation, and the facts a product states twice (ORIGIN -2)
        stated = runtime.count_by(catalogue, ["relation", ORIGIN]) if n_products else None
        before: dict[str, int] = {}
        n_stated = 0
        if stated is not None and stated.height:
            n_stated = int(stated["n"].sum())
            facts = stated.filter(pl.col(ORIGIN) == -1).group_by("relation").agg(pl.col("n").sum())
            before = {k: int(n) for k, n in facts.sort(["n", "relation"], descending=[True, False])
                      .select("relation", "n").iter_rows()}
        parts, n_edits, n_rows = [catalogue], {}, n_stated
        for order, m in enumerate(modules):
            path = ctx.table_path(m, "edits")
            if path.exists():
                n_edits[m] = count_rows(path)
                n_rows += n_edits[m]
                if n_edits[m]:
                    parts.append(runtime.read_parquet(path).map_batches(
                        tag_edits, fn_kwargs={"origin": order}, batch_format="pyarrow"))
        out, scratch = ctx.out / "triples", ctx.out / "_assembled"
        dropped: dict[str, int] = {}
        if n_rows:
            ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
            # every subject's rows in one block: hash-partitioned, or a small graph as one
            # block without a shuffle (runtime.keyed_blocks)
            ds = runtime.keyed_blocks(
                ds, ["subject"], runtime.hash_partitions(n_rows, PARTITION_MAX_ROWS,
                                                         PARTITION_MIN_ROWS), n_rows=n_rows,
                small_rows=runtime.NARROW_SMALL_ROWS)  # triples: ids, short values, evidence
            # batch_size=None: each partition whole, as GroupedData.map_groups relies on
            ds.map_batches(edit_partition_counted, batch_format="pyarrow",
                           batch_size=None).write_parquet(str(scratch))
            rows = runtime.read_parquet(scratch)
            rows.map_batches(written_rows, batch_format="pyarrow").write_parquet(str(out))
            rows.map_batches(dropped_rows, batch_format="pyarrow").write_parquet(
                str(ctx.out / "dropped"))
            if count_rows(ctx.out / "dropped"):
                dropped = _counts(runtime.read_parquet(ctx.out / "dropped", ["reason"]), "reason")
            storage.rmtree(scratch)
        ensure_shards(out, TRIPLES)
        ensure_shards(ctx.out / "dropped", DROPPED)
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
            "rows_in": n_rows,
            "rows_out": count_rows(out),
            # the input rows that left no triple of their own, by reason (rows in graph/dropped/)
            "rows_dropped": {r: dropped.get(r, 0) for r in DROP_REASONS},
            "products": n_products,
            "catalogue_facts_stated": n_stated,
            "edits": n_edits,
            "facts_before": before,
            "facts_after": after,
            "status_counts": status_counts,
            "taxonomy_rows": 0 if tax is None else tax.height,
        }
