import json

import numpy as np
import pytest
import torch

from twist_fl.wire import decode, encode

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
