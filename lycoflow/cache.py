"""Where lycoflow keeps what it builds or generates once and reuses (tiny models, synthetic data sets), and how
it writes files (atomically)."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """``$LYCOFLOW_CACHE``, else ``$XDG_CACHE_HOME/lycoflow``, else ``~/.cache/lycoflow``."""
    if os.environ.get("LYCOFLOW_CACHE"):
        return Path(os.environ["LYCOFLOW_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lycoflow"


#: errno values that mean there is no room for a file: the disk is full (ENOSPC), the user's quota is (EDQUOT), or
#: the file would be larger than the filesystem or ``ulimit -f`` allows (EFBIG).
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

# How libraries that write in native code report an OS error in their message only (safetensors: "I/O error: No
# space left on device (os error 28)").
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


class DiskFullError(OSError):
    """A file could not be written because there is no room for it (``errno`` is ENOSPC, EDQUOT or EFBIG). Its
    message is one line that names the file (``filename``) and says the disk is full, for the user, with what was
    kept; what was being written has been removed.

    Args:
        path: the file that could not be written.
        code: the errno.
        what: what the file is, before its path ("checkpoint ", "adapter file "); may be empty.
        after: appended to the message (what is intact, what to do), starting with "; ".
    """

    def __init__(self, path: str | os.PathLike, code: int, what: str = "", after: str = ""):
        super().__init__(code, os.strerror(code), str(path))
        why = "the disk is full or the file is over the size limit" if code == errno.EFBIG else "the disk is full"
        self.message = f"could not write {what}{path}: {why} ({os.strerror(code)}){after}"

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple:  # OSError's would call __init__ with (errno, strerror, filename)
        return type(self), (self.filename, self.errno), self.__dict__


def no_room(err: BaseException) -> int | None:
    """The errno (ENOSPC, EDQUOT or EFBIG) if ``err``, or an error it was raised from or while handling, says there
    is no room to write; None for any other error. Also reads the code from the message of libraries that report
    an OS error as text (safetensors' ``SafetensorError``)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in NO_ROOM:
            return err.errno
        if not isinstance(err, OSError):
            for match in _OS_ERROR_CODE.finditer(str(err)):
                code = int(match.group(1) or match.group(2))
                if code in NO_ROOM:
                    return code
        err = err.__cause__ or err.__context__
    return None


def default_file_mode() -> int:
    """The mode the user's umask gives a new file (what ``open`` creates; mkstemp creates 0600). The same three
    lines are in lycoris/io.py, which stands alone and cannot import this torch-free module's package."""
    mask = os.umask(0)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends without an
    error, removed otherwise. A reader (or a crash) never sees half a file under ``path``. When the disk is full
    the error is a `DiskFullError` naming ``path`` (an `OSError`, as before)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        if (code := no_room(err)) is not None:
            raise DiskFullError(path, code) from err
        raise
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())  # as if written in place: readable by whom the umask allows
        os.replace(tmp, path)
    except Exception as err:
        if (code := no_room(err)) is not None and not isinstance(err, DiskFullError):
            raise DiskFullError(path, code) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
