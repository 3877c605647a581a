"""Errors and warnings in the syntax the user typed. The library writes a setting as Python
does (``weights='r.pt'``, ``finetune(..., checkpoint=path)``, ``transferkit.resume('r.pt')``);
`cli_spelling` rewrites such text for ``transferkit finetune`` (``--weights r.pt``) and
`recipe_spelling` for a recipe script (``--weights r.pt``, ``--set checkpoint=path``). Text in
backticks is left as it is.
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from transferkit.config import config_fields

# the commands' own options, outside FinetuneConfig, named in errors (lr-find's; export's; predict's)
COMMAND_OPTIONS = ("start_lr", "end_lr", "num_steps", "phase", "num_examples", "atol", "rtol", "threshold")
# key=value: a quoted string, a bracketed list, mapping or tuple, or a word up to a separator, a sentence's end or
# a colon before a space (``compile='auto': tried ...``);
# or key= with no value, the setting named (``give validation data (val_data=, or a val/ folder)``); never inside
# a path or a list of options (``runs/lr=0.1/m.pt``, ``outputs/epochs=5,seed=1``)
_SETTING = re.compile(r"(?<![\w.\-/\\,:;+~])([a-z_]+)=(?:('[^']*'|\"[^\"]*\"|\[[^\]]*\]|\{[^}]*\}|\([^()]*\)|"
                      r"(?![.:](?:\s|$))[^\s,;)]+?)(?=[\s,;)]|[.:](?:\s|$)|$)|(?=[\s,;)]|[.:](?:\s|$)|$))")
_CALL = re.compile(r"(?:transferkit\.)?\b(finetune|resume)\((?!\):)([^()]*)\)")


def drop_python_asides(message: str) -> str:
    """``message`` without the Python alternatives given beside a command (`` (in Python: ...)``):
    for a user of the command line, where nothing else of the message is rewritten (a path
    that holds ``key=value`` stays as it is).

    Example:
        >>> drop_python_asides("raise it: `transferkit --max-image-pixels 0 ...` (in Python: PIL.Image.X = None).")
        'raise it: `transferkit --max-image-pixels 0 ...`.'
    """
    out, at = [], 0
    while (start := message.find(" (in Python: ", at)) >= 0:
        depth, quote, i = 0, None, start + 1
        for i in range(start + 1, len(message)):  # to the parenthesis that closes it, past quoted paths' own
            c = message[i]
            if quote:
                quote = None if c == quote else quote
            elif c in "'\"" and not message[i - 1].isalnum():  # a quote, not an apostrophe (the model's)
                quote = c
            elif c in "()":
                depth += 1 if c == "(" else -1
                if depth == 0:
                    break
        if depth != 0:  # not closed: left as it is
            break
        out.append(message[at:start])
        at = i + 1
    return "".join(out) + message[at:]


def _same(written: str, value: Any) -> bool:
    """Whether the text ``written`` stands for ``value`` (numbers compared as numbers: 0.0003 is 3e-04)."""
    try:
        return float(written) == float(value)
    except (TypeError, ValueError):
        return written == shell_word(str(value))


def shell_word(text: str) -> str:
    """``text`` quoted where a shell (bash, zsh) could split or expand it (a path with a space,
    ``[256]``, an empty word), else as it is.

    Example:
        >>> shell_word("out/m.pt"), shell_word("out/cli ml.pt"), shell_word("")
        ('out/m.pt', "'out/cli ml.pt'", "''")
    """
    return shlex.quote(text) if not text or re.search(r"[^\w@%+=:,./-]", text) else text


def flag(key: str) -> str:
    """The flag of setting ``key``: ``batch_size`` -> ``--batch-size``."""
    return "--" + key.replace("_", "-")


@dataclass(frozen=True)
class Syntax:
    """How one command line is typed: ``command`` (what a ``finetune(...)`` call becomes), the
    settings with a flag of their own (``flags``: key -> flag; every other setting is ``--set
    key=value``), whether a true boolean setting is its flag alone (``switches``), and the
    words that continue the run saved in a checkpoint (``resume``, with ``{path}``)."""

    command: str
    flags: Mapping[str, str]
    switches: bool
    resume: str
    untyped: frozenset[str] = frozenset()  # settings this command sets itself: left as written
    prefix: Mapping[str, str] = field(default_factory=dict)  # words typed before a setting (a recipe's --run NAME)
    # settings a file sets, not the user: key -> (file, value)
    written_in: Mapping[str, tuple[str, Any]] = field(default_factory=dict)

    def setting(self, key: str, value: str) -> str | None:
        """``key=value`` as typed here (``key: value (file)`` where it is the value a file set:
        `written_in`; another value is a change to type), or None when ``key`` is no setting a
        user can type."""
        if value.strip()[:1] in ("{", "["):  # a Python literal, typed as the JSON that --set reads
            with contextlib.suppress(ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                literal = ast.literal_eval(value.strip())
                if not isinstance(literal, dict) or all(isinstance(k, str) for k in literal):  # JSON keys are text
                    value = json.dumps(literal, ensure_ascii=False)
        value = shell_word(value.strip("'\""))
        if key in self.untyped:
            return None
        f = config_fields().get(key)
        if ("/" in value or "\\" in value) and f is not None and str not in f.metadata["types"]:
            return None  # a path that holds key=value (runs/lr=0.1/m.pt): no number is written so

        if key in self.written_in and _same(value, self.written_in[key][1]):
            return f"{key}: {value} ({self.written_in[key][0]})"
        typed = self._typed(key, value)
        return f"{self.prefix[key]} {typed}" if typed and key in self.prefix else typed

    def _typed(self, key: str, value: str) -> str | None:
        if key in self.flags:
            if self.switches and config_fields().get(key) is not None and \
                    config_fields()[key].metadata["types"] == (bool,):
                return self.flags[key] if value.lower() == "true" else ""
            return f"{self.flags[key]} {value}"
        f = config_fields().get(key)
        if f is None or not f.metadata["serial"]:
            return None
        return f"--set {key}={value}"

    def call(self, m: re.Match) -> str:
        """``finetune(..., weights='w.pt')`` -> ```<command> ... --weights w.pt```;
        ``transferkit.resume('run.pt')`` -> ```<command> <resume words>```."""
        args = [a.strip() for a in m.group(2).split(",") if a.strip()]
        words = [self.command]
        if m.group(1) == "resume":
            path = shell_word(args.pop(0).strip("'\"")) if args else "PATH"
            words.append(self.resume.format(path=path))
        for arg in args:
            key, eq, value = arg.partition("=")
            converted = self.setting(key.strip(), value.strip()) if eq else None
            if converted is not None and converted.startswith(f"{key.strip()}: "):
                continue  # the value a file sets: the command gets it from there (`key: value (file)` is no word)
            words.append(arg if converted is None else converted)
        return "`" + " ".join(w for w in words if w) + "`"

    def named(self, key: str) -> str | None:
        """The setting ``key`` named without a value (``val_data=``): its flag, or ``--set key=``;
        None when it is no setting a user can type here."""
        typed = self._typed(key, "") if key not in self.untyped else None
        return typed.rstrip() if typed else None

    def spell(self, message: str) -> str:
        """``message`` with its Python spellings rewritten in this syntax (see the module)."""
        def setting(m: re.Match) -> str:
            converted = self.setting(m.group(1), m.group(2)) if m.group(2) is not None else self.named(m.group(1))
            return m.group(0) if converted is None else converted

        message = re.sub(r"^(?:finetune|plan|lr_find|linear_probe)\(\): ", "", message)  # the command was typed
        message = drop_python_asides(message)  # the command stands beside it
        message = _CALL.sub(self.call, message)
        message = re.sub(r"\bto finetune\(\)", f"to `{self.command}`", message)
        message = re.sub(r"transferkit\.list_backbones\(([^)]*)\)",
                         lambda m: "`transferkit backbones" + (f" {m.group(1).strip(chr(39))}`" if m.group(1) else
                                                               "`"), message)
        parts = message.split("`")  # even parts are outside backticks
        return "`".join(_SETTING.sub(setting, part) if i % 2 == 0 else part for i, part in enumerate(parts))


def _cli_syntax(written_in: Mapping[str, tuple[str, Any]] | None = None) -> Syntax:
    flags = {k: flag(k) for k, f in config_fields().items() if f.metadata["serial"] and f.metadata["flag"]}
    flags.update({k: flag(k) for k in ("data", "val_data", *COMMAND_OPTIONS)})
    return Syntax("transferkit finetune", flags, switches=True, resume="--checkpoint {path} --resume",
                  written_in=written_in or {})


def cli_spelling(message: str, written_in: Mapping[str, tuple[str, Any]] | None = None) -> str:
    """Rewrite Python spellings in an error for a user of the ``transferkit`` command, so that
    each hint reads in one syntax: ``finetune(..., weights='x')`` -> ```transferkit finetune ...
    --weights x```, ``transferkit.resume('run.pt')`` -> ```transferkit finetune --checkpoint run.pt
    --resume```, ``weights='x'`` -> ``--weights x`` (``--set key=value`` for settings without a
    flag), ``transferkit.list_backbones(..)`` -> ```transferkit backbones```; the name of the
    Python call that opens a configuration error (``plan(): ...``) and a Python alternative
    given beside a command (``(in Python: ...)``) are dropped. ``written_in``: the values a
    ``--config`` file set (key -> (file, value)), written ``key: value (file)``, as the user wrote them.

    Example:
        >>> cli_spelling("Pass checkpoint=... to finetune() to be able to resume.")
        'Pass --checkpoint ... to `transferkit finetune` to be able to resume.'
        >>> cli_spelling("weights='mytag' is no tag of tv:resnet18.", {"weights": ("run.yaml", "mytag")})
        'weights: mytag (run.yaml) is no tag of tv:resnet18.'
    """
    return _cli_syntax(written_in).spell(message)


# the settings a recipe script takes as flags of their own (`transferkit.recipes.build_parser` defines them)
RECIPE_FLAGS = {"backbone": "--backbone", "weights": "--weights", "policy": "--policy", "epochs": "--epochs",
                "limit": "--limit", "data_dir": "--data-dir", "out_dir": "--out"}
RECIPE_OWNS = frozenset({"data", "val_data", "classes", "export"})  # a recipe sets them from its data set and --out


def recipe_spelling(message: str, prog: str, run: str | None = None,
                    written_in: Mapping[str, tuple[str, Any]] | None = None) -> str:
    """`cli_spelling` for the recipe script ``prog`` (``python recipes/NAME.py``): its own flags
    (`RECIPE_FLAGS`), ``--set key=value`` for every other setting but those it sets itself
    (`RECIPE_OWNS`) and the values its config file sets (``written_in``: key -> (file, value),
    written ``key: value (file)``), and a resume typed as the same command with ``--set resume=true``.
    ``run``: the run of the recipe's config that the message is about, named (``--run NAME``)
    where a checkpoint or a resume applies to it alone.

    Example:
        >>> recipe_spelling("Pass checkpoint=... to finetune() to be able to resume.", "recipes/fsdd.py")
        'Pass --set checkpoint=... to `python recipes/fsdd.py` to be able to resume.'
        >>> recipe_spelling("continue with transferkit.resume('r.pt').", "recipes/pets.py", run="full")
        'continue with `python recipes/pets.py ... --run full --set resume=true`.'
        >>> recipe_spelling("val_split=0.1 is not used; try val_split=0.2.", "recipes/pets.py",
        ...                 written_in={"val_split": ("pets.yaml", 0.1)})
        'val_split: 0.1 (pets.yaml) is not used; try --set val_split=0.2.'
    """
    only = f"--run {shell_word(run)}" if run else ""
    message = message.replace("`transferkit --max-image-pixels", f"`python {prog} --max-image-pixels")  # its option too
    return Syntax(f"python {prog}", RECIPE_FLAGS, switches=False, resume=f"... {only} --set resume=true".replace(
        "  ", " "), untyped=RECIPE_OWNS, prefix={"checkpoint": only} if only else {},
        written_in=written_in or {}).spell(message)
