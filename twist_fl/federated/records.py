"""Flower records <-> numpy arrays: the codecs of every message, both directions.

`to_record` writes the same bytes as `Array(ndarray)`; `array_numpy` reads the real array of a
payload (its .npy header, not the declared dtype and shape), fast when the payload is exactly the
`.npy` of what it declares. Nothing is pickled.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from ..core.wire import from_npy_bytes, npy_bytes


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialized arrays of a record (numpy .npy payloads, headers included)."""
    return sum(len(a.data) for a in record.values())


def array_numpy(a: Array) -> np.ndarray:
    """`a.numpy()`: the real array of its payload (not its declared dtype and shape), read fast
    when the payload is exactly the `.npy` of what it declares."""
    if a.stype == "numpy.ndarray" and isinstance(a.data, bytes):
        x = from_npy_bytes(a.data, a.dtype, a.shape)
        if x is not None:
            return x
    return a.numpy()


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: array_numpy(v) for k, v in record.items()}


def to_record(arrays: dict[str, Any]) -> ArrayRecord:
    """Arrays as Flower `Array`s, the same bytes as `Array(ndarray)` writes."""
    out = {}
    for k, v in arrays.items():
        x = np.ascontiguousarray(np.asarray(v))
        out[k] = Array(dtype=str(x.dtype), shape=tuple(int(n) for n in x.shape), stype="numpy.ndarray",
                       data=npy_bytes(x))
    return ArrayRecord(out)
