"""Rewrite reST roles in docstrings as mkdocstrings cross-references.

``:class:`~transferkit.x.Y``` becomes ``[`Y`][transferkit.Y]`` (a link in the API reference)
when the object it names is rendered in the docs site, and plain code (```Y```) when it is
not (a link to a page that does not exist would fail ``mkdocs build --strict``). Roles:
``:class:``, ``:func:``, ``:meth:``, ``:mod:``, ``:attr:``, ``:data:``, ``:exc:``, ``:obj:``;
a leading ``~`` shows the last name only. Unqualified names are looked up in the file's
module (and the class the line belongs to), then in ``transferkit``.

Which objects are rendered is read from the site's ``objects.inv``: by default the script
builds the site into a temporary folder first (``mkdocs build``, run from the repository
root); ``--inventory site/objects.inv`` reuses a build.

Usage (from the repository root, with the project's environment)::

    PYTHONPATH=. .venv/bin/python tools/convert_roles.py transferkit/api.py transferkit/plan.py
    PYTHONPATH=. .venv/bin/python tools/convert_roles.py --check transferkit benchmarks   # exit 1 if any role is left

Directories are searched for ``*.py`` files. ``--check`` changes nothing and lists the roles left.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ROLE = re.compile(r":(?:py:)?(?P<role>class|func|meth|mod|attr|data|exc|obj):`(?P<tilde>~?)(?P<target>[\w.]+)(?:\(\))?`")
_MISSING = object()


def read_inventory(path: Path) -> list[str]:
    """The object names of a Sphinx v2 inventory (mkdocstrings writes one as ``objects.inv``)."""
    data = path.read_bytes()
    start = 0
    for _ in range(4):  # four header lines, then zlib
        start = data.index(b"\n", start) + 1
    return [line.split(" ", 1)[0] for line in zlib.decompress(data[start:]).decode().splitlines() if line.strip()]


def build_inventory() -> list[str]:
    """Build the site into a temporary folder and read its inventory."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([str(mkdocs), "build", "--site-dir", tmp], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"mkdocs build failed (needed to know which objects the docs render):\n{proc.stderr}")
        return read_inventory(Path(tmp) / "objects.inv")


def resolve(dotted: str, *, module: bool = False) -> Any:
    """The object a dotted path names, walking attributes first (``transferkit.plan`` is the
    function, as ``import transferkit`` sees it) and importing submodules when needed.
    ``__main__`` modules are never imported (importing one runs it)."""
    if "__main__" in dotted.split("."):
        return _MISSING
    if module:
        try:
            return importlib.import_module(dotted)
        except ImportError:
            return _MISSING
    parts = dotted.split(".")
    try:
        obj: Any = importlib.import_module(parts[0])
    except ImportError:
        return _MISSING
    for i, part in enumerate(parts[1:], start=1):
        nxt = inspect.getattr_static(obj, part, _MISSING) if isinstance(obj, type) else getattr(obj, part, _MISSING)
        if nxt is _MISSING and inspect.ismodule(obj):
            try:
                nxt = importlib.import_module(".".join(parts[: i + 1]))
            except ImportError:
                return _MISSING
        if nxt is _MISSING:
            return _from_module(parts)
        obj = nxt
    return obj


def _from_module(parts: list[str]) -> Any:
    """The longest importable module prefix of ``parts``, then attributes (``transferkit.plan.plan``:
    the function ``plan`` of the module ``transferkit.plan``, which the package attribute hides)."""
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = inspect.getattr_static(obj, part, _MISSING) if isinstance(obj, type) else getattr(obj, part, _MISSING)
            if obj is _MISSING:
                break
        else:
            return obj
    return _MISSING


def canonical(obj: Any, fallback: str) -> str:
    """Where an object is defined (``transferkit.config.FinetuneConfig``); ``fallback`` for
    objects without a name of their own (constants, fields)."""
    if inspect.ismodule(obj):
        return obj.__name__
    target = obj.fget if isinstance(obj, property) else getattr(obj, "__func__", obj)
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and "<" not in qualname:
        return f"{module}.{qualname}"
    return fallback


def documented(names: list[str]) -> dict[str, str]:
    """Canonical path -> the name the docs render it under (the shortest, the public one)."""
    out: dict[str, str] = {}
    for name in sorted(names, key=len, reverse=True):
        obj = resolve(name)
        if obj is _MISSING:
            obj = resolve(name, module=True)
        key = canonical(obj, name) if obj is not _MISSING else name
        out[key] = name
        out.setdefault(name, name)
    return out


def module_name(path: Path) -> str | None:
    """The dotted module of a file inside the repository (``transferkit/plan.py`` ->
    ``transferkit.plan``), or None for a script."""
    try:
        rel = path.resolve().relative_to(ROOT)
    except ValueError:
        return None
    if rel.parts[0] != "transferkit":
        return None
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[-1] == "__main__":  # importing it would run it: resolve its names in the package
        parts.pop()
    return ".".join(parts)


def class_at_lines(source: str) -> dict[int, str]:
    """Line number -> the (qualified) name of the innermost class whose body holds it."""
    where: dict[int, str] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                name = f"{prefix}{child.name}"
                for line in range(child.lineno, (child.end_lineno or child.lineno) + 1):
                    where[line] = name
                visit(child, name + ".")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, prefix)

    visit(ast.parse(source), "")
    return where


def target_path(target: str, role: str, mod: str | None, cls: str | None) -> str | None:
    """The canonical path of a role's target, or None when it names nothing importable."""
    is_module = role == "mod"
    candidates = []
    if mod and cls:
        candidates.append(f"{mod}.{cls}.{target}")
    if mod:
        candidates.append(f"{mod}.{target}")
    candidates += [target, f"transferkit.{target}"]
    for dotted in candidates:
        obj = resolve(dotted, module=is_module)
        if obj is not _MISSING:
            return canonical(obj, dotted)
    return None


def convert_text(source: str, *, mod: str | None, docs: dict[str, str]) -> tuple[str, list[str]]:
    """The source with every role rewritten, and one line per rewrite (for the log)."""
    lines = source.splitlines(keepends=True)
    classes = class_at_lines(source) if source.strip() else {}
    log: list[str] = []
    for i, line in enumerate(lines):
        def repl(m: re.Match[str], lineno: int = i + 1) -> str:
            target, role = m["target"], m["role"]
            shown = target.rsplit(".", 1)[-1] if m["tilde"] else target
            path = target_path(target, role, mod, classes.get(lineno))
            name = docs.get(path) if path else None
            new = f"[`{shown}`][{name}]" if name else f"`{shown}`"
            log.append(f"{lineno}: {m[0]} -> {new}")
            return new

        lines[i] = ROLE.sub(repl, line)
    return "".join(lines), log


def python_files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="Python files or folders to rewrite in place")
    ap.add_argument("--inventory", type=Path, help="objects.inv of a built site (default: build one now)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a role is left")
    ap.add_argument("--quiet", action="store_true", help="do not list the rewrites")
    args = ap.parse_args(argv)
    files = python_files(args.paths)
    if args.check:
        left = [f"{f}:{n}: {m[0]}" for f in files for n, line in enumerate(f.read_text().splitlines(), 1)
                for m in ROLE.finditer(line)]
        print("\n".join(left) or "no reST roles left")
        return 1 if left else 0
    sys.path.insert(0, str(ROOT))
    docs = documented(read_inventory(args.inventory) if args.inventory else build_inventory())
    total = 0
    for f in files:
        source = f.read_text()
        new, log = convert_text(source, mod=module_name(f), docs=docs)
        if new != source:
            f.write_text(new)
        total += len(log)
        if log and not args.quiet:
            print(f"{f}:\n  " + "\n  ".join(log))
    print(f"{total} roles rewritten in {len(files)} files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
