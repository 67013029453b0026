"""The FLOP floor of a transformer encoder over a set of texts, and what padding adds to it.

FLOPs of one sequence of `s` tokens through an encoder of `L` layers and width `d`:

    s × 2 × (weights of every Linear layer)      the matmuls, 2 FLOPs per multiply-add
  + L × 4 × s² × d                               attention: QKᵀ and (softmax)·V

Embedding tables are lookups (no FLOPs) and are left out, so this is below "2 × parameters"
for small models whose vocabulary is a large share of the weights (MiniLM: 23 M of 33 M).
Layer norms, softmax, GELU and the BERT pooler are also left out: the floor is a floor.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from torch import nn


def linear_weights(model: nn.Module) -> int:
    """Weights of the Linear layers a token passes through (the BERT pooler is per sequence)."""
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and "pooler" not in name:
            total += mod.weight.numel()
    return total


def encoder_shape(model: nn.Module) -> tuple[int, int]:
    cfg = getattr(model, "config", None) or getattr(getattr(model, "encoder", None), "config")
    return int(cfg.num_hidden_layers), int(cfg.hidden_size)


def sequence_flops(lengths: Sequence[int] | np.ndarray, weights: int, layers: int,
                   hidden: int) -> float:
    """FLOPs of running each sequence at its length (a batch padded to s costs s per row)."""
    s = np.asarray(lengths, dtype=np.float64)
    return float((s * 2.0 * weights).sum() + (4.0 * layers * hidden * s**2).sum())


def token_lengths(tokenizer, texts: Sequence[str], max_length: int) -> np.ndarray:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)
    return np.array([len(x) for x in enc["input_ids"]], dtype=np.int64)


def padded_lengths(lengths: np.ndarray, batch: int, sort_within: int | None = None,
                   sort_key: np.ndarray | None = None) -> np.ndarray:
    """Each row's padded length when rows go in order in chunks of `sort_within`, each chunk
    sorted by `sort_key` (default: the lengths) and cut into batches of `batch`.
    `sort_within=None`: no sorting (the simple way)."""
    lengths = np.asarray(lengths)
    key = lengths if sort_key is None else np.asarray(sort_key)
    out = np.empty_like(lengths)
    chunk = sort_within or len(lengths) or 1
    for c0 in range(0, len(lengths), chunk):
        idx = np.arange(c0, min(c0 + chunk, len(lengths)))
        if sort_within:
            idx = idx[np.argsort(key[idx], kind="stable")]
        for b0 in range(0, len(idx), batch):
            rows = idx[b0:b0 + batch]
            out[rows] = lengths[rows].max()
    return out


def model_flops(model: nn.Module, lengths: np.ndarray) -> dict:
    """The FLOP floor of `model` over sequences of `lengths` tokens."""
    layers, hidden = encoder_shape(model)
    w = linear_weights(model)
    total = sequence_flops(lengths, w, layers, hidden)
    return {
        "linear_weights": w,
        "layers": layers,
        "hidden": hidden,
        "tokens": int(np.sum(lengths)),
        "mean_tokens": float(np.mean(lengths)) if len(lengths) else 0.0,
        "flops": total,
        "flops_per_token": total / max(1, int(np.sum(lengths))),
    }
