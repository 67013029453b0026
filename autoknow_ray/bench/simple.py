"""The simple way a user would run the same two models: one process, a loop, no tricks.

- Tagging, when the artifact is a plain encoder + linear head: the same weights loaded as an
  `AutoModelForTokenClassification` (`encoder.*` become the base model, `head` the classifier;
  checked logit for logit against ours), run by
  `transformers.pipeline("token-classification", aggregation_strategy="first")`, which turns word
  pieces into word-level spans with character offsets — the same work as ours.
- Tagging, when the artifact has parts a token-classification model does not (e.g. the word-shape
  embedding concatenated before the head): the equivalent plain loop — our tokenizer, model and
  span decoding called batch by batch in catalogue order, no length bucketing, fp32.
- Embedding: tokenizer + `AutoModel` forward per batch in input order (padding to the longest
  in the batch), fp32, mean pooling, L2 norm — what the sentence-embedding model card shows.

All run at torch's thread setting of the caller (its default unless told), with the titles in
catalogue order.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from autoknow_ray.nn.encoder import load_encoder, load_tokenizer, mean_pool, resolve_encoder

PIPELINE = "transformers.pipeline('token-classification', aggregation_strategy='first')"
PLAIN_LOOP = "plain loop: tokenizer + model forward per batch in order, fp32, same decoding"


def token_classifier_from_artifact(artifact_dir: str | Path):
    """(model, tokenizer): the span-tagger artifact as a transformers token-classification model.

    Raises ValueError when the artifact holds weights such a model has no place for."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForTokenClassification

    art = Path(artifact_dir)
    cfg = json.loads((art / "config.json").read_text())
    state = load_file(str(art / "model.safetensors"))
    extra = [k for k in state if not k.startswith(("encoder.", "head."))]
    if extra:
        raise ValueError(f"{art}: weights outside encoder + linear head: {extra[:4]}")
    enc_cfg = dict(cfg["encoder_config"])
    tags = list(cfg["tags"])
    enc_cfg.update(id2label=dict(enumerate(tags)), label2id={t: i for i, t in enumerate(tags)})
    for key in ("architectures", "num_labels"):
        enc_cfg.pop(key, None)
    config = AutoConfig.for_model(enc_cfg.pop("model_type"), num_labels=len(tags), **enc_cfg)
    model = AutoModelForTokenClassification.from_config(config)
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, torch.nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear `classifier`: cannot map the head")
    if tuple(state["head.weight"].shape) != tuple(classifier.weight.shape):
        raise ValueError(f"{art}: head {tuple(state['head.weight'].shape)} does not fit the "
                         f"classifier {tuple(classifier.weight.shape)}")
    base = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    missing, unexpected = model.base_model.load_state_dict(base, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k and "pooler" not in k]:
        raise ValueError(f"encoder weights do not fit: missing={missing} unexpected={unexpected}")
    classifier.load_state_dict({"weight": state["head.weight"], "bias": state["head.bias"]})
    tokenizer = load_tokenizer(str(art))
    return model.eval(), tokenizer


def max_logit_difference(model, ours, texts: Sequence[str]) -> float:
    """Largest |logit difference| between the HF model and our SpanTagger model (fp32)."""
    dev = next(model.parameters()).device
    enc = ours.tokenizer(list(texts), padding=True, truncation=True, max_length=ours.max_length,
                         return_tensors="pt").to(dev)
    with torch.inference_mode():
        a = ours.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        b = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    m = enc["attention_mask"].bool()
    return float((a[m] - b[m]).abs().max())


class SimpleTagger:
    """The simple way to tag spans: `kind` says which (the HF pipeline where it can be)."""

    def __init__(self, artifact_dir: str | Path, device: str = "cpu",
                 probe_texts: Sequence[str] = ("Acme Green Tea, 20 Count",)):
        from autoknow_ray.nn.tagger import SpanTagger

        self.ours = SpanTagger.load(artifact_dir, device=device, bf16=False)
        self.logit_diff: float | None = None
        self.why_not_pipeline: str | None = None
        try:
            model, tokenizer = token_classifier_from_artifact(artifact_dir)
            model.to(device)
            self.logit_diff = max_logit_difference(model, self.ours, probe_texts)
            if self.logit_diff > 1e-3:
                raise ValueError(f"logits differ by {self.logit_diff:.3g}")
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            self.why_not_pipeline = str(e)
            self.kind = PLAIN_LOOP
            return
        from transformers import pipeline

        tokenizer.model_max_length = self.ours.max_length  # the pipeline truncates at this
        self.pipe = pipeline("token-classification", model=model, tokenizer=tokenizer,
                             aggregation_strategy="first", device=torch.device(device))
        self.kind = PIPELINE

    def __call__(self, titles: list[str], batch_size: int) -> list[list[tuple]]:
        if self.kind == PLAIN_LOOP:
            out: list[list[tuple]] = []
            for i in range(0, len(titles), batch_size):  # one batch per call: nothing sorted
                out += self.ours.predict(titles[i:i + batch_size], batch_size=batch_size)
            return out
        res = self.pipe(titles, batch_size=batch_size)
        return [[(e["entity_group"], int(e["start"]), int(e["end"]), float(e["score"]))
                 for e in spans] for spans in res]


class SimpleEmbedder:
    def __init__(self, encoder: str | None, max_length: int = 64, device: str = "cpu"):
        path = resolve_encoder(encoder)
        self.tokenizer = load_tokenizer(path)
        self.model = load_encoder(path).to(device).eval()
        self.device = torch.device(device)
        self.max_length = max_length

    @torch.inference_mode()
    def __call__(self, titles: list[str], batch_size: int) -> np.ndarray:
        out = []
        for i in range(0, len(titles), batch_size):
            enc = self.tokenizer(titles[i:i + batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state
            out.append(torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]),
                                                     dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)
