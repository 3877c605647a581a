"""The metadata schema of an exported file: defined, written and validated here only.

An export carries four extra files beside the TorchScript code and weights:

- ``transferkit.json``: the metadata below, as JSON;
- ``transferkit.sha256``: the SHA-256 of ``transferkit.json`` at export time, so that a
  hand-edited or damaged metadata file is detected on load;
- ``labels.txt``: the labels, one per line, so a C++ or mobile consumer needs no JSON parser;
- ``transferkit.records.json``: the SHA-256 of every other record of the file (tensor data,
  pickles, code), whose own digest is the metadata's ``integrity.digest`` (see
  `transferkit._integrity`); a damaged tensor is detected on load.

Metadata fields (all required):

=====================  ==========================================================
``format``             ``"transferkit.torchscript/1"``
``labels``             output names: class names (multiclass / multilabel) or value
                       names (regression); unique non-empty strings
``num_outputs``        width of the model's output, ``== len(labels)``
``task``               ``"multiclass"`` (softmax), ``"multilabel"`` (sigmoid) or
                       ``"regression"`` (identity)
``input_spec``         [`InputSpec`][transferkit.InputSpec] as a dict: ``kind`` ``"image"``
                       (``image_size``, ``resize_size``, ``mean``, ``std``, ...) or
                       ``"audio"`` (``sample_rate``, ``clip_seconds``)
``transferkit_version``  version that wrote the file
``torch_version``      torch version that wrote the file
``training``           summary dict: backbone, weights, policy, epochs, best metric...
                       (may be empty for models trained elsewhere)
=====================  ==========================================================

Written by the exporter: ``export`` (``mode``; ``optimization`` for TorchScript, ``opset``
and ``runtime`` for ONNX; ``max_abs_diff``, ``atol``, ``rtol``, ``batch_sizes``,
``input_dtypes``) and ``integrity`` (``algorithm``, ``records``: how many, ``digest``: of the records file;
absent in files written before content digests, which load with a warning).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit._text import hide_secrets_in, home_not_expanded, not_utf8, one_line, strict_json
from transferkit._version import __version__
from transferkit.config import seconds_problem
from transferkit.data.audio import DEFAULT_MAX_SECONDS, audio_window
from transferkit.data.target_tables import LABEL_SEPARATOR
from transferkit.errors import CorruptExportError, ExportError
from transferkit.heads import TASKS

FORMAT = "transferkit.torchscript/1"
ONNX_FORMAT = "transferkit.onnx/1"
METADATA_FILE = "transferkit.json"
DIGEST_FILE = "transferkit.sha256"
LABELS_FILE = "labels.txt"
RECORDS_FILE = "transferkit.records.json"
EXTRA_FILES = (METADATA_FILE, DIGEST_FILE, LABELS_FILE, RECORDS_FILE)
INPUT_KINDS = ("image", "audio")
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
REQUIRED = {"format": str, "labels": list, "num_outputs": int, "task": str, "input_spec": dict,
            "transferkit_version": str, "torch_version": str, "training": dict}


def transferkit_version() -> str:
    """The version of transferkit writing the file."""
    return __version__


def as_json(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` as JSON reads it back (tuples as lists, NaN as null: JSON has no NaN, NumPy
    arrays and numbers as lists and numbers), or an ExportError naming the first field that
    does not serialise (an object, a tensor).

    Example:
        >>> import numpy as np
        >>> as_json({"labels": np.array(["cat", "dog"]), "training": {"acc": np.float32(0.5)}})
        {'labels': ['cat', 'dog'], 'training': {'acc': 0.5}}
    """
    meta = _plain(meta)
    try:
        return json.loads(strict_json(meta))
    except (TypeError, ValueError) as exc:
        field = _unserialisable(meta)
        raise ExportError(f"Export metadata must be JSON-serialisable: {exc}"
                          f"{f' (the field {field})' if field else ''}.") from exc


def _plain(value: Any) -> Any:
    """``value`` with NumPy arrays and numbers (scikit-learn's ``classes_``, a metric) made lists
    and Python numbers, in dicts, lists and tuples."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _unserialisable(value: Any, where: str = "") -> str | None:
    """The path (``training.model``) of the first value in ``value`` that JSON cannot hold."""
    if isinstance(value, dict):
        return next((f for k, v in value.items() if (f := _unserialisable(v, f"{where}.{k}" if where else str(k)))),
                    None)
    if isinstance(value, (list, tuple)):
        return next((f for i, v in enumerate(value) if (f := _unserialisable(v, f"{where}[{i}]"))), None)
    return None if value is None or isinstance(value, (str, int, float, bool)) else (where or "metadata")


def complete_metadata(metadata: dict[str, Any], *, num_outputs: int, fmt: str = FORMAT) -> dict[str, Any]:
    """Fill the fields the exporter knows (format, versions, ``num_outputs``, task and
    training defaults) and validate the result.

    Example:
        >>> meta = complete_metadata({"labels": ["cat", "dog"], "input_spec": {"image_size": 32}}, num_outputs=2)
        >>> meta["task"], meta["format"]
        ('multiclass', 'transferkit.torchscript/1')
    """
    if not isinstance(metadata, dict):
        raise ExportError(f"Export metadata must be a dict, got {type(metadata).__name__}.")
    meta = {"task": "multiclass", "training": {}, **metadata, "format": fmt, "num_outputs": int(num_outputs),
            "transferkit_version": transferkit_version(), "torch_version": torch.__version__}
    meta = as_json(meta)
    for record in ("decisions", "training"):  # a shipped file records no URL's signature (the labels are as given)
        if record in meta:
            meta[record] = hide_secrets_in(meta[record])
    return validate_metadata(meta, source=_TO_EXPORT, fmt=fmt)


_TO_EXPORT = "the metadata to export"
UPDATED = "the updated metadata"  # the source update_metadata checks its result as


def run_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The settings of the run that made an export (``decisions.config``, as `finetune`
    writes them), or {} for a file written without them."""
    decisions = meta.get("decisions")
    config = decisions.get("config") if isinstance(decisions, dict) else None
    return config if isinstance(config, dict) else {}


def audio_max_seconds(meta: dict[str, Any]) -> float | None:
    """The ``max_seconds`` of the run that made an audio export: the window its clips were
    cropped to in training and are cropped to in prediction (`DEFAULT_MAX_SECONDS` for a
    file that does not record it; None: whole clips), never less than the input spec's
    ``clip_seconds``, as in training (`transferkit.data.audio.prepare_audio_data`)."""
    spec = meta.get("input_spec") if isinstance(meta.get("input_spec"), dict) else {}
    return audio_window(run_config(meta).get("max_seconds", DEFAULT_MAX_SECONDS), spec.get("clip_seconds"))


def _fail(source: str, problem: str) -> ExportError:
    if source == _TO_EXPORT:  # given to an exporter: nothing was written yet
        return ExportError(f"The metadata to export is invalid: {problem}. Nothing was written; fix the metadata.")
    if source == UPDATED:  # a change asked of update_metadata: the file is as it was
        return ExportError(f"The metadata change is invalid: {problem}. Nothing was written; the file is unchanged.")
    return ExportError(f"The metadata of {source} is invalid: {problem}. It was not written by this version of "
                       "transferkit or was edited by hand; re-export the model.")


def _check_input_spec(spec: dict[str, Any], source: str) -> None:
    kind = spec.get("kind", "image")
    if kind not in INPUT_KINDS:
        raise _fail(source, f"input_spec.kind is {kind!r}; valid kinds: {', '.join(map(repr, INPUT_KINDS))}")
    if kind == "audio":
        sr = spec.get("sample_rate")
        if isinstance(sr, bool) or not isinstance(sr, int) or sr < 1:
            raise _fail(source, f"input_spec.sample_rate must be a positive integer for audio, got {sr!r}")
        clip = spec.get("clip_seconds")
        if clip is not None and (not isinstance(clip, (int, float)) or clip <= 0):
            raise _fail(source, f"input_spec.clip_seconds must be a positive number or null, got {clip!r}")
        return
    for key in ("image_size", "resize_size"):
        v = spec.get(key, 224 if key == "image_size" else None)
        if (v is not None or key == "image_size") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise _fail(source, f"input_spec.{key} must be a positive integer, got {v!r}")
    channels = spec.get("channels", 3)
    for key in ("mean", "std"):
        v = spec.get(key)
        if v is not None and (not isinstance(v, list) or len(v) != channels
                              or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise _fail(source, f"input_spec.{key} must be a list of {channels} numbers, got {v!r}")
    if any(s <= 0 for s in spec.get("std") or []):
        raise _fail(source, f"input_spec.std must be positive, got {spec['std']!r}")
    interp = spec.get("interpolation", "bilinear")
    if interp not in INTERPOLATIONS:
        raise _fail(source, f"input_spec.interpolation is {interp!r}; valid: {', '.join(INTERPOLATIONS)}")


def validate_metadata(meta: Any, *, source: str, fmt: str = FORMAT, new_labels: bool | None = None) -> dict[str, Any]:
    """Check ``meta`` against the schema; raise ExportError naming the first problem. Labels
    being written (``new_labels``; by default those of metadata to export or of a change)
    may hold no control character; a file's own, written before that rule, still load."""
    if not isinstance(meta, dict):
        raise _fail(source, f"it is a JSON {type(meta).__name__}, not an object")
    found = meta.get("format")
    if isinstance(found, str) and found.split("/")[0] == fmt.split("/")[0] and found != fmt:
        raise ExportError(f"{source} has export format {found!r}; this transferkit ({transferkit_version()}) reads "
                          f"{fmt!r}. Load it with the transferkit version that wrote it "
                          f"({meta.get('transferkit_version', 'unknown')}) or re-export it.")
    for key, typ in REQUIRED.items():
        if key not in meta:
            raise _fail(source, f"the field {key!r} is missing")
        if not isinstance(meta[key], typ) or isinstance(meta[key], bool):
            raise _fail(source, f"the field {key!r} must be a {typ.__name__}, got {type(meta[key]).__name__}")
    if found != fmt:
        raise _fail(source, f"format is {found!r}, expected {fmt!r}")
    labels = meta["labels"]
    if not labels or not all(isinstance(x, str) and x and x.splitlines() == [x] for x in labels):
        raise _fail(source, "labels must be a non-empty list of non-empty one-line strings")
    written = source in (_TO_EXPORT, UPDATED) if new_labels is None else new_labels
    bad = next((x for x in labels if not one_line(x)), None) if written else None
    if bad is not None:
        raise _fail(source, f"labels must be a non-empty list of non-empty one-line strings ({bad!r} holds a "
                            "control character, as a tab, which separates the fields of predict's output)")
    if written:
        _check_written_labels(labels, meta["task"], source)
    if len(set(labels)) != len(labels):
        dups = sorted({x for x in labels if labels.count(x) > 1})
        raise _fail(source, f"labels are not unique (repeated: {dups[:5]})")
    if meta["num_outputs"] != len(labels):
        raise _fail(source, f"num_outputs is {meta['num_outputs']} but there are {len(labels)} labels")
    if meta["task"] not in TASKS:
        raise _fail(source, f"task is {meta['task']!r}; valid tasks: {', '.join(map(repr, TASKS))}")
    _check_input_spec(meta["input_spec"], source)
    if meta["input_spec"].get("kind") == "audio" and "max_seconds" in run_config(meta):  # what predict crops clips to
        problem = seconds_problem(run_config(meta)["max_seconds"])
        if problem:
            raise _fail(source, f"decisions.config.max_seconds (the window the predictor crops clips to) must be "
                                f"{problem}, got {run_config(meta)['max_seconds']!r}")
    integrity = meta.get("integrity")
    if integrity is not None and not (isinstance(integrity, dict) and isinstance(integrity.get("digest"), str)):
        raise _fail(source, "the field 'integrity' must be an object with a 'digest'")
    return meta


def _check_written_labels(labels: list[str], task: Any, source: str) -> None:
    """Labels being written: UTF-8 text (the export stores them so), and a multi-label model's
    without the separator of its labels (as training refuses such a name)."""
    odd = next((label for label in labels if not_utf8(label)), None)
    if odd is not None:
        raise _fail(source, f"the label {ascii(odd)} is not UTF-8 text (a name's undecodable bytes, as Python keeps "
                            "them); give it as text")
    joined = [x for x in labels if LABEL_SEPARATOR in x] if task == "multilabel" else []
    if joined:
        raise _fail(source, f"the label {joined[0]!r} holds {LABEL_SEPARATOR!r}, which separates a multilabel model's "
                            "labels in predict's CSV output and in 'path,labels' tables, where it would read as two "
                            "labels; rename it")


def encode_metadata(meta: dict[str, Any], records: str | None = None) -> dict[str, str]:
    """The extra files of an export: JSON metadata, its SHA-256, ``labels.txt`` and (when
    given) the records file whose digest ``meta["integrity"]`` holds."""
    text = strict_json(meta, indent=1, sort_keys=True)  # NaN -> null: every JSON parser reads the file
    files = {METADATA_FILE: text, DIGEST_FILE: _digest(text.encode()), LABELS_FILE: "\n".join(meta["labels"]) + "\n"}
    if records is not None:
        files[RECORDS_FILE] = records
    return files


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _corrupt(message: str) -> ExportError:
    return CorruptExportError(message)


def _as_bytes(v: Any) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


def decode_metadata(extra: dict[str, Any], *, source: str, fmt: str = FORMAT) -> dict[str, Any]:
    """Read and check the extra files of an export (as filled by ``torch.jit.load``)."""
    raw = _as_bytes(extra.get(METADATA_FILE, b""))
    if not raw:
        raise ExportError(f"{source} is TorchScript but has no transferkit metadata ({METADATA_FILE}); export it "
                          "with transferkit.export_torchscript or finetune(export=...).")
    digest = _as_bytes(extra.get(DIGEST_FILE, b"")).decode(errors="replace").strip()
    if not digest:
        raise ExportError(f"{source} has transferkit metadata but no digest ({DIGEST_FILE}): the file was altered "
                          "after export or not written by transferkit; re-export the model.")
    if digest != _digest(raw):
        raise _corrupt(f"The metadata of {source} is corrupt or was modified after export: its SHA-256 does not "
                       f"match the digest recorded at export ({DIGEST_FILE}). Use an intact copy or re-export the "
                       "model" + ("; to change metadata on purpose use transferkit.export.update_metadata()."
                                  if fmt == FORMAT else "."))
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(f"The metadata of {source} is corrupt (not valid JSON: {exc}).") from exc
    meta = validate_metadata(meta, source=source, fmt=fmt)
    labels_txt = _as_bytes(extra.get(LABELS_FILE, b"")).decode(errors="replace")
    if labels_txt.splitlines() != meta["labels"]:
        raise _corrupt(f"The {LABELS_FILE} of {source} does not match the labels in {METADATA_FILE}: the file is "
                       "corrupt or was altered after export. Use an intact copy or re-export the model.")
    return meta


def check_model_file(path: str | Path, *, source: str, kind: str) -> None:
    """Raise ExportError when ``path`` is not a file, or is empty (a write cut short, a
    truncated copy): before a reader reports an empty file as a format problem."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{kind} file {source} is a folder; give the exported file in it (e.g. model.pt).")
    if not path.is_file():
        why = "does not exist" if not path.exists() else "is not a regular file (a device, a FIFO or a socket)"
        raise ExportError(f"{kind} file {source} {why}.{home_not_expanded(path) if not path.exists() else ''}")
    if path.stat().st_size == 0:
        raise ExportError(f"{kind} file {source} is empty (0 bytes): a copy or write that was cut short. Copy or "
                          "export it again.")


def holds_onnx(p: str | Path) -> bool:
    """Whether ``p`` is a file an ONNX export may replace: ONNX by its content, not by its name
    (notes saved as ``model.onnx`` are kept)."""
    return onnx_by_content(p) is True


def onnx_by_content(path: str | Path) -> bool | None:
    """Whether ``path`` holds ONNX by its first bytes: True for a protobuf ``ModelProto`` (its
    first field, ``ir_version``: byte ``0x08``), False for TorchScript (a zip archive, starting
    with ``PK\\x03\\x04``), None for anything else or a file that cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head == b"PK\x03\x04":
        return False
    return True if head[:1] == b"\x08" else None


def is_onnx_file(path: str | Path) -> bool:
    """Whether ``path`` holds an ONNX export rather than TorchScript, by its content
    (`onnx_by_content`); a file that is neither, or cannot be read, goes by its suffix
    (``.onnx``)."""
    found = onnx_by_content(path)
    return found if found is not None else str(path).lower().endswith(".onnx")

