"""``finetune()``: config -> facts -> decisions -> run -> steps, and nothing else.

[`look`][transferkit.facts.look] gathers the facts, [`decide`][transferkit.decisions.decide]
takes every decision, [`build`][transferkit.run.build] makes the live run, and every step is
a public function in [`transferkit.steps`][transferkit.steps] that a recipe can call on its own.
"""

from __future__ import annotations

import contextlib
import glob
import html
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from transferkit._progress import EpochLog, spelled, to_stderr
from transferkit._io import check_writable
from transferkit._signals import first_interruption_holds, terminate_as_interrupt
from transferkit.backbones import Backbone
from transferkit._text import expand_home, number, plural, wrap_lines
from transferkit.config import FinetuneConfig, called_as, unknown_key_error
from transferkit.data import DataReport
from transferkit.data.shards import is_remote
from transferkit.errors import ConfigError, DataError, suggest, warn
from transferkit.evaluation import Evaluation, TargetEvaluation
from transferkit.evaluation import evaluate as evaluate_model
from transferkit.export import Prediction, Predictor
from transferkit.export.torchscript import ExportReport
from transferkit.model import TransferModel
from transferkit.decisions import Decisions, cached_engine, decide
from transferkit.facts import environment, look, timed_engines
from transferkit.policies import Policy, param_groups
from transferkit.results import export_result, result_predictor, result_summary
from transferkit.run import Run, build
from transferkit.outputs import (OUTPUTS, check_output_paths, check_output_space, check_plotting, check_png_name,
                                 output_locks)
from transferkit.steps import (
    evaluate,
    head_speed,
    metadata,
    save_interrupted,
    report_load_failures,
    set_epoch_mode,
    train,
    training_data,
    validation_images,
    write_outputs,
)
from transferkit.checkpoints import load_checkpoint
from transferkit.train.device import preserved_torch_settings
from transferkit.train.distributed import barrier, dist_info, rank_guard
from transferkit.train.faults import interrupt_keeps_weights
from transferkit.schedules import LRRange
from transferkit.train.lr_find import LRFindResult, check_sweep, lr_range_test
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
    val_kept: Any = None  # [N] bool, beside val_logits: the rows the metrics count (False: the file failed to load)
    # the cached features: samples, shards, computed, reused, dtype, bytes, masked_samples, per split (train, val);
    # shards == 0 when held in memory (no cache_dir); None when no features were cached (see docs/training.md)
    feature_report: dict[str, Any] | None = None
    # compile="auto" on a trained trunk: the eager and compiled step seconds timed, the estimated and measured
    # compilation, which was kept and why (see transferkit.train.compile_trial); None when no trial ran
    compile_trial: dict[str, Any] | None = None

    def _interpretable(self) -> tuple[Any, Any]:
        if self.val_logits is None or self.decisions is None or self.run is None or self.task != "multiclass":
            raise ConfigError("show_results, plot_top_losses and most_confused need a multiclass run with "
                              "validation data.")
        return validation_images(self.decisions, self.run, self.val_logits, self.val_kept)

    def _drawn_elsewhere(self) -> bool:
        """Whether this is a rank other than 0 of a torchrun job: the pictures are the same on
        every rank (the validation scores are gathered), and rank 0 draws them alone."""
        return self.run is not None and not self.run.dist.is_main

    def show_results(self, n: int = 9, path: str | Path = "show_results.png") -> Path:
        """A PNG grid of ``n`` validation images with true label, prediction and probability
        (green right, red wrong); returns its path. See `transferkit.train.interpret`. Under
        torchrun rank 0 draws it; the other ranks return the path and write nothing."""
        from transferkit.train.interpret import show_results

        logits, images = self._interpretable()
        if self._drawn_elsewhere():
            return Path(path)
        return show_results(logits, images, self.classes, path, n=n)

    def plot_top_losses(self, k: int = 9, path: str | Path = "top_losses.png") -> Path:
        """A PNG grid of the ``k`` validation images with the highest loss (predicted / true /
        loss). Under torchrun rank 0 draws it; the other ranks return the path."""
        from transferkit.train.interpret import plot_top_losses

        logits, images = self._interpretable()
        if self._drawn_elsewhere():
            return Path(path)
        return plot_top_losses(logits, images, self.classes, path, k=k)

    def most_confused(self, min_count: int = 1) -> list[tuple[str, str, int]]:
        """``[(true, predicted, count), ...]`` over the validation set, most frequent first."""
        from transferkit.train.interpret import most_confused

        logits, images = self._interpretable()
        return most_confused(logits, images, self.classes, min_count=min_count)

    def _repr_html_(self) -> str:
        """In a notebook: what ran, the best epoch, the files written, and the epoch table."""
        def row(name: str, value: Any) -> str:
            return f"<tr><th style='text-align:left'>{html.escape(name)}</th><td style='text-align:left'>" \
                   f"{html.escape(str(value))}</td></tr>"

        best = ", ".join(f"{k} {number(v)}" if isinstance(v, float) else f"{k} {v}" for k, v in self.best.items())
        rows = [row("backbone", self.backbone.name), row("policy", str(self.policy)),
                row("classes", f"{len(self.classes)}: {', '.join(self.classes[:8])}"
                    + (" ..." if len(self.classes) > 8 else "")),
                row("best", best)]
        if self.export_report is not None:
            r = self.export_report
            rows.append(row("export", f"{r.path} (verified: max |exported - eager| {r.max_abs_diff:.2g})"))
        if self.checkpoint_path is not None:
            rows.append(row("checkpoint", self.checkpoint_path))
        rows += [row(f"plot {k}", v) for k, v in self.plots.items()]
        if "total_s" in self.timings:
            rows.append(row("seconds", f"{self.timings['total_s']:.1f}"))
        epochs = EpochLog(notebook=False)
        epochs.rows, epochs.best = list(self.history), self.best.get("epoch")
        return (f"<div><b>FinetuneResult</b><table>{''.join(rows)}</table>"
                + (epochs.to_html() if self.history else "") + "</div>")

    def plot_confusion_matrix(self, path: str | Path = "confusion_matrix.png") -> Path:
        """The validation confusion matrix (rows: true class, columns: predicted) as a PNG."""
        from transferkit.train.reporting import plot_confusion_matrix

        if "confusion_matrix" not in self.metrics:
            raise ConfigError("plot_confusion_matrix needs a multiclass run with validation data.")
        if self._drawn_elsewhere():  # rank 0 draws it (the other ranks return the path)
            return Path(path)
        return plot_confusion_matrix(self.metrics["confusion_matrix"], self.classes, path)

    def export(self, path: str | Path, *, onnx: bool | str | Path = False, optimize: bool = False,
               mode: str = "auto", atol: float = 1e-5, rtol: float = 1e-5) -> list[ExportReport]:
        """Export the trained model now: a verified TorchScript file at ``path`` carrying the
        metadata ``finetune(export=...)`` writes (labels, input, task, decisions, best epoch),
        checked after reloading on real validation inputs; ``onnx=True`` (or a path) also writes
        a checked ONNX file (beside ``path`` with the suffix ``.onnx``). Returns the reports,
        TorchScript first; ``export_path`` and ``export_report`` then name this export.

        Under torchrun only rank 0 writes (the weights are the same on every rank): the other
        ranks write nothing and return ``[]``, with a warning.

        Example:
            >>> result.export("model.pt", onnx=True)[0].max_abs_diff  # doctest: +SKIP
        """
        if self.run is not None and not self.run.dist.is_main:  # two ranks writing one file: one failed on the lock
            warn(f"result.export({str(path)!r}) on rank {self.run.dist.rank} of {self.run.dist.world_size}: rank 0 "
                 "writes the export (the weights are the same on every rank), so nothing was written here.")
            return []
        reports = export_result(self.model, self.decisions, self.run, self.best, len(self.history), path, onnx=onnx,
                                optimize=optimize, mode=mode, atol=atol, rtol=rtol)
        self.export_report, self.export_path = reports[0], reports[0].path
        return reports

    def predictor(self) -> Predictor:
        """A [`Predictor`][transferkit.Predictor] over the trained model in memory (put in eval
        mode): what ``transferkit.load(export)`` gives, without writing a file."""
        return result_predictor(self.model, self.decisions)

    def predict(self, inputs: Any, **options: Any) -> list[Prediction]:
        """[`Predictor.predict`][transferkit.Predictor.predict] with the trained model: the same
        inputs (files, PIL images, arrays, tensors), preprocessing and results as
        ``transferkit.load(export).predict(inputs, **options)`` (on a CUDA device the model
        runs there, where cuDNN convolutions round to TF32: probabilities within about 1e-4).

        Example:
            >>> result.predict(["ant.jpg", "bee.jpg"], top_k=2)[0].label  # doctest: +SKIP
        """
        return self.predictor().predict(inputs, **options)

    def evaluate(self, data: str | Path, **options: Any) -> Evaluation | TargetEvaluation:
        """[`transferkit.evaluate`][transferkit.evaluate] with the trained model: accuracy,
        per-class report, confusion matrix and worst files on labelled ``data`` (a folder
        ``root/<class>/<file>`` or a ``path,label`` CSV); a multilabel or regression model's
        metrics on a CSV of its targets."""
        return evaluate_model(self.predictor(), data, **options)

    def summary(self) -> str:
        """A few lines for people: best epoch and scores, final metrics, files written."""
        return result_summary(self)

    def __repr__(self) -> str:
        score = {k: round(v, 4) for k, v in self.best.items() if isinstance(v, float)}
        kind = {"multiclass": ("class", "classes"), "multilabel": ("label", "labels")}.get(self.task, ("output",))
        return (f"FinetuneResult({self.backbone.name}, policy={str(self.policy)!r}, "
                f"{plural(len(self.classes), *kind)}, {plural(len(self.history), 'epoch')}, best={score}, "
                f"export={str(self.export_path) if self.export_path else None})")


def check_outputs(cfg: FinetuneConfig) -> None:
    """Every output path of the run can be written and collides with nothing (see
    `transferkit.outputs.check_output_paths`): a clear error naming the setting, before anything trains."""
    check_output_paths(cfg)


@contextlib.contextmanager
def _run_lock(cfg: FinetuneConfig, is_main: bool) -> Iterator[None]:
    """Rank 0 holds the locks of the checkpoint and the export for the whole run (a second run on
    the same path gets a clear error, not a silent overwrite); temp files a killed writer left are
    removed first."""
    if not is_main:
        yield
        return
    with output_locks(cfg):
        yield


@contextlib.contextmanager
def _opened(cfg: FinetuneConfig, *, lock: bool, show_plan: bool = True) -> Iterator[tuple[Decisions, Run]]:
    """The decisions of ``cfg`` (their summary printed with ``show_plan``) and the run built from them, inside
    what every run needs: the caller's torch settings restored afterwards, one rank's error
    ending every rank, and (``lock``) the checkpoint's lock."""
    # SIGTERM keeps the weights like Ctrl-C, and a second signal does not cut the first one's save short
    with preserved_torch_settings(), terminate_as_interrupt(), first_interruption_holds():
        set_deterministic(cfg.deterministic)
        env = environment(cfg)
        is_main = env[0].is_main
        with rank_guard(env[0]), contextlib.ExitStack() as held:
            if is_main:  # inside the guard: its failure ends the other ranks at once
                check_outputs(cfg)  # a bad output path fails now, not after training (and before its lock)
            if lock:
                held.enter_context(_run_lock(cfg, is_main))
            facts, inputs = look(cfg, env=env, time_engines=False)
            facts = timed_engines(facts, inputs, cached=cached_engine(cfg, facts, inputs))
            d = decide(cfg, facts)
            if is_main:
                for note in d.notes:
                    warn(note)
                if show_plan and cfg.verbose:
                    to_stderr(wrap_lines(spelled(d.summary()), width=100))
            run = build(d, inputs)
            if is_main and lock:
                # an export or checkpoint that cannot fit fails now, not after training
                check_output_space(cfg, run.model, trained=sum(g["params"] for g in d.groups))
            yield d, run


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
    cfg = FinetuneConfig.from_call(config, options)
    t_start = time.perf_counter()
    with _opened(cfg, lock=True) as (d, run):
        timings = {"setup_s": time.perf_counter() - t_start}
        outcome = train(d, run)
        timings.update(outcome.seconds)
        outputs: dict[str, Any] = {}
        with interrupt_keeps_weights(lambda: save_interrupted(d, run, metadata(d))):  # Ctrl-C/SIGTERM after training
            metrics = evaluate(d, run, outcome.data, outputs=outputs)
        report_load_failures(run)  # the files every rank found bad while loading; classes none of whose files loaded
        if outcome.probe is not None:
            metrics["probe"] = {"C": outcome.probe.C,
                                "val_acc_by_C": {str(c): a for c, a in outcome.probe.scores.items()},
                                "val_loss_by_C": {str(c): v for c, v in outcome.probe.losses.items()}}
        result = FinetuneResult(model=run.model, backbone=run.backbone, classes=list(d.classes), policy=d.policy,
                                history=outcome.history, best=outcome.best, metrics=metrics, decisions=d, run=run,
                                used_feature_cache=d.cache, timings=timings, task=cfg.task,
                                stopped_early=outcome.state.stopped_early, data_report=run.bundle.report,
                                val_logits=outputs.get("logits"), val_kept=outputs.get("kept"),
                                feature_report=outcome.feature_report,
                                compile_trial=outcome.compile_trial)
        if run.dist.is_main:
            with interrupt_keeps_weights(lambda: save_interrupted(d, run, metadata(d))):
                out = write_outputs(d, run, outcome, metrics, logits=outputs.get("logits"), kept=outputs.get("kept"))
            timings.update(out["seconds"])
            result.plots, result.checkpoint_path = out["plots"], out["checkpoint"]
            if out["export_report"] is not None:
                result.export_report, result.export_path = out["export_report"], out["export_report"].path
        barrier(run.dist)
    timings["total_s"] = time.perf_counter() - t_start
    return result


@called_as("linear_probe()")
def linear_probe(config: FinetuneConfig | str | Backbone | None = None, /, *, Cs: Sequence[float] | None = None,
                 **options: Any) -> FinetuneResult:
    """The standard linear probe: frozen features, scikit-learn logistic regression (L-BFGS),
    ``C`` chosen on the validation data among ``Cs`` (``probe_Cs``; default a grid of 13);
    the same as ``finetune(..., head="logistic")``, and called as `finetune` is (a backbone
    name, a Backbone or a ``FinetuneConfig`` first, keywords after).

    Example:
        >>> r = linear_probe("tk:cifar_resnet20", weights="resnet20.th", data="hymenoptera")  # doctest: +SKIP
        >>> r.metrics["probe"]["C"], r.metrics["val_acc"]  # doctest: +SKIP
    """
    head = options.get("head", config.head if isinstance(config, FinetuneConfig) else None)
    if head not in (None, "logistic"):
        raise ConfigError(f"linear_probe(): head={head!r}: the probe is head='logistic'; call finetune() for another "
                          "head.")
    if Cs is not None:
        if "probe_Cs" in options:
            raise ConfigError("linear_probe(): Cs= and probe_Cs= name the same setting; give one of them.")
        # a list or tuple as given (a number, a text is said as what it is by the configuration's check)
        options["probe_Cs"] = Cs if isinstance(Cs, (list, tuple, str, bytes)) or not hasattr(Cs, "__iter__") \
            else list(Cs)
    return finetune(FinetuneConfig.from_call(config, {**options, "head": "logistic"}))


def resume(path: str | Path, **overrides: Any) -> FinetuneResult:
    """Continue the run that wrote checkpoint ``path`` with the settings stored in it
    (``overrides`` replace some, e.g. ``data=`` when the run trained on an in-memory Dataset).
    The resumed run's decisions must equal the stored ones (see ``docs/training.md``).

    Example:
        >>> result = transferkit.resume("runs/ants.pt")  # doctest: +SKIP
    """
    return finetune(resume_config(path, **overrides))


def resume_config(path: str | Path, **overrides: Any) -> FinetuneConfig:
    """The configuration `resume` continues the run of checkpoint ``path`` with: the stored
    settings, ``overrides`` replacing some (``transferkit finetune --checkpoint PATH --resume
    --dry-run`` plans it)."""
    path = expand_home(path)  # as finetune(checkpoint=...) reads it
    unknown = set(overrides) - set(FinetuneConfig.__dataclass_fields__)
    if unknown:
        raise unknown_key_error(sorted(unknown)[0], "resume()", recipe_keys=False)
    fixed = sorted({"checkpoint", "resume"} & set(overrides))
    if fixed:
        raise ConfigError(f"resume(): {fixed[0]}= cannot change: the run continues in the checkpoint {str(path)!r} "
                          "it was given, and writes its next checkpoints there. To keep that file as it is, copy it "
                          "and resume the copy; to start over, call finetune().")
    ckpt = load_checkpoint(path)
    stored = (ckpt["transferkit"].get("decisions") or {}).get("config") or {}
    if not stored:
        raise ConfigError(f"{str(path)!r} has no stored configuration; call finetune(..., checkpoint=path, resume=True).")
    missing = [k for k, v in stored.items() if k not in overrides and isinstance(v, str) and v.startswith("<")
               and v.endswith(">")]
    if missing:
        raise ConfigError(f"The run in {str(path)!r} used Python objects that a checkpoint cannot store for "
                          f"{missing}; pass them again: transferkit.resume(path, {missing[0]}=...).")
    for key in ("data", "val_data"):  # a folder or file moved since the run: where it is now, not just "missing"
        where = stored.get(key)
        if key not in overrides and isinstance(where, str) and not is_remote(where) and not glob.has_magic(where) \
                and "{" not in where and not os.path.exists(where):  # not a URL, a command or a shard pattern
            flag = "--data" if key == "data" else "--val-data"
            raise DataError(f"The run in {str(path)!r} read its {key} at {where!r}, which does not exist now. If the "
                            f"data moved, resume with their new place: transferkit.resume({str(path)!r}, {key}=NEW) ("
                            f"{flag} NEW with --resume); a folder moved whole keeps its digest.")
    # plain overrides (a moved folder's path, a number) are read as the stored values are; others (a Dataset,
    # a Backbone, a list) replace the stored values once the configuration is read
    objects = {k: v for k, v in overrides.items() if not isinstance(v, (str, int, float, bool, type(None)))}
    values = {**stored, **{k: v for k, v in overrides.items() if k not in objects}, "checkpoint": str(path),
              "resume": True}
    cfg = FinetuneConfig.from_dict(values, source=f"the configuration stored in {str(path)!r}")
    return cfg.replace(**objects) if objects else cfg


LR_FIND_PHASES = ("frozen", "unfrozen")


@called_as("lr_find()")
def lr_find(config: FinetuneConfig | str | Backbone | None = None, /, *, start_lr: float = LRRange.start_lr,
            end_lr: float = LRRange.end_lr, num_steps: int = LRRange.num_steps, plot: str | Path | None = None,
            phase: str | None = None, **options: Any) -> LRFindResult:
    """The learning-rate range test on the run ``finetune(config, **options)`` would do (same
    decisions: model, policy, data, feature cache, optimizer and weight decay): returns the
    losses per learning rate and a suggested ``lr`` to pass to ``finetune``; ``plot="lr.png"``
    draws the curve. The caller's objects are left as they were (the run owns a copy of the
    backbone).

    ``phase``: which part of a policy with a frozen phase (``fine_tune``, ``gradual``, ``...,frozen=k``)
    the test trains. ``"frozen"`` (the default for those policies): the head alone on
    features computed once, seconds on a CPU; its rate is the run's base lr. ``"unfrozen"``:
    the model end to end as in the epochs that train the backbone, from the head the frozen
    phase trains first (the run's first epochs on cached features, run before the test; each
    step a full forward and backward pass: minutes on a CPU, often longer than the training it prepares); the
    lrs are still the run's base lr (a ``fine_tune`` phase that runs at ``lr * unfrozen_lr``
    is tested at that rate). Policies without a frozen phase test the whole run. With
    ``verbose``, what the test does is printed first, then its cost (after two steps) and
    progress.

    Example:
        >>> res = lr_find("tk:small_cnn", weights=None, data="images/", plot="lr.png")  # doctest: +SKIP
        >>> finetune("tk:small_cnn", weights=None, data="images/", lr=res.suggestion)  # doctest: +SKIP
    """
    if phase is not None and phase not in LR_FIND_PHASES:
        raise ConfigError(f"lr_find(phase={phase!r}) is not a phase;{suggest(str(phase), LR_FIND_PHASES)} use "
                          "'frozen' (the head alone on cached features) or 'unfrozen' (the epochs that train the "
                          "backbone).")
    check_sweep(LRRange(start_lr=start_lr, end_lr=end_lr, num_steps=num_steps))  # before any work
    if options.get("lr") is not None:  # the run's other settings are taken (lr_find(**kw), then finetune(**kw))
        raise ConfigError(f"lr_find: lr={options['lr']!r} is not used: the range test sweeps its own rates, from "
                          "start_lr to end_lr, to suggest one. Leave lr out (pass the suggestion to finetune).")
    cfg = FinetuneConfig.from_call(config, options)
    outputs = [f"{k}={str(getattr(cfg, k))!r}" for k in OUTPUTS if k != "cache_dir" and getattr(cfg, k) is not None]
    if outputs:  # kept, not refused: lr_find(**kw) then finetune(**kw) is the intended use
        warn(f"lr_find writes no {', '.join(outputs)}: the range test trains a copy of the model to suggest "
             "a rate and writes only plot= (and, with cache_dir, the features it caches); those outputs are "
             "written by finetune.")
    if cfg.head == "logistic":
        raise ConfigError("lr_find: head='logistic' fits a logistic-regression probe, which has no learning rate to "
                          "search (it tries the C values of probe_Cs). Use head='linear' for a head trained by "
                          "gradient, or linear_probe() for the probe.")
    world = dist_info().world_size
    if world > 1:  # each rank would sweep its own share of the data and suggest its own rate
        raise ConfigError(f"lr_find runs in one process, and this is one of {world} processes of a job (torchrun): "
                          "each would sweep its own share of the data and suggest its own rate. Run lr_find without "
                          "torchrun, then start the job with its suggestion (lr=...).")
    if plot is not None:
        check_writable(plot, what="plot", flag="plot")  # a folder or a read-only place: said before the test runs
        check_png_name(plot, flag="plot")
        check_plotting("plot")
    t0 = time.perf_counter()
    with _opened(cfg, lock=False, show_plan=False) as (d, run):
        which, first, factor = _lr_find_phase(d, phase)
        say = to_stderr if cfg.verbose and d.is_main else (lambda text: None)
        say(_lr_find_description(d, run, which, start_lr, end_lr, num_steps))
        if which == "unfrozen":  # those epochs start from the head the first phase trained (and its FeatureNorm)
            train(replace(d, config=replace(cfg, checkpoint=None, resume=False, callbacks=(), log_dir=None)), run,
                  head_phase_only=True)
        td = training_data(d, run, cached=which == "frozen" or d.cache)
        if which == "frozen":
            groups = param_groups(run.model.head, lr=start_lr, weight_decay=cfg.weight_decay, policy=d.policy)
        else:
            groups = run.param_groups(d, lr=start_lr)
        opt = make_optimizer(cfg.optimizer, groups, lr=start_lr, momentum=cfg.momentum)
        per_epoch = len(td.train_loader)
        loop = Loop(optimizer=opt, loss_fn=run.loss_fn, set_mode=lambda e: set_epoch_mode(d, run, first + e),
                    speed=head_speed(d, run) if which == "frozen" else run.speed, task=cfg.task,
                    verbose=cfg.verbose and d.is_main)
        result = lr_range_test(td.module, td.train_loader, loop,
                               LRRange(start_lr=start_lr, end_lr=end_lr, num_steps=num_steps), lr_factor=factor,
                               on_first_steps=lambda s: say(_lr_find_cost(s, num_steps, per_epoch, which,
                                                                          cfg.epochs - first)))
    result.phase, result.seconds = which, time.perf_counter() - t0
    if which == "frozen" and len(d.policy.lr_phases(cfg.epochs)) == 1:  # gradual: one rate for head and blocks
        result.notes.append(f"the suggestion is the head's rate; {d.policy} trains the blocks it unfreezes later at "
                            "this same lr, which can be far too high for pretrained weights: test those epochs with "
                            "phase='unfrozen', or keep a backbone's rate (the default lr) for this policy")
    if plot is not None and d.is_main:
        result.plot(plot)
    return result


def _lr_find_phase(p: Decisions, phase: str | None) -> tuple[str, int, float]:
    """(the phase tested: "frozen", "unfrozen" or "run"; its first epoch; its lr factor)."""
    phases = p.policy.lr_phases(p.config.epochs)
    if p.cache:  # every epoch trains the head on cached features
        if phase == "unfrozen":
            raise ConfigError(f"lr_find(phase='unfrozen'): policy {p.policy} keeps the backbone frozen for all "
                              f"{p.config.epochs} epochs; there is no phase that trains it.")
        return "run", 0, 1.0
    if p.cached_epochs == 0:  # the backbone trains from the first epoch (or no feature cache)
        if phase == "frozen":
            raise ConfigError(f"lr_find(phase='frozen'): policy {p.policy} has no frozen phase on cached features "
                              f"in this run ({p.cache_reason}); leave phase unset to test the run.")
        return "run", 0, 1.0
    if phase == "unfrozen":
        return "unfrozen", p.cached_epochs, phases[-1][1] if len(phases) > 1 else 1.0
    return "frozen", 0, 1.0


def _lr_find_description(p: Decisions, run: Run, which: str, start_lr: float, end_lr: float, num_steps: int) -> str:
    cfg = p.config
    n = p.n_train
    epochs = "epoch 1" if p.cached_epochs == 1 else f"epochs 1-{p.cached_epochs}"
    what = {"frozen": f"the frozen phase of {p.policy} ({epochs}): the head alone on features "
                      f"computed once ({n} training items)",
            "unfrozen": f"the phase of {p.policy} that trains the backbone (from epoch {p.cached_epochs + 1}): the "
                        f"model end to end, {n} training items, from the head trained first in {epochs}, as the run "
                        "does (phase='frozen' is the cheap test)",
            "run": f"{p.policy}: " + ("the head alone on features computed once" if p.cache else
                                      "the model end to end") + f" ({n} training items)"}[which]
    phases = p.policy.lr_phases(cfg.epochs)
    after = ""
    if len(phases) > 1:
        k = phases[0][0]
        after = (f"\n  the run trains the head at lr for {k} epoch{'s' if k > 1 else ''}, then the backbone at "
                 f"lr x {phases[1][1]:g}" + (": the curve is drawn against lr" if which == "unfrozen" else ""))
    elif which == "frozen":  # gradual: the blocks it unfreezes later train at the same lr as the head
        after = ("\n  the run trains the blocks it unfreezes later at this same lr (the head's): phase='unfrozen' "
                 "tests the model end to end")
    return (f"lr-find: learning-rate range test on {run.backbone.name} -> {p.head} head\n"
            f"  trains {what}\n"
            f"  lr from {start_lr:.0e} to {end_lr:.0e} over {num_steps} batches of {cfg.batch_size} "
            f"({cfg.optimizer}), stopping when the loss explodes; weights restored afterwards{after}")


def _lr_find_cost(seconds_per_step: float, num_steps: int, steps_per_epoch: int, which: str, epochs: int) -> str:
    total = seconds_per_step * num_steps
    text = f"lr-find: about {seconds_per_step:.2g} s per step: up to {_duration(total)} for {num_steps} steps"
    if which in ("unfrozen", "run") and steps_per_epoch:
        train = seconds_per_step * steps_per_epoch * epochs
        text += f" (training {epochs} epoch{'s' if epochs > 1 else ''} like this: about {_duration(train)})"
        if which == "unfrozen" and total > 60:
            text += "; phase='frozen' tests the head on cached features in seconds"
    return text


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds))} s" if seconds < 90 else f"{seconds / 60:.1f} min"  # never "0 s"
