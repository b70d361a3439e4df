"""``python -m lycoflow.analysis``: the same as ``lycoflow analyze``."""

import sys

from .report import main

sys.exit(main())
