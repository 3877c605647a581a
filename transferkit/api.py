"""``finetune()``: orchestration only. Each step is a public function a recipe can call."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.backbones import Backbone, InputSpec, get_backbone
from transferkit.data import DataBundle, ImageFolderDataset, eval_transform, prepare_data, train_transform
from transferkit.errors import ConfigError
from transferkit.export.torchscript import ExportReport, export_torchscript
from transferkit.heads import build_head
from transferkit.model import ImagePreprocess, TransferModel
from transferkit.policies import Policy, apply_policy, param_groups, set_train_mode
from transferkit.train.checkpoint import save_checkpoint
from transferkit.train.device import resolve_device
from transferkit.train.features import extract_features, feature_loader
from transferkit.train.loop import evaluate, fit
from transferkit.train.optim import make_optimizer, make_scheduler


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns."""

    model: TransferModel
    backbone: Backbone
    classes: list[str]
    policy: Policy
    history: list[dict[str, Any]]
    best: dict[str, Any]
    metrics: dict[str, Any]
    export_path: Path | None = None
    export_report: ExportReport | None = None
    checkpoint_path: Path | None = None
    used_feature_cache: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_input_spec(spec: InputSpec, image_size: int | None) -> InputSpec:
    """The backbone's spec at another crop size, keeping its resize-to-crop ratio."""
    if image_size is None:
        return spec
    if not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"image_size must be an integer >= 8, got {image_size!r}.")
    resize = round(image_size * spec.resize_size / spec.image_size) if spec.resize_size else None
    return InputSpec(**{**spec.to_dict(), "image_size": image_size, "resize_size": resize,
                        "mean": spec.mean, "std": spec.std})


def build_model(backbone: Backbone, num_outputs: int, *, spec: InputSpec | None = None, head_hidden: Sequence[int] = (),
                head_activation: str = "relu", head_dropout: float = 0.0) -> TransferModel:
    """Preprocessing from the input spec + the backbone's trunk + a new head."""
    spec = spec or backbone.input_spec
    head = build_head(backbone.num_features, num_outputs, hidden=head_hidden, activation=head_activation,
                      dropout=head_dropout)
    return TransferModel(ImagePreprocess(spec.mean, spec.std), backbone.trunk, head)


def make_loader(dataset, *, batch_size: int, shuffle: bool, device: torch.device, num_workers: int | None,
                seed: int = 0, drop_last: bool = False) -> DataLoader:
    """A DataLoader sized to the machine: decoding workers for files, pinned memory on CUDA."""
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if isinstance(dataset, ImageFolderDataset) else 0
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                      drop_last=drop_last and len(dataset) > batch_size, generator=g)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return value


def finetune(backbone: str | Backbone = "tv:resnet18", *, weights: str | Path | None = "DEFAULT", data: Any,
             val_data: Any = None, classes: Sequence[str] | None = None, val_split: float = 0.2,
             policy: str | Policy = "feature_extraction", epochs: int = 10, batch_size: int = 32,
             lr: float = 1e-3, weight_decay: float = 1e-4, optimizer: str = "adamw", schedule: str = "cosine",
             warmup_epochs: int = 0, head_hidden: Sequence[int] = (), head_activation: str = "relu",
             head_dropout: float = 0.0, image_size: int | None = None, augment: str | None = None,
             cache_features: bool | str = "auto", device: str = "auto", num_workers: int | None = None,
             seed: int = 0, restore_best: bool = True, export: str | Path | None = None,
             checkpoint: str | Path | None = None, verbose: bool = True) -> FinetuneResult:
    """Fine-tune ``backbone`` on ``data`` with ``policy`` and return a :class:`FinetuneResult`.

    ``data``: a folder ``root/<class>/<image>`` (a folder with ``train/`` and ``val/``
    works too) or a Dataset of ``(image, label)``. Without ``val_data`` a stratified
    ``val_split`` is held out. When the policy keeps the whole backbone frozen, features
    are computed once and only the head trains on them (``cache_features="auto"``).
    ``augment`` defaults to ``"standard"`` (random-resized crop + flip) when images pass
    through the model every epoch and to ``"none"`` for cached features.

    Example:
        >>> result = finetune("tv:resnet18", weights=None, data="hymenoptera", policy="feature_extraction",
        ...                   image_size=64, epochs=2, export="model.pt")  # doctest: +SKIP
        >>> result.best["val_acc"]  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    epochs = _check_positive_int("epochs", epochs)
    batch_size = _check_positive_int("batch_size", batch_size)
    if cache_features not in (True, False, "auto"):
        raise ConfigError(f"cache_features must be True, False or 'auto', got {cache_features!r}.")
    seed_everything(seed)
    dev = resolve_device(device)
    pol = Policy.parse(policy)
    bb = backbone if isinstance(backbone, Backbone) else get_backbone(backbone, weights=weights)
    spec = resolve_input_spec(bb.input_spec, image_size)
    bundle = prepare_data(data, val_data, val_split=val_split, seed=seed, classes=classes,
                          min_size=spec.resize_size or spec.image_size)
    model = build_model(bb, len(bundle.classes), spec=spec, head_hidden=head_hidden, head_activation=head_activation,
                        head_dropout=head_dropout).to(dev)
    apply_policy(model, bb, pol, epoch=0)
    frozen = pol.frozen_throughout(bb.block_names, epochs)
    if cache_features is True and not frozen:
        raise ConfigError(f"cache_features=True needs a policy that keeps the backbone frozen; {pol} trains it. "
                          "Use cache_features='auto'.")
    use_cache = frozen and cache_features in (True, "auto")
    augment = augment or ("none" if use_cache else "standard")
    timings: dict[str, float] = {"setup_s": time.perf_counter() - t_start}
    eval_tf = eval_transform(spec)

    def loader(ds, tf, shuffle):
        return make_loader(ds.view(transform=tf), batch_size=batch_size, shuffle=shuffle, device=dev,
                           num_workers=num_workers, seed=seed, drop_last=shuffle)

    t0 = time.perf_counter()
    if use_cache:
        train_feats = extract_features(model, loader(bundle.train, train_transform(spec, augment), False), dev)
        train_loader = feature_loader(*train_feats, batch_size=batch_size, shuffle=True, seed=seed)
        val_loader = None
        if bundle.val is not None:
            val_loader = feature_loader(*extract_features(model, loader(bundle.val, eval_tf, False), dev),
                                        batch_size=256, shuffle=False)
        module: nn.Module = model.head
        set_mode = lambda epoch: model.head.train()  # noqa: E731
        timings["features_s"] = time.perf_counter() - t0
    else:
        train_loader = loader(bundle.train, train_transform(spec, augment), True)
        val_loader = loader(bundle.val, eval_tf, False) if bundle.val is not None else None
        module = model

        def set_mode(epoch: int) -> None:
            apply_policy(model, bb, pol, epoch=epoch)
            set_train_mode(model, bb, pol, epoch=epoch)

    opt = make_optimizer(optimizer, param_groups(module, lr=lr, weight_decay=weight_decay), lr=lr)
    sched = make_scheduler(schedule, opt, total_steps=epochs * len(train_loader),
                           warmup_steps=warmup_epochs * len(train_loader))
    loss_fn = nn.CrossEntropyLoss()
    t1 = time.perf_counter()
    history, best = fit(module, train_loader, val_loader, epochs=epochs, optimizer=opt, scheduler=sched,
                        loss_fn=loss_fn, device=dev, set_mode=set_mode, restore_best=restore_best, verbose=verbose)
    timings["train_s"] = time.perf_counter() - t1
    model.eval()
    metrics: dict[str, Any] = {}
    if val_loader is not None:
        ev = evaluate(module, val_loader, loss_fn=loss_fn, device=dev)
        metrics = {"val_loss": ev["loss"], "val_acc": ev["acc"]}
    meta = {"labels": bundle.classes, "input_spec": spec.to_dict(), "task": "multiclass",
            "transferkit_version": _version(),
            "training": {"backbone": bb.name, "weights": bb.weights, "policy": repr(pol), "epochs": epochs,
                         "best": _jsonable(best), "feature_cache": use_cache}}
    result = FinetuneResult(model=model, backbone=bb, classes=bundle.classes, policy=pol, history=history, best=best,
                            metrics=metrics, used_feature_cache=use_cache, timings=timings)
    if checkpoint is not None:
        result.checkpoint_path = save_checkpoint(checkpoint, model=model, meta=meta, epoch=epochs, history=history)
    if export is not None:
        t2 = time.perf_counter()
        example = _example_inputs(bundle, eval_tf)
        result.export_report = export_torchscript(model, export, metadata=meta, example_inputs=example)
        result.export_path = result.export_report.path
        timings["export_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t_start
    return result


def _example_inputs(bundle: DataBundle, tf, n: int = 8) -> torch.Tensor:
    ds = (bundle.val if bundle.val is not None else bundle.train).view(transform=tf)
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in d.items()}


def _version() -> str:
    from transferkit import __version__

    return __version__
