"""Flat, commented configuration dataclasses.

`GPTConfig` describes the network (and is what a saved model carries); `RunConfig` is the
flat run configuration that `[tool.flwr.app.config]` (kebab-case keys) and the Hydra CLI
(snake_case keys) both map onto, validated once, before round 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass, fields
from typing import Any

KINDS = ("heads", "ffn")  # the two kinds of blocks a subnet keeps a share of
FLOWER_STRATEGIES = ("twist", "fedavg")  # what the Flower app runs
DENSE_STRATEGIES = ("fedavg", "ddp")  # every worker trains the full model
STRATEGIES = (*FLOWER_STRATEGIES, "ddp")  # ddp: data-parallel training on torch.distributed (`twist-fl ddp`)
SUBNET_POLICIES = ("random", "ordered", "rolling")  # TwIST; HeteroFL / FjORD (nested prefix); FedRolex
NODE_MODES = ("true", "masked")  # how a node trains: true = the sliced dense subnet; masked = full model + mask
RUN_MODES = (*NODE_MODES, "hybrid")  # hybrid: true on even partition ids, masked on odd
DISTILL_SOURCES = ("", "init", "global")  # teacher of the local distillation loss ("" = none), see core/objective.py
SERVER_OPTIMIZERS = ("avg", "momentum", "nesterov", "adam")  # the outer step, see core/outer.py
# run-config recipe: the keys a recipe sets (on top of the defaults; a key given another value keeps it). The
# fine-tune recipe is the one measured in docs/results/finetune (tune finetune's lever of that name); the scratch
# recipe is tune's `twist-core-half-mixed`, measured in docs/results/peers: FjORD's widths over a nested core of
# half the blocks, which needs the model (`as_trained` sets core-blocks = N/2 when it is left at 0).
RECIPES: dict[str, dict[str, Any]] = {
    "": {},
    "finetune": {"init-order": "flap", "subnet-policy": "ordered", "keep-choices": "quarters", "local-steps": 1},
    "scratch": {"keep-choices": "quarters"},
}
INIT_ORDERS = ("", "flap")  # init-order: "" keeps the init-from model's block order, see core/importance.py


def parse_mode(value: Any, key: str, allowed: tuple[str, ...] = NODE_MODES) -> str:
    """A mode as read from a run or node config. TOML reads an unquoted `true` as a boolean,
    so True means the mode "true"; anything else must be one of `allowed`."""
    mode = "true" if value is True else value
    if not isinstance(mode, str) or mode not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; allowed: {list(allowed)}")
    return mode


@dataclass(frozen=True)
class GPTConfig:
    """The architecture: what a saved model carries, and all `GPT` needs to be built.

    Attributes:
        vocab_size: tokens (GPT-2 BPE 50257; the byte tokenizer 257).
        block_size: the longest sequence (positions of wpe).
        n_layer: transformer blocks.
        n_head: attention heads per layer in the full model (N for heads).
        n_embd: width of the residual stream.
        head_dim: width of one head (attention width n_head x head_dim, not tied to n_embd).
        n_ffn_blocks: the FFN hidden layer cut into this many equal blocks (N for FFN).
        ffn_block_size: hidden units per FFN block.
        alpha: a layer running n of N blocks scales its outputs by (N/n)**alpha.
        shared_layers: layers always kept whole (negative counts from the end).
        dropout: dropout on attention and residual branches (0 for the paper's setup).
        bias: biases in Linear layers and LayerNorms, as GPT-2.

    Example:
        >>> from twist_fl import GPTConfig
        >>> cfg = GPTConfig(n_layer=12, n_head=12, n_ffn_blocks=12)  # GPT-2 124M's shape
        >>> cfg.n_blocks, cfg.shared_layer_ids
        (12, (0, 11))
    """

    vocab_size: int = 50257  # GPT-2 BPE; the byte tokenizer uses 257 (256 bytes + end-of-text)
    block_size: int = 1024  # maximum sequence length (positions in wpe)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per layer in the FULL model (N for heads)
    n_embd: int = 768  # residual-stream width
    head_dim: int = 64  # width of one head; attention width = n_head * head_dim (not tied to n_embd)
    n_ffn_blocks: int = 12  # FFN hidden layer cut into this many equal blocks (N for FFN)
    ffn_block_size: int = 256  # hidden units per FFN block; hidden width = n_ffn_blocks * ffn_block_size
    alpha: float = 0.5  # activation scaling exponent: outputs of n of N blocks are scaled by (N/n)**alpha
    shared_layers: tuple[int, ...] = (0, -1)  # layers always kept whole (negative = from the end)
    dropout: float = 0.0  # dropout on attention probs and residual branches (0 for the paper's setup)
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2

    def __post_init__(self) -> None:
        object.__setattr__(self, "shared_layers", tuple(int(i) for i in self.shared_layers))
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "head_dim",
                     "n_ffn_blocks", "ffn_block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"GPTConfig.alpha must be a finite number >= 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for i in self.shared_layers:
            if not -self.n_layer <= i < self.n_layer:
                raise ValueError(
                    f"GPTConfig.shared_layers has layer {i}, outside the model's "
                    f"{self.n_layer} layers (allowed: {-self.n_layer}..{self.n_layer - 1})"
                )

    @property
    def shared_layer_ids(self) -> tuple[int, ...]:
        """The shared layers as sorted non-negative indices."""
        return tuple(sorted({i % self.n_layer for i in self.shared_layers}))

    @property
    def n_blocks(self) -> int:
        """N of "keep X of N": the blocks of each kind a subnet may keep per layer (1..n_blocks)."""
        return min(self.n_head, self.n_ffn_blocks)

    def blocks_of(self, kind: str) -> int:
        """Blocks per layer of a kind: `heads` (attention heads) or `ffn` (FFN blocks)."""
        if kind not in KINDS:
            raise ValueError(f"block kind {kind!r} is not allowed; allowed: {list(KINDS)}")
        return self.n_head if kind == "heads" else self.n_ffn_blocks

    def block_width(self, kind: str) -> int:
        """Units per block of a kind: head_dim for a head, ffn_block_size for an FFN block."""
        if kind not in KINDS:
            raise ValueError(f"block kind {kind!r} is not allowed; allowed: {list(KINDS)}")
        return self.head_dim if kind == "heads" else self.ffn_block_size

    def check_keep(self, keep: Any, what: str = "keep", model: str = "this model") -> int:
        """`keep` as an int if it is a valid subnet size for this model, else ValueError naming
        `what`, the value, the model and the allowed range: the one home of the keep range."""
        if isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or not 1 <= keep <= self.n_blocks:
            raise ValueError(f"{what}={keep!r} is out of range for {model}: allowed 1..{self.n_blocks} blocks "
                             f"of each kind per layer (n_head={self.n_head}, n_ffn_blocks={self.n_ffn_blocks})")
        return int(keep)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shared_layers"] = list(self.shared_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**{**d, "shared_layers": tuple(d.get("shared_layers", (0, -1)))})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# Presets: the architecture only; vocab_size comes from the tokenizer at run time.
PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 124M: 12 layers x (12 heads of 64 + 12 FFN blocks of 256 = 3072 hidden).
    "gpt2": dict(block_size=1024, n_layer=12, n_head=12, n_embd=768, head_dim=64,
                 n_ffn_blocks=12, ffn_block_size=256),
    # The CPU default of `flwr run .`: 1.25 M parameters with the byte tokenizer.
    "cpu-small": dict(block_size=256, n_layer=6, n_head=8, n_embd=128, head_dim=16,
                      n_ffn_blocks=8, ffn_block_size=64),
    # Tests and smoke runs: a few hundred thousand parameters.
    "tiny": dict(block_size=64, n_layer=3, n_head=4, n_embd=32, head_dim=8,
                 n_ffn_blocks=4, ffn_block_size=32),
}


def preset_of(cfg: GPTConfig) -> str | None:
    """The preset whose architecture `cfg` has (vocab, alpha and shared layers aside), or None."""
    return next((name for name, fields_ in PRESETS.items()
                 if all(getattr(cfg, k) == v for k, v in fields_.items())), None)


def quarters_of(n_blocks: int, quarters: int) -> int:
    """`quarters` quarters of a layer's `n_blocks` blocks, rounded down, at least 1: the one rule for
    "a quarter", "half" (the default keep, the scratch recipe's core) and FjORD's widths."""
    return max(1, quarters * n_blocks // 4)


def preset(name: str, **overrides: Any) -> GPTConfig:
    """A GPTConfig from a named preset, with field overrides (e.g. vocab_size)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


# --- the run configuration ------------------------------------------------------------------

TOKENIZER_VOCAB = {"bytes": 257, "gpt2": 50257}  # tokens of each tokenizer (the model's vocab_size)
TOKENIZERS = tuple(TOKENIZER_VOCAB)
DATASETS = ("shakespeare", "wikitext-103", "wikitext-2", "text")
PARTITIONINGS = ("iid", "document", "character", "dirichlet")  # see core/data.py
PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # see core/precision.py


@dataclass(frozen=True)
class RunConfig:
    """Every key of `[tool.flwr.app.config]` (kebab-case there, snake_case here)."""

    # TwIST
    strategy: str = "twist"  # twist | fedavg (FedAvg of the dense model: every node trains the full model); ddp runs
    # are recorded as ddp (`twist-fl ddp`, not the Flower app)
    keep: int = 0  # blocks of each kind a subnet keeps per non-shared layer (X of N); 0 = N/2 (50%)
    alpha: float = 0.5  # activation scaling exponent, (N/n)**alpha
    shared_layers: str = "0,-1"  # comma list of layers kept whole ("" for none)
    mode: str = "true"  # true (sliced dense subnets) | masked (full model + mask) | hybrid (alternate by partition)
    keep_choices: str = ""  # mixed keeps: a comma list (e.g. "2,4,6,8") each node draws its keep from per round,
    # within its capacity, or "quarters" (N/4, N/2, 3N/4, N of the model); "" = every node at `keep`.
    # `keep="2,4,6,8"` is read as this key
    full_nodes: int = 0  # nodes per round that train the full model (rotating, seeded): the sandwich rule
    subnet_policy: str = "random"  # which blocks a node holds: random (TwIST) | ordered (the nested prefix: HeteroFL,
    # FjORD) | rolling (FedRolex: a cyclic window advancing one block a round); deployment cuts the same kind
    self_distill_weight: float = 0.0  # FjORD's self-distillation (subnet-policy ordered): each step also trains one
    # smaller nested prefix toward the node's own outputs, with this weight; 0 = off
    core_blocks: int = 0  # subnet-policy random: every subnet keeps blocks 0..core-blocks-1 of each non-shared layer
    # (with init-order, the most important), the rest drawn at random (a subnet of keep <= core-blocks is the
    # prefix of its keep); 0 = TwIST's fully random subnets
    init_order: str = ""  # "" | flap: before round 1, sort each layer's blocks of the init-from model by FLAP's
    # calibration score, most important first (the same function; its nested prefixes become FLAP's choice)
    # levers of the local objective (core/objective.py)
    distill_from: str = ""  # "" (off) | init (the init-from model, loaded once on each node) | global (the round's
    # full model; masked nodes only, which receive it anyway) | a model folder (e.g. the dense model a pruned
    # init-from was cut from: a recovery fine-tune)
    distill_weight: float = 0.0  # w: the node's loss is (1 - w) * CE + w * T^2 * KL(teacher || student); 0 = off
    distill_temperature: float = 1.0  # T of the distillation softmax
    recipe: str = ""  # "" | finetune | scratch: the recommended keys in one step (RECIPES; scratch also sets
    # core-blocks to half the model's blocks); a key set to anything but its default keeps that value
    # the server's outer step (core/outer.py)
    server_optimizer: str = "avg"  # avg (the coverage average) | momentum | nesterov (FedAvgM, DiLoCo) | adam
    server_lr: float = 1.0  # outer learning rate on the averaged update (new - old)
    server_momentum: float = 0.9  # momentum of momentum/nesterov; beta1 of adam
    # rounds and local work
    num_server_rounds: int = 60  # federated rounds
    local_steps: int = 15  # batches each node trains per round (the repartition interval)
    num_nodes: int = 0  # nodes sampled per round; 0 = every connected node
    min_nodes: int = 2  # wait for at least this many nodes before a round
    node_wait_timeout: float = 300.0  # seconds to wait for min-nodes before failing
    round_timeout: float = 600.0  # seconds to wait for replies in a round
    max_failed_rounds: int = 3  # stop after this many consecutive rounds with no valid reply (0: never)
    # model and data
    model: str = "cpu-small"  # preset: cpu-small | tiny | gpt2
    init_from: str = ""  # start from a model: a HF GPT-2 save_pretrained folder or a twist-fl model folder
    dataset: str = "shakespeare"  # shakespeare (embedded) | wikitext-103 | wikitext-2 | text
    data_path: str = ""  # local folder for wikitext-* (wiki.*.raw) or text (train/valid/test.txt)
    tokenizer: str = "bytes"  # bytes | gpt2
    partitioning: str = "iid"  # iid | document (whole plays) | character (speaking roles) | dirichlet (over plays)
    partition_alpha: float = 0.5  # Dirichlet concentration of partitioning 'dirichlet' (small: each play on few nodes)
    seq_len: int = 64  # tokens per training sequence
    batch_size: int = 16  # sequences per batch
    # optimizer
    lr: float = 2e-3  # peak AdamW learning rate (tuned: 3e-3 is unstable across seeds, README)
    lr_schedule: str = "cosine"  # constant | cosine (per round, down to lr * lr_min_ratio)
    lr_min_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables
    optimizer_state: str = "keep"  # keep (nodes keep AdamW moments of blocks they held) | reset (fresh each round)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda (nodes; auto uses a GPU when the node has one)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA) | auto: forward passes under autocast, fp32 masters
    reuse_freed_memory: bool = True  # nodes and server keep freed memory (glibc): no page faults on large buffers
    # aggregation and reply validation
    wire_dtype: str = "float32"  # float32 | float16 | bfloat16: tensors on the wire, both directions
    weighted_average: bool = True  # weight replies by num-examples
    max_update_ratio: float = 10.0  # reject a reply whose update norm exceeds this times the sent tensors' norm
    # evaluation and outputs
    eval_every: int = 10  # server-side evaluation every this many rounds (and after the last)
    eval_keeps: str = ""  # subnet sizes evaluated (comma list; mean +- std over eval-draws); "" = N/4, N/2, 3N/4
    eval_draws: int = 3
    eval_tokens: int = 16384  # validation tokens per evaluation (0 = the whole split)
    fraction_evaluate: float = 0.0  # share of connected nodes that also evaluate on their own held-out text (0: off)
    tensorboard: bool = False  # also write each metrics row as TensorBoard scalars, <run>/tensorboard/ (the extra)
    out_dir: str = "outputs"
    run_name: str = ""  # default: <time>-<strategy>-k<keep>
    resume_from: str = ""  # a run folder to continue from its last complete round

    # --- parsing ---------------------------------------------------------------------------

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> RunConfig:
        """From run-config values (kebab- or snake-case keys); types are checked and coerced."""
        types = {f.name: f.type for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in types:
                allowed = ", ".join(sorted(k.replace("_", "-") for k in types))
                raise ValueError(f"unknown run-config key {key!r}; allowed keys: {allowed}")
            if name == "mode":  # `mode=true` unquoted is a TOML boolean
                value = parse_mode(value, "run-config mode", RUN_MODES)
            if name == "keep" and isinstance(value, str) and "," in value:  # keep="2,4,6,8": mixed keeps
                kwargs["keep_choices"] = _coerce("keep", value, str)
                value = 0
            kwargs[name] = _coerce(key, value, types[name])
        recipe = kwargs.get("recipe", "")
        _choice("recipe", recipe, tuple(RECIPES))
        defaults = cls()
        for key, value in RECIPES[recipe].items():  # a key left at its default takes the recipe's value
            name = key.replace("-", "_")
            if kwargs.get(name, getattr(defaults, name)) == getattr(defaults, name):
                kwargs[name] = value
        run = cls(**kwargs)
        run.validate()
        return run

    def to_flat(self) -> dict[str, Any]:
        """Kebab-case scalars, as `[tool.flwr.app.config]` and `--run-config` take them."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        run = dataclasses.replace(self, **changes)
        run.validate()
        return run

    # --- derived values --------------------------------------------------------------------

    @property
    def shared_layer_list(self) -> tuple[int, ...]:
        return _int_list("shared-layers", self.shared_layers)

    def keep_for(self, cfg: GPTConfig) -> int:
        """`keep`, with 0 resolved to half the blocks of the model; with mixed keeps the largest choice."""
        if self.keep_choices.strip():
            return max(self.choices_for(cfg))
        return self.keep or quarters_of(cfg.n_blocks, 2)

    @property
    def keep_choice_list(self) -> tuple[int, ...]:
        """`keep-choices` as sorted unique ints (empty: every node at `keep`); "quarters" needs the
        model (`choices_for`)."""
        if self.keep_choices.strip() == "quarters":
            raise ValueError("keep-choices='quarters' depends on the model: use choices_for(cfg)")
        return tuple(sorted(set(_int_list("keep-choices", self.keep_choices))))

    def choices_for(self, cfg: GPTConfig) -> tuple[int, ...]:
        """`keep-choices` for this model: "quarters" is N/4, N/2, 3N/4 and N (FjORD's widths at any
        N); a comma list as it is; empty when every node trains `keep`."""
        if self.keep_choices.strip() == "quarters":
            return tuple(sorted({quarters_of(cfg.n_blocks, q) for q in (1, 2, 3, 4)}))
        return self.keep_choice_list

    def trained_keep(self, cfg: GPTConfig) -> int:
        """Blocks per layer each worker trains: `keep` for twist, every block for fedavg and ddp."""
        return cfg.n_blocks if self.strategy in DENSE_STRATEGIES else self.keep_for(cfg)

    def eval_keeps_for(self, cfg: GPTConfig) -> tuple[int, ...]:
        """`eval-keeps`, with "" resolved to a quarter, half and three quarters of the blocks."""
        if self.eval_keeps.strip():
            return _int_list("eval-keeps", self.eval_keeps)
        n = cfg.n_blocks
        return tuple(sorted({max(1, round(n * f)) for f in (0.25, 0.5, 0.75)} - {n}))

    def model_config(self) -> GPTConfig:
        """The GPTConfig of this run (without `init-from`, which brings its own architecture)."""
        return preset(self.model, vocab_size=TOKENIZER_VOCAB[self.tokenizer], alpha=self.alpha,
                      shared_layers=self.shared_layer_list)

    def lr_at(self, round_: int) -> float:
        """Learning rate of a round (1-based): constant, or cosine from lr to lr * lr_min_ratio."""
        if self.lr_schedule == "constant" or self.num_server_rounds <= 1:
            return self.lr
        t = (round_ - 1) / (self.num_server_rounds - 1)
        lo = self.lr * self.lr_min_ratio
        return lo + 0.5 * (self.lr - lo) * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))

    def default_run_name(self) -> str:
        import time

        return time.strftime("%Y%m%d-%H%M%S") + f"-{self.strategy}-k{self.keep or 'half'}"

    # --- validation --------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ValueError naming the key, the value and what is allowed."""
        if self.tensorboard:
            from .scalars import EXTRA_HINT, available

            if not available():
                raise ValueError(f"run-config tensorboard=true needs the tensorboard package, which is not "
                                 f"installed: {EXTRA_HINT}, or set tensorboard=false")
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("mode", self.mode, RUN_MODES)
        _choice("model", self.model, tuple(PRESETS))
        _choice("dataset", self.dataset, DATASETS)
        _choice("tokenizer", self.tokenizer, TOKENIZERS)
        _choice("partitioning", self.partitioning, PARTITIONINGS)
        _choice("lr-schedule", self.lr_schedule, ("constant", "cosine"))
        _choice("optimizer-state", self.optimizer_state, ("reset", "keep"))
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _choice("precision", self.precision, PRECISIONS)
        _choice("wire-dtype", self.wire_dtype, ("float32", "float16", "bfloat16"))
        if self.distill_from not in DISTILL_SOURCES:
            from pathlib import Path

            if not Path(self.distill_from).expanduser().is_dir():
                raise ValueError(f"run-config distill-from={self.distill_from!r} is neither one of "
                                 f"{[s for s in DISTILL_SOURCES if s]} nor a readable model folder (the teacher)")
        _choice("server-optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        for key in ("num_server_rounds", "local_steps", "min_nodes", "seq_len", "batch_size", "eval_every",
                    "eval_draws"):
            _positive(key, getattr(self, key))
        for key in ("keep", "num_nodes", "max_failed_rounds", "eval_tokens", "seed", "full_nodes"):
            if getattr(self, key) < 0:
                raise ValueError(f"run-config {key.replace('_', '-')}={getattr(self, key)!r} must be >= 0")
        for key in ("lr", "node_wait_timeout", "round_timeout", "max_update_ratio", "distill_temperature",
                    "server_lr"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"run-config {key.replace('_', '-')}={v!r} must be a positive finite number")
        for key in ("weight_decay", "grad_clip", "alpha"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"run-config {key.replace('_', '-')}={v!r} must be a finite number >= 0")
        self._validate_levers()
        if not 0 <= self.fraction_evaluate <= 1:
            raise ValueError(f"run-config fraction-evaluate={self.fraction_evaluate!r} must be in [0, 1]")
        if not (math.isfinite(self.partition_alpha) and self.partition_alpha > 0):
            raise ValueError(f"run-config partition-alpha={self.partition_alpha!r} must be a positive finite number")
        if self.partitioning in ("character", "dirichlet") and self.dataset != "shakespeare":
            raise ValueError(f"run-config partitioning={self.partitioning!r} splits the speeches of the embedded "
                             f"corpus; dataset={self.dataset!r} has none (allowed there: 'iid', 'document')")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ValueError(f"run-config lr-min-ratio={self.lr_min_ratio!r} must be in [0, 1]")
        if self.dataset in ("wikitext-103", "wikitext-2", "text") and self.data_path:
            from pathlib import Path

            if not Path(self.data_path).expanduser().is_dir():
                raise ValueError(f"run-config data-path={self.data_path!r} is not a readable folder")
        if self.dataset == "shakespeare" and self.data_path:
            raise ValueError(f"run-config data-path={self.data_path!r} has no meaning for dataset 'shakespeare' (the "
                             "embedded corpus); leave it empty, or use dataset 'text' for a folder of text files")
        name = self.run_name
        if name and (name in (".", "..") or "/" in name or "\\" in name or name != name.strip()):
            raise ValueError(f"run-config run-name={name!r} must be a folder name, not a path (no '/', not '.' or "
                             "'..'); the run folder is out-dir/run-name: set out-dir for where it goes")
        if self.dataset == "text" and not self.data_path:
            raise ValueError("run-config dataset='text' needs data-path (a folder with train.txt, valid.txt, test.txt)")
        if self.init_from:
            from pathlib import Path

            if not Path(self.init_from).expanduser().is_dir():
                raise ValueError(f"run-config init-from={self.init_from!r} is not a readable folder")
        if not self.init_from:  # with init-from the architecture is checked once the model is loaded
            self.check_model(self.model_config())

    def _validate_levers(self) -> None:
        """The training levers: distillation, full nodes, mixed keeps, the outer step."""
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"run-config distill-weight={self.distill_weight!r} must be in [0, 1]")
        if self.distill_weight > 0 and not self.distill_from:
            raise ValueError(f"run-config distill-weight={self.distill_weight!r} needs a teacher: set distill-from "
                             f"(allowed: {[s for s in DISTILL_SOURCES if s]})")
        if self.distill_from == "init" and not self.init_from:
            raise ValueError("run-config distill-from='init' distils from the init-from model, but init-from is "
                             "empty; set init-from to the dense model the run starts from")
        if self.distill_from == "global" and self.mode != "masked":
            raise ValueError(f"run-config distill-from='global' needs mode='masked' (only masked nodes receive the "
                             f"round's full model); mode={self.mode!r}. Use distill-from='init' for true nodes")
        if self.distill_from == "global" and self.strategy != "twist":
            raise ValueError(f"run-config distill-from='global' distils subnets from the round's full model; strategy="
                             f"{self.strategy!r} trains the full model (allowed with strategy 'twist')")
        if not 0 <= self.server_momentum < 1:
            raise ValueError(f"run-config server-momentum={self.server_momentum!r} must be in [0, 1)")
        if self.strategy == "ddp" and self.server_optimizer != "avg":
            raise ValueError(f"run-config server-optimizer={self.server_optimizer!r} has no meaning for ddp (one "
                             "optimizer steps on the all-reduced gradients)")
        _choice("subnet-policy", self.subnet_policy, SUBNET_POLICIES)
        if self.strategy != "twist" and self.subnet_policy != "random":
            raise ValueError(f"run-config subnet-policy={self.subnet_policy!r} chooses subnets; strategy="
                             f"{self.strategy!r} trains the full model on every node (allowed with strategy 'twist')")
        if not (math.isfinite(self.self_distill_weight) and 0 <= self.self_distill_weight <= 1):
            raise ValueError(f"run-config self-distill-weight={self.self_distill_weight!r} must be in [0, 1]")
        if self.self_distill_weight and self.subnet_policy != "ordered":
            raise ValueError(f"run-config self-distill-weight={self.self_distill_weight!r} trains smaller nested "
                             f"prefixes (FjORD); it needs subnet-policy='ordered', not {self.subnet_policy!r}")
        if self.num_nodes and self.full_nodes >= self.num_nodes and self.strategy == "twist":
            raise ValueError(f"run-config full-nodes={self.full_nodes} would have every one of the num-nodes="
                             f"{self.num_nodes} nodes of a round train the full model (FedAvg, not TwIST); allowed: "
                             f"0..{self.num_nodes - 1}")
        if self.core_blocks < 0:
            raise ValueError(f"run-config core-blocks={self.core_blocks!r} must be >= 0")
        if self.core_blocks and (self.strategy != "twist" or self.subnet_policy != "random"):
            raise ValueError(f"run-config core-blocks={self.core_blocks!r} fixes the first blocks of TwIST's random "
                             f"subnets; it needs strategy='twist' and subnet-policy='random' (got strategy="
                             f"{self.strategy!r}, subnet-policy={self.subnet_policy!r})")
        _choice("recipe", self.recipe, tuple(RECIPES))
        if self.recipe == "finetune" and not self.init_from:
            raise ValueError("run-config recipe='finetune' makes a trained dense model prunable: set init-from (a "
                             "twist-fl run or model folder, or a Hugging Face GPT-2 folder)")
        if self.recipe == "scratch" and (self.strategy != "twist" or self.subnet_policy != "random"):
            raise ValueError("run-config recipe='scratch' draws TwIST's random subnets around a nested core; it needs "
                             f"strategy='twist' and subnet-policy='random' (got strategy={self.strategy!r}, "
                             f"subnet-policy={self.subnet_policy!r})")
        _choice("init-order", self.init_order, INIT_ORDERS)
        if self.init_order and not self.init_from:
            raise ValueError(f"run-config init-order={self.init_order!r} orders the blocks of a trained model by "
                             "importance; init-from is empty (a random init has no order to find): set init-from")
        if self.strategy != "twist" and (self.full_nodes or self.keep_choices.strip()):
            raise ValueError(f"run-config full-nodes and keep-choices choose subnet sizes; strategy={self.strategy!r} "
                             "trains the full model on every node (allowed with strategy 'twist')")
        if self.keep_choices.strip():
            if self.keep:
                raise ValueError(f"run-config keep={self.keep!r} and keep-choices={self.keep_choices!r} are both set; "
                                 "mixed keeps take the choices only (keep=0)")
            if self.keep_choices.strip() != "quarters" and (not self.keep_choice_list or
                                                             min(self.keep_choice_list) < 1):
                raise ValueError(f"run-config keep-choices={self.keep_choices!r} must list keeps >= 1, e.g. '2,4,6,8'")

    def as_trained(self, cfg: GPTConfig) -> RunConfig:
        """This config with `model` naming the architecture actually trained: an init-from model
        brings its own, so `model` then records the preset it matches (a warning line says so when
        that is not the one the config named). Under recipe='scratch', core-blocks left at 0 becomes
        half the model's blocks, as the run records it."""
        if self.recipe == "scratch" and not self.core_blocks:
            return self.replace(core_blocks=quarters_of(cfg.n_blocks, 2)).as_trained(cfg)
        name = preset_of(cfg) if self.init_from else None
        if name is None or name == self.model:
            return self
        import logging

        logging.getLogger(__name__).warning("init-from %s is a %r model (its own architecture); model=%r is not "
                                            "used, and the run records model=%r", self.init_from, name, self.model,
                                            name)
        return self.replace(model=name)

    def check_nodes(self, nodes: int) -> None:
        """Checks that need the number of nodes a round trains (`nodes` connected or simulated):
        min-nodes must be reachable, and full-nodes must leave some node a subnet."""
        if self.strategy == "ddp":
            return
        if nodes < 1:
            raise ValueError(f"{nodes} nodes would train nothing; allowed: 1 or more (and at least min-nodes="
                             f"{self.min_nodes})")
        if self.min_nodes > nodes:
            raise ValueError(f"run-config min-nodes={self.min_nodes} waits for more nodes than the {nodes} there are; "
                             f"allowed: 1..{nodes}")
        per_round = min(self.num_nodes or nodes, nodes)
        if self.strategy == "twist" and self.full_nodes >= per_round:
            raise ValueError(f"run-config full-nodes={self.full_nodes} would have every one of the {per_round} nodes "
                             f"of a round train the full model (FedAvg, not TwIST); allowed: 0..{per_round - 1}")

    def check_model(self, cfg: GPTConfig) -> None:
        """Checks that need the architecture: keep, eval-keeps, shared-layers, seq-len."""
        name = f"the model of init-from={self.init_from!r}" if self.init_from else f"model {self.model!r}"
        for k in self.choices_for(cfg):
            cfg.check_keep(k, "run-config keep-choices entry", name)
        cfg.check_keep(self.keep_for(cfg), "run-config keep", name)
        most = min(max(self.choices_for(cfg) or (self.keep_for(cfg),)), cfg.n_blocks - 1)
        if self.core_blocks > most:
            why = " (recipe='scratch' sets it to half the blocks)" if self.recipe == "scratch" else ""
            raise ValueError(f"run-config core-blocks={self.core_blocks}{why} must fit in the subnets: allowed "
                             f"0..{most} (at most the largest keep a node trains, and fewer than the "
                             f"{cfg.n_blocks} blocks of {name})")
        for k in self.eval_keeps_for(cfg):
            cfg.check_keep(k, "run-config eval-keeps entry", name)
        for i in self.shared_layer_list:
            if not -cfg.n_layer <= i < cfg.n_layer:
                raise ValueError(f"run-config shared-layers has {i}; the model has layers 0..{cfg.n_layer - 1}")
        if len({i % cfg.n_layer for i in self.shared_layer_list}) == cfg.n_layer:
            raise ValueError(f"run-config shared-layers={self.shared_layers!r} covers all {cfg.n_layer} layers of "
                             f"{name}, so no block could ever be pruned; leave at least one layer out")
        if self.seq_len > cfg.block_size:
            raise ValueError(f"run-config seq-len={self.seq_len} is longer than {name} can read: allowed "
                             f"1..{cfg.block_size} (its block_size, the positions it has)")


_PAIR = re.compile(r"""\s*([^\s=]+)=("(?:[^"\\]|\\.)*"|'[^']*'|[^\s"']*)(?=\s|$)""")


def app_defaults(app: Any) -> dict[str, Any]:
    """`[tool.flwr.app.config]` of the app folder's pyproject.toml, as `flwr run` reads it; {}
    when there is none (RunConfig's defaults are the same values)."""
    import tomllib
    from pathlib import Path

    pyproject = Path(app).expanduser() / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    with open(pyproject, "rb") as f:
        table = tomllib.load(f).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    return dict(table)


def parse_run_config(text: str, what: str = "--run-config") -> dict[str, Any]:
    """`key=value ...` as `flwr run --run-config` takes them: each value a TOML value (`lr=0.003`,
    `mode="true"`, `run-name="a b"`, `eval-keeps='2,4'`), else the bare text. A key given twice or
    with no value is refused, as `flwr run` refuses it. The one parser of --run-config texts."""
    import tomllib

    out: dict[str, Any] = {}
    pos, text = 0, text.strip()
    while pos < len(text):
        m = _PAIR.match(text, pos)
        if not m:
            rest = text[pos:].split()[0] if text[pos:].split() else text[pos:]
            raise ValueError(f"{what} entry {rest!r} is not key=value (quote a value that holds spaces: "
                             'key="a b")')
        key, value = m.group(1), m.group(2)
        if value == "":
            raise ValueError(f"{what} entry {key}= has no value")
        if key in out:
            raise ValueError(f"{what} gives {key!r} twice ({out[key]!r} and {value}); give each key once")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def _coerce(key: str, value: Any, typ: Any) -> Any:
    typ = {"int": int, "float": float, "str": str, "bool": bool}.get(typ, typ) if isinstance(typ, str) else typ
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"run-config {key}={value!r} must be true or false")
    if typ is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ValueError(f"run-config {key}={value!r} must be an integer")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"run-config {key}={value!r} must be a number")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"run-config {key}={value!r} must be a string")
    return value


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"run-config {key.replace('_', '-')}={value!r} is not allowed; allowed: {list(allowed)}")


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"run-config {key.replace('_', '-')}={value!r} must be >= 1")


def _int_list(key: str, text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"run-config {key}={text!r} must be a comma list of integers, e.g. '0,-1'") from None
