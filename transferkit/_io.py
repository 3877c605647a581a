"""Writing files safely.

- `atomic_write`: a crash mid-write leaves the previous file intact (write a temporary
  beside the target, fsync it, rename it over the target, fsync the folder). The file gets
  the mode the umask gives, or keeps the mode of the file it replaces.
- Temporary files are named ``.<target name>.tk-<host>-<pid>-<start>-<random>.tmp``: the
  writer's host, process id and process start time. `remove_stale_temps` removes the
  ones whose writer is dead (a ``kill -9`` mid-write), never those of a live writer;
  `atomic_write` calls it before each write.
- `check_writable` says in the first second that an output path cannot be written
  (a folder given as a file, a parent that cannot be created, a read-only folder).
- `file_lock`: one process at a time writes a given file (``fcntl.flock`` on a
  ``.<name>.lock`` file beside it; the kernel drops the lock of a process that dies).
- `check_free_space`: a large write (checkpoint, export, feature-cache entry) is refused
  with an `OutputError` when its estimated size does not fit the free space, before it starts.
- `python_writer`: a file object for writers that would otherwise write from C++ (``torch.save``,
  ``torch.jit.save``): a full disk then raises ``OSError(ENOSPC)`` in Python instead of a
  ``c10::Error`` (or an abort of the process).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from transferkit._text import exception_line
from transferkit.errors import ConfigError, FileLockedError, OutputError, warn

TEMP_SUFFIX = ".tmp"
FOREIGN_TEMP_AGE_S = 24 * 3600.0
"""A temporary whose writer cannot be checked from here (another host or PID namespace) is
removed once nothing in it has changed for this long: a live writer changes it sooner."""
LEGACY_TEMP_AGE_S = 600.0
"""A temporary without an owner tag (``mkstemp`` names, written by an older transferkit) is
removed once it is older than this: its writer cannot be identified."""
_TAG = re.compile(r"tk-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$")
_LEGACY = re.compile(r"[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")


# -- functions run as the process exits ------------------------------------------------------
_AT_EXIT: list[Callable[[], Any]] = []


def at_exit(fn: Callable[[], Any]) -> None:
    """Run ``fn`` as this process exits: at a normal exit (``atexit``), and from
    `run_exit_functions`, which a process that leaves through ``os._exit`` calls first (a
    torchrun worker: `transferkit.train.distributed.exit_cleanly`)."""
    _AT_EXIT.append(fn)
    atexit.register(fn)


def run_exit_functions() -> None:
    """Run the functions given to `at_exit`, once each (an error in one does not stop the others)."""
    while _AT_EXIT:
        fn = _AT_EXIT.pop()
        atexit.unregister(fn)
        with contextlib.suppress(Exception):
            fn()


# -- what a file's first bytes say ---------------------------------------------------------
def kind_of_bytes(head: bytes) -> tuple[str, str] | None:
    """``("audio file", "WAV")`` or ``("image", "PNG")`` for the first bytes (12 suffice) of a
    file of a common audio or image format, else None.

    Example:
        >>> kind_of_bytes(b"\\x89PNG\\r\\n")
        ('image', 'PNG')
    """
    audio = {b"fLaC": "FLAC", b"OggS": "OGG", b"ID3": "MP3"}
    images = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP"}
    if head[:4] == b"RIFF" and head[8:12] in (b"WAVE", b"WEBP"):
        return ("audio file", "WAV") if head[8:12] == b"WAVE" else ("image", "WebP")
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "audio file", "AIFF"
    for table, kind in ((audio, "audio file"), (images, "image")):
        for magic, name in table.items():
            if head.startswith(magic):
                return kind, name
    return None


# the first bytes of the archive and compression formats a data folder or a tar shard is often packed in
_PACKED = {b"PK\x03\x04": "zip", b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
           b"\x28\xb5\x2f\xfd": "zstd", b"7z\xbc\xaf\x27\x1c": "7-Zip"}


def packed_kind(head: bytes) -> str | None:
    """``"gzip"``, ``"zip"``, ``"tar"``, ... for the first bytes (262 suffice) of an archive or a
    compressed file, else None.

    Example:
        >>> packed_kind(b"\\x1f\\x8b\\x08"), packed_kind(b"plain text")
        ('gzip', None)
    """
    kind = next((k for magic, k in _PACKED.items() if head.startswith(magic)), None)
    return "tar" if kind is None and head[257:262] == b"ustar" else kind


# -- who wrote a temporary file, and is it still alive --------------------------------------
def _host_tag() -> str:
    """The host and PID namespace of this process: containers that share a host name and a
    folder but not their process ids get different tags, so that neither judges the other's
    writers by process ids it cannot see."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # e.g. "pid:[4026531836]"
    except OSError:  # not Linux, or /proc not mounted: the host name alone
        namespace = ""
    return hashlib.sha1(f"{socket.gethostname()}|{namespace}".encode()).hexdigest()[:6]


def _plain_host_tag() -> str:
    """The host name alone: the tag of temporaries written before the PID namespace was in it."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _last_change(path: Path) -> float:
    """When ``path`` (a file, or a folder and the entries in it) last changed."""
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        with contextlib.suppress(OSError):
            times += [p.lstat().st_mtime for p in path.iterdir()]
    return max(times)


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time)`` of a process from ``/proc`` (Linux), or None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], fields[19]


def _has_proc() -> bool:
    return os.path.exists("/proc/self/stat")


def owner_tag() -> str:
    """``tk-<host>-<pid>-<start>``: this process, as written into its temporary file names."""
    pid = os.getpid()
    start = (_proc_stat(pid) or ("", "0"))[1] if _has_proc() else "0"
    return f"tk-{_host_tag()}-{pid}-{start}"


def _writer_alive(host: str, pid: int, start: str, path: Path) -> bool:
    """False only when the writer is surely dead: same host and PID namespace, and no
    process with that id (or a zombie, or a different process that reused the id). A writer
    that cannot be checked from here (another host, another PID namespace: a container
    beside this one, or this container before a restart) is taken as alive until its
    temporary ``path`` has not changed for ``FOREIGN_TEMP_AGE_S``."""
    if host not in (_host_tag(), _plain_host_tag()):
        try:
            return time.time() - _last_change(path) <= FOREIGN_TEMP_AGE_S
        except FileNotFoundError:  # removed by its writer or another cleaner meanwhile
            return True
    if _has_proc():
        info = _proc_stat(pid)
        return info is not None and info[0] != "Z" and (start == "0" or info[1] == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def temp_path(target: str | Path, *, prefix: str | None = None) -> Path:
    """A new temporary path beside ``target`` (not created), tagged with this process.

    Example:
        >>> temp_path("/tmp/run.ckpt").name.startswith(".run.ckpt.tk-")
        True
    """
    target = Path(target)
    prefix = f".{target.name}." if prefix is None else prefix
    return target.parent / f"{prefix}{owner_tag()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"


def create_temp(target: str | Path, *, directory: bool = False, prefix: str | None = None) -> Path:
    """Create an empty temporary file (or folder) beside ``target`` with the umask's mode
    and return it; `remove_stale_temps` removes it if this process dies before
    renaming it. Used for feature-cache entries too (``directory=True``).

    Example:
        >>> tmp = create_temp("entry", directory=True)
        >>> tmp.is_dir(), tmp.name.startswith(".entry.tk-")
        (True, True)
        >>> tmp.rmdir()
    """
    for _ in range(100):
        tmp = temp_path(target, prefix=prefix)
        try:
            if directory:
                tmp.mkdir(0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise OutputError(f"Cannot create a temporary file beside {str(target)!r}: 100 names were taken.")


def _is_stale(name: str, prefix: str, path: Path) -> bool:
    rest = name[len(prefix):]
    m = _TAG.fullmatch(rest)
    if m:
        return not _writer_alive(m["host"], int(m["pid"]), m["start"], path)
    if _LEGACY.fullmatch(rest):
        try:
            return time.time() - path.lstat().st_mtime > LEGACY_TEMP_AGE_S
        except FileNotFoundError:
            return False
    return False


def remove_path(path: str | Path, *, quiet: bool = True) -> bool:
    """Remove what is at ``path`` in a folder of one's own (a cache): a folder with its
    contents, or a file, link or FIFO (not what a link names); whether something was removed
    (nothing there: another process cleaned it first). ``quiet``: an error is left to the
    write that needs the path, which says what is wrong; else only a folder that cannot be
    written (a read-only ``cache_dir``) is passed over, and other errors are raised."""
    p = Path(path)
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        if quiet or exc.errno in READ_ONLY_ERRNOS:
            return False
        raise


def _remove(paths: list[Path]) -> list[Path]:
    return [p for p in paths if remove_path(p, quiet=False)]


def remove_stale_temps(target: str | Path, *, prefix: str | None = None) -> list[Path]:
    """Remove the temporary files (and folders) that a killed writer left for ``target``:
    only those named for this target (``.<name>.tk-...tmp``, or ``prefix`` + tag) whose
    writing process is dead. Returns what was removed.

    Example:
        >>> remove_stale_temps("run.ckpt")
        []
    """
    target = Path(target)
    prefix = f".{target.name}." if prefix is None else prefix
    try:
        entries = [p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(TEMP_SUFFIX)]
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    return _remove([p for p in entries if _is_stale(p.name, prefix, p)])


def remove_stale_temps_in(folder: str | Path) -> list[Path]:
    """Remove every stale transferkit temporary in ``folder``, whatever its target (e.g. the
    feature cache folder on resume). Returns what was removed.

    Example:
        >>> remove_stale_temps_in("/tmp")  # doctest: +SKIP
        [PosixPath('/tmp/.run.ckpt.tk-0a7c9c-4242-7100-1f2e3d4c.tmp')]
    """
    try:
        entries = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    stale = []
    for p in entries:
        m = _TAG.search(p.name)
        if p.name.startswith(".") and m and m.start() > 0 and not _writer_alive(m["host"], int(m["pid"]), m["start"], p):
            stale.append(p)
    return _remove(stale)


# -- output paths ----------------------------------------------------------------------
def name_max(folder: str | Path) -> int:
    """The longest file name the file system of ``folder`` (or its nearest existing parent) takes."""
    existing = Path(folder)
    while not os.path.exists(existing) and existing != existing.parent:  # os.path: False for a name too long
        existing = existing.parent
    try:
        return int(os.pathconf(existing, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


TEMP_NAME_EXTRA = len(".." + "tk-000000-" + "9" * 7 + "-" + "9" * 20 + "-00000000" + TEMP_SUFFIX)
"""Characters a temporary's name adds to its target's (the longest pid and start time)."""


def _check_name_length(p: Path, what: str, flag: str | None, kind: str) -> None:
    limit = name_max(p.parent if kind == "file" else p)
    if kind == "file" and len(p.name.encode()) + TEMP_NAME_EXTRA > limit:
        raise OutputError(f"{_named(what, p, flag)} has a file name of {len(p.name.encode())} bytes; this file "
                          f"system takes {limit}, and writing it safely needs a temporary name "
                          f"{TEMP_NAME_EXTRA} bytes longer. Use a name of at most {limit - TEMP_NAME_EXTRA} bytes.")
    for part in p.parts:
        if len(part.encode()) > limit:
            raise OutputError(f"{_named(what, p, flag)} holds a name of {len(part.encode())} bytes "
                              f"({part[:40]!r}...); this file system takes at most {limit}. Use a shorter path.")


def _named(what: str, path: Path, flag: str | None) -> str:
    return f"The {what} path {str(path)!r}{f' ({flag})' if flag else ''}"


def _reason(exc: OSError) -> str:
    known = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted",
             errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EISDIR: "it is a folder", errno.ENOTDIR: "a part of the path is a file, not a folder"}
    return known.get(exc.errno or -1) or exc.strerror or str(exc) or type(exc).__name__


TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit")
"""File names that say TorchScript: an ONNX export given one of them is refused."""


def check_export_names(path: str | Path | None, onnx: str | Path | None = None, *, flags: tuple[str, str] = (
        "the TorchScript export", "the ONNX export")) -> None:
    """Raise ConfigError when the TorchScript export ``path`` is named ``.onnx`` or the ONNX
    export ``onnx`` has a TorchScript name: transferkit reads either file whatever its name,
    other tools go by it. ``flags``: how the two settings are named in the message."""
    if path is not None and Path(path).suffix.lower() == ".onnx":
        raise ConfigError(f"{str(path)!r} is where {flags[0]} goes, but its name ends in .onnx; name it model.pt "
                          "(an ONNX file is written beside it by result.export(path, onnx=True), export_onnx, or "
                          "--onnx on the command line).")
    if onnx is not None and Path(onnx).suffix.lower() in TORCHSCRIPT_SUFFIXES:
        raise ConfigError(f"{str(onnx)!r} is where {flags[1]} goes, but its name ends in {Path(onnx).suffix}, a "
                          "TorchScript name; name it model.onnx.")


_EXAMPLE_NAMES = {"export": "model.pt", "ONNX export": "model.onnx", "checkpoint": "checkpoint.pt", "plot": "plot.png"}
"""The outputs a user names, with a file name to suggest when they name a folder instead."""


def check_writable(path: str | Path, *, what: str, flag: str | None = None, kind: str = "file") -> Path:
    """Check that ``path`` can be written, before any work is spent on it: raise
    `OutputError` naming the path, what it is for (``what``: "export",
    "checkpoint", ...; ``flag``: the option that set it, e.g. ``"--export"``) and how to fix
    it. ``kind="dir"`` for an output folder (plots, cache, logs). Nothing is left behind: the
    folder's writability is probed with a temporary file that is removed at once.

    Example:
        >>> check_writable("exports/model.pt", what="export")
        PosixPath('exports/model.pt')
        >>> check_writable("/tmp", what="export")
        Traceback (most recent call last):
        ...
        transferkit.errors.OutputError: The export path '/tmp' is a folder; give a file path such as '/tmp/model.pt'.
    """
    p = Path(path)
    if str(path) in ("", "."):  # the path as given: Path("") is '.'
        raise OutputError(f"{_named(what, str(path), flag)} is empty; give a {'folder' if kind == 'dir' else 'file'} "
                          "path.")
    if any(c in str(path) for c in "\n\r\x00"):
        raise OutputError(f"{_named(what, p, flag)} holds a line break or NUL character; give a plain path.")
    _check_name_length(p, what, flag, kind)
    if p.parts and p.parts[0] == "~" and not Path("~").exists():  # not a shell: read as written
        raise OutputError(f"{_named(what, p, flag)} starts with '~', which would be a new folder of that "
                          f"name in {os.getcwd()!r}: Python does not expand '~'. Give the full path "
                          f"(os.path.expanduser({str(path)!r})).")
    if kind == "file":
        if p.is_dir():
            name = _EXAMPLE_NAMES.get(what)
            if name is None:  # a file transferkit names itself (a store, a cache entry): the folder is in its way
                raise OutputError(f"{_named(what, p, flag)} is a folder, where a file goes; move or remove that "
                                  "folder.")
            raise OutputError(f"{_named(what, p, flag)} is a folder; give a file path such as {str(p / name)!r}.")
        if p.exists() and not p.is_file():
            raise OutputError(f"{_named(what, p, flag)} exists and is not a regular file; give a file path.")
        folder = p.parent
    else:
        if p.exists() and not p.is_dir():
            raise OutputError(f"{_named(what, p, flag)} is a file, but a folder is needed; give a folder path "
                              "or move the file away.")
        folder = p
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        fix = "Choose another path." if kind == "dir" or what in _EXAMPLE_NAMES else \
            "Move or remove that file: it is in the way of a folder this file goes in."  # a path transferkit names
        raise OutputError(f"{_named(what, p, flag)} cannot be created: {str(existing)!r} is a file, not a folder. "
                          f"{fix}")
    try:
        probe_writable(existing)
    except OSError as exc:
        where = "its folder" if existing == folder else f"its nearest existing folder {str(existing)!r}"
        why = _reason(exc)
        if exc.errno == errno.ENOENT and existing.is_dir():  # a folder that exists and takes no new file
            why = f"no new file can be made in it: {why}, as in a virtual file system such as /proc or /sys"
        raise OutputError(f"{_named(what, p, flag)} cannot be written: {where} is not writable "
                          f"({why}). Choose a path in a writable folder, or make the folder writable "
                          "(chmod u+w, or a file system mounted read-write).") from exc
    return p


def probe_writable(folder: str | Path) -> None:
    """Create and remove a temporary file in ``folder``: the OSError of a folder this process
    cannot write into (read-only, not a folder, full), before any work is spent on a write.
    Probes that a killed process left (killed between the two) are removed first."""
    probe = Path(folder) / ".tk-write-check"
    remove_stale_temps(probe, prefix=f"{probe.name}.")
    create_temp(probe, prefix=f"{probe.name}.").unlink()


def free_bytes(path: str | Path) -> int:
    """Free bytes (for this user) on the file system of ``path`` or its nearest existing parent."""
    existing = Path(path)
    while not os.path.exists(existing) and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


SPACE_MARGIN = 1 << 16
"""Bytes kept free besides a write's estimate, plus 5 % of it (metadata, zip headers and
alignment, file-system overhead)."""


def check_free_space(path: str | Path, need: int, *, what: str, flag: str | None = None) -> None:
    """Raise `OutputError` when ``need`` bytes (plus 5 % and `SPACE_MARGIN`) do not fit the free space
    where ``path`` goes: before a large write starts, so that a full disk is one clear error
    and not a write that fails (or a memory map that crashes) half-way.

    Example:
        >>> check_free_space("/tmp/model.pt", 1 << 50, what="export")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        transferkit.errors.OutputError: Not enough free space for the export '/tmp/model.pt': ...
    """
    try:
        free = free_bytes(Path(path).parent)
    except OSError:
        return  # a path that cannot be measured is reported by the write itself
    if with_margin(need) > free:
        raise no_space(f"{what} {str(path)!r}{f' ({flag})' if flag else ''}", need, free)


def with_margin(need: int) -> int:
    """The free space a write of ``need`` bytes asks for: 5 % more and `SPACE_MARGIN`."""
    return need + need // 20 + SPACE_MARGIN


def no_space(what: str, need: int, free: int,
             advice: str = "Free some space or choose a path on another disk.") -> OutputError:
    """The error of a write of ``need`` bytes (`with_margin`) that ``free`` bytes cannot hold."""
    return OutputError(f"Not enough free space for the {what}: it needs about {_mb(need)} ({_mb(with_margin(need))} "
                       f"with a margin) and {_mb(free)} are free there. {advice}")


def _mb(n: int) -> str:
    if n < 2**10:
        return f"{n} bytes"
    return f"{n / 2**10:.0f} kB" if n < 2**20 else f"{n / 2**20:.1f} MB" if n < 2**30 else f"{n / 2**30:.2f} GB"


def reserve_blocks(path: str | Path) -> None:
    """Allocate the disk blocks of a (sparse) file at its current size, e.g. a memory map just
    created: writing pages of a memory map that the disk cannot hold kills the process with
    SIGBUS, while this raises ``OSError(ENOSPC)`` first. A file system without ``fallocate``
    is left as it is.

    Example:
        >>> _ = open("sparse.bin", "wb").truncate(4096)
        >>> reserve_blocks("sparse.bin")
    """
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    finally:
        os.close(fd)


class _AllOrError(io.RawIOBase):
    """A raw file whose ``write`` writes every byte or raises (a short write on a full disk
    becomes the ``OSError`` the next write would give) and keeps the first error it raised,
    a Ctrl-C or SIGTERM that arrived inside it too (torch turns both into a RuntimeError)."""

    def __init__(self, f: Any) -> None:
        super().__init__()
        self._f, self.error = f, None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._f.seekable()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        done = 0
        try:
            while done < len(view):
                n = self._f.write(view[done:])
                if not n:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
        except (OSError, KeyboardInterrupt) as exc:
            self.error = self.error or exc
            raise
        return done

    def flush(self) -> None:
        self._f.flush()


@contextlib.contextmanager
def python_writer(path: str | Path) -> Iterator[Any]:
    """Open ``path`` for writing as a file object whose write errors are Python ``OSError``s:
    give it to ``torch.save`` / ``torch.jit.save`` instead of a path. When the writer fails
    inside (torch wraps the error in a ``RuntimeError``), the ``OSError`` is raised instead,
    and a Ctrl-C or SIGTERM that interrupted a write is raised as itself (not as a write error).

    Example:
        >>> with python_writer("out.bin") as f:
        ...     _ = f.write(b"abc")
    """
    with open(path, "wb", buffering=0) as raw:
        f = _AllOrError(raw)
        try:
            yield f
        except Exception as exc:
            if f.error is not None and f.error is not exc:
                raise f.error from exc
            raise


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # folders cannot be opened for fsync on Windows; NTFS journals the rename
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure to write a file (an OSError, or torch's writer reporting
    one) rather than a failure of what was being written."""
    text = str(exc)
    return isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and (
        "failed writing" in text or "unexpected pos" in text or "inline_container" in text))


def atomic_write(path: str | Path, write: Callable[[str], None], *, what: str = "file",
                 flag: str | None = None) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, rename it over
    ``path`` and fsync the folder. If ``write`` raises, ``path`` is untouched and the
    temporary is removed. The file gets the mode the umask gives (``0o666 & ~umask``), or
    the mode of the file it replaces. Temporaries that killed writers left for ``path`` are
    removed first. A path that cannot be written raises OutputError naming ``path`` (never
    the temporary) before ``write`` runs.

    Example:
        >>> atomic_write("notes/hello.txt", lambda tmp: Path(tmp).write_text("hi"))
        PosixPath('notes/hello.txt')
    """
    path = Path(path)
    check_writable(path, what=what, flag=flag)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp = create_temp(path)
    except OSError as exc:
        raise OutputError(f"Cannot write the {what} {str(path)!r}: {_reason(exc)} ({exc}).") from exc
    replaced = False
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what the umask gave
        write(str(tmp))
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            if path.is_file():
                mode = stat.S_IMODE(os.stat(path).st_mode)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        replaced = True
        _fsync_dir(path.parent)
    except BaseException as exc:
        if replaced:  # the file is whole at its path: only the folder's fsync was cut short
            if isinstance(exc, KeyboardInterrupt):
                exc.written = path  # type: ignore[attr-defined]  # a Ctrl-C that came once the file was written
            raise
        with contextlib.suppress(OSError):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            elif os.path.lexists(tmp):
                tmp.unlink()
        if is_write_failure(exc):
            reason = _reason(exc) if isinstance(exc, OSError) else str(exc).splitlines()[0]
            raise OutputError(f"Cannot write the {what} {str(path)!r}: {reason}. Nothing was written there "
                              "(a previous file at that path is unchanged).") from exc
        raise
    return path


# -- one writer per file -----------------------------------------------------------------
_HELD: dict[str, list] = {}  # resolved lock path -> [fd, count]
_MADE: set[Path] = set()  # folders this process's locks made, removed when a lock's release leaves them empty
_HELD_GUARD = threading.Lock()


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the lock descriptors it inherited. A
    ``flock`` lock lives as long as any descriptor of it, so workers that outlive a killed
    run (seconds, orphaned) held its lock and refused the resume; the parent keeps its own
    descriptors and so its locks. The guard is made anew: another thread may have held it at
    the fork."""
    global _HELD_GUARD
    _HELD_GUARD = threading.Lock()
    for fd, _ in list(_HELD.values()):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()
    _MADE.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def lock_path(path: str | Path) -> Path:
    """The lock file of ``path``: ``.<name>.lock`` beside it.

    Example:
        >>> lock_path("/runs/ants.ckpt")
        PosixPath('/runs/.ants.ckpt.lock')
    """
    path = Path(path)
    return path.parent / f".{path.name}.lock"


def _holder(lock: Path) -> str:
    """Who holds ``lock``, from the pid and host it wrote."""
    try:
        text = lock.read_text().split()
    except OSError:
        text = []
    if not text:
        return "another process"
    elsewhere = len(text) > 1 and text[1] != socket.gethostname()
    return f"process {text[0]}" + (f" on host {text[1]}" if elsewhere else "")


@contextlib.contextmanager
def file_lock(path: str | Path, *, what: str = "file", flag: str | None = None, wait: float = 0.0) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` for the duration of the block (re-entrant within
    a process); another process asking for it gets `FileLockedError` at once (or after
    asking again for up to ``wait`` seconds), naming the holder. A lock left by a process
    that died does not block (the kernel drops ``flock`` locks with their process). Linux
    and macOS (``fcntl``); elsewhere the lock is not taken, with a warning.

    Example:
        >>> with file_lock("runs/run.ckpt", what="checkpoint"):
        ...     pass
    """
    try:
        import fcntl
    except ImportError:
        warn(f"Cannot lock {str(path)!r} on this platform (no fcntl): two processes writing it at once "
             "would overwrite each other.")
        yield Path(path)
        return
    lock = Path(os.path.abspath(lock_path(path)))  # released where it was taken, whatever the working directory then
    key = os.path.realpath(lock)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
    if held is None:
        made: list[Path] = []
        fd = _acquire(lock, fcntl, what=what, flag=flag, target=Path(path), wait=wait, made=made)
        with _HELD_GUARD:
            _HELD[key] = [fd, 1]
            _MADE.update(made)
    try:
        yield lock
    finally:
        with _HELD_GUARD:
            entry = _HELD.get(key)
            if entry is None:  # a forked child leaving the block: its inherited descriptor was closed
                return
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _HELD[key]
        if last:
            with contextlib.suppress(OSError):
                os.unlink(lock)  # while still holding it: a waiter re-checks the inode
            os.close(entry[0])
            _remove_made_folders()


def _remove_made_folders() -> None:
    """Remove the folders this process's locks made that are empty now (nothing was written
    into them: a run stopped before its outputs), deepest first; the others stay listed."""
    with _HELD_GUARD:
        for folder in sorted(_MADE, key=lambda f: len(f.parts), reverse=True):
            try:
                folder.rmdir()
            except FileNotFoundError:
                pass
            except OSError:  # another lock's file in it (or a folder made for one): tried again at its release
                with contextlib.suppress(OSError):
                    if all((n.startswith(".") and n.endswith(".lock")) or folder / n in _MADE
                           for n in os.listdir(folder)):
                        continue
            _MADE.discard(folder)  # removed, gone, or holding what a run wrote: kept as it is


def _locked(lock: Path, *, what: str, flag: str | None, target: Path) -> FileLockedError:
    return FileLockedError(
        f"The {what} {str(target)!r}{f' ({flag})' if flag else ''} is being written by {_holder(lock)} "
        f"(lock file {str(lock)!r}). Two runs writing one {what} would overwrite each other: wait for "
        f"the other run to finish, or give this run another {what} path.")


def check_unlocked(path: str | Path, *, what: str = "file", flag: str | None = None) -> None:
    """`FileLockedError` (as `file_lock` raises it) when another process holds ``path``'s lock
    now; nothing is created or held (a dry run may ask). This process's own locks do not count."""
    try:
        import fcntl
    except ImportError:
        return
    lock = lock_path(path)
    with _HELD_GUARD:
        if os.path.realpath(lock) in _HELD:
            return
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:  # no lock file (or none this process may read): nobody holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _locked(lock, what=what, flag=flag, target=Path(path)) from None
    finally:
        os.close(fd)


def _missing_folders(folder: Path) -> list[Path]:
    """The folders of ``folder``'s path that do not exist yet, deepest first, as absolute paths
    (a change of the working directory does not change which they are)."""
    missing = []
    for f in (folder, *folder.parents):
        if os.path.lexists(f):
            break
        missing.append(Path(os.path.abspath(f)))
    return missing


def _acquire(lock: Path, fcntl, *, what: str, flag: str | None, target: Path,  # noqa: ANN001
             wait: float = 0.0, made: list[Path] | None = None) -> int:
    """The descriptor of ``lock``, locked; ``made`` gets the folders made for it."""
    deadline, changed = time.monotonic() + wait, 0
    while changed < 50:
        try:
            if made is not None:
                made[:0] = [f for f in _missing_folders(lock.parent) if f not in made]  # deepest first
            lock.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"Cannot lock the {what} {str(target)!r}: {_reason(exc)} ({exc}).") from exc
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # its folder, made by another process's lock, was removed as it released it
            changed += 1
            continue
        except OSError as exc:
            raise OutputError(f"Cannot lock the {what} {str(target)!r}: its folder is not writable "
                              f"({_reason(exc)}).") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() < deadline:  # held for a moment (a short update): ask again
                time.sleep(0.01)
                continue
            raise _locked(lock, what=what, flag=flag, target=target) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file between our open and our lock
            os.close(fd)
            changed += 1
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        return fd
    raise OutputError(f"Cannot lock the {what} {str(target)!r}: the lock file {str(lock)!r} keeps changing.")


def claim_unused_path(path: str | Path) -> Path:
    """``path``, or the first of ``<stem>-2<suffix>``, ``<stem>-3<suffix>``, ... that does not
    exist, created empty so that a process claiming one at the same moment takes the next:
    for files written for the user that must not replace an earlier one (the weights of an
    interrupted run). A folder that cannot be written gives ``path`` (its write then says why).

    Example:
        >>> claim_unused_path("transferkit-interrupted.pt")  # doctest: +SKIP
        PosixPath('transferkit-interrupted-2.pt')
    """
    path = Path(path)
    for i in range(1, 10_000):
        candidate = path if i == 1 else path.with_name(f"{path.stem}-{i}{path.suffix}")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return candidate
        except FileExistsError:
            continue
        except OSError:
            return path
    return path


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file: the same resolved path, or (both existing) the
    same inode (a hard link, a symlink, ``./x`` and ``x``).

    Example:
        >>> same_file("/tmp/a/../m.pt", "/tmp/m.pt")
        True
    """
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(os.path.abspath(a)) == os.path.realpath(os.path.abspath(b))


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (resolved paths)."""
    p, f = Path(os.path.realpath(os.path.abspath(path))), Path(os.path.realpath(os.path.abspath(folder)))
    return p == f or f in p.parents


def file_stat(path: str | Path | int) -> list[int]:
    """``[size, modification time, status-change time (ns), inode]`` of a file (a path, or an
    open file's descriptor): what a cache records to trust a file it wrote without reading it
    again, and what tells a file from the one that replaced it at its path (a file rewritten in
    place, replaced by a rename or with ``cp -p``, changes one)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def new_digest() -> Any:
    """The hash `file_digest` takes (blake2b, 128 bits), to feed bytes as they are written."""
    import hashlib

    return hashlib.blake2b(digest_size=16)


def file_digest(path: str | Path, *, chunk: int = 1 << 22) -> str:
    """A blake2b (128-bit) digest of a file's bytes, read a chunk at a time (`new_digest`)."""
    h = new_digest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object stored in ``path``; ``{}`` when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def read_only_folder(folder: str | Path | None) -> str | None:
    """Why the existing folder ``folder`` cannot be written ("read-only file system",
    "permission denied"), by writing a probe file into it; None when it can be, or when it
    does not exist (it will be created) or is not a folder (its own check says so).

    A ``cache_dir`` that is read-only is *read, never written*: its entries (feature stores,
    timings, scans, member indexes) are used where they are there and intact, and nothing
    is added to it.
    """
    if folder is None or not os.path.isdir(folder):
        return None
    try:
        probe_writable(folder)
    except OSError as exc:
        return _reason(exc) if exc.errno in READ_ONLY_ERRNOS else None
    return None


def entry_not_kept(exc: BaseException, *, cache_dir: str | Path, what: str, later: str) -> None:
    """Say that an entry of ``cache_dir`` (a timing, a scan, a member index) could not be
    written: a warning naming the error and what ``later`` runs do instead. Nothing is said
    when ``cache_dir`` is read-only: it is read, never written, and the plan says so once."""
    if read_only_folder(cache_dir) is None:
        warn(f"The {what} was not stored ({exception_line(exc)}); {later}.")


def store_timing(path: str | Path, key: str, value: Any, *, what: str) -> bool:
    """`update_json_object` for a timing store directly under ``cache_dir`` (engines, layout,
    input decoding): a store that cannot be written (a full disk) warns that later runs time
    again, and the run goes on with its timing (a read-only ``cache_dir`` says nothing: see
    `entry_not_kept`). Returns whether it was stored."""
    try:
        update_json_object(path, key, value, what=what)
        return True
    except OSError as exc:
        entry_not_kept(exc, cache_dir=Path(path).parent, what=what, later="later runs on this cache_dir time again")
        return False


JSON_UPDATE_WAIT_S = 30.0  # how long an update waits for another process's update of the same file


def update_json_object(path: str | Path, key: str, value: Any, *, what: str = "file") -> None:
    """Set ``key`` to ``value`` in the JSON object stored in ``path`` (the timing stores under
    ``cache_dir``), written atomically; an unreadable file starts afresh. The read, change
    and write hold the file's lock, so runs that update one store at once keep every key.
    A callable ``value`` is given the key's stored value (None when absent) and returns the
    new one, or None to leave the file as it is."""
    with file_lock(path, what=what, wait=JSON_UPDATE_WAIT_S):
        data = read_json_object(path)
        if callable(value):
            value = value(data.get(key))
            if value is None:
                return
        data[key] = value
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, sort_keys=True)), what=what)
