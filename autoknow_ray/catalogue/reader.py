"""Reading a catalogue directory with Ray Data: every row validated, bad rows quarantined.

A table is `<name>.parquet|.jsonl|.json|.csv`, or a folder `<name>/` of such shards. Text formats
are read as bytes so that a broken line, a non-UTF-8 byte or a ragged CSV row becomes one
quarantine row instead of failing the file; a leading UTF-8 byte-order mark (spreadsheet exports)
is dropped first. Parquet files are read by the workers one row group at a time, only the
table's columns, so every row keeps its number in its file. Output rows carry `_source` (the path
relative to the catalogue), `_row` and `_reason` (null for good rows); the ingest stage splits
them and rejects duplicate ids.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from autoknow_ray import storage
from autoknow_ray.catalogue.validate import VALIDATORS, RowError
from autoknow_ray.catalogue.config import IngestConfig
from autoknow_ray.schema import CATALOGUE_TABLES

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
META_FIELDS = [
    ("_source", pa.string()),
    ("_row", pa.int64()),
    ("_reason", pa.string()),
    ("_raw", pa.string()),
]
RAW_CHARS = 500
BOM = b"\xef\xbb\xbf"


def find_table_files(catalogue: Path, name: str) -> list[tuple[Path, str]]:
    """The files of one table, sorted, with their format; [] when the table is absent.
    `catalogue`: a local Path or a storage.RemotePath."""
    found: list[tuple[Path, str]] = []
    for ext, fmt in FORMATS.items():
        f = catalogue / f"{name}{ext}"
        if f.is_file():
            found.append((f, fmt))
    d = catalogue / name
    if d.is_dir():
        for f in storage.files(d):
            fmt = FORMATS.get(f.suffix.lower())
            if fmt and not f.name.startswith((".", "_")):
                found.append((f, fmt))
    return found


def validated_schema(table: str) -> pa.Schema:
    schema = CATALOGUE_TABLES[table]
    return pa.schema(list(schema) + [pa.field(n, t) for n, t in META_FIELDS])


def _validate_rows(table: str, rows, source: str, cfg: IngestConfig) -> pa.Table:
    """rows: iterable of (row_number, dict | None, raw_text, decode_error); raw_text None: the
    row's JSON, made only where the row is quarantined."""
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
        if err is not None and raw is None and row is not None:
            raw = json.dumps(row, default=str)  # a Parquet row's raw form, for its quarantine row
        meta["_raw"].append(None if err is None else (raw or "")[:RAW_CHARS])
    arrays = [pa.array(out[f.name], type=f.type) for f in schema]
    arrays += [pa.array(meta[n], type=t) for n, t in META_FIELDS]
    return pa.Table.from_arrays(arrays, schema=validated_schema(table))


def _jsonl_rows(data: bytes):
    data = data.removeprefix(BOM)
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
    text = data.removeprefix(BOM).decode("utf-8", "surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    header = [h.strip() for h in header]
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


def source_name(path: str, catalogue: str) -> str:
    """`path` relative to the catalogue (`products/part-0.parquet`), so two shards of the same
    name in different folders stay apart in the quarantine."""
    if storage.is_uri(catalogue):
        # Ray Data names an object-store file without its scheme (`bucket/key`)
        root = catalogue.split("://", 1)[1].rstrip("/") + "/"
        key = path.split("://", 1)[-1]
        return key[len(root):] if key.startswith(root) else key.rsplit("/", 1)[-1]
    p = Path(path)
    try:
        return p.resolve().relative_to(Path(catalogue).resolve()).as_posix()
    except ValueError:
        return p.name


def parse_text_batch(batch: pa.Table, table: str, fmt: str, cfg: IngestConfig,
                     catalogue: str) -> pa.Table:
    parts = []
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        rows = _jsonl_rows(data) if fmt == "jsonl" else _csv_rows(data)
        parts.append(_validate_rows(table, rows, source_name(path, catalogue), cfg))
    if not parts:
        return validated_schema(table).empty_table()
    return pa.concat_tables(parts)


def parquet_units(files: list[str], table: str) -> list[dict]:
    """One unit of work per row group of every Parquet file (footers only, no rows): the file,
    the row group, the number of its first row in the file, and the table's columns it has."""
    wanted = CATALOGUE_TABLES[table].names
    units = []
    for f in files:
        meta = pq.ParquetFile(str(f)).metadata
        have = set(meta.schema.to_arrow_schema().names)
        columns = [c for c in wanted if c in have]
        first = 0
        for rg in range(meta.num_row_groups):
            units.append({"path": str(f), "row_group": rg, "first_row": first,
                          "columns": columns})
            first += meta.row_group(rg).num_rows
    return units


def parse_parquet_units(batch: pa.Table, table: str, cfg: IngestConfig, catalogue: str):
    """Read and validate the row groups named in `batch`, in blocks of `cfg.rows_per_block`."""
    for unit in batch.to_pylist():
        pf = pq.ParquetFile(unit["path"])
        src = source_name(unit["path"], catalogue)
        n = unit["first_row"]
        for rb in pf.iter_batches(batch_size=cfg.rows_per_block, row_groups=[unit["row_group"]],
                                  columns=unit["columns"]):
            rows = rb.to_pylist()
            # raw None: its JSON form is written only where the row is quarantined
            numbered = ((n + i, r, None, None) for i, r in enumerate(rows))
            yield _validate_rows(table, numbered, src, cfg)
            n += len(rows)


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
    kwargs = {"table": table, "cfg": cfg, "catalogue": str(catalogue)}
    for fmt, paths in sorted(by_fmt.items()):
        if fmt == "parquet":
            units = parquet_units(paths, table)
            if not units:
                continue
            ds = ray.data.from_items(units, override_num_blocks=len(units))
            ds = ds.map_batches(parse_parquet_units, fn_kwargs=kwargs, batch_format="pyarrow",
                                batch_size=1)
        else:
            ds = ray.data.read_binary_files(paths, include_paths=True)
            ds = ds.map_batches(parse_text_batch, fn_kwargs={**kwargs, "fmt": fmt},
                                batch_format="pyarrow", batch_size=1)
        datasets.append(ds)
    if not datasets:
        return None
    ds = datasets[0]
    for other in datasets[1:]:
        ds = ds.union(other)
    return ds
