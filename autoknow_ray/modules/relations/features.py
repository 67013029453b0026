"""Features of (product type, attribute) pairs, counted in the workers and joined on the driver.

Provider text (title, description, bullets of each product) and customer text (reviews, questions,
answers and search queries of the product) are matched against a bounded vocabulary: attribute
names and a capped sample of each attribute's known values. A worker counts, per batch, how many
products of each type mention each attribute (by name or by a value) and hands back only those
sparse per-type counts; Ray Data sums them per (type, attribute). The driver then holds a
types x attributes table, never a product.

The structured attributes are counted too (`filled`), but only to make labels at fit time: the fill
rate defines the label, so it is never a feature.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from autoknow_ray.steps import CHEAP_ROWS_PER_CALL, Step
from autoknow_ray.text import fold

TOKEN = re.compile(r"\w+")
TOTAL = ""  # attribute of the per-type total rows (attribute names are never empty)
# sources of the sparse counts: per (type, attribute) hits, and per type totals (attribute TOTAL)
VALUE, NAME, FILLED, TEXT, QUERY = "value", "name", "filled", "text", "query"
# module 1 read a value of the attribute in the product's title (typed_products'
# `title_attributes`): evidence at rebuild, like `filled` never a feature (fit has no tagger output)
TAGGED = "tagged"
# the same, each product weighed by the best confidence of its span, in thousandths (sums stay
# integers): a count that low-confidence tags add little to
TAGGED_SCORE = "tagged_score"
SHAPE = "shape"  # a value template (numbers abstracted) of the attribute occurs
PRODUCTS, EMPTY, UNMATCHED = "products", "empty", "unmatched"
COUNTS = pa.schema([("type", pa.string()), ("attribute", pa.string()), ("source", pa.string()),
                    ("hits", pa.int64())])


def tokens(text: str) -> list[str]:
    return TOKEN.findall(fold(text))


DIGITS = re.compile(r"\d+")


def shape(token: str) -> str:
    """A token with its numbers abstracted: "16" -> "0", "10oz" -> "0oz"."""
    return DIGITS.sub("0", token)


def value_template(toks: tuple[str, ...]) -> tuple[str, ...] | None:
    """The value's token template with numbers abstracted ("16 capsules" -> ("0", "capsules")),
    when it has both a number and a word (so it says more than "a number" and differs from the
    value itself): it finds the attribute's unseen values of the same form ("60 capsules")."""
    shaped = tuple(shape(t) for t in toks)
    if shaped == toks or not any(sum(c.isalpha() for c in t) >= 2 for t in shaped):
        return None
    return shaped


def name_forms(name: str) -> set[tuple[str, ...]]:
    """Token forms of an attribute name that count as a mention: "Color(s)" -> color, colors."""
    toks = tokens(name)
    if len(toks) > 1 and toks[-1] == "s":  # "Color(s)"
        toks = toks[:-1]
    if not toks:
        return set()
    last = toks[-1]
    forms = {last, last + "s"}
    if last.endswith("s") and len(last) > 3:
        forms.add(last[:-1])
    if last.endswith("y") and len(last) > 2:
        forms.add(last[:-1] + "ies")
    return {(*toks[:-1], f) for f in forms}


@dataclass
class Vocabulary:
    """Attribute names and, per attribute, a capped sample of known values (bounded: it travels
    to every worker inside a step)."""

    attributes: list[str]
    values: dict[str, list[str]] = field(default_factory=dict)
    products: dict[str, int] = field(default_factory=dict)  # products filled, in the sample
    # attribute -> value -> the types (capped) whose products carry it: a value counts as evidence
    # for a type only when other types have it too, in fit exactly as for a type never seen
    value_types: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"attributes": self.attributes, "values": self.values, "products": self.products,
                "value_types": self.value_types}

    @classmethod
    def from_json(cls, d: dict) -> "Vocabulary":
        return cls(list(d["attributes"]), dict(d.get("values", {})), dict(d.get("products", {})),
                   dict(d.get("value_types", {})))

    def merged(self, other: "Vocabulary", max_attributes: int, per_attribute: int) -> "Vocabulary":
        """This vocabulary first, then the other's attributes, within the caps."""
        attrs = list(dict.fromkeys([*self.attributes, *other.attributes]))[:max_attributes]
        values = {a: list(dict.fromkeys([*self.values.get(a, []), *other.values.get(a, [])]))
                  [:per_attribute] for a in attrs}
        products = {a: self.products.get(a, 0) + other.products.get(a, 0) for a in attrs}
        value_types = {a: {v: sorted(set(self.value_types.get(a, {}).get(v, []))
                                     | set(other.value_types.get(a, {}).get(v, [])))
                           for v in values[a]} for a in attrs}
        return Vocabulary(attrs, values, products, value_types)


# two carriers of a value are enough to know whether a type other than a product's own has it
TYPES_PER_VALUE = 2


def build_vocabulary(sample: pl.DataFrame, max_attributes: int, per_attribute: int) -> Vocabulary:
    """From a bounded sample of products (`attributes`, and `type` when known): the most filled
    attributes, their most frequent values, and which types carry each value."""
    if sample.height == 0 or "attributes" not in sample.columns:
        return Vocabulary([])
    if "type" not in sample.columns:
        sample = sample.with_columns(pl.lit(None, pl.String).alias("type"))
    pairs = (sample.select("product_id", "type", "attributes").explode("attributes")
             .drop_nulls("attributes").unnest("attributes")
             .filter(pl.col("name").is_not_null() & (pl.col("name").str.strip_chars() != "")))
    if pairs.height == 0:
        return Vocabulary([])
    per_attr = (pairs.group_by("name").agg(pl.col("product_id").n_unique().alias("n"))
                .sort(["n", "name"], descending=[True, False]).head(max_attributes))
    attrs = per_attr["name"].to_list()
    vals = (pairs.filter(pl.col("name").is_in(attrs) & pl.col("value").is_not_null())
            .group_by("name", "value").len().sort(["name", "len", "value"],
                                                   descending=[False, True, False]))
    values = {a: g["value"].head(per_attribute).to_list()
              for (a,), g in vals.group_by("name", maintain_order=True)}
    carried = (pairs.filter(pl.col("name").is_in(attrs) & pl.col("type").is_not_null())
               .group_by("name", "value").agg(pl.col("type").unique().sort()
                                              .head(TYPES_PER_VALUE)))
    value_types: dict[str, dict[str, list[str]]] = {a: {} for a in attrs}
    for a, v, ts in carried.iter_rows():
        if v in values.get(a, ()):
            value_types[a][v] = ts
    return Vocabulary(attrs, {a: values.get(a, []) for a in attrs},
                      dict(zip(attrs, per_attr["n"].to_list())), value_types)


class Matcher:
    """Finds which attributes a text mentions, by name or by a known value: a lookup of the
    text's 1..n-token windows in a dict, so the cost grows with the text, not the vocabulary."""

    def __init__(self, vocab: Vocabulary, max_value_tokens: int):
        self.names: dict[tuple[str, ...], set[int]] = defaultdict(set)
        # token key -> attribute index -> the types that carry the value
        self.values: dict[tuple[str, ...], dict[int, set[str]]] = defaultdict(dict)
        # the same, keyed by value templates (numbers abstracted), looked up in the shaped text
        self.templates: dict[tuple[str, ...], dict[int, set[str]]] = defaultdict(dict)
        for i, a in enumerate(vocab.attributes):
            for f in name_forms(a):
                self.names[f].add(i)
            carried = vocab.value_types.get(a, {})
            for v in vocab.values.get(a, []):
                t = tuple(tokens(v or ""))
                if t and len(t) <= max_value_tokens and len("".join(t)) > 1:
                    self.values[t].setdefault(i, set()).update(carried.get(v, ()))
                    tpl = value_template(t)
                    if tpl is not None:
                        self.templates[tpl].setdefault(i, set()).update(carried.get(v, ()))
        self.max_n = max([len(k) for k in (*self.names, *self.values)] or [1])

    @staticmethod
    def _hits(table, key, own_type, out: set[int]) -> None:
        hit = table.get(key)
        if hit:
            for a, carriers in hit.items():
                if own_type is None or not carriers or carriers - {own_type}:
                    out.add(a)

    def match(self, text: str, own_type: str | None = None) -> tuple[set[int], set[int]]:
        """(attributes named, attributes with a value) in `text`. With `own_type`, a value counts
        only when a type other than `own_type` carries it (or its types are unknown)."""
        named, valued, _ = self.match_all(text, own_type, templates=False)
        return named, valued

    def match_all(self, text: str, own_type: str | None = None, templates: bool = True
                  ) -> tuple[set[int], set[int], set[int]]:
        """`match` plus the attributes one of whose value templates occurs (same carrier rule)."""
        toks = tokens(text)
        shaped = [shape(t) for t in toks] if templates and self.templates else None
        named, valued, templated = set(), set(), set()
        for n in range(1, self.max_n + 1):
            for i in range(len(toks) - n + 1):
                key = tuple(toks[i:i + n])
                if key in self.names:
                    named |= self.names[key]
                self._hits(self.values, key, own_type, valued)
                if shaped is not None:
                    self._hits(self.templates, tuple(shaped[i:i + n]), own_type, templated)
        return named, valued, templated


def _counts_table(acc: dict) -> pa.Table:
    if not acc:
        return COUNTS.empty_table()
    keys = list(acc)
    return pa.table({"type": [k[0] for k in keys], "attribute": [k[1] for k in keys],
                     "source": [k[2] for k in keys], "hits": [acc[k] for k in keys]}, schema=COUNTS)


class CountProviderMentions(Step):
    """Products -> sparse counts per (type, attribute): products whose title, description or
    bullets name the attribute or contain one of its values, and products where it is filled.
    Untyped products count under type "" (reported, never featurised)."""

    name = "relations_provider_counts"
    resources = "relations"
    # 1,024-row calls (the plan's): with 16,384 the 400k bench's provider counts over module 1's
    # typed products took 330.7 s against 75 s (docs/benchmarks.md), although the same step over
    # the ingested products went 60.4 -> 32.9 s; the split into larger blocks is the suspect
    columns = ("type", "title", "description", "bullets", "attributes")
    # a worker pool: the value matcher is built once per worker, not for every batch as a
    # task-mode step's setup() is
    model = True

    def __init__(self, vocab: Vocabulary, max_value_tokens: int, max_chars: int,
                 title_attributes: bool = False):
        self.vocab, self.max_value_tokens, self.max_chars = vocab, max_value_tokens, max_chars
        self.matcher: Matcher | None = None
        # module 1's `title_attributes`, read where the taxonomy stage wrote them
        self.columns = (*self.columns, "title_attributes") if title_attributes else self.columns

    def setup(self, env) -> None:
        self.matcher = Matcher(self.vocab, self.max_value_tokens)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if self.matcher is None:
            self.setup(None)
        attrs = self.vocab.attributes
        index = {a: i for i, a in enumerate(attrs)}
        acc: dict[tuple[str, str, str], int] = defaultdict(int)
        cols = {c: batch.column(c).to_pylist() if c in batch.column_names else [None] * batch.num_rows
                for c in (*CountProviderMentions.columns, "title_attributes")}
        for t, title, desc, bullets, filled, tagged in zip(*cols.values()):
            t = t or ""
            acc[(t, TOTAL, PRODUCTS)] += 1
            parts = [title or "", desc or "", *[b for b in (bullets or []) if b]]
            text = " \n ".join(p for p in parts if p)[: self.max_chars]
            if not text.strip():
                acc[(t, TOTAL, EMPTY)] += 1
            named, valued, templated = (self.matcher.match_all(text, t) if text
                                        else (set(), set(), set()))
            for i in named:
                acc[(t, attrs[i], NAME)] += 1
            for i in valued:
                acc[(t, attrs[i], VALUE)] += 1
            for i in templated:
                acc[(t, attrs[i], SHAPE)] += 1
            for a in {p.get("name") for p in (filled or []) if p and p.get("value")}:
                if a in index:
                    acc[(t, a, FILLED)] += 1
            for p in tagged or ():
                if p and p.get("name") in index:
                    acc[(t, p["name"], TAGGED)] += 1
                    acc[(t, p["name"], TAGGED_SCORE)] += round(1000 * float(p.get("confidence") or 0))
        return _counts_table(acc)


class CountCustomerMentions(Step):
    """Customer texts and queries -> sparse counts per (type, attribute) of texts that name the
    attribute or one of its values. `types` maps a bounded sample of product ids to their type;
    a text of another product counts under type "" as unmatched (unknown, untyped or not in the
    sample), so every row is accounted for."""

    name = "relations_customer_counts"
    resources = "relations"
    rows_per_call = CHEAP_ROWS_PER_CALL
    columns = ("product_id", "source", "text")
    # a worker pool: the matcher and the product -> type map (up to `customer_products` entries)
    # are built and deserialised once per worker, not for every batch as a task-mode step's are;
    # the matching runs ~95,000 texts a second on one core, so 16,384-row calls keep Ray's cost
    # per call (~50 ms) from being most of the pass (docs/benchmarks.md)
    model = True

    def __init__(self, vocab: Vocabulary, max_value_tokens: int, max_chars: int,
                 types: dict[str, str]):
        self.vocab, self.max_value_tokens, self.max_chars = vocab, max_value_tokens, max_chars
        self.types = types
        self.matcher: Matcher | None = None

    def setup(self, env) -> None:
        self.matcher = Matcher(self.vocab, self.max_value_tokens)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if self.matcher is None:
            self.setup(None)
        attrs = self.vocab.attributes
        acc: dict[tuple[str, str, str], int] = defaultdict(int)
        for pid, source, text in zip(*(batch.column(c).to_pylist() for c in self.columns)):
            t = self.types.get(pid)
            if not t:
                acc[("", TOTAL, source + "_" + UNMATCHED)] += 1
                continue
            acc[(t, TOTAL, source)] += 1
            text = (text or "")[: self.max_chars]
            if not text.strip():
                acc[(t, TOTAL, source + "_" + EMPTY)] += 1
                continue
            named, valued = self.matcher.match(text, t)
            for i in named | valued:
                acc[(t, attrs[i], source)] += 1
        return _counts_table(acc)


# ---- from counts to the pair features (driver; types x attributes) -------------------------
TEXT_FEATURES = ("value_rate", "name_rate", "shape_rate", "value_lift", "value_rank_in_type",
                 "text_rate", "query_rate", "has_texts", "has_queries")
NEIGHBOUR_FEATURES = ("tax_mean", "tax_known", "knn_mean", "knn_top_sim", "attr_prior",
                      "name_sim")
FEATURES = TEXT_FEATURES + NEIGHBOUR_FEATURES


def wide_counts(long: pl.DataFrame, attributes: list[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per type totals, per (type, attribute) hits) from the summed sparse counts."""
    if long.height == 0:
        long = pl.from_arrow(COUNTS.empty_table()).with_columns(pl.col("hits").cast(pl.Int64))
    totals = (long.filter(pl.col("attribute") == TOTAL)
              .pivot(on="source", index="type", values="hits", aggregate_function="sum")
              if long.filter(pl.col("attribute") == TOTAL).height else pl.DataFrame({"type": []},
                                                                                    schema={"type": pl.String}))
    for c in (PRODUCTS, EMPTY, TEXT, QUERY, *(f"{s}_{e}" for s in (TEXT, QUERY)
                                              for e in (EMPTY, UNMATCHED))):
        if c not in totals.columns:
            totals = totals.with_columns(pl.lit(0, pl.Int64).alias(c))
    totals = totals.fill_null(0)
    hits = long.filter((pl.col("attribute") != TOTAL) & pl.col("attribute").is_in(attributes))
    hits = (hits.pivot(on="source", index=["type", "attribute"], values="hits",
                       aggregate_function="sum") if hits.height
            else pl.DataFrame(schema={"type": pl.String, "attribute": pl.String}))
    for c in (VALUE, NAME, SHAPE, FILLED, TAGGED, TAGGED_SCORE, TEXT, QUERY):
        if c not in hits.columns:
            hits = hits.with_columns(pl.lit(0, pl.Int64).alias(c))
    return totals, hits.fill_null(0)


def text_features(totals: pl.DataFrame, hits: pl.DataFrame, types: list[str],
                  attributes: list[str]) -> pl.DataFrame:
    """One row per (type, attribute) of `types` x `attributes` with TEXT_FEATURES, plus the raw
    counts (`products`, `filled`, `tagged`, `tagged_score`, `text_hits`, `texts`) the labels, the evidence of
    the catalogue being rebuilt and the report use."""
    grid = (pl.DataFrame({"type": types}, schema={"type": pl.String})
            .join(pl.DataFrame({"attribute": attributes}, schema={"attribute": pl.String}),
                  how="cross").with_row_index("_row"))
    t = totals.select("type", pl.col(PRODUCTS).alias("products"), pl.col(TEXT).alias("texts"),
                      pl.col(QUERY).alias("queries"))
    h = hits.select("type", "attribute", pl.col(VALUE).alias("value_hits"),
                    pl.col(NAME).alias("name_hits"), pl.col(SHAPE).alias("shape_hits"),
                    pl.col(FILLED).alias("filled"), pl.col(TAGGED).alias("tagged"),
                    (pl.col(TAGGED_SCORE) / 1000.0).alias("tagged_score"),
                    pl.col(TEXT).alias("text_hits"), pl.col(QUERY).alias("query_hits"))
    df = (grid.join(t, on="type", how="left").join(h, on=["type", "attribute"], how="left")
          .fill_null(0))
    n = pl.col("products").cast(pl.Float64).clip(1, None)
    df = df.with_columns(
        value_rate=pl.col("value_hits") / n,
        name_rate=pl.col("name_hits") / n,
        shape_rate=pl.col("shape_hits") / n,
        text_rate=pl.col("text_hits") / pl.col("texts").cast(pl.Float64).clip(1, None),
        query_rate=pl.col("query_hits") / pl.col("queries").cast(pl.Float64).clip(1, None),
        has_texts=(pl.col("texts") > 0).cast(pl.Float64),
        has_queries=(pl.col("queries") > 0).cast(pl.Float64),
    )
    # how a type's value rate stands against the attribute's rate over all products (values that
    # occur everywhere, like numbers, say little), and within the type's own attributes
    base = df.group_by("attribute").agg(
        (pl.col("value_hits").sum() / pl.col("products").sum().cast(pl.Float64).clip(1, None))
        .alias("_base"))
    df = df.join(base, on="attribute", how="left").with_columns(
        value_lift=((pl.col("value_rate") + 1e-3) / (pl.col("_base") + 1e-3)).log(),
        value_rank_in_type=pl.col("value_rate").rank("average").over("type")
        / pl.len().over("type").cast(pl.Float64),
    ).drop("_base")
    return df.sort("_row").drop("_row")


def neighbour_features(types: list[str], attributes: list[str], known_types: list[str],
                       known_labels: np.ndarray, known_emb: np.ndarray, type_emb: np.ndarray,
                       attr_emb: np.ndarray, taxonomy: pl.DataFrame, k: int) -> np.ndarray:
    """(len(types), len(attributes), len(NEIGHBOUR_FEATURES)): what the type's neighbours that
    were labelled in fit say about each attribute. A type is never its own neighbour (at fit the
    features are leave-one-out, so the model learns to use them as it must for new types).

    known_labels: (len(known_types), len(attributes)) 0/1; embeddings are L2-normalised rows."""
    nt, na = len(types), len(attributes)
    out = np.zeros((nt, na, len(NEIGHBOUR_FEATURES)), dtype=np.float32)
    if nt == 0 or na == 0:
        return out
    kidx = {t: i for i, t in enumerate(known_types)}
    # taxonomy neighbours: parents, siblings (other children of a parent) and children
    parents: dict[str, set[str]] = defaultdict(set)
    children: dict[str, set[str]] = defaultdict(set)
    if taxonomy.height:
        for c, p in taxonomy.select("type", "parent").drop_nulls().iter_rows():
            if c != p:
                parents[c].add(p)
                children[p].add(c)
    label_sum = known_labels.sum(axis=0) if len(known_types) else np.zeros(na)
    n_known = len(known_types)
    sims = type_emb @ known_emb.T if n_known else np.zeros((nt, 0), np.float32)
    for i, t in enumerate(types):
        own = kidx.get(t)
        neigh = set(parents[t]) | set(children[t])
        for p in parents[t]:
            neigh |= children[p]
        idx = [kidx[x] for x in neigh if x in kidx and x != t]
        if idx:
            out[i, :, 0] = known_labels[idx].mean(axis=0)
            out[i, :, 1] = np.log1p(len(idx))
        if n_known:
            s = sims[i].copy()
            if own is not None:
                s[own] = -np.inf
            m = n_known - (own is not None)
            if m > 0:
                top = np.argsort(-s)[: min(k, m)]
                w = np.clip(s[top], 1e-3, None)
                out[i, :, 2] = (w[:, None] * known_labels[top]).sum(axis=0) / w.sum()
                out[i, :, 3] = s[top[0]]
            # how common the attribute is among the other known types
            own_row = known_labels[own] if own is not None else 0.0
            out[i, :, 4] = (label_sum - own_row) / max(1, n_known - (own is not None))
    out[:, :, 5] = type_emb @ attr_emb.T
    return out


def embed_names(encoder: str, names: list[str], device: str = "auto") -> np.ndarray:
    """Name embeddings (type and attribute names: a few thousand short strings at most)."""
    from autoknow_ray.nn.encoder import TextEncoder

    if not names:
        return np.zeros((0, 384), dtype=np.float32)
    return TextEncoder(encoder, device=device, max_length=16).encode(list(names))


@dataclass
class Known:
    """The types labelled in fit: names, name embeddings, and which attributes apply (0/1)."""

    types: list[str]
    embeddings: np.ndarray  # (types, dim), L2-normalised
    labels: np.ndarray  # (types, attributes of `attributes`)
    attributes: list[str]

    def for_attributes(self, attributes: list[str]) -> np.ndarray:
        """The label matrix over `attributes` (an attribute unknown in fit: all 0)."""
        out = np.zeros((len(self.types), len(attributes)), dtype=np.float32)
        col = {a: i for i, a in enumerate(self.attributes)}
        for j, a in enumerate(attributes):
            if a in col:
                out[:, j] = self.labels[:, col[a]]
        return out


def feature_matrix(text: pl.DataFrame, types: list[str], attributes: list[str], known: Known,
                   type_emb: np.ndarray, attr_emb: np.ndarray, taxonomy: pl.DataFrame,
                   k: int) -> np.ndarray:
    """(len(types) * len(attributes), len(FEATURES)) in the row order type-major, attribute-minor
    (the order `text_features` gives for the same lists)."""
    neigh = neighbour_features(types, attributes, known.types, known.for_attributes(attributes),
                               known.embeddings, type_emb, attr_emb, taxonomy, k)
    t = text.select(TEXT_FEATURES).to_numpy().astype(np.float32)
    return np.concatenate([t, neigh.reshape(-1, len(NEIGHBOUR_FEATURES))], axis=1)
