"""Rotary position embeddings: every rope type of transformers v5's `ROPE_INIT_FUNCTIONS`, read
from a v4 or v5 `config.json` and computed step by step as transformers computes it.

`from_config` reads and checks the config once (static, hashable `Rope`); `cos_sin` turns traced
positions into transformers' `*RotaryEmbedding.forward` output, including the length-dependent
frequencies of `dynamic_rope_update` (dynamic NTK, longrope); `apply` rotates q or k.

Static frequencies are computed in numpy with transformers' float32 rounding at every step; only
`pow` is done in float64 and rounded once (correctly rounded: torch's CPU and GPU `pow` differ from
it and from each other by at most an ulp).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prunenet_jax.errors import UserError
from prunenet_jax.models.config_fields import Fields

SUPPORTED = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
# Phi-3's config maps its legacy types to longrope (Phi3Config.convert_rope_params_to_dict).
PHI3_TYPE_ALIASES = (("su", "longrope"), ("yarn", "longrope"))
# Parameters without a default in transformers (its validate_rope raises KeyError without them).
_REQUIRED = {
    "linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}
_ORIGINAL = "original_max_position_embeddings"
_f32 = np.float32


@dataclasses.dataclass(frozen=True)
class Rope:
    """What the rotary embedding of a model needs; hashable, as it is static data of a jitted
    model config. `params` holds the type's parameters with transformers' defaults resolved."""
    theta: float
    dim: int           # rotated dims per head: int(head_dim * partial factor), even
                       # (head_dim for proportional, whose unrotated part has frequency 0)
    rope_type: str     # one of SUPPORTED
    params: tuple = ()  # sorted (key, value) pairs; lists stored as tuples
    max_position_embeddings: int = 2048  # the length dynamic NTK scales beyond

    def param(self, key: str) -> Any:
        return dict(self.params)[key]


# ----------------------------------------------------------------------------- reading the config

def from_config(cfg: dict, source: str, head_dim: int, *, max_position_embeddings: int,
                theta_keys=("rope_theta",), partial_keys=("partial_rotary_factor",),
                theta_default: float = 10000.0, partial_default: float = 1.0,
                original_max_position_embeddings: Optional[int] = None,
                type_aliases: tuple = ()) -> Rope:
    """The `Rope` of a config dict, v5 layout (`rope_parameters`) or v4 (`rope_scaling` plus
    top-level theta and partial factor), with transformers' precedence: `rope_scaling` over
    `rope_parameters`; inside them over the top-level `theta_keys` / `partial_keys` (first present
    wins) over the family defaults. `original_max_position_embeddings` is a family default that
    overrides `rope_parameters` like a top-level key does (Phi-3's class attribute, 4096);
    `type_aliases` are a family's legacy type names (Phi-3: PHI3_TYPE_ALIASES)."""
    top = Fields(cfg, source)
    raw, where = top.get("rope_scaling", dict, None), "rope_scaling"
    if not raw:
        raw, where = top.get("rope_parameters", dict, None) or {}, "rope_parameters"
    rp = Fields(raw, f"{source} ({where})")
    nested = sorted(k for k, v in raw.items() if isinstance(v, dict))
    if nested:
        raise UserError(f"{rp.source}: per-layer rope parameters ({', '.join(nested)}) are not "
                        "supported; use a checkpoint with one rope for all layers")
    rope_type = rp.get("rope_type", str, None) or rp.get("type", str, "default")
    rope_type = dict(type_aliases).get(rope_type, rope_type)
    if rope_type not in SUPPORTED:
        raise UserError(f"{rp.source}: rope type {rope_type!r} is not supported (supported: "
                        f"{', '.join(SUPPORTED)}); use a checkpoint with one of those")
    missing = [k for k in _REQUIRED.get(rope_type, ()) if raw.get(k) is None]
    if rope_type == "yarn" and "factor" in raw and raw["factor"] is None:
        missing.remove("factor")  # an explicit null means max/original length (DeepSeek-V3)
    if missing:
        raise UserError(f"{rp.source}: {rope_type} rope scaling lacks {', '.join(missing)}; add "
                        "them to the config as the checkpoint's source defines them")

    theta = _first(rp, top, theta_keys, theta_default)
    partial = _first(rp, top, partial_keys, partial_default, key="partial_rotary_factor")
    if partial > 1:
        raise UserError(f"{source}: partial rotary factor {partial} is not in (0, 1]; fix the "
                        "config")
    dim = head_dim if rope_type == "proportional" else int(head_dim * partial)
    if dim < 2 or dim % 2:
        raise UserError(f"{source}: the rotary dimension int(head_dim {head_dim} * partial rotary "
                        f"factor {partial}) = {dim} is not an even number >= 2; fix the config's "
                        "partial factor")
    if rope_type == "dynamic" and dim == 2:
        raise UserError(f"{source}: dynamic rope needs a rotary dimension > 2 (transformers "
                        "divides by dim - 2); fix the config")

    # Only llama3, yarn and longrope use the pretraining length (standardize_rope_params).
    original = None
    if rope_type not in ("llama3", "yarn", "longrope"):
        pass
    elif top.cfg.get(_ORIGINAL) is not None:
        original = top.size(_ORIGINAL)
    elif original_max_position_embeddings is not None:
        original = original_max_position_embeddings
    else:
        original = rp.size(_ORIGINAL, max_position_embeddings)
    params = _PARAMS[rope_type](rp, dim, original, max_position_embeddings, partial)
    frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    return Rope(theta=theta, dim=dim, rope_type=rope_type, params=tuple(sorted(frozen.items())),
                max_position_embeddings=max_position_embeddings)


def _first(rp: Fields, top: Fields, keys, default: float, key: str = "rope_theta") -> float:
    """`key` of the rope dict, else the first of `keys` at the top level, else `default`."""
    if rp.cfg.get(key) is not None:
        return rp.positive(key)
    for k in keys:
        if top.cfg.get(k) is not None:
            return top.positive(k)
    return float(default)


def _number(f: Fields, key: str, default: Any = None) -> Any:
    """A finite number (int or float), or `default` when absent."""
    value = f.get(key, (int, float), default)
    if value is not default and not math.isfinite(value):
        f.fail(key, f"is {value}, not a finite number")
    return value


def _factors(f: Fields, key: str, dim: int) -> list:
    """A longrope factor list: dim // 2 finite numbers > 0, one per frequency."""
    values = f.get(key, list)
    if len(values) != dim // 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            for v in values):
        f.fail(key, f"must be a list of {dim // 2} finite numbers > 0 (rotary dim {dim} / 2)")
    return [float(v) for v in values]


def _no_params(rp, dim, original, max_len, partial) -> dict:
    return {}


def _factor_only(rp, dim, original, max_len, partial) -> dict:
    return {"factor": rp.positive("factor")}


def _yarn_params(rp, dim, original, max_len, partial) -> dict:
    """`_compute_yarn_parameters`' scalars, with its defaults (factor null: max/original length;
    beta_fast 32 and beta_slow 1 when absent or 0; attention factor from mscale)."""
    factor = max_len / original if rp.cfg.get("factor") is None else rp.positive("factor")
    mscale, mscale_all_dim = _number(rp, "mscale"), _number(rp, "mscale_all_dim")
    attention = None
    if rp.cfg.get("attention_factor") is not None:
        attention = rp.positive("attention_factor")
    if attention is None:
        if mscale and mscale_all_dim:
            attention = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention = _yarn_mscale(factor)
    return {"factor": factor, _ORIGINAL: original, "attention_factor": attention,
            "beta_fast": _number(rp, "beta_fast") or 32, "beta_slow": _number(rp, "beta_slow") or 1,
            "truncate": rp.get("truncate", bool, True)}


def _yarn_mscale(scale, mscale=1) -> float:
    """transformers' `yarn_get_mscale`: 0.1 * mscale * log(scale) + 1 (YaRN, Eq. 21)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _longrope_params(rp, dim, original, max_len, partial) -> dict:
    """`_compute_longrope_parameters`' inputs; factor defaults to max/original length (Phi-3)."""
    factor = rp.positive("factor") if rp.cfg.get("factor") is not None else max_len / original
    if rp.cfg.get("attention_factor") is not None:
        attention = rp.positive("attention_factor")
    elif factor <= 1.0:
        attention = 1.0
    else:
        attention = math.sqrt(1 + math.log(factor) / math.log(original))
    return {"short_factor": _factors(rp, "short_factor", dim),
            "long_factor": _factors(rp, "long_factor", dim),
            "factor": factor, "attention_factor": attention, _ORIGINAL: original}


def _llama3_params(rp, dim, original, max_len, partial) -> dict:
    low, high = rp.positive("low_freq_factor"), rp.positive("high_freq_factor")
    if high <= low:
        rp.fail("high_freq_factor", f"is {high}, not greater than low_freq_factor={low}")
    return {"factor": rp.positive("factor"), "low_freq_factor": low, "high_freq_factor": high,
            _ORIGINAL: original}


def _proportional_params(rp, dim, original, max_len, partial) -> dict:
    factor = rp.positive("factor") if rp.cfg.get("factor") is not None else 1.0
    return {"factor": factor, "partial_rotary_factor": partial}


_PARAMS = {"default": _no_params, "linear": _factor_only, "dynamic": _factor_only,
           "yarn": _yarn_params, "longrope": _longrope_params, "llama3": _llama3_params,
           "proportional": _proportional_params}


# ----------------------------------------------------------------------------- static frequencies

def _pow32(base, exponent: np.ndarray) -> np.ndarray:
    """float32 `base ** exponent`, correctly rounded (transformers does it in float32)."""
    return (np.float64(_f32(base)) ** exponent.astype(np.float64)).astype(_f32)


def _exponents(dim: int) -> np.ndarray:
    """arange(0, dim, 2) / dim in float32, as every init function has it."""
    return np.arange(0, dim, 2).astype(_f32) / _f32(dim)


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    return _f32(1) / _pow32(theta, _exponents(dim))


def _llama3_inv_freq(rope: Rope) -> np.ndarray:
    """`_compute_llama3_parameters`: long wavelengths divided by factor, a smooth ramp between.
    Scalar / tensor is reciprocal-then-multiply in torch (`Tensor.__rdiv__`), so it is here too."""
    p = dict(rope.params)
    factor, low, high, old_len = (p["factor"], p["low_freq_factor"], p["high_freq_factor"],
                                  p[_ORIGINAL])
    inv_freq = _default_inv_freq(rope.theta, rope.dim)
    wavelen = (_f32(1) / inv_freq) * _f32(2 * math.pi)
    scaled = np.where(wavelen > _f32(old_len / low), inv_freq / _f32(factor), inv_freq)
    smooth = ((_f32(1) / wavelen) * _f32(old_len) - _f32(low)) / _f32(high - low)
    smoothed = (_f32(1) - smooth) * scaled / _f32(factor) + smooth * scaled
    medium = ~(wavelen < _f32(old_len / high)) & ~(wavelen > _f32(old_len / low))
    return np.where(medium, smoothed, scaled).astype(_f32)


def _yarn_inv_freq(rope: Rope) -> np.ndarray:
    """`_compute_yarn_parameters`: interpolated (divided by factor) low frequencies, extrapolated
    high ones, a linear ramp between the correction dims of beta_fast and beta_slow."""
    p, dim, base = dict(rope.params), rope.dim, rope.theta

    def correction_dim(rotations):
        return (dim * math.log(p[_ORIGINAL] / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(p["beta_fast"]), correction_dim(p["beta_slow"])
    if p["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoids dividing by zero
    pos_freqs = _pow32(base, _exponents(dim))
    extrapolation = _f32(1) / pos_freqs
    interpolation = _f32(1) / (_f32(p["factor"]) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=_f32) - _f32(low)) / _f32(high - low), 0, 1)
    extrapolation_factor = _f32(1) - ramp
    return (interpolation * (_f32(1) - extrapolation_factor)
            + extrapolation * extrapolation_factor).astype(_f32)


def _longrope_inv_freq(rope: Rope, key: str) -> np.ndarray:
    ext = np.asarray(rope.param(key), _f32)
    return _f32(1) / (ext * _pow32(rope.theta, _exponents(rope.dim)))


def _proportional_inv_freq(rope: Rope) -> np.ndarray:
    """`_compute_proportional_rope_parameters`: the first partial share of the head rotates (with
    head_dim in the exponent), the rest gets frequency 0 (cos 1, sin 0: passed through)."""
    head_dim = rope.dim
    angles = int(rope.param("partial_rotary_factor") * head_dim // 2)
    exponents = np.arange(0, 2 * angles, 2).astype(_f32) / _f32(head_dim)
    rotated = _f32(1) / _pow32(rope.theta, exponents)
    inv_freq = np.concatenate([rotated, np.zeros(head_dim // 2 - angles, _f32)])
    return inv_freq / _f32(rope.param("factor"))


def inv_freq(rope: Rope) -> np.ndarray:
    """The static inverse frequencies (dim // 2,): transformers' `inv_freq` at init, which is
    also what dynamic NTK and longrope use up to their switch length."""
    if rope.rope_type in ("default", "dynamic"):
        return _default_inv_freq(rope.theta, rope.dim)
    if rope.rope_type == "linear":
        return _default_inv_freq(rope.theta, rope.dim) / _f32(rope.param("factor"))
    if rope.rope_type == "longrope":
        return _longrope_inv_freq(rope, "short_factor")
    return {"yarn": _yarn_inv_freq, "llama3": _llama3_inv_freq,
            "proportional": _proportional_inv_freq}[rope.rope_type](rope)


def attention_scaling(rope: Rope) -> float:
    """The factor transformers multiplies cos and sin by (yarn and longrope mscale)."""
    return rope.param("attention_factor") if rope.rope_type in ("yarn", "longrope") else 1.0


# ----------------------------------------------------------------------------- traced parts

def _traced_inv_freq(rope: Rope, positions) -> jax.Array:
    """inv_freq after `dynamic_rope_update`, from seq_len = max(positions) + 1 over the batch, so
    one jitted forward covers every length. Stateless: transformers keeps the largest length seen
    (`max_seq_len_cached`) until a call falls back under max_position_embeddings; with growing
    lengths (prefill then decode) both agree."""
    static = jnp.asarray(inv_freq(rope))
    if rope.rope_type not in ("dynamic", "longrope"):
        return static
    seq_len = jnp.max(positions).astype(jnp.int32) + 1
    if rope.rope_type == "longrope":
        long = jnp.asarray(_longrope_inv_freq(rope, "long_factor"))
        return jnp.where(seq_len > rope.param(_ORIGINAL), long, static)
    # `_compute_dynamic_ntk_parameters` with a tensor seq_len: every step in float32.
    factor, max_len, dim = rope.param("factor"), rope.max_position_embeddings, rope.dim
    length = jnp.maximum(seq_len, max_len).astype(jnp.float32)
    scale = (jnp.float32(factor) * length) / jnp.float32(max_len) - jnp.float32(factor - 1)
    base = jnp.float32(rope.theta) * scale ** jnp.float32(dim / (dim - 2))
    dynamic = jnp.float32(1) / base ** jnp.asarray(_exponents(dim))
    return jnp.where(seq_len > max_len, dynamic, static)


def cos_sin(rope: Rope, positions) -> tuple[jax.Array, jax.Array]:
    """cos and sin (B, T, rope.dim) float32 of positions (B, T), already multiplied by the
    attention scaling, frequencies concatenated twice (rotate-half layout), as transformers'
    `*RotaryEmbedding.forward` returns them."""
    freqs = positions.astype(jnp.float32)[..., None] * _traced_inv_freq(rope, positions)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scale = attention_scaling(rope)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scale != 1.0:
        cos, sin = cos * jnp.float32(scale), sin * jnp.float32(scale)
    return cos, sin


def apply(x, cos, sin):
    """x (B, T, N, D) rotated (rotate-half) on its first cos.shape[-1] dims, the rest passed
    through (partial rotary, as Phi / GPT-NeoX); computed in float32, returned in x.dtype."""
    rot_dim = cos.shape[-1]
    rot = x[..., :rot_dim].astype(jnp.float32)
    half = rot_dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = (rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)
    if rot_dim == x.shape[-1]:
        return out
    return jnp.concatenate([out, x[..., rot_dim:]], axis=-1)
