"""Deployment-time pruning of a trained model, and the post-training pruning baselines.

Structured (the result is a smaller dense model, like TwIST's subnets; whole heads and FFN
blocks of the non-shared layers are removed, shared layers are kept whole):
- `random`: a random blueprint (seeded), TwIST's "zero-cost" deployment;
- `best-of-k`: the best of K random blueprints on a calibration split;
- `magnitude`: per layer, the heads / FFN blocks with the largest weight L2 norm;
- `wanda`: per layer, the heads / FFN blocks with the largest Wanda score, sum |W| x ||X|| over
  the block's weights, with ||X|| the L2 norm of each input feature on calibration data;
- `taylor` (LLM-Pruner's first-order criterion): per layer, the blocks with the largest
  sum |w x dL/dw| over every weight and bias of the block, with the gradient of the
  calibration loss;
- `flap` (FLAP's fluctuation metric): per layer, the blocks with the largest sum over their
  input channels j of the output projection of Var(X_j) x ||W[:, j]||^2 on calibration data,
  then bias compensation: the output projection's bias absorbs the removed channels' mean
  contribution, so that the subnet's mean output (after its (N/n)**alpha scale) equals the full
  layer's on the calibration data.

Unstructured (the same shapes with zeros; no speed-up without sparse kernels), applied to the
same tensors (the four block matrices of each non-shared layer):
- `magnitude`: the smallest |W| of each matrix;
- `wanda` (Sun et al. 2023): per output row, the smallest |W| x ||X||;
- `sparsegpt` (Frantar & Alistarh 2023): OBS pruning with the Hessian 2 X^T X / n of
  calibration inputs, column blocks of 128, error compensation, layer by layer, each layer's
  inputs computed through the already-pruned earlier layers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..core.blocks import block_indices, slice_spec, slice_state
from ..core.blueprint import Blueprint, prefix_blueprint, sample_blueprints
from ..core.config import KINDS, GPTConfig
from ..core.importance import PROJECTIONS, flap_scores, projection_input_moments
from ..core.model import GPT
from ..core.progress import progress
from ..core.rng import Stream
from ..core.train import evaluate

STRUCTURED = ("random", "best-of-k", "magnitude", "wanda", "taylor", "flap", "prefix")  # prefix: the nested
# subnet a subnet-policy='ordered' run (HeteroFL, FjORD) trained; no calibration
CALIBRATED = ("best-of-k", "wanda", "taylor", "flap")  # structured methods that need calibration data
UNSTRUCTURED = ("magnitude", "wanda", "sparsegpt")
MATRICES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def random_blueprint(cfg: GPTConfig, keep: int, seed: int, draw: int = 0, core: int = 0) -> Blueprint:
    """A random subnet at `keep` (deployment draw `draw`), holding the first `core` blocks of every
    layer when the model was trained with run-config core-blocks."""
    cfg.check_keep(keep)
    return sample_blueprints(cfg, 1, keep, seed=seed, round=draw, allow_partial=True,
                             stream=Stream.DEPLOY_DRAWS, core=core)[0]


def subnet(model: GPT, bp: Blueprint) -> GPT:
    """The dense model of blueprint `bp` cut out of a full model (no copy of `model` itself)."""
    if model.blueprint is not None:
        raise ValueError("pruning needs a full model; this one is already a subnet")
    return GPT.from_state(model.cfg, slice_state(model.state_dict(), model.cfg, bp), blueprint=bp)


def policy_of(meta: dict) -> str:
    """The subnet policy a model was trained with (its run's `subnet-policy`; `random` when the
    run predates the key or the model has no run)."""
    return str((meta or {}).get("run", {}).get("subnet-policy") or "random")


def core_of(meta: dict) -> int:
    """The blocks every random subnet of a model keeps (its run's `core-blocks`; 0 when absent)."""
    return int((meta or {}).get("run", {}).get("core-blocks") or 0)


def deployed_subnet_ppl(model: GPT, policy: str, keep: int, seed: int, draws: int,
                        windows: np.ndarray, core: int = 0) -> list[float]:
    """Perplexity of the subnets at `keep` a model trained with `policy` is deployed as: its
    nested prefix (one) for `ordered`, `draws` random subnets otherwise (`random_subnet_ppl`)."""
    if policy == "ordered":
        return [evaluate(subnet(model, prefix_blueprint(model.cfg, keep)), windows)["ppl"]]
    return random_subnet_ppl(model, keep, seed, draws, windows, core)


def random_subnet_ppl(model: GPT, keep: int, seed: int, draws: int, windows: np.ndarray,
                      core: int = 0) -> list[float]:
    """Perplexity of `draws` random subnets of a full model at `keep` (draw r uses round r), each
    holding the first `core` blocks of every layer."""
    return [evaluate(subnet(model, random_blueprint(model.cfg, keep, seed, r, core)), windows)["ppl"]
            for r in progress(range(draws), f"keep {keep}: random subnets")]


# --- calibration activations -----------------------------------------------------------------


def input_norms(model: GPT, windows: np.ndarray, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """L2 norm over calibration tokens of each input feature of every block matrix."""
    mods = {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and name.endswith(MATRICES)}
    return _input_stats(model, mods, windows, batch_size, hessian=False)


# --- structured ------------------------------------------------------------------------------


def block_scores(model: GPT, method: str, norms: dict[str, torch.Tensor] | None = None) -> dict:
    """{(kind, layer): scores of each block}, larger = more important."""
    cfg = model.cfg
    state = model.state_dict()
    scores: dict[tuple[str, int], torch.Tensor] = {}
    for name, w in state.items():
        spec = slice_spec(name)
        if spec is None or not name.endswith("weight"):
            continue
        mod = name.rsplit(".", 1)[0]
        w = w.abs().float()
        if method == "wanda":
            if norms is None:
                raise ValueError("wanda scores need calibration input norms")
            w = w * norms[mod].unsqueeze(0)  # weight (out, in) x norm of input feature
        elif method != "magnitude":
            raise ValueError(f"unknown importance {method!r}; allowed: ['magnitude', 'wanda']")
        n = cfg.blocks_of(spec.kind)
        per = torch.zeros(n)
        for b in range(n):
            idx = torch.as_tensor(block_indices(cfg, spec, [b]))
            part = w.index_select(spec.axis, idx)
            per[b] = (part ** 2).sum() if method == "magnitude" else part.sum()
        key = (spec.kind, spec.layer)
        scores[key] = scores.get(key, 0) + per
    if method == "magnitude":
        scores = {k: v.sqrt() for k, v in scores.items()}
    return scores


def importance_blueprint(model: GPT, keep: int, method: str, norms: dict[str, torch.Tensor] | None = None,
                         scores: dict[tuple[str, int], torch.Tensor] | None = None) -> Blueprint:
    """Per non-shared layer, the `keep` heads and FFN blocks with the largest scores (given, or
    `block_scores` of `method`)."""
    cfg = model.cfg
    cfg.check_keep(keep)
    scores = scores if scores is not None else block_scores(model, method, norms)
    parts: dict[str, list[tuple[int, ...]]] = {"heads": [], "ffn": []}
    for layer in range(cfg.n_layer):
        for kind in KINDS:
            if layer in cfg.shared_layer_ids:
                parts[kind].append(tuple(range(cfg.blocks_of(kind))))
            else:
                top = torch.argsort(scores[(kind, layer)], descending=True, stable=True)[:keep]
                parts[kind].append(tuple(sorted(int(i) for i in top)))
    return Blueprint(heads=tuple(parts["heads"]), ffn=tuple(parts["ffn"]))


def taylor_scores(model: GPT, calib: np.ndarray, batch_size: int = 16) -> dict[tuple[str, int], torch.Tensor]:
    """{(kind, layer): first-order Taylor importance of each block}: sum |w x g| over the
    block's weights and biases, g the gradient of the mean calibration loss."""
    cfg = model.cfg
    params = dict(model.named_parameters())
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = range(0, len(calib), batch_size)
    was_training = model.training
    model.eval()
    try:
        for i in progress(batches, "Taylor importance: calibration gradients"):
            w = torch.from_numpy(calib[i:i + batch_size])
            _, loss = model(w[:, :-1], w[:, 1:])
            g = torch.autograd.grad(loss, list(params.values()))
            for n, gi in zip(params, g, strict=True):
                grads[n] += gi / len(batches)
    finally:
        model.train(was_training)
    scores: dict[tuple[str, int], torch.Tensor] = {}
    for name, p in params.items():
        spec = slice_spec(name)
        if spec is None:
            continue
        contrib = (p.detach() * grads[name]).abs()
        n = cfg.blocks_of(spec.kind)
        per = torch.stack([contrib.index_select(spec.axis, torch.as_tensor(block_indices(cfg, spec, [b]))).sum()
                           for b in range(n)])
        key = (spec.kind, spec.layer)
        scores[key] = scores.get(key, 0) + per
    return scores


def flap_subnet(model: GPT, bp: Blueprint, moments: dict[str, tuple]) -> GPT:
    """The subnet of `bp` with FLAP's bias compensation: for each output projection,
    s (W_kept mu_kept + b') = W mu + b on the calibration means mu, s the subnet's scale."""
    from ..core.model import layer_scale

    cfg = model.cfg
    if not cfg.bias:
        raise ValueError("flap's bias compensation needs output projections with biases (the model has bias=False)")
    pruned = subnet(model, bp)
    full, new = model.state_dict(), pruned.state_dict()
    for layer in range(cfg.n_layer):
        for kind, proj in PROJECTIONS.items():
            name = f"h.{layer}.{proj}"
            kept = bp.heads[layer] if kind == "heads" else bp.ffn[layer]
            if len(kept) == cfg.blocks_of(kind):
                continue
            spec = slice_spec(f"{name}.weight")
            idx = torch.as_tensor(block_indices(cfg, spec, kept))
            mu = moments[name][0].double()
            w, b = full[f"{name}.weight"].double(), full[f"{name}.bias"].double()
            scale = layer_scale(cfg, len(kept), cfg.blocks_of(kind))
            target = w @ mu + b
            new[f"{name}.bias"].copy_((target / scale - w[:, idx] @ mu[idx]).to(new[f"{name}.bias"].dtype))
    return pruned


def prune_structured(model: GPT, keep: int, method: str, seed: int = 0, calib: np.ndarray | None = None,
                     k: int = 8) -> GPT:
    """The pruned dense model a structured method gives (FLAP's with its bias compensation)."""
    bp = choose_blueprint(model, keep, method, seed, calib, k)
    if method == "flap":
        return flap_subnet(model, bp, projection_input_moments(model, calib))
    return subnet(model, bp)


def best_of_k(model: GPT, keep: int, k: int, calib: np.ndarray, seed: int) -> tuple[Blueprint, list[float]]:
    """The random blueprint (of K draws) with the lowest calibration perplexity."""
    if k < 1:
        raise ValueError(f"best-of-k needs k >= 1, got {k}")
    bps = [random_blueprint(model.cfg, keep, seed, d) for d in range(k)]
    ppl = [evaluate(subnet(model, bp), calib)["ppl"] for bp in progress(bps, f"best-of-{k}: draws on calibration data")]
    return bps[int(np.argmin(ppl))], ppl


def choose_blueprint(model: GPT, keep: int, method: str, seed: int = 0, calib: np.ndarray | None = None,
                     k: int = 8) -> Blueprint:
    if method == "random":
        return random_blueprint(model.cfg, keep, seed)
    if method == "prefix":
        return prefix_blueprint(model.cfg, keep)
    if method == "best-of-k":
        if calib is None:
            raise ValueError("best-of-k needs calibration data")
        return best_of_k(model, keep, k, calib, seed)[0]
    if method in ("magnitude", "wanda"):
        if method == "wanda" and calib is None:
            raise ValueError("wanda needs calibration data")
        norms = input_norms(model, calib) if method == "wanda" else None
        return importance_blueprint(model, keep, method, norms)
    if method in ("taylor", "flap"):
        if calib is None:
            raise ValueError(f"{method} needs calibration data")
        scores = taylor_scores(model, calib) if method == "taylor" else \
            flap_scores(model, projection_input_moments(model, calib))
        return importance_blueprint(model, keep, method, scores=scores)
    raise ValueError(f"unknown structured method {method!r}; allowed: {list(STRUCTURED)}")


# --- unstructured ----------------------------------------------------------------------------


def _pruned_layers(cfg: GPTConfig) -> list[int]:
    return [i for i in range(cfg.n_layer) if i not in cfg.shared_layer_ids]


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight is removed: the smallest |w| of the whole matrix."""
    k = int(w.numel() * sparsity)
    if k == 0:
        return torch.zeros_like(w, dtype=torch.bool)
    thresh = torch.kthvalue(w.abs().flatten().float(), k).values
    mask = w.abs() <= thresh
    # exact count despite ties: drop the surplus of ties by position
    extra = int(mask.sum()) - k
    if extra > 0:
        ties = torch.nonzero((w.abs() == thresh).flatten()).flatten()[:extra]
        mask.view(-1)[ties] = False
    return mask


def wanda_mask(w: torch.Tensor, xnorm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, remove the smallest |W| x ||X|| (Wanda's comparison group)."""
    metric = w.abs().float() * xnorm.unsqueeze(0)
    k = int(w.shape[1] * sparsity)
    idx = torch.argsort(metric, dim=1, stable=True)[:, :k]
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask


def sparsegpt_prune(w: torch.Tensor, hessian: torch.Tensor, sparsity: float, blocksize: int = 128,
                    percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT's `fasterprune` (unstructured): returns the pruned, error-compensated weight."""
    W = w.clone().float()
    H = hessian.clone().float()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(cols)
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
        thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
        mask1 = tmp <= thresh
        for i in range(i2 - i1):
            wcol = W1[:, i]
            d = Hinv1[i, i]
            q = wcol.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (wcol - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W.to(w.dtype)


@torch.no_grad()
def unstructured_prune(model: GPT, method: str, sparsity: float, calib: np.ndarray | None = None,
                       batch_size: int = 16) -> GPT:
    """A copy of `model` with `sparsity` of each block matrix of the non-shared layers zeroed.

    wanda and sparsegpt go layer by layer: the calibration statistics of a layer are taken
    with every earlier layer already pruned (as both papers do)."""
    if method not in UNSTRUCTURED:
        raise ValueError(f"unknown unstructured method {method!r}; allowed: {list(UNSTRUCTURED)}")
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity={sparsity!r} must be in (0, 1)")
    if method != "magnitude" and calib is None:
        raise ValueError(f"{method} needs calibration data")
    out = GPT.from_state(model.cfg, model.state_dict())
    out.eval()
    for layer in _pruned_layers(model.cfg):
        block = out.h[layer]
        mods = {name: getattr(getattr(block, name.split(".")[0]), name.split(".")[1]) for name in MATRICES}
        if method == "magnitude":
            for mod in mods.values():
                mod.weight[magnitude_mask(mod.weight, sparsity)] = 0
            continue
        stats = _input_stats(out, mods, calib, batch_size, hessian=method == "sparsegpt")
        for name, mod in mods.items():
            if method == "wanda":
                mod.weight[wanda_mask(mod.weight, stats[name], sparsity)] = 0
            else:
                mod.weight.copy_(sparsegpt_prune(mod.weight, stats[name], sparsity))
    return out


@torch.no_grad()
def _input_stats(model: GPT, mods: dict[str, nn.Linear], calib: np.ndarray, batch_size: int,
                 hessian: bool) -> dict[str, torch.Tensor]:
    """Per matrix in `mods`, over calibration tokens: the L2 norm of each input feature, or
    SparseGPT's H = 2 X^T X / n."""
    acc: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    hooks = []
    for name, mod in mods.items():
        def hook(m, inp, out, name=name):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            acc[name] = acc.get(name, 0) + (x.t() @ x if hessian else (x * x).sum(0))
            count[name] = count.get(name, 0) + x.shape[0]
        hooks.append(mod.register_forward_hook(hook))
    try:
        for i in progress(range(0, len(calib), batch_size), "calibration statistics"):
            model(torch.from_numpy(calib[i:i + batch_size, :-1]))
    finally:
        for h in hooks:
            h.remove()
    if hessian:
        return {k: 2 * v / count[k] for k, v in acc.items()}
    return {k: v.sqrt() for k, v in acc.items()}

