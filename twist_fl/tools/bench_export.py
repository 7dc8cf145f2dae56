"""Exported models side by side: full vs pruned at N/2, fp32 vs int8, torch vs onnxruntime.

    twist-fl bench export --model outputs/<run> [--shape default|gpt2|both] [--json out.json]

For each shape: the model (the default shape: the trained run given with --model, so that
perplexity means something; the GPT-2 124M shape: random weights of that shape, for size and
speed only), and its random subnet at keep N/2 (the model's own shared layers kept whole), each
run as a twist-fl model in torch (fp32) and exported to ONNX, fp32 and int8 (onnxruntime's
dynamic quantization). Reported: the weights file's size, the validation perplexity (the
default shape; 16,384 tokens), prefill tokens/s (one forward over the prompt) and decode
tokens/s (one token at a time with the KV cache, each token timed), medians over repeats with
the variants taking turns; and which kernels onnxruntime ran (from its profiler) next to the CPU
features that decide them (AVX-512 VNNI and AMX for int8 GEMMs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.blueprint import sample_blueprints
from ..core.config import GPTConfig, preset, quarters_of
from ..core.io import write_json
from ..core.model import CONFIG_FILE, GPT, WEIGHTS_FILE
from ..core.precision import cpu_flags
from ..core.train import evaluate
from ..evaluation.loading import data_settings, load_model, windows_for
from ..evaluation.prune import subnet
from ..export.onnx import ONNX_FILE, OnnxLM, export_onnx, quantize_int8, weight_bytes

CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@torch.inference_mode()
def torch_once(model: GPT, prompt: np.ndarray, decode: int) -> tuple[float, float]:
    """(prefill seconds, median seconds per decoded token) of a twist-fl model."""
    idx = torch.from_numpy(prompt)
    cache = model.new_cache()
    box: dict[str, Any] = {}

    def prefill():
        logits, _ = model(idx, cache=cache)
        box["tok"] = logits[:, -1:].argmax(-1)

    t_prefill = _timed(prefill)
    steps = []
    for _ in range(decode):
        def one():
            logits, _ = model(box["tok"], cache=cache)
            box["tok"] = logits[:, -1:].argmax(-1)
        steps.append(_timed(one))
    return t_prefill, statistics.median(steps)


def onnx_once(model: OnnxLM, prompt: np.ndarray, decode: int) -> tuple[float, float]:
    """The same for an exported model: the prefill with empty past tensors, then one token at a time."""
    box: dict[str, Any] = {}

    def prefill():
        logits, box["past"] = model._run(prompt, model._empty(prompt.shape[0]))
        box["tok"] = logits[:, -1:].argmax(-1).astype(np.int64)

    t_prefill = _timed(prefill)
    steps = []
    for _ in range(decode):
        def one():
            logits, box["past"] = model._run(box["tok"], box["past"])
            box["tok"] = logits[:, -1:].argmax(-1).astype(np.int64)
        steps.append(_timed(one))
    return t_prefill, statistics.median(steps)


def kernels(folder: Path, prompt: np.ndarray) -> dict[str, int]:
    """{op type (kernel): count} that onnxruntime ran for a prefill and a decode step, from its profiler."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(folder / "profile")
    lm = OnnxLM(folder)
    lm.session = ort.InferenceSession(str(folder / ONNX_FILE), opts, providers=["CPUExecutionProvider"])
    _, past = lm._run(prompt, lm._empty(prompt.shape[0]))
    lm._run(prompt[:, -1:], past)
    trace = json.loads(Path(lm.session.end_profiling()).read_text())
    ops: dict[str, int] = {}
    for ev in trace:
        op = ev.get("args", {}).get("op_name")
        if ev.get("cat") == "Node" and op and ev.get("name", "").endswith("_kernel_time"):
            ops[op] = ops.get(op, 0) + 1
    return dict(sorted(ops.items(), key=lambda kv: -kv[1]))


def bench_shape(full: GPT, meta: dict[str, Any] | None, prompt_len: int, decode: int, repeats: int,
                work: Path) -> dict[str, Any]:
    cfg = full.cfg
    keep = quarters_of(cfg.n_blocks, 2)
    bp = sample_blueprints(cfg, 1, keep, seed=0, round=0, allow_partial=True)[0]
    pruned = subnet(full, bp).eval()
    variants: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    for name, model in (("full", full), ("pruned", pruned)):
        d = work / name
        model.save(d / "torch", extra={"run": (meta or {}).get("run", {})})
        sizes[f"torch fp32 {name}"] = (d / "torch" / WEIGHTS_FILE).stat().st_size
        variants[f"torch fp32 {name}"] = model
        (d / "onnx-fp32").mkdir()
        export_onnx(model, d / "onnx-fp32", {"run": (meta or {}).get("run", {})})
        (d / "onnx-int8").mkdir()
        quantize_int8(d / "onnx-fp32" / ONNX_FILE, d / "onnx-int8" / ONNX_FILE)
        conf = json.loads((d / "onnx-fp32" / CONFIG_FILE).read_text())
        write_json(d / "onnx-int8" / CONFIG_FILE, {**conf, "onnx": {**conf["onnx"], "int8": True}})
        for kind in ("fp32", "int8"):
            sizes[f"onnx {kind} {name}"] = (d / f"onnx-{kind}" / ONNX_FILE).stat().st_size
            variants[f"onnx {kind} {name}"] = OnnxLM(d / f"onnx-{kind}", threads=torch.get_num_threads())
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, size=(1, prompt_len)).astype(np.int64)
    runs: dict[str, list[tuple[float, float]]] = {n: [] for n in variants}

    def once(name: str) -> tuple[float, float]:
        m = variants[name]
        return onnx_once(m, prompt, decode) if isinstance(m, OnnxLM) else torch_once(m, prompt, decode)

    for name in variants:
        once(name)  # warm-up
    for _ in range(repeats):
        for name in variants:
            runs[name].append(once(name))
    res: dict[str, Any] = {"n_blocks": cfg.n_blocks, "keep": keep, "shared_layers": list(cfg.shared_layer_ids),
                           "params_full": full.num_params(), "params_pruned": pruned.num_params(),
                           "prompt": prompt_len, "decode": decode, "repeats": repeats, "variants": {}}
    windows = None
    if meta is not None:
        windows = windows_for(full, data_settings(meta), "valid", 16384)
    for name, r in runs.items():
        t_prefill, t_token = statistics.median(p for p, _ in r), statistics.median(d for _, d in r)
        v = {"file_bytes": sizes[name], "prefill_tok_s": prompt_len / t_prefill, "decode_tok_s": 1 / t_token,
             "runs": [{"prefill_s": p, "decode_s_per_token": d} for p, d in r]}
        if windows is not None:
            v["ppl"] = evaluate(variants[name], windows)["ppl"]
        res["variants"][name] = v
    base = res["variants"]["torch fp32 full"]
    for v in res["variants"].values():
        v["size_vs_full_fp32"] = v["file_bytes"] / base["file_bytes"]
    res["onnx_int8_weights"] = weight_bytes(work / "pruned" / "onnx-int8" / ONNX_FILE)
    res["kernels_int8"] = kernels(work / "pruned" / "onnx-int8", prompt)
    res["kernels_fp32"] = kernels(work / "pruned" / "onnx-fp32", prompt)
    pruned_int8, pruned_fp32 = res["variants"]["onnx int8 pruned"], res["variants"]["torch fp32 pruned"]
    res["goal"] = {"pruned_int8_smaller_than_full_fp32": base["file_bytes"] / pruned_int8["file_bytes"],
                   "pruned_int8_decode_vs_pruned_fp32_torch": pruned_int8["decode_tok_s"] / pruned_fp32["decode_tok_s"]}
    return res


def _print(shape: str, r: dict[str, Any]) -> None:
    print(f"{shape}: keep {r['keep']} of {r['n_blocks']} (shared layers {r['shared_layers']} whole), prompt "
          f"{r['prompt']}, {r['decode']} decoded tokens, median of {r['repeats']}, {torch.get_num_threads()} threads")
    print(f"{'':22} | {'size MB':>8} | {'vs full':>7} | {'prefill tok/s':>13} | {'decode tok/s':>12} | perplexity")
    for name, v in r["variants"].items():
        ppl = f"{v['ppl']:.3f}" if "ppl" in v else "-"
        print(f"{name:22} | {v['file_bytes'] / 1e6:>8.2f} | {v['size_vs_full_fp32']:>6.2f}x | "
              f"{v['prefill_tok_s']:>13.1f} | {v['decode_tok_s']:>12.1f} | {ppl}")
    g = r["goal"]
    print(f"  pruned int8 is {g['pruned_int8_smaller_than_full_fp32']:.2f}x smaller than full fp32 and decodes "
          f"{g['pruned_int8_decode_vs_pruned_fp32_torch']:.2f}x as fast as pruned fp32 in torch")
    print(f"  onnxruntime kernels, int8 pruned model: {r['kernels_int8']}")


def build_parser() -> argparse.ArgumentParser:
    from . import help as H

    ap = H.parser("twist-fl bench export", __doc__, "bench export")
    ap.add_argument("--model", help="a trained default-shape run or model folder (for the default shape)")
    ap.add_argument("--shape", choices=("default", "gpt2", "both"), default="both", help="the app's default model, "
                    "GPT-2 124M (random weights), or both")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (the median is reported)")
    ap.add_argument("--decode", type=int, default=32, help="tokens generated per timed decode")
    ap.add_argument("--json", help="also write the results here (a file)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.shape in ("default", "both") and not args.model:
        ap.error("--model is needed for the default shape (a trained run, for perplexity)")
    res: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                           "cpu_features": [f for f in CPU_FEATURES if f in cpu_flags()]}
    import onnxruntime

    res["onnxruntime"] = onnxruntime.__version__
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape in ("default", "both"):
            model, meta = load_model(args.model)
            res["default"] = bench_shape(model, meta, 128, args.decode, args.repeats, Path(tmp) / "default")
            _print("default", res["default"])
        if args.shape in ("gpt2", "both"):
            torch.manual_seed(0)
            cfg: GPTConfig = preset("gpt2", vocab_size=50257)
            res["gpt2"] = bench_shape(GPT(cfg).eval(), None, 256, args.decode, args.repeats, Path(tmp) / "gpt2")
            _print("gpt2 124M", res["gpt2"])
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"CPU features: {res['cpu_features']}; torch {res['torch']}, onnxruntime {res['onnxruntime']}")
    if args.json:
        from ..core.precision import machine

        write_json(Path(args.json), {**res, "machine": machine()})  # the CPU kind and torch behind the figures
    return 0


if __name__ == "__main__":
    sys.exit(main())
