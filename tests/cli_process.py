"""The ``lycoflow`` command in a process of its own, without paying for its imports each time.

Each run is a fork of one server process that has imported lycoflow's commands once (multiprocessing's
forkserver): what ``python -m lycoflow.cli ARGV`` is once its imports are done — fresh module state (no W&B
console capture or Lightning logger left by an earlier run), its own working folder, environment, exit code,
stdout and stderr. A subprocess per run spends ≈ 9 s of two CPU cores importing torch, Lightning, diffusers and
open_clip before the first line of the command; the bad-input corpus and the fault tests run it ~25 times.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

_SERVER = multiprocessing.get_context("forkserver")
# What the commands import (each imports its own when it runs): imported once, in the server.
_SERVER.set_forkserver_preload(["lycoflow.cli", "lycoflow.lightning_cli", "lycoflow.sweep", "lycoflow.analysis",
                                "lycoflow.tools.generate", "lycoflow.tools.merge", "callbacks"])


def _command(argv: list[str], cwd: str, env: dict[str, str], out: str, err: str, file_size_limit: int | None) -> None:
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    if file_size_limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process at the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    sys.argv = ["lycoflow", *argv]
    from lycoflow.cli import main

    sys.exit(main(argv))  # multiprocessing flushes the streams and exits with this code


def lycoflow(argv: list[str], cwd: Path, env: dict[str, str] | None = None, file_size_limit: int | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``lycoflow ARGV`` in ``cwd`` with ``env`` (default: this process's environment); with
    ``file_size_limit``, no file it writes can grow past that many bytes (a write past it fails with EFBIG, as on
    a full disk). Its stdout and stderr pass through files in a temporary folder of their own."""
    with tempfile.TemporaryDirectory(prefix="lycoflow-streams-") as streams:
        out, err = Path(streams) / "stdout", Path(streams) / "stderr"
        process = _SERVER.Process(target=_command, args=(
            list(argv), str(cwd), dict(os.environ if env is None else env), str(out), str(err), file_size_limit))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["lycoflow", *argv], timeout)
        # A process that died before it got to its command (a failed fork) has written no stream.
        out, err = (path.read_text() if path.exists() else "" for path in (out, err))
        return subprocess.CompletedProcess(["lycoflow", *argv], process.exitcode, out, err)
