"""Signals during a run: SIGTERM (what a scheduler or ``kill`` sends before killing a job)
handled like Ctrl-C, and Ctrl-C / SIGTERM held while the last copy of the trained weights is
being written.

- `terminate_as_interrupt`: inside the block, SIGTERM raises `Terminated` (a
  ``KeyboardInterrupt``) in the main thread, so the code that keeps the weights on Ctrl-C keeps
  them on SIGTERM too. A handler the program installed itself is left alone.
- `terminate_at_once`: inside the block, SIGTERM ends the process at once again (a wait in
  C++ with nothing to save, where a Python handler would run only when the wait ends).
- `held_signals`: inside the block, SIGINT and SIGTERM are recorded, not acted on; the block
  finishes its write, then `KeyboardInterrupt` / `Terminated` is raised (``reraise=False``: the
  caller is already reporting an interruption).
- `first_interruption_holds`: inside the block, a Ctrl-C or SIGTERM that follows another
  within `HOLD_S` seconds is recorded, not raised: the first one's handling (which keeps the
  weights) is under way, and a second exception raised into it would end it before the save.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def raise_if_interrupted(exc: BaseException) -> None:
    """Raise the Ctrl-C or signal that ``exc`` (an ``ImportError``) stands for: a C extension
    whose import is interrupted fails with ``ImportError('initialization failed')`` caused by
    the ``KeyboardInterrupt``. An optional package is not missing because its import was
    interrupted; the run stops as an interrupted one.

    Example:
        >>> try:
        ...     raise ImportError("initialization failed") from KeyboardInterrupt()
        ... except ImportError as exc:
        ...     try:
        ...         raise_if_interrupted(exc)
        ...     except KeyboardInterrupt:
        ...         print("interrupted")
        interrupted
    """
    for inner in (exc.__cause__, exc.__context__):
        if isinstance(inner, KeyboardInterrupt):
            raise inner


class Terminated(KeyboardInterrupt):
    """SIGTERM received during a run (handled like Ctrl-C: the trained weights are kept)."""

    signum = signal.SIGTERM

    def __init__(self, message: str = "terminated (SIGTERM)") -> None:
        super().__init__(message)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during [`transferkit.finetune`][transferkit.finetune]; ``checkpoint`` is where the work
    is (the run's checkpoint, or the file the current weights were saved to)."""

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def signal_name(exc: BaseException | None) -> str:
    """``"SIGTERM"`` for a `Terminated` (also as the cause of another interruption), else ``"Ctrl-C"``."""
    while exc is not None:
        if isinstance(exc, Terminated) or getattr(exc, "signum", None) == signal.SIGTERM:
            return "SIGTERM"
        exc = exc.__cause__ or exc.__context__
    return "Ctrl-C"


def interrupt_exit(exc: BaseException, reason: str) -> tuple[str, int]:
    """What a command prints for an interruption (after ``"<prog>: "``), and its exit status
    (143 for SIGTERM, 130 for Ctrl-C). ``reason``: the exception's one line ('' when it has
    none); one that says it was interrupted is not prefixed again."""
    term = signal_name(exc) == "SIGTERM"
    reason = reason or ("terminated (SIGTERM)" if term else "interrupted (Ctrl-C)")
    said = reason.lower().startswith(("interrupted", "terminated"))
    return (reason if said else f"interrupted: {reason}"), (143 if term else 130)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def deaf_once_said(code: int) -> int:
    """Return ``code``; where it is an interruption's (130, 143) and this is the main thread,
    SIGINT and SIGTERM are ignored from now on. A command that has said its interruption ends
    with that status: a second signal of the same job (a scheduler's, Ctrl-C again) landing
    before the process ended changed it to death by the signal (exit -2, -15)."""
    if code in (130, 143) and _main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
    return code


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises `Terminated` inside the block (main thread, default SIGTERM handler only)."""
    if not _main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


HOLD_S = 10.0  # seconds after a Ctrl-C or SIGTERM during which another is held (`first_interruption_holds`)


@contextlib.contextmanager
def first_interruption_holds(hold_s: float = HOLD_S) -> Iterator[list[int]]:
    """Inside the block, Ctrl-C and SIGTERM raise as they do outside it (SIGTERM where
    `terminate_as_interrupt` made it raise), except that one arriving within ``hold_s``
    seconds of the one before is recorded and not raised: a scheduler that signals the whole
    process group, or Ctrl-C pressed twice, raised the second into the code that handles the
    first (before it reaches `held_signals`), and the weights it was about to keep were lost.
    A later one raises again (code that swallowed the first cannot make the run deaf). Main
    thread, and the handlers transferkit installs, only: a program's own handler is left
    alone. Yields the signals held.

    Example:
        >>> with terminate_as_interrupt(), first_interruption_holds() as held:
        ...     try:
        ...         signal.raise_signal(signal.SIGINT)
        ...     except KeyboardInterrupt:
        ...         signal.raise_signal(signal.SIGTERM)  # while the first is handled: held
        >>> held == [signal.SIGTERM]
        True
    """
    held: list[int] = []
    ours = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_terminated}
    if not _main_thread() or not any(signal.getsignal(s) is h for s, h in ours.items()):
        yield held
        return
    last = [float("-inf")]

    def on_signal(signum: int, frame: object) -> None:
        now = time.monotonic()
        if now - last[0] < hold_s:
            held.append(signum)
            return
        last[0] = now
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    on_signal.raises_interruptions = True  # type: ignore[attr-defined]  # (`terminate_at_once` reads it)
    before = {s: signal.getsignal(s) for s in ours}
    for s, h in ours.items():
        if before[s] is h:
            signal.signal(s, on_signal)
    try:
        yield held
    finally:
        for s, h in before.items():
            if signal.getsignal(s) is on_signal:
                signal.signal(s, h)


@contextlib.contextmanager
def terminate_at_once() -> Iterator[None]:
    """Inside the block SIGTERM has its default action, ending the process at once, where
    `terminate_as_interrupt` installed its handler (main thread only; a handler the program
    installed itself is left alone). For a wait in C++ with nothing to save, such as joining
    the process group: a Python handler runs only when the wait ends, so a rank that torchrun
    ends because another failed would linger until torchrun kills it 30 s later."""
    handler = signal.getsignal(signal.SIGTERM)
    if not _main_thread() or not (handler is _raise_terminated or getattr(handler, "raises_interruptions", False)):
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def held_signals(*, reraise: bool = True) -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM until the block ends (main thread only); then, with ``reraise``,
    raise for the first one that arrived. Yields the list of signals received so far."""
    got: list[int] = []
    if not _main_thread():
        yield got
        return

    def record(signum: int, frame: object) -> None:
        got.append(signum)

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, record)
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
    if reraise and got:
        if got[0] == signal.SIGTERM and old[signal.SIGTERM] is signal.SIG_DFL:
            raise Terminated()
        if got[0] == signal.SIGINT and old[signal.SIGINT] is signal.default_int_handler:
            raise KeyboardInterrupt()
        signal.raise_signal(got[0])  # the program's own handler decides


def end_with_the_launcher() -> None:
    """Under torchrun on Linux: this process gets SIGTERM when the launcher that started it dies
    (``kill -9`` of torchrun), handled as every SIGTERM is (a run keeps its weights and ends).
    torchrun starts each worker in a session of its own, so without this a worker whose
    launcher died trained on to the end, unseen. Asked as the command line starts and again as a
    run joins its job; a launcher that dies before the first request goes unnoticed, and one that
    starts its workers from a thread other than its main one (torchrun starts them from its
    main thread) would end them when that thread ends. Elsewhere, nothing."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):  # no prctl: the launcher's death goes unnoticed, as before
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
