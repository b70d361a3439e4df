"""Where lycoflow keeps what it builds or generates once and reuses (tiny models, synthetic data sets), and how
it writes files (atomically)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """``$LYCOFLOW_CACHE``, else ``$XDG_CACHE_HOME/lycoflow``, else ``~/.cache/lycoflow``."""
    if os.environ.get("LYCOFLOW_CACHE"):
        return Path(os.environ["LYCOFLOW_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lycoflow"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends without an
    error, removed otherwise. A reader (or a crash) never sees half a file under ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
