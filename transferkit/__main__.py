"""``python -m transferkit``: the command line (see `transferkit.cli`)."""

import sys

from transferkit.cli import main

sys.exit(main())
