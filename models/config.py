"""Model configuration: the fields our LLaMA needs, read from a Hugging Face `config.json` dict."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from prunenet_jax.errors import UserError
from prunenet_jax.models import registry


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[tuple] = None  # None, or sorted (key, value) pairs of the llama3 scaling
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: Optional[int] = None  # longest input we accept, for mistral-style models
    # Per-layer MLP widths of a model pruned non-uniformly; None means all layers use
    # `intermediate_size`.
    intermediate_sizes: Optional[tuple] = None

    def mlp_width(self, layer: int) -> int:
        if self.intermediate_sizes is not None:
            return self.intermediate_sizes[layer]
        return self.intermediate_size

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Builds the config from a `config.json` dict (transformers v4 or v5 layout)."""
        model_type = cfg.get("model_type")
        arch = registry.get(model_type, source)
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            rope_theta, rope_scaling = _rope(cfg, source)
            qkv_bias, o_bias = arch.attention_biases(cfg)
            return cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=qkv_bias,
                o_bias=o_bias,
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                sliding_window=arch.sliding_window(cfg),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"{source}: missing or malformed field {e} for a {model_type} model; "
                "fix the config so it matches what transformers writes for this architecture"
            ) from None


def _rope(cfg: dict, source: str) -> tuple[float, Optional[tuple]]:
    """(rope_theta, scaling) from v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`."""
    params = cfg.get("rope_parameters")
    if params:
        params = dict(params)
        theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        params = dict(cfg.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in needed if k not in params]
        if missing:
            raise UserError(f"{source}: llama3 rope scaling lacks {missing}; add them to the config")
        # A tuple keeps the config hashable (it is static data of the jitted model).
        return theta, tuple(sorted({"rope_type": "llama3", **{k: float(params[k]) for k in needed}}.items()))
    raise UserError(
        f"{source}: rope type {rope_type!r} is not supported (supported: default, llama3); "
        "use a checkpoint with one of those"
    )
