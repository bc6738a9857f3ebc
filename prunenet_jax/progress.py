"""Progress bars (tqdm), one place: a counting bar for runs, a wrapper for inner loops, and what
keeps other output from breaking them (one-line messages, log records written above the bars)."""
from __future__ import annotations

import logging
import sys

from tqdm import tqdm
from tqdm.auto import tqdm as auto_tqdm


def bar(total: int, desc: str, **kwargs) -> tqdm:
    """A bar the caller advances with `update` (episodes, batch outputs)."""
    return tqdm(total=total, desc=desc, **kwargs)


def over(items, desc: str, unit: str):
    """`items` with a transient bar (loading layers, writing shards); silent when not a terminal."""
    return auto_tqdm(items, desc=desc, unit=unit, leave=False, disable=None)


def counter(total: int, desc: str, unit: str, **kwargs) -> tqdm:
    """A transient bar the caller advances with `update` (bytes written, tokens); silent when not
    a terminal."""
    return auto_tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None, **kwargs)


def message(text: str) -> None:
    """One line on stderr above any open bar."""
    tqdm.write(text, file=sys.stderr)


def warning(text: str) -> None:
    """A `warning: ...` line (something the user may want to act on), above any open bar."""
    message(f"warning: {text}")


class _AboveBars(logging.Handler):
    """Hands each record to `handler` with the open bars cleared first and redrawn after (as
    `message` writes), so a log line never lands inside a bar."""

    def __init__(self, handler: logging.Handler):
        super().__init__(handler.level)
        self.handler = handler

    def handle(self, record):  # the wrapped handler filters, locks, formats and writes
        if record.levelno < self.handler.level:
            return False
        with tqdm.external_write_mode(file=sys.stderr):
            return self.handler.handle(record)

    def emit(self, record):
        self.handle(record)

    def flush(self):
        self.handler.flush()


def log_above_bars(logger: logging.Logger | None = None) -> None:
    """Routes every handler of `logger` (the root logger: absl's handler) above the bars; once."""
    logger = logger or logging.getLogger()
    logger.handlers = [h if isinstance(h, _AboveBars) else _AboveBars(h) for h in logger.handlers]
