"""Content digests (SHA-256) of checkpoints and exports, computed while saving and checked on load.

Checkpoints (``torch.save`` files): every tensor's bytes, dtype and shape are hashed, and
the whole structure (keys, metadata, history, tensors by digest) gets one digest; both are
stored in the checkpoint under ``"integrity"``. Exports (TorchScript zips): every record of
the zip except the metadata files (tensor data, pickles, code) is hashed; the list goes to
``transferkit.records.json`` inside the file and its digest into the metadata, which has its
own digest. A mismatch raises a `CorruptFileError` naming the file
and the first damaged parts.
"""

from __future__ import annotations

import hashlib
import json
import stat
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from transferkit.errors import CorruptCheckpointError, CorruptExportError, ExportError, TransferkitError

ALGORITHM = "sha256"
INTEGRITY_KEY = "integrity"
_CHUNK = 1 << 20


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (CPU, contiguous; no copy when it already is).

    Example:
        >>> tensor_digest(torch.zeros(2)) == tensor_digest(torch.zeros(2))
        True
    """
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_quantized:
        t = t.int_repr()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.cpu().contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def _scalar(value: Any) -> bytes:
    if value is None or isinstance(value, (bool, int, float, str, bytes, complex)):
        return f"{type(value).__name__}:{value!r};".encode()
    if isinstance(value, (torch.dtype, torch.device)):
        return f"{type(value).__name__}:{value};".encode()
    # another object (weights_only files cannot hold any): its type only, never a repr with an address
    return f"object:{type(value).__module__}.{type(value).__qualname__};".encode()


def _walk(obj: Any, path: str, h: Any, tensors: dict[str, str]) -> None:
    if isinstance(obj, torch.Tensor):
        d = tensor_digest(obj)
        tensors[path] = d
        h.update(f"T:{d};".encode())
    elif isinstance(obj, Mapping):
        h.update(f"{{{len(obj)};".encode())
        for k, v in obj.items():
            h.update(_scalar(k))
            _walk(v, f"{path}/{k}" if path else str(k), h, tensors)
    elif isinstance(obj, (list, tuple)):
        h.update(f"[{len(obj)};".encode())
        for i, v in enumerate(obj):
            _walk(v, f"{path}/{i}", h, tensors)
    else:
        h.update(_scalar(obj))


def content_digests(obj: Any) -> tuple[str, dict[str, str]]:
    """``(digest of the whole structure, {tensor path: tensor digest})``."""
    h = hashlib.sha256()
    tensors: dict[str, str] = {}
    _walk(obj, "", h, tensors)
    return h.hexdigest(), tensors


def seal(state: Mapping[str, Any]) -> dict[str, Any]:
    """The ``"integrity"`` entry of a checkpoint dict (computed over every other key)."""
    content, tensors = content_digests({k: v for k, v in state.items() if k != INTEGRITY_KEY})
    return {"algorithm": ALGORITHM, "content": content, "tensors": tensors}


def _damage(parts: list[str], more: int) -> str:
    return ", ".join(parts[:4]) + (f" and {more + len(parts) - 4} more" if len(parts) > 4 else
                                   f" and {more} more" if more else "")


def corrupt_message(source: str, what: str, detail: str) -> str:
    return (f"The {what} {source} is corrupt: {detail}. The file was damaged after it was written (disk, copy, "
            "download or a hand edit). Use an intact copy or write it again; a damaged file is never loaded.")


def verify_sealed(obj: Any, *, source: str, what: str, error: type[TransferkitError]) -> bool:
    """Check a loaded checkpoint dict against its ``"integrity"`` entry and remove the entry.
    Returns False when it has none (a file written before transferkit had content digests)."""
    if not isinstance(obj, dict) or INTEGRITY_KEY not in obj:
        return False
    seal_ = obj.pop(INTEGRITY_KEY)
    if (not isinstance(seal_, dict) or seal_.get("algorithm") != ALGORITHM or not isinstance(seal_.get("content"), str)
            or not isinstance(seal_.get("tensors"), dict)):
        raise _error(error, corrupt_message(source, what, "its integrity record is damaged"))
    content, tensors = content_digests(obj)
    if content == seal_["content"]:
        return True
    recorded = seal_["tensors"]
    bad = [f"tensor {k!r}" for k, v in tensors.items() if recorded.get(k) != v]
    gone = [f"tensor {k!r} (missing)" for k in recorded if k not in tensors]
    if bad or gone:
        detail = f"{_damage(bad + gone, 0)} do{'es' if len(bad + gone) == 1 else ''} not match the SHA-256 recorded " \
                 "when it was saved"
    else:
        detail = "its metadata or other non-tensor content does not match the SHA-256 recorded when it was saved"
    raise _error(error, corrupt_message(source, what, detail))


def _error(base: type[TransferkitError], message: str) -> TransferkitError:
    """The corrupt-file error of ``base``: CorruptCheckpointError (a WeightsError) or
    CorruptExportError (an ExportError); both are CorruptFileError."""
    return CorruptExportError(message) if issubclass(base, ExportError) else CorruptCheckpointError(message)


# -- zip files (TorchScript exports) -----------------------------------------------------------
EXCLUDED_RECORDS = (".data/serialization_id",)  # differs between two saves of the same module


def record_name(filename: str) -> str:
    """A zip entry's name without the archive's top folder (which torch names after the file)."""
    return filename.split("/", 1)[1] if "/" in filename else filename


# what a damaged zip raises when it is opened or read (a flipped flag bit reads as "encrypted,
# password required", a RuntimeError; a flipped version byte as NotImplementedError)
ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError, zlib.error)


def open_zip(file: Any, *, source: str, error: type[TransferkitError]) -> zipfile.ZipFile:
    """``zipfile.ZipFile(file)``; a zip directory that is damaged (a flipped bit in a record's
    version or flags) raises the corrupt error of ``error``. A file that is no zip, or is cut
    short, raises as ``zipfile`` does."""
    try:
        return zipfile.ZipFile(file)
    except (NotImplementedError, RuntimeError, zlib.error) as exc:
        raise _error(error, corrupt_message(source, "model file", f"its zip directory cannot be read "
                                            f"({type(exc).__name__}: {exc})")) from exc


def _as_folder(info: zipfile.ZipInfo) -> bool:
    """Whether a zip reader may take the entry of a file (its name does not end in ``/``) for a
    folder: the MS-DOS folder attribute (``0x10``, which miniz, torch's reader, honours and
    Python's `zipfile` does not), or a Unix folder mode."""
    return bool(info.external_attr & 0x10) or stat.S_ISDIR(info.external_attr >> 16)


def zip_records(zf: zipfile.ZipFile, *, source: str,
                error: type[TransferkitError]) -> tuple[dict[str, str], dict[str, bytes]]:
    """``(digests, extra files)`` of an open zip: the SHA-256 of every record except
    ``extra/*`` (the metadata, returned as bytes) and the save id. A record that fails its
    CRC-32 (zipfile checks it while reading) raises the corrupt error of ``error``."""
    digests: dict[str, str] = {}
    extras: dict[str, bytes] = {}
    name = "?"
    try:
        for info in zf.infolist():
            name = record_name(info.filename)
            if info.filename.endswith("/"):  # a folder entry (a file re-packed by zip -r): no data
                continue
            if _as_folder(info):  # torch's reader (miniz) skips it and leaves the tensor unwritten: refused
                raise _error(error, corrupt_message(source, "model file", f"{_describe(name)} is marked as a folder "
                                                    "in the zip's directory (a flipped attribute bit)"))
            if name in EXCLUDED_RECORDS:
                continue
            if name.startswith("extra/"):
                extras[name[len("extra/"):]] = zf.read(info)
                continue
            h = hashlib.sha256()
            with zf.open(info) as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
            digests[name] = h.hexdigest()
    except ZIP_ERRORS as exc:
        why = "fails its CRC-32 check" if "CRC" in str(exc) else f"cannot be read ({type(exc).__name__}: {exc})"
        raise _error(error, corrupt_message(source, "model file", f"{_describe(name)} {why}")) from exc
    return digests, extras


def file_digests(path: str | Path, *, source: str, error: type[TransferkitError]) -> dict[str, str]:
    """The record digests of the zip at ``path`` (see `zip_records`)."""
    with open_zip(path, source=source, error=error) as zf:
        return zip_records(zf, source=source, error=error)[0]


def records_entry(records: Mapping[str, str]) -> tuple[dict[str, Any], str]:
    """The metadata's ``integrity`` field and the text of the records file for ``records``."""
    text = json.dumps(dict(records), indent=0, sort_keys=True)
    return {"algorithm": ALGORITHM, "records": len(records),
            "digest": hashlib.sha256(text.encode()).hexdigest()}, text


def check_records(recorded_text: bytes | str, integrity: Any, actual: Mapping[str, str], *, source: str,
                  error: type[TransferkitError]) -> None:
    """Compare the records of a file with the list written at export (whose digest is in the metadata)."""
    raw = recorded_text.encode() if isinstance(recorded_text, str) else recorded_text
    if (not isinstance(integrity, dict) or integrity.get("algorithm") != ALGORITHM
            or hashlib.sha256(raw).hexdigest() != integrity.get("digest")):
        raise _error(error, corrupt_message(source, "model file", "its list of record digests "
                                            "(transferkit.records.json) is missing or does not match its metadata"))
    try:
        recorded = json.loads(raw)
    except ValueError as exc:
        raise _error(error, corrupt_message(source, "model file", "its list of record digests is not JSON")) from exc
    bad = [_describe(k) for k, v in actual.items() if k in recorded and recorded[k] != v]
    gone = [f"{_describe(k)} (missing)" for k in recorded if k not in actual]
    new = [f"{_describe(k)} (not written by the exporter)" for k in actual if k not in recorded]
    if bad or gone or new:
        parts = bad + gone + new
        raise _error(error, corrupt_message(source, "model file", f"{_damage(parts, 0)} do"
                                            f"{'es' if len(parts) == 1 else ''} not match the SHA-256 recorded "
                                            "at export"))


def _describe(record: str) -> str:
    if record.startswith(("data/", "constants/")):
        return f"tensor data record {record!r}"
    if record.startswith("extra/"):
        return f"metadata record {record!r}"
    if record.startswith("initializer/"):
        return f"weight {record.split('/', 1)[1]!r}"
    return f"record {record!r}"
