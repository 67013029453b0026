from autoknow_ray.eval.metrics import accuracy_at_k, norm_text, norm_type, prf, set_prf


def test_normalisation():
    assert norm_text("  Green  TEA, ") == "green tea"
    assert norm_type("Tea Bags") == norm_type("tea bag")
    assert norm_type("Berries") == norm_type("berry")
    assert norm_type("glass") == "glass"


def test_prf_and_accuracy():
    assert prf(0, 0, 0)["f1"] == 0.0
    r = set_prf({1, 2, 3}, {2, 3, 4, 5})
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 2)
    assert abs(r["precision"] - 2 / 3) < 1e-3 and r["recall"] == 0.5
    ranked = {"a": ["x", "y", "z"], "b": ["q", "r", "s"]}
    gold = {"a": {"y"}, "b": {"s"}, "c": {"t"}}
    assert accuracy_at_k(ranked, gold, 1) == 0.0
    assert accuracy_at_k(ranked, gold, 2) == round(1 / 3, 4)
    assert accuracy_at_k(ranked, gold, 3) == round(2 / 3, 4)
