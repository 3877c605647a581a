"""Resumable checkpoints: what is saved after every epoch, and the check that a resume is exact.

After each epoch the checkpoint holds that epoch's model with its optimizer, schedule,
gradient-scaler and RNG states, the loop state (history, best epoch and its weights,
early-stopping counter) and the run's decisions. ``resume`` decides again from the stored
configuration, compares with the stored decisions, and refuses with the list of differences
when they disagree: a resumed run computes exactly what the uninterrupted run would have.
Training longer than planned is a new run (``weights=<checkpoint>``), not a resume: the
schedule of the first run was built for its number of epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit.errors import ConfigError, TrainingError
from transferkit.checkpoints import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from transferkit.data.remote import ENV_BUDGET, budget_setting
from transferkit.train.distributed import barrier
from transferkit.train.loop import Loop, TrainState


def training_state(*, optimizer: Any, scheduler: Any, state: TrainState, scaler: Any = None) -> dict[str, Any]:
    """Everything besides the model that an exact resume needs."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
            "scaler": scaler.state_dict() if scaler is not None else None, "state": state.to_dict(),
            "rng": rng_state()}


def _cut(value: Any, width: int = 160) -> str:
    """``repr(value)`` cut to ``width`` characters (a record's optimizer groups or data digests
    run to kilobytes)."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 5] + " ...]"


def _format_diff(diff: dict[str, tuple[Any, Any]], limit: int = 12) -> str:
    """``key: checkpoint -> now`` for the first ``limit`` differences, each value cut (`_cut`)."""
    items = [f"{k}: {data_change(a, b) if k == 'data' else f'{_cut(a)} -> {_cut(b)}'}"
             for k, (a, b) in list(diff.items())[:limit]]
    more = f"; and {len(diff) - limit} more" if len(diff) > limit else ""
    return "; ".join(items) + more


def data_change(saved: Any, now: Any, shown: int = 8) -> str:
    """How the data of a run differ from a checkpoint's, from their records' identities: the
    items of each part and, where both records count them, the classes that gained or lost
    files.

    Example:
        >>> data_change({"classes": 2, "train": {"items": 10, "digest": "a", "per_class": {"cat": 5, "dog": 5}}},
        ...             {"classes": 2, "train": {"items": 9, "digest": "b", "per_class": {"cat": 4, "dog": 5}}})
        "train: 10 items -> 9 (per class: 'cat' 5 -> 4)"
        >>> data_change({"classes": 2, "train": {"items": 4, "digest": "a"}},  # validation data given now
        ...             {"classes": 2, "train": {"items": 4, "digest": "a"}, "val": {"items": 2, "digest": "b"}})
        'val: none -> 2 items'
    """
    def cut(value: Any) -> str:  # a part's record holds up to 1000 per-class counts: its items said
        return f"{value['items']} items" if isinstance(value, dict) and "items" in value else _cut(value)

    if not isinstance(saved, dict) or not isinstance(now, dict):
        return f"{cut(saved)} -> {cut(now)}"
    said = [f"classes {saved.get('classes')!r} -> {now.get('classes')!r}"] \
        if saved.get("classes") != now.get("classes") else []
    for part in sorted((set(saved) | set(now)) - {"classes"}):
        a, b = saved.get(part), now.get(part)
        if a == b:
            continue
        if not isinstance(a, dict) or not isinstance(b, dict):
            said.append(f"{part}: {'none' if a is None else cut(a)} -> {'none' if b is None else cut(b)}")
            continue
        count = f"{a.get('items')} items -> {b.get('items')}" if a.get("items") != b.get("items") else \
            f"the same {a.get('items')} items"
        ca, cb = a.get("per_class"), b.get("per_class")
        moved = [f"{c!r} {ca.get(c, 0)} -> {cb.get(c, 0)}" for c in dict.fromkeys([*ca, *cb])
                 if ca.get(c, 0) != cb.get(c, 0)] if isinstance(ca, dict) and isinstance(cb, dict) else None
        if moved:
            more = f" and {len(moved) - shown} more" if len(moved) > shown else ""
            said.append(f"{part}: {count} (per class: {', '.join(moved[:shown])}{more})")
        elif a.get("items") == b.get("items"):
            per_class = ", as many per class" if moved is not None else ""
            said.append(f"{part}: {count}{per_class}, other file names, sizes or times")
        else:
            said.append(f"{part}: {count}")
    return "; ".join(said) or "their digests differ"


def resume_refused(path: str | Path, diff: dict[str, tuple[Any, Any]]) -> ConfigError:
    """The error of a resume whose run differs from the checkpoint's (``diff``: ``{key:
    (checkpoint, now)}``), with what each kind of difference means."""
    data = " The data's digest covers each file's path below the data folder, label, size, modification and " \
        "change time (a copy with cp -a or rsync -a, or a chmod, changes the change time); an edit changes it, a " \
        "folder renamed or moved whole keeps it. A checkpoint of tar shards or Parquet files whose digest held " \
        "their absolute paths, or not their change times, does not resume." if "data" in diff else ""
    if "weights_file" in diff:
        data += (" The weights file's content changed since the run began (its digest differs): the checkpoint's "
                 "trunk grew from the file it had, and its cached features and L2-SP anchor were computed from it.")
    if "l2sp_anchor" in diff:
        data += (" The backbone's weights differ from those the checkpoint's run started from (their digests above), "
                 "which L2-SP pulls toward: resume with the backbone (and weights) the run started from.")
    if "sample_order" in diff:
        was = diff["sample_order"][0]
        data += (" The samples are drawn shard by shard when the shard cache cannot hold every remote shard (and they "
                 f"are neither decoded once nor cached as features), else shuffled whole; the checkpoint's run drew "
                 f"them {was}, ")
        if any("decode" in k or "cache" in k for k in diff):  # a setting listed above decides it
            data += "and its decode_once or feature cache differs (above): resume with the checkpoint's settings."
        else:
            data += (f"this one has {budget_setting()}: resume with the checkpoint's shard cache (a "
                     f"{'smaller' if was == 'shard by shard' else 'larger'} {ENV_BUDGET}).")
    if "config.epochs" in diff:
        data += " The epochs cannot change: the learning-rate schedule was built for the first run's length."
    if "world_size" in diff:
        data += " " + _relaunch(diff["world_size"][0])
    return ConfigError(f"Cannot resume from {str(path)!r}: this run's decisions differ from the checkpoint's "
                       f"(checkpoint -> now): {_format_diff(diff)}.{data} Use the same settings, or start a new "
                       f"run without resume (weights={str(path)!r} keeps the trained weights).")


def resume_from(path: str | Path, *, check: Callable[[dict[str, Any]], dict[str, tuple[Any, Any]]],
                model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any = None) -> TrainState:
    """Load model, optimizer, schedule, scaler, RNG states and the loop state from ``path``;
    raise ConfigError listing the differences ``check(stored metadata)`` finds between the
    checkpoint's run and this one (``{key: (checkpoint, now)}``)."""
    ckpt = load_checkpoint(path)
    tr = ckpt.get("training")
    if not isinstance(tr, dict) or "state" not in tr:
        backbone = (ckpt["transferkit"].get("decisions") or {}).get("backbone") \
            if isinstance(ckpt.get("transferkit"), dict) else None
        new_run = f"finetune(..., {f'backbone={backbone!r}, ' if isinstance(backbone, str) else ''}" \
            f"weights={str(path)!r})"
        done = ckpt.get("epoch")
        why = (f"the run it holds is complete ({done} epoch{'' if done == 1 else 's'}); a new run can start from its "
               f"trained backbone (the head starts anew): {new_run}; an export it lacks (a run stopped while "
               f"exporting) is made with "
               f"`transferkit export {path} --out model.pt`") if ckpt.get("complete") else \
            ("it holds weights without a run's training state (weights saved when a run was interrupted before an "
             f"epoch completed, or could not write its output; or a file of save_checkpoint); start a new run from "
             f"them: {new_run}")
        raise ConfigError(f"Cannot resume from {str(path)!r}: {why}.")
    if not isinstance(ckpt["transferkit"].get("decisions"), dict):
        raise ConfigError(f"Cannot resume from {str(path)!r}: it has no stored decisions (written by an older "
                          "transferkit); start a new run from its weights with weights=...")
    diff = check(ckpt["transferkit"])
    if diff:
        raise resume_refused(path, diff)
    state = TrainState.from_dict(tr["state"])
    held = [row.get("epoch") if isinstance(row, dict) else row for row in state.history]
    if not isinstance(state.epoch, int) or ckpt.get("epoch") != state.epoch or held != list(range(1, state.epoch + 1)):
        raise ConfigError(f"Cannot resume from {str(path)!r}: its training state does not hold together (epoch "
                          f"{ckpt.get('epoch')!r}, training state at epoch {state.epoch!r}, history of epochs {held}; "
                          f"a run's history holds epochs 1 to its epoch): the file was edited or damaged. Start a "
                          f"new run from its weights with weights={str(path)!r}.")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(tr["optimizer"])
    if scheduler is not None and tr.get("scheduler") is not None:
        scheduler.load_state_dict(tr["scheduler"])
    if scaler is not None and tr.get("scaler") is not None:
        scaler.load_state_dict(tr["scaler"])
    set_rng_state(tr["rng"])
    return state


def _relaunch(processes: Any) -> str:
    """How to start the processes a checkpoint was written by (its world size)."""
    if processes == 1:
        how = "run it in one process, without torchrun"
    else:
        how = (f"relaunch with torchrun and {processes} processes in all (--nnodes x --nproc_per_node = {processes}, "
               f"e.g. --nproc_per_node={processes} on one machine)")
    return (f"The number of processes cannot change: each one's share of the data and the global batch depend on "
            f"it; {how}.")


def check_weights_finite(model: nn.Module, epoch: int, lr: float) -> None:
    """Raise TrainingError when a parameter or buffer that training can change became NaN/inf
    (never checkpoint diverged weights): parameters that require gradients and buffers of
    modules in training mode (BatchNorm statistics); a frozen trunk is not read every epoch."""
    changing = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    changing += [(f"{m_name}.{b_name}" if m_name else b_name, b) for m_name, m in model.named_modules() if m.training
                 for b_name, b in m.named_buffers(recurse=False)]
    bad = [n for n, t in changing if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise TrainingError(f"The weights became NaN/inf during epoch {epoch} (e.g. {bad[0]}). The learning "
                            f"rate (base {lr:.3g}) is probably too high: lower it.")


def epoch_end_callback(loop: Loop, *, path: str | Path | None, model: nn.Module, meta: dict[str, Any],
                       base_lr: float, callbacks: Sequence[Callable[[dict], Any]] = (),
                       tensorboard: Any = None) -> Callable[[TrainState], None]:
    """After each epoch: log to TensorBoard, write the resume checkpoint (rank 0, atomically)
    with ``loop``'s optimizer, schedule and scaler states, then run the user's
    ``callbacks(row)`` (one may raise to stop the run; it resumes from there)."""
    optimizer, scheduler, scaler, info = loop.optimizer, loop.scheduler, loop.scaler, loop.dist

    def on_epoch_end(state: TrainState) -> None:
        row = state.history[-1]
        check_weights_finite(model, state.epoch, base_lr)
        if info.is_main:
            if tensorboard is not None:
                tensorboard.log_epoch(row)
            if path is not None:
                save_checkpoint(path, model=model, meta=meta, epoch=state.epoch, history=state.history,
                                training=training_state(optimizer=optimizer, scheduler=scheduler, state=state,
                                                        scaler=scaler), complete=False)
        barrier(info)
        for cb in callbacks:
            cb(dict(row))
    return on_epoch_end
