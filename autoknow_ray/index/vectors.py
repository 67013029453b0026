"""A column of vectors as one numpy matrix, without a Python object per number.

Vector columns arrive as Arrow fixed-size lists (what the workers write), Arrow lists, or polars
List/Array series (what a sample or an aggregate gives the driver). `.to_list()` on such a column
makes a Python float per element: for a capped 50k × 384 reference that is ~600 MB of objects on
the driver for a 38 MB matrix. Go through Arrow's flat values instead.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def as_matrix(column, dtype=np.float32) -> np.ndarray:
    """Rows of a vector column as an (n, dim) matrix of `dtype` (an empty column: (0, dim) where
    its type fixes dim, else (0, 0)).
    Every row must have the same length (a ragged column raises ValueError)."""
    if hasattr(column, "to_arrow"):  # a polars Series
        column = column.to_arrow()
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if n == 0:
        return np.zeros((0, column.type.list_size if pa.types.is_fixed_size_list(column.type) else 0),
                        dtype)
    if column.null_count:
        raise ValueError(f"{column.null_count} of {n} vectors are null")
    values = column.flatten().to_numpy(zero_copy_only=False)  # honours slice offsets
    if len(values) % n:
        raise ValueError(f"vectors of unequal length: {len(values)} numbers in {n} rows")
    if not pa.types.is_fixed_size_list(column.type):
        lengths = np.diff(np.asarray(column.offsets))
        if lengths.min() != lengths.max():
            raise ValueError(f"vectors of unequal length ({lengths.min()} to {lengths.max()})")
    return values.astype(dtype, copy=False).reshape(n, -1)
