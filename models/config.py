"""Model configuration: the fields our decoder needs, read from a Hugging Face `config.json` dict."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from prunenet_jax.errors import UserError
from prunenet_jax.models import families, rope as rope_lib
from prunenet_jax.models.config_fields import Fields


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What our decoder needs to know of a checkpoint, whatever its family (models/families.py
    reads it from config.json). The defaults are LLaMA's."""
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    norm_eps: float  # of every norm, RMSNorm or LayerNorm
    rope: Optional[rope_lib.Rope] = None  # rotary positions (None with learned positions)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False  # biases on every FFN matrix (down's is kept whole when pruning)
    sliding_window: Optional[int] = None  # windowed layers attend to the last this many positions
    # Per layer "sliding_attention" or "full_attention"; None: every layer is windowed when
    # sliding_window is set.
    layer_types: Optional[tuple] = None
    # Per-layer MLP widths of a model pruned non-uniformly; None means all layers use
    # `intermediate_size`.
    intermediate_sizes: Optional[tuple] = None
    norm: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm with bias)
    parallel: bool = False  # attention and MLP both read the block input: x + attn + mlp
    mlp_norm: bool = True  # the MLP has its own norm (post_attention_layernorm)
    post_norm: bool = False  # norms after each residual add (OPT-350m), not before
    final_norm: bool = True
    gated: bool = True  # act(gate x) * up x; else act(fc1 x)
    activation: str = "silu"
    positions: str = "rope"  # "rope", or "learned" (OPT: a table indexed by position + 2)
    qk_norm: bool = False  # a norm on each head's queries and keys (Phi's qk_layernorm)
    lm_head_bias: bool = False
    embed_dim: Optional[int] = None  # token embedding width when it differs from hidden_size
    # Gemma: the windowed layers' rope, embeddings scaled by sqrt(hidden), a norm on each
    # branch's output (sandwich), attention scale and tanh softcaps.
    rope_local: Optional[rope_lib.Rope] = None
    embed_scale: bool = False
    sandwich: bool = False
    attn_scale: Optional[float] = None  # None: 1 / sqrt(head_dim)
    attn_softcap: Optional[float] = None
    logit_softcap: Optional[float] = None

    def __post_init__(self):
        if self.positions == "rope" and self.rope is None:  # direct construction: plain rope
            object.__setattr__(self, "rope", rope_lib.Rope(theta=10000.0, dim=self.head_dim,
                                                          rope_type="default"))

    def windowed(self) -> Optional[tuple]:
        """Per layer whether it attends through the sliding window; None without a window."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return (True,) * self.num_hidden_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def embed_width(self) -> int:
        return self.embed_dim or self.hidden_size

    def mlp_width(self, layer: int) -> int:
        if self.intermediate_sizes is not None:
            return self.intermediate_sizes[layer]
        return self.intermediate_size

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Builds the config from a `config.json` dict (transformers v4 or v5 layout); every field
        it reads is checked for type and range first (config_fields.Fields)."""
        if not isinstance(cfg, dict):
            raise UserError(f"{source}: expected a JSON object of config fields, found "
                            f"{type(cfg).__name__}; restore config.json from the source")
        c = Fields(cfg, source)
        model_type = c.get("model_type", str)
        families.check_features(cfg, source)  # first: a mixtral is refused for its experts
        family = families.family_of(model_type, source)
        return cls(model_type=model_type, vocab_size=c.size("vocab_size"),
                   num_hidden_layers=c.size("num_hidden_layers"), **family.read(c))
