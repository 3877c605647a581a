"""The steps of a run, each a public function of the [`RunPlan`][transferkit.RunPlan].

``plan(config)`` -> [`train`][transferkit.steps.train] (which builds its data per phase with
[`training_data`][transferkit.steps.training_data]: cached features or input loaders; optimizer,
schedule, checkpoints, resume) -> [`evaluate`][transferkit.steps.evaluate] ->
[`write_outputs`][transferkit.steps.write_outputs] (plots, final checkpoint, verified export).
``transferkit.finetune`` is their short orchestration; a recipe that outgrows it calls them itself.

Example:
    >>> p = plan(FinetuneConfig(backbone="tk:small_cnn", weights=None, data="images/", epochs=2))  # doctest: +SKIP
    >>> outcome = train(p)  # doctest: +SKIP
    >>> evaluate(p, outcome.data)["val_acc"]  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit._progress import progress as progress_bar
from transferkit.data import eval_transform, train_transform
from transferkit.data.audio import pad_waveforms
from transferkit.plan import RunPlan
from transferkit.policies import apply_policy, merge_lora, policy_penalty, set_train_mode
from transferkit.train.checkpoint import save_checkpoint, save_with_fallback
from transferkit.train.distributed import wrap_ddp
from transferkit.train.faults import training_faults
from transferkit.train.features import FeatureStore, cache_key, compute_features, feature_loader
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


def training_data(plan: RunPlan, *, cached: bool | None = None, progress: Any = None) -> TrainingData:
    """Cached features (``cached``, default: when the whole run trains on them; the head's
    FeatureNorm statistics are set from them), else loaders over decoded, transformed inputs."""
    cached = plan.cache if cached is None else cached
    if not cached:
        return input_loaders(plan)
    t0 = time.perf_counter()
    cuda = [plan.feature_speed.device] if plan.feature_speed.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # extraction leaves the RNG as it was: a resume is exact
        td = cached_features(plan, progress=progress)
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

    extract_batch = fs.feature_batch_size(cfg.batch_size)  # small on a CPU (caches), large on a GPU
    parts = [("train", plan.bundle.train, train_transform(plan.spec, plan.augment), cfg.cache_views)]
    if plan.bundle.val is not None:
        parts.append(("val", plan.bundle.val, eval_transform(plan.spec), 1))
    stores = {}
    for name, ds, tf, views in parts:
        key = "in-memory" if cfg.cache_dir is None else cache_key(plan.feature_key_parts(
            part=name, transform=tf, views=views, dataset=ds))
        failed_before = len(plan.bundle.report.bad_at_load)
        with progress_bar(len(ds) * views, f"features ({name})", verbose=cfg.verbose and info.is_main,
                          unit="img") as bar:
            stores[name] = compute_features(model, ds.view(transform=tf), key=key, views=views,
                                            batch_size=extract_batch, device=fs.device, num_workers=cfg.num_workers,
                                            seed=cfg.seed, cache_dir=cfg.cache_dir, forward=forward,
                                            progress=progress or bar, info=info)  # sharded, gathered under DDP
        if stores[name].path is not None and len(plan.bundle.report.bad_at_load) > failed_before and info.is_main:
            # a file failed while this entry was computed: do not keep it, so that the next run meets (and
            # reports) the file again instead of reusing features that silently hold its replacement
            shutil.rmtree(stores[name].path, ignore_errors=True)
    train_dl = feature_loader(stores["train"], batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed,
                              rank=info.rank, world_size=info.world_size)
    val_dl = feature_loader(stores["val"], batch_size=256, shuffle=False) if "val" in stores else None
    return TrainingData(module=model.head, train_loader=train_dl, val_loader=val_dl, cached=True, stores=stores)


def input_loaders(plan: RunPlan) -> TrainingData:
    """Loaders over transformed inputs (the model runs end to end every epoch), decoded once
    when the plan says so; under DDP each rank gets its shard of the training data,
    validation runs whole on each."""
    cfg, dev, info = plan.config, plan.speed.device, plan.dist
    train_ds = _inputs(plan, "train", plan.bundle.train, plan.augment, train_transform(plan.spec, plan.augment))
    train_dl = make_loader(train_ds, batch_size=cfg.batch_size, shuffle=True, device=dev, num_workers=cfg.num_workers,
                           seed=cfg.seed, drop_last=True, rank=info.rank, world_size=info.world_size)
    val_dl = None
    if plan.bundle.val is not None:
        val_ds = _inputs(plan, "val", plan.bundle.val, "none", eval_transform(plan.spec))
        val_dl = make_loader(val_ds, batch_size=cfg.batch_size, shuffle=False, device=dev,
                             num_workers=cfg.num_workers, seed=cfg.seed)
    return TrainingData(module=plan.model, train_loader=train_dl, val_loader=val_dl, cached=False)


def _inputs(plan: RunPlan, part: str, ds: Any, augment: str, transform: Any) -> Any:
    if part not in plan.decode:
        return ds.view(transform=transform)
    from transferkit.data.decoded import decoded_dataset

    t0 = time.perf_counter()
    failed_before = len(plan.bundle.report.bad_at_load)
    out, decided = decoded_dataset(ds, plan.spec, augment=augment, cache_dir=plan.config.cache_dir,
                                   num_workers=plan.config.num_workers, plan=plan.decode[part])
    if decided.path is not None and len(plan.bundle.report.bad_at_load) > failed_before and plan.dist.is_main:
        shutil.rmtree(decided.path, ignore_errors=True)  # as for feature-cache entries: a later run reports the file
    plan.timings[f"decode_{part}_s"] = time.perf_counter() - t0
    return out


def set_epoch_mode(plan: RunPlan, epoch: int) -> None:
    """Trainable parameters and train/eval modes at ``epoch``, as the plan's policy says."""
    if epoch < plan.cached_epochs:
        plan.model.head.train()
        return
    apply_policy(plan.model, plan.backbone, plan.policy, epoch=epoch)
    set_train_mode(plan.model, plan.backbone, plan.policy, epoch=epoch)


def start_epoch(plan: RunPlan, epoch: int) -> None:
    """Seed this rank's RNG from ``(rank seed, epoch)`` (dropout; so a resumed run, on every
    rank, draws what the uninterrupted one drew), then set the epoch's modes."""
    from transferkit.plan import seed_everything
    from transferkit.train.loaders import mix_seed

    seed_everything(mix_seed(plan.seeds[plan.dist.rank], epoch))
    set_epoch_mode(plan, epoch)


@dataclass
class TrainOutcome:
    """What [`train`][transferkit.steps.train] returns."""

    history: list[dict[str, Any]]
    best: dict[str, Any]
    state: TrainState
    data: TrainingData  # what the last phase trained on (evaluate on it)
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


def train(plan: RunPlan, *, meta: dict[str, Any] | None = None, progress: Any = None) -> TrainOutcome:
    """Train what the plan says: the scikit-learn probe (``head="logistic"``), or the loop with
    one optimizer, schedule, gradient scaler and L2-SP penalty over the whole run, the
    per-epoch checkpoint and resume. A run whose first ``plan.cached_epochs`` epochs keep the
    backbone frozen (``fine_tune:frozen=k``) trains the head on cached features for those
    epochs, then the whole model on decoded inputs (features are not computed when a resume
    starts after that phase)."""
    cfg, k, total = plan.config, plan.cached_epochs, plan.config.epochs
    t1 = time.perf_counter()
    if plan.head_kind == "logistic":
        from transferkit.train.probe import run_probe

        td = training_data(plan, cached=True, progress=progress)
        history, best, probe = run_probe(td, plan.model.head, task=cfg.task, Cs=cfg.probe_Cs, seed=cfg.seed,
                                         balanced=cfg.class_weights == "balanced")
        plan.timings["train_s"] = time.perf_counter() - t1
        return TrainOutcome(history=history, best=best, state=TrainState(), data=td, probe=probe)
    meta = meta if meta is not None else metadata(plan)
    inputs = training_data(plan, cached=False) if k < total else None
    steps = [_cached_steps(plan)] * k + [len(inputs.train_loader) if inputs else 0] * (total - k)
    opt = make_optimizer(cfg.optimizer, plan.param_groups(), lr=plan.lr, momentum=cfg.momentum)
    sched = make_scheduler(cfg.schedule, opt, total_steps=sum(steps), steps_per_epoch=steps[-1],
                           warmup_steps=round(cfg.warmup_epochs * steps[0]), options=cfg.schedule_options)
    scaler = plan.speed.grad_scaler()
    state = TrainState()
    if cfg.resume and cfg.checkpoint is not None and Path(cfg.checkpoint).exists():
        state = resume_from(cfg.checkpoint, plan_dict=meta["plan"], model=plan.model, optimizer=opt, scheduler=sched,
                            scaler=scaler)
    info = plan.dist
    tb = TensorBoardLogger(cfg.log_dir) if cfg.log_dir is not None and info.is_main else None
    loop = dict(optimizer=opt, scheduler=sched, loss_fn=plan.loss_fn, device=plan.speed.device,
                set_mode=lambda e: start_epoch(plan, e), task=cfg.task, restore_best=cfg.restore_best,
                early_stopping=cfg.early_stopping, monitor=cfg.monitor, state=state, speed=plan.speed, dist=info,
                penalty=policy_penalty(plan.model, plan.backbone, plan.policy, epochs=total), scaler=scaler,
                verbose=cfg.verbose, total_epochs=total,
                on_epoch_end=epoch_end_callback(path=cfg.checkpoint, model=plan.model, optimizer=opt, scheduler=sched,
                                                scaler=scaler, meta=meta, info=info, base_lr=plan.lr,
                                                callbacks=cfg.callbacks, tensorboard=tb))
    current: dict[str, TrainingData | None] = {"data": inputs}
    try:
        with training_faults(checkpoint=cfg.checkpoint, batch_size=cfg.batch_size,
                             save_interrupted=lambda: _save_interrupted(plan, meta),
                             probe_step=lambda bs: _probe_step(plan, current["data"], bs)):
            if state.epoch < k or inputs is None:  # the frozen phase, on features computed once
                td = current["data"] = training_data(plan, cached=True, progress=progress)
                history, best = fit(td.module, td.train_loader, td.val_loader, epochs=k, wrap=_wrapper(plan), **loop)
            if inputs is not None:
                state.best_state = _whole_model_state(plan, state.best_state)
                td = current["data"] = inputs
                history, best = fit(td.module, td.train_loader, td.val_loader, epochs=total, wrap=_wrapper(plan),
                                    **loop)
    finally:
        if tb is not None:
            tb.close()
    plan.timings["train_s"] = time.perf_counter() - t1
    return TrainOutcome(history=history, best=best, state=state, data=td, optimizer=opt)


def _wrapper(plan: RunPlan) -> Any:
    """DDP (and torch.compile) around the trained module, or None."""
    speed, info = plan.speed, plan.dist
    if not (info.enabled or speed.compile):
        return None
    return lambda m: speed.maybe_compile(wrap_ddp(m, info, speed.device))


def _cached_steps(plan: RunPlan) -> int:
    """Optimizer steps per epoch on cached features (the feature loader keeps the last, short batch)."""
    from transferkit.train.loaders import EpochSampler

    n = len(EpochSampler(len(plan.bundle.train), shuffle=True, rank=plan.dist.rank, world_size=plan.dist.world_size))
    return -(-n // plan.config.batch_size)


def _whole_model_state(plan: RunPlan, best: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """The best weights of a frozen phase (the head's state) as the whole model's: the trunk did
    not change in that phase, so its current state is exact."""
    if best is None or any(k.startswith("head.") for k in best):
        return best
    whole = {k: v.detach().clone() for k, v in plan.model.state_dict().items() if not k.startswith("head.")}
    return {**whole, **{f"head.{k}": v for k, v in best.items()}}


def evaluate(plan: RunPlan, td: TrainingData, *, outputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validation loss and the task's metrics of the trained model (see `final_metrics`);
    ``outputs`` receives the validation logits and labels."""
    plan.model.eval()
    return final_metrics(td.module, td.val_loader, task=plan.config.task, classes=plan.classes, loss_fn=plan.loss_fn,
                         speed=plan.speed, top_k=plan.config.top_k, outputs=outputs)


def validation_images(plan: RunPlan) -> Any:
    """The validation set as the model sees it (eval transform, uint8), in the order of its logits."""
    return None if plan.bundle.val is None else plan.bundle.val.view(transform=eval_transform(plan.spec))


def write_outputs(plan: RunPlan, outcome: TrainOutcome, metrics: dict[str, Any], *,
                  meta: dict[str, Any] | None = None, logits: torch.Tensor | None = None) -> dict[str, Any]:
    """Rank 0: plots (curves, confusion matrix, and with the validation ``logits`` the
    show-results and top-losses grids), the final checkpoint (complete: weights, plan,
    history; nothing to resume) and the verified export.
    Returns ``{"plots", "checkpoint", "export_report"}``."""
    from transferkit.export.torchscript import export_torchscript

    cfg = plan.config
    meta = meta if meta is not None else metadata(plan)
    meta["training"]["best"] = outcome.best
    plots = write_reports(cfg.plots_dir, outcome.history, metrics, plan.classes)
    if cfg.plots_dir is not None and logits is not None and cfg.task == "multiclass":
        from transferkit.train.interpret import write_interpretation

        pictures = write_interpretation(cfg.plots_dir, logits, validation_images(plan), plan.classes)
        pictures.pop("most_confused")
        plots.update(pictures)
    out: dict[str, Any] = {"plots": plots, "checkpoint": None, "export_report": None}
    model = merge_lora(plan.model)
    history = dict(epoch=len(outcome.history), history=outcome.history)
    if cfg.checkpoint is not None:  # a failed write keeps the weights in a fallback file and says where
        out["checkpoint"] = save_with_fallback(
            cfg.checkpoint, lambda: save_checkpoint(cfg.checkpoint, model=model, meta=meta, complete=True, **history),
            what="checkpoint", flag="checkpoint", model=model, meta=meta, **history)
    if cfg.export is not None:
        t2 = time.perf_counter()
        example = example_inputs(plan)
        shipped = {**metadata(plan, portable=cfg.portable_metadata), "training": {**meta["training"]}}
        shipped["training"]["weights"] = shipped["plan"]["weights"]
        out["export_report"] = save_with_fallback(
            cfg.export, lambda: export_torchscript(model, cfg.export, metadata=shipped, example_inputs=example),
            what="export", flag="export", model=model, meta=meta, **history)
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


def _probe_step(plan: RunPlan, td: TrainingData | None, batch_size: int) -> None:
    """One forward and backward pass at ``batch_size`` (to find a batch size that fits in memory)."""
    if td is None:
        raise RuntimeError("out of memory before the training data were ready")
    x, y = next(iter(td.train_loader))
    reps = -(-batch_size // x.shape[0])
    x, y = x.repeat(reps, *([1] * (x.ndim - 1)))[:batch_size], y.repeat(reps, *([1] * (y.ndim - 1)))[:batch_size]
    with plan.speed.autocast():
        loss = plan.loss_fn(td.module(plan.speed.to_device(x)).float(), y.to(plan.speed.device))
    loss.backward()
    td.module.zero_grad(set_to_none=True)
