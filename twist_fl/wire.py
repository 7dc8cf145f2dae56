"""What travels on the wire: float32, float16, or bfloat16 (carried as its uint16 bit pattern,
since numpy has no bfloat16). Masters and aggregation stay float32; only transport is cast."""

from __future__ import annotations

from collections.abc import Mapping

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
