"""Model configuration: the fields our LLaMA needs, read from a Hugging Face `config.json` dict."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from prunenet_jax.errors import UserError
from prunenet_jax.models import registry

_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
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
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Builds the config from a `config.json` dict (transformers v4 or v5 layout); every field
        it reads is checked for type and range first (`_checked`)."""
        if not isinstance(cfg, dict):
            raise UserError(f"{source}: expected a JSON object of config fields, found "
                            f"{type(cfg).__name__}; restore config.json from the source")
        c = _Fields(cfg, source)
        model_type = c.get("model_type", str)
        arch = registry.get(model_type, source)
        hidden = c.size("hidden_size")
        heads = c.size("num_attention_heads")
        kv_heads = c.size("num_key_value_heads", heads)
        head_dim = c.size("head_dim", None)
        if heads % kv_heads:
            c.fail("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads={heads}")
        if head_dim is None:
            if hidden % heads:
                c.fail("num_attention_heads", f"{heads} does not divide hidden_size={hidden} "
                       "(and no head_dim is given)")
            head_dim = hidden // heads
        for key in ("attention_bias", "mlp_bias", "tie_word_embeddings", "use_sliding_window"):
            c.get(key, bool, False)
        c.size("sliding_window", None)
        rope_theta, rope_scaling = _rope(c, source)
        qkv_bias, o_bias = arch.attention_biases(cfg)
        return cls(
            model_type=model_type,
            vocab_size=c.size("vocab_size"),
            hidden_size=hidden,
            intermediate_size=c.size("intermediate_size"),
            num_hidden_layers=c.size("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=c.positive("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=c.size("max_position_embeddings", 2048),
            tie_word_embeddings=c.get("tie_word_embeddings", bool, False),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=c.get("mlp_bias", bool, False),
            sliding_window=arch.sliding_window(cfg),
        )


_MAX_SIZE = 2**31 - 1  # sizes index int32 arrays


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """Typed, range-checked access to a config dict; every failure is a UserError naming the
    file, the field and what it must be. A field set to null counts as absent."""

    def __init__(self, cfg: dict, source: str):
        self.cfg, self.source = cfg, source

    def fail(self, key: str, problem: str):
        raise UserError(f"{self.source}: field {key!r} {problem}; fix the config so it matches "
                        "what transformers writes for this architecture")

    def get(self, key: str, kind: type, default: Any = _REQUIRED) -> Any:
        value = self.cfg.get(key)
        if value is None:
            if default is _REQUIRED:
                self.fail(key, "is missing")
            return default
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            what = "number" if isinstance(kind, tuple) else kind.__name__
            self.fail(key, f"is {_short(value)} ({type(value).__name__}), not a {what}")
        return value

    def size(self, key: str, default: Any = _REQUIRED) -> Any:
        """A positive integer (an integral float such as 64.0 is taken as 64)."""
        value = self.get(key, (int, float), default)
        if value is default:
            return value
        if not (math.isfinite(value) and value == int(value) and 1 <= value <= _MAX_SIZE):
            self.fail(key, f"is {_short(value)}, not an integer in [1, {_MAX_SIZE}]")
        return int(value)

    def positive(self, key: str, default: Any = _REQUIRED) -> float:
        """A finite number > 0."""
        value = self.get(key, (int, float), default)
        if not (math.isfinite(value) and value > 0):
            self.fail(key, f"is {_short(value)}, not a finite number > 0")
        return float(value)


def _rope(c: _Fields, source: str) -> tuple[float, Optional[tuple]]:
    """(rope_theta, scaling) from v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`."""
    theta = c.positive("rope_theta", 10000.0)
    params = c.get("rope_parameters", dict, None)
    if params:
        params = _Fields(params, f"{source} (rope_parameters)")
        theta = params.positive("rope_theta", theta)
    else:
        params = _Fields(c.get("rope_scaling", dict, None) or {}, f"{source} (rope_scaling)")
    rope_type = params.get("rope_type", str, None) or params.get("type", str, "default")
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in needed if params.cfg.get(k) is None]
        if missing:
            raise UserError(f"{source}: llama3 rope scaling lacks {missing}; add them to the config")
        # A tuple keeps the config hashable (it is static data of the jitted model).
        return theta, tuple(sorted({"rope_type": "llama3",
                                    **{k: params.positive(k) for k in needed}}.items()))
    raise UserError(
        f"{source}: rope type {rope_type!r} is not supported (supported: default, llama3); "
        "use a checkpoint with one of those"
    )
