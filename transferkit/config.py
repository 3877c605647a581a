"""What the user asked for: [`FinetuneConfig`][transferkit.FinetuneConfig], one typed, validated, serialisable record.

The same keys are ``finetune()``'s keyword arguments, the keys of a YAML config file, the
CLI's flags (``--batch-size``) and ``--set key=value`` overrides, and a recipe's settings.
All of them go through `merge_config`, so they share one set of checks and one error
format (``<source>: <key>=<value> ...; expected ...``).

Example:
    >>> cfg = FinetuneConfig(backbone="tk:small_cnn", weights=None, data="images/", epochs=3)
    >>> cfg.epochs, cfg.policy
    (3, 'feature_extraction')
    >>> merge_config({"epochs": 3}, {"lr": "1e-3"}, source="example")["lr"]
    0.001
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import json
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import yaml

from transferkit._text import expand_home, hide_secrets
from transferkit.errors import ConfigError, DataError, suggest
from transferkit.schedules import check_schedule_options

# keys a config file may hold besides FinetuneConfig's: where the data live and what to run (recipes)
RECIPE_KEYS = {"data_dir": (str, type(None)), "download": (bool,), "out_dir": (str, type(None)),
               "limit": (int, type(None)), "runs": (dict, type(None))}

GROUPS = ("model", "data", "task", "policy", "optimisation", "features", "runtime", "outputs")
VAL_SPLIT = 0.2  # the fraction of the training data held out for validation by default
_NUM = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")  # a number YAML 1.1 reads as text (no dot)
_PY_ONLY = "python"  # a field that a file or the CLI cannot set (a Python object)
NONE_WORDS = ("none", "null")
"""How a file or the command line writes None (any capitals): YAML reads ``null`` as None but
``none``/``None`` as text, which `merge_config` turns into None for a setting that takes None."""
# names other tools give some settings: an unknown key that is one of them is answered with the setting
ALIASES = {"learning_rate": "lr", "bs": "batch_size", "batchsize": "batch_size", "n_epochs": "epochs",
           "num_epochs": "epochs", "max_epochs": "epochs", "wd": "weight_decay"}


@runtime_checkable
class MapStyleDataset(Protocol):
    """What ``data`` and ``val_data`` accept besides a path: any object with ``len()`` and
    indexing that yields ``(input, label)`` (a torch ``Dataset``, a list of pairs)."""

    def __getitem__(self, index: int) -> Any: ...

    def __len__(self) -> int: ...


@runtime_checkable
class BackboneLike(Protocol):
    """What ``backbone`` accepts besides a registered name: a `transferkit.backbones.Backbone`
    (anything with its ``trunk``, ``block_names`` and ``input_spec``). A structural type, so
    that reading the settings (``transferkit --help``) does not import torch."""

    trunk: Any
    block_names: Any
    input_spec: Any


@runtime_checkable
class PolicyLike(Protocol):
    """What ``policy`` accepts besides a policy string: a `transferkit.policies.Policy`."""

    def trainable_blocks(self, block_names: Any, epoch: int) -> Any: ...


def _opt(default: Any, help: str, *, group: str, check: Callable[[Any], str | None] | None = None,
         flag: bool = False, serial: bool = True) -> Any:
    """A config field: its default, documentation, range check and CLI flag. The types it
    admits and its choices come from its annotation (`_admitted`)."""
    meta = {"help": help, "group": group, "check": check, "flag": flag, "serial": serial}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _positive_int(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else "a positive integer"


def _non_negative(v: Any) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "a number >= 0"


def _positive(v: Any) -> str | None:
    return None if v is None or (math.isfinite(v) and v > 0) else "a number > 0 (or None for the default)"


def _fraction(v: Any) -> str | None:
    return None if 0 <= v < 1 else "a number in [0, 1)"


def _seed(v: Any) -> str | None:
    return None if 0 <= v < 2**63 else "an integer >= 0"


def _opt_positive_int(v: Any) -> str | None:
    return None if v is None else _positive_int(v)


def _image_size(v: Any) -> str | None:
    return None if v is None or v >= 8 else "an integer >= 8 (or None: the backbone's own size)"


def _workers(v: Any) -> str | None:
    return None if v is None or v >= 0 else "an integer >= 0 (or None: chosen for the machine)"


# the shortest clip training (the pre-scan of files) and prediction take, for every audio model: wav2vec2/HuBERT's
# first frame spans 400 samples at 16 kHz
MIN_CLIP_SECONDS = 0.025


def is_rate(value: Any) -> bool:
    """Whether ``value`` stands as the rate of a ``(waveform, sample_rate)`` pair: a real
    number (int, float, numpy number, or a 0-d array or tensor of one), not a bool;
    `sample_rate_of` checks its value."""
    value = _scalar(value)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _scalar(value: Any) -> Any:
    """The number a 0-d array or tensor holds (``np.array(16000)``, ``torch.tensor(16000)``),
    else ``value`` itself."""
    return value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value


MIN_SAMPLE_RATE = 1000  # Hz: below any rate audio is recorded at (telephone speech: 8000)


def sample_rate_of(value: Any, what: str = "sample rate", error: type[Exception] = DataError) -> int:
    """``value`` as a sample rate in Hz: any whole number from `MIN_SAMPLE_RATE` (an int, a
    numpy integer as pandas gives, a float such as ``44100.0``); anything else raises
    ``error`` (a [`DataError`][transferkit.DataError]) naming ``what`` and the value. A rate of
    a few Hz is a mistake, not a recording: a label or speaker id read as a rate (an item
    ``(waveform, label, speaker)`` read as ``(waveform, sample_rate, label)``) would make each
    clip last hours, cropped and resampled without a word.

    Example:
        >>> sample_rate_of(44100), sample_rate_of(16000.0)
        (44100, 16000)
    """
    value = _scalar(value)
    try:
        whole = is_rate(value) and math.isfinite(float(value)) and float(value) == int(value) and int(value) > 0
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise error(f"The {what} is {value!r}, not a whole positive number of Hz: pass the rate the waveform "
                    "was recorded at, e.g. 16000 or 44100 (an int, a numpy integer, or a float such as 44100.0).")
    if int(value) < MIN_SAMPLE_RATE:
        place = " Is it a label or an id in the rate's place? An item is (waveform, sample_rate, label)." \
            if error is DataError else ""
        raise error(f"The {what} is {int(value)} Hz, below {MIN_SAMPLE_RATE} Hz, lower than audio is recorded at "
                    f"(telephone speech: 8000).{place} A signal sampled this slowly is resampled to an audio rate "
                    "first.")
    return int(value)


def env_flag(name: str) -> bool:
    """An on/off environment variable: ``1``, ``true``, ``yes``, ``on`` are on; unset, empty,
    ``0``, ``false``, ``no``, ``off`` are off; anything else is a
    [`ConfigError`][transferkit.ConfigError] naming the variable.

    Example:
        >>> env_flag("TRANSFERKIT_NOT_SET")
        False
    """
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}={os.environ[name]!r} is neither on nor off: set it to 1 (on) or 0 (off), or unset it.")


def env_seconds(name: str, default: float) -> float:
    """Seconds from the environment variable ``name`` (unset or empty: ``default``): a finite
    number above 0, else a [`ConfigError`][transferkit.ConfigError] naming the variable.

    Example:
        >>> env_seconds("TRANSFERKIT_NOT_SET", 1.5)
        1.5
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number of seconds, got {raw!r}; set it to e.g. 600, or unset "
                          f"it for {default:g}.")
    return value


def check_seconds(value: Any, name: str) -> float | None:
    """``value`` if it is seconds of audio (``clip_seconds``, ``max_seconds``): None, or a finite
    number of at least `MIN_CLIP_SECONDS`; else a [`ConfigError`][transferkit.ConfigError].

    Example:
        >>> check_seconds(2, "clip_seconds"), check_seconds(None, "clip_seconds")
        (2, None)
    """
    problem = seconds_problem(value)
    if problem:
        raise ConfigError(f"{name} must be {problem}, got {value!r}.")
    # as given, as a plain Python number (a NumPy scalar would make a checkpoint that holds it unloadable)
    return None if value is None else int(value) if isinstance(value, numbers.Integral) else float(value)


def seconds_problem(v: Any) -> str | None:
    """What is wrong with ``v`` as seconds of audio (`check_seconds`), or None."""
    ok = v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                       and v >= MIN_CLIP_SECONDS)
    return None if ok else (f"a number of seconds of at least {MIN_CLIP_SECONDS:g} (the shortest clip an audio model "
                            f"takes: {1000 * MIN_CLIP_SECONDS:g} ms), or None")


def _device(v: Any) -> str | None:
    ok = re.fullmatch(r"auto|cpu|mps(:0)?|cuda(:\d+)?", v)
    return None if ok else "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


def _class_weights(v: Any) -> str | None:
    if v is None or v == "balanced":
        return None
    if isinstance(v, str) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                                     and w >= 0 for w in v):
        return "None, 'balanced' or a list of numbers >= 0, one per class"
    if not any(w > 0 for w in v):
        return "at least one weight > 0 (with every weight 0 the loss is 0/0)"
    return None


def _hidden(v: Any) -> str | None:
    return None if all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in v) else \
        "a list of positive integers (hidden layer widths)"


def _probe_cs(v: Any) -> str | None:
    return None if v and all(math.isfinite(c) and c > 0 for c in v) else "a non-empty list of numbers > 0"


def _admitted(hint: Any) -> tuple[tuple[type, ...], tuple[Any, ...] | None]:
    """The runtime types and the choices that the annotation ``hint`` admits: ``float`` takes
    ints too, ``Sequence[...]`` a list or tuple, ``dict[...]`` a dict, ``Literal[...]`` its
    values (the field's choices, when every member of the union is a literal or None), a class
    its instances, ``Any`` anything.

    Example:
        >>> _admitted(Literal["a", "b"] | None)
        ((<class 'str'>, <class 'NoneType'>), ('a', 'b', None))
        >>> _admitted(float | None)
        ((<class 'float'>, <class 'int'>, <class 'NoneType'>), None)
    """
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    admitted: list[type] = []
    choices: list[Any] = []
    only_literals = True
    for m in members:
        origin = typing.get_origin(m)
        if origin is Literal:
            choices += typing.get_args(m)
            admitted += [type(v) for v in typing.get_args(m)]
            continue
        if m is type(None):
            choices.append(None)
            admitted.append(m)
            continue
        only_literals = False
        if m is Any:
            admitted.append(object)
        elif m is float:
            admitted += [float, int]
        elif origin in (Sequence, list, tuple):
            admitted += [list, tuple]
        elif origin in (dict, Mapping):
            admitted.append(dict)
        elif isinstance(m, type):
            admitted.append(m)
        else:
            raise TypeError(f"no runtime check for the annotation {m!r}")
    return tuple(dict.fromkeys(admitted)), (tuple(choices) if only_literals and choices else None)


def _items(hint: Any) -> tuple[type, ...] | None:
    """The types a list admits as its elements where the annotation ``hint`` admits a
    ``Sequence[str]``, ``Sequence[int]`` or ``Sequence[float]`` (a float: an int too), else None.

    Example:
        >>> _items(Sequence[str] | None), _items(Sequence[float]), _items(int | None)
        ((<class 'str'>,), (<class 'float'>, <class 'int'>), None)
    """
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for m in members:
        if typing.get_origin(m) in (Sequence, list, tuple) and typing.get_args(m)[0] in (str, int, float):
            item = typing.get_args(m)[0]
            return (float, int) if item is float else (item,)
    return None


def warmup_example(epochs: float) -> float:
    """A warmup to suggest for a run (or phase) of ``epochs`` epochs: a tenth of it, at most
    one epoch unless that is half of it or more."""
    return max(epochs / 10, min(epochs / 2, 1))


@dataclass
class FinetuneConfig:
    """Every setting of [`transferkit.finetune`][transferkit.finetune], with its default.

    Build it with keywords (``FinetuneConfig(backbone=..., data=...)``), from a dict
    ([`from_dict`][transferkit.FinetuneConfig.from_dict], which also reads YAML-style strings such as ``"1e-3"``), or from a
    file ([`load_config`][transferkit.load_config]); ``to_dict()`` gives plain JSON data (Python objects such as
    a Dataset appear as ``"<Dataset>"``). Values are checked when the record is made:
    a wrong type or a value out of range raises [`ConfigError`][transferkit.ConfigError]
    naming the key, the value and what is valid. Settings that depend on the data or the
    backbone (``class_weights`` length, ``image_size`` against the backbone) are checked by
    [`transferkit.decide`][transferkit.decisions.decide].

    Example:
        >>> FinetuneConfig(data="images/", epochs=0)
        Traceback (most recent call last):
        ...
        transferkit.errors.ConfigError: finetune(): epochs=0 is out of range; expected a positive integer.
    """

    # --- model
    backbone: str | BackboneLike = _opt("tv:resnet18", "registered backbone name (see `transferkit backbones`) or a "
                                          "Backbone object", group="model", flag=True)
    weights: str | Path | None = _opt("DEFAULT", "pretrained weights: 'DEFAULT', a tag, a file path, or None for "
                                      "random init", group="model", flag=True)
    backbone_options: dict[str, Any] | None = _opt(None, "extra keyword arguments of get_backbone()", group="model")
    head: Literal["linear", "mlp", "logistic"] | None = _opt(
        None, "'linear', 'mlp' or 'logistic' (scikit-learn probe); None: linear, or mlp with head_hidden", group="model")
    head_hidden: Sequence[int] = _opt((), "hidden layer widths of an MLP head", group="model", check=_hidden)
    head_activation: Literal["relu", "gelu", "tanh", "sigmoid"] = _opt("relu", "activation of an MLP head",
                                                                      group="model")
    head_dropout: float = _opt(0.0, "dropout after each hidden layer of the head (a linear head: before its layer)",
                               group="model", check=_fraction)
    head_norm: Literal["auto", True, False] = _opt(
        "auto", "start the head with a fixed FeatureNorm (auto: when features are cached)", group="model")
    # --- data
    data: str | Path | MapStyleDataset | None = _opt(
        None, "training data: a folder root/CLASS/FILE (or with train/ and val/), a CSV, or a Dataset", group="data")
    val_data: str | Path | MapStyleDataset | None = _opt(
        None, "validation data (default: a stratified split of data)", group="data")
    classes: Sequence[str] | None = _opt(None, "class names, in output order (default: from the data)", group="data")
    val_split: float = _opt(VAL_SPLIT, "fraction held out for validation when there is no val_data", group="data",
                            check=_fraction)
    on_bad_file: Literal["skip", "raise"] = _opt("skip", "unreadable files: 'skip' (reported) or 'raise'",
                                                 group="data", flag=True)
    scan: Literal["quick", "full", "none"] = _opt(
        "quick", "check files before training: 'quick' (headers), 'full' (decode all) or 'none'", group="data")
    max_seconds: float | None = _opt(30.0, "audio: longer clips are cropped to their middle this many seconds (None: "
                                     "whole clips; memory grows with the longest)", group="data", check=seconds_problem,
                                     flag=True)
    decode_once: Literal["auto", True, False] = _opt(
        "auto", "decode and resize images once, crop/flip per epoch, when the backbone trains for 2+ epochs (auto: "
        "when they fit the memory budget or cache_dir)", group="data")
    image_size: int | None = _opt(None, "crop size in pixels (default: the backbone's)", group="data",
                                  check=_image_size, flag=True)
    augment: Literal["standard", "flip", "none"] | None = _opt(
        None, "'standard', 'flip' or 'none' (default: standard when the backbone runs every epoch: it trains, or "
        "cache_features=False)", group="data", flag=True)
    # --- task
    task: Literal["multiclass", "multilabel", "regression"] = _opt(
        "multiclass", "'multiclass', 'multilabel' or 'regression' (data: a Dataset, or a CSV of path and one column "
        "per output)", group="task", flag=True)
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss", group="task", check=_fraction)
    class_weights: Literal["balanced"] | Sequence[float] | None = _opt(
        None, "loss weight per class: a list, or 'balanced'", group="task", check=_class_weights)
    target_norm: Literal["auto", True, False] = _opt(
        "auto", "regression: train on (y - mean) / std of the training targets, the model's outputs in the "
        "targets' units (auto: for regression)", group="task")
    # --- policy
    policy: str | PolicyLike = _opt("feature_extraction", "fine-tuning policy (see docs/policies.md) or a Policy",
                                group="policy", flag=True)
    # --- optimisation
    epochs: int = _opt(10, "training epochs", group="optimisation", check=_positive_int, flag=True)
    batch_size: int = _opt(32, "training batch size (per process under DDP)", group="optimisation",
                           check=_positive_int, flag=True)
    lr: float | None = _opt(None, "base learning rate (default: 1e-2 when only the head trains, else 1e-3)",
                            group="optimisation", check=_positive, flag=True)
    weight_decay: float = _opt(1e-4, "weight decay (not on biases and norms; none with L2-SP)", group="optimisation",
                               check=_non_negative)
    optimizer: Literal["adamw", "adam", "sgd"] = _opt("adamw", "'adamw', 'adam' or 'sgd'", group="optimisation",
                                                      flag=True)
    momentum: float = _opt(0.9, "SGD momentum (Nesterov)", group="optimisation", check=_fraction)
    schedule: Literal["cosine", "constant", "step", "exponential", "one_cycle", "plateau"] = _opt(
        "cosine", "learning-rate schedule", group="optimisation", flag=True)
    warmup_epochs: float = _opt(0, "linear warmup, in epochs (fractions allowed)", group="optimisation",
                                check=_non_negative)
    schedule_options: dict[str, Any] | None = _opt(None, "options of the schedule, e.g. {'min_factor': 0.01}",
                                                   group="optimisation")
    probe_Cs: Sequence[float] | None = _opt(None, "head='logistic': the C values tried", group="optimisation",
                                            check=_probe_cs)
    early_stopping: int | None = _opt(None, "stop after N epochs without improvement", group="optimisation",
                                      check=_opt_positive_int)
    monitor: Literal["val_loss", "val_acc", "train_loss", "train_acc"] | None = _opt(
        None, "metric of the best epoch (default: val_acc, val_loss for regression)", group="optimisation")
    restore_best: bool = _opt(True, "return the best epoch's weights", group="optimisation")
    # --- features
    cache_features: Literal["auto", True, False] = _opt(
        "auto", "compute a frozen backbone's features once (auto: whenever it stays frozen)", group="features")
    cache_dir: str | Path | None = _opt(None, "keep feature-cache entries on disk here, for later runs",
                                        group="features")
    cache_views: int = _opt(1, "augmented views per training image in the feature cache", group="features",
                            check=_positive_int)
    feature_engine: Literal["auto", "eager", "onnxruntime", "compile"] = _opt(
        "auto", "engine of the frozen feature pass: 'eager', 'onnxruntime', 'compile' or 'auto' (the fastest timed "
        "on the run's input whose features agree with eager fp32)", group="features", flag=True)
    # --- runtime
    device: str = _opt("auto", "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'", group="runtime", check=_device, flag=True)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _opt(
        "auto", "'auto', 'fp32', 'bf16' or 'fp16' (auto: see docs/training.md)", group="runtime", flag=True)
    channels_last: Literal["auto", True, False] = _opt(
        "auto", "channels_last memory format (auto: where it is faster)", group="runtime")
    compile: Literal["auto", True, False] = _opt(
        "auto", "torch.compile the trained module (auto: tried on the run's own steps where the run is long enough "
        "for a compilation that does not pay to cost at most 5% of it, and kept where the compiled step is faster; "
        "see docs/training.md)", group="runtime")
    input_decode: Literal["auto", "cpu", "gpu"] = _opt(
        "auto", "where images are decoded: 'cpu' (DataLoader workers, Pillow), 'gpu' (nvJPEG on a CUDA device) or "
        "'auto' (the GPU where it was timed faster on the run's own JPEG files)", group="runtime", flag=True)
    num_workers: int | None = _opt(None, "DataLoader workers (default: chosen for the machine)", group="runtime",
                                   check=_workers)
    seed: int = _opt(0, "random seed (data split, order, augmentation, head init)", group="runtime", check=_seed,
                     flag=True)
    deterministic: bool = _opt(False, "deterministic kernels (slower on GPUs)", group="runtime")
    # --- outputs
    export: str | Path | None = _opt(None, "write a verified TorchScript file here", group="outputs", flag=True)
    checkpoint: str | Path | None = _opt(None, "rewrite a resumable checkpoint here after every epoch",
                                         group="outputs", flag=True)
    resume: bool = _opt(False, "continue the run in `checkpoint` (with the same settings)", group="outputs", flag=True)
    log_dir: str | Path | None = _opt(None, "TensorBoard log folder", group="outputs")
    plots_dir: str | Path | None = _opt(None, "write training curves, confusion matrix and example grids (PNG) here",
                                        group="outputs", flag=True)
    portable_metadata: bool = _opt(True, "exports record data and weight files by name and digest (False: the "
                                   "training machine's full paths, as checkpoints do)", group="outputs")
    top_k: int = _opt(5, "k of the top-k accuracy", group="outputs", check=_positive_int)
    callbacks: Sequence[Callable[[dict[str, Any]], Any]] = _opt((), "functions called with each epoch's row",
                                                                group="outputs", serial=False)
    verbose: bool = _opt(True, "print the plan and progress", group="outputs")

    def __post_init__(self) -> None:
        who = caller()
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f, getattr(self, f.name), who))
            if _is_path(f.name) and isinstance(getattr(self, f.name), str) and not getattr(self, f.name).strip():
                raise ConfigError(f"{who}: {f.name}='' is an empty path (an unset variable in a shell command?); give "
                                  "a path, or leave it out.")
            if _is_path(f.name):  # a leading ~ as a shell and a config file read it (a list of shards: each)
                value = getattr(self, f.name)
                value = type(value)(map(expand_home, value)) if isinstance(value, (list, tuple)) else \
                    expand_home(value)
                setattr(self, f.name, value)
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"{who}: warmup_epochs={self.warmup_epochs!r} is longer than the run (epochs="
                              f"{self.epochs!r}): the rate would never reach lr. Use fewer than {self.epochs}, e.g. "
                              f"{warmup_example(self.epochs):g}.")
        check_schedule_options(self.schedule, self.schedule_options)
        names = [str(c) for c in self.classes] if self.classes is not None and not isinstance(self.classes, str) else []
        twice = sorted({c for c in names if names.count(c) > 1})
        if twice:
            raise ConfigError(f"{who}: classes= names {twice[:5]} more than once; it names each output of the model "
                              "once, in order. Give each class one entry.")
        taken = sorted({"name", "weights"} & set(self.backbone_options or {}))
        if taken:
            raise ConfigError(f"{who}: backbone_options holds {', '.join(taken)}, which finetune() sets itself (the "
                              "backbone= and weights= settings): give them as those settings and leave them out of "
                              "backbone_options.")
        self._check_task_options()
        if self.data is None:
            raise ConfigError(f"{who}: data is required: a folder root/<class>/<file>, a CSV of path,label, or a "
                              "Dataset of (input, label).")

    def _check_task_options(self) -> None:
        """Settings that do not apply to ``task``: refused here, so that a dry run refuses
        them as the run would (not after the data are read and the features computed)."""
        task, who = self.task, caller()
        check_task_settings(task, label_smoothing=self.label_smoothing, class_weights=self.class_weights,
                            monitor=self.monitor, who=who)
        if self.head == "logistic" and task != "multiclass":
            raise ConfigError(f"{who}: head='logistic' fits a multiclass classifier (scikit-learn's "
                              f"LogisticRegression); task={task!r} needs head='linear' (or a head with hidden "
                              "layers) on the features.")
        if self.head == "logistic" and (self.head_dropout or self.early_stopping is not None):
            given = f"head_dropout={self.head_dropout}" if self.head_dropout else \
                f"early_stopping={self.early_stopping}"
            raise ConfigError(f"{who}: head='logistic' is fitted once by scikit-learn (no epochs, no dropout); "
                              f"{given} would be ignored. Drop it, or use head='linear' to train a head by epochs.")
        if self.probe_Cs is not None and self.head != "logistic":
            raise ConfigError(f"{who}: probe_Cs are the C values of head='logistic' (the linear probe); "
                              f"head={self.head!r} trains by epochs and would ignore them. Drop probe_Cs, or set "
                              "head='logistic'.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> FinetuneConfig:
        """A config from plain data (YAML, JSON, CLI): keys checked, numeric strings read as numbers.
        A recipe's own keys (`RECIPE_KEYS`: ``runs``, ``data_dir``, ...) are refused, named with ``source``."""
        merged = merge_config(values, source=source)
        recipe = sorted(set(merged) & set(RECIPE_KEYS))
        if recipe:
            raise unknown_key_error(recipe[0], source, recipe_keys=False)
        return cls(**merged)

    def to_dict(self, *, portable: bool = False) -> dict[str, Any]:
        """Plain JSON data; Python objects appear as ``"<TypeName>"``. Paths are absolute (a run
        resumed from another folder reads and writes where the run did), or with
        ``portable=True`` only their file names (`portable_paths`: for exports shipped to
        other machines)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata["serial"]:
                v = getattr(self, f.name)
                if f.name == "policy" and not isinstance(v, (str, type(None))):
                    v = _policy_text(v)
                if isinstance(v, (str, Path)) and _is_path(f.name):
                    v = _absolute(f.name, v)
                out[f.name] = jsonable(v)
        return portable_paths(out) if portable else out

    @classmethod
    def from_call(cls, config: Any, options: dict[str, Any]) -> FinetuneConfig:
        """The configuration of a call ``finetune(config, **options)``, as `finetune`, `plan`,
        `lr_find` and `linear_probe` take it: ``config`` a ``FinetuneConfig`` (``options`` replace
        some of its settings), a backbone (a name such as ``"tv:resnet18"`` or a ``Backbone``), or
        None. Errors name the call (`called_as`).

        Example:
            >>> FinetuneConfig.from_call("tk:small_cnn", {"data": "images/", "epochs": 2}).backbone
            'tk:small_cnn'
        """
        unknown = set(options) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise unknown_key_error(sorted(unknown)[0], caller(), recipe_keys=False)
        if isinstance(config, cls):
            return config.replace(**options) if options else config
        if config is not None:
            if "backbone" in options:
                raise ConfigError(f"{caller()}: backbone given twice (positionally and as backbone=).")
            options = {"backbone": config, **options}
        return cls(**options)

    def replace(self, **changes: Any) -> FinetuneConfig:
        """A copy with ``changes`` (checked like the constructor's arguments)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise unknown_key_error(sorted(unknown)[0], caller(), recipe_keys=False)
        return dataclasses.replace(self, **changes)


def _policy_text(policy: Any) -> Any:
    """A Policy object as its canonical string where ``Policy.parse`` reads that back to the
    same policy (so a record of it resumes without the object), else the object itself (a
    record says ``"<Policy>"``). A Policy refuses what its string cannot hold (a LoRA target
    pattern empty or with spaces at its ends), and writes ``\\,`` in a pattern as ``,``."""
    try:
        return str(policy) if type(policy).parse(str(policy)) == policy else policy
    except Exception:  # noqa: BLE001 - a string the parser refuses: the object is kept
        return policy


def _init_with_known_keys(init: Callable[..., None]) -> Callable[..., None]:
    """The dataclass ``__init__``, refusing an unknown key with a ConfigError and a suggestion."""
    import functools

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(self.__dataclass_fields__))
        if unknown:
            raise unknown_key_error(unknown[0], "FinetuneConfig()", recipe_keys=False)
        init(self, *args, **kwargs)

    return __init__


FinetuneConfig.__init__ = _init_with_known_keys(FinetuneConfig.__init__)  # type: ignore[method-assign]


def _annotate_fields() -> None:
    """Each field's metadata gets the ``types`` and ``choices`` its annotation admits: the
    annotation is the one place a field's type is written (the checks, the CLI and the
    documentation read it from there)."""
    hints = typing.get_type_hints(FinetuneConfig)
    for f in dataclasses.fields(FinetuneConfig):
        admitted, choices = _admitted(hints[f.name])
        f.metadata = types.MappingProxyType({**f.metadata, "types": admitted, "choices": choices,
                                             "items": _items(hints[f.name])})


_annotate_fields()

# config keys that do not change what a run computes: they may differ when resuming, and between
# the ranks of one job (each node has its own paths and workers)
OUTPUT_KEYS = frozenset({"export", "checkpoint", "resume", "log_dir", "plots_dir", "top_k", "verbose", "callbacks",
                         "num_workers", "cache_dir", "device", "data", "val_data", "portable_metadata",
                         # engines and compilation agree with eager fp32 (train/engines.py); the GPU and
                         # CPU decoders differ by resampling noise (data/gpu_jpeg.py)
                         "feature_engine", "compile", "input_decode"})
_PATH_KEYS = {"data", "val_data", "weights", "cache_dir", "export", "checkpoint", "log_dir", "plots_dir"}


def portable_paths(config: dict[str, Any]) -> dict[str, Any]:
    """A configuration's plain data (`FinetuneConfig.to_dict`) with its paths reduced to their
    file names: what an export shipped to other machines records (also of a checkpoint's
    configuration, which holds the training machine's paths). No URL's signature is recorded
    (`transferkit._text.hide_secrets`).

    Example:
        >>> portable_paths({"data": "/home/ann/photos/train", "lr": 0.01})
        {'data': 'train', 'lr': 0.01}
        >>> portable_paths({"data": "https://h/shards/train-{0..9}.tar?sig=c2ln"})
        {'data': 'train-{0..9}.tar?sig=…'}
        >>> portable_paths({"data": ["https://h/a.tar?sig=c2ln", "/data/b.tar"]})
        {'data': ['a.tar?sig=…', 'b.tar']}
        >>> portable_paths({"backbone_options": {"pretrained_cfg_overlay": {"file": "/home/ann/w.pth"}}})
        {'backbone_options': {'pretrained_cfg_overlay': {'file': 'w.pth'}}}
    """
    def name(v: Any) -> Any:
        return Path(hide_secrets(v)).name if isinstance(v, str) else [name(x) for x in v] if isinstance(v, list) else v
    return {k: name(v) if _is_path(k) else _local_names(v) if isinstance(v, dict) else v for k, v in config.items()}


def _local_names(value: Any) -> Any:
    """``value`` (options: dicts and lists of them) with every absolute local path in it reduced
    to its file name and no URL's signature (timm's ``pretrained_cfg_overlay={'file': ...}``)."""
    if isinstance(value, dict):
        return {k: _local_names(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_local_names(v) for v in value)
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith(("~", "file:"))):
        return Path(value).name
    return hide_secrets(value) if isinstance(value, str) else value


def portable_decisions(decisions: dict[str, Any]) -> dict[str, Any]:
    """Plain decisions (`Decisions.to_dict`) as an export shipped to other machines records
    them: the configuration's paths reduced to file names (`portable_paths`), the weights
    file to ``name@digest``. Also for a checkpoint's decisions, which hold the training
    machine's paths (`transferkit export`)."""
    out = {**decisions, "config": portable_paths(decisions.get("config") or {})}
    if isinstance(decisions.get("backbone_options"), dict):  # a Backbone object's build options
        out["backbone_options"] = _local_names(decisions["backbone_options"])
    if decisions.get("weights_file"):
        out["weights"] = decisions["weights_file"]
    return out


def _is_path(key: str) -> bool:
    return key in _PATH_KEYS


def _absolute(key: str, value: str | Path) -> str | Path:
    """A local path ``value`` of setting ``key`` made absolute; URLs, ``pipe:`` commands and
    ``weights`` stay as given (the weights are a decision a resume compares, and are
    identified by their digest: a file named by a relative path keeps resuming)."""
    text = str(value)
    if "://" in text or text.startswith("pipe:") or key == "weights":
        return value
    return os.path.abspath(os.path.expanduser(text))


def config_fields() -> dict[str, dataclasses.Field]:
    """FinetuneConfig's fields by name (their metadata holds help, group, types, flag)."""
    return {f.name: f for f in dataclasses.fields(FinetuneConfig)}


def check_task_settings(task: str, *, label_smoothing: float = 0.0, class_weights: Any = None,
                        monitor: str | None = None, who: str | None = None) -> None:
    """Refuse a loss or monitor setting that does not apply to ``task``: one rule for the config
    (checked before any data are read) and for `make_loss` and `fit`, which code may call
    directly. ``who``: the call named at the start of the error."""
    said = f"{who}: " if who else ""
    if label_smoothing and task != "multiclass":
        raise ConfigError(f"{said}label_smoothing applies to task='multiclass' only (the cross-entropy loss), got "
                          f"task={task!r}; drop it.")
    if class_weights is not None and task == "regression":
        raise ConfigError(f"{said}class_weights do not apply to task='regression' (there are no classes); drop it.")
    if monitor is not None and monitor.endswith("_acc") and task == "regression":
        raise ConfigError(f"{said}monitor={monitor!r} does not exist for task='regression'; use "
                          f"{monitor[:-len('_acc')]}_loss.")


_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("transferkit_caller", default="finetune()")


def caller() -> str:
    """The public call whose settings are checked, as its errors name it: ``finetune()``
    unless the work runs inside `called_as`."""
    return _CALLER.get()


@contextlib.contextmanager
def called_as(name: str) -> Iterator[None]:
    """Within the block, configuration errors name ``name`` (e.g. ``"plan()"``) as the call
    the user made, not ``finetune()``, whose settings it shares."""
    token = _CALLER.set(name)
    try:
        yield
    finally:
        _CALLER.reset(token)


def unknown_key_error(key: str, source: str, *, recipe_keys: bool = True,
                      valid: Collection[str] | None = None) -> ConfigError:
    """The error for a key that ``source`` does not take: it names the closest valid key (or
    the setting another tool's name stands for, `ALIASES`) and lists them all. A config file
    or recipe (``recipe_keys``) also takes the recipe keys (`RECIPE_KEYS`) but no Python
    object; ``finetune()`` and ``FinetuneConfig()`` do not, and say where such a key goes.
    ``valid``: the keys ``source`` takes, where it takes fewer (a command that refuses some)."""
    if not recipe_keys and key in RECIPE_KEYS:
        here = " (finetune() reads the training data from data=)" if key == "data_dir" else ""
        return ConfigError(f"{source}: {key!r} is a recipe setting ({', '.join(RECIPE_KEYS)}), read by the recipe "
                           f"scripts (python recipes/<name>.py --help), not by finetune(){here}. Leave it out here, "
                           "or run the recipe.")
    if valid is None:
        settings = {k for k, f in config_fields().items() if f.metadata["serial"] or not recipe_keys}
        valid = settings | (set(RECIPE_KEYS) if recipe_keys else set())
    valid = sorted(valid)
    alias = ALIASES.get(str(key).lower())
    hint = f" Did you mean {alias!r}?" if alias in valid else suggest(str(key), valid)
    return ConfigError(f"{source}: unknown key {key!r}.{hint} Valid keys: {', '.join(valid)}.")


def _written(key: str, value: Any, in_file: bool) -> str:
    """A setting as its source writes it: ``key: value`` in a YAML file (``in_file``), else ``key=value``."""
    if not in_file:
        return f"{key}={value!r}"
    return f"{key}: {json.dumps(jsonable(value), ensure_ascii=False)}"


def _checked(f: dataclasses.Field, value: Any, source: str, *, text: bool = False, in_file: bool = False) -> Any:
    """``value`` for field ``f``, type- and range-checked (``text``: read numeric strings as
    numbers, and a whole float as the integer a setting of integers takes; ``in_file``: errors
    write the setting as a YAML file does)."""
    m = f.metadata
    types = m["types"]
    if text and is_none_word(value) and type(None) in types and "none" not in (m["choices"] or ()):
        value = None  # `none` or `null` in a file or on the command line ('none' stays where it is a choice)
    if text and (float in types or int in types) and isinstance(value, (str, float)):
        value = as_number(value, integer=float not in types)  # `epochs: 1.0` in a file, `--set epochs=1e3`
        value = float(value) if isinstance(value, int) and int not in types else value
    if text and isinstance(value, (list, tuple)) and m["items"] is not None and str not in m["items"]:
        value = [as_number(v, integer=m["items"] == (int,)) for v in value]  # YAML reads `[5e-1, 1]` as ['5e-1', 1]
    if text and isinstance(value, dict) and f.name == "schedule_options":  # every schedule option is a number
        value = {k: as_number(v) for k, v in value.items()}
    elif text and isinstance(value, dict):  # `clip_seconds: 8e-1` in backbone_options: YAML 1.1 reads text there
        value = _exponents_read(value)
    if object not in types and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
        names = " or ".join(sorted({"None" if t is type(None) else t.__name__ for t in types}))
        written = " (None is written null or none)" if text and type(None) in types else ""
        raise ConfigError(f"{source}: {_written(f.name, value, in_file)} has type {type(value).__name__}; expected "
                          f"{names}{written}.")
    if m["items"] is not None and isinstance(value, (list, tuple)):
        _check_items(f.name, value, m["items"], source, in_file)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {_written(f.name, value, in_file)} is not a finite number.")
    if m["choices"] is not None and value not in m["choices"]:
        hint = suggest(value, [c for c in m["choices"] if isinstance(c, str)]) if isinstance(value, str) else ""
        raise ConfigError(f"{source}: unknown {f.name} {value!r}.{hint} Valid values: "
                          f"{', '.join(map(repr, m['choices']))}.")
    problem = m["check"](value) if m["check"] is not None and value is not None else None
    if problem:
        raise ConfigError(f"{source}: {_written(f.name, value, in_file)} is out of range; expected {problem}.")
    if isinstance(value, list) and f.name in ("head_hidden",):
        value = tuple(value)
    return value


def _exponents_read(value: Any) -> Any:
    """``value`` (an option map, as a file or ``--set`` gives it) with every string that writes
    a number with an exponent and no dot (``8e-1``, which YAML 1.1 reads as text) read as that
    number (a whole one as an int: ``1e1`` channels), in nested maps and lists too; other text
    stays text."""
    if isinstance(value, dict):
        return {k: _exponents_read(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_exponents_read(v) for v in value]
    return as_number(value, integer=True) if isinstance(value, str) and _EXPONENT.match(value.strip()) else value


def as_number(value: Any, *, integer: bool = False) -> Any:
    """A numeric string (``"5e-1"``, which YAML 1.1 reads as text, ``" 2"``) as the number it
    writes, an int where it has no fraction or exponent; with ``integer``, a whole float
    (``1.0``, ``1e3``) as that int where it is exact (below 2**53); anything else as it is.

    Example:
        >>> as_number("5e-1"), as_number(" 2"), as_number("1e3", integer=True), as_number("x")
        (0.5, 2, 1000, 'x')
    """
    if isinstance(value, str) and _NUM.match(value.strip()):
        value = int(value) if value.strip().lstrip("+-").isdecimal() else float(value)
    if integer and isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        value = int(value)
    return value


def number_argument(kind: type, *, none: bool = False) -> Callable[[str], Any]:
    """The argparse ``type`` of a flag whose setting is a number (or None, with ``none``: ``none``
    or ``null`` in any capitals, read so by `merge_config`): the text must be an ``int`` (a whole
    number, ``1e3`` and ``2.0`` too, as in a config file: `as_number`) or a number (``kind``)."""
    def parse(text: str) -> Any:
        if none and is_none_word(text):
            return text
        value = as_number(text, integer=kind is int)
        if isinstance(value, int) or (kind is float and isinstance(value, float)):
            return kind(value)
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expects {what}{' (or none)' if none else ''}, got {text!r}")

    parse.__name__ = kind.__name__  # argparse's own errors name the type
    return parse


def is_none_word(value: Any) -> bool:
    """Whether ``value`` is how a file or the command line writes None (`NONE_WORDS`)."""
    return isinstance(value, str) and value.strip().lower() in NONE_WORDS


def _check_items(key: str, value: Sequence[Any], admitted: tuple[type, ...], source: str, in_file: bool) -> None:
    """Refuse an element of the list ``value`` of setting ``key`` whose type ``admitted`` does not hold."""
    for i, item in enumerate(value):
        if isinstance(item, admitted) and not isinstance(item, bool):
            continue
        names = "str" if admitted == (str,) else "int" if admitted == (int,) else "a number"
        hint = ""
        if isinstance(item, bool) and str in admitted:  # YAML reads yes/no, true/false, on/off as booleans
            hint = (" (YAML reads unquoted yes/no, true/false and on/off as booleans: quote each name, as in "
                    "['no', 'yes'])")
        raise ConfigError(f"{source}: {_written(f'{key}[{i}]', item, in_file)} has type {type(item).__name__}; "
                          f"expected {names}{hint}.")


def merge_config(*layers: Mapping[str, Any] | None, source: str = "config",
                 keys: Collection[str] | None = None, in_file: bool = False) -> dict[str, Any]:
    """Later layers override earlier ones; every key and value is checked (numeric strings
    such as ``"1e-3"`` become numbers, ``none`` and ``null`` None). Returns the merged plain
    dict (recipe keys included). The one function YAML files, CLI flags, ``--set`` overrides
    and recipes go through. ``keys``: the keys the caller takes, where it takes fewer (an
    unknown key's error suggests and lists only those). ``in_file``: the layers are a YAML file's,
    and errors write their settings as it does (``epochs: 1.5``)."""
    fields = config_fields()
    out: dict[str, Any] = {}
    for layer in layers:
        if layer is None:
            continue
        if not isinstance(layer, Mapping):
            raise ConfigError(f"{source} must be a mapping of finetune() settings, got {type(layer).__name__}.")
        if layer.get("data") is not None and layer.get("data_dir") is not None:
            raise ConfigError(f"{source}: both data={layer['data']!r} and data_dir={layer['data_dir']!r} are set; "
                              "they name the same thing (the training data). Keep one.")
        for key, value in layer.items():
            if key in RECIPE_KEYS:
                allowed = RECIPE_KEYS[key]
                value = None if type(None) in allowed and is_none_word(value) else as_number(value, integer=True) \
                    if int in allowed else value
                if not isinstance(value, allowed) or isinstance(value, bool) and bool not in allowed:
                    names = " or ".join(sorted("None" if t is type(None) else t.__name__ for t in allowed))
                    raise ConfigError(f"{source}: {_written(key, value, in_file)} has type {type(value).__name__}; "
                                      f"expected {names}.")
                out[key] = value
            elif key in fields:
                if not fields[key].metadata["serial"]:
                    raise ConfigError(f"{source}: {key!r} is a Python object; pass it through the Python API.")
                out[key] = _checked(fields[key], value, source, text=True, in_file=in_file)
            else:
                raise unknown_key_error(key, source, valid=keys)
    return out


def jsonable(value: Any) -> Any:
    """Plain JSON data from configs and metrics (paths to str, tuples to lists, numpy to Python)."""
    import numpy as np

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


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line "
                              f"{seen[key] + 1}); a YAML mapping must name each key once.")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(text: str, *, source: str) -> Any:
    """Parse YAML safely, refusing duplicate keys."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from exc


def load_config(path: str | Path, *, keys: Collection[str] | None = None) -> dict[str, Any]:
    """Read and check a YAML config file; returns its settings as a plain dict. A relative
    path in it (``data``, ``export``, ``weights`` when it names a file, ...; see
    `_relative_to`) is relative to the file's folder, not to the current one. ``keys``: the
    keys the caller takes, where it takes fewer (see `merge_config`).

    Example:
        >>> load_config("recipes/hymenoptera.yaml")["runs"]["feature_extraction"]["policy"]  # doctest: +SKIP
        'feature_extraction'
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise ConfigError(f"Config file {str(path)!r} does not exist.") from exc
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read config file {str(path)!r}: {exc}") from exc
    cfg = merge_config(read_yaml(text, source=f"Config file {str(path)!r}") or {}, source=str(path), keys=keys,
                       in_file=True)
    for name, block in (cfg.get("runs") or {}).items():  # each run's settings, in the file's own spelling
        if isinstance(block, Mapping):
            merge_config(block, source=f"{path}, run {name!r}", keys=keys, in_file=True)
    return _relative_to(path.parent, cfg)


_FILE_KEYS = _PATH_KEYS | {"data_dir", "out_dir"}  # the settings of a config file that name files or folders
WEIGHTS_SUFFIXES = (".pt", ".pth", ".th", ".bin", ".ckpt", ".safetensors")  # a weights value ending so names a file


def _relative_to(folder: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` (a config file's settings, and those of each of its ``runs``) with every relative
    path joined to ``folder``, the file's own (each path of a list too). Left as written: absolute paths, ``~`` and
    ``$VARIABLE`` paths (expanded where they are used), URLs, ``pipe:`` commands, and a
    ``weights`` tag (``DEFAULT``: a weights value is a path when it holds a ``/``, ends in a
    weights file's suffix, or names a file beside the config file)."""
    if str(folder) in ("", "."):
        return cfg

    def joined(key: str, value: Any) -> Any:
        if key in _FILE_KEYS and isinstance(value, list):  # a list of shards or files: each path of it
            return [joined(key, v) for v in value]
        if key not in _FILE_KEYS or not isinstance(value, str) or not value.strip():
            return value
        if os.path.isabs(value) or value.startswith(("~", "$", "pipe:")) or "://" in value:
            return value
        if (key == "weights" and "/" not in value and os.sep not in value and not value.endswith(WEIGHTS_SUFFIXES)
                and not os.path.exists(os.path.join(folder, value))):
            return value
        return os.path.join(str(folder), value)

    out = {k: joined(k, v) for k, v in cfg.items()}
    if isinstance(out.get("runs"), dict):
        out["runs"] = {name: {k: joined(k, v) for k, v in block.items()} if isinstance(block, dict) else block
                       for name, block in out["runs"].items()}
    return out


def parse_overrides(items: list[str] | tuple[str, ...], *, keys: Collection[str] | None = None) -> dict[str, Any]:
    """``["epochs=3", "head_hidden=[256]"]`` -> ``{"epochs": 3, "head_hidden": (256,)}`` (values are YAML).
    ``keys``: the keys the caller takes, where it takes fewer (see `merge_config`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"An override must look like key=value, got {item!r}.")
        out[key.strip()] = read_yaml(value, source=f"override {item!r}") if value.strip() else None
    return merge_config(out, source="command-line overrides", keys=keys)
