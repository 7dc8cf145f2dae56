"""Flower-free local training and perplexity evaluation, shared by the apps and benchmarks."""

from __future__ import annotations

import ctypes
import logging
import math
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .blocks import scatter_state, slice_state
from .blueprint import Blueprint
from .config import GPTConfig
from .model import GPT
from .objective import Distillation, SelfDistillation, batch_loss
from .precision import grad_scaler
from .progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3  # AdamW learning rate of this round
    weight_decay: float = 0.1  # on 2-D weights only (nanoGPT)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables


# glibc <malloc.h> parameters for mallopt
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_freed_memory_kept: bool | None = None


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    By default glibc serves each allocation over 32 MiB with a fresh mmap and unmaps it when it
    is freed. A training step with a GPT-2-sized vocabulary frees and reallocates about 1 GB of
    such buffers every step (the logits, their log-softmax and gradients, the embedding's
    gradient, AdamW's temporaries), so each step page-faults them in again. Serving them from
    the heap and not trimming it lets the next step reuse the same memory. The resident size
    then stays at the process's peak, which a training process reaches on every step anyway.

    Called by a node's ClientApp, the ServerApp and the benchmarks. Process-wide and
    idempotent; returns whether it applies: not where the C library is not glibc.
    """
    global _freed_memory_kept
    if _freed_memory_kept is None:
        _freed_memory_kept = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                _ = libc.gnu_get_libc_version  # only glibc has it
                mallopt = libc.mallopt
            except (OSError, AttributeError):
                log.debug("not glibc: freed memory is returned as the C library does by default")
            else:
                _freed_memory_kept = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
                log.debug("glibc malloc keeps freed memory for reuse: %s", _freed_memory_kept)
    return _freed_memory_kept


def die_with_parent() -> bool:
    """Have the kernel end this process (SIGTERM) when the process that started it ends: a worker
    of a killed command must not live on holding a run folder's lock or a collective. Linux only
    (prctl PR_SET_PDEATHSIG); returns whether it applies."""
    if not sys.platform.startswith("linux"):
        return False
    import signal

    try:
        return ctypes.CDLL(None).prctl(1, int(signal.SIGTERM), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def freed_memory_reused() -> bool:
    """Whether `reuse_freed_memory` has applied in this process (it cannot be undone)."""
    return bool(_freed_memory_kept)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def make_optimizer(model: GPT, opt: OptimConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": opt.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), foreach=False)


def train_steps(model: torch.nn.Module, batches: Iterator[tuple[np.ndarray, np.ndarray]], steps: int,
                optimizer: torch.optim.Optimizer, grad_clip: float = 1.0,
                mask: Blueprint | None = None, step_times: list[float] | None = None,
                distill: Distillation | None = None,
                self_distill: SelfDistillation | None = None) -> dict[str, float]:
    """Train for exactly `steps` batches; `mask` trains a full model as that subnet. `model` is a
    GPT or a wrapper that forwards to one (DistributedDataParallel). `step_times` collects each
    step's seconds (forward, backward with its gradient exchange, clip, optimizer step). Forward
    passes run at the `precision_scope` in force; weights, gradients and AdamW stay float32.
    The loss is `objective.batch_loss` (cross-entropy, plus distillation when `distill` is
    given); the reported train loss is the cross-entropy either way."""
    device = next(model.parameters()).device
    scaler = grad_scaler(device)  # fp16 only (precision_scope)
    model.train()
    losses = []
    n_examples = 0
    for _ in range(steps):
        t0 = time.perf_counter()
        x, y = next(batches)
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        loss, ce = batch_loss(model, x, y, mask, distill, self_distill)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)  # skipped when the scaled gradients overflowed
            scaler.update()
        losses.append(ce.item())
        if step_times is not None:
            step_times.append(time.perf_counter() - t0)
        n_examples += x.shape[0]
    if not all(math.isfinite(v) for v in losses):
        raise FloatingPointError(f"training loss became non-finite: {losses}")
    return {"train_loss": float(np.mean(losses)), "num_examples": n_examples}


@torch.no_grad()
def evaluate(model: GPT, windows: np.ndarray, batch_size: int = 16, mask: Blueprint | None = None,
             desc: str = "evaluating") -> dict:
    """Mean next-token cross-entropy over `windows` ((n, T+1) ids) and its exp (perplexity)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in progress(range(0, len(windows), batch_size), desc):
        w = torch.from_numpy(windows[i:i + batch_size]).to(device)
        logits, _ = model(w[:, :-1], mask=mask)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                 w[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += w[:, 1:].numel()
    model.train(was_training)
    mean = total / count
    ppl = math.exp(mean) if mean < 700 else math.inf  # beyond float range: the callers refuse a non-finite one
    return {"loss": mean, "ppl": ppl, "tokens": count}


# --- optimizer state kept across rounds ----------------------------------------------------
# AdamW moments are tensors shaped like the parameters; a node that keeps them between
# rounds stores them full-size (like the global model) and slices them with each new
# blueprint, exactly as the weights are sliced. Blocks it has never held have zero moments.

MOMENTS = ("exp_avg", "exp_avg_sq")


def export_moments(model: GPT, optimizer: torch.optim.Optimizer) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """{moment: {param name: tensor}} and the step count, from a trained optimizer."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, dict[str, torch.Tensor]] = {m: {} for m in MOMENTS}
    step = 0
    for p, st in optimizer.state.items():
        for m in MOMENTS:
            out[m][names[id(p)]] = st[m].detach().cpu()
        step = max(step, int(st["step"]))
    return out, step


def import_moments(model: GPT, optimizer: torch.optim.Optimizer, moments: Mapping[str, Mapping[str, torch.Tensor]],
                   step: int) -> None:
    """Seed an optimizer that has not stepped yet with moments shaped like `model`."""
    if step <= 0:
        return
    for n, p in model.named_parameters():
        optimizer.state[p] = {"step": torch.tensor(float(step)),
                              **{m: moments[m][n].to(p.device, p.dtype).clone() for m in MOMENTS}}


def merge_moments(stored: Mapping[str, Mapping[str, torch.Tensor]] | None, cfg: GPTConfig, bp: Blueprint,
                  trained: Mapping[str, Mapping[str, torch.Tensor]], trained_is_full: bool) -> dict:
    """Full-size moments after a round: the held blocks (and shared tensors) from `trained`,
    every other block as it was stored (zeros if never held)."""
    from .blocks import state_shapes

    full_shapes = state_shapes(cfg, None)
    out = {}
    for m in MOMENTS:
        base = stored[m] if stored else {k: torch.zeros(s) for k, s in full_shapes.items()}
        sub = slice_state(trained[m], cfg, bp) if trained_is_full else trained[m]
        out[m] = scatter_state(base, cfg, bp, sub)
    return out
