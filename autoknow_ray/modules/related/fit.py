"""Training the dual-embedding GNN, self-supervised, on the catalogue's own behaviour graph.

The graph is built with the same distributed passes as the stage; training then takes a seeded
sample of at most `max_train_edges` co-purchase edges over at most `max_train_nodes` products
(the only part that reaches this process) and runs mini-batches, each computing the two-hop
neighbourhood of its own nodes. Each epoch hides a fraction of the edges from message passing and
asks the model to find them (a model that sees the edge it must predict learns to copy edges):

- contrastive: source(a) . target(b) of a hidden edge a -> b against the batch's other targets and
  `negatives` uniformly drawn products (random non-edges), softmax cross-entropy;
- asymmetry: on one-way edges, softplus(source(b) . target(a) - source(a) . target(b)): the
  outbound direction must score above the inbound one;
- augmentation against selection bias: with probability `augment_prob` the target b is swapped
  for a product similar to b (co-viewed, else nearest title) and kept as a down-weighted positive,
  so a product that was bought only because it was the one shown does not own the edge.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from autoknow_ray import progress, runtime
from autoknow_ray.graph.state import typed_products
from autoknow_ray.modules.related import graph_build as gb
from autoknow_ray.modules.related.config import RelatedConfig
from autoknow_ray.modules.related.model import (DualGNN, GNNSettings, bucket_of, degree_features,
                                                id_hash, id_rows_of, padded_neighbours, save)
from autoknow_ray.modules.related.steps import TEXT_DIM, EmbedProducts, _vectors
from autoknow_ray.pipeline import RunContext

EDGE_KEY = ("src", "dst")  # an edge table's row key (`runtime.bounded_sample` draws by it)
# the walk term's weights tried by fit, in multiples of each bucket's count prior weight
WALK_MULTIPLES = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)

log = logging.getLogger(__name__)


def _collect(ds) -> pl.DataFrame:
    import ray

    parts = [pl.from_arrow(t) for t in ray.get(ds.to_arrow_refs())]
    parts = [p for p in parts if p.height]
    return pl.concat(parts, how="vertical_relaxed") if parts else pl.DataFrame()


def _training_nodes(edges: pl.DataFrame, cap: int) -> list[str]:
    deg = pl.concat([edges.select(id="src"), edges.select(id="dst")]).group_by("id").len()
    return deg.sort(["len", "id"], descending=[True, False]).head(cap)["id"].to_list()


def _keep_ids(ids: set[str], column: str):
    keep = pa.array(sorted(ids), pa.string())

    def fn(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.is_in(batch.column(column), value_set=keep))
    return fn


def fit_related(ctx: RunContext, out: Path) -> dict:
    cfg, rc = ctx.cfg, ctx.cfg.related
    out = Path(out)
    work = out / "_graph"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    products = ctx.table_path("ingest", "products")
    stats = gb.copurchase_edges(cfg, ctx.table_path("ingest", "copurchase"), products, work)
    stats.update(gb.coview_edges(cfg, ctx.table_path("ingest", "behavior"), products, work))
    if stats["copurchase_edges"] == 0:
        shutil.rmtree(work)
        return {"skipped": "no co-purchase edges to learn from: the stage ranks by title similarity",
                **stats}
    edges = runtime.bounded_sample(runtime.read_parquet(work / gb.COPURCHASE_EDGES),
                                   rc.max_train_edges, cfg.seed, stats["copurchase_edges"],
                                   key=EDGE_KEY)
    ids = _training_nodes(edges, rc.max_train_nodes)
    id_set = set(ids)
    edges = edges.filter(pl.col("src").is_in(ids) & pl.col("dst").is_in(ids))
    meta = typed_products(ctx, ["product_id", "title"]).map_batches(
        _keep_ids(id_set, "product_id"), batch_format="pyarrow")
    step = EmbedProducts(rc.encoder, rc.text_max_length, rc.type_buckets, None)
    nodes = _collect(runtime.map_step(meta, step, cfg, len(ids)))
    nodes = nodes.sort("product_id")
    index = {p: i for i, p in enumerate(nodes["product_id"].to_list())}
    text = _vectors(nodes.to_arrow().column("text"), TEXT_DIM)
    types = nodes["type_bucket"].to_numpy().astype(np.int64)

    def idx(col: pl.Series) -> np.ndarray:
        return np.array([index.get(x, -1) for x in col.to_list()], dtype=np.int64)

    src, dst = idx(edges["src"]), idx(edges["dst"])
    ok = (src >= 0) & (dst >= 0)
    src, dst = src[ok], dst[ok]
    count = edges["count"].to_numpy()[ok].astype(np.float64)
    two_way = edges["two_way"].to_numpy()[ok].astype(bool)
    sim = _similar_pairs(cfg, work, stats, id_set, index, text)
    stats.update(train_edges=int(len(src)), train_nodes=len(index), train_similar_edges=int(len(sim[0])),
                 one_way_fraction=round(float((~two_way).mean()), 4) if len(two_way) else 0.0)
    settings = GNNSettings(text_dim=TEXT_DIM, type_buckets=rc.type_buckets, type_dim=rc.type_dim,
                           dim=rc.dim, symmetric=rc.symmetric, encoder=rc.encoder,
                           text_max_length=rc.text_max_length, fanout=rc.fanout)
    # a product's learnt row (`id_embedding_rows`) from its id hash, as serving finds it
    id_base = id_hash(nodes.to_arrow().column("product_id"))
    if rc.train_workers > 1:
        model, history = fit_with_ray_train(settings, rc, text, types, (src, dst, count, two_way),
                                            sim, cfg.seed, work / "trained", id_base)
    else:
        model, history = fit_and_validate(settings, rc, text, types, (src, dst, count, two_way),
                                          sim, cfg.seed, id_base=id_base)
    save(model, out, {"trained_on": str(ctx.catalogue), **{k: v for k, v in stats.items()
                                                          if isinstance(v, (int, float, str))}})
    shutil.rmtree(work)
    return {**stats, **history, "seconds_total": round(time.perf_counter() - t0, 1)}


def fit_with_ray_train(settings: GNNSettings, rc: RelatedConfig, text: np.ndarray,
                       types: np.ndarray, edges: tuple, sim: tuple, seed: int,
                       scratch: Path, id_base: np.ndarray | None = None) -> tuple[DualGNN, dict]:
    """`fit_and_validate` as a Ray Train `TorchTrainer` of `rc.train_workers` data-parallel
    workers (GPU ones where the cluster has one for each, `train_use_gpu`): the arrays travel
    through the object store once, rank 0 writes the trained model and its history to `scratch`
    (so the driver's `scratch` must be the worker's: one machine, or a shared disk, as the
    title tagger's Ray Train fit asks), and this process reads them back."""
    import json as _json
    from dataclasses import asdict

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from autoknow_ray.modules.related.model import load

    use_gpu = rc.train_use_gpu
    if use_gpu == "auto":  # GPUs only where the cluster has one per worker (never wait forever)
        use_gpu = ray.cluster_resources().get("GPU", 0) >= rc.train_workers
    scratch = Path(scratch).resolve()
    if scratch.exists():
        shutil.rmtree(scratch)
    arrays = ray.put((text, types, edges, sim, id_base))
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"settings": asdict(settings), "rc": rc.model_dump(mode="json"),
                           "arrays": arrays, "seed": seed, "out": str(scratch)},
        scaling_config=ScalingConfig(num_workers=rc.train_workers, use_gpu=bool(use_gpu),
                                     resources_per_worker={"CPU": rc.train_cpus_per_worker}),
        run_config=RunConfig(name="related-gnn", storage_path=str(scratch.parent / "ray-train")),
    )
    trainer.fit()
    history = _json.loads((scratch / "history.json").read_text())
    ranks = [_json.loads((scratch / f"rank-{r}.json").read_text()) for r in range(rc.train_workers)]
    if len({r["steps"] for r in ranks}) != 1 or len({r["weights_checksum"] for r in ranks}) != 1:
        raise RuntimeError(f"related fit: the data-parallel workers diverged: {ranks}")
    return load(scratch), {**history, "train_workers": rc.train_workers,
                           "train_device": "cuda" if use_gpu else "cpu",
                           "steps_per_worker": ranks[0]["steps"]}


def _ray_train_loop(config: dict) -> None:
    """One worker of `fit_with_ray_train`."""
    import json as _json

    import ray
    import ray.train
    from ray.train.torch import get_device

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    dev = get_device()
    device = "cuda" if dev.type == "cuda" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(dev)
    text, types, edges, sim, id_base = ray.get(config["arrays"])
    settings = GNNSettings(**config["settings"])
    rc = RelatedConfig(**config["rc"])
    model, history = fit_and_validate(settings, rc, text, types, edges, sim, config["seed"],
                                      rank=rank, world=world, device=device, id_base=id_base)
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    # every worker's steps and a checksum of its weights: equal in a working group
    checksum = float(sum(float(v.double().abs().sum()) for v in model.state_dict().values()))
    (out / f"rank-{rank}.json").write_text(_json.dumps({"steps": history.get("steps", 0),
                                                        "weights_checksum": checksum}))
    if rank == 0:
        save(model, out)
        (out / "history.json").write_text(_json.dumps(history))
    ray.train.report({"rank": rank, "steps": history.get("steps", 0)})


def _similar_pairs(cfg, work: Path, stats: dict, id_set: set, index: dict, text: np.ndarray):
    """Similarity edges among the training products: co-views where the logs have them, else
    each product's nearest titles."""
    rc: RelatedConfig = cfg.related
    pairs = []
    if stats.get("coview_edges"):
        ds = runtime.read_parquet(work / gb.SIMILAR_EDGES, ["src", "dst", "weight"]).map_batches(
            _keep_ids(id_set, "src"), batch_format="pyarrow").map_batches(
            _keep_ids(id_set, "dst"), batch_format="pyarrow")
        sim = runtime.bounded_sample(ds, rc.max_train_nodes * rc.fanout * 2, cfg.seed, key=EDGE_KEY)
        if sim.height:
            pairs.append((np.array([index[x] for x in sim["src"].to_list()]),
                          np.array([index[x] for x in sim["dst"].to_list()]),
                          sim["weight"].to_numpy().astype(np.float64)))
    if (not pairs or rc.text_knn_always) and rc.text_knn and len(text) > 1:
        from autoknow_ray.index.faiss_index import VectorIndex

        vi = VectorIndex("ip", ivf_min_size=rc.ivf_min_size, nprobe=rc.nprobe, seed=cfg.seed).build(text)
        scores, nn = vi.search(text, rc.text_knn + 1)
        a = np.repeat(np.arange(len(text)), nn.shape[1])
        b, w = nn.reshape(-1), scores.reshape(-1)
        keep = (b >= 0) & (b != a)
        pairs.append((np.concatenate([a[keep], b[keep]]), np.concatenate([b[keep], a[keep]]),
                      np.concatenate([w[keep], w[keep]]).astype(np.float64)))
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return tuple(np.concatenate(x) for x in zip(*pairs))


def train(settings: GNNSettings, rc: RelatedConfig, text: np.ndarray, types: np.ndarray,
          edges: tuple, sim: tuple, seed: int, on_epoch=None, rank: int = 0, world: int = 1,
          device: str = "cpu", id_base: np.ndarray | None = None) -> tuple[DualGNN, dict]:
    """Trains on `edges` (src, dst, count, two_way index arrays). `on_epoch(model)`, where given,
    scores the model after each epoch (higher is better) and the best epoch's weights are kept.

    `world` > 1: this process is worker `rank` of a data-parallel group (`torch.distributed`,
    as Ray Train sets it up): every worker draws the epoch's hidden edges, cold products and
    neighbour lists alike (a seed per epoch), takes its own share of the epoch's batches (as many
    as every other worker), and the gradients are averaged over the group before each step, so
    the workers' weights stay equal; `on_epoch` runs on rank 0 and its score is shared, and the
    time limit is decided for all. `world` 1 is the single-process loop, draw for draw."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dev = torch.device(device)
    n = len(text)
    src, dst, count, two_way = edges
    settings = with_id_settings(settings, rc)
    model = DualGNN(settings).to(dev)
    if world > 1:
        _broadcast_parameters(model)
    ids = model.id_parameters()
    rest = [p for p in model.parameters() if all(p is not q for q in ids)]
    groups = [{"params": rest}]
    if ids:
        groups.append({"params": ids, "lr": rc.id_lr or rc.lr, "weight_decay": rc.id_weight_decay})
    opt = torch.optim.Adam(groups, lr=rc.lr, weight_decay=rc.weight_decay)
    text_t, types_t = torch.from_numpy(text).to(dev), torch.from_numpy(types).to(dev)
    out_w = np.bincount(src, weights=count, minlength=n)
    in_w = np.bincount(dst, weights=count, minlength=n)
    degree_all = degree_features(out_w, in_w)
    # each product's learnt row (`id_embedding_rows`): from its id hash (`id_base`; the node
    # index where none is given), none for a product without co-purchase events
    id_all = id_rows_of(settings, np.arange(n) if id_base is None else id_base, out_w + in_w)
    neg_p = None
    if rc.popular_negatives > 0:
        pop = np.bincount(dst, weights=count, minlength=n) ** rc.popular_negatives_power
        neg_p = pop / pop.sum() if pop.sum() > 0 else None
    # log of the chance that one negative draw picks each product: subtracted from every logit
    # (positive and negatives) so the sampled softmax estimates the full one, log p(B | A),
    # whatever the negatives' mix (Bengio & Senecal 2008; Yi et al. 2019's two-tower recipe).
    # Without it the scores learn p(B | A) over the sampling rate: drawn by popularity, the
    # negatives teach the model to rank the products shoppers buy most below the rest.
    log_q = None
    if rc.logq_correction:
        share = (int(round(rc.negatives * rc.popular_negatives)) / rc.negatives
                 if neg_p is not None else 0.0)
        q = (1.0 - share) / n + (share * neg_p if neg_p is not None else 0.0)
        log_q = torch.from_numpy(np.log(np.maximum(q, 1e-12)).astype(np.float32)).to(dev)
    sim_np = padded_neighbours(n, sim[0], sim[1], sim[2], settings.fanout)
    sim_nb = torch.from_numpy(sim_np).to(dev)
    has_sim = sim_np[:, 0] >= 0
    asym_w = 0.0 if settings.symmetric else rc.asymmetry_weight
    history = {"epochs": 0, "steps": 0, "loss": []}
    best = (-np.inf, None, 0)
    start = time.perf_counter()
    for epoch in range(rc.epochs):
        model.train()
        # one generator for the whole loop in one process; in a group, the epoch's shared draws
        # from a seed per epoch and each worker's batch draws from its own
        erng = rng if world == 1 else np.random.default_rng([seed, epoch])
        brng = rng if world == 1 else np.random.default_rng([seed, epoch, rank + 1])
        perm = erng.permutation(len(src))
        n_sup = max(1, int(len(src) * rc.supervision_fraction))
        sup, msg = perm[:n_sup], perm[n_sup:]
        cold = erng.random(n) < rc.cold_start_fraction
        # the cold-start share loses its learnt row too, as a new listing has none
        id_t = torch.from_numpy(np.where(cold, -1, id_all)).to(dev) if settings.id_rows else None
        msg = msg[~cold[src[msg]] & ~cold[dst[msg]]]
        degree = torch.from_numpy(np.where(cold[:, None], 0.0, degree_all).astype(np.float32)).to(dev)
        out_nb = torch.from_numpy(padded_neighbours(n, src[msg], dst[msg], count[msg], settings.fanout, erng)).to(dev)
        in_nb = torch.from_numpy(padded_neighbours(n, dst[msg], src[msg], count[msg], settings.fanout, erng)).to(dev)
        losses = []
        for batch in rank_batches(sup, rc.batch_size, rank, world):
            a, b = src[batch], dst[batch]
            aug_b = b.copy()
            swap = (brng.random(len(b)) < rc.augment_prob) & has_sim[b]
            if swap.any():
                col = brng.integers(0, settings.fanout, int(swap.sum()))
                cand = sim_np[b[swap], col]
                first = sim_np[b[swap], 0]
                aug_b[swap] = np.where(cand >= 0, cand, first)
            negs = _negatives(brng, n, rc.negatives, rc.popular_negatives, neg_p)
            nodes, inv = np.unique(np.concatenate([a, b, aug_b, negs]), return_inverse=True)
            na, nb_, naug, nneg = np.split(inv, np.cumsum([len(a), len(b), len(aug_b)]))
            nodes_t = torch.from_numpy(nodes).to(dev)
            need = _two_hop(nodes_t, out_nb, in_nb, sim_nb)
            h0 = torch.zeros(n, settings.dim, device=dev)
            h0 = h0.index_put((need,), model.metadata(text_t[need], types_t[need]))
            s, t = model(nodes_t, h0, degree, out_nb, in_nb, sim_nb, id_t)
            loss = _contrastive(s[na], t[nb_], t[nneg], b, negs, rc.in_batch_negatives, log_q)
            if swap.any() and rc.augment_weight > 0:
                loss = loss + rc.augment_weight * _contrastive(
                    s[na[swap]], t[naug[swap]], t[nneg], aug_b[swap], negs, rc.in_batch_negatives,
                    log_q)
            one = torch.from_numpy(~two_way[batch]).to(dev)
            if asym_w and one.any():
                fwd = (s[na] * t[nb_]).sum(1)
                rev = (s[nb_] * t[na]).sum(1)
                loss = loss + asym_w * F.softplus(rev - fwd)[one].mean()
            opt.zero_grad()
            loss.backward()
            if world > 1:
                _average_gradients(model, world)
            opt.step()
            losses.append(float(loss.detach()))
            history["steps"] += 1
            if _stop(time.perf_counter() - start > rc.max_train_seconds, world):
                break
        history["epochs"] = epoch + 1
        history["loss"].append(round(float(np.mean(losses)), 4) if losses else None)
        if on_epoch is not None:
            model.eval()
            score = on_epoch(model) if rank == 0 else 0.0
            if world > 1:
                score = _shared_float(score, dev)
            history.setdefault("validation", []).append(round(float(score), 4))
            if score > best[0]:
                best = (score, {k: v.detach().clone() for k, v in model.state_dict().items()}, epoch + 1)
        log.info("related fit: epoch %d loss %s validation %s", epoch + 1, history["loss"][-1],
                 history.get("validation", [None])[-1])
        if rank == 0:
            progress.epoch_line("related", epoch + 1, rc.epochs,
                                {"loss": history["loss"][-1] or 0.0,
                                 **({"val_hr@10": history["validation"][-1]} if on_epoch else {})})
        if _stop(time.perf_counter() - start > rc.max_train_seconds, world):
            history["stopped"] = f"max_train_seconds ({rc.max_train_seconds}) reached"
            break
    if best[1] is not None:
        model.load_state_dict(best[1])
        history["best_epoch"] = best[2]
    history["train_seconds"] = round(time.perf_counter() - start, 1)
    return model.eval(), history


def with_id_settings(settings: GNNSettings, rc: RelatedConfig) -> GNNSettings:
    """`settings` with the config's learnt rows per product (none where the config has none)."""
    from dataclasses import replace

    if not rc.id_embedding_rows:
        return settings
    return replace(settings, id_rows=rc.id_embedding_rows)


def rank_batches(sup: np.ndarray, batch_size: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """The epoch's batches of supervision edges for worker `rank` of `world`: in one process all
    of them in order; in a group every `world`-th edge from `rank` on, cut into as many batches
    as every other worker gets (a collective step waits for every worker), none empty."""
    if world == 1:
        return [sup[lo:lo + batch_size] for lo in range(0, len(sup), batch_size)]
    mine = sup[rank::world] if len(sup) >= world else sup
    share = len(sup) // world if len(sup) >= world else len(sup)
    steps = max(1, -(-share // batch_size))
    return [mine[j * batch_size:(j + 1) * batch_size] for j in range(steps)]


def _broadcast_parameters(model: torch.nn.Module) -> None:
    """Every worker of the group starts from rank 0's weights."""
    import torch.distributed as dist

    for p in model.parameters():
        dist.broadcast(p.data, 0)


def _average_gradients(model: torch.nn.Module, world: int) -> None:
    """The group's mean gradient in every worker (one all-reduce of the flattened gradients; a
    parameter this worker's batch left without one counts as zero)."""
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    at = 0
    for p in params:
        k = p.numel()
        p.grad.copy_(flat[at:at + k].view_as(p))
        at += k


def _stop(mine: bool, world: int) -> bool:
    """Whether to stop, decided for the whole group (any worker past the time limit)."""
    if world == 1:
        return mine
    import torch.distributed as dist

    flag = torch.tensor([1.0 if mine else 0.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _shared_float(value: float, dev: torch.device) -> float:
    """Rank 0's `value` in every worker."""
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=dev)
    dist.broadcast(t, 0)
    return float(t.item())


def _negatives(rng: np.random.Generator, n: int, m: int, popular: float, p) -> np.ndarray:
    """`m` negative products: a `popular` share drawn by `p` (popularity), the rest uniformly."""
    k = int(round(m * popular)) if p is not None else 0
    return np.concatenate([rng.choice(n, k, p=p), rng.integers(0, n, m - k)]) if k else rng.integers(0, n, m)


def split_events(count: np.ndarray, fraction: float, rng: np.random.Generator):
    """Each edge's co-purchase events split at random: (training counts, validation counts).
    A pair bought three times may land twice in training and once in validation, as a pair
    bought before is bought again later; edges are not held out whole."""
    c = np.asarray(count).astype(np.int64)
    val = rng.binomial(c, fraction) if fraction > 0 else np.zeros_like(c)
    return c - val, val


def all_embeddings(model: DualGNN, text: np.ndarray, types: np.ndarray, edges: tuple, sim_nb,
                   chunk: int = 4096, id_base: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Source and target embeddings of every node, message passing over all of `edges` (a
    product's learnt row, where the model has them, from `id_base`, default its index, where
    `edges` give it co-purchase events)."""
    n = len(text)
    src, dst, count = edges[:3]
    fanout = model.settings.fanout
    dev = next(model.parameters()).device
    out_nb = torch.from_numpy(padded_neighbours(n, src, dst, count, fanout)).to(dev)
    in_nb = torch.from_numpy(padded_neighbours(n, dst, src, count, fanout)).to(dev)
    out_w = np.bincount(src, weights=count, minlength=n)
    in_w = np.bincount(dst, weights=count, minlength=n)
    degree = torch.from_numpy(degree_features(out_w, in_w)).to(dev)
    rows = torch.from_numpy(id_rows_of(model.settings, np.arange(n) if id_base is None else id_base,
                                       out_w + in_w)).to(dev)
    sim_nb = sim_nb.to(dev)
    S, T = [], []
    with torch.no_grad():
        h0 = model.metadata(torch.from_numpy(text).to(dev), torch.from_numpy(types).to(dev))
        for lo in range(0, n, chunk):
            s, t = model(torch.arange(lo, min(n, lo + chunk), device=dev), h0, degree, out_nb,
                         in_nb, sim_nb, rows)
            S.append(s.cpu().numpy())
            T.append(t.cpu().numpy())
    return np.concatenate(S), np.concatenate(T)


class Validation:
    """Held-out co-purchase pairs scored as a user of the recommendations would: the rank of B
    among every product for A (A itself excluded), by source(A) . target(B) plus `w` times the
    log co-purchase count of the pair in the training graph."""

    def __init__(self, n: int, val_src, val_dst, train_edges: tuple, max_pairs: int,
                 rng: np.random.Generator, chunk: int = 1024):
        import scipy.sparse as sp

        keep = np.arange(len(val_src))
        if len(keep) > max_pairs:
            keep = np.sort(rng.choice(keep, max_pairs, replace=False))
        self.src, self.dst, self.chunk = val_src[keep], val_dst[keep], chunk
        a, b, c = train_edges[:3]
        m = sp.coo_matrix((np.r_[c, c].astype(np.float64), (np.r_[a, b], np.r_[b, a])), shape=(n, n)).tocsr()
        m.sum_duplicates()
        self.counts = m.copy()  # co-purchase events of each pair, both directions
        m.data = np.log1p(m.data)
        self.prior = m
        self.similar = None  # [n, fanout] similar products (`set_similar`): the neighbour term
        # each source's co-purchase events in the training graph (the count prior's bucket) and
        # each product's training count as the product bought with another (popularity)
        self.events = (np.bincount(a, weights=c, minlength=n) + np.bincount(b, weights=c, minlength=n))[self.src]
        self.popularity = np.bincount(b, weights=c, minlength=n)
        self.log_popularity = np.log1p(self.popularity).astype(np.float32)
        self.train_edges, self.n = train_edges, n
        self.walk_step = None  # [n, n] one walk step over the capped lists (`set_walk`)
        self._walk_cache: dict = {}

    def set_walk(self, width: int) -> None:
        """The walk term's step matrix over each product's co-purchase lists as serving holds
        them (`walk_step_matrix`: out and in, the `width` strongest each)."""
        self.walk_step = walk_step_matrix(self.n, *self.train_edges[:3], width)
        self._walk_cache = {}

    def walk(self, lo: int, a: np.ndarray) -> np.ndarray:
        """[len(a), n]: log1p(WALK_SCALE * P2(A, B)), the walk term's values for the chunk of
        sources starting at `lo` (kept: every weight tried reads the same chunks)."""
        from autoknow_ray.modules.related.model import WALK_SCALE

        if lo not in self._walk_cache:
            m = (self.walk_step[a] @ self.walk_step).tocsr()
            m.data = np.log1p(WALK_SCALE * m.data).astype(np.float32)
            self._walk_cache[lo] = m
        return self._walk_cache[lo].toarray()

    def set_similar(self, similar: np.ndarray) -> None:
        """[n, fanout] similar products of each product (-1: none), as the GNN's similarity
        edges hold them: the neighbour term's source."""
        self.similar = np.asarray(similar)

    def neighbour_counts(self, a: np.ndarray) -> np.ndarray:
        """[len(a), n]: log1p of the mean co-purchase events of each product with A's similar
        products (`set_similar`; A's own events not among them): what the products like A were
        bought with — something to say of a product never bought."""
        import scipy.sparse as sp

        nb = self.similar[a]
        ok = nb >= 0
        k = np.maximum(ok.sum(1), 1)
        rows = np.repeat(np.arange(len(a)), ok.sum(1))
        agg = sp.csr_matrix(((1.0 / k)[rows], (rows, np.arange(len(rows)))), shape=(len(a), len(rows)))
        return np.log1p((agg @ self.counts[nb[ok]]).toarray()).astype(np.float32)

    def ranks(self, S: np.ndarray, T: np.ndarray, w, wp=0.0, wn=0.0, ww=0.0) -> np.ndarray:
        """Rank of each held-out B for its A. `w`: the count prior's weight, `wp` the popularity
        term's (log1p of B's training events as the product bought), `wn` the neighbour term's
        (`neighbour_counts`), `ww` the walk term's (`walk`), each one number or one per pair."""
        w = np.broadcast_to(np.asarray(w, np.float32), len(self.src))
        wp = np.broadcast_to(np.asarray(wp, np.float32), len(self.src))
        wn = np.broadcast_to(np.asarray(wn, np.float32), len(self.src))
        ww = np.broadcast_to(np.asarray(ww, np.float32), len(self.src))
        out = np.empty(len(self.src), np.int64)
        for lo in range(0, len(self.src), self.chunk):
            a, b = self.src[lo:lo + self.chunk], self.dst[lo:lo + self.chunk]
            sc = S[a] @ T.T
            cw, cp, cn = w[lo:lo + len(a)], wp[lo:lo + len(a)], wn[lo:lo + len(a)]
            ck = ww[lo:lo + len(a)]
            if ck.any() and self.walk_step is not None:
                sc += ck[:, None] * self.walk(lo, a)
            if cw.any():
                sc += cw[:, None] * self.prior[a].toarray().astype(np.float32)
            if cp.any():
                sc += cp[:, None] * self.log_popularity[None, :]
            if cn.any() and self.similar is not None:
                sc += cn[:, None] * self.neighbour_counts(a)
            r = np.arange(len(a))
            sc[r, a] = -np.inf
            true = sc[r, b]
            out[lo:lo + len(a)] = (sc > true[:, None]).sum(1) + 1
        return out

    def spread(self, S: np.ndarray, T: np.ndarray) -> float:
        a = self.src[:self.chunk]
        return float((S[a] @ T.T).std()) or 1.0

    def popularity_ranks(self) -> np.ndarray:
        """Rank of each held-out B in the list of the products most bought with another (the
        source excluded): the popularity baseline on the same pairs."""
        pop = self.popularity
        srt = np.sort(pop)
        above = len(pop) - np.searchsorted(srt, pop[self.dst], side="right")
        return above - (pop[self.src] > pop[self.dst]) + 1

    def best_weight_by_bucket(self, S, T, multiples, buckets, min_pairs: int, k: int = 10) -> dict:
        """The count prior's weight per bucket of the source's training co-purchase events, each
        picked on that bucket's pairs (a bucket with fewer than `min_pairs` pairs takes the weight
        picked on all pairs). Returns the weights (absolute), the overall pick, the blended HR@k
        and the figures per multiple and per bucket."""
        spread = self.spread(S, T)
        hits = {float(m): self.ranks(S, T, m * spread) <= k for m in multiples}
        table = {m: float(h.mean()) for m, h in hits.items()}
        overall = max(table, key=lambda x: (table[x], -x))
        which = bucket_of(self.events, buckets)
        pop = self.popularity_ranks() <= k
        chosen = np.zeros(len(self.src), bool)
        weights, report = [], {}
        for i, lo in enumerate(buckets):
            mask = which == i
            per = {m: float(h[mask].mean()) for m, h in hits.items()} if mask.any() else {}
            m = max(per, key=lambda x: (per[x], -x)) if mask.sum() >= min_pairs else overall
            weights.append(m * spread)
            chosen[mask] = hits[m][mask]
            label = f"{lo}-{buckets[i + 1] - 1}" if i + 1 < len(buckets) else f"{lo}+"
            report[label] = {"pairs": int(mask.sum()), "prior_multiple": m,
                             **({f"hr@{k}": round(per[m], 4), f"hr@{k}_model_alone": round(per[0.0], 4),
                                 f"hr@{k}_popularity": round(float(pop[mask].mean()), 4)}
                                if mask.any() else {})}
        return {"weights": weights, "overall": overall * spread, "hr": float(chosen.mean()),
                "table": table, "buckets": report}

    def best_terms_by_bucket(self, S, T, prior_weights: list[float], multiples, buckets,
                             min_pairs: int, cold: tuple | None = None, neighbours: bool = True,
                             popularity: bool = True, walk: bool = False, k: int = 10) -> dict:
        """Per bucket of the source's training co-purchase events, with each bucket's count prior
        weight (`prior_weights`) in place: the weight of the walk term (two co-purchase steps
        from A, `walk`; with `walk` and a step matrix, `set_walk`), then the neighbour term's
        with it (what A's similar products were bought with, `neighbour_counts`), then the
        popularity term's with both (log1p of B's training events as the product bought), each
        picked on that bucket's pairs (fewer than `min_pairs`: the multiple picked on all
        pairs). Bucket 0 (no events: a new listing) is picked on `cold` = (S, T) of the model
        with every validation source stripped of its edges, over all pairs, the count prior off
        (such a product has no count, and no walk starts from it). 0 is always a candidate, so
        each pick is never below what it had without the term on these pairs."""
        spread = self.spread(S, T)
        which = bucket_of(self.events, buckets)
        w_pair = np.asarray(prior_weights, np.float64)[which]
        # the walk term's weight in multiples of its bucket's count prior weight (at least the
        # scores' spread): where the counts decide, the walk must weigh beside them, not beside
        # the model (on Instacart's validation pairs its best weight was ~16x the count prior's)
        k_mult = [float(m) for m in WALK_MULTIPLES] if walk and self.walk_step is not None else [0.0]
        k_base = np.maximum(np.asarray(prior_weights, np.float64), spread)
        n_mult = [float(m) for m in multiples] if neighbours and self.similar is not None else [0.0]
        p_mult = [float(m) for m in multiples] if popularity else [0.0]

        def pick(hits: dict, mask: np.ndarray | None, fallback: float | None) -> tuple[float, dict]:
            if mask is not None and not mask.any():
                return fallback, {}
            per = {m: float(h.mean() if mask is None else h[mask].mean()) for m, h in hits.items()}
            if mask is not None and mask.sum() < min_pairs:
                return fallback, per
            return max(per, key=lambda x: (per[x], -x)), per

        # warm buckets: the walk multiple first, then the neighbour multiple with it (popularity
        # off), then popularity with both
        k_hits = {m: self.ranks(S, T, w_pair, 0.0, 0.0, m * k_base[which]) <= k for m in k_mult}
        k_all, _ = pick(k_hits, None, None)
        k_pick = [0.0 if i == 0 and cold is not None else pick(k_hits, which == i, k_all)[0]
                  for i in range(len(buckets))]
        k_weights = [float(m * b) for m, b in zip(k_pick, k_base)]
        wk_pair = np.asarray(k_weights, np.float64)[which]
        n_hits = {m: self.ranks(S, T, w_pair, 0.0, m * spread, wk_pair) <= k for m in n_mult}
        n_all, _ = pick(n_hits, None, None)
        n_pick = [pick(n_hits, which == i, n_all)[0] for i in range(len(buckets))]
        wn_pair = np.asarray(n_pick, np.float64)[which] * spread
        p_hits = {m: self.ranks(S, T, w_pair, m * spread, wn_pair, wk_pair) <= k for m in p_mult}
        p_all, _ = pick(p_hits, None, None)
        n_weights, p_weights, report = [], [], {}
        for i, lo in enumerate(buckets):
            label = f"{lo}-{buckets[i + 1] - 1}" if i + 1 < len(buckets) else f"{lo}+"
            if i == 0 and cold is not None:
                cs = self.spread(*cold)
                cn = {m: self.ranks(*cold, 0.0, 0.0, m * cs) <= k for m in n_mult}
                mn, per_n = pick(cn, None, None)
                cp = {m: self.ranks(*cold, 0.0, m * cs, mn * cs) <= k for m in p_mult}
                mp, per_p = pick(cp, None, None)
                n_weights.append(mn * cs)
                p_weights.append(mp * cs)
                report[label] = {"pairs": int(len(self.src)), "on": "validation sources stripped of their edges",
                                 "neighbour_multiple": mn, "popularity_multiple": mp,
                                 f"hr@{k}": round(per_p[mp], 4), f"hr@{k}_model_alone": round(per_n[0.0], 4),
                                 f"hr@{k}_model_and_neighbours": round(per_n[mn], 4),
                                 f"hr@{k}_popularity": round(float((self.popularity_ranks() <= k).mean()), 4)}
                continue
            mask = which == i
            mp, per = pick(p_hits, mask, p_all)
            n_weights.append(n_pick[i] * spread)
            p_weights.append(mp * spread)
            report[label] = {"pairs": int(mask.sum()), "walk_multiple_of_prior": k_pick[i],
                             "neighbour_multiple": n_pick[i], "popularity_multiple": mp,
                             **({f"hr@{k}": round(per[mp], 4),
                                 f"hr@{k}_count_prior_alone": round(float(k_hits[0.0][mask].mean()), 4),
                                 f"hr@{k}_with_walk": round(float(n_hits[0.0][mask].mean()), 4)}
                                if mask.any() else {})}
        hr = float((self.ranks(S, T, w_pair, np.asarray(p_weights)[which], np.asarray(n_weights)[which],
                               np.asarray(k_weights)[which]) <= k).mean())
        return {"neighbour_weights": n_weights, "popularity_weights": p_weights, "walk_weights": k_weights,
                "hr": hr, "buckets": report}

    def best_weight(self, S, T, multiples, k: int = 10) -> tuple[float, float, dict]:
        """(weight, HR@k, HR@k per multiple of the scores' spread)."""
        spread = self.spread(S, T)
        table = {float(m): float((self.ranks(S, T, m * spread) <= k).mean()) for m in multiples}
        m = max(table, key=lambda x: (table[x], -x))
        return m * spread, table[m], table


def fit_and_validate(settings: GNNSettings, rc: RelatedConfig, text: np.ndarray, types: np.ndarray,
                     edges: tuple, sim: tuple, seed: int, rank: int = 0, world: int = 1,
                     device: str = "cpu", id_base: np.ndarray | None = None) -> tuple[DualGNN, dict]:
    """Trains on the training share of the co-purchase events, keeps the epoch whose model alone
    has the best validation hit rate @10, and picks the weight of the co-purchase count prior on the same
    validation pairs (none of this sees anything beyond the catalogue's own graph). In a
    data-parallel group (`world` > 1, `train`) every worker trains; rank 0 validates and picks
    the weights, the others return once trained. What follows training runs on the CPU."""
    src, dst, count, two_way = edges
    n = len(text)
    rng = np.random.default_rng(seed + 1)
    tr, va = split_events(count, rc.validation_fraction, rng)
    if rc.validation_fraction == 0 or not (va > 0).any() or not (tr > 0).any():
        model, hist = train(settings, rc, text, types, edges, sim, seed, rank=rank, world=world,
                            device=device, id_base=id_base)
        return model.cpu(), {**hist, "prior_weight": 0.0}
    keep = tr > 0
    train_edges = (src[keep], dst[keep], tr[keep].astype(np.float64), two_way[keep])
    val = Validation(n, src[va > 0], dst[va > 0], train_edges, rc.validation_pairs, rng)
    sim_nb = torch.from_numpy(padded_neighbours(n, sim[0], sim[1], sim[2], settings.fanout))
    multiples = sorted({0.0, *rc.prior_weights})

    def on_epoch(model):
        S, T = all_embeddings(model, text, types, train_edges, sim_nb, id_base=id_base)
        return float((val.ranks(S, T, 0.0) <= 10).mean())

    model, hist = train(settings, rc, text, types, train_edges, sim, seed, on_epoch, rank=rank,
                        world=world, device=device, id_base=id_base)
    model = model.cpu()
    if rank != 0:
        return model, hist
    S, T = all_embeddings(model, text, types, train_edges, sim_nb, id_base=id_base)
    pick = val.best_weight_by_bucket(S, T, multiples, rc.prior_buckets, rc.prior_bucket_min_pairs)
    prior_only = float((val.ranks(S, T, 1e4 * val.spread(S, T)) <= 10).mean())
    model.settings.prior_weight = float(pick["overall"])
    model.settings.prior_buckets = list(rc.prior_buckets)
    model.settings.prior_bucket_weights = [float(w) for w in pick["weights"]]
    cold = cold_start_embeddings(model, text, types, train_edges, sim_nb, val, id_base)
    terms: dict = {}
    if rc.popularity_term or rc.neighbour_term or rc.walk_term:
        val.set_similar(sim_nb.numpy())
        if rc.walk_term and rc.prior_candidates:
            val.set_walk(rc.prior_candidates)
        terms = val.best_terms_by_bucket(S, T, pick["weights"], multiples, rc.prior_buckets,
                                         rc.prior_bucket_min_pairs, cold=cold,
                                         neighbours=rc.neighbour_term, popularity=rc.popularity_term,
                                         walk=rc.walk_term)
        model.settings.popularity_bucket_weights = [float(w) for w in terms["popularity_weights"]]
        model.settings.neighbour_bucket_weights = [float(w) for w in terms["neighbour_weights"]]
        model.settings.walk_bucket_weights = [float(w) for w in terms["walk_weights"]]
    cold_model = float((val.ranks(*cold, 0.0) <= 10).mean())
    return model, {**hist, "validation_pairs": int(len(val.src)),
                   "prior_weight": round(float(pick["overall"]), 4),
                   "prior_bucket_weights": [round(w, 4) for w in pick["weights"]],
                   "validation_hr@10": round(pick["hr"], 4),
                   "validation_hr@10_by_prior_multiple": {str(k): round(v, 4) for k, v in pick["table"].items()},
                   "validation_hr@10_by_bucket": pick["buckets"],
                   "validation_hr@10_counts_first": round(prior_only, 4),
                   "validation_hr@10_popularity": round(float((val.popularity_ranks() <= 10).mean()), 4),
                   "validation_hr@10_cold_start": round(cold_model, 4),
                   **({"popularity_bucket_weights": [round(w, 4) for w in terms["popularity_weights"]],
                       "neighbour_bucket_weights": [round(w, 4) for w in terms["neighbour_weights"]],
                       "walk_bucket_weights": [round(w, 4) for w in terms["walk_weights"]],
                       "validation_hr@10_with_terms": round(terms["hr"], 4),
                       "validation_terms_by_bucket": terms["buckets"]} if terms else {})}


def walk_step_matrix(n: int, src: np.ndarray, dst: np.ndarray, count: np.ndarray, width: int):
    """[n, n] sparse: one step of the walk term over each product's co-purchase lists as the
    stage's neighbour table holds them (`graph_build.top_neighbours`: out and in, the `width`
    strongest each, ties by neighbour, an edge listed twice at its largest count), a list entry's
    count over the product's co-purchase events out + in (every edge, not only the listed)."""
    import scipy.sparse as sp

    df = pl.DataFrame({"a": np.asarray(src, np.int64), "b": np.asarray(dst, np.int64),
                       "c": np.asarray(count, np.float64)}).group_by(["a", "b"]).agg(pl.col("c").max())
    rows, cols, vals = [], [], []
    for key, other in (("a", "b"), ("b", "a")):
        top = (df.sort([key, "c", other], descending=[False, True, False])
               .with_columns(pl.int_range(pl.len()).over(key).alias("r")).filter(pl.col("r") < width))
        rows.append(top[key].to_numpy()), cols.append(top[other].to_numpy()), vals.append(top["c"].to_numpy())
    events = (np.bincount(df["a"].to_numpy(), weights=df["c"].to_numpy(), minlength=n)
              + np.bincount(df["b"].to_numpy(), weights=df["c"].to_numpy(), minlength=n))
    m = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    m.sum_duplicates()
    return (sp.diags(1.0 / np.maximum(events, 1.0)) @ m).tocsr()


def cold_start_embeddings(model: DualGNN, text, types, edges: tuple, sim_nb,
                          val: Validation, id_base: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every product's (source, target) embeddings once every validation source has lost its
    co-purchase edges (as a new listing has none): what the metadata and similar products give."""
    src, dst, count = edges[:3]
    gone = np.zeros(len(text), bool)
    gone[val.src] = True
    keep = ~gone[src] & ~gone[dst]
    return all_embeddings(model, text, types, (src[keep], dst[keep], count[keep]), sim_nb,
                          id_base=id_base)



def _two_hop(nodes: torch.Tensor, out_nb, in_nb, sim_nb) -> torch.Tensor:
    ring = nodes
    for _ in range(2):
        nb = torch.cat([ring[:, None], out_nb[ring], in_nb[ring], sim_nb[ring]], 1)
        ring = torch.unique(nb[nb >= 0])
    return ring


def _contrastive(queries: torch.Tensor, pos: torch.Tensor, negs: torch.Tensor, true_ids: np.ndarray,
                 neg_ids: np.ndarray, in_batch: bool, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy of each query's positive against the random non-edges `negs` and,
    with `in_batch`, the batch's other positives (drawn as often as products are bought, so they
    push popular products down). `log_q`: each product's log chance of being drawn as a
    negative, taken from every candidate's logit (not applied to in-batch negatives)."""
    if in_batch:
        return _softmax_loss(queries, torch.cat([pos, negs]), true_ids, np.concatenate([true_ids, neg_ids]))
    dev = queries.device
    pos_logit = (queries * pos).sum(1, keepdim=True)
    neg_logits = queries @ negs.T
    if log_q is not None:
        pos_logit = pos_logit - log_q[torch.from_numpy(true_ids).to(dev)][:, None]
        neg_logits = neg_logits - log_q[torch.from_numpy(neg_ids).to(dev)][None, :]
    same = torch.from_numpy(neg_ids[None, :] == true_ids[:, None]).to(dev)
    neg_logits = neg_logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(torch.cat([pos_logit, neg_logits], 1),
                           torch.zeros(len(true_ids), dtype=torch.long, device=dev))


def _softmax_loss(queries: torch.Tensor, cands: torch.Tensor, true_ids: np.ndarray,
                  cand_ids: np.ndarray) -> torch.Tensor:
    """Row i's positive is candidate i; another candidate that is the same product is masked."""
    logits = queries @ cands.T
    m = len(true_ids)
    same = torch.from_numpy(cand_ids[None, :] == true_ids[:, None])
    same[torch.arange(m), torch.arange(m)] = False
    logits = logits.masked_fill(same.to(logits.device), float("-inf"))
    return F.cross_entropy(logits, torch.arange(m, device=logits.device))
