"""`autoknow fit` for module 2: the applicability and importance models, from one catalogue.

Labels come from the catalogue itself: an attribute applies to a type when it is filled for at
least `min_fill_products` of the type's products, and does not when it is never filled there
(types whose products carry no structured attribute at all are left out: they say nothing).
The weak importance label is the fill rate, blended with the rate at which customer texts of the
type mention the attribute. Neither label is a feature: the features are text occurrences and
what the type's neighbours (taxonomy, name embedding) have, computed leave-one-out, so the model
learns to use neighbours exactly as it must for a type it has never seen.

Which model (MLP, linear, ridge or gradient-boosted trees) and which decision threshold are
picked on out-of-fold predictions: the labelled types are split into `folds` groups, each
predicted by models trained on the other groups, with its neighbour features computed from those
types only (so every type is scored as a type never seen). Applicability's kind is the one of
best out-of-fold AUC-PR, importance's the one of best out-of-fold Spearman; the chosen kinds are
then trained on every labelled type; the threshold of best out-of-fold F1 travels with them
(unless the config sets one).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import polars as pl

from autoknow_ray.eval.metrics import average_precision, spearman
from autoknow_ray.modules.relations.config import RelationsConfig
from autoknow_ray.modules.relations.counting import count_mentions, sample_vocabulary
from autoknow_ray.modules.relations.features import (
    FEATURES, Known, Vocabulary, embed_names, feature_matrix, text_features, wide_counts,
)
from autoknow_ray.modules.relations.model import (
    best_threshold, f1_at, predict, save_scorer, train_scorer, train_trees,
)
from autoknow_ray.pipeline import RunContext

VOCABULARY = "vocabulary.json"
KNOWN = "known_types.parquet"
APPLICABILITY, IMPORTANCE = "applicability", "importance"
# model kinds compared in fit: (hidden units, None = the config's `hidden`; weight decay, None =
# the config's `weight_decay`, else `ridge_weight_decay`): "ridge" is a linear model whose strong
# L2 keeps its logits moderate where few types leave the features nearly separable in training;
# "gbt": gradient-boosted trees (`model.train_trees`, the config's `gbt_*`), another family
KINDS = {"mlp": (None, None), "linear": (0, None), "ridge": (0, "ridge"), "gbt": (0, None)}


def _kind(kind: str, cfg: RelationsConfig) -> tuple[int, float]:
    hidden, wd = KINDS[kind]
    return (cfg.hidden if hidden is None else hidden,
            cfg.weight_decay if wd is None else cfg.ridge_weight_decay)


def importance_target(df: pl.DataFrame, customer_weight: float) -> pl.DataFrame:
    """Weak importance label per pair: the fill rate, blended with the customer mention rate
    (relative to the type's most mentioned attribute) where the type has customer texts."""
    fill = pl.col("filled") / pl.col("products").cast(pl.Float64).clip(1, None)
    cust = pl.col("text_rate") / pl.col("text_rate").max().over("type").clip(1e-9, None)
    return df.with_columns(importance_target=pl.when(pl.col("texts") > 0)
                           .then((1 - customer_weight) * fill + customer_weight * cust)
                           .otherwise(fill))


def _fit_model(x, target, cfg: RelationsConfig, kind: str, seed: int, *, binary: bool):
    if kind == "gbt":
        return train_trees(x, target, binary=binary, rounds=cfg.gbt_rounds, depth=cfg.gbt_depth,
                           learning_rate=cfg.gbt_learning_rate)
    hidden, weight_decay = _kind(kind, cfg)
    return train_scorer(x, target, hidden=hidden, epochs=cfg.epochs, lr=cfg.lr,
                        weight_decay=weight_decay, seed=seed, binary=binary)


def _fit_pairs(x, y, imp, cfg: RelationsConfig, kind: str, seed: int, imp_kind: str | None = None):
    """(applicability, importance) models; importance on the applicable pairs only, of
    `imp_kind` (default: the applicability model's kind)."""
    pos = y > 0.5
    app = _fit_model(x, y, cfg, kind, seed, binary=True)
    im = (_fit_model(x[pos], imp[pos], cfg, imp_kind or kind, seed, binary=False)
          if pos.any() else None)
    return app, im


def _mean_spearman(types: list[str], n_attr: int, y: np.ndarray, target: np.ndarray,
                   score: np.ndarray) -> float | None:
    rs = []
    for i in range(len(types)):
        sl = slice(i * n_attr, (i + 1) * n_attr)
        pos = y[sl] > 0.5
        if pos.sum() >= 3:
            r = spearman(target[sl][pos], score[sl][pos])
            if r is not None:
                rs.append(r)
    return round(float(np.mean(rs)), 4) if rs else None


def fit_relations(ctx: RunContext, out: Path) -> dict:
    cfg: RelationsConfig = ctx.cfg.relations
    t0 = time.perf_counter()
    vocab = sample_vocabulary(ctx, cfg)
    if not vocab.attributes:
        return {"skipped": "no product has a structured attribute: no label says which "
                           "attributes apply to which type"}
    long = count_mentions(ctx, vocab, cfg)
    stats = fit_from_counts(long, vocab, ctx.read("ingest", "taxonomy"), cfg, out,
                            seed=ctx.cfg.seed, device=ctx.cfg.device)
    return {**stats, "seconds": round(time.perf_counter() - t0, 2)}


def fit_from_counts(long: pl.DataFrame, vocab: Vocabulary, taxonomy: pl.DataFrame,
                    cfg: RelationsConfig, out: Path, *, seed: int, device: str = "auto") -> dict:
    """Labels, features, model choice and the final models, from the summed counts (small:
    types x attributes) of `counting.count_mentions`."""
    attrs = vocab.attributes
    totals, hits = wide_counts(long, attrs)
    filled_types = set(hits.filter(pl.col("filled") > 0)["type"].to_list())
    typed = totals.filter((pl.col("type") != "") & (pl.col("products") > 0))
    types = sorted(t for t in typed["type"].to_list() if t in filled_types)
    if len(types) < 2:
        return {"skipped": f"{len(types)} type(s) with structured attributes: at least 2 are "
                           "needed to learn from neighbours"}
    if len(types) * len(attrs) > cfg.max_train_pairs:
        rng = np.random.default_rng(seed)
        keep = max(2, cfg.max_train_pairs // len(attrs))
        types = sorted(rng.choice(types, size=keep, replace=False).tolist())
    df = importance_target(text_features(totals, hits, types, attrs), cfg.importance_customer_weight)
    y = (df["filled"].to_numpy() >= cfg.min_fill_products).astype(np.float32)
    imp = df["importance_target"].to_numpy().astype(np.float32).clip(0, 1)
    type_emb = embed_names(cfg.encoder, types, device)
    attr_emb = embed_names(cfg.encoder, attrs, device)
    labels = y.reshape(len(types), len(attrs))
    na = len(attrs)

    # pick the model kind and the threshold on out-of-fold predictions over the types: each fold
    # is "new", its neighbour features from the other folds' types only
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(types))
    n_folds = min(cfg.folds, len(types))
    fold_of = np.empty(len(types), dtype=np.int64)
    fold_of[order] = np.arange(len(types)) % n_folds

    def rows(idx):
        return np.concatenate([np.arange(i * na, (i + 1) * na) for i in idx])

    folds = []
    for f in range(n_folds):
        val_i = [i for i in range(len(types)) if fold_of[i] == f]
        tr_i = [i for i in range(len(types)) if fold_of[i] != f]
        tr_types, val_types = [types[i] for i in tr_i], [types[i] for i in val_i]
        known_tr = Known(tr_types, type_emb[tr_i], labels[tr_i], attrs)
        x_tr = feature_matrix(df[rows(tr_i)], tr_types, attrs, known_tr, type_emb[tr_i], attr_emb,
                              taxonomy, cfg.neighbours)
        x_val = feature_matrix(df[rows(val_i)], val_types, attrs, known_tr, type_emb[val_i],
                               attr_emb, taxonomy, cfg.neighbours)
        folds.append((rows(tr_i), rows(val_i), x_tr, x_val))
    comparison, oof = {}, {}
    for kind in KINDS:
        p_app, p_imp = np.zeros(len(y), np.float32), np.zeros(len(y), np.float32)
        for tr, val, x_tr, x_val in folds:
            app, im = _fit_pairs(x_tr, y[tr], imp[tr], cfg, kind, seed)
            p_app[val] = predict(app, x_val)
            p_imp[val] = predict(im, x_val) if im is not None else p_app[val]
        oof[kind] = p_app
        thr, f1 = best_threshold(y, p_app)
        comparison[kind] = {
            "oof_auc_pr": round(average_precision(y, p_app), 4),
            "oof_f1_at_0.5": round(f1_at(y, p_app, 0.5), 4),
            "oof_best_threshold": thr, "oof_best_f1": round(f1, 4),
            "oof_importance_spearman": _mean_spearman(types, na, y, imp, p_imp),
        }
    kind = cfg.model if cfg.model != "auto" else max(
        comparison, key=lambda k: (comparison[k]["oof_auc_pr"], k == "linear"))
    # importance is another task (ranking the applicable attributes of a type): its kind is
    # picked on its own out-of-fold Spearman, not on the applicability model's AUC-PR
    imp_kind = cfg.model if cfg.model != "auto" else max(
        comparison, key=lambda k: (comparison[k]["oof_importance_spearman"] is not None,
                                   comparison[k]["oof_importance_spearman"] or 0.0, k == kind))
    hidden = _kind(kind, cfg)[0]
    threshold = (cfg.threshold if cfg.threshold is not None
                 else comparison[kind]["oof_best_threshold"])

    # the final models: every labelled type, neighbour features leave-one-out
    known = Known(types, type_emb, labels, attrs)
    x = feature_matrix(df, types, attrs, known, type_emb, attr_emb, taxonomy, cfg.neighbours)
    app, im = _fit_pairs(x, y, imp, cfg, kind, seed, imp_kind)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"features": list(FEATURES), "n_features": len(FEATURES)}
    save_scorer(app, out / APPLICABILITY, {**meta, "hidden": hidden, "kind": kind,
                                           "threshold": threshold})
    if im is not None:
        save_scorer(im, out / IMPORTANCE, {**meta, "hidden": _kind(imp_kind, cfg)[0],
                                           "kind": imp_kind})
    (out / VOCABULARY).write_text(json.dumps(vocab.to_json(), indent=1))
    pl.DataFrame({"type": types, "embedding": type_emb.tolist(),
                  "applies": [[a for a, v in zip(attrs, row) if v > 0.5] for row in labels]}
                 ).write_parquet(out / KNOWN)
    single = [a for a, n in vocab.products.items() if n == 1]
    return {
        "types": len(types),
        "attributes": len(attrs),
        "pairs": int(len(y)),
        "positive_pairs": int(y.sum()),
        "types_without_attributes": int(typed.height - len(filled_types & set(typed["type"].to_list()))),
        "untyped_products": int(totals.filter(pl.col("type") == "")["products"].sum() or 0),
        "attributes_single_product": len(single),
        "folds": n_folds,
        "comparison": comparison,
        "model": kind,
        "importance_model": imp_kind,
        "threshold": threshold,
    }
