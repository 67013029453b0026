"""The related GNN trained data-parallel through Ray Train (`related.train_workers` > 1): two CPU
workers (gloo), each taking its share of every epoch's batches, gradients averaged before each
step. The workers must end with the same weights after the same number of steps (the launcher
checks both and refuses a group that diverged), and the model they give is the one fit saves."""
from __future__ import annotations

import numpy as np
import pytest

from autoknow_ray.modules.related.config import RelatedConfig
from autoknow_ray.modules.related.fit import fit_with_ray_train, rank_batches
from autoknow_ray.modules.related.model import DualGNN, GNNSettings
from autoknow_ray.modules.related.steps import TEXT_DIM


def test_rank_batches_split_an_epoch_into_equal_counts_of_disjoint_batches():
    sup = np.arange(103)
    one = rank_batches(sup, 10)
    assert [len(b) for b in one] == [10] * 10 + [3] and np.array_equal(np.concatenate(one), sup)
    parts = [rank_batches(sup, 10, r, 3) for r in range(3)]
    assert {len(p) for p in parts} == {4}  # 103 // 3 = 34 edges a worker: 4 batches each
    flat = [np.concatenate(p) for p in parts]
    assert all(len(f) == len(set(f.tolist())) for f in flat)
    assert not set(flat[0].tolist()) & set(flat[1].tolist())  # no edge in two workers' batches
    assert all(len(b) > 0 for p in parts for b in p)
    # fewer edges than workers: every worker trains on them all, one batch
    assert [len(p) for p in (rank_batches(np.arange(2), 10, r, 3) for r in range(3))] == [1, 1, 1]


def test_two_data_parallel_workers_train_one_model(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    n = 80
    text = rng.standard_normal((n, TEXT_DIM)).astype(np.float32)
    types = rng.integers(0, 8, n).astype(np.int64)
    # each product bought with the next three; a few pairs both ways
    src = np.repeat(np.arange(n), 3)
    dst = (src + np.tile([1, 2, 3], n)) % n
    count = rng.integers(1, 6, len(src)).astype(np.float64)
    two_way = rng.random(len(src)) < 0.2
    sim = (np.arange(n), (np.arange(n) + 40) % n, np.ones(n))
    rc = RelatedConfig(epochs=2, batch_size=16, negatives=16, dim=8, type_buckets=8, type_dim=4,
                       validation_fraction=0.2, validation_pairs=60, max_train_seconds=60,
                       train_workers=2, train_cpus_per_worker=0.5, train_use_gpu=False)
    settings = GNNSettings(text_dim=TEXT_DIM, type_buckets=8, type_dim=4, dim=8, symmetric=False,
                           encoder="default", text_max_length=16, fanout=rc.fanout)
    model, history = fit_with_ray_train(settings, rc, text, types, (src, dst, count, two_way), sim,
                                        seed=0, scratch=tmp_path / "trained")
    assert isinstance(model, DualGNN) and model.settings.dim == 8
    assert history["train_workers"] == 2 and history["train_device"] == "cpu"
    assert history["epochs"] == 2 and history["steps_per_worker"] > 0
    # rank 0 validated and picked the prior's weight, as a one-process fit does
    assert "validation_hr@10" in history
    assert model.settings.prior_weight == pytest.approx(history["prior_weight"], abs=1e-4)
    import torch

    s, t = model(torch.arange(5), model.metadata(*_tensors(text, types)), *_graph(n, model))
    assert s.shape == (5, 8) and t.shape == (5, 8)


def _tensors(text, types):
    import torch

    return torch.from_numpy(text), torch.from_numpy(types)


def _graph(n, model):
    import torch

    from autoknow_ray.modules.related.model import N_DEGREE

    empty = torch.full((n, model.settings.fanout), -1, dtype=torch.long)
    return torch.zeros(n, N_DEGREE), empty, empty, empty
