"""The two models of module 2 over the pair features: applicability (a probability) and
importance (a score in [0, 1] that ranks a type's attributes). Either small torch networks
(an MLP, or a linear model when `model: linear`), trained full-batch, or gradient-boosted trees
(`TreeScorer`, numpy); weights in safetensors either way."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@contextmanager
def one_thread():
    """These models are tiny (tens of features, full batch): one intra-op thread is faster than
    several, and far faster on a busy machine, where threads that wait on each other spin (400
    epochs: 2 s on one thread, 130 s on two, measured on a loaded 2-core host)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


CLIP = 5.0  # standardised features are clipped: a catalogue unlike the training one cannot blow up


class PairScorer(nn.Module):
    """Standardised features -> one logit. `hidden` 0 is a linear model. A feature that was
    constant in training is switched off (`active` 0): it taught the model nothing."""

    def __init__(self, n_features: int, hidden: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.register_buffer("active", torch.ones(n_features))
        self.net = (nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
                    if hidden else nn.Linear(n_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = ((x - self.mean) / self.std).clamp(-CLIP, CLIP) * self.active
        return self.net(z).squeeze(-1)


def train_scorer(x: np.ndarray, y: np.ndarray, *, hidden: int, epochs: int, lr: float,
                 weight_decay: float, seed: int, binary: bool,
                 sample_weight: np.ndarray | None = None) -> PairScorer:
    """Full-batch Adam. binary: BCE with the classes balanced; else BCE on a soft target."""
    with one_thread():
        return _train(x, y, hidden=hidden, epochs=epochs, lr=lr, weight_decay=weight_decay,
                      seed=seed, binary=binary, sample_weight=sample_weight)


def _train(x, y, *, hidden, epochs, lr, weight_decay, seed, binary, sample_weight) -> PairScorer:
    from autoknow_ray.nn.threads import torch_threads

    with torch_threads(1):  # a small scorer: a second thread only waits (nn/threads.py)
        return _train_one_thread(x, y, hidden=hidden, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                 seed=seed, binary=binary, sample_weight=sample_weight)


def _train_one_thread(x, y, *, hidden, epochs, lr, weight_decay, seed, binary, sample_weight) -> PairScorer:
    torch.manual_seed(seed)
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.float32)
    model = PairScorer(x.shape[1], hidden)
    model.mean.copy_(xt.mean(0))
    std = xt.std(0) if len(xt) > 1 else torch.zeros(x.shape[1])
    model.active.copy_((std > 1e-6).float())
    model.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
    w = torch.ones(len(yt)) if sample_weight is None else torch.tensor(sample_weight, dtype=torch.float32)
    if binary:
        pos = float(yt.sum())
        neg = float(len(yt) - pos)
        if pos and neg:
            w = w * torch.where(yt > 0.5, len(yt) / (2 * pos), len(yt) / (2 * neg))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.BCEWithLogitsLoss(reduction="none")
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss = (loss_fn(model(xt), yt) * w).sum() / w.sum()
        loss.backward()
        opt.step()
    model.eval()
    return model


class TreeScorer:
    """Gradient-boosted regression trees on the logit (Newton steps on the logistic loss),
    every tree a complete binary tree of `depth` levels stored heap-wise: node i's children are
    2i + 1 (x[feature] <= threshold) and 2i + 2; a node with feature -1 is a leaf (its value is
    the tree's output; the nodes below it are unused). The features need no standardising:
    a split reads one feature's order, so a catalogue unlike the fit's cannot blow a logit up
    beyond the sum of the leaf values."""

    def __init__(self, base: float, feature: np.ndarray, threshold: np.ndarray,
                 value: np.ndarray):
        self.base = float(np.float32(base))  # as saved: the loaded model gives the same bits
        self.feature = np.asarray(feature, dtype=np.int32)      # (trees, nodes)
        self.threshold = np.asarray(threshold, dtype=np.float32)
        self.value = np.asarray(value, dtype=np.float32)
        self.depth = int(np.log2(self.feature.shape[1] + 1)) - 1 if self.feature.size else 0

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        out = np.full(len(x), self.base, dtype=np.float64)
        if not self.feature.size or not len(x):
            return out
        n_trees = self.feature.shape[0]
        trees = np.arange(n_trees)[None, :]
        rows = np.arange(len(x))[:, None]
        node = np.zeros((len(x), n_trees), dtype=np.int64)
        for _ in range(self.depth):
            f = self.feature[trees, node]
            leaf = f < 0
            right = x[rows, np.where(leaf, 0, f)] > self.threshold[trees, node]
            node = np.where(leaf, node, 2 * node + 1 + right)
        return out + self.value[trees, node].sum(1)

    def state(self) -> dict[str, np.ndarray]:
        return {"base": np.array([self.base], dtype=np.float32), "feature": self.feature,
                "threshold": self.threshold, "value": self.value}


GBT_BINS = 64  # candidate split points per feature: its training quantiles


def _bin_edges(x: np.ndarray) -> list[np.ndarray]:
    qs = np.linspace(0, 1, GBT_BINS + 1)[1:-1]
    return [np.unique(np.quantile(col, qs)) if len(col) else np.zeros(0) for col in x.T]


def train_trees(x: np.ndarray, y: np.ndarray, *, rounds: int, depth: int, learning_rate: float,
                l2: float = 1.0, min_child_weight: float = 1.0, binary: bool,
                sample_weight: np.ndarray | None = None) -> TreeScorer:
    """Histogram gradient boosting, level-wise, deterministic (no sampling). binary: the classes
    balanced as the networks' loss balances them; else a soft target in [0, 1]. A split must
    leave each side a hessian mass of at least `min_child_weight` and gain more than zero."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float64)
    n, n_feat = x.shape
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if binary:
        pos = float((y > 0.5).sum())
        neg = float(n - pos)
        if pos and neg:
            w = w * np.where(y > 0.5, n / (2 * pos), n / (2 * neg))
    wm = float(np.average(y, weights=w)) if n and w.sum() > 0 else 0.5
    wm = min(max(wm, 1e-4), 1 - 1e-4)
    base = float(np.log(wm / (1 - wm)))
    n_nodes = 2 ** (depth + 1) - 1
    feature = np.full((rounds, n_nodes), -1, dtype=np.int32)
    threshold = np.zeros((rounds, n_nodes), dtype=np.float32)
    value = np.zeros((rounds, n_nodes), dtype=np.float32)
    if n == 0:
        return TreeScorer(base, feature[:0], threshold[:0], value[:0])
    edges = _bin_edges(x)
    n_bins = max((len(e) for e in edges), default=0) + 1
    # bin b of feature f holds x with edges[f][b - 1] < x <= edges[f][b]
    bins = np.stack([np.searchsorted(e, col, side="left") for e, col in zip(edges, x.T)], 1) \
        if n_feat else np.zeros((n, 0), dtype=np.int64)
    flat = bins + (np.arange(n_feat) * n_bins)[None, :]
    logit = np.full(n, base)
    for t in range(rounds):
        p = 1 / (1 + np.exp(-logit))
        g, h = w * (p - y), w * np.maximum(p * (1 - p), 1e-6)
        node = np.zeros(n, dtype=np.int64)        # heap index of each row's node at this level
        for level in range(depth):
            first = 2 ** level - 1
            here = np.flatnonzero(node >= first)      # rows whose node is on this level
            if not len(here) or not n_feat:
                break
            live = np.unique(node[here])
            width = n_feat * n_bins
            key = ((node[here] - first)[:, None] * width + flat[here]).ravel()
            size = (2 ** level) * width
            gh = np.bincount(key, np.repeat(g[here], n_feat), minlength=size).reshape(2 ** level, n_feat, n_bins)
            hh = np.bincount(key, np.repeat(h[here], n_feat), minlength=size).reshape(2 ** level, n_feat, n_bins)
            gl, hl = gh.cumsum(2)[:, :, :-1], hh.cumsum(2)[:, :, :-1]
            gs, hs = gh.sum(2)[:, :1, None], hh.sum(2)[:, :1, None]
            gr, hr = gs - gl, hs - hl
            gain = gl ** 2 / (hl + l2) + gr ** 2 / (hr + l2) - gs ** 2 / (hs + l2)
            gain[(hl < min_child_weight) | (hr < min_child_weight)] = -np.inf
            for f in range(n_feat):                # no split past a feature's last edge
                gain[:, f, len(edges[f]):] = -np.inf
            moved = np.zeros(n, dtype=bool)
            for i in live:
                k = i - first
                best = np.unravel_index(np.argmax(gain[k]), gain[k].shape)
                if not np.isfinite(gain[k][best]) or gain[k][best] <= 1e-12:
                    continue
                f, b = int(best[0]), int(best[1])
                feature[t, i], threshold[t, i] = f, edges[f][b]
                at = node == i
                node[at] = 2 * i + 1 + (bins[at, f] > b)
                moved |= at
            if not moved.any():
                break
        # leaves: every row's node is a leaf now (its feature is -1); Newton step per leaf
        leaves, inv = np.unique(node, return_inverse=True)
        gsum = np.bincount(inv, g, minlength=len(leaves))
        hsum = np.bincount(inv, h, minlength=len(leaves))
        step = -learning_rate * gsum / (hsum + l2)
        value[t, leaves] = step
        logit += step[inv]
    return TreeScorer(base, feature, threshold, value)


@torch.inference_mode()
def predict(model, x: np.ndarray) -> np.ndarray:
    if len(x) == 0:
        return np.zeros(0, dtype=np.float32)
    if isinstance(model, TreeScorer):
        return (1 / (1 + np.exp(-model.logits(x)))).astype(np.float32)
    with one_thread():
        return torch.sigmoid(model(torch.tensor(x, dtype=torch.float32))).numpy().astype(np.float32)


def save_scorer(model, folder: Path, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, TreeScorer):
        from safetensors.numpy import save_file as save_numpy

        save_numpy(model.state(), str(folder / WEIGHTS))
        meta = {**meta, "family": "trees"}
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(meta, indent=2))


def load_scorer(folder: Path) -> tuple[PairScorer | TreeScorer, dict]:
    from safetensors.torch import load_file

    meta = json.loads((folder / CONFIG).read_text())
    if meta.get("family") == "trees":
        from safetensors.numpy import load_file as load_numpy

        st = load_numpy(str(folder / WEIGHTS))
        return TreeScorer(float(st["base"][0]), st["feature"], st["threshold"], st["value"]), meta
    model = PairScorer(meta["n_features"], meta["hidden"])
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    model.eval()
    return model, meta


def f1_at(y: np.ndarray, score: np.ndarray, threshold: float) -> float:
    y = np.asarray(y, dtype=bool)
    pred = np.asarray(score) >= threshold
    tp = float((pred & y).sum())
    p = tp / max(1.0, float(pred.sum()))
    r = tp / max(1.0, float(y.sum()))
    return 2 * p * r / (p + r) if p + r else 0.0


def best_threshold(y: np.ndarray, score: np.ndarray, default: float = 0.5) -> tuple[float, float]:
    """(threshold, F1) of the best F1 over a fixed grid (0.05 .. 0.95); `default` when `y` has no
    positive. Ties go to the threshold nearest 0.5 (the balanced loss's own decision point)."""
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    if not np.asarray(y).astype(bool).any():
        return default, 0.0
    f1s = [(round(f1_at(y, score, t), 4), -abs(t - 0.5), t) for t in grid]
    f1, _, t = max(f1s)
    return float(t), float(f1)
