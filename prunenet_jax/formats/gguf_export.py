"""Writing a model as a GGUF file that llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs.

The file holds the architecture's metadata (gguf_metadata.py) with the pruned FFN width, the
tokenizer (gguf_vocab.py), `general.*` keys saying what was pruned how, and the tensors under
llama.cpp's names in its layouts: the q/k rows of `llama` models permuted for ggml's rope, Gemma's
norms stored as w + 1, Falcon's, GPT-NeoX's and Phi-3's q/k/v fused into one `attn_qkv`, Phi-3's
gate and up into one `ffn_up`. Types (`GGUF_TYPES`): norms, biases and rope factors are always
float32 (as llama.cpp's converter keeps them); matrices take the chosen type, and a q8_0 matrix
whose rows are not whole 32-value blocks (a down projection pruned to a width that is not a
multiple of 32) falls back to f16, as the converter does.

Streaming: the header (metadata and every tensor's name, shape and type) is written first, then
each tensor is made from the model (cast, transformed, fused, quantised) just before it is written.
A tensor stored as the model holds it (embeddings, head, FFN matrices: the largest) is cast and
encoded BLOCK_BYTES of float32 rows at a time; only transformed or fused ones (q/k, norms, fused
q/k/v) are made whole, so memory holds the model plus about one attention matrix. Before any
tensor data, the written metadata is read back with our own GGUF reader and the model it
describes is compared with the source's: a field the file would not carry is refused then. The file is written in a staged folder renamed into
place when complete (files/atomic.py), so a partial file never looks finished.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import Callable, Optional

import numpy as np

from prunenet_jax import progress
from prunenet_jax.errors import UserError
from prunenet_jax.files import atomic, output_folder
from prunenet_jax.formats import gguf_metadata, gguf_vocab
from prunenet_jax.formats.gguf_config import gguf_hf_config
from prunenet_jax.models import families, registry
from prunenet_jax.models.config import ModelConfig
from prunenet_jax.weights import ModelWeights

log = logging.getLogger(__name__)

# --gguf_type -> (matrix type, llama.cpp's general.file_type). f16 is the default: what llama.cpp's
# converter writes by default, lossless for fp16 checkpoints and within bf16's rounding for bf16
# ones, and the input llama-quantize expects for its k-quants (re-quantising a q8_0 file loses
# twice). q8_0 halves the size at a small loss; f32 is exact; bf16 keeps bf16 checkpoints bit-exact.
GGUF_TYPES = ("f16", "bf16", "q8_0", "f32")
DEFAULT_GGUF_TYPE = "f16"
TYPE_HELP = ("GGUF tensor type of the matrices (norms and biases stay f32): f16 (default: what "
             "llama.cpp's converter writes, and what llama-quantize takes to any smaller type), "
             "bf16, q8_0 (half of f16's size, a small loss; rows not of whole 32-value blocks fall "
             "back to f16), f32 (exact)")


BLOCK_BYTES = 16 * 2**20  # float32 rows cast and encoded at a time (a tensor stored as it is)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple  # numpy (HF) order
    qtype: object  # gguf.GGMLQuantizationType
    make: Callable[[], np.ndarray]  # float32, HF layout, llama.cpp's transforms applied
    # the model's own array when the file stores it only cast (no transform, not fused): written
    # a block of rows at a time, never whole in float32
    stored: Optional[Callable[[], np.ndarray]] = None


def check_exportable(config: ModelConfig, *, gguf_file: Optional[str],
                     tokenizer_dir: Optional[str], source: str) -> None:
    """Refuses, before any training, a model whose GGUF file would be wrong or incomplete: no
    llama.cpp architecture, a feature its files cannot hold, a tokenizer we cannot convert. Writes
    the file's header (no tensor data) to a temporary folder and reads it back, as the export
    does."""
    gguf_metadata.check_writable(config, source)
    gguf_vocab.check_tokenizer(gguf_file, tokenizer_dir, source)
    with tempfile.TemporaryDirectory(prefix="prunenet-gguf-check-") as tmp:
        path = os.path.join(tmp, "check.gguf")
        writer = _open(path, config, {}, "f32", source, gguf_file=gguf_file, tokenizer_dir=None)
        try:
            tensors = _plan(config, None, "f32", writer.rope_tensors)
            _write_header(writer, tensors)
            _check_round_trip(writer, path, tensors, config, source)
        finally:
            writer.close()


def export_gguf(weights: ModelWeights, out_dir: str, *, gguf_type: str = DEFAULT_GGUF_TYPE,
                model_card: Optional[dict] = None, overwrite: bool = False) -> str:
    """Writes `weights` as `<out_dir>/<name>.gguf` (out_dir staged and renamed into place whole);
    returns the file's path. model_card: what the model card of the HF export says (ratio, mode,
    source, ...), written as general.* and prunenet.* keys."""
    check_type(gguf_type)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir) and not overwrite:
        raise UserError(f"{out_dir} already exists; choose another folder, or pass --overwrite")
    output_folder.check_out_dir(out_dir, [weights.tokenizer_dir, weights.gguf_file, weights.source],
                                name=out_dir, replaced=True)
    weights.check_shapes()
    gguf_metadata.check_writable(weights.config, weights.source)
    card = dict(model_card or {})
    name = file_name(weights.source, card)
    with atomic.staged_dir(out_dir) as tmp:
        path = os.path.join(tmp, name)
        writer = _open(path, weights.config, card, gguf_type, weights.source,
                       gguf_file=weights.gguf_file, tokenizer_dir=weights.tokenizer_dir)
        try:
            tensors = _plan(weights.config, weights, gguf_type, writer.rope_tensors)
            output_folder.check_free_space(out_dir, sum(_nbytes(t) for t in tensors) + 2**24)
            _warn_fallbacks(tensors, gguf_type)
            _write_header(writer, tensors)
            _check_round_trip(writer, path, tensors, weights.config, weights.source)
            _write_tensors(writer, tensors, name)
        finally:
            writer.close()
        atomic.fsync_tree(tmp)
    log.info("exported %s (%s) to %s", weights.source, gguf_type, os.path.join(out_dir, name))
    return os.path.join(out_dir, name)


def check_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf_type={gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")


def file_name(source: str, card: dict) -> str:
    """`<source name>[-pruned-<ratio>].gguf`: the source's base name and the ratio."""
    base = os.path.basename(os.path.normpath(str(card.get("source") or source)))
    base = base[:-5] if base.endswith(".gguf") else base
    base = "".join(c if c.isalnum() or c in "-_." else "-" for c in base).strip("-.") or "model"
    ratio = card.get("ratio")
    return f"{base}{f'-pruned-{ratio}' if ratio is not None else ''}.gguf"


def find_gguf(folder: str) -> Optional[str]:
    """The .gguf file of an export folder (None if none)."""
    if not os.path.isdir(folder):
        return None
    found = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return os.path.join(folder, found[0]) if found else None


# ----------------------------------------------------------------------------- the plan

def _open(path, config, card, gguf_type, source, *, gguf_file, tokenizer_dir):
    """A GGUFWriter on `path` with every key added; `rope_tensors` holds the rope tensors the
    architecture keeps its scaling in. Without a tokenizer source (the check) no tokenizer keys."""
    import gguf

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every step at INFO
    writer = gguf.GGUFWriter(path, gguf_metadata.gguf_arch(config, source))
    writer.add_type(gguf.GGUFType.MODEL)
    writer.rope_tensors = gguf_metadata.add_arch_metadata(writer, config, source)
    _add_general(writer, card, gguf_type, source)
    if gguf_file or tokenizer_dir:
        gguf_vocab.add_tokenizer(writer, gguf_file, tokenizer_dir, source, config.vocab_size)
    return writer


def _add_general(writer, card: dict, gguf_type: str, source: str) -> None:
    import gguf

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(ftype[gguf_type])
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    src = str(card.get("source") or source)
    name = os.path.basename(os.path.normpath(src))
    ratio, mode = card.get("ratio"), card.get("mode")
    writer.add_name(f"{name} pruned {ratio}" if ratio is not None else name)
    if ratio is not None:
        writer.add_description(
            f"{name} with {ratio:.0%} of each layer's FFN channels pruned by prunenet-jax "
            f"(mode {mode}{', guard' if card.get('guard') else ''}): feed_forward_length "
            f"{card.get('kept')}")
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, name)
    for key in ("ratio", "mode", "kept", "seed", "policy_fingerprint", "params_before",
                "params_after"):
        value = card.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or isinstance(value, str):
            writer.add_string(f"prunenet.{key}", str(value))
        elif isinstance(value, int):
            writer.add_uint64(f"prunenet.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"prunenet.{key}", value)
    writer.add_string("prunenet.source", src)


def _plan(config: ModelConfig, weights: Optional[ModelWeights], gguf_type: str,
          extra: Optional[dict]) -> list[_Tensor]:
    """Every tensor of the file in order: rope tensors (`extra`), embeddings, each layer, final
    norm, head. Without weights (the pre-training check) the tensors have shapes and no data."""
    import gguf

    family = families.family_of(config.model_type)
    expected = registry.expected_shapes(config)
    to_file = families.gguf_transforms(config, to_file=True)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]

    def tensor(name, shape, make):
        stored = getattr(make, "stored", None)
        return _Tensor(name, tuple(shape), _type_of(name, shape, qtype), make, stored)

    def source(canonical, layer=None):
        def stored():
            return (weights.globals[canonical] if layer is None
                    else weights.layers[canonical][layer])

        def make():
            arr = np.asarray(stored(), dtype=np.float32)
            return to_file[canonical](arr) if canonical in to_file else arr
        if canonical not in to_file:
            make.stored = stored
        return make

    out = [tensor(n, a.shape, lambda a=a: a) for n, a in (extra or {}).items()]
    globals_ = registry.global_tensor_names(config)
    out.append(tensor(registry.GGUF_GLOBAL[registry.EMBED], expected[registry.EMBED],
                      source(registry.EMBED)))
    for i in range(config.num_hidden_layers):
        for gguf_name, (shape, make) in _layer(config, family, expected, source, i).items():
            out.append(tensor(f"blk.{i}.{gguf_name}", shape, make))
    for name in globals_:
        if name != registry.EMBED:
            out.append(tensor(registry.GGUF_GLOBAL[name], expected[name], source(name)))
    return out


def _layer(config, family, expected, source, i) -> dict:
    """Layer i: llama.cpp suffix -> (shape, make), fused tensors concatenated."""
    out = {}
    fused = {}
    for name in registry.layer_tensor_names(config):
        shape = expected[name][1:]
        if family.gguf_fused_qkv and name in registry.QKV_PART:
            fused.setdefault(f"{registry.GGUF_QKV}.{name.rsplit('.', 1)[1]}", []).append(
                (registry.QKV_PART[name], shape, source(name, i)))
        elif family.gguf_fused_gate_up and name in registry.GATE_UP_PART:
            fused.setdefault(registry.GGUF_GATE_UP, []).append(
                (registry.GATE_UP_PART[name], shape, source(name, i)))
        else:
            out[family.gguf_layer_name(config, name)] = (shape, source(name, i))
    for suffix, parts in fused.items():
        parts = sorted(parts, key=lambda p: p[0])
        shape = (sum(p[1][0] for p in parts),) + parts[0][1][1:]
        makes = [p[2] for p in parts]
        out[suffix] = (shape, lambda makes=makes: np.concatenate([m() for m in makes]))
    return out


def _type_of(name: str, shape: tuple, qtype):
    """Matrices take the chosen type, q8_0 only on whole 32-value rows (else f16); vectors and
    the rope factor tensors stay float32."""
    import gguf

    if len(shape) < 2 or not name.endswith(".weight") or name.startswith("rope_"):
        return gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if shape[-1] % block:
            return gguf.GGMLQuantizationType.F16
    return qtype


def _warn_fallbacks(tensors: list[_Tensor], gguf_type: str) -> None:
    import gguf

    if gguf_type != "q8_0":
        return
    fell = sorted({t.name.split(".", 2)[-1] for t in tensors
                   if len(t.shape) == 2 and t.qtype == gguf.GGMLQuantizationType.F16})
    if fell:
        width = next(t.shape[-1] for t in tensors if t.name.endswith(fell[0]))
        progress.warning(f"{', '.join(fell)}: rows of {width} values are not whole q8_0 blocks of 32, "
                      "so these tensors are written as f16 (as llama.cpp's converter does); a "
                      "kept width that is a multiple of 32 quantises them too")


def _nbytes(t: _Tensor) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[t.qtype]
    return int(np.prod(t.shape[:-1], dtype=np.int64)) * (t.shape[-1] // block) * size


def _encode(t: _Tensor, arr: np.ndarray) -> np.ndarray:
    from gguf import quants

    if arr.shape != t.shape:
        raise AssertionError(f"{t.name}: made {arr.shape}, planned {t.shape}")
    return quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), t.qtype)


# ----------------------------------------------------------------------------- writing

def _write_header(writer, tensors: list[_Tensor]) -> None:
    import gguf

    for t in tensors:
        raw = t.qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        if raw:  # byte shape: quant_shape_from_byte_shape turns it back
            shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
            writer.add_tensor_info(t.name, shape, np.dtype(np.uint8), _nbytes(t), raw_dtype=t.qtype)
        else:
            dtype = np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), _nbytes(t), raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


def _check_round_trip(writer, path, tensors, config: ModelConfig, source: str) -> None:
    """Reads the header just written (its tensor data is a hole of zeros, never read) and refuses
    a file whose model would differ from `config`."""
    import gguf

    f = writer.fout[0]
    f.flush()
    end = f.tell()  # the writer goes on from here (write_tensor_data pads to the alignment)
    end += -end % writer.data_alignment
    total = end + sum(_nbytes(t) + (-_nbytes(t) % writer.data_alignment) for t in tensors)
    os.truncate(path, total)  # a sparse file: the reader maps it without reading
    small = {t.name: t for t in tensors if t.name.startswith("rope_")}
    if small:  # the reader reads these (rope scaling): write them into their places
        offsets = _offsets(tensors, writer.data_alignment, end)
        with open(path, "r+b") as out:
            for name, t in small.items():
                out.seek(offsets[name])
                out.write(_encode(t, t.make()).tobytes())
    reader = gguf.GGUFReader(path)
    read = ModelConfig.from_hf(gguf_hf_config(reader, path), source=path)
    _compare(config, read, source)


def _offsets(tensors, alignment, start) -> dict:
    out, at = {}, start
    for t in tensors:
        out[t.name] = at
        at += _nbytes(t) + (-_nbytes(t) % alignment)
    return out


# ModelConfig fields llama.cpp's architecture does not carry, which a file may lose with a
# warning: the model_type (mistral is written as llama) and, for architectures without windows,
# the sliding window (llama.cpp runs such files with full attention, as it runs the ones its own
# converter writes).
_MAY_DIFFER = ("model_type",)
_WINDOW_FIELDS = ("sliding_window", "layer_types")


def _compare(want: ModelConfig, got: ModelConfig, source: str) -> None:
    dropped_window = False
    for field in dataclasses.fields(ModelConfig):
        a, b = getattr(want, field.name), getattr(got, field.name)
        if field.name in _MAY_DIFFER or a == b:
            continue
        if field.name in _WINDOW_FIELDS and got.sliding_window is None:
            dropped_window = True
            continue
        if field.name == "rope" and a is not None and b is not None and _same_rope(a, b):
            continue
        raise UserError(f"{source}: a GGUF file cannot carry this model's {field.name} ({a!r}; the "
                        f"file would say {b!r}), so llama.cpp would run another model; export it "
                        "as a Hugging Face folder (--export_hf) instead")
    if dropped_window and want.sliding_window is not None:
        progress.warning(f"{source}: llama.cpp's {gguf_metadata.gguf_arch(want, source)} architecture "
                      f"has no sliding window: the GGUF file runs every layer with full attention "
                      f"(the model's window is {want.sliding_window} tokens), as llama.cpp runs "
                      "files its own converter makes of this model")


def _same_rope(a, b) -> bool:
    """Equal ropes up to max_position_embeddings (the length dynamic scaling starts at, unused by
    the rope types a file carries) and float32 rounding of the stored values."""
    if (a.rope_type, a.dim) != (b.rope_type, b.dim) or not _close(a.theta, b.theta):
        return False
    pa, pb = dict(a.params), dict(b.params)
    return pa.keys() == pb.keys() and all(_close(pa[k], pb[k]) for k in pa)


def _close(x, y) -> bool:
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(_close(u, v) for u, v in zip(x, y))
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return bool(np.float32(x) == np.float32(y)) or abs(x - y) <= 1e-6 * max(abs(x), abs(y))
    return x == y


def _write_tensors(writer, tensors: list[_Tensor], name: str) -> None:
    bar = progress.counter(sum(_nbytes(t) for t in tensors), f"writing {name}", "B",
                           unit_scale=True, unit_divisor=1024)
    for t in tensors:
        data = _encode(t, t.make()) if t.stored is None else _RowBlocks(t)
        writer.write_tensor_data(data)
        bar.update(data.nbytes)
        del data
    bar.close()
    writer.fout[0].flush()
    os.fsync(writer.fout[0].fileno())


class _RowBlocks:
    """A stored-as-is tensor as the writer takes an array (`nbytes`, `tofile`), cast and encoded
    BLOCK_BYTES of float32 rows at a time: the same bytes as encoding it whole (every type's
    blocks lie within a row)."""

    def __init__(self, t: _Tensor):
        self.t, self.nbytes = t, _nbytes(t)

    def tofile(self, f) -> None:
        arr = self.t.stored()
        if tuple(arr.shape) != self.t.shape:
            raise AssertionError(f"{self.t.name}: stored {arr.shape}, planned {self.t.shape}")
        rows = arr.reshape(-1, arr.shape[-1]) if arr.ndim > 1 else arr.reshape(1, -1)
        step = max(1, BLOCK_BYTES // (4 * rows.shape[1]))
        written = 0
        for start in range(0, rows.shape[0], step):
            block = np.asarray(rows[start:start + step], dtype=np.float32)
            data = _encode(dataclasses.replace(self.t, shape=block.shape), block)
            data.tofile(f)
            written += data.nbytes
        if written != self.nbytes:
            raise AssertionError(f"{self.t.name}: wrote {written} bytes, planned {self.nbytes}")
