"""The training loop, written out as plain functions."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit._progress import epoch_log, progress, to_stderr
from transferkit._text import number
from transferkit.config import check_task_settings
from transferkit.errors import ConfigError, DataError, TrainingError, check_choice
from transferkit.train.distributed import (DistInfo, DistributedError, all_reduce_sum, broadcast_buffers,
                                           gather_objects, whole_set)
from transferkit.train.speed import SpeedConfig
from transferkit.train.tasks import count_correct, monitor_default


def _progress(loader: Any, desc: str, verbose: bool, unit: str):
    """The epoch's bar (samples seen, ``unit``: img or clip) on a terminal, a no-op bar
    otherwise (transferkit._progress): as many samples as the loader's batches hold (a short
    last batch dropped, as training does, is not counted)."""
    inner = getattr(loader, "loader", loader)  # a DeviceDecodedLoader's DataLoader
    total = len(loader.sampler)
    if isinstance(inner, DataLoader) and inner.drop_last and inner.batch_size:
        total = len(inner) * inner.batch_size
    return progress(total, desc, verbose=verbose, unit=unit)


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The run's learning rate now, before per-block multipliers: ``lr / lr_scale`` of the
    group with the largest ``lr_scale`` (the head's, 1.0, in `param_groups`
    groups), i.e. ``lr`` times the schedule's factor. Groups without ``lr_scale`` (an optimizer
    built by hand): the largest group lr.

    Example:
        >>> p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([{"params": [p], "lr": 1e-5, "lr_scale": 0.01},
        ...                        {"params": [q], "lr": 1e-3, "lr_scale": 1.0}], lr=1e-3)
        >>> base_lr(opt)
        0.001
    """
    scaled = [g for g in optimizer.param_groups if g.get("lr_scale")]
    if scaled:
        top = max(scaled, key=lambda g: g["lr_scale"])
        return float(top["lr"]) / float(top["lr_scale"])
    return max(float(g["lr"]) for g in optimizer.param_groups)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``{group name: lr}`` of every parameter group (``group<i>`` for a group without a name)."""
    return {str(g.get("name", f"group{i}")): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


def _cpu_speed(device: torch.device) -> SpeedConfig:
    return SpeedConfig(device=device)


@dataclass
class TrainState:
    """Where training stands after ``epoch`` completed epochs (saved in checkpoints for resume)."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": None})
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    feature_report: dict[str, Any] | None = None  # the frozen phase's cached features (plain data), for a resume

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "history": self.history, "best": self.best, "best_state": self.best_state,
                "bad_epochs": self.bad_epochs, "stopped_early": self.stopped_early,
                "feature_report": self.feature_report}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{k: d[k] for k in ("epoch", "history", "best", "best_state", "bad_epochs", "stopped_early")},
                   feature_report=d.get("feature_report"))  # None in a checkpoint written before it was kept


def _improved(value: float, best: dict[str, Any], monitor: str, mode: str, row: dict[str, Any] | None = None) -> bool:
    """Whether ``value`` of ``monitor`` beats the ``best`` epoch's; a tie of an accuracy
    (it saturates on a small validation set) goes to the lower loss of ``row`` on the same
    data (``val_loss`` for ``val_acc``, ``train_loss`` for ``train_acc``)."""
    if best.get("epoch") is None or monitor not in best:
        return math.isfinite(value)
    if value == best[monitor] and not monitor.endswith("_loss") and row is not None:
        which = monitor.replace("_acc", "_loss")  # train_acc ties go to train_loss, val_acc ties to val_loss
        loss, best_loss = row.get(which), best.get(which)
        return loss is not None and best_loss is not None and loss < best_loss
    return value > best[monitor] if mode == "max" else value < best[monitor]


def _runner(module: nn.Module, wrap: Callable[[nn.Module], nn.Module] | None, cache: dict[str, Any]) -> nn.Module:
    """The module to run this epoch: ``wrap(module)`` (DDP, compile, a compile trial), rebuilt
    when the set of trainable parameters changed (gradual unfreezing)."""
    if wrap is None:
        return module
    sig = tuple(p.requires_grad for p in module.parameters())
    if cache.get("sig") != sig:
        cache["sig"], cache["runner"] = sig, wrap(module)
    return cache["runner"]


@dataclass
class Loop:
    """What the epochs of a training run use: the optimizer and its schedule, the loss, how
    tensors run (``speed``), the process group, and the policy's per-epoch hook (``set_mode``).
    ``monitor`` / ``restore_best`` / ``early_stopping`` choose and keep the best epoch;
    ``on_epoch_end(state)`` runs after each epoch (checkpoint, callbacks); ``wrap`` builds the
    module that runs (DDP, torch.compile) from the one that is saved."""

    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    set_mode: Callable[[int], None]
    scheduler: Any = None
    speed: SpeedConfig = field(default_factory=lambda: SpeedConfig(device=torch.device("cpu")))
    task: str = "multiclass"
    scaler: Any = None
    penalty: Callable[[], torch.Tensor] | None = None
    dist: DistInfo = field(default_factory=DistInfo)
    wrap: Callable[[nn.Module], nn.Module] | None = None
    monitor: str | None = None
    restore_best: bool = True
    early_stopping: int | None = None
    on_epoch_end: Callable[[TrainState], None] | None = None
    verbose: bool = True
    log: Callable[[str], None] = to_stderr  # with the plan: stdout is the caller's
    unit: str = "img"  # what a sample is, for the progress bar ("clip" for audio)
    steps: int = 0  # optimizer steps taken in this process: none, and the weights are the ones the run started from
    head_only_epochs: int = 0  # epochs that train the head alone before the backbone trains: early stopping waits
    # the validation items whose file failed to load, asked after each validation pass: left out of its loss and
    # accuracy (see `evaluate`)
    val_left_out: Callable[[], Sequence[int]] | None = None

    def __post_init__(self) -> None:
        _check_stopping(self.early_stopping, self.monitor, self.task)
        if self.scaler is None:
            self.scaler = self.speed.grad_scaler()


def train_one_epoch(module: nn.Module, loader: DataLoader, loop: Loop, *, desc: str = "train",
                    verbose: bool = True) -> dict[str, float]:
    """One pass over ``loader`` updating ``module`` with ``loop``'s optimizer, schedule, loss,
    gradient scaler and ``penalty()`` (e.g. L2-SP: added to the loss that is minimised, not to
    the loss reported); the caller sets train/eval modes first.

    Returns the summed loss, the correct-prediction count and the number of samples
    (``loss``/``acc`` are the per-sample means on this process), and the base lr and the
    lr per group of the epoch's last step (``lr``, ``lr_groups``).
    """
    speed, optimizer, scheduler, scaler = loop.speed, loop.optimizer, loop.scheduler, loop.scaler
    task, end_epoch = loop.task, getattr(module, "end_epoch", None)
    total_loss, correct, seen = 0.0, 0.0, 0
    last_lr, last_groups = base_lr(optimizer), group_lrs(optimizer)
    bar = _progress(loader, desc, verbose, loop.unit)
    for x, y in loader:
        x, y = speed.to_device(x), y.to(speed.device, non_blocking=True)
        logits, loss = _forward_backward(module, x, y, loop, desc, recover=getattr(module, "recover", None))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        loop.steps += 1
        last_lr, last_groups = base_lr(optimizer), group_lrs(optimizer)  # the rates this step used
        if scheduler is not None:
            scheduler.step()
        n = y.shape[0]
        total_loss += loss.item() * n
        correct += count_correct(task, logits.detach().float(), y)
        seen += n
        if bar is not None:
            bar.update(n)
    if end_epoch is not None:  # a compile trial times the last step up to here
        end_epoch()
    if bar is not None:
        bar.close()
    return {"loss_sum": total_loss, "correct": correct, "seen": seen,
            "loss": total_loss / max(seen, 1), "acc": correct / max(seen, 1), "lr": last_lr, "lr_groups": last_groups}


FAR_IN_BATCH = 1e6  # a batch target this many times its output's median size, where the loss is not finite: said


def _far_target(y: torch.Tensor) -> tuple[float, float] | None:
    """``(largest size, median size)`` of the output of a batch of float targets ``y`` (``[B]``
    or ``[B, D]``) whose largest target is more than `FAR_IN_BATCH` times its median size (an
    output whose median is 0, as counts mostly 0 are, is not judged); None where none is, or
    for class indices."""
    if not y.is_floating_point() or y.ndim == 0 or len(y) < 3:
        return None
    sizes = y.detach().abs().double().reshape(len(y), -1)
    top, typical = sizes.amax(0), sizes.median(0).values
    for j in range(sizes.shape[1]):
        if typical[j] > 0 and top[j] > FAR_IN_BATCH * typical[j]:
            return float(top[j]), float(typical[j])
    return None


def _forward_backward(module: nn.Module, x: Any, y: torch.Tensor, loop: Loop, desc: str, *,
                      recover: Callable[[BaseException], bool] | None = None) -> tuple[Any, Any]:
    """One step's forward and backward (the gradients of ``loop.optimizer``'s parameters set
    anew): the logits and the loss. ``recover``: a compile trial's (`transferkit.train.compile_trial`),
    told when the backward fails; where it takes the failure (a compiled backward), the step
    runs again, eager. Out of memory is not its to take."""
    optimizer, scaler, penalty = loop.optimizer, loop.scaler, loop.penalty
    with loop.speed.autocast():
        logits = module(x)
        loss = loop.loss_fn(logits.float(), y)
    objective = loss if penalty is None else loss + penalty()
    if not torch.isfinite(objective):
        if bool(torch.isfinite(loss)):  # the loss is finite: the policy's penalty (L2-SP) is not
            raise TrainingError(f"The policy's weight penalty (L2-SP) became {(objective - loss).item()} at {desc} "
                                f"(the loss is {loss.item():.4g}); lower its l2sp/l2sp_beta.")
        plain = type(loop.loss_fn) is nn.MSELoss  # targets in their own units (target_norm=False)
        peak = float(y.detach().abs().max()) if plain and y.is_floating_point() and y.numel() else 0.0
        if peak > 1e18:  # a squared error of targets this large is beyond float32 whatever the rate
            raise TrainingError(f"The training loss became {loss.item()} at {desc}: the targets reach {peak:.3g}, and "
                                "their squared error is beyond float32's range (3.4e38) whatever the learning rate. "
                                "Standardise them (target_norm='auto', the default, or True), or rescale them.")
        far = _far_target(y)
        if far is not None:  # one regression target far from the others of its output in the batch
            top, typical = far
            raise TrainingError(f"The training loss became {loss.item()} at {desc}: a target of this batch reaches "
                                f"{top:.3g}, where the median size of its output's targets is {typical:.3g}. A target "
                                "that far from the others makes the loss overflow whatever the learning rate: check it "
                                "(a typo?) and fix or remove the item (the data warnings name such targets among those "
                                "read before training).")
        raise TrainingError(f"The training loss became {loss.item()} at {desc}. The learning rate "
                            f"({base_lr(optimizer):.3g}) is probably too high: lower it, "
                            "or check the inputs for NaN/inf.")
    optimizer.zero_grad(set_to_none=True)
    try:
        (objective if scaler is None else scaler.scale(objective)).backward()
    except Exception as exc:
        if recover is None or isinstance(exc, torch.OutOfMemoryError) or not recover(exc):
            raise
        return _forward_backward(module, x, y, loop, desc)
    return logits, loss


@torch.no_grad()
def evaluate(module: nn.Module, loader: DataLoader, *, loss_fn: Callable, device: torch.device,
             task: str = "multiclass", speed: SpeedConfig | None = None,
             dist: DistInfo | None = None, left_out: Callable[[], Sequence[int]] | None = None) -> dict[str, Any]:
    """Loss, accuracy, logits, predictions and targets of ``module`` (in eval mode) over
    ``loader``, the loss and accuracy over the whole set at once. A loader sharded over the
    ranks (its sampler's ``world`` > 1; `EpochSampler.indices_of` says which items each rank
    takes) gives each rank its share, and the logits and targets are gathered (``dist``):
    every rank returns the whole set's, in the set's order.

    ``left_out()``, asked after the pass: the items whose file failed to load (this process's
    failures; under DDP the ranks' are joined), which the loader served as the next readable
    file of their class (`transferkit.data.late`). Their rows stay in ``logits`` and
    ``labels`` (aligned with the set) but not in the loss and accuracy; ``kept`` marks the
    rows that count."""
    speed = speed or _cpu_speed(device)
    was_training = module.training
    module.eval()
    outs, targets = [], []
    try:
        for x, y in loader:
            x, y = speed.to_device(x), y.to(speed.device, non_blocking=True)
            with speed.autocast():
                outs.append(module(x).float().cpu())
            targets.append(y.cpu())
    finally:
        module.train(was_training)
    logits, t = torch.cat(outs), torch.cat(targets)
    sampler = getattr(loader, "sampler", None)
    if getattr(sampler, "world", 1) > 1:
        if dist is None or not dist.enabled:
            raise DistributedError("A validation loader sharded over the ranks needs the process group (dist=).")
        owners = [sampler.indices_of(r) for r in range(sampler.world)]  # blocks with sample groups
        width = logits.shape[1]  # logits and targets in one gather, in float64 (exact for both)
        both = whole_set(torch.cat([logits.double(), t.reshape(len(t), -1).double()], 1), sampler.n, dist, owners)
        logits, t = both[:, :width].float(), both[:, width:].to(t.dtype).reshape(-1, *t.shape[1:])
    kept = _kept_rows(len(t), left_out, dist)
    n = max(int(kept.sum()), 1)
    loss = float(loss_fn(logits[kept].to(speed.device), t[kept].to(speed.device)).item())
    preds = logits.argmax(1) if task == "multiclass" else logits
    return {"loss": loss, "acc": count_correct(task, logits[kept], t[kept]) / n, "logits": logits, "preds": preds,
            "labels": t, "kept": kept}


def _kept_rows(n: int, left_out: Callable[[], Sequence[int]] | None, dist: DistInfo | None) -> torch.Tensor:
    """``[n]`` bool: the rows of a validation pass that count (see `evaluate`)."""
    kept = torch.ones(n, dtype=torch.bool)
    if left_out is None:
        return kept
    failed = set(left_out())
    if dist is not None and dist.enabled:
        failed = set().union(*gather_objects(sorted(failed), dist))  # each rank met the files of its share
    if failed:
        kept[sorted(failed)] = False
        if not bool(kept.any()):
            raise DataError(f"Every one of the {n} validation items failed to load; the validation metrics would "
                            "count none. Repair or replace the validation files (the data report names them).")
    return kept


def fit(module: nn.Module, train_loader: DataLoader, val_loader: DataLoader | None, loop: Loop, *, epochs: int,
        state: TrainState | None = None, total_epochs: int | None = None, prep_s: float = 0.0,
        prep_what: str = "data preparation", passes: int = 1) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train ``module`` from ``state.epoch`` to ``epochs`` as ``loop`` says; return the per-epoch
    history and the best epoch.

    Each epoch, top to bottom: the policy's ``set_mode(epoch)`` (trainable parameters,
    train/eval modes), one pass over the training data, the sums reduced over ranks, the
    validation pass, best-epoch tracking and early stopping, the log line, ``on_epoch_end``.
    The best epoch is the one with the best ``monitor`` (``"val_acc"``, or ``"val_loss"`` for
    regression); with ``restore_best`` its weights are loaded at the end. ``total_epochs``:
    when this call is one phase of a longer run (``fine_tune``), the best weights are restored
    only at the run's end. Each history row holds ``epoch``, ``train_loss`` (``train_acc``),
    ``val_loss`` (``val_acc``), ``lr``: the base learning rate of the epoch's last step
    (`base_lr`, not a block's scaled rate), ``lr_groups``: ``{group name: lr}`` at that step,
    and ``time_s``: the epoch's seconds; the first epoch of this call also counts ``prep_s``,
    the seconds its data took to prepare before the loop (the feature pass on cached features,
    decoding once), which its log line names (``prep_what``). With ``loop.verbose``, each epoch
    is reported as a line (``loop.log``) or, in a Jupyter kernel, as a row of a live HTML table
    (`transferkit._progress.EpochLog`, one per ``state``). ``passes > 1`` (a head on cached
    features): each epoch makes that many passes over ``train_loader`` (pass ``i`` of epoch
    ``e`` in the sampler's order of epoch ``e * passes + i``), validates after each, and keeps
    the best pass by ``monitor`` (its weights and its row, with ``passes`` and ``best_pass``).

    Example:
        >>> loop = Loop(optimizer=opt, loss_fn=nn.CrossEntropyLoss(), set_mode=lambda e: head.train())  # doctest: +SKIP
        >>> history, best = fit(head, train_dl, val_dl, loop, epochs=5)  # doctest: +SKIP
    """
    state = state if state is not None else TrainState()
    monitor, mode = (loop.monitor, "min" if "loss" in loop.monitor or "mse" in loop.monitor else "max") \
        if loop.monitor else monitor_default(loop.task)
    shown = total_epochs or epochs  # a run of several phases (fine_tune) counts its epochs as one
    main = loop.dist.is_main
    cache: dict[str, Any] = {}
    while state.epoch < epochs and not state.stopped_early:
        epoch, t0 = state.epoch, time.perf_counter()
        loop.set_mode(epoch)
        runner = _runner(module, loop.wrap, cache)
        if val_loader is not None and hasattr(val_loader.sampler, "set_epoch"):
            val_loader.sampler.set_epoch(epoch)
        row, kept = None, None
        for i in range(passes):
            if hasattr(train_loader.sampler, "set_epoch"):
                train_loader.sampler.set_epoch(epoch * passes + i)
            desc = f"epoch {epoch + 1}/{shown}" + (f" pass {i + 1}/{passes}" if passes > 1 else "")
            got = _train_and_validate(module, runner, train_loader, val_loader, loop, epoch, desc, verbose=main)
            if passes == 1:
                row = got
                continue
            _plateau_step(loop, got)  # each pass counts as an epoch of feature extraction's schedule
            if row is None or got.get(monitor) is None or _improved(got[monitor], {"epoch": 0, **row}, monitor,
                                                                    mode, got):  # no monitor: the last pass
                row, kept = {**got, "passes": passes, "best_pass": i + 1}, copy.deepcopy(module.state_dict())
        assert row is not None
        if kept is not None and row["best_pass"] < passes:
            module.load_state_dict(kept)
        _end_epoch(state, row, module, monitor, mode, loop, plateau=passes == 1)
        if state.stopped_early and state.epoch >= shown:  # the last planned epoch: nothing was cut short
            state.stopped_early = False
        row["time_s"] = time.perf_counter() - t0 + prep_s
        if loop.verbose and main:  # a line per epoch; in a notebook, a table that grows in place
            epoch_log(state, log=loop.log).add(row, f"epoch {epoch + 1:>3}/{shown}  " + "  ".join(
                f"{k} {number(v)}" for k, v in row.items() if k not in ("epoch", "time_s", "lr", "lr_groups", "passes",
                                                                     "best_pass"))
                + (f"  (the best of {row['passes']} head passes: pass {row['best_pass']})" if "passes" in row else "")
                + f"  ({row['time_s']:.1f}s" + (f" incl. {prep_what} {prep_s:.1f}s)" if prep_s > 0 else ")"),
                best=state.best.get("epoch"))
        prep_s = 0.0
        if loop.on_epoch_end is not None:
            loop.on_epoch_end(state)
    if loop.restore_best and state.best_state is not None and (state.stopped_early or state.epoch >= shown):
        module.load_state_dict(state.best_state)
    return state.history, _best_summary(state)


def _train_and_validate(module: nn.Module, runner: nn.Module, train_loader: DataLoader, val_loader: DataLoader | None,
                        loop: Loop, epoch: int, desc: str, *, verbose: bool) -> dict[str, Any]:
    """One pass over the training data (sums reduced over ranks), then the validation pass:
    an epoch's history row (without ``time_s``)."""
    tr = train_one_epoch(runner, train_loader, loop, desc=desc, verbose=loop.verbose and verbose)
    loss_sum, correct, seen = all_reduce_sum([tr["loss_sum"], tr["correct"], tr["seen"]], loop.dist)
    broadcast_buffers(module, loop.dist)
    row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                           "lr": tr["lr"], "lr_groups": tr["lr_groups"]}
    if loop.task != "regression":
        row["train_acc"] = correct / max(seen, 1)
    if val_loader is not None:
        ev = evaluate(module, val_loader, loss_fn=loop.loss_fn, device=loop.speed.device, task=loop.task,
                      speed=loop.speed, dist=loop.dist, left_out=loop.val_left_out)
        row["val_loss"] = ev["loss"]
        if loop.task != "regression":
            row["val_acc"] = ev["acc"]
    return row


MONITORS = ("val_loss", "val_acc", "train_loss", "train_acc")


def _check_stopping(early_stopping: int | None, monitor: str | None, task: str) -> None:
    if early_stopping is not None and (isinstance(early_stopping, bool) or not isinstance(early_stopping, int)
                                       or early_stopping < 1):
        raise ConfigError(f"early_stopping must be None or a number of epochs >= 1, got {early_stopping!r}.")
    if monitor is not None:
        check_choice("monitor", monitor, MONITORS)
        check_task_settings(task, monitor=monitor)


def _plateau_step(loop: Loop, row: dict[str, Any]) -> None:
    """The plateau schedule's bookkeeping after an epoch (or a pass of a frozen epoch), on its
    validation loss, else its training loss."""
    if hasattr(loop.scheduler, "epoch_end"):
        loop.scheduler.epoch_end(row.get("val_loss", row["train_loss"]))


def _end_epoch(state: TrainState, row: dict[str, Any], module: nn.Module, monitor: str, mode: str,
               loop: Loop, *, plateau: bool = True) -> None:
    """Best-epoch tracking, early stopping and (``plateau``: not already told after each pass)
    the plateau schedule, after one epoch. A validation loss that is not finite (the model's
    outputs are NaN or inf: it diverged; or a validation item far outside the training data
    overflowed it) stops the run: no later epoch can be trusted, and no epoch of it would be kept."""
    val_loss = row.get("val_loss")
    if val_loss is not None and not math.isfinite(val_loss):
        train_loss = row.get("train_loss", float("nan"))
        far = " The training loss is finite, though: a validation item far outside the training data (e.g. a " \
            "regression target far from the training targets; see the data warnings) makes it inf too; fix or " \
            "remove that item." if math.isfinite(train_loss) else ""
        raise TrainingError(f"The validation loss became {val_loss} at epoch {row['epoch']}: the model diverged "
                            f"(training loss {train_loss:.3g}). The learning rate "
                            f"({row.get('lr', float('nan')):.3g}) is probably too high: lower it.{far}")
    state.history.append(row)
    state.epoch += 1
    value = row.get(monitor)
    if plateau:
        _plateau_step(loop, row)
    if value is None:
        return
    if _improved(value, state.best, monitor, mode, row):
        kept = (monitor, monitor.replace("_acc", "_loss"))  # a train_* monitor and its tie-break are kept too
        state.best = {"epoch": row["epoch"], **{k: v for k, v in row.items() if k.startswith("val_") or k in kept}}
        state.bad_epochs = 0
        if loop.restore_best:
            state.best_state = copy.deepcopy(module.state_dict())
    elif state.epoch > loop.head_only_epochs:  # a head-only phase's epochs stop nothing: the backbone is to train
        state.bad_epochs += 1
        if loop.early_stopping is not None and state.bad_epochs >= loop.early_stopping:
            state.stopped_early = True


def _best_summary(state: TrainState) -> dict[str, Any]:
    if state.best.get("epoch") is not None:
        return dict(state.best)
    last = state.history[-1] if state.history else {}
    return {"epoch": len(state.history), **{k: v for k, v in last.items() if k.startswith("train_")}}
