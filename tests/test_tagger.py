"""Title tagger: distant supervision, BIO alignment, a tiny training run, the Ray Data actor."""
from __future__ import annotations

import itertools
import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from autoknow_ray.modules.taxonomy.config import TaggerConfig
from autoknow_ray.modules.taxonomy import type_names
from autoknow_ray.modules.taxonomy.distant import (build_examples, single_valued_labels, swap_types,
                                                   type_variants)
from autoknow_ray.nn.encoder import load_tokenizer, resolve_encoder
from autoknow_ray.nn.tagger import (
    SpanTagger,
    align_round_trip,
    allowed_transitions,
    bio_tags,
    span_prf,
    tags_to_word_spans,
    viterbi,
)
from autoknow_ray.schema import TAGS

torch.set_num_threads(2)

ATTR = pl.List(pl.Struct({"name": pl.String, "value": pl.String}))
SCHEMA = {"product_id": pl.String, "title": pl.String, "product_type": pl.String,
          "attributes": ATTR}


def _products(rows):
    return pl.DataFrame(
        {
            "product_id": [str(i) for i in range(len(rows))],
            "title": [r[0] for r in rows],
            "product_type": [r[1] for r in rows],
            "attributes": [[{"name": n, "value": v} for n, v in r[2]] for r in rows],
        },
        schema=SCHEMA,
    )


# ---- distant supervision ---------------------------------------------------------------------
def test_type_variants():
    assert type_variants("Shoes") == ["Shoes", "Shoe"]
    assert type_variants("Safety Mask") == ["Safety Mask", "Safety Masks"]
    assert type_variants("Battery") == ["Battery", "Batteries"]
    assert type_variants("Toothbrush") == ["Toothbrush", "Toothbrushes"]


def test_distant_spans_longest_first_word_boundaries_plurals():
    rows = [
        # type in plural, value with different case and spacing, longest match wins
        ("ACME Tea Bags, green  tea, 20 Count", "Tea Bag",
         [("Brand", "acme"), ("Flavor", "Green Tea"), ("Count", "20 count")]),
        # "Tea" must not match inside "Teapot"; "Red" inside "Redwood" neither
        ("Redwood Teapot Classic", "Tea", [("Brand", "Redwood"), ("Color", "Red")]),
        # nested value: "Ice Cream" (type) vs Flavor "Black Cherry Ice Cream" → the longer one
        ("Black Cherry Ice Cream 1 pint", "Ice Cream",
         [("Flavor", "Black Cherry Ice Cream"), ("Count", "1 pint")]),
        ("no match here at all", "Shoes", [("Brand", "Zeta")]),
        ("Zeta Runner Shoe", "Shoes", [("Brand", "Zeta"), ("Rare", "Runner")]),
    ]
    ds = build_examples(_products(rows), min_attribute_count=2, empty_keep_fraction=1.0)
    by_title = dict(ds.examples)
    t0 = rows[0][0]
    got = [(lab, t0[s:e]) for lab, s, e in by_title[t0]]
    assert got == [("Brand", "ACME"), ("type", "Tea Bags"), ("Flavor", "green  tea"),
                   ("Count", "20 Count")]
    t1 = rows[1][0]
    assert [(lab, t1[s:e]) for lab, s, e in by_title[t1]] == [("Brand", "Redwood")]
    t2 = rows[2][0]
    assert [(lab, t2[s:e]) for lab, s, e in by_title[t2]][0] == ("Flavor", "Black Cherry Ice Cream")
    t4 = rows[4][0]
    assert [(lab, t4[s:e]) for lab, s, e in by_title[t4]] == [("Brand", "Zeta"), ("type", "Shoe")]
    # "Rare" (1 title) and "Color" (0 titles) are below min_attribute_count=2
    assert "Rare" in ds.stats["dropped_attributes"]
    assert set(ds.labels) == {"type", "Brand", "Flavor", "Count"} and ds.labels[0] == "type"
    for text, spans in ds.examples:  # no overlaps
        ends = sorted((s, e) for _, s, e in spans)
        assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))
    assert "no match here at all" in by_title  # empty kept at fraction 1
    ds0 = build_examples(_products(rows), min_attribute_count=2, empty_keep_fraction=0.0)
    assert "no match here at all" not in dict(ds0.examples)
    assert ds0.stats["n_without_spans"] == 1 and ds0.stats["n_without_spans_kept"] == 0


def test_type_swap_moves_the_other_spans_and_follows_the_case():
    t = "Starbucks Medium Roast Ground Coffee, 12 oz"

    def at(label, word, text=t):
        s = text.index(word)
        return (label, s, s + len(word))

    ex = [(t, [at("Brand", "Starbucks"), at("Roast", "Medium Roast"), at("type", "Ground Coffee"),
               at("Size", "12 oz")]),
          ("Brand only title", [("Brand", 0, 5)]),
          ("SHOUTED TEA", [at("type", "TEA", "SHOUTED TEA")])]
    out, n = swap_types(ex, ["ballpoint pen"], share=1.0)
    assert n == 2 and len(out) == 3
    title, spans = out[0]
    assert title == "Starbucks Medium Roast Ballpoint Pen, 12 oz"
    assert [(lab, title[s:e]) for lab, s, e in spans] == [
        ("Brand", "Starbucks"), ("Roast", "Medium Roast"), ("type", "Ballpoint Pen"), ("Size", "12 oz")]
    assert out[1] == ex[1]  # no type span: untouched
    assert out[2][0] == "SHOUTED BALLPOINT PEN"
    assert swap_types(ex, ["ballpoint pen"], share=0.0) == (ex, 0)
    # a share of the typed titles is swapped, deterministically for a seed
    many = [(f"Acme Tea {i}", [("type", 5, 8)]) for i in range(400)]
    got, k = swap_types(many, ["Pen"], share=0.5, seed=3)
    assert 150 < k < 250 and got == swap_types(many, ["Pen"], share=0.5, seed=3)[0]


def test_public_type_names_are_short_names_of_words():
    if type_names.shared_data_dir() is None:
        pytest.skip("the shared data is not beside the project")
    names = type_names.load("auto")
    assert len(names) > 5000
    assert all(1 <= len(n.split()) <= 4 and type_names.usable(n) == n for n in names)
    assert type_names.usable("Vitamins & Supplements") is None
    assert type_names.load("none") == ()


# ---- BIO alignment and decoding --------------------------------------------------------------
def test_single_valued_attributes_are_those_the_catalogue_writes_once_per_title():
    rows = [(f"Acme Red Shirt Cotton {i}", "Shirt",
             [("Brand", "Acme"), ("Color", "Red"), ("Material", "Cotton")]) for i in range(19)]
    # one title of twenty writes two colours (5%): Color stays single-valued at a 5% share;
    # a material written twice in one title is one value
    rows.append(("Acme Red Blue Shirt Cotton cotton", "Shirt",
                 [("Brand", "Acme"), ("Color", "Red"), ("Color", "Blue"), ("Material", "Cotton")]))
    # Feature: two distinct values in 2 of its 3 titles
    rows += [("Acme Shirt Slim Fit Quick Dry", "Shirt",
              [("Brand", "Acme"), ("Feature", "Slim Fit"), ("Feature", "Quick Dry")])] * 2
    rows.append(("Acme Shirt Slim Fit", "Shirt", [("Brand", "Acme"), ("Feature", "Slim Fit")]))
    ds = build_examples(_products(rows), min_attribute_count=1, empty_keep_fraction=0.0)
    assert ds.stats["titles_with_label"]["Color"] == 20
    assert ds.stats["titles_with_several_values"] == {"Color": 1, "Feature": 2}
    assert single_valued_labels(ds.stats, 0.05) == ["Brand", "Color", "Material"]
    assert single_valued_labels(ds.stats, 0.01) == ["Brand", "Material"]
    assert "type" in ds.stats["titles_with_label"]  # counted, never single-valued


def test_a_single_valued_label_keeps_its_best_scored_value_in_each_title():
    text = "Acme Men Women Unisex Glasses, men's fit"
    tagger = SpanTagger.__new__(SpanTagger)
    tagger.single_valued = frozenset({"Gender"})
    preds = [("Brand", 0, 4, 0.9), ("Gender", 5, 8, 0.7), ("Gender", 9, 14, 0.6),
             ("Gender", 15, 21, 0.8), ("type", 22, 29, 0.99), ("Gender", 31, 34, 0.5)]
    # "Unisex" wins; the other Gender values go; every other label's spans stay
    assert tagger._one_value(preds, text) == [("Brand", 0, 4, 0.9), ("Gender", 15, 21, 0.8),
                                              ("type", 22, 29, 0.99)]
    # the best value's other mentions stay (same value, case and spacing aside)
    preds2 = [("Gender", 5, 8, 0.9), ("Gender", 31, 34, 0.4), ("Gender", 9, 14, 0.6)]
    assert tagger._one_value(preds2, text) == [("Gender", 5, 8, 0.9), ("Gender", 31, 34, 0.4)]
    # a full-width spelling of the best value is the same value
    wide = "Ｍｅｎ men"
    assert tagger._one_value([("Gender", 0, 3, 0.9), ("Gender", 4, 7, 0.5)], wide) == [
        ("Gender", 0, 3, 0.9), ("Gender", 4, 7, 0.5)]
    tagger.single_valued = frozenset()
    assert tagger._one_value(preds, text) == preds


def test_bio_alignment_round_trip():
    tok = load_tokenizer(resolve_encoder("default"))
    labels = ["type", "Brand", "Color", "Size"]
    text = "Crocs Women's Jayna Ballet Flat,Nautical Navy,4 M US"
    spans = [("Brand", 0, 5), ("type", 20, 31), ("Color", 32, 45), ("Size", 46, 52)]
    assert align_round_trip(tok, text, spans, labels) == spans
    # truncation: spans beyond max_length tokens disappear, the others stay
    assert align_round_trip(tok, text, spans, labels, max_length=6) == [("Brand", 0, 5)]


def test_viterbi_respects_bio():
    labels = ["a", "b"]
    assert bio_tags(labels) == ["O", "B-a", "I-a", "B-b", "I-b"]
    start, trans = allowed_transitions(len(labels))
    rng = np.random.default_rng(0)
    for _ in range(50):
        logp = np.log(rng.dirichlet(np.ones(5), size=7)).astype(np.float32)
        path = viterbi(logp, start, trans)
        assert path[0] not in (2, 4)
        for p, c in zip(path, path[1:]):
            if c == 2:
                assert p in (1, 2)
            if c == 4:
                assert p in (3, 4)
    assert tags_to_word_spans([1, 2, 0, 3, 3, 4]) == [(0, 0, 1), (1, 3, 3), (1, 4, 5)]
    m = span_prf([[("a", 0, 3)]], [[("a", 0, 3, 0.9), ("b", 4, 5, 0.5)]])
    assert m["precision"] == 0.5 and m["recall"] == 1.0


# ---- a tiny training run ---------------------------------------------------------------------
def _synthetic(n=40):
    brands = ["Acme", "Zentro", "Bolt", "Norda", "Kiva"]
    colors = ["Red", "Navy Blue", "Black", "White"]
    types = ["Running Shoes", "Backpack", "Water Bottle"]
    sizes = ["Size 9", "20 oz", "Large"]
    rows = []
    for b, c, t, s in itertools.islice(itertools.product(brands, colors, types, sizes), 0, None, 3):
        rows.append((f"{b} {c} {t}, {s}", t, [("Brand", b), ("Color", c), ("Size", s)]))
        if len(rows) == n:
            break
    return _products(rows)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from autoknow_ray.modules.taxonomy.tagger_fit import fit_tagger

    out = tmp_path_factory.mktemp("tagger")
    cfg = TaggerConfig(epochs=2, batch_size=8, val_fraction=0.2, max_length=32, cpu_threads=2,
                       min_attribute_count=1, device="cpu", ensemble=3)
    metrics = fit_tagger(_synthetic(), cfg, out)
    return out, metrics


def test_fit_writes_a_self_contained_safetensors_artifact(artifact):
    from safetensors.torch import load_file

    out, metrics = artifact
    assert metrics["n_examples"] == 40 and metrics["n_val"] == 8
    assert set(metrics["labels"]) == {"type", "Brand", "Color", "Size"}
    assert 0.0 <= metrics["val_f1"] <= 1.0 and metrics["seconds"] > 0
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    state = load_file(str(out / "model.safetensors"))
    assert state["head.weight"].shape[0] == 2 * len(metrics["labels"]) + 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["labels"] == metrics["labels"] and cfg["encoder_config"]["model_type"] == "bert"
    # each synthetic title writes one brand, one colour, one size: all three single-valued
    assert cfg["single_valued"] == ["Brand", "Color", "Size"]
    assert SpanTagger.load(out, device="cpu").single_valued == {"Brand", "Color", "Size"}
    # an ensemble of three taggers (configs/cpu.yaml's recipe): members in sub-folders of the one
    # artifact, each trained with its own seed
    assert metrics["ensemble"] == 3 and cfg["ensemble"] == ["members/1", "members/2"]
    assert [m["n_val"] for m in metrics["members"]] == [8, 8, 8]
    assert [m["seed"] for m in metrics["members"]] == [0, 1, 2]
    for rel in cfg["ensemble"]:
        assert {"model.safetensors", "config.json"} <= {p.name for p in (out / rel).iterdir()}


def test_an_ensemble_decodes_the_mean_of_its_members_log_probabilities(artifact, tmp_path):
    import shutil

    from autoknow_ray.nn.tagger import encode_texts

    out, _ = artifact
    ens = SpanTagger.load(out, device="cpu", cpu_threads=2)
    assert len(ens.members) == 2
    alone = [SpanTagger.load(out, device="cpu", cpu_threads=2)]
    alone[0].members = []
    alone += [SpanTagger.load(out / rel, device="cpu", cpu_threads=2)
              for rel in ("members/1", "members/2")]
    texts = ["Kiva Black Backpack, Large", "Acme Red Running Shoes, Size 9",
             "Zentro Navy Blue Water Bottle 20 oz"]
    encs = encode_texts(ens.tokenizer, texts, ens.max_length)
    singles = [[t.predict([x])[0] for x in texts] for t in alone]
    assert len({json.dumps(s) for s in singles}) > 1  # the members differ: other seeds
    got = ens.predict(texts)
    for i, (e, text) in enumerate(zip(encs, texts)):
        mean = np.mean([t._word_logprobs([e])[0] for t in alone], axis=0)
        want = alone[0]._decode(mean, e, text)
        assert [(a, s, f) for a, s, f, _ in got[i]] == [(a, s, f) for a, s, f, _ in want]
        assert np.allclose([x[3] for x in got[i]], [x[3] for x in want], atol=1e-5)
    # a member that does not fit the artifact is refused, not averaged
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "members/1/config.json").read_text())
    cfg["labels"] = list(reversed(cfg["labels"]))
    (bad / "members/1/config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="other labels"):
        SpanTagger.load(bad, device="cpu")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["ensemble"] = ["../tagger"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="outside the artifact"):
        SpanTagger.load(bad, device="cpu")
    cfg["ensemble"] = ["members/2", "members/7"]  # a member not copied with the artifact
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="members/7.*is missing"):
        SpanTagger.load(bad, device="cpu")


def test_a_refit_with_one_tagger_leaves_no_member_of_an_earlier_ensemble(artifact, tmp_path):
    import shutil

    from autoknow_ray.modules.taxonomy.tagger_fit import fit_tagger

    out, _ = artifact
    again = tmp_path / "again"
    shutil.copytree(out, again)  # an earlier fit of three in the same folder
    cfg = TaggerConfig(epochs=1, batch_size=8, val_fraction=0.2, max_length=32, cpu_threads=2,
                       min_attribute_count=1, device="cpu", ensemble=1)
    metrics = fit_tagger(_synthetic(), cfg, again)
    assert metrics["ensemble"] == 1 and not (again / "members").exists()
    assert "ensemble" not in json.loads((again / "config.json").read_text())
    assert SpanTagger.load(again, device="cpu").members == []


def test_predict_gives_valid_char_offsets(artifact):
    out, metrics = artifact
    tagger = SpanTagger.load(out, device="cpu", cpu_threads=2)
    texts = ["Kiva Black Backpack, Large", "", None, "  ", "Bolt White Water Bottle 20 oz " * 40]
    preds = tagger.predict(texts, batch_size=4)
    assert len(preds) == len(texts) and preds[1] == preds[2] == preds[3] == []
    for text, spans in zip(texts, preds):
        for label, s, e, score in spans:
            assert label in metrics["labels"] and 0 <= s < e <= len(text) and 0 <= score <= 1
            assert text[s:e] == text[s:e].strip()  # whole words, never padding


def test_tag_titles_step_returns_spans_per_product(artifact):
    from autoknow_ray.modules.taxonomy.infer import SPANS, TagTitles
    from autoknow_ray.steps import WorkerEnv

    out, _ = artifact
    step = TagTitles(artifact_dir=str(out))
    step.setup(WorkerEnv(device="cpu", cpu_threads=1, batch_size=4))
    titles = ["Acme Red Running Shoes, Size 9", None, "", "Zentro Navy Blue Backpack " * 100]
    batch = pa.table({"product_id": ["a", "b", "c", "d"], "title": titles,
                      "product_type": [None, "shoes", None, None]})
    res = step.process_batch(batch)
    assert res.column_names == ["product_id", "title", "product_type", "spans"]
    assert res.schema.field("spans").type == SPANS and res.num_rows == 4  # one row per product
    spans = res.column("spans").to_pylist()
    assert spans[1] == spans[2] == []
    for title, row in zip(titles, spans):
        for sp in row:
            assert sp["value"] == title[sp["start"] : sp["end"]]
    assert step.process_batch(batch.slice(0, 0)).num_rows == 0
    # without a tagger artifact (fit had nothing to learn): every product, no span
    bare = TagTitles(artifact_dir=None)
    bare.setup(WorkerEnv())
    assert bare.process_batch(batch).column("spans").to_pylist() == [[], [], [], []]


def test_config_rejects_unknown_keys():
    with pytest.raises(ValidationError, match="epochz"):
        TaggerConfig(epochz=3)


# ---- gazetteer input -------------------------------------------------------------------------
def test_gazetteer_marks_known_values_and_cross_fold_hides_a_fold_s_own(tmp_path):
    from collections import Counter

    from autoknow_ray.nn import gazetteer as gz

    text = "Acme Navy Blue Running Shoes"
    chars = [(0, 4), (5, 9), (10, 14), (15, 22), (23, 28)]
    g = gz.Gazetteer(2, [(0, ("acme",)), (1, ("navy", "blue")), (1, ("blue",))])
    f = g.features(text, chars)
    assert f.shape == (5, 4)
    assert f[0].tolist() == [1, 0, 0, 0]  # B of label 0 on "Acme"
    assert f[1].tolist() == [0, 0, 1, 0] and f[2].tolist() == [0, 0, 1, 1]  # "Navy Blue", "Blue"
    assert not f[3:].any()
    # fold 0 only knows the values of fold 1, and the other way round
    c0 = gz.count_entries([text], [chars], [[(0, 0, 0)]], max_words=8)
    c1 = gz.count_entries([text], [chars], [[(1, 1, 2), (0, 3, 4)]], max_words=8, skip=frozenset({0}))
    assert c1 == Counter({(1, ("navy", "blue")): 1})  # label 0 skipped
    g0, g1 = gz.cross_fold([c0, c1], c0 + c1, 2, 8, 100)
    assert not g0.features(text, chars)[:, 0].any() and g0.features(text, chars)[1, 2] == 1
    assert g1.features(text, chars)[0, 0] == 1 and not g1.features(text, chars)[:, 2:].any()
    # JSON round trip; a broken file is a clear error
    g.save(tmp_path)
    assert (gz.Gazetteer.load(tmp_path).features(text, chars) == f).all()
    (tmp_path / gz.FILE).write_text('{"entries": []}')
    with pytest.raises(ValueError, match="not a gazetteer"):
        gz.Gazetteer.load(tmp_path)
    (tmp_path / gz.FILE).write_text('{"format": "%s", "n_labels": 2, "entries": [[0]]}' % gz.FORMAT)
    with pytest.raises(ValueError, match="malformed"):
        gz.Gazetteer.load(tmp_path)


def test_fit_with_gazetteer_ships_it_and_uses_it(tmp_path):
    from autoknow_ray.modules.taxonomy.tagger_fit import fit_tagger
    from autoknow_ray.nn import gazetteer as gz

    cfg = TaggerConfig(epochs=2, batch_size=8, val_fraction=0.2, max_length=32, cpu_threads=2,
                       min_attribute_count=1, device="cpu", gazetteer=True)
    metrics = fit_tagger(_synthetic(), cfg, tmp_path)
    assert metrics["n_val"] == 8
    tagger = SpanTagger.load(tmp_path, device="cpu", cpu_threads=2)
    g = tagger.gazetteer
    assert g is not None and len(g) > 0 and g.n_features == 2 * len(tagger.labels)
    type_k = tagger.labels.index("type")
    assert all(type_k not in ks for ks in g.index.values())  # the type label stays out
    assert ("acme",) in g.index and tagger.model.gaz_proj.weight.abs().sum() > 0  # it learnt
    preds = tagger.predict(["Kiva Black Backpack, Large", ""], batch_size=4)
    assert preds[1] == [] and all(0 <= s < e for _, s, e, _ in preds[0])
    (tmp_path / gz.FILE).unlink()
    with pytest.raises(ValueError, match="gazetteer"):
        SpanTagger.load(tmp_path, device="cpu")
