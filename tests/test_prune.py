import numpy as np
import pytest
import torch

from twist_fl.core.blocks import block_indices, slice_spec
from twist_fl.core.blueprint import Blueprint
from twist_fl.core.config import GPTConfig
from twist_fl.core.model import GPT
from twist_fl.evaluation.prune import (
    best_of_k,
    block_scores,
    choose_blueprint,
    flap_scores,
    flap_subnet,
    importance_blueprint,
    magnitude_mask,
    projection_input_moments,
    prune_structured,
    sparsegpt_prune,
    subnet,
    taylor_scores,
    unstructured_prune,
    wanda_mask,
)

CFG = GPTConfig(vocab_size=19, block_size=16, n_layer=3, n_head=4, n_embd=8, head_dim=2, n_ffn_blocks=4,
                ffn_block_size=3)


def model(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def test_structured_magnitude_removes_the_smallest_norm_blocks():
    m = model()
    with torch.no_grad():
        for name, p in m.named_parameters():
            spec = slice_spec(name)
            if spec is not None and spec.layer == 1:
                n = CFG.n_head if spec.kind == "heads" else CFG.n_ffn_blocks
                for b in range(n):  # block b gets weights of size b+1, except block 2 which is tiny
                    idx = torch.as_tensor(block_indices(CFG, spec, [b]))
                    p.index_fill_(spec.axis, idx, 0.001 if b == 2 else float(b + 1))

    bp = importance_blueprint(m, 2, "magnitude")

    assert bp.heads[1] == (1, 3) and bp.ffn[1] == (1, 3)  # block 0 (1.0) and block 2 (0.001) go
    assert bp.heads[0] == (0, 1, 2, 3) and bp.heads[2] == (0, 1, 2, 3)  # shared layers stay whole


def test_structured_wanda_weighs_weights_by_input_norms():
    m = model()
    norms = {name.rsplit(".", 1)[0]: torch.ones(p.shape[1]) for name, p in m.named_parameters()
             if name.endswith("weight") and slice_spec(name) is not None}
    norms["h.1.mlp.c_proj"] = torch.tensor([100.0] * 3 + [1e-6] * 9)  # FFN block 0 sees huge activations

    scores = block_scores(m, "wanda", norms)
    bp = importance_blueprint(m, 1, "wanda", norms)

    assert int(torch.argmax(scores[("ffn", 1)])) == 0 and bp.ffn[1] == (0,)


def test_best_of_k_returns_the_lowest_calibration_perplexity():
    m = model()
    calib = np.random.default_rng(0).integers(0, 19, size=(8, 9))

    bp, ppl = best_of_k(m, 2, 5, calib, seed=0)

    from twist_fl.core.train import evaluate
    from twist_fl.evaluation.prune import random_blueprint
    assert len(ppl) == 5 and bp == random_blueprint(CFG, 2, 0, int(np.argmin(ppl)))
    assert evaluate(subnet(m, bp), calib)["ppl"] == pytest.approx(min(ppl))


def test_unstructured_masks():
    w = torch.tensor([[1.0, -5.0, 2.0, 0.5], [3.0, 0.1, -4.0, 6.0]])

    mag = magnitude_mask(w, 0.5)
    wan = wanda_mask(w, torch.tensor([1.0, 1.0, 10.0, 1.0]), 0.5)

    assert mag.tolist() == [[True, False, True, True], [False, True, False, False]]  # the 4 smallest |w|
    # per row, smallest |w| * ||x||: row 0 -> 0.5, 1.0 ; row 1 -> 0.1, 3.0
    assert wan.tolist() == [[True, False, False, True], [True, True, False, False]]


def test_sparsegpt_reconstructs_a_layer_better_than_magnitude():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g) @ torch.randn(32, 32, generator=g)  # correlated input features
    w = torch.randn(16, 32, generator=g)
    h = 2 * x.t() @ x / x.shape[0]

    w_sgpt = sparsegpt_prune(w, h, 0.5, blocksize=8)
    w_mag = w.masked_fill(magnitude_mask(w, 0.5), 0)

    err_sgpt = ((x @ w.t() - x @ w_sgpt.t()) ** 2).sum()
    err_mag = ((x @ w.t() - x @ w_mag.t()) ** 2).sum()
    assert (w_sgpt == 0).float().mean() >= 0.5
    assert err_sgpt < 0.8 * err_mag


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_prune_zeroes_half_of_the_non_shared_matrices(method):
    m = model()
    calib = np.random.default_rng(0).integers(0, 19, size=(16, 9))

    out = unstructured_prune(m, method, 0.5, calib)

    w = out.h[1].mlp.c_fc.weight
    assert 0.5 <= float((w == 0).float().mean()) < 0.6
    assert torch.equal(out.h[0].mlp.c_fc.weight, m.h[0].mlp.c_fc.weight)  # shared layer untouched
    assert out is not m and float((m.h[1].mlp.c_fc.weight == 0).float().mean()) == 0


def test_pruned_subnet_equals_masked_full_model():
    m = model()
    bp = Blueprint(heads=((0, 1, 2, 3), (0, 3), (0, 1, 2, 3)), ffn=((0, 1, 2, 3), (2,), (0, 1, 2, 3)))
    idx = torch.randint(0, 19, (2, 7))

    torch.testing.assert_close(subnet(m, bp)(idx)[0], m(idx, mask=bp)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already a subnet"):
        subnet(subnet(m, bp), bp)


def calib_windows(n=8, t=12, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, size=(n, t + 1)).astype(np.int64)


def test_taylor_importance_is_the_hand_computed_sum_of_weight_times_gradient():
    m = model(1)
    calib = calib_windows()
    w = torch.from_numpy(calib)
    _, loss = m(w[:, :-1], w[:, 1:])  # one batch of 8: the mean loss taylor_scores differentiates
    g = dict(zip([n for n, _ in m.named_parameters()], torch.autograd.grad(loss, list(m.parameters())), strict=True))
    p = dict(m.named_parameters())
    h = "h.1"

    def wg(name, rows=None, cols=None):
        x = (p[name] * g[name]).abs().detach()
        return (x[rows] if rows is not None else x[:, cols]).sum()

    # FFN block b of layer 1: rows 3b..3b+2 of c_fc (weight and bias), the same columns of c_proj
    ffn = [wg(f"{h}.mlp.c_fc.weight", rows=slice(3 * b, 3 * b + 3))
           + wg(f"{h}.mlp.c_fc.bias", rows=slice(3 * b, 3 * b + 3))
           + wg(f"{h}.mlp.c_proj.weight", cols=slice(3 * b, 3 * b + 3))
           for b in range(4)]
    # head b of layer 1: its q, k and v rows of c_attn (2 each, at offsets 0, 8, 16), its columns of c_proj
    heads = []
    for b in range(4):
        qkv = [off + 2 * b + i for off in (0, 8, 16) for i in range(2)]
        heads.append(wg(f"{h}.attn.c_attn.weight", rows=qkv) + wg(f"{h}.attn.c_attn.bias", rows=qkv)
                     + wg(f"{h}.attn.c_proj.weight", cols=slice(2 * b, 2 * b + 2)))

    scores = taylor_scores(m, calib, batch_size=8)

    torch.testing.assert_close(scores[("ffn", 1)], torch.stack(ffn), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(scores[("heads", 1)], torch.stack(heads), rtol=1e-5, atol=1e-9)
    bp = choose_blueprint(m, 2, "taylor", calib=calib)
    assert bp.ffn[1] == tuple(sorted(int(i) for i in torch.argsort(torch.stack(ffn), descending=True)[:2]))


def test_flap_fluctuation_and_bias_compensation_by_hand():
    m = model(2)
    calib = calib_windows()
    hidden = []
    hook = m.h[1].mlp.c_proj.register_forward_hook(lambda mod, inp, out: hidden.append(inp[0]))
    with torch.no_grad():
        m(torch.from_numpy(calib[:, :-1]))
    hook.remove()
    x = torch.cat(hidden).reshape(-1, 12).double()
    w = m.h[1].mlp.c_proj.weight.double()
    by_hand = torch.stack([(x[:, 3 * b:3 * b + 3].var(0, unbiased=False) * (w[:, 3 * b:3 * b + 3] ** 2).sum(0)).sum()
                           for b in range(4)])

    moments = projection_input_moments(m, calib)
    scores = flap_scores(m, moments)

    torch.testing.assert_close(scores[("ffn", 1)].double(), by_hand, rtol=1e-4, atol=1e-9)
    bp = Blueprint(heads=((0, 1, 2, 3), (1, 2), (0, 1, 2, 3)), ffn=((0, 1, 2, 3), (0, 3), (0, 1, 2, 3)))
    pruned = flap_subnet(m, bp, moments)
    # Layer 1 sees the same input in both models (layer 0 is shared): the subnet's scaled FFN output
    # has the full FFN's mean over the calibration tokens, and without compensation it would not.
    full_mlp, sub_mlp = m.h[1].mlp, pruned.h[1].mlp
    captured = []
    hook = m.h[1].ln_2.register_forward_hook(lambda mod, inp, out: captured.append(out))
    with torch.no_grad():
        m(torch.from_numpy(calib[:, :-1]))
        hook.remove()
        z = torch.cat(captured)
        full_mean = full_mlp(z).mean((0, 1))
        sub_mean = (pruned.h[1].mlp_scale * sub_mlp(z)).mean((0, 1))
        plain = subnet(m, bp)
        plain_mean = (plain.h[1].mlp_scale * plain.h[1].mlp(z)).mean((0, 1))
    torch.testing.assert_close(sub_mean, full_mean, rtol=1e-4, atol=1e-6)
    assert (plain_mean - full_mean).abs().max() > 20 * (sub_mean - full_mean).abs().max()


def test_taylor_and_flap_prune_to_a_standalone_dense_model():
    m = model(3)
    calib = calib_windows()
    for method in ("taylor", "flap"):
        pruned = prune_structured(m, 2, method, calib=calib)
        assert pruned.blueprint is not None and pruned.num_params() < m.num_params()
        assert all(len(pruned.blueprint.ffn[i]) == 2 for i in (1,))
        with pytest.raises(ValueError, match=f"{method} needs calibration data"):
            prune_structured(m, 2, method)
