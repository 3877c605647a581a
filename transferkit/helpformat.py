"""The help formatter of the command line and the recipe scripts, and how both show warnings."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from transferkit.errors import closest, suggest


class Parser(argparse.ArgumentParser):
    """argparse's parser whose errors name the nearest known spellings: of an option the
    command does not have (``--polcy`` -> ``'--policy'``), said by the parser of the command it
    follows (its usage line, not the top level's), and of a choice (a command name, ``fintune``
    -> ``'finetune'``), as values of settings already are (argparse says only "unrecognized
    arguments" and "invalid choice")."""

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._command_parser(parsed)
            options = [o for o in parser._option_string_actions if o.startswith("--")]
            unknown = [x.split("=", 1)[0] for x in extras if x.startswith("--")]
            near = [(x, close[0]) for x in unknown if (close := closest(x, options, n=1))]
            said = repr(near[0][1]) if len(near) == 1 else ", ".join(f"{c!r} for {x}" for x, c in near)
            parser.error(f"unrecognized arguments: {' '.join(extras)}" + (f". Did you mean {said}?" if near else ""))
        return parsed

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The parser of the command ``parsed`` holds (its own, where it has none)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(parsed, action.dest, None) or "")
                if isinstance(chosen, Parser):
                    return chosen._command_parser(parsed)
        return self

    def error(self, message: str) -> NoReturn:
        found = re.fullmatch(r"argument .*: invalid choice: '(.*)' \(choose from (.*)\)", message, re.S)
        hint = suggest(found.group(1), re.findall(r"'([^']*)'", found.group(2))) if found else ""
        if hint:
            message += "." + hint
        super().error(message)


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
    source file and line), its message passed through ``spell``."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        print(f"{prog}: warning: {spell(one_line(message))}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
