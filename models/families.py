"""The family table: one declarative entry per model family, everything that differs between them.

An entry says which `model_type`s it covers, how to read the config fields our model needs
(`read`: norm kind, block kind, MLP kind and activation, positions, biases, FFN width), where its
tensors live in Hugging Face names (the layer prefix, and canonical name -> HF name where they
differ; canonical names are registry.py's), which fused tensors it stores (`fused_qkv`, split on
read and fused on write, models/fused_qkv.py), and its llama.cpp architecture where we read GGUF
(with llama.cpp's tensor names where they differ from registry.GGUF_LAYER).
The model code builds each layer from the config fields the entry read. Adding a family is one
entry here plus its tests.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import numpy as np

from prunenet_jax.errors import UserError
from prunenet_jax.models import activations, registry as r, rope
from prunenet_jax.models.config_fields import Fields


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    hf_class: str  # the `architectures` entry transformers writes
    # config.json fields -> ModelConfig fields (besides model_type), each checked.
    read: Callable[[Fields], dict]
    layer_prefix: str = "model.layers.{}."
    # ModelConfig -> {canonical layer suffix: HF suffix}, for the names that differ.
    layer_names: Callable[[object], dict] = lambda cfg: {}
    global_names: dict = dataclasses.field(default_factory=dict)  # canonical -> HF, where they differ
    width_key: str = "intermediate_size"  # the config.json field holding the FFN width
    # HF suffix (less .weight/.bias) of a fused q/k/v tensor; "" when q, k, v are separate.
    fused_qkv: str = ""
    qkv_layout: str = "grouped"  # its row layout (models/fused_qkv.py): "grouped" or "concat"
    fused_gate_up: str = ""  # HF suffix (less .weight) of a fused [gate | up] (Phi-3); "" if none
    gguf_arch: str = ""  # llama.cpp architecture we read GGUF files of ("" : not read)
    gguf_permutes_qk: bool = False  # llama.cpp's converter permutes q/k rows; undone on load
    # What llama.cpp's converter adds to every norm weight (Gemma: 1, its x * (1 + w) stored as a
    # plain RMSNorm weight); subtracted on load.
    gguf_norm_shift: float = 0.0
    gguf_fused_gate_up: bool = False  # the file's ffn_up holds [gate | up] (Phi-3)
    # llama.cpp's converter writes q/k/v as one attn_qkv [q | k | v] (read either way; written so)
    gguf_fused_qkv: bool = False
    # ModelConfig -> {canonical layer suffix: llama.cpp suffix}, where they differ from
    # registry.GGUF_LAYER.
    gguf_layer_names: Callable[[object], dict] = lambda cfg: {}

    def hf_layer_name(self, cfg, suffix: str) -> str:
        return self.layer_names(cfg).get(suffix, suffix)

    def gguf_layer_name(self, cfg, suffix: str) -> str:
        return self.gguf_layer_names(cfg).get(suffix, r.GGUF_LAYER[suffix])

    def hf_global_name(self, name: str) -> str:
        return self.global_names.get(name, name)


# ----------------------------------------------------------------------------- config readers

def _heads(c: Fields, hidden: int, heads: int, kv_heads: int, head_dim: Optional[int]) -> dict:
    if heads % kv_heads:
        c.fail("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads={heads}")
    if head_dim is None:
        if hidden % heads:
            c.fail("num_attention_heads", f"{heads} does not divide hidden_size={hidden} "
                   "(and no head_dim is given)")
        head_dim = hidden // heads
    return dict(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)


def _rotary(c: Fields, head_dim: int, max_pos: int, **keys) -> rope.Rope:
    return rope.from_config(c.cfg, c.source, head_dim, max_position_embeddings=max_pos, **keys)


def _activation(c: Fields, key: str, default: str) -> str:
    return activations.check(c.get(key, str, default), c.source, key)


def _llama(c: Fields, *, qkv_bias: Callable[[Fields], bool], o_bias: Callable[[Fields], bool],
           window: Callable[[Fields], dict], eps: float = 1e-6, rope_keys: Optional[dict] = None,
           qk_norm: bool = False) -> dict:
    """LLaMA and its kin (Mistral, Qwen2, Qwen3, Phi-3): RMSNorm, sequential, gated MLP."""
    hidden, heads = c.size("hidden_size"), c.size("num_attention_heads")
    heads_ = _heads(c, hidden, heads, c.size("num_key_value_heads", heads), c.size("head_dim", None))
    max_pos = c.size("max_position_embeddings", 2048)
    c.get("attention_bias", bool, False)
    return dict(
        hidden_size=hidden, intermediate_size=c.size("intermediate_size"), **heads_,
        norm_eps=c.positive("rms_norm_eps", eps), qk_norm=qk_norm,
        rope=_rotary(c, heads_["head_dim"], max_pos, **(rope_keys or {})),
        max_position_embeddings=max_pos,
        tie_word_embeddings=c.get("tie_word_embeddings", bool, False),
        qkv_bias=qkv_bias(c), o_bias=o_bias(c), mlp_bias=c.get("mlp_bias", bool, False),
        **window(c), activation=_activation(c, "hidden_act", "silu"))


def _attention_bias(c: Fields) -> bool:
    return c.get("attention_bias", bool, False)


def _no_window(c: Fields) -> dict:
    return {}


def _every_layer_window(c: Fields) -> dict:
    """Mistral, Phi-3: every layer attends to the last `sliding_window` positions, if set."""
    return dict(sliding_window=c.size("sliding_window", None))


def _qwen_windows(c: Fields) -> dict:
    """Qwen2/Qwen3: with use_sliding_window, the layers from max_window_layers on are windowed,
    unless `layer_types` lists each layer's kind (transformers' rule)."""
    window = c.size("sliding_window", None) if c.get("use_sliding_window", bool, False) else None
    if window is None:
        return {}
    types = layer_types(c)
    if types is None:
        first = c.get("max_window_layers", int, 28)
        if first < 0:
            c.fail("max_window_layers", f"is {first}, not a layer count >= 0")
        types = tuple("sliding_attention" if i >= first else "full_attention"
                      for i in range(c.size("num_hidden_layers")))
    return dict(sliding_window=window, layer_types=types)


LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_types(c: Fields) -> Optional[tuple]:
    """The config's `layer_types` (one per layer), checked; None when absent."""
    types = c.get("layer_types", list, None)
    if types is None:
        return None
    if len(types) != c.size("num_hidden_layers") or any(t not in LAYER_TYPES for t in types):
        c.fail("layer_types", f"must list one of {', '.join(LAYER_TYPES)} per layer "
               f"(num_hidden_layers={c.cfg.get('num_hidden_layers')})")
    return tuple(types)


def _gemma(c: Fields, *, version: int) -> dict:
    """Gemma 2 and 3: Gemma's RMSNorm (1 + w), sandwich norms, embeddings scaled by sqrt(hidden),
    gelu-tanh gated MLP, attention scaled by query_pre_attn_scalar, windowed and full layers
    (Gemma 3: each kind with its own rope; q/k norms), tanh softcaps where configured."""
    if c.get("use_bidirectional_attention", bool, False):
        c.fail("use_bidirectional_attention", "is true (an encoder-style Gemma); only causal "
               "decoders are supported")
    hidden, heads = c.size("hidden_size"), c.size("num_attention_heads")
    heads_ = _heads(c, hidden, heads, c.size("num_key_value_heads", heads), c.size("head_dim", 256))
    D, layers = heads_["head_dim"], c.size("num_hidden_layers")
    max_pos = c.size("max_position_embeddings", 8192 if version == 2 else 131072)
    pattern = 2 if version == 2 else c.size("sliding_window_pattern", 6)
    types = layer_types(c) or tuple("sliding_attention" if (i + 1) % pattern else "full_attention"
                                    for i in range(layers))
    bias = c.get("attention_bias", bool, False)
    rotary = dict(rope=_rotary(c, D, max_pos)) if version == 2 else _gemma3_ropes(c, D, max_pos)
    return dict(
        hidden_size=hidden, intermediate_size=c.size("intermediate_size"), **heads_,
        norm="gemma_rms", norm_eps=c.positive("rms_norm_eps", 1e-6), **rotary,
        max_position_embeddings=max_pos, tie_word_embeddings=c.get("tie_word_embeddings", bool, True),
        qkv_bias=bias, o_bias=bias, activation=_activation(c, "hidden_activation", "gelu_pytorch_tanh"),
        sliding_window=c.size("sliding_window", 4096), layer_types=types, qk_norm=version == 3,
        embed_scale=True, sandwich=True,
        attn_scale=c.positive("query_pre_attn_scalar", 256) ** -0.5,
        # transformers' Gemma 3 attention does not apply attn_logit_softcapping (Gemma 2's does).
        attn_softcap=_softcap(c, "attn_logit_softcapping", 50.0) if version == 2 else None,
        logit_softcap=_softcap(c, "final_logit_softcapping", 30.0 if version == 2 else None))


def _softcap(c: Fields, key: str, default: Optional[float]) -> Optional[float]:
    """A tanh softcap: the config's (null: none), else the family's default."""
    if key not in c.cfg:
        return default
    return None if c.cfg[key] is None else c.positive(key)


def _gemma3_ropes(c: Fields, head_dim: int, max_pos: int) -> dict:
    """Gemma 3's two ropes: full-attention layers (base 1e6, scaled in the larger models) and
    windowed ones (base 1e4), from v5's per-layer-type `rope_parameters` or v4's `rope_theta` +
    `rope_scaling` and `rope_local_base_freq`."""
    params = c.cfg.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
        full_cfg, local_cfg = {"rope_parameters": full}, {"rope_parameters": local}
    else:
        full_cfg = {"rope_theta": c.cfg.get("rope_theta"), "rope_scaling": c.cfg.get("rope_scaling")}
        local_cfg = {"rope_theta": c.cfg.get("rope_local_base_freq")}

    def one(cfg: dict, kind: str, theta: float) -> rope.Rope:
        return rope.from_config(cfg, f"{c.source} ({kind} rope)", head_dim,
                                max_position_embeddings=max_pos, theta_default=theta)

    return dict(rope=one(full_cfg, "full_attention", 1e6),
                rope_local=one(local_cfg, "sliding_attention", 1e4))


def _opt(c: Fields) -> dict:
    hidden, heads = c.size("hidden_size"), c.size("num_attention_heads")
    if not c.get("layer_norm_elementwise_affine", bool, True):
        c.fail("layer_norm_elementwise_affine", "is false (LayerNorms without weights) and is not "
               "supported")
    pre_ln = c.get("do_layer_norm_before", bool, True)
    bias = c.get("enable_bias", bool, True)
    return dict(
        hidden_size=hidden, intermediate_size=c.size("ffn_dim"), **_heads(c, hidden, heads, heads, None),
        norm="layer", norm_eps=1e-5,  # nn.LayerNorm's default: OPT has no eps field
        rope=None, positions="learned", max_position_embeddings=c.size("max_position_embeddings", 2048),
        tie_word_embeddings=c.get("tie_word_embeddings", bool, True),
        qkv_bias=bias, o_bias=bias, mlp_bias=bias, gated=False,
        activation=_activation(c, "activation_function", "relu"),
        post_norm=not pre_ln,
        final_norm=pre_ln and not c.get("_remove_final_layer_norm", bool, False),
        embed_dim=c.size("word_embed_proj_dim", hidden))


def _phi(c: Fields) -> dict:
    hidden, heads = c.size("hidden_size"), c.size("num_attention_heads")
    heads_ = _heads(c, hidden, heads, c.size("num_key_value_heads", heads), c.size("head_dim", None))
    max_pos = c.size("max_position_embeddings", 2048)
    return dict(
        hidden_size=hidden, intermediate_size=c.size("intermediate_size"), **heads_,
        norm="layer", norm_eps=c.positive("layer_norm_eps", 1e-5),
        rope=_rotary(c, heads_["head_dim"], max_pos, partial_default=0.5),
        max_position_embeddings=max_pos,
        tie_word_embeddings=c.get("tie_word_embeddings", bool, False),
        qkv_bias=True, o_bias=True, mlp_bias=True, lm_head_bias=True, gated=False,
        activation=_activation(c, "hidden_act", "gelu_new"),
        parallel=True, mlp_norm=False, qk_norm=c.get("qk_layernorm", bool, False))


def _falcon(c: Fields) -> dict:
    if c.get("alibi", bool, False):
        c.fail("alibi", "is true: ALiBi position biases (falcon-rw) are not supported, only rotary "
               "Falcon models (alibi: false)")
    hidden = c.size("hidden_size", None) or c.size("n_embed")
    heads = c.size("num_attention_heads", None) or c.size("n_head")
    new_arch = c.get("new_decoder_architecture", bool, False)
    multi_query = c.get("multi_query", bool, True)
    parallel = c.get("parallel_attn", bool, True)
    kv = c.size("num_kv_heads", heads) if (new_arch or not multi_query) else 1
    lns = c.size("num_ln_in_parallel_attn", 2 if new_arch else 1)
    if new_arch and not parallel and lns == 1:
        c.fail("parallel_attn", "is false with new_decoder_architecture and one norm, which "
               "transformers cannot run either")
    max_pos = c.size("max_position_embeddings", 2048)
    heads_ = _heads(c, hidden, heads, kv, None)
    bias = c.get("bias", bool, False)
    return dict(
        hidden_size=hidden, intermediate_size=c.size("ffn_hidden_size", 4 * hidden), **heads_,
        norm="layer", norm_eps=c.positive("layer_norm_epsilon", 1e-5),
        rope=_rotary(c, heads_["head_dim"], max_pos), max_position_embeddings=max_pos,
        tie_word_embeddings=c.get("tie_word_embeddings", bool, True),
        qkv_bias=bias, o_bias=bias, mlp_bias=bias, gated=False,
        activation=_activation(c, "activation", "gelu"),
        parallel=parallel or new_arch,
        mlp_norm=not parallel or (new_arch and lns == 2))


def _gpt_neox(c: Fields) -> dict:
    hidden, heads = c.size("hidden_size"), c.size("num_attention_heads")
    heads_ = _heads(c, hidden, heads, heads, None)
    max_pos = c.size("max_position_embeddings", 2048)
    bias = c.get("attention_bias", bool, True)
    return dict(
        hidden_size=hidden, intermediate_size=c.size("intermediate_size"), **heads_,
        norm="layer", norm_eps=c.positive("layer_norm_eps", 1e-5),
        rope=_rotary(c, heads_["head_dim"], max_pos, theta_keys=("rope_theta", "rotary_emb_base"),
                     partial_keys=("partial_rotary_factor", "rotary_pct"), partial_default=0.25),
        max_position_embeddings=max_pos,
        tie_word_embeddings=c.get("tie_word_embeddings", bool, False),
        qkv_bias=bias, o_bias=bias, mlp_bias=True, gated=False,
        activation=_activation(c, "hidden_act", "gelu"),
        parallel=c.get("use_parallel_residual", bool, True))


# ----------------------------------------------------------------------------- HF names

_PLAIN_MLP = {r.UP: "mlp.fc1.weight", r.UP_BIAS: "mlp.fc1.bias",
              r.DOWN: "mlp.fc2.weight", r.DOWN_BIAS: "mlp.fc2.bias"}
_H_TO_4H = {r.UP: "mlp.dense_h_to_4h.weight", r.UP_BIAS: "mlp.dense_h_to_4h.bias",
            r.DOWN: "mlp.dense_4h_to_h.weight", r.DOWN_BIAS: "mlp.dense_4h_to_h.bias"}

def _norms(input_name: str, post_name: str) -> dict:
    return {r.INPUT_NORM: f"{input_name}.weight", r.INPUT_NORM_BIAS: f"{input_name}.bias",
            r.POST_ATTN_NORM: f"{post_name}.weight", r.POST_ATTN_NORM_BIAS: f"{post_name}.bias"}


def _gemma_layer_names(cfg) -> dict:
    """Gemma's post_attention_layernorm is the attention output's norm; its MLP input norm is
    pre_feedforward_layernorm."""
    return {r.POST_ATTN_NORM: "pre_feedforward_layernorm.weight",
            r.ATTN_OUT_NORM: "post_attention_layernorm.weight",
            r.MLP_OUT_NORM: "post_feedforward_layernorm.weight"}


def _opt_layer_names(cfg) -> dict:
    return {**{k: v.replace("mlp.", "") for k, v in _PLAIN_MLP.items()},
            r.O: "self_attn.out_proj.weight", r.O_BIAS: "self_attn.out_proj.bias",
            **_norms("self_attn_layer_norm", "final_layer_norm")}


def _phi_layer_names(cfg) -> dict:
    return {**_PLAIN_MLP, r.O: "self_attn.dense.weight", r.O_BIAS: "self_attn.dense.bias",
            r.Q_NORM: "self_attn.q_layernorm.weight", r.Q_NORM_BIAS: "self_attn.q_layernorm.bias",
            r.K_NORM: "self_attn.k_layernorm.weight", r.K_NORM_BIAS: "self_attn.k_layernorm.bias"}


def _falcon_layer_names(cfg) -> dict:
    two_norms = cfg.parallel and cfg.mlp_norm  # new architecture: ln_attn / ln_mlp
    norms = _norms("ln_attn", "ln_mlp") if two_norms else {}
    return {**_H_TO_4H, r.O: "self_attention.dense.weight", r.O_BIAS: "self_attention.dense.bias",
            **norms}


def _falcon_gguf_names(cfg) -> dict:
    """llama.cpp's Falcon: a two-norm layer's ln_attn is attn_norm_2 and ln_mlp attn_norm
    (gguf tensor_mapping.py); a one-norm layer's input_layernorm is attn_norm."""
    if not (cfg.parallel and cfg.mlp_norm):
        return {}
    return {r.INPUT_NORM: "attn_norm_2.weight", r.INPUT_NORM_BIAS: "attn_norm_2.bias",
            r.POST_ATTN_NORM: "attn_norm.weight", r.POST_ATTN_NORM_BIAS: "attn_norm.bias"}


def _neox_layer_names(cfg) -> dict:
    return {**_H_TO_4H, r.O: "attention.dense.weight", r.O_BIAS: "attention.dense.bias"}


FAMILIES = (
    Family("llama", ("llama",), "LlamaForCausalLM",
           functools.partial(_llama, qkv_bias=_attention_bias, o_bias=_attention_bias,
                             window=_no_window),
           gguf_arch="llama", gguf_permutes_qk=True),
    Family("mistral", ("mistral",), "MistralForCausalLM",
           functools.partial(_llama, qkv_bias=lambda c: False, o_bias=lambda c: False,
                             window=_every_layer_window),
           gguf_arch="llama", gguf_permutes_qk=True),
    Family("qwen2", ("qwen2",), "Qwen2ForCausalLM",
           functools.partial(_llama, qkv_bias=lambda c: True, o_bias=lambda c: False,
                             window=_qwen_windows),
           gguf_arch="qwen2"),
    Family("qwen3", ("qwen3",), "Qwen3ForCausalLM",  # RMSNorm on each head's q and k
           functools.partial(_llama, qkv_bias=_attention_bias, o_bias=_attention_bias,
                             window=_qwen_windows, qk_norm=True),
           gguf_arch="qwen3"),
    Family("gemma2", ("gemma2",), "Gemma2ForCausalLM", functools.partial(_gemma, version=2),
           layer_names=_gemma_layer_names, gguf_arch="gemma2", gguf_norm_shift=1.0),
    Family("gemma3", ("gemma3_text",), "Gemma3ForCausalLM", functools.partial(_gemma, version=3),
           layer_names=_gemma_layer_names, gguf_arch="gemma3", gguf_norm_shift=1.0),
    Family("phi3", ("phi3",), "Phi3ForCausalLM",  # Phi-3, Phi-4-mini: fused qkv and gate/up
           functools.partial(_llama, qkv_bias=lambda c: False, o_bias=lambda c: False,
                             window=_every_layer_window, eps=1e-5,
                             rope_keys=dict(original_max_position_embeddings=4096,
                                            type_aliases=rope.PHI3_TYPE_ALIASES)),
           fused_qkv="self_attn.qkv_proj", qkv_layout="concat", fused_gate_up="mlp.gate_up_proj",
           gguf_arch="phi3", gguf_fused_gate_up=True, gguf_fused_qkv=True),
    Family("opt", ("opt",), "OPTForCausalLM", _opt, layer_prefix="model.decoder.layers.{}.",
           layer_names=_opt_layer_names, width_key="ffn_dim",
           global_names={r.EMBED: "model.decoder.embed_tokens.weight",
                         r.POS_EMBED: "model.decoder.embed_positions.weight",
                         r.PROJECT_IN: "model.decoder.project_in.weight",
                         r.PROJECT_OUT: "model.decoder.project_out.weight",
                         r.FINAL_NORM: "model.decoder.final_layer_norm.weight",
                         r.FINAL_NORM_BIAS: "model.decoder.final_layer_norm.bias"}),
    Family("phi", ("phi",), "PhiForCausalLM", _phi, layer_names=_phi_layer_names,
           global_names={r.FINAL_NORM: "model.final_layernorm.weight",
                         r.FINAL_NORM_BIAS: "model.final_layernorm.bias"},
           gguf_arch="phi2"),
    Family("falcon", ("falcon",), "FalconForCausalLM", _falcon, layer_prefix="transformer.h.{}.",
           layer_names=_falcon_layer_names, width_key="ffn_hidden_size",
           fused_qkv="self_attention.query_key_value",
           gguf_arch="falcon", gguf_layer_names=_falcon_gguf_names, gguf_fused_qkv=True,
           global_names={r.EMBED: "transformer.word_embeddings.weight",
                         r.FINAL_NORM: "transformer.ln_f.weight",
                         r.FINAL_NORM_BIAS: "transformer.ln_f.bias"}),
    Family("gpt_neox", ("gpt_neox",), "GPTNeoXForCausalLM", _gpt_neox,
           layer_prefix="gpt_neox.layers.{}.", layer_names=_neox_layer_names,
           fused_qkv="attention.query_key_value", gguf_arch="gptneox", gguf_fused_qkv=True,
           global_names={r.EMBED: "gpt_neox.embed_in.weight",
                         r.FINAL_NORM: "gpt_neox.final_layer_norm.weight",
                         r.FINAL_NORM_BIAS: "gpt_neox.final_layer_norm.bias",
                         r.LM_HEAD: "embed_out.weight"}),
)
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}
SUPPORTED = tuple(sorted(_BY_MODEL_TYPE))

# Config fields that mark a feature no family here has, refused by name.
_FEATURES = {"num_local_experts": "a mixture-of-experts FFN", "num_experts": "a mixture-of-experts FFN",
             "moe_intermediate_size": "a mixture-of-experts FFN"}


def family_of(model_type: Optional[str], source: str = "config.json") -> Family:
    if model_type not in _BY_MODEL_TYPE:
        raise UserError(
            f"{source}: model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(SUPPORTED)}. Use a checkpoint of one of these families"
        )
    return _BY_MODEL_TYPE[model_type]


def check_features(cfg: dict, source: str) -> None:
    """Refuses, by name, a config that asks for a feature our decoder does not compute."""
    if cfg.get("vision_config") is not None:
        raise UserError(f"{source}: a vision tower (vision_config, model_type "
                        f"{cfg.get('model_type')!r}) is not supported, only text decoders; use "
                        "the text model (for Gemma 3: a gemma3_text checkpoint)")
    for key, feature in _FEATURES.items():
        value = cfg.get(key)
        if value not in (None, 0, 1, False):
            raise UserError(f"{source}: {feature} ({key}={value!r}) is not supported; supported: "
                            f"dense FFNs of the families {', '.join(f.name for f in FAMILIES)}")


# The norm weights a norm shift applies to (global and per-layer canonical names).
_NORM_WEIGHTS = (r.FINAL_NORM, r.INPUT_NORM, r.POST_ATTN_NORM, r.ATTN_OUT_NORM, r.MLP_OUT_NORM,
                 r.Q_NORM, r.K_NORM)


def gguf_transforms(cfg, to_file: bool = False) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Canonical name (global or per-layer) -> what turns the GGUF tensor (numpy, HF layout) into
    the HF one (`to_file`: the HF one into the GGUF one): the q/k row (un)permutation for
    architectures whose llama.cpp converter permutes them, and the norm shift (Gemma's converter
    stores every norm weight as w + 1)."""
    family = family_of(cfg.model_type)
    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    if family.gguf_permutes_qk:
        heads = {r.Q: cfg.num_attention_heads, r.Q_BIAS: cfg.num_attention_heads,
                 r.K: cfg.num_key_value_heads, r.K_BIAS: cfg.num_key_value_heads}
        permute = r.permute_qk if to_file else r.unpermute_qk
        out.update({name: functools.partial(permute, n_head=n) for name, n in heads.items()})
    if family.gguf_norm_shift:
        shift = np.float32(family.gguf_norm_shift) * (1 if to_file else -1)
        out.update({name: functools.partial(_shift, shift=shift) for name in _NORM_WEIGHTS})
    return out


def _shift(w: np.ndarray, shift: np.float32) -> np.ndarray:
    return np.add(w, shift, dtype=np.float32)
