"""A training loop that survives being stopped: policy training's episodes (method/trainer.py) and
recovery's steps (recovery/recover.py) both run inside one `Resumable`.

It owns what such a loop needs besides its step: the training checkpoints under a state folder
(an old run's discarded unless resuming; the resume point), the progress bar, the save schedule
(every N units; at the end; and when stopped), Ctrl-C (stop after the running unit, checkpoint,
say how to continue: one jitted call cannot be cut short) and, on leaving, also on an error,
ending the bar's line, waiting for the running save and closing the checkpoints, so none is left
half written (a failed run's partial save and empty state folder are removed).

    with Resumable(state_dir, meta, resume=..., total=n, every=k, unit="step", desc="recovery") as loop:
        if loop.resuming:
            state, history, done = loop.restore(template, history_template_fn)
        loop.start(done)
        for i in range(done, n):
            ...  # one unit
            loop.advance(loss=...)  # the bar
            loop.finished(i + 1, lambda: (state, history))  # saves when due; stops on Ctrl-C
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from typing import Callable, Optional

import jax

from prunenet_jax import progress
from prunenet_jax.errors import Interrupted
from prunenet_jax.formats import orbax


def barrier(name: str) -> None:
    """Every process waits here for the others (multi-host runs; nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _drop_closed_loop_reports() -> None:
    """After a failed checkpoint write, tensorstore's threads may still call back into orbax's
    event loop, closed by then, and Python prints each call as an unraisable "Event loop is
    closed" traceback; the failure itself is reported once (a WriteError), so these are dropped.
    Installed once for the process: they can come until it exits."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_reports", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_reports = True
    sys.unraisablehook = hook


class StopOnCtrlC:
    """While entered, Ctrl-C (SIGINT) asks the loop to stop after the running `unit` instead of
    raising in the middle of it; a second Ctrl-C interrupts at once. Only the main thread can
    handle signals: elsewhere this does nothing."""

    def __init__(self, unit: str = "episode"):
        self.unit = unit
        self.asked, self._installed, self._previous = False, False, None

    def _restore(self):
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def _ask(self, signum, frame):
        self.asked = True
        self._restore()
        progress.message(f"Ctrl-C: stopping after this {self.unit} (press it again to stop at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous, self._installed = signal.signal(signal.SIGINT, self._ask), True
        return self

    def __exit__(self, *exc):
        if self._installed:
            self._restore()
            self._installed = False


class Resumable:
    """The checkpoints, bar, save schedule and Ctrl-C guard of a loop of `total` units.

    `state_dir` None: nothing is saved (the bar and Ctrl-C still work). Without `resume` an old
    state there is discarded first. `meta` describes the run: a checkpoint of another run is
    refused on restore. A checkpoint is saved after every `every` units (0: never), after the
    last with `save_last`, and when Ctrl-C stops the loop. `all_processes`: every process of a
    multi-host run runs this loop (process 0 clears the folder and shows the bar; the others wait
    for it); otherwise this process runs it alone. `last_saved`: the units done at the latest
    checkpoint saved or resumed from (None: none)."""

    def __init__(self, state_dir: Optional[str], meta: dict, *, resume: bool, total: int,
                 every: int, unit: str, desc: str, save_last: bool = False,
                 all_processes: bool = False):
        self.total, self.every, self.unit, self.desc = total, every, unit, desc
        self.save_last, self.all_processes = save_last, all_processes
        self.ckpts, self.bar, self._stop = None, None, StopOnCtrlC(unit)
        self.last_saved: Optional[int] = None
        if state_dir:
            _drop_closed_loop_reports()
            if not resume and os.path.isdir(state_dir) and (
                    not all_processes or jax.process_index() == 0):
                shutil.rmtree(state_dir)  # an old run's resume points belong to the run being replaced
            if all_processes:
                barrier("prunenet_train_state_cleared")
            self.ckpts = orbax.TrainCheckpoints(state_dir, meta)
        self.resuming = self.ckpts is not None and resume and self.ckpts.latest_episode() is not None

    @property
    def directory(self) -> Optional[str]:
        return None if self.ckpts is None else self.ckpts.directory

    def restore(self, state_template, history_template_fn: Callable) -> tuple:
        """(state, history, units done) of the checkpoint to resume from (orbax.TrainCheckpoints)."""
        state, history, done = self.ckpts.restore(state_template, history_template_fn)
        self.last_saved = done
        return state, history, done

    def __enter__(self) -> "Resumable":
        return self

    def start(self, done: int) -> None:
        """The loop begins after `done` units: the bar, and Ctrl-C stops after a unit from now."""
        self.bar = progress.bar(total=self.total, desc=self.desc, initial=done,
                                disable=self.all_processes and jax.process_index() != 0)
        self._stop.__enter__()

    def advance(self, **postfix) -> None:
        """One more unit on the bar, with these values beside it."""
        self.bar.set_postfix(**postfix)
        self.bar.update(1)

    def finished(self, done: int, saved: Callable[[], tuple]) -> None:
        """After `done` units: saves `saved()` = (state, history) when due; after Ctrl-C, saves,
        waits for the save and raises Interrupted (saying how to continue)."""
        stop = self._stop.asked
        due = ((self.every and done % self.every == 0) or (self.save_last and done == self.total)
               or stop)
        if self.ckpts is not None and due:
            self.ckpts.save(done, *saved())
            self.last_saved = done
        if stop:
            if self.ckpts is not None:
                self.ckpts.wait()  # the checkpoint of this finished unit is complete
            raise Interrupted(f"interrupted (Ctrl-C) after {self.unit} {done} of {self.total}" + (
                f"; the training state is saved in {self.ckpts.directory}: rerun the same command "
                "with --resume to continue" if self.ckpts is not None else ""))

    def __exit__(self, exc_type, *exc) -> None:
        """Also on an error: the bar ends its line first (an `error:` line printed next stands on
        its own), no checkpoint is left half written by a running save, and a failed run leaves
        no partial save (nor a state folder it left empty) behind."""
        if self.bar is not None:
            self.bar.close()
        self._stop.__exit__()
        if self.ckpts is None:
            return
        try:
            self.ckpts.wait()
            self.ckpts.close()
        except BaseException:
            self._discard_unfinished()
            raise
        if exc_type is not None:
            self._discard_unfinished()

    def _discard_unfinished(self) -> None:
        """After a failure: orbax's partial saves (`<n>.orbax-checkpoint-tmp*`, which it leaves
        when a write fails) are removed, and the state folder when nothing else is in it (the
        last good checkpoints stay)."""
        if self.all_processes and jax.process_index() != 0:
            return
        directory = self.ckpts.directory
        # the failed save's writer threads may still add files for a moment
        orbax.remove_partial_saves(directory, settle_seconds=5.0)
        with contextlib.suppress(OSError):
            os.rmdir(directory)  # only when empty
