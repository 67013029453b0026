"""The kNN type vote's floors, chosen in `fit` on a validation of its own: known and withheld
types, from the fit's type reference.

Every reference title (a capped, per-type sample) votes twice among the others: once with its
own type in the reference (a product of a known type: the vote should answer, and right), once
with every title of its own type removed (a product of a type the taxonomy lacks: any answer is
a product forced into a wrong known type). For each pair of floors on a grid (the nearest
neighbour's cosine, the best type's share of the vote) the choice maximises

    share of known-type votes answered right  -  share of withheld-type votes answered

(each type weighted alike); among tied pairs the middle one (median similarity floor, then the
median share floor at it), the choice farthest from either side. Nothing here reads eval gold: the
reference is fit's own training sample.

That objective weighs a product of a known type and one of a type the taxonomy lacks alike, as if
half the untyped products of a rebuild were of new types. A rebuild can do better: fit also keeps
the whole grid and the two distributions of the nearest neighbour's cosine (known-type votes,
withheld-type votes), and the rebuild estimates from a capped sample of its own untyped products
which share of them looks known (`known_share`: the mixture of the two distributions that fits
the sample best, least squares on histograms), then takes the floors that maximise

    known_share * right  -  (1 - known_share) * forced

(`floors_for`): a catalogue whose untyped products all have close neighbours of known types (a
complete taxonomy, products with a label missing) is answered almost everywhere; one full of
products of new types refuses them. At a known share of 0.5 it is the choice above.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from autoknow_ray.index.knn_vote import normalize

FLOORS_FILE = "knn_floors.json"
SIMILARITY_GRID = tuple(round(x, 2) for x in np.arange(0.2, 0.951, 0.05))
SHARE_GRID = tuple(round(x, 2) for x in np.arange(0.3, 1.001, 0.05))
NEAREST_BINS = tuple(round(x, 2) for x in np.arange(0.0, 1.001, 0.05))  # histogram edges
REBUILD_KEYS = ("grid", "nearest_known", "nearest_withheld")  # what floors_for reads


def nearest_histogram(nearest: np.ndarray) -> list[float]:
    """Shares of `nearest` cosines per bin of NEAREST_BINS (values outside clipped in)."""
    x = np.clip(np.asarray(nearest, np.float64), 0.0, 1.0 - 1e-9)
    h = np.histogram(x, bins=np.asarray(NEAREST_BINS))[0].astype(np.float64)
    return [round(float(v), 6) for v in h / max(h.sum(), 1.0)]


def _votes(sims: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of `sims` (-inf where a reference is excluded): the best label, its share of the
    similarity-weighted vote of the k nearest, and the nearest cosine."""
    k = max(1, min(k, sims.shape[1]))
    idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    s = np.take_along_axis(sims, idx, axis=1)
    lab = labels[idx]
    w = np.where(np.isfinite(s), np.maximum(s, 0.0), 0.0)
    nearest = np.where(np.isfinite(s), s, -1.0).max(axis=1)
    n_lab = int(labels.max()) + 1
    tally = np.zeros((len(sims), n_lab))
    np.add.at(tally, (np.repeat(np.arange(len(sims)), k), lab.ravel()), w.ravel())
    total = tally.sum(axis=1)
    best = tally.argmax(axis=1)
    share = np.where(total > 0, tally.max(axis=1) / np.maximum(total, 1e-12), 0.0)
    return best, share, nearest


def choose_floors(types: list[str], vectors: np.ndarray, k: int = 10, max_rows: int = 4000,
                  seed: int = 0) -> dict:
    """The floors (and the validation figures behind them) from labelled reference vectors.
    Needs at least 3 types with 2 titles each; otherwise {"skipped": reason}."""
    types = list(types)
    uniq = sorted(set(types))
    counts = {t: types.count(t) for t in uniq}
    if sum(c >= 2 for c in counts.values()) < 3:
        return {"skipped": "fewer than 3 types with 2 reference titles: floors not chosen"}
    rows = _draw_rows(len(types), max_rows, seed)
    lab_id = {t: i for i, t in enumerate(uniq)}
    labels = np.array([lab_id[types[i]] for i in rows])
    (kb, ks, kn), (_, us, un) = _present_and_withheld(np.asarray(vectors, np.float32)[rows], labels, k)
    known_right = kb == labels
    # each type weighs alike: a mean over types of per-type means. A title whose type has no
    # other reference title can never be answered right: it counts among the withheld-type votes
    # only (a long-tailed catalogue, most of its types one or two titles, would otherwise pull
    # the floors up to refuse nearly everything)
    per_type = np.bincount(labels)
    weight = 1.0 / per_type[labels]
    weight = weight / weight.sum()
    multi = per_type[labels] >= 2
    weight_known = np.where(multi, 1.0 / per_type[labels], 0.0)
    weight_known = weight_known / weight_known.sum()
    scored = []
    for ms in SIMILARITY_GRID:
        for mh in SHARE_GRID:
            answered_k = (kn >= ms) & (ks >= mh - 1e-9)
            answered_u = (un >= ms) & (us >= mh - 1e-9)
            right = float(weight_known @ (answered_k & known_right))
            forced = float(weight @ answered_u)
            scored.append((round(right - forced, 4), ms, mh,
                           {"knn_min_similarity": float(ms), "knn_min_share": float(mh),
                            "known_answered_right": round(right, 4),
                            "known_answered": round(float(weight_known @ answered_k), 4),
                            "withheld_forced": round(forced, 4)}))
    out = dict(_best(scored))
    out.update({"rows": int(len(rows)), "types": len(uniq), "k": k,
                "no_floor_known_right": round(float(weight_known @ known_right), 4),
                # for the rebuild's own choice (floors_for): every grid point, and the nearest
                # neighbour's cosine of known-type votes (types with a second title) and of
                # withheld-type votes
                "grid": [[x[1], x[2], x[3]["known_answered_right"], x[3]["withheld_forced"]]
                         for x in scored],
                "nearest_known": nearest_histogram(kn[multi]),
                "nearest_withheld": nearest_histogram(un)})
    return out


def _best(scored: list[tuple]) -> dict:
    """The grid point of the best objective; among ties the middle one (median similarity
    floor, then the median share floor at it)."""
    top = max(x[0] for x in scored)
    tied = [x for x in scored if x[0] >= top - 1e-4]
    sims_tied = sorted({x[1] for x in tied})
    ms = sims_tied[len(sims_tied) // 2]
    at = sorted((x for x in tied if x[1] == ms), key=lambda x: x[2])
    return at[len(at) // 2][3]


def known_share(sample_hist: list[float], known_hist: list[float], withheld_hist: list[float]) -> float:
    """The share p in [0, 1] for which p * known + (1 - p) * withheld is nearest (least squares)
    to the sample's histogram of nearest-neighbour cosines."""
    u, k, w = (np.asarray(h, np.float64) for h in (sample_hist, known_hist, withheld_hist))
    d = k - w
    denom = float(d @ d)
    if denom < 1e-12:  # the two distributions are alike: no evidence either way
        return 0.5
    return float(np.clip((u - w) @ d / denom, 0.0, 1.0))


def floors_for(floors: dict, share: float) -> dict:
    """The floors of best share * right - (1 - share) * forced on fit's grid, with the figures
    behind them; `floors` as fit saved them (needs its "grid")."""
    scored = [(round(share * right - (1 - share) * forced, 4), ms, mh,
               {"knn_min_similarity": float(ms), "knn_min_share": float(mh),
                "known_answered_right": right, "withheld_forced": forced})
              for ms, mh, right, forced in floors["grid"]]
    return _best(scored)


def save(floors: dict, out: Path) -> None:
    (Path(out) / FLOORS_FILE).write_text(json.dumps(floors, indent=2))


def load(model_dir: Path) -> dict | None:
    p = Path(model_dir) / FLOORS_FILE
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    return d if "knn_min_similarity" in d else None


# voters scored at once: their similarity rows against every reference vector are the largest
# arrays of the driver's taxonomy work (4,000 voters x 45,000 references were 0.7 GB of
# float32 plus masks of the same shape), so they are made a chunk at a time
VOTE_CHUNK = 256


def _chunked_votes(vectors: np.ndarray, labels: np.ndarray, voters: np.ndarray, k: int,
                   cut: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_votes` of each voter (a row of `vectors`) among every other row, where a row of the
    voter's own label at or above the voter's `cut` is excluded (what refused it removed); a
    chunk of voters at a time (each voter's vote depends on its own row only)."""
    parts = []
    for lo in range(0, len(voters), VOTE_CHUNK):
        v = voters[lo:lo + VOTE_CHUNK]
        sims = vectors[v] @ vectors.T
        sims[np.arange(len(v)), v] = -np.inf
        sims[(labels[v][:, None] == labels[None, :]) & (sims >= cut[lo:lo + VOTE_CHUNK, None])] = -np.inf
        parts.append(_votes(sims, labels, k))
    if not parts:
        return _votes(np.zeros((0, len(vectors)), np.float32), labels, k)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def _draw_rows(n: int, max_rows: int, seed: int) -> np.ndarray:
    """At most `max_rows` of `n` row numbers, a seeded uniform draw, in order."""
    rows = np.arange(n)
    if n > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_rows, replace=False))
    return rows


def _type_weights(labels: np.ndarray, n_labels: int, mask: np.ndarray) -> np.ndarray:
    """Per-row weights of the rows in `mask`: each type alike (a mean over types of per-type
    means), summing to 1 (all zero where no row is in `mask`)."""
    per_type = np.bincount(labels, minlength=n_labels)
    w = np.where(mask, 1.0 / np.maximum(per_type[labels], 1), 0.0)
    return w / w.sum() if w.sum() > 0 else w


def _present_and_withheld(vectors: np.ndarray, labels: np.ndarray, k: int):
    """Every row's vote among the others twice: its type present, and its whole type withheld
    (`_votes` of each)."""
    v = normalize(np.asarray(vectors, np.float32))
    sims = v @ v.T
    np.fill_diagonal(sims, -np.inf)
    present = _votes(sims, labels, k)
    sims[labels[:, None] == labels[None, :]] = -np.inf  # the title's whole type withheld
    return present, _votes(sims, labels, k)


def choose_spread_floors(new_labels: list[str], new_vectors: np.ndarray, known_labels: list[str],
                         known_vectors: np.ndarray | None, k: int = 10, max_rows: int = 4000,
                         seed: int = 0) -> dict:
    """The floors of the spread vote (`types.SpreadNewTypes`), chosen in the rebuild on its own
    new types. That vote answers only with a new type, so its errors differ from the first
    vote's: a refused product of a known type that takes a new type, and a product of a type no
    new type stands for that takes another's. Every sampled title votes among the others (the
    new types' sampled products, as grouped, and a capped sample of fit's reference):

    - a new type's title, its type present: it should be answered, with its own type (`right`);
    - a new type's title, its whole type withheld: an answer is a wrong new type (`forced`);
    - a known type's title, its whole type withheld (what a refused product of a known type
      looks like: nothing of its own type near): an answer is a known product taken (`taken`).

    The pair of floors on fit's grid maximising right - forced - taken (each a mean over types,
    types alike; ties: the middle one) is the choice. Without a new type of two sampled titles:
    {"skipped": reason}."""
    labels_all = list(new_labels) + list(known_labels)
    counts: dict[str, int] = {}
    for t in new_labels:
        counts[t] = counts.get(t, 0) + 1
    if not any(c >= 2 for c in counts.values()):
        return {"skipped": "no new type with 2 sampled titles: the first vote's floors"}
    vecs = [np.asarray(new_vectors, np.float32)]
    if known_vectors is not None and len(known_labels):
        vecs.append(np.asarray(known_vectors, np.float32))
    vectors = np.concatenate(vecs)
    rows = _draw_rows(len(labels_all), max_rows, seed)
    uniq = sorted(set(labels_all[i] for i in rows))
    lab_id = {t: i for i, t in enumerate(uniq)}
    labels = np.array([lab_id[labels_all[i]] for i in rows])
    is_new_row = rows < len(new_labels)
    new_ids = np.array(sorted({labels[i] for i in np.flatnonzero(is_new_row)}))
    label_is_new = np.zeros(len(uniq), dtype=bool)
    label_is_new[new_ids] = True
    (pb, ps, pn), (wb, ws, wn) = _present_and_withheld(vectors[rows], labels, k)
    per_type = np.bincount(labels, minlength=len(uniq))
    w_right = _type_weights(labels, len(uniq), is_new_row & (per_type[labels] >= 2))
    w_forced = _type_weights(labels, len(uniq), is_new_row)
    w_taken = _type_weights(labels, len(uniq), ~is_new_row)
    right_base = (pb == labels) & label_is_new[pb]
    new_answer_withheld = label_is_new[wb]
    scored = []
    for ms in SIMILARITY_GRID:
        for mh in SHARE_GRID:
            present = (pn >= ms) & (ps >= mh - 1e-9)
            withheld = (wn >= ms) & (ws >= mh - 1e-9) & new_answer_withheld
            right = float(w_right @ (present & right_base))
            forced = float(w_forced @ withheld)
            taken = float(w_taken @ withheld)
            scored.append((round(right - forced - taken, 4), ms, mh,
                           {"knn_min_similarity": float(ms), "knn_min_share": float(mh),
                            "new_answered_right": round(right, 4), "new_forced": round(forced, 4),
                            "known_taken": round(taken, 4)}))
    out = dict(_best(scored))
    out.update({"rows": int(len(rows)), "new_types": int(len(new_ids)),
                "known_types": int(len(uniq) - len(new_ids)), "k": k})
    return out


def choose_second_vote_floors(own_labels: list[str], own_vectors: np.ndarray | None,
                              new_labels: list[str], new_vectors: np.ndarray | None,
                              known_labels: list[str], known_vectors: np.ndarray | None,
                              refused_below: tuple[float, float], k: int = 10,
                              max_rows: int = 4000, seed: int = 0) -> dict:
    """The floors of the second vote (`types.SpreadNewTypes` with this catalogue's own typed
    titles): a product both votes refused takes a **known** type where its nearest titles, this
    catalogue's own among them, are of that type. Chosen in the rebuild, on the index that vote
    searches: this catalogue's titles of known types (`own_*`, typed by the first vote), the new
    types' titles as grouped (`new_*`) and fit's reference (`known_*`, searched, never voting).

    A product reaches the second vote refused: no title of its type was near enough for the
    vote that refused it. So each sampled title of this catalogue votes as such a product would,
    among the others with its own type's titles at or above the floor that refused it removed
    (`refused_below`: the first vote's similarity floor for a known-typed title, the spread
    vote's for a new type's):

    - a known-typed title answered with its own type: `right`; with another known type: `wrong`;
    - a new type's title answered with a known type: `forced` (a product of a type the taxonomy
      lacks pulled into a known one). An answer with a new type is the spread vote's, not this
      one's.

    The pair of floors on fit's grid maximising right - wrong - forced (right and wrong means
    over known types, forced over new types, types alike; ties: the middle one) is the choice.
    Types of one sampled title do not vote: one title says nothing of where its type's titles
    sit (a new type of one product is as often a known product named by a word of its title).
    Without a known type and a new type of two sampled titles each: {"skipped": reason}."""
    own_labels, new_labels = list(own_labels), list(new_labels)
    known_labels = list(known_labels) if known_vectors is not None else []

    def two_titles(labels: list[str]) -> bool:
        return len(labels) > len(set(labels))

    if own_vectors is None or new_vectors is None or not (two_titles(own_labels) and two_titles(new_labels)):
        return {"skipped": "no known type and new type of two sampled titles each: the first vote's floors"}
    parts = [np.asarray(own_vectors, np.float32), np.asarray(new_vectors, np.float32)]
    if known_labels:
        parts.append(np.asarray(known_vectors, np.float32))
    labels_all = own_labels + new_labels + known_labels
    uniq = sorted(set(labels_all))
    lab_id = {t: i for i, t in enumerate(uniq)}
    labels = np.array([lab_id[t] for t in labels_all])
    new_set = set(new_labels)
    label_is_known = np.array([t not in new_set for t in uniq])
    vectors = normalize(np.concatenate(parts))
    n_own = len(own_labels)
    voters = _draw_rows(n_own + len(new_labels), max_rows, seed)
    vl = labels[voters]
    cut = np.where(voters < n_own, refused_below[0], refused_below[1])
    best, share, nearest = _chunked_votes(vectors, labels, voters, k, cut)
    per_type = np.bincount(vl, minlength=len(uniq))
    is_own = voters < n_own
    w_known = _type_weights(vl, len(uniq), is_own & (per_type[vl] >= 2))
    w_new = _type_weights(vl, len(uniq), ~is_own & (per_type[vl] >= 2))
    own_right = best == vl
    known_answer = label_is_known[best]
    scored = []
    for ms in SIMILARITY_GRID:
        for mh in SHARE_GRID:
            answered = (nearest >= ms) & (share >= mh - 1e-9)
            right = float(w_known @ (answered & own_right))
            wrong = float(w_known @ (answered & ~own_right & known_answer))
            forced = float(w_new @ (answered & known_answer))
            scored.append((round(right - wrong - forced, 4), ms, mh,
                           {"knn_min_similarity": float(ms), "knn_min_share": float(mh),
                            "known_answered_right": round(right, 4), "known_answered_wrong": round(wrong, 4),
                            "new_forced_known": round(forced, 4)}))
    out = dict(_best(scored))
    out.update({"rows": int(len(voters)), "known_types": int(len(set(own_labels))),
                "new_types": int(len(new_set)), "k": k,
                "refused_below": [float(refused_below[0]), float(refused_below[1])]})
    return out
