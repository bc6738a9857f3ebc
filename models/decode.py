"""Sampling from the Flax model: KV-cache prefill, then decoding in one jitted loop (`generate`);
texts sampled from a start token in batches (`sample_rows`: energy's calibration, recovery's
distillation text).

Prompts of different lengths are left-padded to a common length P (rounded up to a multiple of
`BUCKET`, so few lengths compile); row b's real tokens sit in cache slots `[pad_b, P)` with
positions 0, 1, ... as if unpadded. The cache has S = P + max_new_tokens slots (rounded up
likewise); generated tokens go to slots `[P, P + max_new_tokens)`. Prefill is compiled per
(batch, P, S); the decode loop (`lax.while_loop`) once per (batch, S) and sampling kind, with the
length, temperature, top-p, seed and EOS ids as runtime values. A row stops at its first EOS id;
the loop stops when every row has, or at the length. The windowed layers of a sliding-window model
(Mistral; Qwen2 with use_sliding_window) attend only to the last `sliding_window` positions, as
transformers does; the cache keeps every position (full layers need them).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prunenet_jax import progress
from prunenet_jax.errors import UserError
from prunenet_jax.models import decoder

BUCKET = 16


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _attention_mask(cfg, q_pos, pad, size: int):
    """(B, T, S): query at position q_pos (B, T) sees the filled slots at positions <= its own;
    for a model with a sliding window, the pair (that, the last `sliding_window` of them)."""
    k_pos = jnp.arange(size)[None, :] - pad[:, None]
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    return decoder.with_window(cfg, (k >= 0) & (k <= q), q_pos, k_pos)


def _pick(logits, key, greedy: bool, nucleus: bool, temperature, top_p):
    """Next token per row of logits (B, V): argmax, or a draw at `temperature` from the smallest
    set of tokens whose probability reaches top_p (nucleus)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if nucleus:
        ranked = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        kept = jnp.cumsum(probs, axis=-1) - probs < top_p  # the most likely token is always kept
        cutoff = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _prefill(graphdef, size: int, state, tokens, pad):
    """The prompt's keys/values in a fresh cache of `size` slots, and the next-token logits."""
    model = nnx.merge(graphdef, state)
    B, P = tokens.shape
    cache = decoder.KVCache.zeros(model.config, B, size, model.model.embed_tokens.weight.dtype)
    q_pos = jnp.arange(P)[None, :] - pad[:, None]
    mask = _attention_mask(model.config, q_pos, pad, size)
    x, cache, _ = model.hidden_states(tokens, jnp.maximum(q_pos, 0), mask, cache)
    return model.logits(x[:, -1:])[:, 0], dataclasses.replace(cache, index=jnp.int32(P))


def decode_step(model: decoder.CausalLM, cache: decoder.KVCache, token, pad):
    """Runs token (B,) at slot cache.index of left-padded rows: the next-token logits (B, V) and
    the cache with that slot filled."""
    q_pos = (cache.index - pad)[:, None]
    mask = _attention_mask(model.config, q_pos, pad, cache.keys.shape[2])
    x, cache, _ = model.hidden_states(token[:, None], q_pos, mask, cache)
    return model.logits(x)[:, 0], dataclasses.replace(cache, index=cache.index + 1)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode(graphdef, greedy: bool, nucleus: bool, state, cache, tokens, logits, pad, end,
            temperature, top_p, key, eos):
    """Fills slots [cache.index, end) of tokens (B, S), one token per step, until every row has
    produced an EOS id. Returns the tokens and the number of slots filled."""
    model = nnx.merge(graphdef, state)

    def pick(logits, slot):
        return _pick(logits, jax.random.fold_in(key, slot), greedy, nucleus, temperature, top_p)

    def put(tokens, done, new, slot):
        new = jnp.where(done, 0, new)
        tokens = jax.lax.dynamic_update_slice(tokens, new[:, None], (0, slot))
        return tokens, done | jnp.any(new[:, None] == eos[None, :], axis=1)

    tokens, done = put(tokens, jnp.zeros(tokens.shape[0], bool), pick(logits, cache.index), cache.index)

    def more(carry):
        _, cache, done = carry
        return (cache.index + 1 < end) & ~jnp.all(done)

    def step(carry):
        tokens, cache, done = carry
        slot = cache.index
        logits, cache = decode_step(model, cache, jax.lax.dynamic_index_in_dim(tokens, slot, 1, False), pad)
        tokens, done = put(tokens, done, pick(logits, slot + 1), slot + 1)
        return tokens, cache, done

    tokens, cache, _ = jax.lax.while_loop(more, step, (tokens, cache, done))
    return tokens, cache.index + 1


def unpad(tokens, mask) -> list[list[int]]:
    """Rows of a padded (B, T) batch (mask 1 = real token; left, right or any padding) as lists."""
    tokens, mask = np.asarray(tokens), np.asarray(mask).astype(bool)
    return [row[keep].tolist() for row, keep in zip(tokens, mask)]


def prefill(model: decoder.CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int):
    """Left-pads the prompts into a (B, S) token buffer and runs them through a fresh cache.
    Returns (tokens (B, S), pad (B,), next-token logits (B, V), cache with index P)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token; pass a non-empty prompt")
    B, P = len(prompts), _round_up(max(len(p) for p in prompts), BUCKET)
    size = _round_up(P + max_new_tokens, BUCKET)
    tokens = np.zeros((B, size), np.int32)
    pad = np.array([P - len(p) for p in prompts], np.int32)
    for b, p in enumerate(prompts):
        tokens[b, pad[b]:P] = p
    graphdef, state = nnx.split(model)
    tokens, pad = jnp.asarray(tokens), jnp.asarray(pad)
    logits, cache = _prefill(graphdef, size, state, tokens[:, :P], pad)
    return tokens, pad, logits, cache


def generate(model: decoder.CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             *, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_ids: Sequence[int] = ()) -> list[list[int]]:
    """The tokens generated after each prompt (token-id lists; `unpad` turns a padded batch into
    them), each ending at its first EOS id (included) or after max_new_tokens.
    temperature 0 is greedy; otherwise a seeded draw, restricted to the top-p nucleus if top_p < 1."""
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if temperature < 0:
        raise UserError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p={top_p} must be in (0, 1] (1 keeps every token)")
    tokens, pad, logits, cache = prefill(model, prompts, max_new_tokens)
    P = int(cache.index)
    eos = np.full(_round_up(max(len(eos_ids), 1), 8), -1, np.int32)  # -1 matches no token; a
    eos[:len(eos_ids)] = eos_ids  # few sizes, so a new EOS list rarely compiles again
    graphdef, state = nnx.split(model)
    out, filled = _decode(graphdef, temperature == 0, top_p < 1, state, cache, tokens, logits, pad,
                          jnp.int32(P + max_new_tokens), jnp.float32(temperature or 1.0),
                          jnp.float32(top_p), jax.random.key(seed), jnp.asarray(eos))
    out, eos = np.asarray(out)[:, P:int(filled)], set(eos_ids)
    completions = []
    for row in out.tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), len(row) - 1)
        completions.append(row[:stop + 1])
    return completions


def sample_rows(model: decoder.CausalLM, start_token: int, rows: int, seq_len: int, *,
                seed_of_batch: Callable[[int], int], batch: Optional[int] = None,
                eos_ids: Sequence[int] = (), temperature: float = 1.0, top_p: float = 1.0,
                desc: str = "sampling text") -> tuple[np.ndarray, np.ndarray]:
    """`rows` texts of `seq_len` tokens sampled from `model` after `start_token`: (tokens, mask),
    each (rows, seq_len) int32; a row that ends at an EOS id early is padded (mask 0).

    Drawn in equal batches, the fewest of at most `batch` rows (default: all rows in one); the
    batch starting at row `start` is drawn with seed `seed_of_batch(start)`. Every batch has the
    same size (the last one padded with extra prompts), so the decoder compiles once. `desc`
    names the progress bar over the rows (the one of every text sampled from a dense model)."""
    batch = -(-rows // -(-rows // (batch or rows)))
    tokens = np.zeros((rows, seq_len), np.int32)
    mask = np.zeros((rows, seq_len), np.int32)
    bar = progress.counter(rows, desc, "row")
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        outs = generate(model, [[start_token]] * batch, seq_len - 1, temperature=temperature,
                        top_p=top_p, seed=seed_of_batch(start), eos_ids=eos_ids)[:n]
        for r, out in enumerate(outs):
            row = [start_token] + out[:seq_len - 1]
            tokens[start + r, :len(row)] = row
            mask[start + r, :len(row)] = 1
        bar.update(n)
    bar.close()
    return tokens, mask
