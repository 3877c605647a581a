"""Decisions: every choice of a fine-tuning run, a pure function of the configuration and the facts.

[`decide`][transferkit.decisions.decide] reads a [`FinetuneConfig`][transferkit.FinetuneConfig]
and the [`Facts`][transferkit.facts.Facts] gathered by [`look`][transferkit.facts.look] and
takes each decision once, with its reason: the device and the seed of every rank; whether
the backbone stays frozen, and so whether (and for how many epochs) features are cached;
precision, layout and compile (after the cache decision, so they cannot contradict it);
the head; the base learning rate and every parameter group's lr and weight decay;
augmentation; which blocks train, and which update BatchNorm statistics, in which epoch;
whether images are decoded once. [`Decisions`][transferkit.Decisions] is plain data:
its summary, its JSON record (stored once in every checkpoint and export), the feature-cache
key and the resume check are all derived from it, so none of them can drift from another.

[`plan`][transferkit.decisions.plan] is the dry run: look (without loading weights for training),
decide, and return the decisions.

Example:
    >>> d = plan(FinetuneConfig(backbone="tk:small_cnn", weights=None, data="images/"))  # doctest: +SKIP
    >>> print(d.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import re
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from transferkit.backbones import InputSpec
from transferkit.config import OUTPUT_KEYS, FinetuneConfig, called_as, jsonable, portable_decisions, warmup_example
from transferkit.data import eval_transform, train_transform
from transferkit.data.decoded import DEFAULT_BUDGET_BYTES, DecodePlan, decide_decode, stored_short_side
from transferkit.data.gpu_jpeg import decide_input_decode
from transferkit.data.remote import ENV_BUDGET
from transferkit.errors import ConfigError, PolicyError
from transferkit.checkpoints import saved_run
from transferkit.facts import Facts, Inputs, check_weights_given, environment, look
from transferkit.outputs import check_output_paths
from transferkit.heads import resolve_head_norm, resolve_target_norm
from transferkit.policies import Policy
from transferkit.train.distributed import rank_seeds
from transferkit.train.compile_trial import decide_compile
from transferkit.train.engines import decide_engine, engine_precision
from transferkit.train.feature_store import store_complete
from transferkit.train.features import cache_key
from transferkit.train.optim import default_lr
from transferkit.train.resume import resume_refused
from transferkit.train.speed import decide_speed
from transferkit.train.tasks import monitor_default, target_scale_note

DECISIONS_FORMAT = 3  # 3: each group's rate is the rate it trains at (2: at the base rate, a phase's factor left out)
# decisions that may differ when resuming (where the run runs, not what it computes; whether
# torch.compile is tried depends on the machine: a C++ compiler, the number of processes)
_PLACE_KEYS = frozenset({"device", "feature_engine", "feature_engine_reason",
                         "feature_engine_precision", "input_decode", "input_decode_reason", "compile",
                         "cache_reason", "cache_read_only"})  # the words of the cache decision and whether
# cache_dir is read-only (its place); the decision itself (feature_cache, cached_epochs, cache_views) is compared


@dataclass(frozen=True)
class Decisions:
    """Every decision of a run, with its reasons (see the module docstring). Plain data:
    ``to_dict()`` is its JSON record."""

    config: FinetuneConfig
    backbone: str
    weights: Any
    weights_file: str | None  # a weights file as name@digest (what a portable record keeps)
    input_spec: InputSpec
    task: str
    classes: tuple[str, ...]
    num_outputs: int
    n_train: int
    n_val: int
    device: str
    device_type: str
    rank: int
    world_size: int
    seeds: tuple[int, ...]
    policy: Policy
    frozen: bool  # no backbone weight trains in any epoch
    cache: bool  # every epoch trains the head alone on cached features
    cached_epochs: int  # leading epochs on cached features (all with `cache`; fine_tune:frozen=k: k)
    cache_reason: str
    speed: dict[str, Any]  # precision, feature_precision, channels_last, compile and their reasons
    head: str
    head_hidden: tuple[int, ...]
    head_norm: bool
    # regression with target_norm: the training targets' mean, std (per output; a CSV's all targets, a Dataset's
    # estimated from those read before training), constant flags and n, which the
    # head's TargetScale and the loss standardise by; None: targets in their own units (or labels)
    target_norm: dict[str, Any] | None
    augment: str
    lr: float
    groups: tuple[dict[str, Any], ...]  # name, lr, weight_decay, params
    trainable: tuple[tuple[str, ...], ...]  # blocks that train in each epoch
    bn_updates: tuple[tuple[str, ...], ...]  # blocks whose BatchNorm statistics update in each epoch
    bn_mode: str
    class_weights: tuple[float, ...] | None
    decode: dict[str, dict[str, Any]]  # part -> where its decoded pixels go (mode, reason, key, path, ...)
    data: dict[str, Any]  # names and digests of the data
    trunk_fingerprint: str | None  # input spec, trunk structure and weights (None: a dry run)
    data_fingerprints: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # warnings the run prints once
    # feature-engine hook (train/engines.py): the engine of the frozen feature pass, and why
    engine: str = "eager"
    engine_reason: str = "no frozen feature pass"
    # where the passes that decode image files decode them (data/gpu_jpeg.py): "where" ("cpu" or
    # "gpu"), "reason", "passes" (the passes that decode files: "feature pass", "train epochs", ...)
    input_decode: dict[str, Any] = field(default_factory=lambda: {"where": "cpu", "reason": "not decided",
                                                                  "passes": []})
    pretrained: bool = True  # the trunk starts from trained weights (a Backbone object's own: see BackboneFacts)
    cache_read_only: str | None = None  # why cache_dir cannot be written: read, never written (None: writable)
    # the order of the images the epochs read: "shuffled", or "shard by shard" (remote shards that the shard
    # cache cannot hold at once; decoded images and cached features are shuffled whole)
    sample_order: str = "shuffled"
    l2sp_anchor: str | None = None  # under L2-SP, the digest of the trunk's parameters training starts from
    # blocks whose parameters all did not require gradients as the backbone was made: never in `trainable`
    fixed_blocks: tuple[str, ...] = ()

    @property
    def epochs(self) -> int:
        return self.config.epochs

    @property
    def head_only_epochs(self) -> int:
        """The epochs at the start that train the head alone before some later epoch trains the
        backbone (``fine_tune``'s first phase, a gradual schedule's first steps); 0 when the
        backbone trains from the first epoch or never (feature extraction)."""
        return head_only_epochs(self.trainable)

    @property
    def unit(self) -> str:
        """What one sample is called in progress bars: ``"clip"`` for audio, else ``"img"``."""
        return "clip" if self.input_spec.kind == "audio" else "img"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def decode_plan(self, part: str) -> DecodePlan | None:
        """The decode-once decision for ``part`` (``"train"``/``"val"``), or None."""
        d = self.decode.get(part)
        return None if d is None else DecodePlan(**{**d, "path": None if d["path"] is None else Path(d["path"])})

    def to_dict(self, *, portable: bool = False) -> dict[str, Any]:
        """The decisions as plain JSON data (saved in checkpoints and exports: the configuration
        is stored here, once). ``portable``: paths reduced to file names, the weights file to
        ``name@digest`` (no absolute paths of the training machine)."""
        s = self.speed
        out = jsonable({
            "format": DECISIONS_FORMAT, "config": self.config.to_dict(),
            "backbone": self.backbone, "weights": self.weights, "weights_file": self.weights_file,
            # what L2-SP pulls toward (the trunk training starts from): a resume given other weights is refused
            **({"l2sp_anchor": self.l2sp_anchor} if self.policy.l2sp is not None else {}),
            "input_spec": self.input_spec.to_dict(),
            "task": self.task, "classes": list(self.classes), "num_outputs": self.num_outputs,
            "device": self.device_type, "world_size": self.world_size, "seeds": list(self.seeds),
            "precision": s["precision"], "feature_precision": s["feature_precision"],
            "head_precision": s.get("head_precision", s["precision"]),
            "channels_last": s["channels_last"], "compile": s["compile"], "speed_reasons": s["reasons"],
            "policy": str(self.policy), "frozen": self.frozen, "feature_cache": self.cache,
            "cached_epochs": self.cached_epochs, "cache_reason": self.cache_reason,
            "cache_read_only": self.cache_read_only, "sample_order": self.sample_order,
            "head": {"kind": self.head, "hidden": list(self.head_hidden), "norm": self.head_norm,
                     "target_norm": self.target_norm is not None,
                     "activation": self.config.head_activation, "dropout": float(self.config.head_dropout or 0.0)},
            "targets": self.target_norm, "augment": self.augment, "lr": self.lr, "class_weights": self.class_weights,
            "bn": self.bn_mode,
            "trainable": _epoch_ranges(self.trainable), "bn_statistics_update": _epoch_ranges(self.bn_updates),
            **({"fixed_blocks": list(self.fixed_blocks)} if self.fixed_blocks else {}),
            "groups": [dict(g) for g in self.groups], "data": self.data,
            "decode_once": sorted(self.decode),  # memory or disk: the same pixels
            "feature_engine": self.engine, "feature_engine_reason": self.engine_reason,  # feature-engine hook
            "feature_engine_precision":  # what the features are computed in on that engine (ONNX Runtime: fp32)
                s["feature_precision"] and engine_precision(self.engine, s["feature_precision"]),
            "input_decode": self.input_decode["where"], "input_decode_reason": self.input_decode["reason"],
            # a Backbone object's get_backbone options (None: built otherwise), which config.backbone_options (a
            # name's) cannot hold: what rebuilds it from a checkpoint
            **({} if isinstance(self.config.backbone, str) else
               {"backbone_options": getattr(self.config.backbone, "build_options", None)}),
        })
        return portable_decisions(out) if portable else out

    def decodes_on_device(self, what: str = "feature pass") -> bool:
        """Whether the pass ``what`` (``"feature pass"``, ``"train epochs"``, ``"val epochs"``)
        decodes its JPEGs on the device."""
        return self.input_decode["where"] == "gpu" and what in self.input_decode["passes"]

    def summary(self) -> str:
        """A few readable lines: what will run, and why."""
        s, cfg = self.speed, self.config
        where = self.device + (f", rank {self.rank} of {self.world_size}" if self.world_size > 1 else "")
        features = ("cached" if self.cache else "cached, then not" if self.cached_epochs else "not cached")
        phases = self.policy.lr_phases(cfg.epochs)
        affine = self.policy.bn == "affine" and self.bn_mode == GAMMA_BETA_TRAIN  # gamma/beta train too
        epochs_text = _epoch_text(self.trainable, cfg.epochs, lora=self.policy.lora, bn_affine=affine)
        ratio = phases[0][1] / phases[1][1] if len(phases) > 1 and phases[1][1] else 1.0  # the groups' rates: phase 2's
        alone = (f"of the head at lr {self.lr * phases[0][1]:.3g} and every block's BatchNorm gamma/beta at its "
                 f"block's rate of this phase ({ratio:.3g} x its group's rate below)"
                 if affine else f"of the head alone at lr {self.lr * phases[0][1]:.3g}")
        groups = ", ".join(f"{g['name']} lr {g['lr']:.3g} wd {g['weight_decay']:g}" for g in self.groups[:4])
        if len(self.groups) > 4:
            groups += f", ... ({len(self.groups)} groups)"
        if groups and len(phases) > 1:
            groups += f" (from epoch {phases[0][0] + 1}, the rates of the phase that trains them)"
        lines = [
            f"plan: {self.backbone} ({self.weights or ('its own weights' if self.pretrained else 'random init')}) -> "
            f"{self.head} head, "
            f"{self.num_outputs} outputs ({self.task})",
            f"  data:     {self.n_train} train / {self.n_val} val, "
            f"{_plural(len(self.classes), *_CLASS_WORDS[self.task])}, "
            f"input {_input(self.input_spec)}, augment {self.augment}",
            f"  policy:   {self.policy}; {epochs_text}",
            f"  batchnorm: {self.bn_mode}",
            f"  features: {features} ({self.cache_reason})",
        ]
        if self.task == "regression":
            lines.append(f"  targets:  {_targets_text(self.target_norm, self.classes)}")
        if self.cached_epochs:  # feature-engine hook
            lines.append(f"  engine:   {self.engine} ({self.engine_reason})")
        if "train" in self.decode:
            lines.append(f"  images:   {self.decode['train']['reason']}")
        if self.input_decode["passes"]:
            lines.append(f"  decoding: {self.input_decode['where']} ({self.input_decode['reason']})")
        lines += [
            f"  optim:    {cfg.optimizer}, base lr {self.lr:.3g}{' (default)' if cfg.lr is None else ''}, "
            f"{cfg.schedule} schedule" + (f" after a warmup of {cfg.warmup_epochs:g} "
                                          f"{'pass' if self.head_passes > 1 else 'epoch'}"
                                          f"{'' if cfg.warmup_epochs == 1 else 'es' if self.head_passes > 1 else 's'}"
                                          if cfg.warmup_epochs and cfg.schedule != "one_cycle" else "") +
            f", {_plural(cfg.epochs, 'epoch')} x batch {cfg.batch_size}",
        ]
        if len(phases) > 1:  # fine_tune: one schedule per phase
            passes = f" ({self.head_passes} passes over the cached features per epoch, the best kept)" \
                if self.head_passes > 1 else ""
            lines.append(f"  phases:   {_plural(phases[0][0], 'epoch')} {alone}{passes}, then "
                         f"{_plural(phases[1][0], 'epoch')} at lr {self.lr * phases[1][1]:.3g} (x {phases[1][1]:g}), "
                         f"each with its own {cfg.schedule} schedule")
        if groups:
            lines.append(f"  groups:   {groups}")
        lines += [
            f"  runtime:  {where}, seed {cfg.seed}" + (f" (ranks: {list(self.seeds)})" if self.world_size > 1 else ""),
            *(f"  speed:    {line}" for line in _speed_lines(s, features=self.cached_epochs > 0, engine=self.engine,
                                                           provisional=self.engine_reason.startswith("provisional"),
                                                           trunk_runs=not self.cache)),
        ]
        return "\n".join(lines)

    @property
    def head_passes(self) -> int:
        """Passes of the head over the data per frozen epoch, its best kept: the policy's
        ``head_passes`` (0: the run's epochs) when the frozen phase trains on cached features
        and the backbone trains after it, else 1 (each pass would run the backbone; or a frozen
        phase as long as the run makes it feature extraction, as its plan says)."""
        return head_passes(self.policy, self.cached_epochs, self.config.epochs)

    @property
    def cached_augment(self) -> str:
        """The augmentation of the cached training features: the run's, except for one view
        cached for a frozen phase that precedes training the backbone (``fine_tune``): the
        clean eval view, as feature extraction caches it (one random crop per image is a worse
        training set for the head than the image itself; the backbone's epochs augment)."""
        if self.config.cache_views == 1 and 0 < self.cached_epochs < self.config.epochs:
            return "none"
        return self.augment

    def feature_key_parts(self, part: str) -> dict[str, Any]:
        """Everything that changes cached features of ``part``: the backbone and its options, the
        preprocessing and trunk (their weights and structure; not the head), the transform,
        precision, layout and device type, the views and their seed whenever the transform is
        random, and the data's identity."""
        transform = train_transform(self.input_spec, self.cached_augment) if part == "train" else \
            eval_transform(self.input_spec)
        random_views = part == "train" and self.cached_augment != "none"
        # feature-engine hook: another engine, another key (eager keeps the keys of earlier versions)
        engine = {} if self.engine == "eager" else {"engine": self.engine}
        # JPEGs decoded on the device (nvJPEG, full size then resized) differ slightly from Pillow's
        decoder = {"decoder": "device"} if self.decodes_on_device() else {}  # the CPU keeps the earlier keys
        # options as plain data: a callable is its type name (its repr would hold a per-process address)
        options = {"backbone_options": jsonable(self.config.backbone_options)} if self.config.backbone_options else {}
        return {**decoder, "backbone": self.backbone, **options, "weights": self.trunk_fingerprint,
                "transform": repr(transform),
                "precision": engine_precision(self.engine, self.speed["feature_precision"]), **engine,
                "channels_last": self.speed["channels_last"] if self.engine != "onnxruntime" else None,  # ORT: its own
                "device": self.device_type, "views": self.config.cache_views if part == "train" else 1,
                "seed": self.config.seed if random_views else None, "data": self.data_fingerprints.get(part)}

    @property
    def feature_dtype(self) -> str:
        """The dtype a feature store under ``cache_dir`` keeps features in: the precision the
        engine computes them in (bf16 features take half the bytes; ONNX Runtime computes fp32).
        Features held in memory (no ``cache_dir``) are float32 whatever this says."""
        precision = engine_precision(self.engine, self.speed["feature_precision"])
        return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")

    def feature_key(self, part: str) -> str:
        """The feature-cache key of ``part`` (``"in-memory"`` without ``cache_dir``)."""
        if self.config.cache_dir is None:
            return "in-memory"
        if self.trunk_fingerprint is None:
            raise ConfigError("These decisions come from a dry run (weights not loaded): they have no feature key.")
        return cache_key(self.feature_key_parts(part))


def decide(config: FinetuneConfig, facts: Facts) -> Decisions:
    """Take every decision of the run ``config`` describes, from ``facts`` (see the module docstring).
    A pure function: no I/O, no global state.

    Example:
        >>> from transferkit.facts import look
        >>> cfg = FinetuneConfig(backbone="tk:small_cnn", weights=None, data="images/", epochs=2)  # doctest: +SKIP
        >>> decide(cfg, look(cfg)[0]).cache  # doctest: +SKIP
        True
    """
    cfg, bb, data, pol = config, facts.backbone, facts.data, facts.policy
    monitor = cfg.monitor or monitor_default(cfg.task)[0]
    why = ("val_split=0 and no val_data" if not cfg.val_split else
           f"val_split={cfg.val_split} held out no example of the {data.n_train}")
    if cfg.early_stopping is not None and monitor.startswith("val_") and data.n_val == 0:
        raise ConfigError(f"early_stopping={cfg.early_stopping} watches {monitor}, but the run has no validation data "
                          f"({why}). Give validation data (val_split=0.2, or val_data=), or "
                          "watch the training loss (monitor='train_loss').")
    if cfg.monitor is not None and cfg.monitor.startswith("val_") and data.n_val == 0:
        raise ConfigError(f"monitor={cfg.monitor!r} picks the best epoch by a validation score, but the run has no "
                          f"validation data ({why}). Give validation data (val_split=0.2, or "
                          f"val_data=), or pick it by the training {cfg.monitor[len('val_'):]} "
                          f"(monitor='train_{cfg.monitor[len('val_'):]}').")
    frozen_epochs = pol.frozen_phase_epochs(list(bb.blocks), cfg.epochs, has_batchnorm=bb.has_batchnorm)
    frozen = frozen_epochs >= cfg.epochs
    cached_epochs, reason = _cache_decision(cfg, pol, frozen_epochs, facts.head, read_only=facts.cache_read_only)
    cache = cached_epochs >= cfg.epochs
    compile_on, compile_why = decide_compile(cfg.compile, device_type=facts.device.type,  # train/compile_trial.py
                                             epochs=cfg.epochs - frozen_epochs, world_size=facts.device.world_size,
                                             unavailable=facts.device.compile_unavailable,
                                             shapes=_changing_shapes(data.kind, bb.input_spec))
    if compile_on is True and cache:  # the trunk never runs in the loop
        compile_on, compile_why = False, ("compile=True is not used: every epoch trains a head on cached features, "
                                          "which runs eager")
    speed = decide_speed(device_type=facts.device.type, bf16=(facts.device.bf16, facts.device.bf16_why),
                         precision=cfg.precision, channels_last=cfg.channels_last, compile=compile_on,
                         kind=data.kind, conv=(bb.conv_share, bb.n_conv), layout_timed=bb.layout_timed,
                         cached=cache, features=cached_epochs > 0)
    speed["reasons"]["compile"] = compile_why
    engine, engine_reason, engine_note = _engine_decision(cfg, facts, speed, cached_epochs)  # feature-engine hook
    augment = cfg.augment or ("standard" if not cache or cfg.cache_views > 1 else "none")
    if augment == "none" and cfg.cache_views > 1:
        raise ConfigError("cache_views > 1 needs random augmentation; set augment='standard' or 'flip'.")
    lr = default_lr(head_only=frozen, head_first=len(pol.lr_phases(cfg.epochs)) > 1) if cfg.lr is None \
        else float(cfg.lr)
    decode = _decode_decision(cfg, facts, augment, cached_epochs)
    template = bb.head_groups if cache else bb.groups
    phase_lr = lr * _group_phase_factor(pol, cfg.epochs)  # the rate the groups train at (fine_tune: its 2nd phase)
    scheduled = pol.schedule(list(bb.blocks), cfg.epochs)
    _check_trains_something(pol, scheduled, list(bb.blocks), batchnorm_only=bb.batchnorm_only, fixed=bb.fixed_blocks,
                            idle_at_frozen_bn=bb.idle_at_frozen_bn)
    trainable = tuple(tuple(b for b in blocks if b not in bb.fixed_blocks) for blocks in scheduled)  # `training_blocks`
    trained = {b for blocks in trainable for b in blocks}
    kept = [n for n, block in bb.fixed if block in trained]
    idle = [b for b in bb.fixed_blocks if any(b in blocks for blocks in scheduled)]
    notes = _unused_settings(cfg, pol, head_passes(pol, cached_epochs, cfg.epochs))
    notes += _policy_options_unused(pol, cached_epochs=cached_epochs, cache_reason=reason, frozen=frozen,
                                    pretrained=bb.pretrained, trains_blocks=any(trainable))
    if cfg.feature_engine not in ("auto", "eager") and not cached_epochs:
        notes.append(f"feature_engine={cfg.feature_engine!r} is not used: this run has no cached feature pass "
                     f"({reason}); it applies to a frozen backbone whose features are cached.")
    notes += [engine_note] if engine_note else []
    if cfg.compile is True and not compile_on:  # asked for, on a run whose trunk never trains
        notes.append(compile_why + ".")
    notes += _settings_unused(cfg, pol, head=facts.head, kind=data.kind, cached_epochs=cached_epochs, frozen=frozen,
                              cache_reason=reason, decode=decode, n_val=data.n_val,
                              batchnorm=bb.has_batchnorm or bb.tracks_statistics)
    notes += _outputs_unused(cfg, trainable, n_classes=len(data.classes))
    if kept:
        notes.append(f"Parameters of blocks this run trains that did not require gradients when the backbone was "
                     f"made stay as they are ({len(kept)}, e.g. {kept[0]!r}); to train them, set requires_grad=True on "
                     "them before making the backbone (a module frozen by an earlier run: "
                     "module.requires_grad_(True), then from_module).")
    if idle:
        holds, it, its = ("holds", "it", "its") if len(idle) == 1 else ("hold", "they", "their")
        notes.append(f"{_plural(len(idle), 'block')} the policy unfreezes ({', '.join(idle)}) {holds} only "
                     f"parameters that did not require gradients when the backbone was made: {it} "
                     f"{'stays' if len(idle) == 1 else 'stay'} frozen, in eval mode with {its} BatchNorm statistics "
                     f"kept. To train {'it' if len(idle) == 1 else 'them'}, set requires_grad=True on those parameters "
                     "before making the backbone (a module frozen by an earlier run: module.requires_grad_(True), "
                     "then from_module).")
    stalled = sorted((phase_lr * g["lr_scale"], g["name"]) for g in template
                     if g["params"] and phase_lr * g["lr_scale"] < LOST_LR)
    if stalled:
        rate, name = stalled[0]
        notes.append(f"{_plural(len(stalled), 'parameter group')} train at a learning rate below {LOST_LR:g} (the "
                     f"smallest, {name!r}, at {rate:.2g}): a step that small leaves a float32 weight as it is (the "
                     "float32 values next to a weight of 0.01 are about 1e-9 apart), so those blocks stay as they "
                     "were while the run counts them as trained. Raise the policy's discriminative= or layer_decay= "
                     "(or lr), or freeze those blocks (e.g. unfreeze:last=N).")
    target_norm = resolve_target_norm(cfg.target_norm, task=cfg.task)
    if data.targets is not None:
        scale_note = target_scale_note(data.targets, data.classes, standardised=target_norm)
        notes += [scale_note] if scale_note else []
    if frozen and not cache and cfg.cache_features is False:
        notes += _uncached_differences(cfg, speed, augment, pretrained=bb.pretrained, head_kind=facts.head)
    if bb.spec_augment and not any(trainable) and pol.lora is None:  # the trunk runs in eval mode throughout
        still = "" if frozen else " (BatchNorm gamma/beta train under bn=affine, with the blocks in eval mode)"
        notes.append("spec_augment has no effect in this run: SpecAugment masks in training mode only, and no "
                     f"block of the backbone trains (in training mode) in any epoch{still}. Train the backbone (e.g. "
                     "policy='fine_tune') for it, or augment the waveforms (augment='standard' with cache_views > 1).")
    if pol.frozen_epochs and frozen:
        notes.append(f"policy {pol} keeps the backbone frozen for {_plural(pol.frozen_epochs, 'epoch')} but the "
                     f"run has {cfg.epochs}: the backbone never trains (this is feature extraction); raise epochs "
                     f"above {pol.frozen_epochs} to fine-tune.")
    elif pol.is_gradual and frozen:
        first = pol.every or pol.milestones[0]
        notes.append(f"policy {pol} unfreezes its first block at epoch {first + 1} but the run has {cfg.epochs}: "
                     f"the backbone never trains (this is feature extraction); raise epochs above {first} or "
                     "unfreeze earlier to fine-tune.")
    sample_order = "shard by shard" if data.shard_by_shard and not cache \
        and decode.get("train", {}).get("mode", "off") == "off" else "shuffled"
    if sample_order == "shard by shard":
        once = ", or decode the images once (decode_once=True), which reads them once in shard order and " \
            "shuffles globally" if data.kind == "image" else ""
        notes.append("The training samples are drawn shard by shard (the shards in an order seeded by the epoch, the "
                     "samples shuffled within each), since the remote training shards do not fit the shard cache: "
                     "each is then fetched about once per epoch, in another order than a global shuffle. Set "
                     f"{ENV_BUDGET} above their size for a global shuffle{once}.")
    return Decisions(
        config=cfg, backbone=bb.name, weights=bb.weights, weights_file=bb.weights_digest, input_spec=bb.input_spec,
        task=cfg.task, classes=data.classes, num_outputs=data.num_outputs, n_train=data.n_train, n_val=data.n_val,
        device=facts.device.device, device_type=facts.device.type, rank=facts.device.rank,
        world_size=facts.device.world_size, seeds=tuple(rank_seeds(cfg.seed, facts.device.world_size)), policy=pol,
        frozen=frozen, cache=cache, cached_epochs=cached_epochs, cache_reason=reason, speed=speed, head=facts.head,
        head_hidden=facts.head_hidden,
        head_norm=resolve_head_norm(cfg.head_norm, cached=cache, cached_first=cached_epochs > 0,
                                    pretrained=bb.pretrained, head_kind=facts.head),
        target_norm=data.targets if target_norm else None, augment=augment,
        lr=lr, groups=tuple({"name": g["name"], "lr": phase_lr * g["lr_scale"], "weight_decay": g["weight_decay"],
                             "params": g["params"]} for g in template),
        trainable=trainable, bn_updates=_bn_updates(pol, bb.statistics_blocks, trainable, cached_epochs),
        bn_mode=_bn_mode(pol, bb.has_batchnorm, bb.tracks_statistics, frozen), class_weights=data.class_weights,
        decode=decode, data=data.identity,
        trunk_fingerprint=bb.fingerprint, data_fingerprints=dict(data.fingerprints), notes=tuple(notes),
        l2sp_anchor=bb.anchor, fixed_blocks=bb.fixed_blocks,
        engine=engine, engine_reason=engine_reason,
        input_decode=_input_decode_decision(cfg, facts, cached_epochs, decode), pretrained=bb.pretrained,
        cache_read_only=facts.cache_read_only if cfg.cache_dir is not None else None,
        sample_order=sample_order)


LOST_LR = 1e-10
"""A learning rate below which a step changes no float32 weight of ordinary size (a plan note)."""


def head_only_epochs(trainable: Sequence[Sequence[str]]) -> int:
    """The epochs at the start that train the head alone before some later epoch trains the
    backbone (``trainable``: each epoch's training blocks); 0 when the backbone trains from the
    first epoch or never. Early stopping does not count them (`transferkit.train.loop`)."""
    return next((e for e, blocks in enumerate(trainable) if blocks), 0)


def head_passes(policy: Policy, cached_epochs: int, epochs: int) -> int:
    """Passes of the head over the cached features per frozen epoch (see `Decisions.head_passes`)."""
    if not cached_epochs or (cached_epochs >= epochs and not policy.head_passes):
        return 1
    return policy.head_passes or epochs


def _unused_settings(cfg: FinetuneConfig, pol: Policy, passes: int) -> list[str]:
    """Notes for optimisation settings that do nothing, or not what they say, in this run (a
    ``warmup_epochs`` as long as the run, or the phase it warms up: the rate climbs to its end
    and never reaches lr; one longer than ``fine_tune``'s first phase is refused: its rate
    would jump where the next phase starts). ``passes``: the head's passes per frozen epoch,
    each an epoch of the schedule."""
    notes = []
    phases = pol.lr_phases(cfg.epochs)
    first = phases[0][0] * passes  # the first phase, in the schedule's epochs
    if cfg.warmup_epochs and cfg.warmup_epochs >= first and cfg.schedule != "one_cycle":
        each = f" of {passes} passes each, {first} epochs of the schedule" if passes > 1 else ""
        fix = f"Use warmup_epochs < {first:g}, e.g. {warmup_example(first):g}."
        if len(phases) > 1 and cfg.warmup_epochs > first:
            raise ConfigError(f"warmup_epochs={cfg.warmup_epochs:g} is longer than the first phase of policy {pol} "
                              f"({_plural(phases[0][0], 'epoch')}{each}), the one it warms up: each phase restarts the "
                              f"schedule at its own rate, so the head would never reach lr. {fix}")
        where = f"the first phase of policy {pol}" if len(phases) > 1 else "the run"
        notes.append(f"warmup_epochs={cfg.warmup_epochs:g} is as long as {where} ({_plural(phases[0][0], 'epoch')}"
                     f"{each}): the rate climbs to its end and never reaches lr (the warmup's last step is still "
                     f"below it). {fix}")
    if cfg.schedule == "one_cycle" and cfg.warmup_epochs:
        notes.append(f"warmup_epochs={cfg.warmup_epochs:g} is not used: the one_cycle schedule warms up itself "
                     "(schedule_options pct_start and div_factor).")
    if cfg.optimizer != "sgd" and cfg.momentum != FinetuneConfig.__dataclass_fields__["momentum"].default:
        notes.append(f"momentum={cfg.momentum:g} is not used: it is SGD's (optimizer='sgd'); {cfg.optimizer} keeps "
                     "its own moment estimates (betas 0.9, 0.999).")
    if pol.l2sp is not None and cfg.weight_decay != FinetuneConfig.__dataclass_fields__["weight_decay"].default:
        notes.append(f"weight_decay={cfg.weight_decay:g} is not used: L2-SP ({pol}) replaces weight decay, pulling the "
                     "backbone toward its starting weights (l2sp) and the head toward zero (l2sp_beta).")
    return notes


def _policy_options_unused(pol: Policy, *, cached_epochs: int, cache_reason: str, frozen: bool,
                           pretrained: bool, trains_blocks: bool = True) -> list[str]:
    """Notes for a policy's options that do nothing, or not what they say, in this run: the
    head's ``passes`` without cached features, L2-SP on a backbone that does not train, whose
    pretrained weights do not (LoRA without blocks: ``trains_blocks`` False) or that starts
    from random weights, ``decay_norm_bias`` under L2-SP (which has no weight decay)."""
    notes = []
    if pol.frozen_epochs and pol.head_passes != 1 and not cached_epochs and not frozen:
        passes = "passes=epochs" if pol.head_passes == 0 else f"passes={pol.head_passes}"
        notes.append(f"The frozen epochs of policy {pol} make several passes of the head ({passes}) over cached "
                     f"features, and this run caches none ({cache_reason}): each frozen epoch is one pass over the "
                     "images, so the frozen phase is not the feature-extraction run it is on cached features.")
    if pol.l2sp is not None and frozen:
        notes.append(f"l2sp={pol.l2sp:g} is not used: no backbone weight trains in this run, so nothing is pulled "
                     f"toward its starting weights; the head is still pulled toward zero (l2sp_beta={pol.l2sp_beta:g}) "
                     "in place of weight decay. Drop l2sp for plain feature extraction.")
    elif pol.l2sp and pol.lora is not None and not trains_blocks and pol.bn != "affine":
        notes.append(f"l2sp={pol.l2sp:g} pulls no weight: under LoRA no pretrained weight trains (the factors learn "
                     f"the change), so nothing is pulled toward its starting weights; the LoRA factors and the head "
                     f"are pulled toward zero by l2sp_beta={pol.l2sp_beta:g}, in place of weight decay. Name blocks "
                     "to train as well (lora:...,last=k) for l2sp to keep them near their starting weights.")
    elif pol.l2sp and not pretrained:  # (l2sp=0 pulls nothing: noted below)
        notes.append(f"l2sp={pol.l2sp:g} pulls the backbone toward its starting weights, and this run starts from "
                     "random ones (weights=None): L2-SP keeps a pretrained backbone near what it learned. Give "
                     "pretrained weights, or drop l2sp.")
    if pol.l2sp == 0 and not frozen:
        notes.append(f"l2sp=0 pulls no backbone weight toward its starting weights: this run is L2-SP at alpha 0 (no "
                     f"weight decay anywhere, the head pulled toward zero by l2sp_beta={pol.l2sp_beta:g}), not the "
                     "policy without l2sp, which decays every weight.")
    if pol.l2sp is not None and pol.decay_norm_bias:
        notes.append("decay_norm_bias=true is not used: L2-SP replaces weight decay, so no parameter has any.")
    lower = [f"{k}={getattr(pol, k):g}" for k in ("discriminative", "layer_decay") if getattr(pol, k) is not None]
    if lower and not frozen and any(getattr(pol, k) == 1 for k in ("discriminative", "layer_decay")):
        notes.append(f"{lower[0]} lowers no rate: every block trains at the rate of the head (a factor of 1 per "
                     "block), as without it. Give a factor below 1 (e.g. 0.5) for lower rates toward the input.")
    if lower and frozen and pol.bn == "affine":  # on a trunk without BatchNorm: nothing of the backbone trains
        notes.append(f"{lower[0]} is not used: no backbone parameter trains in this run, so no block gets a lower "
                     "rate; the head trains at lr.")
    return notes


def _settings_unused(cfg: FinetuneConfig, pol: Policy, *, head: str, kind: str, cached_epochs: int, frozen: bool,
                     cache_reason: str, decode: dict[str, Any], n_val: int, batchnorm: bool) -> list[str]:
    """Notes for settings that this run accepts and that do nothing in it (a head's activation
    without a hidden layer, an audio setting on images, ...), said once like the others."""
    default = {k: f.default for k, f in FinetuneConfig.__dataclass_fields__.items()}
    notes = []
    if head == "logistic":  # fitted once by scikit-learn, its C chosen on the validation data
        given = [f"{k}={getattr(cfg, k)!r}" for k in ("epochs", "lr", "optimizer", "schedule", "warmup_epochs",
                                                       "weight_decay", "momentum", "head_norm")
                 if getattr(cfg, k) != default[k]]
        if given:
            notes.append(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not used: head='logistic' is fitted "
                         "once by scikit-learn on standardised features, its regularisation C chosen among probe_Cs "
                         "on the validation data. Use head='linear' to train a head by epochs.")
    if cfg.head_activation != default["head_activation"] and head != "mlp":
        notes.append(f"head_activation={cfg.head_activation!r} is not used: a {head} head has no hidden layer "
                     "(head='mlp' has one).")
    if cfg.decode_once is True and not decode:
        notes.append("decode_once=True is not used: decoding once pays from the second epoch that runs the trunk on "
                     f"image files, and this run has none or one ({cache_reason}).")
    if kind == "image" and cfg.max_seconds != default["max_seconds"]:
        notes.append(f"max_seconds={cfg.max_seconds} is not used: it crops audio clips, and this run's inputs are "
                     "images.")
    if cfg.cache_views > 1 and not cached_epochs:
        notes.append(f"cache_views={cfg.cache_views} is not used: no epoch trains on cached features "
                     f"({cache_reason}).")
    if cfg.val_data is not None and cfg.val_split != default["val_split"]:
        notes.append(f"val_split={cfg.val_split:g} is not used: val_data= gives the validation data, so nothing is "
                     "held out of the training data.")
    if cfg.schedule == "plateau" and not n_val:
        notes.append("schedule='plateau' steps on the training loss: it lowers the rate when the validation loss "
                     "stops improving, and this run has no validation data.")
    if isinstance(cfg.policy, str) and cfg.policy.split(":")[0].strip() == "unfreeze" and pol.unfreeze == "none" \
            and pol.unfreeze_from is None:
        notes.append(f"policy {cfg.policy!r} unfreezes no block: this run is {pol} (the backbone frozen).")
    # bn= as given: the default (train) too where it is written out in the policy's text
    given = pol.bn != "train" or (isinstance(cfg.policy, str) and re.search(r"\bbn\s*=\s*train\b", cfg.policy))
    if given and not batchnorm:  # neither gamma/beta to train nor statistics to freeze
        notes.append(f"bn={pol.bn} is not used: the trunk holds no BatchNorm layer (other norms, such as LayerNorm, "
                     "train with their blocks).")
    elif given and frozen:
        notes.append(f"bn={pol.bn} is not used: the backbone is frozen for every epoch, its BatchNorm layers in eval "
                     "mode with their statistics as they are.")
    return notes


def _outputs_unused(cfg: FinetuneConfig, trainable: tuple[tuple[str, ...], ...], *, n_classes: int) -> list[str]:
    """Notes for an ``early_stopping`` that cannot stop the run (the first epoch, or the last
    of a head-only phase, is an improvement, and early stopping waits for the backbone: the
    earliest stop follows that epoch by ``early_stopping`` epochs) and a ``top_k`` given
    where no top-k accuracy is computed (only for 1 < k < the number of classes)."""
    notes = []
    if cfg.early_stopping is not None:
        waits = max(head_only_epochs(trainable), 1)  # the epochs early stopping waits for, or the first
        if waits + cfg.early_stopping >= cfg.epochs:
            most = cfg.epochs - waits - 1  # the largest that can end the run before its last epoch
            fix = "train longer" if most < 1 else "use early_stopping=1" if most == 1 else \
                f"use early_stopping={most} or less"
            after = "the last of the head-only phase, whose epochs do not count" if waits > 1 else \
                "the first, always the best so far"
            notes.append(f"early_stopping={cfg.early_stopping} cannot shorten this run: its earliest stop is after "
                         f"epoch {waits + cfg.early_stopping} ({cfg.early_stopping} without improvement after epoch "
                         f"{waits}, {after}), and the run has {_plural(cfg.epochs, 'epoch')}; {fix}.")
    default_k = FinetuneConfig.__dataclass_fields__["top_k"].default
    if cfg.top_k != default_k and cfg.task != "multiclass":
        notes.append(f"top_k={cfg.top_k} is not used: the top-k accuracy is a metric of task='multiclass', and this "
                     f"run's task is {cfg.task!r}.")
    elif cfg.top_k != default_k and not n_classes > cfg.top_k > 1:
        notes.append(f"top_k={cfg.top_k} is not used: a top-k accuracy is computed for k from 2 to one less than the "
                     f"classes, and this run has {n_classes}" + (" (the top-1 accuracy is the accuracy)"
                                                                 if cfg.top_k == 1 else "") + ".")
    return notes


def _check_trains_something(pol: Policy, scheduled: list[list[str]], blocks: list[str], *,
                            batchnorm_only: tuple[str, ...], fixed: tuple[str, ...],
                            idle_at_frozen_bn: tuple[str, ...]) -> None:
    """Refuse a schedule (of the trunk's ``blocks``, bottom to top) with an epoch whose unfrozen
    blocks train no weight: blocks whose parameters all did not require gradients when the
    backbone was made (``fixed``: a module frozen by an earlier run) or, under ``bn=frozen``,
    are each such a parameter or BatchNorm gamma/beta (``idle_at_frozen_bn``, which holds the
    blocks of ``batchnorm_only``: a DenseNet's last block ``norm``; a gradual schedule whose
    first step unfreezes such a block). That epoch trains no backbone weight, yet it would run
    the backbone end to end instead of on cached features. The advice names the count of top
    blocks that reaches one whose weights train."""
    if pol.lora is not None:
        return
    idle = set(idle_at_frozen_bn if pol.bn == "frozen" else fixed)
    for epoch, unfrozen in enumerate(scheduled):
        if not unfrozen or not set(unfrozen) <= idle:
            continue
        batchnorm = pol.bn == "frozen" and bool(set(unfrozen) - set(fixed))  # some of them hold BatchNorm gamma/beta
        held = [*(["BatchNorm gamma/beta, which bn=frozen keeps frozen"] if batchnorm else []),
                *(["parameters that did not require gradients when the backbone was made (a module frozen by an "
                   "earlier run: module.requires_grad_(True), then from_module, lets them train)"]
                  if set(unfrozen) - set(batchnorm_only) or set(unfrozen) & set(fixed) else [])]
        first = next((k for k, b in enumerate(reversed(blocks), 1) if b not in idle), None)  # counted from the top
        when = f" in epoch {epoch + 1}" if pol.is_gradual else ""
        if first is None:  # no block of this trunk has a weight that trains
            fix = ""
        elif pol.is_gradual and first < len(blocks):
            above = f", and max above {first}" if pol.max_blocks is not None and pol.max_blocks <= first else ""
            fix = f"Start with more blocks unfrozen (start={first}{above}), "
        elif pol.is_gradual:  # only the bottom block trains a weight: a gradual schedule has nothing left to add
            every = dataclasses.replace(pol, every=None, milestones=(), unfreeze=first, max_blocks=None)
            fix = f"Train every block from the start ({str(every)!r}), "
        else:
            fix = f"Unfreeze a block whose weights train (e.g. last={first}), "
        bn = "let BatchNorm train (bn=affine or bn=train), " if batchnorm else ""
        raise PolicyError(f"The policy {str(pol)!r} trains no backbone weight{when}: the blocks it unfreezes "
                          f"({', '.join(unfrozen)}) hold only {' and '.join(held)}. {fix}{bn}"
                          f"{'or use' if fix or bn else 'Use'} policy='feature_extraction' for a frozen backbone.")


def _input_decode_decision(cfg: FinetuneConfig, facts: Facts, cached_epochs: int,
                           decode: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Where the passes that decode image files decode them (`decide_input_decode`), and
    which passes those are: the frozen feature pass, and the end-to-end epochs of each part
    whose images are not decoded once."""
    if facts.backbone.input_spec.kind == "audio" and cfg.input_decode != "gpu":
        where, reason = "cpu", "audio: the CPU workers read the clips (soundfile)"
    else:
        where, reason = decide_input_decode(cfg.input_decode, device_type=facts.device.type, facts=facts.input_decode)
    passes: list[str] = []
    if facts.input_decode.get("census") is not None:
        if cached_epochs:
            passes.append("feature pass")
        if cfg.epochs > cached_epochs:
            parts = ["train"] + (["val"] if facts.data.n_val else [])
            passes += [f"{part} epochs" for part in parts if part not in decode]
    if where == "gpu" and not passes:
        where, reason = "cpu", "every pass reads images decoded once (decode_once)"
    return {"where": where, "reason": reason + (f"; for the {', '.join(passes)}" if where == "gpu" else ""),
            "passes": passes}


def _engine_decision(cfg: FinetuneConfig, facts: Facts, speed: dict[str, Any],
                     cached_epochs: int) -> tuple[str, str, str | None]:
    """Feature-engine hook: the engine of the frozen feature pass from the facts' timing, why,
    and a note when a stored timing's winner cannot be prepared by this run (``"unprepared"``:
    its export is gone and cannot be written again), so the next engine runs the pass."""
    e = facts.engines
    if not cached_epochs or not e:
        unused = f"; feature_engine={cfg.feature_engine!r} is not used" if cfg.feature_engine != "auto" else ""
        return "eager", f"no cached feature pass{unused}", None
    if cfg.feature_engine == "auto" and e.get("pending"):
        return "eager", e["pending"], None
    if cfg.feature_engine == "auto" and e.get("cached"):
        return e["cached"], ("this input's features are in cache_dir already, every part complete: the engines "
                             "are not timed"), None

    def decide_from(measured: dict[str, dict[str, Any]] | None) -> tuple[str, str]:
        return decide_engine(cfg.feature_engine, device_type=facts.device.type, available=e["available"],
                             measured=measured, n_images=e["n_images"], world_size=facts.device.world_size,
                             precision=speed["feature_precision"],
                             unit="clips" if facts.backbone.input_spec.kind == "audio" else "images")

    engine, reason = decide_from(e["measured"])
    why = (e["measured"] or {}).get(engine, {}).get("unprepared")
    if cfg.feature_engine != "auto" or not why:
        return engine, reason, None
    unprepared = engine
    engine, reason = decide_from({**e["measured"], unprepared: {"error": why, "stored": True}})
    return engine, reason, (f"feature_engine='auto' runs the feature pass on {engine}, not on {unprepared} as the "
                            f"stored timing says: {why}.")


@called_as("plan()")
def plan(config: Any = None, /, **options: Any) -> Decisions:
    """The dry run: look at the device, the backbone's structure (its weights are not loaded)
    and the data, decide, and return the [`Decisions`][transferkit.Decisions]; nothing trains
    and no feature is computed. ``transferkit finetune ... --dry-run`` prints its summary.
    Called as `finetune` is: ``plan("tv:resnet18", data=...)`` or ``plan(cfg, **changes)``.

    Example:
        >>> d = plan("tk:small_cnn", weights=None, data="images/", epochs=2)  # doctest: +SKIP
        >>> d.cache, d.lr  # doctest: +SKIP
        (True, 0.01)
    """
    cfg = FinetuneConfig.from_call(config, options)
    env = environment(cfg)
    if env[0].is_main:  # what the run refuses before it builds anything (nothing is created or held here)
        check_output_paths(cfg)
    check_weights_given(cfg)
    facts, _ = look(cfg, env=env, load_weights=False)
    decisions = decide(cfg, facts)
    if cfg.resume:
        _check_resumes(cfg, decisions)
    return decisions


def cached_engine(cfg: FinetuneConfig, facts: Facts, inputs: Inputs) -> str | None:
    """Under ``feature_engine="auto"``, when the engine timing is due: the engine (eager first,
    then the candidates, then the engines that cannot run here) whose features of this run's
    input are all in ``cache_dir`` already, every part of every store complete; None when no
    engine's are. A run that finds them reads them: timing the engines again (``engines.json``
    removed, another number of threads) could choose another engine and compute every feature
    again under its key."""
    due = facts.engines.get("due")  # [] where no other engine can run here
    if due is None or cfg.cache_dir is None:
        return None
    d = decide(cfg, facts)  # the decisions but the engine's (not timed yet), which make the keys
    parts = [("train", d.n_train, cfg.cache_views)] + ([("val", d.n_val, 1)] if d.n_val else [])
    # engines that cannot run here too (ONNX Runtime not installed): stored features need none to be read
    others = [e for e in facts.engines.get("available", {}) if e != "eager" and e not in due]
    for engine in ("eager", *due, *others):
        de = replace(d, engine=engine)
        if all(store_complete(cfg.cache_dir, de.feature_key(part), num_samples=n, dim=inputs.backbone.num_features,
                              dtype=de.feature_dtype, views=views) for part, n, views in parts):
            return engine
    return None


def _check_resumes(cfg: FinetuneConfig, decisions: Decisions) -> None:
    """Refuse, as the resume does, settings that differ from those of the checkpoint's run (the
    configuration, the policy and the data's digest; what needs the weights or the data read
    whole is compared by the resume itself)."""
    found = saved_run(cfg.checkpoint) if cfg.checkpoint is not None else None
    stored = found[1].get("decisions") if found is not None and found[0] == "checkpoint" else None
    if not isinstance(stored, dict):
        return
    diff = {k: v for k, v in differences(stored, decisions.to_dict()).items()
            if k.startswith("config.") or k in ("policy", "data")}
    if diff:
        raise resume_refused(cfg.checkpoint, diff)


# a record of before a key existed, read as the value it means there: whatever the run of now has (`AS_NOW`:
# the key was not recorded then, so it is compared without it)
AS_NOW = object()
# keys added after records were first written, as (part, key), part None for a top-level key, with the value a
# record without them means: the option's default; the head's behaviour then (a regression run of then differs
# from one of now in its head); a Backbone object's options, recorded since exports are rebuilt from them
ADDED_DECISIONS: dict[tuple[str | None, str], Any] = {
    ("config", "target_norm"): "auto", ("head", "target_norm"): False, (None, "backbone_options"): AS_NOW,
    (None, "sample_order"): AS_NOW, (None, "l2sp_anchor"): AS_NOW}


def differences(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved, now)}`` for every decision two records disagree on (a resume must agree
    on all of them; output paths, verbosity and the device may differ). A record written
    before a decision existed reads as the behaviour it had then (`ADDED_DECISIONS`)."""
    saved = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for (part, key), before in ADDED_DECISIONS.items():
        into, of_now = (saved, now) if part is None else (saved.get(part), now.get(part))
        if isinstance(into, dict) and key not in into:
            if before is not AS_NOW:
                into[key] = before
            elif isinstance(of_now, dict) and key in of_now:
                into[key] = of_now[key]
    if "head_precision" not in saved and "precision" in saved:  # a head phase trained at the training precision then
        saved["head_precision"] = saved["precision"]
    if saved.get("format") == 2 and now.get("format") == DECISIONS_FORMAT:  # group rates at the base rate then
        saved["groups"], saved["format"] = _groups_at_phase_rates(saved), DECISIONS_FORMAT
    if isinstance(saved.get("input_spec"), dict):  # as recorded now (an audio spec without image fields)
        saved["input_spec"] = InputSpec.from_dict(saved["input_spec"]).to_dict()
    diff: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(saved) | set(now)):
        if key == "config":
            a, b = saved.get("config", {}), now.get("config", {})
            for k in sorted(set(a) | set(b)):
                if k == "policy" and (a.get(k) == "<Policy>" or ("policy" in saved and "policy" in now)):
                    continue  # as given ("gradual: every=1", an alias, a Policy object): the decided policy,
                    # compared below in its one spelling, says what it is
                if k not in OUTPUT_KEYS and a.get(k) != b.get(k) and not _same_resolved(k, saved, now):
                    diff[f"config.{k}"] = (a.get(k), b.get(k))
        elif key == "groups":
            if not _same_groups(saved.get(key), now.get(key)):
                diff[key] = (saved.get(key), now.get(key))
        elif key == "weights_file":  # the content of a named backbone's weights file (its path is config.weights;
            # a record of before it was kept has none, and is compared without it)
            a, b = _content(saved.get(key)), _content(now.get(key))
            if a is not None and b is not None and a != b and _named_backbone(now):
                diff[key] = (saved.get(key), now.get(key))
        elif key == "trainable":  # a record of before fixed blocks were left out lists them where its policy did
            a = _without_blocks(saved.get(key), now.get("fixed_blocks") or ())
            if a != now.get(key):
                diff[key] = (saved.get(key), now.get(key))
        elif key == "data":  # the digests say whether the data differ; the per-class counts say how
            if _without_counts(saved.get(key)) != _without_counts(now.get(key)):
                diff[key] = (saved.get(key), now.get(key))
        elif key not in _PLACE_KEYS and key not in _DESCRIPTIONS and saved.get(key) != now.get(key):
            diff[key] = (saved.get(key), now.get(key))
    return diff


# words that describe what the compared decisions (the policy, the blocks that train, the trunk) make of the
# trunk: a record whose description was worded otherwise (before the statistics were counted per block) resumes
_DESCRIPTIONS = frozenset({"speed_reasons", "bn", "bn_statistics_update", "fixed_blocks"})


def _without_blocks(ranges: Any, blocks: Sequence[str]) -> Any:
    """A record's ``trainable`` epoch ranges (`_epoch_ranges`) without ``blocks``."""
    if not blocks or not isinstance(ranges, list):
        return ranges
    try:
        per_epoch = [tuple(b for b in r["blocks"] if b not in blocks) for r in ranges
                     for _ in range(r["epochs"][0], r["epochs"][1] + 1)]
    except (KeyError, TypeError, IndexError):  # not a record of this form: compared as it is
        return ranges
    return _epoch_ranges(tuple(per_epoch))


def _without_counts(identity: Any) -> Any:
    """A record's data identity without its per-class counts (a record written before them has none)."""
    if not isinstance(identity, dict):
        return identity
    return {k: {n: v for n, v in part.items() if n != "per_class"} if isinstance(part, dict) else part
            for k, part in identity.items()}


# settings whose value the record holds as decided (a path of keys in it): two runs that decided the same
# (augment=None, decided "standard", and augment="standard") compute the same
_RESOLVED = {"augment": ("augment",), "lr": ("lr",), "precision": ("precision",), "channels_last": ("channels_last",),
             "head_norm": ("head", "norm")}


def _same_resolved(key: str, saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether setting ``key``, given differently, was decided the same in both records."""
    a = decided_setting(key, saved)
    return a is not None and a == decided_setting(key, now)


def settings_changed(record: dict[str, Any], options: dict[str, Any]) -> list[str]:
    """The settings of ``options`` that differ from those of the run whose decisions are
    ``record`` (``"epochs 4 -> 10"``): what a run that is complete would not use. Compared as
    written, a resolved one also against what was decided (`decided_setting`); output paths
    and places (`OUTPUT_KEYS`), the policy and the weights (aliases, paths: a resume compares
    them by their decisions) and values other than numbers and text are left out.

    Example:
        >>> settings_changed({"config": {"epochs": 4, "precision": "auto"}, "precision": "fp32"},
        ...                  {"epochs": 10, "precision": "fp32", "export": "m.pt"})
        ['epochs 4 -> 10']
    """
    stored, plain = record.get("config") or {}, (bool, int, float, str)
    return [f"{k} {stored[k]!r} -> {v!r}" for k, v in options.items()
            if k not in OUTPUT_KEYS and k not in ("policy", "weights") and isinstance(v, plain)
            and isinstance(stored.get(k), plain) and v != stored[k] and v != decided_setting(k, record)]


def decided_setting(key: str, record: dict[str, Any]) -> Any:
    """What the record of decisions ``record`` (`Decisions.to_dict`) decided for the setting
    ``key`` where a setting is resolved (``precision="auto"`` -> ``"bf16"``; ``lr=None`` -> the
    default rate), else None: a setting given as its decided value asks for the same run.

    Example:
        >>> decided_setting("precision", {"precision": "fp32"}), decided_setting("epochs", {})
        ('fp32', None)
    """
    value: Any = record if key in _RESOLVED else None
    for part in _RESOLVED.get(key, ()):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _named_backbone(record: dict[str, Any]) -> bool:
    """Whether a record's backbone was given by name (its weights loaded from the file the run
    names); a Backbone object holds its weights already, whatever its file holds now."""
    name = (record.get("config") or {}).get("backbone")
    return isinstance(name, str) and not name.startswith("<")


def _content(weights_file: Any) -> Any:
    """The digest of a recorded weights file (``name@blake2b:...``), without its name."""
    return weights_file.partition("@")[2] if isinstance(weights_file, str) else weights_file


def _same_groups(a: Any, b: Any) -> bool:
    """Whether two records' optimizer groups agree: the same names, weight decays and parameter
    counts, and rates equal to rounding (a rate is a product of factors, in either order)."""
    if not (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)):
        return a == b
    return all(isinstance(x, dict) and isinstance(y, dict) and x.keys() == y.keys()
               and all(_close(x[k], y[k]) if k == "lr" else x[k] == y[k] for k in x)
               for x, y in zip(a, b))


def _group_phase_factor(policy: Policy, epochs: int) -> float:
    """The factor of the base rate that the optimizer groups train at: the last phase's
    (``fine_tune:frozen=k``: ``unfrozen_lr`` from epoch k+1; the head alone trains before)."""
    return policy.lr_phases(epochs)[-1][1]


def _groups_at_phase_rates(record: dict[str, Any]) -> Any:
    """A format-2 record's groups with the rates they train at (format 2 stored the base rate)."""
    groups, epochs = record.get("groups"), (record.get("config") or {}).get("epochs")
    try:
        factor = _group_phase_factor(Policy.parse(str(record.get("policy"))), int(epochs))
        return [{**g, "lr": g["lr"] * factor} for g in groups]
    except (PolicyError, TypeError, ValueError, KeyError):  # a record this cannot read: compared as it is
        return groups


def _close(a: Any, b: Any) -> bool:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return math.isclose(a, b, rel_tol=1e-9) if numbers else a == b


def _changing_shapes(kind: str, spec: InputSpec) -> str | None:
    """Why training batches change shape from one step to the next, or None: audio without
    ``clip_seconds`` is padded to each batch's longest clip (images are resized to one size)."""
    if kind == "audio" and not spec.clip_seconds:
        return "audio clips of different lengths (no clip_seconds; it gives one shape)"
    return None


def _cache_decision(cfg: FinetuneConfig, policy: Policy, frozen_epochs: int, head_kind: str, *,
                    read_only: str | None = None) -> tuple[int, str]:
    """How many leading epochs run on cached features (all, the frozen phase, or none), and why
    (``read_only``: why ``cache_dir`` cannot be written; its stores are then read, never written)."""
    frozen = frozen_epochs >= cfg.epochs
    if head_kind == "logistic" and not frozen:
        raise ConfigError(f"head='logistic' fits its probe on the features of a frozen backbone; policy {policy} "
                          "trains the backbone. Use policy='feature_extraction' for the probe, or head='linear' to "
                          "train a head together with the backbone.")
    if cfg.cache_features is True and not frozen:
        raise ConfigError(f"cache_features=True needs a policy that keeps the backbone frozen; {policy} trains it. "
                          "Use policy='feature_extraction' (or cache_features='auto').")
    if head_kind == "logistic" and cfg.label_smoothing:
        raise ConfigError(f"head='logistic' fits scikit-learn's LogisticRegression, which has no label smoothing; "
                          f"label_smoothing={cfg.label_smoothing} would be ignored. Drop it, or use head='linear'.")
    if head_kind == "logistic" and cfg.cache_features is False:
        raise ConfigError("head='logistic' fits its probe once, on features computed once; cache_features=False "
                          "(the backbone run in every epoch) does not apply to it. Drop cache_features=False, or use "
                          "head='linear' to train a head by epochs without the cache.")
    if frozen_epochs == 0:
        blocks_frozen = policy.unfreeze == "none" and policy.unfreeze_from is None  # what trains is beside the blocks
        what = "LoRA factors in the backbone" if blocks_frozen and policy.lora is not None else \
            "the backbone's BatchNorm gamma/beta" if blocks_frozen and policy.bn == "affine" else "backbone weights"
        return 0, f"policy {policy} trains {what} from epoch 1"
    if cfg.cache_features is False:
        return 0, "cache_features=False: the frozen backbone runs in every epoch"
    where = f"on disk in {cfg.cache_dir}" if cfg.cache_dir is not None else "in memory"
    if cfg.cache_dir is not None and read_only is not None:
        where = f"read from {cfg.cache_dir} (read-only: {read_only}; read, never written)"
    views = f"{cfg.cache_views} augmented views" if cfg.cache_views > 1 else \
        "one view" + (" (augmented)" if cfg.augment not in (None, "none") and frozen else "")
    if frozen:
        every = "its epoch" if cfg.epochs == 1 else f"all {cfg.epochs} epochs"
        return cfg.epochs, f"backbone frozen for {every}: computed once, {views}, {where}"
    return frozen_epochs, (f"backbone frozen for the first {_plural(frozen_epochs, 'epoch')}: the head trains on "
                           f"features computed once ({views}, {where}), then the backbone trains end to end")


def _uncached_differences(cfg: FinetuneConfig, speed: dict[str, Any], augment: str, *, pretrained: bool,
                          head_kind: str) -> list[str]:
    """A note for a frozen run with ``cache_features=False``: what it does otherwise than the same
    run on cached features (not only the time), where anything does."""
    differ = []
    if cfg.augment is None and augment != "none":
        differ.append(f"the training images are augmented (augment={augment!r}, the default where the backbone runs "
                      "every epoch; augment='none' gives the cached run's images)")
    cached_norm = resolve_head_norm(cfg.head_norm, cached=True, cached_first=True, pretrained=pretrained,
                                    head_kind=head_kind)
    if cached_norm and not resolve_head_norm(cfg.head_norm, cached=False, cached_first=False, pretrained=pretrained,
                                             head_kind=head_kind):
        differ.append("the head has no FeatureNorm (its statistics come from features computed in advance)")
    if speed["precision"] != "fp32":
        differ.append(f"the head trains in {speed['precision']} with the backbone (on cached features, in fp32)")
    if not differ:
        return []
    return [f"cache_features=False: besides running the frozen backbone every epoch, this run differs from the same "
            f"run on cached features: {'; '.join(differ)}."]


GAMMA_BETA_TRAIN = "statistics frozen, gamma/beta train"  # the BatchNorm line of bn="affine" on gamma/beta


def _bn_mode(policy: Policy, has_bn: bool, tracks: bool, frozen: bool) -> str:
    """What BatchNorm layers do in this run, in words: ``has_bn``, the trunk's blocks hold
    BatchNorm gamma/beta; ``tracks``, some layer keeps running statistics (BatchNorm without
    gamma/beta, an InstanceNorm that tracks them)."""
    if not has_bn and not tracks:
        return "none in the trunk"
    if frozen:
        return "eval statistics (the backbone is frozen)"
    if policy.bn == "train" and policy.lora is not None:  # LoRA factors leave their blocks' statistics as they were
        if policy.unfreeze == "none" and policy.unfreeze_from is None:
            return "eval statistics in every block (LoRA factors leave the statistics of the blocks they adapt as " \
                   "they were)"
        return "statistics update in the unfrozen blocks, eval elsewhere (LoRA factors leave the statistics of the " \
               "blocks they adapt as they were)"
    affine = GAMMA_BETA_TRAIN if has_bn else "statistics frozen (its BatchNorm layers have no gamma/beta to train)"
    return {"train": "statistics update in training blocks, eval elsewhere", "affine": affine,
            "frozen": "frozen entirely"}[policy.bn]


def _bn_updates(policy: Policy, statistics: tuple[str | None, ...], trainable: tuple[tuple[str, ...], ...],
                cached_epochs: int) -> tuple[tuple[str, ...], ...]:
    """Per epoch, the blocks whose BatchNorm running statistics update (the others run in eval
    mode): the training blocks that hold such statistics under ``bn="train"``, none under
    ``affine``/``frozen``. ``statistics``: the blocks the layers with running statistics follow
    (None: one outside every block, which updates whenever some block trains)."""
    if not statistics or policy.bn != "train":
        return tuple(() for _ in trainable)
    return tuple(() if e < cached_epochs else tuple(b for b in blocks if b in statistics or None in statistics)
                 for e, blocks in enumerate(trainable))


def _decode_decision(cfg: FinetuneConfig, facts: Facts, augment: str, cached_epochs: int) -> dict[str, dict[str, Any]]:
    """Decode-once decisions for the training and validation images, when the backbone runs
    end to end for 2+ epochs on image files (see `transferkit.data.decoded`)."""
    census = facts.data.decode
    if cfg.decode_once is False or facts.data.kind != "image" or cfg.epochs - cached_epochs < 2 \
            or "train" not in census:
        if cfg.decode_once is True and cfg.epochs - cached_epochs >= 2 and "train" not in census:
            raise ConfigError("decode_once=True cannot be honoured: the training data are not image files.")
        return {}
    ranks = max(facts.device.local_world_size, 1)  # each rank of a node holds its own copy in memory
    budget = DEFAULT_BUDGET_BYTES // ranks
    shared = f", shared by the {ranks} ranks on it" if ranks > 1 else ""
    out = {}
    for part in ("train", "val"):  # one budget for both parts: training's first
        if part in census:
            why = f" of {DEFAULT_BUDGET_BYTES / 2**20:.0f} MB per machine{shared}" if budget < DEFAULT_BUDGET_BYTES \
                else ""
            out[part] = decide_decode(census[part], budget_bytes=budget, budget_why=why)
            if out[part].mode == "memory":
                budget -= out[part].estimate_bytes
    if cfg.decode_once is True and out["train"].mode == "off":
        raise ConfigError(f"decode_once=True cannot be honoured: {out['train'].reason}.")
    if augment == "standard" and out["train"].mode != "off":  # the crops' pixels are the stored image's
        side = stored_short_side(facts.backbone.input_spec)
        out["train"] = dataclasses.replace(out["train"], reason=f"{out['train'].reason}; random crops are cut from "
                                                                f"the images kept at {side} px on their shorter side")
    return {part: {"mode": d.mode, "estimate_bytes": d.estimate_bytes, "reason": d.reason, "key": d.key,
                   "path": None if d.path is None else str(d.path), "capacity_bytes": d.capacity_bytes}
            for part, d in out.items() if d.mode != "off"}


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _speed_lines(s: dict[str, Any], *, features: bool, engine: str = "eager", provisional: bool = False,
                 trunk_runs: bool = True) -> list[str]:
    """The plan's speed lines. ``provisional``: the engine is chosen when the run starts (a dry
    run does not time it), and the features' precision is that engine's; ``trunk_runs``: some
    epoch runs the trunk in the loop (not every epoch trains a head on cached features)."""
    r = s["reasons"]
    out = []
    if features and engine_precision(engine, s["feature_precision"]) != s["feature_precision"]:
        out.append(f"features {engine_precision(engine, s['feature_precision'])} (the {engine} engine computes in it; "
                   f"eager would run {s['feature_precision']}: {r.get('feature_precision', 'set directly')})")
    elif features:
        then = "; provisional, as the engine: another engine may compute in fp32" if provisional and \
            s["feature_precision"] != "fp32" else ""
        out.append(f"features {s['feature_precision']} ({r.get('feature_precision', 'set directly')}{then})")
    out.append(f"training {s['precision']} ({r.get('precision', 'set directly')})")
    if features and s.get("head_precision", s["precision"]) != s["precision"]:
        out.append(f"head phase {s['head_precision']} (the head trains in {s['head_precision']} on the cached "
                   "features, as feature extraction does; the trunk's epochs in the training precision)")
    layout = f"{'channels_last' if s['channels_last'] else 'contiguous'} ({r.get('channels_last', 'set directly')})"
    if features and engine == "onnxruntime" and not trunk_runs:  # the one pass of the trunk: ONNX Runtime's
        layout = f"memory layout: ONNX Runtime's own in the feature pass, the only pass of the trunk (eager would " \
                 f"run {layout})"
    out.append(layout)
    if s["compile"]:
        out.append(f"{'compile trial' if s['compile'] == 'trial' else 'compile'} ({r.get('compile', 'asked')})")
    elif "not tried" in r.get("compile", ""):  # compile="auto" on a trunk that trains, and why it is not tried
        out.append(f"eager, not compiled ({r['compile']})")
    return out


_CLASS_WORDS = {"multiclass": ("class", "classes"), "multilabel": ("label", "labels"),
                "regression": ("output", "outputs")}


def _targets_text(stats: dict[str, Any] | None, names: tuple[str, ...]) -> str:
    """The plan's line on regression targets: standardised (by what), or in their own units."""
    if stats is None:
        return "in their own units (target_norm=False): the loss is their mean squared error"
    each = "; ".join((f"{names[j]!r}: " if len(names) > 1 else "") + f"mean {m:.4g}, std {sd:.4g}"
                     for j, (m, sd) in enumerate(zip(stats["mean"][:3], stats["std"][:3])))
    more = f", ... ({len(names)} outputs)" if len(names) > 3 else ""
    return (f"standardised in training ({each}{more}; from {stats['n']} training targets); outputs in the "
            "targets' units")


def _input(spec: InputSpec) -> str:
    if spec.kind != "audio":
        return f"{spec.image_size} px"
    clip = f" in clips of {spec.clip_seconds:g} s (longer ones cropped, shorter padded)" if spec.clip_seconds else ""
    return f"{spec.sample_rate} Hz audio{clip}"


def _epoch_ranges(per_epoch: tuple[tuple[str, ...], ...]) -> list[dict[str, Any]]:
    """``[{"epochs": [first, last], "blocks": [...]}, ...]`` (1-based, inclusive) from per-epoch block lists."""
    out: list[dict[str, Any]] = []
    for e, blocks in enumerate(per_epoch, start=1):
        if out and out[-1]["blocks"] == list(blocks):
            out[-1]["epochs"][1] = e
        else:
            out.append({"epochs": [e, e], "blocks": list(blocks)})
    return out


def _epoch_text(per_epoch: tuple[tuple[str, ...], ...], epochs: int, *, lora: int | None = None,
                bn_affine: bool = False) -> str:
    """What trains in each range of epochs: the head, the LoRA factors of rank ``lora`` and,
    with ``bn_affine``, every block's BatchNorm gamma/beta (both in every epoch), and the blocks.

    Example:
        >>> print(_epoch_text(((), ("layer4",)), 2, bn_affine=True).replace("; ", "\\n"))
        epoch 1: head + BatchNorm gamma/beta of every block
        epoch 2: head + BatchNorm gamma/beta of every block + layer4
        >>> _epoch_text(((), ("layer4",)), 2)
        'epoch 1: head only; epoch 2: head + layer4'
    """
    parts = []
    head = "head" if lora is None else f"head + rank-{lora} LoRA factors"
    head += " + BatchNorm gamma/beta of every block" if bn_affine else ""
    for r in _epoch_ranges(per_epoch):
        a, b = r["epochs"]
        when = f"epoch {a}" if a == b else f"epochs {a}-{b}"
        blocks = r["blocks"]
        if not blocks:
            what = head if bn_affine else f"{head} only"
        else:
            what = f"{head} + " + (f"{len(blocks)} blocks ({blocks[0]}..{blocks[-1]})" if len(blocks) > 3 else
                                   ", ".join(blocks))
        parts.append(f"{when}: {what}")
    return "; ".join(parts) if len(parts) > 1 else parts[0].split(": ", 1)[1] + f" for {_plural(epochs, 'epoch')}"
