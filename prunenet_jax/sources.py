"""Loading a model from what the user names: `default`, a .gguf file, an HF folder or a hub id."""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import numpy as np

from prunenet_jax.models import registry
from prunenet_jax.models.config import LlamaConfig
from prunenet_jax.errors import UserError
from prunenet_jax.formats.layer_stack import LazyLayerStack
from prunenet_jax.formats.safetensors import SafetensorsFile
from prunenet_jax.weights import ModelWeights

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def load_model(source: str, dtype=np.float32, revision: Optional[str] = None) -> ModelWeights:
    """Loads weights as host numpy arrays; dtype None keeps the checkpoint's own dtype."""
    kind, path = resolve_source(source, revision)
    if kind == "gguf":
        weights = _gguf().load_gguf(path, dtype=dtype, source=source)
    elif kind == "orbax":
        from prunenet_jax.formats import orbax as checkpoints  # imported on use: orbax is slow to import

        weights = checkpoints.load_model(path, dtype=dtype, source=source)
    else:
        weights = load_hf_folder(path, dtype=dtype, source=source)
    weights.check_finite()
    return weights


def load_config(source: str, revision: Optional[str] = None) -> LlamaConfig:
    """The model's config without reading its weights: what launchers validate flags against
    before the heavy load (a hub id is still downloaded)."""
    kind, path = resolve_source(source, revision)
    if kind == "gguf":
        return _gguf().load_gguf_config(path)
    if kind == "orbax":
        from prunenet_jax.formats import orbax as checkpoints

        return checkpoints.load_config(path)
    return LlamaConfig.from_hf(read_config(path), source=os.path.join(path, "config.json"))


def resolve_source(source: str, revision: Optional[str] = None) -> tuple[str, str]:
    """("gguf", file), ("hf", local folder) or ("orbax", a sliced model checkpoint of ours) for
    what the user named; a hub id is downloaded, anything else that is not a model gets a clear
    error."""
    if source == "default":
        return "gguf", _gguf().default_model_path()
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "_CHECKPOINT_METADATA")):
            return "orbax", source
        return "hf", source
    if os.path.isfile(source):
        if source.endswith(".gguf"):
            return "gguf", source
        raise UserError(f"{source} is a file but not a .gguf file; pass a Hugging Face folder "
                        "(with config.json and safetensors), a .gguf file, a hub id or 'default'")
    if not _HUB_ID.match(source) or source.endswith(".gguf"):
        raise UserError(f"{source}: no such file or folder; pass an existing Hugging Face folder, "
                        "a '.gguf' file, a hub id like 'org/name', or 'default'")
    return "hf", download(source, revision)


def _gguf():
    from prunenet_jax.formats import gguf as gguf_io  # imported on use: only GGUF sources need the gguf package

    return gguf_io


def download(repo_id: str, revision: Optional[str] = None) -> str:
    """Fetches config, safetensors and tokenizer files of a hub model; returns the local folder."""
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(
            repo_id, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"])
    except Exception as e:  # the hub raises many types: offline, 404, gated, bad revision
        raise UserError(f"{repo_id} is not a local path, and downloading it from the Hugging Face "
                        f"hub failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        "check the name and revision, the network, or pass a local folder") from None


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{folder} has no config.json; pass the folder of a Hugging Face checkpoint "
                        "(it holds config.json and the safetensors files)")
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore the file from the source") from None


def _open_shards(folder: str) -> dict[str, SafetensorsFile]:
    """Tensor name -> the file that holds it (single file or sharded with an index)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, UnicodeDecodeError):
            raise UserError(f"{index} is not a valid safetensors index; restore it from the source") from None
        files = {}
        for fname in sorted(set(weight_map.values())):
            path = os.path.join(folder, fname)
            if not os.path.isfile(path):
                raise UserError(f"{index} names {fname}, which is missing from {folder}; "
                                "download the complete checkpoint")
            files[fname] = SafetensorsFile(path)
        return {name: files[fname] for name, fname in weight_map.items()}
    if os.path.isfile(single):
        f = SafetensorsFile(single)
        return {name: f for name in f.keys()}
    hint = " (pickle .bin files are not loaded, for safety)" if any(
        n.endswith(".bin") for n in os.listdir(folder)) else ""
    raise UserError(f"{folder} has no model.safetensors or model.safetensors.index.json{hint}; "
                    "save the model with safetensors (save_pretrained does by default)")


def load_hf_folder(folder: str, dtype=np.float32, source: Optional[str] = None) -> ModelWeights:
    source = source or folder
    hf_config = read_config(folder)
    cfg = LlamaConfig.from_hf(hf_config, source=os.path.join(folder, "config.json"))
    where = _open_shards(folder)
    shapes = registry.expected_shapes(cfg)
    for name in where:  # layers beyond the config mean config and weights disagree
        m = _LAYER_NAME.match(name)
        if m and int(m.group(1)) >= cfg.num_hidden_layers:
            raise UserError(f"{source}: tensor {name!r} is beyond num_hidden_layers="
                            f"{cfg.num_hidden_layers}; fix config.json or use matching weights")

    def read(name: str, shape: tuple) -> np.ndarray:
        if name not in where:
            raise UserError(f"{source}: tensor {name!r} is missing; the checkpoint is incomplete or "
                            "its config.json describes another model")
        found = where[name].shape(name)
        if found != tuple(shape):
            raise UserError(f"{source}: tensor {name!r} has shape {found} but config.json implies "
                            f"{tuple(shape)}; fix config.json or use matching weights")
        return where[name].get(name)

    globals_ = {n: np.array(read(n, shapes[n]), dtype=dtype) for n in registry.global_tensor_names(cfg)}
    layers = {}
    for suffix in registry.layer_tensor_names(cfg):
        L, *shape = shapes[suffix]
        stacked = None
        for i in range(L):  # fill a preallocated stack: host peak stays near one copy
            t = read(registry.LAYER_PREFIX.format(i) + suffix, tuple(shape))
            if stacked is None:
                stacked = np.empty((L, *shape), dtype=dtype or t.dtype)
            stacked[i] = t
        layers[suffix] = stacked
    return ModelWeights(config=cfg, hf_config=hf_config, globals=globals_, layers=layers,
                        source=source, tokenizer_dir=folder)


def load_gate_stack(source: str, revision: Optional[str] = None) -> tuple[LlamaConfig, LazyLayerStack]:
    """The config and the gate matrices (L, I, H) as a float32 stack read layer by layer on use
    (multi-host training: each host reads only the layers of its own devices)."""
    kind, source = resolve_source(source, revision)
    if kind == "gguf":
        return _gguf().gguf_gate_stack(source)
    if kind == "orbax":  # a sliced model of ours: small enough to read whole
        weights = load_model(source)
        return weights.config, weights.layers[registry.GATE]
    cfg = LlamaConfig.from_hf(read_config(source), source=os.path.join(source, "config.json"))
    where = _open_shards(source)
    names = [registry.LAYER_PREFIX.format(i) + registry.GATE for i in range(cfg.num_hidden_layers)]
    shape = registry.expected_shapes(cfg)[registry.GATE]
    for n in names:
        if n not in where or where[n].shape(n) != shape[1:]:
            raise UserError(f"{source}: tensor {n!r} is missing or has the wrong shape; the "
                            "checkpoint is incomplete or its config.json describes another model")
    return cfg, LazyLayerStack(shape, np.float32, lambda i: where[names[i]].get(names[i]))


def load_tokenizer(weights: ModelWeights):
    """The tokenizer that belongs to the loaded model (HF folder files, or built from GGUF)."""
    if weights.gguf_file:
        return _gguf().load_gguf_tokenizer(weights.gguf_file)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(weights.tokenizer_dir)
    except Exception as e:
        raise UserError(f"{weights.source}: no usable tokenizer in {weights.tokenizer_dir} "
                        f"({type(e).__name__}); add the tokenizer files of the source model") from None
