"""Errors a user can act on. The CLI prints their message on one line, with no traceback."""


class CospressError(Exception):
    """Base class: the message says what is wrong and what to do.

    Raised in a DataLoader worker, it comes back re-created from a message holding the worker's
    traceback: only its last line, the original message, is kept.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and "\nOriginal Traceback" in args[0]:
            last = args[0].rstrip().splitlines()[-1]
            name, sep, message = last.partition(": ")
            args = (message if sep and name.split(".")[-1] == type(self).__name__ else last,)
        super().__init__(*args)


class SourceError(CospressError):
    """A data source cannot be opened or listed (bad path, bad pattern, duplicate key)."""


class StoreError(CospressError):
    """A store is missing, incomplete, corrupted, or made by another teacher / policy."""


class ConfigError(CospressError):
    """A configuration value or file is invalid."""


class BadImageError(CospressError):
    """One input cannot be decoded; the runner skips it and records the reason."""


class NetworkError(StoreError, SourceError):
    """A remote read (of a store or of a source) still failed after its retries (`cospress.netio`):
    never a bad input."""
