"""A GGUF file's metadata as the Hugging Face config.json dict transformers' GGUF loader gives,
with llama3 rope scaling recovered from the `rope_freqs` tensor."""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from prunenet_jax.errors import UserError
from prunenet_jax.formats.gguf_file import Metadata, dequantize
from prunenet_jax.models import families, registry

ROPE_FREQS = "rope_freqs.weight"  # llama3-style rope scaling, stored as per-dimension factors


def gguf_hf_config(reader, path: str, tensors: Optional[dict] = None) -> dict[str, Any]:
    """The Hugging Face `config.json` dict described by the file's metadata.

    Field for field what `transformers.AutoConfig.from_pretrained(folder, gguf_file=name)` gives
    (transformers v5 layout, `rope_parameters`), with `architectures` added, float32 metadata
    values written as their shortest decimal (1e-05, not 9.999999747378752e-06), and llama3 rope
    scaling recovered from the `rope_freqs` tensor (transformers ignores that tensor).
    """
    tensors = {t.name: t for t in reader.tensors} if tensors is None else tensors
    meta = Metadata(reader, path)
    arch_name = meta.get("general.architecture")
    model_type = _model_type(arch_name, path)

    def arch(key, default=Metadata.REQUIRED):
        return meta.get(f"{arch_name}.{key}", default)

    hidden = meta.int(f"{arch_name}.embedding_length")
    heads = meta.int(f"{arch_name}.attention.head_count")
    if hidden < 1 or heads < 1:  # the config check would come too late: hidden // heads below
        raise UserError(f"{path}: {arch_name}.embedding_length={hidden} and "
                        f"{arch_name}.attention.head_count={heads} must be positive; the file's "
                        "metadata is corrupt: re-convert it with llama.cpp")
    kv_heads = meta.int(f"{arch_name}.attention.head_count_kv", heads)
    head_dim = meta.int(f"{arch_name}.attention.key_length", None)
    if head_dim is None and model_type == "llama":
        head_dim = meta.int(f"{arch_name}.rope.dimension_count", None)
    if head_dim is None:
        head_dim = hidden // heads
    vocab = meta.int(f"{arch_name}.vocab_size", None)
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if vocab is None and registry.GGUF_GLOBAL[registry.EMBED] in tensors:
        vocab = int(tensors[registry.GGUF_GLOBAL[registry.EMBED]].shape[-1])
    if vocab is None:
        raise UserError(f"{path}: the vocabulary size is not stated (no {arch_name}.vocab_size, "
                        "no tokenizer.ggml.tokens); re-convert the file with llama.cpp")
    theta = float(arch("rope.freq_base", 10000.0))

    cfg: dict[str, Any] = {
        "architectures": [families.family_of(model_type).hf_class],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta.int(f"{arch_name}.feed_forward_length"),
        "num_hidden_layers": meta.int(f"{arch_name}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": meta.int(f"{arch_name}.context_length", 2048),
        "rms_norm_eps": float(arch("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "tie_word_embeddings": registry.GGUF_GLOBAL[registry.LM_HEAD] not in tensors,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if model_type == "llama":
        cfg.update(head_dim=head_dim, attention_bias="blk.0.attn_q.bias" in tensors,
                   mlp_bias="blk.0.ffn_gate.bias" in tensors, pretraining_tp=1)
    elif model_type == "qwen2":
        cfg.update(use_sliding_window=False)
        if head_dim != hidden // heads:
            raise UserError(f"{path}: head size {head_dim} differs from hidden_size / heads, which "
                            "qwen2 models do not support; the file's metadata is inconsistent")
    for key in ("bos", "eos", "padding"):
        token = meta.int(f"tokenizer.ggml.{key}_token_id", None)
        if token is not None:
            cfg["pad_token_id" if key == "padding" else f"{key}_token_id"] = token

    scaling = arch("rope.scaling.type", None)
    if scaling not in (None, "none"):
        raise UserError(f"{path}: rope scaling {scaling!r} is not supported (supported: none, "
                        "llama3); use a model without it")
    if ROPE_FREQS in tensors:
        factors = dequantize(tensors[ROPE_FREQS], path).reshape(-1)
        llama3 = llama3_from_rope_factors(factors, theta, head_dim)
        if llama3 is None:
            raise UserError(f"{path}: the tensor {ROPE_FREQS!r} holds rope scaling factors that "
                            "match no llama3 rope scaling; this kind of rope scaling is not supported")
        if llama3:
            cfg["rope_parameters"] = {"rope_theta": theta, "rope_type": "llama3", **llama3}
    return cfg


def llama3_from_rope_factors(factors: np.ndarray, theta: float, head_dim: int) -> Optional[dict]:
    """llama3 rope-scaling parameters that reproduce llama.cpp's `rope_freqs` factors.

    The converter stores, per frequency, the divisor llama3 scaling applies (1 for high
    frequencies, `factor` for low ones, a smooth blend between). Parameters are not unique; we
    return a set that reproduces every factor. {} when no frequency is scaled, None when no
    llama3 parameters fit.
    """
    factors = np.asarray(factors, dtype=np.float64)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv_freq.shape:
        return None
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return {}
    factor = float(factors.max())
    candidates = [(1.0, 4.0, 8192.0)]  # what every Llama 3.x release uses
    # In the blend region 1/f = (1 - s)/factor + s with s = (orig / wavelen - low) / (high - low),
    # a line in 1/wavelen; fit it and fix low = 1.
    s = (1.0 / factors - 1.0 / factor) / (1.0 - 1.0 / factor)
    mid = (s > 1e-4) & (s < 1 - 1e-4)
    if mid.sum() >= 2:
        slope, intercept = np.polyfit(inv_freq[mid] / (2 * math.pi), s[mid], 1)
        if intercept < 0 and slope > 0:
            high = 1.0 - 1.0 / intercept
            candidates.insert(0, (1.0, high, slope * (high - 1.0)))
    for low, high, fitted in candidates:
        for orig in (int(round(fitted)), fitted):  # a context length is a whole number of tokens
            params = {"factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                      "original_max_position_embeddings": orig}
            if np.allclose(_llama3_factors(inv_freq, **params), factors, rtol=1e-5, atol=0):
                return params
    return None


def _llama3_factors(inv_freq, factor, low_freq_factor, high_freq_factor,
                    original_max_position_embeddings):
    """inv_freq / scaled inv_freq under llama3 scaling (transformers' and llama.cpp's formula)."""
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((original_max_position_embeddings / wavelen - low_freq_factor)
                     / (high_freq_factor - low_freq_factor), 0.0, 1.0)
    return 1.0 / ((1 - smooth) / factor + smooth)


def _model_type(arch_name: str, path: str) -> str:
    """Our model_type for a GGUF `general.architecture` (mistral models are written as llama)."""
    gguf_archs = {f.gguf_arch: f.name for f in families.FAMILIES if f.gguf_arch == f.name}
    if arch_name not in gguf_archs:
        others = [t for t in families.SUPPORTED if t not in gguf_archs.values()]
        raise UserError(f"{path}: GGUF architecture {arch_name!r} is not supported; supported GGUF "
                        f"architectures: {', '.join(sorted(gguf_archs))} (other model types, "
                        f"{', '.join(others)}, load from Hugging Face folders). Use a model of one "
                        "of these")
    return gguf_archs[arch_name]
