"""`autoknow fit` for module 4: train the cleaning cross-encoder on a sample of the catalogue.

The training set is a seeded, capped sample of the ingested products (`bounded_sample`); pairs
are made from it as the article says (training_data.py). The removal thresholds are calibrated
out of fold (`calibration_folds`): the products are split into folds, a model trained on the
other folds scores every claim of each fold's products, and the pooled scores of all folds set the
thresholds. The fold models are what ships (`folds/<k>/`): a rebuild judges each claim with the
fold model of its product, so the thresholds are calibrated on the scores of exactly the models
that judge. With one fold, a share of the products is held out instead and the shipped model
trains on the rest.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from autoknow_ray import progress, runtime
from autoknow_ray.calibration import threshold_for_precision
from autoknow_ray.eval.metrics import average_precision
from autoknow_ray.modules.cleaning.config import CleaningConfig
from autoknow_ray.modules.cleaning.model import (CONFIG, FOLDS, TEXT_FEATURES, WEIGHTS, CrossEncoder,
                                                 PairTokens, collate, fold_of, probabilities,
                                                 save_model, text_features)
from autoknow_ray.modules.cleaning.training_data import Pair, make_pairs
from autoknow_ray.nn.encoder import load_tokenizer, pick_device, resolve_encoder, set_cpu_threads
from autoknow_ray.pipeline import RunContext

PRODUCT_COLUMNS = ["product_id", "title", "description", "product_type", "attributes", "brand"]


def fit_cleaning(ctx: RunContext, out: Path) -> dict:
    import ray.data

    cfg: CleaningConfig = ctx.cfg.cleaning
    ds = ray.data.read_parquet(str(ctx.table_path("ingest", "products"))).select_columns(PRODUCT_COLUMNS)
    sample = runtime.bounded_sample(ds, cfg.max_train_products, ctx.cfg.seed)
    return fit_on_products(sample, cfg, out, ctx.cfg.seed, ctx.cfg.device)


def fit_on_products(sample: pl.DataFrame, cfg: CleaningConfig, out: Path, seed: int,
                    device: str = "auto") -> dict:
    """Train and calibrate on a sample of products (PRODUCT_COLUMNS); writes the artifact."""
    if sample.height == 0:
        return {"skipped": "no products to learn from"}
    if cfg.calibration_folds >= 2:
        return cross_fit(sample, cfg, out, seed, device)
    held_s = pl.Series([_held_out(p, seed, cfg.val_fraction) for p in sample["product_id"].to_list()],
                       dtype=pl.Boolean)
    train_products, val_products = sample.filter(~held_s), sample.filter(held_s)
    pairs, stats = make_pairs(train_products, cfg, seed)
    if not _both_labels(pairs):
        return {"skipped": "no valid attribute values or types to learn from", **stats}
    val_pairs, val_stats = validation_pairs(val_products, cfg, seed + 1)
    return {"pairs": stats, "validation_pairs": val_stats,
            **train_cross_encoder(pairs, cfg, out, seed, device, val_pairs=val_pairs)}


def validation_pairs(products: pl.DataFrame, cfg: CleaningConfig, seed: int) -> tuple[list[Pair], dict]:
    """Validation judges what the stage will judge: every claim of these products (not only
    values of recurring attributes, which training is made of) against as many planted
    misassignments; a precision target at a few per cent of errors needs the many correct
    claims to bound the false-removal rate."""
    if products.height == 0:
        return [], {}
    val_cfg = cfg.model_copy(update={"max_train_pairs": cfg.max_validation_pairs,
                                     "min_attribute_products": 1, "min_value_products": 1})
    return make_pairs(products, val_cfg, seed)


def _both_labels(pairs: list[Pair]) -> bool:
    return any(p.label == 0 for p in pairs) and any(p.label == 1 for p in pairs)


def cross_fit(sample: pl.DataFrame, cfg: CleaningConfig, out: Path, seed: int,
              device: str = "auto") -> dict:
    """Out-of-fold calibration: per fold, a model trained on the other folds' products scores
    every claim of the fold's products (made as `validation_pairs` makes them); the thresholds
    are calibrated on the scores of all folds pooled, so every sampled product's claims count.
    The fold models are saved (`out/folds/<k>/`) and are the models a rebuild judges with (each
    product by the fold model of `fold_of` its id): no model the calibration did not score ships.
    A model trained on every product instead was measured to remove correct claims the fold
    models kept (docs/cleaning.md)."""
    t0 = time.perf_counter()
    k = cfg.calibration_folds
    fold = pl.Series([fold_of(p, seed, k) for p in sample["product_id"].to_list()], dtype=pl.Int64)
    fold_cfg = cfg.model_copy(update={"max_train_pairs": min(
        cfg.calibration_fold_pairs or cfg.max_train_pairs, cfg.max_train_pairs)})
    pairs, stats = make_pairs(sample, cfg, seed)
    if not _both_labels(pairs):
        return {"skipped": "no valid attribute values or types to learn from", **stats}
    _clear_artifact(out)
    pooled: list[Pair] = []
    pooled_scores: list[np.ndarray] = []
    per_fold = []
    trained = None
    for f in range(k):
        t_f = time.perf_counter()
        train_p, held_p = sample.filter(fold != f), sample.filter(fold == f)
        pairs, _ = make_pairs(train_p, fold_cfg, seed + 100 + f)
        val, _ = validation_pairs(held_p, cfg, seed + 1 + f)
        row = {"fold": f, "products": held_p.height, "train_products": train_p.height,
               "train_pairs": len(pairs), "claims": sum(p.label == 0 for p in val),
               "planted": sum(p.label == 1 for p in val)}
        if not _both_labels(pairs) or not val:
            # every fold model ships (a rebuild judges this fold's products with it): a fold
            # that cannot be trained or scored leaves no calibrated model for them
            return {"skipped": f"fold {f}: no pairs to train or score", "pairs": stats,
                    "calibration_folds": [*per_fold, row]}
        trained = _train(pairs, fold_cfg, seed + 100 + f, device, task=f"cleaning fold {f + 1}/{k}")
        scores = _score(trained, val, cfg.text_features)
        save_model(trained.model.cpu(), trained.tokenizer, out / FOLDS / str(f), None)
        labels = np.array([p.label for p in val])
        is_type = np.array([p.kind in TYPE_KINDS for p in val], dtype=bool)
        for kind, sel in (("values", ~is_type), ("types", is_type)):
            if len(set(labels[sel].tolist())) == 2:
                row[f"{kind}_auc_pr"] = round(average_precision(labels[sel].tolist(),
                                                                scores[sel].tolist()), 4)
        row["loss_by_epoch"] = trained.history
        row["seconds"] = round(time.perf_counter() - t_f, 1)
        per_fold.append(row)
        pooled += val
        pooled_scores.append(scores)
        if f < k - 1:
            del trained
            gc.collect()
    scores = np.concatenate(pooled_scores)
    calibration = _calibrate(scores, pooled, cfg)
    calibration["calibrated_on"] = {
        "folds": k, "products": sum(r["products"] for r in per_fold),
        **{kind: {"claims": int(sum(p.label == 0 and (p.kind in TYPE_KINDS) == is_t for p in pooled)),
                  "planted": int(sum(p.label == 1 and (p.kind in TYPE_KINDS) == is_t for p in pooled))}
           for kind, is_t in (("values", False), ("types", True))}}
    calibration["calibration_folds"] = per_fold
    # the shipped models are the fold models; `fold_seed` assigns a product to its fold
    calibration.update(fold_models=k, fold_seed=seed)
    meta = _meta(cfg, trained, sum(r["train_pairs"] for r in per_fold), len(pooled), calibration)
    meta["loss_by_epoch"] = [r["loss_by_epoch"] for r in per_fold]
    (out / CONFIG).write_text(json.dumps(meta, indent=2))
    return {"pairs": stats, **meta, "train_seconds": round(time.perf_counter() - t0, 1)}


def _clear_artifact(out: Path) -> None:
    """Remove what an earlier fit wrote into this module's folder (its single model or fold
    models), so a rebuild cannot load a model this fit did not calibrate."""
    for name in ("encoder", FOLDS):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in (WEIGHTS, CONFIG):
        (out / name).unlink(missing_ok=True)


def _held_out(pid: str, seed: int, fraction: float) -> bool:
    h = hashlib.sha1(f"{seed}:{pid}".encode()).digest()
    return int.from_bytes(h[:4], "big") / 2**32 < fraction


def _tokenise(pairs: list[Pair], tokens: PairTokens) -> list[tuple]:
    texts = sorted({p.text for p in pairs})
    index = {t: i for i, t in enumerate(texts)}
    return tokens.pairs([p.claim for p in pairs], tokens.ids(texts), [index[p.text] for p in pairs])


def choose_threshold(scores: np.ndarray, labels: np.ndarray, error_rate: float,
                     floor: float, tolerance: float = 0.0) -> tuple[float, dict]:
    """The threshold with the best F1 once the held-out pairs are re-weighted so that misassigned
    claims make up `error_rate` of them (training pairs are balanced; a graph is not). Of the
    thresholds within `tolerance` of that F1, the highest: the held-out pairs rarely hold the odd
    but correct values a new catalogue has, so among near-equals the one that removes least."""
    n1, n0 = int(labels.sum()), int((1 - labels).sum())
    if n1 == 0 or n0 == 0:
        return max(floor, 0.5), {}
    w1 = error_rate / (1 - error_rate) * n0 / n1
    curve = []
    for t in np.unique(scores):
        if t < floor:
            continue
        flag = scores >= t
        tp = w1 * float((flag & (labels == 1)).sum())
        fp = float((flag & (labels == 0)).sum())
        fn = w1 * float((~flag & (labels == 1)).sum())
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        curve.append((float(t), f, p, r))
    if not curve:
        return max(floor, 0.5), {}
    top = max(c[1] for c in curve)
    best = max((c for c in curve if c[1] >= top - tolerance), key=lambda c: c[0])
    return best[0], {"val_weighted_f1": round(best[1], 4), "val_weighted_precision": round(best[2], 4),
                     "val_weighted_recall": round(best[3], 4)}


TYPE_KINDS = ("type", "type_positive")


def _threshold(setting, scores: np.ndarray, labels: np.ndarray, cfg: CleaningConfig,
               fallback: float | None = None) -> tuple[float | None, dict]:
    """A configured number, or `auto`: chosen on these held-out pairs. With a `precision_target`
    the lowest threshold whose precision lower bound, at `expected_error_rate` misassigned
    claims, reaches it, or None (the module abstains on this kind of claim) where none does;
    without one, the weighted-F1 rule (the fallback, else the floor, when the pairs hold one
    class only)."""
    if setting != "auto":
        return float(setting), {}
    if cfg.precision_target is not None:
        c = threshold_for_precision(scores, labels, cfg.precision_target,
                                    base_rate=cfg.expected_error_rate, floor=cfg.min_threshold)
        stats = {"calibration": c.as_dict()}
        if not c.abstains:
            flagged_ok = float((scores[labels == 0] >= c.threshold).mean()) if (labels == 0).any() else 0.0
            e = cfg.expected_error_rate
            # the share of a catalogue's claims this threshold flags when its errors are at the
            # expected rate: the figure a rebuild compares its own flagged share with
            stats.update(val_false_removal_rate=round(flagged_ok, 5),
                         expected_flagged_share=round(e * (c.recall or 0.0) + (1 - e) * flagged_ok, 5))
        return c.threshold, stats
    if fallback is not None and (labels.sum() == 0 or labels.sum() == len(labels)):
        return fallback, {}
    return choose_threshold(scores, labels, cfg.expected_error_rate, cfg.min_threshold,
                            cfg.threshold_tolerance)


def freeze_lower_layers(model: CrossEncoder, train_layers: int) -> list:
    """Freeze the embeddings and all but the top `train_layers` layers; the encoder parameters
    left to train (every one when `train_layers` is 0)."""
    if train_layers <= 0:
        return list(model.encoder.parameters())
    layers = model.encoder.encoder.layer
    keep = {id(p) for layer in layers[-train_layers:] for p in layer.parameters()}
    for p in model.encoder.parameters():
        p.requires_grad_(id(p) in keep)
    return [p for p in model.encoder.parameters() if p.requires_grad]


def _length_batches(rows: list[tuple], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar-length rows (little padding), in shuffled order."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    chunk = batch_size * 20  # sort within chunks so batches stay varied across epochs
    batches = []
    for i in range(0, len(order), chunk):
        part = sorted(order[i : i + chunk], key=lambda j: len(rows[j][0]))
        batches += [part[k : k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class _Trained:
    model: CrossEncoder
    tokenizer: object
    tokens: PairTokens
    device: object
    train_pairs: int
    history: list


def _train(pairs: list[Pair], cfg: CleaningConfig, seed: int, device: str = "auto",
           task: str = "cleaning") -> _Trained:
    """A cross-encoder trained on `pairs` with the config's recipe."""
    torch.manual_seed(seed)
    set_cpu_threads(cfg.cpu_threads)
    dev = pick_device(device)
    enc_path = resolve_encoder(cfg.encoder)
    tokenizer = load_tokenizer(enc_path)
    tokens = PairTokens(tokenizer, cfg.max_length)
    train_rows = _tokenise(pairs, tokens)
    use_f = cfg.text_features
    f_train = [text_features(p.value, p.title, p.feature_text) for p in pairs] if use_f else None
    y_train = torch.tensor([p.label for p in pairs], dtype=torch.float32)
    model = CrossEncoder(enc_path, len(TEXT_FEATURES) if use_f else 0).to(dev)
    trainable = freeze_lower_layers(model, cfg.train_layers)
    opt = torch.optim.AdamW([
        {"params": trainable, "lr": cfg.lr},
        {"params": [*model.head.parameters(),
                    *(model.features.parameters() if use_f else ())], "lr": cfg.head_lr},
    ], weight_decay=0.01)
    steps = cfg.epochs * math.ceil(len(train_rows) / cfg.batch_size)
    warm = max(1, int(cfg.warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / max(1, steps - warm)))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rng = random.Random(seed)
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        total = 0.0
        for idx in _length_batches(train_rows, cfg.batch_size, rng):
            batch = collate([train_rows[j] for j in idx], tokenizer.pad_token_id, dev,
                            [f_train[j] for j in idx] if use_f else None)
            loss = loss_fn(model(**batch), y_train[idx].to(dev))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        history.append(round(total / len(train_rows), 4))
        progress.epoch_line(task, epoch + 1, cfg.epochs, {"loss": history[-1]})
    model.eval()
    return _Trained(model, tokenizer, tokens, dev, len(pairs), history)


def _score(trained: _Trained, pairs: list[Pair], use_features: bool) -> np.ndarray:
    """P(misassigned) of each pair under the trained model."""
    rows = _tokenise(pairs, trained.tokens) if pairs else []
    feats = [text_features(p.value, p.title, p.feature_text) for p in pairs] if use_features else None
    scores = np.zeros(len(rows), dtype=np.float32)
    pad = trained.tokenizer.pad_token_id
    with torch.inference_mode():
        for i in range(0, len(rows), 64):
            batch = collate(rows[i : i + 64], pad, trained.device,
                            feats[i : i + 64] if use_features else None)
            scores[i : i + 64] = probabilities(trained.model(**batch))
    return scores


def _calibrate(scores: np.ndarray, val: list[Pair], cfg: CleaningConfig) -> dict:
    """The value and type thresholds chosen on the validation pairs' scores, with the figures."""
    labels = np.array([p.label for p in val], dtype=int)
    # values and types get a threshold each: the two claims differ in how hard and how common
    # their errors are, and a type wrongly removed takes the product out of its type
    is_type = np.array([p.kind in TYPE_KINDS for p in val], dtype=bool)
    threshold, val_stats = _threshold(cfg.threshold, scores[~is_type], labels[~is_type], cfg)
    type_threshold, type_stats = _threshold(cfg.type_threshold, scores[is_type], labels[is_type],
                                            cfg, fallback=threshold)
    val_stats.update({f"type_{k}": v for k, v in type_stats.items()})
    abstain = {kind: st["calibration"]["abstain_reason"]
               for kind, st in (("values", val_stats), ("types", type_stats))
               if st.get("calibration", {}).get("abstain_reason")}
    if abstain:
        val_stats["abstains"] = abstain
    auc = round(average_precision(labels.tolist(), scores.tolist()), 4) if len(val) else None
    per_kind = {}
    for kind in sorted({p.kind for p in val}):
        sel = np.array([p.kind == kind for p in val])
        t = type_threshold if kind in TYPE_KINDS else threshold
        t = math.inf if t is None else t
        per_kind[kind] = round(float(((scores[sel] >= t) == (labels[sel] == 1)).mean()), 4)
    return {"threshold": threshold, "type_threshold": type_threshold, "val_auc_pr": auc,
            "val_accuracy_by_kind": per_kind, **val_stats}


def _meta(cfg: CleaningConfig, trained: _Trained, train_pairs: int, val_pairs: int,
          calibration: dict) -> dict:
    return {"max_length": cfg.max_length, "max_value_chars": cfg.max_value_chars,
            "max_text_chars": cfg.max_text_chars, "feature_text_chars": cfg.feature_text_chars,
            "threshold": calibration.pop("threshold"),
            "type_threshold": calibration.pop("type_threshold"), "encoder": cfg.encoder,
            "text_features": list(TEXT_FEATURES) if cfg.text_features else [],
            "train_pairs": train_pairs, "val_pairs": val_pairs, **calibration,
            "loss_by_epoch": trained.history}


def train_cross_encoder(pairs: list[Pair], cfg: CleaningConfig, out: Path, seed: int,
                        device: str = "auto", val_pairs: list[Pair] | None = None) -> dict:
    """Trains on `pairs`; the threshold is chosen on `val_pairs` where they hold both classes,
    else on the pairs of products held out from `pairs` by id."""
    t0 = time.perf_counter()
    if val_pairs and {p.label for p in val_pairs} == {0, 1}:
        val, train = list(val_pairs), list(pairs)
    else:
        val = [p for p in pairs if _held_out(p.product_id, seed, cfg.val_fraction)]
        train = [p for p in pairs if not _held_out(p.product_id, seed, cfg.val_fraction)]
    if not val or not train:
        val, train = pairs[: max(1, len(pairs) // 7)], pairs[max(1, len(pairs) // 7):]
    trained = _train(train, cfg, seed, device)
    calibration = _calibrate(_score(trained, val, cfg.text_features), val, cfg)
    meta = _meta(cfg, trained, len(train), len(val), calibration)
    _clear_artifact(out)
    save_model(trained.model.cpu(), trained.tokenizer, out, meta)
    return {**meta, "train_seconds": round(time.perf_counter() - t0, 1)}
