import io
import json

import numpy as np
import pytest
import torch

from twist_fl.core.wire import decode, encode, from_npy_bytes, npy_bytes

from .helpers import run_local


@pytest.mark.parametrize("wire,dtype,tol", [("float32", np.float32, 0), ("float16", np.float16, 1e-3),
                                            ("bfloat16", np.uint16, 8e-3)])
def test_encode_decode_round_trip(wire, dtype, tol):
    x = {"w": np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)}

    enc = encode(x, wire)
    dec = decode(enc, wire)

    assert enc["w"].dtype == dtype and dec["w"].dtype == np.float32
    np.testing.assert_allclose(dec["w"], x["w"], rtol=tol, atol=tol)
    if wire == "bfloat16":  # the same rounding as torch's bfloat16
        want = torch.from_numpy(x["w"]).to(torch.bfloat16).float().numpy()
        assert np.array_equal(dec["w"], want)


def test_unknown_wire_dtype_is_refused():
    with pytest.raises(ValueError, match=r"wire-dtype 'int8' is not allowed; allowed: \['float32'"):
        encode({"w": np.zeros(1, np.float32)}, "int8")


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
def test_16_bit_wire_halves_the_bytes_and_trains(tmp_path, wire):
    s32, _, d32 = run_local(tmp_path, "w32", num_nodes=2)
    s16, grid, d16 = run_local(tmp_path, wire, num_nodes=2, wire_dtype=wire)

    assert s16["rejected_replies"] == 0 and s16["rounds_without_update"] == []
    assert 0.49 < s16["bytes_down_total"] / s32["bytes_down_total"] < 0.52
    assert 0.49 < s16["bytes_up_total"] / s32["bytes_up_total"] < 0.52
    first = next(m for m in grid.sent if m.metadata.message_type == "train")
    assert first.content["arrays"]["wte.weight"].numpy().dtype == (np.float16 if wire == "float16" else np.uint16)
    final = json.loads((d16 / "summary.json").read_text())["final"]["full"]["ppl"]
    ref = json.loads((d32 / "summary.json").read_text())["final"]["full"]["ppl"]
    assert final == pytest.approx(ref, rel=0.02)


def _saved(x: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False, **kw)
    return buf.getvalue()


_ARRAYS = [np.zeros((), np.float32), np.arange(7, dtype=np.uint16), np.ones((3, 0, 2), np.float16),
           np.random.default_rng(0).normal(size=(33, 5)).astype(np.float32), np.array([1, -2], dtype=">i4"),
           np.array([True, False])]


@pytest.mark.parametrize("x", _ARRAYS, ids=lambda x: f"{x.dtype.str}{x.shape}")
def test_npy_payload_is_what_np_save_writes_and_reads_back(x):
    data = npy_bytes(x)
    got = from_npy_bytes(data, str(x.dtype), x.shape)

    assert data == _saved(x)
    assert got is not None and got.dtype == x.dtype and got.shape == x.shape and np.array_equal(got, x)
    assert got.flags.writeable and not np.shares_memory(got, np.frombuffer(data, np.uint8))


def test_npy_payload_of_a_non_contiguous_array_is_c_ordered():
    x = np.arange(12, dtype=np.float32).reshape(3, 4).T  # Fortran-ordered view

    data = npy_bytes(x)

    assert data == _saved(np.ascontiguousarray(x))
    assert np.array_equal(np.load(io.BytesIO(data)), x)


@pytest.mark.parametrize("case", ["declared shape", "declared dtype", "truncated", "too long", "fortran order",
                                  "format 2.0", "unknown dtype", "negative shape"])
def test_npy_payload_that_is_not_exactly_what_it_declares_is_left_to_np_load(case):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    data, dtype, shape = _saved(x), "float32", (3, 4)
    if case == "declared shape":
        shape = (4, 3)
    elif case == "declared dtype":
        dtype = "int32"
    elif case == "truncated":
        data = data[:-1]
    elif case == "too long":
        data = data + b"\0" * 4
    elif case == "fortran order":
        data = _saved(np.asfortranarray(x))
    elif case == "format 2.0":
        buf = io.BytesIO()
        np.lib.format.write_array(buf, x, version=(2, 0))
        data = buf.getvalue()
    elif case == "unknown dtype":
        dtype = "no-such-dtype"
    else:
        shape = (-3, -4)

    assert from_npy_bytes(data, dtype, shape) is None


def test_object_arrays_cannot_travel():
    with pytest.raises(ValueError, match="object arrays would need pickles"):
        npy_bytes(np.array([{}, None], dtype=object))
