"""Writing a Hugging Face checkpoint folder (`export_hf`) that PyTorch `transformers` loads.

The exported folder holds what `save_pretrained` would write: `config.json` (the source's, with the sliced
FFN width and the dtype written), safetensors weights with HF names (sharded like
transformers above `max_shard_bytes`), `generation_config.json`, the tokenizer files and a
`README.md` model card; optionally `pytorch_model.bin` too. It is written under a temporary
sibling name and renamed into place when complete, so `out_dir` never holds a partial export.
The same weights always give byte-identical files (sorted JSON keys, fixed tensor order, no
timestamps).
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from typing import Callable, Optional

import numpy as np

from prunenet_jax import progress
from prunenet_jax.errors import UserError
from prunenet_jax.files import atomic, output_folder
from prunenet_jax.formats import hf_names
from prunenet_jax.formats.hf import SAFE_WEIGHTS, TORCH_WEIGHTS
from prunenet_jax.formats.safetensors import write_safetensors
from prunenet_jax.models import families, registry
from prunenet_jax.weights import DTYPES, ModelWeights

log = logging.getLogger(__name__)

# Tokenizer files of an HF folder (whichever exist are copied).
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                    "merges.txt", "spiece.model", "*.tiktoken", "chat_template.*")
# Model-card keys shown first, in this order; any other keys follow, sorted.
_CARD_ORDER = ("source", "ratio", "kept", "k", "params_before", "params_after", "seed", "mode",
               "policy_fingerprint", "command")


def export_hf(weights: ModelWeights, out_dir: str, *, model_card: Optional[dict] = None,
              torch_format: bool = False, dtype=None, max_shard_bytes: int = 5 * 2**30,
              overwrite: bool = False) -> str:
    """Writes `weights` as a Hugging Face checkpoint folder at `out_dir`; returns its absolute path.

    dtype: what the weights are stored as (np.float32, ml_dtypes.bfloat16, np.float16 or their
      names); None keeps the dtype the source config declares (float32 if none, e.g. GGUF).
      Tensors are cast while being written, a slice at a time: no second copy of the model.
    torch_format: also write `pytorch_model.bin` (sharded alike), a plain state dict that
      `torch.load(weights_only=True)` reads and `load_state_dict(strict=True)` accepts (a tied
      lm_head is stored as an alias of the embedding, sharing its storage). transformers loads
      the safetensors when both exist; `from_pretrained(path, use_safetensors=False)` the .bin.
    overwrite: replace an existing `out_dir` (the old folder is renamed away, the new one renamed
      in, then the old one deleted); without it an existing `out_dir` is a UserError.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_target(weights, out_dir, overwrite)
    weights.check_shapes()
    torch = _import_torch() if torch_format else None  # fail before writing anything
    dtype = _target_dtype(weights.hf_config, dtype)
    tensors = _ordered_tensors(weights)
    config = _config(weights, dtype)

    try:
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out_dir} ({e.strerror}); choose a writable folder") from None
    output_folder.check_free_space(out_dir, (1 + torch_format) * sum(
        t.size * np.dtype(dtype).itemsize for t in tensors.values()) + 2**16)
    with atomic.staged_dir(out_dir) as tmp:  # renamed to out_dir only once complete
        _write_tokenizer(weights, tmp)  # first: a source without a usable tokenizer fails fast
        _write_sharded(tmp, SAFE_WEIGHTS, tensors, dtype, max_shard_bytes,
                       lambda path, shard, written: write_safetensors(path, shard, {"format": "pt"},
                                                                      dtype, written))
        if torch is not None:
            _write_sharded(tmp, TORCH_WEIGHTS, _with_tied_head(weights, tensors), dtype, max_shard_bytes,
                           lambda path, shard, written: _torch_save(torch, path, shard, dtype, written))
        atomic.write_json(os.path.join(tmp, "config.json"), config, sort_keys=True)
        _write_generation_config(weights, config, tmp)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(render_model_card(config, weights.num_params(), model_card or {}))
        atomic.fsync_tree(tmp)
    log.info("exported %s (%s) to %s", weights.source, _dtype_name(dtype), out_dir)
    return out_dir


def render_model_card(config: dict, num_params: int, card: dict) -> str:
    """README.md: what the model is, the given `card` entries in a stable order, how to load it."""
    arch = (config.get("architectures") or [config.get("model_type", "model")])[0]
    pruned = "ratio" in card  # a plain conversion (no ratio) is not called pruned
    # PruneNet chose the channels only in its own modes; energy/random ones say their mode.
    method = ("PruneNet" if card.get("mode", "sample") in ("sample", "topk")
              else f"prunenet-jax's {card['mode']} mode")
    blocks = ["---\nlibrary_name: transformers\ntags:\n- prunenet\n" + "- pruned\n" * pruned + "---",
              f"# {arch} {f'pruned with {method}' if pruned else 'exported by prunenet-jax'}",
              (f"FFN channels sliced with {method}{' (prunenet-jax)' * (method == 'PruneNet')}. "
               if pruned else "")
              + f"A plain `{config.get('model_type')}` model with {num_params:,} parameters "
              f"({config.get('dtype', config.get('torch_dtype'))}), "
              f"`{_width_key(config)} = {config[_width_key(config)]}`."]
    keys = [k for k in _CARD_ORDER if k in card] + sorted(k for k in card if k not in _CARD_ORDER)
    show = lambda v: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else v
    entries = [f"- **{k}**: {show(card[k])}" for k in keys if k != "command"]
    if entries:
        blocks.append("\n".join(entries))
    if "command" in card:
        command = card["command"]
        command = command if isinstance(command, str) else " ".join(map(str, command))
        blocks.append(f"Command:\n\n```bash\n{command}\n```")
    blocks.append("Load it with PyTorch `transformers`:\n\n```python\n"
                  "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                  'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n'
                  'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n```')
    return "\n\n".join(blocks) + "\n"


def _check_target(weights: ModelWeights, out_dir: str, overwrite: bool) -> None:
    if os.path.lexists(out_dir):
        if not overwrite:
            raise UserError(f"{out_dir} already exists; choose another folder, or pass "
                            "--overwrite to replace it")
        if not os.path.isdir(out_dir):
            raise UserError(f"{out_dir} exists and is not a folder; remove it or choose another path")
    # An input inside out_dir would be deleted by --overwrite; out_dir inside an input folder
    # would write into the input checkpoint.
    output_folder.check_out_dir(out_dir, [weights.tokenizer_dir, weights.gguf_file, weights.source],
                          name=out_dir, replaced=True)


def _import_torch():
    try:
        import torch
    except ImportError:
        raise UserError("writing pytorch_model.bin needs PyTorch, which is not installed; run "
                        "`pip install torch`, or export safetensors only") from None
    return torch


def _target_dtype(hf_config: dict, dtype) -> np.dtype:
    if dtype is None:
        declared = hf_config.get("dtype") or hf_config.get("torch_dtype")
        return DTYPES.get(str(declared), DTYPES["float32"])  # none (GGUF) or exotic: float32
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in DTYPES.values():
        raise UserError(f"export dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return dt


def _dtype_name(dtype: np.dtype) -> str:
    return next(n for n, d in DTYPES.items() if d == dtype)


def _config(weights: ModelWeights, dtype: np.dtype) -> dict:
    """The source config.json with the sliced width and the dtype written; GGUF's
    quantization_config dropped (the export is dense)."""
    config = {k: v for k, v in weights.hf_config.items() if k != "quantization_config"}
    config[_width_key(config)] = weights.config.intermediate_size
    # transformers v5 writes `dtype`, v4 `torch_dtype`: keep the source's spelling.
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
        config[key] = _dtype_name(dtype)
    return config


def _width_key(config: dict) -> str:
    """The config.json field of the FFN width (`intermediate_size`, OPT's `ffn_dim`, ...)."""
    return families.family_of(config.get("model_type")).width_key


def _ordered_tensors(weights: ModelWeights) -> dict[str, np.ndarray]:
    """HF name -> array in model order (embeddings, layer 0, layer 1, ..., norm, head), which also
    decides the shards; fused q/k/v tensors fused again. A tied lm_head is not written
    (transformers ties it on load)."""
    cfg = weights.config
    named = dict(hf_names.hf_named_arrays(cfg, weights.globals, weights.layers))
    if cfg.tie_word_embeddings:
        named.pop(hf_names.global_name(cfg, registry.LM_HEAD), None)
    layer, embed = hf_names.layer_pattern(cfg), hf_names.global_name(cfg, registry.EMBED)

    def key(name):
        m = layer.match(name)
        return (1, int(m.group(1)), name) if m else (0 if name == embed else 2, 0, name)

    return {n: named[n] for n in sorted(named, key=key)}


def _with_tied_head(weights: ModelWeights, tensors: dict) -> dict:
    """For the .bin state dict: a tied lm_head right after the embedding, as the same array."""
    cfg = weights.config
    if not cfg.tie_word_embeddings:
        return tensors
    embed, head = (hf_names.global_name(cfg, n) for n in (registry.EMBED, registry.LM_HEAD))
    out = {}
    for name, array in tensors.items():
        out[name] = array
        if name == embed:
            out[head] = array
    return out


def _write_sharded(folder, filename, tensors, dtype, max_shard_bytes, write) -> None:
    """Splits tensors into shards of at most max_shard_bytes (a bigger tensor gets one of its own)
    and calls write(path, shard, written) (written(nbytes): bytes done, for the progress bar);
    names and index as transformers' save_pretrained. An alias (the same array object under a
    second name) costs no bytes: it shares storage."""
    shards, size, unique = [[]], 0, {}
    for name, array in tensors.items():
        nbytes = 0 if id(array) in unique else array.size * dtype.itemsize
        unique[id(array)] = array
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    stem, ext = os.path.splitext(filename)
    files = [filename] if len(shards) == 1 else [
        f"{stem}-{i + 1:05d}-of-{len(shards):05d}{ext}" for i in range(len(shards))]
    total_size = sum(int(t.size) * dtype.itemsize for t in unique.values())
    bar = progress.counter(total_size, f"writing {filename}", "B", unit_scale=True, unit_divisor=1024)
    for fname, names in zip(files, shards):
        write(os.path.join(folder, fname), {n: tensors[n] for n in names}, bar.update)
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": sum(int(t.size) for t in unique.values()),
                              "total_size": total_size},
                 "weight_map": {n: f for f, names in zip(files, shards) for n in names}}
        atomic.write_json(os.path.join(folder, filename + ".index.json"), index, sort_keys=True)


def _torch_save(torch, path: str, shard: dict, dtype: np.dtype,
                written: Callable[[int], None] = lambda nbytes: None) -> None:
    """A plain {name: tensor} dict, as `torch.load(weights_only=True)` reads it. torch.save needs
    the whole shard at once, so a cast shard is held in memory (float32 arrays are shared, not
    copied). The file name is final: torch.save names the archive's records after it."""
    state, made = {}, {}
    for name, array in shard.items():
        if id(array) not in made:  # an alias reuses the tensor: torch.save stores it once
            a = np.ascontiguousarray(array, dtype=dtype)  # same rounding as the safetensors
            made[id(array)] = (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
                               if dtype == DTYPES["bfloat16"] else torch.from_numpy(a))
        state[name] = made[id(array)]
    torch.save(state, path)
    written(sum(int(a.size) * dtype.itemsize for a in {id(a): a for a in shard.values()}.values()))


def _write_tokenizer(weights: ModelWeights, folder: str) -> None:
    if weights.gguf_file:  # built from the file's metadata, saved as tokenizer.json & co
        from prunenet_jax.formats import gguf_tokenizer

        gguf_tokenizer.load_gguf_tokenizer(weights.gguf_file).save_pretrained(folder)
        return
    src = weights.tokenizer_dir
    if not src or not os.path.isdir(src):
        return
    for fname in sorted(os.listdir(src)):
        path = os.path.join(src, fname)
        if os.path.isfile(path) and any(fnmatch.fnmatch(fname, p) for p in _TOKENIZER_FILES):
            shutil.copyfile(path, os.path.join(folder, fname))
    templates = os.path.join(src, "additional_chat_templates")
    if os.path.isdir(templates):
        shutil.copytree(templates, os.path.join(folder, "additional_chat_templates"))


def _write_generation_config(weights: ModelWeights, config: dict, folder: str) -> None:
    """The source's generation_config.json; else the one transformers derives from config.json
    (what its save_pretrained would write, less the default values)."""
    src = weights.tokenizer_dir and os.path.join(weights.tokenizer_dir, "generation_config.json")
    if src and os.path.isfile(src):
        shutil.copyfile(src, os.path.join(folder, "generation_config.json"))
        return
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if config.get(k) is not None}
    if ids:
        atomic.write_json(os.path.join(folder, "generation_config.json"),
                          {"_from_model_config": True, **ids}, sort_keys=True)
