"""A GGUF file's metadata as the Hugging Face config.json dict of its model, per llama.cpp
architecture: `llama`/`qwen2` as transformers' GGUF loader gives it (llama3 rope scaling recovered
from the `rope_freqs` tensor), `phi2`, `falcon`, `gptneox`, `qwen3`, `phi3`, `gemma2` and `gemma3`
as llama.cpp's converter (convert_hf_to_gguf.py, now its conversion/ package) writes them (its
Phi2Model, FalconModel, GPTNeoXModel, Qwen3Model, Phi3MiniModel, Gemma2Model and Gemma3Model).

What those files cannot say is taken from what llama.cpp itself assumes for the architecture, or
read off which tensors exist, or refused: biases from the bias tensors, tied heads from a missing
`output.weight`, Falcon's variant from `attn_norm_2` and the kv head count; the activation is the
family's (Phi-2 gelu_new, Falcon and GPT-NeoX exact gelu: the models' own, where llama.cpp runs
its tanh approximation for all three); rope theta is 10000 unless `rope.freq_base` says otherwise
(llama.cpp's default; the converter writes none for these three). The converter writes Falcon's
context length as 2048 and Phi-2's and Falcon's FFN width as 4 * hidden size: a model whose FFN
is narrower gives a file llama.cpp cannot load either, refused here on the `ffn_up` shape.

The newer four (docs/models.md says what each file cannot carry): Qwen3's head size is
`attention.key_length` or attn_q's rows / heads, and its files hold no sliding window (llama.cpp's
qwen3 has none). Phi-3's longrope is the `rope_factors_long`/`rope_factors_short` tensors with
`rope.scaling.original_context_length` and `rope.scaling.attn_factor`, its partial rotary the
`rope.dimension_count`, its window `attention.sliding_window` (0: none). Gemma's files hold no
`query_pre_attn_scalar`: llama.cpp derives it from the model size (hidden / heads for the 27B
models, identified by their layer count, else the head size) and so do we; Gemma 2's rope theta,
layer pattern (every other layer windowed) and, when absent, its softcaps (50, 30) and window
(4096) are llama.cpp's defaults; Gemma 3's layer pattern (every 6th layer full attention) and
local rope base (10000, unless `rope.freq_base_swa` states one) are Gemma 3's published values,
which llama.cpp hard-codes too; no `attention.sliding_window` means every layer is global.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import numpy as np

from prunenet_jax.errors import UserError
from prunenet_jax.formats.gguf_file import Metadata, dequantize
from prunenet_jax.models import families, registry

ROPE_FREQS = "rope_freqs.weight"  # llama3-style rope scaling, stored as per-dimension factors


@dataclasses.dataclass(frozen=True)
class _File:
    """The metadata under the file's architecture prefix, and which tensors the file holds."""
    meta: Metadata
    arch: str
    path: str
    tensors: dict

    def get(self, key: str, default: Any = Metadata.REQUIRED) -> Any:
        return self.meta.get(f"{self.arch}.{key}", default)

    def int(self, key: str, default: Any = Metadata.REQUIRED) -> Any:
        return self.meta.int(f"{self.arch}.{key}", default)

    def has(self, layer_tensor: str) -> bool:
        """Whether layer 0 holds `layer_tensor` (llama.cpp suffix)."""
        return f"blk.0.{layer_tensor}" in self.tensors

    def refuse(self, what: str):
        raise UserError(f"{self.path}: {what}")


def gguf_hf_config(reader, path: str, tensors: Optional[dict] = None) -> dict[str, Any]:
    """The Hugging Face `config.json` dict described by the file's metadata (transformers v5
    layout, `rope_parameters`), with `architectures` added and float32 metadata values written as
    their shortest decimal (1e-05, not 9.999999747378752e-06). For llama/qwen2 files, field for
    field what `transformers.AutoConfig.from_pretrained(folder, gguf_file=name)` gives, plus llama3
    rope scaling recovered from the `rope_freqs` tensor (transformers ignores that tensor)."""
    tensors = {t.name: t for t in reader.tensors} if tensors is None else tensors
    meta = Metadata(reader, path)
    f = _File(meta, meta.get("general.architecture"), path, tensors)
    model_type = _model_type(f.arch, path)
    hidden, heads = f.int("embedding_length"), f.int("attention.head_count")
    if hidden < 1 or heads < 1:  # the config check would come too late: hidden // heads below
        f.refuse(f"{f.arch}.embedding_length={hidden} and {f.arch}.attention.head_count={heads} "
                 "must be positive; the file's metadata is corrupt: re-convert it with llama.cpp")
    cfg: dict[str, Any] = {
        "architectures": [families.family_of(model_type).hf_class],
        "model_type": model_type,
        "vocab_size": _vocab_size(f, reader),
        "hidden_size": hidden,
        "num_hidden_layers": f.int("block_count"),
        "num_attention_heads": heads,
        "max_position_embeddings": f.int("context_length", 2048),
        "tie_word_embeddings": registry.GGUF_GLOBAL[registry.LM_HEAD] not in tensors,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    cfg.update(_ARCHS[model_type](f, hidden, heads))
    for key in ("bos", "eos", "padding"):
        token = meta.int(f"tokenizer.ggml.{key}_token_id", None)
        if token is not None:
            cfg["pad_token_id" if key == "padding" else f"{key}_token_id"] = token
    return cfg


def _vocab_size(f: _File, reader) -> int:
    vocab = f.int("vocab_size", None)
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if vocab is None and registry.GGUF_GLOBAL[registry.EMBED] in f.tensors:
        vocab = int(f.tensors[registry.GGUF_GLOBAL[registry.EMBED]].shape[-1])
    if vocab is None:
        f.refuse(f"the vocabulary size is not stated (no {f.arch}.vocab_size, no "
                 "tokenizer.ggml.tokens); re-convert the file with llama.cpp")
    return vocab


# ----------------------------------------------------------------------------- llama, qwen2

def _llama(f: _File, hidden: int, heads: int) -> dict:
    head_dim = f.int("attention.key_length", None)
    if head_dim is None:
        head_dim = f.int("rope.dimension_count", None)
    if head_dim is None:
        head_dim = hidden // heads
    return {**_llama_common(f, heads, head_dim), "head_dim": head_dim,
            "attention_bias": f.has("attn_q.bias"), "mlp_bias": f.has("ffn_gate.bias"),
            "pretraining_tp": 1}


def _qwen2(f: _File, hidden: int, heads: int) -> dict:
    head_dim = f.int("attention.key_length", None)
    if head_dim is None:
        head_dim = hidden // heads
    if head_dim != hidden // heads:
        f.refuse(f"head size {head_dim} differs from hidden_size / heads, which qwen2 models do "
                 "not support; the file's metadata is inconsistent")
    return {**_llama_common(f, heads, head_dim), "use_sliding_window": False}


def _llama_common(f: _File, heads: int, head_dim: int, rope: Optional[dict] = None) -> dict:
    return {"intermediate_size": f.int("feed_forward_length"),
            "num_key_value_heads": f.int("attention.head_count_kv", heads),
            "hidden_act": "silu",
            "rms_norm_eps": float(f.get("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_parameters": _llama_rope(f, head_dim) if rope is None else rope}


def _llama_rope(f: _File, head_dim: int) -> dict:
    theta = float(f.get("rope.freq_base", 10000.0))
    _check_no_scaling_type(f)
    if ROPE_FREQS not in f.tensors:
        return {"rope_theta": theta, "rope_type": "default"}
    factors = dequantize(f.tensors[ROPE_FREQS], f.path).reshape(-1)
    llama3 = llama3_from_rope_factors(factors, theta, head_dim)
    if llama3 is None:
        f.refuse(f"the tensor {ROPE_FREQS!r} holds rope scaling factors that match no llama3 rope "
                 "scaling; this kind of rope scaling is not supported")
    if llama3:
        return {"rope_theta": theta, "rope_type": "llama3", **llama3}
    return {"rope_theta": theta, "rope_type": "default"}


def _check_no_scaling_type(f: _File) -> None:
    scaling = f.get("rope.scaling.type", None)
    if scaling not in (None, "none"):
        f.refuse(f"rope scaling {scaling!r} is not supported (supported: none, llama3); use a model "
                 "without it")


# ----------------------------------------------------------------------------- phi2, falcon, gptneox

def _phi2(f: _File, hidden: int, heads: int) -> dict:
    """convert_hf_to_gguf.py's Phi2Model: q/k/v separate (a `Wqkv` checkpoint: one attn_qkv)."""
    head_dim = _head_dim(f, hidden, heads)
    return {"intermediate_size": f.int("feed_forward_length"),
            "num_key_value_heads": f.int("attention.head_count_kv", heads),
            "hidden_act": "gelu_new", "layer_norm_eps": _layer_norm_eps(f), "qk_layernorm": False,
            "rope_parameters": _plain_rope(f, partial_rotary_factor=_rotary_fraction(f, head_dim))}


def _gpt_neox(f: _File, hidden: int, heads: int) -> dict:
    """convert_hf_to_gguf.py's GPTNeoXModel: attn_qkv reordered to [q | k | v]."""
    head_dim = _head_dim(f, hidden, heads)
    kv = f.int("attention.head_count_kv", heads)
    if kv != heads:
        f.refuse(f"{f.arch}.attention.head_count_kv = {kv} differs from head_count = {heads}; "
                 "GPT-NeoX models have no grouped key/value heads: the metadata is inconsistent")
    parallel = f.get("use_parallel_residual")
    if not isinstance(parallel, bool):
        f.refuse(f"GGUF metadata {f.arch}.use_parallel_residual = {parallel!r} is not a boolean; "
                 "the file is corrupt; re-convert it")
    return {"intermediate_size": f.int("feed_forward_length"), "hidden_act": "gelu",
            "layer_norm_eps": _layer_norm_eps(f), "use_parallel_residual": parallel,
            "attention_bias": _qkv_bias(f),
            "rope_parameters": _plain_rope(f, partial_rotary_factor=_rotary_fraction(f, head_dim))}


def _falcon(f: _File, hidden: int, heads: int) -> dict:
    """convert_hf_to_gguf.py's FalconModel: attn_qkv reordered from kv groups to [q | k | v]
    (`tensor_data_layout` "jploski"); always parallel attention + MLP (llama.cpp's Falcon). The
    variant is read off the tensors: a second norm (attn_norm_2) or grouped kv heads is the new
    decoder architecture (Falcon-40B/180B, Falcon-11B), else multi-query (one kv head, Falcon-7B)
    or multi-head."""
    head_dim = _head_dim(f, hidden, heads)
    kv = f.int("attention.head_count_kv", heads)
    layout = f.get("tensor_data_layout", None)
    if layout != "jploski" and (layout is not None or kv > 1):  # with one kv head both coincide
        f.refuse(f"the order of the rows of attn_qkv is unknown: {f.arch}.tensor_data_layout is "
                 f"{layout!r}, not 'jploski' (what llama.cpp's converter writes); re-convert the "
                 "file with llama.cpp's convert_hf_to_gguf.py")
    rotated = f.int("rope.dimension_count", None)
    if rotated not in (None, head_dim):
        f.refuse(f"{f.arch}.rope.dimension_count = {rotated} is not the head size {head_dim}; "
                 "Falcon models rotate whole heads")
    two_norms = f.has("attn_norm_2.weight")
    if two_norms or 1 < kv < heads:
        variant = {"new_decoder_architecture": True, "num_kv_heads": kv,
                   "num_ln_in_parallel_attn": 2 if two_norms else 1}
    else:
        variant = {"new_decoder_architecture": False, "multi_query": kv == 1, "num_kv_heads": heads}
    return {"ffn_hidden_size": f.int("feed_forward_length"), "activation": "gelu", "alibi": False,
            "bias": _qkv_bias(f), "parallel_attn": True, "layer_norm_epsilon": _layer_norm_eps(f),
            "rope_parameters": _plain_rope(f), **variant}


def _head_dim(f: _File, hidden: int, heads: int) -> int:
    """hidden / heads: these architectures have no head size of their own."""
    stated = f.int("attention.key_length", None)
    if hidden % heads or stated not in (None, hidden // heads):
        f.refuse(f"the head size ({f.arch}.attention.key_length = {stated}, embedding_length / "
                 f"head_count = {hidden}/{heads}) is not a whole hidden_size / heads, which {f.arch} "
                 "models require; the file's metadata is inconsistent")
    return hidden // heads


def _layer_norm_eps(f: _File) -> float:
    return float(f.get("attention.layer_norm_epsilon"))


def _qkv_bias(f: _File) -> bool:
    return f.has(f"{registry.GGUF_QKV}.bias") or f.has(registry.GGUF_LAYER[registry.Q_BIAS])


def _rotary_fraction(f: _File, head_dim: int) -> float:
    """The partial rotary factor whose int(head_dim * factor) (transformers' rotary size) is the
    file's rope.dimension_count."""
    dims = f.int("rope.dimension_count")
    if not 2 <= dims <= head_dim or dims % 2:
        f.refuse(f"{f.arch}.rope.dimension_count = {dims} is not an even number of rotated "
                 f"dimensions from 2 to the head size {head_dim}; the file's metadata is corrupt")
    factor = dims / head_dim
    while int(head_dim * factor) < dims:  # dims / head_dim rounded down
        factor = math.nextafter(factor, 2.0)
    return factor


def _plain_rope(f: _File, **extra) -> dict:
    """Unscaled rope; theta 10000 unless the file states one (llama.cpp's default)."""
    _check_no_scaling_type(f)
    if ROPE_FREQS in f.tensors:
        f.refuse(f"the tensor {ROPE_FREQS!r} (rope scaling factors) is not supported in {f.arch} "
                 "models; use a model without rope scaling")
    return {"rope_type": "default", "rope_theta": float(f.get("rope.freq_base", 10000.0)), **extra}


def _scaled_rope(f: _File, theta_default: float = 10000.0, **extra) -> dict:
    """The rope TextModel.set_gguf_parameters writes: theta from rope.freq_base (llama.cpp's
    default 10000 when absent), scaling from rope.scaling.* (none, linear or yarn)."""
    if ROPE_FREQS in f.tensors:
        f.refuse(f"the tensor {ROPE_FREQS!r} (rope scaling factors) is not supported in {f.arch} "
                 "models; use a model without it")
    rope = {"rope_type": "default", "rope_theta": float(f.get("rope.freq_base", theta_default)),
            **extra}
    kind = f.get("rope.scaling.type", None)
    if kind in (None, "none"):
        return rope
    if kind == "linear":
        return {**rope, "rope_type": "linear", "factor": float(f.get("rope.scaling.factor"))}
    if kind == "yarn":
        # what transformers' yarn reads; llama.cpp's yarn_ext_factor has no transformers field
        yarn = {"rope_type": "yarn", "factor": float(f.get("rope.scaling.factor")),
                "original_max_position_embeddings": f.int("rope.scaling.original_context_length")}
        for key, field in (("yarn_attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                           ("yarn_beta_slow", "beta_slow")):
            value = f.get(f"rope.scaling.{key}", None)
            if value is not None:
                yarn[field] = float(value)
        return {**rope, **yarn}
    f.refuse(f"rope scaling {kind!r} ({f.arch}.rope.scaling.type) is not supported for {f.arch} "
             "files (supported: none, linear, yarn); use a model without it")


def _q_head_dim(f: _File, heads: int) -> int:
    """attention.key_length, else layer 0's attn_q rows / heads (TextModel writes key_length only
    when config.json has a head_dim)."""
    stated = f.int("attention.key_length", None)
    if stated is not None:
        return stated
    q = f.tensors.get(f"blk.0.{registry.GGUF_LAYER[registry.Q]}")
    rows = int(q.shape[-1]) if q is not None and len(q.shape) == 2 else 0  # ggml order [in, out]
    if rows < 1 or rows % heads:
        f.refuse(f"the head size is not stated ({f.arch}.attention.key_length is missing) and "
                 f"blk.0.attn_q.weight does not give it ({rows} rows, {heads} heads); re-convert "
                 "the file with llama.cpp")
    return rows // heads


# ----------------------------------------------------------------------------- qwen3, phi3

def _qwen3(f: _File, hidden: int, heads: int) -> dict:
    """conversion/qwen.py's Qwen3Model (TextModel's metadata). The file holds no sliding window:
    a Qwen3 with use_sliding_window runs without one in llama.cpp, and here."""
    head_dim = _q_head_dim(f, heads)
    return {**_llama_common(f, heads, head_dim, rope=_scaled_rope(f)), "head_dim": head_dim,
            "attention_bias": f.has(registry.GGUF_LAYER[registry.Q_BIAS]),
            "use_sliding_window": False}


def _phi3(f: _File, hidden: int, heads: int) -> dict:
    """conversion/phi.py's Phi3MiniModel: fused attn_qkv [q | k | v] and ffn_up [gate | up], head
    size hidden / heads, partial rotary as rope.dimension_count = int(factor * hidden) // heads,
    longrope as the rope_factors_long/short tensors (with rope.scaling.original_context_length
    and the attention factor rope.scaling.attn_factor), attention.sliding_window 0 for none."""
    head_dim = _head_dim(f, hidden, heads)
    partial = _rotary_fraction(f, head_dim)
    original = f.int("rope.scaling.original_context_length", None)
    kind = f.get("rope.scaling.type", None)
    if kind not in (None, "none", "longrope"):
        f.refuse(f"rope scaling {kind!r} ({f.arch}.rope.scaling.type) is not supported for phi3 "
                 "files (llama.cpp's phi3 takes longrope factors); use a model without it")
    rope = {"rope_type": "default", "rope_theta": float(f.get("rope.freq_base", 10000.0)),
            "partial_rotary_factor": partial}
    factors = {key: ROPE_FACTORS[key] in f.tensors for key in ROPE_FACTORS}
    if any(factors.values()):
        rope.update(_longrope(f, int(head_dim * partial), original, factors))
    window = f.int("attention.sliding_window", 0)
    cfg = {**_llama_common(f, heads, head_dim, rope=rope), "sliding_window": window or None}
    if original is not None:
        cfg["original_max_position_embeddings"] = original
    return cfg


# Phi-3's longrope factors: transformers' field -> llama.cpp's global tensor.
ROPE_FACTORS = {"long_factor": "rope_factors_long.weight", "short_factor": "rope_factors_short.weight"}


def _longrope(f: _File, rotary_dim: int, original: Optional[int], present: dict) -> dict:
    missing = [ROPE_FACTORS[k] for k, there in present.items() if not there]
    if missing:
        f.refuse(f"the longrope factors are incomplete: tensor {missing[0]!r} is missing; "
                 "re-convert the file with llama.cpp")
    if original is None:
        f.refuse(f"longrope factors without {f.arch}.rope.scaling.original_context_length (the "
                 "length they switch at); re-convert the file with llama.cpp")
    out: dict[str, Any] = {"rope_type": "longrope"}
    for key, name in ROPE_FACTORS.items():
        values = dequantize(f.tensors[name], f.path).reshape(-1)
        if values.shape != (rotary_dim // 2,):
            f.refuse(f"tensor {name!r} holds {values.size} factors, not one per rotated frequency "
                     f"({rotary_dim // 2}); the file is corrupt; re-convert it")
        out[key] = [float(str(np.float32(v))) for v in values]  # the config's decimals
    # The converter writes sqrt(1 + ln(s) / ln(original)) for longrope (s = context / original),
    # as transformers computes it; a file that states another factor (Phi3's legacy "yarn"
    # scaling: 0.1 ln(s) + 1) is followed.
    attn = f.get("rope.scaling.attn_factor", None)
    scale = f.int("context_length", 2048) / original
    expected = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
    if attn is not None and np.float32(attn) != np.float32(expected):
        out["attention_factor"] = float(attn)
    return out


# ----------------------------------------------------------------------------- gemma2, gemma3

def _gemma_common(f: _File, hidden: int, heads: int, big_model_layers: int) -> dict:
    """conversion/gemma.py's Gemma2Model / Gemma3Model metadata common to both. The files hold no
    query_pre_attn_scalar: llama.cpp takes hidden / heads (integer division) for the 27B model,
    which it recognises by its layer count, else the head size; so do we."""
    head_dim = _q_head_dim(f, heads)
    layers = f.int("block_count")
    scalar = hidden // heads if layers == big_model_layers else head_dim
    return {"intermediate_size": f.int("feed_forward_length"),
            "num_key_value_heads": f.int("attention.head_count_kv", heads), "head_dim": head_dim,
            "rms_norm_eps": float(f.get("attention.layer_norm_rms_epsilon", 1e-6)),
            "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar,
            "attention_bias": f.has(registry.GGUF_LAYER[registry.Q_BIAS])}


def _gemma2(f: _File, hidden: int, heads: int) -> dict:
    """Gemma2Model: softcaps and window stated (llama.cpp's defaults 50, 30 and 4096 when not),
    every other layer windowed (llama.cpp's fixed pattern, as transformers'), no rope.freq_base
    (llama.cpp's and Gemma 2's 10000)."""
    return {**_gemma_common(f, hidden, heads, big_model_layers=46),  # Gemma 2 27B
            "sliding_window": f.int("attention.sliding_window", 4096),
            "attn_logit_softcapping": float(f.get("attn_logit_softcapping", 50.0)),
            "final_logit_softcapping": float(f.get("final_logit_softcapping", 30.0)),
            "rope_parameters": _plain_rope(f)}


GEMMA3_WINDOW_PERIOD = 6  # Gemma 3: five windowed layers, then one global (llama.cpp: set_swa_pattern(6))
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # Gemma 3's rope_local_base_freq (llama.cpp: rope_freq_base_train_swa)


def _gemma3(f: _File, hidden: int, heads: int) -> dict:
    """Gemma3Model (TextModel's metadata, then its own): the global rope from rope.freq_base and
    rope.scaling.*, the local one rope.freq_base_swa or Gemma 3's 10000; layer kinds from
    attention.sliding_window_pattern where a file has it, else Gemma 3's published period of 6
    (llama.cpp's too); no attention.sliding_window (or 0) means every layer is global; the final
    softcap only where stated."""
    layers = f.int("block_count")
    window = f.int("attention.sliding_window", 0) or None
    if window is None:
        types = ["full_attention"] * layers
    else:
        types = ["sliding_attention" if windowed else "full_attention"
                 for windowed in _gemma3_windowed(f, layers)]
    cfg = {**_gemma_common(f, hidden, heads, big_model_layers=62),  # Gemma 3 27B
           "sliding_window": window, "layer_types": types,
           "rope_parameters": {
               "full_attention": _scaled_rope(f),
               "sliding_attention": {"rope_type": "default", "rope_theta": float(
                   f.get("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE))}}}
    softcap = f.get("final_logit_softcapping", None)
    cfg["final_logit_softcapping"] = None if not softcap else float(softcap)
    return cfg


def _gemma3_windowed(f: _File, layers: int) -> list:
    """Per layer whether it is windowed: attention.sliding_window_pattern (a period, or one flag
    per layer) where the file has it, else Gemma 3's period of 6."""
    pattern = f.get("attention.sliding_window_pattern", GEMMA3_WINDOW_PERIOD)
    if isinstance(pattern, list):
        if len(pattern) != layers:
            f.refuse(f"{f.arch}.attention.sliding_window_pattern lists {len(pattern)} layers, not "
                     f"{layers}; the file is corrupt; re-convert it")
        return [bool(p) for p in pattern]
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
        f.refuse(f"{f.arch}.attention.sliding_window_pattern = {pattern!r} is not a period >= 1; "
                 "the file is corrupt; re-convert it")
    return [i % pattern < pattern - 1 for i in range(layers)]  # llama.cpp's set_swa_pattern


# Our model_type -> its reader (a family whose gguf_arch has no reader here is not read).
_ARCHS: dict[str, Callable[[_File, int, int], dict]] = {
    "llama": _llama, "qwen2": _qwen2, "phi": _phi2, "falcon": _falcon, "gpt_neox": _gpt_neox,
    "qwen3": _qwen3, "phi3": _phi3, "gemma2": _gemma2, "gemma3_text": _gemma3}


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
    elif mid.sum() == 1:  # one blended frequency: the usual factors (1, 4) and the length it gives
        j = int(np.flatnonzero(mid)[0])
        candidates.insert(0, (1.0, 4.0, 2 * math.pi / inv_freq[j] * (3.0 * s[j] + 1.0)))
    for low, high, fitted in candidates:
        for orig in (int(round(fitted)), fitted):  # a context length is a whole number of tokens
            params = {"factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                      "original_max_position_embeddings": orig}
            if np.allclose(_llama3_factors(inv_freq, **params), factors, rtol=1e-5, atol=0):
                return params
    return None


def llama3_rope_factors(theta: float, head_dim: int, params: dict) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp's converter writes for llama3 rope scaling (float32)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return _llama3_factors(inv_freq, **params).astype(np.float32)


def _llama3_factors(inv_freq, factor, low_freq_factor, high_freq_factor,
                    original_max_position_embeddings):
    """inv_freq / scaled inv_freq under llama3 scaling (transformers' and llama.cpp's formula)."""
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((original_max_position_embeddings / wavelen - low_freq_factor)
                     / (high_freq_factor - low_freq_factor), 0.0, 1.0)
    return 1.0 / ((1 - smooth) / factor + smooth)


def _model_type(arch_name: str, path: str) -> str:
    """Our model_type for a GGUF `general.architecture` (the first family of that architecture:
    mistral models are written as llama)."""
    gguf_archs: dict[str, str] = {}
    for f in families.FAMILIES:
        if f.gguf_arch and f.model_types[0] in _ARCHS:
            gguf_archs.setdefault(f.gguf_arch, f.model_types[0])
    if arch_name not in gguf_archs:
        others = [t for t in families.SUPPORTED if t not in gguf_archs.values()]
        raise UserError(f"{path}: GGUF architecture {arch_name!r} is not supported; supported GGUF "
                        f"architectures: {', '.join(sorted(gguf_archs))} (other model types, "
                        f"{', '.join(others)}, load from Hugging Face folders). Use a model of one "
                        "of these")
    return gguf_archs[arch_name]
