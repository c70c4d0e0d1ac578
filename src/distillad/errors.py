"""User-facing errors.

Anything a user can fix (a missing folder, a corrupt image, unknown option) raises
:class:`DistilladError` with a one-line message naming the file or option and the fix; the CLI
prints that line and exits with status 2 instead of a traceback.
"""


class DistilladError(Exception):
    """An error caused by input or options; its message says what to change."""
