"""Configuration of a twist-fl GPT in Hugging Face transformers: a GPT-2 whose layers may each
keep a different number of attention heads and FFN hidden units (a pruned subnet), with the
activation scale TwIST applies to a layer that runs n of its N blocks. Only torch and
transformers are needed to load it."""

from transformers import PretrainedConfig


class TwistGPTConfig(PretrainedConfig):
    model_type = "twist_gpt"
    attribute_map = {"num_hidden_layers": "n_layer", "hidden_size": "n_embd", "max_position_embeddings": "n_positions"}

    def __init__(self, vocab_size=50257, n_positions=1024, n_embd=768, head_dim=64, n_heads=(12,) * 12,
                 ffn_widths=(3072,) * 12, attn_scales=(1.0,) * 12, mlp_scales=(1.0,) * 12,
                 layer_norm_epsilon=1e-5, bos_token_id=50256, eos_token_id=50256, use_cache=True, **kwargs):
        self.vocab_size = vocab_size
        self.n_positions = n_positions  # positions the model has (block_size)
        self.n_embd = n_embd
        self.head_dim = head_dim
        self.n_heads = list(n_heads)  # attention heads of each layer
        self.ffn_widths = list(ffn_widths)  # FFN hidden units of each layer
        self.attn_scales = list(attn_scales)  # (N/n)**alpha of each layer's attention output
        self.mlp_scales = list(mlp_scales)  # and of its FFN output
        self.n_layer = len(self.n_heads)
        self.layer_norm_epsilon = layer_norm_epsilon
        self.use_cache = use_cache
        if not (len(self.ffn_widths) == len(self.attn_scales) == len(self.mlp_scales) == self.n_layer):
            raise ValueError("n_heads, ffn_widths, attn_scales and mlp_scales need one entry per layer")
        kwargs.setdefault("tie_word_embeddings", False)  # the output layer reads wte itself
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
