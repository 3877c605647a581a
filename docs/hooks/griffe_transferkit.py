"""A griffe extension for the API reference (loaded by mkdocstrings, see mkdocs.yml).

Two things the docstrings leave implicit, made explicit at render time so the source stays
plain Google style:

- ``Example:`` (singular, the project's style) is read as griffe's *Examples* section, so
  ``>>>`` lines render as code blocks (and ``# doctest: +SKIP`` flags are trimmed by griffe's
  ``trim_doctest_flags``), not as nested block quotes.
- A dataclass whose docstring has no ``Attributes:`` section gets one, built from its fields:
  name, type, default and the field's help text (``FinetuneConfig`` keeps it in the field's
  metadata) or the comment at the end of the field's line.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)
_ATTRIBUTES = re.compile(r"^\s*Attributes:\s*$", re.M)


def _runtime_class(cls: griffe.Class) -> Any:
    try:
        obj: Any = importlib.import_module(cls.module.path)
    except Exception:  # noqa: BLE001 - a module that cannot be imported is documented statically
        return None
    for part in cls.path[len(cls.module.path) + 1:].split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) and dataclasses.is_dataclass(obj) else None


def _type_text(f: dataclasses.Field, cls: griffe.Class) -> str:
    member = cls.members.get(f.name)
    annotation = getattr(member, "annotation", None)
    return str(annotation) if annotation is not None else ""


def _default_text(f: dataclasses.Field) -> str | None:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        try:
            value = f.default_factory()  # type: ignore[misc]
        except Exception:  # noqa: BLE001
            return None
        if dataclasses.is_dataclass(value):
            return f"`{type(value).__name__}()`"
    else:
        return None
    text = repr(value)
    return f"`{text}`" if len(text) <= 60 else None


def _line_comment(cls: griffe.Class, name: str) -> str:
    member = cls.members.get(name)
    lineno = getattr(member, "lineno", None)
    try:
        lines = Path(cls.filepath).read_text().splitlines()  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""
    if not lineno:
        return ""
    line = lines[lineno - 1]
    return line.split("  # ", 1)[1].strip() if "  # " in line else ""


def _escape(text: str) -> str:
    return text.replace("\n", " ")


def _attributes_section(cls: griffe.Class, runtime: Any) -> str:
    items = []
    for f in dataclasses.fields(runtime):
        if f.name.startswith("_"):
            continue
        help_text = f.metadata.get("help") or _line_comment(cls, f.name)
        default = _default_text(f)
        parts = [help_text[:1].upper() + help_text[1:] + "." if help_text else ""]
        choices = f.metadata.get("choices")
        if choices:
            parts.append("One of " + ", ".join(f"`{c!r}`" for c in choices) + ".")
        if default is not None:
            parts.append(f"Default: {default}.")
        type_text = _type_text(f, cls)
        head = f"{f.name} ({type_text})" if type_text else f.name
        items.append(f"    {head}: {_escape(' '.join(p for p in parts if p))}")
    return "Attributes:\n" + "\n".join(items) if items else ""


class TransferkitDocs(griffe.Extension):
    """Examples as code, dataclass fields as an Attributes table."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
        if isinstance(obj, griffe.Class) and obj.docstring is not None \
                and not _ATTRIBUTES.search(obj.docstring.value):
            runtime = _runtime_class(obj)
            if runtime is not None:
                section = _attributes_section(obj, runtime)
                if section:
                    obj.docstring.value = obj.docstring.value.rstrip() + "\n\n" + section
