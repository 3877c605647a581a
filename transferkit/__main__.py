"""``python -m transferkit``: the command line (see `transferkit.cli`)."""

from transferkit.cli import console_main

console_main()
