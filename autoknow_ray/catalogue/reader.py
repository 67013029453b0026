"""Reading a catalogue directory with Ray Data: every row validated, bad rows quarantined.

A table is `<name>.parquet|.jsonl|.json|.csv`, or a folder `<name>/` of such shards. Text formats
are read as bytes so that a broken line, a non-UTF-8 byte or a ragged CSV row becomes one
quarantine row instead of failing the file. Output rows carry `_source`, `_row` and `_reason`
(null for good rows); the ingest stage splits them and rejects duplicate ids.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa

from autoknow_ray.catalogue.validate import VALIDATORS, RowError
from autoknow_ray.config import IngestConfig
from autoknow_ray.schema import CATALOGUE_TABLES

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
META_FIELDS = [
    ("_source", pa.string()),
    ("_row", pa.int64()),
    ("_reason", pa.string()),
    ("_raw", pa.string()),
]
RAW_CHARS = 500


def find_table_files(catalogue: Path, name: str) -> list[tuple[Path, str]]:
    """The files of one table, sorted, with their format; [] when the table is absent."""
    found: list[tuple[Path, str]] = []
    for ext, fmt in FORMATS.items():
        f = catalogue / f"{name}{ext}"
        if f.is_file():
            found.append((f, fmt))
    d = catalogue / name
    if d.is_dir():
        for f in sorted(d.rglob("*")):
            fmt = FORMATS.get(f.suffix.lower())
            if f.is_file() and fmt and not f.name.startswith((".", "_")):
                found.append((f, fmt))
    return found


def validated_schema(table: str) -> pa.Schema:
    schema = CATALOGUE_TABLES[table]
    return pa.schema(list(schema) + [pa.field(n, t) for n, t in META_FIELDS])


def _validate_rows(table: str, rows, source: str, cfg: IngestConfig) -> pa.Table:
    """rows: iterable of (row_number, dict | None, raw_text, decode_error)."""
    validator = VALIDATORS[table]
    schema = CATALOGUE_TABLES[table]
    out = {f.name: [] for f in schema}
    meta = {"_source": [], "_row": [], "_reason": [], "_raw": []}
    for n, row, raw, err in rows:
        clean = None
        if err is None:
            try:
                clean = validator(row, cfg)
            except RowError as e:
                err = str(e)
            except Exception as e:  # a value of an unexpected shape: never kill the job
                err = f"unreadable value ({type(e).__name__}: {e})"
        for f in schema:
            out[f.name].append(clean[f.name] if clean else None)
        meta["_source"].append(source)
        meta["_row"].append(n)
        meta["_reason"].append(err)
        meta["_raw"].append(None if err is None else (raw or "")[:RAW_CHARS])
    arrays = [pa.array(out[f.name], type=f.type) for f in schema]
    arrays += [pa.array(meta[n], type=t) for n, t in META_FIELDS]
    return pa.Table.from_arrays(arrays, schema=validated_schema(table))


def _jsonl_rows(data: bytes):
    for n, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield n, None, line.decode("utf-8", "replace"), "non-UTF-8 bytes"
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            yield n, None, text, f"unparseable JSON ({e.msg} at char {e.pos})"
            continue
        if not isinstance(row, dict):
            yield n, None, text, f"expected a JSON object, got {type(row).__name__}"
            continue
        yield n, row, text, None


def _csv_rows(data: bytes):
    text = data.decode("utf-8", "surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    header = [h.strip().lstrip("\ufeff") for h in header]
    n = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            n += 1
            yield n, None, "", f"unparseable CSV ({e})"
            continue
        n += 1
        raw = ",".join(values)
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            yield n, None, raw, f"CSV row has {len(values)} fields, header has {len(header)}"
            continue
        row = {h: (v if v != "" else None) for h, v in zip(header, values)}
        yield n, row, raw, None


def parse_text_batch(batch: pa.Table, table: str, fmt: str, cfg: IngestConfig) -> pa.Table:
    parts = []
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        rows = _jsonl_rows(data) if fmt == "jsonl" else _csv_rows(data)
        parts.append(_validate_rows(table, rows, Path(path).name, cfg))
    if not parts:
        return validated_schema(table).empty_table()
    return pa.concat_tables(parts)


def parse_parquet_batch(batch: pa.Table, table: str, cfg: IngestConfig) -> pa.Table:
    paths = batch.column("path").to_pylist() if "path" in batch.column_names else [None] * len(batch)
    cols = [c for c in batch.column_names if c != "path"]
    rows = batch.select(cols).to_pylist()
    parts = []
    # one source per run of equal paths keeps the `_source` column exact
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or paths[i] != paths[start]:
            src = Path(paths[start]).name if paths[start] else "?"
            chunk = ((-1, r, json.dumps(r, default=str), None) for r in rows[start:i])
            parts.append(_validate_rows(table, chunk, src, cfg))
            start = i
    if not parts:
        return validated_schema(table).empty_table()
    return pa.concat_tables(parts)


def read_table(catalogue: Path, table: str, cfg: IngestConfig):
    """A Ray Dataset of validated rows (good and bad) for one table, or None when absent."""
    import ray

    files = find_table_files(catalogue, table)
    if not files:
        return None
    datasets = []
    by_fmt: dict[str, list[str]] = {}
    for f, fmt in files:
        by_fmt.setdefault(fmt, []).append(str(f))
    for fmt, paths in sorted(by_fmt.items()):
        if fmt == "parquet":
            ds = ray.data.read_parquet(paths, include_paths=True)
            ds = ds.map_batches(
                parse_parquet_batch,
                fn_kwargs={"table": table, "cfg": cfg},
                batch_format="pyarrow",
                batch_size=cfg.rows_per_block,
            )
        else:
            ds = ray.data.read_binary_files(paths, include_paths=True)
            ds = ds.map_batches(
                parse_text_batch,
                fn_kwargs={"table": table, "fmt": fmt, "cfg": cfg},
                batch_format="pyarrow",
                batch_size=1,
            )
        datasets.append(ds)
    ds = datasets[0]
    for other in datasets[1:]:
        ds = ds.union(other)
    return ds
