"""Errors raised by transferkit.

Every error says what was received, what is valid, and how to fix it. They all derive
from [`TransferkitError`][transferkit.TransferkitError], so ``except transferkit.TransferkitError`` catches them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TransferkitError(Exception):
    """Base class of every error transferkit raises on purpose."""


class UnknownBackboneError(TransferkitError, ValueError):
    """A backbone name that no registered source knows."""


class BackboneError(TransferkitError):
    """A backbone that cannot be built or adapted."""


class WeightsError(TransferkitError):
    """Weights that cannot be found, downloaded or loaded."""


class DataError(TransferkitError, ValueError):
    """Data that cannot be used: empty folders, unknown labels, bad files."""


class PolicyError(TransferkitError, ValueError):
    """A fine-tuning policy that is malformed or does not fit the model."""


class TrainingError(TransferkitError):
    """Training that cannot go on (non-finite loss, out of memory, ...)."""


class ExportError(TransferkitError):
    """An export that fails or does not reproduce the eager model."""


class ConfigError(TransferkitError, ValueError):
    """A configuration value of the wrong type or out of range."""


class OutputError(TransferkitError, OSError):
    """An output path (export, checkpoint, plots, cache, logs) that cannot be written (also an
    OSError, so code that caught the raw error still does)."""


class FileLockedError(OutputError):
    """An output file that another live process is writing (e.g. two runs on one checkpoint)."""


class CorruptFileError(TransferkitError):
    """A file whose content does not match the digests recorded when it was written."""


class CorruptCheckpointError(WeightsError, CorruptFileError):
    """A checkpoint (or weights file written by transferkit) that is damaged."""


class CorruptExportError(ExportError, CorruptFileError):
    """An exported model file that is damaged."""


def suggest(value: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choices, or ``""``."""
    close = difflib.get_close_matches(value, list(choices), n=n, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def check_choice(what: str, value: object, choices: Iterable[str]) -> str:
    """Validate that ``value`` is one of ``choices`` and return it, or raise ConfigError."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        hint = suggest(value, choices) if isinstance(value, str) else ""
        raise ConfigError(
            f"Unknown {what} {value!r}.{hint} Valid values: {', '.join(map(repr, choices))}."
        )
    return value
