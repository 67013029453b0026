"""A generic span tagger: a transformer encoder + a linear BIO head, trained on character spans.

- Labels are span labels ("type", "Brand", …); the head predicts BIO tags over them.
- Words are the fast tokenizer's pre-tokenized words (whitespace and punctuation split); the label
  of a word sits on its first word piece, the other pieces are ignored by the loss, and spans are
  always whole words, mapped back to character offsets in the original text.
- Decoding is BIO-constrained Viterbi over the word tag log-probabilities (an I-X only follows a
  B-X or an I-X), so every span is well formed.
- An artifact is a folder with `model.safetensors`, `config.json` (labels, encoder config,
  max_length …) and the tokenizer files: it loads without the original encoder folder, and holds
  no pickle.
- An ensemble is one artifact whose `config.json` lists member artifacts in sub-folders
  (`"ensemble": ["members/1", …]`, same labels and tokenizer, other seeds): every member scores
  each word, the mean of their tag log-probabilities goes to one Viterbi, so spans stay well
  formed, and a span's score is the geometric mean of the members' probabilities of its tags.

The module knows nothing about products: `modules/*` feed it (text, [(label, start, end)]).
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from autoknow_ray import progress
from autoknow_ray.nn import gazetteer as gz
from autoknow_ray.nn.encoder import (
    autocast,
    inference_bf16,
    length_buckets,
    same_length_batches,
    load_encoder,
    load_tokenizer,
    pick_device,
    resolve_encoder,
    set_cpu_threads,
)

log = logging.getLogger(__name__)

FORMAT = "autoknow-span-tagger/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
IGNORE = -100

Span = tuple[str, int, int]  # (label, start, end), end exclusive, character offsets
Example = tuple[str, list[Span]]  # (text, spans)
Pred = tuple[str, int, int, float]  # (label, start, end, score)


# ---- labels ----------------------------------------------------------------------------------
def bio_tags(labels: Sequence[str]) -> list[str]:
    """["O", "B-l1", "I-l1", "B-l2", …] — tag 2k+1 is B of label k, 2k+2 its I."""
    tags = ["O"]
    for lab in labels:
        tags += [f"B-{lab}", f"I-{lab}"]
    return tags


def allowed_transitions(n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(start[T], trans[T, T]) additive masks: 0 where allowed, -inf where not (BIO rules)."""
    n_tags = 2 * n_labels + 1
    start = np.zeros(n_tags, dtype=np.float32)
    trans = np.zeros((n_tags, n_tags), dtype=np.float32)
    for k in range(n_labels):
        i_tag = 2 * k + 2
        start[i_tag] = -np.inf
        trans[:, i_tag] = -np.inf
        trans[2 * k + 1, i_tag] = 0.0  # B-k -> I-k
        trans[i_tag, i_tag] = 0.0  # I-k -> I-k
    return start, trans


def viterbi(logp: np.ndarray, start: np.ndarray, trans: np.ndarray) -> np.ndarray:
    """Best tag path for one sequence of word log-probabilities [n, T] under the masks."""
    n, n_tags = logp.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    score = logp[0] + start
    back = np.zeros((n, n_tags), dtype=np.int64)
    for t in range(1, n):
        cand = score[:, None] + trans  # [prev, cur]
        back[t] = cand.argmax(0)
        score = cand[back[t], np.arange(n_tags)] + logp[t]
    path = np.zeros(n, dtype=np.int64)
    path[-1] = int(score.argmax())
    for t in range(n - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return path


def tags_to_word_spans(path: Sequence[int]) -> list[tuple[int, int, int]]:
    """Tag ids (see `bio_tags`) → [(label index, first word, last word inclusive)]."""
    spans: list[tuple[int, int, int]] = []
    cur: list[int] | None = None
    for w, tag in enumerate(path):
        tag = int(tag)
        if tag == 0:
            if cur:
                spans.append(tuple(cur))  # type: ignore[arg-type]
            cur = None
            continue
        k, is_inside = (tag - 1) // 2, (tag - 1) % 2 == 1
        if is_inside and cur is not None and cur[0] == k:
            cur[2] = w
        else:  # a B, or an I that does not continue (tolerated as a B)
            if cur:
                spans.append(tuple(cur))  # type: ignore[arg-type]
            cur = [k, w, w]
    if cur:
        spans.append(tuple(cur))  # type: ignore[arg-type]
    return spans


_OPEN, _CLOSE = "([{", ")]}"
_EDGE_PUNCT = set(",;:|/\\-\u2013\u2014") | set(_OPEN) | set(_CLOSE)


def trim_span(
    text: str, word_chars: Sequence[tuple[int, int]], a: int, b: int
) -> tuple[int, int] | None:
    """Clean a decoded word span: separators at its edges and unbalanced brackets go.

    A span that swallowed "(" or ")" of a bracket it does not close is cut there, keeping the
    side with more words ("pack of 50 (5081" → "pack of 50"); separators (, ; | / - …) at its
    edges are dropped, and so are brackets around the whole span. None when nothing but punctuation is left.
    """
    words = [text[s:e] for s, e in word_chars[a : b + 1]]
    stack, cut = [], None
    for i, w in enumerate(words):
        if w in _OPEN:
            stack.append(i)
        elif w in _CLOSE:
            if stack:
                stack.pop()
            else:
                cut = i
                break
    if cut is None and stack:
        cut = stack[0]
    if cut is not None:
        left, right = (0, cut - 1), (cut + 1, len(words) - 1)
        lo, hi = left if (left[1] - left[0]) >= (right[1] - right[0]) else right
        if hi < lo:
            return None
        return trim_span(text, word_chars, a + lo, a + hi)
    lo, hi = 0, len(words) - 1
    while lo <= hi and words[lo] in _EDGE_PUNCT and words[lo] not in _OPEN:
        lo += 1
    while hi >= lo and words[hi] in _EDGE_PUNCT and words[hi] not in _CLOSE:
        hi -= 1
    if hi < lo or not any(ch.isalnum() for w in words[lo : hi + 1] for ch in w):
        return None
    if hi - lo >= 2 and words[lo] in _OPEN and words[hi] == _CLOSE[_OPEN.index(words[lo])]:
        inner = trim_span(text, word_chars, a + lo + 1, a + hi - 1)  # "(2 Pack)" → "2 Pack"
        if inner is not None and inner[1] - inner[0] == hi - lo - 2:
            return inner
    return a + lo, a + hi


# ---- tokenization and alignment --------------------------------------------------------------
@dataclass
class Encoded:
    """One text after tokenization: its token ids and its words (first piece, char span)."""

    input_ids: list[int]
    word_first: list[int]  # token position of each word's first piece
    word_chars: list[tuple[int, int]]  # char span of each word in the original text
    shapes: list[int]  # per token: the shape of the word it belongs to (0 for special tokens)
    token_word: list[int] | None = None  # per token: its word's index (-1 for special tokens)
    gaz: np.ndarray | None = None  # per word: gazetteer match features (see nn/gazetteer.py)


N_SHAPES = 8


def word_shape(word: str) -> int:
    """Surface shape of a word, which an uncased encoder cannot see: case, digits, punctuation."""
    if not word:
        return 0
    if not any(ch.isalnum() for ch in word):
        return 7
    has_digit = any(ch.isdigit() for ch in word)
    has_alpha = any(ch.isalpha() for ch in word)
    if has_digit:
        return 6 if has_alpha else 5
    if word.islower():
        return 1
    if word.isupper():
        return 3 if len(word) > 1 else 2
    if word[0].isupper() and word[1:].islower():
        return 2
    return 4


class WordLayout(NamedTuple):
    """Where a tokenized text's words are: per word its first token and character span, per
    token its word's shape (0 for special tokens) and word index (-1 for special tokens)."""
    first: list[int]
    chars: list[tuple[int, int]]
    shapes: list[int]
    token_word: list[int]


def _words(word_ids: list[int | None], offsets: list[tuple[int, int]], text: str) -> WordLayout:
    first: list[int] = []
    chars: list[list[int]] = []
    token_word: list[int] = []  # word index per token, -1 for special tokens
    prev = None
    for pos, wid in enumerate(word_ids):
        if wid is None:
            prev = None
            token_word.append(-1)
            continue
        s, e = offsets[pos]
        if wid != prev:
            first.append(pos)
            chars.append([s, e])
        else:
            chars[-1][1] = max(chars[-1][1], e)
        token_word.append(len(chars) - 1)
        prev = wid
    shapes_w = [word_shape(text[s:e]) for s, e in chars]
    shapes = [shapes_w[w] if w >= 0 else 0 for w in token_word]
    return WordLayout(first, [(s, e) for s, e in chars], shapes, token_word)


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[Encoded]:
    """Tokenize (truncating to max_length tokens) and find each word's first piece and chars."""
    if not texts:
        return []
    # very long inputs: a character cap far above what max_length tokens can hold
    texts = [t[: max_length * 24] for t in texts]
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        add_special_tokens=True,
    )
    out = []
    for i in range(len(texts)):
        w = _words(enc.word_ids(i), enc["offset_mapping"][i], texts[i])
        out.append(Encoded(list(enc["input_ids"][i]), w.first, w.chars, w.shapes, w.token_word))
    return out


def word_labels(
    word_chars: Sequence[tuple[int, int]], spans: Iterable[Span], label2idx: dict[str, int]
) -> list[int]:
    """Char spans → a tag id per word (B on the first word a span overlaps, I on the rest)."""
    tags = [0] * len(word_chars)
    for lab, s, e in sorted(spans, key=lambda x: (x[1], x[2])):
        k = label2idx.get(lab)
        if k is None or e <= s:
            continue
        inside = [w for w, (ws, we) in enumerate(word_chars) if ws < e and we > s and we > ws]
        if not inside or any(tags[w] != 0 for w in inside):
            continue  # unknown label, truncated away, or overlapping an earlier span
        tags[inside[0]] = 2 * k + 1
        for w in inside[1:]:
            tags[w] = 2 * k + 2
    return tags


def word_spans_to_chars(
    word_spans: Iterable[tuple[int, int, int]], word_chars: Sequence[tuple[int, int]]
) -> list[tuple[int, int, int]]:
    return [(k, word_chars[a][0], word_chars[b][1]) for k, a, b in word_spans]


def align_round_trip(tokenizer, text: str, spans: list[Span], labels: Sequence[str], max_length=128):
    """Char spans → word BIO tags → char spans (what the model can express for this text)."""
    label2idx = {lab: i for i, lab in enumerate(labels)}
    enc = encode_texts(tokenizer, [text], max_length)[0]
    tags = word_labels(enc.word_chars, spans, label2idx)
    return [
        (labels[k], s, e)
        for k, s, e in word_spans_to_chars(tags_to_word_spans(tags), enc.word_chars)
    ]


# ---- the model -------------------------------------------------------------------------------
class SpanTaggerModel(nn.Module):
    """Encoder → dropout → linear over BIO tags; optionally a small word-shape embedding is
    concatenated to the encoder output (case and digits, lost by uncased tokenizers), and
    gazetteer match features (`gaz_features` columns) enter through a learnt projection added
    to the input embeddings (zero at initialisation: the encoder starts as it was)."""

    def __init__(self, encoder: nn.Module, n_tags: int, dropout: float = 0.1, shape_dim: int = 0,
                 gaz_features: int = 0):
        super().__init__()
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # unused: keeps the artifact small and DDP free of unused params
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.shape_dim = int(shape_dim)
        self.shape_emb = nn.Embedding(N_SHAPES, self.shape_dim) if self.shape_dim else None
        self.head = nn.Linear(int(encoder.config.hidden_size) + self.shape_dim, n_tags)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.gaz_features = int(gaz_features)
        self.gaz_proj = None
        if self.gaz_features:
            self.gaz_proj = nn.Linear(self.gaz_features, int(encoder.config.hidden_size), bias=False)
            nn.init.zeros_(self.gaz_proj.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        shapes: torch.Tensor | None = None,
        gaz: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.gaz_proj is None:
            hidden = self.encoder(input_ids=input_ids,
                                  attention_mask=attention_mask).last_hidden_state
        else:
            emb = self.encoder.get_input_embeddings()(input_ids)
            if gaz is not None:
                emb = emb + self.gaz_proj(gaz.to(emb.dtype))
            hidden = self.encoder(inputs_embeds=emb,
                                  attention_mask=attention_mask).last_hidden_state
        if self.shape_emb is not None:
            if shapes is None:
                shapes = torch.zeros_like(input_ids)
            hidden = torch.cat([hidden, self.shape_emb(shapes).to(hidden.dtype)], dim=-1)
        return self.head(self.dropout(hidden))


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    n = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (n - len(r)) for r in rows], dtype=torch.long)


def _gaz_tokens(encs: list[Encoded], n_tokens: int) -> torch.Tensor:
    """Per-token gazetteer features [batch, tokens, features]: every piece of a word gets its
    word's row; special and padding tokens get zeros."""
    width = next(e.gaz.shape[1] for e in encs if e.gaz is not None)
    out = np.zeros((len(encs), n_tokens, width), dtype=np.float32)
    for i, e in enumerate(encs):
        if e.gaz is None or e.token_word is None or not len(e.gaz):
            continue
        tw = np.asarray(e.token_word)
        pos = np.nonzero(tw >= 0)[0]
        out[i, pos] = e.gaz[tw[pos]]
    return torch.from_numpy(out)


def _batch(encs: list[Encoded], pad_id: int, tags: list[list[int]] | None = None):
    """(model inputs, token labels or None) for a list of encoded texts."""
    ids = _pad([e.input_ids for e in encs], pad_id)
    inputs = {
        "input_ids": ids,
        "attention_mask": _pad([[1] * len(e.input_ids) for e in encs], 0),
        "shapes": _pad([e.shapes for e in encs], 0),
    }
    if any(e.gaz is not None for e in encs):
        inputs["gaz"] = _gaz_tokens(encs, ids.shape[1])
    if tags is None:
        return inputs, None
    lab = torch.full_like(ids, IGNORE)
    for i, (e, t) in enumerate(zip(encs, tags)):
        if e.word_first:
            lab[i, torch.tensor(e.word_first)] = torch.tensor(t[: len(e.word_first)])
    return inputs, lab


# ---- training settings -----------------------------------------------------------------------
@dataclass
class TrainSettings:
    encoder: str = "default"
    max_length: int = 96
    epochs: int = 12
    lr: float = 1e-4  # encoder
    head_lr: float = 1e-3
    batch_size: int = 16
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    dropout: float = 0.1
    shape_dim: int = 16  # word-shape embedding size (0: off)
    grad_clip: float = 1.0
    o_weight: float = 1.0  # loss weight of the "O" tag (<1 favours recall)
    val_fraction: float = 0.1
    patience: int = 3  # epochs without a better val span F1 before stopping; 0 = never stop
    min_delta: float = 1e-4
    seed: int = 0
    bf16: bool | str = "auto"  # auto: on GPU only
    device: str = "auto"
    cpu_threads: int | None = 2
    length_jitter: float = 4.0  # tokens of noise on lengths when bucketing shuffled batches
    eval_batch_size: int = 64
    # gazetteer input (nn/gazetteer.py): the training spans' values, cross-fold during training
    gazetteer: bool = False
    gazetteer_folds: int = 4
    gazetteer_max_words: int = 8
    gazetteer_max_entries: int = 200_000
    gazetteer_skip: tuple[str, ...] = ()  # labels kept out of the gazetteer
    # copies of each training title with its values replaced by other values of their labels
    # (mention replacement; `mention_skip` labels keep theirs), validation untouched
    mention_replacement: int = 0
    mention_skip: tuple[str, ...] = ()


def resolve_bf16(bf16: bool | str | None, device: torch.device) -> bool:
    if bf16 is None or bf16 == "auto":
        return device.type == "cuda"
    return bool(bf16)


# ---- the tagger ------------------------------------------------------------------------------
class SpanTagger:
    """A trained (or freshly initialised) tagger: model + tokenizer + labels + decoding."""

    def __init__(
        self,
        model: SpanTaggerModel,
        tokenizer,
        labels: Sequence[str],
        max_length: int,
        device: torch.device,
        bf16: bool,
        meta: dict | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.tags = bio_tags(self.labels)
        self.max_length = int(max_length)
        self.device = device
        self.bf16 = bf16
        self.meta = dict(meta or {})
        self._start, self._trans = allowed_transitions(len(self.labels))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.trim_punct = True
        self.gazetteer: gz.Gazetteer | None = None  # used by predict() when the model has one
        self.members: list[SpanTaggerModel] = []  # an ensemble's other models (same labels)
        # labels written once per title in the catalogue the tagger was fit on (config.json
        # "single_valued"): of several values read in one title, the best-scored one's spans stay
        self.single_valued: frozenset[str] = frozenset(self.meta.get("single_valued") or ())

    def add_gazetteer(self, encs: list[Encoded], texts: Sequence[str]) -> None:
        """Fill each encoded text's features from the tagger's gazetteer (if the model has one)."""
        if self.gazetteer is None or getattr(self.model, "gaz_proj", None) is None:
            return
        for e, t in zip(encs, texts):
            e.gaz = self.gazetteer.features(t, e.word_chars)

    # -- construction --
    @classmethod
    def from_encoder(
        cls,
        encoder: str | None,
        labels: Sequence[str],
        max_length: int = 96,
        dropout: float = 0.1,
        device: str | torch.device = "auto",
        bf16: bool | str | None = "auto",
        shape_dim: int = 0,
        gaz_features: int = 0,
    ) -> "SpanTagger":
        path = resolve_encoder(encoder)
        dev = device if isinstance(device, torch.device) else pick_device(device)
        model = SpanTaggerModel(load_encoder(path), len(bio_tags(labels)), dropout, shape_dim,
                                gaz_features)
        meta = {"encoder_source": path, "dropout": dropout}
        return cls(model.to(dev), load_tokenizer(path), labels, max_length, dev,
                   resolve_bf16(bf16, dev), meta)

    def save(self, out_dir: str | Path, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = getattr(self.model, "module", self.model)  # unwrap DDP
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
        enc_cfg = model.encoder.config.to_dict()
        enc_cfg.pop("_name_or_path", None)
        cfg = {
            "format": FORMAT,
            "labels": self.labels,
            "tags": self.tags,
            "max_length": self.max_length,
            "dropout": float(model.dropout.p),
            "shape_dim": model.shape_dim,
            "gaz_features": model.gaz_features,
            "hidden_size": int(model.encoder.config.hidden_size),
            "encoder_config": enc_cfg,
            "encoder_source": self.meta.get("encoder_source"),
            "decoding": "bio-viterbi, word level (first piece)",
            **(extra or {}),
        }
        (out / CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
        self.tokenizer.save_pretrained(str(out))
        if model.gaz_features and self.gazetteer is not None:
            self.gazetteer.save(out)
        # the tokenizer writes its own config files; none of them is a pickle
        return out

    @classmethod
    def load(
        cls,
        artifact_dir: str | Path,
        device: str | torch.device = "auto",
        bf16: bool | str | None = "auto",
        cpu_threads: int | None = None,
    ) -> "SpanTagger":
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel

        set_cpu_threads(cpu_threads)
        art = Path(artifact_dir)
        cfg = json.loads((art / CONFIG).read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{art} is not a span-tagger artifact (format {cfg.get('format')!r})")
        enc_cfg = dict(cfg["encoder_config"])
        enc_config = AutoConfig.for_model(enc_cfg.pop("model_type"), **enc_cfg)
        encoder = AutoModel.from_config(enc_config)
        gaz_features = int(cfg.get("gaz_features", 0))
        model = SpanTaggerModel(encoder, len(cfg["tags"]), float(cfg.get("dropout", 0.1)),
                                int(cfg.get("shape_dim", 0)), gaz_features)
        missing, unexpected = model.load_state_dict(load_file(str(art / WEIGHTS)), strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise ValueError(f"artifact weights do not fit: missing={missing} unexpected={unexpected}")
        dev = device if isinstance(device, torch.device) else pick_device(device)
        tokenizer = load_tokenizer(str(art))
        meta = {k: v for k, v in cfg.items() if k not in ("encoder_config",)}
        tagger = cls(model.to(dev).eval(), tokenizer, cfg["labels"], cfg["max_length"], dev,
                     inference_bf16(bf16, dev), meta)
        if gaz_features:
            tagger.gazetteer = gz.Gazetteer.load(art)
            if tagger.gazetteer.n_features != gaz_features:
                raise ValueError(f"{art}: gazetteer has {tagger.gazetteer.n_features} features, "
                                 f"the model expects {gaz_features}")
        for rel in cfg.get("ensemble") or []:
            sub = (art / rel).resolve()
            if art.resolve() not in sub.parents:
                raise ValueError(f"{art}: ensemble member {rel!r} lies outside the artifact")
            if not (sub / CONFIG).exists():
                raise ValueError(f"{art}: ensemble member {rel!r} is missing (no {CONFIG}): "
                                 "copy the whole tagger folder, members included")
            member = cls.load(sub, device=dev, bf16=bf16, cpu_threads=cpu_threads)
            if member.labels != tagger.labels or member.max_length != tagger.max_length:
                raise ValueError(f"{art}: ensemble member {rel!r} has other labels or max_length")
            if member.members:
                raise ValueError(f"{art}: ensemble member {rel!r} is itself an ensemble")
            if member.model.gaz_features != gaz_features:
                # every member's inference gazetteer is the same (all training spans): the
                # artifact's own one feeds them all
                raise ValueError(f"{art}: ensemble member {rel!r} has another gazetteer input")
            if member.tokenizer.get_vocab() != tokenizer.get_vocab():
                raise ValueError(f"{art}: ensemble member {rel!r} has another tokenizer")
            tagger.members.append(member.model)
        return tagger

    @staticmethod
    def write_ensemble(out_dir: str | Path, members: Sequence[str]) -> None:
        """Make the artifact in `out_dir` an ensemble of itself and `members` (folders relative to
        it, each a complete artifact with the same labels and tokenizer)."""
        out = Path(out_dir)
        cfg = json.loads((out / CONFIG).read_text())
        for rel in members:
            if not (out / rel / CONFIG).exists():
                raise FileNotFoundError(f"ensemble member {out / rel} has no {CONFIG}")
        cfg["ensemble"] = [str(Path(rel).as_posix()) for rel in members]
        (out / CONFIG).write_text(json.dumps(cfg, indent=2, default=str))

    # -- inference --
    @torch.inference_mode()
    def _word_logprobs(self, encs: list[Encoded]) -> list[np.ndarray]:
        inputs, _ = _batch(encs, self.pad_id)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        total = None
        for model in (self.model, *self.members):
            with autocast(self.device, self.bf16):
                logits = model(**inputs)
            lp = torch.log_softmax(logits.float(), dim=-1)
            total = lp if total is None else total + lp
        if self.members:
            # the members' mean log-probability, not renormalised: the Viterbi path is the
            # product of experts', and a span's score is the geometric mean of the members'
            # probabilities of its tags, low where they disagree (renormalised, the 0.5 span
            # floor let through more disputed spans: OA-Mine F1 0.763 against 0.768)
            total = total / (1 + len(self.members))
        logp = total.cpu().numpy()
        return [logp[i, e.word_first] for i, e in enumerate(encs)]

    def predict(self, texts: Sequence[str | None], batch_size: int = 64) -> list[list[Pred]]:
        """Spans per text: (label, start, end, score), offsets into the original text."""
        out: list[list[Pred]] = [[] for _ in texts]
        clean = [t if isinstance(t, str) else "" for t in texts]
        todo = [i for i, t in enumerate(clean) if t.strip()]
        if not todo:
            return out
        was_training = self.model.training
        self.model.eval()
        for m in self.members:
            m.eval()
        try:
            # one token length per batch (no padding): a title's spans and scores are the same
            # in any batch, so an incremental rebuild may reuse them (docs/incremental.md)
            all_encs = encode_texts(self.tokenizer, [clean[i] for i in todo], self.max_length)
            self.add_gazetteer(all_encs, [clean[i] for i in todo])
            for idx in same_length_batches([len(e.input_ids) for e in all_encs], batch_size):
                rows = [todo[j] for j in idx]
                encs = [all_encs[j] for j in idx]
                keep = [(r, e) for r, e in zip(rows, encs) if e.word_first]
                if not keep:
                    continue
                logps = self._word_logprobs([e for _, e in keep])
                for (r, e), lp in zip(keep, logps):
                    out[r] = self._one_value(self._decode(lp, e, clean[r]), clean[r])
        finally:
            self.model.train(was_training)
        return out

    def _one_value(self, preds: list[Pred], text: str) -> list[Pred]:
        """Of a single-valued label's spans in one title, those whose text is the best-scored
        span's (`text.fold_words`: case, spacing and Unicode forms aside) are kept; other labels'
        spans pass as they are."""
        from autoknow_ray.text import fold_words

        if not self.single_valued:
            return preds
        best: dict[str, tuple[float, str]] = {}
        for lab, a, b, score in preds:
            if lab in self.single_valued and (lab not in best or score > best[lab][0]):
                best[lab] = (score, fold_words(text[a:b]))
        if not best:
            return preds
        return [p for p in preds if p[0] not in best or fold_words(text[p[1]:p[2]]) == best[p[0]][1]]

    def _decode(self, logp: np.ndarray, enc: Encoded, text: str) -> list[Pred]:
        path = viterbi(logp, self._start, self._trans)
        preds = []
        for k, a, b in tags_to_word_spans(path):
            if self.trim_punct:
                ab = trim_span(text, enc.word_chars, a, b)
                if ab is None:
                    continue
                a, b = ab
            score = float(np.exp(logp[np.arange(a, b + 1), path[a : b + 1]]).mean())
            preds.append((self.labels[k], enc.word_chars[a][0], enc.word_chars[b][1], score))
        return preds


# ---- metrics ---------------------------------------------------------------------------------
def span_prf(gold: Sequence[Iterable[Span]], pred: Sequence[Iterable[Sequence]]) -> dict:
    """Exact-span micro precision / recall / F1 over (label, start, end) per text."""
    tp = n_pred = n_gold = 0
    for g, p in zip(gold, pred):
        gs = {(lab, s, e) for lab, s, e in g}
        ps = {(x[0], x[1], x[2]) for x in p}
        tp += len(gs & ps)
        n_pred += len(ps)
        n_gold += len(gs)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": prec, "recall": rec, "f1": f1, "tp": tp, "n_pred": n_pred, "n_gold": n_gold}


# ---- training --------------------------------------------------------------------------------
def replace_mentions(text: str, spans: Sequence[Span], pool: dict[str, list[str]],
                     rng: np.random.Generator) -> tuple[str, list[Span]]:
    """`text` with every labelled mention replaced by another value of its label drawn from
    `pool` (one draw per distinct value, so a value written twice is replaced the same way
    twice), and the spans moved to where the new values sit. A label whose pool holds no other
    value keeps its mention."""
    pick: dict[tuple[str, str], str] = {}
    out, new_spans, at = [], [], 0
    for lab, a, b in sorted(spans, key=lambda x: x[1]):
        if a < at:  # overlapping spans are not produced by distant supervision; keep the first
            continue
        old = text[a:b]
        key = (lab, old.lower())
        if key not in pick:
            others = [v for v in pool.get(lab, ()) if v.lower() != key[1]]
            pick[key] = others[int(rng.integers(len(others)))] if others else old
        new = pick[key]
        out.append(text[at:a])
        start = sum(len(x) for x in out)
        out.append(new)
        new_spans.append((lab, start, start + len(new)))
        at = b
    out.append(text[at:])
    return "".join(out), new_spans


def mention_copies(train: Sequence[Example], copies: int, rng: np.random.Generator,
                   skip: Iterable[str] = ()) -> list[Example]:
    """`copies` copies of every training example with a replaceable span, each labelled value
    replaced by another value its label has in the training examples (never one only the
    validation examples write; labels in `skip` keep their values)."""
    skip = set(skip)
    pool: dict[str, dict[str, str]] = {}
    for t, sp in train:
        for lab, a, b in sp:
            if lab not in skip:
                pool.setdefault(lab, {}).setdefault(t[a:b].lower(), t[a:b])
    pools = {lab: [vs[k] for k in sorted(vs)] for lab, vs in pool.items()}
    out: list[Example] = []
    for _ in range(int(copies)):
        for t, sp in train:
            if not any(lab not in skip for lab, _, _ in sp):
                continue
            kept = {lab: pools.get(lab, []) for lab, _, _ in sp if lab not in skip}
            new_t, new_sp = replace_mentions(t, sp, kept, rng)
            out.append((new_t, new_sp))
    return out


def split_examples(examples: Sequence[Example], val_fraction: float, seed: int):
    """Seeded train / validation split (no validation below 10 examples or fraction 0)."""
    n = len(examples)
    n_val = int(round(n * val_fraction)) if val_fraction > 0 else 0
    if n < 10 or n_val < 1:
        return list(examples), []
    perm = np.random.default_rng(seed).permutation(n)
    val = [examples[i] for i in sorted(perm[:n_val])]
    train = [examples[i] for i in sorted(perm[n_val:])]
    return train, val


def _param_groups(model: SpanTaggerModel, lr: float, head_lr: float, weight_decay: float):
    groups = {(True, False): [], (True, True): [], (False, False): [], (False, True): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = not name.startswith("encoder.")
        no_decay = p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name or name.endswith(".bias")
        groups[(is_head, no_decay)].append(p)
    out = []
    for (is_head, no_decay), params in groups.items():
        if params:
            out.append({
                "params": params,
                "lr": head_lr if is_head else lr,
                "weight_decay": 0.0 if no_decay else weight_decay,
            })
    return out


def _train_gazetteer(tagger: SpanTagger, encs: list[Encoded], texts: Sequence[str],
                     tags: list[list[int]], labels: Sequence[str], s: TrainSettings) -> dict:
    """The tagger's gazetteer (every training span's value, for validation and inference) and
    each training text's features from the other folds' values only (see nn/gazetteer.py)."""
    skip = frozenset(i for i, lab in enumerate(labels) if lab in set(s.gazetteer_skip))
    folds = max(2, int(s.gazetteer_folds))
    fold_of = np.random.default_rng(s.seed + 104729).integers(folds, size=len(encs))
    spans = [tags_to_word_spans(t) for t in tags]
    counts = []
    for f in range(folds):
        rows = np.nonzero(fold_of == f)[0]
        counts.append(gz.count_entries([texts[i] for i in rows],
                                       [encs[i].word_chars for i in rows],
                                       [spans[i] for i in rows], s.gazetteer_max_words, skip))
    total = sum(counts, start=Counter())
    per_fold = gz.cross_fold(counts, total, len(labels), s.gazetteer_max_words,
                             s.gazetteer_max_entries)
    for i, (e, t) in enumerate(zip(encs, texts)):
        e.gaz = per_fold[int(fold_of[i])].features(t, e.word_chars)
    tagger.gazetteer = gz.Gazetteer(len(labels), gz.top_entries(total, s.gazetteer_max_entries),
                                    s.gazetteer_max_words)
    matched = sum(int(e.gaz[:, 0::2].sum()) for e in encs)
    return {"gazetteer_entries": len(tagger.gazetteer), "gazetteer_folds": folds,
            "gazetteer_train_matches": matched}


def train_span_tagger(
    examples: Sequence[Example],
    labels: Sequence[str],
    settings: TrainSettings,
    out_dir: str | Path | None = None,
    *,
    val_examples: Sequence[Example] | None = None,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    artifact_extra: dict | None = None,
) -> tuple[SpanTagger, dict]:
    """Fine-tune encoder + head on (text, spans) examples; early-stop on validation span F1.

    With `world_size > 1` (Ray Train) each rank takes its share of every epoch's batches,
    `wrap_model` wraps the model for data-parallel training, every rank evaluates the same
    validation split (so all stop together), and only rank 0 writes the artifact.
    """
    t0 = time.perf_counter()
    s = settings
    set_cpu_threads(s.cpu_threads)
    torch.manual_seed(s.seed)
    np.random.seed(s.seed)
    dev = device or pick_device(s.device)
    use_bf16 = resolve_bf16(s.bf16, dev)
    labels = list(labels)
    if val_examples is None:
        train_ex, val_ex = split_examples(examples, s.val_fraction, s.seed)
    else:
        train_ex, val_ex = list(examples), list(val_examples)
    if not train_ex:
        raise ValueError("no training examples")
    n_replaced = 0
    if s.mention_replacement > 0:
        extra = mention_copies(train_ex, s.mention_replacement,
                               np.random.default_rng(s.seed + 7919), s.mention_skip)
        n_replaced = len(extra)
        train_ex = list(train_ex) + extra

    tagger = SpanTagger.from_encoder(s.encoder, labels, s.max_length, s.dropout, dev, use_bf16,
                                     s.shape_dim, 2 * len(labels) if s.gazetteer else 0)
    label2idx = {lab: i for i, lab in enumerate(labels)}
    encs = encode_texts(tagger.tokenizer, [t for t, _ in train_ex], s.max_length)
    tags = [word_labels(e.word_chars, sp, label2idx) for e, (_, sp) in zip(encs, train_ex)]
    gaz_stats = _train_gazetteer(tagger, encs, [t for t, _ in train_ex], tags, labels, s) \
        if s.gazetteer else {}
    lengths = np.array([len(e.input_ids) for e in encs], dtype=np.float64)

    model: nn.Module = tagger.model
    model.train()
    n_tags = len(tagger.tags)
    weight = torch.ones(n_tags, device=dev)
    weight[0] = s.o_weight
    loss_fn = nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE)
    opt = torch.optim.AdamW(_param_groups(tagger.model, s.lr, s.head_lr, s.weight_decay))
    if wrap_model is not None:
        model = wrap_model(model)  # tagger.model stays the bare module (same weights) for predict

    steps_per_epoch = max(1, math.ceil(len(encs) / s.batch_size) // max(1, world_size))
    total = steps_per_epoch * max(1, s.epochs)
    warm = int(total * s.warmup_ratio)

    def lr_lambda(step: int) -> float:
        if step < warm:
            return (step + 1) / max(1, warm)
        return max(0.0, (total - step) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    rng = np.random.default_rng(s.seed)
    best_f1, best_state, best_epoch, bad = -1.0, None, 0, 0
    history = []
    seen = 0
    val_gold = [sp for _, sp in val_ex]
    for epoch in range(1, s.epochs + 1):
        te = time.perf_counter()
        jitter = rng.uniform(-s.length_jitter, s.length_jitter, size=len(lengths))
        batches = length_buckets(lengths + jitter, s.batch_size)
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
        if world_size > 1:  # equal count per rank, or DDP waits forever on the last step
            batches = batches[rank::world_size][:steps_per_epoch]
        running = 0.0
        for idx in batches:
            inputs, lab = _batch([encs[i] for i in idx], tagger.pad_id, [tags[i] for i in idx])
            inputs = {k: v.to(dev) for k, v in inputs.items()}
            lab = lab.to(dev)
            with autocast(dev, use_bf16):
                logits = model(**inputs)
            loss = loss_fn(logits.float().reshape(-1, n_tags), lab.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            opt.step()
            sched.step()
            running += float(loss.detach())
            seen += len(idx)
        rec = {"epoch": epoch, "loss": running / max(1, len(batches)),
               "seconds": time.perf_counter() - te}
        if val_ex:
            pred = tagger.predict([t for t, _ in val_ex], batch_size=s.eval_batch_size)
            m = span_prf(val_gold, pred)
            rec.update({"val_precision": m["precision"], "val_recall": m["recall"],
                        "val_f1": m["f1"]})
            if m["f1"] > best_f1 + s.min_delta:
                best_f1, best_epoch, bad = m["f1"], epoch, 0
                base = getattr(model, "module", model)
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in base.state_dict().items()}
            else:
                bad += 1
        history.append(rec)
        if rank == 0:
            log.info("tagger epoch %s %s", epoch, {k: round(v, 4) for k, v in rec.items()})
            progress.epoch_line("tagger", epoch, s.epochs, rec)
        if on_epoch is not None:
            on_epoch(rec)
        if val_ex and s.patience and bad >= s.patience:
            break

    base = getattr(model, "module", model)
    if best_state is not None:
        base.load_state_dict(best_state)
    base.eval()
    tagger.model = base
    metrics: dict = {
        "n_train": len(train_ex) - n_replaced, "n_train_replaced": n_replaced,
        "n_val": len(val_ex),
        "labels": labels,
        "epochs_run": len(history),
        "best_epoch": best_epoch or len(history),
        "history": history,
        "bf16": use_bf16,
        "device": str(dev),
        "train_examples_per_s": seen / max(1e-9, sum(h["seconds"] for h in history)),
        **gaz_stats,
    }
    if val_ex:
        final = span_prf(val_gold, tagger.predict([t for t, _ in val_ex], s.eval_batch_size))
        metrics.update({"val_precision": final["precision"], "val_recall": final["recall"],
                        "val_f1": final["f1"]})
    metrics["train_seconds"] = time.perf_counter() - t0
    if out_dir is not None and rank == 0:
        tagger.save(out_dir, extra={"training": {"settings": asdict(s),
                                                 **{k: v for k, v in metrics.items()
                                                    if k not in ("labels", "history")}},
                                    **(artifact_extra or {})})
    return tagger, metrics

