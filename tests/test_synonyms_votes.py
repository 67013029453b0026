"""The canonical vote (modules/synonyms/transfer.py): what the fit catalogue's own duplicate
listings normalised, as a pair feature for terms fit never saw.

A catalogue that lists each processor twice, once as written ("Zeon K5430") and once under its
series ("Server Series"), teaches that a new "Zeon K7777" belongs under "Server Series": neither
its string nor its sentence vector says so, its nearest fit terms do."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from autoknow_ray.modules.synonyms import transfer
from autoknow_ray.modules.synonyms.distant import colisted_pairs


def _rows(listings: list[tuple[str, str, list[str]]]) -> pl.DataFrame:
    """(title, attribute, values) listings -> (title_key, kind, attribute, term) rows."""
    return pl.DataFrame([(t, "value", a, v) for t, a, vs in listings for v in vs],
                        schema=["title_key", "kind", "attribute", "term"], orient="row")


def test_a_terms_canonical_is_its_most_written_direct_partner_never_a_chain():
    rows = _rows([
        ("t1", "CPU", ["Zeon K5430", "Server Series"]),
        ("t2", "CPU", ["Zeon K5520", "Server Series"]),
        ("t3", "CPU", ["Server Series"]),
        # a messy listing links the series to a desktop chip: "Server Series" stays its own
        # canonical (written most), and the desktop chip's canonical is the series it was listed
        # with, while "Optix M200" is not pulled through it to "Server Series"
        ("t4", "CPU", ["Server Series", "Optix M100"]),
        ("t5", "CPU", ["Optix M100", "Optix M200"]),
        ("t6", "Color", ["Red", "Crimson"]),  # one listing each: ties go to the larger string
    ])
    table = transfer.canonical_table(rows, colisted_pairs(list(rows.iter_rows())), 100, 0)
    canon = {(a, t): c for _, a, t, c in table.iter_rows()}
    assert canon[("CPU", "Zeon K5430")] == canon[("CPU", "Zeon K5520")] == "Server Series"
    assert canon[("CPU", "Server Series")] == "Server Series"
    assert canon[("CPU", "Optix M100")] == "Server Series"
    assert canon[("CPU", "Optix M200")] == "Optix M100"  # its direct partner, not the chain's end
    assert canon[("Color", "Crimson")] == canon[("Color", "Red")] == "Red"
    capped = transfer.canonical_table(rows, colisted_pairs(list(rows.iter_rows())), 3, 0)
    assert capped.height == 3


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_a_pairs_vote_is_what_other_fit_terms_near_it_were_normalised_to():
    table = pl.DataFrame({"kind": ["value"] * 5, "attribute": ["CPU"] * 5,
                          "term": ["Zeon K1", "Zeon K2", "Zeon K3", "Server Series", "Optix M1"],
                          "canonical": ["Server Series"] * 4 + ["Desktop Series"]})
    rng = np.random.default_rng(0)
    server, desktop = rng.standard_normal(16), rng.standard_normal(16)
    vec = {t: _unit((server if t.startswith("Zeon") else desktop) + 0.05 * rng.standard_normal(16))
           for t in ["Zeon K1", "Zeon K2", "Zeon K3", "Zeon K9", "Optix M1", "Optix M9"]}
    vec["Server Series"] = _unit(rng.standard_normal(16))  # the series name itself looks like neither
    vec["Desktop Series"] = _unit(rng.standard_normal(16))
    votes = transfer.CanonicalVotes(table, np.stack([vec[t] for t in table["term"]]), k=3)
    a = ["Zeon K9", "Zeon K9", "Server Series", "Zeon K1", "Zeon K9"]
    b = ["Server Series", "Desktop Series", "Zeon K9", "Server Series", "Optix M9"]
    attrs = ["CPU", "CPU", "CPU", "CPU", "Color"]
    v = votes.pair_votes(["value"] * 5, attrs, a, b, np.stack([vec[x] for x in a]),
                         np.stack([vec[x] for x in b]))
    # three fit neighbours of the new chip went to the series: the vote is their mean cosine
    assert v[0] > 0.9
    assert v[1] == 0.0  # none of its neighbours went to the desktop series
    assert v[2] == pytest.approx(v[0])  # either way round
    # a pair's own terms never vote for it: "Zeon K1" alone cannot carry its own pair, only the
    # two other chips do (2 of k = 3 places)
    assert 0.55 < v[3] < 0.7
    assert v[4] == 0.0  # no fit term of that attribute


def test_fit_and_the_stage_score_the_same_vote(tmp_path):
    """The table ships with the model (safetensors vectors) and loads back to the same votes."""
    table = pl.DataFrame({"kind": ["value"] * 3, "attribute": ["CPU"] * 3,
                          "term": ["Zeon K1", "Zeon K2", "Server Series"],
                          "canonical": ["Server Series"] * 3})
    vectors = _unit(np.random.default_rng(1).standard_normal((3, 8)))
    transfer.save(tmp_path, table, vectors)
    loaded = transfer.load(tmp_path, 2)
    assert loaded is not None and len(loaded) == 3
    q = _unit(np.random.default_rng(2).standard_normal((1, 8)))
    args = (["value"], ["CPU"], ["Zeon K7"], ["Server Series"], q, vectors[2:3])
    assert loaded.pair_votes(*args)[0] == transfer.CanonicalVotes(table, vectors, 2).pair_votes(*args)[0]
    assert transfer.load(tmp_path / "none", 2) is None


def test_a_pairs_vote_does_not_depend_on_the_terms_scored_beside_it(monkeypatch):
    """The vote is part of a pair's cached score's key (`rebuild --previous`): the same pair
    gets the same bits whether its terms' similarities are computed alone or in a block."""
    rng = np.random.default_rng(3)
    n = 500
    table = pl.DataFrame({"kind": ["value"] * n, "attribute": ["A"] * n,
                          "term": [f"t{i}" for i in range(n)], "canonical": [f"t{i % 9}" for i in range(n)]})
    votes = transfer.CanonicalVotes(table, _unit(rng.standard_normal((n, 64))), k=5)
    m = 300
    a, b = [f"q{i}" for i in range(m)], [f"t{i % 9}" for i in range(m)]
    va, vb = _unit(rng.standard_normal((m, 64))), _unit(rng.standard_normal((m, 64)))
    together = votes.pair_votes(["value"] * m, ["A"] * m, a, b, va, vb)
    assert (together > 0).any()
    monkeypatch.setattr(transfer, "CHUNK", 1)
    alone = np.array([votes.pair_votes(["value"], ["A"], [a[i]], [b[i]], va[i:i + 1], vb[i:i + 1])[0]
                      for i in range(m)])
    assert np.array_equal(alone, together)


def test_equal_cosines_are_taken_in_the_tables_order():
    """An uncased encoder gives "Black" and "black" one vector: of fit terms at the same cosine,
    the vote takes them in the table's row order, never in whatever order a partial sort leaves."""
    n = 40
    same = _unit(np.ones(8))
    vectors = np.stack([same] * n)
    table = pl.DataFrame({"kind": ["value"] * n, "attribute": ["Color"] * n,
                          "term": [f"t{i:02d}" for i in range(n)],
                          "canonical": ["Black" if i < 3 else "Grey" for i in range(n)]})
    votes = transfer.CanonicalVotes(table, vectors, k=3)
    v = votes.pair_votes(["value"] * 2, ["Color"] * 2, ["new", "new"], ["Black", "Grey"],
                         np.stack([same, same]), np.stack([same, same]))
    assert v[0] == pytest.approx(1.0) and v[1] == 0.0  # the first three rows, all "Black"
