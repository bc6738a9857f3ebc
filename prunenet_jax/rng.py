"""The seed's random streams, named: every random draw of a run comes from one of them.

`key(seed, stream)` = fold_in(jax.random.key(seed), stream). Streams are independent, so adding
draws to one (more episodes, more ratios) never changes another's, and the same seed gives the
same policy init, episodes and kept channels however the run is split or resumed.
"""
from __future__ import annotations

import jax

from prunenet_jax.errors import UserError

SEED_RANGE = (-2**63, 2**63 - 1)  # what jax.random.key takes (a C long)

POLICY_INIT = 0  # the policy's initial parameters (train.initial_params)
EPISODES = 1  # episode e's draws: fold_in(key(seed, EPISODES), e) (train.train)
SELECTION = 2  # the channels kept at a ratio: fold_in(key(seed, SELECTION), k) (prune.select_kept)
CALIBRATION = 3  # self-generated calibration tokens (method/calibration.py)


def key(seed: int, stream: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), stream)


def check_seed(seed: int, flag: str = "--seed") -> None:
    """Refuses a seed the RNG cannot take (before anything runs)."""
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UserError(f"{flag}={seed} is out of range; use an integer between -2**63 and "
                        "2**63 - 1, e.g. 42")
