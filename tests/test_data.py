import numpy as np
import pytest

from twist_fl.core import data
from twist_fl.core.data import (
    ByteTokenizer,
    TokenSplit,
    check_split,
    eval_windows,
    get_tokenizer,
    load_tokens,
    partition,
    random_batches,
    unigram_perplexity,
)


def test_gpt2_tokenizer_is_exact_offline():
    tok = get_tokenizer("gpt2")

    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.decode(tok.encode("Wherefore art thou, Romeo?\n\tÅngström")) == "Wherefore art thou, Romeo?\n\tÅngström"


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "O, é — ✓"

    ids = tok.encode(text)

    assert max(ids) < 256 and tok.decode(ids + [tok.eot_id]) == text


def test_embedded_corpus_is_split_by_play_and_cached(monkeypatch):
    first = load_tokens("shakespeare", "bytes")
    calls = []
    monkeypatch.setattr(data, "_tokenize", lambda *a: calls.append(a))

    second = load_tokens("shakespeare", "bytes")

    assert calls == []  # served from the on-disk cache
    assert len(first["train"].doc_starts) == 34 and len(first["valid"].doc_starts) == 2
    assert len(first["test"].doc_starts) == 2
    assert np.array_equal(first["valid"].tokens, second["valid"].tokens)
    assert 4_000_000 < len(first["train"]) < 5_000_000
    assert first["train"].tokens[first["train"].doc_starts[1] - 1] == 256  # end-of-text between plays


def write_wikitext(d):
    d.mkdir()
    art = " = {t} = \n \n {t} is a page about {t} . It has words , and more words .\n \n = = Section = = \n Text .\n"
    for split, titles in {"train": "ABCDEF", "valid": "GH", "test": "IJ"}.items():
        (d / f"wiki.{split}.raw").write_text("".join(art.format(t=f"Article{c}") for c in titles))


def test_wikitext_from_local_raw_files_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_wikitext(tmp_path / "wt")

    corpus = data.load_corpus("wikitext-103", str(tmp_path / "wt"))
    toks = load_tokens("wikitext-103", "gpt2", str(tmp_path / "wt"))

    assert len(corpus["train"]) == 6 and corpus["train"][1].startswith(" = ArticleB = ")
    assert "= = Section = =" in corpus["train"][0]  # sub-headings stay inside their article
    assert len(toks["valid"].doc_starts) == 2 and toks["train"].tokens.max() <= 50256


def test_text_files_by_paragraph(tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    for split in ("train", "valid", "test"):
        (d / f"{split}.txt").write_text(f"First {split} paragraph.\n\nSecond {split} paragraph.\n")

    corpus = data.load_corpus("text", str(d))

    assert [len(corpus[s]) for s in ("train", "valid", "test")] == [2, 2, 2]


@pytest.mark.parametrize("dataset,path,match", [
    ("imagenet", None, r"unknown dataset 'imagenet'; allowed: \['shakespeare'"),
    ("text", None, "needs data_path"),
    ("text", "/nonexistent/dir", "is not a readable folder"),
])
def test_bad_dataset_is_refused(dataset, path, match):
    with pytest.raises(ValueError, match=match):
        load_tokens(dataset, "bytes", path)


def test_missing_split_file_is_named(tmp_path):
    (tmp_path / "train.txt").write_text("x")
    with pytest.raises(ValueError, match=r"has no valid file; expected one of \['valid.txt', 'validation.txt'\]"):
        data.load_corpus("text", str(tmp_path))


def test_unknown_tokenizer_is_refused():
    with pytest.raises(ValueError, match=r"unknown tokenizer 'gpt4'; allowed: \['bytes', 'gpt2'\]"):
        get_tokenizer("gpt4")


def test_too_short_corpus_for_sequence_length():
    split = TokenSplit(np.arange(50), np.array([0]))
    with pytest.raises(ValueError, match="has 50 tokens, too few for seq_len=64"):
        check_split(split, 64, "valid")


def test_iid_partitions_are_disjoint_and_cover_the_windows():
    split = TokenSplit(np.arange(1000), np.array([0, 500]))

    parts = [partition(split, 3, i, "iid", seq_len=9, seed=0) for i in range(3)]

    allv = np.concatenate(parts)
    assert len(allv) == 1000 and len(set(allv.tolist())) == 1000
    assert all(len(p) in (330, 340) for p in parts)


def test_document_partitions_deal_whole_documents():
    split = TokenSplit(np.arange(100), np.array([0, 10, 40, 45, 90]))  # sizes 10, 30, 5, 45, 10

    parts = [partition(split, 2, i, "document") for i in range(2)]

    assert sorted(len(p) for p in parts) == [50, 50]  # 45+5 | 30+10+10
    assert set(parts[0].tolist()).isdisjoint(parts[1].tolist())
    with pytest.raises(ValueError, match="5 documents cannot fill 6 partitions"):
        partition(split, 6, 0, "document")


def test_batches_are_shifted_windows_and_eval_windows_do_not_overlap_targets():
    tokens = np.arange(100)
    x, y = next(random_batches(tokens, 4, 8, np.random.default_rng(0)))
    w = eval_windows(tokens, 10)

    assert x.shape == (4, 8) and np.array_equal(y, x + 1)
    assert w.shape == (9, 11) and np.array_equal(w[1, :2], [10, 11])


def test_unigram_perplexity_by_hand():
    # train counts (+1 smoothing over 2 ids): id0 -> 3, id1 -> 1 ; p = 3/4, 1/4
    assert unigram_perplexity(np.array([0, 0]), np.array([0, 1]), 2) == pytest.approx((4 / 3 * 4) ** 0.5)
