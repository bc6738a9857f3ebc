"""Tiny random transformers (PyTorch) checkpoints saved to folders, for tests."""
import torch
import transformers

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)

CONFIGS = {
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_gqa_untied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama3_rope_bias": ("llama", dict(
        num_key_value_heads=2, attention_bias=True, mlp_bias=True, head_dim=16,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        rope_theta=500000.0)),
    "qwen2": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=4096)),
    # The non-LLaMA families (plain MLPs, LayerNorms with biases, partial rotary, fused qkv):
    # positions up to 512, so sequences of several hundred tokens fit.
    "opt": ("opt", dict(max_position_embeddings=512, activation_function="relu",
                        enable_bias=True, do_layer_norm_before=True, tie_word_embeddings=True)),
    "opt_350m_postln": ("opt", dict(  # post-LN; embeddings of 16 projected in and out
        max_position_embeddings=512, do_layer_norm_before=False, word_embed_proj_dim=16,
        intermediate_size=64)),
    "phi2": ("phi", dict(  # head_dim 16: int(16 * 0.4) = 6 rotary dims
        max_position_embeddings=512, num_attention_heads=2, num_key_value_heads=2,
        hidden_act="gelu_new", tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.4})),
    "phi_qk_ln": ("phi", dict(max_position_embeddings=512, qk_layernorm=True, num_key_value_heads=2,
                              num_hidden_layers=2)),
    "falcon_7b": ("falcon", dict(  # multi-query, parallel attention + MLP off one norm
        max_position_embeddings=512, multi_query=True, parallel_attn=True,
        new_decoder_architecture=False, bias=False, alibi=False, intermediate_size=64)),
    "falcon_new": ("falcon", dict(  # grouped kv heads, ln_attn + ln_mlp
        max_position_embeddings=512, new_decoder_architecture=True, num_kv_heads=2,
        parallel_attn=True, bias=False, alibi=False, intermediate_size=64,
        tie_word_embeddings=False)),
    "falcon_seq_bias": ("falcon", dict(  # fused qkv in (heads, 3) layout, sequential, biases
        max_position_embeddings=512, parallel_attn=False, multi_query=False,
        new_decoder_architecture=False, bias=True, alibi=False, num_hidden_layers=2)),
    "neox_parallel": ("gpt_neox", dict(
        max_position_embeddings=512, use_parallel_residual=True, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.25})),
    "neox_seq": ("gpt_neox", dict(
        max_position_embeddings=512, use_parallel_residual=False, attention_bias=True,
        tie_word_embeddings=False, num_hidden_layers=2,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0,
                         "partial_rotary_factor": 0.5})),
    "qwen3_windowed": ("qwen3", dict(  # q/k RMSNorms; layers 1.. windowed, rows of 300 > 64
        max_position_embeddings=512, num_key_value_heads=2, head_dim=16, use_sliding_window=True,
        sliding_window=64, max_window_layers=1, bos_token_id=1, eos_token_id=2)),
    "phi3_longrope": ("phi3", dict(  # fused qkv and gate_up, partial longrope, a window
        max_position_embeddings=512, num_key_value_heads=2, original_max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=100,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5, "short_factor": [1.0, 1.1],
                         "long_factor": [2.0, 3.0]})),
    "gemma2": ("gemma2", dict(  # softcaps, sandwich norms, alternating windows of 64
        max_position_embeddings=512, num_key_value_heads=2, head_dim=16, sliding_window=64,
        query_pre_attn_scalar=12)),
    "gemma3": ("gemma3_text", dict(  # q/k norms; windowed layers with their own rope base
        max_position_embeddings=512, num_key_value_heads=2, head_dim=16, sliding_window=64,
        query_pre_attn_scalar=12, final_logit_softcapping=20.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
}

# transformers' name of the FFN width, per model_type (BASE and overrides say intermediate_size).
WIDTH_KEY = {"opt": "ffn_dim", "falcon": "ffn_hidden_size"}
# transformers' name of the kv head count (None: the family has all heads; BASE's is dropped).
KV_HEADS_KEY = {"opt": None, "gpt_neox": None, "falcon": "num_kv_heads"}


def width_key(model_type: str) -> str:
    """The config.json key of the FFN width of this model_type."""
    return WIDTH_KEY.get(model_type, "intermediate_size")


def config_kwargs(name: str, **overrides) -> tuple[str, dict]:
    """(model_type, the AutoConfig.for_model keyword arguments) of a CONFIGS entry: BASE, the
    entry, then `overrides`; `intermediate_size` and `num_key_value_heads` renamed (or dropped)
    to what the family's config takes."""
    model_type, extra = CONFIGS[name]
    kwargs = {**BASE, **extra, **overrides}
    width = width_key(model_type)
    if width != "intermediate_size":
        value = kwargs.pop("intermediate_size")
        if width not in kwargs or "intermediate_size" in overrides:
            kwargs[width] = value
    kv = KV_HEADS_KEY.get(model_type, "num_key_value_heads")
    if kv != "num_key_value_heads":  # BASE's count is dropped; the entry's or overrides' renamed
        value = kwargs.pop("num_key_value_heads")
        if kv is not None and "num_key_value_heads" in {**extra, **overrides}:
            kwargs[kv] = value
    return model_type, kwargs


def _norm_parameters(model) -> set:
    """Names of the parameters of normalisation layers (LayerNorm, RMSNorm, ...)."""
    names = set()
    for mname, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm) or "Norm" in type(module).__name__:
            names.update(f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False))
    return names


def make_hf_model(name: str, seed: int = 0, **overrides):
    """A random fp32 model whose every parameter (norms and biases too) is non-trivial."""
    model_type, kwargs = config_kwargs(name, **overrides)
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    norms = _norm_parameters(model)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname in norms and not pname.endswith(".bias"):  # a norm's scale: around 1
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.float().eval()


def save_hf_model(model, folder, **kwargs) -> str:
    model.save_pretrained(folder, **kwargs)
    return str(folder)
