"""Named baselines that `autoknow eval` scores beside a real run, on the same gold.

A baseline writes the files a rebuild writes — RUN/graph/triples/ (shards), RUN/graph/taxonomy.parquet
and, for the @k metrics, RUN/taxonomy/*_candidates.parquet — so `evaluate(RUN, GOLD)` scores it
with exactly the code that scores a run.

- dictionary: attribute values and type names learned from a training catalogue, looked up in the
  test titles (whole words, longest match first).
- centroid:   hypernym placement by the nearest centroid of sentence embeddings: a type to place
  under the parent whose children it resembles, an untyped product under the type whose titles
  it resembles.
"""
from __future__ import annotations

import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from autoknow_ray.eval.evaluate import evaluate
from autoknow_ray.graph.assemble import KEY, catalogue_triples
from autoknow_ray.spans import NULL_VALUES, resolve_overlaps, type_variants
from autoknow_ray.taxonomy_tree import orphan_types, taxonomy_maps
from autoknow_ray.pipeline import read_parquet_any, table_file, write_table
from autoknow_ray.schema import GRAPH_TAXONOMY, HAS_TYPE, PRODUCTS, TRIPLES, conform

CANDIDATE_TABLES = ("hypernym_candidates", "product_type_candidates")
TOKEN = re.compile(r"\w+|[^\w\s]")
_END = ""  # trie key of a node's payload; never a (token, gap) pair

Key = tuple[tuple[str, bool], ...]
Match = tuple[object, int, int]


# ---- reading and writing ---------------------------------------------------------------------
def read_catalogue_table(catalogue: str | Path, name: str) -> pl.DataFrame:
    """`<name>.parquet` or a folder `<name>/` of shards; an empty frame when the table is absent."""
    catalogue = Path(catalogue)
    if not catalogue.is_dir():
        raise FileNotFoundError(f"catalogue folder not found: {catalogue}")
    p = table_file(catalogue, name)
    return read_parquet_any(p) if p.exists() else pl.DataFrame()


def _products(catalogue: str | Path) -> pl.DataFrame:
    """The products with every PRODUCTS column (a missing one as nulls)."""
    df = read_catalogue_table(catalogue, "products")
    return pl.from_arrow(conform(df.to_arrow(), PRODUCTS))


def _graph_taxonomy(taxonomy: pl.DataFrame) -> pl.DataFrame:
    """The catalogue's taxonomy as graph rows, the way the graph stage writes it."""
    if taxonomy.height == 0:
        return pl.from_arrow(GRAPH_TAXONOMY.empty_table())
    return taxonomy.select(pl.col("type").cast(pl.String), pl.col("parent").cast(pl.String),
                           pl.lit(False).alias("is_new"), pl.lit(1.0, pl.Float32).alias("confidence"))


def _write_run(out: Path, triples: pl.DataFrame, taxonomy: pl.DataFrame,
               candidates: dict[str, pl.DataFrame]) -> list[str]:
    """Write the graph files and the candidate lists; a stale candidate list left by another
    method in the same folder would otherwise be scored as this one's."""
    for name in CANDIDATE_TABLES:
        (out / "taxonomy" / f"{name}.parquet").unlink(missing_ok=True)
    # the triples as the graph stage writes them: a folder of shards, no stale file beside it
    (out / "graph" / "triples.parquet").unlink(missing_ok=True)
    shutil.rmtree(out / "graph" / "triples", ignore_errors=True)
    paths = [(out / "graph" / "triples" / "part-00000.parquet", triples, TRIPLES),
             (out / "graph" / "taxonomy.parquet", taxonomy, GRAPH_TAXONOMY)]
    paths += [(out / "taxonomy" / f"{n}.parquet", df, None) for n, df in candidates.items()]
    for path, df, schema in paths:
        write_table(path, df, schema)
    return [str(p) for p, _, _ in paths]


# ---- phrase matching -------------------------------------------------------------------------
def phrase_key(text: str) -> Key:
    """Lowercased tokens (word runs, single other characters), each with 'whitespace before it'.

    Two strings share a key exactly when distant.py's pattern for one matches the other in full:
    case and the length of whitespace runs do not matter, word boundaries and punctuation
    adjacency do ("usb-c" is not "usb c").
    """
    out: list[tuple[str, bool]] = []
    prev_end = None
    for m in TOKEN.finditer(text):
        out.append((m.group().lower(), prev_end is not None and m.start() > prev_end))
        prev_end = m.end()
    return tuple(out)


class PhraseTrie:
    """Phrases (as `phrase_key`s) in a token trie: one pass over a title finds every occurrence.

    distant._Matcher compiles a regex per value, which suits a product's own few values; a
    dictionary of 10k+ values against 50k+ titles needs a lookup whose cost does not grow with
    the dictionary.
    """

    def __init__(self) -> None:
        self.root: dict = {}
        self.size = 0

    def add(self, key: Key, payload: object) -> None:
        """The first payload added for a key stays."""
        if not key:
            return
        node = self.root
        for tok in key:
            node = node.setdefault(tok, {})
        if _END not in node:
            node[_END] = payload
            self.size += 1

    def find_all(self, text: str) -> list[Match]:
        """Every (payload, start, end) occurrence, overlapping ones included."""
        toks = [(m.start(), m.end(), m.group().lower()) for m in TOKEN.finditer(text)]
        out: list[Match] = []
        for i, (start, _, tok) in enumerate(toks):
            node = self.root.get((tok, False))
            j = i
            while node is not None:
                if _END in node:
                    out.append((node[_END], start, toks[j][1]))
                j += 1
                if j == len(toks):
                    break
                node = node.get((toks[j][2], toks[j][0] > toks[j - 1][1]))
        return out


# ---- dictionary baseline ---------------------------------------------------------------------
def _value_key(value: object, max_chars: int) -> Key | None:
    if not isinstance(value, str) or len(value) > max_chars:
        return None
    if " ".join(value.split()).lower() in NULL_VALUES:
        return None
    return phrase_key(value) or None


@dataclass
class DictionaryBaseline:
    """value -> attribute and type-name lookups learned from a training catalogue."""

    values: PhraseTrie  # payload: attribute name
    types: PhraseTrie  # payload: the type a name variant stands for
    default_type: str | None  # the most frequent training type, for titles naming none
    default_share: float  # its share of the typed training products: the fallback's confidence
    stats: dict = field(default_factory=dict)

    def extract(self, title: str) -> tuple[list[tuple[str, int, int]], tuple[str, int, int] | None]:
        """(attribute spans, longest type-name span or None) in one title."""
        cands = [(attr, s, e, 0) for attr, s, e in self.values.find_all(title)]
        spans = resolve_overlaps(cands)
        types = self.types.find_all(title)
        best = max(types, key=lambda m: (m[2] - m[1], -m[1])) if types else None
        return spans, best

    def triples(self, products: pl.DataFrame) -> pl.DataFrame:
        """One `added` triple per attribute match and one has_type per product (TRIPLES)."""
        rows: list[tuple] = []
        for pid, title in products.select("product_id", "title").iter_rows():
            if not isinstance(title, str) or not title.strip():
                continue
            spans, best = self.extract(title)
            for attr, s, e in spans:
                rows.append((pid, attr, title[s:e], 1.0, f"title[{s}:{e}]"))
            if best is not None:
                rows.append((pid, HAS_TYPE, best[0], 1.0, f"title[{best[1]}:{best[2]}]"))
            elif self.default_type is not None:
                rows.append((pid, HAS_TYPE, self.default_type, self.default_share, "most frequent type"))
        df = pl.DataFrame(rows, schema={"subject": pl.String, "relation": pl.String, "object": pl.String,
                                        "confidence": pl.Float32, "evidence": pl.String}, orient="row")
        return df.unique(subset=KEY, keep="first", maintain_order=True).with_columns(
            pl.lit("baseline:dictionary").alias("module"), pl.lit("added").alias("status"))


def learn_dictionary(products: pl.DataFrame, max_value_chars: int = 200) -> DictionaryBaseline:
    """Learn the lookups from training products (PRODUCTS columns).

    A value seen under several attributes goes to the one it was seen under most often; a value
    never found verbatim (whole words) in any training title is dropped — catalogue values that
    titles do not spell out ("Yes", codes, long descriptions) would only add false matches.
    """
    products = pl.from_arrow(conform(products.to_arrow(), PRODUCTS))
    votes: dict[Key, Counter] = defaultdict(Counter)
    for pairs, brand in products.select("attributes", "brand").iter_rows():
        named = [(p.get("name"), p.get("value")) for p in pairs or [] if p]
        # `brand` is the Brand fact when the attributes do not already carry that value
        if isinstance(brand, str) and brand not in {v for _, v in named}:
            named.append(("Brand", brand))
        for name, value in named:
            key = _value_key(value, max_value_chars)
            if key and isinstance(name, str) and name.strip():
                votes[key][name.strip()] += 1
    every = PhraseTrie()
    for key in votes:
        every.add(key, key)
    seen = {key for t in products["title"].to_list() if isinstance(t, str)
            for key, _, _ in every.find_all(t)}
    values = PhraseTrie()
    for key in sorted(seen):
        values.add(key, min(votes[key].items(), key=lambda kv: (-kv[1], kv[0]))[0])

    counts = Counter(t.strip() for t in products["product_type"].to_list()
                     if isinstance(t, str) and t.strip())
    types = PhraseTrie()
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    for t, _ in ranked:  # a name variant shared by two types goes to the more frequent one
        for variant in type_variants(t):
            types.add(phrase_key(variant), t)
    default, share = (ranked[0][0], ranked[0][1] / sum(counts.values())) if ranked else (None, 0.0)
    stats = {"values_seen": len(votes), "values_kept": values.size, "types": len(counts),
             "type_names": types.size, "default_type": default}
    return DictionaryBaseline(values, types, default, share, stats)


def run_dictionary(train: str | Path, catalogue: str | Path, out: str | Path) -> dict:
    """Learn from `train`, extract from `catalogue`'s titles, write a scorable run to `out`."""
    train_products = _products(train)
    if train_products.height == 0:
        raise ValueError(f"{train}: no products to learn a dictionary from")
    test = _products(catalogue)
    if test.height == 0:
        raise ValueError(f"{catalogue}: no products to extract from")
    model = learn_dictionary(train_products)
    triples = model.triples(test)
    taxonomy = _graph_taxonomy(read_catalogue_table(train, "taxonomy"))
    files = _write_run(Path(out), triples, taxonomy, {})
    is_type = triples["relation"] == HAS_TYPE
    titled = int((test["title"].str.strip_chars().str.len_chars().fill_null(0) > 0).sum())
    return {"baseline": "dictionary", **model.stats, "products": test.height,
            "products_without_title": test.height - titled,  # no triple can come from them
            "attribute_triples": int((~is_type).sum()), "type_triples": int(is_type.sum()),
            "types_from_title": int((is_type & triples["evidence"].str.starts_with("title")).sum()),
            "files": files}


# ---- centroid baseline -----------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _rank(queries: np.ndarray, centroids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (cosine, centroid row) per query; exact inner-product search (FAISS)."""
    from autoknow_ray.index.faiss_index import VectorIndex

    index = VectorIndex(metric="ip").build(_unit(centroids))
    return index.search(queries, k)


def _ranked_frame(children: list[str], labels: list[str], scores: np.ndarray, ids: np.ndarray,
                  child_col: str, label_col: str) -> pl.DataFrame:
    """Rows (child, label, rank 1.., score) from a search result, padding dropped."""
    k = ids.shape[1]
    keep = ids.reshape(-1) >= 0
    lab = np.asarray(labels, dtype=object)
    return pl.DataFrame({
        child_col: np.repeat(np.asarray(children, dtype=object), k)[keep].tolist(),
        label_col: lab[ids.reshape(-1)[keep]].tolist(),
        "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(children))[keep],
        "score": scores.reshape(-1)[keep].astype(np.float32),
    }, schema={child_col: pl.String, label_col: pl.String, "rank": pl.Int32, "score": pl.Float32})


def _no_ranks(child_col: str, label_col: str) -> pl.DataFrame:
    return _ranked_frame([], [], np.zeros((0, 1), np.float32), np.zeros((0, 1), np.int64),
                         child_col, label_col)


def place_types(taxonomy: pl.DataFrame, products: pl.DataFrame, encoder, top_k: int = 10) -> pl.DataFrame:
    """Ranked parents (type, parent, rank, score) of each type to place.

    A candidate parent is any type with children; its centroid is the mean embedding of its own
    name and its children's names, since a parent is best described by what sits under it.
    """
    _, children = taxonomy_maps(taxonomy)
    hosts = sorted(t for t, c in children.items() if c)
    typed = set(products.get_column("product_type").drop_nulls().to_list()) \
        if "product_type" in products.columns else set()
    orphans = orphan_types(taxonomy, typed) if hosts else []
    if not orphans:
        return _no_ranks("type", "parent")
    names = sorted({*orphans, *hosts, *(c for h in hosts for c in children[h])})
    row = {n: i for i, n in enumerate(names)}
    vec = encoder.encode(names)
    cents = np.stack([vec[[row[h], *(row[c] for c in sorted(children[h]))]].mean(0) for h in hosts])
    scores, ids = _rank(vec[[row[o] for o in orphans]], cents, top_k)
    return _ranked_frame(orphans, hosts, scores, ids, "type", "parent")


def type_products(products: pl.DataFrame, taxonomy: pl.DataFrame, encoder, top_k: int = 10,
                  titles_per_type: int = 200, seed: int = 0) -> pl.DataFrame:
    """Ranked types (product_id, type, rank, score) of each untyped product.

    A type's centroid is the mean embedding of its name and of (a seeded sample of) the titles of
    the products typed with it; with no typed product at all (a blind catalogue) the candidates
    are the taxonomy's leaves, described by their names alone.
    """
    titled = products.filter(pl.col("title").str.strip_chars().str.len_chars() > 0)
    untyped = titled.filter(pl.col("product_type").is_null())
    if untyped.height == 0:
        return _no_ranks("product_id", "type")
    sample = (titled.filter(pl.col("product_type").is_not_null())
              .sample(fraction=1.0, shuffle=True, seed=seed)
              .filter(pl.int_range(pl.len()).over("product_type") < titles_per_type))
    if sample.height:
        types = sorted(set(sample["product_type"].to_list()))
    else:
        _, children = taxonomy_maps(taxonomy)
        types = sorted(t for t, c in children.items() if not c)
    if not types:
        return _no_ranks("product_id", "type")
    row = {t: i for i, t in enumerate(types)}
    sums = encoder.encode(types).astype(np.float64)
    if sample.height:
        np.add.at(sums, [row[t] for t in sample["product_type"].to_list()],
                  encoder.encode(sample["title"].to_list()))
    scores, ids = _rank(encoder.encode(untyped["title"].to_list()), sums.astype(np.float32), top_k)
    return _ranked_frame(untyped["product_id"].to_list(), types, scores, ids, "product_id", "type")


def run_centroid(catalogue: str | Path, out: str | Path, encoder: str = "default", *, top_k: int = 10,
                 titles_per_type: int = 200, seed: int = 0, device: str = "auto") -> dict:
    """Place `catalogue`'s types to place and untyped products; write a scorable run to `out`.

    The graph keeps the catalogue's own facts (as a rebuild of the same catalogue does), adds a
    has_type for each untyped product's best type, and replaces each placed type's parentless
    placeholder with its best parent.
    """
    from autoknow_ray.nn.encoder import TextEncoder

    products = _products(catalogue)
    taxonomy = read_catalogue_table(catalogue, "taxonomy")
    if taxonomy.height:
        taxonomy = taxonomy.select(pl.col("type").cast(pl.String), pl.col("parent").cast(pl.String))
    enc = TextEncoder(encoder, device=device)
    hyp = place_types(taxonomy, products, enc, top_k)
    ptc = type_products(products, taxonomy, enc, top_k, titles_per_type, seed)

    added = ptc.filter(pl.col("rank") == 1).select(
        pl.col("product_id").alias("subject"), pl.lit(HAS_TYPE).alias("relation"),
        pl.col("type").alias("object"), pl.col("score").alias("confidence"),
        pl.lit("baseline:centroid").alias("module"), pl.lit("added").alias("status"),
        pl.lit("nearest title centroid").alias("evidence"))
    triples = pl.concat([catalogue_triples(products), added], how="vertical_relaxed")

    best = hyp.filter(pl.col("rank") == 1)
    graph_tax = _graph_taxonomy(taxonomy).filter(
        ~(pl.col("parent").is_null() & pl.col("type").is_in(best["type"].to_list())))
    graph_tax = pl.concat([graph_tax, best.select(
        "type", "parent", pl.lit(False).alias("is_new"), pl.col("score").alias("confidence"))],
        how="vertical_relaxed")
    files = _write_run(Path(out), triples, graph_tax,
                       {"hypernym_candidates": hyp, "product_type_candidates": ptc})
    return {"baseline": "centroid", "encoder": encoder, "types_placed": best.height,
            "parents_in_candidates": hyp["parent"].n_unique(), "products_typed": added.height,
            "types_in_candidates": ptc["type"].n_unique(), "files": files}


# ---- comparing runs --------------------------------------------------------------------------
def evaluate_runs(runs: list[str | Path], gold: str | Path) -> dict[str, dict]:
    """Score every run on the same gold (each writes its eval.json); keyed by run folder name,
    or by the path as given where two folders share a name."""
    names = [Path(r).resolve().name for r in runs]
    labels = [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs)]
    return {label: evaluate(r, gold) for label, r in zip(labels, runs)}


def format_comparison(columns: dict[str, dict]) -> str:
    """One table, a column per run; a metric a run lacks shows as '-'."""
    keys = sorted({k for res in columns.values() for k, v in res.items() if not isinstance(v, (dict, list))})
    if not keys:
        return "(no gold labels that these runs can be scored on)"

    def cell(v: object) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    body = [[k, *(cell(res.get(k)) for res in columns.values())] for k in keys]
    header = ["metric", *columns]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])
