"""Known span values as a tagger input: which words of a text start or continue a known value.

A gazetteer maps word sequences (lower-cased words as the tagger's tokenizer splits them) to the
labels they were seen with. For a text it gives one row per word: 1 in column 2k where a known
value of label k starts there, 1 in column 2k+1 for its other words. The tagger adds a learnt
projection of those rows to its input embeddings, so the encoder weighs "this was a brand
elsewhere" against the context; it still has to find values it never saw.

Trained on entries from the very titles it tags, the model would learn to copy the gazetteer.
`cross_fold` gives each training text a gazetteer built from the other folds only, so during
training, as at inference on new titles, some values are known and some are not.

The module knows nothing about products: a label is a string, a text a string with word offsets.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

FORMAT = "autoknow-gazetteer/1"
FILE = "gazetteer.json"

WordSpan = tuple[int, int, int]  # (label index, first word, last word inclusive)


def _words(text: str, word_chars: Sequence[tuple[int, int]]) -> list[str]:
    return [text[s:e].lower() for s, e in word_chars]


def count_entries(
    texts: Sequence[str],
    word_chars: Sequence[Sequence[tuple[int, int]]],
    word_spans: Sequence[Iterable[WordSpan]],
    max_words: int,
    skip: frozenset[int] = frozenset(),
) -> Counter:
    """Counter of (label index, word tuple) over the spans of the texts."""
    counts: Counter = Counter()
    for text, chars, spans in zip(texts, word_chars, word_spans):
        words = None
        for k, a, b in spans:
            if k in skip or b - a + 1 > max_words:
                continue
            if words is None:
                words = _words(text, chars)
            counts[(k, tuple(words[a : b + 1]))] += 1
    return counts


class Gazetteer:
    """Word tuples → label indices, and the per-word match features of a text."""

    def __init__(self, n_labels: int, entries: Iterable[tuple[int, tuple[str, ...]]],
                 max_words: int = 8):
        self.n_labels = int(n_labels)
        self.max_words = int(max_words)
        grouped: dict[tuple[str, ...], set[int]] = {}
        for k, words in entries:
            if words and len(words) <= self.max_words:
                grouped.setdefault(tuple(words), set()).add(int(k))
        self.index: dict[tuple[str, ...], tuple[int, ...]] = {
            w: tuple(sorted(ks)) for w, ks in grouped.items()}
        self.lengths = sorted({len(w) for w in self.index}, reverse=True)

    @property
    def n_features(self) -> int:
        return 2 * self.n_labels

    def __len__(self) -> int:
        return len(self.index)

    def features(self, text: str, word_chars: Sequence[tuple[int, int]]) -> np.ndarray:
        """[n_words, 2 * n_labels] float32: B and I indicators of every known value in the text."""
        words = _words(text, word_chars)
        n = len(words)
        out = np.zeros((n, self.n_features), dtype=np.float32)
        if not self.index or not n:
            return out
        for i in range(n):
            for length in self.lengths:
                if i + length > n:
                    continue
                ks = self.index.get(tuple(words[i : i + length]))
                if ks is None:
                    continue
                for k in ks:
                    out[i, 2 * k] = 1.0
                    out[i + 1 : i + length, 2 * k + 1] = 1.0
        return out

    # -- persistence (JSON, no pickle) --
    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILE
        entries = [[k, list(w)] for w, ks in sorted(self.index.items()) for k in ks]
        path.write_text(json.dumps({"format": FORMAT, "n_labels": self.n_labels,
                                    "max_words": self.max_words, "entries": entries}))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "Gazetteer":
        path = Path(folder) / FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable gazetteer ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a gazetteer (format {FORMAT!r} expected)")
        try:
            return cls(int(data["n_labels"]),
                       [(int(k), tuple(str(x) for x in w)) for k, w in data["entries"]],
                       int(data.get("max_words", 8)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path} is not a gazetteer: a malformed field ({exc!r}); "
                             "run `autoknow fit` again") from exc


def top_entries(counts: Counter, max_entries: int) -> list[tuple[int, tuple[str, ...]]]:
    """The `max_entries` most frequent (label, words) entries (ties: the lexical order)."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [key for key, _ in ranked[:max_entries]]


def cross_fold(
    counts_per_fold: Sequence[Counter], total: Counter, n_labels: int, max_words: int,
    max_entries: int,
) -> list[Gazetteer]:
    """Fold i's gazetteer holds the entries of every other fold (`total`: all folds' counts)."""
    out = []
    for c in counts_per_fold:
        rest = total - c  # drops entries whose count falls to zero
        out.append(Gazetteer(n_labels, top_entries(rest, max_entries), max_words))
    return out
