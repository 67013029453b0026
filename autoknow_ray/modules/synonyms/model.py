"""The pair classifier: a small MLP over the hand-made pair features, saved as safetensors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from autoknow_ray.modules.synonyms.features import FEATURES

WEIGHTS = "classifier.safetensors"
CONFIG = "config.json"


def _mlp(n_features: int, hidden: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(n_features, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, 1))


class PairClassifier(torch.nn.Module):
    """`members` MLPs over the standardised features, trained alike with consecutive seeds: the
    score is the mean of their probabilities (one member: its probability; a classifier saved
    before members existed is one member)."""

    def __init__(self, n_features: int, hidden: int, members: int = 1):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.net = _mlp(n_features, hidden)
        # the second member on (the first keeps the name a one-member classifier was saved under)
        self.extra = torch.nn.ModuleList([_mlp(n_features, hidden) for _ in range(members - 1)])

    @property
    def members(self) -> int:
        return 1 + len(self.extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The first member's logit (what training fits, one member at a time)."""
        return self.net((x - self.mean) / self.std).squeeze(-1)

    @classmethod
    def averaged(cls, models: list["PairClassifier"]) -> "PairClassifier":
        """One classifier of the given one-member classifiers (trained on the same features, so
        they share their standardisation)."""
        first = models[0]
        out = cls(first.mean.shape[0], first.net[0].out_features, len(models))
        out.mean.copy_(first.mean)
        out.std.copy_(first.std)
        out.net.load_state_dict(first.net.state_dict())
        for mine, other in zip(out.extra, models[1:]):
            mine.load_state_dict(other.net.state_dict())
        return out.eval()

    @torch.inference_mode()
    def score(self, x: np.ndarray) -> np.ndarray:
        """P(synonyms) of each row, one row at a time and the sigmoid one logit at a time
        (float64, then float32): a matrix product over several rows takes another CPU kernel
        than over one, and a vectorised sigmoid computes a batch's tail in another code path, so
        a pair's score would move in the last bits with the pairs scored beside it (a reused
        score of `rebuild --previous` must be the one a full rebuild computes). Members'
        probabilities are averaged in member order, in float64."""
        if len(x) == 0:
            return np.zeros(0, dtype=np.float32)
        t = torch.from_numpy(np.asarray(x, np.float32))
        nets = [self.net, *self.extra]
        out = np.zeros(t.shape[0], np.float64)
        for net in nets:
            logits = torch.cat([net((t[i:i + 1] - self.mean) / self.std).reshape(1)
                                for i in range(t.shape[0])])
            out += np.array([_sigmoid(v) for v in logits.double().numpy()], np.float64)
        return (out / len(nets)).astype(np.float32) if len(nets) > 1 else out.astype(np.float32)


def score_pairs(model: PairClassifier, cosine_scorer: bool, term_a: list[str], term_b: list[str],
                cosine, votes=None) -> np.ndarray:
    """The shipped scorer's score of each pair: the embedding cosine where fit shipped the
    cosine, else the classifier over the pair features (and `votes`, the pairs'
    `canonical_vote`, where the classifier was trained with it: `uses_votes`). One function for
    the stage's actors, its driver-side guard and cluster checks, and fit's reference."""
    cos = np.asarray(cosine, np.float32)
    if cosine_scorer:
        return cos
    from autoknow_ray.modules.synonyms.features import feature_matrix

    x = feature_matrix(term_a, term_b, cos)
    if uses_votes(model):
        if votes is None:
            raise ValueError("this classifier was trained with the canonical vote: pass the pairs' votes")
        x = np.hstack([x, np.asarray(votes, np.float32).reshape(-1, 1)])
    return model.score(x)


def uses_votes(model: PairClassifier) -> bool:
    """Whether the classifier takes the `canonical_vote` column after the hand-made features."""
    return int(model.mean.shape[0]) == len(FEATURES) + 1


def _sigmoid(v: float) -> float:
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


def save(model: PairClassifier, out: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps({**meta, "features": list(FEATURES)}, indent=2))


def load(model_dir: Path) -> tuple[PairClassifier, dict]:
    from safetensors.torch import load_file

    meta = json.loads((model_dir / CONFIG).read_text())
    if meta.get("features") != list(FEATURES):
        raise ValueError(f"{model_dir}: the classifier was trained on features {meta.get('features')}"
                         f", this version computes {list(FEATURES)}: run `autoknow fit` again")
    extra = list(meta.get("extra_features") or [])
    if extra not in ([], ["canonical_vote"]):
        raise ValueError(f"{model_dir}: unknown extra features {extra}: run `autoknow fit` again")
    model = PairClassifier(len(FEATURES) + len(extra), int(meta["hidden"]), int(meta.get("members") or 1))
    model.load_state_dict(load_file(str(model_dir / WEIGHTS)))
    model.eval()
    return model, meta


def exists(model_dir: Path | None) -> bool:
    return model_dir is not None and (model_dir / WEIGHTS).exists() and (model_dir / CONFIG).exists()
