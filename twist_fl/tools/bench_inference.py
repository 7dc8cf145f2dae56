"""Inference speed of a pruned dense subnet vs the full model on this machine's CPU (or GPU).

    twist-fl bench inference [--preset gpt2] [--keep 6] [--prompt 256] [--decode 32]
                                             [--precision fp32|bf16|auto]

Random weights of the preset's shape (speed does not depend on the values). Every layer is
sliced (shared_layers = ()), as the FLOP bound below assumes. Reports tokens/s for prefill (one
forward over the prompt) and for decoding (one token at a time with the KV cache, each token
timed), as medians over repeats; the speed-up pruned / full as the median of the repeats'
speed-ups (full and pruned run back to back in each repeat), with their range; and the FLOP
bound of that speed-up: the embedding and the output layer are not pruned, so at 6 of 12
blocks GPT-2 124M can be at most ~1.5x faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from ..core.blueprint import sample_blueprints
from ..core.config import PRECISIONS, preset
from ..core.io import write_json
from ..core.model import GPT
from ..core.precision import precision_scope, resolve_precision
from ..evaluation.prune import subnet


def forward_flops(cfg, heads: int, blocks: int, ctx: int) -> float:
    """Matmul FLOPs of one token's forward (2 per multiply-add), `ctx` positions attended."""
    c, w, f = cfg.n_embd, heads * cfg.head_dim, blocks * cfg.ffn_block_size
    per_layer = 2 * (c * 3 * w + w * c + 2 * c * f) + 2 * 2 * w * ctx
    return cfg.n_layer * per_layer + 2 * c * cfg.vocab_size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def run_once(model: GPT, idx: torch.Tensor, decode: int) -> tuple[float, float]:
    """One prefill of `idx`, then `decode` greedy tokens with the KV cache: (prefill seconds,
    median seconds per decoded token). Each token is timed on its own, so a slow moment of a
    shared machine moves the median little."""
    device = idx.device
    cache = model.new_cache()
    _sync(device)
    t = time.perf_counter()
    logits, _ = model(idx, cache=cache)
    tok = logits[:, -1:].argmax(-1)
    _sync(device)
    t_prefill = time.perf_counter() - t
    steps = []
    for _ in range(decode):
        t = time.perf_counter()
        logits, _ = model(tok, cache=cache)
        tok = logits[:, -1:].argmax(-1)
        _sync(device)
        steps.append(time.perf_counter() - t)
    return t_prefill, statistics.median(steps)


def measure(models: dict[str, GPT], prompt: int, decode: int, repeats: int,
            device: torch.device) -> dict[str, dict[str, float]]:
    """Tokens/s of each model for prefill and decode, medians over `repeats` runs; the models
    take turns within each repeat so that drift in the machine's speed touches them alike."""
    models = {name: m.to(device).eval() for name, m in models.items()}
    vocab = next(iter(models.values())).cfg.vocab_size
    idx = torch.randint(0, vocab, (1, prompt), device=device)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for m in models.values():
        run_once(m, idx, 2)  # warm-up
    for _ in range(repeats):
        for name, m in models.items():
            runs[name].append(run_once(m, idx, decode))
    out = {}
    for name, r in runs.items():
        t_prefill = statistics.median(p for p, _ in r)
        t_token = statistics.median(d for _, d in r)
        out[name] = {"prefill_tok_s": prompt / t_prefill, "decode_tok_s": 1 / t_token,
                     "prefill_s": t_prefill, "decode_s_per_token": t_token,
                     "runs": [{"prefill_s": p, "decode_s_per_token": d} for p, d in r]}
    return out


def build_parser() -> argparse.ArgumentParser:
    from . import help as H

    ap = H.parser("twist-fl bench inference", __doc__, "bench inference")
    ap.add_argument("--preset", default="gpt2", help="the model shape (a preset: gpt2, cpu-small, tiny)")
    ap.add_argument("--keep", type=int, default=6, help="blocks of each kind per layer of the pruned subnet")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens (prefill)")
    ap.add_argument("--decode", type=int, default=32, help="tokens generated one by one")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (the median is reported)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32", help="forward passes (autocast for bf16)")
    ap.add_argument("--json", help="also write the results here (a file)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    cfg = dataclasses.replace(preset(args.preset, vocab_size=50257), shared_layers=())
    torch.manual_seed(0)
    full = GPT(cfg)
    bp = sample_blueprints(cfg, 1, args.keep, seed=0, round=0, allow_partial=True)[0]
    pruned = subnet(full, bp)
    dev = torch.device(args.device)
    prec = resolve_precision(args.precision, dev, "--precision")
    res = {"preset": args.preset, "keep": args.keep, "n_blocks": cfg.n_head, "device": str(dev), "precision": prec,
           "threads": torch.get_num_threads(), "prompt": args.prompt, "decode": args.decode, "repeats": args.repeats,
           "params_full": full.num_params(), "params_pruned": pruned.num_params()}
    with precision_scope(prec):
        res.update(measure({"full": full, "pruned": pruned}, args.prompt, args.decode, args.repeats, dev))
    ctx_prefill, ctx_decode = args.prompt / 2, args.prompt + args.decode / 2
    for phase, ctx in (("prefill", ctx_prefill), ("decode", ctx_decode)):
        bound = forward_flops(cfg, cfg.n_head, cfg.n_ffn_blocks, ctx) / forward_flops(cfg, args.keep, args.keep, ctx)
        key = "prefill_s" if phase == "prefill" else "decode_s_per_token"
        # one speed-up per repeat, full and pruned of the same repeat (they ran back to back)
        per_repeat = [f[key] / p[key] for f, p in zip(res["full"]["runs"], res["pruned"]["runs"], strict=True)]
        speedup = statistics.median(per_repeat)
        res[phase] = {"speedup": speedup, "speedup_min": min(per_repeat), "speedup_max": max(per_repeat),
                      "flop_bound": bound, "of_bound": speedup / bound}
    print(f"{args.preset} shape, keep {args.keep}/{cfg.n_head} in every layer, {dev}, {prec}, "
          f"{res['threads']} threads, "
          f"prompt {args.prompt}, {args.decode} decoded tokens, median of {args.repeats}")
    print(f"{'':8} | {'full tok/s':>10} | {'pruned tok/s':>12} | {'speed-up (range)':>20} | {'FLOP bound':>10} | "
          "measured/bound")
    for phase in ("prefill", "decode"):
        r = res[phase]
        spread = f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})"
        print(f"{phase:8} | {res['full'][f'{phase}_tok_s']:>10.1f} | {res['pruned'][f'{phase}_tok_s']:>12.1f} | "
              f"{spread:>20} | {r['flop_bound']:>9.2f}x | {r['of_bound']:.0%}")
    if args.json:
        from ..core.precision import machine

        write_json(Path(args.json), {**res, "machine": machine()})  # the CPU kind and torch behind the figures
    return 0


if __name__ == "__main__":
    sys.exit(main())
