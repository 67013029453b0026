"""Text normalisation shared by every module: word tokens, a crude singular stem, type keys.

Comparison keys only, never shown: "Ice Creams" and "ice cream" share the key "ic cream".
"""
from __future__ import annotations

import re
import unicodedata

_NON_WORD = re.compile(r"[^\w%]+")
_KEEP_S = ("ss", "us", "is")


def fold(text: str) -> str:
    """The case-insensitive comparison form of a string: NFKC (micro sign -> Greek mu, full-width
    -> ASCII, no-break space -> space, "ﬁ" -> "fi"), then case-folded. For lookups in sets and
    dicts, never for text whose character offsets are kept (NFKC may change lengths)."""
    return unicodedata.normalize("NFKC", text).casefold()


def fold_words(text: str) -> str:
    """`fold`, with every run of white space one space and none at the ends: a value's key."""
    return " ".join(fold(text).split())


def stem(word: str) -> str:
    """A crude singular stem: the same for the singular and the plural of most English nouns
    (berry/berries → berri, cookie/cookies → cooki, tomato/tomatoes → tomato, box/boxes → box).
    Only for comparing strings, never shown."""
    w = word
    if len(w) <= 3 or not w.isalpha():
        return w
    if w.endswith("sses"):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith(_KEEP_S):
        w = w[:-1]
    if len(w) > 3 and w.endswith("e"):
        w = w[:-1]
    if len(w) > 3 and w.endswith("y"):
        w = w[:-1] + "i"
    return w


def tokens(text: str | None) -> list[str]:
    """Lower-cased, accent-folded word tokens of a name (hyphens and punctuation split)."""
    if not text:
        return []
    t = unicodedata.normalize("NFKD", str(text))
    t = "".join(ch for ch in t if not unicodedata.combining(ch)).lower()
    return [tok for tok in _NON_WORD.split(t.replace("_", " ")) if tok]


def stem_tokens(text: str | None) -> list[str]:
    return [stem(t) for t in tokens(text)]


def type_key(text: str | None) -> str:
    """The comparison key of a type string: stemmed tokens joined by one space ("" if none)."""
    return " ".join(stem_tokens(text))


def clean_surface(text: str) -> str:
    return " ".join(str(text).split())


def char_edits(value: str, rng, edits: int = 2) -> str:
    """`value` with `edits` random character edits (delete, insert, substitute, transpose), as a
    typing slip makes them; `rng` is a `random.Random`."""
    import string

    chars = list(value)
    for _ in range(edits):
        op = rng.choice(("delete", "insert", "substitute", "transpose"))
        i = rng.randrange(max(1, len(chars)))
        if op == "delete" and len(chars) > 1:
            del chars[i]
        elif op == "insert":
            chars.insert(i, rng.choice(string.ascii_lowercase))
        elif op == "transpose" and len(chars) > 1:
            j = min(i + 1, len(chars) - 1)
            chars[i], chars[j] = chars[j], chars[i]
        else:
            chars[min(i, len(chars) - 1)] = rng.choice(string.ascii_lowercase) if chars else "x"
    return "".join(chars)
