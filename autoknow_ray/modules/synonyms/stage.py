"""Module 5 as a pipeline stage: synonyms among product types and among the values of each
attribute.

    occurrences  typed products (+ earlier modules' value edits) -> (product, term) rows   [workers]
    vocabulary   count per (kind, attribute, term); capped per attribute and in total
                 in the workers                                                  [top_keys]
    embeddings   MiniLM per vocabulary term                                         [actor pool]
    candidates   FAISS kNN per (kind, attribute) + terms sharing queries / baskets / a
                 title listed more than once                                   [per term]
    scores       features + pair classifier                                         [actor pool]
    clusters     accepted pairs -> clusters around the most frequent term           [per term]
    edits        occurrences of merged terms -> removed original + corrected canonical [workers]

Outputs in RUN/synonyms/: occurrences/ (per product, written by the workers), vocabulary, pairs
(every scored candidate with its classifier score and the single-feature scores, for eval),
graph_synonyms (GRAPH_SYNONYMS) and edits/ (TRIPLES).
"""
from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pathlib import Path

from autoknow_ray import progress, runtime
from autoknow_ray.graph import state
from autoknow_ray.incremental import file_digest, reuse_on_driver, source_digest
from autoknow_ray.index.vectors import as_matrix
from autoknow_ray.modules.synonyms import model as pair_model, shift, transfer
from autoknow_ray.modules.synonyms.candidates import (PAIR_KEY, behaviour_pairs, behaviour_pairs_in_workers,
                                                      cosine_of, knn_pairs)
from autoknow_ray.modules.synonyms.cluster import clusters
from autoknow_ray.modules.synonyms.steps import (
    MODULE, OCCURRENCE, CanonicalizeTerms, EditedTerms, EmbedTerms, ExplodeTerms, ScorePairs)
from autoknow_ray.pipeline import RunContext, Stage
from autoknow_ray.schema import GRAPH_SYNONYMS, HAS_TYPE, TRIPLES, conform

VOCAB_KEY = ["kind", "attribute", "term"]
TERM_CONTEXT = pa.schema([("kind", pa.string()), ("attribute", pa.string()), ("term", pa.string()),
                          ("context", pa.string())])


def _collect(ds) -> pl.DataFrame:
    """A per-term dataset (bounded by the vocabulary cap) as one polars frame."""
    parts = [pl.from_arrow(t) for t in ray.get(ds.to_arrow_refs())]
    parts = [p for p in parts if p.height]
    return pl.concat(parts, how="vertical_relaxed") if parts else pl.DataFrame()


def _as_contexts(batch: pa.Table, prefix: str, context: str, product: str) -> pa.Table:
    """Rows in the column order of the term rows they are grouped with."""
    n = batch.num_rows
    ctx = pc.binary_join_element_wise(prefix, batch.column(context).cast(pa.string()), "")
    return pa.table({"product_id": batch.column(product).cast(pa.string()),
                     "kind": pa.nulls(n, pa.string()), "attribute": pa.nulls(n, pa.string()),
                     "term": pa.nulls(n, pa.string()), "context": ctx})


def _title_keys(batch: pa.Table) -> pa.Table:
    from autoknow_ray.modules.synonyms.distant import title_key

    return pa.table({"product_id": batch.column("product_id").cast(pa.string()),
                     "title_key": pa.array([title_key(t) for t in batch.column("title").to_pylist()],
                                           pa.string())})


def _duplicate_titles(block: pa.Table, max_products: int) -> pa.Table:
    """Per title key (a key partition, sorted by key: `runtime.map_key_blocks`): its products as
    context rows when the title is listed more than once (and at most `max_products` times: more
    is a generic title, not one item listed twice)."""
    df = pl.from_arrow(block).with_columns(pl.len().over("title_key").alias("_n"))
    df = df.filter(pl.col("title_key").is_not_null() & (pl.col("title_key") != "")
                   & (pl.col("_n") >= 2) & (pl.col("_n") <= max_products))
    n = df.height
    return pa.table({"product_id": df["product_id"].to_arrow().cast(pa.string()),
                     "kind": pa.nulls(n, pa.string()), "attribute": pa.nulls(n, pa.string()),
                     "term": pa.nulls(n, pa.string()),
                     "context": ("t:" + df["title_key"]).to_arrow().cast(pa.string())})


def _with_null(batch: pa.Table, *columns: tuple[str, pa.DataType]) -> pa.Table:
    for name, typ in columns:
        batch = batch.append_column(name, pa.nulls(batch.num_rows, typ))
    return batch


def _as_retracted(batch: pa.Table) -> pa.Table:
    """The batch's `removed` edits as retracted occurrences. It filters itself, so a block with
    no removal still yields the occurrence columns (a filtered-out empty block would reach the
    group-by without them: Ray Data does not call a UDF on an empty block)."""
    batch = batch.filter(pc.equal(batch.column("status"), "removed"))
    n = batch.num_rows
    return pa.table({"product_id": batch.column("subject"), "kind": pa.nulls(n, pa.string()),
                     "attribute": pa.nulls(n, pa.string()), "relation": batch.column("relation"),
                     "term": batch.column("object"), "retracted": pa.array([True] * n, pa.bool_())})


# a product id where it is null, for joins on the product (nulls match no row in a join; one
# null-id group must still see its own rows, as map_groups gives it)
_NULL_ID = "\x00null"


def _product_key(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.col("product_id").fill_null(_NULL_ID).alias("_pid"))


def _drop_retracted(block: pa.Table) -> pa.Table:
    """A key partition of occurrences and retracted facts (every product's rows in it): each
    product's live occurrences less those of a (relation, term) an earlier module retracted from
    that product."""
    df = _product_key(pl.from_arrow(block))
    gone_rows = pl.col("retracted").fill_null(False)
    gone = df.filter(gone_rows).select("_pid", "relation", "term").unique()
    live = df.filter(~gone_rows).join(gone, on=["_pid", "relation", "term"], how="anti",
                                      maintain_order="left")
    return conform(live.drop("retracted", "_pid").to_arrow(), OCCURRENCE)


def _in_vocabulary(batch: pa.Table, vocab: pa.Table) -> pa.Table:
    """The batch's occurrences of vocabulary terms."""
    return conform(pl.from_arrow(batch).join(pl.from_arrow(vocab), on=VOCAB_KEY, how="semi")
                   .to_arrow(), batch.schema)


def _terms_in_contexts(block: pa.Table) -> pa.Table:
    """A key partition of term rows and context rows (every product's rows in it): each
    product's distinct terms under each of its distinct contexts."""
    df = _product_key(pl.from_arrow(block))
    terms = df.filter(pl.col("term").is_not_null()).select(
        "_pid", "kind", "attribute", "term").unique(maintain_order=True)
    contexts = df.filter(pl.col("context").is_not_null()).select(
        "_pid", "context").unique(maintain_order=True)
    out = terms.join(contexts, on="_pid", how="inner", maintain_order="left_right")
    return conform(out.drop("_pid").to_arrow(), TERM_CONTEXT)


class SynonymsStage(Stage):
    name = MODULE
    config_sections = ("synonyms", "resources")
    needs = ("ingest", "taxonomy", "relations", "imputation", "cleaning")
    uses_models = True
    units = {"rows_in": "distinct terms (kind, attribute, term) in the graph's values and types",
             "rows_out": "vocabulary terms"}
    balanced = True

    def run(self, ctx: RunContext) -> dict:
        cfg = ctx.cfg.synonyms
        model_dir = ctx.models / MODULE if ctx.models is not None else None
        timer = progress.Phases()  # wall seconds of each pass, for the manifest
        self._cache: dict = {}
        self._encoder_digest = None
        occ, n_occ = self._occurrences(ctx)
        vocab, counts = self._vocabulary(ctx, occ)
        timer.done("occurrences_and_vocabulary")
        if not pair_model.exists(model_dir):
            return self._write_nothing(ctx, counts, f"no trained classifier in {model_dir}: "
                                                   "run `autoknow fit` with the synonyms module")
        classifier, meta = pair_model.load(model_dir)
        if cfg.threshold is None and meta.get("threshold") is None:
            reason = ((meta.get("calibration") or {}).get("abstain_reason")
                      or "fit found no threshold reaching its precision target")
            return {**self._write_nothing(ctx, counts, reason), "abstained": reason}
        threshold = cfg.threshold if cfg.threshold is not None else float(meta["threshold"])
        self._cosine_scorer = meta.get("scorer") == "cosine"
        # the fit catalogue's co-listed canonicals, where the classifier was trained with their vote
        self._votes = None
        if not self._cosine_scorer and pair_model.uses_votes(classifier):
            self._votes = transfer.load(model_dir, int(meta.get("canonical_vote_k") or cfg.canonical_vote_k))
            if self._votes is None:
                raise FileNotFoundError(f"{model_dir}: the classifier takes the canonical vote but "
                                        f"{transfer.TABLE} or {transfer.VECTORS} is missing: run `autoknow fit` again")
        vocab, vectors = self._embed(ctx, vocab)
        timer.done("embed_terms")
        pairs = self._candidates(ctx, occ, vocab, vectors)
        timer.done("candidates")
        scored = self._score(ctx, pairs, model_dir)
        timer.done("score_pairs")
        guard = self._shift_guard(ctx, vocab, vectors, classifier, meta, threshold)
        held = [kind for kind, g in guard.items() if g["held_back"]]
        timer.done("shift_guard")
        # no merge below the lowest cosine at which fit drew a negative
        floor = cfg.min_pair_cosine if cfg.min_pair_cosine is not None else float(meta.get("cosine_floor", 0.3))
        in_domain = pl.col("cosine") >= floor
        below = int(scored.filter((pl.col("score") >= threshold) & ~in_domain).height) if scored.height else 0
        # embedding neighbours with no shared context: fit's threshold for such pairs (None: none)
        knn_threshold = threshold
        if cfg.threshold is None and cfg.knn_only_threshold and "knn_threshold" in meta:
            knn_threshold = meta["knn_threshold"]
        knn_only = pl.col("source") == "knn"
        accept = (pl.when(knn_only).then(pl.col("score") >= (knn_threshold if knn_threshold is not None
                                                              else float("inf")))
                  .otherwise(pl.col("score") >= threshold)) & in_domain
        scored = scored.with_columns(accept.alias("accepted"))
        for kind in held:  # scored and kept in `pairs` for eval; merged into nothing
            g = guard[kind]
            g["pairs_held_back"] = int(scored.filter(pl.col("accepted") & (pl.col("kind") == kind)).height)
        if held:
            scored = scored.with_columns(pl.col("accepted") & ~pl.col("kind").is_in(held))
        ctx.write("pairs", scored)
        counts = {**counts, "term_contexts": self._context_counts,
                  "truncated": {**counts["truncated"],
                                "term_contexts": self._context_counts["left_out"]}}
        self._rescore_members = cfg.rescore_members
        merged = self._clusters(scored, vocab, vectors, classifier, threshold, cfg.max_cluster_size)
        timer.done("clusters")
        ctx.write("graph_synonyms", merged.with_columns(
            pl.when(pl.col("kind") == "type").then(None).otherwise(pl.col("attribute"))
            .alias("attribute")), GRAPH_SYNONYMS)
        if cfg.rewrite_values:
            n_edits = self._edits(ctx, occ, merged, n_occ)
        else:
            ctx.write("edits", TRIPLES.empty_table(), TRIPLES)
            n_edits = 0
        timer.done("write")
        return {**counts, "phase_seconds": timer.seconds, "occurrences": n_occ, "threshold": round(threshold, 4),
                "knn_threshold": None if knn_threshold is None else round(knn_threshold, 4),
                "scorer": meta.get("scorer", "classifier"),
                "candidate_pairs": scored.height,
                "candidates_by_source": dict(scored.group_by("source").len().rows()),
                "accepted_pairs": int(scored["accepted"].sum()) if scored.height else 0,
                "rejected_below_min_cosine": below, "min_pair_cosine": round(floor, 4), "values_rewritten": cfg.rewrite_values,
                "clusters": merged.select("kind", "attribute", "canonical").unique().height,
                "merged_terms": merged.height, "edits": n_edits,
                "shift_guard": guard,
                **({"abstained": {k: guard[k]["reason"] for k in held}} if held else {}),
                # term vectors and pair scores reused from --previous, and recomputed
                "cache": self._cache}

    def _shift_guard(self, ctx: RunContext, vocab: pl.DataFrame, vectors: np.ndarray, classifier,
                     meta: dict, threshold: float) -> dict:
        """Per kind, the shipped scorer's accepted neighbour pairs per 1,000 terms on a seeded
        sample of this vocabulary as large as fit's, against fit's (shift.py). Nothing where the
        threshold is the config's or the model predates the reference."""
        cfg = ctx.cfg.synonyms
        reference = meta.get("shift_reference")
        if cfg.threshold is not None or not reference or cfg.shift_factor is None or vocab.height == 0:
            return {}
        # as many terms as fit sampled (the same density), at most this config's training cap:
        # the sample, its kNN pairs and their scores are the driver's, bounded by that cap
        n = min(sum(r["terms"] for r in reference.values()), cfg.max_train_terms)
        idx = shift.sample_index(vocab.height, n, ctx.cfg.seed)
        sample = vocab[idx.tolist()]

        def score(pairs: pl.DataFrame) -> np.ndarray:
            return pair_model.score_pairs(classifier, self._cosine_scorer, pairs["term_a"].to_list(),
                                          pairs["term_b"].to_list(), pairs["cosine"].to_numpy(),
                                          transfer.votes_of(self._votes, pairs, sample, vectors[idx]))

        observed = shift.accepted_rate(sample, vectors[idx], score, threshold, cfg, ctx.cfg.seed)
        return shift.judge(reference, observed, cfg.shift_factor, cfg.shift_min_pairs, cfg.shift_min_terms)

    # ---- occurrences and vocabulary ------------------------------------------------------------
    def _occurrences(self, ctx: RunContext):
        n = state.n_products(ctx)
        ds = state.typed_products(ctx, ["product_id", "attributes", "brand"])
        occ = runtime.map_step(ds, ExplodeTerms(), ctx.cfg, n)
        upstream = state.upstream_edits(ctx, before=MODULE)
        if upstream is not None:
            occ = occ.union(runtime.map_step(upstream, EditedTerms(), ctx.cfg))
            removed = upstream.map_batches(_as_retracted, batch_format="pyarrow")
            # a fact an earlier module retracted is not brought back under its canonical name
            occ = occ.map_batches(_with_null, fn_args=(("retracted", pa.bool_()),),
                                  batch_format="pyarrow").union(removed)
            # rows per product are unknown before the explode: a small catalogue's are counted
            # and, when few, grouped in one task (runtime.map_key_blocks); else the shuffle
            occ = runtime.map_key_blocks(occ, "product_id", _drop_retracted,
                                         rows_hint=n + state.upstream_edit_rows(ctx, before=MODULE),
                                         small_rows=runtime.NARROW_SMALL_ROWS)
        path = ctx.out / "occurrences"
        occ.write_parquet(str(path))
        return runtime.read_parquet(path), state.count_rows(path)

    def _vocabulary(self, ctx: RunContext, occ) -> tuple[pl.DataFrame, dict]:
        """Terms by product count, capped per (kind, attribute) and in total in the workers
        (`runtime.top_keys`): the driver holds the capped vocabulary, or at most
        `ray.driver_combine_rows` partial counts, never the whole term table."""
        cfg = ctx.cfg.synonyms
        top = runtime.top_keys(
            occ, VOCAB_KEY, {"n": ("count", None)}, cap=cfg.max_terms, order_by=[("n", "desc")],
            per_group=(["kind", "attribute"], cfg.max_terms_per_attribute),
            drop={"no_term": pl.col("term").is_null(),
                  "term_too_long": pl.col("term").str.len_chars() > cfg.max_term_chars})
        capped = top.rows if top.rows.height else pl.DataFrame(
            schema={"kind": pl.String, "attribute": pl.String, "term": pl.String, "n": pl.Int64})
        capped = capped.select(*VOCAB_KEY, pl.col("n").cast(pl.Int64))
        ctx.write("vocabulary", capped)
        # rows: distinct (kind, attribute, term) of the occurrences; the balance is checked by
        # run_stages (Stage.balanced)
        counts = {"rows_in": top.keys, "rows_out": capped.height,
                  "rows_dropped": {"term_too_long": top.dropped["term_too_long"],
                                   "over_vocabulary_cap": top.left_out,
                                   "no_term": top.dropped["no_term"]},
                  "truncated": {"vocabulary": top.left_out},
                  "terms_by_kind": dict(capped.group_by("kind").len().rows())}
        return capped.sort(VOCAB_KEY), counts

    def _write_nothing(self, ctx: RunContext, counts: dict, reason: str) -> dict:
        ctx.write("graph_synonyms", GRAPH_SYNONYMS.empty_table(), GRAPH_SYNONYMS)
        ctx.write("edits", TRIPLES.empty_table(), TRIPLES)
        return {**counts, "skipped": reason, "merged_terms": 0, "edits": 0}

    # ---- embeddings, candidates, scores -------------------------------------------------------
    def _embed(self, ctx: RunContext, vocab: pl.DataFrame) -> tuple[pl.DataFrame, np.ndarray]:
        if vocab.height == 0:
            return vocab, np.zeros((0, 1), np.float32)
        def embed(terms: pl.DataFrame) -> pl.DataFrame:
            return _collect(runtime.map_step(ray.data.from_arrow(terms.to_arrow()),
                                             EmbedTerms(ctx.cfg.synonyms.encoder), ctx.cfg, terms.height))

        # `rebuild --previous RUN`: the vectors of terms RUN embedded with the same encoder,
        # precision and code are reused (a term's vector does not depend on its batch)
        out, self._cache["term_vectors"] = reuse_on_driver(
            "term_vectors", vocab.select("kind", "attribute", "term"), ["kind", "attribute", "term"],
            ["embedding"], self._fingerprint(ctx, "term_vectors"), embed, ctx.out,
            ctx.previous_stage(self.name))
        out = out.join(vocab.select("kind", "attribute", "term", "n"),
                       on=["kind", "attribute", "term"], how="left").sort(["kind", "attribute", "term"])
        vectors = as_matrix(out["embedding"], np.float32).copy()
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-6)
        return out.drop("embedding"), vectors

    def _term_contexts(self, ctx: RunContext, occ, vocab: pl.DataFrame) -> runtime.TopKeys | None:
        """(kind, attribute, term, context, n): products showing a vocabulary term under a
        context. Capped in the workers (`runtime.top_keys`): each context keeps its
        `max_terms_per_context` most frequent terms, and `max_term_contexts` rows are kept in
        all, the most frequent first, ties by key. None where the catalogue has no context."""
        cfg = ctx.cfg.synonyms
        parts = []
        # an upper bound on the rows grouped below (terms and context rows), from Parquet metadata
        n_rows = state.count_rows(ctx.out / "occurrences")
        if state.count_rows(ctx.table_path("ingest", "behavior")):
            n_rows += state.count_rows(ctx.table_path("ingest", "behavior"))
            b = runtime.read_parquet(ctx.table_path("ingest", "behavior"), ["query", "product_id"])
            parts.append(b.map_batches(_as_contexts, fn_args=("q:", "query", "product_id"),
                                       batch_format="pyarrow"))
        if state.count_rows(ctx.table_path("ingest", "copurchase")):
            n_rows += 2 * state.count_rows(ctx.table_path("ingest", "copurchase"))
            c = runtime.read_parquet(ctx.table_path("ingest", "copurchase"), ["src", "dst"])
            # one basket context per product: itself and what was bought with it
            parts.append(c.map_batches(_as_contexts, fn_args=("p:", "src", "dst"), batch_format="pyarrow"))
            parts.append(c.map_batches(_as_contexts, fn_args=("p:", "src", "src"), batch_format="pyarrow"))
        if ctx.cfg.synonyms.colisted:
            # the same item listed twice (one normalised title): its values of one attribute
            # name the same thing, or disagree; either way a pair worth scoring
            n_titles = state.count_rows(ctx.table_path("ingest", "products"))
            n_rows += n_titles
            t = runtime.read_parquet(ctx.table_path("ingest", "products"), ["product_id", "title"])
            parts.append(runtime.map_key_blocks(t.map_batches(_title_keys, batch_format="pyarrow"),
                                                "title_key", _duplicate_titles,
                                                fn_args=(ctx.cfg.synonyms.max_products_per_title,),
                                                n_rows=n_titles))
        if not parts or vocab.height == 0:
            return None
        # only vocabulary terms take part (and take a context's places)
        terms = occ.select_columns(["product_id", "kind", "attribute", "term"]).map_batches(
            _in_vocabulary, fn_args=(vocab.select(VOCAB_KEY).to_arrow(),), batch_format="pyarrow"
        ).map_batches(_with_null, fn_args=(("context", pa.string()),), batch_format="pyarrow")
        contexts = parts
        # per product: every term of it under every context it was seen in (one polars join per
        # key partition: `map_key_blocks`, not a Python call per product)
        joined = runtime.map_key_blocks(terms.union(*contexts), "product_id", _terms_in_contexts,
                                        n_rows=n_rows, small_rows=runtime.NARROW_SMALL_ROWS)
        return runtime.top_keys(joined, [*VOCAB_KEY, "context"], {"n": ("count", None)},
                                cap=cfg.max_term_contexts, order_by=[("n", "desc")],
                                per_group=(["kind", "attribute", "context"],
                                           cfg.max_terms_per_context))

    def _candidates(self, ctx: RunContext, occ, vocab: pl.DataFrame, vectors: np.ndarray) -> pl.DataFrame:
        cfg = ctx.cfg.synonyms
        knn = knn_pairs(vocab, vectors, cfg.knn_k, cfg.knn_min_cosine, cfg.ivf_min_size, ctx.cfg.seed)
        top = self._term_contexts(ctx, occ, vocab)
        tc = top.rows if top is not None else pl.DataFrame()
        self._context_counts = {"keys": top.keys if top is not None else 0, "kept": tc.height,
                                "left_out": top.left_out if top is not None else 0,
                                "cap_reached": tc.height >= cfg.max_term_contexts}
        # the pairs of terms sharing contexts, made and counted in the workers: the driver holds
        # the capped pairs, not the self-join of every context
        beh = behaviour_pairs_in_workers(tc, cfg.max_terms_per_context, cfg.min_shared_contexts,
                                         cfg.max_behaviour_pairs) if tc.height else behaviour_pairs(
            pl.DataFrame(), 1, 1, 0)
        pairs = knn.join(beh, on=PAIR_KEY, how="full", coalesce=True).with_columns(
            pl.when(pl.col("cosine").is_null()).then(pl.lit("behaviour"))
            .when(pl.col("shared").is_null()).then(pl.lit("knn")).otherwise(pl.lit("both"))
            .alias("source"),
            pl.col("shared").fill_null(0))
        missing = pairs["cosine"].is_null().to_numpy()
        if missing.any():
            cos = cosine_of(pairs, vocab, vectors)
            pairs = pairs.with_columns(pl.Series("cosine", np.where(missing, cos,
                                                                     pairs["cosine"].fill_null(0).to_numpy()),
                                                 dtype=pl.Float32))
        pairs = pairs.select(*PAIR_KEY, "source", pl.col("cosine").cast(pl.Float32),
                             pl.col("shared").cast(pl.Int64)).sort(PAIR_KEY)
        if self._votes is not None:  # a feature of the pair, computed here beside its cosine
            pairs = pairs.with_columns(pl.Series(transfer.FEATURE, transfer.votes_of(
                self._votes, pairs, vocab, vectors), dtype=pl.Float32))
        return pairs

    def _score(self, ctx: RunContext, pairs: pl.DataFrame, model_dir) -> pl.DataFrame:
        if pairs.height == 0:
            return pairs.with_columns(pl.lit(None, pl.Float32).alias("edit_sim"),
                                      pl.lit(None, pl.Float32).alias("score"))
        def score(rows: pl.DataFrame) -> pl.DataFrame:
            return _collect(runtime.map_step(ray.data.from_arrow(rows.to_arrow()),
                                             ScorePairs(model_dir, votes=transfer.FEATURE in rows.columns),
                                             ctx.cfg, rows.height))

        # a pair's scores depend on its row alone (its terms, cosine and shared contexts) and
        # the classifier: `rebuild --previous RUN` reuses RUN's scores of the same rows
        out, self._cache["pair_scores"] = reuse_on_driver(
            "pair_scores", pairs, list(pairs.columns), ["edit_sim", "score"],
            {**self._fingerprint(ctx, "pair_scores"), "model": file_digest([Path(model_dir)])},
            score, ctx.out, ctx.previous_stage(self.name))
        return out.sort(PAIR_KEY)

    def _fingerprint(self, ctx: RunContext, what: str) -> dict:
        """What a cached term vector or pair score depends on besides its row."""
        from autoknow_ray.nn.encoder import resolve_encoder

        device = runtime.plan_actors(ctx.cfg, MODULE).device
        if getattr(self, "_encoder_digest", None) is None:  # its files hashed once per run
            self._encoder_digest = file_digest([Path(resolve_encoder(ctx.cfg.synonyms.encoder))])
        return {"what": what, "encoder": self._encoder_digest,
                "bf16": bool(runtime.model_bf16(device)), "device": device,
                "code": source_digest(["autoknow_ray.modules.synonyms.steps",
                                       "autoknow_ray.modules.synonyms.features",
                                       "autoknow_ray.modules.synonyms.model", "autoknow_ray.nn.encoder"])}

    # ---- clusters and edits ---------------------------------------------------------------------
    def _clusters(self, scored: pl.DataFrame, vocab: pl.DataFrame, vectors: np.ndarray,
                  classifier, threshold: float, max_size: int) -> pl.DataFrame:
        rows = []
        pos = {(k, a, t): i for i, (k, a, t) in enumerate(vocab.select("kind", "attribute", "term").iter_rows())}
        counts = {(k, a, t): n for k, a, t, n in vocab.select("kind", "attribute", "term", "n").iter_rows()}
        accepted = scored.filter(pl.col("accepted")) if scored.height else scored
        for (kind, attr), g in accepted.group_by(["kind", "attribute"], maintain_order=True):
            edges = {(a, b): s for a, b, s in g.select("term_a", "term_b", "score").iter_rows()}

            def score_pairs(pairs, kind=kind, attr=attr):
                ia = np.array([pos[(kind, attr, a)] for a, _ in pairs], dtype=np.int64)
                ib = np.array([pos[(kind, attr, b)] for _, b in pairs], dtype=np.int64)
                cos = [float(vectors[i] @ vectors[j]) for i, j in zip(ia.tolist(), ib.tolist())]
                a_terms, b_terms = [a for a, _ in pairs], [b for _, b in pairs]
                votes = None if self._votes is None else self._votes.pair_votes(
                    [kind] * len(pairs), [attr] * len(pairs), a_terms, b_terms, vectors[ia], vectors[ib])
                return pair_model.score_pairs(classifier, self._cosine_scorer, a_terms, b_terms, cos,
                                              votes).tolist()

            term_counts = {t: counts.get((kind, attr, t), 0) for e in edges for t in e}
            scorer = score_pairs if self._rescore_members else None
            for term, canon, s in clusters(edges, term_counts, threshold, scorer, max_size):
                rows.append((kind, attr, term, canon, s))
        return pl.DataFrame(rows, schema={"kind": pl.String, "attribute": pl.String, "term": pl.String,
                                          "canonical": pl.String, "score": pl.Float32}, orient="row")

    def _edits(self, ctx: RunContext, occ, merged: pl.DataFrame, n_occ: int) -> int:
        if merged.height == 0:
            ctx.write("edits", TRIPLES.empty_table(), TRIPLES)
            return 0
        mapping = {(HAS_TYPE if k == "type" else a, t): (c, float(s))
                   for k, a, t, c, s in merged.select("kind", "attribute", "term", "canonical", "score").iter_rows()}
        path = ctx.out / "edits"
        runtime.map_step(occ, CanonicalizeTerms(mapping), ctx.cfg, n_occ).write_parquet(str(path))
        return state.count_rows(path)

