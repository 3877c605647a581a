"""Loading weights from local files into a trunk, strictly and with readable errors."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from transferkit._integrity import ZIP_ERRORS
from transferkit._io import kind_of_bytes
from transferkit._text import expand_home
from transferkit.checkpoints import verify_checkpoint
from transferkit.config import WEIGHTS_SUFFIXES
from transferkit.errors import WeightsError
from transferkit.lora import fold_lora_state

_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")


def is_weights_path(weights: object) -> bool:
    """True when ``weights`` names a local file rather than a tag such as ``"DEFAULT"``."""
    if isinstance(weights, Path):
        return True
    if not isinstance(weights, str):
        return False
    return os.sep in weights or weights.endswith(WEIGHTS_SUFFIXES) or os.path.exists(weights)


_GIVE = "Pass a state-dict file (.pt/.pth/.th/.safetensors), a transferkit checkpoint, a weights tag such as " \
    "'DEFAULT', or None."


def check_weights_file(path: str | Path) -> Path:
    """``path`` as a Path, or a WeightsError when no file is there, when it is an exported model
    (TorchScript), or when its first bytes are not what ``torch.save`` writes (a zip archive,
    or before torch 1.6 a pickle): checked by a dry run too, which loads no weights."""
    path = Path(expand_home(path))
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.name.endswith(WEIGHTS_SUFFIXES))[:3]
        held = f" (it holds {', '.join(repr(n) for n in inside)})" if inside else ""
        raise WeightsError(f"Weights file {str(path)!r} is a folder{held}: give the weights file in it. {_GIVE}")
    if not path.is_file():
        raise WeightsError(f"Weights file {str(path)!r} does not exist. {_GIVE}")
    if _is_torchscript(path):
        raise WeightsError(f"Weights file {str(path)!r} is an exported model (TorchScript), not a state dict or "
                           "checkpoint. Pass the checkpoint it was exported from (finetune(checkpoint=...)), or "
                           "predict with the export: "
                           f"`transferkit predict {shlex.quote(str(path))} IMAGES` (in Python: "
                           f"transferkit.load({str(path)!r}).predict(...)).")
    if path.suffix.lower() != ".safetensors":
        with open(path, "rb") as f:
            head = f.read(64)
        if not head.startswith(b"PK\x03\x04") and head[:1] != b"\x80":
            raise WeightsError(f"Weights file {str(path)!r} is no file torch.save writes (a zip archive, or an older "
                               f"pickle){_content(head, path)}. {_GIVE}")
    return path


def _content(head: bytes, path: Path) -> str:
    """What a file that is no weights file is, by its first bytes (or an ONNX model's name)."""
    kind = kind_of_bytes(head)
    found = f"{'an' if kind[1][0] in 'AEIOU' or kind[1] == 'MP3' else 'a'} {kind[1]} {kind[0]}" if kind else None
    if found is None and path.suffix.lower() == ".onnx":
        found = "an ONNX model"
    elif found is None and not head:
        found = "empty (0 bytes)"
    elif found is None and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        found = "text"
    return f": it is {found}" if found else ""


def read_state_dict(path: str | Path, *, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path``: a plain state dict, ``{"state_dict": ...}``,
    ``{"model": ...}``, a transferkit checkpoint (its trunk is taken, after its tensors are
    checked against the digests written with it), or ``.safetensors``. ``module.`` prefixes
    (DataParallel/DDP) are removed.

    Example:
        >>> sd = read_state_dict("resnet20.th")  # doctest: +SKIP
    """
    path = check_weights_file(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError ...
            if weights_only and "weights_only" in str(exc):  # torch's text: ANSI codes, steps for torch.load
                found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
                what = f" (here {found.group(1)})" if found else ""
                raise WeightsError(f"Cannot read weights file {str(path)!r}: it holds Python objects beyond tensors"
                                   f"{what}, which torch.load(weights_only=True) refuses to run. If you trust its "
                                   "source, load it with weights_only=False: finetune(..., backbone_options="
                                   "{'weights_only': False}) (in Python: get_backbone(..., weights_only=False) for "
                                   "the backbone alone).") from exc
            raise WeightsError(f"Cannot read weights file {str(path)!r}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return _extract_state_dict(obj, path)


def _is_torchscript(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.split("/", 1)[-1].startswith("code/") for n in zf.namelist())
    except ZIP_ERRORS:
        return False


def _extract_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "transferkit" in obj and "model" in obj:
        if isinstance(obj, dict):
            verify_checkpoint(obj, source=repr(str(path)))
        model_sd = fold_lora_state(obj["model"], source=f"The weights of {str(path)!r}")  # a LoRA run's, unfinished
        sd = {k[len("trunk."):]: v for k, v in model_sd.items() if k.startswith("trunk.")}
        if not sd:
            raise WeightsError(f"{str(path)!r} is a transferkit checkpoint without trunk weights.")
        return sd
    for _ in range(3):  # unwrap {"state_dict": {"model": ...}} and friends
        if isinstance(obj, Mapping):
            nested = next((obj[k] for k in _NESTED_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if nested is not None and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = nested
                continue
        break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__
        keys = list(obj.keys())[:6] if isinstance(obj, Mapping) else []
        raise WeightsError(f"{str(path)!r} does not hold a state dict of tensors (found {kind}"
                           f"{' with keys ' + str(keys) if keys else ''}). Save weights with "
                           "torch.save(model.state_dict(), path).")
    sd = dict(obj)
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True,
              ignore: tuple[str, ...] = (), source: str = "weights") -> None:
    """Copy ``state_dict`` into ``module``; a mismatch raises one readable WeightsError.

    Keys starting with a prefix in ``ignore`` are dropped first (e.g. the old classifier), and
    so are keys of buffers the module does not store (non-persistent: made from its settings).
    ``num_batches_tracked`` buffers missing from old checkpoints are not an error.
    """
    own = module.state_dict()
    # buffers made from the module's settings, not stored (a file of an earlier version may hold one)
    rebuilt = {n for n, _ in module.named_buffers()} - set(own)
    sd = {k: v for k, v in state_dict.items()
          if k not in rebuilt and not any(k == p or k.startswith(p + ".") for p in ignore)}
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if strict and (missing or unexpected) or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                parts.append(f"{len(items)} {label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}")
        raise WeightsError(f"{source} do not fit the model ({'; '.join(parts)}). Check that the file was saved "
                           "from the same architecture (a transferkit checkpoint fits the backbone it was trained "
                           "with: its metadata's training.backbone).")
    module.load_state_dict(sd, strict=False)
