"""The steps of a run, each a public function of the :class:`~transferkit.plan.RunPlan`.

``plan(config)`` -> :func:`training_data` (cached features or image loaders) ->
:func:`train` (optimizer, schedule, checkpoints, resume) -> :func:`evaluate` ->
:func:`write_outputs` (plots, final checkpoint, verified export). ``transferkit.finetune``
is their short orchestration; a recipe that outgrows it calls them itself.

Example:
    >>> p = plan(FinetuneConfig(backbone="tk:small_cnn", weights=None, data="images/", epochs=2))  # doctest: +SKIP
    >>> td = training_data(p)  # doctest: +SKIP
    >>> outcome = train(p, td)  # doctest: +SKIP
    >>> evaluate(p, td)["val_acc"]  # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.data import eval_transform, train_transform
from transferkit.data.audio import pad_waveforms
from transferkit.plan import RunPlan
from transferkit.policies import apply_policy, merge_lora, policy_penalty, set_train_mode
from transferkit.train.checkpoint import save_checkpoint
from transferkit.train.distributed import barrier, wrap_ddp
from transferkit.train.faults import training_faults
from transferkit.train.features import FeatureStore, cache_key, compute_features, data_fingerprint, feature_loader
from transferkit.train.loaders import make_loader
from transferkit.train.loop import TrainState, fit
from transferkit.train.metrics import final_metrics
from transferkit.train.optim import make_optimizer, make_scheduler
from transferkit.train.reporting import TensorBoardLogger, write_reports
from transferkit.train.resume import epoch_end_callback, resume_from


@dataclass
class TrainingData:
    """What the loop trains on: ``module`` (the head alone with cached features), loaders."""

    module: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader | None
    cached: bool
    stores: dict[str, FeatureStore] = field(default_factory=dict)


def training_data(plan: RunPlan, *, progress: Any = None) -> TrainingData:
    """Cached features when the plan caches them (and the head's FeatureNorm statistics set
    from them), else loaders over decoded, transformed inputs."""
    t0 = time.perf_counter()
    td = cached_features(plan, progress=progress) if plan.cache else input_loaders(plan)
    if plan.cache:
        plan.timings["features_s"] = time.perf_counter() - t0
        if plan.head_norm:
            plan.model.head[0].set_stats(*td.stores["train"].stats())  # the exact statistics the head sees
    return td


def cached_features(plan: RunPlan, *, progress: Any = None) -> TrainingData:
    """Features computed once (``cache_views`` augmented passes for training, one eval pass
    for validation), or read back from ``cache_dir``; loaders over them train the head only."""
    cfg, model, fs, info = plan.config, plan.model, plan.feature_speed, plan.dist

    def forward(x: torch.Tensor) -> torch.Tensor:
        with fs.autocast():
            return model.features(fs.to_device(x))

    # inference batches: larger on an accelerator; on a CPU large batches overflow the caches
    # (ResNet-18 at 224 px, one thread: 57 ms/image at batch 4-8, 63 at 32, 70 at 64)
    extract_batch = cfg.batch_size if fs.device.type == "cpu" else max(cfg.batch_size, 64)
    parts = [("train", plan.bundle.train, train_transform(plan.spec, plan.augment), cfg.cache_views)]
    if plan.bundle.val is not None:
        parts.append(("val", plan.bundle.val, eval_transform(plan.spec), 1))
    stores = {}
    for name, ds, tf, views in parts:
        key = "in-memory" if cfg.cache_dir is None else cache_key(plan.feature_key_parts(
            part=name, transform=tf, views=views, fingerprint=data_fingerprint, dataset=ds))
        if info.enabled and cfg.cache_dir is not None and not info.is_main:
            barrier(info)  # rank 0 writes the shared cache entry first
        stores[name] = compute_features(model, ds.view(transform=tf), key=key, views=views, batch_size=extract_batch,
                                        device=fs.device, num_workers=cfg.num_workers, seed=cfg.seed,
                                        cache_dir=cfg.cache_dir, forward=forward, progress=progress)
        if info.enabled and cfg.cache_dir is not None and info.is_main:
            barrier(info)
    train_dl = feature_loader(stores["train"], batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed,
                              rank=info.rank, world_size=info.world_size)
    val_dl = feature_loader(stores["val"], batch_size=256, shuffle=False) if "val" in stores else None
    return TrainingData(module=model.head, train_loader=train_dl, val_loader=val_dl, cached=True, stores=stores)


def input_loaders(plan: RunPlan) -> TrainingData:
    """Loaders over decoded, transformed inputs (the model runs end to end every epoch);
    under DDP each rank gets its shard of the training data, validation runs whole on each."""
    cfg, dev, info = plan.config, plan.speed.device, plan.dist
    train_dl = make_loader(plan.bundle.train.view(transform=train_transform(plan.spec, plan.augment)),
                           batch_size=cfg.batch_size, shuffle=True, device=dev, num_workers=cfg.num_workers,
                           seed=cfg.seed, drop_last=True, rank=info.rank, world_size=info.world_size)
    val_dl = None
    if plan.bundle.val is not None:
        val_dl = make_loader(plan.bundle.val.view(transform=eval_transform(plan.spec)), batch_size=cfg.batch_size,
                             shuffle=False, device=dev, num_workers=cfg.num_workers, seed=cfg.seed)
    return TrainingData(module=plan.model, train_loader=train_dl, val_loader=val_dl, cached=False)


def set_epoch_mode(plan: RunPlan, epoch: int) -> None:
    """Trainable parameters and train/eval modes at ``epoch``, as the plan's policy says."""
    if plan.cache:
        plan.model.head.train()
        return
    apply_policy(plan.model, plan.backbone, plan.policy, epoch=epoch)
    set_train_mode(plan.model, plan.backbone, plan.policy, epoch=epoch)


@dataclass
class TrainOutcome:
    """What :func:`train` returns."""

    history: list[dict[str, Any]]
    best: dict[str, Any]
    state: TrainState
    probe: Any = None
    optimizer: Any = None


def metadata(plan: RunPlan, *, portable: bool = False) -> dict[str, Any]:
    """The metadata checkpoints and exports carry: labels, input spec, task and the plan
    (``portable``, for exports: file names and digests instead of the training machine's paths)."""
    from transferkit import __version__

    p = plan.to_dict(portable=portable)
    return {"labels": plan.classes, "input_spec": plan.spec.to_dict(), "task": plan.config.task,
            "transferkit_version": __version__, "plan": p, "config": p["config"],
            "training": {"backbone": plan.backbone.name, "weights": p["weights"], "policy": str(plan.policy),
                         "epochs": plan.epochs, "lr": plan.lr, "feature_cache": plan.cache,
                         "head_norm": plan.head_norm}}


def train(plan: RunPlan, td: TrainingData, *, meta: dict[str, Any] | None = None) -> TrainOutcome:
    """Train what the plan says: the scikit-learn probe (``head="logistic"``), or the loop with
    its optimizer, schedule, gradient scaler, L2-SP penalty, per-epoch checkpoint and resume."""
    cfg = plan.config
    t1 = time.perf_counter()
    if plan.head_kind == "logistic":
        from transferkit.train.probe import run_probe

        history, best, probe = run_probe(td, plan.model.head, task=cfg.task, Cs=cfg.probe_Cs, seed=cfg.seed,
                                         balanced=cfg.class_weights == "balanced")
        plan.timings["train_s"] = time.perf_counter() - t1
        return TrainOutcome(history=history, best=best, state=TrainState(), probe=probe)
    meta = meta if meta is not None else metadata(plan)
    opt = make_optimizer(cfg.optimizer, plan.param_groups(), lr=plan.lr, momentum=cfg.momentum)
    steps = len(td.train_loader)
    sched = make_scheduler(cfg.schedule, opt, total_steps=cfg.epochs * steps, steps_per_epoch=steps,
                           warmup_steps=round(cfg.warmup_epochs * steps), options=cfg.schedule_options)
    scaler = plan.speed.grad_scaler()
    penalty = policy_penalty(plan.model, plan.backbone, plan.policy, epochs=cfg.epochs)
    state = TrainState()
    if cfg.resume and cfg.checkpoint is not None and Path(cfg.checkpoint).exists():
        state = resume_from(cfg.checkpoint, plan_dict=meta["plan"], model=plan.model, optimizer=opt, scheduler=sched,
                            scaler=scaler)
    info = plan.dist
    tb = TensorBoardLogger(cfg.log_dir) if cfg.log_dir is not None and info.is_main else None
    on_end = epoch_end_callback(path=cfg.checkpoint, model=plan.model, optimizer=opt, scheduler=sched, scaler=scaler,
                                meta=meta, info=info, base_lr=plan.lr, callbacks=cfg.callbacks, tensorboard=tb)
    speed = plan.speed
    wrap = None if not (info.enabled or speed.compile) else (lambda m: speed.maybe_compile(wrap_ddp(m, info, speed.device)))
    try:
        with training_faults(checkpoint=cfg.checkpoint, batch_size=cfg.batch_size,
                             save_interrupted=lambda: _save_interrupted(plan, meta),
                             probe_step=lambda bs: _probe_step(plan, td, bs)):
            history, best = fit(td.module, td.train_loader, td.val_loader, epochs=cfg.epochs, optimizer=opt,
                                scheduler=sched, loss_fn=plan.loss_fn, device=speed.device,
                                set_mode=lambda e: set_epoch_mode(plan, e), task=cfg.task,
                                restore_best=cfg.restore_best, early_stopping=cfg.early_stopping, monitor=cfg.monitor,
                                state=state, on_epoch_end=on_end, speed=speed, dist=info, wrap=wrap, penalty=penalty,
                                scaler=scaler, verbose=cfg.verbose)
    finally:
        if tb is not None:
            tb.close()
    plan.timings["train_s"] = time.perf_counter() - t1
    return TrainOutcome(history=history, best=best, state=state, optimizer=opt)


def evaluate(plan: RunPlan, td: TrainingData) -> dict[str, Any]:
    """Validation loss and the task's metrics of the trained model (see :func:`final_metrics`)."""
    plan.model.eval()
    return final_metrics(td.module, td.val_loader, task=plan.config.task, classes=plan.classes, loss_fn=plan.loss_fn,
                         speed=plan.speed, top_k=plan.config.top_k)


def write_outputs(plan: RunPlan, outcome: TrainOutcome, metrics: dict[str, Any], *,
                  meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rank 0: plots, the final checkpoint (complete: weights, plan, history; nothing to
    resume) and the verified export. Returns ``{"plots", "checkpoint", "export_report"}``."""
    from transferkit.export.torchscript import export_torchscript

    cfg = plan.config
    meta = meta if meta is not None else metadata(plan)
    meta["training"]["best"] = outcome.best
    out: dict[str, Any] = {"plots": write_reports(cfg.plots_dir, outcome.history, metrics, plan.classes),
                           "checkpoint": None, "export_report": None}
    if cfg.checkpoint is not None:
        out["checkpoint"] = save_checkpoint(cfg.checkpoint, model=merge_lora(plan.model), meta=meta,
                                            epoch=len(outcome.history), history=outcome.history, complete=True)
    if cfg.export is not None:
        t2 = time.perf_counter()
        example = example_inputs(plan)
        portable = {**metadata(plan, portable=True), "training": {**meta["training"]}}
        portable["training"]["weights"] = portable["plan"]["weights"]
        out["export_report"] = export_torchscript(merge_lora(plan.model), cfg.export, metadata=portable,
                                                  example_inputs=example)
        plan.timings["export_s"] = time.perf_counter() - t2
    return out


def example_inputs(plan: RunPlan, n: int = 8) -> torch.Tensor:
    """Up to ``n`` real inputs (validation data when there are some) for the export's parity check."""
    bundle = plan.bundle
    ds = (bundle.val if bundle.val is not None else bundle.train).view(transform=eval_transform(plan.spec))
    xs = [ds[i][0] for i in range(min(n, len(ds)))]
    return pad_waveforms(xs) if xs[0].ndim == 1 else torch.stack(xs)  # audio clips may differ in length


def _save_interrupted(plan: RunPlan, meta: dict[str, Any]) -> Path:
    """Ctrl-C before a checkpoint exists: keep the current weights beside the export (or here)."""
    export = plan.config.export
    path = Path(export).with_suffix(".interrupted.pt") if export is not None else Path("transferkit-interrupted.pt")
    return save_checkpoint(path, model=merge_lora(plan.model), meta=meta, epoch=None, history=[], complete=False)


def _probe_step(plan: RunPlan, td: TrainingData, batch_size: int) -> None:
    """One forward and backward pass at ``batch_size`` (to find a batch size that fits in memory)."""
    x, y = next(iter(td.train_loader))
    reps = -(-batch_size // x.shape[0])
    x, y = x.repeat(reps, *([1] * (x.ndim - 1)))[:batch_size], y.repeat(reps, *([1] * (y.ndim - 1)))[:batch_size]
    with plan.speed.autocast():
        loss = plan.loss_fn(td.module(plan.speed.to_device(x)).float(), y.to(plan.speed.device))
    loss.backward()
    td.module.zero_grad(set_to_none=True)
