"""Ad hoc (not part of the package): forms of the walk term compared on fit's validation split of the
Instacart harness inputs (`docs/bench/related_harness_prep.py`): the count prior plus beta times
log1p(100 P2), log1p(P2 * events(A)) or log1p(P Lc) (the second step not normalised), over
co-purchase lists capped at W out and in, HR@10 on 4,000 validation pairs.

Usage, from the repository root: python docs/bench/related_walk_forms.py"""
import numpy as np, scipy.sparse as sp
from autoknow_ray.modules.related.fit import split_events, Validation
from autoknow_ray.modules.related.model import padded_neighbours
d = np.load('runs/icn/h/inputs.npz')
src, dst, count = d['src'], d['dst'], d['count']
n = len(d['text'])
rng = np.random.default_rng(1)
tr, va = split_events(count, 0.1, rng)
keep = tr > 0
s, t, w = src[keep], dst[keep], tr[keep].astype(np.float64)
val = Validation(n, src[va > 0], dst[va > 0], (s, t, w), 4000, rng)
L = val.counts.tocsr().copy(); L.data = np.log1p(L.data)
pop = np.log1p(val.popularity)
ev = np.bincount(s, weights=w, minlength=n) + np.bincount(t, weights=w, minlength=n)
def lists(W):
    # directed capped lists as a sparse matrix of counts (out list + in list), as serving holds them
    M = sp.coo_matrix((w, (s, t)), shape=(n, n)).tocsr(); M.sum_duplicates()
    def cap(m):
        m = m.tocsr(); r, c, v = [], [], []
        for i in range(n):
            a, b = m.indptr[i], m.indptr[i+1]
            if a == b: continue
            o = np.lexsort((m.indices[a:b], -m.data[a:b]))[:W]
            r.append(np.full(len(o), i)); c.append(m.indices[a:b][o]); v.append(m.data[a:b][o])
        return sp.csr_matrix((np.concatenate(v), (np.concatenate(r), np.concatenate(c))), shape=(n, n))
    return cap(M) + cap(M.T.tocsr())
res = {}
for W in [10, 20, 40]:
    Lc = lists(W)
    inv = sp.diags(1.0 / np.maximum(ev, 1))
    P = (inv @ Lc).tocsr()
    forms = {}
    for beta in [4, 8, 16, 32]:
        forms[f'W{W} L+{beta}*log1p(100 P2)'] = lambda c, b=beta: c['L'] + b * np.log1p(100 * c['P2'])
        forms[f'W{W} L+{beta/4}*log1p(P Lc)'] = lambda c, b=beta: c['L'] + b / 4 * np.log1p(c['PC'])
        forms[f'W{W} L+{beta/4}*log1p(ev P2)'] = lambda c, b=beta: c['L'] + b / 4 * np.log1p(c['EV'])
    hits = {k: [] for k in forms}
    for lo in range(0, len(val.src), 512):
        a, b = val.src[lo:lo+512], val.dst[lo:lo+512]
        p2 = (P[a] @ P).toarray()
        c = {'L': L[a].toarray(), 'P2': p2, 'PC': (P[a] @ Lc).toarray(), 'EV': p2 * ev[a][:, None]}
        r = np.arange(len(a))
        for k, fn in forms.items():
            sc = fn(c) + 1e-6 * pop[None, :]; sc[r, a] = -np.inf
            hits[k].append(((sc > sc[r, b][:, None]).sum(1) + 1) <= 10)
    for k, h in hits.items(): print(f'{np.concatenate(h).mean():.4f}', k, flush=True)
