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
    importance_blueprint,
    magnitude_mask,
    sparsegpt_prune,
    subnet,
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
