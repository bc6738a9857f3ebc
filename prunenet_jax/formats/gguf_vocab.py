"""The tokenizer a GGUF export carries: llama.cpp's `tokenizer.*` metadata.

- From a GGUF source, every `tokenizer.*` key is copied as the source holds it (type and bytes).
- From a Hugging Face folder, a byte-level BPE `tokenizer.json` (GPT-2 style: SmolLM, Llama 3,
  Qwen, GPT-NeoX, Falcon, Phi-2) is converted as llama.cpp's converter does it: tokens in id
  order padded to the vocabulary size with `[PAD<i>]` (unused), token types (added special tokens
  control, other added tokens user-defined), the merges, special token ids, add-BOS/EOS flags and
  the chat template (gguf.vocab.SpecialVocab), and `tokenizer.ggml.pre`, the name llama.cpp gives
  the pre-tokenizer. llama.cpp's converter finds that name by hashing the tokenizer's output on a
  test text; we read the pre-tokenizer itself from tokenizer.json and know the common ones
  (`PRE_TOKENIZERS`). Anything else (sentencepiece-style vocabularies of an HF folder, an unknown
  pre-tokenizer, no tokenizer) is refused by `check_tokenizer` before any work, naming what is
  missing: a GGUF source of the same model carries its tokenizer whole.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from prunenet_jax.errors import UserError

TOKENIZER_JSON = "tokenizer.json"

# GPT-2's pre-tokenizer regex (ByteLevel with use_regex) and the Split patterns of others.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
           r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
          r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Pre-tokenizer (as `_describe` writes it) -> llama.cpp's tokenizer.ggml.pre.
PRE_TOKENIZERS = {
    ("bytelevel",): "gpt2",
    ("digits", "bytelevel"): "smollm",  # \p{N} singly, then GPT-2's regex (SmolLM, StarCoder)
    (f"split:{_LLAMA3}", "bytelevel-noregex"): "llama-bpe",
    (f"split:{_QWEN2}", "bytelevel-noregex"): "qwen2",
}


def check_tokenizer(gguf_file: Optional[str], tokenizer_dir: Optional[str], source: str) -> None:
    """Refuses, before any work, a source whose tokenizer a GGUF file cannot be given."""
    if gguf_file:
        return
    _hf_tokenizer(tokenizer_dir, source)


def add_tokenizer(writer, gguf_file: Optional[str], tokenizer_dir: Optional[str], source: str,
                  vocab_size: int) -> None:
    """Adds the tokenizer metadata to a gguf.GGUFWriter (the source GGUF's, or the HF folder's
    tokenizer.json converted)."""
    if gguf_file:
        _copy_gguf_tokenizer(writer, gguf_file)
        return
    import gguf

    tok = _hf_tokenizer(tokenizer_dir, source)
    tokens, types = _bpe_tokens(tok, vocab_size, source)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_name(tok, source))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)


def _copy_gguf_tokenizer(writer, path: str) -> None:
    """Every tokenizer.* key of the file, with its type; strings as their raw bytes."""
    from gguf import GGUFValueType

    from prunenet_jax.formats.gguf_file import open_gguf

    for key, field in open_gguf(path).fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == GGUFValueType.STRING:
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = [v.item() for i in field.data for v in field.parts[i]]
            writer.add_key_value(key, value, kind, sub_type=sub)
        elif kind == GGUFValueType.STRING:
            writer.add_key_value(key, bytes(field.parts[field.data[0]]), kind)
        else:
            writer.add_key_value(key, field.parts[field.data[0]][0].item(), kind)


def _hf_tokenizer(tokenizer_dir: Optional[str], source: str) -> dict:
    """The folder's tokenizer.json, checked to be one we convert."""
    path = tokenizer_dir and os.path.join(tokenizer_dir, TOKENIZER_JSON)
    if not path or not os.path.isfile(path):
        raise UserError(f"{source}: no {TOKENIZER_JSON} to write into the GGUF file (llama.cpp needs "
                        "the tokenizer in it); add the model's tokenizer.json to the folder, or "
                        "prune the model's GGUF file, whose tokenizer is copied as it is")
    try:
        with open(path, encoding="utf-8") as f:
            tok = json.load(f)
        model = tok["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a readable tokenizer.json ({e}); restore it from the "
                        "model's source") from None
    byte_level = (model.get("type") == "BPE" and not model.get("byte_fallback", False)
                  and (tok.get("decoder") or {}).get("type") == "ByteLevel")
    if not byte_level:
        raise UserError(f"{path}: a {model.get('type')} tokenizer"
                        f"{' with byte fallback (sentencepiece style)' * bool(model.get('byte_fallback'))}"
                        " cannot be converted to GGUF here (byte-level BPE only); prune the "
                        "model's GGUF file instead (its tokenizer is copied), or convert the "
                        "exported HF folder with llama.cpp's convert_hf_to_gguf.py")
    _pre_name(tok, path)
    return tok


def _describe(pre: Optional[dict]) -> tuple:
    """A pre-tokenizer as a tuple of its steps' kinds (a Split with its regex)."""
    if not pre:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(step for p in pre.get("pretokenizers", []) for step in _describe(p))
    if kind == "ByteLevel":
        return ("bytelevel" if pre.get("use_regex", True) else "bytelevel-noregex",)
    if kind == "Digits":
        return ("digits",) if pre.get("individual_digits") else ("digits-grouped",)
    if kind == "Split":
        pattern = pre.get("pattern") or {}
        return (f"split:{pattern.get('Regex', pattern.get('String'))}",)
    return (kind,)


def _pre_name(tok: dict, source: str) -> str:
    steps = _describe(tok.get("pre_tokenizer"))
    if steps not in PRE_TOKENIZERS:
        raise UserError(f"{source}: its pre-tokenizer ({' + '.join(steps) or 'none'}) has no "
                        f"llama.cpp name known here (known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}); "
                        "prune the model's GGUF file instead (its tokenizer is copied), or convert "
                        "the exported HF folder with llama.cpp's convert_hf_to_gguf.py")
    return PRE_TOKENIZERS[steps]


def _bpe_tokens(tok: dict, vocab_size: int, source: str) -> tuple[list, list]:
    """Tokens in id order padded to vocab_size, and their llama.cpp token types."""
    import gguf

    by_id = {int(i): t for t, i in tok["model"].get("vocab", {}).items()}
    added = {int(a["id"]): a for a in tok.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if by_id and max(by_id) >= vocab_size:
        raise UserError(f"{source}: the tokenizer has token id {max(by_id)}, beyond the model's "
                        f"{vocab_size} embeddings; the tokenizer is not this model's")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the converter's padding of a vocabulary smaller than the embeddings
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special")
                         else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types
