"""Training text for recovery: sequences sampled from the dense model (distillation needs no
data), or the user's text cut into windows; and which rows each step trains on.

Both are a fixed pool of (N, T) token rows with a mask; step s takes rows of a per-epoch seeded
permutation, so the data position is the step count and a resumed run sees the same batches.
"""
from __future__ import annotations

import numpy as np

from prunenet_jax.errors import UserError
from prunenet_jax.formats import texts
from prunenet_jax.models import decode


def generated_pool(model, bos_id: int, eos_ids, rows: int, seq_len: int, *, seed: int,
                   batch: int = 32, temperature: float = 1.0,
                   top_p: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """`rows` sequences of `seq_len` tokens sampled from `model` after a BOS token (a row that
    ends at an EOS id early is padded, mask 0), in batches of at most `batch` rows, each batch
    with its own seed."""
    # modulo 2**63: a seed up to 2**63 - 1 still makes a valid key (jax.random.key takes a C long)
    return decode.sample_rows(model, bos_id, rows, seq_len,
                              seed_of_batch=lambda start: (seed * 1_000_003 + start) % 2**63,
                              batch=batch, eos_ids=eos_ids, temperature=temperature, top_p=top_p,
                              desc="sampling distillation text")


def text_pool(tokenizer, spec: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The --train_text files (path, glob, comma-separated) cut into windows of seq_len."""
    rows = []
    for name, text in texts.read_texts(spec, flag="--train_text").items():
        tokens, mask = texts.windows(texts.tokenize(tokenizer, text), seq_len)
        if len(tokens) == 0:
            raise UserError(f"--train_text {name} has fewer than 2 tokens; pass a longer text")
        rows.append((tokens, mask))
    return np.concatenate([t for t, _ in rows]), np.concatenate([m for _, m in rows])


def step_rows(step: int, rows_per_step: int, pool_size: int, seed: int) -> np.ndarray:
    """The pool rows step `step` trains on: consecutive slices of a permutation drawn per epoch
    from (seed, epoch); a step that crosses an epoch end continues in the next permutation."""
    start = step * rows_per_step
    picked = []
    while len(picked) < rows_per_step:
        epoch, offset = divmod(start + len(picked), pool_size)
        order = np.random.default_rng([seed, epoch]).permutation(pool_size)
        picked.extend(order[offset:offset + rows_per_step - len(picked)].tolist())
    return np.asarray(picked)
