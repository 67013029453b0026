"""Related products: graph build with bad input, training learns direction, stage end to end with
cold start and a behaviour-less catalogue, eval and the co-purchase baseline."""
from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from autoknow_ray.config import Config
from autoknow_ray.eval.baselines_related import copurchase_counts
from autoknow_ray.eval.related import score
from autoknow_ray.modules.related.config import RelatedConfig
from autoknow_ray.modules.related.fit import train
from autoknow_ray.modules.related.model import GNNSettings, list_weights, padded_neighbours, pair_dots
from autoknow_ray.modules.related.steps import CheckEdges, mark_complete
from autoknow_ray.pipeline import read_parquet_any, table_file
from autoknow_ray.rebuild import rebuild
from autoknow_ray.steps import WorkerEnv


def _products(n: int) -> pa.Table:
    kinds = ["phone", "phone case", "laptop", "laptop bag"]
    return pa.table({"product_id": [f"p{i}" for i in range(n)],
                     "title": [f"Brand{i % 7} {kinds[i % 4]} model {i}" for i in range(n)],
                     "product_type": [kinds[i % 4] for i in range(n)]})


def _catalogue(tmp_path, n=120, copurchase=None):
    d = tmp_path / "cat"
    d.mkdir()
    pq.write_table(_products(n), d / "products.parquet")
    pq.write_table(pa.table({"type": ["phone", "phone case", "laptop", "laptop bag"],
                             "parent": [None] * 4}, schema=pa.schema([("type", pa.string()), ("parent", pa.string())])),
                   d / "taxonomy.parquet")
    if copurchase is not None:
        pq.write_table(copurchase, d / "copurchase.parquet")
    return d


def _one_way_copurchase(n: int) -> pa.Table:
    """Phones lead to cases, laptops to bags (one-way); a few two-way pairs; bad rows."""
    rng = np.random.default_rng(0)
    src, dst, cnt = [], [], []
    for i in range(0, n - 20, 4):  # the last products stay without edges (cold start)
        for j in rng.choice(np.arange(1, n - 20, 4), 3, replace=False):
            src.append(f"p{i}"), dst.append(f"p{j}"), cnt.append(int(rng.integers(1, 5)))
        k = i + 2
        if k < n - 20:
            src.append(f"p{k}"), dst.append(f"p{k + 1}"), cnt.append(2)
    src += ["p3", "p7"]
    dst += ["p2", "p6"]  # p2 -> p3 and p6 -> p7 are there too: two-way pairs
    cnt += [1, 1]
    src += ["p0", "nobody", "p3"]
    dst += ["ghost", "p1", "p3"]
    cnt += [1, 1, 1]
    return pa.table({"src": src, "dst": dst, "count": pa.array(cnt, pa.int64())})


def test_check_edges_reasons(tmp_path):
    pq.write_table(_products(5), tmp_path / "products.parquet")
    step = CheckEdges(tmp_path / "products.parquet", "src", "dst", "count")
    step.setup(WorkerEnv())
    out = step.process_batch(pa.table({"src": ["p0", "p1", "p2", "x", "p3", "p4"],
                                       "dst": ["p1", "p1", "zz", "p0", "p4", "p0"],
                                       "count": pa.array([2, 1, 1, 1, -3, 0], pa.int64())}))
    assert out.column("_reason").to_pylist() == [
        None, "self-loop", "unknown product in dst", "unknown product in src", "negative count",
        "zero count"]


def test_training_learns_direction():
    """Source embeddings of one type should point at target embeddings of its complement, not back."""
    rng = np.random.default_rng(1)
    n = 200
    kind = np.arange(n) % 2  # 0 = phone, 1 = case; every edge goes phone -> case
    text = rng.normal(size=(n, 384)).astype(np.float32)
    text[:, 0] += 3 * kind
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    src = rng.choice(np.flatnonzero(kind == 0), 800)
    dst = rng.choice(np.flatnonzero(kind == 1), 800)
    edges = (src, dst, np.ones(800), np.zeros(800, bool))
    rc = RelatedConfig(epochs=4, batch_size=128, negatives=64, dim=16, max_train_seconds=30)
    s = GNNSettings(type_buckets=8, type_dim=4, dim=16, fanout=5)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    model, history = train(s, rc, text, np.zeros(n, np.int64), edges, empty, seed=0)
    assert history["loss"][-1] < history["loss"][0]
    import torch

    out_nb = torch.from_numpy(padded_neighbours(n, src, dst, np.ones(800), 5))
    in_nb = torch.from_numpy(padded_neighbours(n, dst, src, np.ones(800), 5))
    sim_nb = torch.full((n, 5), -1, dtype=torch.long)
    with torch.no_grad():
        h0 = model.metadata(torch.from_numpy(text), torch.zeros(n, dtype=torch.long))
        deg = torch.zeros(n, 2)
        sv, tv = model(torch.arange(n), h0, deg, out_nb, in_nb, sim_nb)
    forward = (sv[torch.from_numpy(src)] * tv[torch.from_numpy(dst)]).sum(1)
    backward = (sv[torch.from_numpy(dst)] * tv[torch.from_numpy(src)]).sum(1)
    assert float((forward > backward).float().mean()) > 0.9


def _config(**related) -> Config:
    return Config(stages=["ingest", "related", "graph"],
                  ray={"num_cpus": 2, "object_store_memory_mb": 400},
                  related={"epochs": 2, "max_train_seconds": 20, "dim": 16, "negatives": 64,
                           "batch_size": 64, "top_k": 5, "text_knn": 4, "fanout": 4, **related})


@pytest.fixture(scope="module")
def end_to_end(tmp_path_factory, ray_session):
    """120 products with one-way co-purchases, rebuilt without models: fit, then the stage."""
    root = tmp_path_factory.mktemp("related-e2e")
    cat = _catalogue(root, 120, _one_way_copurchase(120))
    rebuild(cat, root / "run", config=_config())
    return cat, root / "run"


def test_stage_end_to_end_with_bad_edges_and_cold_start(end_to_end, tmp_path):
    n = 120
    _, run = end_to_end
    manifest = __import__("json").loads((run / "related" / "manifest.json").read_text())
    assert manifest["model"] == "dual-gnn"
    # ingest rejects the self-loop and the edges to products the catalogue lacks, with reasons;
    # what reaches the stage is clean
    q = read_parquet_any(table_file(run / "ingest" / "quarantine", "copurchase"))
    reasons = sorted(r for r in q["reason"].to_list() if r.startswith("unknown"))
    assert reasons == ["unknown product_id (dst)", "unknown product_id (src)"]
    assert manifest["rows_quarantined"] == 0
    # products in, related pairs out: not one unit, so no balance; every product is embedded
    # (checked by the stage) and, in a catalogue of 120, finds related products
    assert manifest["units"]["rows_out"].startswith("related pairs") and not manifest.get("balanced")
    assert manifest["products_embedded"] == manifest["rows_in"] == manifest["products_with_related"]
    assert manifest["products_without_related"] == 0
    edges = read_parquet_any(run / "related" / "edges_copurchase")
    assert edges.filter(pl.col("src") == pl.col("dst")).height == 0
    two = edges.filter(pl.col("two_way"))
    assert two.height % 2 == 0 and two.height > 0
    assert edges.filter(~pl.col("two_way")).height > 0
    # every table a step's setup() loads was written whole and marked so before that step ran
    from autoknow_ray.modules.related.steps import COMPLETE
    from autoknow_ray.pipeline import count_rows

    for table in ("nodes", "neighbours", "embeddings"):
        marker = __import__("json").loads((run / "related" / table / COMPLETE).read_text())
        assert marker["rows"] == count_rows(run / "related" / table) > 0
    assert count_rows(run / "related" / "embeddings") == n
    related = read_parquet_any(table_file(run / "graph", "related"))
    assert set(related["product_id"].unique()) == {f"p{i}" for i in range(n)}  # cold start too
    assert related.filter(pl.col("product_id") == pl.col("related_id")).height == 0
    assert related.group_by("product_id").len()["len"].max() == 5
    assert related["rank"].min() == 1
    gold = tmp_path / "gold"
    gold.mkdir()
    pq.write_table(pa.table({"src": ["p0", "p4"], "dst": ["p1", "p5"], "count": [1, 1]}),
                   gold / "copurchase.parquet")
    res = score(run, gold)
    assert res["related.pairs"] == 2 and 0 <= res["related.hr@5"] <= 1


def test_catalogue_without_behaviour_gets_title_neighbours(tmp_path, ray_session):
    cat = _catalogue(tmp_path, 40)
    run = tmp_path / "run"
    rebuild(cat, run, config=_config())
    related = read_parquet_any(table_file(run / "graph", "related"))
    assert related["product_id"].n_unique() == 40
    top = related.filter((pl.col("product_id") == "p1") & (pl.col("rank") == 1))["related_id"][0]
    assert int(top[1:]) % 4 == 1  # another phone case is the nearest title


def test_copurchase_walk_baseline_ranks_by_the_two_step_walk():
    """a was bought with c (4) and d (1); c with b (6), d with e (2): from a the walk reaches b
    (4/5 * 6/10) before e (1/5 * 2/3), a itself is never listed, and rows the stage would
    quarantine (no id, a count that is not positive) take no step."""
    from autoknow_ray.eval.baselines_related import walk_lists

    cp = pl.DataFrame({"src": ["a", "a", "c", "d", "a", None, "b"], "dst": ["c", "d", "b", "e", "e", "b", "e"],
                       "count": [4, 1, 6, 2, -3, 9, 0]})
    got = walk_lists(cp, 3)
    a = got.filter(pl.col("product_id") == "a").sort("rank")
    assert a["related_id"].to_list() == ["b", "e"]
    assert a["score"][0] == pytest.approx(4 / 5 * 6 / 10) and a["score"][1] == pytest.approx(1 / 5 * 2 / 3)
    assert "a" not in a["related_id"].to_list() and got["product_id"].null_count() == 0


def test_score_and_copurchase_baseline(tmp_path):
    cp = pl.DataFrame({"src": ["a", "a", "b", "c"], "dst": ["b", "c", "a", "a"], "count": [5, 1, 1, 3]})
    base = copurchase_counts(cp, 2)
    assert base.filter(pl.col("product_id") == "a")["related_id"].to_list() == ["b", "c"]
    run = tmp_path / "run" / "graph"
    run.mkdir(parents=True)
    pl.DataFrame({"product_id": ["a", "a", "b"], "related_id": ["b", "c", "a"], "rank": [1, 2, 2],
                  "score": [1.0, 0.5, 0.2]}).write_parquet(run / "related.parquet")
    gold = tmp_path / "gold"
    gold.mkdir()
    pl.DataFrame({"src": ["a", "a", "d"], "dst": ["b", "c", "a"], "count": [1, 1, 1]}).write_parquet(
        gold / "copurchase.parquet")
    res = score(tmp_path / "run", gold)
    assert res["related.hr@5"] == pytest.approx(2 / 3, abs=1e-3)
    assert res["related.mrr@5"] == pytest.approx((1 + 0.5) / 3, abs=1e-3)
    # sources a (both pairs hit) and d (no list): one of two shows something it was bought with
    assert res["related.sources"] == 2 and res["related.source_hit@5"] == pytest.approx(0.5)
    # one-way pairs: a->b (b ranks a at 2, a ranks b at 1: a win), a->c (c has no list: a win)
    assert res["related.asymmetry.forward_above_reverse"] == 1.0


def test_worker_steps_embed_and_recommend_without_ray(tmp_path):
    """The inference steps as a worker runs them: weights + capped node tables -> embeddings ->
    top-k, a cold product (no edges) included."""
    from autoknow_ray.modules.related.model import DualGNN, save
    from autoknow_ray.modules.related.steps import DualEmbed, Recommend, _fixed

    s = GNNSettings(type_buckets=8, type_dim=4, dim=8, fanout=3)
    model = DualGNN(s)
    save(model, tmp_path / "model")
    n = 12
    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(n)]
    (tmp_path / "nodes").mkdir()
    pq.write_table(pa.table({"product_id": ids, "h0": _fixed(rng.normal(size=(n, 8)))}),
                   tmp_path / "nodes" / "part.parquet")
    mark_complete(tmp_path / "nodes")
    (tmp_path / "nb").mkdir()
    pq.write_table(pa.table({
        "product_id": ["p0", "p1", "p2", "p0"], "kind": ["out", "in", "in", "similar"],
        "neighbours": [["p1", "p2", "ghost"], ["p0"], ["p0"], ["p3"]],
        "weight_sum": [3.0, 1.0, 2.0, 1.0]}), tmp_path / "nb" / "part.parquet")
    mark_complete(tmp_path / "nb")
    embed = DualEmbed(tmp_path / "model", tmp_path / "nodes", tmp_path / "nb", 3)
    embed.setup(WorkerEnv())
    # rows in product id order (p0, p1, p10, p11, p2, …), whatever order the shards hold
    row = {p: int(i) for p, i in zip(ids, embed.tables.index_of(ids))}
    assert row["p2"] == 4 and row["p10"] == 2
    assert embed.tables.out_nb[row["p0"]].tolist() == [row["p1"], row["p2"], -1]  # an unknown neighbour is dropped
    assert embed.tables.in_nb[row["p1"]].tolist() == [row["p0"], -1, -1]
    emb = embed.process_batch(pa.table({"product_id": ids}))
    # hop 1 computed once for every node gives what each batch's own neighbourhood gives
    assert embed.hop1 is not None
    per_batch = embed.hop1
    embed.hop1 = None
    for part in (ids[:5], ids[5:]):
        alone = embed.process_batch(pa.table({"product_id": part}))
        once = emb.filter(pc.is_in(emb.column("product_id"), pa.array(part)))
        for col in ("source", "target"):
            np.testing.assert_allclose(np.array(alone.column(col).to_pylist()),
                                       np.array(once.column(col).to_pylist()), atol=1e-5)
    embed.hop1 = per_batch
    (tmp_path / "emb").mkdir()
    pq.write_table(emb, tmp_path / "emb" / "part.parquet")
    mark_complete(tmp_path / "emb")
    rec = Recommend(tmp_path / "emb", 4, 1000, 8, 0)
    rec.setup(WorkerEnv())
    out = pl.from_arrow(rec.process_batch(emb.select(["product_id", "source"])))
    assert out.group_by("product_id").len()["len"].to_list() == [4] * n
    assert out.filter(pl.col("product_id") == pl.col("related_id")).height == 0
    assert sorted(out.filter(pl.col("product_id") == "p11")["rank"].to_list()) == [1, 2, 3, 4]
    with pytest.raises(KeyError):
        embed.process_batch(pa.table({"product_id": ["unknown"]}))


def test_list_weights_sums_each_candidates_entries_in_its_own_rows_list():
    """The re-ranking's count and neighbour terms: per row, the weights of the list entries equal
    to each candidate, as comparing every candidate with every entry gives; -1 pads match
    nothing; a row's figures are the same whatever rows share its batch."""
    rng = np.random.default_rng(3)
    cand = rng.integers(-1, 60, (37, 50))
    ids = rng.integers(-1, 60, (37, 23))
    w = np.where(ids >= 0, rng.random((37, 23)) * 5, 0.0)
    pairwise = ((cand[:, :, None] == ids[:, None, :]) * w[:, None, :]).sum(2)
    got = list_weights(cand, ids, w)
    assert np.allclose(got, pairwise, rtol=0, atol=1e-12)
    assert (got[cand < 0] == 0).all()
    # a hand case: candidate 2 is listed twice (1 + 2), 5 once, 7 never; a -1 entry's weight
    # (9, as a pad should never carry one) never reaches a -1 candidate
    small = list_weights(np.array([[2, 5, 7, -1]]), np.array([[2, 2, -1, 5]]), np.array([[1., 2., 9., 3.]]))
    assert small.tolist() == [[3.0, 3.0, 0.0, 0.0]]
    # row 5 alone, and with other rows in another order: the same figures, bit for bit
    alone = list_weights(cand[5:6], ids[5:6], w[5:6])
    mixed = list_weights(cand[[9, 5, 0]], ids[[9, 5, 0]], w[[9, 5, 0]])
    assert np.array_equal(alone[0], mixed[1])
    assert list_weights(np.zeros((0, 4), np.int64), np.zeros((0, 3), np.int64), np.zeros((0, 3))).shape == (0, 4)


def test_pair_dots_scores_only_the_listed_candidates_as_the_full_gather_does(monkeypatch):
    """The re-ranking's model term: each listed candidate's dot product with its row's source,
    as gathering every slot's target gives, 0 in an empty (-1) slot; the same in any chunking."""
    import autoknow_ray.modules.related.model as model

    rng = np.random.default_rng(5)
    targets = rng.standard_normal((40, 8)).astype(np.float32)
    q = rng.standard_normal((6, 8)).astype(np.float32)
    cand = rng.integers(-1, 40, (6, 9))
    full = np.einsum("nd,ncd->nc", q, targets[np.clip(cand, 0, None)])
    got = pair_dots(q, targets, cand)
    assert got.dtype == np.float32
    assert np.allclose(got[cand >= 0], full[cand >= 0], rtol=1e-6, atol=1e-6)
    assert (got[cand < 0] == 0).all() and (cand < 0).any()
    monkeypatch.setattr(model, "PAIR_CHUNK", 4)  # many chunks: the same figures, bit for bit
    assert np.array_equal(model.pair_dots(q, targets, cand), got)


def test_split_events_keeps_every_event_once():
    from autoknow_ray.modules.related.fit import split_events

    count = np.array([1, 5, 40, 0])
    tr, va = split_events(count, 0.25, np.random.default_rng(0))
    assert (tr + va == count).all() and (tr >= 0).all() and (va >= 0).all()
    assert va[2] > 0 and tr[2] > 0  # a pair bought often lands on both sides
    assert (split_events(count, 0.0, np.random.default_rng(0))[1] == 0).all()


def test_validation_ranks_with_and_without_the_count_prior():
    from autoknow_ray.modules.related.fit import Validation

    n = 6
    S = np.eye(n, 3, dtype=np.float32)
    T = np.zeros((n, 3), np.float32)
    T[5, 0] = 1.0  # the model puts 5 first for 0
    T[4, 0] = 0.5
    train = (np.array([0]), np.array([2]), np.array([9.0]))  # but 0 and 2 were bought together
    val = Validation(n, np.array([0, 0]), np.array([5, 2]), train, 10, np.random.default_rng(0))
    assert val.ranks(S, T, 0.0).tolist() == [1, 3]
    assert val.ranks(S, T, 10.0).tolist() == [2, 1]
    w, hr, table = val.best_weight(S, T, [0.0, 100.0], k=1)
    assert hr == 0.5 and set(table) == {0.0, 100.0}


def _prior_tables(tmp_path):
    """Eight products' embeddings (the model ranks p0 > p1 > ... for every source) and two
    co-purchase neighbour rows (p1 -> p7 bought 50 times and p2 once; p7 bought after p1), both
    marked complete; returns the source batch a Recommend step takes."""
    from autoknow_ray.modules.related.steps import _fixed

    ids = [f"p{i}" for i in range(8)]
    vec = np.zeros((8, 4), np.float32)
    vec[:, 0] = np.linspace(1, 0, 8)
    (tmp_path / "emb").mkdir()
    pq.write_table(pa.table({"product_id": ids, "source": _fixed(vec), "target": _fixed(vec)}),
                   tmp_path / "emb" / "part.parquet")
    mark_complete(tmp_path / "emb")
    (tmp_path / "nb").mkdir()
    pq.write_table(pa.table({
        "product_id": ["p1", "p7"], "kind": ["out", "in"], "neighbours": [["p7", "p2"], ["p1"]],
        "weights": [[50.0, 1.0], [50.0]], "weight_sum": [51.0, 50.0]}), tmp_path / "nb" / "part.parquet")
    mark_complete(tmp_path / "nb")
    emb = pq.read_table(tmp_path / "emb" / "part.parquet").select(["product_id", "source"])
    return emb


def test_recommend_reranks_with_the_count_prior(tmp_path):
    """A co-purchase neighbour outside the FAISS hits enters the list once the prior weighs in;
    no product twice, never the product itself."""
    from autoknow_ray.modules.related.steps import Recommend, _fixed

    emb = _prior_tables(tmp_path)  # every source ranks targets p0 > p1 > ... by the model
    plain = Recommend(tmp_path / "emb", 3, 1000, 8, 0, tmp_path / "nb", 0.0, 4)
    plain.setup(WorkerEnv())
    top = pl.from_arrow(plain.process_batch(emb))
    assert top.filter(pl.col("product_id") == "p1")["related_id"].to_list() == ["p0", "p2", "p3"]
    rec = Recommend(tmp_path / "emb", 3, 1000, 8, 0, tmp_path / "nb", 1.0, 4)
    rec.setup(WorkerEnv())
    out = pl.from_arrow(rec.process_batch(emb))
    p1 = out.filter(pl.col("product_id") == "p1").sort("rank")
    assert p1["related_id"].to_list()[0] == "p7" and p1["rank"].to_list() == [1, 2, 3]
    assert out.group_by("product_id").agg(pl.col("related_id").n_unique())["related_id"].min() == 3
    assert out.filter(pl.col("product_id") == pl.col("related_id")).height == 0


# ---- known answers: complements by type, one way, new listings, best-sellers
COMPLEMENTS = {"phone": "phone case", "laptop": "laptop bag", "camera": "camera tripod",
               "printer": "printer ink"}
BESTSELLERS = ["gift card", "usb cable"]


def _complement_catalogue(tmp_path, seed=0, n_source=40, n_target=30, new_source=8, new_target=5):
    """A catalogue whose complements are known and one-way: every product of a source type
    (phone) is bought with 4 products of its complement type (phone case), drawn by a Zipf law so
    some cases are best-sellers of their type; never the other way. Two best-sellers are bought
    with 60% of the source products and 30% of the targets. The first `new_source` / `new_target`
    products of each type are new listings without any co-purchase row. Each source product also
    has one more complement held out of the catalogue (a pair it was never seen buying).
    Titles share the type's words ("Brand3 Pro phone 41", "Brand7 Max phone case 12")."""
    rng = np.random.default_rng(seed)
    ids, titles, types, new, by_type = [], [], [], set(), {}
    words = ["Pro", "Lite", "Max", "Mini", "Plus", "Ultra", "Classic", "Neo"]

    def add(kind, k, is_new):
        pid = f"{kind.replace(' ', '-')}-{k}"
        ids.append(pid)
        types.append(kind)
        titles.append(f"Brand{rng.integers(12)} {words[rng.integers(len(words))]} {kind} {rng.integers(10, 99)}")
        if is_new:
            new.add(pid)
        return pid

    for s, t in COMPLEMENTS.items():
        by_type[s] = [add(s, k, k < new_source) for k in range(n_source)]
        by_type[t] = [add(t, k, k < new_target) for k in range(n_target)]
    best = [add(b, 0, False) for b in BESTSELLERS]
    rows, held = [], []
    for s, t in COMPLEMENTS.items():
        targets = [p for p in by_type[t] if p not in new]
        w = 1.0 / (np.arange(len(targets)) + 1.0)
        w /= w.sum()
        for a in by_type[s]:
            if a in new:
                continue
            pick = rng.choice(len(targets), 5, replace=False, p=w)
            rows += [(a, targets[j], int(rng.integers(1, 4))) for j in pick[:4]]
            held.append((a, targets[pick[4]]))
            rows += [(a, b, int(rng.integers(1, 5))) for b in best if rng.random() < 0.6]
        for a in targets:
            rows += [(a, b, int(rng.integers(1, 3))) for b in best if rng.random() < 0.3]
    d = tmp_path / "cat"
    d.mkdir()
    pq.write_table(pa.table({"product_id": ids, "title": titles, "product_type": types}),
                   d / "products.parquet")
    kinds = sorted(set(types))
    pq.write_table(pa.table({"type": kinds, "parent": pa.nulls(len(kinds), pa.string())}),
                   d / "taxonomy.parquet")
    pq.write_table(pa.table({"src": [r[0] for r in rows], "dst": [r[1] for r in rows],
                             "count": pa.array([r[2] for r in rows], pa.int64())}),
                   d / "copurchase.parquet")
    return d, dict(zip(ids, types)), rows, held, new


def test_known_complements_beat_popularity_for_new_listings_and_keep_direction(tmp_path, ray_session):
    """The recommender against the k most-bought products (as the product bought with another)
    on known answers: (a) new listings of a source type get their complement type in their top k
    far more often than popularity gives; (b) a phone's list holds cases, a case's list seldom
    phones; (c) held-out complement pairs (never bought in the catalogue) are hit more often than
    by popularity."""
    k = 10
    cat, type_of, rows, held, new = _complement_catalogue(tmp_path)
    run = tmp_path / "run"
    rebuild(cat, run, config=_config(epochs=30, max_train_seconds=40, top_k=k))
    related = read_parquet_any(table_file(run / "graph", "related")).sort(["product_id", "rank"])
    top = dict(related.group_by("product_id", maintain_order=True).agg("related_id").rows())
    assert len(top) == len(type_of)
    bought = pl.DataFrame(rows, schema=["src", "dst", "count"], orient="row")
    popular = bought.group_by("dst").agg(pl.col("count").sum()).sort(
        ["count", "dst"], descending=[True, False])["dst"].to_list()

    def popularity(p):
        return [q for q in popular if q != p][:k]

    def share(lists, p, wanted):
        return sum(type_of[q] == wanted for q in lists) / k

    source_of = {t: s for s, t in COMPLEMENTS.items()}
    cold = [p for p in new if type_of[p] in COMPLEMENTS]
    cold_model = np.mean([share(top[p], p, COMPLEMENTS[type_of[p]]) for p in cold])
    cold_pop = np.mean([share(popularity(p), p, COMPLEMENTS[type_of[p]]) for p in cold])
    sources = [p for p, t in type_of.items() if t in COMPLEMENTS and p not in new]
    targets = [p for p, t in type_of.items() if t in source_of and p not in new]
    forward = np.mean([share(top[p], p, COMPLEMENTS[type_of[p]]) for p in sources])
    backward = np.mean([share(top[p], p, source_of[type_of[p]]) for p in targets])
    hits = np.mean([b in top[a] for a, b in held])
    hits_pop = np.mean([b in popularity(a) for a, b in held])
    print(f"known complements @{k}: new listings {cold_model:.3f} (popularity {cold_pop:.3f}); "
          f"direction {forward:.3f} vs {backward:.3f}; held-out hits {hits:.3f} (popularity {hits_pop:.3f})")
    assert cold_model >= cold_pop + 0.3
    assert forward >= backward + 0.3
    assert hits >= hits_pop + 0.05


def test_validation_picks_the_count_prior_per_bucket_of_behaviour():
    """A source with one co-purchase event whose count points away from its held-out pair wants
    the model alone; a source with nine wants the counts: each bucket gets its own weight."""
    from autoknow_ray.modules.related.fit import Validation

    n = 6
    S = np.eye(n, 3, dtype=np.float32)
    T = np.zeros((n, 3), np.float32)
    T[5, :2] = 1.0  # the model puts 5 first for 0 and for 1
    T[4, :2] = 0.5
    train = (np.array([0, 1]), np.array([2, 3]), np.array([9.0, 1.0]))
    val = Validation(n, np.array([0, 1]), np.array([2, 5]), train, 10, np.random.default_rng(0))
    assert val.events.tolist() == [9.0, 1.0]
    pick = val.best_weight_by_bucket(S, T, [0.0, 100.0], [0, 1, 3], min_pairs=1, k=1)
    assert pick["weights"][1] == 0.0 and pick["weights"][2] > 0  # 1-2 events: model; 3+: counts
    assert pick["hr"] == 1.0 and max(pick["table"].values()) == 0.5  # one weight for all gets half
    assert pick["buckets"]["1-2"]["pairs"] == 1 and pick["buckets"]["3+"]["hr@1"] == 1.0
    assert pick["buckets"]["0-0"]["pairs"] == 0
    # too few pairs in a bucket: the weight picked on all pairs
    few = val.best_weight_by_bucket(S, T, [0.0, 100.0], [0, 1, 3], min_pairs=2, k=1)
    assert few["weights"][1] == few["weights"][2] == few["overall"]


def test_prior_weight_of_a_products_bucket_and_of_an_old_model():
    from autoknow_ray.modules.related.model import prior_weights_of

    new = {"prior_weight": 0.5, "prior_buckets": [0, 1, 3, 10], "prior_bucket_weights": [0.0, 0.1, 1.0, 4.0]}
    assert prior_weights_of(new, np.array([0, 1, 2, 3, 9, 10, 500])).tolist() == [0.0, 0.1, 0.1, 1.0, 1.0, 4.0, 4.0]
    assert prior_weights_of({"prior_weight": 0.5}, np.array([0, 50])).tolist() == [0.5, 0.5]


def test_recommend_uses_the_weight_of_the_products_bucket(tmp_path):
    """p1 has 51 co-purchase events: with buckets [0, 100) it takes the first weight (counts weigh
    in, p7 first), with [0, 10) the second (0: the model's order)."""
    from autoknow_ray.modules.related.steps import Recommend, _fixed

    emb = _prior_tables(tmp_path)
    lists = {}
    for buckets in ([0, 100], [0, 10]):
        rec = Recommend(tmp_path / "emb", 3, 1000, 8, 0, tmp_path / "nb", 0.0, 4, buckets, [1.0, 0.0])
        rec.setup(WorkerEnv())
        out = pl.from_arrow(rec.process_batch(emb))
        lists[buckets[1]] = out.filter(pl.col("product_id") == "p1").sort("rank")["related_id"].to_list()
    assert lists[100][0] == "p7"
    assert lists[10] == ["p0", "p2", "p3"]


def test_setup_refuses_a_table_still_being_written(tmp_path):
    """A step whose setup() loads another step's table fails at once, saying so, when the table is
    not marked complete or holds other rows than the marker records."""
    from autoknow_ray.modules.related.steps import COMPLETE, Recommend, _fixed

    emb = tmp_path / "emb"
    emb.mkdir()
    vec = np.eye(3, 4, dtype=np.float32)
    pq.write_table(pa.table({"product_id": ["a", "b", "c"], "source": _fixed(vec), "target": _fixed(vec)}),
                   emb / "part-0.parquet")
    with pytest.raises(RuntimeError, match="not marked complete"):
        Recommend(emb, 2, 1000, 8, 0).setup(WorkerEnv())
    assert mark_complete(emb) == 3
    Recommend(emb, 2, 1000, 8, 0).setup(WorkerEnv())
    (emb / COMPLETE).write_text('{"rows": 5}')  # a writer that had two rows more to go
    with pytest.raises(RuntimeError, match="3 rows read, 5 written"):
        Recommend(emb, 2, 1000, 8, 0).setup(WorkerEnv())


def test_validation_picks_a_popularity_term_where_the_model_knows_nothing():
    """Every held-out pair goes to the most bought product (5), which the model stripped of the
    sources' edges ranks below others: bucket 0 (picked on sources stripped of their edges)
    takes a popularity weight, and the blend beats the model alone there; where the model is
    right already (bucket 3+) weight 0 stays, as it is a candidate and ties go to the smaller."""
    from autoknow_ray.modules.related.fit import Validation

    n = 6
    S = np.eye(n, 3, dtype=np.float32)
    T = np.zeros((n, 3), np.float32)
    T[5, 0] = 1.0  # the warm model puts 5 first for 0
    T[4, :] = 0.5
    train = (np.array([0, 1, 2, 3, 0]), np.array([4, 5, 5, 5, 2]), np.array([2.0, 1.0, 4.0, 4.0, 7.0]))
    val = Validation(n, np.array([0, 1]), np.array([5, 5]), train, 10, np.random.default_rng(0))
    assert val.events.tolist() == [9.0, 1.0] and val.popularity.argmax() == 5
    cold_S, cold_T = S.copy(), T.copy()
    cold_T[5] = 0.0  # stripped of its edges, the model no longer ranks 5 first for anyone
    cold_T[3] = 1.0
    assert (val.ranks(cold_S, cold_T, 0.0) > 1).all()
    pick = val.best_terms_by_bucket(S, T, [0.0, 0.0, 0.0], [0.0, 1.0, 100.0], [0, 1, 3],
                                    min_pairs=1, cold=(cold_S, cold_T), neighbours=False, k=1)
    zero = pick["buckets"]["0-0"]
    assert zero["popularity_multiple"] > 0 and zero["hr@1"] == 1.0 and zero["hr@1_model_alone"] == 0.0
    assert pick["popularity_weights"][0] > 0 and pick["neighbour_weights"] == [0.0, 0.0, 0.0]
    assert pick["buckets"]["3+"]["popularity_multiple"] == 0.0 and pick["popularity_weights"][2] == 0.0


def test_recommend_lists_the_most_bought_for_a_product_without_behaviour(tmp_path):
    """p3 has no co-purchase event; p7 is the most bought product (50 events in), ranked last by
    the model. With a popularity weight on bucket 0 p3's list starts with p7; p1 (51 events:
    bucket 1, weight 0) keeps the model's order; without the term p3's list is the model's."""
    from autoknow_ray.modules.related.steps import Recommend

    emb = _prior_tables(tmp_path)
    lists = {}
    for pop in (None, [100.0, 0.0]):
        rec = Recommend(tmp_path / "emb", 3, 1000, 8, 0, tmp_path / "nb", 0.0, 4, [0, 1], [0.0, 0.0], pop)
        rec.setup(WorkerEnv())
        out = pl.from_arrow(rec.process_batch(emb))
        lists[pop is None] = {p: out.filter(pl.col("product_id") == p).sort("rank")["related_id"].to_list()
                              for p in ("p3", "p1")}
    assert lists[True]["p3"] == ["p0", "p1", "p2"]
    assert lists[False]["p3"] == ["p7", "p0", "p1"]
    assert lists[False]["p1"] == lists[True]["p1"] == ["p0", "p2", "p3"]


def test_neighbour_term_says_what_products_like_a_new_one_were_bought_with():
    """Products 0 and 1 are alike (similar products); 1 was bought with 4 three times, 5 (the most
    bought product) was bought with others. The held-out pair 0 -> 4: 0 has no event of its
    own, the model and popularity put 4 low, what 0's similar product was bought with puts it
    first: bucket 0 takes the neighbour term, and 4 ranks first."""
    from autoknow_ray.modules.related.fit import Validation

    n = 7
    S = np.eye(n, 3, dtype=np.float32)
    T = np.zeros((n, 3), np.float32)
    T[6, 0] = 1.0  # the model puts 6 first for 0
    train = (np.array([1, 2, 3, 2]), np.array([4, 5, 5, 6]), np.array([3.0, 5.0, 5.0, 1.0]))
    val = Validation(n, np.array([0]), np.array([4]), train, 10, np.random.default_rng(0))
    similar = np.full((n, 2), -1)
    similar[0] = [1, -1]
    val.set_similar(similar)
    nc = val.neighbour_counts(np.array([0]))
    assert nc.shape == (1, n) and nc[0, 4] == pytest.approx(np.log1p(3.0)) and nc[0, 5] == 0.0
    assert val.ranks(S, T, 0.0).tolist() == [2] and val.ranks(S, T, 0.0, 0.0, 10.0).tolist() == [1]
    pick = val.best_terms_by_bucket(S, T, [0.0, 0.0], [0.0, 1.0, 100.0], [0, 1], min_pairs=1,
                                    cold=(S, T), k=1)
    zero = pick["buckets"]["0-0"]
    assert zero["neighbour_multiple"] > 0 and zero["hr@1"] == 1.0 and zero["hr@1_model_alone"] == 0.0
    assert zero["hr@1_popularity"] == 0.0  # 5 is the most bought: popularity answers it


def test_recommend_lists_what_similar_products_were_bought_with(tmp_path):
    """p3 has no co-purchase event but is similar to p1, bought with p7 50 times: with a
    neighbour weight on bucket 0 p3's list starts with p7 (the model ranks p7 last); without it
    p3's list is the model's."""
    from autoknow_ray.modules.related.steps import Recommend

    emb = _prior_tables(tmp_path)
    nb = pq.read_table(tmp_path / "nb" / "part.parquet")
    pq.write_table(pa.concat_tables([nb, pa.table({
        "product_id": ["p3"], "kind": ["similar"], "neighbours": [["p1"]], "weights": [[0.9]],
        "weight_sum": [0.9]}).cast(nb.schema)]), tmp_path / "nb" / "part.parquet")
    mark_complete(tmp_path / "nb")
    lists = {}
    for nbw in (None, [100.0, 0.0]):
        rec = Recommend(tmp_path / "emb", 3, 1000, 8, 0, tmp_path / "nb", 0.0, 4, [0, 1], [0.0, 0.0],
                        None, nbw, fanout=2)
        rec.setup(WorkerEnv())
        out = pl.from_arrow(rec.process_batch(emb))
        lists[nbw is None] = out.filter(pl.col("product_id") == "p3").sort("rank")["related_id"].to_list()
    assert lists[True] == ["p0", "p1", "p2"]
    assert lists[False][0] == "p7"


def test_walk_term_finds_what_a_products_partners_were_bought_with():
    """0 was bought with 1 (5 times) and 2 (once); 1 was bought with 3 (4 times), 2 with 4 (4
    times); 5 is the most bought product. The held-out pair 0 -> 3 was never bought: counts and
    popularity cannot rank it, the walk (0 -> 1 -> 3: 5/6 * 4/9) ranks 3 first, above 4
    (0 -> 2 -> 4: 1/6 * 4/5), and the step matrix is the stage's capped lists: with width 1 the
    weaker partner 2 is not a step from 0."""
    from autoknow_ray.modules.related.fit import Validation, walk_step_matrix
    from autoknow_ray.modules.related.model import WALK_SCALE

    n = 8
    S = np.zeros((n, 2), np.float32)
    T = np.zeros((n, 2), np.float32)
    train = (np.array([0, 0, 1, 2, 6, 7]), np.array([1, 2, 3, 4, 5, 5]),
             np.array([5.0, 1.0, 4.0, 4.0, 9.0, 9.0]))
    step = walk_step_matrix(n, *train, 20).toarray()
    assert step[0, 1] == pytest.approx(5 / 6) and step[1, 3] == pytest.approx(4 / 9)
    assert step[1, 0] == pytest.approx(5 / 9) and step[0, 3] == 0.0
    assert walk_step_matrix(n, *train, 1).toarray()[0, 2] == 0.0
    val = Validation(n, np.array([0]), np.array([3]), train, 10, np.random.default_rng(0))
    val.set_walk(20)
    w = val.walk(0, np.array([0]))
    assert w[0, 3] == pytest.approx(np.log1p(WALK_SCALE * 5 / 6 * 4 / 9))
    assert w[0, 3] > w[0, 4] > 0 and w[0, 5] == 0.0
    assert val.ranks(S, T, 1.0, 1.0).tolist() != [1]  # counts and popularity: 5 and 1 first
    assert val.ranks(S, T, 0.0, 0.0, 0.0, 1.0).tolist() == [1]
    pick = val.best_terms_by_bucket(S, T, [1.0, 1.0], [0.0, 1.0, 100.0], [0, 1], min_pairs=1,
                                    cold=(S, T), neighbours=False, popularity=False, walk=True, k=1)
    assert pick["walk_weights"][0] == 0.0 and pick["walk_weights"][1] > 0  # no walk from a new listing
    assert pick["buckets"]["1+"]["hr@1"] == 1.0 and pick["buckets"]["1+"]["hr@1_count_prior_alone"] == 0.0


def test_recommend_lists_what_a_products_partners_were_bought_with(tmp_path):
    """p0's partners p1 and p2 were bought with p5 (never with p0): with a walk weight p0's list
    starts with p5, scored with the walk `model.walk_lists` gives over the node tables; without
    it p0's list is the count prior's and the model's."""
    from autoknow_ray.modules.related.model import WALK_SCALE
    from autoknow_ray.modules.related.steps import Recommend, _fixed

    ids = [f"p{i}" for i in range(8)]
    emb = tmp_path / "emb"
    emb.mkdir()
    src = np.zeros((8, 2))
    tgt = np.zeros((8, 2))
    src[:, 0] = 1.0
    tgt[:, 0] = np.linspace(0.8, 0.1, 8)  # the model: p0, p1, p2, ... in order, p5 sixth
    pq.write_table(pa.table({"product_id": ids, "source": _fixed(src), "target": _fixed(tgt)}),
                   emb / "part.parquet")
    mark_complete(emb)
    rows = [("p0", "out", ["p1", "p2"], [3.0, 1.0]), ("p1", "in", ["p0"], [3.0]),
            ("p2", "in", ["p0"], [1.0]), ("p1", "out", ["p5"], [2.0]), ("p2", "out", ["p5", "p6"], [2.0, 2.0]),
            ("p5", "in", ["p1", "p2"], [2.0, 2.0]), ("p6", "in", ["p2"], [2.0])]
    nb = tmp_path / "nb"
    nb.mkdir()
    pq.write_table(pa.table({"product_id": [r[0] for r in rows], "kind": [r[1] for r in rows],
                             "neighbours": [r[2] for r in rows], "weights": [r[3] for r in rows],
                             "weight_sum": [float(sum(r[3])) for r in rows]}), nb / "part.parquet")
    mark_complete(nb)
    sources = pa.table({"product_id": ids, "source": _fixed(src)})
    lists = {}
    for walk in (None, [0.0, 1.0]):
        rec = Recommend(emb, 3, 1000, 8, 0, nb, 0.0, 4, [0, 1], [0.5, 0.5], walk_bucket_weights=walk)
        assert rec.uses_walk == (walk is not None)
        rec.setup(WorkerEnv())
        out = pl.from_arrow(rec.process_batch(sources)).filter(pl.col("product_id") == "p0").sort("rank")
        lists[walk is None] = out
    assert lists[True]["related_id"].to_list() == ["p1", "p2", "p3"]
    got = lists[False]
    assert got["related_id"].to_list()[0] == "p5"
    # p0 -> p1 (3/4) -> p5 (2/5) plus p0 -> p2 (1/4) -> p5 (2/5): the model's 0.8 - 5 * 0.1 (as the
    # fp16 embeddings hold it) plus the walk
    walk = 3 / 4 * 2 / 5 + 1 / 4 * 2 / 5
    assert got["score"][0] == pytest.approx(float(np.float16(tgt[5, 0])) + np.log1p(WALK_SCALE * walk), rel=1e-6)


def test_summed_lists_sum_each_id_once_whatever_the_order():
    """`summed_lists` gives each row's ids once with their weights summed (padding ignored), the
    same floats whatever order the entries come in, and `list_weights` reads the summed lists
    as it reads the raw ones."""
    from autoknow_ray.modules.related.model import list_weights, summed_lists

    rng = np.random.default_rng(3)
    ids = rng.integers(-1, 12, (40, 60))
    w = rng.random((40, 60)) * 10.0 ** rng.integers(-3, 3, (40, 60))
    ui, uw = summed_lists(ids, w)
    for r in range(40):
        want = {}
        for i, x in zip(ids[r], w[r]):
            if i >= 0:
                want[int(i)] = want.get(int(i), 0.0) + x
        got = {int(i): x for i, x in zip(ui[r], uw[r]) if i >= 0}
        assert got.keys() == want.keys() and len(got) == (ui[r] >= 0).sum()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-12)
    perm = rng.permutation(60)
    pi, pw = summed_lists(ids[:, perm], w[:, perm])
    assert np.array_equal(pi, ui) and np.array_equal(pw, uw)  # the same bits
    cand = rng.integers(-1, 12, (40, 15))
    assert np.array_equal(list_weights(cand, ui, uw), list_weights(cand, ids, w))


def test_neighbour_lists_of_a_block_equal_those_built_node_by_node():
    """`top_neighbours` ranks a whole block at once; it must give each node what ranking its
    own edges alone gives: an edge listed twice counts once at its larger weight, the strongest
    first, ties by neighbour id, at most `fanout`, and the sum over distinct neighbours."""
    from autoknow_ray.modules.related.graph_build import NEIGHBOURS_SCHEMA, top_neighbours

    rng = np.random.default_rng(0)
    n = 3000
    src = [f"p{i}" for i in rng.integers(0, 150, n)]
    dst = [f"p{i}" for i in rng.integers(0, 400, n)]
    count = rng.integers(1, 6, n)  # few values: many ties, broken by id
    t = pa.table({"src": src, "dst": dst, "count": pa.array(count, pa.int64())})
    got = top_neighbours(t, "out", "src", "dst", "count", 7)
    assert got.schema == NEIGHBOURS_SCHEMA
    got = {r["product_id"]: r for r in got.to_pylist()}
    df = pl.from_arrow(t)
    assert len(got) == df["src"].n_unique()
    for (node,), rows in df.group_by(["src"]):
        best = rows.group_by("dst").agg(pl.col("count").max()).sort(["count", "dst"], descending=[True, False])
        r = got[node]
        assert r["kind"] == "out"
        assert r["neighbours"] == best["dst"].head(7).to_list()
        assert r["weights"] == [float(w) for w in best["count"].head(7)]
        assert r["weight_sum"] == float(best["count"].sum())


def test_related_steps_run_in_actor_pools(tmp_path):
    """The steps that load a model or every node's tables run in actor pools (one setup() per
    actor): a step keeping its loaded model in `self.model` turned the flag off, and the stage
    ran them as tasks, loading the model and tables again for every batch."""
    from autoknow_ray.modules.related.steps import (CheckEdges, DualEmbed, EmbedProducts, Recommend,
                                                    TextNeighbours)
    from autoknow_ray.runtime import hosts_model

    steps = [CheckEdges(tmp_path, "src", "dst", "count"), EmbedProducts("default", 32, 16, tmp_path),
             EmbedProducts("default", 32, 16, None), TextNeighbours(tmp_path, 5, 100, 4, 0),
             DualEmbed(tmp_path, tmp_path, tmp_path, 3), Recommend(tmp_path, 5, 100, 4, 0)]
    assert [hosts_model(s) for s in steps] == [True] * len(steps)
    plain = CheckEdges(tmp_path, "src", "dst", "count")
    plain.model = None  # an attribute of that name set by a step does not turn the pool off
    assert hosts_model(plain)


def test_text_neighbours_do_not_depend_on_shard_order_or_batches(tmp_path):
    """Title neighbours are the same whatever order the node shards were written in and however
    the products are batched: ties (identical titles) go to the smaller product id, and scores
    are each pair's own inner product, not FAISS's batch-dependent last bits."""
    from autoknow_ray.modules.related.steps import TEXT_DIM, TextNeighbours, _fixed

    rng = np.random.default_rng(0)
    n = 300
    vecs = rng.standard_normal((n, TEXT_DIM)).astype(np.float32)
    vecs[100:150] = vecs[50:100]  # identical titles: exact ties
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.array([f"p{i:04d}" for i in range(n)])

    def write(folder, order):
        folder.mkdir()
        for j, part in enumerate(np.array_split(order, 3)):
            pq.write_table(pa.table({"product_id": ids[part], "text": _fixed(vecs[part])}), folder / f"{j}.parquet")
        mark_complete(folder)

    results = []
    for name, order, size in (("a", np.arange(n), 64), ("b", rng.permutation(n), 77)):
        write(tmp_path / name, order)
        step = TextNeighbours(tmp_path / name, 5, 10_000, 8, 0)
        step.setup(WorkerEnv())
        batch = pa.table({"product_id": ids[order], "text": _fixed(vecs[order])})
        out = pa.concat_tables([step.process_batch(batch.slice(i, size)) for i in range(0, n, size)])
        results.append(pl.from_arrow(out).sort(["src", "dst"]))
    assert results[0].equals(results[1])
    # p0050's twin p0100 is its nearest; p0100's nearest is p0050 (itself left out)
    first = results[0].sort(["src", "weight"], descending=[False, True]).group_by("src", maintain_order=True).first()
    nearest = dict(zip(first["src"].to_list(), first["dst"].to_list()))
    assert nearest["p0050"] == "p0100" and nearest["p0100"] == "p0050"


def test_an_incremental_rebuild_reuses_title_vectors_and_gives_the_full_rebuilds_lists(end_to_end, tmp_path):
    """`rebuild --previous`: the related stage's per-product title vectors and h0 are reused for
    every product whose title and type are unchanged, recomputed for the rest, and the related
    lists are those of a full rebuild of the same catalogue with the same model. A is the
    end-to-end fixture's catalogue, and its rebuild (a fit with this config, then the stage) is
    A's full rebuild and model: B is rebuilt from it incrementally and in full."""
    import json

    n, edited, removed, added = 120, [10, 11, 50], 4, 3
    base = _products(n + added)
    edges = _one_way_copurchase(n)

    def write(folder, products):
        folder.mkdir()
        pq.write_table(products, folder / "products.parquet")
        pq.write_table(pa.table({"type": ["phone", "phone case", "laptop", "laptop bag"],
                                 "parent": [None] * 4},
                                schema=pa.schema([("type", pa.string()), ("parent", pa.string())])),
                       folder / "taxonomy.parquet")
        pq.write_table(edges, folder / "copurchase.parquet")

    a = base.slice(0, n)
    titles = a.column("title").to_pylist()
    for i in edited:  # another product's title: its vector changes
        titles[i] = f"Brand9 laptop bag model {1000 + i}"
    b = pa.concat_tables([a.set_column(1, "title", pa.array(titles)).slice(removed),
                          base.slice(n, added)])
    write(tmp_path / "b", b)
    # A: the end-to-end fixture's catalogue (the same products, taxonomy and co-purchases)
    cat_a, run_a = end_to_end
    assert pq.read_table(cat_a / "products.parquet").equals(a)
    assert pq.read_table(cat_a / "copurchase.parquet").equals(edges)
    runs = {"run_a": run_a, "run_inc": tmp_path / "run_inc", "run_full": tmp_path / "run_full"}
    cfg = _config()
    for out, previous in (("run_inc", run_a), ("run_full", None)):
        rebuild(tmp_path / "b", runs[out], models=run_a / "models", config=cfg, previous=previous)

    def manifest(run):
        return json.loads((runs[run] / "related" / "manifest.json").read_text())

    inc, full = manifest("run_inc"), manifest("run_full")
    assert manifest("run_a")["model"] == "dual-gnn"
    assert inc["products_reused"] == n - removed - len(edited)
    assert inc["products_recomputed"] == len(edited) + added
    assert inc["products_added"] == added and inc["products_removed"] == removed
    assert full["products_reused"] == 0 and full["products_recomputed"] == n - removed + added
    cols = ["product_id", "cache_key", "text", "type_bucket", "h0"]
    cache = {r: read_parquet_any(runs[r] / "related" / "cache" / "related_embed", cols)
             .sort("product_id") for r in ("run_a", "run_inc", "run_full")}
    assert cache["run_inc"].equals(cache["run_full"])
    # the edits mattered: an edited product's vector is not the one cached in A
    ids = [f"p{i}" for i in edited]
    old = cache["run_a"].filter(pl.col("product_id").is_in(ids))
    new = cache["run_full"].filter(pl.col("product_id").is_in(ids))
    assert not old["text"].equals(new["text"]) and not old["h0"].equals(new["h0"])

    def lists(run):
        t = read_parquet_any(table_file(runs[run] / "graph", "related"))
        return t.sort(["product_id", "rank"])

    got, want = lists("run_inc"), lists("run_full")
    assert want.height == (n - removed + added) * 5
    assert got.equals(want)


@pytest.mark.parametrize("symmetric", [False, True])
def test_sharded_two_hop_embeddings_equal_the_in_memory_ones(tmp_path, ray_session, symmetric):
    """Above `max_nodes_per_actor` the stage embeds over shards of the node vectors
    (related/sharded.py): on a random graph (neighbours outside the node table, lists longer than
    the fanout, nodes with no edge, a neighbour list of a product that is not a node), 3 shards
    give each node the source and target embeddings `DualEmbed` gives holding every node."""
    from autoknow_ray.modules.related.model import DualGNN, save
    from autoknow_ray.modules.related.sharded import dual_embed_sharded, shard_of
    from autoknow_ray.modules.related.steps import DualEmbed, _fixed

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    s = GNNSettings(type_buckets=8, type_dim=4, dim=8, fanout=3, symmetric=symmetric)
    save(DualGNN(s), tmp_path / "model")
    n = 60
    rng = np.random.default_rng(1)
    ids = [f"p{i}" for i in range(n)]
    (tmp_path / "nodes").mkdir()
    for part in range(3):  # written in shards, not in id order
        rows = list(range(part, n, 3))
        pq.write_table(pa.table({"product_id": [ids[r] for r in rows],
                                 "h0": _fixed(rng.normal(size=(len(rows), 8)))}),
                       tmp_path / "nodes" / f"part{part}.parquet")
    mark_complete(tmp_path / "nodes")
    nb_rows = {"product_id": [], "kind": [], "neighbours": [], "weight_sum": []}
    for i in range(n - 10):  # the last ten have no edges
        for kind in ("out", "in", "similar"):
            if rng.random() < 0.3:
                continue
            k = int(rng.integers(1, 6))  # up to 5: longer than the fanout (3)
            nbs = [ids[j] for j in rng.choice(n, k, replace=False)]
            if rng.random() < 0.2:
                nbs.insert(int(rng.integers(0, len(nbs))), "ghost")  # unknown: keeps its slot
            nb_rows["product_id"].append(ids[i]), nb_rows["kind"].append(kind)
            nb_rows["neighbours"].append(nbs), nb_rows["weight_sum"].append(float(rng.integers(1, 9)))
    nb_rows["product_id"].append("not-a-node"), nb_rows["kind"].append("out")
    nb_rows["neighbours"].append(["p1"]), nb_rows["weight_sum"].append(2.0)
    (tmp_path / "nb").mkdir()
    pq.write_table(pa.table(nb_rows), tmp_path / "nb" / "part.parquet")
    mark_complete(tmp_path / "nb")

    embed = DualEmbed(tmp_path / "model", tmp_path / "nodes", tmp_path / "nb", 3)
    embed.setup(WorkerEnv())
    want = pl.from_arrow(embed.process_batch(pa.table({"product_id": ids}))).sort("product_id")

    assert len(set(shard_of(ids, 3).tolist())) == 3
    cfg = Config(related=RelatedConfig(max_nodes_per_actor=20, fanout=3))
    info = dual_embed_sharded(cfg, tmp_path / "model", tmp_path / "nodes", tmp_path / "nb",
                              tmp_path / "work", tmp_path / "emb", n)
    assert info["shards"] == 3
    got = read_parquet_any(tmp_path / "emb").sort("product_id")
    assert got["product_id"].to_list() == want["product_id"].to_list()  # every node once, no other
    for col in ("source", "target"):
        a, b = np.array(got[col].to_list(), float), np.array(want[col].to_list(), float)
        assert np.abs(b).max() > 0.05  # the embeddings are not all zero
        np.testing.assert_allclose(a, b, atol=2e-3, rtol=2e-3)
    # the scratch tables are gone
    assert not any((tmp_path / "work").glob("dual_*"))


def test_write_by_shard_gives_each_shard_worker_only_its_own_rows(tmp_path, ray_session):
    """The sharded pass writes a hop's vectors once, one folder per shard, so a shard's worker
    reads its own rows and not every file of the table (related/sharded.py)."""
    from autoknow_ray.modules.related.sharded import read_shard, shard_folder, shard_of, write_by_shard

    ids = [f"p{i}" for i in range(90)]
    src = tmp_path / "nodes"
    src.mkdir()
    for part in range(3):
        rows = ids[part::3]
        pq.write_table(pa.table({"product_id": rows, "h0": [[float(i)] * 4 for i in range(len(rows))]}),
                       src / f"{part}.parquet")
    mark_complete(src)
    write_by_shard(src, ["h0"], 4, tmp_path / "by_shard")
    shard = dict(zip(ids, shard_of(ids, 4).tolist()))
    seen = []
    for s in range(4):
        files = list(shard_folder(tmp_path / "by_shard", s).rglob("*.parquet"))
        assert files
        in_files = [i for f in files for i in pq.read_table(f, columns=["product_id"])["product_id"].to_pylist()]
        assert sorted(in_files) == sorted(i for i in ids if shard[i] == s)  # its rows, no other
        t = read_shard(shard_folder(tmp_path / "by_shard", s), ["h0"], s, 4)
        assert t["product_id"].to_pylist() == sorted(in_files) and t.num_rows == len(t["h0"])
        seen += in_files
    assert sorted(seen) == sorted(ids)  # every row once
    assert read_shard(shard_folder(tmp_path / "by_shard", 9), ["h0"], 9, 10).num_rows == 0


def test_sharded_title_neighbours_equal_one_index_over_every_product(tmp_path, ray_session):
    """Above `max_nodes_per_actor` each title-kNN worker indexes one shard of the products and the
    shards' lists are merged per product (related/sharded.py): the similarity edges equal those of
    one index over every product, exact ties (identical titles) included."""
    from autoknow_ray.modules.related import graph_build as gb
    from autoknow_ray.modules.related.steps import TEXT_DIM, TextNeighbours, _fixed

    rng = np.random.default_rng(3)
    n = 240
    vecs = rng.standard_normal((n, TEXT_DIM)).astype(np.float32)
    vecs[100:140] = vecs[40:80]  # identical titles: exact ties across shards
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.array([f"p{i:04d}" for i in range(n)])
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    for j, part in enumerate(np.array_split(rng.permutation(n), 3)):
        pq.write_table(pa.table({"product_id": ids[part], "text": _fixed(vecs[part])}), nodes / f"{j}.parquet")
    mark_complete(nodes)
    one = TextNeighbours(nodes, 5, 10_000, 8, 0)
    one.setup(WorkerEnv())
    want = pl.from_arrow(one.process_batch(pa.table({"product_id": ids, "text": _fixed(vecs)})))

    cfg = Config(related=RelatedConfig(text_knn=5, max_nodes_per_actor=100))
    out = tmp_path / "run"
    out.mkdir()
    added = gb.text_edges(cfg, nodes, out, n)
    got = read_parquet_any(out / gb.SIMILAR_EDGES).select("src", "dst", "weight")
    assert added == 2 * want.height == got.height
    both = pl.concat([want, want.select(pl.col("dst").alias("src"), pl.col("src").alias("dst"), "weight")])
    assert got.sort(["src", "dst", "weight"]).equals(both.sort(["src", "dst", "weight"]))
    assert not (out / "text_knn_partials").exists() and not (out / "text_knn_vectors").exists()


@pytest.mark.parametrize("correct", [True, False])
def test_sampled_softmax_with_the_logq_correction_learns_the_full_softmax(correct):
    """Known answer: products bought with probability p, negatives drawn half by popularity. With
    the correction the learnt scores are log p up to a constant (the full softmax's optimum);
    without it they learn p over the sampling rate, which flattens what popularity says."""
    from autoknow_ray.modules.related.fit import _contrastive

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    m = 200
    p = 1.0 / np.arange(1, m + 1) ** 1.1  # a long tail, product 0 the best-seller
    p /= p.sum()
    pop = p ** 0.75
    q = 0.5 / m + 0.5 * pop / pop.sum()  # one negative draw's chance of each product
    log_q = torch.from_numpy(np.log(q).astype(np.float32)) if correct else None
    theta = torch.zeros(m, 1, requires_grad=True)  # one learnt score per product
    opt = torch.optim.Adam([theta], lr=0.05)
    query = torch.ones(256, 1)
    for _ in range(600):
        b = rng.choice(m, 256, p=p)
        negs = np.concatenate([rng.choice(m, 32, p=pop / pop.sum()), rng.integers(0, m, 32)])
        loss = _contrastive(query, theta[b], theta[negs], b, negs, False, log_q)
        opt.zero_grad()
        loss.backward()
        opt.step()
    learnt = theta.detach().numpy()[:, 0]
    # over the products bought often enough to learn: the slope of the learnt scores on log p
    # (1 where they are log p up to a constant; the uncorrected optimum log p - log q is flatter)
    head = slice(0, 50)
    slope = np.polyfit(np.log(p[head]), learnt[head], 1)[0]
    print(f"correction {correct}: slope {slope:.3f}")
    if correct:
        assert 0.85 < slope < 1.15
    else:
        assert slope < 0.6


# ---- the top-k search over shards of the targets (related/sharded.py, `recommend_sharded`)
REC_PRIOR = {"prior_buckets": [0, 2, 6], "prior_bucket_weights": [0.3, 0.8, 1.5],
             "popularity_bucket_weights": [0.9, 0.4, 0.2], "neighbour_bucket_weights": [1.2, 0.6, 0.3],
             "walk_bucket_weights": [0.0, 0.7, 0.5]}


def _recommend_tables(tmp_path, n=300, dim=8, seed=5):
    """Random source and target embeddings of `n` products (written in three parts, not in id
    order) and a neighbour table: co-purchase lists out and in with their counts, longer than
    the re-ranked width, some naming products outside the catalogue, similar-product lists, the
    last 40 products with no list, and a list of a product that is not in the catalogue."""
    from autoknow_ray.modules.related.steps import _fixed

    rng = np.random.default_rng(seed)
    ids = [f"p{i:03d}" for i in range(n)]
    emb = tmp_path / "emb"
    emb.mkdir()
    src, tgt = rng.normal(size=(n, dim)), rng.normal(size=(n, dim))
    for j, part in enumerate(np.array_split(rng.permutation(n), 3)):
        pq.write_table(pa.table({"product_id": [ids[i] for i in part], "source": _fixed(src[part]),
                                 "target": _fixed(tgt[part])}), emb / f"{j}.parquet")
    mark_complete(emb)
    rows = {"product_id": [], "kind": [], "neighbours": [], "weights": [], "weight_sum": []}
    # a few best-sellers: most lists name them
    hot = rng.choice(n, 12, replace=False)
    for i in range(n - 40):
        for kind in ("out", "in", "similar"):
            if rng.random() < 0.25:
                continue
            k = int(rng.integers(1, 12))
            pool = np.concatenate([hot, rng.choice(n, 30, replace=False)])
            nbs = [ids[j] for j in dict.fromkeys(rng.choice(pool, k).tolist()) if j != i]
            if rng.random() < 0.2:
                nbs.insert(int(rng.integers(0, len(nbs) + 1)), "ghost")
            if not nbs:
                continue
            w = sorted(rng.integers(1, 30, len(nbs)).astype(float).tolist(), reverse=True)
            rows["product_id"].append(ids[i]), rows["kind"].append(kind)
            rows["neighbours"].append(nbs), rows["weights"].append(w)
            rows["weight_sum"].append(float(sum(w)) + float(rng.integers(0, 5)))
    for kind in ("out", "in"):
        rows["product_id"].append("not-a-product"), rows["kind"].append(kind)
        rows["neighbours"].append([ids[0]]), rows["weights"].append([3.0]), rows["weight_sum"].append(3.0)
    nb = tmp_path / "nb"
    nb.mkdir()
    pq.write_table(pa.table(rows), nb / "part.parquet")
    mark_complete(nb)
    return ids, emb, nb


@pytest.mark.parametrize("with_prior", [True, False])
def test_sharded_recommend_gives_the_in_memory_lists(tmp_path, ray_session, with_prior):
    """Above `max_nodes_per_actor` the top-k search runs over 3 shards of the targets, each
    source row carrying its co-purchase lists and those of its similar products
    (`recommend_sharded`): with the count prior, popularity and neighbour terms all weighing in
    (candidates from every shard, from the lists, the most bought), and without a prior (plain
    FAISS top k), the lists equal those of `Recommend` holding every product."""
    from autoknow_ray.modules.related.sharded import recommend_sharded, shard_of
    from autoknow_ray.modules.related.steps import Recommend

    ids, emb, nb = _recommend_tables(tmp_path)
    n, k = len(ids), 5
    terms = REC_PRIOR if with_prior else {}
    rec = Recommend(emb, k, 10_000, 8, 0, nb, 0.0, 6 if with_prior else 0, terms.get("prior_buckets"),
                    terms.get("prior_bucket_weights"), terms.get("popularity_bucket_weights"),
                    terms.get("neighbour_bucket_weights"), fanout=4,
                    walk_bucket_weights=terms.get("walk_bucket_weights"))
    assert rec.uses_prior == rec.uses_popularity == rec.uses_neighbours == rec.uses_walk == with_prior
    one = Recommend(emb, k, 10_000, 8, 0, nb, 0.0, 6 if with_prior else 0, **{
        "prior_buckets": terms.get("prior_buckets"), "prior_bucket_weights": terms.get("prior_bucket_weights"),
        "popularity_bucket_weights": terms.get("popularity_bucket_weights"),
        "neighbour_bucket_weights": terms.get("neighbour_bucket_weights"),
        "walk_bucket_weights": terms.get("walk_bucket_weights")}, fanout=4)
    one.setup(WorkerEnv())
    if with_prior:  # no second copy of the targets beside an exact index
        assert not one.targets.flags.owndata and one.targets.shape == (n, 8)
    sources = read_parquet_any(emb).select("product_id", "source").to_arrow()
    want = pl.from_arrow(one.process_batch(sources)).sort(["product_id", "rank"])

    assert len(set(shard_of(ids, 3).tolist())) == 3
    cfg = Config(related=RelatedConfig(max_nodes_per_actor=100, top_k=k, fanout=4))
    out = tmp_path / "run"
    out.mkdir()
    info = recommend_sharded(cfg, rec, out, out / "graph_related", n)
    assert info["shards"] == 3 and info["popular"] == (k + 1 if with_prior else 0)
    got = read_parquet_any(out / "graph_related").sort(["product_id", "rank"])
    assert got.height == want.height == n * k
    assert got.select("product_id", "related_id", "rank").equals(want.select("product_id", "related_id", "rank"))
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-5)
    assert sorted(p.name for p in out.iterdir()) == ["graph_related"]  # the scratch tables are gone
    if with_prior:  # the terms move the lists: not the model's plain top k
        plain = Recommend(emb, k, 10_000, 8, 0)
        plain.setup(WorkerEnv())
        model = pl.from_arrow(plain.process_batch(sources)).sort(["product_id", "rank"])
        moved = (model["related_id"] != got["related_id"]).mean()
        assert moved > 0.3


def test_a_recommend_shard_worker_holds_only_its_shards_targets(tmp_path, ray_session):
    """A shard worker of the sharded top-k search indexes the targets of its shard only and
    holds the bought counts of those products alone; a source's candidates it lists are all
    products of its shard."""
    from autoknow_ray.modules.related.sharded import (RecommendShard, shard_folder, shard_of,
                                                      write_by_shard)
    from autoknow_ray.modules.related.steps import Recommend

    ids, emb, nb = _recommend_tables(tmp_path, n=120)
    rec = Recommend(emb, 5, 10_000, 8, 0, nb, 0.0, 6, **REC_PRIOR, fanout=4)
    write_by_shard(emb, ["target"], 3, tmp_path / "targets")
    shard = dict(zip(ids, shard_of(ids, 3).tolist()))
    sources = read_parquet_any(emb).select("product_id", "source").to_arrow()
    for s in range(3):
        step = RecommendShard(Recommend(emb, 5, 10_000, 8, 0), shard_folder(tmp_path / "targets", s),
                              None, s, 3)
        step.setup(WorkerEnv())
        mine = sorted(i for i in ids if shard[i] == s)
        assert step.ids.to_pylist() == mine and step.index.ntotal == len(mine)
        got = pl.from_arrow(step.process_batch(sources))
        assert set(got["dst"].to_list()) <= set(mine) and got.height == len(ids) * 6
        with_prior = RecommendShard(rec, shard_folder(tmp_path / "targets", s), None, s, 3,
                                    popular=ids[:6])
        with_prior.setup(WorkerEnv())
        assert with_prior.targets.shape == (len(mine), 8) and len(with_prior.bought) == len(mine)
        assert (with_prior.popular_rows >= 0).sum() == sum(shard[i] == s for i in ids[:6])


def test_a_rebuild_over_shards_lists_what_one_recommend_lists(end_to_end, tmp_path):
    """A rebuild above `max_nodes_per_actor` (3 shards) with a trained model whose count prior,
    popularity and neighbour terms all weigh in: the stage's related lists are those `Recommend`
    gives holding every product of the run's own embeddings and neighbour lists."""
    import json
    import shutil

    from autoknow_ray.modules.related.steps import Recommend

    n = 120
    # the model the end-to-end rebuild fitted on the same catalogue (fit reads no shard setting)
    cat, fitted = end_to_end
    cfg = _config(max_nodes_per_actor=50)
    models = tmp_path / "models"
    shutil.copytree(fitted / "models", models)
    settings = json.loads((models / "related" / "config.json").read_text())
    settings.update(prior_buckets=[0, 1, 3], prior_bucket_weights=[0.4, 0.8, 1.6],
                    popularity_bucket_weights=[0.6, 0.3, 0.1], neighbour_bucket_weights=[0.9, 0.5, 0.2],
                    walk_bucket_weights=[0.0, 0.6, 0.3])
    (models / "related" / "config.json").write_text(json.dumps(settings))
    run = tmp_path / "run"
    rebuild(cat, run, models=models, config=cfg)
    manifest = json.loads((run / "related" / "manifest.json").read_text())
    assert manifest["recommend"]["shards"] == 3 and manifest["neighbour_bucket_weights"] == [0.9, 0.5, 0.2]
    assert manifest["walk_bucket_weights"] == [0.0, 0.6, 0.3]
    stage = run / "related"
    rc = cfg.related
    one = Recommend(stage / "embeddings", rc.top_k, rc.ivf_min_size, rc.nprobe, cfg.seed,
                    stage / "neighbours", 0.0, rc.prior_candidates, settings["prior_buckets"],
                    settings["prior_bucket_weights"], settings["popularity_bucket_weights"],
                    settings["neighbour_bucket_weights"], rc.fanout, settings["walk_bucket_weights"])
    assert one.uses_walk
    one.setup(WorkerEnv())
    want = pl.from_arrow(one.process_batch(
        read_parquet_any(stage / "embeddings").select("product_id", "source").to_arrow())).sort(["product_id", "rank"])
    got = read_parquet_any(stage / "graph_related").sort(["product_id", "rank"])
    assert got.height == want.height == n * rc.top_k
    assert got.select("product_id", "related_id", "rank").equals(want.select("product_id", "related_id", "rank"))
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-5)


def test_embed_products_reads_module_1s_title_vectors_and_they_are_its_own(tmp_path):
    """Module 1's title vectors (`EmbedTitles`) are what `EmbedProducts` would encode at the same
    length and precision; given them in a column it reads them, builds no encoder, and encodes
    only a row that lacks one."""
    from autoknow_ray.modules.related.model import DualGNN, save
    from autoknow_ray.modules.related.steps import TEXT_DIM, EmbedProducts
    from autoknow_ray.nn.encoder import TITLE_MAX_LENGTH, EmbedTitles

    save(DualGNN(GNNSettings(type_buckets=8, type_dim=4, dim=8)), tmp_path / "model")
    titles = ["Brand1 phone 128 GB black", "Brand2 laptop bag, 15 inch, grey",
              "A long title " + " ".join(f"word{i}" for i in range(50)), "Brand3 phone case"]
    batch = pa.table({"product_id": [f"p{i}" for i in range(4)], "title": titles,
                      "type": ["phone", "laptop bag", None, "phone case"]})
    env = WorkerEnv()
    titles_step = EmbedTitles("default", bf16=False)
    titles_step.setup(env)
    vectors = titles_step.process_batch(batch.select(["product_id", "title"])).column("embedding")
    assert vectors.type.list_size == TEXT_DIM

    encoding = EmbedProducts("default", TITLE_MAX_LENGTH, 8, tmp_path / "model")
    encoding.setup(env)
    encoding.encoder.bf16 = False
    encoded = encoding.process_batch(batch)
    # the same vectors module 1 wrote (fp16 both): the stage has nothing to encode again
    assert encoded.column("text").to_pylist() == vectors.to_pylist()

    reading = EmbedProducts("default", TITLE_MAX_LENGTH, 8, tmp_path / "model",
                            vector_column="title_vector")
    assert "title_vector" in reading.columns
    reading.setup(env)
    assert reading.encoder is None  # no encoder loaded
    given = batch.append_column("title_vector", vectors)
    read = reading.process_batch(given)
    assert reading.encoder is None
    assert read.equals(encoded)  # text, type bucket and h0 alike
    # a row without a vector (a title module 1 did not embed) is encoded, the others read
    missing = given.set_column(3, "title_vector", pa.array(
        [v if i != 1 else None for i, v in enumerate(vectors.to_pylist())], vectors.type))
    mixed = reading.process_batch(missing)
    assert reading.encoder is not None
    np.testing.assert_allclose(np.array(mixed.column("text").to_pylist(), np.float32),
                               np.array(encoded.column("text").to_pylist(), np.float32), atol=2e-3)
    assert mixed.column("text").to_pylist()[0] == encoded.column("text").to_pylist()[0]


# ---- a learnt embedding per product (`id_embedding_rows`)
def _memory_graph(k=16):
    """`k` sources each bought with its own target (5 times), every product with the same title
    and type: metadata and graph shape cannot tell one target from another, only memory can."""
    n = 2 * k
    text = np.tile(np.random.default_rng(0).normal(size=(1, 384)).astype(np.float32), (n, 1))
    src, dst = np.arange(k), np.arange(k) + k
    edges = (src, dst, np.full(k, 5.0), np.zeros(k, bool))
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    return n, text, np.zeros(n, np.int64), edges, empty


@pytest.mark.parametrize("rows", [0, 64])
def test_a_learnt_row_per_product_recalls_pairs_metadata_cannot_tell_apart(rows):
    from autoknow_ray.modules.related.fit import all_embeddings

    torch = pytest.importorskip("torch")
    n, text, types, edges, sim = _memory_graph()
    k = n // 2
    rc = RelatedConfig(epochs=150, batch_size=32, negatives=16, dim=8, max_train_seconds=60,
                       id_embedding_rows=rows, id_lr=0.1, supervision_fraction=1.0)
    s = GNNSettings(type_buckets=8, type_dim=4, dim=8, fanout=3)
    model, _ = train(s, rc, text, types, edges, sim, seed=0)
    assert model.settings.id_rows == rows
    S, T = all_embeddings(model, text, types, edges, torch.full((n, 3), -1, dtype=torch.long))
    scores = S[:k] @ T[k:].T  # source i against every target; its own is target i
    if not rows:  # nothing tells the targets apart
        assert np.ptp(scores, axis=1).max() < 1e-4
        return
    assert (scores.argmax(1) == np.arange(k)).mean() >= 0.9
    # a product without co-purchase events gets no row: what the model without rows gives it
    lone = (edges[0][:0], edges[1][:0], edges[2][:0])
    S0, T0 = all_embeddings(model, text, types, lone, torch.full((n, 3), -1, dtype=torch.long))
    model.settings.id_rows = 0
    S1, T1 = all_embeddings(model, text, types, lone, torch.full((n, 3), -1, dtype=torch.long))
    np.testing.assert_allclose(S0, S1, atol=1e-6)
    np.testing.assert_allclose(T0, T1, atol=1e-6)


def test_learnt_rows_are_saved_served_by_id_hash_and_none_without_events(tmp_path):
    """A model with learnt rows saves and loads them; `DualEmbed` and the sharded hop 2 add each
    product's row (its id hash mod the rows) where it has co-purchase events, none where it has
    none; a model saved before the rows loads and serves as before."""
    import json

    import torch

    from autoknow_ray.modules.related.model import DualGNN, id_hash, load, save
    from autoknow_ray.modules.related.sharded import NeighbourSums, edge_rows, hop2_reduce, self_rows
    from autoknow_ray.modules.related.steps import DualEmbed, _fixed

    torch.manual_seed(0)
    s = GNNSettings(type_buckets=8, type_dim=4, dim=8, fanout=3, id_rows=50)
    model = DualGNN(s)
    with torch.no_grad():  # trained rows (they start at zero)
        model.id_src.weight.normal_()
        model.id_tgt.weight.normal_()
    save(model, tmp_path / "model")
    back = load(tmp_path / "model")
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    n = 12
    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(n)]
    (tmp_path / "nodes").mkdir()
    pq.write_table(pa.table({"product_id": ids, "h0": _fixed(rng.normal(size=(n, 8)))}),
                   tmp_path / "nodes" / "part.parquet")
    mark_complete(tmp_path / "nodes")
    (tmp_path / "nb").mkdir()
    nb = pa.table({"product_id": ["p0", "p1", "p2", "p0", "p5"], "kind": ["out", "in", "in", "similar", "similar"],
                   "neighbours": [["p1", "p2"], ["p0"], ["p0"], ["p3"], ["p0"]],
                   "weight_sum": [3.0, 1.0, 2.0, 1.0, 1.0]})
    pq.write_table(nb, tmp_path / "nb" / "part.parquet")
    mark_complete(tmp_path / "nb")

    def embed(model_dir):
        e = DualEmbed(model_dir, tmp_path / "nodes", tmp_path / "nb", 3)
        e.setup(WorkerEnv())
        out = e.process_batch(pa.table({"product_id": ids}))
        return e, {c: np.array(out.column(c).to_pylist()) for c in ("source", "target")}

    e, got = embed(tmp_path / "model")
    # the same model without its rows (an old model: no id fields in its config)
    (tmp_path / "old").mkdir()
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "old" / "config.json").write_text(json.dumps(
        {k: v for k, v in cfg.items() if not k.startswith("id_")}))
    from safetensors.torch import save_file

    save_file({k: v for k, v in model.state_dict().items() if not k.startswith("id_")},
              str(tmp_path / "old" / "model.safetensors"))
    _, old = embed(tmp_path / "old")
    rows = (id_hash(ids) % np.uint64(50)).astype(np.int64)
    with_events = {"p0", "p1", "p2"}
    for i, p in enumerate(ids):
        r = int(rows[i])
        add_s = model.id_src.weight[r].detach().numpy() if p in with_events else 0.0
        add_t = model.id_tgt.weight[r].detach().numpy() if p in with_events else 0.0
        np.testing.assert_allclose(got["source"][i], old["source"][i] + add_s, atol=2e-3)
        np.testing.assert_allclose(got["target"][i], old["target"][i] + add_t, atol=2e-3)
    assert np.abs(got["source"] - old["source"]).max() > 0.1
    # the sharded hop 2 (one shard, in-process): each node's hop-1 vectors, summed per neighbour
    s1, t1 = (x.numpy() for x in e.hop1)
    order = e.tables.index_of(ids)
    (tmp_path / "hop1").mkdir()
    pq.write_table(pa.table({"product_id": ids, "s1": _fixed(s1[order]), "t1": _fixed(t1[order])}),
                   tmp_path / "hop1" / "part.parquet")
    mark_complete(tmp_path / "hop1")
    edges = pa.concat_tables([edge_rows(nb, 3), self_rows(pa.table({"product_id": ids}))])
    sums = NeighbourSums(tmp_path / "hop1", ["s1", "t1"], 0, 1)
    sums.setup(WorkerEnv())
    part = sums.process_batch(edges.select(["v", "kind", "nb", "w"]))
    part = part.take(pc.sort_indices(part, [("v", "ascending")]))
    sharded = pl.from_arrow(hop2_reduce(part, str(tmp_path / "model"), 8)).sort("product_id")
    want = sorted(range(n), key=lambda i: ids[i])
    for col in ("source", "target"):
        np.testing.assert_allclose(np.array(sharded[col].to_list(), float), got[col][want], atol=5e-3)
