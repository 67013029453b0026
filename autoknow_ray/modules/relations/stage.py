"""Module 2 as a stage: which attributes apply to each product type, and how much buyers care.

Read the products with their current type (new types of module 1 included) -> count, in the
workers, the products and customer texts of each type that mention each attribute -> sum per
(type, attribute) -> features with the type's neighbours in the taxonomy and in name-embedding
space (the types labelled in fit) -> the two fitted models -> `graph_attributes`.

A type without products (a taxonomy node) has no text of its own: it takes the applicability of
its known taxonomy neighbours, else of its nearest known types by name.
"""
from __future__ import annotations

import json

import numpy as np
import polars as pl

from autoknow_ray import progress
from autoknow_ray.graph import state
from autoknow_ray.index.vectors import as_matrix
from autoknow_ray.modules.relations import evidence
from autoknow_ray.modules.relations.config import RelationsConfig
from autoknow_ray.modules.relations.counting import count_mentions, sample_vocabulary
from autoknow_ray.modules.relations.features import (
    EMPTY, FEATURES, PRODUCTS, QUERY, TEXT, UNMATCHED, Known, Vocabulary, embed_names,
    feature_matrix, text_features, wide_counts,
)
from autoknow_ray.modules.relations.fit import APPLICABILITY, IMPORTANCE, KNOWN, VOCABULARY
from autoknow_ray.modules.relations.model import load_scorer, predict
from autoknow_ray.pipeline import RunContext, Stage, check_balance, read_manifest
from autoknow_ray.schema import GRAPH_ATTRIBUTES


class RelationsModels:
    """The artifacts of `fit_relations`, loaded from a local folder."""

    def __init__(self, folder):
        if not (folder / APPLICABILITY).is_dir():
            raise FileNotFoundError(f"{folder}: no relations models ({APPLICABILITY}/ missing); "
                                    "run `autoknow fit` with the relations stage in the config")
        self.vocabulary = Vocabulary.from_json(json.loads((folder / VOCABULARY).read_text()))
        self.applicability, meta = load_scorer(folder / APPLICABILITY)
        if meta["features"] != list(FEATURES):
            raise ValueError(f"{folder}: models were fitted on other features; fit again")
        self.threshold = float(meta.get("threshold") or 0.5)  # picked in fit
        self.importance = load_scorer(folder / IMPORTANCE)[0] if (folder / IMPORTANCE).is_dir() else None
        known = pl.read_parquet(folder / KNOWN)
        self.types = known["type"].to_list()
        self.embeddings = as_matrix(known["embedding"], np.float32)
        self.applies = known["applies"].to_list()

    def known(self, attributes: list[str]) -> Known:
        col = {a: j for j, a in enumerate(attributes)}
        labels = np.zeros((len(self.types), len(attributes)), dtype=np.float32)
        for i, applies in enumerate(self.applies):
            for a in applies:
                if a in col:
                    labels[i, col[a]] = 1.0
        return Known(self.types, self.embeddings.reshape(len(self.types), -1), labels, attributes)


def ranked(df: pl.DataFrame) -> pl.DataFrame:
    """rank 1 = the type's most important applicable attribute; inapplicable ones come last."""
    return df.with_columns(
        pl.struct(pl.col("applicable").not_(), -pl.col("importance"), "attribute")
        .rank("ordinal").over("type").cast(pl.Int32).alias("rank"))


def with_fit_labels(applicability: np.ndarray, types: list[str], known: Known) -> np.ndarray:
    """A type labelled in fit keeps what fit's catalogue said: an attribute filled for its
    products there applies (applicability 1). The features of a type are leave-one-out (its own
    labels never reach them), so without this a seen type would be judged as if new. Attributes
    it never had keep the model's score: its text here may show new ones. Row order: type-major,
    `known.labels` over the same attributes."""
    na = known.labels.shape[1]
    row = {t: i for i, t in enumerate(known.types)}
    out = applicability.reshape(len(types), na).copy()
    for i, t in enumerate(types):
        if t in row:
            out[i] = np.where(known.labels[row[t]] > 0.5, 1.0, out[i])
    return out.reshape(-1)


def score_pairs(models: RelationsModels, totals: pl.DataFrame, hits: pl.DataFrame,
                types: list[str], without: list[str], attrs: list[str], taxonomy: pl.DataFrame,
                cfg: RelationsConfig, device: str = "auto", tagger: dict | None = None,
                report: dict | None = None):
    """The graph_attributes rows of `types` x `attrs`, the feature matrix and the text features.

    `tagger`: module 1's tagger figures from fit (its labels and validation precision), for the
    evidence of module 1's title attributes; `report` receives what that evidence decided."""
    df = text_features(totals, hits, types, attrs)
    known = models.known(attrs)
    type_emb = embed_names(cfg.encoder, types, device)
    attr_emb = embed_names(cfg.encoder, attrs, device)
    x = feature_matrix(df, types, attrs, known, type_emb, attr_emb, taxonomy, cfg.neighbours)
    applicability = predict(models.applicability, x)
    importance = (predict(models.importance, x) if models.importance is not None
                  else applicability.copy())
    # no products, no text: the neighbours' say (taxonomy first, else name embedding)
    no_text = np.repeat(np.array([t in set(without) for t in types]), len(attrs))
    f = {n: i for i, n in enumerate(FEATURES)}
    tax_known = x[:, f["tax_known"]] > 0
    inherited = np.where(tax_known, x[:, f["tax_mean"]], x[:, f["knn_mean"]])
    applicability = np.where(no_text, inherited, applicability).astype(np.float32)
    applicability = with_fit_labels(applicability, types, known)
    threshold = cfg.threshold if cfg.threshold is not None else models.threshold
    applicable = applicability >= threshold
    # a type fit never labelled: what this catalogue shows of it decides where it shows anything
    if cfg.catalogue_evidence:
        readable = readable_attributes(df, attrs, tagger)
        applicability, applicable, evidence_report = with_catalogue_evidence(
            df, applicability, applicable, types, known, models, readable, cfg, tagger)
        importance = with_title_share(df, importance, readable)
        if report is not None:
            report.update(evidence_report)
    out = ranked(pl.DataFrame({
        "type": df["type"], "attribute": df["attribute"],
        "applicability": applicability.astype(np.float32),
        "applicable": applicable,
        "importance": importance.astype(np.float32),
    }))
    return out, x, df


def readable_attributes(df: pl.DataFrame, attrs: list[str], tagger: dict | None) -> set[str]:
    """The attributes module 1's tagger reads (its labels in fit; without them, those it tagged
    here); none where it wrote no title attribute in this catalogue."""
    tagged_any = set(df.filter(pl.col("tagged") > 0)["attribute"].unique().to_list())
    if not tagged_any:
        return set()
    labels = [x for x in (tagger or {}).get("labels", []) if x != "type"]
    return (set(labels) & set(attrs)) if labels else tagged_any


def with_title_share(df: pl.DataFrame, importance: np.ndarray, readable: set[str]) -> np.ndarray:
    """Importance, for a type whose titles module 1 read: the mean of the model's importance and
    the share of the type's products whose title module 1 found the attribute in
    (confidence-weighted; 0 for an attribute its tagger does not read), the rebuild's own view
    of how often sellers state it (the figures: docs/relations.md)."""
    if not readable:
        return importance
    read = df.group_by("type").agg((pl.col("tagged") > 0).any().alias("_read"))
    x = df.select("type", "attribute", "products", "tagged_score").join(read, on="type", how="left")
    use = (x["_read"].fill_null(False) & (x["products"] > 0)).to_numpy()
    share = (x["tagged_score"] / x["products"].cast(pl.Float64).clip(1, None)).to_numpy()
    return np.where(use, 0.5 * (importance + np.clip(share, 0.0, 1.0)), importance)


def with_catalogue_evidence(df: pl.DataFrame, applicability: np.ndarray, applicable: np.ndarray,
                            types: list[str], known: Known, models: RelationsModels,
                            readable: set[str], cfg: RelationsConfig, tagger: dict | None):
    """`evidence.title_evidence` over the types fit never labelled (row order of `df`)."""
    known_types = set(known.types)
    new_types = [t for t in types if t not in known_types]
    applies = {t: set(a) for t, a in zip(models.types, models.applies)}
    noise = evidence.noise_from_known(df, known_types, applies, readable)
    if noise.rate is None:
        noise = evidence.noise_from_fit(tagger) if readable else evidence.NoiseRate(
            None, "no title attribute from module 1 in this catalogue")
    rows, report = evidence.title_evidence(df, new_types, readable, noise, cfg.min_fill_products)
    decided = rows.filter(pl.col("decided"))
    if decided.height == 0:
        return applicability, applicable, {"catalogue_evidence": report}
    idx = (df.select("type", "attribute").with_row_index("_row")
           .join(decided.select("type", "attribute", "evidence_applies", "evidence_score"),
                 on=["type", "attribute"], how="inner"))
    at = idx["_row"].to_numpy()
    applicability = applicability.copy()
    applicable = applicable.copy()
    # the decision is the evidence's; the score, for ranking, the mean of the evidence's and the
    # model's (the tail probability saturates at 1 for every well-attested attribute)
    applicability[at] = 0.5 * (idx["evidence_score"].to_numpy() + applicability[at])
    applicable[at] = idx["evidence_applies"].to_numpy()
    return applicability, applicable, {"catalogue_evidence": report}


class RelationsStage(Stage):
    name = "relations"
    config_sections = ("relations", "resources")
    needs = ("ingest", "taxonomy")
    uses_models = True
    # not one row per product: a type's products are summed into its rows. The balance that
    # holds is in products (rows_in = products_in_rows + rows_dropped: the untyped ones, or
    # every product where nothing is scored), checked in `run`; rows_out = types x attributes,
    # checked too. No quarantine.
    units = {"rows_in": "products",
             "rows_out": "(type, attribute) rows: every type with products or in the taxonomy "
                         "x every attribute of the vocabulary"}

    def run(self, ctx: RunContext) -> dict:
        cfg: RelationsConfig = ctx.cfg.relations
        if ctx.models is None:
            raise FileNotFoundError("the relations stage needs fitted models (--models)")
        folder = ctx.models / "relations"
        skipped = (read_manifest(ctx.models).get("modules") or {}).get("relations", {}).get("skipped")
        if skipped and not (folder / APPLICABILITY).is_dir():
            # fit ran and found nothing to learn (a catalogue without structured attributes, as
            # Instacart's): an empty table with the reason, not an error that stops the job
            ctx.write("graph_attributes", GRAPH_ATTRIBUTES.empty_table(), GRAPH_ATTRIBUTES)
            n = state.n_products(ctx)
            return {"rows_in": n, "rows_out": 0, "products_in_rows": 0,
                    "rows_dropped": {"no relations model": n} if n else {},
                    "applicable_pairs": 0, "skipped": f"no relations model: fit said {skipped!r}"}
        timer = progress.Phases()  # wall seconds of each pass, for the manifest
        models = RelationsModels(folder)
        here = sample_vocabulary(ctx, cfg)
        vocab = models.vocabulary.merged(here, cfg.max_attributes, cfg.values_per_attribute)
        attrs = vocab.attributes
        timer.done("vocabulary")
        long = count_mentions(ctx, vocab, cfg, timer)
        totals, hits = wide_counts(long, attrs)
        timer.done("wide_counts")
        taxonomy = state.current_taxonomy(ctx)
        with_products = sorted(totals.filter((pl.col("type") != "") & (pl.col(PRODUCTS) > 0))
                               ["type"].to_list())
        tax_types = set(taxonomy["type"].drop_nulls().to_list()) if taxonomy.height else set()
        without = sorted(tax_types - set(with_products))
        types = with_products + without
        n_products = state.n_products(ctx)
        untyped = int(totals.filter(pl.col("type") == "")[PRODUCTS].sum() or 0)
        typed = int(totals.filter(pl.col("type").is_in(with_products))[PRODUCTS].sum() or 0)
        counts = {
            "rows_in": n_products,
            "types": len(types), "types_with_products": len(with_products),
            "types_without_products": len(without),
            "types_new": len(set(types) - set(models.types)),
            "attributes": len(attrs),
            "attributes_new_in_catalogue": len(set(attrs) - set(models.vocabulary.attributes)),
            "attributes_single_product": sum(1 for a in here.attributes if here.products.get(a) == 1),
            "untyped_products": untyped,
            "products_empty_text": int(totals[EMPTY].sum() or 0),
            "texts": int(totals[TEXT].sum() or 0), "queries": int(totals[QUERY].sum() or 0),
            "texts_empty": int(totals[f"{TEXT}_{EMPTY}"].sum() or 0),
            "queries_empty": int(totals[f"{QUERY}_{EMPTY}"].sum() or 0),
        }
        counts["customer_rows_not_counted"] = int(  # product unknown, untyped or not sampled
            totals.select(pl.col(f"{TEXT}_{UNMATCHED}") + pl.col(f"{QUERY}_{UNMATCHED}")).sum().item()
            if totals.height else 0)
        # every product is counted once, under its type or as untyped ("")
        dropped = {"untyped product": untyped} if untyped else {}
        if not types or not attrs:
            if typed:  # typed products, but no attribute to write a row of
                dropped["no attribute vocabulary"] = typed
            check_balance("relations: products", n_products, 0, dropped=dropped)
            ctx.write("graph_attributes", GRAPH_ATTRIBUTES.empty_table(), GRAPH_ATTRIBUTES)
            return {**counts, "rows_out": 0, "products_in_rows": 0, "rows_dropped": dropped,
                    "applicable_pairs": 0,
                    "note": "no typed product and no taxonomy type" if not types
                    else "no attribute vocabulary"}
        # products in = products of the types written + the ones dropped
        check_balance("relations: products", n_products, typed, dropped=dropped)
        fitted = (read_manifest(ctx.models).get("modules") or {}).get("taxonomy") or {}
        evidence_report: dict = {}
        out, x, df = score_pairs(models, totals, hits, types, without, attrs, taxonomy, cfg,
                                 ctx.cfg.device, tagger=fitted.get("tagger"), report=evidence_report)
        timer.done("score_pairs")
        check_balance("relations: (type, attribute) rows", len(types) * len(attrs), out.height)
        ctx.write("graph_attributes", out.select(GRAPH_ATTRIBUTES.names), GRAPH_ATTRIBUTES)
        ctx.write("features", pl.concat([df.select("type", "attribute", "products", "texts"),
                                         pl.DataFrame(x, schema=list(FEATURES), orient="row")],
                                        how="horizontal"))
        timer.done("write")
        return {**counts, "rows_out": out.height, "products_in_rows": typed,
                "phase_seconds": timer.seconds,
                "rows_dropped": dropped,
                "applicable_pairs": int(out["applicable"].sum()),
                "types_inherited_from_neighbours": len(without), **evidence_report}
