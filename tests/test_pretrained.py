"""The scale-up path on local files: a pretrained (Hugging Face) GPT-2 and WikiText raw files."""

import numpy as np
import pytest
import torch

from twist_fl.core.model import GPT

from .helpers import checkpoint_weights, run_local
from .test_data import write_wikitext


@pytest.fixture()
def hf_dir(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=16, n_layer=3, n_head=4,
                                    bos_token_id=50256, eos_token_id=50256))
    hf.save_pretrained(tmp_path / "gpt2-local")
    return tmp_path / "gpt2-local"


def test_training_from_a_local_pretrained_gpt2_on_local_wikitext(tmp_path, hf_dir):
    write_wikitext(tmp_path / "wt")

    summary, grid, run_dir = run_local(tmp_path, "pre", num_nodes=2, num_server_rounds=1, init_from=str(hf_dir),
                                       tokenizer="gpt2", dataset="wikitext-103", data_path=str(tmp_path / "wt"),
                                       seq_len=16, keep=2, eval_keeps="2")

    start = GPT.from_hf(hf_dir)
    msg = next(m for m in grid.sent if m.metadata.message_type == "train")
    sent_wte = msg.content["arrays"]["wte.weight"].numpy()
    assert np.array_equal(sent_wte, start.wte.weight.detach().numpy())  # round 1 starts from the HF weights
    assert summary["rounds"] == 1 and summary["rejected_replies"] == 0
    assert not np.array_equal(checkpoint_weights(run_dir, 1)["wte.weight"], sent_wte)
    assert GPT.load(run_dir / "model").cfg.n_embd == 16


def test_tokenizer_that_does_not_fit_the_pretrained_model_is_refused(tmp_path, hf_dir):
    with pytest.raises(ValueError, match="tokenizer='bytes' has 257 tokens but the model"):
        run_local(tmp_path, "bad", num_nodes=2, init_from=str(hf_dir), seq_len=16, keep=2, eval_keeps="2")
