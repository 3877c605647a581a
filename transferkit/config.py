"""Configuration files: YAML whose keys are :func:`transferkit.finetune`'s argument names.

A recipe or ``transferkit finetune --config file.yaml`` reads the file, applies
command-line overrides (``--set key=value``, values parsed as YAML), and checks every key
and value against ``finetune``'s signature before anything runs.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from transferkit.errors import ConfigError, suggest

# keys a config may hold besides finetune()'s arguments: where the data live and what to run
RECIPE_KEYS = {"data_dir": (str, type(None)), "download": (bool,), "out_dir": (str, type(None)),
               "limit": (int, type(None)), "runs": (dict, type(None))}
_NOT_FROM_CONFIG = {"data", "val_data", "callbacks"}  # Python objects: given by the recipe, not a file


def finetune_parameters() -> dict[str, inspect.Parameter]:
    """``finetune``'s keyword parameters that a config file may set."""
    from transferkit.api import finetune

    return {n: p for n, p in inspect.signature(finetune).parameters.items() if n not in _NOT_FROM_CONFIG}


def allowed_types(annotation: Any) -> tuple[type, ...] | None:
    """Plain runtime types admitted by an annotation string such as ``'int | None'``, or None (unchecked)."""
    from transferkit import api

    if isinstance(annotation, str):
        try:
            annotation = eval(annotation, vars(api))  # annotations are postponed strings (PEP 563)
        except Exception:
            return None
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else (annotation,)
    out: list[type] = []
    for a in args:
        origin = typing.get_origin(a) or a
        if a is None or a is type(None):
            out.append(type(None))
        elif origin in (list, tuple, typing.Sequence) or getattr(origin, "__name__", "") == "Sequence":
            out += [list, tuple]
        elif origin is dict or getattr(origin, "__name__", "") in ("Mapping", "dict"):
            out.append(dict)
        elif origin is float:
            out += [float, int]
        elif isinstance(origin, type) and origin.__module__ in ("builtins", "pathlib"):
            out.append(str if origin is Path else origin)
        else:
            return None  # a transferkit object (Policy, Backbone): accept the string form, checked later
    return tuple(out)


def validate_config(config: Mapping[str, Any], *, source: str = "config") -> dict[str, Any]:
    """Check keys against ``finetune``'s signature (and the recipe keys) and value types;
    return a plain dict. Raises ConfigError naming the key, the value and what is valid."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{source} must be a mapping of finetune() arguments, got {type(config).__name__}.")
    params = finetune_parameters()
    valid = sorted(set(params) | set(RECIPE_KEYS))
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in _NOT_FROM_CONFIG:
            raise ConfigError(f"{source}: {key!r} cannot be set in a config file; use data_dir (recipes) or the "
                              "Python API.")
        if key not in params and key not in RECIPE_KEYS:
            raise ConfigError(f"{source}: unknown key {key!r}.{suggest(str(key), valid)} Valid keys: {', '.join(valid)}.")
        allowed = RECIPE_KEYS.get(key) or allowed_types(params[key].annotation)
        if allowed is not None and (not isinstance(value, allowed) or isinstance(value, bool) and bool not in allowed):
            names = sorted({t.__name__ for t in allowed}) if allowed else []
            raise ConfigError(f"{source}: {key}={value!r} has type {type(value).__name__}; expected {' or '.join(names)}.")
        out[key] = value
    return out


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a YAML config file.

    Example:
        >>> load_config("recipes/hymenoptera.yaml")["policy"]  # doctest: +SKIP
        'feature_extraction'
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"Config file {str(path)!r} does not exist.") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {exc}") from exc
    return validate_config(raw or {}, source=str(path))


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["epochs=3", "head_hidden=[256]"]`` -> ``{"epochs": 3, "head_hidden": [256]}`` (values are YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"An override must look like key=value, got {item!r}.")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"Cannot parse the value of override {item!r}: {exc}") from exc
    return validate_config(out, source="command-line overrides")
