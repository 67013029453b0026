"""The cleaning cross-encoder: MiniLM over `[CLS] claim [SEP] product text [SEP]` → P(misassigned).

A claim is `attribute: value | type: T` for an attribute value, or `product type: T` for the
product's type; one model with one head judges both (the type is just another claim). The product
text is tokenised once per product and reused for every claim about that product; the rows of a
call are sorted by length so model batches carry little padding.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from autoknow_ray.nn.encoder import (autocast, inference_bf16, length_buckets, load_encoder,
                                     load_tokenizer, mean_pool, pick_device, resolve_encoder)

TYPE_RELATION = "has_type"
WEIGHTS = "head.safetensors"
CONFIG = "config.json"


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


class CrossEncoder(torch.nn.Module):
    def __init__(self, encoder_path: str):
        super().__init__()
        self.encoder = load_encoder(encoder_path)
        self.head = torch.nn.Linear(int(self.encoder.config.hidden_size), 1)

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask)).squeeze(-1)


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


def collate(rows: list[tuple], pad_id: int, device) -> dict:
    n = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    types = torch.zeros((len(rows), n), dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        ids[i, : len(a)] = torch.tensor(a)
        types[i, : len(b)] = torch.tensor(b)
        mask[i, : len(a)] = 1
    return {"input_ids": ids.to(device), "token_type_ids": types.to(device),
            "attention_mask": mask.to(device)}


class MisassignmentScorer:
    """A fitted cross-encoder loaded from its artifact folder, for inference."""

    def __init__(self, model_dir: str | Path, device: str = "auto", bf16=None, batch_size: int = 64):
        model_dir = Path(model_dir)
        self.meta = json.loads((model_dir / CONFIG).read_text())
        self.device = pick_device(device)
        self.bf16 = inference_bf16(bf16, self.device)
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(str(model_dir / "encoder"))
        self.model = load_model(model_dir).to(self.device).eval()
        self.tokens = PairTokens(self.tokenizer, int(self.meta["max_length"]))

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @torch.inference_mode()
    def score(self, claims: list[str], texts: list[str], text_of: list[int]) -> np.ndarray:
        """P(misassigned) per claim; `texts` are the distinct product texts of the call."""
        out = np.zeros(len(claims), dtype=np.float32)
        if not claims:
            return out
        rows = self.tokens.pairs(claims, self.tokens.ids(texts), text_of)
        for idx in length_buckets([len(r[0]) for r in rows], self.batch_size):
            enc = collate([rows[i] for i in idx], self.tokenizer.pad_token_id, self.device)
            with autocast(self.device, self.bf16):
                logits = self.model(**enc)
            out[idx] = torch.sigmoid(logits.float()).cpu().numpy()
        return out


def save_model(model: CrossEncoder, tokenizer, out: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(out / "encoder", safe_serialization=True)
    tokenizer.save_pretrained(out / "encoder")
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(meta, indent=2))


def load_model(model_dir: Path) -> CrossEncoder:
    from safetensors.torch import load_file

    model = CrossEncoder(resolve_encoder(str(model_dir / "encoder")))
    model.head.load_state_dict(load_file(str(model_dir / WEIGHTS)))
    return model
