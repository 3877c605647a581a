"""One registry of backbone sources, each owning a name prefix (``tv:``, ``timm:``, ``tk:``...)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from transferkit.backbones._base import Backbone
from transferkit.errors import ConfigError, TransferkitError, UnknownBackboneError, suggest


class BackboneSource(Protocol):
    """A family of backbones: lists its names and builds one by name."""

    prefix: str

    def names(self) -> list[str]: ...

    def build(self, name: str, *, weights: Any, **kwargs: Any) -> Backbone: ...

    # optional: ``check_weights(name, weights, **kwargs)`` refuses a weights tag the source cannot
    # resolve, without downloading (see `check_weights_tag`)


_SOURCES: dict[str, BackboneSource] = {}


def register_source(source: BackboneSource) -> None:
    """Register a source under its prefix; registering a prefix twice raises."""
    if source.prefix in _SOURCES:
        raise ConfigError(f"A backbone source with prefix {source.prefix!r} is already registered.")
    _SOURCES[source.prefix] = source


class BuilderSource:
    """A source made of explicitly registered builder functions."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._builders: dict[str, Callable[..., Backbone]] = {}

    def names(self) -> list[str]:
        return list(self._builders)

    def add(self, name: str, builder: Callable[..., Backbone]) -> None:
        if name in self._builders:
            raise ConfigError(f"Backbone '{self.prefix}:{name}' is already registered.")
        self._builders[name] = builder

    def build(self, name: str, *, weights: Any, **kwargs: Any) -> Backbone:
        return self._builders[name](weights=weights, **kwargs)

    def check_weights(self, name: str, weights: Any, **kwargs: Any) -> None:
        """Builder backbones are small and refuse a tag before they read any file: build one."""
        self.build(name, weights=weights, **kwargs)


class LazySource:
    """A source whose module (and its heavy imports, e.g. timm) loads on first use."""

    def __init__(self, prefix: str, module: str, cls: str) -> None:
        self.prefix, self._module, self._cls = prefix, module, cls
        self._source: BackboneSource | None = None

    def _get(self) -> BackboneSource:
        if self._source is None:
            import importlib

            self._source = getattr(importlib.import_module(self._module), self._cls)()
        return self._source

    def names(self) -> list[str]:
        return self._get().names()

    def has(self, name: str) -> bool:
        return _has(self._get(), name)

    def build(self, name: str, *, weights: Any, **kwargs: Any) -> Backbone:
        return self._get().build(name, weights=weights, **kwargs)

    def check_weights(self, name: str, weights: Any, **kwargs: Any) -> None:
        check = getattr(self._get(), "check_weights", None)
        if check is not None:
            check(name, weights, **kwargs)


def _has(source: BackboneSource, name: str) -> bool:
    """Whether ``source`` builds ``name``: its own ``has`` (names with tags) or membership in ``names()``."""
    has = getattr(source, "has", None)
    return has(name) if callable(has) else name in source.names()


def _split(name: str) -> tuple[str | None, str]:
    if ":" in name:
        prefix, rest = name.split(":", 1)
        return prefix, rest
    return None, name


def get_source(prefix: str) -> BackboneSource | None:
    """The registered source of ``prefix`` (``"tv"``, ``"timm"``, ...), or None.

    Example:
        >>> "resnet18" in get_source("tv").names()
        True
    """
    _ensure_sources()
    return _SOURCES.get(prefix)


def list_backbones(pattern: str | None = None) -> list[str]:
    """All registered backbone names (``prefix:name``), filtered by ``pattern``, in any case: a
    glob (a name without a source matches in every source), a source alone (``"tk:"``: every
    name in it), or words without a wildcard (``"cifar"``, ``"tk:CIFAR resnet"``: the names
    that hold them all).

    Example:
        >>> "tv:resnet18" in list_backbones("tv:resnet*"), "tk:small_cnn" in list_backbones("tk:")
        (True, True)
        >>> "tk:cifar_resnet20" in list_backbones("cifar"), list_backbones("tk:CIFAR 56")
        (True, ['tk:cifar_resnet56'])
        >>> list_backbones("TV:ResNet1*") == list_backbones("tv:resnet1*")
        True
    """
    _ensure_sources()
    out = [f"{p}:{n}" for p, s in _SOURCES.items() for n in s.names()]
    if pattern and not any(c in pattern for c in "*?[") and not pattern.endswith(":"):  # words: a search
        source, _, words = pattern.rpartition(":")
        out = [n for n in out if (not source or n.casefold().startswith(source.casefold() + ":"))
               and all(w.casefold() in n[len(source):].casefold() for w in words.split())]
    elif pattern:
        pat = pattern + "*" if pattern.endswith(":") else pattern if ":" in pattern else "*:" + pattern
        out = [n for n in out if fnmatch.fnmatchcase(n.casefold(), pat.casefold())]
    return sorted(out)


def resolve_name(name: str) -> tuple[str, str]:
    """Resolve ``name`` to ``(prefix, model_name)``; a plain name must be unambiguous."""
    if not isinstance(name, str) or not name:
        raise UnknownBackboneError(f"A backbone name must be a non-empty string, got {name!r}.")
    _ensure_sources()
    prefix, rest = _split(name)
    if prefix is not None:
        source = _SOURCES.get(prefix)
        if source is None:
            raise UnknownBackboneError(f"Unknown backbone source {prefix!r} in {name!r}.{suggest(prefix, _SOURCES)} "
                                       f"Known sources: {', '.join(sorted(_SOURCES))}.")
        if not _has(source, rest):
            names = source.names()
            raise UnknownBackboneError(
                f"Unknown backbone {name!r}.{suggest(name, [f'{prefix}:{n}' for n in names])} "
                f"See transferkit.list_backbones('{prefix}:*').")
        return prefix, rest
    hits = [p for p, s in _SOURCES.items() if _has(s, rest)]
    if len(hits) == 1:
        return hits[0], rest
    if len(hits) > 1:
        raise UnknownBackboneError(f"Backbone name {name!r} is ambiguous: it exists as "
                                   f"{', '.join(f'{p}:{rest}' for p in hits)}. Pass one of these.")
    everything = list_backbones()
    raise UnknownBackboneError(f"Unknown backbone {name!r}.{suggest(name, everything + [n.split(':', 1)[1] for n in everything])} "
                               "See transferkit.list_backbones().")


def get_backbone(name: str, *, weights: str | Path | None = "DEFAULT", **kwargs: Any) -> Backbone:
    """Build the backbone ``name`` with ``weights`` and return a [`Backbone`][transferkit.Backbone].

    ``weights``: ``"DEFAULT"`` (the source's recommended pretrained weights), a source tag
    (a torchvision enum name such as ``"IMAGENET1K_V2"``), the path of a local file, or
    ``None`` for random initialisation. Pretrained weights that cannot be had raise
    [`WeightsError`][transferkit.WeightsError]; transferkit never falls back to random weights.

    Example:
        >>> bb = get_backbone("tv:resnet18", weights=None)
        >>> bb.num_features, bb.block_names[:2]
        (512, ['stem', 'layer1'])
    """
    prefix, rest = resolve_name(name)
    try:
        bb = _SOURCES[prefix].build(rest, weights=weights, **kwargs)
        if weights is None:
            bb.mark_random_init()
        bb.build_options = dict(kwargs)
        return bb
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        if not kwargs or isinstance(exc, TransferkitError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"The backbone {name!r} cannot be built with the options {kwargs!r} (backbone_options): "
                          f"{type(exc).__name__}: {first}. Check the option names and values its builder "
                          "takes, or remove them.") from exc


def check_weights_tag(name: str, weights: Any, **kwargs: Any) -> None:
    """Refuse, as building would, a weights tag (``"DEFAULT"``, ``"IMAGENET1K_V2"``, a timm tag)
    that the backbone's source cannot resolve, without downloading anything: what a dry run
    checks. A source without a ``check_weights`` method is checked when the run builds; a file
    is not a tag (`transferkit.backbones.weights.check_weights_file` checks it).

    Example:
        >>> check_weights_tag("tv:resnet18", "IMAGENET1K_V1")  # listed: nothing to say
        >>> check_weights_tag("tv:resnet18", "IMAGENET1K_V9")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
          ...
        transferkit.errors.WeightsError: Unknown weights 'IMAGENET1K_V9' for tv:resnet18. Did you mean ...
    """
    prefix, rest = resolve_name(name)
    check = getattr(_SOURCES[prefix], "check_weights", None)
    if check is not None:
        check(rest, weights, **kwargs)


_loaded = False


def _ensure_sources() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True  # the built-in sources registered themselves when transferkit.backbones was imported
    if "timm" not in _SOURCES:
        register_source(LazySource("timm", "transferkit.backbones.timm_source", "TimmSource"))
