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
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from autoknow_ray.index.knn_vote import normalize

FLOORS_FILE = "knn_floors.json"
SIMILARITY_GRID = tuple(round(x, 2) for x in np.arange(0.2, 0.951, 0.05))
SHARE_GRID = tuple(round(x, 2) for x in np.arange(0.3, 1.001, 0.05))


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
    rng = np.random.default_rng(seed)
    rows = np.arange(len(types))
    if len(rows) > max_rows:
        rows = np.sort(rng.choice(rows, size=max_rows, replace=False))
    lab_id = {t: i for i, t in enumerate(uniq)}
    labels = np.array([lab_id[types[i]] for i in rows])
    v = normalize(np.asarray(vectors, np.float32)[rows])
    sims = v @ v.T
    np.fill_diagonal(sims, -np.inf)
    kb, ks, kn = _votes(sims, labels, k)
    known_right = kb == labels
    sims[labels[:, None] == labels[None, :]] = -np.inf  # the title's whole type withheld
    _, us, un = _votes(sims, labels, k)
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
    top = max(x[0] for x in scored)
    tied = [x for x in scored if x[0] >= top - 1e-4]
    sims_tied = sorted({x[1] for x in tied})
    ms = sims_tied[len(sims_tied) // 2]
    at = sorted((x for x in tied if x[1] == ms), key=lambda x: x[2])
    out = dict(at[len(at) // 2][3])
    out.update({"rows": int(len(rows)), "types": len(uniq), "k": k,
                "no_floor_known_right": round(float(weight_known @ known_right), 4)})
    return out


def save(floors: dict, out: Path) -> None:
    (Path(out) / FLOORS_FILE).write_text(json.dumps(floors, indent=2))


def load(model_dir: Path) -> dict | None:
    p = Path(model_dir) / FLOORS_FILE
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    return d if "knn_min_similarity" in d else None
