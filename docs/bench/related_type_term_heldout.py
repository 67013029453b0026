"""Ad hoc (not part of the package): a type term beside the count prior and the walk on the held-out
pairs of a catalogue (`gold/copurchase`): log1p(100 * share of the co-purchases of the source's
type that went to B), weights tried on the held-out pairs themselves (a ceiling, not a result).

Usage, from the repository root: python docs/bench/related_type_term_heldout.py"""
import numpy as np, polars as pl, scipy.sparse as sp
from autoknow_ray.modules.related.fit import walk_step_matrix
cat = 'runs/ig/full'
p = pl.read_parquet(f'{cat}/products.parquet').sort('product_id')
ids = p['product_id'].to_list(); at = {x: i for i, x in enumerate(ids)}; n = len(ids)
types = p['product_type'].to_list(); tix = {t: i for i, t in enumerate(sorted({x for x in types if x}))}
ty = np.array([tix.get(x, -1) for x in types])
c = pl.read_parquet(f'{cat}/copurchase.parquet').group_by(['src', 'dst']).agg(pl.col('count').sum())
a = np.array([at[x] for x in c['src'].to_list()]); b = np.array([at[x] for x in c['dst'].to_list()]); w = c['count'].to_numpy().astype(float)
g = pl.read_parquet(f'{cat}/gold/copurchase.parquet')
gs = np.array([at.get(x, -1) for x in g['src'].to_list()]); gd = np.array([at.get(x, -1) for x in g['dst'].to_list()])
C = sp.coo_matrix((np.r_[w, w], (np.r_[a, b], np.r_[b, a])), shape=(n, n)).tocsr(); C.sum_duplicates()
L = C.copy(); L.data = np.log1p(L.data)
pop = np.log1p(np.bincount(b, weights=w, minlength=n))
P = walk_step_matrix(n, a, b, w, 20)
# type -> product co-purchase shares
T = len(tix); okt = ty >= 0
rows = ty[np.r_[a, b]]; cols = np.r_[b, a]; vals = np.r_[w, w]; m = rows >= 0
TM = sp.csr_matrix((vals[m], (rows[m], cols[m])), shape=(T, n)); TM.sum_duplicates()
TM = sp.diags(1.0 / np.maximum(np.asarray(TM.sum(1)).ravel(), 1)) @ TM
TM = TM.tocsr()
srcs = np.unique(gs); rowpos = {x: i for i, x in enumerate(srcs)}
combos = [(0, 0), (4, 0)] + [(4, g) for g in (0.25, 0.5, 1, 2, 4)] + [(0, g) for g in (0.5, 2)]
hit = {cb: 0 for cb in combos}
for lo in range(0, len(srcs), 512):
    s = srcs[lo:lo+512]
    Ls = L[s].toarray(); W = np.log1p(100 * (P[s] @ P).toarray())
    Ty = np.zeros((len(s), n)); has = ty[s] >= 0
    Ty[has] = np.log1p(100 * TM[ty[s][has]].toarray())
    sel = np.isin(gs, s)
    for cb in combos:
        sc = Ls + cb[0] * W + cb[1] * Ty + 1e-6 * pop[None, :]
        sc[np.arange(len(s)), s] = -np.inf
        top = np.argpartition(-sc, 10, 1)[:, :10]
        for x, y in zip(gs[sel], gd[sel]):
            hit[cb] += y in top[rowpos[x] - lo]
for cb in combos: print(cb, round(hit[cb] / len(gs), 4))
