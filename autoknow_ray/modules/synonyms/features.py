"""Hand-made features of a term pair, for the synonym classifier.

Every feature is general knowledge about how one name is written another way, never a list
tuned to one catalogue: string similarities (rapidfuzz), the same code written with or without
separators ("435952-B21" / "435952B21"), an initialism or abbreviation ("HP" / "Hewlett Packard",
"Blk" / "Black"), a singular or plural form, and quantities compared after unit conversion
("16 oz" = "1 lb", "1TB" = "1000 GB", but "16 oz" != "16 lb"). The unit table covers mass,
volume, length, data size, counts and a few others, each unit with its usual spellings.
"""
from __future__ import annotations

import math
import re
import unicodedata

import numpy as np
from rapidfuzz import fuzz
from rapidfuzz.distance import JaroWinkler, Levenshtein


def fold(s: str) -> str:
    """The comparison form of a term: NFKC (micro sign -> Greek mu, full-width -> ASCII, no-break
    space -> space, "ﬁ" -> "fi"), case-folded, stripped."""
    return unicodedata.normalize("NFKC", s).casefold().strip()


# unit -> (dimension, factor to the dimension's base unit), keyed by fold(): the form a term is
# looked up in, so every way of writing a unit ("µg", "μg", "ＭＧ") finds its entry
_UNITS: dict[str, tuple[str, float]] = {}


def _units(dim: str, factor: float, *names: str) -> None:
    for n in names:
        _UNITS[fold(n)] = (dim, factor)


_units("mass", 1e-3, "mg", "milligram", "milligrams")
_units("mass", 1e-6, "mcg", "µg", "ug", "microgram", "micrograms")
_units("mass", 1.0, "g", "gr", "gram", "grams", "gm", "gms")
_units("mass", 1e3, "kg", "kgs", "kilo", "kilos", "kilogram", "kilograms")
_units("mass", 28.349523, "oz", "ounce", "ounces", "onz")
_units("mass", 453.59237, "lb", "lbs", "pound", "pounds")
_units("volume", 1.0, "ml", "milliliter", "milliliters", "millilitre", "millilitres", "cc")
_units("volume", 10.0, "cl", "centiliter", "centiliters", "centilitre", "centilitres")
_units("volume", 1e3, "l", "liter", "liters", "litre", "litres", "ltr")
_units("volume", 29.573530, "floz", "fl oz", "fl. oz", "fl.oz", "fluid ounce", "fluid ounces")
_units("volume", 3785.4118, "gal", "gallon", "gallons")
_units("volume", 946.35295, "qt", "quart", "quarts")
_units("volume", 473.17647, "pt", "pint", "pints")
_units("length", 1.0, "mm", "millimeter", "millimeters", "millimetre", "millimetres")
_units("length", 10.0, "cm", "centimeter", "centimeters", "centimetre", "centimetres")
_units("length", 1e3, "m", "meter", "meters", "metre", "metres")
_units("length", 25.4, "in", "inch", "inches", '"', "''")
_units("length", 304.8, "ft", "foot", "feet", "'")
_units("length", 914.4, "yd", "yard", "yards")
_units("data", 1e3, "kb", "kilobyte", "kilobytes")
_units("data", 1e6, "mb", "megabyte", "megabytes")
_units("data", 1e9, "gb", "gigabyte", "gigabytes")
_units("data", 1e12, "tb", "terabyte", "terabytes")
_units("power", 1.0, "w", "watt", "watts")
_units("power", 1e3, "kw", "kilowatt", "kilowatts")
_units("time", 1.0, "s", "sec", "secs", "second", "seconds")
_units("time", 60.0, "min", "mins", "minute", "minutes")
_units("time", 3600.0, "h", "hr", "hrs", "hour", "hours")
_units("count", 1.0, "ct", "count", "pack", "pk", "pcs", "pc", "piece", "pieces", "pkg",
       "sheets", "sheet", "each", "ea")
_units("frequency", 1e6, "mhz")
_units("frequency", 1e9, "ghz")
_UNIT_RE = "|".join(sorted((re.escape(u) for u in _UNITS), key=len, reverse=True))
# a number (1,000 / 2.5 / 1/2) and an optional unit, the whole folded term: "16 oz", "8-tb",
# "1,000/box". Matched case-sensitively against fold(): IGNORECASE would also match letters that
# fold leaves alone ("ı" for "i") and so name a unit the table does not hold.
_QTY = re.compile(rf"^\s*(\d{{1,3}}(?:,\d{{3}})+|\d+(?:[.,]\d+)?)\s*[-/]?\s*({_UNIT_RE})?\.?\s*"
                  rf"(?:/\s*(?:box|pack|pk|case|carton|ctn|bx))?\s*$")
_NUM = re.compile(r"\d+(?:[.,]\d+)?")
_THOUSANDS = re.compile(r"(\d),(\d{3})(?!\d)")
_ALNUM = re.compile(r"[\W_]+", re.UNICODE)
_TOKENS = re.compile(r"[^\W_]+", re.UNICODE)

FEATURES = (
    "ratio", "token_set", "partial", "jaro_winkler", "key_levenshtein", "key_equal",
    "singular_equal", "initialism", "abbreviation", "quantity_both", "quantity_equal",
    "quantity_conflict", "numbers_equal", "numbers_conflict", "cosine", "length_ratio",
    "token_containment", "converted_equal", "conversion_ratio",
)
# the distinct unit factors of each dimension: "16 in" may be written as the bare "40.6" (cm)
# where the attribute implies its unit
_FACTORS: dict[str, list[float]] = {}
for _dim, _f in sorted(set(_UNITS.values())):
    _FACTORS.setdefault(_dim, []).append(_f)
_BARE = re.compile(r"^\s*(\d+)(?:[.,](\d+))?\s*$")
_CONVERTIBLE = ("mass", "volume", "length")


def key(s: str) -> str:
    """Letters and digits only, case-folded: the same code with or without separators."""
    return _ALNUM.sub("", fold(s))


def tokens(s: str) -> list[str]:
    return _TOKENS.findall(fold(s))


def singular(word: str) -> str:
    if len(word) > 3 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith(("ses", "xes", "ches", "shes")):
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def singular_key(s: str) -> str:
    return "".join(singular(t) for t in tokens(s))


# a mixed number or fraction and what follows: "11-3/4\"", "8 1/2", "3/4 in"
_MIXED = re.compile(r"^\s*(?:(\d+)[\s-]+)?(\d+)\s*/\s*(\d+)\s*(.*?)\s*$")


def _fraction(s: str) -> tuple[float, str] | None:
    """(value, rest) of a term that starts with a fraction or mixed number, else None."""
    m = _MIXED.match(s)
    if not m or int(m.group(3)) == 0 or int(m.group(2)) >= int(m.group(3)):
        return None
    try:
        return int(m.group(1) or 0) + int(m.group(2)) / int(m.group(3)), m.group(4)
    except OverflowError:  # a whole part too long for a float ("9" * 400 + " 1/2"): not a number
        return None


def quantity(s: str) -> tuple[str, float] | None:
    """(dimension, value in the base unit) of a term that is one quantity, else None. A bare
    number is dimension "number"; fractions and mixed numbers count ("11-3/4\"" is 11.75 in)."""
    f = _fraction(fold(s))
    if f is not None:
        v, rest = f
        rest = rest.strip(" .-")
        if not rest:
            return ("number", v)
        unit = _UNITS.get(rest)
        return (unit[0], v * unit[1]) if unit else None
    m = _QTY.match(fold(s))
    if not m:
        return None
    num, unit = m.group(1), m.group(2)
    num = num.replace(",", "") if re.fullmatch(r"\d{1,3}(?:,\d{3})+", num) else num.replace(",", ".")
    try:
        v = float(num)
    except ValueError:
        return None
    if not unit:
        return ("number", v)
    found = _UNITS.get(unit)
    if found is None:
        return None
    return (found[0], v * found[1])


def same_quantity(a: tuple[str, float] | None, b: tuple[str, float] | None) -> bool:
    """The same amount of one dimension, within rounding. Total: zero, negative, infinite or
    missing amounts give an answer, never an exception."""
    if a is None or b is None or a[0] != b[0]:
        return False
    x, y = float(a[1]), float(b[1])
    if x == y:
        return True
    if a[0] == "number":  # no unit, no conversion to round: "30" and "30.5" are two numbers
        return False
    if not (math.isfinite(x) and math.isfinite(y)) or x == 0 or y == 0 or (x < 0) != (y < 0):
        return False  # an amount is never within rounding of zero or of the opposite sign
    hi, lo = max(abs(x), abs(y)), min(abs(x), abs(y))
    r = lo / hi
    # 2% covers rounded conversions (16 oz = 453.6 g ~ 1 lb); data sizes are also sold in
    # binary multiples (1 TB ~ 1024 GB)
    return r >= 0.98 or (a[0] == "data" and abs(hi / lo - 1.024) < 0.01)


def _bare(s: str) -> tuple[float, int] | None:
    """(value, decimals shown) of a term that is a bare number (or fraction), else None."""
    f = _fraction(s)
    if f is not None and not f[1].strip(" .-"):
        return f[0], 3  # a fraction is exact: compare it closely
    m = _BARE.match(s)
    if not m:
        return None
    v = float(f"{m.group(1)}.{m.group(2) or 0}")
    # "9" * 400 reads as infinity: not a number any unit or digit count applies to
    return (v, len(m.group(2) or "")) if math.isfinite(v) else None


def _rounds_to(v: float, shown: tuple[float, int]) -> bool:
    x, d = shown
    return x > 0 and abs(v - x) <= 0.5 * 10 ** -d + 1e-9


def converted_equal(a: str, b: str) -> bool:
    """One side a quantity with its unit, the other a bare number that is the same amount in a
    unit of that dimension, rounded as written ("16 in" / "40.6", "8.4 oz" / "238")."""
    for q_side, n_side in ((a, b), (b, a)):
        q, shown = quantity(q_side), _bare(n_side)
        if q is None or shown is None or q[0] not in _FACTORS or q[0] == "count":
            continue
        if any(_rounds_to(q[1] / f, shown) for f in _FACTORS[q[0]]):
            return True
    return False


def _significant(shown: tuple[float, int]) -> int:
    """Significant digits of a bare number as written (value, decimals shown)."""
    x, d = shown
    if x <= 0:
        return 0
    return max(0, math.floor(math.log10(x)) + 1) + d if x >= 1 else d - max(0, -math.floor(math.log10(x)) - 1)


def conversion_ratio(a: str, b: str) -> bool:
    """Two bare numbers, one the other converted between two units of one dimension and
    rounded as written, with at least one decimal and three significant digits shown ("6" /
    "15.2": inches to cm). Fewer digits match some factor of the table by chance ("17.1" oz is
    "1.1" lb, but so is every number from 16.8 to 18.4)."""
    na, nb = _bare(a), _bare(b)
    if na is None or nb is None or na[0] == nb[0] or na[0] <= 0 or nb[0] <= 0:
        return False
    for src, dst in ((na, nb), (nb, na)):
        if dst[1] < 1 or _significant(dst) < 3:
            continue
        for dim in _CONVERTIBLE:
            fs = _FACTORS[dim]
            if any(f1 != f2 and _rounds_to(src[0] * f1 / f2, dst) for f1 in fs for f2 in fs):
                return True
    return False


def numbers(s: str) -> set[str]:
    s = _THOUSANDS.sub(r"\1\2", s)
    return {n.replace(",", ".").lstrip("0") or "0" for n in _NUM.findall(s)}


def is_initialism(short: str, long: str) -> bool:
    """'HP' of 'Hewlett-Packard', 'USB' of 'Universal Serial Bus' (case-insensitive)."""
    k = key(short)
    words = tokens(long)
    # letters: "1.1" is not the initialism of "17.1"
    return (len(words) >= 2 and len(k) == len(words) and any(c.isalpha() for c in k)
            and k == "".join(w[0] for w in words))


def is_abbreviation(short: str, long: str) -> bool:
    """'Blk' of 'Black', 'Med' of 'Medium': the short form's letters appear in order in the long
    form, starting with its first letter, and it is clearly shorter."""
    s, l_ = key(short), key(long)
    if len(s) < 2 or len(s) > 0.7 * len(l_) or s[0] != l_[0] or any(c.isdigit() for c in s):
        return False
    i = 0
    for c in l_:
        if i < len(s) and c == s[i]:
            i += 1
    return i == len(s)


def pair_features(a: str, b: str, cosine: float = 0.0) -> list[float]:
    fa, fb = fold(a), fold(b)
    ka, kb = key(a), key(b)
    short, long = (a, b) if len(ka) <= len(kb) else (b, a)
    qa, qb = quantity(a), quantity(b)
    both_q = qa is not None and qb is not None
    q_equal = both_q and same_quantity(qa, qb)
    na, nb = numbers(fa), numbers(fb)
    ta, tb = set(tokens(a)), set(tokens(b))
    small, big = (ta, tb) if len(ta) <= len(tb) else (tb, ta)
    return [
        fuzz.ratio(fa, fb) / 100.0,
        fuzz.token_set_ratio(fa, fb) / 100.0,
        fuzz.partial_ratio(fa, fb) / 100.0,
        JaroWinkler.normalized_similarity(fa, fb),
        Levenshtein.normalized_similarity(ka, kb),
        float(bool(ka) and ka == kb),
        float(bool(ka) and singular_key(a) == singular_key(b)),
        float(is_initialism(short, long)),
        float(is_abbreviation(short, long)),
        float(both_q),
        float(q_equal),
        float(both_q and not q_equal),
        float(bool(na) and na == nb),
        float(bool(na) and bool(nb) and not (na & nb)),
        float(cosine),
        min(len(ka), len(kb)) / max(len(ka), len(kb), 1),
        float(bool(small) and small <= big),
        float(converted_equal(fa, fb)),
        float(conversion_ratio(fa, fb)),
    ]


def feature_matrix(a: list[str], b: list[str], cosine=None) -> np.ndarray:
    n = len(a)
    cos = np.zeros(n) if cosine is None else np.asarray(cosine, dtype=np.float64)
    out = np.zeros((n, len(FEATURES)), dtype=np.float32)
    for i in range(n):
        out[i] = pair_features(a[i] or "", b[i] or "", cos[i])
    return out


def edit_similarity(a: list[str], b: list[str]) -> np.ndarray:
    """Normalised Levenshtein similarity of the case-folded strings: the edit-distance baseline."""
    return np.array([Levenshtein.normalized_similarity(fold(x or ""), fold(y or ""))
                     for x, y in zip(a, b)], dtype=np.float32)
