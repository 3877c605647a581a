"""The output paths of a run, checked before any work is spent on them, and held while it runs.

`check_output_paths` raises one clear error, before the backbone is built, for what would
otherwise fail or destroy something at the end of the run:

- a path that cannot be written (a folder given for a file, a read-only or missing parent,
  a file name too long for the file system once the temporary suffix is added). A
  ``cache_dir`` that exists and is read-only is taken: it is read, never written;
- two outputs on one file (``export`` and ``checkpoint``), an output folder (``log_dir``,
  ``plots_dir``, ``cache_dir``) at or below an output file's path, an output on an input (the
  pretrained ``weights`` file, a CSV of ``data`` / ``val_data``), an output folder inside the
  data (its files would be read as training data by the next run);
- ``resume=True`` without a checkpoint to resume;
- an output on a full file system (less than 64 kB free).

`check_output_space` (once the model is built, before training) refuses an export or checkpoint
whose weights alone do not fit the free space.

`output_locks` holds the checkpoint's and the export's locks for the whole run: a second run
writing either gets `FileLockedError` at once instead of overwriting the first one's file.

Example:
    >>> check_output_paths(FinetuneConfig(data="images/", export="m.pt", checkpoint="m.pt"))
    Traceback (most recent call last):
    ...
    transferkit.errors.ConfigError: export and checkpoint are the same file 'm.pt': ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from transferkit._io import (
    check_export_names,
    check_free_space,
    check_unlocked,
    check_writable,
    file_lock,
    free_bytes,
    is_inside,
    read_only_folder,
    remove_stale_temps,
    same_file,
)
from transferkit._signals import raise_if_interrupted
from transferkit.checkpoints import load_checkpoint, saved_run
from transferkit.config import FinetuneConfig
from transferkit.errors import ConfigError, OutputError, WeightsError

OUTPUTS = {"export": "file", "checkpoint": "file", "plots_dir": "dir", "cache_dir": "dir", "log_dir": "dir"}
"""Every output setting of a run and whether it names a file or a folder."""
MIN_FREE = 1 << 16
"""Bytes an output's file system must have free before the run starts: less is a full disk,
said at once (each large write checks its own estimate again when it happens)."""
_WHAT = {"export": "export", "checkpoint": "checkpoint", "plots_dir": "plots folder", "cache_dir": "cache folder",
         "log_dir": "log folder"}


def check_plotting(flag: str | None = None) -> None:
    """ConfigError when matplotlib (an optional extra) is missing: said before any work where
    a setting (``flag``) asks for plots."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise_if_interrupted(exc)
        if flag is None:
            raise ConfigError("Plots need matplotlib: pip install 'transferkit[plots]'.") from exc
        raise ConfigError(f"{flag} draws plots, which need matplotlib: pip install 'transferkit[plots]' (or "
                          f"leave {flag} out).") from exc


def _path(value: Any) -> Path | None:
    return Path(value) if isinstance(value, (str, Path)) and str(value) else None


def _weights_file(value: Any) -> Path | None:
    """The pretrained-weights setting when it names a file (not a tag such as 'DEFAULT')."""
    p = _path(value)
    return p if p is not None and p.is_file() else None


def check_output_paths(cfg: FinetuneConfig) -> None:
    """Raise ConfigError (collisions, resume) or OutputError (a path that cannot be written)
    naming the setting, before anything is built or trained (see the module docstring)."""
    outputs = {k: p for k in OUTPUTS if (p := _path(getattr(cfg, k))) is not None}
    if cfg.resume:
        _check_resume(cfg)
    files = [(k, p) for k, p in outputs.items() if OUTPUTS[k] == "file"]
    for i, (a, pa) in enumerate(files):
        for b, pb in files[i + 1:]:
            if same_file(pa, pb):
                suffixes = {"checkpoint": ".ckpt", "export": ".pt"}
                other = next((k for k in (b, a) if pa.suffix != suffixes.get(k, pa.suffix)), b)  # a path it is not
                renamed = pa.with_suffix(suffixes[other]) if other in suffixes else pa.with_name("other-" + pa.name)
                raise ConfigError(f"{a} and {b} are the same file {str(pa)!r}: the {b} would be replaced by the "
                                  f"{a} (or the other way round). Give them two paths, e.g. {other}="
                                  f"{str(renamed)!r}.")
    for a, pa in files:  # a folder made at a file's path, or below it: the file cannot be written at the end
        if pa.is_dir():  # a folder there already: the file's own check says so (`check_writable`)
            continue
        for b, pb in outputs.items():
            if OUTPUTS[b] == "dir" and is_inside(pb, pa):
                where = "at" if is_inside(pa, pb) else "below"
                other = pa.parent / f"{pa.stem}-{b.removesuffix('_dir')}"
                raise ConfigError(f"{b}={str(pb)!r} is a folder {where} the path of the {a} {str(pa)!r}: the run "
                                  f"would make the folder, and the {a} could not be written there. Give the folder "
                                  f"another path (e.g. {b}={str(other)!r}).")
    if "export" in outputs:
        check_export_names(outputs["export"], flags=("export (the TorchScript file)", ""))
    if "plots_dir" in outputs:
        check_plotting("plots_dir")
    weights = _weights_file(cfg.weights)
    inputs = [("weights", weights)] + [(k, _path(getattr(cfg, k))) for k in ("data", "val_data")]
    for key, src in inputs:
        if src is None:
            continue
        for out, p in outputs.items():
            if OUTPUTS[out] == "file" and same_file(p, src):
                if key == "weights" and out == "checkpoint" and cfg.resume:
                    continue  # resume reads and rewrites its own checkpoint
                raise ConfigError(f"{out}={str(p)!r} is the {key} file the run reads: writing the {out} would "
                                  f"overwrite it. Give the {out} another path.")
            if OUTPUTS[out] == "file" and key != "weights":
                check_not_data(p, src, flag=out, what=key)
            if OUTPUTS[out] == "dir" and key != "weights" and src.is_dir() and is_inside(p, src):
                raise ConfigError(f"{out}={str(p)!r} lies inside the {key} folder {str(src)!r}: the files written "
                                  "there would be read as data (a class folder) by the next run. Choose a folder "
                                  "outside the data.")
    for key in ("checkpoint", "export"):
        if key in outputs and not (key == "checkpoint" and cfg.resume):
            _check_replaced(key, outputs[key])
    for key, p in outputs.items():
        if key == "cache_dir" and read_only_folder(p) is not None:
            continue  # read, never written (see transferkit._io.read_only_folder)
        check_writable(p, what=_WHAT[key], flag=key, kind=OUTPUTS[key])
        free = free_bytes(p if OUTPUTS[key] == "dir" else p.parent)
        if free < MIN_FREE:
            raise OutputError(f"The {_WHAT[key]} {str(p)!r} ({key}) is on a full file system ({free // 1024} kB "
                              "free). Free some space or choose a path on another disk.")


def check_not_data(p: Path, data: Any, *, flag: str, what: str = "data") -> None:
    """ConfigError when the output file ``p`` exists inside the folder ``data`` and is not a file
    transferkit wrote (an export or a checkpoint, which a run replaces as it means to): it is
    one of the data (an image, a clip, a list), which the output would replace."""
    src = _path(data)
    if src is None or not src.is_dir() or not p.is_file() or not is_inside(p, src) or saved_run(p) is not None:
        return
    raise ConfigError(f"{flag}={str(p)!r} is a file inside the {what} folder {str(src)!r}: writing the {flag} would "
                      f"replace it. Give the {flag} a path outside the data.")


def check_png_name(p: str | Path, *, flag: str = "The picture path") -> None:
    """ConfigError for a picture path not named ``*.png``: pictures are written as PNG, and a
    name that says otherwise (``cm.jpg``, ``cm.txt``) would hold PNG bytes under another type."""
    if Path(p).suffix.lower() != ".png":
        raise ConfigError(f"{flag} {str(p)!r}: pictures are written as PNG; name the file *.png (e.g. "
                          f"{Path(p).with_suffix('.png').name!r}).")


def check_output_file(p: str | Path, *, flag: str, reads: list[tuple[str, Any]], writes: str,
                      replaceable: Callable[[Path], bool], inside_is_data: bool = False) -> None:
    """ConfigError, before a command does its work, when writing its output ``p`` (``flag``, a
    ``writes`` file) would destroy what the user has: a file the command reads (``reads``:
    ``(what, path)``, e.g. the model, the data), or an existing file that is not one it means
    to replace (``replaceable(p)`` False: a picture over a CSV, an export over an image; an
    empty file, as ``mktemp`` makes, holds nothing and is replaced).
    ``inside_is_data``: the output would be read as data inside a folder it reads (a PNG in a
    class folder), so that is refused too."""
    p = Path(p)
    for what, src in reads:
        src = _path(src)
        if src is None:
            continue
        if same_file(p, src):
            raise ConfigError(f"{flag} {str(p)!r} is the {what} this command reads: writing the {writes} there would "
                              "replace it. Give another path.")
        if inside_is_data and src.is_dir() and is_inside(p, src):
            raise ConfigError(f"{flag} {str(p)!r} lies inside the {what} folder {str(src)!r}: the {writes} written "
                              "there would be read as data by the next command. Give a path outside it.")
    if p.is_file() and p.stat().st_size > 0 and not replaceable(p):  # an empty file holds nothing to lose
        article = "an" if writes[:1].lower() in "aeio" else "a"
        raise ConfigError(f"{flag} {str(p)!r} is an existing file that is not {article} {writes}: writing the "
                          f"{writes} there would replace it. Give another path, or remove the file first.")


def is_export(p: Path) -> bool:
    """Whether ``p`` is a TorchScript export, which another export may replace."""
    found = saved_run(p)
    return found is not None and found[0] == "export"


def is_png(p: Path) -> bool:
    """Whether ``p`` is a PNG picture (by its signature)."""
    try:
        with open(p, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def _check_replaced(key: str, p: Path) -> None:
    """Refuse an output file that would replace work a user cannot get back from another file:
    a checkpoint of an unfinished run (to be resumed), an export given as ``checkpoint``, a
    checkpoint given as ``export``, a file transferkit did not write (notes, a ``torch.save``
    of the user's own). A finished run's checkpoint, an earlier export at the export's path
    and an empty file are replaced, as a run that writes there again means to."""
    found = saved_run(p) if p.is_file() else None
    if found is None:
        if p.is_file() and p.stat().st_size > 0:
            raise ConfigError(f"{key}={str(p)!r} is an existing file that is not a TorchScript export or a "
                              f"transferkit checkpoint it can read: the {key} would replace it. Give the {key} another "
                              "path, or remove the file first.")
        return
    check_unlocked(p, what=key, flag=key)  # a run still writing it: FileLockedError naming it, not advice to resume
    kind, info = found
    epochs = f"epoch {info.get('epoch')} of {info.get('epochs')}" if info.get("epochs") else "not finished"
    if key == "checkpoint" and kind == "export":
        raise ConfigError(f"checkpoint={str(p)!r} is an exported model: the run's checkpoints would replace it. Give "
                          "the checkpoint another path (e.g. run.ckpt).")
    if key == "checkpoint" and not info["complete"] and info["resumable"]:
        try:  # read whole only here, where the run is refused: advice to resume must be advice that works
            load_checkpoint(p)
        except WeightsError as exc:
            raise ConfigError(f"checkpoint={str(p)!r} holds an unfinished run ({epochs}), and it cannot be resumed. "
                              f"{exc} A new run would replace it: delete the file or choose another path to start "
                              "over.") from exc
        raise ConfigError(f"checkpoint={str(p)!r} holds an unfinished run ({epochs}): a new run would replace it. "
                          "Continue it with resume=True (the same settings), or delete the file or choose another "
                          "path to start over.")
    if key == "checkpoint" and not info["complete"]:
        raise ConfigError(f"checkpoint={str(p)!r} holds weights a run saved when it could not write its output: a "
                          "new run would replace them. Export them first (transferkit export), or give the "
                          "checkpoint another path.")
    if key == "export" and kind == "checkpoint":
        what = "a finished run" if info["complete"] else f"an unfinished run ({epochs}), which resume=True continues" \
            if info["resumable"] else "weights a run saved when it could not write its output"
        raise ConfigError(f"export={str(p)!r} is the checkpoint of {what}: the export would replace it. Give the "
                          "export another path (e.g. model.pt).")


def _check_resume(cfg: FinetuneConfig) -> None:
    if cfg.checkpoint is None:
        raise ConfigError("resume=True needs checkpoint=PATH, the checkpoint of the run to continue; without it "
                          "there is nothing to resume.")
    p = Path(cfg.checkpoint)
    if not p.is_file():
        raise ConfigError(f"resume=True but the checkpoint {str(p)!r} does not exist"
                          f"{' (it is a folder)' if p.is_dir() else ''}: nothing to resume. Check the path, or drop "
                          "resume=True to start a new run.")


def check_output_space(cfg: FinetuneConfig, model: torch.nn.Module, trained: int = 0) -> None:
    """OutputError before training when the export or the checkpoint cannot fit where it goes:
    an export holds the model's weights; a checkpoint written after an epoch also, for the
    ``trained`` parameters (elements), the best epoch's copy and the optimizer's state (two
    float32 moments for Adam(W), one for SGD with momentum): an estimate (3-7% below the
    files measured for tk:small_cnn, full and feature extraction), each write checking its
    own size again."""
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in (*model.parameters(),
                                                                          *model.buffers())}.values())
    moments = 2 if cfg.optimizer in ("adam", "adamw") else 1 if cfg.momentum else 0
    need = {"export": weights, "checkpoint": weights + 4 * trained * (1 + moments)}
    for key in ("export", "checkpoint"):
        p = _path(getattr(cfg, key))
        if p is not None:
            check_free_space(p, need[key], what=key, flag=key)


@contextlib.contextmanager
def output_locks(cfg: FinetuneConfig) -> Iterator[None]:
    """Hold the locks of the run's checkpoint and export (re-entrant: the saves inside take
    them again for free); temporaries a killed writer left for them are removed first."""
    with contextlib.ExitStack() as stack:
        for key in ("checkpoint", "export"):
            p = _path(getattr(cfg, key))
            if p is not None:
                stack.enter_context(file_lock(p, what=key, flag=key, wait=0.5))  # (past another run's check_unlocked)
                remove_stale_temps(p)
        yield
