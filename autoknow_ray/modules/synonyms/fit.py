"""`autoknow fit` for module 5: the synonym pair classifier, from the catalogue alone.

Labels come from what the catalogue holds (gold/ is never read), see `distant.py`: co-listed
terms and general rewrites are positives; near neighbours, random pairs of one attribute and
hard rewrites are negatives (neighbours and random pairs labelled by the rewrite rules). The
training set is a seeded sample of products (cap `max_train_products`) and of terms (cap
`max_train_terms`). Every pair is scored out of fold (`calibration_folds`); on the pairs that
look like the stage's candidates (co-listed terms, embedding neighbours, random pairs) the
shipped scorer is the classifier, or the embedding cosine where that ranks them better, and the
shipped threshold the one of most recall whose precision lower bound reaches `precision_target`
(None, and the module merges nothing, where none does); neighbour pairs alone give the
threshold for candidates that share no context (`knn_threshold`), and the negatives' cosines
the floor under which nothing merges (`cosine_floor`). The classifier shipped is trained on
every pair.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from autoknow_ray import runtime
from autoknow_ray.calibration import threshold_for_precision
from autoknow_ray.eval.metrics import prf
from autoknow_ray.modules.synonyms import distant, shift, transfer
from autoknow_ray.modules.synonyms.candidates import knn_pairs
from autoknow_ray.modules.synonyms.features import FEATURES, feature_matrix, key, quantity, \
    same_quantity, singular_key
from autoknow_ray.modules.synonyms.model import PairClassifier, save, score_pairs
from autoknow_ray.modules.synonyms.steps import TYPE_ATTRIBUTE
from autoknow_ray.pipeline import RunContext


def _sample_terms(ctx: RunContext) -> pl.DataFrame:
    """(title_key, kind, attribute, term) of a seeded product sample."""
    cfg = ctx.cfg.synonyms
    ds = runtime.read_parquet(ctx.table_path("ingest", "products"),
                              ["product_id", "title", "product_type", "attributes", "brand"])
    df = runtime.bounded_sample(ds, cfg.max_train_products, ctx.cfg.seed)
    if df.height == 0:
        return pl.DataFrame(schema={"title_key": pl.String, "kind": pl.String,
                                    "attribute": pl.String, "term": pl.String})
    df = df.with_columns(pl.col("title").map_elements(distant.title_key, return_dtype=pl.String)
                         .alias("title_key"))
    types = df.select("title_key", pl.lit("type").alias("kind"),
                      pl.lit(TYPE_ATTRIBUTE).alias("attribute"), pl.col("product_type").alias("term"))
    attrs = (df.select("title_key", "attributes").explode("attributes")
             .filter(pl.col("attributes").is_not_null())
             .select("title_key", pl.lit("value").alias("kind"),
                     pl.col("attributes").struct.field("name").alias("attribute"),
                     pl.col("attributes").struct.field("value").alias("term")))
    brand = df.select("title_key", pl.lit("value").alias("kind"), pl.lit("Brand").alias("attribute"),
                      pl.col("brand").alias("term"))
    out = pl.concat([types, attrs, brand], how="vertical_relaxed").with_columns(
        pl.col("term").str.strip_chars())
    return out.filter(pl.col("term").is_not_null() & (pl.col("term") != "")
                      & (pl.col("term").str.len_chars() <= cfg.max_term_chars)
                      & pl.col("attribute").is_not_null())


def _same_by_rule(a: str, b: str) -> bool:
    qa, qb = quantity(a), quantity(b)
    return key(a) == key(b) or singular_key(a) == singular_key(b) or (
        qa is not None and qb is not None and qa[0] != "number" and same_quantity(qa, qb))


def training_pairs(rows: pl.DataFrame, encoder, cfg, seed: int,
                   votes: transfer.CanonicalVotes | None = None
                   ) -> tuple[pl.DataFrame, pl.DataFrame, np.ndarray]:
    """Labelled pairs (kind, attribute, term_a, term_b, label, origin, split, cosine, and
    canonical_vote where `votes` is given: a pair's own two terms never vote for it), and the
    sampled vocabulary (kind, attribute, term, len) with its term vectors."""
    rng = np.random.default_rng(seed)
    colisted = distant.colisted_pairs(list(rows.iter_rows()))
    vocab = rows.group_by(["kind", "attribute", "term"]).len().sort(["kind", "attribute", "term"])
    if vocab.height > cfg.max_train_terms:
        vocab = vocab.sample(cfg.max_train_terms, seed=seed).sort(["kind", "attribute", "term"])
    terms = vocab["term"].to_list()
    is_val = {t: rng.random() < cfg.val_fraction for t in sorted(set(terms))}
    pairs: list[tuple[str, str, str, str, int, str]] = []
    for kind, attr, a, b in sorted(colisted):
        pairs.append((kind, attr, a, b, 1, "colisted"))
    for kind, attr, t in vocab.select("kind", "attribute", "term").iter_rows():
        for v in distant.positive_rewrites(t, rng)[:4]:
            pairs.append((kind, attr, t, v, 1, "rewrite"))
        for v in distant.negative_rewrites(t, rng):
            pairs.append((kind, attr, t, v, 0, "hard_rewrite"))
    vecs = encoder.encode(terms)
    near = knn_pairs(vocab, vecs, cfg.train_knn_k, cfg.train_min_cosine, cfg.ivf_min_size, seed)
    for kind, attr, a, b in near.select("kind", "attribute", "term_a", "term_b").iter_rows():
        if (kind, attr, a, b) in colisted:
            continue
        pairs.append((kind, attr, a, b, int(_same_by_rule(a, b)), "neighbour"))
    # unrelated terms of one attribute, at whatever cosine: what a query or basket shared by
    # two different things proposes, and where no neighbour pair is drawn
    rng_random = np.random.default_rng(seed + 3)
    for (kind, attr), g in vocab.group_by(["kind", "attribute"], maintain_order=True):
        group = g["term"].to_list()
        if len(group) < 2:
            continue
        for i, t in enumerate(group):
            for _ in range(cfg.random_negatives):
                j = int(rng_random.integers(len(group) - 1))
                u = group[j + (j >= i)]
                a, b = (t, u) if t < u else (u, t)
                if (kind, attr, a, b) in colisted:
                    continue
                pairs.append((kind, attr, a, b, int(_same_by_rule(a, b)), "random"))
    df = pl.DataFrame(pairs, schema=["kind", "attribute", "term_a", "term_b", "label", "origin"],
                      orient="row").unique(["kind", "attribute", "term_a", "term_b"], keep="first",
                                           maintain_order=True)
    # a pair is validation when either of its terms is: no validation term is seen in training
    val_terms = {t for t, v in is_val.items() if v}
    rng_split = np.random.default_rng(seed + 1)
    split = []
    for a, b in df.select("term_a", "term_b").iter_rows():
        if a in is_val or b in is_val:
            split.append("val" if (a in val_terms or b in val_terms) else "train")
        else:  # co-listed pairs of terms outside the term sample
            split.append("val" if rng_split.random() < cfg.val_fraction else "train")
    df = df.with_columns(pl.Series("split", split))
    strings = sorted(set(df["term_a"].to_list()) | set(df["term_b"].to_list()))
    sv = encoder.encode(strings)
    pos = {s: i for i, s in enumerate(strings)}
    ia = np.array([pos[s] for s in df["term_a"].to_list()], dtype=np.int64)
    ib = np.array([pos[s] for s in df["term_b"].to_list()], dtype=np.int64)
    cos = (sv[ia] * sv[ib]).sum(1) if len(ia) else np.zeros(0)
    df = df.with_columns(pl.Series("cosine", cos.astype(np.float32)))
    if votes is not None:
        v = votes.pair_votes(df["kind"].to_list(), df["attribute"].to_list(), df["term_a"].to_list(),
                             df["term_b"].to_list(), sv[ia], sv[ib])
        df = df.with_columns(pl.Series(transfer.FEATURE, v, dtype=pl.Float32))
    return df, vocab, vecs


def _average_precision(y: np.ndarray, s: np.ndarray) -> float:
    if y.sum() == 0:
        return 0.0
    order = np.argsort(-s, kind="stable")
    y = y[order]
    tp = np.cumsum(y)
    precision = tp / np.arange(1, len(y) + 1)
    return float((precision * y).sum() / y.sum())


def best_threshold(y: np.ndarray, s: np.ndarray) -> tuple[float, dict]:
    best = (0.5, prf(int(((s >= 0.5) & (y == 1)).sum()), int(((s >= 0.5) & (y == 0)).sum()),
                     int(((s < 0.5) & (y == 1)).sum())))
    for t in np.unique(np.round(s, 3)):
        if t <= 0.05:
            continue
        p = s >= t
        r = prf(int((p & (y == 1)).sum()), int((p & (y == 0)).sum()), int((~p & (y == 1)).sum()))
        if r["f1"] > best[1]["f1"]:
            best = (float(t), r)
    return best


CANDIDATE_LIKE = ("colisted", "neighbour", "random")  # pair origins like the stage's candidates


def _out_of_fold(x: np.ndarray, y: np.ndarray, cfg, seed: int) -> np.ndarray:
    """Each pair's score from classifiers that never saw it: per member (seed + m, as the
    shipped classifier's members), one trained on the other `calibration_folds` folds of that
    member's own draw of folds; the members' scores averaged, as the shipped classifier
    averages them."""
    members = max(1, int(getattr(cfg, "members", 1)))
    return np.mean([_out_of_fold_member(x, y, cfg, seed + m) for m in range(members)], axis=0)


def _out_of_fold_member(x: np.ndarray, y: np.ndarray, cfg, seed: int) -> np.ndarray:
    """One member's out-of-fold scores (the features are pairwise string and embedding
    measures, no term identity, so pairs are assigned to folds at random)."""
    folds = np.random.default_rng(seed + 7).integers(0, cfg.calibration_folds, len(y))
    out = np.zeros(len(y), dtype=np.float64)
    for f in range(cfg.calibration_folds):
        test = folds == f
        rest = ~test
        if not test.any():
            continue
        if y[rest].min() == y[rest].max():  # one class left to learn from: no ranking
            out[test] = float(y[rest][0])
            continue
        out[test] = train_member(x[rest], y[rest], cfg, seed + f).score(x[test])
    return out


def _prf_at(y: np.ndarray, s: np.ndarray, threshold: float | None) -> dict:
    """Precision, recall and F1 of the validation pairs at a threshold (None: nothing accepted)."""
    p = s >= threshold if threshold is not None else np.zeros(len(s), bool)
    return prf(int((p & (y == 1)).sum()), int((p & (y == 0)).sum()), int((~p & (y == 1)).sum()))


def train_classifier(x: np.ndarray, y: np.ndarray, cfg, seed: int) -> PairClassifier:
    """The shipped classifier: `members` MLPs trained alike with seeds seed, seed + 1, …, their
    probabilities averaged (a single MLP's threshold moved with its seed: WDC-PAVE's merges F1
    0.857 and 0.848 at seeds 0 and 10)."""
    members = max(1, int(getattr(cfg, "members", 1)))
    models = [train_member(x, y, cfg, seed + m) for m in range(members)]
    return models[0] if members == 1 else PairClassifier.averaged(models)


def train_member(x: np.ndarray, y: np.ndarray, cfg, seed: int) -> PairClassifier:
    """One MLP, on one torch thread (a few thousand weights: a second thread only waits,
    nn/threads.py)."""
    from autoknow_ray.nn.threads import torch_threads

    with torch_threads(1):
        return _train_member(x, y, cfg, seed)


def _train_member(x: np.ndarray, y: np.ndarray, cfg, seed: int) -> PairClassifier:
    torch.manual_seed(seed)
    model = PairClassifier(x.shape[1], cfg.hidden)
    mean, std = x.mean(0), x.std(0)
    constant = std < 1e-6
    model.mean.copy_(torch.from_numpy(mean))
    model.std.copy_(torch.from_numpy(np.where(constant, 1.0, std)))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    pos = max(float(y.sum()), 1.0)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(y) - pos) / pos))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(y), generator=g).split(cfg.batch_size):
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():  # a feature that never varied in training has no learned weight
        model.net[0].weight[:, torch.from_numpy(constant)] = 0.0
    return model


def _reference_scorer(model: PairClassifier, scorer: str, pairs: pl.DataFrame,
                      out_of_fold: np.ndarray | None, votes: transfer.CanonicalVotes | None = None,
                      vocab: pl.DataFrame | None = None, vectors: np.ndarray | None = None):
    """The shipped scorer over candidate pairs, with the out-of-fold score of every pair fit
    trained on (the shipped classifier was taught those labels)."""
    known = {}
    if out_of_fold is not None and scorer == "classifier":
        for (k, at, a, b), s in zip(pairs.select("kind", "attribute", "term_a", "term_b").iter_rows(),
                                    out_of_fold.tolist()):
            known[(k, at, a, b)] = known[(k, at, b, a)] = float(s)

    def score(cand: pl.DataFrame) -> np.ndarray:
        v = transfer.votes_of(votes, cand, vocab, vectors) if scorer == "classifier" else None
        s = score_pairs(model, scorer == "cosine", cand["term_a"].to_list(), cand["term_b"].to_list(),
                        cand["cosine"].to_numpy(), v)
        if scorer == "cosine":
            return s
        keys = cand.select("kind", "attribute", "term_a", "term_b").iter_rows()
        return np.array([known.get(k, v) for k, v in zip(keys, s.tolist())], np.float32)
    return score


def fit_synonyms(ctx: RunContext, out: Path) -> dict:
    from autoknow_ray.nn.encoder import TextEncoder

    cfg = ctx.cfg.synonyms
    t0 = time.perf_counter()
    rows = _sample_terms(ctx)
    if rows.select("kind", "attribute", "term").unique().height < 2:
        return {"skipped": "the catalogue has fewer than two type names or values to learn from"}
    encoder = TextEncoder(cfg.encoder, device=ctx.cfg.device)
    votes, vote_table = None, None
    if cfg.canonical_vote:  # what the catalogue's duplicate listings normalised (transfer.py)
        vote_table = transfer.canonical_table(rows, distant.colisted_pairs(list(rows.iter_rows())),
                                              cfg.canonical_vote_max_terms, ctx.cfg.seed)
        if vote_table.height:
            votes = transfer.CanonicalVotes(vote_table, encoder.encode(vote_table["term"].to_list()),
                                            cfg.canonical_vote_k)
    pairs, vocab, vocab_vectors = training_pairs(rows, encoder, cfg, ctx.cfg.seed, votes)
    y = pairs["label"].to_numpy().astype(np.int64)
    if y.min() == y.max():
        return {"skipped": "the catalogue gives only one class of training pairs"}
    x = feature_matrix(pairs["term_a"].to_list(), pairs["term_b"].to_list(), pairs["cosine"].to_numpy())
    if votes is not None:
        x = np.hstack([x, pairs[transfer.FEATURE].to_numpy().astype(np.float32).reshape(-1, 1)])
    if cfg.precision_target is None:  # the older rule: best F1 on the pairs held out by term
        train = (pairs["split"] == "train").to_numpy()
        val = ~train
        model = train_classifier(x[train], y[train], cfg, ctx.cfg.seed)
        scored, scored_y = model.score(x[val]), y[val]
        cos_scored = pairs["cosine"].to_numpy()[val].astype(np.float64)
        like_stage = np.ones(int(val.sum()), bool)
    else:
        # every pair scored out of fold (a classifier trained on the other folds), so the
        # threshold is calibrated on all the pairs that look like what the stage will judge:
        # co-listed terms, embedding neighbours and unrelated terms (what a shared query
        # proposes) of the catalogue's own terms. Rewrites
        # (initialisms, case, plurals made up from one term) are easy and teach the classifier,
        # but a threshold that is precise on them merges distinct brands that merely look alike
        scored, scored_y = _out_of_fold(x, y, cfg, ctx.cfg.seed), y
        cos_scored = pairs["cosine"].to_numpy().astype(np.float64)
        like_stage = pairs["origin"].is_in(list(CANDIDATE_LIKE)).to_numpy()
        model = train_classifier(x, y, cfg, ctx.cfg.seed)
    sv, cos_val, yv = scored[like_stage], cos_scored[like_stage], scored_y[like_stage]
    ap_model, ap_cos = _average_precision(yv, sv), _average_precision(yv, cos_val)
    # the classifier ships only where it ranks these pairs at least as well as the embedding
    # cosine it is given as a feature; else the cosine alone is the scorer
    scorer = "classifier" if ap_model >= ap_cos else "cosine"
    shipped_scores = sv if scorer == "classifier" else cos_val
    calibration = None
    if cfg.precision_target is not None:
        c = threshold_for_precision(shipped_scores, yv, cfg.precision_target)
        calibration = {**c.as_dict(), "pairs": "co-listed, neighbour and random same-attribute pairs, scored out of fold"}
        threshold = c.threshold
        val_prf = _prf_at(yv, shipped_scores, threshold)
    else:
        threshold, val_prf = best_threshold(yv, shipped_scores)
    # pairs whose terms share no context (a query, a basket, a duplicate listing) are judged on
    # their strings and vectors alone: their own threshold, calibrated on fit's neighbour pairs
    # (the pooled one is carried by co-listed positives, which such pairs are not), at or above
    # the pooled one; None: such pairs merge nothing
    knn_threshold, knn_calibration = threshold, None
    if cfg.precision_target is not None and threshold is not None:
        neighbour = pairs["origin"].eq("neighbour").to_numpy()
        all_scores = scored if scorer == "classifier" else cos_scored
        kc = threshold_for_precision(all_scores[neighbour], scored_y[neighbour], cfg.precision_target,
                                     floor=threshold)
        knn_calibration = {**kc.as_dict(), "pairs": "neighbour pairs (no shared context), scored out of fold"}
        knn_threshold = kc.threshold
    # what the shipped scorer accepts among fit's own embedding neighbours, for a rebuild to
    # compare with (shift.py); a pair fit trained on keeps its out-of-fold score
    reference = None if threshold is None else shift.accepted_rate(
        vocab, vocab_vectors,  # the encoder's vectors are L2-normalised
        _reference_scorer(model, scorer, pairs, scored if cfg.precision_target is not None else None,
                          votes, vocab, vocab_vectors),
        threshold, cfg, ctx.cfg.seed)
    # the cosine down to which fit drew negatives (their 1st percentile, not one outlier): the
    # classifier has learnt "no" there
    negatives = pairs.filter(pl.col("origin").is_in(["neighbour", "random"]) & (pl.col("label") == 0))
    cosine_floor = cfg.train_min_cosine
    if cfg.random_negatives and negatives.filter(pl.col("origin") == "random").height:
        cosine_floor = min(cosine_floor, float(negatives["cosine"].quantile(0.01)))
    meta = {"hidden": cfg.hidden, "members": model.members, "threshold": threshold, "encoder": cfg.encoder,
            "cosine_floor": round(cosine_floor, 4),
            "seed": ctx.cfg.seed, "scorer": scorer, "calibration": calibration,
            "shift_reference": reference, "knn_threshold": knn_threshold,
            "knn_calibration": knn_calibration,
            "extra_features": [transfer.FEATURE] if votes is not None else [],
            "canonical_vote_k": cfg.canonical_vote_k}
    save(model, out, meta)
    if votes is not None:
        transfer.save(out, vote_table, votes.vectors)
    pairs.write_parquet(out / "training_pairs.parquet")
    origins = dict(pairs.group_by(["origin", "label"]).len()
                   .select(pl.format("{}.{}", "origin", "label"), "len").iter_rows())
    return {"pairs": pairs.height, "positives": int(y.sum()), "origins": origins,
            "features": len(FEATURES) + (1 if votes is not None else 0),
            "canonical_vote_terms": 0 if votes is None else len(votes),
            "threshold": None if threshold is None else round(threshold, 4), "scorer": scorer,
            "knn_threshold": None if knn_threshold is None else round(knn_threshold, 4),
            "knn_calibration": knn_calibration, "cosine_floor": round(cosine_floor, 4),
            "calibration": calibration, "shift_reference": reference,
            "val_auc_pr": round(ap_model, 4),
            "val_auc_pr_cosine": round(ap_cos, 4),
            "val_precision": val_prf["precision"], "val_recall": val_prf["recall"],
            "val_f1": val_prf["f1"], "seconds": round(time.perf_counter() - t0, 2)}
