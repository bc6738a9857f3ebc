"""The one exception type for mistakes a user can make (bad path, bad flag, corrupt file)."""


class UserError(Exception):
    """An input problem the user can fix. The message names the input and the fix.

    Launchers print it as one `error: ...` line on stderr and exit with code 2.
    """


class WriteError(UserError):
    """An output could not be written (disk full, permission lost, read-only file system): the
    run stops (a batch does not blame the checkpoint it was writing) and a rerun continues."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, honoured at a safe point (after an episode); the message says how to continue.
    Launchers print it as one `error: ...` line and exit with code 130."""


class Diverged(UserError):
    """Training became non-finite (NaN or Inf loss, gradient or weights): the run stops, nothing
    is marked done and the last good training checkpoint is kept; the message names the flags
    that usually cause it (a learning rate or scale too large)."""
