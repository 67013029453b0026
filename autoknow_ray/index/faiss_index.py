"""FAISS wrappers shared by the modules: exact / IVF inner-product search and k-means.

One code path for CPU and GPU: an index moves to the GPU when the installed FAISS has the GPU API
(`faiss.StandardGpuResources`, absent from faiss-cpu where `get_num_gpus()` still answers 0) and
sees a device. Small collections get an exact flat index, large ones an IVF index whose list
count follows the size. Indexes are saved with `faiss.write_index` (never pickle).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import faiss
import numpy as np

GPU_MAX_K = 2048  # FAISS GPU search limit on k


def gpu_available() -> bool:
    """True when this FAISS build has the GPU API and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _want_gpu(use_gpu: bool | str) -> bool:
    if use_gpu == "auto":
        return gpu_available()
    if use_gpu and not gpu_available():
        raise RuntimeError("a GPU FAISS index was asked for but this FAISS build sees no GPU")
    return bool(use_gpu)


def _as_f32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    return np.ascontiguousarray(x)


_GPU_RES = None


def _gpu_resources():
    global _GPU_RES
    if _GPU_RES is None:
        _GPU_RES = faiss.StandardGpuResources()
    return _GPU_RES


class VectorIndex:
    """Nearest-neighbour search over a fixed set of vectors (ids are row numbers).

    metric "ip" (inner product: cosine on L2-normalised vectors) or "l2". Exact flat search below
    `ivf_min_size` vectors, IVF (nlist ≈ 4·√n) above it, probing `nprobe` lists.
    """

    def __init__(
        self,
        metric: str = "ip",
        ivf_min_size: int = 100_000,
        nlist: int | None = None,
        nprobe: int = 32,
        use_gpu: bool | str = "auto",
        seed: int = 0,
    ):
        if metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', not {metric!r}")
        self.metric = metric
        self.ivf_min_size = int(ivf_min_size)
        self.nlist = nlist
        self.nprobe = int(nprobe)
        self.use_gpu = use_gpu
        self.seed = int(seed)
        self.index = None
        self.on_gpu = False
        self.dim = 0

    # ---- building ---------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    @property
    def kind(self) -> str:
        if self.index is None:
            return "empty"
        return "ivf" if isinstance(self._cpu_index(), faiss.IndexIVF) else "flat"

    def _faiss_metric(self) -> int:
        return faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2

    def build(self, vectors: np.ndarray) -> "VectorIndex":
        x = _as_f32(vectors)
        n, d = x.shape
        self.dim = d
        if n >= self.ivf_min_size:
            nlist = self.nlist or int(min(max(4 * math.sqrt(n), 16), n // 39 or 1))
            quantizer = faiss.IndexFlatIP(d) if self.metric == "ip" else faiss.IndexFlatL2(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, self._faiss_metric())
            rng = np.random.default_rng(self.seed)
            n_train = min(n, 256 * nlist)
            train = x if n_train == n else x[np.sort(rng.choice(n, n_train, replace=False))]
            index.cp.seed = self.seed
            index.train(train)
            index.add(x)
            index.nprobe = min(self.nprobe, nlist)
            self._quantizer = quantizer  # keep the Python reference alive
        else:
            index = faiss.IndexFlatIP(d) if self.metric == "ip" else faiss.IndexFlatL2(d)
            if n:
                index.add(x)
        self.index = self._to_device(index)
        return self

    def _to_device(self, index):
        self.on_gpu = False
        if index.ntotal and _want_gpu(self.use_gpu):
            index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
            self.on_gpu = True
        return index

    def _cpu_index(self):
        if self.on_gpu:
            return faiss.index_gpu_to_cpu(self.index)
        return self.index

    # ---- searching --------------------------------------------------------------------------
    def stored_rows(self) -> np.ndarray | None:
        """The vectors an exact CPU index holds, as a read-only view of its own storage (row i =
        id i, the float32 values it scores with); None for an index that keeps no such rows (IVF,
        GPU): a caller needing the vectors keeps its own copy there."""
        flat = self.index
        if flat is None or self.on_gpu or not isinstance(flat, faiss.IndexFlat):
            return None
        n, d = int(flat.ntotal), int(flat.d)
        if n == 0:
            return np.zeros((0, d), np.float32)
        rows = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
        rows.flags.writeable = False
        return rows

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids), each [n_queries, k]; best first (highest inner product, lowest
        L2). Where fewer than k vectors exist the tail is padded with id -1 and score -inf (ip)
        or +inf (l2)."""
        q = _as_f32(queries)
        nq = q.shape[0]
        pad = -np.inf if self.metric == "ip" else np.inf
        scores = np.full((nq, k), pad, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        if nq == 0 or k <= 0 or self.ntotal == 0:
            return scores, ids
        k_eff = min(k, self.ntotal, GPU_MAX_K if self.on_gpu else k)
        d, i = self.index.search(q, k_eff)
        scores[:, :k_eff] = d
        ids[:, :k_eff] = i
        missing = ids < 0
        scores[missing] = pad
        return scores, ids

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the index (faiss.write_index) and a small JSON sidecar with the settings."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.index is None:
            raise ValueError("nothing to save: build() first")
        faiss.write_index(self._cpu_index(), str(path))
        meta = {
            "metric": self.metric,
            "ivf_min_size": self.ivf_min_size,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "seed": self.seed,
            "dim": self.dim,
        }
        path.with_name(path.name + ".json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: str | Path, use_gpu: bool | str = "auto") -> "VectorIndex":
        path = Path(path)
        meta_path = path.with_name(path.name + ".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        index = faiss.read_index(str(path))
        metric = meta.get("metric") or ("ip" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2")
        self = cls(
            metric=metric,
            ivf_min_size=meta.get("ivf_min_size", 100_000),
            nlist=meta.get("nlist"),
            nprobe=meta.get("nprobe", 32),
            use_gpu=use_gpu,
            seed=meta.get("seed", 0),
        )
        self.dim = int(index.d)
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = min(self.nprobe, index.nlist)
        self.index = self._to_device(index)
        return self


def kmeans(
    vectors: np.ndarray,
    k: int,
    niter: int = 20,
    seed: int = 0,
    spherical: bool = False,
    use_gpu: bool | str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """k-means with FAISS: (centroids [k', d], assignment [n] int64), k' = min(k, n)."""
    x = _as_f32(vectors)
    n, d = x.shape
    if n == 0:
        return np.zeros((0, d), np.float32), np.zeros(0, np.int64)
    k = max(1, min(int(k), n))
    km = faiss.Kmeans(
        d, k, niter=int(niter), seed=int(seed), spherical=spherical, verbose=False,
        gpu=_want_gpu(use_gpu), min_points_per_centroid=1,
    )
    km.train(x)
    _, assign = km.index.search(x, 1)
    return np.ascontiguousarray(km.centroids, dtype=np.float32), assign[:, 0].astype(np.int64)
