"""Errors raised by transferkit.

Every error says what was received, what is valid, and how to fix it. They all derive
from [`TransferkitError`][transferkit.TransferkitError], so ``except transferkit.TransferkitError`` catches them;
every warning is a [`TransferkitWarning`][transferkit.TransferkitWarning].
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import sysconfig
import threading
import warnings
from collections.abc import Iterable
from types import FrameType
from typing import Any

from transferkit._text import hide_secrets


class TransferkitError(Exception):
    """Base class of every error transferkit raises on purpose. Its message shows no URL's
    signature or password (`transferkit._text.hide_secrets`).

    Raised in a DataLoader worker, torch raises it again in the main process with the worker's
    traceback as its message; the constructor keeps the original message alone, so the user
    sees its one line (the traceback is the worker's, not the user's).

    Example:
        >>> str(DataError("Caught DataError in DataLoader worker process 0.\\nOriginal Traceback ...\\n"
        ...               "transferkit.errors.DataError: Cannot read image 'a.png'\\n"))
        "Cannot read image 'a.png'"
    """

    def __init__(self, *args: Any) -> None:
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") \
                and "Original Traceback" in args[0]:
            args = (args[0].rsplit(f"{type(self).__name__}: ", 1)[-1].strip(),)
        super().__init__(*(hide_secrets(a) if isinstance(a, str) else a for a in args))


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


class EngineError(TransferkitError, RuntimeError):
    """A feature-pass engine whose features disagree with eager fp32 (it is not used)."""


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


class TransferkitWarning(UserWarning):
    """Base class of every warning transferkit gives (a `UserWarning`): files left out of the
    data, settings not used, an engine or output that fell back. Each names the user's line
    that led to it. Silence them all with
    ``warnings.filterwarnings("ignore", category=transferkit.TransferkitWarning)``, or turn
    them into errors with ``"error"`` in place of ``"ignore"``."""


class TransferkitFutureWarning(TransferkitWarning, FutureWarning):
    """A spelling whose meaning will change (a `TransferkitWarning`, and a `FutureWarning`)."""


def _natural(text: str) -> list[Any]:
    """Sort key reading digit runs as numbers (``lite2`` before ``lite10``)."""
    return [(0, int(t), "") if t.isdecimal() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def closest(value: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The ``n`` choices closest to ``value``, closest first: the same name spelled with ``-``
    or other capitals, then names that ``value`` begins (shortest completion first:
    ``tf_efficientnet_lite`` -> ``tf_efficientnet_lite0``), then by similarity (difflib's
    ratio >= ``cutoff``); ties in natural order.

    Example:
        >>> closest("tv:resnet", ["tv:resnet152", "tv:resnet18", "tv:resnet50", "tv:resnet34"])
        ['tv:resnet18', 'tv:resnet34', 'tv:resnet50']
        >>> closest("fine-tune", ["full", "fine_tune"])
        ['fine_tune']
    """
    def norm(text: str) -> str:
        return text.lower().replace("-", "_")

    v = norm(value)
    matcher = difflib.SequenceMatcher()
    matcher.set_seq2(v)
    ranked = []
    for choice in dict.fromkeys(choices):
        c = norm(choice)
        if c == v:
            rank: tuple[int, float] = (0, 0.0)
        elif len(v) >= 3 and c.startswith(v):
            rank = (1, len(c) - len(v))
        else:
            matcher.set_seq1(c)
            if matcher.real_quick_ratio() < cutoff or matcher.quick_ratio() < cutoff:
                continue
            ratio = matcher.ratio()
            if ratio < cutoff:
                continue
            rank = (2, -round(ratio, 6))
        ranked.append((rank, _natural(choice), choice))
    return [choice for *_, choice in sorted(ranked)[:n]]


def suggest(value: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choices (see `closest`), or ``""``."""
    close = closest(value, choices, n=n)
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


_STREAM = re.compile(r" ?<_io\.\w+ object at 0x[0-9a-fA-F]+>")


def stream_named(text: str, name: str | None = None) -> str:
    """``text`` with the repr of an in-memory file (a reader's ``<_io.BytesIO object at 0x...>``:
    a shard member, a table cell) replaced by ``name``, or left out.

    Example:
        >>> stream_named("cannot identify image file <_io.BytesIO object at 0x7f3a2b1c0e50>", "a.tar:k")
        "cannot identify image file 'a.tar:k'"
        >>> stream_named("cannot identify image file <_io.BytesIO object at 0x7f3a2b1c0e50>")
        'cannot identify image file'
    """
    return _STREAM.sub(f" {name!r}" if name else "", text)


def unreadable_file(what: str, path: Any, exc: BaseException, fix: str, *, name: str | None = None) -> DataError:
    """The error for a ``what`` ("image", "audio file") at ``path`` that could not be read
    (``exc``): a path that does not exist says so and where it was looked for, an empty file
    that it is empty; any other failure says what failed and ``fix``. ``name``: what to call
    it (a member of a shard)."""
    shown = name or str(path)
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
        # 'photos/': a folder's name; 'photos' (Path('photos/') drops the slash): a path of no known kind
        named = "folder" if str(path).endswith(("/", os.sep)) else what if os.path.splitext(path)[1] else "path"
        return DataError(f"The {named} {shown!r} does not exist (looked for {os.path.abspath(path)!r}): check the "
                         "path.")
    if isinstance(path, (str, os.PathLike)) and os.path.isfile(path) and os.path.getsize(path) == 0:
        return DataError(f"Cannot read {what} {shown!r}: empty file (0 bytes), a copy or download cut short. {fix}")
    said = stream_named(str(exc), shown).rstrip(". ")
    return DataError(f"Cannot read {what} {shown!r}: {type(exc).__name__}: {said}. {fix}")


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep
_SITE = tuple({sysconfig.get_paths()[k] + os.sep for k in ("purelib", "platlib")})


def _torch_dir() -> str | None:
    """The folder of torch, when it is imported (a DataLoader's frames are torch's)."""
    torch = sys.modules.get("torch")
    found = getattr(torch, "__file__", None) if torch is not None else None
    return os.path.dirname(found) + os.sep if found else None


def _inside(filename: str, torch_dir: str | None) -> bool:
    """Whether a frame of ``filename`` is transferkit's, torch's (``torch_dir``: a DataLoader
    calling a dataset of transferkit's) or Python's own (``contextlib``, ``threading``, frozen
    modules), not a caller's. Third-party packages under the standard library's folder (a
    Python without a virtual environment) are callers."""
    if filename.startswith((_PACKAGE, "<frozen ")) or (torch_dir is not None and filename.startswith(torch_dir)):
        return True
    return filename.startswith(_STDLIB) and not filename.startswith(_SITE)


def _first_outside(frame: FrameType | None, torch_dir: str | None) -> tuple[int, FrameType | None]:
    """``(frames walked, the first frame outside)`` from ``frame`` to its callers (`_inside`);
    None where every one is inside."""
    level = 0
    while frame is not None and _inside(frame.f_code.co_filename, torch_dir):
        frame, level = frame.f_back, level + 1
    return level, frame


def _main_thread_caller(torch_dir: str | None, tries: int = 5) -> FrameType | None:
    """The first frame outside transferkit of the main thread's stack, read from another
    thread. The main thread runs meanwhile, and a stack walked while it changes may hold what
    is no frame (seen: a lock, under CPython 3.11): the walk is tried again, then given up."""
    for _ in range(tries):
        try:
            frame = _first_outside(sys._current_frames().get(threading.main_thread().ident), torch_dir)[1]
        except AttributeError:
            continue
        if frame is None or isinstance(frame, FrameType):
            return frame
    return None


def warn(message: str, category: type[Warning] = TransferkitWarning) -> None:
    """Give a warning of ``category`` named at the user's line: the first caller outside
    transferkit, torch (a DataLoader reading a dataset of transferkit's) and Python's own
    modules. The one way transferkit warns.

    A worker thread of transferkit's has no caller of the user's: its warning names the line
    the main thread waits at (the user's call that started the work). Where no line is the
    user's (the command line), the outermost frame. The message shows no URL's signature or
    password (`transferkit._text.hide_secrets`)."""
    message = hide_secrets(message)
    torch_dir = _torch_dir()
    level, user = _first_outside(sys._getframe(1), torch_dir)
    if user is not None:
        warnings.warn(message, category, stacklevel=level + 2)  # 1: this function, 2: its caller
        return
    if threading.current_thread() is not threading.main_thread():
        user = _main_thread_caller(torch_dir)
    if user is None:
        warnings.warn(message, category, stacklevel=level + 1)
        return
    names = user.f_globals
    warnings.warn_explicit(message, category, user.f_code.co_filename, user.f_lineno, module=names.get("__name__"),
                           registry=names.setdefault("__warningregistry__", {}), module_globals=names)
