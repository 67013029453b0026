"""`autoknow import SOURCE PATH --out DIR`: public data sets -> catalogue format + gold/.

Each importer reads one public set in its original format (see shared/data/README.md) and writes
a catalogue directory (DESIGN.md, "The doors"):

    DIR/products.parquet, DIR/taxonomy.parquet            always (products may have zero rows)
    DIR/copurchase.parquet                                 instacart (from the order lines)
    DIR/gold/<name>.parquet                                the GOLD_TABLES the source can fill
    DIR/gold/manifest.json                                 source, path, files, options, counts
    DIR/import_skipped.jsonl                               malformed input lines, when there are any

Every table is written with `schema.conform` to its schema in `autoknow_ray.schema`. The gold
format is documented in docs/gold-format.md. Output is a pure function of the input files and the
options (`blind`, `holdout`, `seed`): the same call gives byte-identical tables.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from autoknow_ray.schema import (
    COPURCHASE,
    GOLD_TABLES,
    PRODUCTS,
    TAXONOMY,
    CATALOGUE_TABLES,
    conform,
)

SOURCES = ("instacart", "oa-mine", "ae-110k", "wdc-pave", "off-taxonomy", "google-taxonomy",
           "entity-matching")

COPURCHASE_WINDOW = 5  # within an order: each item -> the next few items added to the cart
SKIPPED_FILE = "import_skipped.jsonl"
RAW_CHARS = 1000  # a skipped line is kept up to this many characters
NA_VALUES = {"", "n/a"}
PRODUCT_TYPE_ATTR = "Product Type"  # WDC-PAVE
BRAND_ATTRS = ("Brand", "Brand Name")  # OA-Mine / AE-110K attribute that fills `brand`


# ---- shared machinery -----------------------------------------------------------------------
@dataclass
class _Ctx:
    source: str
    path: Path
    out: Path
    blind: bool
    holdout: float
    seed: int
    branches: Path | None = None  # --branches: a nested-set taxonomy to place the categories under
    files: list[Path] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)

    def skip(self, file: Path | str, line: int | None, reason: str, raw: str | None = None) -> None:
        self.skipped.append({"file": str(file), "line": line, "reason": reason,
                             "raw": None if raw is None else str(raw)[:RAW_CHARS]})

    def write(self, name: str, data, schema: pa.Schema, gold: bool = False) -> None:
        table = _to_table(data, schema)
        d = self.out / "gold" if gold else self.out
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, d / f"{name}.parquet")
        self.counts[f"gold/{name}" if gold else name] = table.num_rows

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def _to_table(data, schema: pa.Schema) -> pa.Table:
    if isinstance(data, pl.DataFrame):
        data = data.to_arrow()
    if isinstance(data, pa.Table):
        return conform(data, schema)
    return conform(pa.Table.from_pylist(list(data), schema=schema), schema)


def _open_text(file: Path):
    if file.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(file, "rb"), encoding="utf-8", errors="replace",
                                newline="")
    return open(file, "r", encoding="utf-8", errors="replace", newline="")


def _iter_lines(ctx: _Ctx, file: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline); blank lines are dropped."""
    try:
        with _open_text(file) as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield n, line
    except (OSError, EOFError) as e:
        raise ValueError(f"{ctx.source}: cannot read {file}: {e}") from e


def _iter_jsonl(ctx: _Ctx, file: Path) -> Iterator[tuple[int, dict]]:
    for n, line in _iter_lines(ctx, file):
        try:
            rec = json.loads(line)
        except ValueError as e:
            ctx.skip(file, n, f"invalid JSON: {e}", line)
            continue
        if not isinstance(rec, dict):
            ctx.skip(file, n, "not a JSON object", line)
            continue
        yield n, rec


def _data_files(ctx: _Ctx, suffixes: tuple[str, ...], what: str) -> list[Path]:
    """PATH itself when it is a file, else the files in the folder whose name ends in a suffix."""
    p = ctx.path
    if p.is_file():
        return [p]
    files = sorted(f for f in p.iterdir()
                   if f.is_file() and f.name.endswith(suffixes) and not f.name.startswith("."))
    if not files:
        raise ValueError(f"{ctx.source}: no {what} file ({' or '.join('*' + s for s in suffixes)}) "
                         f"in folder {p}")
    return files


def _pick_one(ctx: _Ctx, preferred: tuple[str, ...], suffixes: tuple[str, ...], what: str) -> Path:
    """PATH when it is a file; in a folder a preferred name, else the only file with a suffix."""
    p = ctx.path
    if p.is_file():
        return p
    for name in preferred:
        if (p / name).is_file():
            return p / name
    files = _data_files(ctx, suffixes, what)
    if len(files) > 1:
        raise ValueError(f"{ctx.source}: several candidate {what} files in {p} "
                         f"({', '.join(f.name for f in files)}); pass one file as PATH")
    return files[0]


def _stem(file: Path) -> str:
    name = file.name
    for suf in (".gz", ".jsonl", ".json", ".txt", ".csv"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    return re.sub(r"[^A-Za-z0-9_.]+", "_", name) or "data"


def _is_na(v) -> bool:
    return v is None or str(v).strip().casefold() in NA_VALUES


def _clean(v) -> str | None:
    """Text with whitespace runs collapsed to one space (as ingest does), None when empty: gold
    offsets are computed on exactly the text the catalogue holds."""
    if v is None:
        return None
    s = " ".join(str(v).split())
    return s or None


# ---- locating values and types in text --------------------------------------------------------
_RE_CACHE: dict = {}


def _value_patterns(value: str) -> tuple[re.Pattern, re.Pattern]:
    key = ("v", value)
    pats = _RE_CACHE.get(key)
    if pats is None:
        esc = re.escape(value)
        pre = r"(?<!\w)" if value[:1].isalnum() else ""
        post = r"(?!\w)" if value[-1:].isalnum() else ""
        pats = (re.compile(pre + esc + post, re.IGNORECASE), re.compile(esc, re.IGNORECASE))
        if len(_RE_CACHE) < 200_000:
            _RE_CACHE[key] = pats
    return pats


def locate(text: str | None, value: str | None) -> tuple[int, int]:
    """Character offsets [start, end) of `value` in `text`, case-insensitively, preferring a
    whole-word occurrence; (-1, -1) when it is not there."""
    if not text or not value:
        return -1, -1
    word, plain = _value_patterns(value)
    m = word.search(text) or plain.search(text)
    return (m.start(), m.end()) if m else (-1, -1)


def _word_forms(w: str) -> set[str]:
    forms = {w, w + "s", w + "es"}
    if w.endswith("ies") and len(w) > 3:
        forms.add(w[:-3] + "y")
    if w.endswith("es") and len(w) > 2:
        forms.add(w[:-2])
    if w.endswith("s") and len(w) > 1:
        forms.add(w[:-1])
    if w.endswith("y") and len(w) > 1:
        forms.add(w[:-1] + "ies")
    return forms


def _type_pattern(type_name: str) -> re.Pattern | None:
    key = ("t", type_name)
    if key in _RE_CACHE:
        return _RE_CACHE[key]
    words = re.findall(r"\w+(?:['’.]\w+)*|[^\w\s]", type_name.casefold())
    pat = None
    if words:
        head = r"[\s\-_/]+".join(re.escape(w) for w in words[:-1])
        tails = sorted(_word_forms(words[-1]), key=len, reverse=True)
        tail = "(?:" + "|".join(re.escape(t) for t in tails) + ")"
        body = (head + r"[\s\-_/]+" + tail) if head else tail
        pre = r"(?<!\w)" if words[0][:1].isalnum() else ""
        post = r"(?!\w)" if words[-1][-1:].isalnum() else ""
        pat = re.compile(pre + body + post, re.IGNORECASE)
    if len(_RE_CACHE) < 200_000:
        _RE_CACHE[key] = pat
    return pat


def locate_type(title: str | None, type_name: str | None) -> tuple[int | None, int | None]:
    """Offsets of a type name, or its simple singular/plural form, in a title; (None, None) when
    absent. Words may be separated by spaces, hyphens, underscores or slashes."""
    if not title or not type_name:
        return None, None
    pat = _type_pattern(type_name)
    m = pat.search(title) if pat else None
    if m is None:
        s, e = locate(title, type_name)
        return (s, e) if s >= 0 else (None, None)
    return m.start(), m.end()


# ---- taxonomy holdout (OFF, Google) -----------------------------------------------------------
def _taxonomy_with_holdout(ctx: _Ctx, names: dict[str, str], parents: dict[str, list[str]]) -> None:
    """names: node -> unique type name; parents: node -> parent nodes (all known). Writes
    taxonomy.parquet and gold/hypernyms.parquet: a seeded `holdout` fraction of the leaves that
    have parents lose all their parent edges (one row `type, parent=null` is left)."""
    has_child = {p for ps in parents.values() for p in ps}
    nodes = sorted(names)
    candidates = [n for n in nodes if n not in has_child and parents.get(n)]
    k = int(round(ctx.holdout * len(candidates)))
    hidden: set[str] = set()
    if k:
        idx = ctx.rng().choice(len(candidates), size=k, replace=False)
        hidden = {candidates[i] for i in idx}
    rows, gold = [], []
    seen = set()
    for n in nodes:
        ps = parents.get(n) or []
        if n in hidden:
            gold += [{"child": names[n], "child_kind": "type", "parent": names[p], "depth": 1}
                     for p in ps]
            ps = []
        pairs = [(names[n], names[p]) for p in ps] or [(names[n], None)]
        for pair in pairs:
            if pair not in seen:
                seen.add(pair)
                rows.append({"type": pair[0], "parent": pair[1]})
    ctx.notes.update({"leaf_candidates": len(candidates), "hidden_leaves": len(hidden)})
    ctx.write("products", [], PRODUCTS)
    ctx.write("taxonomy", rows, TAXONOMY)
    ctx.write("hypernyms", gold, GOLD_TABLES["hypernyms"], gold=True)


def _disambiguate(names: dict[str, str], *alternatives) -> dict[str, str]:
    """Make names unique: the nodes of a shared name get `alternative(node)` (each alternative in
    turn, for the clashes that are left); a clash that survives them all gets " [node id]"."""
    out = dict(names)
    for alternative in (*alternatives, lambda n: f"{names[n]} [{n}]"):
        groups: dict[str, list[str]] = {}
        for n, name in out.items():
            groups.setdefault(name, []).append(n)
        clashes = [n for ns in groups.values() if len(ns) > 1 for n in ns]
        if not clashes:
            break
        for n in clashes:
            out[n] = alternative(n)
    if len(set(out.values())) != len(out):  # pragma: no cover - node ids are unique
        raise ValueError("could not make type names unique")
    return out


# ---- instacart --------------------------------------------------------------------------------
_IC = "ic-"


def _clean_instacart_name(s: str) -> str:
    # products.csv quotes names with inch marks as `"""9\""""x13\"""" …"""`: after CSV parsing a
    # layer of quotes and `\"` escapes remains.
    s = s.strip()
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        s = s[1:-1]
    return " ".join(s.replace('\\""', '"').replace('\\"', '"').split())


def _read_id_names(ctx: _Ctx, file: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    with _open_text(file) as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != 2:
                ctx.skip(file, n, f"expected 2 fields (id, name), got {len(row)}", ",".join(row))
                continue
            try:
                i = int(row[0])
            except ValueError:
                if n != 1:  # the first line may be a header (the original Kaggle files have one)
                    ctx.skip(file, n, f"id is not an integer: {row[0]!r}", ",".join(row))
                continue
            name = _clean_instacart_name(row[1])
            if not name:
                ctx.skip(file, n, "empty name", ",".join(row))
                continue
            if i in out:
                ctx.skip(file, n, f"duplicate id {i}", ",".join(row))
                continue
            out[i] = name
    return out


def _instacart_files(ctx: _Ctx) -> tuple[Path, Path, Path, Path | None]:
    p = ctx.path
    d = p.parent if p.is_file() else p
    orders: Path | None = None
    products: Path | None = None
    if p.is_file():
        if "order" in p.name.lower():
            orders = p
        else:
            products = p
    if products is None:
        products = d / "products.csv"
    if orders is None:
        cands = sorted(f for f in d.glob("order_lines*.csv*") if f.is_file())
        orders = cands[0] if cands else None
    for f, what in ((products, "products.csv (product_id,name,aisle_id,department_id; no header)"),
                    (d / "aisles.csv", "aisles.csv (aisle_id,name; no header)"),
                    (d / "departments.csv", "departments.csv (department_id,name; no header)")):
        if not f.is_file():
            raise ValueError(f"instacart: expected {what} at {f}")
    return products, d / "aisles.csv", d / "departments.csv", orders


def _import_instacart(ctx: _Ctx) -> None:
    products_f, aisles_f, depts_f, orders_f = _instacart_files(ctx)
    ctx.files = [f for f in (products_f, aisles_f, depts_f, orders_f) if f]
    aisles = _read_id_names(ctx, aisles_f)
    depts = _read_id_names(ctx, depts_f)
    missing = "missing"

    # products.csv
    prods: list[tuple[int, str, int, int]] = []
    seen: set[int] = set()
    with _open_text(products_f) as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not any(c.strip() for c in row):
                continue
            raw = ",".join(row)
            if len(row) != 4:
                ctx.skip(products_f, n, f"expected 4 fields (product_id,name,aisle_id,"
                                        f"department_id), got {len(row)}", raw)
                continue
            try:
                pid, aid, did = int(row[0]), int(row[2]), int(row[3])
            except ValueError:
                if n != 1:
                    ctx.skip(products_f, n, "product_id/aisle_id/department_id not integers", raw)
                continue
            name = _clean_instacart_name(row[1])
            if not name:
                ctx.skip(products_f, n, "empty product name", raw)
                continue
            if pid in seen:
                ctx.skip(products_f, n, f"duplicate product_id {pid}", raw)
                continue
            seen.add(pid)
            prods.append((pid, name, aid, did))
    if not prods:
        raise ValueError(f"instacart: no valid product rows in {products_f}")
    prods.sort()

    # aisle display names: an aisle named like a department ("other" in "other") is renamed
    # "department > aisle" so the taxonomy has no self-loop and names stay unique.
    dept_names = {v for v in depts.values() if v.casefold() != missing}
    typed: list[tuple[int, str, str, str]] = []  # pid, title, aisle type, department
    edges: set[tuple[str, str]] = set()
    unknown = 0
    used: set[int] = set()
    for pid, name, aid, did in prods:
        a, dname = aisles.get(aid), depts.get(did)
        if a is None or dname is None:
            unknown += 1
            continue
        used.add(aid)
        if a.casefold() == missing or dname.casefold() == missing:
            continue
        at = f"{dname} > {a}" if a in dept_names else a
        typed.append((pid, name, at, dname))
        edges.add((at, dname))
    unused = sorted(name for i, name in aisles.items() if i not in used)

    k = len(typed) if ctx.blind else int(round(ctx.holdout * len(typed)))
    if ctx.blind:
        hidden = {t[0] for t in typed}
    elif k:
        idx = ctx.rng().choice(len(typed), size=k, replace=False)
        hidden = {typed[i][0] for i in idx}
    else:
        hidden = set()
    type_of = {t[0]: t[2] for t in typed}

    ctx.write("products", pa.table({
        "product_id": [f"{_IC}{p[0]}" for p in prods],
        "title": [p[1] for p in prods],
        "product_type": [None if p[0] in hidden else type_of.get(p[0]) for p in prods],
    }), PRODUCTS)
    tax = [{"type": a, "parent": d} for a, d in sorted(edges)]
    tax += [{"type": d, "parent": None} for d in sorted(dept_names)]
    ctx.write("taxonomy", tax, TAXONOMY)

    gold_types, gold_hyp = [], []
    for pid, title, at, dname in typed:
        s, e = locate_type(title, at if " > " not in at else at.split(" > ", 1)[1])
        gold_types.append({"product_id": f"{_IC}{pid}", "type": at, "start": s, "end": e})
        if pid in hidden:
            gold_hyp.append({"child": f"{_IC}{pid}", "child_kind": "product", "parent": at,
                             "depth": 1})
            gold_hyp.append({"child": f"{_IC}{pid}", "child_kind": "product", "parent": dname,
                             "depth": 2})
    ctx.write("types", gold_types, GOLD_TABLES["types"], gold=True)
    ctx.write("hypernyms", gold_hyp, GOLD_TABLES["hypernyms"], gold=True)
    ctx.notes.update({"typed_products": len(typed), "hidden_types": len(hidden),
                      "products_unknown_aisle_or_department": unknown, "aisles_used": len(used),
                      "aisles_without_products": unused})

    if orders_f is None:
        ctx.notes["order_lines"] = "not found: no copurchase written"
        return
    lines = _read_order_lines(ctx, orders_f, {p[0] for p in prods})
    cat, gold = _copurchase(lines)
    ctx.write("copurchase", cat, COPURCHASE)
    ctx.write("copurchase", gold, GOLD_TABLES["copurchase"], gold=True)


_ORDER_COLS = ("order_id", "user_id", "order_number", "product_id", "add_to_cart_order")


def _read_order_lines(ctx: _Ctx, file: Path, known: set[int]) -> pl.DataFrame:
    """Stream the order lines (CSV, optionally gzipped) in blocks; malformed rows are skipped and
    logged with their line number."""
    bad: list[tuple[int, str, str]] = []

    def on_invalid(row) -> str:
        bad.append((row.number, f"expected {row.expected_columns} fields, got "
                                f"{row.actual_columns}", row.text))
        return "skip"

    try:
        with open(file, "rb") as fh:
            head = fh.read(2)
        compression = "gzip" if head == b"\x1f\x8b" else None
        stream = pa.input_stream(str(file), compression=compression)
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(use_threads=False, block_size=8 << 20),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                include_columns=list(_ORDER_COLS),
                column_types={c: pa.string() for c in _ORDER_COLS}),
        )
        batches = [pl.from_arrow(pa.Table.from_batches([b])) for b in reader if b.num_rows]
    except (pa.ArrowInvalid, pa.ArrowKeyError, OSError, EOFError) as e:
        raise ValueError(f"instacart: cannot read order lines {file} (CSV with header "
                         f"{', '.join(_ORDER_COLS)}, …): {e}") from e
    if batches:
        raw = pl.concat(batches)
    else:
        raw = pl.DataFrame({c: [] for c in _ORDER_COLS}, schema={c: pl.String for c in _ORDER_COLS})
    df = raw.with_row_index("_row").with_columns(
        [pl.col(c).str.strip_chars().cast(pl.Float64, strict=False).cast(pl.Int64, strict=False)
         .alias(c) for c in _ORDER_COLS])
    nulls = df.filter(pl.any_horizontal([pl.col(c).is_null() for c in _ORDER_COLS]))
    if nulls.height:
        bad_lines = sorted(b[0] for b in bad if b[0] is not None)
        for r in nulls.iter_rows(named=True):
            line = r["_row"] + 2  # header is line 1
            for b in bad_lines:  # rows skipped earlier shift the line numbers
                if b <= line:
                    line += 1
            orig = raw.row(r["_row"], named=True)
            ctx.skip(file, line, "non-numeric or empty id/order field",
                     ",".join("" if orig[c] is None else orig[c] for c in _ORDER_COLS))
    for n, reason, text in bad:
        ctx.skip(file, n, reason, text)
    df = df.drop_nulls(list(_ORDER_COLS)).drop("_row")
    n_unknown = df.filter(~pl.col("product_id").is_in(list(known))).height
    ctx.notes.update({"order_lines": df.height, "order_lines_unknown_product": n_unknown,
                      "orders": df["order_id"].n_unique(), "users": df["user_id"].n_unique()})
    return df.filter(pl.col("product_id").is_in(list(known)))


def _copurchase(lines: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Directed pairs: within an order src -> each of the next COPURCHASE_WINDOW items added later
    to the cart; across orders every item of a user's order n -> every item of order n+1.
    Pairs that involve a user's last order are the gold (held out); the rest is the catalogue."""
    orders = (lines.select("user_id", "order_id", "order_number").unique(subset="order_id",
                                                                        keep="first")
              .sort("user_id", "order_number", "order_id")
              .with_columns(seq=pl.int_range(pl.len()).over("user_id"))
              .with_columns(last=pl.col("seq") == pl.col("seq").max().over("user_id"))
              .select("order_id", "seq", "last"))
    li = (lines.select("order_id", "user_id", "product_id", "add_to_cart_order")
          .join(orders, on="order_id")
          .sort("order_id", "add_to_cart_order", "product_id")
          .with_columns(pos=pl.int_range(pl.len()).over("order_id")))
    a = li.select("order_id", "pos", src="product_id", cart_a="add_to_cart_order", gold="last")
    b = li.select("order_id", "pos", dst="product_id", cart_b="add_to_cart_order")
    parts = []
    for k in range(1, COPURCHASE_WINDOW + 1):
        parts.append(
            a.join(b.with_columns(pos=pl.col("pos") - k), on=["order_id", "pos"])
            .filter(pl.col("cart_b") > pl.col("cart_a"))
            .select("src", "dst", "gold"))
    nxt = li.select("user_id", "seq", dst="product_id", gold="last").with_columns(
        seq=pl.col("seq") - 1)
    parts.append(li.select("user_id", "seq", src="product_id")
                 .join(nxt, on=["user_id", "seq"]).select("src", "dst", "gold"))
    pairs = (pl.concat(parts).filter(pl.col("src") != pl.col("dst"))
             .group_by("gold", "src", "dst").agg(count=pl.len().cast(pl.Int64))
             .sort("src", "dst"))

    def fmt(df: pl.DataFrame) -> pl.DataFrame:
        return df.select(src=pl.lit(_IC) + pl.col("src").cast(pl.String),
                         dst=pl.lit(_IC) + pl.col("dst").cast(pl.String), count="count")

    return fmt(pairs.filter(~pl.col("gold"))), fmt(pairs.filter(pl.col("gold")))


# ---- OA-Mine and AE-110K ----------------------------------------------------------------------
def _scored_values(vs) -> list[str]:
    """Values of one attribute with a positive score, n/a and empty dropped, in file order."""
    out = []
    for v, s in vs.items():
        score = s.get("score", 1) if isinstance(s, dict) else s
        try:
            ok = float(score) > 0
        except (TypeError, ValueError):
            ok = False
        if ok and not _is_na(v):
            out.append(_clean(v))
    return out


def _import_tagging(ctx: _Ctx, prefix: str) -> None:
    files = _data_files(ctx, (".jsonl", ".jsonl.gz", ".json"), "JSON Lines")
    ctx.files = files
    products, spans, types = [], [], []
    categories: set[str] = set()
    for file in files:
        stem = _stem(file)
        for n, rec in _iter_jsonl(ctx, file):
            title = _clean(rec.get("input"))
            ts = rec.get("target_scores", {}) or {}
            cat = rec.get("category")
            if title is None or not isinstance(rec.get("input"), str):
                ctx.skip(file, n, "missing or empty 'input' (the title)", json.dumps(rec))
                continue
            if not isinstance(ts, dict) or not all(isinstance(v, dict) for v in ts.values()):
                ctx.skip(file, n, "'target_scores' is not {attribute: {value: score}}",
                         json.dumps(rec))
                continue
            if cat is not None and not isinstance(cat, str):
                ctx.skip(file, n, "'category' is not a string", json.dumps(rec))
                continue
            cat = _clean(cat)
            pid = f"{prefix}-{stem}-{n:06d}"
            attrs = []
            for a, vs in ts.items():
                a = _clean(a) or str(a)
                for v in _scored_values(vs):
                    attrs.append({"name": a, "value": v})
                    s, e = locate(title, v)
                    spans.append({"product_id": pid, "attribute": a, "value": v, "field": "title",
                                  "start": s, "end": e})
            brand = next((x["value"] for b in BRAND_ATTRS for x in attrs if x["name"] == b), None)
            products.append({"product_id": pid, "title": title,
                             "product_type": None if ctx.blind else cat,
                             "attributes": [] if ctx.blind else attrs,
                             "brand": None if ctx.blind else brand})
            if cat:
                categories.add(cat)
                s, e = locate_type(title, cat)
                types.append({"product_id": pid, "type": cat, "start": s, "end": e})
    if not products:
        raise ValueError(f"{ctx.source}: no valid records in {', '.join(map(str, files))} "
                         f"(expected JSON lines with 'input', 'category', 'target_scores')")
    ctx.write("products", products, PRODUCTS)
    rows = _with_branches(ctx, [(c, None) for c in sorted(categories)])
    ctx.write("taxonomy", [{"type": t, "parent": p} for t, p in rows], TAXONOMY)
    ctx.write("types", types, GOLD_TABLES["types"], gold=True)
    ctx.write("spans", spans, GOLD_TABLES["spans"], gold=True)


# ---- WDC-PAVE ---------------------------------------------------------------------------------
def _norm_key(name: str) -> str:
    return name.replace("_normalized_", "_").replace("normalized_", "").replace("_normalized", "")


def _wdc_companion(file: Path) -> Path | None:
    key = _norm_key(file.name)
    for f in sorted(file.parent.iterdir()):
        if f.is_file() and f != file and _norm_key(f.name) == key and (
                ("normalized" in f.name) != ("normalized" in file.name)):
            return f
    return None


def _wdc_values(vs) -> list[tuple[str, list[int]]]:
    """[(value, pids)] of one attribute, n/a dropped, in file order."""
    out = []
    if not isinstance(vs, dict):
        return out
    for v, x in vs.items():
        if _is_na(v):
            continue
        if isinstance(x, dict):
            try:
                if float(x.get("score", 1)) <= 0:
                    continue
            except (TypeError, ValueError):
                continue
            pids = [int(p) for p in (x.get("pid") or []) if isinstance(p, (int, float))]
        else:
            pids = []
        out.append((_clean(v), pids))
    return out


def _synonym_pairs(raw: list[tuple[str, list[int]]], norm: list[tuple[str, list[int]]]):
    """Pair the raw values of one attribute with their normalized values (see docs)."""
    r = [v for v, _ in raw]
    m = [v for v, _ in norm]
    rr = [v for v in r if v not in m]
    mm = [v for v in m if v not in r]
    if not rr:
        return [], 0
    if len(rr) == len(mm):
        return list(zip(rr, mm)), 0
    if len(mm) == 1:
        return [(v, mm[0]) for v in rr], 0
    if len(m) == 1:
        return [(v, m[0]) for v in rr], 0
    pids_r = dict(raw)
    out, amb = [], 0
    for v in rr:
        cands = [w for w, p in norm if set(p) & set(pids_r[v])]
        if len(cands) == 1:
            out.append((v, cands[0]))
        else:
            amb += 1
    return out, amb


def _import_wdc(ctx: _Ctx) -> None:
    p = ctx.path
    if p.is_file():
        offers = [p]
    else:
        files = _data_files(ctx, (".jsonl", ".jsonl.gz"), "JSON Lines")
        offers = [f for f in files if "normalized" not in f.name] or files
    ctx.files = list(offers)
    products, types, spans, synonyms = [], [], [], []
    tax: set[tuple[str, str | None]] = set()
    seen_ids: set[str] = set()
    syn_seen: set[tuple] = set()
    ambiguous = 0
    has_companion = False
    for file in offers:
        comp = _wdc_companion(file)
        comp_ts: dict = {}
        if comp is not None:
            has_companion = True
            ctx.files.append(comp)
            for n, rec in _iter_jsonl(ctx, comp):
                if isinstance(rec.get("target_scores"), dict) and rec.get("id") is not None:
                    comp_ts[str(rec["id"])] = rec["target_scores"]
        file_is_norm = "normalized" in file.name
        stem = _stem(file)
        for n, rec in _iter_jsonl(ctx, file):
            title = rec.get("input_title")
            ts = rec.get("target_scores", {}) or {}
            if not isinstance(title, str) or not title.strip():
                ctx.skip(file, n, "missing or empty 'input_title'", json.dumps(rec))
                continue
            if not isinstance(ts, dict) or not all(isinstance(v, dict) for v in ts.values()):
                ctx.skip(file, n, "'target_scores' is not {attribute: {value: {pid, score}}}",
                         json.dumps(rec))
                continue
            title = _clean(title)
            desc = rec.get("input_description")
            desc = _clean(desc) if isinstance(desc, str) else None
            oid = rec.get("id")
            pid = f"wdc-{oid}" if oid is not None else f"wdc-{stem}-{n:06d}"
            if pid in seen_ids:
                ctx.skip(file, n, f"duplicate offer id {oid}", json.dumps(rec))
                continue
            seen_ids.add(pid)
            cat = _clean(rec.get("category")) if isinstance(rec.get("category"), str) else None
            vals = {_clean(a) or str(a): _wdc_values(vs) for a, vs in ts.items()}
            pts = vals.get(PRODUCT_TYPE_ATTR, [])
            ptype = next((v for v, pids in pts if 0 in pids), pts[0][0] if pts else None)
            attrs = [{"name": a, "value": vs[0][0]} for a, vs in vals.items()
                     if a != PRODUCT_TYPE_ATTR and vs]
            brand = vals.get("Brand", [])
            products.append({
                "product_id": pid, "title": title, "description": desc,
                "product_type": None if ctx.blind else ptype,
                "attributes": [] if ctx.blind else attrs,
                "brand": None if ctx.blind or not brand else brand[0][0]})
            if ptype:
                s, e = locate_type(title, ptype)
                types.append({"product_id": pid, "type": ptype, "start": s, "end": e})
                if cat and cat != ptype:
                    tax.add((ptype, cat))
                elif not cat:
                    tax.add((ptype, None))
            if cat:
                tax.add((cat, None))
            for a, vs in vals.items():
                for v, pids in vs:
                    for fid in sorted(set(pids)) or [0]:
                        fname, text = ("title", title) if fid == 0 else ("description", desc)
                        s, e = locate(text, v)
                        if s < 0 and a == PRODUCT_TYPE_ATTR:  # "index tabs" in "… index tab …"
                            ts_, te_ = locate_type(text, v)
                            s, e = (ts_, te_) if ts_ is not None else (-1, -1)
                        spans.append({"product_id": pid, "attribute": a, "value": v,
                                      "field": fname, "start": s, "end": e})
            if comp is None or oid is None or str(oid) not in comp_ts:
                continue
            other = comp_ts[str(oid)]
            for a, vs in ts.items():
                a = _clean(a) or str(a)
                # normalized Product Type values are coarse classes ("TONER CARTRIDGE" ->
                # "Printing, Copying, Laminating"): hypernyms, not synonyms
                if a == PRODUCT_TYPE_ATTR or a not in other:
                    continue
                mine, theirs = _wdc_values(vs), _wdc_values(other[a])
                raw, norm = (theirs, mine) if file_is_norm else (mine, theirs)
                pairs, amb = _synonym_pairs(raw, norm)
                ambiguous += amb
                for term, canon in pairs:
                    if term.casefold().split() == canon.casefold().split():
                        continue  # case / whitespace variants only
                    key = (a, term, canon)
                    if key not in syn_seen:
                        syn_seen.add(key)
                        synonyms.append({"kind": "value", "attribute": a, "term": term,
                                         "canonical": canon})
    if not products:
        raise ValueError(f"wdc-pave: no valid offers in {', '.join(map(str, offers))} (expected "
                         f"JSON lines with 'id', 'category', 'input_title', 'target_scores')")
    # a type name may be both a category and a product type elsewhere: keep it a root only once
    rows = _with_branches(ctx, sorted(tax, key=lambda t: (t[0], t[1] or "")))
    ctx.write("products", products, PRODUCTS)
    ctx.write("taxonomy", [{"type": t, "parent": p} for t, p in rows], TAXONOMY)
    ctx.write("types", types, GOLD_TABLES["types"], gold=True)
    ctx.write("spans", spans, GOLD_TABLES["spans"], gold=True)
    if has_companion:
        ctx.write("synonyms", synonyms, GOLD_TABLES["synonyms"], gold=True)
        ctx.notes["synonym_values_ambiguous"] = ambiguous
    else:
        ctx.notes["synonyms"] = "no *_normalized_* companion file: gold/synonyms not written"


# ---- Open Food Facts taxonomy -----------------------------------------------------------------
def _import_off(ctx: _Ctx) -> None:
    file = _pick_one(ctx, ("categories.full.json.gz", "categories.full.json"),
                     (".json.gz", ".json"), "taxonomy JSON")
    ctx.files = [file]
    try:
        with (gzip.open(file, "rb") if file.suffix == ".gz" else open(file, "rb")) as f:
            data = json.load(f)
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"off-taxonomy: cannot read {file} as (gzipped) JSON "
                         f"{{node_id: {{name, parents, synonyms}}}}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"off-taxonomy: {file} is not a JSON object {{node_id: node}}")
    nodes: dict[str, dict] = {}
    for nid, node in data.items():
        if not isinstance(node, dict):
            ctx.skip(file, None, f"node {nid!r} is not an object", json.dumps(node)[:RAW_CHARS])
            continue
        nodes[str(nid)] = node
    if not nodes:
        raise ValueError(f"off-taxonomy: no category nodes in {file} (expected "
                         f"{{node_id: {{name: {{lang: str}}, parents: [ids], synonyms}}}})")
    names: dict[str, str] = {}
    for nid, node in nodes.items():
        nm = node.get("name") if isinstance(node.get("name"), dict) else {}
        en = _clean(nm.get("en")) if isinstance(nm.get("en"), str) else None
        names[nid] = en or (nid.split(":", 1)[1] if ":" in nid else nid).strip() or nid
    names = _disambiguate(names)
    parents: dict[str, list[str]] = {}
    dangling = 0
    for nid, node in nodes.items():
        ps = node.get("parents") or []
        if not isinstance(ps, list):
            ps = []
        keep = []
        for p in ps:
            if str(p) in nodes and str(p) != nid:
                if str(p) not in keep:
                    keep.append(str(p))
            else:
                dangling += 1
        parents[nid] = keep
    ctx.notes["dangling_parent_edges"] = dangling
    _taxonomy_with_holdout(ctx, names, parents)
    syn, seen = [], set()
    for nid in sorted(nodes):
        s = nodes[nid].get("synonyms")
        en = s.get("en") if isinstance(s, dict) else None
        if not isinstance(en, list):
            continue
        canon = names[nid]
        base = (nodes[nid].get("name") or {}).get("en") if isinstance(nodes[nid].get("name"),
                                                                       dict) else None
        for t in en:
            t = _clean(t) if isinstance(t, str) else None
            if not t or t.casefold().split() in (canon.casefold().split(),
                                                 str(base or "").casefold().split()):
                continue
            if (t, canon) not in seen:
                seen.add((t, canon))
                syn.append({"kind": "type", "attribute": None, "term": t, "canonical": canon})
    ctx.write("synonyms", syn, GOLD_TABLES["synonyms"], gold=True)


# ---- Google product taxonomy (nested set) -----------------------------------------------------
_NESTED = re.compile(r"^\s*(\d+)\s*\|\s*\[\s*(\d+)\s*-\s*(\d+)\s*\]\s*\|\s*(.*?)\s*$")


@dataclass
class _Nested:
    """A nested-set taxonomy: `raw` node -> its name as written, `parent` node -> parent node (None
    for a root), `names` node -> a unique type name (duplicates disambiguated as below), `order`
    the nodes in file (pre-)order."""
    raw: dict[str, str]
    parent: dict[str, str | None]
    names: dict[str, str]
    order: list[str]

    def depth(self, n: str) -> int:
        d = 0
        while self.parent[n] is not None:
            n, d = self.parent[n], d + 1
        return d

    def ancestors(self, n: str) -> list[str]:
        """The parent, its parent … up to the root."""
        out = []
        while self.parent[n] is not None:
            n = self.parent[n]
            out.append(n)
        return out


def _read_nested_set(ctx: _Ctx, file: Path, what: str = "google-taxonomy") -> _Nested:
    """Parse `id | [left-right] | name` lines (comments `#` skipped, malformed lines logged)."""
    rows: list[tuple[int, int, str, str]] = []  # left, right, id, name
    ids: set[str] = set()
    for n, line in _iter_lines(ctx, file):
        if line.lstrip().startswith("#"):
            continue
        m = _NESTED.match(line)
        if not m:
            ctx.skip(file, n, "expected `id | [left-right] | name`", line)
            continue
        nid, left, right, name = m.group(1), int(m.group(2)), int(m.group(3)), _clean(m.group(4))
        if not name or right <= left:
            ctx.skip(file, n, "empty name or right <= left", line)
            continue
        if nid in ids:
            ctx.skip(file, n, f"duplicate id {nid}", line)
            continue
        ids.add(nid)
        rows.append((left, right, nid, name))
    if not rows:
        raise ValueError(f"{what}: no `id | [left-right] | name` lines in {file}")
    rows.sort()
    parent: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for left, right, nid, _ in rows:
        while stack and stack[-1][0] < left:
            stack.pop()
        parent[nid] = stack[-1][1] if stack else None
        stack.append((right, nid))
    raw = {nid: name for _, _, nid, name in rows}

    def path(n: str) -> str:
        parts = []
        while n is not None:
            parts.append(raw[n])
            n = parent[n]
        return " > ".join(reversed(parts))

    # duplicate names become "Parent > Name", then the full path, then get the id appended
    names = _disambiguate(raw, lambda n: f"{raw[parent[n]]} > {raw[n]}" if parent[n] else raw[n],
                          path)
    return _Nested(raw=raw, parent=parent, names=names, order=[nid for _, _, nid, _ in rows])


def _import_google(ctx: _Ctx) -> None:
    file = _pick_one(ctx, ("taxonomy_nested_set.en-US.txt",), (".txt",), "nested-set taxonomy")
    ctx.files = [file]
    g = _read_nested_set(ctx, file)
    parents = {n: ([g.parent[n]] if g.parent[n] else []) for n in g.raw}
    _taxonomy_with_holdout(ctx, g.names, parents)


# ---- --branches: a flat set's categories placed under a nested-set taxonomy (Google) ----------
BRANCH_OVERLAP_FLOOR = 1 / 3  # least share of a category's tokens in a node phrase (step 4)
_PART_SPLIT = re.compile(r"\s*[&,]\s*")


def _branch_tokens(name: str) -> list[str]:
    """Stemmed, case-folded tokens (autoknow_ray.text.stem_tokens) without the connective "and":
    "&" is no token, so "Home And Garden" and "Home & Garden" compare equal."""
    from autoknow_ray.text import stem_tokens

    return [t for t in stem_tokens(name) if t != "and"]


def _branch_key(name: str) -> str:
    return " ".join(_branch_tokens(name))


@dataclass
class _BranchIndex:
    g: _Nested
    whole: dict[str, list[str]]       # key of a node's name -> nodes
    part: dict[str, list[str]]        # key of one part of a node's name ("&" / "," split) -> nodes
    phrases: dict[str, list[tuple[str, ...]]]  # node -> token tuples of its name and its parts
    bag: dict[str, frozenset[str]]    # node -> tokens of its name and its ancestors' names
    down: dict[str, frozenset[str]]   # node -> tokens of its name and its descendants' names
    depth: dict[str, int]
    pos: dict[str, int]               # file (pre-)order


def _branch_index(g: _Nested) -> _BranchIndex:
    whole: dict[str, list[str]] = {}
    part: dict[str, list[str]] = {}
    phrases: dict[str, list[tuple[str, ...]]] = {}
    for n in g.order:
        name = g.raw[n]
        k = _branch_key(name)
        if k:
            whole.setdefault(k, []).append(n)
        parts = [p for p in _PART_SPLIT.split(name) if p.strip()]
        keys = [k] + ([_branch_key(p) for p in parts] if len(parts) > 1 else [])
        for pk in dict.fromkeys(keys[1:]):
            if pk and pk != k:
                part.setdefault(pk, []).append(n)
        phrases[n] = [tuple(x.split()) for x in dict.fromkeys(keys) if x]
    own = {n: frozenset(t for p in phrases[n] for t in p) for n in g.order}
    bag = {n: own[n].union(*(own[a] for a in g.ancestors(n))) for n in g.order}
    down = {n: set(own[n]) for n in g.order}
    for n in reversed(g.order):  # pre-order: every child comes after its parent
        if g.parent[n] is not None:
            down[g.parent[n]] |= down[n]
    return _BranchIndex(g=g, whole=whole, part=part, phrases=phrases, bag=bag,
                        down={n: frozenset(d) for n, d in down.items()},
                        depth={n: g.depth(n) for n in g.order},
                        pos={n: i for i, n in enumerate(g.order)})


def _jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def _place(idx: _BranchIndex, category: str) -> dict | None:
    """Where one category goes: {match, node, parent (a node or None), score}, or None.

    Compared on `_branch_key` (stemmed, case-folded tokens; "and" dropped). A node's phrases are
    its name and, when "&" or "," split it, each part ("Shampoo & Conditioner" -> "Shampoo",
    "Conditioner").
    1. `name`: the category's key equals a node's name key: the category IS that node (it takes
       the node's parent).
    2. `part`: its key equals one part of a node's name: it takes that node's place too.
    3. `general`: its tokens are a proper subset of a node phrase with the same last (head) word
       ("Helmet" in "Cricket Helmets", "Bicycle Helmets" …): those nodes are kinds of it, and it
       goes under the deepest ancestor that more than half of them share. When none is shared
       by more than half (the nodes lie in different branches) it is ambiguous: no placement.
    4. `overlap`: else the node with the highest share of the category's tokens in one of its
       phrases (at least BRANCH_OVERLAP_FLOOR), then in its subtree's names (the branch has the
       rest: "Safety Mask" -> Work Safety Protective Gear, which holds Protective Masks), then
       the shallowest, then the highest Jaccard of the category's tokens with the phrase, then
       with the tokens of the node and all its ancestors: the category goes under that node
       (takes its place when all its tokens are in the phrase: then the node names an accessory
       or part of it, not a kind).
    Ties in steps 1, 2 and 4: the shallowest node (the most general reading of a bare name, not
    a specialised duplicate deep in another branch), then the first in the file."""
    key = _branch_key(category)
    if not key:
        return None
    g = idx.g

    def best(nodes):
        return min(nodes, key=lambda n: (idx.depth[n], idx.pos[n]))

    for match, table in (("name", idx.whole), ("part", idx.part)):
        if key in table:
            n = best(table[key])
            return {"match": match, "node": n, "parent": g.parent[n], "score": 1.0}
    ct = tuple(key.split())
    cs = frozenset(ct)
    kinds = [n for n in g.order
             if any(p[-1] == ct[-1] and cs < frozenset(p) for p in idx.phrases[n])]
    if kinds:
        count: dict[str, int] = {}
        for n in kinds:
            for a in g.ancestors(n):
                count[a] = count.get(a, 0) + 1
        shared = [a for a, c in count.items() if 2 * c > len(kinds)]
        if not shared:
            return None
        a = max(shared, key=lambda x: (idx.depth[x], -idx.pos[x]))
        return {"match": "general", "node": a, "parent": a,
                "score": round(count[a] / len(kinds), 4)}
    ranked = []
    for n in g.order:
        cover = max(len(cs & frozenset(p)) for p in idx.phrases[n]) / len(cs)
        if cover < BRANCH_OVERLAP_FLOOR or cover == 0:
            continue
        own = max(_jaccard(cs, frozenset(p)) for p in idx.phrases[n])
        sub = len(cs & idx.down[n]) / len(cs)
        ranked.append((-cover, -sub, idx.depth[n], -own, -_jaccard(cs, idx.bag[n]), idx.pos[n], n))
    if not ranked:
        return None
    r = min(ranked)
    n = r[-1]
    inside = any(cs <= frozenset(p) for p in idx.phrases[n])
    return {"match": "overlap", "node": n, "parent": g.parent[n] if inside else n,
            "score": round(-r[0], 4)}


def _descendants(rows, root: str) -> set[str]:
    children: dict[str, set[str]] = {}
    for t, p in rows:
        if p is not None:
            children.setdefault(p, set()).add(t)
    seen, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def _with_branches(ctx: _Ctx, rows: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """The taxonomy rows with every root type (a type whose only parent is null: the set's
    categories) placed under the `--branches` taxonomy, and the ancestors written as rows (the
    top one with parent null). Ancestors carry the names `autoknow import google-taxonomy` gives
    them; a Google name equal to one of the set's types is that type (their rows merge). A root
    with no match, or whose path would loop back through itself or one of its subtypes, stays a
    root and is listed in notes["unplaced_categories"]."""
    if ctx.branches is None:
        return rows
    g = _read_nested_set(ctx, ctx.branches, what="--branches")
    ctx.files.append(ctx.branches)
    idx = _branch_index(g)
    has_parent = {t for t, p in rows if p is not None}
    roots = sorted({t for t, p in rows if p is None and t not in has_parent})
    out = {(t, p) for t, p in rows}
    placements, unplaced = {}, []
    for cat in roots:
        pl_ = _place(idx, cat)
        chain = [] if pl_ is None or pl_["parent"] is None else \
            [pl_["parent"], *g.ancestors(pl_["parent"])]
        names = [g.names[a] for a in chain]
        if pl_ is not None and (cat in names or set(names) & _descendants(out, cat)):
            pl_ = None  # the path would loop through the category itself or one of its subtypes
        if pl_ is None:
            unplaced.append(cat)
            continue
        if names:
            out.discard((cat, None))
            out.add((cat, names[0]))
            for child, parent in zip(names, names[1:] + [None]):
                out.add((child, parent))
        placements[cat] = {"match": pl_["match"], "node": g.names[pl_["node"]],
                           "score": pl_["score"], "path": " > ".join([*reversed(names), cat])}
    ctx.notes["branches"] = str(ctx.branches)
    ctx.notes["placements"] = placements
    ctx.notes["unplaced_categories"] = unplaced
    return sorted(out, key=lambda t: (t[0], t[1] or ""))


# ---- entity matching (DeepMatcher / Ditto format) ---------------------------------------------
_COL_SPLIT = re.compile(r"(?:^|\s+)COL\s+")
_VAL = re.compile(r"^(.*?)\s+VAL(?:\s+(.*))?$", re.DOTALL)


def parse_record(text: str) -> list[tuple[str, str]] | None:
    """`COL attr VAL value COL …` -> [(attr, value)] (values stripped); None when malformed."""
    text = text.strip()
    if not text.startswith("COL "):
        return None
    out = []
    for part in _COL_SPLIT.split(text):
        if not part.strip():
            continue
        part = part.strip()
        if part.endswith(" VAL") or part == "VAL":
            name, value = part[: -len("VAL")].strip(), ""
        else:
            m = _VAL.match(part)
            if not m:
                return None
            name, value = m.group(1).strip(), _clean(m.group(2)) or ""
        if not name:
            return None
        out.append((name, value))
    return out or None


def _em_product(pid: str, rec: list[tuple[str, str]]) -> dict | None:
    get = {}
    for a, v in rec:
        if v and a.lower() not in get:
            get[a.lower()] = (a, v)
    used = set()

    def take(*names):
        for nm in names:
            if nm in get:
                used.add(nm)
                return get[nm][1]
        return None

    title = take("title", "name")
    if title is None:
        first = next(((a, v) for a, v in rec if v), None)
        if first is None:
            return None
        title = first[1]
        used.add(first[0].lower())
    desc = take("description")
    brand = take("brand", "manufacturer")
    attrs = [{"name": a, "value": v} for k, (a, v) in get.items() if k not in used]
    return {"product_id": pid, "title": title, "description": desc, "brand": brand,
            "attributes": attrs}


def _import_em(ctx: _Ctx) -> None:
    p = ctx.path
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*.txt") if f.is_file()
                                           and not f.name.startswith("."))
    if not files:
        raise ValueError(f"entity-matching: no *.txt pair files (train.txt, valid.txt, test.txt) "
                         f"in {p} or its sub-folders")
    ctx.files = files
    products: dict[str, dict] = {}
    matches, seen = [], set()
    for file in files:
        for n, line in _iter_lines(ctx, file):
            fields = line.split("\t")
            if len(fields) != 3:
                ctx.skip(file, n, f"expected 3 tab-separated fields (left, right, label), got "
                                  f"{len(fields)}", line)
                continue
            try:
                label = int(fields[2].strip())
            except ValueError:
                label = -1
            if label not in (0, 1):
                ctx.skip(file, n, f"label is not 0 or 1: {fields[2].strip()!r}", line)
                continue
            ids = []
            for side in fields[:2]:
                rec = parse_record(side)
                key = " ".join(side.split())
                pid = "em-" + hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]
                prod = None if rec is None else (products.get(pid) or _em_product(pid, rec))
                if prod is None:
                    break
                products.setdefault(pid, prod)
                ids.append(pid)
            if len(ids) != 2:
                ctx.skip(file, n, "a record is not `COL attr VAL value …` with a non-empty value",
                         line)
                continue
            row = (ids[0], ids[1], label)
            if row not in seen:
                seen.add(row)
                matches.append({"left_id": ids[0], "right_id": ids[1], "label": label})
    if not products:
        raise ValueError(f"entity-matching: no valid pair lines in {', '.join(map(str, files))} "
                         f"(expected `COL attr VAL value … <TAB> COL … <TAB> label`)")
    ctx.write("products", list(products.values()), PRODUCTS)
    ctx.write("taxonomy", [], TAXONOMY)
    ctx.write("matches", matches, GOLD_TABLES["matches"], gold=True)
    ctx.notes["match_pairs_positive"] = sum(1 for m in matches if m["label"] == 1)


# ---- the entry point --------------------------------------------------------------------------
_IMPORTERS = {
    "instacart": _import_instacart,
    "oa-mine": lambda ctx: _import_tagging(ctx, "oa"),
    "ae-110k": lambda ctx: _import_tagging(ctx, "ae"),
    "wdc-pave": _import_wdc,
    "off-taxonomy": _import_off,
    "google-taxonomy": _import_google,
    "entity-matching": _import_em,
}


def _clear_outputs(out: Path) -> None:
    """Remove the files an earlier import into the same folder may have left (only ours)."""
    for name in CATALOGUE_TABLES:
        (out / f"{name}.parquet").unlink(missing_ok=True)
    for name in GOLD_TABLES:
        (out / "gold" / f"{name}.parquet").unlink(missing_ok=True)
    (out / "gold" / "manifest.json").unlink(missing_ok=True)
    (out / SKIPPED_FILE).unlink(missing_ok=True)


BRANCH_SOURCES = ("oa-mine", "ae-110k", "wdc-pave")
NESTED_SET_FILE = "taxonomy_nested_set.en-US.txt"


def _branches_file(src: str, branches: str | Path) -> Path:
    if src not in BRANCH_SOURCES:
        raise ValueError(f"--branches is for the tagging sets ({', '.join(BRANCH_SOURCES)}), "
                         f"not {src}")
    b = Path(branches).expanduser()
    if b.is_dir() and (b / NESTED_SET_FILE).is_file():
        b = b / NESTED_SET_FILE
    if not b.is_file():
        raise ValueError(f"--branches {b}: no such file (expected the Google product taxonomy "
                         f"in nested-set form, `id | [left-right] | name` lines, e.g. "
                         f"{NESTED_SET_FILE})")
    return b.resolve()


def import_source(source: str, path: str | Path, out: str | Path, *, blind: bool = False,
                  holdout: float = 0.1, seed: int = 0, branches: str | Path | None = None) -> dict:
    """Import one public set (see SOURCES) from `path` (its folder or one file) into the catalogue
    directory `out`. Returns a summary: counts per written table, skipped lines, notes.

    `branches` (oa-mine, ae-110k, wdc-pave): a nested-set taxonomy file (the Google product
    taxonomy, or a folder holding taxonomy_nested_set.en-US.txt) to place the set's categories
    under; see `_place` for the matching. notes["placements"] gives each category's path,
    notes["unplaced_categories"] the ones left roots."""
    src = str(source).strip().lower().replace("_", "-")
    if src not in _IMPORTERS:
        raise ValueError(f"unknown source {source!r}; expected one of: {', '.join(SOURCES)}")
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"{src}: path not found: {p}")
    if not (p.is_file() or p.is_dir()):
        raise ValueError(f"{src}: not a file or folder: {p}")
    try:
        holdout = float(holdout)
    except (TypeError, ValueError):
        raise ValueError(f"holdout must be a number in [0, 1], got {holdout!r}") from None
    if not 0.0 <= holdout <= 1.0:
        raise ValueError(f"holdout must be in [0, 1], got {holdout}")
    if branches is not None:
        branches = _branches_file(src, branches)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    ctx = _Ctx(source=src, path=p.resolve(), out=out, blind=bool(blind), holdout=holdout,
               seed=int(seed), branches=branches)
    out.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out)
    try:
        _IMPORTERS[src](ctx)
    except UnicodeDecodeError as e:  # pragma: no cover - text is read with errors="replace"
        raise ValueError(f"{src}: {p} is not UTF-8 text: {e}") from e
    if ctx.skipped:
        with open(out / SKIPPED_FILE, "w", encoding="utf-8") as f:
            for r in ctx.skipped:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    summary = {
        "source": src,
        "path": str(ctx.path),
        "files": [str(f) for f in ctx.files],
        "out": str(out),
        "blind": ctx.blind,
        "holdout": ctx.holdout,
        "seed": ctx.seed,
        "branches": None if ctx.branches is None else str(ctx.branches),
        "counts": dict(ctx.counts),
        "skipped_lines": len(ctx.skipped),
        "notes": ctx.notes,
    }
    (out / "gold").mkdir(parents=True, exist_ok=True)
    (out / "gold" / "manifest.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


__all__ = ["SOURCES", "import_source", "locate", "locate_type", "parse_record"]
