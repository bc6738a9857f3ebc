"""Text generation with a dense or pruned model (`launch.generate`; the sampler is models/decode.py).

`GenerateJob` says what to generate; `generate(job)` loads the model, applies the chat template when
asked, samples, and returns {"prompt", "completion", "tokens"}.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

from prunenet_jax import progress, pruned_models, rng, sources, special_tokens
from prunenet_jax.errors import UserError
from prunenet_jax.models import decoder, decode
from prunenet_jax.weights import dtype_by_name

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GenerateJob:
    model: str
    prompt: str
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    chat: bool = False
    dtype: str = "float32"
    revision: Optional[str] = None
    ratio: Optional[float] = None  # --ratio/--mode: which pruned model of a run folder
    mode: Optional[str] = None
    truncate_prompt: bool = False  # keep the prompt's last tokens when it would overflow the context

    def check(self) -> None:
        """Refuses bad flags, before the model is loaded."""
        if self.prompt is None:
            raise UserError("--prompt is required, e.g. --prompt='Once upon a time'")
        checks = [(not 1 <= self.max_new_tokens <= 2**20,
                   f"--max_new_tokens={self.max_new_tokens} must be in [1, {2**20}]"),
                  (not 0 <= self.temperature < math.inf,
                   f"--temperature={self.temperature} must be a finite number >= 0 (0 is greedy)"),
                  (not 0 < self.top_p <= 1, f"--top_p={self.top_p} must be in (0, 1] (1 keeps every token)")]
        for bad, message in checks:
            if bad:
                raise UserError(message)
        dtype_by_name(self.dtype)
        rng.check_seed(self.seed)


def prompt_ids(tokenizer, prompt: str, chat: bool, model: str) -> list[int]:
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"--chat: the tokenizer of --model={model} has no chat template; "
                        "drop --chat to continue the prompt as plain text")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_context(ids: list[int], max_new_tokens: int, context: int, truncate: bool) -> list[int]:
    """`ids` when the prompt and `max_new_tokens` fit the model's `context` (its
    max_position_embeddings: positions past it were never trained and RoPE tables may end there);
    else, with `truncate`, the prompt's last tokens that fit (a warning says how many were cut),
    without it a UserError."""
    if len(ids) + max_new_tokens <= context:
        return ids
    if max_new_tokens >= context:
        raise UserError(f"--max_new_tokens={max_new_tokens} leaves no room for the prompt in the "
                        f"model's context of {context} tokens; use --max_new_tokens < {context}")
    room = context - max_new_tokens
    if not truncate:
        raise UserError(f"the prompt ({len(ids)} tokens) and --max_new_tokens={max_new_tokens} "
                        f"exceed the model's context of {context} tokens (max_position_embeddings); "
                        f"shorten the prompt to {room} tokens, lower --max_new_tokens, or pass "
                        "--truncate_prompt to keep the prompt's last tokens")
    progress.warning(f"--truncate_prompt: the prompt's first {len(ids) - room} of {len(ids)} tokens "
                     f"are dropped to fit the model's context of {context} tokens with "
                     f"--max_new_tokens={max_new_tokens}")
    return ids[-room:]


def generate(job: GenerateJob) -> dict:
    job.check()
    pruned = pruned_models.resolve_one(job.model, job.ratio, job.mode, "--model")
    if pruned is not None:
        log.info("model: %s (%s)", pruned.label, pruned.folder())
    weights = sources.load_model(job.model if pruned is None else pruned.folder(),
                                 revision=job.revision)
    tokenizer = sources.load_tokenizer(weights)
    ids = prompt_ids(tokenizer, job.prompt, job.chat, job.model)
    if not ids:
        raise UserError("--prompt is empty after tokenisation; pass some text")
    ids = fit_context(ids, job.max_new_tokens, weights.config.max_position_embeddings,
                      job.truncate_prompt)
    model = decoder.from_named_arrays(weights.config, weights.named_arrays(), dtype=dtype_by_name(job.dtype))
    eos = special_tokens.eos_ids(weights, lambda: tokenizer)
    del weights
    log.info("prompt of %d tokens, EOS ids %s", len(ids), eos)
    tokens = decode.generate(model, [ids], job.max_new_tokens, temperature=job.temperature,
                              top_p=job.top_p, seed=job.seed, eos_ids=eos)[0]
    return {"prompt": job.prompt, "completion": tokenizer.decode(tokens, skip_special_tokens=True),
            "tokens": tokens}
