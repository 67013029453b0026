"""The ingest stage: read every catalogue table, keep the good rows, quarantine the rest.

rows in = rows out + rows quarantined, per table, and the manifest says so.
"""
from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from autoknow_ray.catalogue.reader import find_table_files, read_table
from autoknow_ray.catalogue.validate import UNIQUE_KEYS
from autoknow_ray.pipeline import RunContext, Stage
from autoknow_ray.schema import CATALOGUE_TABLES, QUARANTINE, conform

REQUIRED_TABLES = ("products",)


def _write_shards(df: pl.DataFrame, out: Path, schema: pa.Schema, max_rows: int) -> None:
    """Shards of at most `max_rows` rows, named so their order is the table's order."""
    out.mkdir(parents=True, exist_ok=True)
    table = conform(df.to_arrow(), schema)
    step = max(1, max_rows)
    for i, start in enumerate(range(0, max(table.num_rows, 1), step)):
        pq.write_table(table.slice(start, step), out / f"part-{i:05d}.parquet",
                       row_group_size=64 * 1024)


class IngestStage(Stage):
    name = "ingest"
    config_sections = ("ingest",)

    def extra_fingerprint(self, ctx: RunContext) -> dict:
        files = {}
        for table in CATALOGUE_TABLES:
            for f, _ in find_table_files(ctx.catalogue, table):
                st = os.stat(f)
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
        tables, quarantined = {}, []
        for table, schema in CATALOGUE_TABLES.items():
            ds = read_table(ctx.catalogue, table, cfg)
            out = ctx.out / table
            if ds is None:
                _write_shards(pl.DataFrame(), out, schema, cfg.max_rows_per_file)
                tables[table] = {"rows_in": 0, "rows_out": 0, "rows_quarantined": 0}
                continue
            staging = ctx.out / f"_validated_{table}"
            ds.write_parquet(str(staging))
            rows = pl.read_parquet(str(staging / "*.parquet")) if staging.is_dir() and any(staging.glob("*.parquet")) \
                else pl.DataFrame(schema=pl.from_arrow(schema.empty_table()).schema)
            n_in = rows.height
            if n_in and "_reason" in rows.columns:
                # a stable order (file, row) so "first occurrence" means the same thing every run
                rows = rows.sort(["_source", "_row", *([UNIQUE_KEYS[table]] if table in UNIQUE_KEYS else [])], maintain_order=True)
                bad = rows.filter(pl.col("_reason").is_not_null())
                good = rows.filter(pl.col("_reason").is_null())
            else:
                bad, good = rows.head(0), rows
            key = UNIQUE_KEYS.get(table)
            if key and good.height:
                first = good.group_by(key, maintain_order=True).agg(
                    pl.col("_source").first().alias("_first_source"),
                    pl.col("_row").first().alias("_first_row"),
                )
                good = good.with_columns(pl.col(key).is_first_distinct().alias("_keep"))
                dups = good.filter(~pl.col("_keep")).join(first, on=key, how="left")
                dups = dups.with_columns(
                    (
                        pl.lit(f"duplicate {key} (first seen in ")
                        + pl.col("_first_source")
                        + pl.lit(" row ")
                        + pl.col("_first_row").cast(pl.String)
                        + pl.lit(")")
                    ).alias("_reason"),
                    pl.col(key).alias("_raw"),
                ).drop("_first_source", "_first_row", "_keep")
                good = good.filter(pl.col("_keep")).drop("_keep")
                bad = pl.concat([bad, dups], how="diagonal_relaxed")
            good_cols = [f.name for f in schema]
            _write_shards(good.select(good_cols) if good.height else pl.DataFrame(),
                          out, schema, cfg.max_rows_per_file)
            if bad.height:
                pid = pl.col("product_id") if "product_id" in bad.columns else pl.lit(None, pl.String)
                quarantined.append(
                    bad.select(
                        pl.lit(table).alias("table"),
                        pl.col("_source").alias("source"),
                        pl.col("_row").alias("row"),
                        pid.alias("product_id"),
                        pl.col("_reason").alias("reason"),
                        pl.col("_raw").alias("raw"),
                    )
                )
            if staging.is_dir():  # an empty table writes no shard (nor the folder)
                for p in staging.glob("*"):
                    p.unlink()
                staging.rmdir()
            tables[table] = {"rows_in": n_in, "rows_out": good.height, "rows_quarantined": bad.height}
            assert n_in == good.height + bad.height, f"{table}: rows lost in ingest"
        q = pl.concat(quarantined, how="diagonal_relaxed") if quarantined else pl.DataFrame()
        ctx.write("quarantine", q if q.height else QUARANTINE.empty_table(), QUARANTINE)
        reasons = (
            q.group_by(pl.col("reason").str.replace(r"\(.*", "").str.strip_chars())
            .len()
            .sort("len", descending=True)
            .rows()
            if q.height
            else []
        )
        return {
            "rows_in": sum(t["rows_in"] for t in tables.values()),
            "rows_out": sum(t["rows_out"] for t in tables.values()),
            "rows_quarantined": sum(t["rows_quarantined"] for t in tables.values()),
            "tables": tables,
            "quarantine_reasons": dict(reasons),
        }
