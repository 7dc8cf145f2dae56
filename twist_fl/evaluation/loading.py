"""Models and data for the verbs a user runs after training (`twist-fl evaluate`, `prune`,
`heatmap`, `report`): a run folder or model folder, and the data it was trained with.

Data settings (dataset, tokenizer, data path, sequence length) default to those recorded in the
model's config.json; an explicit value wins. Bad input raises `UsageError` with what was wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..core.blocks import sparsity
from ..core.blueprint import Blueprint
from ..core.config import DATASETS, TOKENIZER_VOCAB, TOKENIZERS, GPTConfig
from ..core.data import calibration_windows, eval_windows, load_tokens
from ..core.model import CONFIG_FILE, GPT, WEIGHTS_FILE


class UsageError(Exception):
    pass


def load_model(path: str, allow_onnx: bool = False) -> tuple[GPT, dict[str, Any]]:
    """A model and the metadata in its config.json. With `allow_onnx`, a folder written by
    `twist-fl export --format onnx` gives an `OnnxLM` (evaluate and generate run it)."""
    from ..export.onnx import OnnxLM, is_onnx_folder

    p = Path(path).expanduser()
    if p.is_dir() and (p / "model" / CONFIG_FILE).is_file():  # a run folder: use its final model
        p = p / "model"
    if is_onnx_folder(p):
        if not allow_onnx:
            raise UsageError(f"{path} is an exported ONNX model; this verb needs the twist-fl model it was exported "
                             "from (prune or evaluate subnets first, then export)")
        return OnnxLM(p), json.loads((p / CONFIG_FILE).read_text())  # type: ignore[return-value]
    try:
        model = GPT.load(p)
    except ValueError as e:
        raise UsageError(str(e)) from None
    model.eval()
    meta = json.loads((p / CONFIG_FILE).read_text())
    run = meta.get("run", {})
    if not isinstance(run, dict):
        raise UsageError(f"{p / CONFIG_FILE}: its 'run' entry is {type(run).__name__} {run!r}; it must be the run "
                         "config the model was trained with (an object), or absent")
    if "tokenizer" in run and run["tokenizer"] not in TOKENIZERS:
        raise UsageError(f"{p / CONFIG_FILE}: run tokenizer={run['tokenizer']!r} is not allowed; allowed: "
                         f"{list(TOKENIZERS)}")
    return model, meta


def data_settings(meta: dict[str, Any], dataset: str | None = None, tokenizer: str | None = None,
                  data_path: str | None = None, seq_len: int | None = None) -> dict[str, Any]:
    """The data a model is evaluated on: what its config.json records, unless given here; the
    combination is checked as the run config checks it."""
    run = meta.get("run", {})
    d = {"dataset": dataset or run.get("dataset", "shakespeare"),
         "tokenizer": tokenizer or run.get("tokenizer", "bytes"),
         "data_path": data_path if data_path is not None else (run.get("data-path") or None),
         "seq_len": seq_len or int(run.get("seq-len", 64))}
    if d["dataset"] not in DATASETS:
        raise UsageError(f"dataset {d['dataset']!r} is not allowed; allowed: {list(DATASETS)}")
    if d["tokenizer"] not in TOKENIZERS:
        raise UsageError(f"tokenizer {d['tokenizer']!r} is not allowed; allowed: {list(TOKENIZERS)}")
    if d["dataset"] == "shakespeare" and data_path:
        raise UsageError(f"--data-path {data_path!r} has no meaning for dataset 'shakespeare' (the embedded corpus); "
                         "pass --dataset text or wikitext-* with it")
    if d["data_path"] and not Path(d["data_path"]).expanduser().is_dir():
        raise UsageError(f"--data-path {d['data_path']!r} is not a readable folder")
    return d


def check_tokenizer(model: GPT, tokenizer: str) -> None:
    want = TOKENIZER_VOCAB[tokenizer]
    if model.cfg.vocab_size != want:
        raise UsageError(f"the model has vocab_size {model.cfg.vocab_size}, but tokenizer {tokenizer!r} has {want} "
                         f"tokens; pass the tokenizer the model was trained with "
                         f"(allowed: {[k for k, v in TOKENIZER_VOCAB.items() if v == model.cfg.vocab_size]})")


def windows_for(model: GPT, d: dict[str, Any], split: str, tokens: int) -> np.ndarray:
    check_tokenizer(model, d["tokenizer"])
    if not 1 <= d["seq_len"] <= model.cfg.block_size:
        raise UsageError(f"--seq-len {d['seq_len']} is not allowed for this model: allowed 1..{model.cfg.block_size} "
                         "(its block_size, the positions it has)")
    splits = load_tokens(d["dataset"], d["tokenizer"], d["data_path"])
    if split == "calib":  # calibration: windows from the middle of the training split
        return calibration_windows(splits["train"].tokens, d["seq_len"], tokens)
    return eval_windows(splits[split].tokens, d["seq_len"], tokens or None)


def parse_keeps(text: str, cfg: GPTConfig, what: str = "--keeps") -> list[int]:
    """A comma list of subnet sizes, each checked against the model (`GPTConfig.check_keep`)."""
    try:
        keeps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{what} {text!r} must be a comma list of integers") from None
    if not keeps:
        raise UsageError(f"{what} {text!r} names no subnet size; give a comma list such as '2,4,6'")
    try:
        return [cfg.check_keep(k, f"{what} entry") for k in keeps]
    except ValueError as e:
        raise UsageError(str(e)) from None


def model_facts(model: GPT, path: Path | None = None) -> dict[str, Any]:
    """Parameters, shares removed (relative to the full model of the same config), file size."""
    bp = model.blueprint or Blueprint.full(model.cfg)
    s = sparsity(model.cfg, bp)
    facts = {"params": s["params_kept"], "params_full": s["params_total"],
             "removed_of_block_params": s["removed_of_block_params"],
             "removed_of_all_params": s["removed_of_all_params"],
             "blueprint": bp.to_dict() if model.blueprint else None}
    for name in (WEIGHTS_FILE, "model.onnx"):
        if path is not None and (path / name).is_file():
            facts["file_bytes"] = (path / name).stat().st_size
    return facts
