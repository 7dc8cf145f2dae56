"""How much each attention head and FFN block of a trained model matters, measured on
calibration data, and a model whose blocks are put in that order.

The score is FLAP's fluctuation metric (An et al., 2024): for each block, the sum over the input
channels j of its output projection (`attn.c_proj` for a head, `mlp.c_proj` for an FFN block)
of Var(X_j) x ||W[:, j]||^2, with X the projection's input on calibration tokens. A block whose
output barely fluctuates can be replaced by its mean, which FLAP folds into the bias.

`order_blocks` permutes each non-shared layer's heads and FFN blocks so that the most important
comes first. The permuted model computes the same function (the same heads and blocks, relabelled:
attention and the FFN sum over their blocks), so its outputs equal the original's to float
tolerance, while its nested prefixes (`prefix_blueprint`) are now the blocks FLAP would keep. This
is what run-config `init-order = "flap"` does to the `init-from` model before round 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn

from .blocks import block_indices, permute_state, slice_spec
from .config import INIT_ORDERS, KINDS
from .model import GPT
from .progress import progress

PROJECTIONS = {"heads": "attn.c_proj", "ffn": "mlp.c_proj"}  # the matrix whose input channels are a kind's blocks


def projection_input_moments(model: GPT, calib: np.ndarray, batch_size: int = 16) -> dict[str, tuple]:
    """{module name: (mean, variance)} of each input channel of every output projection
    (attn.c_proj, mlp.c_proj), over calibration tokens."""
    mods = {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and name.endswith(tuple(PROJECTIONS.values()))}
    acc: dict[str, list] = {}
    hooks = []
    for name, mod in mods.items():
        def hook(m, inp, out, name=name):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            a = acc.setdefault(name, [0, 0, 0])
            a[0], a[1], a[2] = a[0] + x.sum(0), a[1] + (x * x).sum(0), a[2] + x.shape[0]
        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for i in progress(range(0, len(calib), batch_size), "FLAP: calibration statistics"):
                model(torch.from_numpy(calib[i:i + batch_size, :-1]))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, (s1, s2, n) in acc.items():
        mean = s1 / n
        out[name] = (mean.float(), (s2 / n - mean * mean).clamp_min(0).float())
    return out


def flap_scores(model: GPT, moments: dict[str, tuple]) -> dict[tuple[str, int], torch.Tensor]:
    """{(kind, layer): FLAP fluctuation of each block}: sum over its projection input channels
    of Var(X_j) x ||W[:, j]||^2."""
    cfg = model.cfg
    state = model.state_dict()
    scores = {}
    for layer in range(cfg.n_layer):
        for kind, proj in PROJECTIONS.items():
            name = f"h.{layer}.{proj}"
            w = state[f"{name}.weight"].float()
            channel = moments[name][1] * (w * w).sum(0)
            spec = slice_spec(f"{name}.weight")
            scores[(kind, layer)] = torch.stack([
                channel[torch.as_tensor(block_indices(cfg, spec, [b]))].sum() for b in range(cfg.blocks_of(kind))])
    return scores


def importance_orders(model: GPT, scores: Mapping[tuple[str, int], torch.Tensor]) -> dict[tuple[str, int], list[int]]:
    """{(kind, layer): block ids, most important first} for every non-shared layer (ties keep
    the lower id first); shared layers are kept whole, so they are left in their order."""
    cfg = model.cfg
    return {(kind, layer): [int(i) for i in torch.argsort(scores[(kind, layer)], descending=True, stable=True)]
            for layer in range(cfg.n_layer) if layer not in cfg.shared_layer_ids for kind in KINDS}


def order_blocks(model: GPT, method: str, calib: np.ndarray) -> tuple[GPT, dict[str, list[list[int]]]]:
    """(the model with each non-shared layer's blocks sorted by importance, most important first;
    the order applied: per kind, per layer, the original id now at each position). A full model only."""
    if method not in INIT_ORDERS or not method:
        raise ValueError(f"init-order={method!r} is not allowed; allowed: {[m for m in INIT_ORDERS if m]}")
    if model.blueprint is not None:
        raise ValueError("ordering blocks needs a full model; this one is a pruned subnet")
    cfg = model.cfg
    orders = importance_orders(model, flap_scores(model, projection_input_moments(model, calib)))
    out = GPT.from_state(cfg, permute_state(model.state_dict(), cfg, orders))
    out.train(model.training)
    record = {kind: [orders.get((kind, layer), list(range(cfg.blocks_of(kind)))) for layer in range(cfg.n_layer)]
              for kind in KINDS}
    return out, record
