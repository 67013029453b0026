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


def test_open_world_figures_from_the_graph_files():
    """Withheld types: a new type (named as gold or not, attached where gold says or not), a
    known type forced on it, or no type; known types: right, wrong or untyped."""
    import polars as pl

    from autoknow_ray.eval.evaluate import eval_open_world

    def triple(pid, t):
        return {"subject": pid, "relation": "has_type", "object": t, "confidence": 0.9,
                "module": "taxonomy", "status": "added", "evidence": ""}

    triples = pl.DataFrame([triple("k1", "Tea"), triple("k2", "Coffee"), triple("u1", "Ground Coffees"),
                            triple("u2", "pens"), triple("u3", "Tea"), triple("w1", "Stapler")])
    taxonomy = pl.DataFrame({"type": ["Tea", "Coffee", "ground coffee", "pens", "Stapler"],
                             "parent": [None, None, None, "Office", "Office"],
                             "is_new": [False, False, True, True, True],
                             "confidence": [None] * 5}, schema_overrides={"parent": pl.String})
    gold = pl.DataFrame({"product_id": ["k1", "k2", "k3", "u1", "u2", "u3", "u4", "w1"],
                         "type": ["tea", "Tea", "Tea", "Ground Coffee", "Ink", "Ground Coffee",
                                  "Ground Coffee", "staplers"]})
    fit = pl.DataFrame({"type": ["Tea", "Coffee"]})
    hyp = pl.DataFrame({"child": ["Ink", "Stapler"], "child_kind": ["type", "type"],
                        "parent": ["Office", "Desk"], "depth": [1, 1]})
    r = eval_open_world(triples, taxonomy, gold, fit, hyp)
    assert r["types.known.products"] == 3 and r["types.known.accuracy"] == round(1 / 3, 4)
    assert r["types.known.typed"] == round(2 / 3, 4)
    assert r["types.unseen.products"] == 5
    # u1 (ground coffee, a root: right), u2 (pens under Office: right), w1 (stapler under
    # Office, gold says Desk: wrong place) are new; u3 forced into Tea; u4 untyped
    assert r["types.unseen.new_type"] == 0.6 and r["types.unseen.new_type_gold_name"] == 0.4
    assert r["types.unseen.attached_right"] == 0.4
    assert r["types.unseen.forced_known"] == 0.2 and r["types.unseen.untyped"] == 0.2
    # Ground Coffee's new-typed product has one name, Ink's one, Stapler's one: nothing split
    assert r["types.unseen.names_per_type"] == 1.0 and r["types.unseen.variants_merged"] == 1.0


def test_open_world_placement_in_a_deep_taxonomy():
    """Where a new type hangs in a deep taxonomy: under the gold parent (or under a new type that
    is), one level or more too high, on another branch (under a sibling leaf type), or nowhere."""
    import polars as pl

    from autoknow_ray.eval.evaluate import eval_open_world

    def triple(pid, t):
        return {"subject": pid, "relation": "has_type", "object": t, "confidence": 0.9,
                "module": "taxonomy", "status": "added", "evidence": ""}

    known = [("Food", None), ("Beverages", "Food"), ("Coffee", "Beverages"), ("Personal Care", None),
             ("Oral Care", "Personal Care"), ("Cosmetics", "Personal Care"), ("Skin Care", "Cosmetics"),
             ("Hair Care", "Personal Care"), ("Conditioner", "Hair Care")]
    new = [("Teas", "Beverages"), ("Toothbrushes", "Personal Care"), ("Sunscreens", "Personal Care"),
           ("Lotion", "Coffee"), ("Herbal teas", "Teas"), ("Brush Heads", None),
           ("Floss", "Skin Care")]
    taxonomy = pl.DataFrame({"type": [t for t, _ in known + new], "parent": [p for _, p in known + new],
                             "is_new": [False] * len(known) + [True] * len(new),
                             "confidence": [None] * (len(known) + len(new))},
                            schema_overrides={"parent": pl.String, "confidence": pl.Float32})
    got = {"k1": "Coffee", "u1": "Teas", "u2": "Toothbrushes", "u3": "Sunscreens", "u4": "Lotion",
           "u5": "Herbal teas", "u6": "Brush Heads", "u7": "Floss"}
    triples = pl.DataFrame([triple(p, t) for p, t in got.items()])
    gold = pl.DataFrame({"product_id": list(got), "type": ["Coffee", "Tea", "Toothbrush", "Sunscreen",
                                                           "Sunscreen", "Tea", "Toothbrush",
                                                           "Toothbrush"]})
    hyp = pl.DataFrame({"child": ["Tea", "Toothbrush", "Sunscreen"], "child_kind": ["type"] * 3,
                        "parent": ["Beverages", "Oral Care", "Skin Care"], "depth": [1, 1, 1]})
    r = eval_open_world(triples, taxonomy, gold, pl.DataFrame({"type": ["Coffee", "Conditioner"]}), hyp)
    assert r["types.unseen.products"] == 7 and r["types.unseen.new_type"] == 1.0
    seventh = lambda n: round(n / 7, 4)  # noqa: E731
    assert r["types.unseen.attached_right"] == seventh(2)  # Teas, and Herbal teas under Teas
    assert r["types.unseen.attached_too_high"] == seventh(2)  # Toothbrushes, Sunscreens
    assert r["types.unseen.attached_one_level_high"] == seventh(1)  # Toothbrushes only
    assert r["types.unseen.attached_wrong_branch"] == seventh(2)  # Lotion, Floss
    # Lotion under Coffee, a product type; Floss under Skin Care, an empty inner node, is not
    assert r["types.unseen.attached_under_leaf"] == seventh(1)
    assert r["types.unseen.unattached"] == seventh(1)  # Brush Heads, a root
    # Tea got two names (Teas, Herbal teas), Toothbrush three, Sunscreen two: 7 / 3 names per
    # withheld type; under each one's most common name: 1 + 1 + 1 of 7 products
    assert r["types.unseen.names_per_type"] == round(7 / 3, 4)
    assert r["types.unseen.variants_merged"] == seventh(3)


def test_attribute_figures_per_module_judge_each_modules_own_facts():
    """A value module 3 read in a description is no title span: the title score over every
    module counts it wrong, module 1's own figure (`by_module.taxonomy`) does not see it."""
    import polars as pl

    from autoknow_ray.eval.evaluate import eval_attributes

    spans = pl.DataFrame({
        "product_id": ["p1", "p1", "p2"], "attribute": ["Brand", "Color", "Brand"],
        "value": ["Acme", "Red", "Kiva"], "field": ["title"] * 3})

    def t(s, r, o, m, status="added"):
        return {"subject": s, "relation": r, "object": o, "confidence": 0.9, "module": m,
                "status": status, "evidence": ""}

    triples = pl.DataFrame([
        t("p1", "Brand", "Acme", "taxonomy"), t("p1", "Color", "Red", "taxonomy"),
        t("p2", "Color", "Blue", "imputation"),          # read in p2's description
        t("p2", "Brand", "Kiva", "taxonomy", "removed"),  # retracted: not a live fact
    ])
    out = eval_attributes(triples, spans, "title")
    assert out["attribute_extraction.precision"] == round(2 / 3, 4)
    assert out["attribute_extraction.by_module.taxonomy.precision"] == 1.0
    assert out["attribute_extraction.by_module.taxonomy.recall"] == round(2 / 3, 4)
    assert out["attribute_extraction.by_module.imputation.precision"] == 0.0
    assert not any(".by_module.catalogue." in k for k in out)
