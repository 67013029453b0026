"""Ad hoc (not part of the package): for products without behaviour, what their similar (title kNN)
products were bought with, raw mean counts (the neighbour term) against the mean of their walk
steps P(s, B) (normalised per similar product), with popularity, on fit's validation pairs of the
harness inputs (`docs/bench/related_harness_prep.py`), HR@10.

Usage, from the repository root: python docs/bench/related_cold_neighbours.py"""
import numpy as np, scipy.sparse as sp
from autoknow_ray.modules.related.fit import split_events, Validation, walk_step_matrix
from autoknow_ray.modules.related.model import padded_neighbours
d = np.load('runs/icn/h/inputs.npz')
src, dst, count = d['src'], d['dst'], d['count']
n = len(d['text'])
rng = np.random.default_rng(1)
tr, va = split_events(count, 0.1, rng)
keep = tr > 0
s, t, w = src[keep], dst[keep], tr[keep].astype(np.float64)
val = Validation(n, src[va > 0], dst[va > 0], (s, t, w), 4000, rng)
gone = np.zeros(n, bool); gone[val.src] = True
k2 = np.ones(len(s), bool)
s2, t2, w2 = s[k2], t[k2], w[k2]
C = sp.coo_matrix((np.r_[w2, w2], (np.r_[s2, t2], np.r_[t2, s2])), shape=(n, n)).tocsr(); C.sum_duplicates()
P = walk_step_matrix(n, s2, t2, w2, 20)
Pfull = walk_step_matrix(n, s2, t2, w2, 10**6)
sim = padded_neighbours(n, d['sa'], d['sb'], d['sw'], 10)
pop = np.log1p(np.bincount(t2, weights=w2, minlength=n))
def agg(M, a):
    nb = sim[a]; ok = nb >= 0; kk = np.maximum(ok.sum(1), 1)
    rows = np.repeat(np.arange(len(a)), ok.sum(1))
    A = sp.csr_matrix(((1.0 / kk)[rows], (rows, np.arange(len(rows)))), shape=(len(a), len(rows)))
    return (A @ M[nb[ok]]).toarray()
forms = {'popularity': lambda c: c['pop'], 'mean counts (neighbour term)': lambda c: c['mc'],
         'mean counts + 1 pop': lambda c: c['mc'] + c['pop']}
for sc_ in [10, 100, 1000]:
    forms[f'log1p({sc_} mean P capped)'] = lambda c, x=sc_: np.log1p(x * c['mp'])
    forms[f'log1p({sc_} mean P full)'] = lambda c, x=sc_: np.log1p(x * c['mpf'])
    for g in [0.25, 0.5, 1.0]:
        forms[f'log1p({sc_} mean P capped) + {g} pop'] = lambda c, x=sc_, g=g: np.log1p(x * c['mp']) + g * c['pop']
hits = {k: [] for k in forms}
for lo in range(0, len(val.src), 512):
    a, b = val.src[lo:lo+512], val.dst[lo:lo+512]
    c = {'pop': np.broadcast_to(pop, (len(a), n)), 'mc': np.log1p(agg(C, a)), 'mp': agg(P, a), 'mpf': agg(Pfull, a)}
    r = np.arange(len(a))
    for k, fn in forms.items():
        sc = fn(c) + 1e-6 * pop[None, :]; sc[r, a] = -np.inf
        hits[k].append(((sc > sc[r, b][:, None]).sum(1) + 1) <= 10)
for k, h in hits.items(): print(f'{np.concatenate(h).mean():.4f}', k, flush=True)
