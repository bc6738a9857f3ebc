"""The canonical names of a model's tensors, their roles in pruning, and their shapes.

Every family (models/families.py) is held under the same canonical names, LLaMA's Hugging Face
names: the first FFN matrix of a plain MLP (OPT/Phi `fc1`, Falcon/GPT-NeoX `dense_h_to_4h`) is
`mlp.up_proj`, the second (`fc2`, `dense_4h_to_h`) `mlp.down_proj`; a fused `query_key_value` is
split into q/k/v. Our Flax modules use these names, so a canonical name is also the parameter's
path in the Flax state; the family table maps them to and from each family's HF names.
"""
from __future__ import annotations

import numpy as np

# Per-layer tensors, as suffixes of `model.layers.{i}.` (layout [out, in]).
Q, K, V, O = (f"self_attn.{p}_proj.weight" for p in "qkvo")
Q_BIAS, K_BIAS, V_BIAS, O_BIAS = (f"self_attn.{p}_proj.bias" for p in "qkvo")
Q_NORM, K_NORM = "self_attn.q_norm.weight", "self_attn.k_norm.weight"
Q_NORM_BIAS, K_NORM_BIAS = "self_attn.q_norm.bias", "self_attn.k_norm.bias"
GATE, UP, DOWN = (f"mlp.{p}_proj.weight" for p in ("gate", "up", "down"))
GATE_BIAS, UP_BIAS, DOWN_BIAS = (f"mlp.{p}_proj.bias" for p in ("gate", "up", "down"))
INPUT_NORM, INPUT_NORM_BIAS = "input_layernorm.weight", "input_layernorm.bias"
POST_ATTN_NORM, POST_ATTN_NORM_BIAS = "post_attention_layernorm.weight", "post_attention_layernorm.bias"
# Gemma's sandwich norms on the branch outputs (its HF post_attention / post_feedforward norms).
ATTN_OUT_NORM, MLP_OUT_NORM = "attn_output_layernorm.weight", "mlp_output_layernorm.weight"

# Whole-model tensors.
EMBED = "model.embed_tokens.weight"
POS_EMBED = "model.embed_positions.weight"  # learned positions (OPT)
PROJECT_IN, PROJECT_OUT = "model.project_in.weight", "model.project_out.weight"  # OPT-350m
FINAL_NORM, FINAL_NORM_BIAS = "model.norm.weight", "model.norm.bias"
LM_HEAD, LM_HEAD_BIAS = "lm_head.weight", "lm_head.bias"

LAYER_PREFIX = "model.layers.{}."

# llama.cpp's tensor names for the same tensors (`gguf.constants.TENSOR_NAMES`); a family whose
# architecture names some differently says so in its `gguf_layer_names` (models/families.py).
GGUF_GLOBAL = {EMBED: "token_embd.weight", FINAL_NORM: "output_norm.weight", LM_HEAD: "output.weight",
               FINAL_NORM_BIAS: "output_norm.bias", LM_HEAD_BIAS: "output.bias"}
GGUF_LAYER = {
    Q: "attn_q.weight", K: "attn_k.weight", V: "attn_v.weight", O: "attn_output.weight",
    Q_BIAS: "attn_q.bias", K_BIAS: "attn_k.bias", V_BIAS: "attn_v.bias", O_BIAS: "attn_output.bias",
    GATE: "ffn_gate.weight", UP: "ffn_up.weight", DOWN: "ffn_down.weight",
    GATE_BIAS: "ffn_gate.bias", UP_BIAS: "ffn_up.bias", DOWN_BIAS: "ffn_down.bias",
    INPUT_NORM: "attn_norm.weight", POST_ATTN_NORM: "ffn_norm.weight",
    INPUT_NORM_BIAS: "attn_norm.bias", POST_ATTN_NORM_BIAS: "ffn_norm.bias",
    Q_NORM: "attn_q_norm.weight", K_NORM: "attn_k_norm.weight",  # Qwen3, Gemma 3
    ATTN_OUT_NORM: "post_attention_norm.weight", MLP_OUT_NORM: "post_ffw_norm.weight",  # Gemma
}
# One fused q/k/v tensor, rows [all q | all k | all v] (Falcon and GPT-NeoX files: the converter
# reorders their query_key_value into it; Phi-2 files converted from the `Wqkv` checkpoints).
GGUF_QKV = "attn_qkv"
QKV_PART = {Q: 0, K: 1, V: 2, Q_BIAS: 0, K_BIAS: 1, V_BIAS: 2}  # canonical q/k/v -> part
# Phi-3's fused [gate | up] (rows 2 * I): llama.cpp keeps it whole under ffn_up (its SwiGLU takes
# the first half as the gate).
GGUF_GATE_UP = "ffn_up.weight"
GATE_UP_PART = {GATE: 0, UP: 1}


# ----------------------------------------------------------------------------- roles in pruning

def scored(cfg) -> str:
    """The matrix the reward scores: the first FFN matrix (gate of a gated MLP, else fc1), as
    the reference does whatever the family."""
    return GATE if cfg.gated else UP


def row_sliced(cfg) -> list[str]:
    """Tensors whose rows are FFN channels (they lose the pruned rows)."""
    names = [GATE, UP] if cfg.gated else [UP]
    if cfg.mlp_bias:
        names += [GATE_BIAS, UP_BIAS] if cfg.gated else [UP_BIAS]
    return names


COLUMN_SLICED = DOWN  # its columns are FFN channels; its bias (per output) is kept whole


# ----------------------------------------------------------------------------- names and shapes

def layer_tensor_names(cfg) -> list[str]:
    """Per-layer tensor suffixes a checkpoint of this config must contain."""
    layer_norm = cfg.norm == "layer"
    names = [INPUT_NORM] + [INPUT_NORM_BIAS] * layer_norm
    if cfg.mlp_norm:
        names += [POST_ATTN_NORM] + [POST_ATTN_NORM_BIAS] * layer_norm
    names += [Q, K, V, O]
    if cfg.qkv_bias:
        names += [Q_BIAS, K_BIAS, V_BIAS]
    if cfg.o_bias:
        names.append(O_BIAS)
    if cfg.qk_norm:
        names += [Q_NORM, K_NORM] + [Q_NORM_BIAS, K_NORM_BIAS] * layer_norm
    if cfg.sandwich:
        names += [ATTN_OUT_NORM, MLP_OUT_NORM]
    names += row_sliced(cfg) + [COLUMN_SLICED] + [DOWN_BIAS] * cfg.mlp_bias
    return names


def global_tensor_names(cfg) -> list[str]:
    names = [EMBED]
    if cfg.positions == "learned":
        names.append(POS_EMBED)
    if cfg.embed_width != cfg.hidden_size:
        names += [PROJECT_IN, PROJECT_OUT]
    if cfg.final_norm:
        names += [FINAL_NORM] + [FINAL_NORM_BIAS] * (cfg.norm == "layer")
    if not cfg.tie_word_embeddings:
        names.append(LM_HEAD)
    if cfg.lm_head_bias:
        names.append(LM_HEAD_BIAS)
    return names


def expected_shapes(cfg) -> dict[str, tuple]:
    """Shape of every tensor: global names as is, layer names as stacked (L, ...) arrays."""
    H, I, L, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.head_dim
    E = cfg.embed_width
    q, kv = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    per_layer = {
        INPUT_NORM: (H,), INPUT_NORM_BIAS: (H,), POST_ATTN_NORM: (H,), POST_ATTN_NORM_BIAS: (H,),
        Q: (q, H), K: (kv, H), V: (kv, H), O: (H, q),
        Q_BIAS: (q,), K_BIAS: (kv,), V_BIAS: (kv,), O_BIAS: (H,),
        Q_NORM: (D,), K_NORM: (D,), Q_NORM_BIAS: (D,), K_NORM_BIAS: (D,),
        ATTN_OUT_NORM: (H,), MLP_OUT_NORM: (H,),
        GATE: (I, H), UP: (I, H), DOWN: (H, I),
        GATE_BIAS: (I,), UP_BIAS: (I,), DOWN_BIAS: (H,),
    }
    shapes = {EMBED: (cfg.vocab_size, E), POS_EMBED: (cfg.max_position_embeddings + 2, H),
              PROJECT_IN: (H, E), PROJECT_OUT: (E, H), FINAL_NORM: (H,), FINAL_NORM_BIAS: (H,),
              LM_HEAD: (cfg.vocab_size, E), LM_HEAD_BIAS: (cfg.vocab_size,)}
    shapes.update({n: (L,) + per_layer[n] for n in layer_tensor_names(cfg)})
    return {n: shapes[n] for n in global_tensor_names(cfg) + layer_tensor_names(cfg)}


# ----------------------------------------------------------------------------- GGUF transforms

def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (rows = n_head * head_dim, weights or biases).

    The converter reorders each head's rows from rotate-half order (HF: first the real halves,
    then the imaginary ones) to interleaved pairs (ggml's RoPE): rows (h, c, j) -> (h, j, c) with
    c in {0, 1} and j < head_dim / 2. We map them back.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF -> GGUF); the inverse of `unpermute_qk`."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
