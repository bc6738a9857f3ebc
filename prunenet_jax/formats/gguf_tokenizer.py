"""The tokenizer a GGUF file describes, built with the `tokenizers` library (no torch needed).

A GGUF holds no `tokenizer.json`: llama.cpp stores the vocabulary, the merges, each token's type,
the special token ids, the chat template and the *name* of the pre-tokenizer (`tokenizer.ggml.pre`)
as metadata. We rebuild the tokenizer from those: byte-level BPE (`tokenizer.ggml.model = gpt2`:
LLaMA-3, Qwen2, SmolLM, ...) with the split regexes llama.cpp uses for that pre-tokenizer name, or
sentencepiece BPE with byte fallback (`llama`: LLaMA-1/2, Mistral). Control tokens become special
tokens, user-defined tokens added tokens, as in llama.cpp; the result is a `transformers` fast
tokenizer (`save_pretrained`, `apply_chat_template`).
"""
from __future__ import annotations

import copy
import functools
import os
from typing import Any

from prunenet_jax.errors import UserError

# llama.cpp's token types (gguf.TokenType).
_CONTROL, _USER_DEFINED = 3, 4

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# `tokenizer.ggml.pre` -> the regexes llama.cpp splits with, applied in order (llama-vocab.cpp).
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    **{name: (_LLAMA3,) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1",
                                      "pixtral", "midm-2.0", "lfm2", "dbrx", "smaug-bpe")},
    **{name: (_QWEN2,) for name in ("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan", "megrez")},
    **{name: (r"\p{N}", _GPT2) for name in ("smollm", "starcoder", "refact", "command-r",
                                             "codeshell", "exaone", "minerva-7b")},
    **{name: (_GPT2,) for name in ("gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion")},
    **{name: (_GPT4O,) for name in ("gpt-4o", "llama4")},
    "tekken": (_TEKKEN,),
}


def load_gguf_tokenizer(path: str):
    """The fast tokenizer described by the GGUF file's metadata (built once per file version:
    every export of a batch needs it, and reading 50k+ tokens takes a second). Each caller gets
    its own copy (0.1 s), so changing one (a chat template, added tokens) never changes another's."""
    from prunenet_jax.formats import gguf_file

    path = os.fspath(path)
    gguf_file.open_gguf(path)  # clear errors for a missing, non-GGUF or truncated file
    stat = os.stat(path)
    return copy.deepcopy(_cached_tokenizer(os.path.abspath(path), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(path: str, size: int, mtime_ns: int):
    from prunenet_jax.formats import gguf_file

    return build_tokenizer(_tokenizer_metadata(gguf_file.open_gguf(path), path), path)


def _tokenizer_metadata(reader, path: str) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            try:
                meta[key] = field.contents()
            except Exception as e:
                raise UserError(f"{path}: GGUF metadata key {key!r} is unreadable ({e}); the file is "
                                "corrupt; re-download it") from None
    return meta


def build_tokenizer(meta: dict[str, Any], path: str):
    """A `transformers.PreTrainedTokenizerFast` from the `tokenizer.*` metadata of a GGUF file."""
    from transformers import PreTrainedTokenizerFast

    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UserError(f"{path}: the GGUF metadata has no tokenizer.ggml.tokens, so no tokenizer can "
                        "be built; use a GGUF converted with its tokenizer by llama.cpp, or a Hugging "
                        "Face folder with tokenizer files")
    if model == "gpt2":
        tokenizer, add_prefix = _byte_level_bpe(meta, tokens, path), False
    elif model == "llama":
        add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        tokenizer = _sentencepiece_bpe(meta, tokens, add_prefix, path)
    else:
        raise UserError(f"{path}: tokenizer model {model!r} (tokenizer.ggml.model) is not supported "
                        "(supported: gpt2 byte-level BPE, llama sentencepiece BPE); use the model's "
                        "Hugging Face folder, which has its tokenizer files")
    _add_special_tokens(tokenizer, tokens, meta.get("tokenizer.ggml.token_type") or (), model)

    def token(key):
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    kwargs = dict(bos_token=token("bos"), eos_token=token("eos"), unk_token=token("unknown"),
                  pad_token=token("padding"), add_bos_token=add_bos,
                  add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                  clean_up_tokenization_spaces=False)
    if meta.get("tokenizer.chat_template"):
        kwargs["chat_template"] = meta["tokenizer.chat_template"]
    if model == "llama":
        kwargs["add_prefix_space"] = add_prefix
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer,
                                   **{k: v for k, v in kwargs.items() if v is not None})
    fast.update_post_processor()  # BOS/EOS as add_bos_token/add_eos_token say
    return fast


def _merges(meta: dict[str, Any], path: str) -> list[tuple[str, str]]:
    merges = []
    for merge in meta.get("tokenizer.ggml.merges") or ():
        left, sep, right = merge.partition(" ")
        if not sep:
            raise UserError(f"{path}: GGUF merge {merge!r} is not two tokens separated by a space; "
                            "the file is corrupt; re-convert it with llama.cpp")
        merges.append((left, right))
    return merges


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], path: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    splits = PRE_TOKENIZER_SPLITS.get(pre, (_GPT2,) if pre == "default" else None)
    if splits is None:
        raise UserError(f"{path}: the pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not known here "
                        f"(known: {', '.join(sorted(PRE_TOKENIZER_SPLITS))}); use the model's Hugging "
                        "Face folder, which has its tokenizer files")
    if "tokenizer.ggml.merges" not in meta:
        raise UserError(f"{path}: a byte-level BPE tokenizer needs tokenizer.ggml.merges, which the "
                        "file lacks; re-convert it with llama.cpp, or use the Hugging Face folder")
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=_merges(meta, path), fuse_unk=False,
                                     dropout=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], add_prefix: bool, path: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges(meta, path)
    if not merges:  # llama.cpp files of sentencepiece models store scores, not merges
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise UserError(f"{path}: a sentencepiece tokenizer needs tokenizer.ggml.scores (one per "
                            "token) or tokenizer.ggml.merges; re-convert the file with llama.cpp")
        merges = merges_from_scores(tokens, scores)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                                     unk_token=tokens[unk] if unk is not None else None,
                                     dropout=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Sentencepiece BPE merges implied by the vocabulary: every split of a token into two tokens
    is a merge, ranked by the merged token's score (highest first), as sentencepiece applies them."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        ranked.extend((-score, len(left), len(right), order, (left, right))
                      for order, (left, right) in enumerate(pairs))
    ranked.sort(key=lambda r: r[:3])  # stable: ties keep the vocabulary order
    return [r[4] for r in ranked]


def _add_special_tokens(tokenizer, tokens: list[str], token_types, model: str) -> None:
    """Control tokens (e.g. `<|im_start|>`) are matched whole and are special; user-defined ones
    (e.g. `<think>`) are matched whole too, as llama.cpp does. In a byte-level vocabulary a
    'control' token spelled outside the byte alphabet is a converter mislabel and is skipped."""
    from tokenizers import AddedToken

    alphabet = _byte_alphabet() if model == "gpt2" else None
    control, user = [], []
    for token, kind in zip(tokens, token_types):
        if kind == _CONTROL and (alphabet is None or set(token) <= alphabet):
            control.append(AddedToken(token, normalized=False, special=True))
        elif kind == _USER_DEFINED:
            user.append(AddedToken(token, normalized=False, special=False))
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(user)


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> frozenset:
    """The 256 characters byte-level BPE spells bytes with (GPT-2's bytes_to_unicode)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    extra = [256 + n for n in range(256 - len(printable))]
    return frozenset(map(chr, printable + extra))
