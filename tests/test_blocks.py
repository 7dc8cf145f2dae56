import numpy as np
import pytest
import torch

from twist_fl.core.blocks import (
    block_indices,
    coverage_average,
    scatter_state,
    slice_spec,
    slice_state,
    sparsity,
    state_shapes,
)
from twist_fl.core.blueprint import Blueprint, sample_blueprints
from twist_fl.core.config import GPTConfig
from twist_fl.core.model import GPT

CFG = GPTConfig(vocab_size=13, block_size=8, n_layer=3, n_head=2, n_embd=4, head_dim=3,
                n_ffn_blocks=2, ffn_block_size=2)


def full_state(seed=0):
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in GPT(CFG).state_dict().items()}


def test_fused_qkv_rows_match_the_worked_example():
    spec = slice_spec("h.1.attn.c_attn.weight")

    idx = block_indices(CFG, spec, [1])

    assert (spec.kind, spec.layer, spec.axis) == ("heads", 1, 0)
    assert idx.tolist() == [3, 4, 5, 9, 10, 11, 15, 16, 17]
    assert block_indices(CFG, slice_spec("h.0.attn.c_proj.weight"), [1]).tolist() == [3, 4, 5]
    assert block_indices(CFG, slice_spec("h.2.mlp.c_fc.bias"), [1]).tolist() == [2, 3]
    assert slice_spec("h.0.attn.c_proj.bias") is None and slice_spec("wte.weight") is None


def test_slice_with_full_blueprint_is_identity():
    state = full_state()

    out = slice_state(state, CFG, Blueprint.full(CFG))

    assert out.keys() == state.keys()
    assert all(torch.equal(out[k], state[k]) for k in state)


def test_slice_picks_hand_computed_rows_and_columns():
    state = {k: torch.arange(v.numel(), dtype=torch.float32).reshape(v.shape) for k, v in full_state().items()}
    bp = Blueprint(heads=((0, 1), (1,), (0, 1)), ffn=((0, 1), (0,), (0, 1)))

    sub = slice_state(state, CFG, bp)

    w = state["h.1.attn.c_attn.weight"]
    assert torch.equal(sub["h.1.attn.c_attn.weight"], w[[3, 4, 5, 9, 10, 11, 15, 16, 17]])
    assert torch.equal(sub["h.1.attn.c_proj.weight"], state["h.1.attn.c_proj.weight"][:, 3:6])
    assert torch.equal(sub["h.1.mlp.c_fc.weight"], state["h.1.mlp.c_fc.weight"][0:2])
    assert torch.equal(sub["h.1.mlp.c_proj.weight"], state["h.1.mlp.c_proj.weight"][:, 0:2])
    assert sub["h.1.attn.c_proj.bias"] is state["h.1.attn.c_proj.bias"]  # shared, not copied


def test_scatter_after_slice_is_identity_for_torch_and_numpy():
    state = full_state()
    bp = sample_blueprints(CFG, 2, 1, seed=0, round=1)[0]

    back = scatter_state(state, CFG, bp, slice_state(state, CFG, bp))
    np_state = {k: v.numpy() for k, v in state.items()}
    np_back = scatter_state(np_state, CFG, bp, slice_state(np_state, CFG, bp))

    assert all(torch.equal(back[k], state[k]) for k in state)
    assert all(isinstance(v, np.ndarray) and np.array_equal(v, np_state[k]) for k, v in np_back.items())


def test_slice_refuses_a_state_that_does_not_fit():
    state = full_state()
    bp = Blueprint.full(CFG)
    del state["wte.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['wte.weight'\]"):
        slice_state(state, CFG, bp)
    state = full_state()
    state["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        slice_state(state, CFG, bp)
    state = full_state()
    state["ln_f.weight"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"ln_f.weight: got \(5,\), expected \(4,\)"):
        slice_state(state, CFG, bp)


def test_coverage_average_by_hand():
    g = {k: torch.zeros_like(v) for k, v in full_state().items()}
    a = Blueprint(heads=((0, 1), (0,), (0, 1)), ffn=((0, 1), (0,), (0, 1)))
    b = Blueprint(heads=((0, 1), (0,), (0, 1)), ffn=((0, 1), (0,), (0, 1)))
    g["h.1.mlp.c_fc.bias"] = torch.tensor([7.0, 8.0, 9.0, 10.0])  # block 1 = units 2,3: nobody holds it
    sa = {k: torch.full_like(v, 1.0) for k, v in slice_state(g, CFG, a).items()}
    sb = {k: torch.full_like(v, 4.0) for k, v in slice_state(g, CFG, b).items()}

    plain = coverage_average(g, CFG, [(a, sa, 1.0), (b, sb, 1.0)])
    weighted = coverage_average(g, CFG, [(a, sa, 3.0), (b, sb, 1.0)])

    assert plain["h.1.mlp.c_fc.bias"].tolist() == [2.5, 2.5, 9.0, 10.0]  # overlap -> mean; unheld kept
    assert weighted["h.1.mlp.c_fc.bias"].tolist() == [1.75, 1.75, 9.0, 10.0]  # (3*1 + 1*4) / 4
    assert torch.all(plain["wte.weight"] == 2.5) and torch.all(weighted["wte.weight"] == 1.75)
    assert torch.all(plain["h.1.attn.c_attn.weight"][[0, 1, 2, 6, 7, 8, 12, 13, 14]] == 2.5)
    assert torch.all(plain["h.1.attn.c_attn.weight"][[3, 4, 5, 9, 10, 11, 15, 16, 17]] == 0)


def test_coverage_average_of_one_full_reply_returns_it():
    g = full_state(0)
    reply = full_state(1)

    out = coverage_average(g, CFG, [(Blueprint.full(CFG), reply, 5.0)])

    assert all(torch.equal(out[k], reply[k]) for k in g)


def test_block_held_by_nobody_is_bit_identical():
    g = {k: v.numpy() for k, v in full_state().items()}
    a, b = sample_blueprints(CFG, 2, 1, seed=4, round=2)
    bp = Blueprint(heads=a.heads, ffn=a.ffn)
    sub = {k: np.asarray(v) + 0.123 for k, v in slice_state(g, CFG, bp).items()}

    out = coverage_average(g, CFG, [(bp, sub, 1.0)])

    idx = block_indices(CFG, slice_spec("h.1.attn.c_attn.weight"), b.heads[1])
    assert out["h.1.attn.c_attn.weight"][idx].tobytes() == g["h.1.attn.c_attn.weight"][idx].tobytes()
    assert not np.array_equal(out["h.1.attn.c_attn.weight"], g["h.1.attn.c_attn.weight"])


def test_coverage_average_with_no_contribution_keeps_everything():
    g = full_state()

    out = coverage_average(g, CFG, [])

    assert all(torch.equal(out[k], g[k]) for k in g)


def test_coverage_average_refuses_bad_weight_and_bad_shapes():
    g = full_state()
    bp = Blueprint.full(CFG)
    with pytest.raises(ValueError, match="weight nan"):
        coverage_average(g, CFG, [(bp, g, float("nan"))])
    bad = dict(g)
    bad["wpe.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="contribution 0 has wrong shapes"):
        coverage_average(g, CFG, [(bp, bad, 1.0)])


def test_sparsity_states_both_denominators():
    cfg = GPTConfig(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, head_dim=64, n_ffn_blocks=12,
                    ffn_block_size=256, shared_layers=())
    bp = sample_blueprints(cfg, 2, 6, seed=0, round=0)[0]

    s = sparsity(cfg, bp)

    assert s["params_total"] == 124439808  # GPT-2 124M with a tied lm_head
    # per layer: c_attn 2304x768 + 2304, attn.c_proj 768x768, c_fc 3072x768 + 3072, mlp.c_proj 768x3072
    assert s["block_params_total"] == 12 * 7083264
    assert s["removed_of_block_params"] == 0.5
    assert s["removed_of_all_params"] == pytest.approx(6 * 7083264 / 124439808)  # 0.3415
    assert state_shapes(cfg, bp)["h.3.mlp.c_fc.weight"] == (6 * 256, 768)


@pytest.mark.parametrize("shared", [(), (0, -1)])
def test_state_shapes_are_the_shapes_of_the_subnet_model(shared):
    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=4, n_head=4, n_embd=8, head_dim=3, n_ffn_blocks=5,
                    ffn_block_size=2, shared_layers=shared)
    bps = [*sample_blueprints(cfg, 3, 2, seed=1, round=1, allow_partial=True), Blueprint.full(cfg)]
    for bp in bps:
        built = {k: tuple(v.shape) for k, v in GPT(cfg, blueprint=bp).state_dict().items()}
        assert state_shapes(cfg, bp) == built
    assert state_shapes(cfg) == {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
