"""A span tagger conditioned on a context vector (the product type), over long texts in windows.

It extends the generic span tagger (`autoknow_ray.nn.tagger`: BIO tags over word first pieces,
BIO-constrained Viterbi, punctuation trimming, safetensors artifacts) in two ways:

- **Conditioning.** Each text comes with a context vector (here: the sentence embedding of the
  product's type name by the packaged MiniLM, so a type never seen in training still has a
  meaningful vector). The vector enters the model twice: projected to one extra input embedding
  placed right after [CLS] (every layer can attend to it: the same words can be read
  differently per type), and projected to a few features concatenated to every token's output
  before the tag head. `context_dim = 0` gives the same tagger without the type input (the
  ablation). A zero vector stands for "no type known"; training drops the type of a share of
  examples (`context_dropout`) so the model learns that case too.
- **Windows.** Texts longer than `max_length` tokens are cut into overlapping windows (`stride`
  tokens of overlap); a span touching a window edge that another window covers is left to that
  window, and the spans of all windows are merged back to character offsets in the whole text.

Nothing here knows about products: callers feed (text, context vector, [(label, start, end)]).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from autoknow_ray.nn.encoder import (
    autocast,
    inference_bf16,
    length_buckets,
    load_encoder,
    load_tokenizer,
    per_row,
    pick_device,
    resolve_encoder,
    same_length_batches,
    set_cpu_threads,
)
from autoknow_ray.nn.tagger import (
    IGNORE,
    N_SHAPES,
    Encoded,
    _param_groups,
    _words,
    allowed_transitions,
    bio_tags,
    mention_copies,
    resolve_bf16,
    span_prf,
    tags_to_word_spans,
    trim_span,
    viterbi,
    word_labels,
)

log = logging.getLogger(__name__)

FORMAT = "autoknow-conditioned-tagger/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"

Span = tuple[str, int, int]
Pred = tuple[str, int, int, float]


# ---- windows ---------------------------------------------------------------------------------
@dataclass
class Window(Encoded):
    """One window of one text: the Encoded words of that window plus where it sits."""

    text_index: int = 0
    first: bool = True  # the text's first window
    last: bool = True  # the text's last window
    char_lo: int = 0  # chars of the text this window covers (its words)
    char_hi: int = 0


def encode_windows(tokenizer, texts: Sequence[str], max_length: int, stride: int) -> list[Window]:
    """Every text as one or more overlapping windows of at most `max_length` tokens (one slot is
    kept free for the context embedding); a text with no word gives no window."""
    if not texts:
        return []
    room = max(8, max_length - 1)
    enc = tokenizer(list(texts), truncation=True, max_length=room, stride=min(stride, room // 2),
                    return_overflowing_tokens=True, return_offsets_mapping=True,
                    add_special_tokens=True)
    owner = enc["overflow_to_sample_mapping"]
    out: list[Window] = []
    for i in range(len(enc["input_ids"])):
        t = int(owner[i])
        words = _words(enc.word_ids(i), enc["offset_mapping"][i], texts[t])
        first, chars, shapes = words.first, words.chars, words.shapes
        if not first:
            continue
        w = Window(list(enc["input_ids"][i]), first, chars, shapes, text_index=t,
                   char_lo=chars[0][0], char_hi=chars[-1][1])
        if out and out[-1].text_index == t:
            out[-1].last = False
            w.first = False
        out.append(w)
    return out


def window_tags(win: Window, spans: Sequence[Span], label2idx: dict[str, int]) -> list[int]:
    """Word tags of one window; spans cut by the window's edge are left out (not taught as O:
    their words are ignored by the loss through IGNORE)."""
    inside = [sp for sp in spans if sp[1] >= win.char_lo and sp[2] <= win.char_hi]
    tags = word_labels(win.word_chars, inside, label2idx)
    for _, s, e in spans:
        if (s, e) in {(a, b) for _, a, b in inside}:
            continue
        for k, (ws, we) in enumerate(win.word_chars):
            if ws < e and we > s:
                tags[k] = IGNORE
    return tags


# ---- the model -------------------------------------------------------------------------------
class ConditionedTaggerModel(nn.Module):
    """Encoder with a context embedding after [CLS] → [token; shape; context features] → tags."""

    def __init__(self, encoder: nn.Module, n_tags: int, context_dim: int, dropout: float = 0.1,
                 shape_dim: int = 16, context_features: int = 32):
        super().__init__()
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        self.encoder = encoder
        hidden = int(encoder.config.hidden_size)
        self.context_dim = int(context_dim)
        self.context_features = int(context_features) if self.context_dim else 0
        self.shape_dim = int(shape_dim)
        self.shape_emb = nn.Embedding(N_SHAPES, self.shape_dim) if self.shape_dim else None
        if self.context_dim:
            self.context_prefix = nn.Linear(self.context_dim, hidden)
            self.context_proj = nn.Linear(self.context_dim, self.context_features)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden + self.shape_dim + self.context_features, n_tags)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                shapes: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if not self.context_dim:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            feats = [hidden]
        else:
            words = self.encoder.get_input_embeddings()(input_ids)
            prefix = per_row(self.context_prefix, context).to(words.dtype)[:, None, :]
            embeds = torch.cat([words[:, :1], prefix, words[:, 1:]], dim=1)
            mask = torch.cat([attention_mask[:, :1], torch.ones_like(attention_mask[:, :1]),
                              attention_mask[:, 1:]], dim=1)
            out = self.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            hidden = torch.cat([out[:, :1], out[:, 2:]], dim=1)  # the context slot has no tag
            ctx = per_row(self.context_proj, context).to(hidden.dtype)
            feats = [hidden, ctx[:, None, :].expand(-1, hidden.shape[1], -1)]
        if self.shape_emb is not None:
            feats.insert(1, self.shape_emb(shapes).to(hidden.dtype))
        return self.head(self.dropout(torch.cat(feats, dim=-1)))


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    n = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (n - len(r)) for r in rows], dtype=torch.long)


def _inputs(wins: list[Window], contexts: np.ndarray | None, pad_id: int, context_dim: int):
    inputs = {
        "input_ids": _pad([w.input_ids for w in wins], pad_id),
        "attention_mask": _pad([[1] * len(w.input_ids) for w in wins], 0),
        "shapes": _pad([w.shapes for w in wins], 0),
    }
    if context_dim:
        inputs["context"] = torch.as_tensor(np.asarray(contexts, dtype=np.float32))
    return inputs


# ---- settings --------------------------------------------------------------------------------
@dataclass
class ConditionedTrainSettings:
    encoder: str = "default"
    max_length: int = 128
    stride: int = 32
    context_dim: int = 384  # 0: no context input (the unconditioned tagger)
    context_features: int = 32
    context_dropout: float = 0.1  # share of training windows shown without their context
    epochs: int = 4
    lr: float = 3e-4
    head_lr: float = 3e-3
    batch_size: int = 16
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    dropout: float = 0.1
    shape_dim: int = 16
    grad_clip: float = 1.0
    val_fraction: float = 0.1
    patience: int = 2
    seed: int = 0
    bf16: bool | str = "auto"
    device: str = "auto"
    cpu_threads: int | None = 2
    eval_batch_size: int = 32
    # taggers trained (seeds seed … seed + ensemble - 1, one validation split) and decoded
    # together: their word tag log-probabilities averaged, as module 1's title tagger does
    ensemble: int = 1
    # copies of each training text with its values replaced by other values of the same label
    # (mention replacement): the tagger learns where a value is written, not only which values
    mention_replacement: int = 0


# ---- the tagger ------------------------------------------------------------------------------
class ConditionedTagger:
    """Model + tokenizer + labels + windowed decoding."""

    def __init__(self, model: ConditionedTaggerModel, tokenizer, labels: Sequence[str],
                 max_length: int, stride: int, device: torch.device, bf16: bool,
                 meta: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.tags = bio_tags(self.labels)
        self.max_length = int(max_length)
        self.stride = int(stride)
        self.device = device
        self.bf16 = bf16
        self.meta = dict(meta or {})
        self._start, self._trans = allowed_transitions(len(self.labels))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.members: list[ConditionedTaggerModel] = []  # an ensemble's other models

    @property
    def context_dim(self) -> int:
        return self.model.context_dim

    @classmethod
    def from_encoder(cls, s: ConditionedTrainSettings, labels: Sequence[str],
                     device: torch.device, bf16: bool) -> "ConditionedTagger":
        path = resolve_encoder(s.encoder)
        model = ConditionedTaggerModel(load_encoder(path), len(bio_tags(labels)), s.context_dim,
                                       s.dropout, s.shape_dim, s.context_features)
        return cls(model.to(device), load_tokenizer(path), labels, s.max_length, s.stride,
                   device, bf16, {"encoder_source": path})

    def save(self, out_dir: str | Path, extra: dict | None = None) -> Path:
        """The artifact; an ensemble's other models as complete artifacts in `members/<k>`,
        listed in `config.json` (`"ensemble"`)."""
        import shutil

        out = Path(out_dir)
        shutil.rmtree(out / "members", ignore_errors=True)  # an earlier fit's members go
        names = []
        for k, member in enumerate(self.members, 1):
            names.append(f"members/{k}")
            ConditionedTagger(member, self.tokenizer, self.labels, self.max_length, self.stride,
                              self.device, self.bf16, self.meta)._save_one(out / names[-1], extra)
        return self._save_one(out, {**(extra or {}), **({"ensemble": names} if names else {})})

    def _save_one(self, out_dir: Path, extra: dict | None) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        m = self.model
        state = {k: v.detach().to("cpu").contiguous() for k, v in m.state_dict().items()}
        save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
        enc_cfg = m.encoder.config.to_dict()
        enc_cfg.pop("_name_or_path", None)
        cfg = {
            "format": FORMAT, "labels": self.labels, "tags": self.tags,
            "max_length": self.max_length, "stride": self.stride,
            "context_dim": m.context_dim, "context_features": m.context_features,
            "shape_dim": m.shape_dim, "dropout": float(m.dropout.p),
            "encoder_config": enc_cfg, "encoder_source": self.meta.get("encoder_source"),
            "decoding": "bio-viterbi over word first pieces, overlapping windows merged",
            **(extra or {}),
        }
        (out / CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
        self.tokenizer.save_pretrained(str(out))
        return out

    @classmethod
    def load(cls, artifact_dir: str | Path, device: str | torch.device = "auto",
             bf16: bool | str | None = "auto", cpu_threads: int | None = None) -> "ConditionedTagger":
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        set_cpu_threads(cpu_threads)
        art = Path(artifact_dir)
        cfg = json.loads((art / CONFIG).read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{art} is not a conditioned-tagger artifact (format {cfg.get('format')!r})")
        enc_cfg = dict(cfg["encoder_config"])
        encoder = AutoModel.from_config(AutoConfig.for_model(enc_cfg.pop("model_type"), **enc_cfg))
        model = ConditionedTaggerModel(encoder, len(cfg["tags"]), cfg["context_dim"],
                                       cfg["dropout"], cfg["shape_dim"], cfg["context_features"])
        missing, unexpected = model.load_state_dict(load_file(str(art / WEIGHTS)), strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise ValueError(f"artifact weights do not fit: missing={missing} unexpected={unexpected}")
        dev = device if isinstance(device, torch.device) else pick_device(device)
        meta = {k: v for k, v in cfg.items() if k != "encoder_config"}
        self = cls(model.to(dev).eval(), AutoTokenizer.from_pretrained(str(art)), cfg["labels"],
                   cfg["max_length"], cfg["stride"], dev, inference_bf16(bf16, dev), meta)
        for rel in cfg.get("ensemble") or []:
            sub = (art / rel).resolve()
            if art.resolve() not in sub.parents:
                raise ValueError(f"{art}: ensemble member {rel!r} lies outside the artifact")
            if not (sub / CONFIG).exists():
                raise ValueError(f"{art}: ensemble member {rel!r} is missing (no {CONFIG})")
            member = cls.load(sub, dev, bf16)
            same = ("labels", "max_length", "stride", "context_dim")
            if [getattr(member, k) for k in same] != [getattr(self, k) for k in same]:
                raise ValueError(f"{art}: ensemble member {rel!r} has other labels, windows or context")
            if member.members:
                raise ValueError(f"{art}: ensemble member {rel!r} is itself an ensemble")
            self.members.append(member.model)
        return self

    # -- inference --
    @torch.inference_mode()
    def _word_logprobs(self, wins: list[Window], contexts: np.ndarray | None) -> list[np.ndarray]:
        inputs = _inputs(wins, contexts, self.pad_id, self.context_dim)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        logp = None
        for model in [self.model, *self.members]:  # an ensemble: the members' mean
            with autocast(self.device, self.bf16):
                logits = model(**inputs)
            lp = torch.log_softmax(logits.float(), dim=-1)
            logp = lp if logp is None else logp + lp
        logp = (logp / (1 + len(self.members))).cpu().numpy()
        return [logp[i, w.word_first] for i, w in enumerate(wins)]

    def predict(self, texts: Sequence[str | None], contexts: np.ndarray | None = None,
                batch_size: int = 32) -> tuple[list[list[Pred]], list[int]]:
        """(spans per text as (label, start, end, score) in the text's characters, tokens read
        per text: its windows' lengths).
        `contexts` [n, context_dim]: one vector per text (zeros: no context)."""
        clean = [t if isinstance(t, str) else "" for t in texts]
        out: list[list[Pred]] = [[] for _ in clean]
        todo = [i for i, t in enumerate(clean) if t.strip()]
        tokens = [0] * len(clean)
        if not todo:
            return out, tokens
        wins = encode_windows(self.tokenizer, [clean[i] for i in todo], self.max_length, self.stride)
        for w in wins:
            w.text_index = todo[w.text_index]
        for w in wins:
            tokens[w.text_index] += len(w.input_ids)
        was_training = self.model.training
        self.model.eval()
        try:
            # windows of one token length a batch: nothing padded, so a window's spans and
            # scores do not depend on the other texts of the call (batch-invariant, as module 1's
            # tagger; an incremental rebuild may then reuse them)
            for idx in same_length_batches([len(w.input_ids) for w in wins], batch_size):
                batch = [wins[j] for j in idx]
                ctx = (np.stack([contexts[w.text_index] for w in batch])
                       if self.context_dim else None)
                for w, lp in zip(batch, self._word_logprobs(batch, ctx)):
                    out[w.text_index].extend(self._decode(lp, w, clean[w.text_index]))
        finally:
            self.model.train(was_training)
        return [_merge(p) for p in out], tokens

    def _decode(self, logp: np.ndarray, win: Window, text: str) -> list[Pred]:
        path = viterbi(logp, self._start, self._trans)
        n = len(win.word_chars)
        preds = []
        for k, a, b in tags_to_word_spans(path):
            # a span at an inner window edge may be cut: the overlapping window sees it whole
            if (a == 0 and not win.first) or (b == n - 1 and not win.last):
                continue
            ab = trim_span(text, win.word_chars, a, b)
            if ab is None:
                continue
            a, b = ab
            score = float(np.exp(logp[np.arange(a, b + 1), path[a: b + 1]]).mean())
            preds.append((self.labels[k], win.word_chars[a][0], win.word_chars[b][1], score))
        return preds


def _merge(preds: list[Pred]) -> list[Pred]:
    """Spans from overlapping windows: the best-scored first, overlapping ones dropped."""
    kept: list[Pred] = []
    for p in sorted(preds, key=lambda x: (-x[3], x[1])):
        if any(p[1] < q[2] and p[2] > q[1] for q in kept):
            continue
        kept.append(p)
    return sorted(kept, key=lambda x: x[1])


# ---- training --------------------------------------------------------------------------------
def train_conditioned_tagger(
    texts: Sequence[str], contexts: np.ndarray | None, spans: Sequence[Sequence[Span]],
    labels: Sequence[str], s: ConditionedTrainSettings, out_dir: str | Path | None = None,
    *, max_windows: int | None = None, empty_keep_fraction: float = 0.1,
    artifact_extra: dict | None = None, groups: Sequence | None = None,
) -> tuple[ConditionedTagger, dict]:
    """Fine-tune on (text, context, spans): texts are windowed, windows without a span are kept
    at `empty_keep_fraction`, at most `max_windows` windows; validation (span F1 on held-out
    windows) picks the best epoch and stops early. With `s.ensemble` > 1 the other members are
    trained on the same windows and split (seeds seed + 1, …), and the validation figures and
    spans returned are the ensemble's (the members' log-probabilities averaged)."""
    t0 = time.perf_counter()
    set_cpu_threads(s.cpu_threads)
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    dev = pick_device(s.device)
    use_bf16 = resolve_bf16(s.bf16, dev)
    labels = list(labels)
    tagger = ConditionedTagger.from_encoder(s, labels, dev, use_bf16)
    label2idx = {lab: i for i, lab in enumerate(labels)}
    wins = encode_windows(tagger.tokenizer, list(texts), s.max_length, s.stride)
    examples = []  # (window, tags, spans inside the window)
    n_empty = 0
    for w in wins:
        sp = spans[w.text_index]
        tags = window_tags(w, sp, label2idx)
        inside = [x for x in sp if x[0] in label2idx and x[1] >= w.char_lo and x[2] <= w.char_hi]
        if not any(t > 0 for t in tags):
            n_empty += 1
            if rng.random() >= empty_keep_fraction:
                continue
        examples.append((w, tags, inside))
    if max_windows and len(examples) > max_windows:
        keep = np.sort(rng.choice(len(examples), max_windows, replace=False))
        examples = [examples[i] for i in keep]
    if not examples:
        raise ValueError("no training windows")
    n_val = int(round(len(examples) * s.val_fraction)) if len(examples) >= 20 else 0
    if groups is None:
        perm = rng.permutation(len(examples))
        val = [examples[i] for i in sorted(perm[:n_val])]
        train = [examples[i] for i in sorted(perm[n_val:])]
    else:
        val, train = split_by_group(examples, [groups[w.text_index] for w, _, _ in examples],
                                    n_val, rng)
    ctx_all = (np.asarray(contexts, dtype=np.float32) if s.context_dim
               else None)
    n_augmented = 0
    if s.mention_replacement > 0 and train:
        texts, ctx_all, extra = _mention_replacement(
            tagger.tokenizer, list(texts), ctx_all, spans, train, val, label2idx, s,
            np.random.default_rng(s.seed + 7919))
        n_augmented = len(extra)
        train = train + extra

    history, seen, best_epoch = _train_member(tagger, train, val, ctx_all, texts, s, dev, use_bf16,
                                              rng, "imputation tagger")
    members = []
    for k in range(1, max(1, int(s.ensemble))):
        # the same windows and validation split; its own initial head, batch order and dropout
        torch.manual_seed(s.seed + k)
        member = ConditionedTagger.from_encoder(s, labels, dev, use_bf16)
        h, n_seen, b = _train_member(member, train, val, ctx_all, texts, s, dev, use_bf16,
                                     np.random.default_rng(s.seed + k),
                                     f"imputation tagger {k + 1}/{s.ensemble}")
        seen += n_seen
        members.append({"seed": s.seed + k, "best_epoch": b or len(h), "epochs_run": len(h),
                        "seconds": sum(x["seconds"] for x in h),
                        **({"val_f1": h[b - 1]["val_f1"]} if b and "val_f1" in h[b - 1] else {})})
        tagger.members.append(member.model)
        history = history + [{**x, "member": k} for x in h]
    metrics = {
        "n_windows": len(wins), "n_windows_without_span": n_empty,
        "n_train": len(train) - n_augmented, "n_train_replaced": n_augmented, "n_val": len(val),
        "epochs_run": sum(1 for h in history if "member" not in h),
        "best_epoch": best_epoch or len(history),
        "history": history, "device": str(dev), "bf16": use_bf16,
        "train_examples_per_s": seen / max(1e-9, sum(h["seconds"] for h in history)),
        "ensemble": 1 + len(members), **({"members": members} if members else {}),
    }
    if val:
        final = _validate(tagger, val, ctx_all, texts, s.eval_batch_size)
        metrics.update({f"val_{k}": v for k, v in final.items() if k in ("precision", "recall", "f1")})
        # every predicted validation span's score and whether it is a labelled span: what a
        # caller calibrates its confidence threshold on
        metrics["val_spans"] = {"scores": final["span_scores"], "correct": final["span_correct"],
                                **_span_identity(final),
                                "n_gold": final["n_gold"], "windows": final["windows"],
                                "empty_keep_fraction": empty_keep_fraction}
        if tagger.members:  # the first member alone on the same windows: what one tagger gives
            others, tagger.members = tagger.members, []
            one = _validate(tagger, val, ctx_all, texts, s.eval_batch_size)
            tagger.members = others
            metrics.update({f"val_first_member_{k}": one[k] for k in ("precision", "recall", "f1")})
            metrics["val_spans_first_member"] = {"scores": one["span_scores"],
                                                 "correct": one["span_correct"], **_span_identity(one),
                                                 "n_gold": one["n_gold"],
                                                 "windows": one["windows"],
                                                 "empty_keep_fraction": empty_keep_fraction}
    metrics["train_seconds"] = time.perf_counter() - t0
    if out_dir is not None:
        tagger.save(out_dir, extra={"training": {"settings": asdict(s),
                                                 **{k: v for k, v in metrics.items()
                                                    if k not in ("history", "val_spans",
                                                                 "val_spans_first_member")}},
                                    **(artifact_extra or {})})
    return tagger, metrics


def _mention_replacement(tokenizer, texts: list[str], ctx_all, spans, train, val, label2idx,
                         s: ConditionedTrainSettings, rng: np.random.Generator):
    """`s.mention_replacement` copies of every training text that holds a labelled span and no
    validation window, each mention replaced by another value its label has in the training
    texts (never a value read only in validation). The copies' windows that hold a span join
    the training windows; validation is untouched. Returns (texts, contexts, new windows)."""
    val_texts = {w.text_index for w, _, _ in val}
    src = [t for t in sorted({w.text_index for w, _, _ in train} - val_texts)
           if any(x[0] in label2idx for x in spans[t])]
    copies = mention_copies([(texts[t], [x for x in spans[t] if x[0] in label2idx]) for t in src],
                            int(s.mention_replacement), rng)
    new_texts = [t for t, _ in copies]
    new_spans = [sp for _, sp in copies]
    owners = src * int(s.mention_replacement)
    if not new_texts:
        return texts, ctx_all, []
    base = len(texts)
    extra = []
    for w in encode_windows(tokenizer, new_texts, s.max_length, s.stride):
        sp = new_spans[w.text_index]
        w.text_index += base
        tags = window_tags(w, sp, label2idx)
        if not any(t > 0 for t in tags):
            continue
        inside = [x for x in sp if x[1] >= w.char_lo and x[2] <= w.char_hi]
        extra.append((w, tags, inside))
    if ctx_all is not None:
        ctx_all = np.concatenate([ctx_all, ctx_all[np.asarray(owners)]], axis=0)
    return texts + new_texts, ctx_all, extra


def split_by_group(examples: list, keys: Sequence, n_val: int, rng: np.random.Generator):
    """(validation, training) windows with every window of a group (a product) on one side: whole
    groups, in a seeded order, join validation until it holds at least `n_val` windows. A
    product whose title trains the tagger cannot validate it through its description."""
    if n_val <= 0:
        return [], list(examples)
    sizes: dict = {}
    for k in keys:
        sizes[k] = sizes.get(k, 0) + 1
    uniq = sorted(sizes, key=str)
    chosen, n = set(), 0
    for i in rng.permutation(len(uniq)):
        if n >= n_val:
            break
        chosen.add(uniq[i])
        n += sizes[uniq[i]]
    val = [e for e, k in zip(examples, keys) if k in chosen]
    train = [e for e, k in zip(examples, keys) if k not in chosen]
    return val, train


def _train_member(tagger: ConditionedTagger, train, val, ctx_all, texts, s: ConditionedTrainSettings,
                  dev, use_bf16: bool, rng: np.random.Generator, what: str):
    """Fine-tune one model on the training windows; validation picks its best epoch and stops
    early. Returns (history, examples seen, best epoch)."""
    from autoknow_ray import progress

    model = tagger.model
    model.train()
    n_tags = len(tagger.tags)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    opt = torch.optim.AdamW(_param_groups(model, s.lr, s.head_lr, s.weight_decay))
    steps_per_epoch = max(1, math.ceil(len(train) / s.batch_size))
    total = steps_per_epoch * s.epochs
    warm = int(total * s.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda st: (st + 1) / max(1, warm) if st < warm else max(0.0, (total - st) / max(1, total - warm)))
    lengths = np.array([len(w.input_ids) for w, _, _ in train], dtype=np.float64)
    best_f1, best_state, best_epoch, bad, history, seen = -1.0, None, 0, 0, [], 0
    for epoch in range(1, s.epochs + 1):
        te = time.perf_counter()
        batches = length_buckets(lengths + rng.uniform(-4, 4, len(lengths)), s.batch_size)
        running = 0.0
        for bi in rng.permutation(len(batches)):
            batch = [train[i] for i in batches[bi]]
            bw = [w for w, _, _ in batch]
            ctx = None
            if s.context_dim:
                ctx = ctx_all[[w.text_index for w in bw]].copy()
                ctx[rng.random(len(bw)) < s.context_dropout] = 0.0
            inputs = _inputs(bw, ctx, tagger.pad_id, s.context_dim)
            lab = torch.full_like(inputs["input_ids"], IGNORE)
            for i, (w, tags, _) in enumerate(batch):
                lab[i, torch.tensor(w.word_first)] = torch.tensor(tags[: len(w.word_first)])
            inputs = {k: v.to(dev) for k, v in inputs.items()}
            with autocast(dev, use_bf16):
                logits = model(**inputs)
            loss = loss_fn(logits.float().reshape(-1, n_tags), lab.to(dev).reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            opt.step()
            sched.step()
            running += float(loss.detach())
            seen += len(batch)
        rec = {"epoch": epoch, "loss": running / max(1, len(batches)),
               "seconds": time.perf_counter() - te}
        if val:
            m = _validate(tagger, val, ctx_all, texts, s.eval_batch_size)
            rec.update({f"val_{k}": m[k] for k in ("precision", "recall", "f1")})
            if m["f1"] > best_f1 + 1e-4:
                best_f1, best_epoch, bad = m["f1"], epoch, 0
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            else:
                bad += 1
        history.append(rec)
        log.info("conditioned tagger epoch %s %s", epoch, rec)
        progress.epoch_line(what, epoch, s.epochs, rec)
        if val and s.patience and bad >= s.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history, seen, best_epoch


def _span_identity(v: dict) -> dict:
    """Per validation span: its label, its value text and the index of its text."""
    return {"labels": v["span_labels"], "values": v["span_values"], "text_index": v["span_texts"]}


def _validate(tagger: ConditionedTagger, val, ctx_all, texts, batch_size: int) -> dict:
    """Span P/R/F1 on validation windows (each decoded as a whole text)."""
    wins = [w for w, _, _ in val]
    preds = []
    scored_by: dict[int, list] = {}
    tagger.model.eval()
    for idx in same_length_batches([len(w.input_ids) for w in wins], batch_size):  # as predict()
        batch = [wins[j] for j in idx]
        ctx = ctx_all[[w.text_index for w in batch]] if tagger.context_dim else None
        for j, w, lp in zip(idx, batch, tagger._word_logprobs(batch, ctx)):
            whole = Window(w.input_ids, w.word_first, w.word_chars, w.shapes, first=True, last=True)
            spans = tagger._decode(lp, whole, texts[w.text_index])
            preds.append((int(j), [(lab, a, b) for lab, a, b, _ in spans]))
            scored_by[int(j)] = spans
    tagger.model.train()
    pred_by = dict(preds)
    gold = [sp for _, _, sp in val]
    out = span_prf(gold, [pred_by[i] for i in range(len(val))])
    out["span_scores"], out["span_correct"] = [], []
    # per span also its label, its text and the text it was read from: what a caller tells
    # spans of a value it already knows from the others by
    out["span_labels"], out["span_values"], out["span_texts"] = [], [], []
    for i, g in enumerate(gold):
        gs = {(lab, a, b) for lab, a, b in g}
        t = int(wins[i].text_index)
        for lab, a, b, score in scored_by[i]:
            out["span_scores"].append(float(score))
            out["span_correct"].append((lab, a, b) in gs)
            out["span_labels"].append(lab)
            out["span_values"].append(texts[t][a:b])
            out["span_texts"].append(t)
    # per validation window: its text, tokens read, whether it holds no labelled span (such
    # windows were kept at `empty_keep_fraction`) and its spans' scores; what a caller measures
    # how often the tagger is sure on text like the fit's with
    out["windows"] = {"text": [int(w.text_index) for w in wins],
                      "tokens": [len(w.input_ids) for w in wins],
                      "empty": [not g for g in gold],
                      "scores": [[float(x[3]) for x in scored_by[i]] for i in range(len(val))]}
    return out
