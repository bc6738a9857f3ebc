"""The one exception type for mistakes a user can make (bad path, bad flag, corrupt file)."""


class UserError(Exception):
    """An input problem the user can fix. The message names the input and the fix.

    Launchers print it as one `error: ...` line on stderr and exit with code 2.
    """
