"""Remote tar shards, fetched whole into a bounded local shard cache and read from there.

A remote shard is named by a ``pipe:`` command (``pipe:curl -s https://host/train-000.tar``:
the command's standard output is the shard), an ``http://`` or ``https://`` URL (read with
the standard library), or any other URL that [fsspec](https://filesystem-spec.readthedocs.io)
opens (``s3://``, ``gs://``, ``hf://``, ``file://``, ...; install ``fsspec`` and the scheme's
package, e.g. ``s3fs``).

A shard is *streamed*: read front to back (never seeked, never held whole in memory) into a
temporary file of the shard cache, checked, and renamed into place; the local random-access
reader of `transferkit.data.shards` then reads it like a local shard. What makes that safe
and bounded:

- **One fetch per node.** The processes that want the same shard (DataLoader workers, the
  ranks of one node sharing ``cache_dir``) take a lock file beside it (``fcntl.flock``):
  the first fetches, the others wait and then read the finished file; nobody reads a
  half-written one.
- **A byte budget.** The cache holds at most `cache_budget` bytes of shards
  (``TRANSFERKIT_SHARD_CACHE``, e.g. ``20G``; default `DEFAULT_BUDGET`), and the shards open
  at the moment: before and after each fetch, and when a process closes a shard while the cache
  is over its budget, the least recently used shards that no process has open are removed. The free space is checked
  before a fetch whose size is known.
- **Where.** ``cache_dir/shards/`` when ``cache_dir`` is set (kept across runs), else a
  temporary folder removed when the process exits. Files are named by a hash of the URL
  (`shard_identity`: without a signing scheme's parameters where validators tell the object
  apart) and its validators.
- **Errors.** A failed fetch (an HTTP error, a command that exits with a non-zero code, a
  body shorter than its Content-Length, an HTTP body, a command's output or an fsspec file
  that brings fewer than `STALL_BYTES` in `fetch_timeout` seconds) raises a one-line `ShardFetchError` naming the
  URL.
  A failure that may pass (a dropped or refused connection, a timeout, a short body, HTTP
  5xx, 429 or 408, a command's non-zero exit, another file system error than a missing
  file) is tried again after each of `RETRY_WAITS` first; the error then says how many
  attempts were made. A missing shard (HTTP 404, a missing file) fails at once.

`remote_validators` (a ``HEAD``) and `fetch_small` (an ``_info.json``) are tried again the same
way. `remote_validators` reads what identifies a shard's current content without fetching it:
``ETag``, ``Content-Length`` and ``Last-Modified`` from an HTTP ``HEAD`` (or the size, ETag
and modification time fsspec lists); a ``pipe:`` command has none (its text is its identity).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from transferkit._io import (at_exit, atomic_write, check_free_space, create_temp, entry_not_kept, new_digest,
                             read_only_folder, remove_stale_temps)
from transferkit._signals import raise_if_interrupted
from transferkit._text import hide_query, hide_url, unsigned
from transferkit.config import env_flag, env_seconds
from transferkit.errors import DataError

ENV_OFFLINE = "TRANSFERKIT_OFFLINE"
ENV_BUDGET = "TRANSFERKIT_SHARD_CACHE"
DEFAULT_BUDGET = 16 * 2**30
"""Bytes of remote shards the shard cache keeps by default (16 GiB: a few dozen shards of
the usual 0.1-1 GB); set ``TRANSFERKIT_SHARD_CACHE`` (``500M``, ``20G``, or bytes) to change it."""
ENV_TIMEOUT = "TRANSFERKIT_FETCH_TIMEOUT"
TIMEOUT = 60.0  # seconds a fetch may wait for a byte, or bring fewer than STALL_BYTES, before it fails (ENV_TIMEOUT)
STALL_BYTES = 64 * 1024  # a fetch that brings fewer bytes than this in TIMEOUT seconds (a trickle) has stalled
RETRY_WAITS = (1.0, 4.0, 16.0)  # seconds before each new attempt of a fetch whose failure may pass
CHUNK = 1 << 20
FETCH_POLL_S = 0.02  # how often a process waiting for another's fetch of a shard looks whether it is there
STOP_POLL_S = 0.5  # how often a waiting fetch looks whether it was told to stop (`stop_fetches_on_interrupt`)
_LOCAL = threading.local()  # .stop: the `_Stop` of the fetches this thread runs for a `stop_fetches_on_interrupt`
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "hf": "huggingface_hub",
             "sftp": "paramiko", "ssh": "paramiko"}


class ShardFetchError(DataError):
    """A remote shard that could not be fetched (not a bad shard: nothing was read).
    ``transient``: the failure may pass (a fetch is tried again, see `stream_to`)."""

    transient = False


def is_url(spec: Any) -> bool:
    """Whether ``spec`` is a ``pipe:`` command or a URL (``scheme://...``)."""
    return isinstance(spec, str) and (spec.startswith("pipe:") or bool(_URL.match(spec)))


def scheme(url: str) -> str:
    return "pipe" if url.startswith("pipe:") else url.split("://", 1)[0].lower()


def parse_bytes(text: str) -> int:
    """``"500M"``, ``"20G"``, ``"1.5T"`` or ``"123456"`` as bytes (powers of 1024).

    Example:
        >>> parse_bytes("20G"), parse_bytes("512k"), parse_bytes("1000")
        (21474836480, 524288, 1000)
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", str(text))
    if m is None:
        raise DataError(f"{ENV_BUDGET}={text!r} is not a size: write bytes or a number with K, M, G or T "
                        "(e.g. 20G).")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def cache_budget() -> int:
    """The shard cache's byte budget: ``TRANSFERKIT_SHARD_CACHE`` when set, else `DEFAULT_BUDGET`."""
    text = os.environ.get(ENV_BUDGET, "").strip()
    return parse_bytes(text) if text else DEFAULT_BUDGET


def budget_setting() -> str:
    """How this process sets the shard cache's budget, said for a message:
    ``'TRANSFERKIT_SHARD_CACHE=20G'``, or ``'TRANSFERKIT_SHARD_CACHE unset (16 GiB)'``."""
    text = os.environ.get(ENV_BUDGET, "").strip()
    return f"{ENV_BUDGET}={text}" if text else f"{ENV_BUDGET} unset ({DEFAULT_BUDGET / 2**30:.0f} GiB)"


def offline() -> bool:
    """Whether ``TRANSFERKIT_OFFLINE`` is on: remote shards are read from ``cache_dir`` alone,
    as the last look-up there found them (`remembered`), and nothing is asked of their servers."""
    return env_flag(ENV_OFFLINE)


def _seen_path(cache_dir: str | Path, url: str) -> Path:
    """Where `remember` keeps what a look-up of ``url`` found: named by a hash of the URL without
    a signing scheme's parameters (a URL signed again at each start of a job is the same shard)."""
    return Path(cache_dir) / "shard-index" / "seen" / (hashlib.blake2b(unsigned(url).encode(), digest_size=16)
                                                      .hexdigest() + ".json")


def remember(cache_dir: str | Path | None, url: str, record: dict[str, Any]) -> None:
    """Keep in ``cache_dir`` what a look-up of ``url`` found (a shard's validators, an
    ``_info.json``'s text or its absence): what an offline run reads instead of asking the
    server. The file is named by a hash of the URL and holds no URL (a signed one's secret
    stays out of it). Nothing is kept without a ``cache_dir``, or in a read-only one."""
    if cache_dir is None:
        return
    path = _seen_path(cache_dir, url)
    try:
        if path.is_file() and json.loads(path.read_text()) == record:
            return  # unchanged: not written again by every run and every rank
    except (OSError, ValueError):
        pass
    if read_only_folder(cache_dir) is not None:
        return
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, sort_keys=True)), what="shard record")
    except OSError as exc:
        entry_not_kept(exc, cache_dir=cache_dir, what=f"record of {hide_url(url)!r}",
                       later=f"an offline run ({ENV_OFFLINE}=1) cannot read it from the cache")


def offline_hint(exc: ShardFetchError, cache_dir: str | Path | None, url: str,
                 held: Callable[[dict[str, str]], bool]) -> ShardFetchError:
    """``exc``, a look-up of ``url`` that failed in a way that may pass (a server down or out of
    reach), with the way to train without the server where ``cache_dir`` holds what an offline
    run needs of it: its record (`remember`), and what ``held(validators)`` says is there (the
    shard's index and copy); else ``exc`` itself."""
    if not exc.transient or cache_dir is None:
        return exc
    try:
        record = json.loads(_seen_path(cache_dir, url).read_text())
        ready = isinstance(record, dict) and isinstance(record.get("validators"), dict) and held(record["validators"])
    except (OSError, ValueError):
        ready = False
    if not ready:
        return exc
    hinted = ShardFetchError(f"{str(exc).rstrip('.')}. cache_dir {str(cache_dir)!r} holds its index and copy as an "
                             f"earlier run found them: with {ENV_OFFLINE}=1 a run reads the cache without the server "
                             "(the copies as they were then), where it holds every shard the run reads.")
    hinted.transient = True
    return hinted


def remembered(cache_dir: str | Path | None, url: str, what: str) -> dict[str, Any]:
    """What the last look-up of ``url`` with this ``cache_dir`` found (`remember`), for an
    offline run; a `ShardFetchError` that says what is missing when there is none."""
    if cache_dir is None:
        raise ShardFetchError(f"{ENV_OFFLINE}=1 reads remote shards from cache_dir alone, and this run has none: "
                              f"give the cache_dir of an earlier run on {hide_url(url)!r}, or unset {ENV_OFFLINE}.")
    try:
        record = json.loads(_seen_path(cache_dir, url).read_text())
        if isinstance(record, dict):
            return record
    except (OSError, ValueError):
        pass
    raise ShardFetchError(f"{ENV_OFFLINE}=1, and cache_dir {str(cache_dir)!r} holds no {what} of {hide_url(url)!r} "
                          f"(no run with this cache_dir looked it up online): run once online with this cache_dir, "
                          f"or unset {ENV_OFFLINE}.")


def _fsspec(url: str) -> Any:
    try:
        import fsspec
    except ImportError as exc:
        raise_if_interrupted(exc)
        pkg = _PACKAGES.get(scheme(url))
        raise ShardFetchError(f"Reading {hide_url(url)!r} needs fsspec: pip install "
                              f"fsspec{f' {pkg}' if pkg else ''}.") from None
    return fsspec


def _fail(url: str, what: str, *, transient: bool = False) -> ShardFetchError:
    what = " ".join(what.split())  # one line: a server's or a command's words may hold line breaks
    exc = ShardFetchError(f"Cannot fetch the shard {hide_url(url)!r}: {hide_query(what)}.")  # a space in it, too
    exc.transient = transient
    return exc


def _http_errors() -> tuple[type[BaseException], ...]:
    """What an HTTP request by urllib raises when it fails (imported when a URL is read)."""
    import http.client
    import urllib.error

    return urllib.error.URLError, OSError, http.client.HTTPException, ValueError


def _http_failure(url: str, exc: BaseException) -> ShardFetchError:
    """The `ShardFetchError` of an HTTP request of ``url`` that raised ``exc`` (urllib's and
    http.client's errors, `OSError`): the status or the reason, marked ``transient`` where
    trying again may succeed (a 5xx, 408 or 429; a connection's failure that `_may_pass`)."""
    import http.client
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        exc.close()  # its response holds the connection's socket (else left to the collector, with a warning)
        return _fail(url, f"HTTP {exc.code} {exc.reason}", transient=exc.code >= 500 or exc.code in (408, 429))
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    cannot = isinstance(exc, (http.client.InvalidURL, ValueError))  # a URL that cannot be requested (a space in it)
    said = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
    return _fail(url, said, transient=not cannot and _may_pass(reason))


def _http_validators(headers: Any) -> dict[str, str]:
    out = {}
    for name in ("ETag", "Content-Length", "Last-Modified"):
        v = headers.get(name)
        if v:
            out[name.lower()] = str(v)
    return out


def shard_identity(url: str, validators: dict[str, str] | None) -> str:
    """What names the remote shard ``url`` in keys (its cached copy, its index, the data's
    digest): the URL without the parameters of a signing scheme it carries
    (`transferkit._text.unsigned`: a URL signed anew is the same shard) where the server gave
    ``validators`` that tell its content apart (an ETag or checksum: a length and a date to the
    second do not tell apart an object rewritten with both kept); else the URL as it is (an
    object replaced under a URL whose server says nothing of it is told apart by the new
    signature alone)."""
    return unsigned(url) if any(k in (validators or {}) for k in ("etag", "md5", "checksum")) else url


def remote_validators(url: str) -> dict[str, str]:
    """What identifies the current content of ``url`` without reading it (see the module
    docstring); ``{}`` when nothing does. A shard that does not exist raises `ShardFetchError`.
    The look-up runs in a helper thread (`_stoppable`)."""
    if scheme(url) == "pipe":
        return {}

    def once() -> dict[str, str]:
        got: list[dict[str, str]] = []
        _stoppable(lambda: got.append(_look_up(url)), url)
        return got[0]
    return _retried(url, once)


def _look_up(url: str) -> dict[str, str]:
    kind = scheme(url)
    if kind in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=fetch_timeout()) as r:
                return _http_validators(r.headers)
        except urllib.error.HTTPError as exc:
            if exc.code not in (404, 410):  # no HEAD (405, 501, 5xx; a URL signed for GET only: 403): a GET of
                exc.close()
                return _first_byte_validators(url)  # its first byte says the same, or the URL alone identifies it
            raise _http_failure(url, exc) from None
        except _http_errors() as exc:
            raise _http_failure(url, exc) from None
    fsspec = _fsspec(url)
    try:
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
    except FileNotFoundError:
        raise _fail(url, "it does not exist") from None
    except ImportError as exc:
        raise_if_interrupted(exc)
        raise ShardFetchError(f"Reading {hide_url(url)!r} needs a package fsspec uses for {scheme(url)}://: "
                              f"{exc}.") from None
    except Exception as exc:  # noqa: BLE001 - each file system has its own errors
        raise _fail(url, f"{type(exc).__name__}: {exc}", transient=_may_pass(exc)) from None
    out = {}
    for key in ("size", "ETag", "etag", "mtime", "LastModified", "last_modified", "md5", "checksum"):
        if info.get(key) is not None:
            out[key.lower()] = str(info[key])
    return out


def _first_byte_validators(url: str) -> dict[str, str]:
    """The validators of an HTTP shard whose server refuses HEAD, from a GET of its first byte
    (``Range: bytes=0-0``; a server without ranges answers with the whole, left unread); ``{}``
    when that fails too (the fetch then reports what is wrong)."""
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=0-0"}),
                                    timeout=fetch_timeout()) as r:
            out = _http_validators(r.headers)
            if r.status == 206:  # its Content-Length is the range's: the size is Content-Range's total
                out.pop("content-length", None)
                total = re.fullmatch(r"bytes \d+-\d+/(\d+)", r.headers.get("Content-Range") or "")
                if total:
                    out["content-length"] = total.group(1)
            return out
    except Exception:  # noqa: BLE001 - refused, unreachable, ...: the fetch says so
        return {}


class Fetched(NamedTuple):
    """What `stream_to` copied: the validators the response gave, and the `file_digest` of the
    bytes written (taken as they were written, so the copy is not read again to hash it)."""

    validators: dict[str, str]
    digest: str


def stream_to(url: str, dest: str | Path) -> Fetched:
    """Copy the shard ``url`` front to back into the file ``dest`` (in chunks); returns its
    response's validators and the digest of the bytes (`Fetched`). Raises `ShardFetchError`
    when the fetch fails; a failure that may pass is tried again after each of `RETRY_WAITS`
    first (see the module docstring)."""
    return _retried(url, lambda: _stream_once(url, dest))


def _retried(url: str, once: Callable[[], Any]) -> Any:
    """``once()``, tried again after each of `RETRY_WAITS` while it fails in a way that may
    pass (a `ShardFetchError` marked ``transient``); the last error says how many attempts."""
    waited = 0.0
    for attempt, wait in enumerate((*RETRY_WAITS, None), start=1):
        try:
            return once()
        except ShardFetchError as exc:
            if not exc.transient or wait is None:
                if attempt == 1:
                    raise
                tried = ShardFetchError(f"{str(exc).rstrip('.')} (after {attempt} attempts over {waited:.0f} s).")
                tried.transient = exc.transient  # a failure that may pass, tried until the waits ran out
                raise tried from None
            if _stop_now().wait(wait):  # told to stop while waiting to try again
                raise _stopped(url) from None
            waited += wait
    raise AssertionError("unreachable")


class _Pace:
    """A fetch's progress: `check`, called before a read that would wait, raises a transient
    `ShardFetchError` once `fetch_timeout` seconds brought fewer than `STALL_BYTES` (a silent
    command; a server that trickles, each of whose reads ends within its timeout while the
    whole never does). The window starts when the response or the command has started."""

    def __init__(self, url: str) -> None:
        self.url, self.timeout, self.stop = url, fetch_timeout(), _stop_now()
        self.restart()

    def restart(self) -> None:
        self.since, self.got = time.monotonic(), 0

    def add(self, n: int) -> None:
        self.got += n
        if self.got >= STALL_BYTES:
            self.restart()

    def left(self) -> float:
        """Seconds the next read may wait before the fetch counts as stalled."""
        return self.timeout - (time.monotonic() - self.since)

    def check(self) -> None:
        if self.stop.is_set():
            raise _stopped(self.url)
        if self.left() <= 0:
            raise _fail(self.url, f"the fetch stalled: {self.got} bytes in the last {self.timeout:g} s (fewer than "
                                  f"{STALL_BYTES // 1024} KiB; {ENV_TIMEOUT} sets the seconds)", transient=True)


class _Stop(threading.Event):
    """Set when the thread that waits for some fetches was interrupted (`stop_fetches_on_interrupt`)."""


_NEVER = _Stop()  # the stop of a fetch that no `stop_fetches_on_interrupt` runs: never set


def _stop_now() -> _Stop:
    """The stop of the fetches this thread runs."""
    return getattr(_LOCAL, "stop", _NEVER)


@contextlib.contextmanager
def stop_fetches_on_interrupt() -> Any:
    """Around a wait for fetches that run in other threads: yields ``stoppable(fn)``, ``fn``
    made to run its fetches under this block's stop. When the waiting thread is interrupted
    (Ctrl-C, SIGTERM), those fetches (and no others) stop at their next look, within
    `STOP_POLL_S`, so that the interrupt is not held up by fetches that would end only when
    their shards came or stalled.

    Example:
        >>> with stop_fetches_on_interrupt() as stoppable:
        ...     sizes = list(map(stoppable(len), ["a", "bc"]))  # a thread pool's map, in use
        >>> sizes
        [1, 2]
    """
    stop = _Stop()

    def stoppable(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            outer, _LOCAL.stop = _stop_now(), stop
            try:
                return fn(*args, **kwargs)
            finally:
                _LOCAL.stop = outer
        return run

    try:
        yield stoppable
    except BaseException as exc:
        if not isinstance(exc, Exception):
            stop.set()
        raise


def _stopped(url: str) -> ShardFetchError:
    """The error of a fetch that `stop_fetches_on_interrupt` stopped (not tried again)."""
    return _fail(url, "the fetch was stopped: the run was interrupted", transient=False)


def _stoppable(work: Callable[[], None], url: str, pace: _Pace | None = None) -> None:
    """Run ``work`` (a look-up or a copy whose waits may have no end or a long timeout of their
    own) in a helper thread while this thread looks every `STOP_POLL_S` whether the fetch was
    told to stop, and, with ``pace``, whether it stalled (`_Pace.check`); either ends the wait
    at once. A thread left behind ends at its own timeout, if any; its next write finds the
    file closed. Ctrl-C in this thread ends the wait too."""
    stop = pace.stop if pace is not None else _stop_now()
    ended: list[BaseException | None] = []

    def run() -> None:
        try:
            work()
            ended.append(None)
        except BaseException as exc:  # noqa: BLE001 - said by the fetch, in its own thread
            ended.append(exc)

    worker = threading.Thread(target=run, name="transferkit-fetch", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(timeout=STOP_POLL_S if pace is None else min(max(pace.left(), 0.01), STOP_POLL_S))
        if worker.is_alive():
            if stop.is_set():
                raise _stopped(url)
            if pace is not None:
                pace.check()
    if ended[0] is not None:
        raise ended[0]


def fetch_timeout() -> float:
    """Seconds a fetch may wait for a byte, or bring fewer than `STALL_BYTES`, before it fails:
    ``TRANSFERKIT_FETCH_TIMEOUT``, else `TIMEOUT`."""
    return env_seconds(ENV_TIMEOUT, TIMEOUT)


def _copy_paced(read: Callable[[int], bytes], out: Any, pace: _Pace) -> None:
    """Copy ``read(CHUNK)`` into ``out`` until it returns no bytes, counting them in ``pace``
    (each reader checks the pace where it would wait: `_pipe_reader`, `_http_reader`)."""
    while chunk := read(CHUNK):
        out.write(chunk)
        pace.add(len(chunk))


def _http_reader(response: Any, pace: _Pace) -> Callable[[int], bytes]:
    """``read(n)`` of an HTTP body: what has come (``read1``; ``read(n)`` waits for all n
    bytes), after checking ``pace``, unless the body is whole (its announced length all read:
    the last read finds the end without waiting, and a small body after slow headers is no
    stall)."""
    def read(n: int) -> bytes:
        if response.length != 0:  # None: no length announced
            pace.check()
        return response.read1(n)
    return read


def _pipe_reader(proc: subprocess.Popen, pace: _Pace, ready: selectors.BaseSelector) -> Callable[[int], bytes]:
    """``read(n)`` of a command's output that waits at most until ``pace`` would call the fetch
    stalled (a read of a pipe otherwise blocks for as long as the command is silent), then
    raises (`_Pace.check`); output or its end that is there is read, however late. ``ready``:
    the selector it waits on, closed by the caller."""
    fd = proc.stdout.fileno()  # type: ignore[union-attr]
    ready.register(fd, selectors.EVENT_READ)

    def read(n: int) -> bytes:
        while not ready.select(min(max(pace.left(), 0.0), STOP_POLL_S)):  # output or its end there: read it
            pace.check()  # raises once the wait is over, or when told to stop
        return os.read(fd, n)
    return read


class _Digesting:
    """A file opened for writing that hashes what is written to it (as `file_digest` reads it)."""

    def __init__(self, f: Any) -> None:
        self.f, self.hash = f, new_digest()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.f.tell()


def _stream_once(url: str, dest: str | Path) -> Fetched:
    """One attempt of `stream_to`."""
    with open(dest, "wb") as f:
        out = _Digesting(f)
        return Fetched(_copy_from(url, out), out.hash.hexdigest())


def _copy_from(url: str, out: _Digesting) -> dict[str, str]:
    """Copy ``url`` into ``out``; returns its response's validators (``{}`` but for HTTP)."""
    kind = scheme(url)
    if kind == "pipe":
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=err,
                                    start_new_session=True)  # its own group: a stalled one is ended whole
            assert proc.stdout is not None
            pace = _Pace(url)
            try:  # epoll: descriptors above 1024 too, which select() refuses
                with selectors.DefaultSelector() as ready:
                    _copy_paced(_pipe_reader(proc, pace, ready), out, pace)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the shell and what it started (sleep, curl, ...)
                raise
            finally:
                proc.stdout.close()
                code = proc.wait()
            if code != 0:
                err.seek(0)
                lines = err.read().decode("utf-8", errors="replace").strip().splitlines()
                said = f": {lines[-1].strip()[:300]}" if lines else ""  # (a line may be megabytes)
                raise _fail(url, f"the command exited with code {code}{said}", transient=True)
        return {}
    if kind in ("http", "https"):
        import http.client
        import urllib.request

        got: dict[str, str] = {}
        pace = _Pace(url)

        def get() -> None:  # each read waits at most fetch_timeout (the socket's timeout)
            with urllib.request.urlopen(url, timeout=pace.timeout) as r:
                got.update(_http_validators(r.headers))
                pace.restart()  # the window starts with the response
                _copy_paced(_http_reader(r, pace), out, pace)

        try:
            _stoppable(get, url)  # told to stop: at once, not after a read's timeout
        except ShardFetchError:  # stalled, or told to stop
            raise
        except http.client.IncompleteRead as exc:
            raise _fail(url, f"the connection ended after {out.tell() + len(exc.partial)} bytes, before the "
                             "end of the body", transient=True) from None
        except _http_errors() as exc:
            raise _http_failure(url, exc) from None
        n = out.tell()
        if "content-length" in got and int(got["content-length"]) != n:
            raise _fail(url, f"the server sent {n} of {got['content-length']} bytes (the connection ended early)",
                        transient=True)
        return got
    try:
        _fsspec_copy(url, out, _Pace(url))
    except ShardFetchError:
        raise
    except FileNotFoundError:
        raise _fail(url, "it does not exist") from None
    except Exception as exc:  # noqa: BLE001 - each file system has its own errors
        raise _fail(url, f"{type(exc).__name__}: {exc}", transient=_may_pass(exc)) from None
    return {}


def _fsspec_copy(url: str, out: Any, pace: _Pace) -> None:
    """Copy the fsspec file ``url`` into ``out``, paced like the other fetches: the opening and
    the reads run in a helper thread (a file system's read may wait for ever, and each has
    its own timeouts, if any), and the fetch fails as stalled once ``pace`` says so (`_stoppable`)."""
    fsspec = _fsspec(url)

    def copy() -> None:
        with fsspec.open(url, "rb") as f:
            _copy_paced(f.read, out, pace)

    _stoppable(copy, url, pace)


_FINAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _may_pass(exc: BaseException) -> bool:
    """Whether a fetch that raised ``exc`` may succeed when tried again: not when access is
    refused or the shard cache's disk is full or read-only."""
    return not (isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno in _FINAL_ERRNOS))


def _flock(fd: int, op: int) -> None:
    import fcntl

    fcntl.flock(fd, op)


class Held:
    """A cached shard this process reads: ``path``, kept from eviction until `release`;
    ``digest``: its bytes' `file_digest` when this process fetched it, else ""; ``cache``: the
    `ShardCache` whose budget its release makes room for where this process last found the
    cache over it (the copies that were in use then may be evicted once nobody holds them)."""

    def __init__(self, path: Path, fd: int, digest: str = "", cache: ShardCache | None = None) -> None:
        self.path, self.fd, self.digest, self.cache = path, fd, digest, cache

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops the shared lock
            self.fd = -1
            if self.cache is not None and self.cache.over:  # only then: a look at every copy costs ms
                with contextlib.suppress(OSError):
                    self.cache.make_room(0)


_TEMP_DIRS: dict[int, str] = {}
_TEMP_GUARD = threading.Lock()


def _process_temp_dir() -> Path:
    """A folder for this process's shard cache when there is no ``cache_dir``, removed at exit."""
    with _TEMP_GUARD:
        path = _TEMP_DIRS.get(os.getpid())
        if path is None:
            path = _TEMP_DIRS[os.getpid()] = tempfile.mkdtemp(prefix="transferkit-shards-")
            pid = os.getpid()
            at_exit(lambda: os.getpid() == pid and shutil.rmtree(path, ignore_errors=True))
        return Path(path)


class ShardCache:
    """The local copies of remote shards in ``folder``, at most ``budget`` bytes of them (see
    the module docstring). Picklable: DataLoader workers use the parent's folder."""

    def __init__(self, folder: str | Path, budget: int | None = None, *, kept_in: str | Path | None = None) -> None:
        self.folder = Path(folder)
        self.budget = cache_budget() if budget is None else int(budget)
        self.kept_in = None if kept_in is None else Path(kept_in)  # copies read there, never written (read-only)
        self.over = False  # this process's last `make_room` left the cache over its budget (shards in use)

    @classmethod
    def for_cache_dir(cls, cache_dir: str | Path | None) -> ShardCache:
        """``cache_dir/shards/``, or a temporary folder removed at exit when ``cache_dir`` is None;
        for a read-only ``cache_dir`` (`transferkit._io.read_only_folder`: read, never written)
        the copies already in its ``shards/`` are read there, and the others fetched into a
        temporary folder."""
        if cache_dir is None:
            return cls(_process_temp_dir())
        if read_only_folder(cache_dir) is not None:
            return cls(_process_temp_dir(), kept_in=Path(cache_dir) / "shards")
        return cls(Path(cache_dir) / "shards")

    def path(self, url: str, validators: dict[str, str] | None = None) -> Path:
        """The cached copy of ``url`` with those validators (a new ETag, size or date: a new copy;
        a new signature: the same copy where validators say so, `shard_identity`)."""
        ident = f"{shard_identity(url, validators)}\0{json.dumps(validators or {}, sort_keys=True)}"
        return self.folder / (hashlib.blake2b(ident.encode(), digest_size=16).hexdigest() + ".tar")

    def holds(self, url: str, validators: dict[str, str] | None) -> bool:
        """Whether a copy of ``url`` with those validators is in the cache (or, for a read-only
        ``cache_dir``, in its ``shards/``): what a fetch would read without the server."""
        target = self.path(url, validators)
        return target.is_file() or (self.kept_in is not None and (self.kept_in / target.name).is_file())

    def _lock_fd(self, target: Path) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        return os.open(target.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o666)

    def fetch(self, url: str, *, validators: dict[str, str] | None = None, size: int | None = None,
              check: Callable[[str, str], None] | None = None) -> Held:
        """The cached copy of ``url``, fetched first when absent (by one process at a time;
        the others wait for it). ``validators`` (`remote_validators`, or those in the shard
        index): part of the copy's name, and a fetch whose response gives others fails (the
        shard changed). ``size``: the bytes expected (from the shard index), checked, and used
        to make room and check the free space first. ``check(path, digest)`` runs on a new
        copy (its bytes' `file_digest`) before it is renamed into place (it raises to refuse
        it). The returned `Held` keeps the copy from eviction until released."""
        import fcntl

        target = self.path(url, validators)
        if self.kept_in is not None:  # a read-only cache_dir's copy (of this URL and validators): nobody removes it
            kept = self.kept_in / target.name
            with contextlib.suppress(OSError):
                if kept.is_file() and (size is None or kept.stat().st_size == size):
                    return Held(kept, -1)
        for _ in range(20):
            fd = self._lock_fd(target)
            try:
                _flock(fd, fcntl.LOCK_SH)
                if not target.is_file():
                    _flock(fd, fcntl.LOCK_UN)
                    digest = self._fetch_or_wait(fd, url, target, size, check, validators or {})
                    if digest is None:  # gone again before this process held it
                        os.close(fd)
                        continue
                else:
                    digest = ""
                    with contextlib.suppress(OSError):
                        os.utime(target)  # most recently used
                n = target.stat().st_size
                if size is not None and n != size:
                    raise ShardFetchError(f"The shard {hide_url(url)!r} has {n} bytes, its index says {size}: it "
                                          "changed since it was indexed. Remove its index from "
                                          "cache_dir/shard-index (or the whole cache_dir) and run again.")
                return Held(target, fd, digest, self)
            except BaseException:
                os.close(fd)
                raise
        raise _fail(url, f"its cached copy {str(target)!r} keeps being removed (the shard cache is too small for the "
                         f"shards in use: raise {ENV_BUDGET})")

    def _fetch_or_wait(self, fd: int, url: str, target: Path, size: int | None,
                       check: Callable[[str, str], None] | None, validators: dict[str, str]) -> str | None:
        """Fetch ``target`` under the exclusive lock, or wait for the process that fetches it;
        returns with the shared lock held (the digest of the bytes fetched, "" when another
        process fetched them), or None when the copy is gone again. The exclusive lock is asked
        without blocking: once the copy is there, its readers hold the shared lock for as long
        as they read (an idle DataLoader worker keeps its shards open), and a blocking request
        would wait for all of them."""
        import fcntl

        while True:
            try:
                _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if target.is_file():  # fetched by another process, which now reads it
                    _flock(fd, fcntl.LOCK_SH)
                    return "" if target.is_file() else None
                if _stop_now().wait(FETCH_POLL_S):  # another process is fetching it; this one was told to stop
                    raise _stopped(url)
                continue
            digest = "" if target.is_file() else self._fetch_locked(url, target, size, check, validators)
            _flock(fd, fcntl.LOCK_SH)  # a downgrade is not atomic: check it is still there
            return digest if target.is_file() else None

    def _fetch_locked(self, url: str, target: Path, size: int | None, check: Callable[[str, str], None] | None,
                      validators: dict[str, str]) -> str:
        if offline():
            raise ShardFetchError(f"{ENV_OFFLINE}=1, and the shard cache {str(self.kept_in or self.folder)!r} holds no "
                                  f"copy of {hide_url(url)!r} as it was indexed (never fetched there, or removed to "
                                  f"keep the cache within {budget_setting()}): run online, or with a shard cache "
                                  "large enough to keep every shard.")
        remove_stale_temps(target)
        if size:
            self.make_room(size, keep=target)
            check_free_space(target, size, what="shard cache copy of")
        tmp = create_temp(target)
        try:
            got, digest = stream_to(url, tmp)
            changed = sorted(k for k in set(got) & set(validators) if got[k] != validators[k])
            if changed:
                k = changed[0]
                raise _fail(url, f"it changed since it was looked at ({k} {validators[k]!r}, now {got[k]!r}); run "
                                 "again")
            if check is not None:
                check(str(tmp), digest)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self.make_room(0, keep=target)
        return digest

    def make_room(self, need: int, *, keep: Path | None = None) -> list[Path]:
        """Remove least recently used shards no process has open until the cached ones plus
        ``need`` bytes fit the budget (or only shards in use are left); returns those removed."""
        import fcntl

        files = []
        for p in self.folder.glob("*.tar"):
            with contextlib.suppress(OSError):
                st = p.stat()
                files.append((st.st_mtime_ns, st.st_size, p))
        total = sum(s for _, s, _ in files) + need
        removed = []
        for _, s, p in sorted(files):
            if total <= self.budget:
                break
            if keep is not None and p == keep:
                continue
            fd = self._lock_fd(p)
            try:
                _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # open in some process
            try:
                p.unlink()
                removed.append(p)
                total -= s
            except OSError:
                pass
            finally:
                os.close(fd)
        self.over = total > self.budget
        return removed


def fetch_small(url: str, limit: int = 1 << 20) -> bytes | None:
    """The bytes of a small remote file (``_info.json``), or None when it does not exist
    (or ``url`` is a ``pipe:`` command, which has no neighbours)."""
    kind = scheme(url)
    if kind == "pipe":
        return None
    return _retried(url, lambda: _fetch_small_once(url, limit))


def _fetch_small_once(url: str, limit: int) -> bytes | None:
    if scheme(url) in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=fetch_timeout()) as r:
                return r.read(limit)
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500 and exc.code not in (408, 429):  # none there, or none for this request (a
                exc.close()                                         # signed shard's folder: 401, 403): optional
                return None
            raise _http_failure(url, exc) from None
        except _http_errors() as exc:
            raise _http_failure(url, exc) from None
    fsspec = _fsspec(url)
    try:
        with fsspec.open(url, "rb") as f:
            return f.read(limit)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - each file system has its own errors
        raise _fail(url, f"{type(exc).__name__}: {exc}", transient=_may_pass(exc)) from None
