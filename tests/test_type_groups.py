"""New types that are variants of one type are grouped at the catalogue's own granularity
(`modules/taxonomy/type_groups.py`), and the spread pass renames their products."""
import numpy as np
import polars as pl
import pyarrow as pa

from autoknow_ray.modules.taxonomy.type_groups import (
    DEFAULT_THRESHOLD, group_new_types, merge_candidates, neighbour_counts)


def _cloud(rng, centre, n, spread=0.12):
    return centre + spread * rng.normal(size=(n, len(centre))).astype(np.float32)


def _catalogue(seed=0):
    """Known types Coffee / Tea / Soap, each its own direction; new types: Shoes, Sneaker, Oxford
    and Boot drawn around one direction (variants of one type: the names split its titles at
    random), Sunscreen around another."""
    rng = np.random.default_rng(seed)
    dim = 24
    axes = np.eye(dim, dtype=np.float32)
    known_labels, known_vecs = [], []
    for i, t in enumerate(["Coffee", "Tea", "Soap"]):
        known_labels += [t] * 40
        known_vecs.append(_cloud(rng, axes[i], 40))
    shoe_names = ["Shoes"] * 20 + ["Sneaker"] * 8 + ["Oxford"] * 6 + ["Boot"] * 3
    new_labels = shoe_names + ["Sunscreen"] * 15
    new_vecs = np.concatenate([_cloud(rng, axes[5], len(shoe_names)), _cloud(rng, axes[6], 15)])
    support = {"Shoes": 20, "Sneaker": 8, "Oxford": 6, "Boot": 3, "Sunscreen": 15}
    return new_labels, new_vecs, known_labels, np.concatenate(known_vecs), support


def test_variants_of_one_new_type_become_one_named_by_its_support():
    new_labels, new_vecs, known_labels, known_vecs, support = _catalogue()
    g = group_new_types(new_labels, new_vecs, known_labels, known_vecs, support, k=10)
    assert g.source == "known types" and g.known_types == 3
    # distinct known types send each other no neighbour slots here: the floor of one in k holds
    assert g.threshold == 0.1
    assert g.rename == {"Sneaker": "Shoes", "Oxford": "Shoes", "Boot": "Shoes"}
    assert "Sunscreen" not in g.rename and "Sunscreen" not in g.rename.values()
    assert g.variants() == {"Shoes": ["Boot", "Oxford", "Sneaker"]}


def test_distinct_new_types_stay_apart_as_distinct_known_types_do():
    """Two new types as far apart as the known ones are never merged, whatever their names."""
    rng = np.random.default_rng(1)
    axes = np.eye(24, dtype=np.float32)
    known_labels = ["A"] * 30 + ["B"] * 30
    known_vecs = np.concatenate([_cloud(rng, axes[0], 30), _cloud(rng, axes[1], 30)])
    new_labels = ["Tea"] * 12 + ["Teapot"] * 12 + ["Kettle"] * 12
    new_vecs = np.concatenate([_cloud(rng, axes[i], 12) for i in (3, 4, 5)])
    g = group_new_types(new_labels, new_vecs, known_labels, known_vecs,
                        {"Tea": 12, "Teapot": 12, "Kettle": 12}, k=8)
    assert g.rename == {}


def test_without_known_types_only_a_majority_of_slots_merges():
    new_labels, new_vecs, _kl, _kv, support = _catalogue()
    g = group_new_types(new_labels, new_vecs, [], None, support, k=10)
    assert g.source == "default" and g.threshold == DEFAULT_THRESHOLD
    # the shoe names share one cloud: after the largest ones merge, the rest follow
    assert g.rename.get("Sneaker") == "Shoes" and "Sunscreen" not in g.rename


def test_neighbour_counts_skip_the_item_itself():
    vecs = np.array([[1, 0], [1, 0.01], [0, 1], [0.01, 1]], np.float32)
    names, c = neighbour_counts(["a", "a", "b", "b"], vecs, k=1)
    assert names == ["a", "b"] and c.tolist() == [[2, 0], [0, 2]]


def test_merged_candidates_sum_support_and_keep_variant_names():
    new_labels, new_vecs, known_labels, known_vecs, support = _catalogue()
    g = group_new_types(new_labels, new_vecs, known_labels, known_vecs, support, k=10)
    cands = pl.DataFrame({
        "type": list(support), "support": list(support.values()),
        "n_products": [v + 1 for v in support.values()],
        "example_product_ids": [[f"{t}-{i}" for i in range(3)] for t in support],
        "mean_score": pl.Series([None] * len(support), dtype=pl.Float32),
    })
    out = merge_candidates(cands, g, max_examples=4)
    assert out["type"].to_list() == ["Shoes", "Sunscreen"]
    shoes = out.row(0, named=True)
    assert shoes["support"] == 37 and shoes["n_products"] == 41
    assert sorted(shoes["variants"]) == ["Boot", "Oxford", "Sneaker"]
    assert len(shoes["example_product_ids"]) == 4 and shoes["mean_score"] is None
    assert out.row(1, named=True)["variants"] == []


def test_spread_pass_renames_a_variants_products_and_their_triples():
    from autoknow_ray.index.knn_vote import TOO_FAR
    from autoknow_ray.modules.taxonomy.hypernym_config import TypeResolutionConfig
    from autoknow_ray.modules.taxonomy.types import TRIPLE, SpreadNewTypes
    from autoknow_ray.schema import HAS_TYPE
    from autoknow_ray.steps import WorkerEnv

    rng = np.random.default_rng(0)
    e = np.eye(8, dtype=np.float32)

    def near(i, n):
        return e[i] + 0.05 * rng.normal(size=(n, 8)).astype(np.float32)

    # the refused product's neighbours are split between two names of one group: one type
    ref = pl.DataFrame({"type": ["Shoes", "Sneaker", "Oxford"], "embedding": near(0, 3).tolist()})
    cfg = TypeResolutionConfig(knn_k=3, knn_min_similarity=0.8, knn_min_share=0.9)
    rename = {"Sneaker": "Shoes", "Oxford": "Shoes"}
    triple = {"subject": "p1", "relation": HAS_TYPE, "object": "Sneaker", "confidence": 0.5,
              "module": "taxonomy", "status": "added", "evidence": "title names 'sneaker'"}
    batch = pa.table({
        "product_id": ["p0", "p1"],
        "type": [None, "Sneaker"],
        "type_status": [None, "added"],
        "type_confidence": pa.array([None, 0.5], pa.float32()),
        "type_evidence": [TOO_FAR, "title names 'sneaker'"],
        "outcome": [TOO_FAR, "added"],
        "edits": pa.array([[], [triple]], pa.list_(TRIPLE)),
        "embedding": pa.array(near(0, 2).tolist(), pa.list_(pa.float32())),
    })
    for groups, want in ((rename, ["Shoes", "Shoes"]), ({}, [None, "Sneaker"])):
        step = SpreadNewTypes(cfg, {"Shoes", "Sneaker", "Oxford"}, ref, None, rename=groups)
        step.setup(WorkerEnv())
        out = step.process_batch(batch)
        assert out.column("type").to_pylist() == want
    edits = out.column("edits").to_pylist()
    assert edits[1][0]["object"] == "Sneaker"  # without groups: untouched
    step = SpreadNewTypes(cfg, {"Shoes", "Sneaker", "Oxford"}, ref, None, rename=rename)
    out = step.process_batch(batch)
    moved = out.column("edits").to_pylist()[1][0]
    assert moved["object"] == "Shoes" and "variant 'Sneaker'" in moved["evidence"]
    assert "grouped under 'Shoes'" in out.column("type_evidence").to_pylist()[1]


def test_a_group_takes_the_name_most_of_its_titles_write():
    from autoknow_ray.modules.taxonomy.type_groups import group_name

    titles = ["Reusable Face Mask, Cotton Fabric", "Disposable Face Masks 50 Pcs",
              "Dust Mask for Woodworking", "Kids Face Mask Reusable", "Bandana Cover, Fabric"]
    members = {"Fabric", "Reusable", "Dust Masks", "Safety Mask"}
    support = {"Fabric": 18, "Reusable": 7, "Dust Masks": 4, "Safety Mask": 1}
    # the members' head word is written by four of five titles; the best-supported member by two
    assert group_name(members, titles, support) == "Masks"
    # a head word that is a known type's name is no candidate
    assert group_name(members, titles, support, reserved={"mask"}) in {"Fabric", "Reusable"}
    # a longer member name ending in the best word wins where most titles write it
    titles2 = ["Tide Laundry Detergent Pods", "Gain Laundry Detergent, Fresh",
               "Detergent Sheets", "Persil Laundry Detergent Liquid"]
    assert group_name({"Detergents", "Laundry Detergent", "Fresh"}, titles2,
                      {"Detergents": 9, "Laundry Detergent": 3, "Fresh": 2}) == "Laundry Detergent"
    # without titles: the member most products took
    assert group_name(members, [], support) == "Fabric"


def test_spread_floors_answer_a_loose_new_type_and_spare_known_titles():
    """The spread vote's floors come from the rebuild's own new types: a new type whose titles
    are loosely alike (short, varied titles) is answered at a similarity the first vote's floors
    would refuse, while known-type titles with their own type withheld are not taken by it."""
    from autoknow_ray.modules.taxonomy.knn_floors import choose_spread_floors

    rng = np.random.default_rng(3)
    dim = 32
    axes = np.eye(dim, dtype=np.float32)
    known_labels = ["Coffee"] * 60 + ["Tea"] * 60 + ["Soap"] * 60
    known_vecs = np.concatenate([_cloud(rng, axes[i], 60, spread=0.08) for i in range(3)])
    new_labels = ["Shoes"] * 80 + ["Vitamin"] * 80
    new_vecs = np.concatenate([_cloud(rng, axes[5], 80, spread=0.3), _cloud(rng, axes[6], 80, spread=0.3)])
    f = choose_spread_floors(new_labels, new_vecs, known_labels, known_vecs, k=10, seed=0)
    assert "skipped" not in f and f["new_types"] == 2 and f["known_types"] == 3
    assert f["new_answered_right"] > 0.8 and f["known_taken"] <= 0.1 and f["new_forced"] <= 0.1
    assert f["new_answered_right"] - f["new_forced"] - f["known_taken"] > 0.7
    # the loose new types' titles sit at cosines a 0.6 floor refuses: the choice is below it
    x = new_vecs[:80] / np.linalg.norm(new_vecs[:80], axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -1)
    assert np.median(s.max(axis=1)) < 0.6 and f["knn_min_similarity"] < np.median(s.max(axis=1))
    assert "skipped" in choose_spread_floors(["A"], new_vecs[:1], known_labels, known_vecs)


def test_spread_floors_refuse_where_new_and_known_titles_mix():
    """A new type drawn from the same cloud as a known type: answering it would take the known
    type's refused titles as often as it answers its own, so the floors answer little."""
    from autoknow_ray.modules.taxonomy.knn_floors import choose_spread_floors

    rng = np.random.default_rng(4)
    axes = np.eye(32, dtype=np.float32)
    known_labels = ["Coffee"] * 60 + ["Tea"] * 60
    known_vecs = np.concatenate([_cloud(rng, axes[0], 60, spread=0.1), _cloud(rng, axes[1], 60, spread=0.1)])
    new_labels = ["Espresso"] * 60
    new_vecs = _cloud(rng, axes[0], 60, spread=0.1)  # Coffee's own cloud
    f = choose_spread_floors(new_labels, new_vecs, known_labels, known_vecs, k=10, seed=0)
    # whatever the floors, what the vote gains it takes from the known type: little net worth
    assert f["new_answered_right"] - f["new_forced"] - f["known_taken"] < 0.3


def test_second_vote_among_this_catalogues_own_typed_titles():
    """A refused product far from fit's reference of its known type, but among this catalogue's
    own products of that type, takes it under the first vote's floors; one near nothing stays
    refused; a new type's answer still goes through the spread floors."""
    from autoknow_ray.index.knn_vote import TOO_FAR
    from autoknow_ray.modules.taxonomy.hypernym_config import TypeResolutionConfig
    from autoknow_ray.modules.taxonomy.types import SECOND_VOTE, SPREAD, TRIPLE, SpreadNewTypes
    from autoknow_ray.steps import WorkerEnv

    rng = np.random.default_rng(0)
    e = np.eye(8, dtype=np.float32)

    def near(i, n):
        return e[i] + 0.05 * rng.normal(size=(n, 8)).astype(np.float32)

    ref = pl.DataFrame({"type": ["Shoes"] * 3, "embedding": near(0, 3).tolist()})
    fit_reference = (["Coffee"] * 3, near(1, 3))  # fit's coffee titles: direction 1
    own = pl.DataFrame({"type": ["Coffee"] * 3, "embedding": near(2, 3).tolist()})  # this catalogue's
    cfg = TypeResolutionConfig(knn_k=3, knn_min_similarity=0.8, knn_min_share=0.6)
    batch = pa.table({
        "product_id": ["p0", "p1", "p2"],
        "type": [None, None, None],
        "type_status": [None, None, None],
        "type_confidence": pa.array([None, None, None], pa.float32()),
        "type_evidence": [TOO_FAR] * 3,
        "outcome": [TOO_FAR] * 3,
        "edits": pa.array([[], [], []], pa.list_(TRIPLE)),
        "embedding": pa.array(np.concatenate([near(2, 1), near(0, 1), e[5:6]]).tolist(),
                              pa.list_(pa.float32())),
    })
    without = SpreadNewTypes(cfg, {"Shoes"}, ref, fit_reference)
    without.setup(WorkerEnv())
    assert without.process_batch(batch).column("type").to_pylist() == [None, "Shoes", None]
    step = SpreadNewTypes(cfg, {"Shoes"}, ref, fit_reference, own_known=own, known_floors=(0.8, 0.6))
    step.setup(WorkerEnv())
    out = step.process_batch(batch)
    assert out.column("type").to_pylist() == ["Coffee", "Shoes", None]
    assert out.column("outcome").to_pylist() == [SECOND_VOTE, SPREAD, TOO_FAR]
    assert "this catalogue's titles" in out.column("type_evidence").to_pylist()[0]
    # the first vote's floors hold for a known answer: stricter ones refuse it
    strict = SpreadNewTypes(cfg, {"Shoes"}, ref, fit_reference, own_known=own, known_floors=(0.999, 0.6))
    strict.setup(WorkerEnv())
    assert strict.process_batch(batch).column("type").to_pylist()[0] is None


def test_second_vote_floors_answer_loose_known_titles_and_spare_new_types():
    """The second vote's floors come from this catalogue's typed titles, each voting as a refused
    product would (its own type's titles at or above the refusing floor removed): this
    catalogue's known-type titles, loosely alike, are answered with their type at a similarity
    below the first vote's floor, while new types' titles are not pulled into a known type."""
    from autoknow_ray.modules.taxonomy.knn_floors import choose_second_vote_floors

    rng = np.random.default_rng(5)
    axes = np.eye(32, dtype=np.float32)
    own_labels = ["Coffee"] * 60 + ["Soap"] * 60
    own_vecs = np.concatenate([_cloud(rng, axes[0], 60, spread=0.3), _cloud(rng, axes[1], 60, spread=0.3)])
    fit_labels = ["Coffee"] * 40 + ["Soap"] * 40
    fit_vecs = np.concatenate([_cloud(rng, axes[0], 40, spread=0.1), _cloud(rng, axes[1], 40, spread=0.1)])
    new_labels = ["Shoes"] * 60 + ["Vitamin"] * 60
    new_vecs = np.concatenate([_cloud(rng, axes[5], 60, spread=0.3), _cloud(rng, axes[6], 60, spread=0.3)])
    f = choose_second_vote_floors(own_labels, own_vecs, new_labels, new_vecs, fit_labels, fit_vecs,
                                  (0.6, 0.6), k=10, seed=0)
    assert "skipped" not in f and f["known_types"] == 2 and f["new_types"] == 2
    assert f["known_answered_right"] > 0.8
    assert f["new_forced_known"] <= 0.05 and f["known_answered_wrong"] <= 0.05
    assert f["knn_min_similarity"] < 0.6  # below the floor that refused them
    assert f["known_answered_right"] - f["known_answered_wrong"] - f["new_forced_known"] > 0.75
    # without a new type of two titles there is nothing to weigh the known answers against
    assert "skipped" in choose_second_vote_floors(own_labels, own_vecs, ["Shoes"], new_vecs[:1],
                                                  fit_labels, fit_vecs, (0.6, 0.6))


def test_second_vote_floors_refuse_where_a_new_type_sits_in_a_known_types_cloud():
    """A new type drawn from a known type's own cloud: whatever the second vote answers there it
    pulls the new type's refused titles into the known type about as often, so the choice's net
    worth (right - wrong - forced) is small, where separate clouds give most of it."""
    from autoknow_ray.modules.taxonomy.knn_floors import choose_second_vote_floors

    rng = np.random.default_rng(6)
    axes = np.eye(32, dtype=np.float32)
    own_labels = ["Coffee"] * 60
    own_vecs = _cloud(rng, axes[0], 60, spread=0.3)
    new_labels = ["Espresso"] * 60
    new_vecs = _cloud(rng, axes[0], 60, spread=0.3)  # Coffee's own cloud
    f = choose_second_vote_floors(own_labels, own_vecs, new_labels, new_vecs, ["Coffee"] * 40,
                                  _cloud(rng, axes[0], 40, spread=0.1), (0.6, 0.6), k=10, seed=0)
    assert f["known_answered_right"] - f["known_answered_wrong"] - f["new_forced_known"] < 0.3
    assert f["new_forced_known"] > 0.5  # the simulation sees the pull


def test_chunked_second_vote_equals_the_whole_similarity_matrix():
    """The second vote's floors score their voters a chunk at a time (the driver's largest arrays
    in the taxonomy stage): each voter's best label, share and nearest cosine equal those of the
    whole voters x references matrix, over more voters than one chunk."""
    import numpy as np

    from autoknow_ray.modules.taxonomy import knn_floors as kf

    rng = np.random.default_rng(4)
    n, d = 3 * kf.VOTE_CHUNK + 17, 16
    vectors = rng.standard_normal((n, d)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = rng.integers(0, 12, n)
    voters = np.sort(rng.choice(n, 2 * kf.VOTE_CHUNK + 5, replace=False))
    cut = np.where(voters < n // 2, 0.2, 0.4)
    sims = vectors[voters] @ vectors.T
    sims[np.arange(len(voters)), voters] = -np.inf
    sims[(labels[voters][:, None] == labels[None, :]) & (sims >= cut[:, None])] = -np.inf
    want = kf._votes(sims, labels, 7)
    got = kf._chunked_votes(vectors, labels, voters, 7, cut)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert len(set(want[0].tolist())) > 3  # the votes are not all one label
