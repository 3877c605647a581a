"""Identities of data and modules: digests that change when the content changes (cache keys,
the run's data record), computed from file metadata or tensor bytes, never from decoding."""

from __future__ import annotations

import enum
import functools
import hashlib
import os
import re
import types
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from transferkit._text import fs_bytes
from transferkit.data.late import listing_of


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())


def parameters_digest(module: torch.nn.Module) -> str:
    """A hash of ``module``'s parameters alone (names, dtypes, shapes, values): what L2-SP pulls
    toward. Unlike `module_fingerprint` it holds no code, so a new torch or Python keeps it.

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> parameters_digest(m) == parameters_digest(m), len(parameters_digest(m))
        (True, 32)
    """
    h = hashlib.blake2b(digest_size=16)
    for name, p in module.named_parameters():
        h.update(name.encode())
        _hash_tensor(h, p)
    return h.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of ``module``'s structure (`module_structure`), of each submodule's plain settings
    (`module_settings`), of the code of its module classes (`module_code`) and of every
    parameter and buffer (names, dtypes, shapes, values; buffers kept out of the state dict
    and tensors held as plain attributes too): two trunks with the same weights that compute
    differently (another pooling, another activation, an edited ``forward``) get different
    fingerprints."""
    h = hashlib.blake2b(digest_size=16)
    h.update(module_structure(module).encode())
    h.update(module_settings(module).encode())
    h.update(module_code(module).encode())
    state = module.state_dict()
    for name, t in state.items():
        h.update(name.encode())
        _hash_tensor(h, t)
    for name, t in module.named_buffers():  # non-persistent buffers (register_buffer(..., persistent=False))
        if name not in state and t is not None:
            h.update(f"buffer {name}".encode())
            _hash_tensor(h, t)
    for prefix, m in module.named_modules():  # a tensor kept as a plain attribute (self.gain = torch.tensor(..))
        for key, value in sorted(vars(m).items()):
            if isinstance(value, torch.Tensor) and not key.startswith("_"):
                h.update(f"tensor {prefix}.{key}".encode())
                _hash_tensor(h, value)
    return h.hexdigest()


def module_structure(module: torch.nn.Module) -> str:
    """The module tree as ``repr`` prints it (each submodule's class and settings: kernel
    sizes, strides, pooling type, activation, ...), with any memory address blanked so that it
    is the same in every process."""
    return blank_addresses(repr(module))


# module attributes that change how, not what, a module computes: timm's fused attention (set
# from TIMM_FUSED_ATTN in each process), its fused norms and gradient checkpointing, and the train/eval flag
RUNTIME_SWITCHES = frozenset({"training", "fused_attn", "_fast_norm", "grad_checkpointing"})
# module attributes that say where the weights came from (timm's ``pretrained_cfg``, which names a weights file's
# path), not what the module computes: the weights themselves are hashed
PROVENANCE = frozenset({"pretrained_cfg", "default_cfg", "pretrained_cfg_overlay"})
# nn.Module's own state (parameters, buffers, submodules, hooks), hashed otherwise or not a setting
_MODULE_STATE = frozenset(vars(torch.nn.Module()))


def module_settings(module: torch.nn.Module) -> str:
    """Each submodule's attributes that hold settings, by name: settings a ``forward`` reads
    that its ``repr`` may not show (timm's ``global_pool='avg'`` or ``'max'`` on a ViT, a
    ``self._scale``, a ``self.cfg = {"pool": "max"}``, an ``Enum``, an activation kept as a
    function). A setting is a plain value (string, number, boolean, None), an ``Enum`` member,
    a class, a function (by its name, bytecode and defaults), a ``functools.partial`` of
    them, or a tuple, list, set or dict of settings (`setting_text`; an attribute holding an
    empty one is left out, as a cache a forward fills); other objects, and attributes whose
    name ends in ``cache`` (what a forward keeps for the next: timm's
    ``attention_bias_cache``), are not read. A TorchScript module keeps its attributes in its
    compiled object: its tree's attributes are read from there (`script_attributes`). Left
    out: nn.Module's own state (parameters, buffers and submodules are hashed as such), the
    train/eval flag (the frozen pass runs in eval mode whatever the module was left in),
    `RUNTIME_SWITCHES`, which change how, not what, a module computes, and `PROVENANCE`.

    Example:
        >>> import torch
        >>> pool = torch.nn.Identity()
        >>> before = module_settings(pool)
        >>> pool.mode = "max"
        >>> module_settings(pool) == before
        False
    """
    h = hashlib.blake2b(digest_size=16)
    scripted: list[str] = []  # TorchScript trees read whole, from their roots
    for name, m in module.named_modules():
        if isinstance(m, torch.jit.ScriptModule) and not any(name.startswith(f"{r}.") or not r for r in scripted):
            scripted.append(name)
            h.update(f"{name}:{script_attributes(m)}\n".encode())
        shown = []
        for key, value in sorted(vars(m).items()):
            if key in _MODULE_STATE or key in RUNTIME_SWITCHES or key in PROVENANCE or key.startswith("__") \
                    or key.lower().endswith("cache"):  # what a forward keeps for the next (attention_bias_cache)
                continue
            text = setting_text(value)
            if text is not None:
                shown.append((key, text))
        h.update(f"{name}:{shown!r}\n".encode())
    return h.hexdigest()


def setting_text(value: Any, depth: int = 0) -> str | None:
    """``value`` as text that is the same in every process, where it is a setting (see
    `module_settings`); None where it is not (a module, a tensor, an object of another kind, or
    a container holding one).

    Example:
        >>> import enum
        >>> class Pool(enum.Enum):
        ...     AVG = 1
        >>> setting_text({"pool": Pool.AVG, "sizes": (1, 2)})
        "dict{'pool': enum transferkit.data.fingerprint.Pool.AVG, 'sizes': tuple[1, 2]}"
        >>> setting_text(lambda x: x * 100) != setting_text(lambda x: x * 10)
        True
    """
    if isinstance(value, _PLAIN):
        return repr(value)
    if isinstance(value, enum.Enum):
        return f"enum {type(value).__module__}.{type(value).__qualname__}.{value.name}"
    if isinstance(value, type):
        return f"class {value.__module__}.{value.__qualname__}"
    if isinstance(value, types.MethodType):  # a bound method: its function (not the object, often the module itself)
        value = value.__func__
    if depth >= 8:  # deeper than a setting goes (functions whose closures hold each other)
        return None
    if isinstance(value, types.FunctionType):
        h = hashlib.blake2b(digest_size=8)
        _hash_code(h, value.__code__)
        defaults = (*(value.__defaults__ or ()), *sorted((value.__kwdefaults__ or {}).items()))
        h.update(blank_addresses(stable_repr(defaults)).encode())
        cells = [setting_text(c.cell_contents, depth + 1) if c.cell_contents is not value else "self"
                 for c in value.__closure__ or () if _filled(c)]
        return f"function {value.__module__}.{value.__qualname__} {h.hexdigest()} {cells!r}"
    if isinstance(value, (types.BuiltinFunctionType, types.BuiltinMethodType)):  # torch.sigmoid, math.exp
        return f"builtin {getattr(value, '__module__', None)}.{value.__qualname__}"
    if isinstance(value, functools.partial):
        parts = [setting_text(v, depth + 1) for v in (value.func, *value.args)]
        named = [(k, setting_text(v, depth + 1)) for k, v in sorted(value.keywords.items())]
        return None if None in parts or any(v is None for _, v in named) else f"partial[{parts!r}, {named!r}]"
    if depth == 0 and isinstance(value, (tuple, list, set, frozenset, dict)) and not value:  # an attribute that
        return None  # is empty: as a cache a forward fills (an empty one inside a setting is part of it)
    if isinstance(value, (tuple, list, set, frozenset)):
        parts = [setting_text(v, depth + 1) for v in value]
        if None in parts:
            return None
        return f"{type(value).__name__}[{', '.join(sorted(parts) if isinstance(value, (set, frozenset)) else parts)}]"
    if isinstance(value, dict):  # in its order, which a forward that walks it follows
        items = [(setting_text(k, depth + 1), setting_text(v, depth + 1)) for k, v in value.items()]
        if any(None in kv for kv in items):
            return None
        return f"dict{{{', '.join(f'{k}: {v}' for k, v in items)}}}"
    return None


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell (a name assigned later in the enclosing function)
        return False
    return True


_MANGLED = re.compile(r"___torch_mangle_\d+\.")
_SWITCH_LINE = re.compile(r"^\s*(?:" + "|".join(sorted(RUNTIME_SWITCHES)) + r") = .*$\n?", re.MULTILINE)


def script_attributes(module: torch.jit.ScriptModule) -> str:
    """The attributes of a TorchScript module's tree as TorchScript lists them (names, plain
    values; tensors as ``...``), without `RUNTIME_SWITCHES` and memory addresses: a scripted
    extractor saved again with ``pool="max"`` for ``"avg"`` has the same code and weights,
    and other attributes.

    Example:
        >>> import torch
        >>> class Pool(torch.nn.Module):
        ...     def __init__(self, mode: str):
        ...         super().__init__()
        ...         self.mode = mode
        ...     def forward(self, x):
        ...         return x.mean(1) if self.mode == "avg" else x.amax(1)
        >>> script_attributes(torch.jit.script(Pool("avg"))) == script_attributes(torch.jit.script(Pool("max")))
        False
    """
    try:
        text = module._c.dump_to_str(False, False, False)
    except (RuntimeError, AttributeError):  # not a compiled module of this torch's kind
        return ""
    # a type's mangled name counts the other configurations of its class this process scripted before
    return blank_addresses(_MANGLED.sub("", _SWITCH_LINE.sub("", text)))


def module_code(module: torch.nn.Module) -> str:
    """A digest of the code that ``module``'s tree runs: for each class in it (and its bases
    below ``nn.Module``), the bytecode of its functions and its plain class attributes; for
    TorchScript modules, their compiled code. A user's edited ``forward`` (or a library
    version whose classes compute otherwise) is another module, though its repr and weights
    are the same. Functions outside the classes (a helper that ``forward`` calls) are not
    covered. The bytecode (and the functions' default arguments), not the source: reading a
    class's source parses its whole file (a quarter of a second for a timm EfficientNet's classes).

    Example:
        >>> import torch
        >>> class Mean(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x.mean(1)
        >>> class Max(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x.amax(1)
        >>> module_code(Mean()) == module_code(Max())
        False
    """
    h = hashlib.blake2b(digest_size=16)
    for cls in sorted({type(m) for m in module.modules()}, key=lambda c: (c.__module__, c.__qualname__)):
        h.update(_class_code(cls))
    for m in module.modules():
        if isinstance(m, torch.jit.ScriptModule):
            try:
                h.update(str(m.code).encode())
            except (RuntimeError, AttributeError):  # a scripted module without a forward of its own
                pass
    return h.hexdigest()


_PLAIN = (bool, int, float, complex, str, bytes, type(None))


@functools.lru_cache(maxsize=1024)
def _class_code(cls: type) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for klass in cls.__mro__:
        if klass in (torch.nn.Module, object):
            break
        h.update(f"{klass.__module__}.{klass.__qualname__}\0".encode())
        for name, value in sorted(vars(klass).items()):
            if name in ("__doc__", "__module__", "__qualname__", "__dict__", "__weakref__"):
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            functions = [value.fget, value.fset] if isinstance(value, property) else [value]
            for f in functions:
                if isinstance(f, types.FunctionType):
                    h.update(name.encode())
                    _hash_code(h, f.__code__)
                    # default arguments (forward(self, x, gain=1.0)) are not in the bytecode
                    defaults = (*(f.__defaults__ or ()), *sorted((f.__kwdefaults__ or {}).items()))
                    h.update(blank_addresses(stable_repr(defaults)).encode())
            if isinstance(value, _PLAIN) or isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value):
                h.update(f"{name}={value!r}".encode())
    return h.digest()


def stable_repr(value: Any) -> str:
    """``repr(value)`` the same in every process: where a set is in it (in tuples, lists and
    dicts too), its members in a sorted order (a set's repr follows the process's string
    hashing); any other value's repr as it is (the fingerprints of those stay what they were)."""
    return _stable_repr(value) if _holds_set(value) else repr(value)


def _stable_repr(value: Any) -> str:
    if isinstance(value, (set, frozenset)):
        return f"{type(value).__name__}({sorted(map(_stable_repr, value))!r})"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({[_stable_repr(v) for v in value]!r})"
    if isinstance(value, dict):
        return f"dict({[(_stable_repr(k), _stable_repr(v)) for k, v in value.items()]!r})"
    return repr(value)


def _holds_set(value: Any) -> bool:
    """Whether a set is in ``value`` (in tuples, lists and dicts)."""
    if isinstance(value, (set, frozenset)):
        return True
    if isinstance(value, (tuple, list)):
        return any(map(_holds_set, value))
    return isinstance(value, dict) and any(_holds_set(k) or _holds_set(v) for k, v in value.items())


def _hash_code(h: Any, code: types.CodeType) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _hash_code(h, const)
        elif isinstance(const, frozenset):  # `x in {"a", "b"}`: sorted, in the spelling keys were made with
            h.update(repr(sorted(map(repr, const))).encode())
        else:
            h.update(stable_repr(const).encode())


def blank_addresses(text: str) -> str:
    """``text`` with memory addresses (``0x7f...``) blanked: the same in every process."""
    return _ADDRESS.sub("0x?", text)


_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


def _hash_item(h: Any, x: Any) -> None:
    if isinstance(x, torch.Tensor):
        _hash_tensor(h, x)
    elif isinstance(x, np.ndarray):
        _hash_tensor(h, torch.from_numpy(np.ascontiguousarray(x)))
    elif hasattr(x, "tobytes") and hasattr(x, "mode"):  # PIL image
        h.update(f"{x.mode}{x.size}".encode())
        h.update(x.tobytes())
    elif isinstance(x, (tuple, list)):
        for v in x:
            _hash_item(h, v)
    else:
        h.update(repr(x).encode())


PILLOW_PIXEL_LIMIT = 1024 * 1024 * 1024 // 4 // 3  # Pillow's default PIL.Image.MAX_IMAGE_PIXELS


def _pixel_limit() -> str:
    """What a digest of files adds for Pillow's pixel limit: it decides which image files load
    (a larger one is a bad file, left out). Nothing under Pillow's default (the digests of
    earlier versions)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    return "" if limit == PILLOW_PIXEL_LIMIT else f":pixels<={limit}"


def data_fingerprint(ds: Any) -> str:
    """A hash of a dataset's identity: ``(path, label, size, mtime, ctime)`` of every file for
    file-based datasets, the tensors of a ``TensorDataset``, else the content of every raw item.
    A dataset with a ``fingerprint()`` method (tar shards, Parquet files, Hugging Face
    datasets: per-file metadata, no sample read) gives its own. Paths count from the folder
    that holds them all, so a folder moved whole (a rename keeps its files' times) keeps its
    identity; a copy does not (its files are new: another ctime). A digest of files also holds
    Pillow's pixel limit where it is not the default (`_pixel_limit`)."""
    own = getattr(ds, "fingerprint", None)
    if callable(own):
        return f"{type(ds).__name__}:{own()}{_pixel_limit()}"
    h = hashlib.blake2b(digest_size=16)
    h.update(type(ds).__name__.encode())
    listed = listed_files(ds)
    if listed is not None:  # ImageFolderDataset (or anything listing (path, label) files), or a view of one
        files = ds if hasattr(ds, "samples") else ds.base
        h.update(repr((getattr(files, "min_size", None), getattr(files, "max_seconds", None))).encode())
        for path, label, rel in _relative(listed):
            if rel is not None:
                st = os.stat(path)
                h.update(fs_bytes(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n"))
            else:  # in-memory item (e.g. a waveform)
                _hash_item(h, (path, label))
        return h.hexdigest() + _pixel_limit()
    base, indices = getattr(ds, "base", ds), getattr(ds, "indices", None)
    if indices is None:
        indices = range(len(base))
    h.update(repr(list(indices)).encode())
    relabel = getattr(ds, "relabel", None)
    if relabel is not None:  # the base's labels read as other classes (classes= in another order)
        h.update(f"relabel{list(relabel)}".encode())
    tensors = getattr(base, "tensors", None)
    if tensors is not None:
        for t in tensors:
            _hash_tensor(h, t)
    else:
        for i in indices:
            _hash_item(h, base[i])
    return h.hexdigest()


def from_common_folder(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Each path from the deepest folder holding every one of them: what a folder moved or
    renamed whole keeps, and what copies of it on other machines share.

    Example:
        >>> from_common_folder(["/data/v1/train/a.tar", "/data/v1/val/b.tar"])
        ['train/a.tar', 'val/b.tar']
    """
    full = [os.path.abspath(p) for p in paths]
    try:
        root = os.path.commonpath([os.path.dirname(f) for f in full]) if full else ""
    except ValueError:  # on several drives (Windows): no common folder
        return full
    return [os.path.relpath(f, root) for f in full]


def _relative(samples: Any) -> Iterator[tuple[Any, Any, str | None]]:
    """``(path, label, rel)`` for ``(path, label)`` samples: ``rel`` is a file's path from the
    deepest folder holding every file (None for an in-memory item)."""
    files = [isinstance(p, (str, os.PathLike)) for p, _ in samples]
    rel = iter(from_common_folder([p for (p, _), f in zip(samples, files) if f]))
    for (path, label), f in zip(samples, files):
        yield path, label, next(rel) if f else None


def listing_digest(ds: Any) -> str | None:
    """A hash of a file-based dataset's listing that copies of it share: each file's path
    (from the folder that holds them all), label and size, no times; a dataset with a
    ``listing_digest()`` method (tar shards, Parquet files, Hugging Face datasets) gives its
    own; None for other datasets."""
    own = getattr(ds, "listing_digest", None)
    if callable(own):
        return f"{type(ds).__name__}:{own()}"
    samples = getattr(ds, "samples", None)
    if samples is None:
        return None
    h = hashlib.blake2b(digest_size=16)
    for path, label, rel in _relative(samples):
        if rel is not None:
            h.update(fs_bytes(f"{rel}\0{label}\0{os.path.getsize(path)}\n"))
        else:
            _hash_item(h, (path, label))
    return h.hexdigest()


def listed_files(ds: Any) -> list[tuple[Any, Any]] | None:
    """The ``(source, target)`` samples of a dataset of listed files, or of the files a view
    (``base`` and ``indices``) of transferkit's own one (a ``FileDataset``: its samples hold
    the targets its items give) takes; None for other datasets."""
    if hasattr(ds, "samples"):
        return ds.samples
    files, indices = listing_of(ds), getattr(ds, "indices", None)
    if indices is not None and files is not None:  # transferkit's own listing: no target_transform
        return [files.samples[i] for i in indices]
    return None


MAX_COUNTED_CLASSES = 1000  # above, a record keeps no per-class counts (its size stays small)


def class_counts(ds: Any, classes: Any) -> dict[str, int] | None:
    """Items per class of a dataset of listed files whose labels are class indices, read from
    its listing (no file is opened), as ``{class name: count}``; None for other datasets and
    above `MAX_COUNTED_CLASSES` classes. What a resume refused for its data names: the
    classes that gained or lost files."""
    listed = listed_files(ds)
    names = [str(c) for c in classes]
    if listed is None or not 0 < len(names) <= MAX_COUNTED_CLASSES:
        return None
    relabel = getattr(ds, "relabel", None)
    counts = [0] * len(names)
    for _, label in listed:
        if isinstance(label, bool) or not isinstance(label, int):
            return None
        label = relabel[label] if relabel is not None else label
        if not 0 <= label < len(names):
            return None
        counts[label] += 1
    return dict(zip(names, counts))


def quick_fingerprint(ds: Any, samples: int = 16) -> str:
    """A cheap identity of a dataset: `data_fingerprint` for file-based and tensor
    datasets (file metadata, no decoding); for other in-memory datasets their type, length
    and the content of ``samples`` evenly spaced items."""
    base = getattr(ds, "base", ds)
    if listed_files(ds) is not None or getattr(base, "tensors", None) is not None:
        return data_fingerprint(ds)
    h = hashlib.blake2b(digest_size=16)
    n = len(ds)
    h.update(f"{type(base).__name__}:{n}".encode())
    indices = getattr(ds, "indices", None)
    h.update(repr(list(indices) if indices is not None else n).encode())
    for i in sorted({round(j * (n - 1) / max(samples - 1, 1)) for j in range(min(samples, n))}):
        _hash_item(h, base[indices[i]] if indices is not None else base[i])
    return h.hexdigest()
