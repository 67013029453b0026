"""Unicode spellings of one term (micro sign or Greek mu, full-width letters and digits, no-break
spaces, ligatures) find the same unit, value or token; hostile strings never raise. No Ray."""
from __future__ import annotations

import numpy as np
import pytest

from autoknow_ray.modules.cleaning.model import text_features
from autoknow_ray.modules.imputation.texts import is_null_value
from autoknow_ray.modules.relations.features import tokens as relation_tokens
from autoknow_ray.modules.synonyms import distant
from autoknow_ray.modules.synonyms.features import (_UNITS, FEATURES, feature_matrix, fold,
                                                   pair_features, quantity, same_quantity)

HOSTILE = ["", " ", "   \t\n", "\u00a0", "０", "µ", "μ", "ﬁ", "😀", "🧴 16 oz", "0 GB", "0", "0 TB",
           "1 mın", "１６ ｏｚ", "16\u00a0oz", "500 µg", "9" * 400 + " gb", "0/0", "1/0 in", "-",
           ".", "ＭＧ", "\u200b", "a\u0301", "ß", "İ", "ﬂ oz", "㎍", "½ oz", "٣ kg"]


def test_micro_sign_and_greek_mu_are_one_unit():
    micro, mu, mg = quantity("500 \u00b5g"), quantity("500 \u03bcg"), quantity("0.5 mg")
    assert micro is not None and micro[0] == "mass"
    assert micro == mu
    assert same_quantity(micro, mg) and same_quantity(mu, mg)
    assert quantity("500 ㎍") == micro  # the squared "μg" sign folds to the same unit
    assert not same_quantity(micro, quantity("500 mg"))


def test_full_width_and_no_break_space_spellings():
    assert quantity("１６ ｏｚ") == quantity("16 oz")
    assert same_quantity(quantity("１６ ｏｚ"), quantity("1 lb"))
    assert quantity("16\u00a0oz") == quantity("16 oz")
    assert quantity("16\u202foz") == quantity("16 oz")  # narrow no-break space
    assert quantity("ＭＧ") is None and quantity("５ ＭＧ") == quantity("5 mg")
    assert quantity("16 ﬂ oz") == quantity("16 fl oz")  # "ﬂ" ligature


def test_a_letter_that_only_matches_a_unit_ignoring_case_is_not_a_unit():
    # dotless "ı" matched "i" under IGNORECASE and then missed the table (KeyError)
    assert quantity("1 mın") is None


def test_every_unit_of_the_table_resolves():
    for name, (dim, factor) in _UNITS.items():
        q = quantity("1 " + name)
        assert q is not None, name
        assert q[0] == dim and q[1] == pytest.approx(factor), name
        assert quantity("1 " + name.upper()) is not None, name
    # the table is keyed by the same fold used for lookup
    assert all(fold(name) == name for name in _UNITS)


def test_same_quantity_is_total_at_zero_and_below():
    zero_gb, zero_tb, one_gb = quantity("0 GB"), quantity("0 TB"), quantity("1 GB")
    assert zero_gb == ("data", 0.0)
    assert same_quantity(zero_gb, zero_tb)
    assert not same_quantity(zero_gb, one_gb) and not same_quantity(one_gb, zero_gb)
    assert same_quantity(quantity("1 TB"), quantity("1024 GB"))  # binary multiple still equal
    assert not same_quantity(("data", 0.0), ("data", -1.0))
    assert not same_quantity(("data", 1e9), ("data", -1e9))
    assert same_quantity(("data", -1e12), ("data", -1.024e12))
    assert same_quantity(("mass", -16.0), ("mass", -16.1))
    assert not same_quantity(("mass", float("inf")), ("mass", 1.0))
    assert not same_quantity(("mass", float("nan")), ("mass", float("nan")))
    assert not same_quantity(None, zero_gb) and not same_quantity(zero_gb, None)


def test_pair_features_never_raise_on_hostile_strings():
    for a in HOSTILE:
        for b in HOSTILE:
            f = pair_features(a, b)
            assert len(f) == len(FEATURES) and all(np.isfinite(f)), (a, b)
    m = feature_matrix(HOSTILE, HOSTILE[::-1])
    assert m.shape == (len(HOSTILE), len(FEATURES)) and np.isfinite(m).all()
    f = dict(zip(FEATURES, pair_features("500 µg", "0.5 mg")))
    assert f["quantity_equal"] == 1.0 and f["quantity_conflict"] == 0.0


def test_rewrites_of_unicode_units_keep_meaning():
    rng = np.random.default_rng(0)
    for term in ("5 µg", "5 μg", "１６ ｏｚ", "16\u00a0oz"):  # small: ±1 is not rounding
        q = quantity(term)
        pos = distant.positive_rewrites(term, rng)
        units = [p for p in pos if quantity(p) is not None and quantity(p)[0] != "number"]
        assert units and all(same_quantity(quantity(p), q) for p in units), (term, pos)
        neg = [n for n in distant.negative_rewrites(term, rng) if quantity(n) is not None]
        assert all(not same_quantity(quantity(n), q) for n in neg), (term, neg)
    for term in HOSTILE:
        distant.positive_rewrites(term, rng)
        distant.negative_rewrites(term, rng)


def test_other_lookups_fold_unicode_first():
    assert is_null_value("Ｎ/Ａ") and is_null_value("\u00a0none\u00a0") and is_null_value("ＮＵＬＬ")
    assert not is_null_value("Navy")
    assert relation_tokens("ﬁne １６ ＯＺ") == relation_tokens("fine 16 oz")
    assert relation_tokens("500 µg") == relation_tokens("500 μg")
    exact = text_features("１６ ｏｚ", "Shampoo", "A bottle of 16\u00a0oz")[0]
    assert exact == 1.0
