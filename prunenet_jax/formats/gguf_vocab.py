"""The tokenizer a GGUF export carries: llama.cpp's `tokenizer.*` metadata.

- From a GGUF source, every `tokenizer.*` key is copied as the source holds it (type and bytes).
- From a Hugging Face folder, `tokenizer.json` is converted as llama.cpp's converter does it:
  tokens in id order padded to the vocabulary size with `[PAD<i>]` (unused), token types (added
  special tokens control, other added tokens user-defined), special token ids, add-BOS/EOS flags
  and the chat template (gguf.vocab.SpecialVocab). Two kinds:
  - byte-level BPE (`gpt2`: SmolLM, Llama 3, Qwen, GPT-NeoX, Falcon, Phi-2): the merges, and
    `tokenizer.ggml.pre`, the name llama.cpp gives the pre-tokenizer. llama.cpp's converter finds
    that name by hashing the tokenizer's output on a test text; we read the pre-tokenizer itself
    from tokenizer.json and know the common ones (`PRE_TOKENIZERS`).
  - sentencepiece-style BPE with byte fallback (`llama`: LLaMA-2, Mistral, Gemma, Phi-3): llama.cpp
    applies no merges here but merges the adjacent pair whose joined token scores highest, so each
    token's score is minus the rank of the first merge that makes it (`spm_scores`); `<0xNN>`
    tokens are bytes, the unknown token unknown, and `add_space_prefix` is read from the
    normalizer/pre-tokenizer (`_space_prefix`). gguf.vocab.LlamaHfVocab gives every token the
    score -1000, which llama.cpp would tokenize as characters, so this is written here.
  Anything else (Unigram or WordPiece models, an unknown pre-tokenizer or normalizer, no
  tokenizer) is refused by `check_tokenizer` before any work, naming what is missing: a GGUF source
  of the same model carries its tokenizer whole.
"""
from __future__ import annotations

import json
import os
import re
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
    tokens, types = _tokens(tok, vocab_size, source)
    sentencepiece = _is_sentencepiece(tok)
    writer.add_tokenizer_model("llama" if sentencepiece else "gpt2")
    writer.add_tokenizer_pre("default" if sentencepiece else _pre_name(tok, source))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if sentencepiece:
        writer.add_token_scores(spm_scores(tok, tokens))
        writer.add_add_space_prefix(_space_prefix(tok, source))
    # llama.cpp's sentencepiece tokenizer ignores merges (scores decide), so none are written
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=not sentencepiece, n_vocab=vocab_size)
    # SpecialVocab says nothing when the tokenizer adds no BOS/EOS, and llama.cpp then adds a BOS
    # to a sentencepiece vocabulary: say "no" explicitly
    for kind in ("bos", "eos"):
        special.add_special_token.setdefault(kind, False)
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
    if _is_sentencepiece(tok):
        _space_prefix(tok, path)
    elif byte_level:
        _pre_name(tok, path)
    else:
        raise UserError(f"{path}: a {model.get('type')} tokenizer cannot be converted to GGUF here "
                        "(byte-level BPE and sentencepiece-style BPE with byte fallback only); "
                        "prune the model's GGUF file instead (its tokenizer is copied), or convert "
                        "the exported HF folder with llama.cpp's convert_hf_to_gguf.py")
    return tok


def _is_sentencepiece(tok: dict) -> bool:
    model = tok["model"]
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _describe(pre: Optional[dict]) -> tuple:
    """A pre-tokenizer as a tuple of its steps' kinds (a Split with its regex)."""
    return tuple(_kind(step) for step in _steps(pre, "pretokenizers"))


def _kind(step: dict) -> str:
    kind = step.get("type")
    if kind == "ByteLevel":
        return "bytelevel" if step.get("use_regex", True) else "bytelevel-noregex"
    if kind == "Digits":
        return "digits" if step.get("individual_digits") else "digits-grouped"
    if kind == "Split":
        pattern = step.get("pattern") or {}
        return f"split:{pattern.get('Regex', pattern.get('String'))}"
    return kind


def _pre_name(tok: dict, source: str) -> str:
    steps = _describe(tok.get("pre_tokenizer"))
    if steps not in PRE_TOKENIZERS:
        raise UserError(f"{source}: its pre-tokenizer ({' + '.join(steps) or 'none'}) has no "
                        f"llama.cpp name known here (known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}); "
                        "prune the model's GGUF file instead (its tokenizer is copied), or convert "
                        "the exported HF folder with llama.cpp's convert_hf_to_gguf.py")
    return PRE_TOKENIZERS[steps]


def _tokens(tok: dict, vocab_size: int, source: str) -> tuple[list, list]:
    """Tokens in id order padded to vocab_size, and their llama.cpp token types."""
    import gguf

    sentencepiece = _is_sentencepiece(tok)
    unknown = tok["model"].get("unk_token")

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
        if sentencepiece and by_id[i] == unknown:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special")
                         else gguf.TokenType.USER_DEFINED)
        elif sentencepiece and _BYTE_TOKEN.fullmatch(by_id[i]):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPACE = "\u2581"  # sentencepiece's visible space


def spm_scores(tok: dict, tokens: list[str]) -> list[float]:
    """llama.cpp's scores for a sentencepiece-style BPE: the token a merge of rank r makes scores
    -(r + 1), so the highest-scoring adjacent pair is the merge HF's BPE applies first; tokens no
    merge makes (characters, bytes, specials, padding) score below every merge, in id order, and
    never decide a merge (llama.cpp only scores joined pairs)."""
    first_rank = {}
    for rank, merge in enumerate(tok["model"].get("merges") or ()):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        first_rank.setdefault(left + right, rank)
    floor = -float(len(first_rank) + 1)
    return [-float(first_rank[t] + 1) if t in first_rank else floor - i
            for i, t in enumerate(tokens)]


def _space_prefix(tok: dict, source: str) -> bool:
    """Whether the tokenizer puts a space before the text (llama.cpp's add_space_prefix), from the
    forms HF writes for sentencepiece models: a Prepend("▁") + Replace(" ", "▁") normalizer
    (LLaMA-2 legacy), a Replace-only normalizer (Gemma), or a Metaspace pre-tokenizer (newer
    LLaMA/Mistral). Other normalizers or pre-tokenizers would change text llama.cpp does not."""
    steps = _steps(tok.get("normalizer"), "normalizers")
    pre = tok.get("pre_tokenizer")
    replaces = [s for s in steps if s.get("type") == "Replace"]
    prepends = [s for s in steps if s.get("type") == "Prepend"]
    known = (all((s.get("pattern") or {}).get("String") == " " and s.get("content") == _SPACE
                 for s in replaces)
             and all(s.get("prepend") == _SPACE for s in prepends)
             and len(replaces) + len(prepends) == len(steps))
    metaspace = pre and pre.get("type") == "Metaspace" and pre.get("replacement") == _SPACE
    if not known or (pre and not metaspace) or not (replaces or metaspace):
        what = [s.get("type") for s in steps] + ([pre.get("type")] if pre else [])
        raise UserError(f"{source}: a sentencepiece-style tokenizer whose normalizer/pre-tokenizer "
                        f"({' + '.join(map(str, what)) or 'none'}) llama.cpp cannot reproduce "
                        "(known: Prepend/Replace of ' ' by '▁', or Metaspace); prune the model's "
                        "GGUF file instead (its tokenizer is copied), or convert the exported HF "
                        "folder with llama.cpp's convert_hf_to_gguf.py")
    if metaspace and pre.get("split", False):
        # HF then never merges across words, llama.cpp might: the same only if no token has an
        # inner "▁"
        inner = next((t for t in tok["model"].get("vocab", {}) if _SPACE in t.lstrip(_SPACE)), None)
        if inner is not None:
            raise UserError(f"{source}: its Metaspace pre-tokenizer splits words, but token "
                            f"{inner!r} spans a word boundary, which llama.cpp would merge; "
                            "prune the model's GGUF file instead (its tokenizer is copied)")
    if metaspace:
        scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
        return scheme != "never"
    return bool(prepends)


def _steps(node: Optional[dict], key: str) -> list[dict]:
    """A normalizer or pre-tokenizer as the flat list of its steps (Sequences opened)."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for child in node.get(key, []) for s in _steps(child, key)]
    return [node]
