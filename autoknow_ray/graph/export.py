"""`autoknow export`: a run's graph as N-Triples (RDF) or as Neo4j `neo4j-admin database import` CSVs.

Every table is streamed batch by batch (pyarrow.dataset over a Parquet file or a folder of
shards), so memory stays bounded whatever the graph's size: nothing per product is collected.
The vocabulary is documented in docs/rdf-vocabulary.md. Only live facts are exported (a `removed`
triple is history, kept in the Parquet graph). Neo4j value nodes are written once per batch in
which they occur, so the import runs with `--skip-duplicate-nodes=true` (docs/rdf-vocabulary.md
gives the full command).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads

from autoknow_ray import storage
from autoknow_ray.pipeline import table_file
from autoknow_ray.schema import GRAPH_TABLES, HAS_TYPE

BASE = "urn:autoknow:"
VOCAB = BASE + "vocab:"
RDF_TYPE = "http://www.w3.org/1999/02/22-rdf-syntax-ns#type"
RDFS_LABEL = "http://www.w3.org/2000/01/rdf-schema#label"
RDFS_SUBCLASS = "http://www.w3.org/2000/01/rdf-schema#subClassOf"
XSD = "http://www.w3.org/2001/XMLSchema#"
BATCH_ROWS = 65_536
FORMATS = ("nt", "neo4j")


# ---- reading a table of the run without holding it ------------------------------------------
def table_dataset(path: Path, schema: pa.Schema | None = None) -> pads.Dataset | None:
    """A Parquet file or a folder of Parquet shards as a pyarrow dataset (None when absent or
    empty). `schema` unifies shards written with slightly different types (a null column).
    Its `files` are paths in its `filesystem` (for an object store: without the scheme)."""
    path = storage.path(path)
    if path.is_dir():
        fs, files = storage.dataset_files(sorted(path.rglob("*.parquet")))
    elif path.exists():
        fs, files = storage.dataset_files([path])
    else:
        files = []
    if not files:
        return None
    return pads.dataset(files, format="parquet", schema=schema, filesystem=fs)


def scan_batches(path: Path, columns: list[str] | None = None, filter=None,
                 schema: pa.Schema | None = None,
                 batch_rows: int | None = None) -> Iterator[pa.RecordBatch]:
    """The rows of a table, one bounded batch at a time (nothing when the table is absent)."""
    ds = table_dataset(path, schema)
    if ds is None:
        return
    # one file, one row group at a time: with threads or read-ahead the scanner decodes several
    # row groups ahead and memory grows with the shard size (measured: 126 MiB instead of 41 for
    # 500k-row shards), which a graph written by many workers does not bound
    no_read_ahead = pads.ParquetFragmentScanOptions(pre_buffer=False)
    for batch in ds.to_batches(columns=columns, filter=filter, batch_size=batch_rows or BATCH_ROWS,
                               fragment_scan_options=no_read_ahead, batch_readahead=0,
                               fragment_readahead=0, use_threads=False):
        if batch.num_rows:
            yield batch


def graph_table(run: Path, name: str) -> Path:
    return table_file(storage.path(run) / "graph", name)


def _live_filter():
    return pc.field("status") != "removed"


# ---- N-Triples ------------------------------------------------------------------------------
_ECHAR = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b",
          "\f": "\\f"}
_NEEDS_ESCAPE = re.compile(r'[\\"\x00-\x1f\x7f]')


def _escape_char(m: re.Match) -> str:
    c = m.group(0)
    return _ECHAR.get(c) or f"\\u{ord(c):04X}"


def nt_literal(text: str, datatype: str | None = None) -> str:
    """A literal per the N-Triples grammar: `\\`, `"`, newlines and tabs as ECHAR, other control
    characters as UCHAR; everything else (any Unicode) as itself, the file being UTF-8."""
    body = _NEEDS_ESCAPE.sub(_escape_char, text)
    return f'"{body}"' + (f"^^<{datatype}>" if datatype else "")


def iri(kind: str, *names: str) -> str:
    """`<urn:autoknow:KIND:NAME>`; each name percent-encoded (UTF-8), several joined by `/`."""
    return "<" + BASE + kind + ":" + "/".join(quote(n, safe="") for n in names) + ">"


def _v(term: str) -> str:
    return f"<{VOCAB}{term}>"


_XSD_SPECIAL = {"inf": "INF", "-inf": "-INF", "nan": "NaN"}


def _num(x, datatype: str) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return nt_literal(_XSD_SPECIAL[str(x)], XSD + datatype)
    return nt_literal(repr(x) if isinstance(x, float) else str(x), XSD + datatype)


def _bool(x: bool) -> str:
    return nt_literal("true" if x else "false", XSD + "boolean")


def _rows(batch: pa.RecordBatch, cols: list[str]):
    return zip(*(batch.column(c).to_pylist() for c in cols))


# Vectorised forms of `iri` and `nt_literal` for the per-product tables: Arrow string kernels
# do the common case, Python the rare names and texts that need percent-encoding or \\uXXXX.
_IRI_SAFE = r"^[A-Za-z0-9._~-]*$"  # exactly what quote(safe="") leaves as it is
_RARE_CONTROL = "[\\x00-\\x07\\x0b\\x0e-\\x1f\\x7f]"  # control characters without a short escape
_LITERAL_ESCAPES = (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"),
                    ("\b", "\\b"), ("\f", "\\f"))


def _patch(column: pa.Array, needs_python: pa.Array, fn) -> pa.Array:
    """`column` with the rows flagged in `needs_python` replaced by fn(original value)."""
    if not pc.any(needs_python).as_py():
        return column
    idx = pc.indices_nonzero(needs_python)
    fixed = pa.array([fn(x) for x in column.take(idx).to_pylist()], pa.string())
    return pc.replace_with_mask(column, needs_python, fixed)


def iri_column(kind: str, names: pa.Array) -> pa.Array:
    """`iri(kind, name)` for every name of a column."""
    names = pa.concat_arrays(names.chunks) if isinstance(names, pa.ChunkedArray) else names
    encoded = _patch(names, pc.invert(pc.match_substring_regex(names, _IRI_SAFE)),
                     lambda x: quote(x, safe=""))
    return pc.binary_join_element_wise(f"<{BASE}{kind}:", encoded, ">", "")


def literal_column(texts: pa.Array) -> pa.Array:
    """`nt_literal(text)` for every text of a column."""
    texts = pa.concat_arrays(texts.chunks) if isinstance(texts, pa.ChunkedArray) else texts
    rare = pc.match_substring_regex(texts, _RARE_CONTROL)
    escaped = texts
    for plain, esc in _LITERAL_ESCAPES:
        escaped = pc.replace_substring(escaped, plain, esc)
    quoted = pc.binary_join_element_wise('"', escaped, '"', "")
    return pc.if_else(rare, _patch(texts, rare, nt_literal), quoted)


def _statements(*columns) -> str:
    """One N-Triples line per row from subject, predicate and object columns (or strings)."""
    return "\n".join(pc.binary_join_element_wise(*columns, ".", " ").to_pylist())


def _nt_products(run: Path) -> Iterator[str]:
    valid = pc.field("product_id").is_valid()
    for b in scan_batches(table_file(Path(run) / "ingest", "products"), ["product_id", "title"], valid):
        s = iri_column("product", b.column("product_id"))
        yield _statements(s, f"<{RDF_TYPE}>", _v("Product"))
        titled = pc.is_valid(b.column("title"))
        yield _statements(s.filter(titled), f"<{RDFS_LABEL}>",
                          literal_column(b.column("title").filter(titled)))


def _nt_triples(run: Path) -> Iterator[str]:
    cols = ["subject", "relation", "object"]
    complete = (_live_filter() & pc.field("subject").is_valid() & pc.field("relation").is_valid()
                & pc.field("object").is_valid())
    for b in scan_batches(graph_table(run, "triples"), cols, complete, GRAPH_TABLES["triples"]):
        is_type = pc.equal(b.column("relation"), HAS_TYPE)
        typed, valued = b.filter(is_type), b.filter(pc.invert(is_type))
        yield _statements(iri_column("product", typed.column("subject")), _v("hasType"),
                          iri_column("type", typed.column("object")))
        yield _statements(iri_column("product", valued.column("subject")),
                          iri_column("attribute", valued.column("relation")),
                          literal_column(valued.column("object")))


def _nt_taxonomy(run: Path) -> Iterator[str]:
    cols = ["type", "parent", "is_new", "confidence"]
    for b in scan_batches(graph_table(run, "taxonomy"), cols, None, GRAPH_TABLES["taxonomy"]):
        lines = []
        for t, parent, is_new, _conf in _rows(b, cols):
            if t is None:
                continue
            s = iri("type", t)
            lines += [f"{s} <{RDF_TYPE}> {_v('ProductType')} .", f"{s} <{RDFS_LABEL}> {nt_literal(t)} ."]
            if is_new:
                lines.append(f"{s} {_v('isNew')} {_bool(True)} .")
            if parent is not None:
                lines.append(f"{s} <{RDFS_SUBCLASS}> {iri('type', parent)} .")
        yield "\n".join(lines)


def _nt_attributes(run: Path) -> Iterator[str]:
    cols = ["type", "attribute", "applicability", "applicable", "importance", "rank"]
    for b in scan_batches(graph_table(run, "attributes"), cols, None, GRAPH_TABLES["attributes"]):
        lines = []
        for t, a, appl, applicable, imp, rank in _rows(b, cols):
            if t is None or a is None:
                continue
            node = iri("typeAttribute", t, a)
            lines += [f"{node} <{RDF_TYPE}> {_v('TypeAttribute')} .",
                      f"{node} {_v('ofType')} {iri('type', t)} .",
                      f"{node} {_v('attribute')} {iri('attribute', a)} .",
                      f"{iri('attribute', a)} <{RDFS_LABEL}> {nt_literal(a)} ."]
            if appl is not None:
                lines.append(f"{node} {_v('applicability')} {_num(float(appl), 'double')} .")
            if applicable is not None:
                lines.append(f"{node} {_v('applicable')} {_bool(applicable)} .")
            if imp is not None:
                lines.append(f"{node} {_v('importance')} {_num(float(imp), 'double')} .")
            if rank is not None:
                lines.append(f"{node} {_v('importanceRank')} {_num(int(rank), 'integer')} .")
        yield "\n".join(lines)


def _nt_synonyms(run: Path) -> Iterator[str]:
    cols = ["kind", "attribute", "term", "canonical", "score"]
    for b in scan_batches(graph_table(run, "synonyms"), cols, None, GRAPH_TABLES["synonyms"]):
        lines = []
        for kind, a, term, canon, _score in _rows(b, cols):
            if term is None or canon is None:
                continue
            if kind == "type":
                lines.append(f"{iri('type', term)} {_v('synonymOf')} {iri('type', canon)} .")
            else:
                t, c = iri("value", a or "", term), iri("value", a or "", canon)
                lines += [f"{t} {_v('synonymOf')} {c} .",
                          f"{t} <{RDFS_LABEL}> {nt_literal(term)} .",
                          f"{c} <{RDFS_LABEL}> {nt_literal(canon)} ."]
                if a is not None:
                    lines += [f"{t} {_v('attribute')} {iri('attribute', a)} .",
                              f"{c} {_v('attribute')} {iri('attribute', a)} ."]
        yield "\n".join(lines)


def _nt_related(run: Path) -> Iterator[str]:
    both = pc.field("product_id").is_valid() & pc.field("related_id").is_valid()
    for b in scan_batches(graph_table(run, "related"), ["product_id", "related_id"], both,
                          GRAPH_TABLES["related"]):
        yield _statements(iri_column("product", b.column("product_id")), _v("relatedTo"),
                          iri_column("product", b.column("related_id")))


NT_PARTS: dict[str, Callable[[Path], Iterator[str]]] = {
    "products": _nt_products, "triples": _nt_triples, "taxonomy": _nt_taxonomy,
    "attributes": _nt_attributes, "synonyms": _nt_synonyms, "related": _nt_related,
}


def export_ntriples(run: Path, out: Path) -> dict:
    """One `graph.nt` (UTF-8 N-Triples); returns the statements written per part."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "graph.nt"
    counts = {}
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for part, gen in NT_PARTS.items():
            n = 0
            for chunk in gen(run):
                if chunk:
                    f.write(chunk)
                    f.write("\n")
                    n += chunk.count("\n") + 1
            counts[part] = n
    return {"format": "nt", "files": [str(path)], "statements": counts}


# ---- Neo4j bulk import CSVs ------------------------------------------------------------------


def _csv_field(x) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "true" if x else "false"
    s = repr(x) if isinstance(x, float) else str(x)
    if any(c in s for c in ',"\n\r') or s != s.strip():
        return '"' + s.replace('"', '""') + '"'
    return s


_ARROW_CSV = pacsv.WriteOptions(include_header=False, quoting_style="needed")


class _CsvFile:
    def __init__(self, path: Path, header: list[str]):
        self.path = path
        self.f = path.open("wb")
        self.f.write((",".join(header) + "\n").encode())
        self.rows = 0

    def write(self, rows) -> None:
        """Rows of Python values (the small per-type tables)."""
        lines = [",".join(_csv_field(x) for x in r) for r in rows]
        if lines:
            self.f.write(("\n".join(lines) + "\n").encode("utf-8"))
            self.rows += len(lines)

    def write_table(self, table: pa.Table) -> None:
        """A batch of a per-product table, written by Arrow's CSV writer (quoted as needed)."""
        if table.num_rows:
            pacsv.write_csv(table, self.f, write_options=_ARROW_CSV)
            self.rows += table.num_rows

    def close(self) -> None:
        self.f.close()


NEO4J_FILES = {
    # nodes
    "products": ["productId:ID(Product)", "title", ":LABEL"],
    "types": ["name:ID(Type)", "isNew:boolean", ":LABEL"],
    "attributes": ["name:ID(Attribute)", ":LABEL"],
    "values": [":ID(Value)", "attribute", "value", ":LABEL"],
    # relationships
    "has_type": [":START_ID(Product)", ":END_ID(Type)", "confidence:float", "module", "status",
                 "evidence", ":TYPE"],
    "has_value": [":START_ID(Product)", ":END_ID(Value)", "attribute", "confidence:float",
                  "module", "status", "evidence", ":TYPE"],
    "subtype_of": [":START_ID(Type)", ":END_ID(Type)", "confidence:float", ":TYPE"],
    "has_attribute": [":START_ID(Type)", ":END_ID(Attribute)", "applicability:float",
                      "applicable:boolean", "importance:float", "rank:int", ":TYPE"],
    "type_synonym_of": [":START_ID(Type)", ":END_ID(Type)", "score:float", ":TYPE"],
    "value_synonym_of": [":START_ID(Value)", ":END_ID(Value)", "score:float", ":TYPE"],
    "related_to": [":START_ID(Product)", ":END_ID(Product)", "rank:int", "score:float", ":TYPE"],
}
NODE_FILES = ("products", "types", "attributes", "values")


def _with_label(batch, label: str) -> pa.Table:
    """The batch's columns then a constant `:LABEL` / `:TYPE` column."""
    t = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    return t.append_column("_label", pa.array([label] * t.num_rows, pa.string()))


def _value_ids(attributes: pa.ChunkedArray, values: pa.ChunkedArray) -> pa.ChunkedArray:
    """`value_id` for a whole column: the few distinct attributes are encoded once each."""
    distinct = pc.unique(attributes)
    encoded = pa.array([quote(a, safe=" ") for a in distinct.to_pylist()], pa.string())
    prefix = encoded.take(pc.index_in(attributes, value_set=distinct))
    return pc.binary_join_element_wise(prefix, values, "=")


def value_id(attribute: str, value: str) -> str:
    """`Flavor=smoky bbq`: a value node is per attribute; the attribute is percent-encoded
    (spaces kept) so the first `=` always ends it."""
    return f"{quote(attribute, safe=' ')}={value}"


def export_neo4j(run: Path, out: Path) -> dict:
    """Node and relationship CSVs for `neo4j-admin database import full` (command in
    docs/rdf-vocabulary.md). Types and attributes are per-type figures, deduplicated in memory;
    value nodes are deduplicated per batch (the import skips the rest)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {name: _CsvFile(out / f"{name}.csv", header) for name, header in NEO4J_FILES.items()}
    types: dict[str, bool] = {}  # per-type: small next to the products
    attributes: set[str] = set()
    try:
        for b in scan_batches(table_file(Path(run) / "ingest", "products"), ["product_id", "title"],
                              pc.field("product_id").is_valid()):
            files["products"].write_table(_with_label(b, "Product"))
        cols = ["type", "parent", "is_new", "confidence"]
        for b in scan_batches(graph_table(run, "taxonomy"), cols, None, GRAPH_TABLES["taxonomy"]):
            rows = []
            for t, parent, is_new, conf in _rows(b, cols):
                if t is None:
                    continue
                types[t] = types.get(t, False) or bool(is_new)
                if parent is not None:
                    types.setdefault(parent, False)
                    rows.append((t, parent, conf, "SUBTYPE_OF"))
            files["subtype_of"].write(rows)
        cols = ["subject", "relation", "object", "confidence", "module", "status", "evidence"]
        complete = (_live_filter() & pc.field("subject").is_valid() & pc.field("relation").is_valid()
                    & pc.field("object").is_valid())
        for b in scan_batches(graph_table(run, "triples"), cols, complete, GRAPH_TABLES["triples"]):
            t = pa.Table.from_batches([b])
            is_type = pc.equal(t["relation"], HAS_TYPE)
            typed = t.filter(is_type)
            for name in pc.unique(typed["object"]).to_pylist():  # per-type: a handful per batch
                types.setdefault(name, False)
            files["has_type"].write_table(_with_label(typed.select(
                ["subject", "object", "confidence", "module", "status", "evidence"]), "HAS_TYPE"))
            valued = t.filter(pc.invert(is_type))
            vid = _value_ids(valued["relation"], valued["object"])
            files["has_value"].write_table(_with_label(pa.table(
                [valued["subject"], vid, valued["relation"], valued["confidence"], valued["module"],
                 valued["status"], valued["evidence"]],
                names=["s", "v", "attribute", "confidence", "module", "status", "evidence"]), "HAS_VALUE"))
            values = pa.table([vid, valued["relation"], valued["object"]], names=["v", "a", "o"])
            files["values"].write_table(_with_label(values.group_by(["v", "a", "o"]).aggregate([]), "Value"))
        cols = ["type", "attribute", "applicability", "applicable", "importance", "rank"]
        for b in scan_batches(graph_table(run, "attributes"), cols, None, GRAPH_TABLES["attributes"]):
            rows = []
            for t, a, appl, applicable, imp, rank in _rows(b, cols):
                if t is None or a is None:
                    continue
                types.setdefault(t, False)
                attributes.add(a)
                rows.append((t, a, appl, applicable, imp, rank, "HAS_ATTRIBUTE"))
            files["has_attribute"].write(rows)
        cols = ["kind", "attribute", "term", "canonical", "score"]
        for b in scan_batches(graph_table(run, "synonyms"), cols, None, GRAPH_TABLES["synonyms"]):
            trows, vrows, values = [], [], {}
            for kind, a, term, canon, score in _rows(b, cols):
                if term is None or canon is None:
                    continue
                if kind == "type":
                    types.setdefault(term, False)
                    types.setdefault(canon, False)
                    trows.append((term, canon, score, "SYNONYM_OF"))
                else:
                    a = a or ""
                    values[value_id(a, term)] = (a, term)
                    values[value_id(a, canon)] = (a, canon)
                    vrows.append((value_id(a, term), value_id(a, canon), score, "SYNONYM_OF"))
            files["type_synonym_of"].write(trows)
            files["value_synonym_of"].write(vrows)
            files["values"].write((vid, a, v, "Value") for vid, (a, v) in values.items())
        cols = ["product_id", "related_id", "rank", "score"]
        both = pc.field("product_id").is_valid() & pc.field("related_id").is_valid()
        for b in scan_batches(graph_table(run, "related"), cols, both, GRAPH_TABLES["related"]):
            files["related_to"].write_table(_with_label(b, "RELATED_TO"))
        files["types"].write((t, new, "Type") for t, new in sorted(types.items()))
        files["attributes"].write((a, "Attribute") for a in sorted(attributes))
    finally:
        for f in files.values():
            f.close()
    return {"format": "neo4j", "files": [str(f.path) for f in files.values()],
            "rows": {name: f.rows for name, f in files.items()},
            "import": neo4j_import_command(out)}


def neo4j_import_command(out: Path) -> str:
    nodes = " ".join(f"--nodes={out / f'{n}.csv'}" for n in NODE_FILES)
    rels = " ".join(f"--relationships={out / f'{n}.csv'}" for n in NEO4J_FILES if n not in NODE_FILES)
    return ("neo4j-admin database import full neo4j --overwrite-destination=true "
            f"--skip-duplicate-nodes=true --multiline-fields=true {nodes} {rels}")


def export(run: str | Path, fmt: str, out: str | Path) -> dict:
    run, out = Path(run), Path(out)
    if not table_dataset(graph_table(run, "triples")):
        raise FileNotFoundError(f"{run}: no graph/triples (a file or a folder of shards) — "
                                "is this a finished run?")
    if fmt == "nt":
        return export_ntriples(run, out)
    if fmt == "neo4j":
        return export_neo4j(run, out)
    raise ValueError(f"export format {fmt!r}: expected one of {FORMATS}")
