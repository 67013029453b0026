"""Bounded, deterministic reads of per-product tables for module 1's driver: per-type samples,
the first rows of each group, and per-type title-vector sums (centroids).

Each returns a polars DataFrame whose size a cap bounds (per-type rows, or one row per type);
the per-product work (hashing, filtering, partial sums) runs in Ray Data tasks. `partitions`:
the groupby's shuffle partitions (`runtime.shuffle_partitions` of the rows).
"""
from __future__ import annotations

import zlib

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from autoknow_ray import runtime
from autoknow_ray.index.vectors import as_matrix

_U = "_u"  # the per-row uniform draw


def uniform(keys: list, seed: int) -> np.ndarray:
    """A uniform draw in [0, 1) per key, the same on every worker and in every run."""
    return np.asarray([zlib.crc32(f"{seed}:{k}".encode()) / 2**32 for k in keys], dtype=np.float64)


def where_true(column: str):
    """A batch filter: rows whose boolean `column` is true."""
    def keep(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.fill_null(batch.column(column), False))

    return keep


def where_valid(ds, column: str):
    return ds.map_batches(lambda b: b.filter(pc.is_valid(b.column(column))), batch_format="pyarrow")


def where_in(ds, columns: str | tuple[str, ...], values: set[str]):
    """Rows whose `columns` (any of them) hold one of `values` (a bounded set: ids of a sample)."""
    cols = (columns,) if isinstance(columns, str) else columns
    value_set = pa.array(sorted(values), pa.string())

    def keep(batch: pa.Table) -> pa.Table:
        mask = None
        for c in cols:
            m = pc.fill_null(pc.is_in(batch.column(c).cast(pa.string()), value_set=value_set), False)
            mask = m if mask is None else pc.or_(mask, m)
        return batch.filter(mask)

    return ds.map_batches(keep, batch_format="pyarrow")


def per_key_sample(ds, key: str, id_column: str, per_key: int, cap: int, seed: int,
                   partitions: int = 1, counts: pl.DataFrame | None = None
                   ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """At most `per_key` rows for each value of `key` (rows with a null key are skipped) and at
    most `cap` rows in all (the per-key share shrinks to fit), drawn uniformly by a hash of
    `id_column` and `seed`; and every key's row count `n`. Two passes: the per-key counts (an
    aggregate; skipped where the caller has them: `counts`, columns `key` and `n`, e.g. from
    `vector_sums` over the same rows), then the rows whose draw falls under their key's rate."""
    ds = where_valid(ds, key)
    if counts is None:
        counts = runtime.aggregate(ds, [key], {"n": ("count", None)}, partitions)
    if counts.height == 0 or per_key <= 0 or cap <= 0:
        return pl.DataFrame(), counts
    n = counts["n"].to_numpy()
    take = int(per_key)
    while take > 1 and np.minimum(n, take).sum() > cap:
        take = max(1, int(take * 0.8))
    rate = {k: min(1.0, 1.5 * take / max(c, 1)) + 1e-9
            for k, c in counts.select(key, "n").iter_rows()}

    def draw(batch: pa.Table) -> pa.Table:
        u = uniform(batch.column(id_column).to_pylist(), seed)
        r = np.asarray([rate.get(k, 0.0) for k in batch.column(key).to_pylist()])
        return batch.filter(pa.array(u < r)).append_column(_U, pa.array(u[u < r]))

    parts = [pl.from_arrow(t) for t in _refs(ds.map_batches(draw, batch_format="pyarrow"))]
    parts = [p for p in parts if p.height]
    if not parts:
        return pl.DataFrame(), counts
    rows = pl.concat(parts, how="vertical_relaxed").sort([key, _U, id_column])
    # group_by().head() moves the key first: give the rows back in the dataset's column order,
    # so they stack with other samples of the same dataset
    order = [c for c in parts[0].columns if c != _U]
    rows = rows.group_by(key, maintain_order=True).head(take).select(order)
    return rows.head(cap), counts


def first_per_key(ds, key: str, id_column: str, n: int, seed: int) -> pl.DataFrame:
    """For each value of `key`: the `n` rows with the smallest draw from a hash of `id_column`
    and `seed` (ties by id; deterministic, whatever the blocks). Two levels, as a combiner: each
    block keeps its own `n` per key in its task, the driver merges those (at most blocks × keys ×
    `n` rows, of the columns `ds` carries) and keeps `n` per key. No shuffle: a groupby's fixed
    cost was most of this on a small catalogue, and a large group never sits in one worker."""
    if n <= 0:
        return pl.DataFrame()

    def head(batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return pa.table({})
        frame = pl.from_arrow(batch).with_columns(
            pl.Series(_U, uniform(batch.column(id_column).to_pylist(), seed)))
        return _first_rows(frame, key, id_column, n).to_arrow()

    parts = [pl.from_arrow(t) for t in _refs(ds.map_batches(head, batch_format="pyarrow"))]
    parts = [p for p in parts if p.height]
    if not parts:
        return pl.DataFrame()
    return _first_rows(pl.concat(parts, how="vertical_relaxed"), key, id_column, n).drop(_U)


def _first_rows(frame: pl.DataFrame, key: str, id_column: str, n: int) -> pl.DataFrame:
    """Per key, the `n` rows of smallest draw (`_U`), ties by id; the frame's column order kept."""
    return (frame.sort([key, _U, id_column], nulls_last=True)
            .group_by(key, maintain_order=True).head(n).select(frame.columns))


def vector_sums(ds, key: str, vector: str, partitions: int = 1) -> pl.DataFrame:
    """Per value of `key`: the row count `n` and the `sum` of the fixed-size vectors in column
    `vector` (partial sums per block in the tasks, then one sum per key)."""
    ds = where_valid(ds, key)

    def partial(batch: pa.Table) -> pa.Table:
        col = batch.column(vector).combine_chunks()
        dim = col.type.list_size
        vecs = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, dim)
        uniq, n, sums = _sum_by_key(batch.column(key).to_pylist(), vecs, np.ones(len(vecs)))
        return pa.table({key: pa.array(uniq, pa.string()), "n": pa.array(n, pa.int64()),
                         "sum": pa.array(list(sums), pa.list_(pa.float64()))})

    def total(group: pa.Table) -> pa.Table:
        sums = np.asarray(group.column("sum").to_pylist(), dtype=np.float64).sum(0)
        return pa.table({key: group.column(key).slice(0, 1),
                         "n": pa.array([pc.sum(group.column("n")).as_py()], pa.int64()),
                         "sum": pa.array([sums], pa.list_(pa.float64()))})

    partials = ds.select_columns([key, vector]).map_batches(partial, batch_format="pyarrow").materialize()
    if partials.count() <= runtime.DRIVER_COMBINE_ROWS // 10:  # each partial row holds a vector
        # few partials (a small catalogue, or few types): combine them here, without a shuffle
        got = [pl.from_arrow(t) for t in _refs(partials)]
        got = [g for g in got if g.height]
        if not got:
            return pl.DataFrame(schema={key: pl.String, "n": pl.Int64, "sum": pl.List(pl.Float64)})
        rows = pl.concat(got, how="vertical_relaxed")
        # the partial sums as one float64 matrix read from Arrow's flat values: up to
        # DRIVER_COMBINE_ROWS // 10 rows × dim, where a Python float per number would take ~4x
        keys, n, sums = _sum_by_key(rows[key].to_list(), as_matrix(rows["sum"], np.float64),
                                    rows["n"].to_numpy())
        return pl.DataFrame({key: keys, "n": n, "sum": [list(v) for v in sums]},
                            schema={key: pl.String, "n": pl.Int64, "sum": pl.List(pl.Float64)})
    out = partials.groupby(key, num_partitions=partitions).map_groups(total, batch_format="pyarrow")
    try:
        tables = _refs(out)
    except Exception:
        # Ray Data's shuffle fails on an input with no rows (an untyped catalogue): no keys
        if ds.count() == 0:
            return pl.DataFrame(schema={key: pl.String, "n": pl.Int64, "sum": pl.List(pl.Float64)})
        raise
    parts = [pl.from_arrow(t) for t in tables]
    parts = [p for p in parts if p.height]
    return (pl.concat(parts, how="vertical_relaxed") if parts
            else pl.DataFrame(schema={key: pl.String, "n": pl.Int64, "sum": pl.List(pl.Float64)}))


def _sum_by_key(keys: list, vecs: np.ndarray, weights: np.ndarray):
    """Distinct keys, the summed `weights` and the summed rows of `vecs` per key: a block's
    partial sums in the tasks, and the partials' total on the driver."""
    uniq, inv = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    sums = np.zeros((len(uniq), vecs.shape[1]))
    np.add.at(sums, inv, vecs)
    n = np.bincount(inv, weights=weights, minlength=len(uniq)).astype(np.int64)
    return list(uniq), n, sums


def _refs(ds) -> list[pa.Table]:
    import ray

    return ray.get(ds.to_arrow_refs())
