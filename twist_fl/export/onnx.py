"""A twist-fl model as ONNX, run with ONNX Runtime, in float32 or with int8 weights
(`twist-fl export --format onnx [--int8]`).

The graph is one decoding step with explicit keys and values:

    inputs   input_ids (B, T) int64, past_key_<l>, past_value_<l> (B, heads_l, P, head_dim) float32
    outputs  logits (B, T, vocab) float32, present_key_<l>, present_value_<l> (B, heads_l, P + T, head_dim)

P = 0 is the prefill (empty past tensors), T = 1 a decoded token; the position of new token i
is P + i. Each layer keeps its own number of heads (a pruned subnet), and applies its
activation scales. int8: onnxruntime's dynamic quantization of every MatMul and Gather weight
(per-channel int8 weights; activations quantized per batch at run time).

The folder holds `model.onnx` and `config.json` (twist-fl's own metadata: the architecture, the
blueprint of a subnet, the run it came from, and `"onnx": {"int8": ...}`), so `twist-fl
evaluate` and `generate` take it like a model folder. No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.blueprint import Blueprint
from ..core.config import GPTConfig
from ..core.io import write_json
from ..core.model import CONFIG_FILE, GPT

log = logging.getLogger(__name__)

ONNX_FORMAT = "twist-fl/onnx-v1"
ONNX_FILE = "model.onnx"


class DecoderStep(nn.Module):
    """`GPT.forward` with past keys and values passed in and out (concatenated), the form an
    ONNX graph can hold. The same modules and scales, so the same logits."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        T = input_ids.shape[1]
        P = past[0].shape[2]
        pos = torch.arange(T, device=input_ids.device) + P
        x = m.wte(input_ids) + m.wpe(pos)
        # new position i (at P + i) sees every key at or before it
        allowed = torch.arange(P + T, device=input_ids.device)[None, :] <= pos[:, None]  # (T, P + T)
        presents: list[torch.Tensor] = []
        for i, block in enumerate(m.h):
            a = block.attn
            B = x.shape[0]
            q, k, v = a.c_attn(block.ln_1(x)).split(a.n_heads * a.head_dim, dim=2)
            q, k, v = (t.view(B, T, a.n_heads, a.head_dim).transpose(1, 2) for t in (q, k, v))
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            y = a.c_proj(y.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))
            x = x + y * block.attn_scale
            x = x + block.mlp(block.ln_2(x)) * block.mlp_scale
            presents += [k, v]
        return (F.linear(m.ln_f(x), m.wte.weight), *presents)


@contextlib.contextmanager
def _quiet():
    """The exporter's and quantizer's chatter (missing torchvision ops, pre-processing advice)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    return ["input_ids", *past], ["logits", *present]


def export_onnx(model: GPT, out: Path, meta: dict[str, Any], int8: bool = False) -> dict[str, Any]:
    """Write `model` as `out/model.onnx` (+ config.json); with `int8`, its weights quantized."""
    model = model.cpu().eval()
    target = out / ONNX_FILE
    fp32 = out / "model-fp32.onnx" if int8 else target
    export_graph(model, fp32)
    if int8:
        quantize_int8(fp32, target)
        fp32.unlink()
    cfg = model.cfg
    write_json(out / CONFIG_FILE, {**{k: v for k, v in meta.items() if k not in ("format",)},
                                   "format": ONNX_FORMAT, "gpt": cfg.to_dict(),
                                   "blueprint": model.blueprint.to_dict() if model.blueprint else None,
                                   "num_params": model.num_params(), "onnx": {"int8": int8, "file": ONNX_FILE}})
    return {"out": str(out), "file_bytes": target.stat().st_size, "int8": int8}


def export_graph(model: GPT, path: Path) -> Path:
    """The float32 decoding graph of `model` (see the module's docstring) at `path`."""
    cfg = model.cfg
    step = DecoderStep(model).eval()
    past = [torch.zeros(1, b.attn.n_heads, 3, cfg.head_dim) for b in model.h for _ in range(2)]
    example = (torch.zeros(1, 2, dtype=torch.long), *past)
    inputs, outputs = io_names(cfg.n_layer)
    batch, seq, cached = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past", min=0)
    shapes = ({0: batch, 1: seq}, tuple({0: batch, 2: cached} for _ in past))  # forward(input_ids, *past)
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(step, example, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=shapes, dynamo=True, optimize=True, verbose=False)
    program.save(str(path), external_data=False)
    return path


def quantize_int8(src: Path, dst: Path) -> Path:
    """onnxruntime's dynamic quantization of every MatMul and Gather weight of `src` (per-channel
    int8 weights; activations quantized per batch at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gather"])
    return dst


def weight_bytes(path: Path) -> dict[str, int]:
    """Bytes of an ONNX file's stored tensors (initializers) by element type, e.g. {"FLOAT": ..., "INT8": ...}."""
    import onnx

    out: dict[str, int] = {}
    for t in onnx.load(str(path), load_external_data=False).graph.initializer:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        size = int(np.prod(t.dims)) if t.dims else 1
        out[name] = out.get(name, 0) + size * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return out


def is_onnx_folder(path: Path) -> bool:
    cfg = Path(path) / CONFIG_FILE
    if not (Path(path) / ONNX_FILE).is_file() or not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == ONNX_FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


class OnnxLM:
    """An exported ONNX model behind the small part of `GPT`'s interface the verbs use:
    `model(idx) -> (logits, None)`, `stream`/`generate` with the KV cache, `cfg`, `blueprint`."""

    def __init__(self, folder: Path, threads: int = 0):
        import onnxruntime as ort

        self.folder = Path(folder)
        meta = json.loads((Path(folder) / CONFIG_FILE).read_text())
        self.cfg = GPTConfig.from_dict(meta["gpt"])
        self.blueprint = Blueprint.from_dict(meta["blueprint"]) if meta.get("blueprint") else None
        self.int8 = bool(meta.get("onnx", {}).get("int8"))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(Path(folder) / ONNX_FILE), opts, providers=["CPUExecutionProvider"])
        bp = self.blueprint or Blueprint.full(self.cfg)
        self.heads = [len(h) for h in bp.heads]
        self.training = False

    def _run(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        inputs, _ = io_names(self.cfg.n_layer)
        out = self.session.run(None, dict(zip(inputs, [ids, *past], strict=True)))
        if not np.isfinite(out[0]).all():
            raise ValueError(f"the ONNX model {self.folder} gives non-finite logits (NaN or Inf): its weights overflow "
                             "its outputs, so it can neither be evaluated nor generate text")
        return out[0], out[1:]

    def _empty(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, self.cfg.head_dim), dtype=np.float32) for h in self.heads for _ in range(2)]

    def __call__(self, idx: torch.Tensor, targets: torch.Tensor | None = None, mask=None):
        if mask is not None:
            raise ValueError("an ONNX model runs as exported; it takes no mask")
        logits, _ = self._run(idx.cpu().numpy().astype(np.int64), self._empty(idx.shape[0]))
        logits = torch.from_numpy(logits)
        loss = None if targets is None else F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def parameters(self):  # `evaluate` asks for the device of the first parameter
        yield torch.zeros(0)

    def eval(self) -> OnnxLM:
        return self

    def train(self, mode: bool = True) -> OnnxLM:
        return self

    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               generator: torch.Generator | None = None):
        """As `GPT.stream`: prefill once, then one token at a time with the cached keys and values."""
        ids = idx.cpu().numpy().astype(np.int64)
        past = self._empty(ids.shape[0])
        for _ in range(max_new_tokens):
            if 0 < past[0].shape[2] < self.cfg.block_size:  # the cache has room: feed the newest token
                logits, past = self._run(ids[:, -1:], past)
            else:  # the first step, or a full context: run the last block_size tokens afresh, as GPT.stream
                logits, past = self._run(ids[:, -self.cfg.block_size:], self._empty(ids.shape[0]))
            nxt = _choose(torch.from_numpy(logits[:, -1, :]), temperature, top_k, generator)
            ids = np.concatenate([ids, nxt.numpy()], axis=1)
            yield nxt

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None) -> torch.Tensor:
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, generator))
        return torch.cat([idx, *new], dim=1) if new else idx


def _choose(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
