"""The training loop, written out as plain functions."""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.errors import TrainingError


def _progress(total: int, desc: str, verbose: bool):
    if not verbose or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="img")


def train_one_epoch(module: nn.Module, loader: DataLoader, *, optimizer: torch.optim.Optimizer,
                    scheduler: Any, loss_fn: Callable, device: torch.device,
                    desc: str = "train", verbose: bool = True) -> dict[str, float]:
    """One pass over ``loader`` updating ``module``; the caller sets train/eval modes first."""
    total_loss, correct, seen = 0.0, 0, 0
    bar = _progress(len(loader.dataset), desc, verbose)  # type: ignore[arg-type]
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = module(x)
        loss = loss_fn(logits, y)
        if not torch.isfinite(loss):
            raise TrainingError(f"The training loss became {loss.item()} at {desc}. The learning rate "
                                f"({optimizer.param_groups[0]['lr']:.3g}) is probably too high: lower it, "
                                "or check the inputs for NaN/inf.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = y.shape[0]
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == y).sum().item()
        seen += n
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    return {"loss": total_loss / max(seen, 1), "acc": correct / max(seen, 1)}


@torch.no_grad()
def evaluate(module: nn.Module, loader: DataLoader, *, loss_fn: Callable, device: torch.device) -> dict[str, Any]:
    """Loss, accuracy, predictions and labels of ``module`` (in eval mode) over ``loader``."""
    was_training = module.training
    module.eval()
    total_loss, preds, labels = 0.0, [], []
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = module(x)
            total_loss += loss_fn(logits, y).item() * y.shape[0]
            preds.append(logits.argmax(1).cpu())
            labels.append(y.cpu())
    finally:
        module.train(was_training)
    p, t = torch.cat(preds), torch.cat(labels)
    return {"loss": total_loss / max(len(t), 1), "acc": (p == t).float().mean().item(), "preds": p, "labels": t}


def fit(module: nn.Module, train_loader: DataLoader, val_loader: DataLoader | None, *, epochs: int,
        optimizer: torch.optim.Optimizer, scheduler: Any, loss_fn: Callable, device: torch.device,
        set_mode: Callable[[int], None], restore_best: bool = True, verbose: bool = True,
        log: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train ``module`` for ``epochs``; return the per-epoch history and the best epoch's metrics.

    ``set_mode(epoch)`` puts the module in the right train/eval modes for that epoch
    (the policy decides what stays frozen). With validation data and ``restore_best``,
    the weights of the epoch with the best validation accuracy are restored at the end.
    """
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": None, "val_acc": -math.inf}
    best_state = None
    for epoch in range(epochs):
        t0 = time.perf_counter()
        set_mode(epoch)
        tr = train_one_epoch(module, train_loader, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
                             device=device, desc=f"epoch {epoch + 1}/{epochs}", verbose=verbose)
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": tr["loss"], "train_acc": tr["acc"],
                               "lr": optimizer.param_groups[0]["lr"]}
        if val_loader is not None:
            ev = evaluate(module, val_loader, loss_fn=loss_fn, device=device)
            row.update(val_loss=ev["loss"], val_acc=ev["acc"])
            if ev["acc"] > best["val_acc"]:
                best = {"epoch": epoch + 1, "val_acc": ev["acc"], "val_loss": ev["loss"]}
                if restore_best:
                    best_state = copy.deepcopy(module.state_dict())
        row["time_s"] = time.perf_counter() - t0
        history.append(row)
        if verbose:
            val = f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}" if "val_acc" in row else ""
            log(f"epoch {epoch + 1:>3}/{epochs}  train_loss {tr['loss']:.4f}  train_acc {tr['acc']:.4f}{val}  "
                f"({row['time_s']:.1f}s)")
    if best_state is not None:
        module.load_state_dict(best_state)
    if best["epoch"] is None:
        last = history[-1] if history else {}
        best = {"epoch": len(history), "train_acc": last.get("train_acc"), "train_loss": last.get("train_loss")}
    return history, best
