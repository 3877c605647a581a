"""The steps :func:`transferkit.finetune` strings together, as plain functions.

``prepare_task_data`` -> ``training_data`` (cached features or image loaders) ->
``resume_from`` / ``epoch_end_callback`` (checkpoints) -> ``final_metrics`` -> ``write_reports``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.data import DataBundle, eval_transform, prepare_data, train_transform
from transferkit.errors import ConfigError, DataError, TrainingError
from transferkit.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from transferkit.train.distributed import DistInfo, barrier
from transferkit.train.features import FeatureStore, cache_key, compute_features, feature_loader
from transferkit.train.loaders import make_loader
from transferkit.train.loop import TrainState, evaluate
from transferkit.train.metrics import task_metrics
from transferkit.train.speed import SpeedConfig
from transferkit.train.tasks import TargetDataset, balanced_class_weights, target_width

# finetune() arguments that must match between a checkpoint and the run resuming it
RESUME_KEYS = ("backbone", "task", "policy", "batch_size", "lr", "optimizer", "schedule", "seed", "head",
               "head_hidden", "head_norm", "image_size", "cache_views")


def prepare_task_data(data: Any, val_data: Any, *, task: str, val_split: float, seed: int,
                      classes: Sequence[str] | None, min_size: int | None,
                      on_bad_file: str = "skip") -> tuple[DataBundle, int]:
    """The training/validation data and the number of outputs. Multiclass data are folders or
    datasets of ``(image, int)``; multilabel and regression data are datasets of
    ``(image, target vector)`` (multi-hot, or values), split at random when no ``val_data``."""
    if task == "multiclass":
        bundle = prepare_data(data, val_data, val_split=val_split, seed=seed, classes=classes, min_size=min_size,
                              on_bad_file=on_bad_file)
        return bundle, len(bundle.classes)
    if isinstance(data, (str, Path)) or not hasattr(data, "__getitem__"):
        raise DataError(f"task={task!r} needs a Dataset of (image, target vector) pairs, got {type(data).__name__}; "
                        "folders of class sub-folders are single-label (task='multiclass').")
    train = TargetDataset(data)
    if len(train) == 0:
        raise DataError("The training dataset is empty.")
    width = target_width(train)
    names = list(classes) if classes else [str(i) for i in range(width)]
    if len(names) != width:
        raise DataError(f"classes has {len(names)} names but the targets have {width} values.")
    val = TargetDataset(val_data) if val_data is not None else None
    if val is None and val_split:
        if not 0.0 < val_split < 1.0:
            raise DataError(f"val_split must be between 0 and 1 (exclusive), got {val_split!r}.")
        order = np.random.default_rng(seed).permutation(len(train)).tolist()
        n_val = max(1, int(round(len(train) * val_split)))
        train, val = train.view(sorted(order[n_val:])), train.view(sorted(order[:n_val]))
    return DataBundle(train=train, val=val, classes=names), width


def resolve_class_weights(class_weights: Any, task: str, bundle: DataBundle) -> list[float] | None:
    """``None``, a list, or ``"balanced"`` (multiclass: inverse class frequency; multilabel:
    negatives / positives per label, as ``pos_weight``)."""
    if class_weights is None or not isinstance(class_weights, str):
        return class_weights
    if class_weights != "balanced":
        raise ConfigError(f"class_weights must be None, a list of numbers or 'balanced', got {class_weights!r}.")
    if task == "multiclass":
        from transferkit.data import dataset_targets

        return balanced_class_weights(dataset_targets(bundle.train), len(bundle.classes))
    if task == "multilabel":
        y = _targets(bundle.train)  # type: ignore[arg-type]
        pos = y.sum(0).clamp(min=1)
        return ((len(y) - y.sum(0)) / pos).tolist()
    raise ConfigError("class_weights do not apply to task='regression'.")


def _targets(ds: TargetDataset) -> torch.Tensor:
    return torch.stack([torch.as_tensor(np.asarray(ds.base[i][1]), dtype=torch.float32).reshape(-1)
                        for i in ds.indices])


@dataclass
class TrainingData:
    """What the loop trains on: ``module`` (the head alone with cached features), loaders."""

    module: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader | None
    cached: bool
    stores: dict[str, FeatureStore] = field(default_factory=dict)


def cached_training_data(model: nn.Module, backbone_name: str, bundle: DataBundle, spec: Any, *, augment: str,
                         views: int, batch_size: int, seed: int, speed: SpeedConfig, num_workers: int | None,
                         cache_dir: str | Path | None, info: DistInfo, progress: Any = None) -> TrainingData:
    """Features computed once (``views`` augmented passes for training, one eval pass for
    validation), or read back from ``cache_dir``; loaders over them train the head only."""
    if views < 1 or isinstance(views, bool):
        raise ConfigError(f"cache_views must be a positive integer, got {views!r}.")
    if views > 1 and augment == "none":
        raise ConfigError("cache_views > 1 needs random augmentation; set augment='standard' or 'flip'.")

    def forward(x: torch.Tensor) -> torch.Tensor:
        with speed.autocast():
            return model.features(speed.to_device(x))

    # inference batches: larger on an accelerator; on a CPU large batches overflow the caches
    # (ResNet-18 at 224 px, one thread: 57 ms/image at batch 4-8, 63 at 32, 70 at 64)
    extract_batch = batch_size if speed.device.type == "cpu" else max(batch_size, 64)
    stores = {}
    parts = [("train", bundle.train, train_transform(spec, augment), views)]
    if bundle.val is not None:
        parts.append(("val", bundle.val, eval_transform(spec), 1))
    for name, ds, tf, v in parts:
        key = "in-memory" if cache_dir is None else \
            cache_key(backbone=backbone_name, model=model, transform=tf, dataset=ds, views=v, seed=seed)
        if info.enabled and cache_dir is not None and not info.is_main:
            barrier(info)  # rank 0 writes the shared cache entry first
        stores[name] = compute_features(model, ds.view(transform=tf), key=key, views=v, batch_size=extract_batch,
                                        device=speed.device, num_workers=num_workers, seed=seed, cache_dir=cache_dir,
                                        forward=forward, progress=progress)
        if info.enabled and cache_dir is not None and info.is_main:
            barrier(info)
    train = feature_loader(stores["train"], batch_size=batch_size, shuffle=True, seed=seed, rank=info.rank,
                           world_size=info.world_size)
    val = feature_loader(stores["val"], batch_size=256, shuffle=False) if "val" in stores else None
    return TrainingData(module=model.head, train_loader=train, val_loader=val, cached=True, stores=stores)


def image_training_data(model: nn.Module, bundle: DataBundle, spec: Any, *, augment: str, batch_size: int,
                        seed: int, speed: SpeedConfig, num_workers: int | None, info: DistInfo) -> TrainingData:
    """Loaders over decoded, transformed images (the model runs end to end every epoch);
    under DDP each rank gets its shard of the training data, validation runs whole on each."""
    train = make_loader(bundle.train.view(transform=train_transform(spec, augment)), batch_size=batch_size,
                        shuffle=True, device=speed.device, num_workers=num_workers, seed=seed, drop_last=True,
                        rank=info.rank, world_size=info.world_size)
    val = None
    if bundle.val is not None:
        val = make_loader(bundle.val.view(transform=eval_transform(spec)), batch_size=batch_size, shuffle=False,
                          device=speed.device, num_workers=num_workers, seed=seed)
    return TrainingData(module=model, train_loader=train, val_loader=val, cached=False)


def training_state(*, optimizer: Any, scheduler: Any, state: TrainState, scaler: Any = None) -> dict[str, Any]:
    """Everything besides the model that an exact resume needs."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
            "scaler": scaler.state_dict() if scaler is not None else None, "state": state.to_dict(),
            "rng": rng_state()}


def resume_from(path: str | Path, *, model: nn.Module, optimizer: Any, scheduler: Any,
                config: dict[str, Any]) -> TrainState:
    """Load model, optimizer, schedule, RNG states and the loop state from a checkpoint
    written by this run's configuration; raise ConfigError when the configuration differs."""
    ckpt = load_checkpoint(path)
    tr = ckpt.get("training")
    if not isinstance(tr, dict) or "state" not in tr:
        raise ConfigError(f"{str(path)!r} holds final weights but no training state to resume from "
                          "(written by an older version, or by save_checkpoint without training=).")
    saved = ckpt["transferkit"].get("config", {})
    diff = {k: (saved.get(k), config.get(k)) for k in RESUME_KEYS if k in saved and saved.get(k) != config.get(k)}
    if diff:
        raise ConfigError(f"Cannot resume from {str(path)!r}: the run's settings differ from the checkpoint's "
                          f"(checkpoint, now): {diff}. Use the same settings, or start a new run without resume=True.")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(tr["optimizer"])
    if scheduler is not None and tr.get("scheduler") is not None:
        scheduler.load_state_dict(tr["scheduler"])
    set_rng_state(tr["rng"])
    return TrainState.from_dict(tr["state"])


def epoch_end_callback(*, path: str | Path | None, model: nn.Module, optimizer: Any, scheduler: Any,
                       meta: dict[str, Any], info: DistInfo, callbacks: Sequence[Callable[[dict], Any]] = (),
                       tensorboard: Any = None) -> Callable[[TrainState], None]:
    """After each epoch: log to TensorBoard, write the resume checkpoint (rank 0, atomically),
    then run the user's ``callbacks(row)`` (one may raise to stop the run; it resumes from there)."""
    def on_epoch_end(state: TrainState) -> None:
        row = state.history[-1]
        bad = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
               if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:  # never write a checkpoint of diverged weights over the last good one
            raise TrainingError(f"The weights became NaN/inf during epoch {state.epoch} (e.g. {bad[0]}). The learning "
                                f"rate ({optimizer.param_groups[0]['lr']:.3g}) is probably too high: lower it.")
        if info.is_main:
            if tensorboard is not None:
                tensorboard.log_epoch(row)
            if path is not None:
                save_checkpoint(path, model=model, meta=meta, epoch=state.epoch, history=state.history,
                                training=training_state(optimizer=optimizer, scheduler=scheduler, state=state),
                                complete=False)
        barrier(info)
        for cb in callbacks:
            cb(dict(row))
    return on_epoch_end


def final_metrics(module: nn.Module, val_loader: DataLoader | None, *, task: str, classes: Sequence[str],
                  loss_fn: Any, speed: SpeedConfig, top_k: int = 5) -> dict[str, Any]:
    """Validation loss and the task's metrics (accuracy, top-k, macro F1, per-class report,
    confusion matrix; or F1 for multilabel; MSE/MAE/R^2 for regression)."""
    if val_loader is None:
        return {}
    ev = evaluate(module, val_loader, loss_fn=loss_fn, device=speed.device, task=task, speed=speed)
    out: dict[str, Any] = {"val_loss": ev["loss"]}
    if task != "regression":
        out["val_acc"] = ev["acc"]
    out.update(task_metrics(task, ev["logits"], ev["labels"], classes, top_k=top_k))
    return out


def write_reports(plots_dir: str | Path | None, history: list[dict[str, Any]], metrics: dict[str, Any],
                  classes: Sequence[str]) -> dict[str, Path]:
    """PNG training curves and confusion matrix into ``plots_dir`` (needs matplotlib)."""
    if plots_dir is None:
        return {}
    from transferkit.train.reporting import plot_confusion_matrix, plot_history

    out = {}
    if history:
        out["curves"] = plot_history(history, Path(plots_dir) / "training_curves.png")
    if "confusion_matrix" in metrics:
        out["confusion_matrix"] = plot_confusion_matrix(metrics["confusion_matrix"], classes,
                                                        Path(plots_dir) / "confusion_matrix.png")
    return out


def jsonable(value: Any) -> Any:
    """Plain JSON data from configs and metrics (paths to str, tuples to lists, numpy to Python)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return f"<{type(value).__name__}>"


def run_probe(data: TrainingData, head: nn.Module, *, task: str, Cs: Sequence[float] | None, seed: int,
              balanced: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any], Any]:
    """``head="logistic"``: fit the scikit-learn probe on the cached features (every view of
    every training image), choose ``C`` on the validation features, copy it into ``head``."""
    from transferkit.train.probe import DEFAULT_CS, fit_logistic_probe, set_linear_head

    if task != "multiclass" or not data.cached:
        raise ConfigError("head='logistic' needs task='multiclass' and a frozen backbone (cached features); "
                          "use policy='feature_extraction'.")
    tr = data.stores["train"]
    x = np.asarray(tr.features).reshape(-1, tr.features.shape[-1])
    y = np.tile(np.asarray(tr.targets), tr.num_views)
    va = data.stores.get("val")
    vx = np.asarray(va.features[0]) if va is not None else None
    vy = np.asarray(va.targets) if va is not None else None
    res, w, b = fit_logistic_probe(x, y, vx, vy, Cs=Cs or DEFAULT_CS, seed=seed,
                                   class_weight="balanced" if balanced else None)
    set_linear_head(head, w, b)
    best = {"epoch": None, "C": res.C, "val_acc": res.val_acc}
    return [], best, res
