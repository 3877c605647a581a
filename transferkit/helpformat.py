"""The help formatter of the command line and the recipe scripts."""

from __future__ import annotations

import argparse


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
