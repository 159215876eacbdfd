"""Errors a user can act on. The CLI prints their message on one line, with no traceback."""


class CospressError(Exception):
    """Base class: the message says what is wrong and what to do."""


class SourceError(CospressError):
    """A data source cannot be opened or listed (bad path, bad pattern, duplicate key)."""


class StoreError(CospressError):
    """A store is missing, incomplete, corrupted, or made by another teacher / policy."""


class ConfigError(CospressError):
    """A configuration value or file is invalid."""


class BadImageError(CospressError):
    """One input cannot be decoded; the runner skips it and records the reason."""
