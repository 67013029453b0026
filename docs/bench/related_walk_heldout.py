"""Ad hoc (not part of the package): how far the count prior plus the walk term can go on a
catalogue's held-out pairs (`gold/copurchase`), HR@10 per pair, for weights beta of the walk term
log1p(WALK_SCALE * P2) beside log1p(count) (popularity breaks ties), over the co-purchase lists
capped at 20 out and in as the stage's walk reads them. The weights are tried on the held-out
pairs themselves: a ceiling for what fit's choice can reach, not a result.

Usage, from the repository root: python docs/bench/related_walk_heldout.py runs/ig/full"""
import sys

import numpy as np, polars as pl, scipy.sparse as sp
from autoknow_ray.modules.related.fit import walk_step_matrix
cat = sys.argv[1] if len(sys.argv) > 1 else 'runs/ig/full'
p = pl.read_parquet(f'{cat}/products.parquet').sort('product_id')
ids = p['product_id'].to_list(); at = {x: i for i, x in enumerate(ids)}; n = len(ids)
c = pl.read_parquet(f'{cat}/copurchase.parquet').group_by(['src', 'dst']).agg(pl.col('count').sum())
a = np.array([at[x] for x in c['src'].to_list()]); b = np.array([at[x] for x in c['dst'].to_list()]); w = c['count'].to_numpy().astype(float)
g = pl.read_parquet(f'{cat}/gold/copurchase.parquet')
gs = np.array([at.get(x, -1) for x in g[g.columns[0]].to_list()]); gd = np.array([at.get(x, -1) for x in g[g.columns[1]].to_list()])
ok = (gs >= 0) & (gd >= 0); gs, gd = gs[ok], gd[ok]
C = sp.coo_matrix((np.r_[w, w], (np.r_[a, b], np.r_[b, a])), shape=(n, n)).tocsr(); C.sum_duplicates()
L = C.copy(); L.data = np.log1p(L.data)
pop = np.log1p(np.bincount(b, weights=w, minlength=n))
P = walk_step_matrix(n, a, b, w, 20)
srcs = np.unique(gs)
betas = [0, 0.25, 0.5, 1, 2, 4, 8, 16, 1e6]
hit = {be: 0 for be in betas}
for lo in range(0, len(srcs), 512):
    s = srcs[lo:lo+512]
    Ls = L[s].toarray(); W = (P[s] @ P).toarray(); W = np.log1p(100 * W)
    for be in betas:
        sc = Ls + be * W + 1e-6 * pop[None, :]
        sc[np.arange(len(s)), s] = -np.inf
        top = np.argpartition(-sc, 10, 1)[:, :10]
        rowpos = {x: i for i, x in enumerate(s)}
        sel = np.isin(gs, s)
        for x, y in zip(gs[sel], gd[sel]):
            hit[be] += y in top[rowpos[x]]
for be in betas: print(be, round(hit[be] / len(gs), 4))
