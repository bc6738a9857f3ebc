"""Text as model input: reading texts (named files, .gz files, and globs: one text made of the
matches in sorted order), tokenizing them, and cutting their tokens into non-overlapping windows
(perplexity, recovery's --train_text and energy's text calibration all cut them here)."""
from __future__ import annotations

import glob
import gzip
import os
from typing import Optional

import numpy as np

from prunenet_jax.errors import UserError


def _read(path: str, what: str, flag: str) -> str:
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist; pass existing text files to {flag}") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise UserError(f"{what} {path} cannot be read as UTF-8 text ({e}); "
                        "pass a plain or gzipped UTF-8 text file") from None


def read_texts(spec: str, flag: str = "--eval_text", what: Optional[str] = None) -> dict[str, str]:
    """Comma-separated entries -> {entry: text}. A glob entry is its matches concatenated in
    sorted name order (e.g. the Python tutorial's `*.rst.txt` files as one text). `flag` and
    `what` name the input in error messages (e.g. "--calibration", "calibration text"); `what`
    defaults to the flag's words ("--train_text" -> "train text")."""
    what = what or flag.strip("-").replace("_", " ")
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        raise UserError(f"{flag} is empty; pass one or more text files (comma-separated)")
    texts = {}
    for entry in entries:
        if glob.has_magic(entry):
            paths = sorted(p for p in glob.glob(entry) if os.path.isfile(p))
            if not paths:
                raise UserError(f"{what} pattern {entry} matches no file; check the path "
                                "(the Python tutorial needs `apt-get install -y python3.11-doc`)")
        else:
            paths = [entry]
        text = "".join(_read(p, what, flag) for p in paths)
        if not text.strip():
            raise UserError(f"{what} {entry} is empty; pass a file with text in it")
        texts[entry] = text
    return texts


def tokenize(tokenizer, text: str, max_tokens: Optional[int] = None) -> np.ndarray:
    """The token ids of `text` (int32), the first `max_tokens` of them when given."""
    ids = np.asarray(tokenizer(text, verbose=False)["input_ids"], np.int32)
    return ids[:max_tokens] if max_tokens else ids


def windows(ids: np.ndarray, seq_len: int, *, full_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Cuts ids into non-overlapping windows of seq_len: (tokens, mask), each (windows, seq_len).
    The last window is padded (mask 0), or dropped with `full_only`; a window of one token
    predicts nothing and is dropped."""
    if seq_len < 2:
        raise UserError(f"--seq_len={seq_len} is too short; use at least 2 (512 is typical)")
    count = -(-len(ids) // seq_len)
    tokens = np.zeros((count, seq_len), np.int32)
    mask = np.zeros((count, seq_len), np.int32)
    for w in range(count):
        chunk = ids[w * seq_len:(w + 1) * seq_len]
        tokens[w, :len(chunk)] = chunk
        mask[w, :len(chunk)] = 1
    keep = mask.all(axis=1) if full_only else mask.sum(1) >= 2
    return tokens[keep], mask[keep]
