"""The ingest stage: read every catalogue table, keep the good rows, quarantine the rest.

Per-product tables never reach the driver. For each table the workers read and validate the rows
(`reader.read_table`) and write them to a staging folder; rows in are counted from its footers
(what Ray read). Then, still in the workers: products are hash-partitioned by `product_id` so
every id's rows meet in one partition, where the first occurrence by (`_source`, `_row`) is kept
and the others are quarantined as duplicates; rows of texts, behaviour and co-purchases that name
a product the catalogue lacks are found with a hash join against the kept ids and quarantined as
"unknown product_id". A table below `ingest.single_task_rows` (with the product ids it is checked
against) gets the same work from one Ray task instead: the shuffles' fixed cost would dominate. The good rows go to `ingest/<table>/`, the rejected ones to
`ingest/quarantine/<table>/`, both folders of Parquet shards written by the workers, and
rows in = rows out + rows quarantined is checked per table from the written files.

The taxonomy is small (types, not products): it is read to the driver, and a cycle in it
(A → B → C → A) is broken by rejecting the row that closes it, in file order.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from autoknow_ray import runtime, storage
from autoknow_ray.catalogue.reader import find_table_files, read_table, validated_schema
from autoknow_ray.catalogue.validate import UNIQUE_KEYS
from autoknow_ray.pipeline import BalanceError, RunContext, Stage, count_rows, ensure_shards
from autoknow_ray.pipeline import check_balance as pipeline_check_balance
from autoknow_ray.schema import CATALOGUE_TABLES, QUARANTINE, conform

REQUIRED_TABLES = ("products",)
# the columns of each table that name a product of the catalogue
PRODUCT_REFERENCES = {"texts": ("product_id",), "behavior": ("product_id",),
                      "copurchase": ("src", "dst")}
UNKNOWN_PRODUCT = "unknown product_id"
CYCLE = "taxonomy cycle"


class IngestBalanceError(BalanceError):
    """Rows went missing (or appeared) between reading a table and writing it out."""


def check_balance(table: str, rows_in: int, rows_out: int, rows_quarantined: int) -> None:
    pipeline_check_balance(f"ingest of table {table!r}", rows_in, rows_out, rows_quarantined,
                           error=IngestBalanceError)


# ---- per-partition work (runs in the workers) ------------------------------------------------
def row_as_json(columns: list[str], table: str) -> pl.Expr:
    """Each row's catalogue columns as one JSON object (what a quarantined row keeps of itself)."""
    return pl.struct([c for c in CATALOGUE_TABLES[table].names if c in columns]).struct.json_encode()


def first_occurrence(batch: pa.Table, table: str, key: str) -> pa.Table:
    """One hash partition, holding every row of each of its keys: the first good row of a key by
    (`_source`, `_row`) stays good, later ones get a "duplicate" reason naming the first."""
    df = pl.from_arrow(batch)
    good = df.filter(pl.col("_reason").is_null()).sort(["_source", "_row"])
    bad = df.filter(pl.col("_reason").is_not_null())
    first = good.group_by(key, maintain_order=True).agg(
        pl.col("_source").first().alias("_first_source"), pl.col("_row").first().alias("_first_row"))
    keep = pl.col(key).is_first_distinct()
    dups = good.filter(~keep).join(first, on=key, how="left").with_columns(
        (pl.lit(f"duplicate {key} (first seen in ") + pl.col("_first_source") + pl.lit(" row ")
         + pl.col("_first_row").cast(pl.String) + pl.lit(")")).alias("_reason"),
        row_as_json(good.columns, table).alias("_raw"),
    ).drop("_first_source", "_first_row")
    out = pl.concat([good.filter(keep), dups, bad], how="diagonal_relaxed")
    return conform(out.to_arrow(), validated_schema(table))


def mark_unknown(batch: pa.Table, column: str, label: str) -> pa.Table:
    """After a left join against the catalogue's ids: a good row whose `column` found no product
    is rejected as naming an unknown product."""
    batch = batch.cast(pa.schema([  # the join hands strings back as large_string
        pa.field(f.name, pa.string()) if f.type == pa.large_string() else f for f in batch.schema]))
    unknown = pc.and_(pc.is_null(batch.column("_known")), pc.is_null(batch.column("_reason")))
    reason = pc.if_else(unknown, pa.scalar(label), batch.column("_reason"))
    raw = pc.if_else(unknown, pc.binary_join_element_wise(pa.scalar(f"{column}="),
                                                          batch.column(column), ""),
                     batch.column("_raw"))
    out = batch.drop_columns(["_known"])
    out = out.set_column(out.schema.get_field_index("_reason"), "_reason", reason)
    return out.set_column(out.schema.get_field_index("_raw"), "_raw", raw)


def known_ids(batch: pa.Table, column: str) -> pa.Table:
    return pa.table({column: batch.column("product_id"),
                     "_known": pa.array([True] * batch.num_rows, pa.bool_())})


def good_rows(batch: pa.Table, table: str) -> pa.Table:
    return conform(batch.filter(pc.is_null(batch.column("_reason"))), CATALOGUE_TABLES[table])


def quarantine_rows(batch: pa.Table, table: str) -> pa.Table:
    bad = batch.filter(pc.is_valid(batch.column("_reason")))
    n = bad.num_rows
    pid = bad.column("product_id") if "product_id" in bad.column_names else pa.nulls(n, pa.string())
    return conform(pa.table({"table": pa.array([table] * n, pa.string()),
                             "source": bad.column("_source"), "row": bad.column("_row"),
                             "product_id": pid, "reason": bad.column("_reason"),
                             "raw": bad.column("_raw")}), QUARANTINE)


def reason_kinds(batch: pa.Table) -> pa.Table:
    """The reason without its row-specific details in parentheses, for the per-reason counts."""
    kind = pc.utf8_trim_whitespace(pc.replace_substring_regex(batch.column("reason"), pattern=r"\(.*",
                                                        replacement=""))
    return pa.table({"table": batch.column("table"), "kind": kind})


# ---- the taxonomy (small: on the driver) -----------------------------------------------------
def break_cycles(rows: pl.DataFrame) -> pl.DataFrame:
    """Validated taxonomy rows in file order: a good `type → parent` row that would close a cycle
    through the rows kept before it gets a "taxonomy cycle" reason naming the cycle."""
    parents: dict[str, set[str]] = {}

    def path_up(start: str, target: str) -> list[str] | None:
        """A parent chain from `start` to `target` through the kept rows, or None."""
        seen, stack = {start}, [(start, [start])]
        while stack:
            node, path = stack.pop()
            if node == target:
                return path
            for p in sorted(parents.get(node, ()), reverse=True):
                if p not in seen:
                    seen.add(p)
                    stack.append((p, path + [p]))
        return None

    reasons, raws = [], []
    for t, p, reason, raw in rows.select("type", "parent", "_reason", "_raw").iter_rows():
        if reason is None and p is not None:
            cycle = path_up(p, t)
            if cycle is not None:
                reason, raw = f"{CYCLE} ({' → '.join([t, *cycle])}): this row closes it", f"{t} → {p}"
            else:
                parents.setdefault(t, set()).add(p)
        reasons.append(reason)
        raws.append(raw)
    return rows.with_columns(pl.Series("_reason", reasons, pl.String),
                             pl.Series("_raw", raws, pl.String))


def _ingest_taxonomy(ds, out: Path, quarantine: Path) -> dict:
    import ray

    parts = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    rows = pl.from_arrow(pa.concat_tables(parts)) if parts else pl.from_arrow(
        validated_schema("taxonomy").empty_table())
    rows = break_cycles(rows.sort(["_source", "_row"], maintain_order=True))
    table = conform(rows.to_arrow(), validated_schema("taxonomy"))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(good_rows(table, "taxonomy"), str(out / "part-00000.parquet"))
    bad = quarantine_rows(table, "taxonomy")
    if bad.num_rows:
        quarantine.mkdir(parents=True, exist_ok=True)
        pq.write_table(bad, str(quarantine / "part-00000.parquet"))
    return {"rows_in": rows.height,
            "taxonomy_cycles_broken": int(rows["_reason"].str.starts_with(CYCLE).sum())}


# ---- the per-product tables (in the workers) -------------------------------------------------
def _checked(ctx: RunContext, table: str, validated: Path, n_in: int, products: Path):
    """The validated rows of `table` with duplicate and unknown-product reasons added."""
    cfg = ctx.cfg.ingest
    ds = runtime.read_parquet(validated)
    parts = runtime.hash_partitions(n_in, cfg.max_rows_per_file, cfg.rows_per_block)
    key = UNIQUE_KEYS.get(table)
    if key:
        # every row of a key in one partition; batch_size=None hands each partition over whole
        # (the same guarantee GroupedData.map_groups relies on)
        ds = ds.repartition(parts, keys=[key]).map_batches(
            first_occurrence, fn_kwargs={"table": table, "key": key}, batch_format="pyarrow",
            batch_size=None)
    for column in PRODUCT_REFERENCES.get(table, ()):
        ids = runtime.read_parquet(products, ["product_id"]).map_batches(
            known_ids, fn_kwargs={"column": column}, batch_format="pyarrow")
        label = UNKNOWN_PRODUCT if column == "product_id" else f"{UNKNOWN_PRODUCT} ({column})"
        ds = ds.join(ids, "left_outer", parts, on=(column,)).map_batches(
            mark_unknown, fn_kwargs={"column": column, "label": label}, batch_format="pyarrow")
    return ds


def check_in_one_task(validated: str, table: str, products: str, out: str,
                      quarantine: str) -> None:
    """What `_checked` and the two writes do, for a table small enough to be one partition:
    every row of a key is in it, so the first occurrence is kept exactly as the shuffle keeps it,
    and the product ids are a set instead of a join. Runs as one Ray task."""
    files = sorted(storage.path(validated).rglob("*.parquet"))
    schema = validated_schema(table)
    batch = pa.concat_tables([conform(pq.read_table(str(f)), schema) for f in files])
    key = UNIQUE_KEYS.get(table)
    if key:
        batch = first_occurrence(batch, table, key)
    for column in PRODUCT_REFERENCES.get(table, ()):
        ids = pa.concat_tables([pq.read_table(str(f), columns=["product_id"])
                                for f in sorted(storage.path(products).rglob("*.parquet"))])
        known = pc.is_in(batch.column(column), value_set=pc.unique(ids.column("product_id")))
        label = UNKNOWN_PRODUCT if column == "product_id" else f"{UNKNOWN_PRODUCT} ({column})"
        batch = mark_unknown(batch.append_column("_known", pc.if_else(known, True, None)),
                             column, label)
    for folder, rows in ((out, good_rows(batch, table)), (quarantine, quarantine_rows(batch, table))):
        if rows.num_rows:
            storage.path(folder).mkdir(parents=True, exist_ok=True)
            pq.write_table(rows, str(storage.path(folder) / "part-00000.parquet"))


def count_reasons_in_one_task(quarantine: str) -> dict[tuple[str, str], int]:
    files = sorted(storage.path(quarantine).rglob("*.parquet"))
    kinds = pl.from_arrow(reason_kinds(pa.concat_tables(
        [pq.read_table(str(f), columns=["table", "reason"]) for f in files])))
    return {(t, k): int(n) for t, k, n in kinds.group_by("table", "kind").len().iter_rows()}


def _one_task_fits(ctx: RunContext, validated: Path, n_in: int, table: str) -> bool:
    cfg = ctx.cfg.ingest
    size = sum(f.stat().st_size for f in validated.rglob("*.parquet"))
    n_ids = count_rows(ctx.out / "products") if table in PRODUCT_REFERENCES else 0
    return max(n_in, n_ids) <= cfg.single_task_rows and size <= cfg.single_task_bytes


def _ingest_table(ctx: RunContext, table: str, ds, staging: Path) -> dict:
    """Validate → stage → de-duplicate / check references → good rows and quarantine, all
    written by the workers; returns the counts, checked for balance by the caller."""
    import ray

    out, quarantine = ctx.out / table, ctx.out / "quarantine" / table
    validated, checked = staging / f"{table}-validated", staging / f"{table}-checked"
    ds.write_parquet(str(validated))
    n_in = count_rows(validated)
    if n_in and _one_task_fits(ctx, validated, n_in, table):
        task = ray.remote(num_cpus=0.5, max_retries=3)(check_in_one_task)
        ray.get(task.remote(str(validated), table, str(ctx.out / "products"), str(out),
                            str(quarantine)))
    elif n_in:
        _checked(ctx, table, validated, n_in, ctx.out / "products").write_parquet(str(checked))
        rows = runtime.read_parquet(checked)
        rows.map_batches(good_rows, fn_kwargs={"table": table},
                         batch_format="pyarrow").write_parquet(str(out))
        rows.map_batches(quarantine_rows, fn_kwargs={"table": table},
                         batch_format="pyarrow").write_parquet(str(quarantine))
    return {"rows_in": n_in}


class IngestStage(Stage):
    name = "ingest"
    config_sections = ("ingest",)
    # every table's rows, summed; each table balances on its own (`tables`), checked in run()
    units = {"rows_in": "catalogue rows (every table)", "rows_out": "catalogue rows kept",
             "rows_quarantined": "catalogue rows quarantined"}
    balanced = True

    def extra_fingerprint(self, ctx: RunContext) -> dict:
        files = {}
        for table in CATALOGUE_TABLES:
            for f, _ in find_table_files(ctx.catalogue, table):
                st = f.stat()
                files[str(f.relative_to(ctx.catalogue))] = [st.st_size, st.st_mtime_ns]
        return {"catalogue": str(ctx.catalogue.resolve()), "files": files}

    def run(self, ctx: RunContext) -> dict:
        cfg = ctx.cfg.ingest
        for t in REQUIRED_TABLES:
            if not find_table_files(ctx.catalogue, t):
                raise FileNotFoundError(
                    f"{ctx.catalogue}: no {t} table (expected {t}.parquet, {t}.jsonl, {t}.csv "
                    f"or a folder {t}/ of such files)"
                )
        staging = ctx.out / "_staging"
        tables: dict[str, dict] = {}
        # products first: the other tables' product references are checked against its ids
        for table, schema in CATALOGUE_TABLES.items():
            ds = read_table(ctx.catalogue, table, cfg)
            counts = {"rows_in": 0}
            if ds is not None and table == "taxonomy":
                counts = _ingest_taxonomy(ds, ctx.out / table, ctx.out / "quarantine" / table)
            elif ds is not None:
                counts = _ingest_table(ctx, table, ds, staging)
            ensure_shards(ctx.out / table, schema)
            counts["rows_out"] = count_rows(ctx.out / table)
            counts["rows_quarantined"] = count_rows(ctx.out / "quarantine" / table)
            check_balance(table, counts["rows_in"], counts["rows_out"], counts["rows_quarantined"])
            tables[table] = counts
        storage.rmtree(staging)
        ensure_shards(ctx.out / "quarantine", QUARANTINE)
        reasons = self._reasons(ctx.out / "quarantine", cfg.single_task_rows)
        for table, counts in tables.items():
            if table in PRODUCT_REFERENCES:
                counts["unknown_product"] = sum(
                    n for (t, kind), n in reasons.items() if t == table and kind == UNKNOWN_PRODUCT)
        by_kind: dict[str, int] = {}
        for (_t, kind), n in reasons.items():
            by_kind[kind] = by_kind.get(kind, 0) + n
        return {
            "rows_in": sum(t["rows_in"] for t in tables.values()),
            "rows_out": sum(t["rows_out"] for t in tables.values()),
            "rows_quarantined": sum(t["rows_quarantined"] for t in tables.values()),
            "tables": tables,
            "quarantine_reasons": dict(sorted(by_kind.items(), key=lambda kv: (-kv[1], kv[0]))),
        }

    @staticmethod
    def _reasons(quarantine: Path, single_task_rows: int = 0) -> dict[tuple[str, str], int]:
        """Quarantined rows per (table, reason kind): an aggregate, one row per kind."""
        n = count_rows(quarantine)
        if not n:
            return {}
        if n <= single_task_rows:
            import ray

            return ray.get(ray.remote(num_cpus=0.5)(count_reasons_in_one_task).remote(str(quarantine)))
        ds = runtime.read_parquet(quarantine, ["table", "reason"]).map_batches(
            reason_kinds, batch_format="pyarrow")
        agg = runtime.count_by(ds, ["table", "kind"])
        return {(t, k): int(n) for t, k, n in agg.select("table", "kind", "n").iter_rows()}
