"""The help formatter of the command line and the recipe scripts, and how both show warnings."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from transferkit._progress import spelled_as
from transferkit.errors import closest, suggest
from transferkit.spelling import shell_word


class Parser(argparse.ArgumentParser):
    """argparse's parser whose errors name the nearest known spellings: of an option the
    command does not have (``--polcy`` -> ``'--policy'``), said by the parser of the command it
    follows (its usage line, not the top level's; an option of the top level given after the
    command is said to go before it), and of a choice (a command name, ``fintune`` ->
    ``'finetune'``), as values of settings already are (argparse says only "unrecognized
    arguments" and "invalid choice")."""

    _top: Parser | None = None  # the parser whose parse_args runs: a command's parser reads its arguments in `error`
    settings: frozenset[str] = frozenset()  # what the parser's --set takes: `--weight-decay 0.1` is said as one

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        self._given = [str(a) for a in (sys.argv[1:] if args is None else args)]  # for `error`
        Parser._top = self
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._command_parser(parsed)
            options = [o for o in parser._option_string_actions if o.startswith("--")]
            near, own, settings = {}, [], []
            for x in dict.fromkeys(x.split("=", 1)[0] for x in extras if x.startswith("--") and x != "--"):
                if parser is not self and x in self._option_string_actions:
                    own.append(f"{x} is an option of {self.prog} itself: give it before the command.")
                elif x[2:].replace("-", "_") in getattr(parser, "settings", ()):
                    settings.append(f"{x} is a setting without a flag of its own: give it as --set "
                                    f"{x[2:].replace('-', '_')}={_value_of(x, extras)}.")
                elif close := closest(x, options, n=1):
                    near[x] = close[0]
            said = [f"Did you mean {next(iter(near.values()))!r}?" if len(near) == 1 else
                    "Did you mean " + ", ".join(f"{c!r} for {x}" for x, c in near.items()) + "?"] if near else []
            if "--backbone" in parser._option_string_actions:  # `transferkit finetune tk:small_cnn ...`
                settings += [f"{x} is no argument of its own: give it as --backbone {x}." for x in extras
                             if re.fullmatch(r"[a-z]+:[\w.:-]+", x)][:1]
            if "--data" in parser._option_string_actions and getattr(parsed, "data", "") is None:
                settings += [f"{x} is no argument of its own: give it as {_flag_of_path(x)} {shell_word(x)}."
                             for x in extras if not x.startswith("-") and os.path.exists(x)][:1]  # `finetune photos/`
            parser.error(" ".join([f"unrecognized arguments: {' '.join(extras)}.", *settings, *said, *own]))
        return parsed

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The parser of the command ``parsed`` holds (its own, where it has none)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(parsed, action.dest, None) or "")
                if isinstance(chosen, Parser):
                    return chosen._command_parser(parsed)
        return self

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        """argparse's error, with the nearest spelling of an unknown option where the command is
        missing (``transferkit --verison``: argparse says only that COMMAND is required)."""
        if "the following arguments are required" in message:
            top = Parser._top if Parser._top is not None else self
            given = getattr(top, "_given", [])
            known = [o for o in self._option_string_actions if o.startswith("--")]
            unknown = [x.split("=", 1)[0] for x in given if x.startswith("--") and x != "--"
                       and x.split("=", 1)[0] not in self._option_string_actions]
            own = [x for x in unknown if top is not self and x in top._option_string_actions]
            near = [c[0] for x in unknown if (c := closest(x, known, n=1))]
            if own:  # `transferkit predict --version`: the top level's option after the command
                message += f"; {own[0]} is an option of {top.prog} itself: give it before the command."
            elif near:
                message += f"; {unknown[0]} is not an option. Did you mean {near[0]!r}?"
        super().error(message)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        try:
            super()._check_value(action, value)  # type: ignore[misc]
        except argparse.ArgumentError as exc:
            hint = suggest(value, [str(c) for c in action.choices or ()]) if isinstance(value, str) else ""
            if not hint:
                raise
            raise argparse.ArgumentError(action, f"{exc.message}.{hint}") from None


def _flag_of_path(path: str) -> str:
    """The flag an existing ``path`` given as an argument is for: a YAML (or JSON) file is a
    ``--config``, anything else (a folder, a CSV, shards) ``--data``."""
    return "--config" if os.path.isfile(path) and path.lower().endswith((".yaml", ".yml", ".json")) else "--data"


def _value_of(flag: str, extras: list[str]) -> str:
    """The value given with the unknown ``flag`` among ``extras`` (``--flag=v`` or ``--flag v``),
    else ``VALUE``."""
    for i, x in enumerate(extras):
        value = x.split("=", 1)[1] if x.startswith(flag + "=") else extras[i + 1] if x == flag and \
            i + 1 < len(extras) and not extras[i + 1].startswith("--") else None
        if value is not None:  # quoted where a shell would split or expand it ({"min_factor": 0.01})
            return shell_word(value)
    return "VALUE"


class HELP(argparse.RawDescriptionHelpFormatter):
    """Help text with each default stated once: added unless the help already says it, or
    there is none to state (None, False)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.default == [] \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


MAX_PIXELS_HELP = ("Pillow's decompression-bomb limit: an image of more pixels is refused as a bad file (0: no "
                   "limit; default Pillow's, about 89 million)")


def positive_whole_number(text: str) -> int:
    """The argparse ``type`` of a flag that takes a positive whole number (``--top-k``,
    ``--batch-size``, a recipe's ``--threads``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def pixel_limit(text: str) -> int:
    """``--max-image-pixels``: a whole number of pixels, 0 for no limit."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels (0: no limit), got {text!r}")
    return value


def set_pixel_limit(value: int | None) -> None:
    """Pillow's pixel limit from ``--max-image-pixels`` (None: left as it is; 0: no limit), here
    and in every loader's workers (`transferkit.data.sampling.WorkerInit`)."""
    if value is not None:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = value or None


def one_line(text: object) -> str:
    """``text`` on one line (runs of whitespace, line breaks included, become one space)."""
    return " ".join(str(text).split())


@contextlib.contextmanager
def one_line_warnings(prog: str, spell: Callable[[str], str] = str) -> Iterator[None]:
    """Within: each warning prints as one line ``<prog>: warning: <message>`` on stderr (no
    source file and line), its message passed through ``spell``, as a run's plan is (`spelled_as`)."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        print(f"{prog}: warning: {spell(one_line(message))}", file=sys.stderr)

    with warnings.catch_warnings(), spelled_as(spell):  # a run's plan too
        warnings.showwarning = show
        yield
