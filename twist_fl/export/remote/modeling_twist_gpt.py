"""A twist-fl GPT (full, or a pruned dense subnet) as a transformers causal LM, with
`generate()` and its KV cache. Parameter names are twist-fl's own (`wte`, `h.{l}.attn.c_attn`,
...; Linear weights stored (out, in)); the output layer is tied to `wte`."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_twist_gpt import TwistGPTConfig


class Attention(nn.Module):
    def __init__(self, config: TwistGPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.head_dim = layer, config.n_heads[layer], config.head_dim
        width = self.n_heads * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * width)  # q, k, v of every head, fused along out
        self.c_proj = nn.Linear(width, config.n_embd)

    def forward(self, x, cache, mask):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.n_heads * self.head_dim, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        S = k.size(2)
        if mask is None and S == T:  # no cache, no padding: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif mask is None and T == 1:  # one new token attends to every cached position
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # new position i sees the cached ones and new ones up to i (and not the padding)
            if mask is None:
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: TwistGPTConfig, layer: int):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_widths[layer])
        self.c_proj = nn.Linear(config.ffn_widths[layer], config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's gelu_new


class Block(nn.Module):
    def __init__(self, config: TwistGPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, layer)
        self.attn_scale, self.mlp_scale = config.attn_scales[layer], config.mlp_scales[layer]

    def forward(self, x, cache, mask):
        x = x + self.attn(self.ln_1(x), cache, mask) * self.attn_scale
        return x + self.mlp(self.ln_2(x)) * self.mlp_scale


class TwistGPTPreTrainedModel(PreTrainedModel):
    config_class = TwistGPTConfig
    base_model_prefix = "twist_gpt"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class TwistGPTForCausalLM(TwistGPTPreTrainedModel, GenerationMixin):
    def __init__(self, config: TwistGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, labels=None,
                cache=None, **kwargs):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = cache if cache is not None else kwargs.get("past_key_values")  # its name before transformers 5
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        cache = cache if use_cache else None
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(f"sequence length {past + T} exceeds the model's {self.config.n_positions} positions")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).unsqueeze(0)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):  # padding: causal AND not padded
            S = past + T
            causal = torch.ones(T, S, dtype=torch.bool, device=input_ids.device).tril(past)
            mask = (causal.unsqueeze(0) & attention_mask[:, None, :S].bool()).unsqueeze(1)  # (B, 1, T, S)
            mask = mask | ~mask.any(-1, keepdim=True)  # a row with nothing to attend to (left padding) is inert
        x = self.wte(input_ids) + self.wpe(position_ids.clamp_min(0))
        for block in self.h:
            x = block(x, cache, mask)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

