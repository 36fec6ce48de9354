"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class PflError(Exception):
    """A problem the user can fix (bad path, unknown name, malformed file).

    The CLI turns it into ``pfl: error: <message>`` and exit status 2, never a traceback.
    """
