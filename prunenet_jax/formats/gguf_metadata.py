"""The model metadata of a GGUF export: llama.cpp's `<arch>.*` keys for a `ModelConfig`, and the
small tensors some architectures keep their rope in (llama3's `rope_freqs`, Phi-3's longrope
factors).

Per architecture it writes what llama.cpp's converter (convert_hf_to_gguf.py) writes for that
model, with the pruned `feed_forward_length`, so that llama.cpp and our own reader
(gguf_config.py) rebuild the same model. Whatever a file of the architecture cannot say (Phi's
q/k LayerNorms, Falcon's biases, a Gemma query scale other than llama.cpp's rule, rope types
llama.cpp's architecture does not take) is refused here by name; gguf_export.py then reads the
written metadata back and compares the model it describes with the source, field by field, so
anything else that would not survive the trip is refused too.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from prunenet_jax.errors import UserError
from prunenet_jax.formats.gguf_config import (GEMMA3_WINDOW_PERIOD, ROPE_FACTORS, ROPE_FREQS,
                                              llama3_rope_factors)
from prunenet_jax.models import families
from prunenet_jax.models.config import ModelConfig


def gguf_arch(cfg: ModelConfig, source: str) -> str:
    """llama.cpp's architecture of the model, or a UserError naming the family that has none."""
    arch = families.family_of(cfg.model_type).gguf_arch
    if not arch:
        have = sorted({f.gguf_arch for f in families.FAMILIES if f.gguf_arch})
        raise UserError(f"{source}: model_type {cfg.model_type!r} has no llama.cpp architecture, so "
                        f"it cannot be written as GGUF (GGUF architectures: {', '.join(have)}); "
                        "export it as a Hugging Face folder (--export_hf) instead")
    return arch


def add_arch_metadata(writer, cfg: ModelConfig, source: str) -> dict[str, np.ndarray]:
    """Adds the architecture keys of `cfg` to a gguf.GGUFWriter; returns the rope tensors the
    file must also hold ({llama.cpp name: float32 array})."""
    arch = check_writable(cfg, source)
    w = writer
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.norm == "layer":
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size or arch in _STATES_HEAD_SIZE:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    return _ARCH_KEYS[arch](w, cfg, source)


# Architectures whose converter always writes the head size (TextModel with config.head_dim).
_STATES_HEAD_SIZE = ("qwen3", "gemma2", "gemma3")


def check_writable(cfg: ModelConfig, source: str) -> str:
    """The model's llama.cpp architecture; a UserError for what its files cannot hold."""
    arch = gguf_arch(cfg, source)
    _refuse_unwritable(cfg, arch, source)
    return arch


def _refuse_unwritable(cfg: ModelConfig, arch: str, source: str) -> None:
    def refuse(what: str):
        raise UserError(f"{source}: {what}, which a GGUF file of llama.cpp's {arch!r} architecture "
                        "cannot hold; export it as a Hugging Face folder (--export_hf) instead")

    if cfg.intermediate_sizes is not None:
        refuse("layers of different FFN widths")
    if arch == "phi2" and cfg.qk_norm:
        refuse("q/k LayerNorms (qk_layernorm)")
    if arch == "falcon" and (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias):
        refuse("Falcon biases (bias: true; llama.cpp's Falcon has none)")
    if arch == "falcon" and not cfg.parallel:
        refuse("a sequential Falcon (parallel_attn: false; llama.cpp's Falcon is parallel only)")
    if arch == "gemma3" and cfg.windowed() is not None and cfg.windowed() != _gemma3_pattern(cfg):
        refuse(f"a layer pattern other than Gemma 3's (every {GEMMA3_WINDOW_PERIOD}th layer global)")
    if arch in ("gemma2", "gemma3"):
        scalar = _gemma_query_scalar(cfg, arch)
        if not math.isclose(cfg.attn_scale, scalar ** -0.5, rel_tol=1e-6):
            refuse(f"a query scale 1/sqrt({cfg.attn_scale ** -2:g}) other than llama.cpp's "
                   f"1/sqrt({scalar}) (query_pre_attn_scalar)")


def _gemma3_pattern(cfg: ModelConfig) -> tuple:
    return tuple(i % GEMMA3_WINDOW_PERIOD < GEMMA3_WINDOW_PERIOD - 1
                 for i in range(cfg.num_hidden_layers))


def _gemma_query_scalar(cfg: ModelConfig, arch: str) -> int:
    """llama.cpp's query_pre_attn_scalar: hidden / heads for the 27B models (by layer count),
    else the head size (gguf_config._gemma_common reads it the same way)."""
    big = {"gemma2": 46, "gemma3": 62}[arch]
    if cfg.num_hidden_layers == big:
        return cfg.hidden_size // cfg.num_attention_heads
    return cfg.head_dim


# ----------------------------------------------------------------------------- rope

def _rope_base(w, cfg: ModelConfig) -> None:
    w.add_rope_freq_base(cfg.rope.theta)


def _scaled_rope(w, cfg: ModelConfig, arch: str, source: str) -> None:
    """rope.freq_base and rope.scaling.* (none, linear, yarn), as TextModel writes them."""
    rope = cfg.rope
    _rope_base(w, cfg)
    if rope.rope_type == "default":
        return
    import gguf

    if rope.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope.param("factor"))
        return
    if rope.rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope.param("factor"))
        w.add_rope_scaling_orig_ctx_len(rope.param("original_max_position_embeddings"))
        w.add_rope_scaling_yarn_attn_factor(rope.param("attention_factor"))
        w.add_rope_scaling_yarn_beta_fast(rope.param("beta_fast"))
        w.add_rope_scaling_yarn_beta_slow(rope.param("beta_slow"))
        return
    _refuse_rope(cfg, arch, source, "none, linear, yarn")


def _refuse_rope(cfg: ModelConfig, arch: str, source: str, supported: str):
    raise UserError(f"{source}: rope type {cfg.rope.rope_type!r} cannot be written in a GGUF file "
                    f"of llama.cpp's {arch!r} architecture (supported there: {supported}); export "
                    "it as a Hugging Face folder (--export_hf) instead")


def _plain_rope(w, cfg: ModelConfig, arch: str, source: str) -> None:
    if cfg.rope.rope_type != "default":
        _refuse_rope(cfg, arch, source, "none")
    _rope_base(w, cfg)


# ----------------------------------------------------------------------------- per architecture

def _llama(w, cfg: ModelConfig, source: str) -> dict:
    """LlamaModel: rope.dimension_count = head size; llama3 scaling as the rope_freqs tensor."""
    w.add_rope_dimension_count(cfg.head_dim)
    _rope_base(w, cfg)
    rope = cfg.rope
    if rope.rope_type == "default":
        return {}
    if rope.rope_type != "llama3":
        _refuse_rope(cfg, "llama", source, "none, llama3")
    params = {k: rope.param(k) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                          "original_max_position_embeddings")}
    return {ROPE_FREQS: llama3_rope_factors(rope.theta, rope.dim, params)}


def _qwen2(w, cfg: ModelConfig, source: str) -> dict:
    if cfg.rope.rope_type != "default":
        _refuse_rope(cfg, "qwen2", source, "none")
    _rope_base(w, cfg)
    return {}


def _qwen3(w, cfg: ModelConfig, source: str) -> dict:
    _scaled_rope(w, cfg, "qwen3", source)
    return {}


def _phi3(w, cfg: ModelConfig, source: str) -> dict:
    """Phi3MiniModel: partial rotary as rope.dimension_count, the window (0: none), longrope as
    two factor tensors with the original context and the attention factor."""
    rope = cfg.rope
    w.add_rope_dimension_count(rope.dim)
    _rope_base(w, cfg)
    w.add_sliding_window(cfg.sliding_window or 0)
    if rope.rope_type == "default":
        return {}
    if rope.rope_type != "longrope":
        _refuse_rope(cfg, "phi3", source, "none, longrope")
    w.add_rope_scaling_orig_ctx_len(rope.param("original_max_position_embeddings"))
    w.add_rope_scaling_attn_factors(rope.param("attention_factor"))
    return {name: np.asarray(rope.param(key), np.float32) for key, name in ROPE_FACTORS.items()}


def _phi2(w, cfg: ModelConfig, source: str) -> dict:
    w.add_rope_dimension_count(cfg.rope.dim)
    _plain_rope(w, cfg, "phi2", source)
    return {}


def _falcon(w, cfg: ModelConfig, source: str) -> dict:
    """FalconModel: attn_qkv rows [q | k | v] ("jploski"); llama.cpp's Falcon is parallel."""
    w.add_tensor_data_layout("jploski")
    _plain_rope(w, cfg, "falcon", source)
    return {}


def _gptneox(w, cfg: ModelConfig, source: str) -> dict:
    w.add_rope_dimension_count(cfg.rope.dim)
    w.add_parallel_residual(cfg.parallel)
    _plain_rope(w, cfg, "gptneox", source)
    return {}


def _gemma2(w, cfg: ModelConfig, source: str) -> dict:
    """Gemma2Model: softcaps and the window; every other layer windowed (llama.cpp's fixed
    pattern, which the config reader imposes too)."""
    _plain_rope(w, cfg, "gemma2", source)
    w.add_attn_logit_softcapping(cfg.attn_softcap or 0.0)
    w.add_final_logit_softcapping(cfg.logit_softcap or 0.0)
    w.add_sliding_window(cfg.sliding_window or 0)
    return {}


def _gemma3(w, cfg: ModelConfig, source: str) -> dict:
    """Gemma3Model: the global rope (scaled or not), the local base, the window, the final
    softcap where there is one."""
    _scaled_rope(w, cfg, "gemma3", source)
    local = cfg.rope_local
    if local is not None:
        if local.rope_type != "default":
            raise UserError(f"{source}: a scaled rope on the windowed layers ({local.rope_type!r}) "
                            "cannot be written in a gemma3 GGUF file; export it as a Hugging Face "
                            "folder (--export_hf) instead")
        w.add_rope_freq_base_swa(local.theta)
    if cfg.logit_softcap:
        w.add_final_logit_softcapping(cfg.logit_softcap)
    if cfg.sliding_window is not None and cfg.windowed() is not None and any(cfg.windowed()):
        w.add_sliding_window(cfg.sliding_window)
    return {}


_ARCH_KEYS: dict[str, Callable] = {
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "phi3": _phi3, "phi2": _phi2,
    "falcon": _falcon, "gptneox": _gptneox, "gemma2": _gemma2, "gemma3": _gemma3}
