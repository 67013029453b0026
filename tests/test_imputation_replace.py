"""Mention replacement in the imputation tagger's training (`imputation.tagger.mention_replacement`):
copies of the training texts with every labelled value replaced by another value of its label,
the validation windows untouched."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from autoknow_ray.nn.conditioned_tagger import (
    ConditionedTagger, ConditionedTrainSettings, _mention_replacement, encode_windows,
    train_conditioned_tagger, window_tags)
from autoknow_ray.nn.tagger import replace_mentions
from tests.test_imputation import tea_texts


def test_each_mention_takes_another_value_of_its_label_and_its_span_follows():
    text = "Acme tea, mint flavor. Acme makes it"
    spans = [("Brand", 0, 4), ("Flavor", 10, 14), ("Brand", 23, 27)]
    pool = {"Brand": ["Acme", "Kiva"], "Flavor": ["mint"]}
    new, moved = replace_mentions(text, spans, pool, np.random.default_rng(0))
    # the one other brand, twice (one draw per value); mint has no other value and stays
    assert new == "Kiva tea, mint flavor. Kiva makes it"
    assert [new[a:b] for _, a, b in moved] == ["Kiva", "mint", "Kiva"]
    assert [lab for lab, _, _ in moved] == ["Brand", "Flavor", "Brand"]
    # a longer value moves every span after it
    new, moved = replace_mentions(text, spans, {"Brand": ["Acme", "Zentro Labs"]},
                                  np.random.default_rng(0))
    assert new == "Zentro Labs tea, mint flavor. Zentro Labs makes it"
    assert [new[a:b] for _, a, b in moved] == ["Zentro Labs", "mint", "Zentro Labs"]


def test_copies_draw_only_training_values_and_leave_validation_alone():
    torch.set_num_threads(1)
    texts, spans = tea_texts()
    # a brand only the first three texts write: validation holds them (below)
    for i in range(3):
        b = spans[i][0][2]
        texts[i] = "Quorvex" + texts[i][b:]
        spans[i] = [("Brand", 0, 7)] + [(lab, a - b + 7, e - b + 7) for lab, a, e in spans[i][1:]]
    s = ConditionedTrainSettings(max_length=24, stride=8, context_dim=0, epochs=1, batch_size=8,
                                 val_fraction=0.25, cpu_threads=1, device="cpu", bf16=False)
    tagger = ConditionedTagger.from_encoder(s, ["Brand", "Flavor"], torch.device("cpu"), False)
    label2idx = {"Brand": 0, "Flavor": 1}
    wins = encode_windows(tagger.tokenizer, texts, s.max_length, s.stride)
    examples = [(w, window_tags(w, spans[w.text_index], label2idx), spans[w.text_index]) for w in wins]
    val, train = examples[:10], examples[10:]
    only_val = {texts[w.text_index][a:b] for w, _, sp in val for lab, a, b in sp if lab == "Brand"} \
        - {texts[w.text_index][a:b] for w, _, sp in train for lab, a, b in sp if lab == "Brand"}
    assert only_val == {"Quorvex"}
    ctx = np.arange(len(texts), dtype=np.float32)[:, None]
    s2 = replace(s, mention_replacement=2)
    out_texts, out_ctx, extra = _mention_replacement(
        tagger.tokenizer, list(texts), ctx, spans, train, val, label2idx, s2,
        np.random.default_rng(0))
    assert out_texts[: len(texts)] == texts and len(out_texts) == len(texts) + 2 * len(train)
    assert extra and all(w.text_index >= len(texts) for w, _, _ in extra)
    src = sorted({w.text_index for w, _, _ in train} - {w.text_index for w, _, _ in val})
    assert len(out_texts) == len(texts) + 2 * len(src)
    for w, tags, inside in extra:
        t = out_texts[w.text_index]
        assert inside and any(x > 0 for x in tags)
        assert not {t[a:b] for lab, a, b in inside if lab == "Brand"} & only_val
    # each copy carries its source text's context row
    j = np.arange(len(out_texts) - len(texts))
    assert (out_ctx[len(texts):, 0] == np.asarray(src)[j % len(src)]).all()
    # a copy keeps its source's words outside the values
    w, _, inside = extra[0]
    t = out_texts[w.text_index]
    assert t.endswith("flavor, 20 bags") and " green tea with " in t


def test_training_with_copies_keeps_the_validation_split():
    torch.set_num_threads(1)
    texts, spans = tea_texts()
    s = ConditionedTrainSettings(max_length=24, stride=8, context_dim=0, epochs=1, batch_size=8,
                                 val_fraction=0.25, cpu_threads=1, device="cpu", bf16=False)
    _, plain = train_conditioned_tagger(texts, None, spans, ["Brand", "Flavor"], s)
    s1 = replace(s, mention_replacement=1)
    _, more = train_conditioned_tagger(texts, None, spans, ["Brand", "Flavor"], s1)
    assert plain["n_train_replaced"] == 0
    assert more["n_train_replaced"] == plain["n_train"]  # one copy of every training title
    assert more["n_val"] == plain["n_val"]
    assert more["val_spans"]["windows"]["text"] == plain["val_spans"]["windows"]["text"]


def test_validation_takes_whole_products():
    """`imputation.tagger.val_split: product`: every window of a product lands on one side, so a
    product whose title trains the tagger never validates it through its description."""
    from autoknow_ray.nn.conditioned_tagger import split_by_group

    keys = [i // 3 for i in range(60)] + [100 + i for i in range(30)]  # 20 products of 3, 30 of 1
    examples = list(range(len(keys)))
    val, train = split_by_group(examples, keys, 9, np.random.default_rng(0))
    assert len(val) >= 9 and len(val) + len(train) == len(keys)
    val_keys, train_keys = {keys[i] for i in val}, {keys[i] for i in train}
    assert not val_keys & train_keys
    again, _ = split_by_group(examples, keys, 9, np.random.default_rng(0))
    assert again == val
    assert split_by_group(examples, keys, 0, np.random.default_rng(0)) == ([], examples)


def test_training_on_product_groups_validates_on_unseen_products():
    torch.set_num_threads(1)
    texts, spans = tea_texts()
    # two texts per product: the title and a description that repeats its values
    texts = texts + [f"Made by {t.split()[0]}." for t in texts]
    spans = spans + [[("Brand", 8, 8 + len(t.split()[0]))] for t in texts[:40]]
    groups = list(range(40)) * 2
    s = ConditionedTrainSettings(max_length=24, stride=8, context_dim=0, epochs=1, batch_size=8,
                                 val_fraction=0.25, cpu_threads=1, device="cpu", bf16=False,
                                 mention_replacement=1)
    _, m = train_conditioned_tagger(texts, None, spans, ["Brand", "Flavor"], s, groups=groups)
    val_texts = set(m["val_spans"]["windows"]["text"])
    assert m["n_val"] >= 20 and all((t + 40) % 80 in val_texts for t in val_texts)
    # the copies come from training products only: one per training text with a value
    assert m["n_train_replaced"] == m["n_train"]


def test_title_copies_replace_attribute_values_and_keep_the_type_words():
    """Module 1's title tagger (`taxonomy.tagger.mention_replacement`): each training title's
    attribute values take another value of their attribute from the training titles; the type
    span keeps its words where the type label is skipped, and moves with the text."""
    from autoknow_ray.nn.tagger import mention_copies

    train = [("Acme Green Tea 20 bags", [("Brand", 0, 4), ("product type", 5, 14)]),
             ("Kiva Coffee 12 oz", [("Brand", 0, 4), ("Size", 12, 17), ("product type", 5, 11)]),
             ("Plain Water", [("product type", 6, 11)])]
    out = mention_copies(train, 2, np.random.default_rng(0), skip=("product type",))
    assert len(out) == 4  # the title with only a type span is not copied
    for (src, src_sp), (t, sp) in zip(train[:2] * 2, out):
        got = {lab: t[a:b] for lab, a, b in sp}
        want = {lab: src[a:b] for lab, a, b in src_sp}
        assert got["product type"] == want["product type"]
        assert got["Brand"] in {"Acme", "Kiva"} and got["Brand"] != want["Brand"]
    # a label with one value in training keeps it
    assert all({lab: t[a:b] for lab, a, b in sp}.get("Size", "12 oz") == "12 oz" for t, sp in out)
    assert out[0][0] == "Kiva Green Tea 20 bags"
