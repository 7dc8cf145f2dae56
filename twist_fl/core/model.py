"""A GPT-2 style decoder whose layers can run any subset of their heads and FFN blocks.

nanoGPT's structure with GPT-2 parameter names (`wte`, `wpe`, `h.{l}.attn.c_attn`, ...), two
changes for TwIST: attention width is `n_heads * head_dim` (decoupled from `n_embd`), and the
FFN hidden layer is `n_ffn_blocks` blocks of `ffn_block_size`. `GPT(cfg)` is the full model;
`GPT(cfg, blueprint=bp)` the dense subnet holding only `bp`'s blocks; `model(idx, mask=bp)` runs
a full model with the other blocks zeroed. Either way a layer running n of N blocks scales its
attention and FFN outputs by (N/n)**alpha before the residual add.

Weights are stored in `nn.Linear` orientation, (out_features, in_features). Hugging Face's GPT-2
uses `Conv1D`, (in, out): `from_hf` transposes exactly the four tensors in `_HF_TRANSPOSED`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blueprint import Blueprint
from .config import GPTConfig, RunConfig
from .io import atomic_write, write_json
from .precision import DTYPES, current_precision

FORMAT = "twist-fl/model-v1"
MAX_ABS_WEIGHT = 1e4  # a weight beyond this is no trained model's (GPT-2's largest is below 100): refused on load
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def layer_scale(cfg: GPTConfig, n_kept: int, n_total: int) -> float:
    """(N/n)**alpha: keeps the expected magnitude of a layer's output when n of N blocks run."""
    return (n_total / n_kept) ** cfg.alpha if n_kept != n_total else 1.0


def _dropout(p: float) -> nn.Module:
    # Without dropout, no dropout op on every call: one-token decoding is bound by per-op costs.
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    return t if scale == 1.0 else t * scale


def _embedding(num: int, dim: int, init: bool) -> nn.Embedding:
    # nn.Embedding draws its own normal init unless handed a weight
    return nn.Embedding(num, dim) if init else nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, cfg.head_dim
        width = n_heads * cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, 3 * width, bias=cfg.bias)  # q, k, v fused along out
        self.c_proj = nn.Linear(width, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = _dropout(cfg.dropout)
        self.max_positions = cfg.block_size  # of the KV cache

    def forward(self, x: torch.Tensor, head_mask: torch.Tensor | None = None,
                cache: dict[str, Any] | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.n_heads * self.head_dim, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        past = 0
        if cache is not None:  # incremental decoding: keys/values of earlier positions are reused
            k, v, past = _cache_append(cache, k, v, self.max_positions)
        # a single new token attends to every cached position; otherwise causal
        y = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0,
                                           dropout_p=self.dropout if self.training else 0.0)
        if head_mask is not None:  # (nh,) of 0/1: dropped heads contribute exactly zero
            y = y * head_mask.view(1, -1, 1, 1)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


def _cache_append(cache: dict[str, Any], k: torch.Tensor, v: torch.Tensor,
                  capacity: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Write this step's keys/values (B, nh, T, hd) into the layer's cache and return views of
    every cached position, plus how many positions there were before this step.

    The cache holds buffers of `capacity` positions, made on first use, so a decoded token
    copies only its own keys and values (concatenating would copy the whole cache each step).
    `GPT.forward` refuses more than block_size (= capacity) positions before any layer runs.
    """
    past = cache.get("len", 0)
    T = k.size(2)
    if past and T != 1:
        raise ValueError("with a filled KV cache, decode one token at a time")
    if "k" not in cache:
        B, nh, _, hd = k.shape
        cache["k"] = k.new_empty(B, nh, capacity, hd)
        cache["v"] = v.new_empty(B, nh, capacity, hd)
    cache["k"][:, :, past:past + T] = k
    cache["v"][:, :, past:past + T] = v
    cache["len"] = past + T
    return cache["k"][:, :, :past + T], cache["v"][:, :, :past + T], past


def cache_length(cache: list[dict[str, Any]] | None) -> int:
    """Positions held by a cache from `GPT.new_cache` (0 when empty or None)."""
    return cache[0].get("len", 0) if cache else 0


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, n_blocks: int):
        super().__init__()
        self.block_size = cfg.ffn_block_size
        self.c_fc = nn.Linear(cfg.n_embd, n_blocks * cfg.ffn_block_size, bias=cfg.bias)
        self.c_proj = nn.Linear(n_blocks * cfg.ffn_block_size, cfg.n_embd, bias=cfg.bias)
        self.dropout = _dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, block_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2's gelu_new
        if block_mask is not None:  # (n_blocks,) of 0/1 -> one value per hidden unit
            h = h * block_mask.repeat_interleave(self.block_size)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, n_heads: int, n_blocks: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, n_heads)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg, n_blocks)
        # This module's own scales (a dense subnet); a masked forward passes its own.
        self.attn_scale = layer_scale(cfg, n_heads, cfg.n_head)
        self.mlp_scale = layer_scale(cfg, n_blocks, cfg.n_ffn_blocks)

    def forward(self, x, head_mask=None, block_mask=None, attn_scale=None, mlp_scale=None, cache=None):
        a = self.attn_scale if attn_scale is None else attn_scale
        m = self.mlp_scale if mlp_scale is None else mlp_scale
        x = x + _scaled(self.attn(self.ln_1(x), head_mask, cache), a)
        return x + _scaled(self.mlp(self.ln_2(x), block_mask), m)


class GPT(nn.Module):
    """A GPT-2 style decoder: `GPT(cfg)` is the full model, `GPT(cfg, blueprint=bp)` the smaller
    dense model holding only the heads and FFN blocks of `bp` (what deployment ships).

    Args:
        cfg: the architecture (`GPTConfig`).
        blueprint: the subnet to build; None (or a full blueprint) builds the full model.
        init: False leaves the weights uninitialized, for a model whose state is loaded next
            (GPT-2's normal init is most of the cost of building a model).

    Example:
        >>> from twist_fl import GPT, GPTConfig, sample_blueprints, slice_state
        >>> cfg = GPTConfig(vocab_size=257, n_layer=3, n_head=4, n_embd=32, head_dim=8, n_ffn_blocks=4,
        ...                 ffn_block_size=32, block_size=64)
        >>> full = GPT(cfg)
        >>> bp = sample_blueprints(cfg, 1, keep=2, seed=0, round=0, allow_partial=True)[0]
        >>> small = GPT.from_state(cfg, slice_state(full.state_dict(), cfg, bp), blueprint=bp)
        >>> small.num_params() < full.num_params()
        True
    """

    def __init__(self, cfg: GPTConfig, blueprint: Blueprint | None = None, init: bool = True):
        super().__init__()
        self.cfg = cfg
        self.blueprint = None if blueprint is None or blueprint.is_full(cfg) else blueprint.validate(cfg)
        bp = self.blueprint or Blueprint.full(cfg)
        self.wte = _embedding(cfg.vocab_size, cfg.n_embd, init)
        self.wpe = _embedding(cfg.block_size, cfg.n_embd, init)
        self.drop = _dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, len(bp.heads[i]), len(bp.ffn[i])) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        # lm_head is tied to wte (GPT-2): logits use wte.weight, so no separate tensor exists.
        if init:
            self.apply(self._init_weights)
            for name, p in self.named_parameters():  # GPT-2: scaled init of residual projections
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters of this model (a subnet counts its own); `non_embedding` leaves out the
        position embeddings (the token embeddings are tied to the output layer and stay)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                mask: Blueprint | None = None,
                cache: list[dict[str, Any]] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits, and the loss when targets are given.

        Args:
            idx: token ids, (B, T), T at most `cfg.block_size`.
            targets: the next tokens, (B, T), for the mean cross-entropy; None for no loss.
            mask: run this model as the subnet `mask`: dropped heads and FFN blocks contribute
                exactly zero (zero gradients too) and the kept ones are scaled as in the subnet.
                A subnet model takes a mask within its own blueprint (ids of the full model).
            cache: keys and values for decoding, one dict per layer (`new_cache`).

        Returns:
            (logits, loss): logits (B, T, vocab_size) in float32, and the mean cross-entropy or
            None. Under a bf16 or fp16 `precision_scope` the body runs under autocast.

        Example:
            >>> import torch
            >>> from twist_fl import GPT, GPTConfig
            >>> cfg = GPTConfig(vocab_size=257, n_layer=2, n_head=2, n_embd=16, head_dim=8, n_ffn_blocks=2,
            ...                 ffn_block_size=16, block_size=32)
            >>> x = torch.randint(0, 257, (2, 8))
            >>> logits, loss = GPT(cfg)(x, targets=x)
            >>> tuple(logits.shape), loss.ndim
            ((2, 8, 257), 0)
        """
        precision = current_precision()
        if precision == "fp32":
            return self._forward(idx, targets, mask, cache)
        with torch.autocast(idx.device.type, dtype=DTYPES[precision]):
            logits, loss = self._forward(idx, targets, mask, cache)
        return logits.float(), None if loss is None else loss.float()

    def _forward(self, idx: torch.Tensor, targets: torch.Tensor | None, mask: Blueprint | None,
                 cache: list[dict[str, Any]] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        past = cache_length(cache)
        if past + T > self.cfg.block_size:
            raise ValueError(f"sequence length {past + T} exceeds the model's block_size {self.cfg.block_size}")
        own = None
        if mask is not None:
            mask.validate(self.cfg)
            own = self.blueprint or Blueprint.full(self.cfg)
            if not mask.within(own):
                raise ValueError("a masked forward of a subnet needs a mask within the subnet's blueprint")
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.h):
            if mask is None:
                x = block(x, cache=None if cache is None else cache[i])
                continue
            # The mask names blocks of the full model; this model holds `own`'s, in that order.
            kept_heads, kept_ffn = set(mask.heads[i]), set(mask.ffn[i])
            hm = torch.zeros(len(own.heads[i]), device=x.device, dtype=x.dtype)
            hm[[j for j, h in enumerate(own.heads[i]) if h in kept_heads]] = 1
            fm = torch.zeros(len(own.ffn[i]), device=x.device, dtype=x.dtype)
            fm[[j for j, b in enumerate(own.ffn[i]) if b in kept_ffn]] = 1
            x = block(x, hm, fm,
                      layer_scale(self.cfg, len(mask.heads[i]), self.cfg.n_head),
                      layer_scale(self.cfg, len(mask.ffn[i]), self.cfg.n_ffn_blocks))
        x = self.ln_f(x)
        logits = F.linear(x, self.wte.weight)  # tied lm_head
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def new_cache(self) -> list[dict[str, Any]]:
        return [{} for _ in self.h]

    @torch.inference_mode()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """`idx` with `max_new_tokens` tokens appended (see `stream`)."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, generator, use_cache))
        return torch.cat([idx, *new], dim=1) if new else idx

    @torch.inference_mode()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, generator: torch.Generator | None = None,
               use_cache: bool = True) -> Iterator[torch.Tensor]:
        """Yield each new token, (B, 1), as it is chosen. Temperature 0 is greedy decoding;
        `top_k` (0 or None: no limit) samples among the k likeliest tokens. With `use_cache`,
        the prompt is run once and each new token reuses the keys and values (restarted when
        the context reaches block_size)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k={top_k!r} must be an integer >= 0 (0 = no limit)")
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and cache is not None and cache_length(cache) < self.cfg.block_size:
                logits, _ = self(idx[:, -1:], cache=cache)
            else:
                cache = self.new_cache() if use_cache else None
                logits, _ = self(idx[:, -self.cfg.block_size:], cache=cache)
            logits = logits[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:  # shifted by the max first: a temperature so small that exp underflows is greedy, not NaN
                logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
                if top_k:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
            yield nxt

    # --- persistence ---------------------------------------------------------------------

    def save(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write `model.safetensors` + `config.json` (config, blueprint of a subnet, extra)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "gpt": self.cfg.to_dict(),
                "blueprint": None if self.blueprint is None else self.blueprint.to_dict(),
                "num_params": self.num_params(), **(extra or {})}
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(d / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
        write_json(d / CONFIG_FILE, meta)
        return d

    @classmethod
    def from_state(cls, cfg: GPTConfig, state: Mapping[str, Any], blueprint: Blueprint | None = None) -> GPT:
        """The model holding `state` (torch tensors or numpy arrays): the full model, or with
        `blueprint` the dense subnet whose sliced state it is. No random init (every weight is
        overwritten); a strict load that names missing or extra keys and wrong shapes. The one
        way to build a model whose weights exist already."""
        model = cls(cfg, blueprint=blueprint, init=False)
        load_state_strict(model, state)
        return model

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str = "cpu") -> GPT:
        """Load a model written by `save` (full or pruned), with no knowledge of its parent.
        Anything wrong with the folder is a ValueError naming the file: a missing or unreadable
        file, a config without its entries, a truncated weights file, missing or extra tensors,
        wrong shapes, and weights that are not finite (NaN or Inf)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise ValueError(f"{d} is not a twist-fl model directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        try:
            meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{cfg_path} has format {got!r}; expected {FORMAT!r}")
        if not isinstance(meta.get("gpt"), dict):
            raise ValueError(f"{cfg_path} lacks its 'gpt' entry (the model's architecture)")
        try:
            cfg = GPTConfig.from_dict(meta["gpt"])
            bp = Blueprint.from_dict(meta["blueprint"]) if meta.get("blueprint") else None
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{cfg_path} does not describe a model: {e}") from None
        try:
            state = load_file(str(w_path), device=map_location)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{w_path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"{w_path} holds non-finite weights (NaN or Inf) in {bad}")
        huge = {k: float(v.abs().max()) for k, v in state.items() if v.is_floating_point() and v.numel()
                and float(v.abs().max()) > MAX_ABS_WEIGHT}
        if huge:
            raise ValueError(f"{w_path} holds absurd weights (largest magnitude above {MAX_ABS_WEIGHT:g}): "
                             + ", ".join(f"{k} up to {m:.3g}" for k, m in list(huge.items())[:3])
                             + "; a trained model's weights are far smaller, and these overflow its outputs")
        try:
            return cls.from_state(cfg, state, blueprint=bp)
        except ValueError as e:
            raise ValueError(f"{w_path} does not fit its {CONFIG_FILE}: {e}") from None

    # --- Hugging Face GPT-2 import ---------------------------------------------------------

    @classmethod
    def from_hf(cls, source: Any, **cfg_overrides: Any) -> GPT:
        """A full GPT from a `transformers.GPT2LMHeadModel`, a local `save_pretrained` dir, or a
        hub name (when online). Every tensor is mapped by `HF_NAME_MAP`; key sets must match."""
        from transformers import GPT2LMHeadModel

        hf = source if isinstance(source, nn.Module) else GPT2LMHeadModel.from_pretrained(str(source))
        c = hf.config
        n_inner = c.n_inner if c.n_inner is not None else 4 * c.n_embd
        if c.n_embd % c.n_head:
            raise ValueError(f"HF config n_embd={c.n_embd} is not divisible by n_head={c.n_head}")
        act = getattr(c, "activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"HF activation {act!r} is not supported; twist-fl uses GPT-2's gelu_new")
        n_blocks = cfg_overrides.pop("n_ffn_blocks", c.n_head)
        if n_inner % n_blocks:
            raise ValueError(f"HF n_inner={n_inner} cannot be cut into n_ffn_blocks={n_blocks} equal blocks")
        cfg = GPTConfig(**{**dict(vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer,
                                  n_head=c.n_head, n_embd=c.n_embd, head_dim=c.n_embd // c.n_head,
                                  n_ffn_blocks=n_blocks, ffn_block_size=n_inner // n_blocks,
                                  dropout=0.0, bias=True), **cfg_overrides})
        names = list(cls(cfg, init=False).state_dict())
        sd_hf = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        lm_head = sd_hf.pop("lm_head.weight", None)
        if lm_head is not None and not torch.equal(lm_head, sd_hf["transformer.wte.weight"]):
            raise ValueError("HF lm_head.weight is not tied to wte; twist-fl models tie them")
        ours = {}
        for name in names:
            hf_name = _hf_name(name)
            if hf_name not in sd_hf:
                raise ValueError(f"HF state dict lacks {hf_name!r} (for {name!r})")
            t = sd_hf.pop(hf_name)
            ours[name] = t.t() if _is_transposed(name) else t
        if sd_hf:
            raise ValueError(f"HF state dict has tensors with no twist-fl counterpart: {sorted(sd_hf)}")
        return cls.from_state(cfg, ours)


# Hugging Face name of each native tensor: "transformer." + the same GPT-2 name. The four
# Conv1D weights are stored (in, out) by HF and (out, in) here, so they are transposed.
_HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _hf_name(name: str) -> str:
    return "transformer." + name


def _is_transposed(name: str) -> bool:
    return name.startswith("h.") and name.endswith(_HF_TRANSPOSED)


def hf_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full model's state under Hugging Face GPT-2's names and layouts (the inverse of `from_hf`)."""
    return {_hf_name(k): v.t().contiguous() if _is_transposed(k) else v for k, v in state.items()}


def load_state_strict(model: nn.Module, state: Mapping[str, Any]) -> None:
    """load_state_dict with an error that names missing/extra keys and wrong shapes."""
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"state dict does not fit the model: missing keys {missing}, unexpected keys {extra}")
    bad = [f"{k}: got {tuple(state[k].shape)}, expected {tuple(v.shape)}"
           for k, v in own.items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError("state dict shapes do not fit the model: " + "; ".join(bad))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)


def initial_model(run: RunConfig, allow_pruned: bool = False) -> GPT:
    """The model of round 0: `init-from` (a Hugging Face GPT-2 or twist-fl model folder, or a
    twist-fl run folder, whose `model/` it takes) or a random init seeded by the run's seed.
    With `allow_pruned` (data-parallel training: a recovery fine-tune), `init-from` may also be
    a pruned subnet (`twist-fl prune`), trained as the dense model it is."""
    torch.manual_seed(run.seed)
    if not run.init_from:
        return GPT(run.model_config())
    key = f"run-config init-from={run.init_from!r}"
    if allow_pruned:
        pruned = load_pruned(run.init_from, key)
        if pruned is not None:
            if pruned.cfg.alpha != run.alpha or pruned.cfg.shared_layer_ids != tuple(
                    sorted({i % pruned.cfg.n_layer for i in run.shared_layer_list})):
                raise ValueError(f"{key} is a pruned subnet made with alpha={pruned.cfg.alpha:g} and shared layers "
                                 f"{list(pruned.cfg.shared_layer_ids)}; its weights (FLAP's bias compensation) hold "
                                 f"for those, so the run must set the same (got alpha={run.alpha:g}, shared-layers="
                                 f"{run.shared_layers!r})")
            return pruned
    return load_dense(run.init_from, run.alpha, run.shared_layer_list, key)


def load_pruned(path: str | os.PathLike, key: str) -> GPT | None:
    """The pruned subnet a twist-fl model or run folder holds, or None when it holds a full model
    (or is not a twist-fl folder)."""
    d = dense_model_dir(path)
    try:
        meta = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not meta.get("blueprint"):
        return None
    try:
        return GPT.load(d)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def dense_model_dir(path: str | os.PathLike) -> Path:
    """The folder holding a dense model's files: `path`, or the `model/` of a run folder."""
    p = Path(path).expanduser()
    if not (p / WEIGHTS_FILE).is_file() and (p / "model" / WEIGHTS_FILE).is_file():
        return p / "model"
    return p


def load_dense(path: str | os.PathLike, alpha: float, shared_layers: tuple[int, ...], key: str) -> GPT:
    """A full (unpruned) model from a twist-fl model or run folder or a Hugging Face GPT-2
    folder, with the run's alpha and shared layers; ValueError naming `key` otherwise. Draws
    no random numbers."""
    path = dense_model_dir(path)
    cfg_file = path / CONFIG_FILE  # twist-fl and Hugging Face folders both have one: check the format
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{key}: {cfg_file} is not valid JSON: {e}") from None
    if isinstance(meta, dict) and meta.get("format") == FORMAT:
        try:
            model = GPT.load(path)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        if model.blueprint is not None:
            raise ValueError(f"{key} is a pruned subnet; training needs a full model")
        cfg = GPTConfig.from_dict({**model.cfg.to_dict(), "alpha": alpha, "shared_layers": list(shared_layers)})
        return GPT.from_state(cfg, model.state_dict())
    if isinstance(meta, dict) and meta.get("model_type") not in (None, "gpt2"):
        raise ValueError(f"{key} is a {meta.get('model_type')!r} Hugging Face folder (a pruned subnet exported by "
                         "`twist-fl export --format hf`); training starts from a full model: pass the full model it "
                         "was pruned from (its run folder or model/), or a GPT-2 folder")
    try:
        return GPT.from_hf(path, alpha=alpha, shared_layers=shared_layers)
    except (OSError, ValueError) as e:
        raise ValueError(f"{key} is neither a twist-fl model or run folder nor a readable Hugging Face GPT-2 folder: "
                         f"{e}") from None
