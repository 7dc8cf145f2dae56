"""The local objective: the loss a node minimises on one batch.

One seam of the round loop (DESIGN.md, "Policies and levers"). Plain TwIST is cross-entropy on
the labels. With distillation (`distill-from`, `distill-weight` w, `distill-temperature` T) a
teacher's soft targets are added, as in Hinton et al. and in the in-place distillation of
US-Nets / MatFormer:

    loss = (1 - w) * CE(student, labels) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

KL is summed over the vocabulary and averaged over tokens, as CE is. The teacher is a full
model run without gradients: the dense model the run started from (`init`, loaded once per
process by `init_teacher`, never sent), another model folder named by `distill-from` itself
(e.g. the dense model a pruned model was cut from, for a recovery fine-tune), or the round's
full model (`global`, which masked nodes receive anyway). With no distillation the step is exactly the plain one.

FjORD's self-distillation (`self-distill-weight`, with `subnet-policy = "ordered"`) adds, each
step, one smaller nested prefix of the node's own subnet trained toward the subnet's outputs
(`SelfDistillation`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .blueprint import Blueprint
from .config import GPTConfig, RunConfig
from .model import GPT, load_dense

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distillation:
    teacher: torch.nn.Module  # a full model, in eval mode, no gradients
    weight: float  # w in (0, 1]
    temperature: float  # T > 0


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, summed over the vocabulary
    and averaged over tokens."""
    v = student_logits.size(-1)
    s = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum") / s.size(0)


@dataclass
class SelfDistillation:
    """FjORD's self-distillation: each step also runs one smaller nested prefix of the node's
    subnet (drawn from `prefixes` by `rng`, seeded by node and round) and adds `weight` times
    KL(node's subnet || smaller prefix), the node's own outputs as soft targets (no gradient
    through them). The node's subnet itself trains on the labels."""

    weight: float  # in (0, 1]
    prefixes: tuple[Blueprint, ...]  # the smaller prefixes a step may draw (ids of the full model)
    rng: np.random.Generator

    def draw(self) -> Blueprint:
        return self.prefixes[int(self.rng.integers(len(self.prefixes)))]


def batch_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mask: Blueprint | None = None,
               distill: Distillation | None = None,
               self_distill: SelfDistillation | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to minimise, the cross-entropy on the labels) of one batch."""
    logits, ce = model(x, y, mask=mask)
    if distill is None and self_distill is None:
        return ce, ce
    loss = ce
    if distill is not None:
        with torch.no_grad():
            teacher_logits, _ = distill.teacher(x)
        t = distill.temperature
        loss = (1 - distill.weight) * ce + distill.weight * t * t * kl_to_teacher(logits, teacher_logits, t)
    if self_distill is not None:
        small_logits, _ = model(x, mask=self_distill.draw())
        loss = loss + self_distill.weight * kl_to_teacher(small_logits, logits.detach(), 1.0)
    return loss, ce


@lru_cache(maxsize=2)
def init_teacher(path: str, alpha: float, shared_layers: tuple[int, ...]) -> GPT:
    """The `init-from` model as a teacher: loaded once per process and path, in eval mode."""
    log.info("distillation teacher: loading %s", path)
    model = load_dense(Path(path), alpha, shared_layers, f"run-config init-from={path!r} (the teacher)")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher_path(run: RunConfig) -> str:
    """The folder of a run's fixed teacher: `init-from` for distill-from 'init', else the folder
    distill-from names."""
    return str(Path(run.init_from if run.distill_from == "init" else run.distill_from).expanduser().resolve())


def fixed_distillation(run: RunConfig, cfg: GPTConfig, device: torch.device) -> Distillation | None:
    """The distillation toward a fixed teacher (distill-from 'init' or a model folder), loaded once
    per process; None when the run does not distil or distils from the round's model ('global')."""
    if not run.distill_from or run.distill_weight <= 0 or run.distill_from == "global":
        return None
    teacher = init_teacher(teacher_path(run), run.alpha, run.shared_layer_list)
    if teacher.cfg.vocab_size != cfg.vocab_size or teacher.cfg.n_embd != cfg.n_embd:
        raise ValueError(f"the distillation teacher ({teacher_path(run)}) does not fit the model: vocab "
                         f"{teacher.cfg.vocab_size} / width {teacher.cfg.n_embd} against {cfg.vocab_size} / "
                         f"{cfg.n_embd}")
    return Distillation(teacher.to(device), run.distill_weight, run.distill_temperature)
