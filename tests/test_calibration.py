"""Thresholds for a precision target: known answers, abstention, and the base-rate correction."""
import numpy as np
import pytest

from autoknow_ray.calibration import threshold_for_precision, wilson


def test_wilson_bounds_known_values():
    lo, hi = wilson(0, 100)
    assert lo == 0.0 and 0.02 < hi < 0.03  # no event in 100: rate under ~2.6% at 95% one-sided
    lo, hi = wilson(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * (0.5 - lo))
    assert wilson(3, 0) == (0.0, 1.0)


def test_lowest_threshold_whose_bound_reaches_the_target():
    # 200 right claims scored 0.9..1.0, then 100 right and 100 wrong mixed at 0.5..0.6
    rng = np.random.default_rng(0)
    scores = np.r_[rng.uniform(0.9, 1.0, 200), rng.uniform(0.5, 0.6, 200)]
    labels = np.r_[np.ones(200), np.r_[np.ones(100), np.zeros(100)]]
    c = threshold_for_precision(scores, labels, 0.95)
    assert not c.abstains
    # the clean block and a few mixed claims above it: the bound stays over 0.95 a little way
    # into the 50% block, then falls; no lower threshold that meets it finds more
    assert 0.5 < c.threshold < 0.6 and 200 <= c.acted <= 240 and c.precision_lower >= 0.95
    found = labels[scores >= c.threshold].sum()
    for t in np.sort(scores[scores < c.threshold])[::-1]:
        k, n = labels[scores >= t].sum(), (scores >= t).sum()
        assert wilson(k, n)[0] < 0.95 or k == found


def test_a_lower_threshold_that_adds_only_wrong_claims_is_not_taken():
    # 300 right claims, then one wrong one just below them: taking it adds no recall
    scores = np.r_[np.linspace(0.99, 0.7, 300), 0.69, np.linspace(0.3, 0.1, 50)]
    labels = np.r_[np.ones(300), 0, np.zeros(50)]
    c = threshold_for_precision(scores, labels, 0.95)
    assert c.threshold == pytest.approx(0.7) and c.acted == 300 and c.precision == 1.0


def test_too_few_claims_do_not_show_the_target():
    # six of six right: precision 1.0, but six claims cannot show 0.95
    c = threshold_for_precision([0.9] * 6 + [0.1] * 6, [1] * 6 + [0] * 6, 0.95)
    assert c.abstains and c.best_precision_lower < 0.95 and "0.95" in c.abstain_reason


def test_a_model_at_chance_abstains():
    rng = np.random.default_rng(1)
    c = threshold_for_precision(rng.random(2000), rng.random(2000) < 0.5, 0.9)
    assert c.abstains and c.best_precision_lower < 0.7


def test_base_rate_makes_false_positives_count_as_in_the_graph():
    # balanced validation: 500 errors, 500 correct claims; 2% of correct claims score as high as
    # errors. Balanced, precision is ~0.98; at a 5% base rate it is 0.05 / (0.05 + 0.95 * 0.02) =
    # 0.72, so a 0.9 target must take a threshold above those correct claims or abstain
    rng = np.random.default_rng(2)
    err = rng.uniform(0.8, 1.0, 500)
    ok = np.r_[rng.uniform(0.0, 0.5, 490), rng.uniform(0.8, 1.0, 10)]
    scores, labels = np.r_[err, ok], np.r_[np.ones(500), np.zeros(500)]
    balanced = threshold_for_precision(scores, labels, 0.9)
    assert balanced.threshold is not None and balanced.recall == 1.0
    skewed = threshold_for_precision(scores, labels, 0.9, base_rate=0.05)
    if not skewed.abstains:
        acted_ok = int(((ok >= skewed.threshold)).sum())
        assert acted_ok <= 2 and skewed.threshold > balanced.threshold
    assert skewed.best_precision_lower is not None


def test_floor_and_empty_classes():
    c = threshold_for_precision([0.99] * 100 + [0.2] * 100, [1] * 100 + [0] * 100, 0.95, floor=0.995)
    assert c.abstains  # nothing scores at or above the floor
    assert threshold_for_precision([0.5, 0.6], [0, 0], 0.9).abstains
    assert threshold_for_precision([0.5, 0.6], [1, 1], 0.9, base_rate=0.05).abstains
