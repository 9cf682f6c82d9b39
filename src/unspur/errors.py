"""User-facing errors.

Every problem caused by the user's input (a missing file, a bad row, an unknown option)
raises a subclass of :class:`UnspurError` whose message names the file, row or field and
says how to fix it. The CLI prints these messages without a traceback.
"""

from __future__ import annotations


class UnspurError(Exception):
    """Base class for errors the user can fix; the message is shown as is."""


class DataError(UnspurError):
    """A dataset file, row or image is missing or malformed."""


class ConfigError(UnspurError):
    """A configuration key or value is unknown or invalid."""


class CheckpointError(UnspurError):
    """A checkpoint is missing, incomplete or does not match the model."""
