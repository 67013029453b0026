"""FAISS wrapper: exact and IVF search, persistence, k-means (CPU path, random vectors)."""
import numpy as np
import pytest

from autoknow_ray.index.faiss_index import VectorIndex, gpu_available, kmeans


def _unit(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_search_matches_numpy():
    x = _unit(500, 32)
    q = _unit(20, 32, seed=1)
    ix = VectorIndex(use_gpu=False).build(x)
    assert ix.kind == "flat" and ix.ntotal == 500
    scores, ids = ix.search(q, 5)
    ref = np.argsort(-(q @ x.T), axis=1)[:, :5]
    assert np.array_equal(ids, ref)
    assert np.allclose(scores, np.take_along_axis(q @ x.T, ref, 1), atol=1e-5)


def test_k_larger_than_index_is_padded():
    ix = VectorIndex(use_gpu=False).build(_unit(3, 8))
    scores, ids = ix.search(_unit(2, 8, 1), 5)
    assert ids.shape == (2, 5) and (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    empty = VectorIndex(use_gpu=False).build(np.zeros((0, 8), np.float32))
    assert (empty.search(_unit(1, 8), 2)[1] == -1).all()


def test_ivf_chosen_by_size_and_roundtrip(tmp_path):
    x = _unit(2000, 16)
    ix = VectorIndex(ivf_min_size=1000, nprobe=64, use_gpu=False).build(x)
    assert ix.kind == "ivf"
    _, ids = ix.search(x[:50], 1)
    assert (ids[:, 0] == np.arange(50)).mean() > 0.95
    ix.save(tmp_path / "v.faiss")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.faiss", "v.faiss.json"]
    back = VectorIndex.load(tmp_path / "v.faiss", use_gpu=False)
    assert back.kind == "ivf" and back.ntotal == 2000
    assert np.array_equal(back.search(x[:50], 3)[1], ix.search(x[:50], 3)[1])


def test_gpu_flag_without_gpu_raises():
    if gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError):
        VectorIndex(use_gpu=True).build(_unit(10, 4))


def test_kmeans_separates_clusters():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 8)).astype(np.float32) * 10
    x = np.concatenate([c + rng.standard_normal((50, 8)).astype(np.float32) for c in centers])
    cent, assign = kmeans(x, 4, niter=20, seed=3, use_gpu=False)
    assert cent.shape == (4, 8) and assign.shape == (200,)
    for g in range(4):  # each true cluster lands in one k-means cluster
        assert len(set(assign[g * 50 : (g + 1) * 50].tolist())) == 1
    assert len(set(assign.tolist())) == 4
    c2, a2 = kmeans(x, 4, niter=20, seed=3, use_gpu=False)
    assert np.array_equal(assign, a2)  # seeded
    c3, a3 = kmeans(x[:3], 10, use_gpu=False)  # k clipped to n
    assert c3.shape[0] == 3
