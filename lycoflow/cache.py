"""Where lycoflow keeps what it builds or generates once and reuses (tiny models, synthetic data sets)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LYCOFLOW_CACHE``, else ``$XDG_CACHE_HOME/lycoflow``, else ``~/.cache/lycoflow``."""
    if os.environ.get("LYCOFLOW_CACHE"):
        return Path(os.environ["LYCOFLOW_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lycoflow"
