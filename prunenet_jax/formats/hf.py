"""Reading Hugging Face checkpoint folders (`load_folder`: config.json + single or sharded
safetensors, read tensor by tensor through a memory map; pickle .bin files are never opened).
Writing one is hf_export.py's."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from prunenet_jax.errors import UserError
from prunenet_jax.files import json_files
from prunenet_jax.formats import hf_names
from prunenet_jax.formats.layer_stack import LazyLayerStack
from prunenet_jax.formats.safetensors import SafetensorsFile
from prunenet_jax.models import families, registry
from prunenet_jax.models.config import ModelConfig
from prunenet_jax.weights import ModelWeights, check_shape

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"


# ----------------------------------------------------------------------------- reading

def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{folder} has no config.json; pass the folder of a Hugging Face checkpoint "
                        "(it holds config.json and the safetensors files)")
    return _read_json(path, "restore the file from the source")


def _read_json(path: str, fix: str):
    """A JSON file's value; unreadable or invalid JSON is a UserError naming the file and `fix`.
    NaN/Infinity are read (Python's json, which transformers uses, writes them); the fields used
    are checked by their readers."""
    return json_files.read_json(path, fix=fix, kind=None, constants=True)


def read_weight_map(index: str) -> dict[str, str]:
    """The `weight_map` of a sharded safetensors index: tensor name -> a plain file name in the
    index's folder (no path: an absolute path or `..` would open files outside the checkpoint)."""
    fix = "restore it from the source (it maps tensor names to shard file names)"
    data = _read_json(index, fix)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise UserError(f"{index}: no 'weight_map' object; {fix}")
    for name, fname in weight_map.items():
        if not isinstance(fname, str):
            raise UserError(f"{index}: weight_map[{name!r}] is {fname!r}, not a file name; {fix}")
        if (fname in ("", ".", "..") or "/" in fname or os.sep in fname or "\\" in fname
                or "\0" in fname):
            raise UserError(f"{index}: weight_map[{name!r}] = {fname!r} is not a plain file name "
                            "in the checkpoint folder; shards must sit beside the index")
    return weight_map


def open_shards(folder: str) -> dict[str, SafetensorsFile]:
    """Tensor name -> the file that holds it (single file or sharded with an index)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        weight_map = read_weight_map(index)
        files = {}
        for fname in sorted(set(weight_map.values())):
            path = os.path.join(folder, fname)
            if not os.path.isfile(path):
                raise UserError(f"{index} names {fname}, which is missing from {folder}; "
                                "download the complete checkpoint")
            files[fname] = SafetensorsFile(path)
        for name, fname in weight_map.items():
            if name not in files[fname].keys():
                raise UserError(f"{index} puts tensor {name!r} in {fname}, which does not hold "
                                "it; download the complete checkpoint (index and shards together)")
        return {name: files[fname] for name, fname in weight_map.items()}
    if os.path.isfile(single):
        f = SafetensorsFile(single)
        return {name: f for name in f.keys()}
    hint = " (pickle .bin files are not loaded, for safety)" if any(
        n.endswith(".bin") for n in os.listdir(folder)) else ""
    raise UserError(f"{folder} has no model.safetensors or model.safetensors.index.json{hint}; "
                    "save the model with safetensors (save_pretrained does by default)")


def load_folder(folder: str, dtype=np.float32, source: Optional[str] = None) -> ModelWeights:
    """The checkpoint in `folder`, under canonical names (models/registry.py) whatever its family;
    fused q/k/v tensors are split. A checkpoint saved without the base model's prefix (an OPT
    saved from `OPTModel`: `decoder.layers...`) is read too, as transformers does."""
    source = source or folder
    hf_config = read_config(folder)
    cfg = ModelConfig.from_hf(hf_config, source=os.path.join(folder, "config.json"))
    where = _with_base_prefix(open_shards(folder), cfg)
    shapes = registry.expected_shapes(cfg)
    layer_name = hf_names.layer_pattern(cfg)
    for name in where:  # layers beyond the config mean config and weights disagree
        m = layer_name.match(name)
        if m and int(m.group(1)) >= cfg.num_hidden_layers:
            raise UserError(f"{source}: tensor {name!r} is beyond num_hidden_layers="
                            f"{cfg.num_hidden_layers}; fix config.json or use matching weights")

    def read(name: str, shape: tuple) -> np.ndarray:
        if name not in where:
            raise UserError(f"{source}: tensor {name!r} is missing; the checkpoint is incomplete or "
                            "its config.json describes another model")
        check_shape(source, name, where[name].shape(name), shape, "config.json",
                    "fix config.json or use matching weights")
        return where[name].get(name)

    globals_ = {n: np.array(read(hf_names.global_name(cfg, n), shapes[n]), dtype=dtype)
                for n in registry.global_tensor_names(cfg)}
    prefix = families.family_of(cfg.model_type).layer_prefix
    layers = {}
    for suffix in registry.layer_tensor_names(cfg):
        L, *shape = shapes[suffix]
        hf_suffix, part = hf_names.layer_source(cfg, suffix)
        stacked = None
        for i in range(L):  # fill a preallocated stack: host peak stays near one copy
            if part is None:
                t = read(prefix.format(i) + hf_suffix, tuple(shape))
            else:  # one part of a fused q/k/v
                fused = read(prefix.format(i) + hf_suffix, hf_names.fused_shape(cfg, suffix))
                t = hf_names.split_part(cfg, fused, part)
            if stacked is None:
                stacked = np.empty((L, *shape), dtype=dtype or t.dtype)
            stacked[i] = t
        layers[suffix] = stacked
    return ModelWeights(config=cfg, hf_config=hf_config, globals=globals_, layers=layers,
                        source=source, tokenizer_dir=folder)


def _with_base_prefix(where: dict, cfg: ModelConfig) -> dict:
    """Tensor names with the base model's prefix added where the checkpoint lacks it (transformers
    loads a base model's checkpoint into the *ForCausalLM model the same way)."""
    base = families.family_of(cfg.model_type).layer_prefix.split(".")[0] + "."
    if any(name.startswith(base) for name in where):
        return where
    return {**where, **{base + name: f for name, f in where.items()}}


def load_config(folder: str) -> ModelConfig:
    return ModelConfig.from_hf(read_config(folder), source=os.path.join(folder, "config.json"))


def load_gate_stack(folder: str) -> tuple[ModelConfig, LazyLayerStack]:
    """The config and the scored matrices (L, I, H) (gate, or fc1 of a plain MLP) read layer by
    layer on use, in their stored dtype when it is fp32, bf16 or fp16 (a bf16 checkpoint stays
    bf16 on the device), else fp32."""
    cfg = load_config(folder)
    where = _with_base_prefix(open_shards(folder), cfg)
    scored = registry.scored(cfg)
    prefix = families.family_of(cfg.model_type).layer_prefix
    hf_suffix, part = hf_names.layer_source(cfg, scored)  # part: of a fused gate/up (Phi-3)
    names = [prefix.format(i) + hf_suffix for i in range(cfg.num_hidden_layers)]
    shape = registry.expected_shapes(cfg)[scored]
    stored_shape = shape[1:] if part is None else hf_names.fused_shape(cfg, scored)
    for n in names:
        if n not in where or where[n].shape(n) != stored_shape:
            raise UserError(f"{folder}: tensor {n!r} is missing or has the wrong shape; the "
                            "checkpoint is incomplete or its config.json describes another model")

    def layer(i: int) -> np.ndarray:
        t = where[names[i]].get(names[i])
        return t if part is None else hf_names.split_part(cfg, t, part)

    stored = where[names[0]].get(names[0]).dtype
    dtype = stored if stored.name in ("float32", "bfloat16", "float16") else np.dtype(np.float32)
    return cfg, LazyLayerStack(shape, dtype, layer)


# ----------------------------------------------------------------------------- writing

