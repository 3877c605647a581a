"""The steps of a run, each a public function of the [`Decisions`][transferkit.Decisions] and the [`Run`][transferkit.run.Run].

``look -> decide -> build`` -> [`train`][transferkit.steps.train] (which gets its data per
phase from [`training_data`][transferkit.steps.training_data]: cached features or input
loaders; optimizer, schedule, checkpoints, resume) -> [`evaluate`][transferkit.steps.evaluate]
-> [`write_outputs`][transferkit.steps.write_outputs] (plots, final checkpoint, verified
export). The steps read the decisions and use the run's objects; they reassign neither, and
return what they measured (seconds) instead of storing it. ``transferkit.finetune`` is their
short orchestration; a recipe that outgrows it calls them itself.

Example:
    >>> facts, inputs = look(cfg)  # doctest: +SKIP
    >>> d = decide(cfg, facts); run = build(d, inputs)  # doctest: +SKIP
    >>> outcome = train(d, run)  # doctest: +SKIP
    >>> evaluate(d, run, outcome.data)["val_acc"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit._text import file_reason
from transferkit._progress import progress as progress_bar
from transferkit._version import __version__
from transferkit.data import eval_transform, train_transform
from transferkit.data.audio import pad_waveforms
from transferkit.data.decoded import decoded_dataset
from transferkit.data.gpu_jpeg import DeviceDecodedLoader
from transferkit.data.late import (BadFileError, classes_never_loaded, failed_items, load_failures, replace_advice,
                                   record_bad_at_load, record_lost_class)
from transferkit.data.sampling import mix_seed, seed_everything, stack_images
from transferkit.config import jsonable
from transferkit.decisions import Decisions, differences
from transferkit.export.torchscript import export_torchscript
from transferkit.run import Run
from transferkit.policies import apply_policy, merge_lora, policy_penalty, set_train_mode
from transferkit.checkpoints import save_checkpoint, save_interrupted_weights, save_with_fallback
from transferkit.train.compile_trial import CompileTrial
from transferkit.train.distributed import barrier, gather_objects, local_main_first, wrap_ddp
from transferkit.train.engines import compile_estimate, lazy_engine_forward, leaf_modules, remove_stale_engine_files
from transferkit.train.faults import training_faults
from transferkit.errors import DataError, warn
from transferkit.train.feature_store import fill_store, open_store, part_size_for
from transferkit.train.features import compute_features, feature_loader
from transferkit.data.sampling import EpochSampler, default_num_workers
from transferkit.train.loaders import make_loader
from transferkit.train.loop import Loop, TrainState, fit
from transferkit.train.metrics import final_metrics, regression_metrics
from transferkit.train.optim import make_optimizer, make_scheduler, phase_steps
from transferkit.train.reporting import TensorBoardLogger, write_reports
from transferkit.train.resume import epoch_end_callback, resume_from
from transferkit.train.speed import SpeedConfig


@dataclass
class TrainingData:
    """What the loop trains on: ``module`` (the head alone with cached features), loaders,
    and the seconds it took to make them (``seconds``: features, decoding)."""

    module: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader | None
    cached: bool
    stores: dict[str, Any] = field(default_factory=dict)  # FeatureStore, or ShardedFeatureStore with cache_dir
    seconds: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] | None = None  # the cached features' report (see feature_report); None: not cached
    # features held in memory: the validation rows whose file failed to load (each holds the next readable file's
    # features, aligned with the files, and counts in no metric; a feature store masks them itself)
    val_failed: list[int] = field(default_factory=list)


def training_data(d: Decisions, run: Run, *, cached: bool | None = None, progress: Any = None,
                  norm: bool = True) -> TrainingData:
    """Cached features (``cached``, default: when the whole run trains on them; the head's
    FeatureNorm statistics are set from them, unless ``norm`` is False: a resumed run keeps its
    checkpoint's, which its head was trained with), else loaders over decoded, transformed
    inputs."""
    cached = d.cache if cached is None else cached
    if not cached:
        return input_loaders(d, run)
    t0 = time.perf_counter()
    if run.dist.local_rank == 0 and d.cache_read_only is None:  # what killed runs left (one rank per node looks)
        remove_stale_engine_files(d.config.cache_dir)
    cuda = [run.feature_speed.device] if run.feature_speed.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # extraction leaves the RNG as it was: a resume is exact
        td = cached_features(d, run, progress=progress)
    td.seconds["features_s"] = time.perf_counter() - t0
    if d.head_norm and norm:
        run.model.head[0].set_stats(*td.stores["train"].stats())  # the exact statistics the head sees
    return td


def cached_features(d: Decisions, run: Run, *, progress: Any = None) -> TrainingData:
    """Features computed once (``cache_views`` augmented passes for training, one eval pass
    for validation); loaders over them train the head only.

    Without ``cache_dir`` they are computed in memory (under DDP each rank computes its shard
    and the shards are gathered). With ``cache_dir`` they go to a sharded, resumable
    [feature store][transferkit.train.feature_store] under the key
    [`Decisions.feature_key`][transferkit.Decisions.feature_key]: see `stored_features`."""
    cfg, model, fs, info = d.config, run.model, run.feature_speed, run.dist

    def forward(x: torch.Tensor) -> torch.Tensor:
        with fs.autocast():
            return model.features(fs.to_device(x))

    extract_batch = fs.feature_batch_size(cfg.batch_size)  # small on a CPU (caches), large on a GPU
    parts = [("train", run.bundle.train, train_transform(d.input_spec, d.cached_augment), cfg.cache_views)]
    if run.bundle.val is not None:
        parts.append(("val", run.bundle.val, eval_transform(d.input_spec), 1))
    if d.engine != "eager":  # feature-engine hook: the decided engine, prepared when a pass first runs
        forward = lazy_engine_forward(d.engine, model, run.bundle.train.view(transform=eval_transform(d.input_spec)),
                                      batch_size=extract_batch, device=fs.device, precision=fs.precision,
                                      channels_last=fs.channels_last, cache_dir=cfg.cache_dir)
    if cfg.cache_dir is not None:
        was_training = model.training
        model.eval()
        try:
            return stored_features(d, run, parts, forward, batch_size=extract_batch, progress=progress)
        finally:
            model.train(was_training)
    stores = {}
    for name, ds, tf, views in parts:
        loader = None
        if d.decodes_on_device("feature pass"):  # JPEGs decoded on the device; the same split by rank
            loader = DeviceDecodedLoader(ds, d.input_spec, augment=d.augment if name == "train" else "none",
                                         batch_size=extract_batch, device=fs.device, seed=cfg.seed,
                                         num_workers=cfg.num_workers, rank=info.rank, world_size=info.world_size)
        with progress_bar(len(ds) * views, f"features ({name})", verbose=cfg.verbose and info.is_main,
                          unit=d.unit) as bar:
            stores[name] = compute_features(model, ds.view(transform=tf), key=d.feature_key(name), views=views,
                                            batch_size=extract_batch, device=fs.device, num_workers=cfg.num_workers,
                                            seed=cfg.seed, forward=forward, progress=progress or bar,
                                            info=info, loader=loader)  # sharded, gathered under DDP
    # files that failed to load were served as the next readable file of their class: left out of head training
    # (as a feature store masks them) and, by the validation pass, out of the metrics (each rank met its share)
    failed = {name: sorted(set().union(*gather_objects(failed_items(ds), info))) for name, ds, _, _ in parts}
    report = feature_report({name: {"samples": len(s), "shards": 0, "computed": 0, "reused": 0, "dtype": "float32",
                                    "bytes": int(s.features.nbytes + s.targets.nbytes),
                                    "masked_samples": len(failed[name]), "views": s.num_views, "path": None}
                             for name, s in stores.items()})  # masked samples counted, as a store on disk holds them
    if failed["train"]:
        stores["train"] = stores["train"].without(failed["train"])
    train_dl = feature_loader(stores["train"], batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed,
                              rank=info.rank, world_size=info.world_size)
    val_dl = feature_loader(stores["val"], batch_size=256, shuffle=False) if "val" in stores else None
    return TrainingData(module=model.head, train_loader=train_dl, val_loader=val_dl, cached=True, stores=stores,
                        report=report, val_failed=failed.get("val", []))


STORE_MEMORY_BUDGET = 2 * 2**30  # head training holds a store this large in memory, else reads it in blocks


def stored_features(d: Decisions, run: Run, parts: list[tuple[str, Any, Any, int]], forward: Any, *,
                    batch_size: int, progress: Any = None) -> TrainingData:
    """The frozen pass through a [`ShardedFeatureStore`][transferkit.train.feature_store.ShardedFeatureStore]
    in ``cache_dir``, one per part (train, val), keyed by ``d.feature_key(part)``.

    - A killed extraction resumes: committed parts are reused, only the missing ones are
      computed (under DDP rank 0's list of missing parts is shared, so the ranks stay
      balanced; then every rank reads the whole store).
    - Features are stored in the precision they were computed in (bf16: half the bytes).
    - A file that fails while its features are computed is *masked* (left out of head
      training and of the validation metrics: a validation sample's row holds the features
      of the next readable sample of its class, as the loaders replace a file, and no metric
      counts it) and reported in ``data_report``
      (``bad_files``, ``bad_at_load``, with a warning) by this run and by every later run
      that reuses the part: the mask is stored with the features, so the entry can be kept
      (the whole store is not recomputed for one file) without hiding the file.
    - Free space is checked before each part is written.

    Head training reads the store with ``store.batches``: in memory when it fits
    ``STORE_MEMORY_BUDGET``, else in large contiguous blocks in a seeded order; every rank
    gets the same number of batches, and the order is a function of the seed and the epoch
    (a resume is exact). ``TrainingData.report`` holds the stores' report (see
    ``FinetuneResult.feature_report``).
    """
    cfg, fs, info = d.config, run.feature_speed, run.dist
    dtype, dim = d.feature_dtype, run.backbone.num_features
    stores: dict[str, Any] = {}
    reports: dict[str, dict[str, Any]] = {}
    for name, ds, tf, views in parts:
        n = len(ds)
        store = open_store(cfg.cache_dir, d.feature_key(name), info, num_samples=n, dim=dim, dtype=dtype,
                           views=views, part_size=part_size_for(n, dim, views=views, dtype=dtype),
                           read_only=d.cache_read_only)

        def bar(total: int, name: str = name) -> Any:
            if progress is not None:
                return contextlib.nullcontext(progress)
            return progress_bar(total, f"features ({name})", verbose=cfg.verbose and info.is_main, unit=d.unit)

        workers = default_num_workers(ds, info.world_size) if cfg.num_workers is None else cfg.num_workers
        batches = None
        if d.decodes_on_device("feature pass"):  # JPEGs decoded on the device, part by part
            batches = device_item_batches(d, ds, "train" if name == "train" else "val", batch_size=batch_size,
                                          device=fs.device, num_workers=workers)
        reports[name] = fill_store(store, ds.view(transform=tf), forward, info, bar=bar, batch_size=batch_size,
                                   num_workers=workers, seed=cfg.seed, batches=batches, device=fs.device)
        _report_masked(store, ds, run.bundle.report, cfg.on_bad_file, say=run.dist.is_main)
        stores[name] = store
    train_dl = stores["train"].batches(cfg.batch_size, seed=cfg.seed, memory_budget=STORE_MEMORY_BUDGET,
                                       device=run.speed.device, rank=info.rank, world_size=info.world_size)
    val_dl = None
    if "val" in stores:
        x, y = _validation_rows(stores["val"])
        val_dl = feature_loader(x, y, batch_size=256, shuffle=False)
    report = feature_report(reports)
    report["head_batches"] = {"mode": train_dl.mode, "reason": train_dl.reason}
    return TrainingData(module=run.model.head, train_loader=train_dl, val_loader=val_dl,  # type: ignore[arg-type]
                        cached=True, stores=stores, report=report)


def device_item_batches(d: Decisions, ds: Any, part: str, *, batch_size: int, device: torch.device,
                        num_workers: int) -> Any:
    """``batches(start, stop, view)`` for `extract_parts`: the items of a store part decoded
    on the device (JPEGs in batches), each view drawing its crops as the CPU path's does."""
    augment = d.augment if part == "train" else "none"

    def batches(start: int, stop: int, view: int) -> DeviceDecodedLoader:
        return DeviceDecodedLoader(ds, d.input_spec, augment=augment, batch_size=batch_size, device=device,
                                   seed=d.config.seed, num_workers=num_workers,
                                   keys=[(i, view) for i in range(start, stop)], checked=True)
    return batches


def feature_report(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The stores' reports combined: ``samples``, ``shards``, ``computed``, ``reused``,
    ``bytes`` and ``masked_samples`` summed over the splits (train, val), ``dtype``, and
    ``splits``: each split's own report. Features held in memory (no ``cache_dir``) report
    ``shards = 0`` and ``path = None``."""
    total = {k: sum(int(r[k]) for r in reports.values())
             for k in ("samples", "shards", "computed", "reused", "bytes", "masked_samples")}
    dtype = {r["dtype"] for r in reports.values()}
    return {**total, "dtype": dtype.pop() if len(dtype) == 1 else sorted(dtype),
            "splits": {name: dict(r) for name, r in reports.items()}}


def _report_masked(store: Any, ds: Any, report: Any, on_bad_file: str = "skip", *, say: bool = True) -> None:
    """Every masked sample of ``store`` into the data report (this run's and those of the
    parts it reused), once per file, with a warning (``say``: under DDP rank 0's, as every rank
    reads the same store); with ``on_bad_file="raise"``, a masked sample of a reused part stops
    the run, as the file would when read."""
    why = store.masked_reasons()
    samples = getattr(ds, "samples", None)
    for i in store.masked_indices():
        name = str(samples[i][0]) if samples is not None else f"item {i}"
        if name in report.bad_at_load:
            continue
        if on_bad_file == "raise":
            raise BadFileError(f"{name!r} failed to load when the features of {str(store.path)!r} were computed (its "
                               "row is masked), and on_bad_file='raise' stops at a file that cannot be read. Remove "
                               "or replace the file, or pass on_bad_file='skip' to leave it out.")
        reason = why.get(i, f"{name}: masked when the feature store was filled")
        report.bad_at_load.append(name)
        report.bad_files.append((name, file_reason(reason.split(": ", 1)[-1])))
        report.warn(f"Left out {name!r}, which failed to load while its features were computed ({reason}); its "
                    f"row of the feature store {str(store.path)!r} is masked. " + replace_advice(reason), say=say)


def _validation_rows(store: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation features (float32, in memory) and targets in the dataset's order; a masked
    sample's row takes the features and the target of the next readable sample of its class
    (else of any class), as the loaders replace a file that fails with the next readable file
    and its label, so that logits and images stay aligned; no metric counts that row
    (`_val_left_out`)."""
    x, y, mask = store.load()
    x = x[0].float()
    if bool(mask.all()):
        return x, y
    good = torch.nonzero(mask).flatten()
    if len(good) == 0:
        raise DataError(f"Every validation sample failed to load (feature store {str(store.path)!r}).")
    for i in torch.nonzero(~mask).flatten().tolist():
        same = good[(y[good] == y[i]).reshape(len(good), -1).all(1)]
        pool = same if len(same) else good
        later = pool[pool > i]
        j = int(later[0] if len(later) else pool[0])
        x[i], y[i] = x[j], y[j]
    return x, y


def input_loaders(d: Decisions, run: Run) -> TrainingData:
    """Loaders over transformed inputs (the model runs end to end every epoch), decoded once
    when the decisions say so, else decoded by the CPU workers or, where the decisions say
    so, on the device (`DeviceDecodedLoader`, the same sampler); under DDP each rank gets its
    shard of the training data and of the validation data (each item once; the outputs are
    gathered, see `transferkit.train.loop.evaluate`), a validation set smaller than the
    number of ranks runs whole on each. Images decoded once into ``cache_dir`` are decoded by
    local rank 0 of each machine (with the machine's workers) while the others wait; in
    memory, each rank decodes its own copy."""
    cfg, dev, info = d.config, run.speed.device, run.dist
    seconds: dict[str, float] = {}
    train_dl: Any
    if d.decodes_on_device("train epochs"):  # JPEGs decoded on the device
        train_dl = DeviceDecodedLoader(run.bundle.train, d.input_spec, augment=d.augment, batch_size=cfg.batch_size,
                                       device=dev, shuffle=True, seed=cfg.seed, num_workers=cfg.num_workers,
                                       drop_last=True, rank=info.rank, world_size=info.world_size)
    else:
        train_ds = _inputs(d, run, "train", d.augment, train_transform(d.input_spec, d.augment), seconds)
        train_dl = make_loader(train_ds, batch_size=cfg.batch_size, shuffle=True, device=dev,
                               num_workers=cfg.num_workers, seed=cfg.seed, drop_last=True, rank=info.rank,
                               world_size=info.world_size)
    val_dl: Any = None
    shards = {"rank": info.rank, "world_size": info.world_size, "pad": False} \
        if run.bundle.val is not None and len(run.bundle.val) >= info.world_size > 1 else {}
    if run.bundle.val is not None and d.decodes_on_device("val epochs"):
        val_dl = DeviceDecodedLoader(run.bundle.val, d.input_spec, augment="none", batch_size=cfg.batch_size,
                                     device=dev, seed=cfg.seed, num_workers=cfg.num_workers, **shards)
    elif run.bundle.val is not None:
        val_ds = _inputs(d, run, "val", "none", eval_transform(d.input_spec), seconds)
        val_dl = make_loader(val_ds, batch_size=cfg.batch_size, shuffle=False, device=dev,
                             num_workers=cfg.num_workers, seed=cfg.seed, **shards)
    return TrainingData(module=run.model, train_loader=train_dl, val_loader=val_dl, cached=False, seconds=seconds)


def _inputs(d: Decisions, run: Run, part: str, augment: str, transform: Any, seconds: dict[str, float]) -> Any:
    ds = run.bundle.train if part == "train" else run.bundle.val
    decided = d.decode_plan(part)
    if decided is None:
        return ds.view(transform=transform)
    t0 = time.perf_counter()
    failed_before = len(run.bundle.report.bad_at_load)
    info = run.dist
    # an entry in cache_dir under DDP: one rank per node (local rank 0) decodes it with the node's workers while
    # the node's other ranks wait, then read it back (a cache_dir shared by the nodes is written by the first)
    one_decoder = decided.path is not None and info.world_size > 1
    decoder = info.local_rank == 0 or not one_decoder
    workers = d.config.num_workers
    if workers is None:
        workers = default_num_workers(ds, info.world_size, alone=one_decoder and decoder)

    def decode() -> tuple[Any, Any]:
        return decoded_dataset(ds, d.input_spec, augment=augment, cache_dir=d.config.cache_dir, num_workers=workers,
                               plan=decided)

    made = local_main_first(info, decode) if one_decoder else decode()
    out, decided = made if made is not None else decode()  # the machine's other ranks read the entry back
    if one_decoder:
        barrier(info)  # every rank has mapped the entry
    if decided.path is not None and len(run.bundle.report.bad_at_load) > failed_before and decoder:
        shutil.rmtree(decided.path, ignore_errors=True)  # so that a later run meets (and reports) the file again
    seconds[f"decode_{part}_s"] = time.perf_counter() - t0
    return out


def set_epoch_mode(d: Decisions, run: Run, epoch: int) -> None:
    """Trainable parameters and train/eval modes at ``epoch``, as the decided policy says."""
    if epoch < d.cached_epochs:
        run.model.head.train()
        return
    apply_policy(run.model, run.backbone, d.policy, epoch=epoch)
    set_train_mode(run.model, run.backbone, d.policy, epoch=epoch)


def start_epoch(d: Decisions, run: Run, epoch: int) -> None:
    """Seed this rank's RNG from ``(rank seed, epoch)`` (dropout; so a resumed run, on every
    rank, draws what the uninterrupted one drew), then set the epoch's modes."""
    seed_everything(mix_seed(d.seeds[d.rank], epoch))
    set_epoch_mode(d, run, epoch)


@dataclass
class TrainOutcome:
    """What [`train`][transferkit.steps.train] returns."""

    history: list[dict[str, Any]]
    best: dict[str, Any]
    state: TrainState
    data: TrainingData  # what the last phase trained on (evaluate on it)
    probe: Any = None
    optimizer: Any = None
    seconds: dict[str, float] = field(default_factory=dict)  # features, decoding, train
    feature_report: dict[str, Any] | None = None  # the cached features' report (see feature_report)
    compile_trial: dict[str, Any] | None = None  # compile="auto" on a trained trunk: what was timed and kept


def metadata(d: Decisions, *, portable: bool = False) -> dict[str, Any]:
    """The metadata checkpoints and exports carry: labels, input spec and task (what a
    predictor reads) and the decisions (the run's record, the configuration inside, stored
    once). ``portable``, for exports: file names and digests instead of the machine's paths."""
    return {"labels": list(d.classes), "input_spec": d.input_spec.to_dict(), "task": d.task,
            "transferkit_version": __version__, "decisions": d.to_dict(portable=portable), "training": {}}


def weights_epoch(d: Decisions, best: dict[str, Any], epochs: int) -> int:
    """The epoch whose weights a finished run of ``epochs`` epochs holds: the best one where it
    restored it (``restore_best``), else the last."""
    return int(best["epoch"]) if d.config.restore_best and best.get("epoch") is not None else epochs


def finished_metadata(d: Decisions, best: dict[str, Any], epochs: int, *, portable: bool = False) -> dict[str, Any]:
    """The metadata of a finished run's checkpoint and export: [`metadata`][transferkit.steps.metadata]
    with the best epoch and the epoch whose weights the file holds (`weights_epoch`: the last,
    not the best, with ``restore_best=False``)."""
    meta = metadata(d, portable=portable)
    meta["training"].update(best=best, weights_epoch=weights_epoch(d, best, epochs))
    return meta


def export_metadata(d: Decisions, best: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The metadata an export carries: `finished_metadata` made portable (unless
    ``portable_metadata=False``)."""
    return finished_metadata(d, best, epochs, portable=d.config.portable_metadata)


def train(d: Decisions, run: Run, *, progress: Any = None, head_phase_only: bool = False) -> TrainOutcome:
    """Train what the decisions say: the scikit-learn probe (``head="logistic"``), or the loop
    with one optimizer, schedule (restarted for each of the policy's phases, ``Policy.lr_phases``),
    gradient scaler and L2-SP penalty over the whole run, the
    per-epoch checkpoint and resume. A run whose first ``cached_epochs`` epochs keep the
    backbone frozen (``fine_tune:frozen=k``) trains the head on cached features for those
    epochs (`Decisions.head_passes` passes over them each, the best kept), then the whole model on decoded
    inputs (features are not computed when a resume starts after that phase). ``head_phase_only``: that
    first phase alone (what the range test of the later epochs starts from)."""
    cfg, k, total = d.config, d.cached_epochs, d.config.epochs
    t1 = time.perf_counter()
    if d.head == "logistic":
        from transferkit.train.probe import run_probe

        td = training_data(d, run, cached=True, progress=progress)
        history, best, probe = run_probe(td.stores, run.model.head, task=cfg.task, Cs=cfg.probe_Cs, seed=cfg.seed,
                                         class_weights=cfg.class_weights, val_failed=td.val_failed)
        return TrainOutcome(history=history, best=best, state=TrainState(), data=td, probe=probe,
                            seconds={**td.seconds, "train_s": time.perf_counter() - t1}, feature_report=td.report)
    meta = metadata(d)
    inputs = training_data(d, run, cached=False) if k < total and not head_phase_only else None
    opt = make_optimizer(cfg.optimizer, run.param_groups(d), lr=d.lr, momentum=cfg.momentum)
    planned = _cached_steps(d)
    steps, timing = _schedule_plan(d, planned, inputs)
    sched = make_scheduler(cfg.schedule, opt, options=cfg.schedule_options, **timing)
    scaler = run.speed.grad_scaler()
    state = TrainState()
    # L2-SP's anchor is the weights training starts from, copied before a resume loads its own
    penalty = policy_penalty(run.model, run.backbone, d.policy, epochs=total)
    if cfg.resume and cfg.checkpoint is not None and Path(cfg.checkpoint).exists():
        stored: dict[str, Any] = {}  # the checkpoint's decisions, as the check reads them

        def check(saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
            stored.update(saved["decisions"])
            return _resume_problems(saved, meta)
        state = resume_from(cfg.checkpoint, check=check, model=run.model, optimizer=opt, scheduler=sched,
                            scaler=scaler)
        _note_moves(stored, meta["decisions"], features_left=state.epoch < k)
    info = run.dist
    tb = TensorBoardLogger(cfg.log_dir) if cfg.log_dir is not None and info.is_main else None
    loop = Loop(optimizer=opt, scheduler=sched, loss_fn=run.loss_fn, set_mode=lambda e: start_epoch(d, run, e),
                speed=run.speed, task=cfg.task, scaler=scaler, dist=info,
                penalty=penalty, monitor=cfg.monitor,
                restore_best=cfg.restore_best, early_stopping=cfg.early_stopping, verbose=cfg.verbose, unit=d.unit,
                head_only_epochs=d.head_only_epochs, val_left_out=_val_left_out(run))
    loop.on_epoch_end = epoch_end_callback(loop, path=cfg.checkpoint, model=run.model, meta=meta, base_lr=d.lr,
                                           callbacks=cfg.callbacks, tensorboard=tb)
    current: dict[str, TrainingData | None] = {"data": inputs}
    seconds = dict(inputs.seconds) if inputs is not None else {}
    report, trial = state.feature_report, None  # resumed after the frozen phase: the report of the run that ran it
    try:
        with training_faults(checkpoint=cfg.checkpoint, batch_size=cfg.batch_size,
                             save_interrupted=lambda: save_interrupted(d, run, meta),
                             probe_step=lambda bs: _probe_step(run, current["data"], bs),
                             started=lambda: loop.steps > 0, resumed=bool(cfg.resume), cache_dir=cfg.cache_dir):
            if state.epoch < k or inputs is None:  # the frozen phase, on features computed once
                td = current["data"] = training_data(d, run, cached=True, progress=progress, norm=state.epoch == 0)
                if len(td.train_loader) != planned:  # files found unreadable: fewer batches than planned
                    steps, timing = _schedule_plan(d, len(td.train_loader), inputs)
                    sched.replan(**timing)
                loop.wrap = _wrapper(run, cached=True)
                loop.speed = head_speed(d, run)
                seconds.update(td.seconds)
                report, state.feature_report = td.report, jsonable(td.report)  # plain data: in checkpoints
                history, best = fit(td.module, td.train_loader, td.val_loader, loop, epochs=k, state=state,
                                    total_epochs=total, prep_s=td.seconds.get("features_s", 0.0), prep_what="features",
                                    passes=d.head_passes)
            if inputs is not None:
                state.best_state = _whole_model_state(run, state.best_state)
                td = current["data"] = inputs
                loop.speed = run.speed
                if run.speed.compile == "trial":  # compile="auto": timed on the steps that train the trunk
                    first = max(k, state.epoch, d.policy.frozen_phase_epochs(run.backbone, total))
                    trial = CompileTrial(steps_left=sum(steps[first:]), estimate_s=compile_estimate(
                        run.speed.device.type, leaf_modules(run.model.trunk), engine="train"),
                        log=loop.log if cfg.verbose and info.is_main else None)
                loop.wrap = _wrapper(run, trial)
                history, best = fit(td.module, td.train_loader, td.val_loader, loop, epochs=total, state=state,
                                    prep_s=sum(v for key, v in inputs.seconds.items() if key.startswith("decode_")),
                                    prep_what="decoding")
    finally:
        if tb is not None:
            tb.close()
    seconds["train_s"] = time.perf_counter() - t1
    return TrainOutcome(history=history, best=best, state=state, data=td, optimizer=opt, seconds=seconds,
                        feature_report=report, compile_trial=trial.finish() if trial is not None else None)


def head_speed(d: Decisions, run: Run) -> SpeedConfig:
    """How a head trains on cached features before the trunk trains (``fine_tune``'s first
    phase): in the decided ``head_precision`` (fp32 under ``precision="auto"``, as feature
    extraction's head), else as the run's training."""
    return replace(run.speed, precision=d.speed.get("head_precision", run.speed.precision))


def report_load_failures(run: Run) -> None:
    """Under DDP each rank loads its own share of the files: every rank's report gains the
    files that another rank found bad while loading (said by the rank that met them, as it met
    them: not again), so the result and the summary of rank 0 list them all; and the training
    classes of which no file loaded (`classes_never_loaded`), as any rank found them (said by
    rank 0)."""
    report, train, classes = run.bundle.report, run.bundle.train, run.bundle.classes
    # a rank that met a class of which no file loads tried every file of it itself (load_or_replace), and
    # names them by its own paths (a copy of the data per node may lie elsewhere): its own report says so
    lost = [(classes[t], example) for t, example in classes_never_loaded(train, report).items()]
    for failures, lost_there in gather_objects((load_failures(report), lost), run.dist):
        for path, reason in failures:
            record_bad_at_load(report, path, reason, say=False)
        for name, example in lost_there:
            record_lost_class(report, name, example, say=run.dist.is_main)
    if run.dist.world_size > 1:  # rows masked by every rank together (one process: its own report said it all)
        for target, example in classes_never_loaded(train, report).items():
            record_lost_class(report, classes[target], example, say=run.dist.is_main)


def _resume_problems(saved: dict[str, Any], meta: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """What differs between a checkpoint's stored decisions and this run's (empty: resumable)."""
    return differences(saved["decisions"], meta["decisions"])


def _note_moves(saved: dict[str, Any], now: dict[str, Any], *, features_left: bool) -> None:
    """Warn when a resume computes on another device, input decoder or (while features are
    still to be computed) feature engine than the checkpoint's run: a resume may change
    them, but they agree with each other within their tolerance, not bit for bit."""
    keys = ["device", "input_decode", *(["feature_engine", "feature_engine_precision"] if features_left else [])]
    moved = [f"{key} {saved.get(key)!r} -> {now.get(key)!r}" for key in keys if saved.get(key) != now.get(key)]
    if moved:
        warn(f"Resuming with {', '.join(moved)} (checkpoint -> now): these compute the same within their "
             "tolerance, not bit for bit, so the resumed run may differ from an uninterrupted one in the "
             "last digits. Resume with the checkpoint's settings for a bit-identical run.")


def _wrapper(run: Run, trial: CompileTrial | None = None, *, cached: bool = False) -> Any:
    """DDP and torch.compile (asked, or its ``trial``) around the trained module, or None.
    ``cached``: the head on cached features, never compiled (a linear layer gains nothing
    worth a compilation)."""
    speed, info = run.speed, run.dist
    if cached:
        return (lambda m: wrap_ddp(m, info, speed.device)) if info.enabled else None
    if not (info.enabled or speed.compile is True or trial is not None):
        return None
    if trial is not None:  # frozen epochs (cache_features=False) run untimed
        return lambda m: trial.wrap(wrap_ddp(m, info, speed.device),
                                    trunk_trains=any(p.requires_grad for p in run.model.trunk.parameters()))
    return lambda m: speed.maybe_compile(wrap_ddp(m, info, speed.device))


def _schedule_plan(d: Decisions, cached: int, inputs: TrainingData | None) -> tuple[list[int], dict[str, Any]]:
    """The optimizer steps per epoch of the run (a frozen epoch makes ``head_passes`` passes of
    ``cached`` steps over its features), and the schedule's timing (`make_scheduler`'s and
    `LRSchedule.replan`'s arguments): ``epoch_steps`` as the schedule counts epochs (each pass
    of a frozen epoch one, as a feature-extraction run of that many epochs counts them, so that
    fine_tune's frozen phase is that run), the total, the warmup and the policy's lr
    ``phases``, in steps."""
    total, k = d.config.epochs, d.cached_epochs
    trunk = len(inputs.train_loader) if inputs is not None else 0
    steps = [cached * d.head_passes] * k + [trunk] * (total - k)
    epoch_steps = [cached] * (k * d.head_passes) + [trunk] * (total - k)
    return steps, {"total_steps": sum(steps), "epoch_steps": epoch_steps,
                   "warmup_steps": steps_in_epochs(d.config.warmup_epochs, epoch_steps),
                   "phases": phase_steps(d.policy.lr_phases(total), steps)}


def steps_in_epochs(epochs: float, epoch_steps: list[int]) -> int:
    """The optimizer steps of the first ``epochs`` epochs (a fraction of one counts its share),
    as they run: epochs on cached features and on images take different numbers of steps.

    Example:
        >>> steps_in_epochs(2, [5, 4, 4]), steps_in_epochs(1.5, [5, 4, 4])
        (9, 7)
    """
    whole = int(epochs)
    return round(sum(epoch_steps[:whole]) + (epochs - whole) * (epoch_steps[whole] if whole < len(epoch_steps) else 0))


def _cached_steps(d: Decisions) -> int:
    """Optimizer steps per epoch on cached features (the feature loader keeps the last, short batch)."""
    n = len(EpochSampler(d.n_train, shuffle=True, rank=d.rank, world_size=d.world_size))
    return -(-n // d.config.batch_size)


def _whole_model_state(run: Run, best: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """The best weights of a frozen phase (the head's state) as the whole model's: the trunk did
    not change in that phase, so its current state is exact."""
    if best is None or any(k.startswith("head.") for k in best):
        return best
    whole = {k: v.detach().clone() for k, v in run.model.state_dict().items() if not k.startswith("head.")}
    return {**whole, **{f"head.{k}": v for k, v in best.items()}}


def evaluate(d: Decisions, run: Run, td: TrainingData, *, outputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validation loss and the task's metrics of the trained model (see `final_metrics`);
    ``outputs`` receives the validation logits and labels. Regression targets listed in a CSV
    are scored as listed (float64), as `transferkit.evaluate` scores them: float32 rounds
    1e9 + 1 to 1e9, and an MSE against the rounded targets said 0. A row whose file failed to
    load holds the file that took its place: no metric counts it (``outputs["kept"]``)."""
    run.model.eval()
    outputs = outputs if outputs is not None else {}
    metrics = final_metrics(td.module, td.val_loader, task=d.task, classes=list(d.classes), loss_fn=run.loss_fn,
                            speed=run.speed, top_k=d.config.top_k, outputs=outputs, dist=run.dist,
                            left_out=_val_left_out(run))
    listed = getattr(run.bundle.val, "listed_targets", None) if d.task == "regression" else None
    exact = listed() if listed is not None else None
    if exact is not None and "logits" in outputs and len(exact) == len(outputs["logits"]):
        kept = outputs["kept"]  # a row whose file failed to load holds another file: counted nowhere
        metrics.update(regression_metrics(outputs["logits"][kept], exact[kept], list(d.classes)))
    return metrics


def _val_left_out(run: Run) -> Any:
    """What the validation passes leave out of their metrics: the validation items whose file
    failed to load (`transferkit.data.late.failed_items`), asked after each pass."""
    val = run.bundle.val
    return None if val is None else (lambda: failed_items(val))


def validation_images(d: Decisions, run: Run, logits: Any, kept: Any) -> tuple[Any, Any]:
    """``(logits, images)`` for the show-results and top-losses grids: the validation set as the
    model sees it (eval transform, uint8), in the order of its logits, both without the rows no
    metric counts (``kept``, the evaluation's mask: a file that failed to load, whose row holds
    the file that took its place)."""
    if run.bundle.val is None or logits is None:
        return logits, None
    rows = None if kept is None or bool(kept.all()) else kept.nonzero().flatten().tolist()
    images = run.bundle.val.view(indices=rows, transform=eval_transform(d.input_spec))
    return (logits if rows is None else logits[rows]), images


def write_outputs(d: Decisions, run: Run, outcome: TrainOutcome, metrics: dict[str, Any], *,
                  logits: torch.Tensor | None = None, kept: torch.Tensor | None = None) -> dict[str, Any]:
    """Rank 0: the final checkpoint (complete: weights, decisions, history; nothing to resume),
    the verified export, then the plots (curves, confusion matrix, and with the validation
    ``logits`` the show-results and top-losses grids; a plot that cannot be written is a warning),
    and the final metrics as TensorBoard scalars under ``final/`` (with ``log_dir``).
    Returns ``{"plots", "checkpoint", "export_report", "seconds"}``."""
    cfg = d.config
    meta = finished_metadata(d, outcome.best, len(outcome.history))
    out: dict[str, Any] = {"plots": {}, "checkpoint": None, "export_report": None, "seconds": {}}
    model = merge_lora(run.model)
    history = dict(epoch=len(outcome.history), history=outcome.history)
    if cfg.checkpoint is not None:  # a failed write keeps the weights in a fallback file and says where
        out["checkpoint"] = save_with_fallback(
            cfg.checkpoint, lambda: save_checkpoint(cfg.checkpoint, model=model, meta=meta, complete=True, **history),
            what="checkpoint", flag="checkpoint", export=cfg.export, model=model, meta=meta, **history)
    if cfg.export is not None:
        t2 = time.perf_counter()
        example = example_inputs(d, run)
        shipped = export_metadata(d, outcome.best, len(outcome.history))
        out["export_report"] = save_with_fallback(
            cfg.export, lambda: export_torchscript(model, cfg.export, metadata=shipped, example_inputs=example),
            what="export", flag="export", model=model, meta=meta, **history)
        out["seconds"]["export_s"] = time.perf_counter() - t2
    try:  # after the model's files: plots that cannot be written (a full disk) do not cost the model
        out["plots"] = write_reports(cfg.plots_dir, outcome.history, metrics, list(d.classes),
                                     frozen_epochs=d.head_only_epochs)
        if cfg.plots_dir is not None and logits is not None and cfg.task == "multiclass":
            from transferkit.train.interpret import write_interpretation

            pictures = write_interpretation(cfg.plots_dir, *validation_images(d, run, logits, kept), list(d.classes))
            pictures.pop("most_confused")
            out["plots"].update(pictures)
    except OSError as exc:
        warn(f"The plots could not be written to {str(cfg.plots_dir)!r} (plots_dir): {exc} The "
             "checkpoint and export, if any, were written before them.")
    if cfg.log_dir is not None:  # the kept model's validation metrics, under final/ at the run's last epoch
        tb = TensorBoardLogger(cfg.log_dir)
        tb.log_metrics(metrics, step=len(outcome.history))
        tb.close()
    return out


def example_inputs(d: Decisions, run: Run, n: int = 8) -> torch.Tensor:
    """Up to ``n`` real inputs (validation data when there are some) for the export's parity check."""
    bundle = run.bundle
    ds = (bundle.val if bundle.val is not None else bundle.train).view(transform=eval_transform(d.input_spec))
    xs = [ds[i][0] for i in range(min(n, len(ds)))]
    return pad_waveforms(xs) if xs[0].ndim == 1 else stack_images(xs)  # audio clips may differ in length


def save_interrupted(d: Decisions, run: Run, meta: dict[str, Any]) -> Path | None:
    """Ctrl-C or SIGTERM before a checkpoint exists (or after training): keep the current weights
    beside the export (or here; else in a fallback place that has room). Under DDP only rank 0
    saves them (a scheduler's SIGTERM reaches every rank, and their weights are the same): the
    other ranks return None."""
    if not run.dist.is_main:
        return None
    export = d.config.export
    path = Path(export).with_suffix(".interrupted.pt") if export is not None else \
        Path.cwd() / "transferkit-interrupted.pt"
    return save_interrupted_weights(path, model=merge_lora(run.model), meta=meta)


def _probe_step(run: Run, td: TrainingData | None, batch_size: int) -> None:
    """One forward and backward pass at ``batch_size`` (to find a batch size that fits in memory)."""
    if td is None:
        raise RuntimeError("out of memory before the training data were ready")
    x, y = next(iter(td.train_loader))
    reps = -(-batch_size // x.shape[0])
    x, y = x.repeat(reps, *([1] * (x.ndim - 1)))[:batch_size], y.repeat(reps, *([1] * (y.ndim - 1)))[:batch_size]
    with run.speed.autocast():
        loss = run.loss_fn(td.module(run.speed.to_device(x)).float(), y.to(run.speed.device))
    loss.backward()
    td.module.zero_grad(set_to_none=True)
