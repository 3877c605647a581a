"""``python -m transferkit``: the command line (see :mod:`transferkit.cli`)."""

import sys

from transferkit.cli import main

sys.exit(main())
