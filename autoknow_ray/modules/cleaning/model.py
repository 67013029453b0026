"""The cleaning cross-encoder: MiniLM over `[CLS] claim [SEP] product text [SEP]` → P(misassigned).

A claim is `attribute: value | type: T` for an attribute value, or `product type: T` for the
product's type; one model with one head judges both (the type is just another claim). The product
text is tokenised once per product and reused for every claim about that product; the rows of a
call are sorted by length so model batches carry little padding.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from rapidfuzz import fuzz

from autoknow_ray.nn.encoder import (autocast, inference_bf16, load_encoder, load_tokenizer,
                                     mean_pool, per_row, pick_device, resolve_encoder,
                                     same_length_batches)
from autoknow_ray.text import fold

TYPE_RELATION = "has_type"
WEIGHTS = "head.safetensors"
CONFIG = "config.json"
FOLDS = "folds"  # MODELS/cleaning/folds/<k>/: the fold models of the cross-fitted calibration
FOLD_RULES = ("own_fold", "all_agree")


def fold_of(pid: str, seed: int, folds: int) -> int:
    """The calibration fold of a product: a seeded hash of its id, so the same products fall in
    the same fold on every fit, and a rebuild judges a product fit sampled with the fold model
    that never saw it."""
    h = hashlib.sha1(f"{seed}:fold:{pid}".encode()).digest()
    return int.from_bytes(h[:4], "big") % folds


def claim_text(relation: str, value: str, product_type: str | None, max_value_chars: int) -> str:
    value = (value or "")[:max_value_chars]
    if relation == TYPE_RELATION:
        return f"product type: {value}"
    t = (product_type or "unknown")[:max_value_chars]
    return f"{relation[:max_value_chars]}: {value} | type: {t}"


def product_text(title: str | None, description: str | None, max_chars: int) -> str:
    title = title if isinstance(title, str) else ""
    desc = description if isinstance(description, str) else ""
    text = f"{title} . {desc}" if desc else title
    return text[:max_chars]


_WORD = re.compile(r"\w+")
# How the claim's value stands in the product's own text, beside what the transformer reads: an
# exact substring, a fuzzy match (a typo scores high but not 1), the share of the value's words
# the text has, its length. The model learns their weight from the catalogue's own pairs, so a
# catalogue whose values are seldom written in the text teaches it to ignore them.
TEXT_FEATURES = ("exact", "partial", "word_share", "title_exact", "length")


def text_features(value: str, title: str, text: str) -> list[float]:
    v = " ".join(fold(value or "").split())
    t = " ".join(fold(text or "").split())
    ti = " ".join(fold(title or "").split())
    if not v:
        return [0.0] * len(TEXT_FEATURES)
    words = _WORD.findall(v)
    have = set(_WORD.findall(t))
    return [float(v in t), fuzz.partial_ratio(v, t) / 100.0 if t else 0.0,
            sum(w in have for w in words) / len(words) if words else 0.0,
            float(v in ti), min(len(v), 60) / 60.0]


class CrossEncoder(torch.nn.Module):
    """Mean-pooled encoder → linear logit, plus (when `n_features`) a small MLP over the
    claim's text features whose logit is added: an additive model the pairs train end to end."""

    def __init__(self, encoder_path: str, n_features: int = 0):
        super().__init__()
        self.encoder = load_encoder(encoder_path)
        self.head = torch.nn.Linear(int(self.encoder.config.hidden_size), 1)
        self.n_features = n_features
        self.features = torch.nn.Sequential(
            torch.nn.Linear(n_features, 16), torch.nn.GELU(), torch.nn.Linear(16, 1)) \
            if n_features else None

    def forward(self, input_ids, attention_mask, token_type_ids, features=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        logit = per_row(self.head, mean_pool(hidden, attention_mask)).squeeze(-1)
        if self.features is not None:
            logit = logit + per_row(self.features, features.to(logit.dtype)).squeeze(-1)
        return logit

    def head_state(self) -> dict:
        out = {k: v for k, v in self.head.state_dict().items()}
        if self.features is not None:
            out.update({f"features.{k}": v for k, v in self.features.state_dict().items()})
        return out

    def load_head_state(self, state: dict) -> None:
        self.head.load_state_dict({k: v for k, v in state.items() if not k.startswith("features.")})
        if self.features is not None:
            self.features.load_state_dict({k[len("features."):]: v for k, v in state.items()
                                           if k.startswith("features.")})


class PairTokens:
    """Token ids of (claim, product text) pairs, each product text tokenised once."""

    def __init__(self, tokenizer, max_length: int):
        self.tok = tokenizer
        self.max_length = max_length

    def ids(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False, truncation=True,
                        max_length=self.max_length)["input_ids"]

    def pairs(self, claims: list[str], text_ids: list[list[int]], text_of: list[int]) -> list[tuple]:
        """(input_ids, token_type_ids) per claim; `text_of[i]` indexes the claim's product text.
        The claim keeps at most half the budget; the text fills the rest."""
        cls, sep = self.tok.cls_token_id, self.tok.sep_token_id
        budget = self.max_length - 3
        out = []
        for c_ids, t in zip(self.ids(claims), text_of):
            c_ids = c_ids[: budget // 2]
            t_ids = text_ids[t][: budget - len(c_ids)]
            ids = [cls, *c_ids, sep, *t_ids, sep]
            out.append((ids, [0] * (len(c_ids) + 2) + [1] * (len(t_ids) + 1)))
        return out


def collate(rows: list[tuple], pad_id: int, device, features=None) -> dict:
    """Padded tensors of (input_ids, token_type_ids) rows; `features` (one list per row) rides
    along when the model has a feature head."""
    n = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    types = torch.zeros((len(rows), n), dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        ids[i, : len(a)] = torch.tensor(a)
        types[i, : len(b)] = torch.tensor(b)
        mask[i, : len(a)] = 1
    out = {"input_ids": ids.to(device), "token_type_ids": types.to(device),
           "attention_mask": mask.to(device)}
    if features is not None:
        out["features"] = torch.tensor(features, dtype=torch.float32).to(device)
    return out


class MisassignmentScorer:
    """A fitted cleaning model loaded from its artifact folder, for inference.

    A cross-fitted fit (`calibration_folds` >= 2) ships its fold models (`folds/<k>/`), the
    models whose out-of-fold scores the thresholds were calibrated on; `rule` says how they
    judge a claim:
    - `own_fold`: the fold model of the claim's product (`fold_of` its id with fit's seed) alone.
      Each claim gets the score of one fold model that never saw the product, which is exactly
      the score distribution the thresholds were calibrated on (and, for a product fit sampled,
      its own out-of-fold score);
    - `all_agree`: the lowest score of the fold models: a claim is removed only when every fold
      model flags it, so its removals are a subset of `own_fold`'s.
    An older artifact (one model in `encoder/` and `head.safetensors`) scores with that model."""

    def __init__(self, model_dir: str | Path, device: str = "auto", bf16=None, batch_size: int = 64,
                 rule: str = "own_fold"):
        model_dir = Path(model_dir)
        self.meta = json.loads((model_dir / CONFIG).read_text())
        self.device = pick_device(device)
        self.bf16 = inference_bf16(bf16, self.device)
        self.batch_size = batch_size
        if rule not in FOLD_RULES:
            raise ValueError(f"cleaning: unknown fold rule {rule!r}; known: {FOLD_RULES}")
        self.rule = rule
        k = int(self.meta.get("fold_models") or 0)
        dirs = [model_dir / FOLDS / str(f) for f in range(k)] if k else [model_dir]
        self.fold_seed = int(self.meta.get("fold_seed", 0))
        self.tokenizer = load_tokenizer(str(dirs[0] / "encoder"))
        self.models = [load_model(d, self.meta).to(self.device).eval() for d in dirs]
        self.tokens = PairTokens(self.tokenizer, int(self.meta["max_length"]))

    @property
    def n_models(self) -> int:
        return len(self.models)

    def fold(self, product_id: str) -> int:
        """The fold model that judges this product under `own_fold` (0 for a single model)."""
        return fold_of(str(product_id), self.fold_seed, self.n_models) if self.n_models > 1 else 0

    @property
    def threshold(self) -> float:
        """The removal threshold for values; infinite (nothing removed) where fit found none
        that reaches the precision target."""
        return _or_inf(self.meta["threshold"])

    @property
    def type_threshold(self) -> float:
        """The threshold for type claims (models fitted before it had one use `threshold`)."""
        return _or_inf(self.meta.get("type_threshold", self.meta["threshold"]))

    @property
    def uses_features(self) -> bool:
        return bool(self.meta.get("text_features"))

    @torch.inference_mode()
    def score(self, claims: list[str], texts: list[str], text_of: list[int],
              features: list[list[float]] | None = None,
              text_fold: list[int] | None = None) -> np.ndarray:
        """P(misassigned) per claim; `texts` are the distinct product texts of the call;
        `features` (per claim, `text_features`) when the model was fitted with them;
        `text_fold` (per text, `fold`) picks the fold model under `own_fold`."""
        out = np.zeros(len(claims), dtype=np.float32)
        if not claims:
            return out
        if self.uses_features and features is None:
            raise ValueError("this cleaning model needs the claims' text features")
        rows = self.tokens.pairs(claims, self.tokens.ids(texts), text_of)
        if self.n_models == 1:
            return self._run(self.models[0], rows, features, np.arange(len(rows)), out)
        if self.rule == "own_fold":
            if text_fold is None:
                raise ValueError("cleaning: own_fold scoring needs each product's fold")
            of = np.array([text_fold[t] for t in text_of])
            for f, model in enumerate(self.models):
                self._run(model, rows, features, np.flatnonzero(of == f), out)
            return out
        out[:] = np.inf
        for model in self.models:
            out = np.minimum(out, self._run(model, rows, features, np.arange(len(rows)),
                                            np.zeros(len(rows), dtype=np.float32)))
        return out

    def _run(self, model, rows, features, which: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Score rows `which` with `model` into `out`, in batches of pairs of one token length:
        nothing is padded, so a claim's score is bit-identical whatever else its batch holds
        (padded batches of another make-up moved scores by an ulp: the same catalogue in another
        row order gave other confidences, and an incremental rebuild could not reuse them)."""
        if len(which) == 0:
            return out
        for idx in same_length_batches([len(rows[i][0]) for i in which], self.batch_size):
            idx = which[np.asarray(idx)]
            feats = [features[i] for i in idx] if self.uses_features else None
            enc = collate([rows[i] for i in idx], self.tokenizer.pad_token_id, self.device, feats)
            with autocast(self.device, self.bf16):
                logits = model(**enc)
            out[idx] = probabilities(logits)
        return out


def _sigmoid(v: float) -> float:
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


def probabilities(logits: torch.Tensor) -> np.ndarray:
    """P(misassigned) of each logit, one element at a time (float64, then float32): a vectorised
    sigmoid over the batch computes its last elements in another code path (the tail after the
    SIMD body), so a claim's probability moved by a float32 ulp with its position in the batch
    (a cached score could then differ from a full rebuild's)."""
    values = logits.float().cpu().numpy().astype(np.float64).ravel()
    return np.array([_sigmoid(v) for v in values], dtype=np.float32)


def save_model(model: CrossEncoder, tokenizer, out: Path, meta: dict | None) -> None:
    """The encoder (safetensors + tokenizer), the heads, and `meta` as config.json (None: a fold
    model, whose folder holds weights only)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(out / "encoder", safe_serialization=True)
    tokenizer.save_pretrained(out / "encoder")
    save_file({k: v.contiguous() for k, v in model.head_state().items()}, str(out / WEIGHTS))
    if meta is not None:
        (out / CONFIG).write_text(json.dumps(meta, indent=2))


def load_model(model_dir: Path, meta: dict | None = None) -> CrossEncoder:
    """The cross-encoder saved in `model_dir` (`encoder/`, `head.safetensors`); `meta` is the
    artifact's config (read from `model_dir` when not given: a fold model's folder has none)."""
    from safetensors.torch import load_file

    meta = meta if meta is not None else json.loads((model_dir / CONFIG).read_text())
    model = CrossEncoder(resolve_encoder(str(model_dir / "encoder")),
                         len(meta.get("text_features") or ()))
    model.load_head_state(load_file(str(model_dir / WEIGHTS)))
    return model


def _or_inf(t) -> float:
    return math.inf if t is None else float(t)
