"""``finetune()``: config -> facts -> decisions -> run -> steps, and nothing else.

[`look`][transferkit.facts.look] gathers the facts, [`decide`][transferkit.decisions.decide]
takes every decision, [`build`][transferkit.run.build] makes the live run, and every step is
a public function in [`transferkit.steps`][transferkit.steps] that a recipe can call on its own.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferkit.backbones import Backbone
from transferkit._io import check_writable, remove_stale_temps
from transferkit.config import FinetuneConfig, unknown_key_error
from transferkit.data import DataReport
from transferkit.errors import ConfigError
from transferkit.export.torchscript import ExportReport
from transferkit.model import TransferModel
from transferkit.decisions import Decisions, decide
from transferkit.facts import environment, look
from transferkit.policies import Policy
from transferkit.run import Run, build
from transferkit.steps import evaluate, set_epoch_mode, train, training_data, validation_images, write_outputs
from transferkit.checkpoints import checkpoint_lock, load_checkpoint
from transferkit.train.device import preserved_torch_settings
from transferkit.train.distributed import barrier, rank_guard
from transferkit.schedules import LRRange
from transferkit.train.lr_find import LRFindResult, lr_range_test
from transferkit.train.loop import Loop
from transferkit.train.optim import make_optimizer
from transferkit.train.speed import set_deterministic


@dataclass(repr=False)
class FinetuneResult:
    """What [`finetune`][transferkit.finetune] returns: the trained model, its history and metrics, the plan
    that produced it, and where its files went."""

    model: TransferModel  # the trained model (the best epoch's weights with restore_best)
    backbone: Backbone  # the run's own copy of the backbone (its trunk is model.trunk)
    classes: list[str]  # class names, in output order
    policy: Policy  # the fine-tuning policy
    history: list[dict[str, Any]]  # one row per epoch: losses, accuracies, base lr, lr per group, seconds
    best: dict[str, Any]  # the best epoch: its number, val_loss and val_acc
    metrics: dict[str, Any]  # final validation metrics (accuracy, top-k, F1, per-class report, confusion matrix)
    decisions: Decisions | None = None  # every decision of the run, with its reasons (see transferkit.decisions)
    run: Run | None = None  # the run's live objects (model, data, loss; see transferkit.run)
    export_path: Path | None = None  # the verified TorchScript file, with export=
    export_report: ExportReport | None = None  # the export's parity check
    checkpoint_path: Path | None = None  # the final checkpoint, with checkpoint=
    used_feature_cache: bool = False  # every epoch trained the head on cached features
    timings: dict[str, float] = field(default_factory=dict)  # seconds: setup, features, train, export, total
    task: str = "multiclass"  # multiclass, multilabel or regression
    stopped_early: bool = False  # early_stopping ended the run
    plots: dict[str, Path] = field(default_factory=dict)  # the PNGs written under plots_dir
    data_report: DataReport = field(default_factory=DataReport)  # bad files left out, warnings
    val_logits: Any = None  # the trained model's outputs on the validation set, in its order
    # the cached features: samples, shards, computed, reused, dtype, bytes, masked_samples, per split (train, val);
    # shards == 0 when held in memory (no cache_dir); None when no features were cached (see docs/training.md)
    feature_report: dict[str, Any] | None = None

    def _interpretable(self) -> tuple[Any, Any]:
        if self.val_logits is None or self.decisions is None or self.run is None or self.task != "multiclass":
            raise ConfigError("show_results, plot_top_losses and most_confused need a multiclass run with "
                              "validation data.")
        return self.val_logits, validation_images(self.decisions, self.run)

    def show_results(self, n: int = 9, path: str | Path = "show_results.png") -> Path:
        """A PNG grid of ``n`` validation images with true label, prediction and probability
        (green right, red wrong); returns its path. See `transferkit.train.interpret`."""
        from transferkit.train.interpret import show_results

        logits, images = self._interpretable()
        return show_results(logits, images, self.classes, path, n=n)

    def plot_top_losses(self, k: int = 9, path: str | Path = "top_losses.png") -> Path:
        """A PNG grid of the ``k`` validation images with the highest loss (predicted / true / loss)."""
        from transferkit.train.interpret import plot_top_losses

        logits, images = self._interpretable()
        return plot_top_losses(logits, images, self.classes, path, k=k)

    def most_confused(self, min_count: int = 1) -> list[tuple[str, str, int]]:
        """``[(true, predicted, count), ...]`` over the validation set, most frequent first."""
        from transferkit.train.interpret import most_confused

        logits, images = self._interpretable()
        return most_confused(logits, images, self.classes, min_count=min_count)

    def __repr__(self) -> str:
        score = {k: round(v, 4) for k, v in self.best.items() if isinstance(v, float)}
        return (f"FinetuneResult({self.backbone.name}, policy={str(self.policy)!r}, {len(self.classes)} classes, "
                f"{len(self.history)} epochs, best={score}, export={str(self.export_path) if self.export_path else None})")


def _config(config: FinetuneConfig | str | Backbone | None, options: dict[str, Any]) -> FinetuneConfig:
    if isinstance(config, FinetuneConfig):
        return config.replace(**options) if options else config
    if config is not None:
        if "backbone" in options:
            raise ConfigError("finetune(): backbone given twice (positionally and as backbone=).")
        options = {"backbone": config, **options}
    unknown = set(options) - set(FinetuneConfig.__dataclass_fields__)
    if unknown:
        raise unknown_key_error(sorted(unknown)[0], "finetune()")
    return FinetuneConfig(**options)


_OUTPUTS = {"export": "file", "checkpoint": "file", "plots_dir": "dir", "cache_dir": "dir", "log_dir": "dir"}


def check_outputs(cfg: FinetuneConfig) -> None:
    """Every output path of the run can be written (a folder given for a file, a missing or
    read-only parent: a clear OutputError naming the setting, before anything trains)."""
    for key, kind in _OUTPUTS.items():
        value = getattr(cfg, key)
        if value is not None:
            check_writable(value, what=key.replace("_dir", " folder"), flag=key, kind=kind)


@contextlib.contextmanager
def _run_lock(cfg: FinetuneConfig, is_main: bool) -> Iterator[None]:
    """Rank 0 holds the checkpoint's lock for the whole run (a second run on the same path gets
    a clear error, not a silent overwrite); temp files a killed writer left are removed first."""
    path = cfg.checkpoint
    if path is None or not is_main:
        yield
        return
    with checkpoint_lock(path, flag="checkpoint"):
        remove_stale_temps(path)
        yield


@contextlib.contextmanager
def _opened(cfg: FinetuneConfig, *, lock: bool) -> Iterator[tuple[Decisions, Run]]:
    """The decisions of ``cfg`` (their summary printed) and the run built from them, inside
    what every run needs: the caller's torch settings restored afterwards, one rank's error
    ending every rank, and (``lock``) the checkpoint's lock."""
    with preserved_torch_settings():
        set_deterministic(cfg.deterministic)
        env = environment(cfg)
        is_main = env[0].is_main
        if is_main:
            check_outputs(cfg)  # a bad output path fails now, not after training
        with rank_guard(env[0]), (_run_lock(cfg, is_main) if lock else contextlib.nullcontext()):
            facts, inputs = look(cfg, env=env)
            d = decide(cfg, facts)
            if is_main:
                for note in d.notes:
                    warnings.warn(note, stacklevel=4)
                if cfg.verbose:
                    print(d.summary(), file=sys.stderr, flush=True)
            yield d, build(d, inputs)


def finetune(config: FinetuneConfig | str | Backbone | None = None, /, **options: Any) -> FinetuneResult:
    """Fine-tune a backbone on labelled data and return a [`FinetuneResult`][transferkit.FinetuneResult].

    Call it with keywords (``finetune("tv:resnet18", data="images/", epochs=5)``), or with
    a [`FinetuneConfig`][transferkit.FinetuneConfig] (``finetune(cfg)``, keywords override
    it). Every setting, its default and its meaning are listed in ``FinetuneConfig`` and
    ``docs/training.md``. The run: [`look`][transferkit.facts.look] gathers the facts,
    [`decide`][transferkit.decisions.decide] takes every decision (printed before training
    when ``verbose``; [`plan`][transferkit.decisions.plan] is the same without training),
    [`build`][transferkit.run.build] makes the model, then the steps of
    [`transferkit.steps`][transferkit.steps] compute features or build loaders, train, evaluate, and write
    the checkpoint, plots and verified export. Global torch settings (deterministic
    algorithms, cuDNN autotuning) are restored afterwards. Launched by ``torchrun``,
    training is distributed (DDP).

    Example:
        >>> result = finetune("tv:resnet18", weights=None, data="hymenoptera", policy="feature_extraction",
        ...                   image_size=64, epochs=2, export="model.pt")  # doctest: +SKIP
        >>> result.best["val_acc"]  # doctest: +SKIP
    """
    cfg = _config(config, options)
    t_start = time.perf_counter()
    with _opened(cfg, lock=True) as (d, run):
        timings = {"setup_s": time.perf_counter() - t_start}
        outcome = train(d, run)
        timings.update(outcome.seconds)
        outputs: dict[str, Any] = {}
        metrics = evaluate(d, run, outcome.data, outputs=outputs)
        if outcome.probe is not None:
            metrics["probe"] = {"C": outcome.probe.C,
                                "val_acc_by_C": {str(c): a for c, a in outcome.probe.scores.items()}}
        result = FinetuneResult(model=run.model, backbone=run.backbone, classes=list(d.classes), policy=d.policy,
                                history=outcome.history, best=outcome.best, metrics=metrics, decisions=d, run=run,
                                used_feature_cache=d.cache, timings=timings, task=cfg.task,
                                stopped_early=outcome.state.stopped_early, data_report=run.bundle.report,
                                val_logits=outputs.get("logits"), feature_report=outcome.feature_report)
        if run.dist.is_main:
            out = write_outputs(d, run, outcome, metrics, logits=outputs.get("logits"))
            timings.update(out["seconds"])
            result.plots, result.checkpoint_path = out["plots"], out["checkpoint"]
            if out["export_report"] is not None:
                result.export_report, result.export_path = out["export_report"], out["export_report"].path
        barrier(run.dist)
    timings["total_s"] = time.perf_counter() - t_start
    return result


def linear_probe(backbone: str | Backbone = "tv:resnet18", *, data: Any, Cs: Sequence[float] | None = None,
                 **options: Any) -> FinetuneResult:
    """The standard linear probe: frozen features, scikit-learn logistic regression (L-BFGS),
    ``C`` chosen on the validation data; the same as ``finetune(..., head="logistic")``.

    Example:
        >>> r = linear_probe("tk:cifar_resnet20", weights="resnet20.th", data="hymenoptera")  # doctest: +SKIP
        >>> r.metrics["probe"]["C"], r.metrics["val_acc"]  # doctest: +SKIP
    """
    options.setdefault("policy", "feature_extraction")
    return finetune(backbone, data=data, head="logistic", probe_Cs=Cs, **options)


def resume(path: str | Path, **overrides: Any) -> FinetuneResult:
    """Continue the run that wrote checkpoint ``path`` with the settings stored in it
    (``overrides`` replace some, e.g. ``data=`` when the run trained on an in-memory Dataset).
    The resumed run's decisions must equal the stored ones (see ``docs/training.md``).

    Example:
        >>> result = transferkit.resume("runs/ants.pt")  # doctest: +SKIP
    """
    ckpt = load_checkpoint(path)
    stored = (ckpt["transferkit"].get("decisions") or {}).get("config") or {}
    if not stored:
        raise ConfigError(f"{str(path)!r} has no stored configuration; call finetune(..., checkpoint=path, resume=True).")
    values = {**stored, **overrides}
    missing = [k for k, v in values.items() if isinstance(v, str) and v.startswith("<") and v.endswith(">")]
    if missing:
        raise ConfigError(f"The run in {str(path)!r} used Python objects that a checkpoint cannot store for "
                          f"{missing}; pass them again: transferkit.resume(path, {missing[0]}=...).")
    values.update(checkpoint=str(path), resume=True)
    python_objects = {k: values.pop(k) for k in list(values) if k in overrides}
    cfg = FinetuneConfig.from_dict(values, source=f"the configuration stored in {str(path)!r}")
    return finetune(cfg.replace(**python_objects) if python_objects else cfg)


def lr_find(config: FinetuneConfig | str | Backbone | None = None, /, *, start_lr: float = LRRange.start_lr,
            end_lr: float = LRRange.end_lr, num_steps: int = LRRange.num_steps, plot: str | Path | None = None,
            **options: Any) -> LRFindResult:
    """The learning-rate range test on the run ``finetune(config, **options)`` would do (same
    decisions: model, policy, data, feature cache, optimizer and weight decay): returns the
    losses per learning rate and a suggested ``lr``; ``plot="lr.png"`` draws the curve.
    The caller's objects are left as they were (the run owns a copy of the backbone).

    Example:
        >>> res = lr_find("tk:small_cnn", weights=None, data="images/", plot="lr.png")  # doctest: +SKIP
        >>> finetune("tk:small_cnn", weights=None, data="images/", lr=res.suggestion)  # doctest: +SKIP
    """
    cfg = _config(config, options)
    with _opened(cfg, lock=False) as (d, run):
        td = training_data(d, run)
        opt = make_optimizer(cfg.optimizer, run.param_groups(d, lr=start_lr), lr=start_lr, momentum=cfg.momentum)
        first = 0 if d.cache else d.cached_epochs  # fine_tune: the rate of the phase that trains the backbone
        loop = Loop(optimizer=opt, loss_fn=run.loss_fn, set_mode=lambda e: set_epoch_mode(d, run, first + e),
                    speed=run.speed, task=cfg.task, verbose=cfg.verbose and d.is_main)
        result = lr_range_test(td.module, td.train_loader, loop,
                               LRRange(start_lr=start_lr, end_lr=end_lr, num_steps=num_steps))
    if plot is not None and d.is_main:
        result.plot(plot)
    return result
