"""``finetune()``: orchestration only. Each step is a public function a recipe can call."""

from __future__ import annotations

import inspect
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit.backbones import Backbone, InputSpec, get_backbone
from transferkit.data import DataBundle, DataReport, eval_transform, prepare_data  # noqa: F401  (prepare_data: recipes)
from transferkit.data.audio import pad_waveforms, prepare_audio_data
from transferkit.errors import ConfigError
from transferkit.export.torchscript import ExportReport, export_torchscript
from transferkit.heads import build_head, resolve_head, resolve_head_norm
from transferkit.model import AudioPreprocess, ImagePreprocess, TransferModel
from transferkit.policies import Policy, apply_policy, merge_lora, param_groups, policy_penalty, set_train_mode
from transferkit.train.checkpoint import load_checkpoint, save_checkpoint
from transferkit.train.device import resolve_device
from transferkit.train.distributed import DistInfo, barrier, init_distributed, wrap_ddp
from transferkit.train.faults import training_faults
from transferkit.train.loaders import make_loader  # noqa: F401  (public helper, re-exported)
from transferkit.train.loop import TrainState, fit
from transferkit.train.lr_find import LRFindResult, lr_range_test
from transferkit.train.optim import default_lr, make_optimizer, make_scheduler
from transferkit.train.reporting import TensorBoardLogger
from transferkit.train.session import (
    TrainingData,
    cached_training_data,
    epoch_end_callback,
    final_metrics,
    image_training_data,
    jsonable,
    prepare_task_data,
    resolve_class_weights,
    resume_from,
    run_probe,
    training_state,
    write_reports,
)
from transferkit.train.speed import SpeedConfig, set_deterministic
from transferkit.train.tasks import check_task, make_loss


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
    task: str = "multiclass"
    stopped_early: bool = False
    plots: dict[str, Path] = field(default_factory=dict)
    data_report: DataReport = field(default_factory=DataReport)  # bad files left out, warnings


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


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
                head_activation: str = "relu", head_dropout: float = 0.0, head_norm: bool = False) -> TransferModel:
    """Preprocessing from the input spec + the backbone's trunk + a new head (``head_norm``:
    starting with a :class:`~transferkit.heads.FeatureNorm`)."""
    spec = spec or backbone.input_spec
    head = build_head(backbone.num_features, num_outputs, hidden=head_hidden, activation=head_activation,
                      dropout=head_dropout, norm=head_norm)
    pre = AudioPreprocess() if spec.kind == "audio" else ImagePreprocess(spec.mean, spec.std)
    return TransferModel(pre, backbone.trunk, head)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return value


def finetune(backbone: str | Backbone = "tv:resnet18", *, weights: str | Path | None = "DEFAULT", data: Any,
             backbone_options: dict[str, Any] | None = None,
             val_data: Any = None, classes: Sequence[str] | None = None, val_split: float = 0.2,
             on_bad_file: str = "skip", task: str = "multiclass", policy: str | Policy = "feature_extraction", epochs: int = 10,
             batch_size: int = 32, lr: float | None = None, weight_decay: float = 1e-4, optimizer: str = "adamw",
             momentum: float = 0.9, schedule: str = "cosine", warmup_epochs: float = 0,
             schedule_options: dict[str, float] | None = None, head: str | None = None,
             head_hidden: Sequence[int] = (), head_activation: str = "relu", head_dropout: float = 0.0,
             head_norm: bool | str = "auto", label_smoothing: float = 0.0, class_weights: Sequence[float] | str | None = None,
             probe_Cs: Sequence[float] | None = None, image_size: int | None = None, augment: str | None = None,
             cache_features: bool | str = "auto", cache_dir: str | Path | None = None, cache_views: int = 1,
             device: str = "auto", precision: str = "fp32", channels_last: bool | str = "auto",
             compile: bool = False, num_workers: int | None = None, seed: int = 0, deterministic: bool = False,
             early_stopping: int | None = None, monitor: str | None = None, restore_best: bool = True,
             export: str | Path | None = None, checkpoint: str | Path | None = None, resume: bool = False,
             log_dir: str | Path | None = None, plots_dir: str | Path | None = None, top_k: int = 5,
             callbacks: Sequence[Callable[[dict], Any]] = (), verbose: bool = True) -> FinetuneResult:
    """Fine-tune ``backbone`` on ``data`` with ``policy`` and return a :class:`FinetuneResult`.

    ``backbone_options``: extra keyword arguments of :func:`get_backbone` (e.g.
    ``{"sample_rate": 8000, "n_mels": 32}`` for a ``spec:`` audio backbone).
    ``data``: a folder ``root/<class>/<image>`` (a folder with ``train/`` and ``val/``
    works too) or a Dataset of ``(image, label)``; for ``task="multilabel"`` /
    ``"regression"`` a Dataset of ``(image, target vector)``. Without ``val_data`` a
    ``val_split`` is held out. When the policy keeps the whole backbone frozen, features
    are computed once (``cache_views`` augmented passes) and only the head trains on them
    (``cache_features="auto"``); ``cache_dir`` keeps them on disk, memory-mapped, for later
    runs; the head then trains on standardised features (``head_norm="auto"``: its first
    layer is a fixed :class:`~transferkit.heads.FeatureNorm` holding the training features'
    mean and std, exported with it). ``lr=None`` is 1e-2 when only the head trains and 1e-3
    when backbone weights train too. ``head="logistic"`` fits scikit-learn's logistic
    regression instead (C chosen on validation). ``checkpoint`` is rewritten after every
    epoch; ``resume=True`` continues from it exactly. Launched by ``torchrun``, training is distributed (DDP). See
    ``docs/training.md`` for every option.

    Example:
        >>> result = finetune("tv:resnet18", weights=None, data="hymenoptera", policy="feature_extraction",
        ...                   image_size=64, epochs=2, export="model.pt")  # doctest: +SKIP
        >>> result.best["val_acc"]  # doctest: +SKIP
    """
    config = jsonable({k: (str(v) if isinstance(v, Policy) else v) for k, v in locals().items() if k != "callbacks"})
    run = _prepare(config, backbone=backbone, weights=weights, backbone_options=backbone_options, data=data, val_data=val_data, classes=classes,
                   val_split=val_split, on_bad_file=on_bad_file, task=task, policy=policy, epochs=epochs, batch_size=batch_size,
                   head=head, head_hidden=head_hidden, head_activation=head_activation, head_dropout=head_dropout,
                   head_norm=head_norm, label_smoothing=label_smoothing, class_weights=class_weights, image_size=image_size,
                   augment=augment, cache_features=cache_features, cache_dir=cache_dir, cache_views=cache_views,
                   device=device, precision=precision, channels_last=channels_last, compile=compile,
                   num_workers=num_workers, seed=seed, deterministic=deterministic)
    model, bb, pol, info, td = run.model, run.backbone, run.policy, run.info, run.data
    lr = default_lr(head_only=run.head_only) if lr is None else lr
    meta = {"labels": run.bundle.classes, "input_spec": run.spec.to_dict(), "task": task,
            "transferkit_version": _version(), "config": config,
            "training": {"backbone": bb.name, "weights": bb.weights, "policy": str(pol), "epochs": epochs,
                         "lr": lr, "feature_cache": td.cached, "head_norm": run.head_norm}}
    t1 = time.perf_counter()
    probe, tb, state = None, None, TrainState()
    if run.head_kind == "logistic":
        history, best, probe = run_probe(td, model.head, task=task, Cs=probe_Cs, seed=seed,
                                         balanced=class_weights == "balanced")
    else:
        groups = param_groups(td.module, lr=lr, weight_decay=weight_decay) if td.cached else \
            param_groups(model, lr=lr, weight_decay=weight_decay, backbone=bb, policy=pol, epochs=epochs)
        opt = make_optimizer(optimizer, groups, lr=lr, momentum=momentum)
        penalty = policy_penalty(model, bb, pol, epochs=epochs)  # L2-SP (the head term too when cached), or None
        steps = len(td.train_loader)
        sched = make_scheduler(schedule, opt, total_steps=epochs * steps, steps_per_epoch=steps,
                               warmup_steps=round(warmup_epochs * steps), options=schedule_options)
        if resume and checkpoint is not None and Path(checkpoint).exists():
            state = resume_from(checkpoint, model=model, optimizer=opt, scheduler=sched, config=config)
        tb = TensorBoardLogger(log_dir) if log_dir is not None and info.is_main else None
        on_end = epoch_end_callback(path=checkpoint, model=model, optimizer=opt, scheduler=sched, meta=meta,
                                    info=info, callbacks=callbacks, tensorboard=tb)
        wrap = None if not (info.enabled or run.speed.compile) else \
            (lambda m: run.speed.maybe_compile(wrap_ddp(m, info, run.speed.device)))
        with training_faults(checkpoint=checkpoint, batch_size=batch_size,
                             save_interrupted=lambda: _save_interrupted(run, meta, export),
                             probe_step=lambda bs: _probe_step(run, bs)):
            history, best = fit(td.module, td.train_loader, td.val_loader, epochs=epochs, optimizer=opt,
                                scheduler=sched, loss_fn=run.loss_fn, device=run.speed.device, set_mode=run.set_mode,
                                task=task, restore_best=restore_best, early_stopping=early_stopping, monitor=monitor,
                                state=state, on_epoch_end=on_end, speed=run.speed, dist=info, wrap=wrap,
                                penalty=penalty, verbose=verbose)
    run.timings["train_s"] = time.perf_counter() - t1
    model.eval()
    metrics = final_metrics(td.module, td.val_loader, task=task, classes=run.bundle.classes, loss_fn=run.loss_fn,
                            speed=run.speed, top_k=top_k)
    if probe is not None:
        metrics["probe"] = {"C": probe.C, "val_acc_by_C": {str(c): a for c, a in probe.scores.items()}}
    meta["training"]["best"] = jsonable(best)
    result = FinetuneResult(model=model, backbone=bb, classes=run.bundle.classes, policy=pol, history=history,
                            best=best, metrics=metrics, used_feature_cache=td.cached, timings=run.timings, task=task,
                            stopped_early=state.stopped_early, data_report=run.bundle.report)
    if info.is_main:
        _finish_outputs(result, run, meta, checkpoint=checkpoint, export=export, plots_dir=plots_dir, tb=tb,
                        state=state, opt_sched=None if probe is not None else (opt, sched))
    barrier(info)
    run.timings["total_s"] = time.perf_counter() - run.t_start
    return result


@dataclass
class _Run:
    """What :func:`_prepare` builds for :func:`finetune` and :func:`lr_find`."""

    t_start: float
    info: DistInfo
    speed: SpeedConfig
    policy: Policy
    backbone: Backbone
    spec: InputSpec
    bundle: DataBundle
    model: TransferModel
    head_kind: str
    head_only: bool  # no backbone parameter ever trains
    head_norm: bool  # the head starts with a FeatureNorm
    data: TrainingData
    set_mode: Callable[[int], None]
    loss_fn: nn.Module
    timings: dict[str, float]


def _prepare(config: dict[str, Any], *, backbone, weights, backbone_options, data, val_data, classes, val_split,
             on_bad_file, task, policy, epochs,
             batch_size, head, head_hidden, head_activation, head_dropout, head_norm, label_smoothing, class_weights, image_size,
             augment, cache_features, cache_dir, cache_views, device, precision, channels_last, compile, num_workers,
             seed, deterministic) -> _Run:
    t_start = time.perf_counter()
    epochs = _check_positive_int("epochs", epochs)
    batch_size = _check_positive_int("batch_size", batch_size)
    check_task(task)
    if cache_features not in (True, False, "auto"):
        raise ConfigError(f"cache_features must be True, False or 'auto', got {cache_features!r}.")
    head_kind, hidden = resolve_head(head, head_hidden)
    set_deterministic(deterministic)
    seed_everything(seed)
    info, dev = init_distributed(resolve_device(device))
    speed = SpeedConfig.make(dev, precision=precision, channels_last=channels_last, compile=compile)
    pol = Policy.parse(policy)
    bb = backbone if isinstance(backbone, Backbone) else get_backbone(backbone, weights=weights,
                                                                      **(backbone_options or {}))
    spec = resolve_input_spec(bb.input_spec, image_size)
    if spec.kind == "audio":
        bundle = prepare_audio_data(data, val_data, spec=spec, val_split=val_split, seed=seed, classes=classes)
        n_out = len(bundle.classes)
    else:
        bundle, n_out = prepare_task_data(data, val_data, task=task, val_split=val_split, seed=seed, classes=classes,
                                          min_size=spec.resize_size or spec.image_size, on_bad_file=on_bad_file)
    frozen = pol.frozen_throughout(bb.block_names, epochs)
    if (cache_features is True or head_kind == "logistic") and not frozen:
        raise ConfigError(f"cache_features=True and head='logistic' need a policy that keeps the backbone frozen; "
                          f"{pol} trains it. Use policy='feature_extraction' (or cache_features='auto').")
    use_cache = frozen and (cache_features in (True, "auto") or head_kind == "logistic")
    norm = resolve_head_norm(head_norm, cached=use_cache, head_kind=head_kind)
    model = build_model(bb, n_out, spec=spec, head_hidden=hidden, head_activation=head_activation,
                        head_dropout=head_dropout, head_norm=norm).to(dev)
    apply_policy(model, bb, pol, epoch=0)
    augment = augment or ("standard" if not use_cache or cache_views > 1 else "none")
    speed.prepare(model)
    timings: dict[str, float] = {"setup_s": time.perf_counter() - t_start}
    t0 = time.perf_counter()
    if use_cache:
        td = cached_training_data(model, bb.name, bundle, spec, augment=augment, views=cache_views,
                                  batch_size=batch_size, seed=seed, speed=speed, num_workers=num_workers,
                                  cache_dir=cache_dir, info=info)
        if norm:
            model.head[0].set_stats(*td.stores["train"].stats())  # the exact statistics of what the head sees
        set_mode: Callable[[int], None] = lambda epoch: model.head.train()  # noqa: E731
        timings["features_s"] = time.perf_counter() - t0
    else:
        td = image_training_data(model, bundle, spec, augment=augment, batch_size=batch_size, seed=seed, speed=speed,
                                 num_workers=num_workers, info=info)

        def set_mode(epoch: int) -> None:
            apply_policy(model, bb, pol, epoch=epoch)
            set_train_mode(model, bb, pol, epoch=epoch)

    weights_ = resolve_class_weights(class_weights, task, bundle)
    loss_fn = make_loss(task, label_smoothing=label_smoothing, class_weights=weights_).to(dev)
    return _Run(t_start=t_start, info=info, speed=speed, policy=pol, backbone=bb, spec=spec, bundle=bundle,
                model=model, head_kind=head_kind, head_only=frozen, head_norm=norm, data=td, set_mode=set_mode,
                loss_fn=loss_fn, timings=timings)


def _finish_outputs(result: FinetuneResult, run: _Run, meta: dict[str, Any], *, checkpoint, export, plots_dir, tb,
                    state: TrainState, opt_sched) -> None:
    """Rank 0: plots, TensorBoard summary, the final checkpoint and the export."""
    result.plots = write_reports(plots_dir, result.history, result.metrics, result.classes)
    if tb is not None:
        tb.log_metrics(result.metrics, step=len(result.history))
        tb.close()
    model = run.model
    if checkpoint is not None:
        training = None
        if opt_sched is not None and run.policy.lora is None:  # a LoRA checkpoint holds merged weights
            training = training_state(optimizer=opt_sched[0], scheduler=opt_sched[1], state=state)
        result.checkpoint_path = save_checkpoint(checkpoint, model=merge_lora(model), meta=meta,
                                                 epoch=len(result.history), history=result.history,
                                                 training=training, complete=True)
    if export is not None:
        t2 = time.perf_counter()
        example = _example_inputs(run.bundle, eval_transform(run.spec))
        result.export_report = export_torchscript(merge_lora(model), export, metadata=meta, example_inputs=example)
        result.export_path = result.export_report.path
        run.timings["export_s"] = time.perf_counter() - t2


def _save_interrupted(run: _Run, meta: dict[str, Any], export: str | Path | None) -> Path:
    """Ctrl-C without a checkpoint path: keep the current weights beside the export (or here)."""
    path = Path(export).with_suffix(".interrupted.pt") if export is not None else Path("transferkit-interrupted.pt")
    return save_checkpoint(path, model=merge_lora(run.model), meta=meta, epoch=None, history=[], complete=False)


def _probe_step(run: _Run, batch_size: int) -> None:
    """One forward and backward pass at ``batch_size`` (to find a batch size that fits in memory)."""
    x, y = next(iter(run.data.train_loader))
    reps = -(-batch_size // x.shape[0])
    x, y = x.repeat(reps, *([1] * (x.ndim - 1)))[:batch_size], y.repeat(reps, *([1] * (y.ndim - 1)))[:batch_size]
    module = run.data.module
    with run.speed.autocast():
        loss = run.loss_fn(module(run.speed.to_device(x)).float(), y.to(run.speed.device))
    loss.backward()
    module.zero_grad(set_to_none=True)


def linear_probe(backbone: str | Backbone = "tv:resnet18", *, data: Any, Cs: Sequence[float] | None = None,
                 **kwargs: Any) -> FinetuneResult:
    """The standard linear probe: frozen features, scikit-learn logistic regression (L-BFGS),
    ``C`` chosen on the validation data; the same as ``finetune(..., head="logistic")``.

    Example:
        >>> r = linear_probe("tk:cifar_resnet20", weights="resnet20.th", data="hymenoptera")  # doctest: +SKIP
        >>> r.metrics["probe"]["C"], r.metrics["val_acc"]  # doctest: +SKIP
    """
    kwargs.setdefault("policy", "feature_extraction")
    return finetune(backbone, data=data, head="logistic", probe_Cs=Cs, **kwargs)


def resume(path: str | Path, **overrides: Any) -> FinetuneResult:
    """Continue the run that wrote checkpoint ``path`` with the settings stored in it
    (``overrides`` replace some, e.g. ``data=`` when the run trained on an in-memory Dataset).

    Example:
        >>> result = transferkit.resume("runs/ants.pt")  # doctest: +SKIP
    """
    ckpt = load_checkpoint(path)
    config = dict(ckpt["transferkit"].get("config") or {})
    if not config:
        raise ConfigError(f"{str(path)!r} has no stored configuration; call finetune(..., checkpoint=path, resume=True).")
    config.update(overrides)
    missing = [k for k, v in config.items() if isinstance(v, str) and v.startswith("<") and v.endswith(">")]
    if missing:
        raise ConfigError(f"The run in {str(path)!r} used Python objects that a checkpoint cannot store for "
                          f"{missing}; pass them again: transferkit.resume(path, {missing[0]}=...).")
    config.update(checkpoint=str(path), resume=True)
    backbone = config.pop("backbone")
    return finetune(backbone, **config)


def lr_find(backbone: str | Backbone = "tv:resnet18", *, data: Any, start_lr: float = 1e-7, end_lr: float = 10.0,
            num_steps: int = 100, plot: str | Path | None = None, optimizer: str = "adamw", momentum: float = 0.9,
            weight_decay: float = 1e-4, **kwargs: Any) -> LRFindResult:
    """The learning-rate range test on the run ``finetune(backbone, data=data, **kwargs)`` would do
    (same model, policy, data and feature cache): returns the losses per learning rate and a
    suggested ``lr``; ``plot="lr.png"`` draws the curve. The model is left as it was.

    Example:
        >>> res = lr_find("tk:small_cnn", weights=None, data="images/", plot="lr.png")  # doctest: +SKIP
        >>> finetune("tk:small_cnn", weights=None, data="images/", lr=res.suggestion)  # doctest: +SKIP
    """
    params = inspect.signature(_prepare).parameters
    defaults = {k: p.default for k, p in inspect.signature(finetune).parameters.items()
                if k in params and p.default is not inspect.Parameter.empty}
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise ConfigError(f"lr_find got arguments it does not use: {sorted(unknown)}; valid: {sorted(defaults)}.")
    run = _prepare({}, **{**defaults, **kwargs, "backbone": backbone, "data": data})
    td = run.data
    groups = param_groups(td.module, lr=start_lr, weight_decay=weight_decay) if td.cached else \
        param_groups(run.model, lr=start_lr, weight_decay=weight_decay, backbone=run.backbone, policy=run.policy,
                     epochs=kwargs.get("epochs", defaults["epochs"]))
    opt = make_optimizer(optimizer, groups, lr=start_lr, momentum=momentum)
    result = lr_range_test(td.module, td.train_loader, optimizer=opt, loss_fn=run.loss_fn, speed=run.speed,
                           set_mode=run.set_mode, start_lr=start_lr, end_lr=end_lr, num_steps=num_steps)
    if plot is not None and run.info.is_main:
        result.plot(plot)
    return result


def _example_inputs(bundle: DataBundle, tf, n: int = 8) -> torch.Tensor:
    ds = (bundle.val if bundle.val is not None else bundle.train).view(transform=tf)
    xs = [ds[i][0] for i in range(min(n, len(ds)))]
    return pad_waveforms(xs) if xs[0].ndim == 1 else torch.stack(xs)  # audio clips may differ in length


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in d.items()}


def _version() -> str:
    from transferkit import __version__

    return __version__
