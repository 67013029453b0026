"""Type resolution: from the tagger's type spans to each product's type, and new-type candidates.

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

from collections import Counter, defaultdict

import numpy as np
import polars as pl

from autoknow_ray.modules.taxonomy.hypernym_config import TypeResolutionConfig
from autoknow_ray.text import clean_surface, stem, stem_tokens, tokens, type_key  # noqa: F401

PRODUCT_TYPES_SCHEMA = {
    "product_id": pl.String,
    "type": pl.String,
    "confidence": pl.Float32,
    "status": pl.String,
    "evidence": pl.String,
}
CANDIDATES_SCHEMA = {
    "type": pl.String,
    "support": pl.Int64,
    "n_products": pl.Int64,
    "example_product_ids": pl.List(pl.String),
    "mean_score": pl.Float32,
}

# ---- taxonomy structure ----------------------------------------------------------------------
def taxonomy_maps(taxonomy: pl.DataFrame) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(parents, children) of every type named in the taxonomy (as type or as parent)."""
    parents: dict[str, set[str]] = defaultdict(set)
    children: dict[str, set[str]] = defaultdict(set)
    if taxonomy is None or taxonomy.height == 0:
        return {}, {}
    for t, p in taxonomy.select("type", "parent").iter_rows():
        if t is None:
            continue
        parents[t]
        children[t]
        if p is not None and p != t:
            parents[t].add(p)
            children[p].add(t)
            parents[p]
    return dict(parents), dict(children)


def ancestors_map(parents: dict[str, set[str]]) -> dict[str, set[str]]:
    """Every type's strict ancestors (cycles tolerated)."""
    memo: dict[str, set[str]] = {}

    def walk(t: str, visiting: set[str]) -> set[str]:
        if t in memo:
            return memo[t]
        visiting.add(t)
        out: set[str] = set()
        for p in parents.get(t, ()):
            if p in visiting:
                continue
            out.add(p)
            out |= walk(p, visiting)
        visiting.discard(t)
        memo[t] = out
        return out

    for t in parents:
        walk(t, set())
    return memo


def orphan_types(taxonomy: pl.DataFrame, products: pl.DataFrame | None = None) -> list[str]:
    """Types still to be placed: no parent row, not the parent of anything, and no product typed
    under them. (A parentless type with children, or with products, is a root.)"""
    parents, children = taxonomy_maps(taxonomy)
    typed: set[str] = set()
    if products is not None and "product_type" in products.columns:
        typed = set(products.get_column("product_type").drop_nulls().unique().to_list())
    return sorted(t for t in parents if not parents[t] and not children.get(t) and t not in typed)


# ---- resolution ------------------------------------------------------------------------------
def _best_type_spans(tags: pl.DataFrame | None, min_score: float) -> dict[str, tuple[str, float]]:
    """product_id → (surface value, score) of its highest-scoring type span."""
    if tags is None or tags.height == 0:
        return {}
    t = (
        tags.filter((pl.col("label") == "type") & pl.col("value").is_not_null())
        .with_columns(pl.col("score").fill_null(1.0).cast(pl.Float64))
        .filter(pl.col("score") >= min_score)
        .sort(["product_id", "score"], descending=[False, True])
        .unique("product_id", keep="first", maintain_order=True)
    )
    return {pid: (clean_surface(v), float(s)) for pid, v, s in t.select("product_id", "value", "score").iter_rows()}


def resolve_types(
    products: pl.DataFrame,
    tags: pl.DataFrame | None,
    taxonomy: pl.DataFrame,
    cfg: TypeResolutionConfig | None = None,
    encoder=None,
    reference: tuple[list[str], np.ndarray] | None = None,
    ranked: dict[str, list[tuple[str, float]]] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Decide each product's type and collect new-type candidates.

    Returns (product_types[product_id, type, confidence, status, evidence],
             candidates[type, support, n_products, example_product_ids, mean_score]).
    Products for which no type can be resolved (no catalogue type, no usable span, no typed
    product to vote) get no row. `encoder` (TextEncoder-like: .encode(list[str]) → L2-normalised
    rows) is needed for corrections and the kNN fallback; without it neither happens.
    `reference` — (types, title vectors) kept from the training catalogue — joins the kNN vote,
    so a catalogue without a single typed product can still be typed.
    `ranked`, when given, receives for each kNN-typed product its voted types, best first, with
    their vote shares (the alternatives a reviewer or an @k metric needs).
    """
    cfg = cfg or TypeResolutionConfig()
    parents, _children = taxonomy_maps(taxonomy)
    ancestors = ancestors_map(parents)
    # key → taxonomy name (first listed wins for colliding keys)
    known: dict[str, str] = {}
    for t in parents:
        known.setdefault(type_key(t), t)

    pids = products.get_column("product_id").to_list()
    titles = products.get_column("title").to_list()
    old_types = (
        products.get_column("product_type").to_list()
        if "product_type" in products.columns
        else [None] * len(pids)
    )
    spans = _best_type_spans(tags, cfg.min_span_score)

    # ---- candidates: extracted keys unknown to the taxonomy ----------------------------------
    cand_products: dict[str, list[str]] = defaultdict(list)
    cand_scores: dict[str, list[float]] = defaultdict(list)
    cand_surface: dict[str, Counter] = defaultdict(Counter)
    mentions: Counter = Counter()
    if tags is not None and tags.height:
        for pid, v in tags.filter(pl.col("label") == "type").select("product_id", "value").iter_rows():
            k = type_key(v)
            if k and k not in known:
                mentions[(k, pid)] += 1
    for pid in pids:
        if pid in spans:
            surface, score = spans[pid]
            k = type_key(surface)
            if k and k not in known:
                cand_products[k].append(pid)
                cand_scores[k].append(score)
                cand_surface[k][surface] += 1
    n_mentioning: Counter = Counter(k for (k, _pid) in mentions)
    # new names follow the taxonomy's writing: an all-lower-case taxonomy gets "golf ball", not
    # the titles' "Golf Ball"
    cased = [t for t in parents if any(ch.isalpha() for ch in t)]
    lower_taxonomy = bool(cased) and sum(t == t.lower() for t in cased) >= 0.9 * len(cased)
    accepted: dict[str, str] = {}  # key → new type name
    cand_rows = []
    for k, plist in cand_products.items():
        support = len(set(plist))
        mean_score = float(np.mean(cand_scores[k]))
        if support >= cfg.min_support and mean_score >= cfg.min_score:
            name = cand_surface[k].most_common(1)[0][0]
            name = name.lower() if lower_taxonomy else name
            accepted[k] = name
            cand_rows.append(
                {
                    "type": name,
                    "support": support,
                    "n_products": max(int(n_mentioning.get(k, 0)), support),
                    "example_product_ids": sorted(set(plist))[: cfg.max_examples],
                    "mean_score": mean_score,
                }
            )
    candidates = pl.DataFrame(cand_rows, schema=CANDIDATES_SCHEMA).sort(
        ["support", "type"], descending=[True, False]
    )

    # ---- per product -------------------------------------------------------------------------
    def canonical(value: str | None) -> str | None:
        if value is None:
            return None
        k = type_key(value)
        return known.get(k) or accepted.get(k)

    rows: dict[str, dict] = {}
    to_check: list[tuple[int, str, str, float]] = []  # correction candidates (i, old, new, score)
    untyped: list[int] = []
    for i, pid in enumerate(pids):
        old = old_types[i]
        old = clean_surface(old) if isinstance(old, str) and old.strip() else None
        span = spans.get(pid)
        new = canonical(span[0]) if span else None
        score = span[1] if span else 0.0
        if old is not None:
            old_name = known.get(type_key(old), old)
            if new is not None and type_key(new) == type_key(old_name):
                rows[pid] = _row(pid, old_name, max(score, cfg.catalogue_confidence), "kept", "catalogue+tagger")
            else:
                rows[pid] = _row(pid, old_name, cfg.catalogue_confidence, "kept", "catalogue")
                if new is not None and score >= cfg.correct_min_score and encoder is not None:
                    if new not in ancestors.get(old_name, ()) and old_name not in ancestors.get(new, ()):
                        to_check.append((i, old_name, new, score))
        elif new is not None:
            ev = "tagger:new" if type_key(new) in accepted else "tagger"
            rows[pid] = _row(pid, new, score, "added", ev)
        else:
            untyped.append(i)

    if to_check and encoder is not None:
        names = sorted({o for _, o, _, _ in to_check} | {n for _, _, n, _ in to_check})
        name_vec = dict(zip(names, _encode(encoder, names)))
        title_vec = _encode(encoder, [titles[i] or "" for i, _, _, _ in to_check])
        votes = _neighbour_votes([i for i, _, _, _ in to_check], title_vec, pids, titles, old_types,
                                 encoder, cfg, canonical=lambda t: known.get(type_key(t), t))
        for (i, old, new, score), tv, vote in zip(to_check, title_vec, votes):
            cos_types = float(name_vec[old] @ name_vec[new])
            margin = float(tv @ name_vec[new] - tv @ name_vec[old])
            # a second, independent signal must agree: the product's nearest catalogue-typed
            # neighbours carry the new type more than the old one (a span on a modifier word —
            # "Pasta" in "Italian Pasta Salad" — does not survive this)
            if (cos_types < cfg.correct_max_cosine and margin > cfg.correct_title_margin
                    and vote.get(new, 0.0) > vote.get(old, 0.0)):
                pid = pids[i]
                rows[pid] = _row(
                    pid, new, score, "corrected",
                    f"tagger score={score:.2f}; was {old!r} (cosine {cos_types:.2f})",
                )

    if untyped and encoder is not None:
        ref = [(i, rows[pids[i]]["type"]) for i in range(len(pids)) if pids[i] in rows]
        if ref or (reference is not None and len(reference[0])):
            _knn_fallback(untyped, ref, pids, titles, rows, encoder, cfg, reference, canonical, ranked)

    out = pl.DataFrame([rows[p] for p in pids if p in rows], schema=PRODUCT_TYPES_SCHEMA)
    return out, candidates


def _row(pid: str, t: str, conf: float, status: str, evidence: str) -> dict:
    return {"product_id": pid, "type": t, "confidence": float(conf), "status": status, "evidence": evidence}


def _encode(encoder, texts: list[str]) -> np.ndarray:
    v = np.asarray(encoder.encode(list(texts)), dtype=np.float32)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(n, 1e-12)


def _neighbour_votes(query_rows: list[int], query_vec: np.ndarray, pids, titles, old_types, encoder,
                     cfg: TypeResolutionConfig, canonical) -> list[dict[str, float]]:
    """Similarity-weighted type votes of each queried product's k nearest catalogue-typed products
    (itself excluded)."""
    from autoknow_ray.index.faiss_index import VectorIndex

    ref = [(i, canonical(clean_surface(t))) for i, t in enumerate(old_types)
           if isinstance(t, str) and t.strip()]
    if len(ref) < 2:
        return [{} for _ in query_rows]
    ref_vec = _encode(encoder, [titles[i] or "" for i, _ in ref])
    index = VectorIndex(metric="ip", seed=cfg.seed).build(ref_vec)
    k = min(cfg.knn_k + 1, len(ref))
    scores, ids = index.search(np.asarray(query_vec, dtype=np.float32), k)
    out = []
    for row, qi in enumerate(query_rows):
        votes: dict[str, float] = defaultdict(float)
        taken = 0
        for sc, j in zip(scores[row], ids[row]):
            if j < 0 or ref[j][0] == qi or taken == cfg.knn_k:
                continue
            votes[ref[j][1]] += max(float(sc), 0.0)
            taken += 1
        out.append(dict(votes))
    return out


def _knn_fallback(untyped, ref, pids, titles, rows, encoder, cfg: TypeResolutionConfig,
                  reference=None, canonical=None, ranked=None) -> None:
    """Untyped products without a usable span: similarity-weighted vote of the k nearest typed
    products (by title embedding) — this catalogue's and the training reference's;
    confidence = the winning type's vote share."""
    from autoknow_ray.index.faiss_index import VectorIndex

    ref_types = [t for _, t in ref]
    ref_vec = _encode(encoder, [titles[i] or "" for i, _ in ref]) if ref else np.zeros((0, 0), np.float32)
    if reference is not None and len(reference[0]):
        r_types = [(canonical(t) if canonical else None) or t for t in reference[0]]
        r_vec = np.asarray(reference[1], dtype=np.float32)
        r_vec = r_vec / np.maximum(np.linalg.norm(r_vec, axis=1, keepdims=True), 1e-12)
        ref_types = ref_types + r_types
        ref_vec = r_vec if not len(ref_vec) else np.concatenate([ref_vec, r_vec])
    q_vec = _encode(encoder, [titles[i] or "" for i in untyped])
    index = VectorIndex(metric="ip", seed=cfg.seed).build(ref_vec)
    k = min(cfg.knn_k, len(ref_types))
    scores, ids = index.search(q_vec, k)
    for row, i in enumerate(untyped):
        votes: dict[str, float] = defaultdict(float)
        for s, j in zip(scores[row], ids[row]):
            if j < 0:
                continue
            votes[ref_types[j]] += max(float(s), 0.0)
        total = sum(votes.values())
        if total <= 0:
            continue
        order = sorted(votes, key=lambda t: (-votes[t], t))
        best = order[0]
        share = votes[best] / total
        if share < cfg.knn_min_share:
            continue
        pid = pids[i]
        if ranked is not None:
            ranked[pid] = [(t, votes[t] / total) for t in order]
        rows[pid] = _row(pid, best, share, "added", f"knn k={k} share={share:.2f}")


def hypernym_children(
    candidates: pl.DataFrame,
    product_types: pl.DataFrame,
    orphans: list[str] | None = None,
) -> pl.DataFrame:
    """The children to hand to `HypernymClassifier.predict`: each accepted new type with the ids
    of the products now typed with it, and each orphan type with its name only."""
    new = set(candidates.get_column("type").to_list()) if candidates.height else set()
    by_type: dict[str, list[str]] = defaultdict(list)
    for pid, t in product_types.select("product_id", "type").iter_rows():
        if t in new:
            by_type[t].append(pid)
    rows = [{"type": t, "product_ids": sorted(by_type.get(t, []))} for t in sorted(new)]
    rows += [{"type": o, "product_ids": []} for o in (orphans or []) if o not in new]
    return pl.DataFrame(rows, schema={"type": pl.String, "product_ids": pl.List(pl.String)})
