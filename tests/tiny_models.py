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
}


def make_hf_model(name: str, seed: int = 0, **overrides):
    """A random fp32 model whose every parameter (norms and biases too) is non-trivial."""
    model_type, extra = CONFIGS[name]
    cfg = transformers.AutoConfig.for_model(model_type, **{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.float().eval()


def save_hf_model(model, folder, **kwargs) -> str:
    model.save_pretrained(folder, **kwargs)
    return str(folder)
