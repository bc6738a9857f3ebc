"""The seed's random streams, named: every random draw of a run comes from one of them.

`key(seed, stream)` = fold_in(jax.random.key(seed), stream). Streams are independent, so adding
draws to one (more episodes, more ratios) never changes another's, and the same seed gives the
same policy init, episodes and kept channels however the run is split or resumed.
`method/train.py` derives POLICY_INIT and EPISODES with these same numbers (tests/test_rng.py
checks that the two agree).
"""
from __future__ import annotations

import jax

POLICY_INIT = 0  # the policy's initial parameters (train.initial_params)
EPISODES = 1  # episode e's draws: fold_in(key(seed, EPISODES), e) (train.train)
SELECTION = 2  # the channels kept at a ratio: fold_in(key(seed, SELECTION), k) (prune.select_kept)
CALIBRATION = 3  # self-generated calibration tokens (method/calibration.py)


def key(seed: int, stream: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), stream)
