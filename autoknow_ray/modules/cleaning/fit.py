"""`autoknow fit` for module 4: train the cleaning cross-encoder on a sample of the catalogue.

The training set is a seeded, capped sample of the ingested products (`bounded_sample`); pairs
are made from it as the article says (training_data.py). A tenth or so of the products is held
out to choose the removal threshold, re-weighted to the error rate the graph is expected to have.
"""
from __future__ import annotations

import hashlib
import math
import random
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from autoknow_ray import progress, runtime
from autoknow_ray.calibration import threshold_for_precision
from autoknow_ray.eval.metrics import average_precision
from autoknow_ray.modules.cleaning.config import CleaningConfig
from autoknow_ray.modules.cleaning.model import (TEXT_FEATURES, CrossEncoder, PairTokens, collate,
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
    if sample.height == 0:
        return {"skipped": "no products to learn from"}
    seed = ctx.cfg.seed
    held_s = pl.Series([_held_out(p, seed, cfg.val_fraction) for p in sample["product_id"].to_list()],
                       dtype=pl.Boolean)
    train_products, val_products = sample.filter(~held_s), sample.filter(held_s)
    pairs, stats = make_pairs(train_products, cfg, seed)
    if not any(p.label == 0 for p in pairs) or not any(p.label == 1 for p in pairs):
        return {"skipped": "no valid attribute values or types to learn from", **stats}
    # validation judges what the stage will judge: every claim of the held-out products (not
    # only values of recurring attributes, which training is made of) against as many planted
    # misassignments; a precision target at a few per cent of errors needs the many correct
    # claims to bound the false-removal rate
    val_cfg = cfg.model_copy(update={"max_train_pairs": cfg.max_validation_pairs,
                                     "min_attribute_products": 1, "min_value_products": 1})
    val_pairs, val_stats = make_pairs(val_products, val_cfg, seed + 1) if val_products.height else ([], {})
    return {"pairs": stats, "validation_pairs": val_stats,
            **train_cross_encoder(pairs, cfg, out, seed, ctx.cfg.device, val_pairs=val_pairs)}


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


def train_cross_encoder(pairs: list[Pair], cfg: CleaningConfig, out: Path, seed: int,
                        device: str = "auto", val_pairs: list[Pair] | None = None) -> dict:
    """Trains on `pairs`; the threshold is chosen on `val_pairs` where they hold both classes,
    else on the pairs of products held out from `pairs` by id."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    set_cpu_threads(cfg.cpu_threads)
    dev = pick_device(device)
    enc_path = resolve_encoder(cfg.encoder)
    tokenizer = load_tokenizer(enc_path)
    tokens = PairTokens(tokenizer, cfg.max_length)
    if val_pairs and {p.label for p in val_pairs} == {0, 1}:
        val, train = list(val_pairs), list(pairs)
    else:
        val = [p for p in pairs if _held_out(p.product_id, seed, cfg.val_fraction)]
        train = [p for p in pairs if not _held_out(p.product_id, seed, cfg.val_fraction)]
    if not val or not train:
        val, train = pairs[: max(1, len(pairs) // 7)], pairs[max(1, len(pairs) // 7):]
    train_rows, val_rows = _tokenise(train, tokens), _tokenise(val, tokens)
    use_f = cfg.text_features
    f_train = [text_features(p.value, p.title, p.feature_text) for p in train] if use_f else None
    f_val = [text_features(p.value, p.title, p.feature_text) for p in val] if use_f else None
    y_train = torch.tensor([p.label for p in train], dtype=torch.float32)
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
        progress.epoch_line("cleaning", epoch + 1, cfg.epochs, {"loss": history[-1]})
    model.eval()
    scores = np.zeros(len(val_rows), dtype=np.float32)
    with torch.inference_mode():
        for i in range(0, len(val_rows), 64):
            batch = collate(val_rows[i : i + 64], tokenizer.pad_token_id, dev,
                            f_val[i : i + 64] if use_f else None)
            scores[i : i + 64] = torch.sigmoid(model(**batch)).cpu().numpy()
    labels = np.array([p.label for p in val])
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
    auc = round(average_precision(labels.tolist(), scores.tolist()), 4)
    per_kind = {}
    for kind in sorted({p.kind for p in val}):
        sel = np.array([p.kind == kind for p in val])
        t = type_threshold if kind in TYPE_KINDS else threshold
        t = math.inf if t is None else t
        per_kind[kind] = round(float(((scores[sel] >= t) == (labels[sel] == 1)).mean()), 4)
    meta = {"max_length": cfg.max_length, "max_value_chars": cfg.max_value_chars,
            "max_text_chars": cfg.max_text_chars, "feature_text_chars": cfg.feature_text_chars,
            "threshold": threshold, "type_threshold": type_threshold, "encoder": cfg.encoder,
            "text_features": list(TEXT_FEATURES) if use_f else [],
            "train_pairs": len(train), "val_pairs": len(val), "val_auc_pr": round(auc, 4),
            "val_accuracy_by_kind": per_kind, "loss_by_epoch": history, **val_stats}
    save_model(model.cpu(), tokenizer, out, meta)
    return {**meta, "train_seconds": round(time.perf_counter() - t0, 1)}
