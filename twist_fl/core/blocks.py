"""The one module that knows tensor layouts: which rows or columns of which tensor belong to
which attention head or FFN block, and the slice / scatter / coverage-average built on that.

Weights are in `nn.Linear` orientation, (out_features, in_features). (Hugging Face GPT-2's
`Conv1D` stores the transpose, (in, out); `model.from_hf` converts once on import, so in HF's
orientation every "rows" below reads "columns".)

Worked example of the fused q/k/v rows of `c_attn` (N = 2 heads of head_dim = 3, so the
attention width is W = N * head_dim = 6 and c_attn.weight has 3 * W = 18 rows):

    rows  0.. 5  q   head 0 -> rows 0,1,2    head 1 -> rows 3,4,5
    rows  6..11  k   head 0 -> rows 6,7,8    head 1 -> rows 9,10,11
    rows 12..17  v   head 0 -> rows 12,13,14 head 1 -> rows 15,16,17

so keeping head 1 keeps rows [3,4,5, 9,10,11, 15,16,17] of c_attn.weight and c_attn.bias, and
columns [3,4,5] of attn.c_proj.weight. FFN block b (of size s) is rows [b*s, (b+1)*s) of
mlp.c_fc.weight and .bias, and the same columns of mlp.c_proj.weight. Everything else
(embeddings, layer norms, the c_proj biases, all of a shared layer) is shared: it is the same
tensor in every subnet.

Functions accept torch tensors or numpy arrays (the wire format) and return the same kind.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from .blueprint import Blueprint
from .config import GPTConfig

# name template -> (kind, axis, fused groups). The one table of sliced tensors.
LAYOUT: dict[str, tuple[str, int, int]] = {
    "h.{}.attn.c_attn.weight": ("heads", 0, 3),  # q, k, v fused along rows
    "h.{}.attn.c_attn.bias": ("heads", 0, 3),
    "h.{}.attn.c_proj.weight": ("heads", 1, 1),
    "h.{}.mlp.c_fc.weight": ("ffn", 0, 1),
    "h.{}.mlp.c_fc.bias": ("ffn", 0, 1),
    "h.{}.mlp.c_proj.weight": ("ffn", 1, 1),
}
_TEMPLATE_RE = {re.compile("^" + re.escape(t).replace(r"\{\}", r"(\d+)") + "$"): t for t in LAYOUT}


@dataclass(frozen=True)
class SliceSpec:
    kind: str  # "heads" or "ffn"
    layer: int
    axis: int
    fused: int


def slice_spec(name: str) -> SliceSpec | None:
    """How tensor `name` is cut into blocks, or None for a shared tensor."""
    for rx, template in _TEMPLATE_RE.items():
        m = rx.match(name)
        if m:
            kind, axis, fused = LAYOUT[template]
            return SliceSpec(kind, int(m.group(1)), axis, fused)
    return None


def block_indices(cfg: GPTConfig, spec: SliceSpec, ids: Iterable[int]) -> np.ndarray:
    """Indices along `spec.axis` of the full tensor that blocks `ids` occupy, in subnet order."""
    w, n = cfg.block_width(spec.kind), cfg.blocks_of(spec.kind)
    ids = np.asarray(list(ids), dtype=np.int64)
    within = (ids[:, None] * w + np.arange(w)[None, :]).reshape(-1)  # rows of one fused group
    return (np.arange(spec.fused)[:, None] * (n * w) + within[None, :]).reshape(-1)


@lru_cache(maxsize=256)
def state_shapes(cfg: GPTConfig, bp: Blueprint | None = None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of GPT(cfg, blueprint=bp), without allocating it: the full
    model's shapes with each sliced tensor's block axis cut to `bp`'s blocks. (Building a model
    on the meta device takes ~0.1 s, and every round brings new blueprints.)"""
    full = _full_shapes(cfg)
    if bp is None:
        return full
    bp.validate(cfg)  # as GPT(cfg, blueprint=bp) would
    out = {}
    for name, shape in full.items():
        spec = slice_spec(name)
        if spec is not None:
            cut = list(shape)
            cut[spec.axis] = spec.fused * len(bp.ids(spec.kind, spec.layer)) * cfg.block_width(spec.kind)
            shape = tuple(cut)
        out[name] = shape
    return out


@lru_cache(maxsize=16)
def _full_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    from .model import GPT

    with torch.device("meta"):
        model = GPT(cfg, init=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_state(state: Mapping[str, Any], cfg: GPTConfig, bp: Blueprint | None, what: str) -> None:
    expected = state_shapes(cfg, bp)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{what} does not fit the config: missing keys {missing}, unexpected keys {extra}")
    bad = [f"{k}: got {tuple(state[k].shape)}, expected {s}" for k, s in expected.items()
           if tuple(state[k].shape) != s]
    if bad:
        raise ValueError(f"{what} has wrong shapes: " + "; ".join(bad))


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _like(x: np.ndarray, ref: Any) -> Any:
    if isinstance(ref, torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray(x)).to(ref.device)
    return x


def _index(ndim: int, axis: int, idx: np.ndarray) -> tuple:
    sel: list[Any] = [slice(None)] * ndim
    sel[axis] = idx
    return tuple(sel)


def slice_state(full_state: Mapping[str, Any], cfg: GPTConfig, bp: Blueprint) -> dict[str, Any]:
    """The state dict that `GPT(cfg, blueprint=bp)` loads strictly: the subnet's tensors.

    Args:
        full_state: the full model's state (torch tensors or numpy arrays).
        cfg: the architecture.
        bp: the subnet to cut.

    Returns:
        The sliced state, of the same array kind: shared tensors as they are (not copied),
        sliced ones new arrays of the kept blocks (a head's q, k and v rows move together).

    Example:
        >>> from twist_fl import GPT, GPTConfig, sample_blueprints, slice_state
        >>> cfg = GPTConfig(vocab_size=257, n_layer=3, n_head=4, n_embd=32, head_dim=8, n_ffn_blocks=4,
        ...                 ffn_block_size=32, block_size=64)
        >>> bp = sample_blueprints(cfg, 1, keep=2, seed=0, round=0, allow_partial=True)[0]
        >>> sub = slice_state(GPT(cfg).state_dict(), cfg, bp)
        >>> tuple(sub["h.1.mlp.c_fc.weight"].shape)  # 2 of 4 FFN blocks of 32 units
        (64, 32)
    """
    bp.validate(cfg)
    _check_state(full_state, cfg, None, "full state")
    out = {}
    for name, x in full_state.items():
        spec = slice_spec(name)
        ids = None if spec is None else bp.ids(spec.kind, spec.layer)
        if spec is None or len(ids) == cfg.blocks_of(spec.kind):
            out[name] = x
            continue
        idx = block_indices(cfg, spec, ids)
        if isinstance(x, torch.Tensor):
            out[name] = x.index_select(spec.axis, torch.as_tensor(idx, device=x.device))
        else:
            out[name] = np.take(x, idx, axis=spec.axis)
    return out


def permute_state(full_state: Mapping[str, Any], cfg: GPTConfig,
                  orders: Mapping[tuple[str, int], Iterable[int]]) -> dict[str, Any]:
    """A full state with the blocks of each (kind, layer) in `orders` relabelled: the block at
    position j becomes `orders[kind, layer][j]` of `full_state`. Every fused q/k/v group of a
    head and every tensor of a block moves together, so the model computes the same function.
    Layers and kinds not in `orders` are returned as they are."""
    _check_state(full_state, cfg, None, "full state")
    for (kind, layer), order in orders.items():
        if sorted(order) != list(range(cfg.blocks_of(kind))):
            raise ValueError(f"order of the {kind} of layer {layer} must be a permutation of "
                             f"0..{cfg.blocks_of(kind) - 1}, got {list(order)}")
    out = {}
    for name, x in full_state.items():
        spec = slice_spec(name)
        if spec is None or (spec.kind, spec.layer) not in orders:
            out[name] = x
            continue
        idx = block_indices(cfg, spec, orders[(spec.kind, spec.layer)])
        if isinstance(x, torch.Tensor):
            out[name] = x.index_select(spec.axis, torch.as_tensor(idx, device=x.device))
        else:
            out[name] = np.take(x, idx, axis=spec.axis)
    return out


def scatter_state(full_state: Mapping[str, Any], cfg: GPTConfig, bp: Blueprint,
                  sub_state: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `full_state` with `bp`'s blocks (and the shared tensors) replaced by
    `sub_state`'s values; the inverse of `slice_state` on the blocks `bp` holds."""
    bp.validate(cfg)
    _check_state(full_state, cfg, None, "full state")
    _check_state(sub_state, cfg, bp, "subnet state")
    out = {}
    for name, x in full_state.items():
        spec = slice_spec(name)
        new = _as_numpy(x).copy()
        sub = _as_numpy(sub_state[name]).astype(new.dtype, copy=False)
        if spec is None:
            new[...] = sub
        else:
            new[_index(new.ndim, spec.axis, block_indices(cfg, spec, bp.ids(spec.kind, spec.layer)))] = sub
        out[name] = _like(new, x)
    return out


def coverage_average(global_state: Mapping[str, Any], cfg: GPTConfig,
                     contributions: Iterable[tuple[Blueprint, Mapping[str, Any], float]]) -> dict[str, Any]:
    """New global state from subnet replies (HeteroFL's sum/count kernel).

    Each block becomes the weighted mean over the contributions whose blueprint held it; a block
    no contribution held keeps its previous value bit for bit. Shared tensors become the
    weighted mean over all contributions. Accumulates in float64.

    Args:
        global_state: the full model's state before the round.
        cfg: the architecture.
        contributions: (blueprint, that subnet's state after training, weight > 0) per reply.

    Returns:
        The new full state, in the global state's dtypes; with no contributions, a copy of it.

    Example:
        >>> import numpy as np
        >>> from twist_fl import GPT, GPTConfig, coverage_average, sample_blueprints, slice_state
        >>> cfg = GPTConfig(vocab_size=257, n_layer=3, n_head=4, n_embd=32, head_dim=8, n_ffn_blocks=4,
        ...                 ffn_block_size=32, block_size=64)
        >>> g = {k: v.numpy() for k, v in GPT(cfg).state_dict().items()}
        >>> bps = sample_blueprints(cfg, 2, keep=2, seed=0, round=1)
        >>> new = coverage_average(g, cfg, [(bp, slice_state(g, cfg, bp), 1.0) for bp in bps])
        >>> all(np.allclose(new[k], g[k]) for k in g)  # unchanged replies average to the same model
        True
    """
    contributions = list(contributions)
    _check_state(global_state, cfg, None, "global state")
    for i, (bp, sub, w) in enumerate(contributions):
        bp.validate(cfg)
        _check_state(sub, cfg, bp, f"contribution {i}")
        if not (np.isfinite(w) and w > 0):
            raise ValueError(f"contribution {i} has weight {w!r}; weights must be positive and finite")
    out = {}
    for name, x in global_state.items():
        old = _as_numpy(x)
        spec = slice_spec(name)
        acc = np.zeros(old.shape, dtype=np.float64)
        count = np.zeros(old.shape[spec.axis] if spec else 1, dtype=np.float64)
        for bp, sub, w in contributions:
            s = _as_numpy(sub[name]).astype(np.float64, copy=False)
            if spec is None:
                acc += w * s
                count += w
            else:
                idx = block_indices(cfg, spec, bp.ids(spec.kind, spec.layer))
                acc[_index(old.ndim, spec.axis, idx)] += w * s
                count[idx] += w
        new = old.copy()
        held = count > 0
        if spec is None:
            if held[0]:
                new = (acc / count[0]).astype(old.dtype)
        elif held.any():
            sel = _index(old.ndim, spec.axis, np.flatnonzero(held))
            shape = [1] * old.ndim
            shape[spec.axis] = -1
            new[sel] = (acc[sel] / count[held].reshape(shape)).astype(old.dtype)
        out[name] = _like(new, x)
    return out


def held_masks(cfg: GPTConfig, blueprints: Iterable[Blueprint]) -> dict[str, np.ndarray]:
    """Per tensor of the full model, a boolean mask (broadcastable to the tensor) of the entries
    that some blueprint of `blueprints` held: a sliced tensor's held blocks along its block axis,
    a shared tensor whole (when any blueprint is given)."""
    bps = list(blueprints)
    out = {}
    for name, shape in state_shapes(cfg, None).items():
        spec = slice_spec(name)
        if spec is None:
            out[name] = np.full((1,) * len(shape), bool(bps))
            continue
        held = np.zeros(shape[spec.axis], dtype=bool)
        for bp in bps:
            held[block_indices(cfg, spec, bp.ids(spec.kind, spec.layer))] = True
        view = [1] * len(shape)
        view[spec.axis] = -1
        out[name] = held.reshape(view)
    return out


def param_counts(cfg: GPTConfig, bp: Blueprint | None = None) -> dict[str, int]:
    """Parameter counts of GPT(cfg, blueprint=bp): all, and the block (prunable) part."""
    shapes = state_shapes(cfg, bp)
    total = sum(int(np.prod(s)) for s in shapes.values())
    block = sum(int(np.prod(s)) for k, s in shapes.items() if slice_spec(k) is not None)
    return {"params": total, "block_params": block}


def sparsity(cfg: GPTConfig, bp: Blueprint) -> dict[str, float | int]:
    """Share of parameters a subnet removes, over two stated denominators: the block weights of
    all layers (attention q/k/v/out weights and their per-head biases, FFN in/out weights and
    their per-block biases; shared layers included), and all parameters (embeddings too)."""
    full, sub = param_counts(cfg), param_counts(cfg, bp)
    return {
        "params_total": full["params"], "params_kept": sub["params"],
        "block_params_total": full["block_params"], "block_params_kept": sub["block_params"],
        "removed_of_block_params": 1 - sub["block_params"] / full["block_params"],
        "removed_of_all_params": 1 - sub["params"] / full["params"],
    }
