"""A new type is named by what most of its titles write, once the spread has given it its titles
(modules/taxonomy/type_naming.py)."""
from __future__ import annotations

import random

import polars as pl
import pyarrow as pa

from autoknow_ray.modules.taxonomy.type_naming import (
    blocked_words, name_new_types, renamed, renamed_candidates)
from autoknow_ray.schema import HAS_TYPE
from autoknow_ray.text import type_key


def _lures(n: int, rng: random.Random) -> list[str]:
    brands = ["SEAPESCA", "FISH KING", "MEREKING", "ALLBLUE"]
    kinds = ["Crankbait", "Spinner", "Soft Worm", "Minnow", "Popper"]
    return [f"{rng.choice(brands)} {rng.choice(kinds)} Fishing {rng.choice(['Lure', 'Lures'])} "
            f"{rng.randint(30, 120)}mm" + (" Hard Bait" if i % 3 == 0 else " Women")
            + (" Vivid 3D Eyes" if i % 6 == 0 else "") for i in range(n)]


def _catalogue(seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    return {
        # a new type found by a stray span ("Eyes") and given lure titles by the spread
        "Eyes": _lures(60, rng),
        # a new type whose titles write its name
        "Swimwear": [f"Women {rng.choice(['Bikini', 'One Piece'])} Swimwear Summer {i}" for i in range(40)],
        # known types: rods that sometimes come with a lure, shirts for women
        "Fishing Rod": ["Carbon Fishing Rod 2.1m" + (" with Lure" if i % 3 == 0 else "") for i in range(60)],
        "Shirts": [f"Women Cotton Shirt {rng.choice(['Red', 'Blue'])}" for _ in range(80)],
    }


RESERVED = {type_key(t) for t in ("Fishing Rod", "Shirts", "Fishing", "Clothing")}


def test_a_new_type_whose_titles_seldom_write_its_name_takes_the_phrase_they_do():
    titles = _catalogue()
    got = name_new_types(titles, {"Eyes", "Swimwear"}, reserved=RESERVED)
    # every lure title writes "lure(s)" (and "fishing lure": the shorter phrase first), one in
    # six "eyes", a third "hard bait"; "fishing" is a taxonomy node's name
    assert got.rename == {"Eyes": got.rename["Eyes"]} and got.kept == 1
    assert type_key(got.rename["Eyes"]) == type_key("Lure")
    assert got.shares["Eyes"]["old_share"] < 0.5 <= got.shares["Eyes"]["share"] == 1.0
    # a phrase the other types' titles write as often is no name: with every lure title writing
    # "women", the rods' and shirts' titles writing it too keep its lift under the floor
    women = {**titles, "Eyes": [x.replace("Fishing Lures", "Women").replace("Fishing Lure", "Women")
                                for x in titles["Eyes"]]}
    got = name_new_types(women, {"Eyes"}, reserved=RESERVED, min_lift=4.0)
    assert "Eyes" not in got.rename and got.no_phrase == 1
    # the surface its titles write most often, title-cased where they write it in lower case
    lower = {**titles, "Eyes": [x.replace("Lures", "lure").replace("Lure", "lure") for x in titles["Eyes"]]}
    assert name_new_types(lower, {"Eyes"}, reserved=RESERVED).rename == {"Eyes": "Lure"}


def test_no_name_is_read_inside_an_attribute_span_nor_taken_from_another_type():
    titles = _catalogue(1)
    # "Lure" read as a Material span in every lure title: no name is read there; "fishing lure"
    # goes with it, and no other phrase is written by half the titles and stands out
    blocked = {"Eyes": [blocked_words([{"relation": "Material", "object": "Lures"},
                                       {"relation": HAS_TYPE, "object": "Eyes"}]) for _ in titles["Eyes"]]}
    got = name_new_types(titles, {"Eyes", "Swimwear"}, reserved=RESERVED, blocked=blocked)
    assert got.rename == {} and got.no_phrase == 1
    # a type whose name, or a variant's, most of its titles write keeps it
    titles["Fishing Lures"] = titles.pop("Eyes")
    kept = name_new_types(titles, {"Fishing Lures", "Swimwear"}, reserved=RESERVED)
    assert kept.rename == {} and kept.kept == 2
    titles["Eyes"] = titles.pop("Fishing Lures")
    by_variant = name_new_types(titles, {"Eyes", "Swimwear"}, {"Eyes": ["Lures"]}, reserved=RESERVED)
    assert by_variant.rename == {} and by_variant.kept == 2
    # a type whose titles each write one of its names (no one name by half of them) keeps them
    shoes = {**titles, "Eyes": [x.replace("Fishing Lures", "Sneaker" if i % 2 else "Oxford")
                                  .replace("Fishing Lure", "Sneaker" if i % 2 else "Oxford")
                                  for i, x in enumerate(titles["Eyes"])]}
    union = name_new_types(shoes, {"Eyes"}, {"Eyes": ["Sneaker", "Oxford"]}, reserved=RESERVED)
    assert union.rename == {} and union.kept == 1
    # a phrase that names no type in fit's vocabulary is no name ("Hard Bait" and "Lure" are
    # written, only "Lure" is a type name)
    vocab = {type_key(t) for t in ("Lures", "Shirts", "Swimwear", "Boots")}
    assert name_new_types(titles, {"Eyes"}, reserved=RESERVED, type_names=vocab).rename["Eyes"] in ("Lure", "Lures")
    none = name_new_types(titles, {"Eyes"}, reserved=RESERVED, type_names={type_key("Boots")})
    assert none.rename == {} and none.no_phrase == 1
    # too few titles: not judged
    few = name_new_types({**titles, "Eyes": titles["Eyes"][:5]}, {"Eyes"}, reserved=RESERVED)
    assert few.rename == {} and few.too_few_titles == 1
    # another new type's name is never taken: "Lure" is one, so the next phrase is
    other = name_new_types(titles, {"Eyes", "Lure", "Swimwear"}, reserved=RESERVED)
    assert "Eyes" not in other.rename or type_key(other.rename["Eyes"]) != type_key("Lure")


def test_renaming_rewrites_a_products_type_edit_and_candidates_and_the_new_type_table():
    edits_type = pa.list_(pa.struct([("subject", pa.string()), ("relation", pa.string()),
                                     ("object", pa.string()), ("evidence", pa.string())]))
    ranked_type = pa.list_(pa.struct([("type", pa.string()), ("score", pa.float32()),
                                      ("rank", pa.int32())]))
    batch = pa.table({
        "product_id": ["a", "b", "c"],
        "type": ["Eyes", "Shirts", None],
        "type_evidence": ["knn k=10 share=0.73", "tagger", None],
        "edits": pa.array([[{"subject": "a", "relation": HAS_TYPE, "object": "Eyes", "evidence": "knn"},
                            {"subject": "a", "relation": "Color", "object": "Eyes", "evidence": "tagger"}],
                           [{"subject": "b", "relation": HAS_TYPE, "object": "Shirts", "evidence": "t"}],
                           []], edits_type),
        "ranked": pa.array([[{"type": "Eyes", "score": 0.7, "rank": 1},
                             {"type": "Fishing Rod", "score": 0.3, "rank": 2}],
                            [{"type": "Shirts", "score": 1.0, "rank": 1}],
                            [{"type": "Eyes", "score": 0.4, "rank": 1}]], ranked_type)})
    out = renamed(batch, {"Eyes": "Lure"})
    assert out.schema == batch.schema
    assert out.column("type").to_pylist() == ["Lure", "Shirts", None]
    assert "named 'Lure'" in out.column("type_evidence")[0].as_py()
    edits = out.column("edits").to_pylist()
    assert [e["object"] for e in edits[0]] == ["Lure", "Eyes"]  # only the type edit
    assert edits[1] == batch.column("edits").to_pylist()[1]
    assert [[r["type"] for r in rs] for rs in out.column("ranked").to_pylist()] == \
        [["Lure", "Fishing Rod"], ["Shirts"], ["Lure"]]
    assert renamed(batch, {"Other": "X"}).equals(batch)
    cands = pl.DataFrame({"type": ["Eyes", "Swimwear"], "support": [7, 100]})
    got = renamed_candidates(cands, {"Eyes": "Lure"})
    assert got["type"].to_list() == ["Lure", "Swimwear"]
    assert got["variants"].to_list() == [["Eyes"], []]
