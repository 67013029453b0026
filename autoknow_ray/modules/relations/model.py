"""The two models of module 2 over the pair features: applicability (a probability) and
importance (a score in [0, 1] that ranks a type's attributes). Both are small torch networks
(an MLP, or a linear model when `model: linear`), trained full-batch; weights in safetensors."""
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


@torch.inference_mode()
def predict(model: PairScorer, x: np.ndarray) -> np.ndarray:
    if len(x) == 0:
        return np.zeros(0, dtype=np.float32)
    with one_thread():
        return torch.sigmoid(model(torch.tensor(x, dtype=torch.float32))).numpy().astype(np.float32)


def save_scorer(model: PairScorer, folder: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(meta, indent=2))


def load_scorer(folder: Path) -> tuple[PairScorer, dict]:
    from safetensors.torch import load_file

    meta = json.loads((folder / CONFIG).read_text())
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
