"""In-process harness inputs (not part of the package): Instacart titles embedded, edges, title kNN."""
import numpy as np, polars as pl, torch
from autoknow_ray.nn.encoder import TextEncoder
from autoknow_ray.modules.related.model import type_bucket
torch.set_num_threads(1)
p = pl.read_parquet('runs/icn/cat/products.parquet').sort('product_id')
ids = p['product_id'].to_list(); index = {x: i for i, x in enumerate(ids)}
enc = TextEncoder('default', device='cpu', max_length=32)
text = enc.encode([t or '' for t in p['title'].to_list()])
types = type_bucket(p['product_type'].to_list(), 2048)
c = pl.read_parquet('runs/icn/cat/copurchase.parquet').group_by(['src', 'dst']).agg(pl.col('count').sum())
rev = c.select(pl.col('src').alias('dst'), pl.col('dst').alias('src')).with_columns(pl.lit(True).alias('two_way'))
c = c.join(rev, on=['src', 'dst'], how='left').with_columns(pl.col('two_way').fill_null(False))
src = np.array([index[x] for x in c['src'].to_list()]); dst = np.array([index[x] for x in c['dst'].to_list()])
from autoknow_ray.index.faiss_index import VectorIndex
vi = VectorIndex('ip', ivf_min_size=200000, nprobe=32, seed=0).build(text)
scores, nn = vi.search(text, 11)
a = np.repeat(np.arange(len(text)), nn.shape[1]); b, w = nn.reshape(-1), scores.reshape(-1)
keep = (b >= 0) & (b != a)
np.savez('runs/icn/h/inputs.npz', text=text, types=types, src=src, dst=dst,
         count=c['count'].to_numpy().astype(np.float64), two_way=c['two_way'].to_numpy(),
         sa=np.concatenate([a[keep], b[keep]]), sb=np.concatenate([b[keep], a[keep]]),
         sw=np.concatenate([w[keep], w[keep]]).astype(np.float64))
print(len(ids), len(src))
