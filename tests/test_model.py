import json

import pytest
import torch

from twist_fl.core.blocks import slice_state
from twist_fl.core.blueprint import Blueprint, sample_blueprints
from twist_fl.core.config import GPTConfig, preset
from twist_fl.core.model import GPT, layer_scale

CONFIGS = [
    GPTConfig(vocab_size=17, block_size=16, n_layer=3, n_head=4, n_embd=8, head_dim=3, n_ffn_blocks=4,
              ffn_block_size=5),
    GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=3, n_embd=6, head_dim=4, n_ffn_blocks=6,
              ffn_block_size=2, shared_layers=(), alpha=1.0, bias=False),
    GPTConfig(vocab_size=11, block_size=16, n_layer=4, n_head=6, n_embd=12, head_dim=2, n_ffn_blocks=3,
              ffn_block_size=4, shared_layers=(1,), alpha=0.0),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_subnet_equals_masked_full_model_in_logits_and_gradients(cfg, seed):
    torch.manual_seed(seed)
    full = GPT(cfg)
    keep = cfg.n_blocks - 1 or 1
    bp = sample_blueprints(cfg, 3, keep, seed=seed, round=seed, allow_partial=True)[seed % 3]
    sub = GPT(cfg, blueprint=bp)
    sub.load_state_dict(slice_state(full.state_dict(), cfg, bp))
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    tgt = torch.randint(0, cfg.vocab_size, (2, 9))

    lf, loss_f = full(idx, tgt, mask=bp)
    ls, loss_s = sub(idx, tgt)
    loss_f.backward()
    loss_s.backward()

    torch.testing.assert_close(ls, lf, atol=1e-5, rtol=1e-5)
    grads_full = slice_state({k: p.grad for k, p in full.named_parameters()}, cfg, bp)
    for k, p in sub.named_parameters():
        torch.testing.assert_close(p.grad, grads_full[k], atol=1e-5, rtol=1e-4)


def test_a_model_built_without_init_loads_into_the_same_model():
    cfg = CONFIGS[0]
    bp = sample_blueprints(cfg, 2, 2, seed=0, round=1)[0]
    torch.manual_seed(0)
    ref = GPT(cfg, blueprint=bp)
    bare = GPT(cfg, blueprint=bp, init=False)
    idx = torch.randint(0, cfg.vocab_size, (2, 9))

    bare.load_state_dict(ref.state_dict())

    assert [(k, v.shape) for k, v in bare.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    assert torch.equal(bare(idx)[0], ref(idx)[0])
    assert abs(ref.wte.weight.std().item() - 0.02) < 0.01  # init=True (the default) draws GPT-2's init


def test_dropped_blocks_get_zero_gradient_in_masked_forward():
    cfg = CONFIGS[0]
    model = GPT(cfg)
    bp = Blueprint(heads=((0, 1, 2, 3), (2,), (0, 1, 2, 3)), ffn=((0, 1, 2, 3), (1, 3), (0, 1, 2, 3)))

    _, loss = model(torch.randint(0, 17, (2, 5)), torch.randint(0, 17, (2, 5)), mask=bp)
    loss.backward()

    g = model.h[1].attn.c_attn.weight.grad
    assert torch.all(g[0:3] == 0) and torch.any(g[6:9] != 0)  # head 0's q rows vs head 2's q rows
    assert torch.all(model.h[1].mlp.c_fc.weight.grad[0:5] == 0)


def test_activation_scaling():
    cfg = CONFIGS[0]
    assert layer_scale(cfg, 4, 4) == 1.0
    assert layer_scale(cfg, 1, 4) == pytest.approx(2.0)  # (4/1)**0.5
    sub = GPT(cfg, blueprint=Blueprint(heads=((0,),) * 3, ffn=((0, 1),) * 3))
    assert sub.h[1].attn_scale == pytest.approx(2.0) and sub.h[1].mlp_scale == pytest.approx(2 ** 0.5)


def test_hf_import_gives_transformers_logits(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=31, n_positions=16, n_embd=12, n_layer=2, n_head=3,
                                    bos_token_id=30, eos_token_id=30)).eval()
    hf.save_pretrained(tmp_path / "hf")
    idx = torch.randint(0, 31, (2, 10))

    ours = GPT.from_hf(tmp_path / "hf").eval()
    from_obj = GPT.from_hf(hf).eval()

    with torch.no_grad():
        want = hf(idx).logits
        got, _ = ours(idx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert ours.cfg.n_ffn_blocks == 3 and ours.cfg.ffn_block_size == 16 and ours.cfg.head_dim == 4
    a, b = ours.state_dict(), from_obj.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_load_round_trip_full_and_subnet(tmp_path):
    cfg = CONFIGS[0]
    torch.manual_seed(0)
    full = GPT(cfg)
    bp = sample_blueprints(cfg, 2, 2, seed=0, round=0)[1]
    sub = GPT(cfg, blueprint=bp)
    sub.load_state_dict(slice_state(full.state_dict(), cfg, bp))
    idx = torch.randint(0, 17, (1, 7))

    full.save(tmp_path / "full")
    sub.save(tmp_path / "sub")
    full2, sub2 = GPT.load(tmp_path / "full"), GPT.load(tmp_path / "sub")

    assert sub2.blueprint == bp and full2.blueprint is None
    assert json.loads((tmp_path / "sub" / "config.json").read_text())["blueprint"]["heads"][1] == list(bp.heads[1])
    torch.testing.assert_close(sub2(idx)[0], full(idx, mask=bp)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full2(idx)[0], full(idx)[0])
    size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("sub", "full")}
    assert size["sub"] < size["full"]


def test_load_refuses_a_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="not a twist-fl model directory"):
        GPT.load(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="format None"):
        GPT.load(tmp_path)


def test_load_state_with_wrong_keys_names_them():
    from twist_fl.core.model import load_state_strict

    model = GPT(CONFIGS[0])
    sd = model.state_dict()
    sd.pop("ln_f.weight")
    with pytest.raises(ValueError, match=r"missing keys \['ln_f.weight'\]"):
        load_state_strict(model, sd)


def test_generate_greedy_is_deterministic():
    torch.manual_seed(0)
    model = GPT(CONFIGS[0]).eval()
    idx = torch.tensor([[1, 2, 3]])

    a, b = model.generate(idx, 5, temperature=0), model.generate(idx, 5, temperature=0)

    assert a.shape == (1, 8) and torch.equal(a, b)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_kv_cache_decoding_matches_recomputing_the_whole_sequence(cfg):
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        reference, _ = model(idx)
        cache = model.new_cache()
        prompt, _ = model(idx[:, :5], cache=cache)
        steps = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 12)]

    assert torch.allclose(torch.cat([prompt, *steps], dim=1), reference, atol=1e-5)
    assert cache[0]["len"] == 12


def test_kv_cache_refuses_a_second_prompt_and_overflow():
    cfg = CONFIGS[0]
    model = GPT(cfg).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="one token at a time"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
        for _ in range(6):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="sequence length 17 exceeds the model's block_size 16"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_generate_with_and_without_cache_agree_past_the_context():
    torch.manual_seed(0)
    model = GPT(CONFIGS[1]).eval()
    idx = torch.tensor([[1, 2, 3]])

    with_cache = model.generate(idx, 20, temperature=0)  # past block_size 16: the cache restarts
    without = model.generate(idx, 20, temperature=0, use_cache=False)

    assert with_cache.shape == (1, 23) and torch.equal(with_cache, without)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_head=0), "n_head must be a positive integer"),
    (dict(shared_layers=(5,)), "outside the model's 3 layers"),
    (dict(alpha=float("nan")), "alpha"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**CONFIGS[0].to_dict(), **kwargs})


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match=r"unknown model preset 'gpt5'; allowed: \["):
        preset("gpt5")


def test_gpt2_preset_has_124m_parameters():
    with torch.device("meta"):
        model = GPT(preset("gpt2", vocab_size=50257))
    assert model.num_params() == 124439808
