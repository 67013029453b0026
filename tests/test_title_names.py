"""Type names written in titles (modules/taxonomy/title_names.py): the vocabulary, the lookup,
and the decision for products the tagger did not type and the kNN vote refused."""
from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from autoknow_ray.modules.taxonomy.hypernym_config import TypeResolutionConfig
from autoknow_ray.modules.taxonomy.title_names import (
    TitleTypeNames, build_vocabulary, load_vocabulary, load_vocabulary_and_not_types, name_keys, pick,
    save_vocabulary,
)
from autoknow_ray.modules.taxonomy.types import ResolveTypes, TypeNames
from autoknow_ray.modules.taxonomy.infer import SPANS
from autoknow_ray.steps import WorkerEnv
from autoknow_ray.text import type_key


def test_vocabulary_keeps_catalogue_types_and_drops_attribute_values(tmp_path):
    v = build_vocabulary(["Banana Bread", "Tea"], ["Bananas", "Sunscreen", "Vitamins & Minerals",
                                                  "Green", "Tea"], ["banana", "Green", None])
    assert set(v) == {type_key("Banana Bread"), "tea", "sunscreen"}  # "&" is no word
    assert v["tea"] == "Tea"  # the catalogue's own spelling first
    save_vocabulary(v, tmp_path, "auto", not_types=["set"])
    assert load_vocabulary(tmp_path) == v
    assert load_vocabulary_and_not_types(tmp_path) == (v, frozenset({"set"}))
    assert load_vocabulary(tmp_path / "missing") == {}
    assert load_vocabulary_and_not_types(tmp_path / "missing") == ({}, frozenset())
    (tmp_path / "type_vocabulary.json").write_text('{"names": ')  # a half-written file
    with pytest.raises(ValueError, match="not a type vocabulary.*autoknow fit"):
        load_vocabulary(tmp_path)
    (tmp_path / "type_vocabulary.json").write_text('["Tea"]')
    with pytest.raises(ValueError, match="no names table"):
        load_vocabulary(tmp_path)


def test_names_outside_brand_spans_longest_first():
    vocab = build_vocabulary([], ["Banana", "Sunscreen", "Sunscreen Lotion", "Lotion", "Boat"], [])
    title = "Banana Boat Sport Sunscreen Lotion SPF 100, Banana scent"
    brand = [{"label": "Brand", "value": "Banana Boat", "start": 0, "end": 11, "score": 0.9}]
    assert name_keys(title, brand, vocab) == [type_key("Sunscreen Lotion"), "banana"]
    assert name_keys(title, [], vocab) == ["banana", "boat", type_key("Sunscreen Lotion")]
    assert name_keys(None, [], vocab) == [] and name_keys(title, [], {}) == []
    # the step: one list per row, brand spans from the tagger's own output
    batch = pa.table({"title": [title, ""], "spans": pa.array([brand, []], SPANS)})
    out = TitleTypeNames(vocab).process_batch(batch)
    assert out.column("name_keys").to_pylist() == [[type_key("Sunscreen Lotion"), "banana"], []]
    assert out.column("head_value").to_pylist() == ["Lotion", None]  # the brand masked


def test_key_type_maps_tails_and_unique_heads_to_known_types():
    names = TypeNames(["Safety Mask", "Face Mask Kit", "Coffee", "Hair Dryer", "Dryer Sheet"],
                      {"sunscreen": "Sunscreen"})
    assert names.key_type(type_key("Ground Coffee")) == "Coffee"  # a known tail
    assert names.key_type("mask") == "Safety Mask"  # the only known type ending in "mask"
    assert names.key_type("dryer") == "Hair Dryer"
    assert names.key_type("sheet") == "Dryer Sheet"
    assert names.key_type("kit") == "Face Mask Kit"
    assert names.key_type("sunscreen") == "Sunscreen"  # accepted new
    assert names.key_type("lotion") is None and names.key_type("") is None
    two = TypeNames(["Safety Mask", "Sleep Mask"])
    assert two.key_type("mask") is None  # ambiguous head: no answer


def test_categories_are_named_by_no_title_and_joined_names_not_by_their_last_word():
    from autoknow_ray.modules.taxonomy.types import unsold_types

    children = {"Hair Care": {"Shampoo & Conditioner"}, "Shampoo & Conditioner": set(),
                "Beverages": {"Tea", "Coffee"}, "Tea": set(), "Coffee": set(), "Shoes": {"Boots"},
                "Boots": set(), "Safety Mask": set(), "Adjustable Punch": set()}
    types = list(children)
    # a name joining kinds is not named by its last word: the title's "Conditioner" names one
    # of its kinds, a type the taxonomy lacks (its leaf withheld), not the node
    plain = TypeNames(types)
    assert plain.key_type("conditioner") is None
    assert plain.key_type("mask") == "Safety Mask"  # a compound's head names it
    # … also where its modifier joins words ("Bread & Butter" modifies "Plate")
    assert TypeNames(["Bread & Butter Plate", "Food, Beverages & Tobacco"]).key_type(type_key("Plate")) == "Bread & Butter Plate"
    assert TypeNames(["Bread & Butter Plate", "Food, Beverages & Tobacco"]).key_type(type_key("Tobacco")) is None
    assert plain.key_type(type_key("Shampoo & Conditioner")) == "Shampoo & Conditioner"  # its whole name does
    assert plain.key_type(type_key("Beverages")) == "Beverages"  # nothing known of products: as before
    # nothing known of which nodes carry products: no node is a category
    assert unsold_types(types, set()) == frozenset()
    # fit's titles carry tea, coffee, shoes (an inner node that products carry stays a type) and
    # safety masks; "Hair Care" and "Beverages" group types and carry none: categories
    unsold = unsold_types(types, {"Tea", "Coffee", "shoes", "Safety Mask"})
    assert unsold == frozenset({"Hair Care", "Shampoo & Conditioner", "Beverages", "Boots",
                                "Adjustable Punch"})
    names = TypeNames(types, unsold=unsold, children=children)
    assert names.categories == frozenset({"Hair Care", "Beverages"})
    assert names.key_type(type_key("Hair Care")) is None and names.span_type("Beverages") is None
    # a leaf no fit product carried is still a type (a blind catalogue's taxonomy lists it)
    assert names.key_type("punch") == "Adjustable Punch" and names.key_type(type_key("Boots")) == "Boots"
    assert names.key_type("tea") == "Tea"
    assert names.canonical("hair care") == "Hair Care"  # a catalogue label still reads as written
    # once accepted from titles, the new name is what the word names
    assert TypeNames(types, {"conditioner": "Conditioner"}, unsold, children).key_type("conditioner") == "Conditioner"


def test_pick_prefers_support_then_length():
    resolve = {"sunscreen": "Sunscreen", "cream": "Cream", "sunscreen cream": "Sunscreen"}.get
    assert pick(["cream", "sunscreen"], resolve, {"sunscreen": 9, "cream": 2}) == ("sunscreen", "Sunscreen")
    assert pick(["cream", "sunscreen cream"], resolve, {}) == ("sunscreen cream", "Sunscreen")
    assert pick(["lotion"], resolve, {"lotion": 50}) is None
    assert pick([], resolve, {}) is None


def _batch(titles, keys, vecs):
    n = len(titles)
    v = np.asarray(vecs, np.float16)
    return pa.table({
        "product_id": [f"p{i}" for i in range(n)],
        "product_type": pa.array([None] * n, pa.string()),
        "span_value": pa.array([None] * n, pa.string()),
        "span_score": pa.array([None] * n, pa.float32()),
        "spans": pa.array([[] for _ in range(n)], SPANS),
        "name_keys": pa.array(keys, pa.list_(pa.string())),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1]),
    })


def test_refused_products_take_the_name_their_title_writes():
    # a reference of two known types far from the queries: the kNN vote refuses them
    ref = pl.DataFrame({"product_id": ["r0", "r1", "r2", "r3"], "ref_type": ["Coffee", "Coffee", "Tea", "Tea"],
                        "from_catalogue": [True] * 4,
                        "embedding": [[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.0, 1.0, 0.0], [0.1, 0.99, 0.0]]})
    names = TypeNames(["Coffee", "Tea", "Safety Mask"], {"sunscreen": "Sunscreen"})
    cfg = TypeResolutionConfig(knn_min_similarity=0.8, knn_min_share=0.8)
    step = ResolveTypes(cfg, names, {}, {}, ref, None, add_attributes=False, min_attribute_score=0.5,
                        name_support={"sunscreen": 5, "cream": 1, "mask": 2})
    step.setup(WorkerEnv())
    batch = _batch(["Sunscreen Cream", "KN95 Mask", "no name at all", "Coffee beans"],
                   [["sunscreen", "cream"], ["mask"], [], ["coffe"]],
                   [[0, 0, 1], [0, 0.05, 1], [0, 0.1, 1], [1, 0.02, 0]])
    out = step.process_batch(batch).to_pydict()
    assert out["type"] == ["Sunscreen", "Safety Mask", None, "Coffee"]
    assert out["type_evidence"][0].startswith("title names 'sunscreen'")
    assert out["type_confidence"][0] == cfg.title_name_confidence
    assert out["type_evidence"][2] == "knn: neighbours too far"
    assert out["type_evidence"][3].startswith("knn")  # a close, agreeing vote answers first
    # switched off: the refusals stand
    off = ResolveTypes(cfg.model_copy(update={"title_names": False}), names, {}, {}, ref, None,
                       add_attributes=False, min_attribute_score=0.5, name_support={"sunscreen": 5})
    off.setup(WorkerEnv())
    assert off.process_batch(batch).column("type").to_pylist() == [None, None, None, "Coffee"]


def test_head_word_ends_the_first_phrase_outside_brands():
    from autoknow_ray.modules.taxonomy.title_names import head_word

    assert head_word("Pleaser Men's Tempo 08 Platform Sneaker ,Black Veggie Suede,6 M US", []) == (
        "sneaker", "Sneaker")
    assert head_word("Dr. Martens unisex adult Keith Oxford, Tan, 8 US", []) == ("oxford", "Oxford")
    assert head_word("Memory Foam Slipper with Rubber Sole", []) == ("slipper", "Slipper")
    assert head_word("Acme Blue Widget - Blue", [], {"blue"}) == ("widget", "Widget")
    assert head_word("Acme Sunscreen Lotion SPF 50", []) == ("lotion", "Lotion")  # an acronym skipped
    # a possessive, a short word, a number, an attribute value: no head
    assert head_word("Kids' Carter's", []) is None
    assert head_word("HP 500-GB 1.5G 7.2K 3.5 NHP SAT Null", []) is None  # an exporter's missing field
    assert head_word("Go XL, 2 pack", []) is None
    assert head_word("1234, 5678", []) is None
    assert head_word("Acme Folic Acid 800 Mcg", []) is None  # a unit
    assert head_word("Acme Tempo Black, size 8", [], {"black"}) is None
    # … or a phrase ending in a run of words that is one ("Sugar Free" is a claim, "Free" no type)
    claims = {type_key("Sugar Free"), type_key("French Vanilla")}
    assert head_word("Acme Cafe French Vanilla Sugar Free (8 pack)", [], claims) is None
    assert head_word("Acme Sugar Free Gum", [], claims) == ("gum", "Gum")
    assert head_word("Acme Free", [], claims) == (type_key("Free"), "Free")
    # the brand's own words are not the head
    brand = [{"label": "Brand", "value": "Banana Boat", "start": 0, "end": 11, "score": 0.9}]
    assert head_word("Banana Boat", brand) is None
    assert head_word(None, []) is None


def test_refused_products_take_a_supported_head_word():
    ref = pl.DataFrame({"product_id": ["r0", "r1", "r2", "r3"], "ref_type": ["Coffee", "Coffee", "Tea", "Tea"],
                        "from_catalogue": [True] * 4,
                        "embedding": [[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.0, 1.0, 0.0], [0.1, 0.99, 0.0]]})
    names = TypeNames(["Coffee", "Tea"], {"sneaker": "Sneaker"})
    cfg = TypeResolutionConfig(knn_min_similarity=0.8, knn_min_share=0.8)
    step = ResolveTypes(cfg, names, {}, {}, ref, None, add_attributes=False, min_attribute_score=0.5)
    step.setup(WorkerEnv())
    batch = _batch(["Pleaser Platform Sneaker", "Greek Mountain Tea", "Acme Gizmo"],
                   [[], [], []], [[0, 0, 1], [0, 0.05, 1], [0, 0.1, 1]])
    batch = batch.append_column("head_key", pa.array(["sneaker", "tea", "gizmo"], pa.string()))
    out = step.process_batch(batch).to_pydict()
    assert out["type"] == ["Sneaker", "Tea", None]  # "gizmo" is no accepted name
    assert out["type_evidence"][0].startswith("title names 'sneaker' (head word;")
    off = ResolveTypes(cfg.model_copy(update={"title_heads": False}), names, {}, {}, ref, None,
                       add_attributes=False, min_attribute_score=0.5)
    off.setup(WorkerEnv())
    assert off.process_batch(batch).column("type").to_pylist() == [None, None, None]


def test_new_names_need_support_and_are_capped(ray_session):
    import ray

    from autoknow_ray.modules.taxonomy.stage import TaxonomyStage

    rows = ([("sunscreen", None, None, None)] * 5 + [("gizmo", None, None, None)] * 2
            + [(None, None, "sneaker", "Sneaker")] * 4 + [(None, None, "sneaker", "sneaker")]
            + [(None, None, "boot", "Boot")] * 3)
    tm = ray.data.from_arrow(pa.table({
        "product_type": pa.array([None] * len(rows), pa.string()),
        "span_key": pa.array([None] * len(rows), pa.string()),
        "name_keys": pa.array([[r[0]] if r[0] else [] for r in rows], pa.list_(pa.string())),
        "head_key": pa.array([r[2] for r in rows], pa.string()),
        "head_value": pa.array([r[3] for r in rows], pa.string()),
    }))
    # a typed product's words count for nothing
    typed = ray.data.from_arrow(pa.table({
        "product_type": ["Tea"] * 9, "span_key": pa.array([None] * 9, pa.string()),
        "name_keys": pa.array([["gizmo"]] * 9, pa.list_(pa.string())),
        "head_key": pa.array(["gizmo"] * 9, pa.string()), "head_value": ["Gizmo"] * 9}))
    names = TypeNames(["Tea"])
    vocab = {"sunscreen": "Sunscreen", "gizmo": "Gizmo"}
    cfg = TypeResolutionConfig(min_support=3)
    support, new = TaxonomyStage._title_name_support(tm.union(typed), names, vocab, {}, cfg, False, 1)
    assert support == {"sunscreen": 5, "gizmo": 2}
    assert new == {"sunscreen": "Sunscreen", "sneaker": "Sneaker", "boot": "Boot"}
    capped = TaxonomyStage._title_name_support(tm, names, vocab, {}, cfg.model_copy(
        update={"max_title_types": 2}), True, 1)[1]
    assert capped == {"sunscreen": "sunscreen", "sneaker": "sneaker"}  # the best supported, lower-cased


def test_attribute_free_keys_skip_words_inside_attribute_spans():
    from autoknow_ray.modules.taxonomy.title_names import attribute_free_keys

    title = "Hanes Reusable Face Mask, White / Cream"
    spans = [{"label": "Color", "value": "White / Cream", "start": 26, "end": 39, "score": 0.9},
             {"label": "type", "value": "Face Mask", "start": 15, "end": 24, "score": 0.9}]
    keys = name_keys(title, [], frozenset(type_key(x) for x in ("mask", "cream", "face mask")))
    assert set(keys) == {type_key("face mask"), type_key("cream")}
    assert attribute_free_keys(title, spans, keys) == [type_key("face mask")]  # type spans hide none
    assert attribute_free_keys(title, [], keys) == keys
    assert attribute_free_keys(title, spans, []) == []


def test_a_known_vote_gives_way_to_a_new_name_its_types_titles_never_write():
    """Titles of lures sit nearest fishing rods (fit's only fishing type): the vote answers
    Fishing Rod with confidence. A title naming the accepted new type "Lure", which no fit
    title of fishing rods writes, takes Lure; not where the word is inside an attribute span,
    where the rods' titles write it too, where the title also names the voted type, or where
    the voted type has fewer reference titles than the vote's k."""
    ref = pl.DataFrame({"product_id": [f"r{i}" for i in range(4)], "ref_type": ["Fishing Rod"] * 4,
                        "from_catalogue": [True] * 4,
                        "embedding": [[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.98, 0.0, 0.1], [0.97, 0.1, 0.1]]})
    lure, rod = type_key("lure"), type_key("fishing rod")
    names = TypeNames(["Fishing Rod", "Tea"], {lure: "Lure"})
    cfg = TypeResolutionConfig(knn_k=3, knn_min_similarity=0.5, knn_min_share=0.5)
    written = {"Fishing Rod": frozenset({rod, type_key("reel")})}

    def run(keys, free, written=written, cfg=cfg):
        step = ResolveTypes(cfg, names, {}, {}, ref, None, add_attributes=False, min_attribute_score=0.5,
                            name_support={lure: 9}, names_written=written)
        step.setup(WorkerEnv())
        batch = _batch(["t"] * len(keys), keys, [[1.0, 0.05, 0.05]] * len(keys))
        batch = batch.append_column("free_name_keys", pa.array(free, pa.list_(pa.string())))
        return step.process_batch(batch).to_pydict()

    out = run([[lure], [lure], [rod, lure], []], [[lure], [], [rod, lure], []])
    assert out["type"] == ["Lure", "Fishing Rod", "Fishing Rod", "Fishing Rod"]
    assert out["type_evidence"][0].startswith(f"title names '{lure}' (fit's titles of 'Fishing Rod' seldom write it")
    assert out["type_status"][0] == "added" and out["type_confidence"][0] == cfg.title_name_confidence
    # the rods' own titles write "lure": no conflict
    assert run([[lure]], [[lure]], {"Fishing Rod": frozenset({lure})})["type"] == ["Fishing Rod"]
    # a type without enough reference titles is not in the table: no conflict
    assert run([[lure]], [[lure]], {})["type"] == ["Fishing Rod"]
    # switched off
    off = cfg.model_copy(update={"new_name_overrides_vote": False})
    assert run([[lure]], [[lure]], cfg=off)["type"] == ["Fishing Rod"]


def test_the_taggers_known_type_gives_way_to_a_new_name_its_types_titles_do_not_write():
    """`new_name_overrides_tagger`: the tagger reads "Shorts" in "… Swimwear Swimming Pants
    Briefs Shorts", and the title also names the accepted new type Swimwear outside its
    attribute spans, which fit's shorts titles do not write: Swimwear. Off by default; the
    tagger's type stands where the new name sits in an attribute span, where the shorts' titles
    write it, or where the tagger's type is itself a new type."""
    ref = pl.DataFrame({"product_id": [f"r{i}" for i in range(4)], "ref_type": ["Shorts"] * 4,
                        "from_catalogue": [True] * 4,
                        "embedding": [[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.98, 0.0, 0.1], [0.97, 0.1, 0.1]]})
    swim, shorts, lure = type_key("swimwear"), type_key("shorts"), type_key("lure")
    names = TypeNames(["Shorts", "Tea"], {swim: "Swimwear", lure: "Lure"})
    on = TypeResolutionConfig(knn_k=3, knn_min_similarity=0.5, knn_min_share=0.5,
                              new_name_overrides_tagger=True)
    written = {"Shorts": frozenset({shorts, type_key("board")})}

    def run(spans, keys, free, cfg=on, written=written):
        step = ResolveTypes(cfg, names, {}, {}, ref, None, add_attributes=False, min_attribute_score=0.5,
                            name_support={swim: 9, lure: 4}, names_written=written)
        step.setup(WorkerEnv())
        batch = _batch(["t"] * len(keys), keys, [[1.0, 0.05, 0.05]] * len(keys))
        batch = batch.set_column(batch.schema.get_field_index("span_value"), "span_value",
                                 pa.array(spans, pa.string()))
        batch = batch.set_column(batch.schema.get_field_index("span_score"), "span_score",
                                 pa.array([0.9] * len(keys), pa.float32()))
        batch = batch.append_column("free_name_keys", pa.array(free, pa.list_(pa.string())))
        return step.process_batch(batch).to_pydict()

    out = run(["Shorts", "Shorts", "Shorts"], [[swim, shorts], [swim, shorts], [shorts]],
              [[swim, shorts], [shorts], [shorts]])
    assert out["type"] == ["Swimwear", "Shorts", "Shorts"]
    assert out["type_evidence"][0] == (f"title names '{swim}' (fit's titles of 'Shorts' seldom write it; "
                                       "tagger read 'Shorts')")
    assert out["type_evidence"][1] == "tagger"
    # the shorts' own titles write "swimwear": the tagger's type stands
    assert run(["Shorts"], [[swim, shorts]], [[swim, shorts]],
               written={"Shorts": frozenset({swim, shorts})})["type"] == ["Shorts"]
    # the tagger read a new type: no second guess
    got = run(["Lure"], [[lure, swim]], [[lure, swim]])
    assert got["type"] == ["Lure"] and got["type_evidence"] == ["tagger:new"]
    # off (the default): the tagger's type stands
    off = on.model_copy(update={"new_name_overrides_tagger": False})
    assert TypeResolutionConfig().new_name_overrides_tagger is False
    assert run(["Shorts"], [[swim, shorts]], [[swim, shorts]], cfg=off)["type"] == ["Shorts"]


def test_names_written_by_each_known_type_in_fits_reference(tmp_path):
    import json

    from autoknow_ray.modules.taxonomy.stage import names_written_by_type

    titles = ["Ugly Stik Fishing Rod", "Spinning Fishing Rod and Reel Combo", "Telescopic Rod",
              "Green Tea Bags", "Earl Grey Tea"]
    (tmp_path / "type_reference.json").write_text(json.dumps(
        {"types": ["Fishing Rod"] * 3 + ["Tea"] * 2, "titles": titles}))
    vocab = {type_key(x): x for x in ("Fishing Rod", "Reel", "Tea", "Lure", "Bags")}
    names = TypeNames(["Fishing Rod", "Tea"])
    got = names_written_by_type(tmp_path, vocab, names, 3)
    assert got == {"Fishing Rod": frozenset({type_key("Fishing Rod"), type_key("Reel")})}  # Tea: 2 titles
    assert set(names_written_by_type(tmp_path, vocab, names, 2)["Tea"]) == {type_key("Tea"), type_key("Bags")}
    assert names_written_by_type(tmp_path / "none", vocab, names, 1) == {}
    # a name written by at most `share` of a type's titles is not its: one rod title of three
    # names a reel (1/3), every one the rod itself
    assert names_written_by_type(tmp_path, vocab, names, 3, share=0.34) == {
        "Fishing Rod": frozenset({type_key("Fishing Rod")})}
    assert names_written_by_type(tmp_path, vocab, names, 3, share=0.33)["Fishing Rod"] == frozenset(
        {type_key("Fishing Rod"), type_key("Reel")})


def test_catalogue_labels_reach_the_driver_capped_taxonomy_labels_first(ray_session):
    import ray

    from autoknow_ray.modules.taxonomy.stage import TaxonomyStage

    labels = ["Tea"] * 2 + ["Gizmo"] * 5 + ["Widget"] * 3 + ["Rare label"] + [None]
    tm = ray.data.from_arrow(pa.table({"product_type": pa.array(labels, pa.string())}))
    got = TaxonomyStage._type_counts(tm, {"tea"}, 2, 1)
    # the taxonomy's label first however rare, then the 2 most used others; the rest counted
    assert got.rows["product_type"].to_list() == ["Tea", "Gizmo", "Widget"]
    assert got.rows["n"].to_list() == [2, 5, 3]
    assert (got.keys, got.left_out) == (4, 1)
