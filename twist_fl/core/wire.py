"""What travels on the wire: float32, float16, or bfloat16 (carried as its uint16 bit pattern,
since numpy has no bfloat16). Masters and aggregation stay float32; only transport is cast.

Arrays travel as NumPy `.npy` payloads (Flower's `Array`, stype "numpy.ndarray"): `npy_bytes` and
`from_npy_bytes` write and read them without `np.save` / `np.load`'s per-array header formatting
and parsing, which cost more than the copy for a model's hundreds of tensors each round."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch

WIRE_DTYPES = ("float32", "float16", "bfloat16")
_NUMPY = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}


def wire_numpy_dtype(wire: str) -> np.dtype:
    if wire not in _NUMPY:
        raise ValueError(f"wire-dtype {wire!r} is not allowed; allowed: {list(WIRE_DTYPES)}")
    return _NUMPY[wire]


def encode(arrays: Mapping[str, np.ndarray], wire: str) -> dict[str, np.ndarray]:
    """float32 arrays -> arrays of the wire dtype (round to nearest)."""
    wire_numpy_dtype(wire)
    if wire == "bfloat16":
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(torch.bfloat16)
                .view(torch.int16).numpy().view(np.uint16) for k, v in arrays.items()}
    return {k: np.asarray(v).astype(_NUMPY[wire], copy=False) for k, v in arrays.items()}


def decode(arrays: Mapping[str, np.ndarray], wire: str) -> dict[str, np.ndarray]:
    """Arrays of the wire dtype -> float32."""
    wire_numpy_dtype(wire)
    if wire == "bfloat16":
        return {k: torch.from_numpy(np.ascontiguousarray(v).view(np.int16)).view(torch.bfloat16).float().numpy()
                for k, v in arrays.items()}
    return {k: np.asarray(v).astype(np.float32, copy=False) for k, v in arrays.items()}


@lru_cache(maxsize=4096)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The header `np.save` writes for a C-ordered array of `descr` and `shape` (format 1.0)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def npy_bytes(x: np.ndarray) -> bytes:
    """The `.npy` payload of `x`, always C-ordered: for a C-contiguous `x`, byte for byte what
    `np.save(buf, x, allow_pickle=False)` writes."""
    if x.dtype.hasobject:
        raise ValueError(f"dtype {x.dtype} cannot travel: object arrays would need pickles")
    if not x.flags.c_contiguous:
        x = x.copy(order="C")  # not np.ascontiguousarray, which turns a 0-d array into 1-d
    return b"".join((_npy_header(np.lib.format.dtype_to_descr(x.dtype), x.shape), x.reshape(-1).view(np.uint8)))


def from_npy_bytes(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The array of a `.npy` payload that declares `dtype` and `shape` (as Flower's `Array` does),
    as a new writable array; None when the payload is not exactly what `npy_bytes` writes for them
    (another header layout, or a size or header that disagrees): read it with `np.load` then."""
    try:
        dt = np.dtype(dtype)
        dims = tuple(int(n) for n in shape)
        header = _npy_header(np.lib.format.dtype_to_descr(dt), dims)
    except (TypeError, ValueError):
        return None
    count = math.prod(dims)
    if dt.hasobject or min(dims, default=0) < 0 or len(data) != len(header) + count * dt.itemsize \
            or not data.startswith(header):
        return None
    return np.frombuffer(data, dtype=dt, count=count, offset=len(header)).reshape(dims).copy()
