"""Inference speed of a pruned dense subnet vs the full model on this machine's CPU (or GPU).

    python -m twist_fl.bench_inference [--preset gpt2] [--keep 6] [--prompt 256] [--decode 32]

Random weights of the preset's shape (speed does not depend on the values). Every layer is
sliced (shared_layers = ()), as the FLOP bound below assumes. Reports tokens/s for prefill (one
forward over the prompt) and for decoding (one token at a time with the KV cache), as medians
over repeats, their ratio pruned / full, and the FLOP bound of that ratio: the embedding and
the output layer are not pruned, so at 6 of 12 blocks GPT-2 124M can be at most ~1.5x faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

from .blueprint import sample_blueprints
from .config import preset
from .model import GPT
from .prune import subnet


def forward_flops(cfg, heads: int, blocks: int, ctx: int) -> float:
    """Matmul FLOPs of one token's forward (2 per multiply-add), `ctx` positions attended."""
    c, w, f = cfg.n_embd, heads * cfg.head_dim, blocks * cfg.ffn_block_size
    per_layer = 2 * (c * 3 * w + w * c + 2 * c * f) + 2 * 2 * w * ctx
    return cfg.n_layer * per_layer + 2 * c * cfg.vocab_size


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


@torch.no_grad()
def measure(model: GPT, prompt: int, decode: int, repeats: int, device: torch.device) -> dict[str, float]:
    model = model.to(device).eval()
    idx = torch.randint(0, model.cfg.vocab_size, (1, prompt), device=device)

    def prefill():
        model(idx)

    def generate():
        cache = model.new_cache()
        model(idx, cache=cache)
        tok = idx[:, -1:]
        for _ in range(decode):
            logits, _ = model(tok, cache=cache)
            tok = logits[:, -1:].argmax(-1)

    t_prefill = _time(prefill, repeats)
    t_total = _time(generate, repeats)
    t_decode = max(t_total - t_prefill, 1e-9)
    return {"prefill_tok_s": prompt / t_prefill, "decode_tok_s": decode / t_decode,
            "prefill_s": t_prefill, "decode_s": t_decode}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m twist_fl.bench_inference", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--keep", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cfg = dataclasses.replace(preset(args.preset, vocab_size=50257), shared_layers=())
    torch.manual_seed(0)
    full = GPT(cfg)
    bp = sample_blueprints(cfg, 1, args.keep, seed=0, round=0, allow_partial=True)[0]
    pruned = subnet(full, bp)
    dev = torch.device(args.device)
    res = {"preset": args.preset, "keep": args.keep, "n_blocks": cfg.n_head, "device": str(dev),
           "threads": torch.get_num_threads(), "prompt": args.prompt, "decode": args.decode, "repeats": args.repeats,
           "params_full": full.num_params(), "params_pruned": pruned.num_params()}
    res["full"] = measure(full, args.prompt, args.decode, args.repeats, dev)
    res["pruned"] = measure(pruned, args.prompt, args.decode, args.repeats, dev)
    ctx_prefill, ctx_decode = args.prompt / 2, args.prompt + args.decode / 2
    for phase, ctx in (("prefill", ctx_prefill), ("decode", ctx_decode)):
        bound = forward_flops(cfg, cfg.n_head, cfg.n_ffn_blocks, ctx) / forward_flops(cfg, args.keep, args.keep, ctx)
        speedup = res["pruned"][f"{phase}_tok_s"] / res["full"][f"{phase}_tok_s"]
        res[phase] = {"speedup": speedup, "flop_bound": bound, "of_bound": speedup / bound}
    print(f"{args.preset} shape, keep {args.keep}/{cfg.n_head} in every layer, {dev}, {res['threads']} threads, "
          f"prompt {args.prompt}, {args.decode} decoded tokens, median of {args.repeats}")
    print(f"{'':8} | {'full tok/s':>10} | {'pruned tok/s':>12} | {'speed-up':>8} | {'FLOP bound':>10} | measured/bound")
    for phase in ("prefill", "decode"):
        r = res[phase]
        print(f"{phase:8} | {res['full'][f'{phase}_tok_s']:>10.1f} | {res['pruned'][f'{phase}_tok_s']:>12.1f} | "
              f"{r['speedup']:>7.2f}x | {r['flop_bound']:>9.2f}x | {r['of_bound']:.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
