"""Type resolution and the hypernym classifier on toy data (real MiniLM encoder, CPU, tiny)."""
import json

import polars as pl
import pytest
import torch

import numpy as np
import pyarrow as pa
from pydantic import ValidationError

from autoknow_ray.index.knn_vote import NO_AGREEMENT, TOO_FAR, LabelIndex, knn_vote
from autoknow_ray.modules.taxonomy.hypernym import FEATURES, HypernymClassifier
from autoknow_ray.modules.taxonomy.hypernym_config import HypernymConfig, TypeResolutionConfig
from autoknow_ray.modules.taxonomy.infer import SPANS
from autoknow_ray.modules.taxonomy.types import (
    BestTypeSpan,
    ResolveTypes,
    TypeNames,
    accept_candidates,
    ancestors_map,
    lower_case_taxonomy,
    orphan_types,
    taxonomy_maps,
    type_key,
)
from autoknow_ray.steps import WorkerEnv

torch.set_num_threads(2)

# a 2-level toy taxonomy: department → category, products under categories
TREE = {
    "fruit": ["apple", "banana", "orange", "strawberry", "grape", "pear"],
    "vegetable": ["carrot", "broccoli", "spinach", "potato", "onion", "lettuce"],
    "dairy": ["milk", "cheese", "yogurt", "butter", "cream"],
    "bakery": ["bread", "bagel", "croissant", "muffin"],
}
TITLES = {
    "apple": ["Organic Gala Apples 3 lb Bag", "Honeycrisp Apple", "Granny Smith Apples"],
    "banana": ["Organic Bananas Bunch", "Banana Single", "Baby Bananas"],
    "orange": ["Navel Oranges 4 lb", "Blood Orange", "Mandarin Oranges Bag"],
    "strawberry": ["Fresh Strawberries 1 lb", "Organic Strawberries"],
    "grape": ["Red Seedless Grapes", "Green Grapes Bag"],
    "pear": ["Bartlett Pears", "Anjou Pear"],
    "carrot": ["Organic Carrots 2 lb", "Baby Carrots Snack Pack", "Rainbow Carrots"],
    "broccoli": ["Broccoli Crowns", "Organic Broccoli Florets"],
    "spinach": ["Baby Spinach 5 oz", "Organic Spinach Bunch"],
    "potato": ["Russet Potatoes 5 lb", "Yukon Gold Potatoes"],
    "onion": ["Yellow Onions 3 lb", "Red Onion"],
    "lettuce": ["Romaine Lettuce Hearts", "Iceberg Lettuce"],
    "milk": ["Whole Milk Gallon", "2% Reduced Fat Milk", "Organic Skim Milk"],
    "cheese": ["Sharp Cheddar Cheese Block", "Shredded Mozzarella Cheese"],
    "yogurt": ["Greek Yogurt Plain", "Strawberry Yogurt Cups"],
    "butter": ["Unsalted Butter Sticks", "Salted Sweet Cream Butter"],
    "cream": ["Heavy Whipping Cream", "Half and Half Cream"],
    "bread": ["Whole Wheat Sandwich Bread", "Sourdough Bread Loaf"],
    "bagel": ["Everything Bagels 6 ct", "Plain Bagels"],
    "croissant": ["Butter Croissants 4 pack"],
    "muffin": ["Blueberry Muffins", "English Muffins"],
}
# held out: new types to attach (name + product titles)
HELD_OUT = {
    "blueberry": ("fruit", ["Fresh Blueberries Pint", "Organic Blueberries 6 oz"]),
    "cucumber": ("vegetable", ["English Cucumber", "Mini Cucumbers Bag"]),
    "kefir": ("dairy", ["Plain Whole Milk Kefir", "Low Fat Kefir Cultured Milk"]),
}


@pytest.fixture(scope="module")
def encoder():
    from autoknow_ray.nn.encoder import TextEncoder

    return TextEncoder(device="cpu")


def _taxonomy(extra_rows=()):
    rows = [{"type": d, "parent": None} for d in TREE]
    rows += [{"type": c, "parent": d} for d, cs in TREE.items() for c in cs]
    rows += list(extra_rows)
    return pl.DataFrame(rows, schema={"type": pl.String, "parent": pl.String})


def _products():
    rows = []
    for t, titles in TITLES.items():
        for j, title in enumerate(titles):
            rows.append({"product_id": f"{t}-{j}", "title": title, "product_type": t})
    return pl.DataFrame(rows)


# ---- type resolution ---------------------------------------------------------------------------
def test_type_key_folds_case_space_and_plurals():
    assert type_key("  Ice   Creams ") == type_key("ice cream")
    assert type_key("Berries") == type_key("berry")
    assert type_key("Tomatoes") == type_key("tomato")
    assert type_key("Cookies") == type_key("cookie")
    assert type_key("hummus") == "hummus"


def test_resolve_types_statuses(encoder):
    base = _products()  # 47 typed products (reference for kNN)
    # 30 products under test
    P = []  # (id, title, catalogue type, span value, span score)
    P += [(f"k{i}", t, "apple", "Apples", 0.95) for i, t in enumerate(["Fuji Apples", "Pink Lady Apples", "Apple Gala"])]
    P += [(f"n{i}", t, "carrot", None, None) for i, t in enumerate(["Carrot Sticks", "Shredded Carrots"])]
    P += [(f"a{i}", t, None, "Bananas", 0.9) for i, t in enumerate(["Ripe Bananas", "Banana Bunch Organic", "Plantain Bananas"])]
    P += [("c0", "Greek Yogurt Vanilla 32 oz", "carrot", "Yogurt", 0.97)]  # contradicted: corrected
    P += [("c1", "Cheddar Cheese Slices", "butter", "cheese", 0.5)]  # weak span: kept
    P += [("c2", "Strawberry Yogurt", "yogurt", "strawberry", 0.95)]  # title fits the old type: kept
    P += [(f"m{i}", t, None, "Kombucha", 0.92) for i, t in enumerate(
        ["Ginger Kombucha", "Kombucha Raspberry", "Original Kombucha Tea", "Kombucha Lemon"])]  # new type
    P += [("r0", "Fresh Durian Whole Fruit", None, "Durian", 0.9)]  # rare candidate → kNN
    P += [(f"z{i}", t, None, "Zorbex", 0.35) for i, t in enumerate(
        ["Zorbex Baby Spinach Salad", "Zorbex Spinach Leaves", "Zorbex Organic Spinach"])]  # noisy → kNN
    P += [(f"f{i}", t, None, None, None) for i, t in enumerate(
        ["Fresh Baby Spinach 10 oz", "Sliced White Bread", "Low Fat Milk Half Gallon", "Navel Oranges Large",
         "Russet Potato Bag", "Yellow Onion Sweet", "Iceberg Lettuce Head", "Bartlett Pear Fresh",
         "Plain Bagel 4 ct", "Blueberry Muffin Top", "Salted Butter"])]  # no span → kNN
    assert len(P) == 30
    test = pl.DataFrame(
        [{"product_id": p, "title": t, "product_type": c} for p, t, c, _, _ in P],
        schema={"product_id": pl.String, "title": pl.String, "product_type": pl.String},
    )
    products = pl.concat([base, test])
    tags = pl.DataFrame(
        [{"product_id": p, "label": "type", "value": v, "start": 0, "end": len(v), "score": s}
         for p, _, _, v, s in P if v is not None]
        + [{"product_id": "k0", "label": "Brand", "value": "Fuji", "start": 0, "end": 4, "score": 0.99}],
        schema={"product_id": pl.String, "label": pl.String, "value": pl.String,
                "start": pl.Int32, "end": pl.Int32, "score": pl.Float32},
    )
    # the vote's floors off: 46 types of 2-3 titles each cannot give one type a large share
    cfg = TypeResolutionConfig(min_support=3, min_score=0.6, knn_min_similarity=-1, knn_min_share=0)
    types, cands = _resolve(products, tags, _taxonomy(), cfg, encoder)
    got = {r["product_id"]: r for r in types.to_pylist()}

    assert got["k0"]["type_status"] == "kept" and got["k0"]["type"] == "apple"
    assert got["n0"]["type_status"] == "kept" and got["n0"]["type_evidence"] == "catalogue"
    assert got["a0"]["type_status"] == "added" and got["a0"]["type"] == "banana"  # plural folded
    assert got["c0"]["type_status"] == "corrected" and got["c0"]["type"] == "yogurt"
    assert got["c1"]["type_status"] == "kept" and got["c1"]["type"] == "butter"
    assert got["c2"]["type_status"] == "kept" and got["c2"]["type"] == "yogurt"
    assert {got[f"m{i}"]["type"] for i in range(4)} == {"kombucha"}  # the taxonomy is lower case
    assert got["m0"]["type_evidence"] == "tagger:new"
    assert cands.get_column("type").to_list() == ["kombucha"]
    row = cands.row(0, named=True)
    assert row["support"] == 4 and row["mean_score"] > 0.9
    # rare and noisy candidates fall back to kNN, like products without a span
    for pid in ["z0", "f0", "f1", "f2"]:
        assert got[pid]["type_status"] == "added" and got[pid]["type_evidence"].startswith("knn")
        assert 0 < got[pid]["type_confidence"] <= 1
    assert got["z0"]["type"] == "spinach" and got["f0"]["type"] == "spinach"
    assert got["f1"]["type"] == "bread" and got["f2"]["type"] == "milk"
    # with the floors on, a vote that cannot answer leaves the product untyped, with its reason
    strict = cfg.model_copy(update={"knn_min_similarity": 0.6, "knn_min_share": 0.5})
    floored = {r["product_id"]: r for r in _resolve(products, tags, _taxonomy(), strict, encoder)[0].to_pylist()}
    knn = [p for p, r in got.items() if (r["type_evidence"] or "").startswith("knn")]
    assert knn and all(floored[p]["type_status"] in ("added", None) for p in knn)
    dropped = [p for p in knn if floored[p]["type_status"] is None]
    assert dropped and all(floored[p]["type"] is None for p in dropped)
    assert {floored[p]["type_evidence"] for p in dropped} <= {TOO_FAR, NO_AGREEMENT}
    for p in knn:
        if floored[p]["type_status"] == "added":
            assert floored[p]["type_confidence"] >= 0.5
    assert got["r0"]["type_status"] == "added"
    # the graph edits: has_type for added and corrected, the removed catalogue type, the spans
    edits = [e for r in types.to_pylist() for e in r["edits"]]
    c0 = [e for e in edits if e["subject"] == "c0"]
    assert {(e["object"], e["status"]) for e in c0} == {("yogurt", "corrected"), ("carrot", "removed")}
    assert not [e for e in edits if e["subject"] == "k0" and e["relation"] == "has_type"]
    assert {(e["relation"], e["object"], e["evidence"]) for e in edits if e["subject"] == "k0"} == {
        ("Brand", "Fuji", "title[0:4]")}


def _resolve(products: pl.DataFrame, tags: pl.DataFrame, taxonomy: pl.DataFrame, cfg, encoder):
    """Both passes of the stage in one process: best spans, candidates, then the decisions."""
    spans = {p: [] for p in products["product_id"].to_list()}
    for r in tags.iter_rows(named=True):
        spans[r["product_id"]].append({k: r[k] for k in ("label", "value", "start", "end", "score")})
    vecs = encoder.encode(products["title"].to_list()).astype(np.float16)
    batch = pa.table({
        "product_id": products["product_id"].to_list(),
        "product_type": products["product_type"].to_list(),
        "spans": pa.array([spans[p] for p in products["product_id"].to_list()], SPANS),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), vecs.shape[1]),
    })
    parents, _ = taxonomy_maps(taxonomy)
    names = TypeNames(list(parents))
    batch = BestTypeSpan(set(names.known), cfg.min_span_score).process_batch(batch)
    first = pl.from_arrow(batch.select(["span_key", "span_value", "span_score", "span_new"]))
    surfaces = first.filter(pl.col("span_new")).group_by("span_key", "span_value").agg(
        pl.len().alias("n"), pl.col("span_score").sum().alias("score_sum"))
    acc = accept_candidates(surfaces, cfg, lower_case_taxonomy(taxonomy["type"].to_list()))
    names = TypeNames(list(parents), dict(acc.select("key", "type").iter_rows()))
    ref = [(p, names.first_pass(o, s), names.catalogue(o) is not None, v)
           for p, o, s, v in zip(products["product_id"].to_list(), products["product_type"].to_list(),
                                 first["span_value"].to_list(), vecs.tolist())]
    reference = pl.DataFrame([r for r in ref if r[1] is not None], orient="row",
                             schema=["product_id", "ref_type", "from_catalogue", "embedding"])
    type_names = sorted(set(names.known.values()) | set(names.accepted.values()))
    step = ResolveTypes(cfg, names, ancestors_map(parents), dict(zip(type_names, encoder.encode(type_names))),
                        reference, None, add_attributes=True, min_attribute_score=0.5)
    step.setup(WorkerEnv())
    return step.process_batch(batch), acc


def test_knn_vote_answers_only_close_and_agreeing_neighbours():
    ref = np.asarray([[1, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0, 0.98, 0.2]], np.float32)
    index = LabelIndex(ref, ["a", "a", "b", "c"])
    queries = np.asarray([[1, 0.05, 0], [0, 0, 1], [0, 1, 0.1]], np.float32)
    close, far, split = knn_vote(index, queries, k=2, min_similarity=0.5, min_share=0.6)
    assert close.label == "a" and close.share == 1.0 and close.reason is None
    assert far.label is None and far.reason == TOO_FAR
    assert split.label is None and split.reason == NO_AGREEMENT and [t for t, _ in split.ranked] == ["b", "c"]
    # the same neighbours with the floors off: an answer
    assert knn_vote(index, queries[1:], k=2)[0].label is not None


def test_orphans_are_parentless_childless_untyped():
    tax = _taxonomy([{"type": "kombucha", "parent": None}, {"type": "snacks", "parent": None}])
    assert orphan_types(tax, {"snacks"}) == ["kombucha"]
    assert orphan_types(tax) == ["kombucha", "snacks"]


# ---- hypernym classifier -----------------------------------------------------------------------
def test_hypernym_fit_predict_save_load(encoder, tmp_path):
    cfg = HypernymConfig(epochs=30, product_edges=40, candidate_k=8, neighbor_k=10, seed=0)
    tax = _taxonomy()
    products = _products()
    copurchase = pl.DataFrame({"src": ["milk-0", "cheese-0"], "dst": ["cheese-1", "butter-0"], "count": [3, 2]})
    clf = HypernymClassifier(cfg).fit(tax, products, None, copurchase, encoder)
    assert clf.train_stats["type_edges"] == 21 and clf.train_stats["product_edges"] == 40

    children = pl.DataFrame({
        "type": list(HELD_OUT) + ["sourdough loaf"],
        "titles": [HELD_OUT[k][1] for k in HELD_OUT] + [[]],
    })
    pred = clf.predict(children)
    assert set(pred.columns) == {"type", "parent", "score", "rank", "accepted"}
    top1 = {r["type"]: r["parent"] for r in pred.filter(pl.col("rank") == 1).iter_rows(named=True)}
    parents_of: dict[str, set] = {}
    for t, p in tax.drop_nulls("parent").select("type", "parent").iter_rows():
        parents_of.setdefault(t, set()).add(p)
    top3 = {}
    for t, p in pred.filter(pl.col("rank") <= 3).select("type", "parent").iter_rows():
        top3.setdefault(t, []).append(p)
    leaves = {c for cs in TREE.values() for c in cs}  # product types with no type under them
    for child, (parent, _) in HELD_OUT.items():
        # a new product type goes under its department, never under a sibling product type
        assert top1[child] == parent, (child, pred.filter(pl.col("type") == child))
        assert not set(pred.filter((pl.col("type") == child) & pl.col("accepted"))["parent"]) & leaves
    assert top1["sourdough loaf"] in ("bread", "bakery")  # name only: an orphan-like child
    per_child = pred.group_by("type").len()
    assert per_child.get_column("len").min() >= cfg.keep_top_k
    assert pred.filter(pl.col("rank") == 1).get_column("accepted").all()

    # a product → its category (fine attachment, not only the top level)
    prod_child = clf.predict(pl.DataFrame({"type": ["p-new"], "name": ["Organic Red Grapes 2 lb"],
                                           "titles": [["Organic Red Grapes 2 lb"]]}), kind="product")
    assert prod_child.filter(pl.col("rank") == 1).get_column("parent").item() == "grape"

    # artifact: safetensors + json only, same predictions after load
    clf.save(tmp_path / "hyp")
    assert sorted(p.name for p in (tmp_path / "hyp").iterdir()) == ["config.json", "model.safetensors"]
    conf = json.loads((tmp_path / "hyp" / "config.json").read_text())
    assert conf["features"] == FEATURES and len(conf["mean"]) == len(FEATURES)
    back = HypernymClassifier.load(tmp_path / "hyp")
    with pytest.raises(RuntimeError):
        back.predict(children)
    pred2 = back.predict(children, taxonomy=tax, products=products, copurchase=copurchase, encoder=encoder)
    assert pred2.select("type", "parent", "rank").equals(pred.select("type", "parent", "rank"))

    # the stage's context: title vectors from the workers instead of titles, a sample of the
    # products (every other one) and the whole catalogue's per-type counts and vector sums
    vecs = encoder.encode(products["title"].to_list())
    with_vecs = products.drop("title").with_columns(pl.Series("embedding", vecs))
    types = products["product_type"].to_list()
    stats = pl.DataFrame(
        [{"type": t, "n": types.count(t), "sum": vecs[[x == t for x in types]].sum(0).tolist()}
         for t in sorted(set(types))],
        schema={"type": pl.String, "n": pl.Int64, "sum": pl.List(pl.Float64)})
    pred3 = back.predict(children, taxonomy=tax, products=with_vecs.gather_every(2), copurchase=copurchase,
                         encoder=encoder, type_stats=stats)
    top1_sampled = {r["type"]: r["parent"] for r in pred3.filter(pl.col("rank") == 1).iter_rows(named=True)}
    assert sum(top1_sampled[c] == top1[c] for c in top1) >= len(top1) - 1


def test_prefer_specific_parent(encoder):
    # "kefir" near both "milk" (a category) and "dairy" (its ancestor): never both accepted
    cfg = HypernymConfig(epochs=20, product_edges=30, candidate_k=8, neighbor_k=10, multi_parent_threshold=0.0)
    clf = HypernymClassifier(cfg).fit(_taxonomy(), _products(), None, None, encoder)
    pred = clf.predict(["kefir"])
    acc = pred.filter(pl.col("accepted")).get_column("parent").to_list()
    anc = {c: d for d, cs in TREE.items() for c in cs}
    assert not any(anc.get(a) in acc for a in acc)  # no accepted type has its parent accepted


def test_knn_floors_follow_the_rebuilt_catalogues_share_of_known_type_products():
    """Fit keeps its whole grid and the nearest-neighbour cosines of known- and withheld-type
    votes; a rebuild estimates which share of its untyped titles look known and takes the floors
    for that share: lower where nearly all are of known types, higher where most are new."""
    from autoknow_ray.modules.taxonomy import knn_floors

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(8, 32))
    types = [f"t{t}" for t in range(8) for _ in range(30)]
    # overlapping types: the fit's balanced choice refuses some known-type titles
    vecs = np.array([centres[int(t[1])] + 1.2 * rng.normal(size=32) for t in types])
    f = knn_floors.choose_floors(types, vecs, k=10)
    assert len(f["grid"]) == len(knn_floors.SIMILARITY_GRID) * len(knn_floors.SHARE_GRID)
    assert set(knn_floors.REBUILD_KEYS) <= set(f)  # what a rebuild needs before it re-chooses
    hk, hw = np.array(f["nearest_known"]), np.array(f["nearest_withheld"])
    assert abs(hk.sum() - 1) < 1e-6 and abs(hw.sum() - 1) < 1e-6
    # known titles have closer neighbours than titles whose whole type is withheld
    mid = (np.asarray(knn_floors.NEAREST_BINS[:-1]) + 0.025)
    assert hk @ mid > hw @ mid
    # the mixture share is recovered from a histogram mixed at 0.8, and clipped into [0, 1]
    assert abs(knn_floors.known_share(list(0.8 * hk + 0.2 * hw), f["nearest_known"],
                                      f["nearest_withheld"]) - 0.8) < 1e-6
    assert knn_floors.known_share(f["nearest_known"], f["nearest_known"], f["nearest_withheld"]) == 1.0
    assert knn_floors.known_share(list(hk), list(hk), list(hk)) == 0.5  # no evidence either way
    # at a share of 0.5 the rebuild's choice is fit's own
    half = knn_floors.floors_for(f, 0.5)
    assert (half["knn_min_similarity"], half["knn_min_share"]) == (f["knn_min_similarity"],
                                                                   f["knn_min_share"])
    known, new = knn_floors.floors_for(f, 0.95), knn_floors.floors_for(f, 0.05)
    assert known["known_answered_right"] >= half["known_answered_right"] >= new["known_answered_right"]
    assert known["withheld_forced"] >= half["withheld_forced"] >= new["withheld_forced"]
    assert known["known_answered_right"] > new["known_answered_right"]


def test_config_rejects_unknown_keys():
    with pytest.raises(ValidationError, match="epochz"):
        HypernymConfig(epochz=3)
    with pytest.raises(ValidationError, match="min_suport"):
        TypeResolutionConfig(min_suport=3)


def test_knn_floors_chosen_on_known_against_withheld_types(tmp_path):
    """Fit's validation of the kNN vote: tight, well-separated types give floors that answer
    known-type titles and refuse titles whose type is withheld; the stage's settings take them
    unless the config sets its own."""
    from autoknow_ray.modules.taxonomy import knn_floors
    from autoknow_ray.modules.taxonomy.stage import resolved_floors

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 32))
    types = [f"t{t}" for t in range(6) for _ in range(40)]
    vecs = np.array([centres[int(t[1])] + 0.4 * rng.normal(size=32) for t in types])
    f = knn_floors.choose_floors(types, vecs, k=10)
    assert f["known_answered_right"] > 0.95 and f["withheld_forced"] < 0.05, f
    assert f["knn_min_similarity"] > 0.5  # the withheld types' nearest titles are far
    # loose, overlapping types: the floors still refuse most withheld-type votes
    loose = np.array([centres[int(t[1])] + 3.0 * rng.normal(size=32) for t in types])
    g = knn_floors.choose_floors(types, loose, k=10)
    assert g["withheld_forced"] <= g["known_answered_right"]
    assert "skipped" in knn_floors.choose_floors(["a", "a", "b", "b"], vecs[:4])
    # a long tail: 60 types of one title each beside the six. They cannot be answered right, so
    # they count as withheld-type votes only and do not drown the known types' side
    tail = rng.normal(size=(60, 32)) * 2.0
    h = knn_floors.choose_floors(types + [f"s{i}" for i in range(60)], np.vstack([vecs, tail]), k=10)
    assert h["known_answered_right"] > 0.95 and h["withheld_forced"] < 0.1, h

    knn_floors.save(f, tmp_path)
    cfg = TypeResolutionConfig()  # shipped: the fit's choice
    assert cfg.knn_min_similarity is None and cfg.knn_min_share is None
    got = resolved_floors(cfg, tmp_path)
    assert (got.knn_min_similarity, got.knn_min_share) == (f["knn_min_similarity"], f["knn_min_share"])
    own = resolved_floors(cfg.model_copy(update={"knn_min_share": 0.9}), tmp_path)
    assert own.knn_min_share == 0.9 and own.knn_min_similarity == f["knn_min_similarity"]
    none = resolved_floors(cfg, tmp_path / "absent")
    assert none.knn_min_similarity is not None and none.knn_min_share is not None


def test_refused_products_near_a_new_types_products_take_it():
    """The third pass: a product the kNN vote refused takes a new type where its nearest titles
    are that new type's products; one nearest to a known type's titles, or to nothing, stays
    untyped; a resolved product is left as it is."""
    from autoknow_ray.index.knn_vote import TOO_FAR
    from autoknow_ray.modules.taxonomy.types import SPREAD, TRIPLE, TYPE_COLUMNS, SpreadNewTypes

    rng = np.random.default_rng(0)
    e = np.eye(8, dtype=np.float32)

    def near(i, n):
        return e[i] + 0.05 * rng.normal(size=(n, 8)).astype(np.float32)

    ref = pl.DataFrame({"type": ["Sneaker"] * 3, "embedding": near(0, 3).tolist()})
    cfg = TypeResolutionConfig(knn_k=3, knn_min_similarity=0.8, knn_min_share=0.6)
    step = SpreadNewTypes(cfg, {"Sneaker"}, ref, (["Coffee"] * 3, near(1, 3)))
    step.setup(WorkerEnv())
    vecs = np.concatenate([near(0, 1), near(1, 1), near(0, 1), e[2:3]])
    batch = pa.table({
        "product_id": ["p0", "p1", "p2", "p3"],
        "type": [None, None, "Tea", None],
        "type_status": [None, None, "kept", None],
        "type_confidence": pa.array([None, None, 1.0, None], pa.float32()),
        "type_evidence": [TOO_FAR, TOO_FAR, "catalogue", TOO_FAR],
        "outcome": [TOO_FAR, TOO_FAR, "kept", TOO_FAR],
        "edits": pa.array([[], [], [], []], pa.list_(TRIPLE)),
        "embedding": pa.array(vecs.tolist(), pa.list_(pa.float32())),
    })
    out = step.process_batch(batch)
    assert out.column("type").to_pylist() == ["Sneaker", None, "Tea", None]
    assert out.column("outcome").to_pylist() == [SPREAD, TOO_FAR, "kept", TOO_FAR]
    assert out.column("type_evidence").to_pylist()[0].startswith("knn new type")
    assert [t["object"] for t in out.column("edits").to_pylist()[0]] == ["Sneaker"]
    assert out.column("edits").to_pylist()[1:] == [[], [], []]
    assert set(TYPE_COLUMNS) <= set(out.column_names) and out.num_rows == 4


def test_adjacent_type_spans_that_name_no_known_type_are_read_as_one_type_phrase():
    """"Power" and "Steering Fluid" read as two type spans are one type, "Power Steering Fluid"
    (scored as its weakest part); a run with a known type among its parts, and spans apart in
    the title, stay as the tagger read them."""
    from autoknow_ray.modules.taxonomy.types import joined_type_spans

    def sp(value, start, score, label="type"):
        return {"label": label, "value": value, "start": start, "end": start + len(value), "score": score}

    known = frozenset({type_key("Shoes"), type_key("Fluid")})
    title = "Piden Power Steering Fluid | 6 Pack"
    spans = [sp("Piden", 0, 0.9, "Brand"), sp("Power", 6, 0.8), sp("Steering Fluid", 12, 0.6)]
    got = joined_type_spans(spans, known)
    assert got == [{"label": "type", "value": "Power Steering Fluid", "start": 6, "end": 26, "score": 0.6}]
    assert title[got[0]["start"]:got[0]["end"]] == "Power Steering Fluid"
    # a known type among the parts: left as read
    work = [sp("Work", 0, 0.7), sp("Shoes", 5, 0.9)]
    assert joined_type_spans(work, known) == work
    # apart in the title (a word between): not one phrase
    apart = [sp("Power", 0, 0.8), sp("Fluid Pump", 15, 0.7)]
    assert joined_type_spans(apart, frozenset()) == apart
    batch = pa.table({"product_id": ["p1"], "spans": pa.array([spans], SPANS)})
    out = BestTypeSpan(set(known), 0.3).process_batch(batch).to_pylist()[0]
    assert out["span_value"] == "Power Steering Fluid" and out["span_new"]
    assert out["mention_keys"] == [type_key("Power Steering Fluid")]


def test_a_type_span_the_title_continues_with_a_known_types_name_is_widened_over_it():
    """"Herbal" read as the type of "Herbal Tea | 12 Pack" is the modifier of a finer type: the
    span takes in the known type's name that follows it after spaces ("Herbal Tea"), up to three
    words; not across punctuation, not over another span, not from a span that is a known type."""
    from autoknow_ray.modules.taxonomy.types import extended_type_spans

    def sp(value, start, label="type"):
        return {"label": label, "value": value, "start": start, "end": start + len(value), "score": 0.9}

    known = frozenset(type_key(t) for t in ("Tea", "Pen", "Steering Fluid"))

    def widened(title, spans):
        return [s["value"] for s in extended_type_spans(title, spans, known)]

    assert widened("Bodorver Original Herbal Tea | 12 Pack", [sp("Herbal", 18)]) == ["Herbal Tea"]
    assert widened("Tover Ballpoint Pen - Assorted", [sp("Ballpoint", 6)]) == ["Ballpoint Pen"]
    assert widened("Alpi Power Steering Fluid 1 qt", [sp("Power", 5)]) == ["Power Steering Fluid"]
    assert widened("Herbal | Tea", [sp("Herbal", 0)]) == ["Herbal"]  # punctuation between
    assert widened("Herbal Tea", [sp("Herbal", 0), sp("Tea", 7, "Flavor")]) == ["Herbal", "Tea"]
    assert widened("Green Tea Bags", [sp("Tea", 6)]) == ["Tea"]  # already a known type
    batch = pa.table({"product_id": ["p1"], "title": ["Bodorver Original Herbal Tea | 12 Pack"],
                      "spans": pa.array([[sp("Herbal", 18)]], SPANS)})
    out = BestTypeSpan(set(known), 0.3).process_batch(batch).to_pylist()[0]
    assert out["span_value"] == "Herbal Tea" and out["span_new"]


def test_the_monotone_scorer_never_lowers_a_candidate_for_more_evidence():
    """`HypernymConfig.model: monotone`: raising the share of a child's neighbours under a
    candidate (any MONOTONE_FEATURES) never lowers the pair's score, whatever the weights; the
    other features may act either way."""
    from autoknow_ray.modules.taxonomy.hypernym import F, MONOTONE_FEATURES, _new_model

    torch.manual_seed(0)
    model = _new_model("monotone", 16)
    for p in model.parameters():  # weights far from any trained state, of both signs
        torch.nn.init.normal_(p, std=1.0)
    X = torch.randn(300, len(FEATURES))
    with torch.no_grad():
        base = model(X)
        for f in MONOTONE_FEATURES:
            up = X.clone()
            up[:, F[f]] += torch.rand(300) * 3
            assert bool((model(up) >= base - 1e-5).all()), f
        lowered = 0
        for f in (f for f in FEATURES if f not in MONOTONE_FEATURES):
            up = X.clone()
            up[:, F[f]] += 3
            lowered += int((model(up) < base - 1e-3).sum())
    assert lowered > 0  # the other features are free: the constraint is not a constant model
    free = _new_model("mlp", 16)
    for p in free.parameters():
        torch.nn.init.normal_(p, std=1.0)
    with torch.no_grad():  # the unconstrained MLP with such weights does lower some scores
        up = X.clone()
        up[:, F["prod_parent_vote"]] += 3
        assert bool((free(up) < free(X) - 1e-3).any())


@pytest.mark.parametrize("kind", ["monotone", "pair"])
def test_a_placement_model_saves_and_loads_as_the_kind_it_is(encoder, tmp_path, kind):
    cfg = HypernymConfig(epochs=5, product_edges=20, candidate_k=8, neighbor_k=10, model=kind,
                         calibration_folds=0)
    clf = HypernymClassifier(cfg).fit(_taxonomy(), _products(), None, None, encoder)
    pred = clf.predict(["kefir", "cucumber"])
    clf.save(tmp_path / "hyp")
    back = HypernymClassifier.load(tmp_path / "hyp")
    assert back.cfg.model == kind and type(back.model) is type(clf.model)
    again = back.predict(["kefir", "cucumber"], taxonomy=_taxonomy(), products=_products(), encoder=encoder)
    assert again.select("type", "parent", "rank", "score").equals(pred.select("type", "parent", "rank", "score"))
    if kind == "pair":  # the pair scores by the mean of its two models' logits
        x = torch.randn(7, len(FEATURES))
        with torch.no_grad():
            assert torch.allclose(back.model(x), (back.model.free(x) + back.model.monotone(x)) / 2)


def test_a_placement_model_saved_before_the_setting_loads_as_the_unconstrained_mlp(encoder, tmp_path):
    from autoknow_ray.modules.taxonomy.hypernym import _MLP

    plain = HypernymClassifier(HypernymConfig(epochs=3, product_edges=20, candidate_k=8, neighbor_k=10,
                                              model="mlp", calibration_folds=0)
                               ).fit(_taxonomy(), _products(), None, None, encoder)
    plain.save(tmp_path / "old")
    conf = json.loads((tmp_path / "old" / "config.json").read_text())
    del conf["config"]["model"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(conf))
    back = HypernymClassifier.load(tmp_path / "old")
    assert back.cfg.model == "mlp" and isinstance(back.model, _MLP)
    # a config that names another kind than its weights: a clear error, not torch's key list
    conf["config"]["model"] = "pair"
    (tmp_path / "old" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="fit the models again"):
        HypernymClassifier.load(tmp_path / "old")
