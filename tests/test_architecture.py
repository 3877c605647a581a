"""The package's import structure, read from its source (AST): layers point one way, no
import circles (function-level imports included), no private name imported across modules."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1] / "transferkit"

# rank of each layer: a module may import modules of its own rank or lower, never higher
LAYERS = [
    ("transferkit._version", 0), ("transferkit.errors", 0), ("transferkit._io", 0), ("transferkit._integrity", 0),
    ("transferkit._signals", 0), ("transferkit._progress", 0), ("transferkit._text", 0), ("transferkit.hardware", 0),
    ("transferkit.config", 0), ("transferkit.schedules", 0), ("transferkit.spelling", 0),
    ("transferkit.helpformat", 0), ("transferkit.checkpoints", 0), ("transferkit.outputs", 0),
    ("transferkit.lora", 0), ("transferkit.heads", 0), ("transferkit.model", 0),
    ("transferkit.backbones", 1), ("transferkit.data", 1), ("transferkit.policies", 1), ("transferkit.export", 1),
    ("transferkit.train", 2),
    ("transferkit.facts", 3), ("transferkit.decisions", 3), ("transferkit.run", 3),
    ("transferkit.evaluation", 3),
    ("transferkit.steps", 4),
    ("transferkit.results", 5), ("transferkit.api", 5), ("transferkit.demo", 5), ("transferkit.recipes", 5),
    ("transferkit.cli", 6), ("transferkit.__main__", 6), ("transferkit", 7),
]
# modules that may import transferkit modules inside functions: the CLI and the recipe scripts'
# runner keep `--help` free of torch; the others load optional or heavy dependencies (matplotlib,
# scikit-learn, onnx, IPython) only when used
LAZY_OK = {"transferkit.cli", "transferkit", "transferkit.__main__", "transferkit.recipes"}
LAZY_TARGETS_OK = {"transferkit.export.onnx", "transferkit.train.interpret", "transferkit.train.reporting",
                   "transferkit.train.probe", "transferkit.data.gpu_jpeg", "transferkit.train.lr_find",
                   "transferkit.data.decoded"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The transferkit module that ``name`` (a module or a module.attribute) refers to."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mod: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None, int, bool, bool]]:
    """``(target module, imported name, line, inside a function, for annotations only)`` for
    every transferkit import (``if TYPE_CHECKING:`` imports are for annotations only)."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool, typing: bool = False) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, in_function, True)  # annotations only: not imported at run time
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "transferkit":
                        out.append((_resolve(a.name, modules), None, child.lineno, in_function, typing))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                if base.split(".")[0] != "transferkit":
                    continue
                for a in child.names:
                    full = f"{base}.{a.name}"
                    target = full if full in modules else _resolve(base, modules)
                    out.append((target, None if full in modules else a.name, child.lineno, in_function, typing))
            visit(child, inner, typing)

    visit(tree, False)
    return out


def _rank(mod: str) -> int:
    best = max((p for p, _ in LAYERS if mod == p or mod.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    problems = []
    for mod, path in sorted(modules.items()):
        for target, name, line, lazy, typing in _imports(mod, path, modules):
            if target is None or target == mod:
                continue
            where = f"{path.relative_to(ROOT.parent)}:{line}"
            if _rank(target) > _rank(mod):  # a type named for annotations only, too: the layer knows the one above
                problems.append(f"{where}: {mod} imports {target}, a layer above it")
            if typing:
                continue
            if name is not None and name.startswith("_") and not name.startswith("__"):
                problems.append(f"{where}: {mod} imports the private name {name} from {target}")
            if lazy and mod not in LAZY_OK and target not in LAZY_TARGETS_OK:
                problems.append(f"{where}: {mod} imports {target} inside a function (import it at the top)")
            graph[mod].add(target)
    return graph, problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_every_module_has_a_layer():
    assert all(_rank(m) >= 0 for m in _modules())


def test_layers_point_one_way_and_no_private_names_cross_modules():
    problems = _graph()[1]
    assert not problems, "\n".join(problems)


def test_no_import_circles():
    cycles = _cycles(_graph()[0])
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("source", ["import transferkit.train.loop", "from transferkit.steps import train",
                                    "if TYPE_CHECKING:\n    from transferkit.steps import TrainingData"])
def test_the_reader_sees_an_upward_import(tmp_path, monkeypatch, source):
    """The check itself: an upward import planted in a leaf module is reported."""
    leaf = ROOT / "data" / "sampling.py"
    text = leaf.read_text()
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (text + "\n" + source + "\n") if self == leaf
                        else Path.read_bytes(self).decode())
    problems = _graph()[1]
    assert any("transferkit.data.sampling imports" in p and "a layer above" in p for p in problems)


def _warn_calls(read=lambda p: p.read_text()) -> list[str]:
    """``module:line`` of every ``warnings.warn(...)`` outside ``transferkit.errors``."""
    return [f"{mod}:{node.lineno}" for mod, path in sorted(_modules().items()) if mod != "transferkit.errors"
            for node in ast.walk(ast.parse(read(path), str(path)))
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("warnings.warn", "warnings.warn_explicit")]


def test_every_warning_is_given_by_errors_warn():
    """A warning given elsewhere would be a plain UserWarning (out of reach of a filter on
    TransferkitWarning) named at a line of transferkit's, not the user's."""
    assert not _warn_calls(), "use transferkit.errors.warn: " + ", ".join(_warn_calls())


def test_the_reader_sees_a_warning_given_elsewhere():
    leaf = ROOT / "train" / "loaders.py"
    calls = _warn_calls(lambda p: p.read_text() + ("\nimport warnings\nwarnings.warn('x')\n" if p == leaf else ""))
    assert [c.split(":")[0] for c in calls] == ["transferkit.train.loaders"]


def _dataloader_calls(read=lambda p: p.read_text()) -> list[str]:
    """``module:line`` of every ``DataLoader(...)`` made outside ``transferkit.data.sampling``."""
    out = []
    for mod, path in sorted(_modules().items()):
        if mod == "transferkit.data.sampling":
            continue
        for node in ast.walk(ast.parse(read(path), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name == "DataLoader":
                    out.append(f"{mod}:{node.lineno}")
            elif isinstance(node, ast.ImportFrom):  # DataLoader under another name
                if any(a.name == "DataLoader" and a.asname not in (None, "DataLoader") for a in node.names):
                    out.append(f"{mod}:{node.lineno}")
    return out


def test_every_dataloader_is_made_by_data_loader():
    """A DataLoader made elsewhere would miss ``quiet_exit_on_sigterm``: its workers, killed by a
    job-wide SIGTERM, are reported by torch as a crash in the middle of saving the weights."""
    assert not _dataloader_calls(), "use transferkit.data.sampling.data_loader: " + ", ".join(_dataloader_calls())


@pytest.mark.parametrize("planted", ["import torch\nloader = torch.utils.data.DataLoader([1, 2])\n",
                                     "from torch.utils.data import DataLoader as DL\nloader = DL([1, 2])\n"])
def test_the_reader_sees_a_dataloader_made_elsewhere(planted):
    leaf = ROOT / "train" / "loaders.py"
    calls = _dataloader_calls(lambda p: p.read_text() + ("\n" + planted if p == leaf else ""))
    assert [c.split(":")[0] for c in calls] == ["transferkit.train.loaders"]


class _WorkerState(torch.utils.data.Dataset):
    """What a worker process runs with: Pillow's pixel limit and its SIGTERM handler."""

    def __len__(self):
        return 1

    def __getitem__(self, i):
        import signal

        from PIL import Image

        return Image.MAX_IMAGE_PIXELS, getattr(signal.getsignal(signal.SIGTERM), "__name__", "")


def test_data_loader_s_workers_exit_quietly_on_sigterm_and_keep_the_pixel_limit(monkeypatch):
    """A worker started by spawn (macOS's default) imported Pillow anew: a raised limit
    (transferkit --max-image-pixels) did not reach it."""
    from PIL import Image

    from transferkit.data.sampling import data_loader

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12345)
    loader = data_loader(_WorkerState(), batch_size=None, num_workers=1, multiprocessing_context="spawn")
    assert list(next(iter(loader))) == [12345, "_exit_quietly"]


_ARMED: list[int] = []  # a SIGINT to send from the fork hook, once


def _signal_while_forking() -> None:
    if _ARMED:
        _ARMED.pop()
        import signal

        signal.raise_signal(signal.SIGINT)


os.register_at_fork(after_in_parent=_signal_while_forking)


def test_a_signal_while_workers_are_forked_stops_the_loop_instead_of_being_dropped():
    """Ctrl-C or SIGTERM landing while a DataLoader forked its workers ran its handler inside
    Python's fork hooks, which drop the exception: the run went on (or a half-started worker
    was reported as a crash). The workers start with the signals held, then it is raised."""
    import signal

    from transferkit.data.sampling import data_loader

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores it)
    try:
        loader = data_loader(_WorkerState(), batch_size=None, num_workers=1, multiprocessing_context="fork")
        _ARMED.append(1)
        with pytest.raises(KeyboardInterrupt):
            for _ in loader:
                pass
        assert not _ARMED and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert list(next(iter(loader))) == [Image.MAX_IMAGE_PIXELS, "_exit_quietly"]  # a later start as before
    finally:
        _ARMED.clear()
        signal.signal(signal.SIGINT, before)


class _WorkerHandler(torch.utils.data.Dataset):
    """The SIGINT handler a DataLoader worker runs with."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> str:
        import signal

        handler = signal.getsignal(signal.SIGINT)
        return getattr(handler, "__qualname__", str(handler))


def test_loader_workers_of_a_run_take_ctrl_c_as_python_does():
    """Inside a run (its first interruption holding a second one), workers started with the
    signals held kept the holding handler for SIGINT: they swallowed Ctrl-C."""
    from transferkit._signals import first_interruption_holds, terminate_as_interrupt
    from transferkit.data.sampling import data_loader

    with terminate_as_interrupt(), first_interruption_holds():
        assert list(data_loader(_WorkerHandler(), batch_size=None, num_workers=1)) == ["default_int_handler"]
