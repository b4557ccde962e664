"""User-facing errors: the CLI prints these as one line, never as a traceback."""


class CnnCodesError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""


class Interrupted(CnnCodesError):
    """The run was stopped by the user (Ctrl-C); the message says how to resume."""


class WriteFailed(CnnCodesError):
    """A file could not be written (disk full, size limit, permissions); the old file is intact."""
