"""Every flag value a launcher takes, checked once, before its job is built or any folder is made:
the one place a flag value becomes an `error:` line.

Numbers: each numeric flag of every launcher has a `Range` here (finite, in range, and small
enough for the type it feeds: a seed for jax.random.key is a C long, a step count for optax an
int32); tests/test_hostile_flags.py fails when a numeric flag has none. Text: a flag holding bytes
that are not UTF-8 (Python keeps them as lone surrogates) would fail deep inside a tokenizer or a
JSON writer. The library checks its own inputs too (for callers without launchers); these run
first and name the flag as typed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from absl import flags

from prunenet_jax.errors import UserError

INT64 = (-2**63, 2**63 - 1)


@dataclasses.dataclass(frozen=True)
class Range:
    """[low, high] (an end excluded when `open_low`/`open_high`); `note` says what a special value
    means ("0: all"); `example` is a typical value."""
    low: float
    high: float
    example: str
    open_low: bool = False
    open_high: bool = False
    note: str = ""

    def contains(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def describe(self, integer: bool) -> str:
        show = lambda x: (f"{x:g}" if not integer and abs(x) < 1e6 else
                          "2**63 - 1" if x == INT64[1] else "-2**63" if x == INT64[0] else
                          str(int(x)))
        interval = (f"{'(' if self.open_low else '['}{show(self.low)}, {show(self.high)}"
                    f"{')' if self.open_high else ']'}")
        kind = "an integer" if integer else "a finite number"
        return f"{kind} in {interval}" + (f" ({self.note})" if self.note else "")


_RATIO = Range(0, 1, "0.2", open_high=True)
_DEVICES = Range(0, 2**16, "0", note="0: all")
_ROWS = Range(0, 2**24, "64", note="0: all")
_TOKENS = Range(2, 2**20, "512")
_BATCH = Range(1, 2**16, "4")

RANGES: dict[str, Range] = {
    # pruning and policy training
    "ratio": _RATIO, "train_ratio": _RATIO,
    "seed": Range(*INT64, "42"),
    "episodes": Range(1, 10**6, "20"),
    "checkpoint_every": Range(1, 10**6, "1"),
    "lr": Range(0, 10, "1e-3", open_low=True),
    "gamma": Range(0, 1, "0.99"),
    "calibration_sequences": Range(1, 2**20, "16"),
    "calibration_seq_len": _TOKENS,
    # perplexity
    "max_tokens": Range(0, 2**40, "16384", note="0: all"),
    "seq_len": _TOKENS, "batch_size": _BATCH,
    # recovery (optax counts steps in int32)
    "recover_steps": Range(0, 10**7, "60", note="0: none, or the refit alone on launch.recover"),
    "recover_lr": Range(0, 10, "1e-3", open_low=True),
    "warmup": Range(0, 10**7, "5"),
    "weight_decay": Range(0, 10, "0.0"),
    "clip_norm": Range(0, 10**6, "1.0", open_low=True),
    "lora_rank": Range(1, 2**16, "16"),
    "lora_alpha": Range(0, 10**6, "32", open_low=True),
    "train_batch": _BATCH, "grad_accum": _BATCH,
    "train_seq_len": _TOKENS,
    "pool_rows": Range(0, 2**24, "256", note="0: one fresh sequence per row trained"),
    "recover_seed": Range(0, INT64[1], "0"),  # numpy's default_rng takes no negative seed
    "teacher_topk": Range(1, 2**20, "64"),
    "refit_rows": _ROWS,
    "recover_checkpoint_every": Range(0, 10**7, "10", note="0: never"),
    # devices and shards
    "mesh": _DEVICES, "data_devices": _DEVICES,
    "num_processes": Range(1, 2**16, "2"), "process_id": Range(0, 2**16, "0", open_high=True),
    "num_shards": Range(1, 2**20, "4"), "shard_index": Range(0, 2**20, "0", open_high=True),
    # generation and lm-eval
    "max_new_tokens": Range(1, 2**20, "64"),
    "temperature": Range(0, 100, "0.7", note="0: greedy"),
    "top_p": Range(0, 1, "0.9", open_low=True, note="1: every token"),
    "lm_eval_limit": Range(0, 2**31 - 1, "100", note="0: all"),
    "lm_eval_batch_size": _BATCH,
}


def is_number(flag) -> bool:
    return flag.flag_type() in ("int", "float")


def check_number(name: str, value, integer: bool) -> None:
    """A UserError naming `--name=value` and its range when `value` is outside it."""
    rule = RANGES[name]
    if not rule.contains(value):
        raise UserError(f"--{name}={value} must be {rule.describe(integer)}, e.g. "
                        f"--{name}={rule.example}")


def check_text(name: str, value: str) -> None:
    """A UserError when a text flag holds bytes that are not UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"--{name} holds bytes that are not UTF-8 text (at character {e.start}); "
                        "pass UTF-8 text (check the terminal's or the script's encoding)") from None


def check_flags(names: list[str], values: Optional[flags.FlagValues] = None) -> None:
    """Checks the values of the flags `names` (a launcher's): numbers in their ranges, text as
    UTF-8. A flag left at None (not given, no default) is not checked."""
    values = values or flags.FLAGS
    for name in names:
        flag = values[name]
        value = flag.value
        if value is None:
            continue
        if is_number(flag):
            check_number(name, value, flag.flag_type() == "int")
        for text in (value if isinstance(value, list) else [value]):
            if isinstance(text, str):
                check_text(name, text)
