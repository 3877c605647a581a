"""The shared runner behind ``recipes/*.py``: arguments, config files, data, results.

A recipe script only says where its data come from (a function returning datasets) and
its defaults; this module turns that into a command line::

    python recipes/<name>.py --data-dir DIR [--config FILE] [--backbone B] [--policy P]
                             [--epochs N] [--set key=value ...] [--out DIR] [--limit N]

Where settings come from, each overriding the ones before it: the recipe's YAML config
(``recipes/<name>.yaml`` unless ``--config``; the recipe's own file is optional, a file named
with ``--config`` must exist), then a run's own block under ``runs:``, then the command-line
flags and ``--set`` (the most specific: they override every run). Every key is checked by
`transferkit.config.merge_config` against [`FinetuneConfig`][transferkit.FinetuneConfig]'s
fields and the recipe keys, and every run's merged settings are checked before the data are
read and the first run starts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from transferkit.config import (RECIPE_KEYS, FinetuneConfig, called_as, config_fields, load_config, merge_config,
                                number_argument, parse_overrides)
from transferkit._io import atomic_write, check_writable
from transferkit._signals import (deaf_once_said, first_interruption_holds, interrupt_exit, signal_name,
                                  terminate_as_interrupt)
from transferkit.errors import ConfigError, DataError, TransferkitError, WeightsError, suggest, warn
from transferkit._text import plural
from transferkit.helpformat import (HELP, MAX_PIXELS_HELP, Parser, one_line, one_line_warnings, pixel_limit,
                                   set_pixel_limit)
from transferkit.spelling import RECIPE_FLAGS, RECIPE_OWNS, flag, recipe_spelling


@dataclass
class RecipeData:
    """What a recipe's data function returns: training data, validation data (or None:
    a stratified split of the training data), an optional held-out test set, class names."""

    train: Any
    val: Any = None
    test: Any = None
    classes: list[str] | None = None


def expand_vars(value: Any, key: str = "a setting", *, source: str | None = None) -> Any:
    """``${TRANSFERKIT_DATA}`` (defaulting to `default_data_root`), other environment
    variables and ``~`` expanded in string values. A ``${NAME}`` that is not set is a
    [`ConfigError`][transferkit.ConfigError] naming ``key`` (it would be read as part of a
    path that does not exist) and ``source``, the file it was read from, where given (else
    the key is spelt as the command line spells it); an unset ``$NAME`` stays as written."""
    if not isinstance(value, str) or ("$" not in value and not value.startswith("~")):
        return value
    env = {**os.environ, "TRANSFERKIT_DATA": str(default_data_root())}
    unset = [m.group(1) for m in re.finditer(r"\$\{(\w+)\}", value) if m.group(1) not in env]
    if unset:
        where = f"{source}: {key}: {value!r}" if source else f"{key}={value!r}"
        raise ConfigError(f"{where} names the environment variable {unset[0]}, which is not set. Set it "
                          f"(export {unset[0]}=...), or write the path itself.")
    out = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), value)
    return os.path.expanduser(out)


def default_data_root() -> Path:
    """``$TRANSFERKIT_DATA``, else ``shared/data`` beside the checkout: the one whose
    ``recipes/`` holds the running script, or the one this package is imported from (an
    editable install); else (an installed package run from elsewhere) ``../shared/data``
    from the current folder."""
    if os.environ.get("TRANSFERKIT_DATA"):
        return Path(os.environ["TRANSFERKIT_DATA"])
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    roots = [Path(script).resolve().parents[1]] if script and Path(script).resolve().parent.name == "recipes" else []
    for root in [*roots, Path(__file__).resolve().parents[1]]:
        if (root / "pyproject.toml").is_file() and (root / "transferkit").is_dir():
            return root.parent / "shared" / "data"
    return Path("..") / "shared" / "data"


def _missing_data_dir(data_dir: Path, came: str | None) -> str:
    """Where a recipe's data folder that does not exist came from: ``came`` names the flag or
    the config file that gave it; None: ``$TRANSFERKIT_DATA``, whose default
    (`default_data_root`) depends on where the script is run from."""
    if came == "config":
        return f"{str(data_dir)!r}, the config's data_dir, does not exist"
    if came is not None:
        return f"{str(data_dir)!r} ({came}) does not exist"
    return f"{str(data_dir)!r} does not exist{_data_root_said('--data-dir')}"


def _data_root_said(flag: str) -> str:
    """Where ``${TRANSFERKIT_DATA}`` pointed, for a path under it that does not exist."""
    if os.environ.get("TRANSFERKIT_DATA"):
        return f" (TRANSFERKIT_DATA={os.environ['TRANSFERKIT_DATA']})"
    return (f": TRANSFERKIT_DATA is not set, so the data root is {str(default_data_root())!r} (shared/data beside "
            f"the checkout, else ../shared/data from the current folder); set TRANSFERKIT_DATA or pass {flag}")


def _check_config_weights(file_cfg: dict[str, Any], runs: dict[str, dict[str, Any]],
                          run_cfgs: dict[str, dict[str, Any]], cli: dict[str, Any], source: str,
                          data_dir: Path) -> None:
    """A weights file the config (a run's block, else the file) names under ``${TRANSFERKIT_DATA}``
    that is not there: said with where the data root pointed (it was "Weights file '...' does
    not exist", the variable unnamed). A data folder that is not there either is said first, by
    the data's own error."""
    if "weights" in cli or not data_dir.exists():
        return
    for run_name, run_cfg in run_cfgs.items():
        raw, path = runs[run_name].get("weights", file_cfg.get("weights")), run_cfg.get("weights")
        if not isinstance(raw, str) or "TRANSFERKIT_DATA" not in raw:
            continue
        if isinstance(path, str) and path == expand_vars(raw) and not Path(path).exists():
            raise WeightsError(f"{path!r}, the weights file {source} names ({raw}), does not exist"
                               f"{_data_root_said('--weights')}.")


def image_folder_splits(root: Path) -> RecipeData | None:
    """``root/train/<class>/*`` with ``root/val`` (or ``valid/``, ``validation/``) as the
    validation data and ``root/test`` as the test set, or None when ``root`` has no
    ``train/``. The same rule as [`transferkit.finetune`][transferkit.finetune] on such a folder
    ([`transferkit.data.find_split_folders`][transferkit.data.find_split_folders]); ``finetune`` alone validates on
    ``test/`` when there is no validation folder, where a recipe scores the test set."""
    from transferkit.data import find_split_folders
    from transferkit.data.folders import TRAIN_NAMES

    splits = find_split_folders(root)
    if splits is None:  # train/ beside other folders: a recipe's data folder is a split layout
        train = next((p for p in sorted(root.iterdir()) if p.is_dir() and p.name.lower() in TRAIN_NAMES), None) \
            if root.is_dir() else None
        return RecipeData(train=train) if train is not None else None
    return RecipeData(train=splits.train, val=splits.val, test=splits.test)


def limit_per_class(dataset: Any, limit: int | None, seed: int = 0) -> Any:
    """At most ``limit`` items of each class (for smoke tests on a slice of the data)."""
    if not limit or isinstance(dataset, (str, Path)):
        return dataset
    import numpy as np
    from torch.utils.data import Subset

    from transferkit.data import dataset_targets

    targets = np.asarray(dataset_targets(dataset))
    rng = np.random.default_rng(seed)
    keep = sorted(int(i) for c in np.unique(targets) for i in rng.permutation(np.flatnonzero(targets == c))[:limit])
    if hasattr(dataset, "view"):  # transferkit datasets keep their type (and fast decoding)
        return dataset.view(keep)
    sub = Subset(dataset, keep)
    sub.targets = [int(targets[i]) for i in keep]  # type: ignore[attr-defined]
    sub.classes = getattr(dataset, "classes", None)  # type: ignore[attr-defined]
    return sub


def torchvision_dataset(cls_name: str, root: Path, *, download: bool, **kwargs: Any) -> Any:
    """``torchvision.datasets.<cls_name>(root, download=download, **kwargs)`` with an error
    that says how to get the data when it is not there."""
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    try:
        return cls(str(root), download=download, **kwargs)
    except RuntimeError as exc:
        where = "--data-dir pointing at a folder with train/ and val/ or test/ class sub-folders"
        advice = f"Give {where}" if download else f"Pass --download to fetch it (needs internet), or {where}"
        why = re.sub(r"\s*You can use download=True to download it\.?", "", str(exc)).strip().rstrip(".")
        raise DataError(f"{cls_name} not found under {str(root)!r} (torchvision: {why}). {advice}.") from exc
    except OSError as exc:  # a download without a network (URLError is an OSError), a full disk
        raise DataError(download_failed(cls_name, root, exc)) from exc


def download_failed(name: str, root: Path, exc: BaseException, *, folders: bool = True) -> str:
    """Why a data set's ``--download`` into ``root`` failed, in one line, with what to do
    (``folders``: the recipe also reads a folder of train/ and val/ or test/ class folders)."""
    reason = getattr(exc, "reason", None) or exc
    other = " (or at a folder with train/ and val/ or test/ class sub-folders)" if folders else ""
    return (f"Could not download {name} into {str(root)!r}: {type(exc).__name__}: {reason}. Is this machine "
            f"online? Otherwise fetch the data set elsewhere and pass --data-dir pointing at it{other}.")


def torchvision_data(cls_name: str, train_kwargs: dict[str, Any], test_kwargs: dict[str, Any],
                     val_kwargs: dict[str, Any] | None = None) -> Callable[[Path, dict[str, Any]], RecipeData]:
    """A recipe data function: a local ``train/`` + ``val|test/`` folder when ``root`` has
    one, else the torchvision data set ``cls_name`` (downloaded with ``--download``)."""

    def data(root: Path, options: dict[str, Any]) -> RecipeData:
        local = image_folder_splits(root)
        if local is not None:
            return local
        dl = bool(options.get("download"))
        train = torchvision_dataset(cls_name, root, download=dl, **train_kwargs)
        val = torchvision_dataset(cls_name, root, download=dl, **val_kwargs) if val_kwargs else None
        test = torchvision_dataset(cls_name, root, download=dl, **test_kwargs)
        classes = getattr(train, "classes", None)
        return RecipeData(train=train, val=val, test=test, classes=list(classes) if classes else None)

    return data


def build_parser(name: str, description: str,
                 add_arguments: Callable[[argparse.ArgumentParser], None] | None = None, *,
                 get_data: str | None = None) -> argparse.ArgumentParser:
    """The recipe's command line; ``add_arguments(parser)`` adds the recipe's own options
    (they arrive in the data function's ``options["args"]``). ``get_data``: how to get the
    data of a recipe that cannot download them (its ``--download`` says so)."""

    p = Parser(prog=f"recipes/{name}.py", description=description, formatter_class=HELP)
    p.add_argument("--config", default=None, help=f"YAML config (default: recipes/{name}.yaml)")
    p.add_argument("--data-dir", default=None, help="the data folder (default from the config)")
    p.add_argument("--download", action="store_true",
                   help=f"not available: {get_data}" if get_data else "download through torchvision/torchaudio "
                   "when online")
    p.add_argument("--out", default=None, help="output folder for model.pt and results.json")
    p.add_argument("--backbone", default=None)
    p.add_argument("--weights", default=None, help="'DEFAULT', a tag, a file path, or 'none'")
    p.add_argument("--policy", default=None)
    p.add_argument("--epochs", type=number_argument(int), default=None)
    p.add_argument("--limit", type=number_argument(int), default=None,
                   help="use at most N items per class, N >= 1 (smoke tests)")
    p.add_argument("--run", default=None, help="run only this one of the config's runs")
    p.add_argument("--max-image-pixels", type=pixel_limit, default=None, metavar="N", help=MAX_PIXELS_HELP)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any finetune() setting but data, val_data, classes and export, which the "
                   "recipe sets")
    p.settings = frozenset(k for k, f in config_fields().items()  # what --set takes that has no flag here
                           if f.metadata["serial"] and k not in RECIPE_OWNS and flag(k) not in p._option_string_actions)
    p.own_options = []  # the recipe's own options (--split, --fold, ...), recorded with its results
    if add_arguments is not None:
        group = p.add_argument_group(f"{name} options")
        add_arguments(group)
        p.own_options = [a.dest for a in group._group_actions]
    return p


PROBE_UNUSED = ("early_stopping", "head_dropout")  # settings of trained heads that head='logistic' refuses
SPEECH_MODEL_OPTIONS = ("sample_rate", "clip_seconds")  # of an audio recipe's backbone_options, those ta: models take


def speech_model_options(settings: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """A run's settings with a ``ta:`` speech model: the recipe config's ``backbone_options``
    (written for its ``spec:`` backbone: ``n_mels``, ``n_fft``, ...) cut to the input's
    ``sample_rate`` and ``clip_seconds``, unless the user gave ``backbone_options`` (in
    ``given``: the keys set by ``--config``, the run's block, the flags or ``--set``). For
    `run_recipe`'s ``run_settings``."""
    options = settings.get("backbone_options")
    if str(settings.get("backbone", "")).startswith("ta:") and options and "backbone_options" not in given:
        settings = {**settings, "backbone_options": {k: v for k, v in options.items() if k in SPEECH_MODEL_OPTIONS}}
    return settings


def _check_limit(limit: Any, source: str, *, flag: bool) -> None:
    """``limit`` (items per class) is None or a positive integer; ``flag``: it came from the command line."""
    if limit is not None and limit < 1:
        given = f"--limit {limit}" if flag else f"limit: {limit} in the config"
        raise ConfigError(f"{source}: {given} is out of range; expected a positive integer (at most that many items "
                          "of each class), or leave it out to use all the data.")


def _run_blocks(runs: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """The config's ``runs:``, each block a mapping of ``finetune()`` settings (None: no changes);
    the recipe keys apply to the whole recipe and are refused inside a run."""
    out = {}
    for run_name, block in runs.items():
        if block is not None and not isinstance(block, dict):
            raise ConfigError(f"{source}: run {run_name!r} must be a mapping of finetune() settings (key: value lines "
                              f"indented under its name), got {type(block).__name__}.")
        inside = sorted(set(block or {}) & set(RECIPE_KEYS))
        if inside:
            raise ConfigError(f"{source}, run {run_name!r}: {inside[0]!r} is a setting of the whole recipe "
                              f"({', '.join(RECIPE_KEYS)}), not of one run. Move it above runs: in the config, or "
                              "give it on the command line (--data-dir, --download, --out, --limit).")
        out[str(run_name)] = dict(block or {})
    return out


def run_recipe(name: str, data_fn: Callable[[Path, dict[str, Any]], RecipeData], *, description: str,
               argv: list[str] | None = None, recipe_dir: Path | None = None,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
               run_settings: Callable[[dict[str, Any], set[str]], dict[str, Any]] | None = None,
               get_data: str | None = None) -> dict[str, Any]:
    """Parse arguments, merge the config, build the data, run [`finetune`][transferkit.finetune], evaluate the
    exported file on the test set (when there is one), print and write ``results.json``.
    ``add_arguments``: the recipe's own command-line options (see `build_parser`). ``run_settings(settings,
    given)``: the recipe's change to each run's merged settings, ``given`` naming the keys the user set (with
    ``--config``, the run's block, the flags or ``--set``), e.g. `speech_model_options`. ``get_data``: how
    to get the data, for a recipe that cannot download them (``--download`` is refused, saying so)."""
    parser = build_parser(name, description, add_arguments, get_data=get_data)
    args = parser.parse_args(argv)
    set_pixel_limit(args.max_image_pixels)
    recipe_dir = recipe_dir or Path.cwd() / "recipes"
    own_cfg = recipe_dir / f"{name}.yaml"  # optional: a recipe may keep all its settings in its flags
    file_cfg = load_config(args.config) if args.config else load_config(own_cfg) if own_cfg.exists() else {}
    # command-line values are the most specific: they override the file and every run in it
    # 'none' (weights) is read as None by merge_config, which every use of cli goes through
    cli = {k: getattr(args, flag[2:].replace("-", "_")) for k, flag in RECIPE_FLAGS.items()}
    cli = {k: v for k, v in cli.items() if v is not None}
    if args.download:
        cli["download"] = True
    overridden = parse_overrides(args.set)
    cli.update(overridden)
    for key in [k for k in file_cfg if k not in cli]:  # an unset ${VAR} the file gives: said as the file's
        expand_vars(file_cfg[key], key, source=args.config or f"recipes/{own_cfg.name}")
    _refuse_owned(name, set(file_cfg) | set(cli))  # before merging: data= beside the file's data_dir is this error
    cfg = {k: expand_vars(v, k) for k, v in merge_config({**file_cfg, **cli}, source=f"{name} recipe").items()}
    recipe = {k: cfg.pop(k) for k in list(cfg) if k in RECIPE_KEYS}
    if recipe.get("download") and get_data:
        raise ConfigError(f"{name} recipe: {'--download' if args.download else 'download: true'} is not available: "
                          f"this recipe cannot download its data. {get_data}")
    _check_limit(recipe.get("limit"), f"{name} recipe", flag="limit" in cli)
    cli = {k: expand_vars(v, k) for k, v in cli.items() if k not in RECIPE_KEYS}
    runs = _run_blocks(recipe.get("runs") or {}, f"{name} recipe") or {"": {}}
    _refuse_owned(name, {k for r in runs.values() for k in r})
    for run_name, overrides in runs.items():  # every run's keys and values, before the first run starts
        merge_config(cfg, overrides, cli, source=f"{name} recipe, run {run_name!r}")
    if args.run:
        if args.run not in runs:
            listed = f"this recipe's runs: {list(runs)}" if "" not in runs else \
                "this recipe's config has no runs: (it trains one model); leave out --run"
            raise ConfigError(f"Unknown run {args.run!r}; {listed}.{suggest(args.run, runs) if '' not in runs else ''}")
        runs = {args.run: runs[args.run]}
    data_dir = Path(recipe.get("data_dir") or default_data_root() / name).expanduser()
    given = set(cli) | (set(file_cfg) if args.config else set())
    own_backbone = load_config(own_cfg).get("backbone") if own_cfg.exists() else None  # what its data are for
    run_cfgs = {run_name: _run_config(name, run_name, cfg, overrides, cli, data_dir, given | set(overrides),
                                      run_settings, written_for=file_cfg.get("backbone"),
                                      audio=_is_audio(own_backbone))
                for run_name, overrides in runs.items()}
    _check_config_weights(file_cfg, runs, run_cfgs, cli, args.config or f"recipes/{own_cfg.name}", data_dir)
    _check_own_checkpoints(name, run_cfgs)
    out = Path(recipe.get("out_dir") or f"runs/{name}")
    for run_name in run_cfgs:  # written after training: a folder or a file in its way is said before
        check_writable((out / run_name if run_name else out) / "results.json", what="recipe results", flag="--out")
    checked = data_dir.exists()  # a folder that is not there is said first, by the data's own error (or downloaded)
    if checked:  # before the data are read (a long scan) as well as before any run trains
        _check_runs(run_cfgs, data_dir)
    try:
        data = data_fn(data_dir, {**recipe, "args": args, "settings": cfg})
    except DataError as exc:
        if data_dir.exists():
            raise
        came = "--data-dir" if args.data_dir is not None else "--set data_dir" if "data_dir" in overridden else \
            "config" if "TRANSFERKIT_DATA" not in str(file_cfg.get("data_dir", "${TRANSFERKIT_DATA}")) else None
        raise DataError(f"{exc} ({_missing_data_dir(data_dir, came)})") from exc
    train, val, test, classes = _sliced(data, recipe.get("limit"), cfg.get("seed", 0))
    _check_test(test, train, classes, audio=any(_is_audio(c.get("backbone")) for c in run_cfgs.values()))
    if not checked:
        _check_runs(run_cfgs, data_dir)
    # what chose the data besides data_dir (a split, a fold, --limit): runs that differ in them differ
    options = {**{k: getattr(args, k) for k in parser.own_options}, "limit": recipe.get("limit")}
    summaries = []
    for run_name, run_cfg in run_cfgs.items():
        run_out = out / run_name if run_name else out
        t0 = time.perf_counter()
        _running["run"] = run_name if len(run_cfgs) > 1 else None  # named in hints that apply to it alone
        # settings the recipe's own file set, not the user: said as the file's, not as a typed --set
        _running["written_in"] = {k: (f"recipes/{own_cfg.name}", run_cfg.get(k)) for k in
                                  {*file_cfg, *runs[run_name]} - given} if not args.config else {}
        export, best = run_out / "model.pt", _complete_run(run_cfg, run_out, {"data": train, "val_data": val,
                                                                                 "classes": classes})
        if best is not None:  # a job started again after it ended (preempted jobs are): nothing to resume
            print(f"{name}{f' run {run_name}' if run_name else ''}: {run_cfg['checkpoint']} holds a complete run: "
                  f"nothing to resume; its export {export} is scored again.", file=sys.stderr)
        else:
            from transferkit.api import finetune

            if run_cfg.get("resume") and run_cfg.get("checkpoint") and not Path(run_cfg["checkpoint"]).exists():
                # one command for every start of a job that may be preempted, as the command line's: the first start
                # has nothing to resume
                print(f"{name}{f' run {run_name}' if run_name else ''}: resume=true: {run_cfg['checkpoint']} does not "
                      "exist yet; a new run starts and saves it there.", file=sys.stderr, flush=True)
                run_cfg = {**run_cfg, "resume": False}
            result = finetune(data=train, val_data=val, classes=classes, export=export, **run_cfg)
            best, export = result.best, result.export_path
        _running["run"], _running["written_in"] = None, {}
        summary: dict[str, Any] = {"recipe": name, "run": run_name or None, "config": run_cfg,
                                   "data_dir": str(data_dir), "options": options, "best": best,
                                   "seconds": round(time.perf_counter() - t0, 1), "export": str(export)}
        if test is not None:
            try:
                summary["test_acc"] = evaluate_export(export, test)
            except KeyboardInterrupt as exc:  # the model is whole: say where, and how to score it again
                again = "run the recipe again with resume=true (a complete run is scored again)" \
                    if run_cfg.get("checkpoint") else f"score it with `transferkit evaluate {export} <test data>`"
                raise KeyboardInterrupt(f"Interrupted ({signal_name(exc)}) while scoring the test set: the trained "
                                        f"model is in {str(export)!r}, and {str(run_out / 'results.json')!r} was "
                                        f"not written; {again}.") from exc
        atomic_write(run_out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1,
                                                                                            default=str)),
                     what="recipe results", flag="--out")
        print(json.dumps({k: summary[k] for k in ("recipe", "run", "options", "best", "test_acc", "seconds")
                          if k in summary},
                         default=str), flush=True)
        summaries.append(summary)
    if len(summaries) > 1:  # for people: on stderr where stdout is read by a program (one JSON object a line)
        print(results_table(summaries), file=sys.stdout if sys.stdout.isatty() else sys.stderr)
    return summaries[0] if len(summaries) == 1 else {"recipe": name, "runs": summaries}


def _complete_run(run_cfg: dict[str, Any], run_out: Path, data: dict[str, Any]) -> dict[str, Any] | None:
    """With ``resume`` and a checkpoint that holds a complete run whose export is in ``run_out``:
    the run's best epoch (from its ``results.json``, else the checkpoint's record; ``{}`` where
    neither says); else None (the run trains, or the resume says why it cannot). Settings that
    differ from the complete run's are a ConfigError (`settings_changed`), and so are other
    ``data`` (``data``, ``val_data``, ``classes``: `transferkit.decisions.plan` refuses them as a
    resume does: the export was not trained on them, and its test score would not be the run's)."""
    if not run_cfg.get("resume") or not (run_out / "model.pt").is_file():
        return None
    from transferkit.checkpoints import run_in

    info = run_in(run_cfg.get("checkpoint"))
    if info is None or not info["complete"]:
        return None
    from transferkit.decisions import settings_changed

    changed = settings_changed(info["decisions"], run_cfg)
    if changed:  # as the command line refuses them: none would be used
        raise ConfigError(f"{run_cfg['checkpoint']} holds a complete run, of other settings than this run's "
                          f"({', '.join(changed[:6])}): none of them would be used. Drop the changes (resume of a "
                          "complete run scores its export again), or give the run another checkpoint.")
    from transferkit.decisions import plan

    plan(**data, **run_cfg)  # refuses other data (another split, a --limit), as a resume does
    try:
        best = json.loads((run_out / "results.json").read_text()).get("best")
    except (OSError, ValueError, AttributeError):
        best = None
    return best if isinstance(best, dict) else info.get("best") or {}


def _run_config(name: str, run_name: str, cfg: dict[str, Any], overrides: dict[str, Any], cli: dict[str, Any],
                data_dir: Path, given: set[str],
                run_settings: Callable[[dict[str, Any], set[str]], dict[str, Any]] | None, *,
                written_for: Any = None, audio: bool = False) -> dict[str, Any]:
    """One run's ``finetune()`` settings: the config, the run's block and the command line merged, the
    recipe's ``run_settings`` applied, and checked as a whole (`FinetuneConfig`) before any data
    are read (against the backbone they build, before any run trains: `_check_runs`).
    ``written_for``: the config file's backbone, which its ``backbone_options`` were written for;
    ``audio``: the recipe's data are audio (its own config trains an audio backbone)."""
    source = f"{name} recipe, run {run_name!r}" if run_name else f"{name} recipe"
    run_cfg = merge_config(cfg, overrides, cli, source=source)
    run_cfg = {k: expand_vars(v, k) for k, v in run_cfg.items()}
    written_for = overrides.get("backbone", written_for)  # a run's own block names the backbone its settings fit
    if (audio or _is_audio(written_for)) and not _is_audio(run_cfg.get("backbone")):
        named = run_cfg.get("backbone") or f"{config_fields()['backbone'].default} (the default: the config names none)"
        raise ConfigError(f"The backbone given, {named}, takes images, and this recipe's data are audio: give a spec: "
                          "backbone (log-mel spectrograms into an image network, e.g. spec:tv:resnet18) or a ta: "
                          "speech model (e.g. ta:wav2vec2_base).")
    run_cfg = _image_options_of(run_cfg, written_for, "backbone_options" in {*cli, *overrides}, source)
    _check_weights_fit(run_cfg, written_for, "weights" in cli)
    if run_settings is not None:
        run_cfg = run_settings(run_cfg, given)
    if run_cfg.get("head") == "logistic":  # settings of the whole recipe that a probe (no epochs) has no use for
        unused = [k for k in PROBE_UNUSED if run_cfg.get(k) and k not in overrides]
        for key in unused:
            print(f"run {run_name!r}: {key}={run_cfg.pop(key)!r} (set for the whole recipe) does not apply to its "
                  "head='logistic' (fitted once); left out of this run.", file=sys.stderr, flush=True)
    with called_as(source):
        FinetuneConfig(**run_cfg, data=str(data_dir))  # the settings' checks of each other (the data come later)
    return run_cfg


def _check_runs(run_cfgs: dict[str, dict[str, Any]], data_dir: Path) -> None:
    """Refuse what a run would refuse of its backbone and policy (`check_settings`: its name,
    options and weights, the policy's blocks), each run's before the first one trains (a
    second run's unknown block was found after the first had trained), naming the run."""
    from transferkit.facts import check_settings  # torch: not for --help

    for run_name, run_cfg in run_cfgs.items():
        try:
            check_settings(FinetuneConfig(**run_cfg, data=str(data_dir)))
        except TransferkitError as exc:
            raise type(exc)(f"run {run_name!r}: {exc}" if run_name else str(exc)) from exc


def _check_weights_fit(run_cfg: dict[str, Any], written_for: Any, given: bool) -> None:
    """Refuse a backbone given in place of the config's (``written_for``: the run's block's, else
    the file's) without weights on the command line, where the config's weights are its own
    backbone's (a weights file, a tag, or none: random init): the new backbone would start from
    a file that does not fit it, or from random weights without a word. ``DEFAULT`` (each
    backbone's pretrained weights) fits any."""
    backbone = run_cfg.get("backbone")
    if given or written_for is None or backbone in (None, written_for) or "weights" not in run_cfg \
            or run_cfg["weights"] == "DEFAULT":
        return
    from transferkit.backbones.registry import check_weights_tag

    try:  # an unknown name is said as such first; one without published weights is not offered DEFAULT
        check_weights_tag(str(backbone), "DEFAULT", **(run_cfg.get("backbone_options") or {}))
        choices = "--weights DEFAULT (its pretrained weights, downloaded once), a weights file, or --weights none"
    except WeightsError:
        choices = "a weights file, or --weights none (it has no published pretrained weights)"
    weights = run_cfg["weights"]
    held = "none (random init)" if weights is None else repr(str(weights))
    raise ConfigError(f"The backbone given, {backbone}, replaces the config's {written_for}, and the config's weights "
                      f"are for {written_for}: {held}. Say which weights {backbone} starts from: {choices}.")


def _image_options_of(run_cfg: dict[str, Any], written_for: Any, given: bool, source: str) -> dict[str, Any]:
    """A run's settings where the user chose another ``spec:`` backbone than the config file's
    (``written_for``, the backbone its ``backbone_options`` were written for, in the recipe's
    own file or the ``--config`` file): the file's ``image_options`` (its image backbone's,
    e.g. ``widths`` of ``tk:small_cnn``) are left out, with a note, unless ``backbone_options``
    were ``given`` beside the file (a flag, ``--set``, the run's block); the spectrogram's
    options (``n_mels``, ``clip_seconds``, ...) stay."""
    backbone, options = str(run_cfg.get("backbone", "")), run_cfg.get("backbone_options") or {}
    if not backbone.startswith("spec:") or written_for is None or backbone == written_for or given \
            or "image_options" not in options:
        return run_cfg
    print(f"{source}: backbone_options image_options={options['image_options']!r} (written for the config's "
          f"{written_for}) does not apply to {backbone}; left out.", file=sys.stderr, flush=True)
    return {**run_cfg, "backbone_options": {k: v for k, v in options.items() if k != "image_options"}}


def results_table(summaries: list[dict[str, Any]]) -> str:
    """A Markdown table of runs: validation and (where a run has a test set) test accuracy, seconds.

    Example:
        >>> print(results_table([{"run": "probe", "best": {"val_acc": 0.9}, "seconds": 3}]))
        | run | best val acc | seconds |
        |---|---:|---:|
        | probe | 0.9000 | 3 |
    """
    tested = any(s.get("test_acc") is not None for s in summaries)
    lines = ["| run | best val acc |" + (" test acc |" if tested else "") + " seconds |",
             "|---|---:|" + ("---:|" if tested else "") + "---:|"]
    for s in summaries:
        val, test = s["best"].get("val_acc"), s.get("test_acc")
        cells = [s["run"], "" if val is None else f"{val:.4f}"] + (["" if test is None else f"{test:.4f}"] if tested
                                                                   else []) + [s["seconds"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def _sliced(data: RecipeData, limit: int | None, seed: int) -> tuple[Any, Any, Any, list[str] | None]:
    """The recipe's data, cut to ``limit`` items per class when asked (folders included)."""
    if not limit:
        return data.train, data.val, data.test, data.classes
    classes = data.classes
    parts = []
    for d in (data.train, data.val, data.test):
        if isinstance(d, (str, Path)):
            from transferkit.data import ImageFolderDataset

            d = ImageFolderDataset(d, classes=classes)
            classes = classes or d.classes
        parts.append(limit_per_class(d, limit, seed) if d is not None else None)
    return parts[0], parts[1], parts[2], classes


def _refuse_owned(name: str, keys: set[str]) -> None:
    """ConfigError when settings the recipe makes itself (`RECIPE_OWNS`) are among ``keys``."""
    owned = sorted(RECIPE_OWNS & keys)
    if owned:
        raise ConfigError(f"{name} recipe: {owned[0]} is set by the recipe itself (data, val_data and classes from "
                          "the data set under --data-dir; the export as <--out>/<run>/model.pt); leave it out of "
                          "--set and the config, or use the Python API (transferkit.finetune) with your own.")


def _check_own_checkpoints(name: str, run_cfgs: dict[str, dict[str, Any]]) -> None:
    """ConfigError when runs of a recipe share one checkpoint path: each would replace the one
    before's (and a resume then finds the last run's, complete)."""
    by_path: dict[str, list[str]] = {}
    for run_name, run_cfg in run_cfgs.items():
        if run_cfg.get("checkpoint") is not None:
            by_path.setdefault(str(Path(run_cfg["checkpoint"]).resolve()), []).append(run_name)
    shared = next(((p, runs) for p, runs in by_path.items() if len(runs) > 1), None)
    if shared is not None:
        raise ConfigError(f"{name} recipe: the runs {shared[1]} share the checkpoint {shared[0]!r}: each run would "
                          "replace the one before's. Give each run its own checkpoint under runs: in the config, or "
                          "run one of them (--run NAME).")


def _is_audio(backbone: Any) -> bool:
    """Whether a run's ``backbone`` (a name or a Backbone) takes audio."""
    spec = getattr(backbone, "input_spec", None)
    return spec.kind == "audio" if spec is not None else str(backbone or "").startswith(("spec:", "ta:"))


def _check_test(test: Any, train: Any, classes: list[str] | None, *, audio: bool = False) -> None:
    """Refuse before training the test data that `evaluate_export` would refuse after it (and
    after the export): samples of none, or a folder of test images that holds none of the
    training classes (those of ``classes``, else of the training folder's sub-folders; a
    folder of ``audio`` clips is left to the scoring)."""
    if test is None:
        return
    if not isinstance(test, (str, Path)):
        if hasattr(test, "__len__") and len(test) == 0:
            raise DataError("The test data hold no sample (the test set is scored after training: checked first).")
        listed = test if isinstance(test, (list, tuple)) else [test.dataset[i] for i in test.indices] \
            if isinstance(getattr(test, "dataset", None), (list, tuple)) else []  # a --limit's Subset of a list
        files = [item[0] for item in listed if isinstance(item, (tuple, list)) and isinstance(item[0], (str, Path))]
        missing = [str(f) for f in files if not os.path.isfile(f)]
        if missing and len(missing) == len(test):
            raise DataError(f"None of the {len(missing)} files of the test data exist (e.g. {missing[0]!r}); the test "
                            "set is scored after training: checked first. Check the data folder.")
        if missing:
            warn(f"{plural(len(missing), 'file')} of the test data do not exist (e.g. {missing[0]!r}); they will be "
                 "left out of the test accuracy.")
        return
    from transferkit.data.checks import DataReport
    from transferkit.data.folders import class_folders

    names = classes
    if names is None and isinstance(train, (str, Path)) and Path(train).is_dir():
        names = class_folders(Path(train), DataReport())  # as training reads them (hidden ones, __MACOSX left out)
    if names and Path(test).is_dir() and not audio:
        import warnings

        from transferkit.evaluation import labelled_samples

        with warnings.catch_warnings():  # said again when the test set is scored
            warnings.simplefilter("ignore")
            if not len(labelled_samples(test, list(names), "image", what="test")):
                raise DataError(f"The test data {str(test)!r} hold no sample of the training classes.")


def evaluate_export(model_path: Path, test: Any, *, chunk: int = 512) -> float:
    """Accuracy of the exported file (reloaded from disk) on labelled test data: a folder, a CSV,
    tar shards or Parquet files (read by the model's class names, as validation data are:
    `transferkit.evaluation.labelled_samples`), or a sequence of (input, class index). Samples
    that cannot be predicted are left out of the score, with a warning; ``chunk`` samples are
    read at a time."""
    from transferkit.evaluation import labelled_samples, score
    from transferkit.export import load

    predictor = load(model_path)
    if isinstance(test, (str, Path)):
        samples: Any = labelled_samples(test, list(predictor.labels), predictor.input_spec.kind, what="test")
    else:
        samples = _Pairs(test)
    if not len(samples):
        raise DataError("The test data hold no sample.")
    ev = score(predictor, samples, data=test if isinstance(test, (str, Path)) else "the test data",
               batch_size=64, chunk=chunk)
    if ev.failed:
        warn(f"{plural(len(ev.failed), 'test sample')} could not be predicted (left out of the test "
             f"accuracy), e.g. {ev.failed[0][0]}: {ev.failed[0][1]}")
    return ev.accuracy


class _Pairs(Sequence):
    """``(input, class index)`` for each item of a Dataset, read on access."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        x, y = self.data[i]
        return x, int(y)


# the run of a recipe's config that is training, while it is, and the settings its file set (`recipe_spelling`)
_running: dict[str, Any] = {"run": None, "written_in": {}}


def recipe_main(fn: Callable[[], Any]) -> NoReturn:
    """A recipe script's ending: `main_guard`, then the process ends with its status. Once an
    interruption is said (130, 143), a second signal of the same job does not change that status."""
    sys.exit(deaf_once_said(main_guard(fn)))


def main_guard(fn: Callable[[], Any]) -> int:
    """Run a recipe's main (its results go to stdout): each warning prints as one line on
    stderr, a TransferkitError as one line there with exit status 2, and an interruption
    (Ctrl-C, SIGTERM) as one line with 130 or 143, as the command line does."""
    prog = f"recipes/{Path(sys.argv[0]).name}" if sys.argv and sys.argv[0] else "recipe"

    def spell(message: str) -> str:
        return recipe_spelling(message, prog, _running["run"], _running["written_in"])

    with one_line_warnings(prog, spell):
        try:
            # SIGTERM outside a run too (the test set's scoring): said, 143; a second signal within
            # seconds of the first is held while the first is handled, as the command line does
            with terminate_as_interrupt(), first_interruption_holds():
                fn()
        except TransferkitError as exc:
            print(f"{prog}: error: {spell(one_line(exc))}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            line, code = interrupt_exit(exc, one_line(exc))
            print(f"{prog}: {spell(line)}", file=sys.stderr)
            return code
    return 0
