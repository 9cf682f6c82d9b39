"""User-facing errors.

Every problem caused by the user's input (a missing file, a bad row, an unknown option)
raises a subclass of :class:`UnspurError` whose message names the file, row or field and
says how to fix it. The CLI prints these messages without a traceback.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class UnspurError(Exception):
    """Base class for errors the user can fix; the message is shown as is."""


class DataError(UnspurError):
    """A dataset file, row or image is missing or malformed."""


class ConfigError(UnspurError):
    """A configuration key or value is unknown or invalid."""


class CheckpointError(UnspurError):
    """A checkpoint is missing, incomplete or does not match the model."""


class UnspurWarning(UserWarning):
    """Something the user should know before trusting the results (the run still goes on).

    The CLI prints these as one ``unspur: warning: ...`` line, without a source location.
    """


#: Names other toolkits use for our keys; checked before spelling similarity, since
#: ``learning_rate`` and ``lr`` share too few letters for :mod:`difflib` (our choice).
COMMON_ALIASES = {
    "learning_rate": "lr",
    "lr_rate": "lr",
    "wd": "weight_decay",
    "bs": "batch_size",
    "n_epochs": "epochs",
    "num_epochs": "epochs",
    "max_epochs": "epochs",
    "optim": "optimizer",
    "workers": "num_workers",
    "img_size": "image_size",
    "resolution": "image_size",
    "dataset": "name",
    "arch_name": "arch",
    "architecture": "arch",
    "gpu": "cuda",
}


def closest_name(key: str, choices: Iterable[str]) -> str | None:
    """The choice the user most likely meant by ``key``, or None when nothing is close.

    Tried in order: a known alias (``learning_rate`` -> ``lr``), the same name in other
    case, a close spelling (``epochz`` -> ``epochs``), a word of the key that is a whole
    choice (``lr_rate`` -> ``lr``, ``num_epochs`` -> ``epochs``), one name inside the
    other (``batch`` -> ``batch_size``), then a looser spelling match.
    """
    choices = [str(c) for c in choices]
    if not choices:
        return None
    key = str(key)
    lowered = key.lower()
    alias = COMMON_ALIASES.get(lowered)
    if alias in choices:
        return alias
    for choice in choices:
        if choice.lower() == lowered:
            return choice
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    if close:
        return close[0]
    words = [w for w in re.split(r"[^a-z0-9]+", lowered) if w]
    for choice in choices:
        if choice.lower() in words:
            return choice
    inside = [c for c in choices if len(c) >= 3 and len(lowered) >= 3]
    inside = [c for c in inside if lowered in c.lower() or c.lower() in lowered]
    if inside:
        return min(inside, key=lambda c: abs(len(c) - len(key)))
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    return close[0] if close else None


def did_you_mean(key: str, choices: Iterable[str], prefix: str = "") -> str:
    """`` (did you mean 'PREFIXchoice'?)`` for the closest choice, or ``""``."""
    match = closest_name(key, choices)
    return f" (did you mean {prefix + match!r}?)" if match else ""
