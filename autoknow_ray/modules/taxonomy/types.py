"""Type resolution: from the tagger's type spans to each product's type, and new-type candidates.

Runs in the workers, as steps of the stage protocol: `BestTypeSpan` picks each product's best
type span (first pass, beside the models); the driver aggregates the spans into new-type
candidates (`accept_candidates`); `ResolveTypes` (second pass) decides each product's type with
the accepted names and a capped kNN reference index it builds once per worker.

For every product the catalogue type (`product_type`, may be missing or wrong) meets the best
type span the title tagger found:

- kept       the catalogue type stands (confirmed by the tagger, or not contradicted strongly);
- added      the product had no type: the tagger's type (known, or a new type with enough
             support), else the nearest typed products' vote (kNN over title embeddings, FAISS);
- corrected  the tagger's type replaces the catalogue type: only when the span is confident, the
             two type names are semantically far apart (embedding cosine below a threshold), the
             title itself is closer to the new type than to the old one, and neither type is an
             ancestor of the other in the taxonomy.

Type strings are compared through `type_key` (case, punctuation, whitespace and simple plurals
folded), so "Ice Creams" matches a taxonomy type "ice cream".
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from autoknow_ray.index.knn_vote import NO_AGREEMENT, TOO_FAR, LabelIndex, decide
from autoknow_ray.index.vectors import as_matrix
from autoknow_ray.modules.taxonomy.hypernym_config import (
    KNN_MIN_SHARE, KNN_MIN_SIMILARITY, TypeResolutionConfig)
from autoknow_ray.schema import HAS_TYPE, TRIPLES
from autoknow_ray.modules.taxonomy.title_names import EVIDENCE_PREFIX, pick
from autoknow_ray.steps import Step, WorkerEnv
from autoknow_ray.taxonomy_tree import ancestors_map, orphan_types, taxonomy_maps  # noqa: F401
from autoknow_ray.text import clean_surface, stem_tokens, type_key  # noqa: F401

MODULE = "taxonomy"
# what the second pass adds to each product (typed_products keeps the first four)
TYPE_COLUMNS = ("type", "type_status", "type_confidence", "type_evidence")
TRIPLE = pa.struct(list(TRIPLES))
RANKED = pa.list_(pa.struct([("type", pa.string()), ("score", pa.float32()), ("rank", pa.int32())]))
RANKED_TOP = 5  # kNN alternatives kept per product
# the attributes module 1 read in a product's title, each with its best span confidence: module 2
# counts them per type (typed_products column `title_attributes`)
TITLE_ATTRIBUTES = pa.list_(pa.struct([("name", pa.string()), ("confidence", pa.float32())]))


def with_title_attributes(batch: pa.Table) -> pa.Table:
    """Decisions -> the same rows plus `title_attributes`: the distinct attribute names of the
    product's title triples (every edit but `has_type`), with the best confidence of each."""
    rows = []
    for edits in batch.column("edits").to_pylist():
        best: dict[str, float] = {}
        for e in edits or ():
            name = e.get("relation")
            if name and name != HAS_TYPE:
                conf = float(e.get("confidence") or 0.0)
                best[name] = max(best.get(name, 0.0), conf)
        rows.append([{"name": k, "confidence": v} for k, v in sorted(best.items())])
    return batch.append_column("title_attributes", pa.array(rows, TITLE_ATTRIBUTES))

# ---- taxonomy structure: autoknow_ray/taxonomy_tree.py ----------------------------------------


class TypeNames:
    """The taxonomy's type names by comparison key (first listed wins for colliding keys), plus
    the new names accepted from this catalogue's titles.

    `unsold`: taxonomy nodes no product is known to carry (neither fit's typed titles nor this
    catalogue's labels, `unsold_types()`). One with children is a category: a title or a tagger
    span never types a product with it ("Fishing" above "Fishing Rod" and "Fishing Tackle").

    A name that joins several kinds ("Shampoo & Conditioner", "Hats, Caps and Gloves") is not
    named by its last word alone: a title writing "Conditioner" names one of its kinds, a type
    the taxonomy lacks (a new type, placed under that node), not the node. A compound's last
    word is its head and names it ("mask" names "Safety Mask" where no other type ends in it)."""

    def __init__(self, taxonomy_types: list[str], accepted: dict[str, str] | None = None,
                 unsold: frozenset[str] | set[str] = frozenset(),
                 children: dict[str, set[str]] | None = None):
        self.known: dict[str, str] = {}
        for t in taxonomy_types:
            self.known.setdefault(type_key(t), t)
        self.unsold = frozenset(unsold)
        self.categories = frozenset(t for t in self.unsold if (children or {}).get(t))
        # the known names a product may take from its title or a span
        self.product_known = {k: t for k, t in self.known.items() if t not in self.categories}
        self.accepted = dict(accepted or {})
        # a known type's last word names it where no other known type ends in that word
        # ("mask" → "Safety Mask"): per head word, the known types ending in it
        heads: dict[str, set[str]] = defaultdict(set)
        for k, t in self.known.items():
            if k:
                heads[k.split()[-1]].add(t)
        self.heads = {w: next(iter(ts)) for w, ts in heads.items()
                      if len(ts) == 1 and not _joins_kinds(next(iter(ts)))
                      and next(iter(ts)) not in self.categories}

    def canonical(self, value: str | None) -> str | None:
        """The taxonomy's (or an accepted new) name of a type string, None if neither."""
        if value is None:
            return None
        k = type_key(value)
        return self.known.get(k) or self.accepted.get(k)

    def span_type(self, value: str | None) -> str | None:
        """The type a tagger span names: its own name if known or accepted, else the longest
        known or accepted tail of its words ("Mineral Sunscreen" names "sunscreen": an English
        noun phrase ends in its head)."""
        return None if value is None else self._known_or_tail(type_key(value))

    def key_type(self, key: str | None) -> str | None:
        """The type a title's name key (`text.type_key` form) names: known or accepted, else its
        longest known or accepted tail, else the one known type whose last word it is."""
        if not key:
            return None
        got = self._known_or_tail(key)
        return got if got is not None or " " in key else self.heads.get(key)

    def _known_or_tail(self, key: str) -> str | None:
        words = key.split()
        for i in range(len(words)):
            tail = " ".join(words[i:])
            got = self.product_known.get(tail) or self.accepted.get(tail)
            if got is not None:
                return got
        return None

    def catalogue(self, value: str | None) -> str | None:
        """A catalogue label as the taxonomy writes it (kept as given where the taxonomy lacks it)."""
        if not isinstance(value, str) or not value.strip():
            return None
        old = clean_surface(value)
        return self.known.get(type_key(old), old)

    def first_pass(self, product_type: str | None, span_value: str | None) -> str | None:
        """The type a product has before corrections and the kNN vote: its catalogue label, else
        its tagger span's name."""
        return self.catalogue(product_type) or self.span_type(span_value)


_JOIN = re.compile(r"\s(?:&|\+|and|or)\s|[,/;|]", re.I)


def _joins_kinds(name: str) -> bool:
    """A type name whose last word is one of several kinds it lists ("Shampoo & Conditioner",
    "Food, Beverages & Tobacco"), not the head of one compound noun ("Safety Mask", and "Bread
    & Butter Plate", whose joined words modify "Plate"): a joiner (&, and, or, +, a comma, a
    slash) directly before a one-word last conjunct."""
    parts = _JOIN.split(name)
    return len(parts) > 1 and len(parts[-1].split()) == 1


def unsold_types(taxonomy_types: list[str], product_types: set[str] | frozenset[str]) -> frozenset[str]:
    """The taxonomy's types no product is known to carry: `product_types` are the types of fit's
    typed reference titles and this catalogue's labels. Empty where neither names any type
    (nothing is known of which nodes carry products)."""
    keys = {type_key(t) for t in product_types if isinstance(t, str)}
    if not keys:
        return frozenset()
    return frozenset(t for t in taxonomy_types if type_key(t) not in keys)


def lower_case_taxonomy(taxonomy_types: list[str]) -> bool:
    """New names follow the taxonomy's writing: an all-lower-case taxonomy gets "golf ball", not
    the titles' "Golf Ball"."""
    cased = [t for t in taxonomy_types if any(ch.isalpha() for ch in t)]
    return bool(cased) and sum(t == t.lower() for t in cased) >= 0.9 * len(cased)


def joined_type_spans(spans, known_keys: frozenset[str]) -> list[dict]:
    """The title's type spans, with each run of adjacent ones (at most one character apart) that
    names no known type joined into one: a tagger that reads "Power" and "Steering Fluid" as two
    type spans has read one type phrase, "Power Steering Fluid", whose parts alone would become
    two new types. A run with a known type among its parts ("Work" "Shoe", "Swim" "Shorts") is
    left as it is: the known type is what the title names. The joined span scores as its weakest
    part."""
    types = sorted((sp for sp in spans or () if sp["label"] == "type" and sp["value"] is not None),
                   key=lambda sp: (sp.get("start") is None, sp.get("start") or 0))
    out: list[dict] = []
    run: list[dict] = []

    def flush():
        if len(run) > 1 and not any(type_key(sp["value"]) in known_keys for sp in run):
            scores = [1.0 if sp["score"] is None else float(sp["score"]) for sp in run]
            out.append({"label": "type", "value": " ".join(sp["value"] for sp in run),
                        "start": run[0]["start"], "end": run[-1]["end"], "score": min(scores)})
        else:
            out.extend(run)
        run.clear()

    for sp in types:
        if (run and sp.get("start") is not None and run[-1].get("end") is not None
                and 0 <= sp["start"] - run[-1]["end"] <= 1):
            run.append(sp)
            continue
        flush()
        run.append(sp)
    flush()
    return out


_WORD = re.compile(r"[^\W_](?:[\w'’-]*[^\W_])?")  # a word, without the punctuation around it
MAX_HEAD_WORDS = 3  # a known type's name read after a type span: one to three words


def extended_type_spans(title: str | None, spans: list[dict], known_keys: frozenset[str]) -> list[dict]:
    """Type spans whose name no known type has and that the title continues, after spaces
    alone, with a known type's name that no other span covers ("Herbal" + "Tea", "Ballpoint" +
    "Pen"), widened over it: a compound noun's head is its last word, so the span the tagger
    read is the modifier of a finer type ("Herbal Tea", under Tea), not a type of its own."""
    if not title or not spans:
        return spans
    taken = [(sp.get("start"), sp.get("end")) for sp in spans]
    out = []
    for sp in spans:
        end = sp.get("end")
        if (sp["label"] != "type" or end is None or sp.get("start") is None
                or type_key(sp["value"]) in known_keys):
            out.append(sp)
            continue
        words, pos = [], end
        for m in _WORD.finditer(title, end):
            if len(words) == MAX_HEAD_WORDS or title[pos:m.start()].strip(" ") != "" or m.start() == pos and words:
                break
            if any(a is not None and a < m.end() and m.start() < b for a, b in taken):
                break
            words.append(m)
            pos = m.end()
        grow = None
        for n in range(len(words), 0, -1):
            if type_key(title[words[0].start():words[n - 1].end()]) in known_keys:
                grow = words[n - 1].end()
                break
        out.append(sp if grow is None else {**sp, "value": title[sp["start"]:grow], "end": grow})
    return out


class BestTypeSpan(Step):
    """Each product's best type span (highest score at or above `min_span_score`) among its type
    spans, adjacent unknown ones joined (`joined_type_spans`) and widened over a known type's
    name the title writes right after them (`extended_type_spans`): `span_value` (whitespace-cleaned),
    `span_score`, `span_key`, `span_new` (a key the taxonomy lacks), and `mention_keys` (every
    distinct unknown key among its type spans, for the candidates' counts)."""

    name = "best_type_span"
    resources = "taxonomy"
    columns = ("spans",)

    def __init__(self, known_keys: set[str], min_span_score: float):
        self.known_keys = frozenset(known_keys)
        self.min_span_score = float(min_span_score)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        values, scores, keys, new, mentions = [], [], [], [], []
        titles = (batch.column("title").to_pylist() if "title" in batch.column_names
                  else [None] * batch.num_rows)
        for title, spans in zip(titles, batch.column("spans").to_pylist()):
            best = None
            seen: list[str] = []
            for sp in extended_type_spans(title, joined_type_spans(spans, self.known_keys),
                                          self.known_keys):
                k = type_key(sp["value"])
                if k and k not in self.known_keys and k not in seen:
                    seen.append(k)
                score = 1.0 if sp["score"] is None else float(sp["score"])
                if score >= self.min_span_score and (best is None or score > best[1]):
                    best = (clean_surface(sp["value"]), score)
            k = type_key(best[0]) if best else None
            values.append(best[0] if best else None)
            scores.append(best[1] if best else None)
            keys.append(k or None)
            new.append(bool(k) and k not in self.known_keys)
            mentions.append(seen)
        return (batch.append_column("span_value", pa.array(values, pa.string()))
                .append_column("span_score", pa.array(scores, pa.float32()))
                .append_column("span_key", pa.array(keys, pa.string()))
                .append_column("span_new", pa.array(new, pa.bool_()))
                .append_column("mention_keys", pa.array(mentions, pa.list_(pa.string()))))


CANDIDATES_SCHEMA = {
    "type": pl.String,
    "support": pl.Int64,
    "n_products": pl.Int64,
    "example_product_ids": pl.List(pl.String),
    "mean_score": pl.Float32,
}


def accept_candidates(surfaces: pl.DataFrame, cfg: TypeResolutionConfig, lower: bool) -> pl.DataFrame:
    """New-type candidates from the per-(key, surface) aggregates of the products' best type
    spans (`span_key`, `span_value`, `n` products, `score_sum`): a key the taxonomy lacks is
    accepted with `min_support` products and a mean score of `min_score`; its name is its most
    frequent surface (ties: the first in sort order), lower-cased for a lower-case taxonomy.
    Returns [key, type, support, mean_score] of the accepted keys."""
    schema = {"key": pl.String, "type": pl.String, "support": pl.Int64, "mean_score": pl.Float32}
    if surfaces.height == 0:
        return pl.DataFrame(schema=schema)
    per_key = surfaces.group_by("span_key").agg(
        pl.col("n").sum().alias("support"), pl.col("score_sum").sum().alias("_s"),
        pl.col("span_value").sort_by([pl.col("n"), pl.col("span_value")], descending=[True, False])
        .first().alias("type"))
    per_key = _with_heads(per_key)
    out = per_key.with_columns((pl.col("_s") / pl.col("support")).alias("mean_score")).filter(
        (pl.col("support") >= cfg.min_support) & (pl.col("mean_score") >= cfg.min_score - 1e-6))
    if lower:
        out = out.with_columns(pl.col("type").str.to_lowercase())
    return out.select(pl.col("span_key").alias("key"), "type", pl.col("support").cast(pl.Int64),
                      pl.col("mean_score").cast(pl.Float32)).sort("key")


def _with_heads(per_key: pl.DataFrame) -> pl.DataFrame:
    """A key's support and score sum also count the spans that end in it: "Spray Sunscreen" and
    "Mineral Sunscreen" support "sunscreen" where titles also write it alone (the resolution
    maps them to it, `TypeNames.span_type`). Per distinct key: small."""
    rows = per_key.select("span_key", "support", "_s").rows()
    present = {k for k, _, _ in rows}
    extra_n: dict[str, int] = defaultdict(int)
    extra_s: dict[str, float] = defaultdict(float)
    for k, n, sc in rows:
        words = (k or "").split()
        for i in range(1, len(words)):
            tail = " ".join(words[i:])
            if tail in present:
                extra_n[tail] += n
                extra_s[tail] += sc
    if not extra_n:
        return per_key
    add = pl.DataFrame({"span_key": list(extra_n), "_n2": [extra_n[k] for k in extra_n],
                        "_s2": [extra_s[k] for k in extra_n]},
                       schema={"span_key": pl.String, "_n2": pl.Int64, "_s2": pl.Float64})
    return (per_key.join(add, on="span_key", how="left")
            .with_columns((pl.col("support") + pl.col("_n2").fill_null(0)).alias("support"),
                          (pl.col("_s") + pl.col("_s2").fill_null(0.0)).alias("_s"))
            .drop("_n2", "_s2"))


def _vectors(column) -> np.ndarray:
    """A fixed-size-list column of title vectors as L2-normalised float32 rows."""
    v = as_matrix(column, np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


class ResolveTypes(Step):
    """Second pass: each product's type (kept / added / corrected, or none with its reason), its
    graph edits and its kNN alternatives, against a reference index of capped size.

    - kept       the catalogue type stands (confirmed by the tagger, or not contradicted strongly);
    - added      no catalogue type: the tagger's type (known, or an accepted new one), else the
                 vote of the nearest typed titles (this catalogue's capped sample and the
                 training reference), only where they are close and agree;
    - corrected  the tagger's type replaces the catalogue type: only when the span is confident,
                 the two type names are far apart (embedding cosine below a threshold), the title
                 is closer to the new type than to the old one, neither type is an ancestor of
                 the other, and the product's nearest catalogue-typed neighbours carry the new
                 type more than the old one.

    Everything it holds is bounded: the taxonomy's names and their vectors, the accepted new
    names, and the reference (at most `knn_catalogue_sample` + the fit's capped reference)."""

    name = "resolve_types"
    resources = "taxonomy"
    columns = ("product_id", "product_type", "span_value", "span_score", "spans", "name_keys",
               "free_name_keys", "head_key", "embedding")
    model = True  # builds its indexes once per worker

    def __init__(self, cfg: TypeResolutionConfig, names: TypeNames, ancestors: dict[str, set[str]],
                 name_vectors: dict[str, np.ndarray], catalogue_reference: pl.DataFrame | str | Path,
                 training_reference: tuple[list[str], np.ndarray] | None,
                 add_attributes: bool, min_attribute_score: float,
                 name_support: dict[str, int] | None = None, reference_cap: int | None = None,
                 names_written: dict[str, frozenset[str]] | None = None):
        floors = {k: v for k, v in (("knn_min_similarity", KNN_MIN_SIMILARITY),
                                    ("knn_min_share", KNN_MIN_SHARE)) if getattr(cfg, k) is None}
        self.cfg = cfg.model_copy(update=floors) if floors else cfg
        self.names = names
        self.ancestors = ancestors
        self.name_vectors = {t: np.asarray(v, np.float16) for t, v in name_vectors.items()}
        # catalogue_reference: product_id, ref_type, from_catalogue, embedding (fp16 rows) — a
        # frame, or the folder of Parquet files the workers wrote it to (`write_reference`): then
        # each worker reads it in setup() and the driver never holds it
        self.reference_path: str | None = None
        self.reference_cap = reference_cap
        if isinstance(catalogue_reference, (str, Path)):
            self.reference_path = str(catalogue_reference)
            self._keep_reference(pl.DataFrame(schema=REFERENCE_SCHEMA))
        else:
            self._keep_reference(catalogue_reference)
        if training_reference is not None and len(training_reference[0]):
            types = [names.canonical(t) or t for t in training_reference[0]]
            self.train_ref = (types, np.asarray(training_reference[1], dtype=np.float16))
        else:
            self.train_ref = None
        self.add_attributes = add_attributes
        self.min_attribute_score = float(min_attribute_score)
        # per name key: products without a catalogue or tagger type whose title writes it
        self.name_support = dict(name_support or {})
        # per known type with at least knn_k titles in fit's reference: the name keys more than
        # `new_name_written_share` of its reference titles write (`names_written_by_type`); a kNN
        # answer of that type for a title naming an accepted new type not among them gives way
        self.names_written = {t: frozenset(k) for t, k in (names_written or {}).items()}
        self.correct_index = self.fallback_index = None

    def _keep_reference(self, ref: pl.DataFrame) -> None:
        """The reference in product_id order (the same index whatever order the sample came in),
        its vectors copied once into one fp16 matrix."""
        order = ref["product_id"].arg_sort().to_numpy() if ref.height else np.zeros(0, np.int64)

        def ordered(column: str) -> list:
            values = ref[column].to_list()
            return [values[i] for i in order]

        self.ref_ids = ordered("product_id") if ref.height else []
        self.ref_types = ordered("ref_type") if ref.height else []
        self.ref_catalogue = ordered("from_catalogue") if ref.height else []
        self.ref_vecs = as_matrix(ref["embedding"], np.float16)[order] if ref.height \
            else np.zeros((0, 0), np.float16)

    def vote_reference(self) -> np.ndarray:
        """The fp16 rows the kNN vote searches (this catalogue's capped sample, then the fit's
        reference), read from the reference folder where it lives there; no index is built."""
        if self.reference_path is not None and not len(self.ref_types):
            self._keep_reference(read_reference(self.reference_path, self.reference_cap))
        parts = [self.ref_vecs] if len(self.ref_types) else []
        if self.train_ref is not None:
            parts.append(self.train_ref[1])
        return np.concatenate(parts).astype(np.float16) if parts else np.zeros((0, 0), np.float16)

    def setup(self, env: WorkerEnv) -> None:
        if self.reference_path is not None:
            self._keep_reference(read_reference(self.reference_path, self.reference_cap))
        rows = [i for i, c in enumerate(self.ref_catalogue) if c]
        vecs = self.ref_vecs.astype(np.float32)
        # corrections: the catalogue's own labels only, as the catalogue gives them
        self.correct_index = LabelIndex(vecs[rows] if rows else np.zeros((0, 1), np.float32),
                                        [self.ref_types[i] for i in rows],
                                        keys=[self.ref_ids[i] for i in rows], seed=self.cfg.seed)
        types = list(self.ref_types) + (list(self.train_ref[0]) if self.train_ref is not None else [])
        ref = self.vote_reference()
        self.fallback_index = LabelIndex(ref.astype(np.float32) if len(ref) else np.zeros((0, 1), np.float32),
                                         types, seed=self.cfg.seed)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        cfg, names = self.cfg, self.names
        pids = batch.column("product_id").to_pylist()
        olds = batch.column("product_type").to_pylist()
        span_values = batch.column("span_value").to_pylist()
        span_scores = batch.column("span_score").to_pylist()
        title_keys = (batch.column("name_keys").to_pylist() if "name_keys" in batch.column_names
                      else [None] * batch.num_rows)
        heads = (batch.column("head_key").to_pylist() if "head_key" in batch.column_names
                 else [None] * batch.num_rows)
        vecs = _vectors(batch.column("embedding")) if batch.num_rows else np.zeros((0, 1), np.float32)
        free_keys = (batch.column("free_name_keys").to_pylist() if "free_name_keys" in batch.column_names
                     else [None] * batch.num_rows)
        all_spans = batch.column("spans").to_pylist()
        n = len(pids)
        out = {c: [None] * n for c in TYPE_COLUMNS}
        outcome: list[str | None] = [None] * n
        ranked: list[list] = [[] for _ in range(n)]
        to_check, untyped = [], []
        for i in range(n):
            old_name = names.catalogue(olds[i])
            new = names.span_type(span_values[i])
            score = float(span_scores[i]) if span_scores[i] is not None else 0.0
            if old_name is not None:
                if new is not None and type_key(new) == type_key(old_name):
                    self._set(out, outcome, i, old_name, max(score, cfg.catalogue_confidence), "kept", "catalogue+tagger")
                else:
                    self._set(out, outcome, i, old_name, cfg.catalogue_confidence, "kept", "catalogue")
                    if (new is not None and score >= cfg.correct_min_score
                            and new not in self.ancestors.get(old_name, ())
                            and old_name not in self.ancestors.get(new, ())):
                        to_check.append((i, old_name, new, score))
            elif new is not None:
                known = type_key(new) not in names.accepted
                conflict = (self._new_name_conflict(free_keys[i], title_keys[i], new, also_named=True)
                            if known and cfg.new_name_overrides_tagger and cfg.title_names else None)
                if conflict is not None:
                    self._set(out, outcome, i, conflict[1], cfg.title_name_confidence, "added",
                              f"{EVIDENCE_PREFIX}{conflict[0]!r} (fit's titles of {new!r} seldom write it; "
                              f"tagger read {new!r})")
                    continue
                self._set(out, outcome, i, new, score, "added", "tagger" if known else "tagger:new")
            else:
                untyped.append(i)

        if to_check and len(self.correct_index) >= 2:
            rows = [i for i, _, _, _ in to_check]
            votes = self.correct_index.votes(vecs[rows], cfg.knn_k, exclude=[pids[i] for i in rows])
            for (i, old, new, score), (vote, _near) in zip(to_check, votes):
                vo, vn = self._name_vec(old), self._name_vec(new)
                if vo is None or vn is None:
                    continue
                cos_types = float(vo @ vn)
                margin = float(vecs[i] @ vn - vecs[i] @ vo)
                # a second, independent signal must agree: the nearest catalogue-typed titles
                # carry the new type more than the old one (a span on a modifier word — "Pasta"
                # in "Italian Pasta Salad" — does not survive this)
                if (cos_types < cfg.correct_max_cosine and margin > cfg.correct_title_margin
                        and vote.get(new, 0.0) > vote.get(old, 0.0)):
                    self._set(out, outcome, i, new, score, "corrected",
                              f"tagger score={score:.2f}; was {old!r} (cosine {cos_types:.2f})")

        if untyped:
            k = min(cfg.knn_k, len(self.fallback_index))
            for i, (vote, near) in zip(untyped, self.fallback_index.votes(vecs[untyped], cfg.knn_k)):
                v = decide(vote, near, cfg.knn_min_similarity, cfg.knn_min_share)
                if v.label is None:
                    hit = (pick(title_keys[i], names.key_type, self.name_support)
                           if cfg.title_names else None)
                    if hit is not None:  # the title's own words name its type
                        self._set(out, outcome, i, hit[1], cfg.title_name_confidence, "added",
                                  f"{EVIDENCE_PREFIX}{hit[0]!r} ({v.reason})")
                        continue
                    head = names.key_type(heads[i]) if cfg.title_heads and heads[i] else None
                    if head is not None:  # … its first phrase ends in a type's name
                        self._set(out, outcome, i, head, cfg.title_name_confidence, "added",
                                  f"{EVIDENCE_PREFIX}{heads[i]!r} (head word; {v.reason})")
                        continue
                    out["type_evidence"][i] = v.reason
                    outcome[i] = v.reason
                    continue
                ranked[i] = [{"type": t, "score": s, "rank": r + 1}
                             for r, (t, s) in enumerate(v.ranked[:RANKED_TOP])]
                conflict = (self._new_name_conflict(free_keys[i], title_keys[i], v.label)
                            if cfg.title_names and cfg.new_name_overrides_vote else None)
                if conflict is not None:
                    self._set(out, outcome, i, conflict[1], cfg.title_name_confidence, "added",
                              f"{EVIDENCE_PREFIX}{conflict[0]!r} (fit's titles of {v.label!r} seldom write it; "
                              f"knn k={k} share={v.share:.2f})")
                    continue
                self._set(out, outcome, i, v.label, v.share, "added", f"knn k={k} share={v.share:.2f}")

        edits = [self._edits(pids[i], olds[i], out, i, spans) for i, spans in enumerate(all_spans)]
        return pa.table({
            "product_id": batch.column("product_id"),
            "type": pa.array(out["type"], pa.string()),
            "type_status": pa.array(out["type_status"], pa.string()),
            "type_confidence": pa.array(out["type_confidence"], pa.float32()),
            "type_evidence": pa.array(out["type_evidence"], pa.string()),
            "outcome": pa.array(outcome, pa.string()),
            "n_spans": pa.array([len(x or ()) for x in all_spans], pa.int64()),
            "edits": pa.array(edits, pa.list_(TRIPLE)),
            "ranked": pa.array(ranked, RANKED),
            # the title vector, passed on: the hypernym context reads the types decided here
            # with their vectors (a blind catalogue has no catalogue types to read)
            "embedding": batch.column("embedding"),
        })

    def _new_name_conflict(self, free, keys, voted: str, also_named: bool = False
                           ) -> tuple[str, str] | None:
        """(key, new type) where the title names an accepted new type that the voted known type's
        fit reference titles seldom write (`names_written`: the names more than
        `new_name_written_share` of them write; the type has at least `knn_k` of them), outside
        the tagger's attribute spans (`free`: a colour or a flavour is no type: "… Face Mask,
        White / Cream"): the title says what it is, and it is not what the type's titles say ("…
        Fishing Lure …" among fishing rods). None otherwise. `also_named`: the voted type is the
        tagger's span of this title, which names it; else a title naming it keeps it."""
        written = self.names_written.get(voted)
        if written is None or not keys:
            return None
        names = self.names
        if not also_named and any(names.key_type(k) == voted for k in keys):
            return None  # the title names the voted type too
        free = set(free or ())
        hit = pick([k for k in keys if k not in written and k in free], names.key_type, self.name_support)
        if hit is None or hit[1] in names.known.values() or type_key(hit[1]) not in names.accepted:
            return None
        return hit

    @staticmethod
    def _set(out, outcome, i, t, conf, status, evidence) -> None:
        out["type"][i], out["type_confidence"][i] = t, float(conf)
        out["type_status"][i], out["type_evidence"][i] = status, evidence
        outcome[i] = status

    def _name_vec(self, name: str) -> np.ndarray | None:
        v = self.name_vectors.get(name)
        return None if v is None else v.astype(np.float32)

    def _edits(self, pid, old_raw, out, i, spans) -> list[dict]:
        """The product's TRIPLES rows: its has_type added/corrected (and the removed catalogue
        type of a correction), then its title attribute spans as added triples."""
        rows = []
        status = out["type_status"][i]
        if status in ("added", "corrected"):
            conf = out["type_confidence"][i]
            rows.append(_triple(pid, HAS_TYPE, out["type"][i], conf, status, out["type_evidence"][i]))
            if status == "corrected" and old_raw is not None:
                rows.append(_triple(pid, HAS_TYPE, old_raw, conf, "removed", f"corrected to {out['type'][i]}"))
        if self.add_attributes:
            seen = set()
            for sp in spans or ():
                if sp["label"] == "type" or sp["score"] is None or sp["score"] < self.min_attribute_score:
                    continue
                if (sp["label"], sp["value"]) in seen:
                    continue
                seen.add((sp["label"], sp["value"]))
                rows.append(_triple(pid, sp["label"], sp["value"], sp["score"], "added",
                                    f"title[{sp['start']}:{sp['end']}]"))
        return rows


def renamed_type(old: str, new: str, evidence: str | None, edits, note: str):
    """A product's type `old` under the name `new`: (type, its evidence with `note` added, its
    edits with the `has_type` edit of `old` renamed and noted the same way)."""
    return new, (evidence or "") + note, [
        dict(e, object=new, evidence=(e.get("evidence") or "") + note)
        if e.get("relation") == HAS_TYPE and e.get("object") == old else e for e in (edits or ())]


def _triple(subject, relation, obj, confidence, status, evidence) -> dict:
    return {"subject": subject, "relation": relation, "object": obj,
            "confidence": None if confidence is None else float(confidence), "module": MODULE,
            "status": status, "evidence": evidence}


REFERENCE_SCHEMA = {"product_id": pl.String, "ref_type": pl.String, "from_catalogue": pl.Boolean,
                    "embedding": pl.List(pl.Float32)}
_DRAW = "_draw"  # the per-row uniform draw of the reference sample


def write_reference(ds, n_rows: int | None, cap: int, seed: int, out) -> str:
    """The kNN reference sample, written by the workers to the folder `out`: each of the
    `n_rows` rows of `ds` (None: counted; product_id, ref_type, from_catalogue, embedding) is
    kept when a hash of its product id and `seed` falls under (cap + 4 sqrt(cap) + 10) / n_rows:
    about cap + 4 standard deviations of rows, so fewer than `cap` are drawn only where the
    catalogue has fewer (odds ~3e-5), and at most a few percent more travel; `read_reference`
    keeps the `cap` lowest draws. The same rows run after run, in any block order."""
    from autoknow_ray.modules.taxonomy.sample import uniform

    if n_rows is None:  # the rows of `ds` itself (a filtered table: one counting pass)
        n_rows = ds.count() if cap > 0 else 0
    rate = min(1.0, (cap + 4 * cap ** 0.5 + 10) / max(n_rows, 1)) if cap > 0 else 0.0

    def draw(batch: pa.Table) -> pa.Table:
        u = uniform(batch.column("product_id").to_pylist(), seed)
        keep = u < rate
        return batch.filter(pa.array(keep)).append_column(_DRAW, pa.array(u[keep]))

    ds.map_batches(draw, batch_format="pyarrow").write_parquet(str(out))
    return str(out)


def read_reference(path: str, cap: int | None) -> pl.DataFrame:
    """The reference `write_reference` wrote: its `cap` lowest draws (ties by product id)."""
    from autoknow_ray.pipeline import read_parquet_any

    # no row drawn: the workers wrote no file, perhaps not even the folder
    ref = read_parquet_any(Path(path)) if Path(path).exists() else pl.DataFrame()
    if not ref.height:
        return pl.DataFrame(schema=REFERENCE_SCHEMA)
    ref = ref.sort([_DRAW, "product_id"])
    if cap is not None:
        ref = ref.head(cap)
    return ref.drop(_DRAW)


SPREAD = "spread"  # the outcome of a product that took a new type from SpreadNewTypes
SECOND_VOTE = "second_vote"  # … or a known type, voted again among this catalogue's own typed titles


class SpreadNewTypes(Step):
    """Third pass, over the resolved products: a product the kNN vote refused (its neighbours too
    far, or no agreement) and whose title names no type takes a **new** type where its nearest
    titles are those of products that got that new type from their own words, under the same
    floors. Many titles never write their type ("Franco Sarto Women's Nolan, Black, 9.5 N US")
    but sit among titles that do ("… Oxford, Tan, 8 US"); the first vote could not see them,
    since new types have no reference titles until this rebuild finds them.

    The vote searches the new types' products (a capped sample per type, `reference`) together
    with the first vote's reference of known types (`known`): a product whose nearest titles are
    of a known type keeps no type, as the first vote decided; only a new type's answer is taken.
    Bounded: the reference is capped by the caller.

    `rename` (a new type's name -> its group's, `type_groups`): the products of a grouped new
    type take the group's name in the same pass, and the vote counts a group as one type."""

    name = "spread_new_types"
    resources = "taxonomy"
    columns = ()  # every column: the resolved rows pass through whole
    model = True  # builds its index once per worker

    def __init__(self, cfg: TypeResolutionConfig, new_types: set[str], reference: pl.DataFrame,
                 known: tuple[list[str], np.ndarray] | None, rename: dict[str, str] | None = None,
                 own_known: pl.DataFrame | None = None, known_floors: tuple[float, float] | None = None):
        self.cfg = cfg
        # this catalogue's own products of known types (a capped sample): with them in the
        # reference, a refused product of a known type may find its type among titles like its
        # own; a known answer must pass `known_floors` (the second vote's, chosen in the rebuild)
        self.own_types = own_known["type"].to_list() if own_known is not None and own_known.height else []
        self.own_vecs = (as_matrix(own_known["embedding"], np.float16) if self.own_types
                         else np.zeros((0, 0), np.float16))
        self.known_floors = known_floors
        self.rename = dict(rename or {})
        self.new_types = frozenset(self.rename.get(t, t) for t in new_types)
        self.ref_types = [self.rename.get(t, t) for t in reference["type"].to_list()] \
            if reference.height else []
        self.ref_vecs = (as_matrix(reference["embedding"], np.float16) if reference.height
                         else np.zeros((0, 0), np.float16))
        self.known = known
        self.index = None

    def setup(self, env: WorkerEnv) -> None:
        types = list(self.ref_types)
        parts = [self.ref_vecs.astype(np.float32)] if len(types) else []
        if self.own_types:
            types += list(self.own_types)
            parts.append(self.own_vecs.astype(np.float32))
        if self.known is not None and len(self.known[0]):
            types += list(self.known[0])
            parts.append(np.asarray(self.known[1], np.float32))
        self.index = LabelIndex(np.concatenate(parts) if parts else np.zeros((0, 1), np.float32),
                                types, seed=self.cfg.seed)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if self.index is None:
            self.setup(WorkerEnv())
        outcome = batch.column("outcome").to_pylist()
        rows = [i for i, o in enumerate(outcome) if o in (TOO_FAR, NO_AGREEMENT)] if self.ref_types else []
        types = batch.column("type").to_pylist()
        grouped = [i for i, t in enumerate(types) if t in self.rename]
        if not rows and not grouped:
            return batch
        cfg = self.cfg
        cols = {c: batch.column(c).to_pylist() for c in TYPE_COLUMNS}
        edits = batch.column("edits").to_pylist()
        pids = batch.column("product_id").to_pylist()
        for i in grouped:  # a variant's products take its group's name
            old = cols["type"][i]
            group = self.rename[old]
            cols["type"][i], cols["type_evidence"][i], edits[i] = renamed_type(
                old, group, cols["type_evidence"][i], edits[i],
                f"; grouped under '{group}' as its variant '{old}'")
        vecs = _vectors(batch.column("embedding"))
        k = min(cfg.knn_k, len(self.index))
        for i, (vote, near) in zip(rows, self.index.votes(vecs[rows], cfg.knn_k)):
            v = decide(vote, near, cfg.knn_min_similarity, cfg.knn_min_share)
            if v.label is not None and v.label in self.new_types:
                evidence, result = f"knn new type k={k} share={v.share:.2f} ({outcome[i]})", SPREAD
            elif self.own_types and self.known_floors is not None:
                v = decide(vote, near, *self.known_floors)
                if v.label is None or v.label in self.new_types:
                    continue
                evidence = f"knn k={k} share={v.share:.2f}, this catalogue's titles ({outcome[i]})"
                result = SECOND_VOTE
            else:
                continue
            cols["type"][i], cols["type_status"][i] = v.label, "added"
            cols["type_confidence"][i], cols["type_evidence"][i] = float(v.share), evidence
            outcome[i] = result  # counted apart from the first vote's answers in the manifest
            edits[i] = [_triple(pids[i], HAS_TYPE, v.label, v.share, "added", evidence),
                        *(edits[i] or ())]
        out = batch
        for c in TYPE_COLUMNS:
            kind = pa.float32() if c == "type_confidence" else pa.string()
            out = out.set_column(out.column_names.index(c), c, pa.array(cols[c], kind))
        out = out.set_column(out.column_names.index("outcome"), "outcome", pa.array(outcome, pa.string()))
        return out.set_column(out.column_names.index("edits"), "edits",
                              pa.array(edits, batch.schema.field("edits").type))
