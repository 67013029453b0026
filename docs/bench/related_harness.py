"""In-process harness (not part of the package): fit_and_validate on cached Instacart inputs.

Usage, from the repository root: python docs/bench/related_harness_prep.py, then
python docs/bench/related_harness.py '{"epochs": 6, "max_train_seconds": 100000}' (RelatedConfig keys)."""
import json, sys, time
import numpy as np, torch
from autoknow_ray.modules.related.config import RelatedConfig
from autoknow_ray.modules.related.model import GNNSettings
from autoknow_ray.modules.related.fit import fit_and_validate
torch.set_num_threads(1)
over = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
d = np.load('runs/icn/h/inputs.npz')
rc = RelatedConfig(**over)
n = len(d['text'])
settings = GNNSettings(text_dim=384, type_buckets=rc.type_buckets, type_dim=rc.type_dim, dim=rc.dim,
                       symmetric=rc.symmetric, fanout=rc.fanout)
t0 = time.time()
model, h = fit_and_validate(settings, rc, d['text'], d['types'].astype(np.int64),
                            (d['src'], d['dst'], d['count'], d['two_way']), (d['sa'], d['sb'], d['sw']), 0)
keys = ['epochs', 'steps', 'best_epoch', 'validation', 'validation_hr@10_by_prior_multiple',
        'validation_hr@10', 'validation_hr@10_counts_first', 'validation_hr@10_popularity',
        'validation_hr@10_cold_start', 'validation_hr@10_with_terms', 'walk_bucket_weights',
        'neighbour_bucket_weights', 'popularity_bucket_weights', 'validation_terms_by_bucket',
        'train_seconds']
print(json.dumps({'over': over, **{k: h.get(k) for k in keys},
                  'wall': round(time.time() - t0)}))
