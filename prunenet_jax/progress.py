"""Progress bars (tqdm), one place: a counting bar for runs, and a wrapper for inner loops."""
from __future__ import annotations

import sys

from tqdm import tqdm
from tqdm.auto import tqdm as auto_tqdm


def bar(total: int, desc: str, **kwargs) -> tqdm:
    """A bar the caller advances with `update` (episodes, batch outputs)."""
    return tqdm(total=total, desc=desc, **kwargs)


def over(items, desc: str, unit: str):
    """`items` with a transient bar (loading layers, writing shards); silent when not a terminal."""
    return auto_tqdm(items, desc=desc, unit=unit, leave=False, disable=None)


def message(text: str) -> None:
    """One line on stderr above any open bar."""
    tqdm.write(text, file=sys.stderr)
