"""Faults outside the training itself, on real runs of the tiny model: the disk filling up while a run saves (one
clear message, no temporary file left, the files saved before intact), temporary files left by a killed save (removed
at the next start, and nothing else), and a W&B server that cannot be reached (a bounded wait, then offline).

The disk is made "full" for real where possible: the command runs in a process of its own under ``RLIMIT_FSIZE``
with SIGXFSZ ignored, so every write past the limit fails with EFBIG in the real writers (Lightning's, safetensors'
Rust code). A full run
folder behind a temporary folder with room (Lightning stages checkpoints in the temporary folder, then moves them) is
simulated at the lowest level, the ``sendfile`` that copies it across.
"""

import errno
import hashlib
import os
import resource
import signal
import socket
import tempfile
from pathlib import Path

import pytest
from cli_process import lycoflow

from callbacks.saving import STALE_TEMP
from lycoflow.cache import DiskFullError, atomic_path, no_room
from lycoflow.lightning_cli import run_lightning

ROOT = Path(__file__).parent.parent


def callbacks(every_n_epochs):
    """No Evaluation callback (it would only slow these down): adapter files and the checkpoint only."""
    return (f"--trainer.callbacks=[{{class_path: callbacks.AdapterExport, init_args: {{every_n_epochs: "
            f"{every_n_epochs}}}}}, {{class_path: callbacks.RunCheckpoint}}]")


QUICK = ("--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0", "--trainer.logger=false")


def fit(tiny, run, *extra):
    return run_lightning(["fit", "recipes/tiny.yaml", *tiny, f"--trainer.default_root_dir={run}", *extra])


def lycoflow_fit(tiny, run, *extra, env=None, file_size_limit=None, timeout=300):
    """``lycoflow fit`` in a process of its own (the real command line, exit code and output); with
    ``file_size_limit``, no file it writes can grow past that many bytes: a write past it fails with EFBIG, as on
    a full disk."""
    return lycoflow(["fit", "recipes/tiny.yaml", *tiny, f"--trainer.default_root_dir={run}", *extra], ROOT,
                    {**os.environ, **(env or {})}, file_size_limit, timeout)


def digests(run):
    """sha256 of every file in the run's adapters/ and checkpoints/, by path."""
    files = [*(run / "adapters").iterdir(), *(run / "checkpoints").iterdir()]
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def temp_files(*folders):
    return sorted(str(p) for folder in folders for p in Path(folder).rglob("*") if p.name.endswith(".tmp")
                  or p.name.startswith("tmp"))


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("lycoflow fit: error:")]


@pytest.mark.parametrize("fault", ["adapter", "checkpoint"])
def test_disk_full_while_saving_is_one_message_and_keeps_the_files_saved_before(fault, tiny, tmp_path):
    run, staging = tmp_path / "run", tmp_path / "staging"
    staging.mkdir()
    # Epoch 1 saves its adapter file and the checkpoint; epoch 2 saves an adapter file (every epoch) and then the
    # checkpoint, or (every 5 epochs, of 3) the checkpoint only.
    every = 1 if fault == "adapter" else 5
    fit(tiny, run, "--trainer.max_epochs=1", *QUICK, callbacks(every))
    before = digests(run)
    assert set(before) == {"adapters/epoch=1.safetensors", "checkpoints/last.ckpt"}
    adapter, checkpoint = (run / name for name in ("adapters/epoch=1.safetensors", "checkpoints/last.ckpt"))
    # Room for config.yaml (rewritten at the start), not for the adapter file (or, every 5, the checkpoint).
    limit = adapter.stat().st_size // 2 if fault == "adapter" else checkpoint.stat().st_size // 2
    assert (run / "config.yaml").stat().st_size < limit

    result = lycoflow_fit(tiny, run, f"--trainer.max_epochs={2 if fault == 'adapter' else 3}", *QUICK,
                          callbacks(every), "--ckpt_path=last", env={"TMPDIR": str(staging)},
                          file_size_limit=limit)

    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    if fault == "adapter":
        message = (f"could not write adapter file {run}/adapters/epoch=2.safetensors: the disk is full or the file "
                   "is over the size limit (File too large); the adapter files and the checkpoint saved before are "
                   "intact: free some space, then resume with --ckpt_path last")
    else:
        message = (f"could not write checkpoint {run}/checkpoints/last.ckpt: the disk is full or the file is over "
                   "the size limit (File too large); the previous last.ckpt and the adapter files are intact: free "
                   "some space, then resume with --ckpt_path last")
    assert error_lines(result.stderr) == [f"lycoflow fit: error: {message}"], result.stderr[-3000:]
    assert digests(run) == before  # nothing half-written, nothing replaced, nothing added
    assert temp_files(run, staging) == []
    # Once there is room again, the run resumes from epoch 1's checkpoint.
    resumed = fit(tiny, run, "--trainer.max_epochs=2", *QUICK, callbacks(every), "--ckpt_path=last")
    assert resumed.trainer.global_step == 2


def test_a_full_run_folder_while_the_checkpoint_moves_in_leaves_no_temporary_file(tiny, tmp_path, monkeypatch):
    # Lightning writes the checkpoint into the temporary folder, then moves it beside last.ckpt; from another disk
    # that is a copy (os.sendfile), which is where a full run folder fails, after writing part of it: the partial
    # checkpoints/.last.ckpt.tmp was left behind before.
    run, staging = tmp_path / "run", tmp_path / "staging"
    staging.mkdir()
    fit(tiny, run, "--trainer.max_epochs=1", *QUICK, callbacks(5))
    before = digests(run)
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    real_rename, real_sendfile = os.rename, os.sendfile
    written = []

    def rename(src, dst, *args, **kwargs):
        if Path(dst).name == ".last.ckpt.tmp":  # as from another disk
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), src, None, dst)
        return real_rename(src, dst, *args, **kwargs)

    def sendfile(out_fd, in_fd, offset, count):
        if Path(os.readlink(f"/proc/self/fd/{out_fd}")).name != ".last.ckpt.tmp":
            return real_sendfile(out_fd, in_fd, offset, count)
        if offset:  # the disk fills up after the first 4 KiB
            written.append(os.fstat(out_fd).st_size)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_sendfile(out_fd, in_fd, offset, min(count, 4096))

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "sendfile", sendfile)
    with pytest.raises(DiskFullError) as caught:
        fit(tiny, run, "--trainer.max_epochs=3", *QUICK, callbacks(5), "--ckpt_path=last")
    assert written == [4096]  # the copy really started in the run folder
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(run / "checkpoints" / "last.ckpt")
    assert str(caught.value) == (
        f"could not write checkpoint {run}/checkpoints/last.ckpt: the disk is full (No space left on device); the "
        "previous last.ckpt and the adapter files are intact: free some space, then resume with --ckpt_path last")
    assert digests(run) == before
    assert temp_files(run, staging) == []


def test_atomic_writes_name_the_file_when_the_disk_is_full(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("old\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        with pytest.raises(DiskFullError) as caught, atomic_path(path) as tmp:
            tmp.write_bytes(b"x" * 5000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.EFBIG
    assert str(caught.value) == (f"could not write {path}: the disk is full or the file is over the size limit "
                                 "(File too large)")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]
    # What counts as no room, also from libraries that say it in their message only.
    assert no_room(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
    assert no_room(RuntimeError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")) == \
        errno.EDQUOT
    assert no_room(OSError(errno.EACCES, "Permission denied")) is None
    assert no_room(RuntimeError("killed while saving")) is None


def test_stale_temporary_files_are_removed_at_the_next_start_and_nothing_else(tiny, tmp_path, caplog):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "adapters").mkdir()
    stale = [run / "checkpoints" / ".last.ckpt.tmp", run / "adapters" / ".epoch=5.safetensors.k2x_9qab.tmp",
             run / "checkpoints" / ".config.yaml.a1b2c3d4.tmp"]
    kept = [run / "checkpoints" / "notes.tmp", run / "checkpoints" / "old.ckpt",
            run / "checkpoints" / ".last.ckpt.tmp.bak", run / "adapters" / ".hidden.tmp",
            run / "adapters" / "tmpab12cd34", run / "adapters" / ".epoch=5.safetensors.toolongname.tmp",
            run / ".config.yaml.a1b2c3d4.tmp"]  # the run folder itself is not swept
    for path in stale + kept:
        path.write_bytes(b"partial")
    (run / "adapters" / ".dir.abcdefgh.tmp").mkdir()  # a folder, not a file of ours
    assert [bool(STALE_TEMP.fullmatch(p.name)) for p in stale + kept] == [True] * 3 + [False] * 6 + [True]
    caplog.clear()
    fit(tiny, run, "--trainer.max_epochs=1", *QUICK, callbacks(1))
    assert not any(path.exists() for path in stale)
    assert all(path.read_bytes() == b"partial" for path in kept) and (run / "adapters" / ".dir.abcdefgh.tmp").is_dir()
    lines = [r.getMessage() for r in caplog.records if "left by an interrupted save" in r.getMessage()]
    assert lines == ["removed 3 temporary files left by an interrupted save: adapters/.epoch=5.safetensors.k2x_9qab"
                     ".tmp, checkpoints/.config.yaml.a1b2c3d4.tmp, checkpoints/.last.ckpt.tmp"]
    # A start with nothing stale says nothing.
    caplog.clear()
    fit(tiny, run, "--trainer.max_epochs=2", *QUICK, callbacks(1), "--ckpt_path=last")
    assert "left by an interrupted save" not in caplog.text


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed: connections are refused


def test_unreachable_wandb_waits_briefly_then_logs_offline(tiny, tmp_path):
    run = tmp_path / "run"
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "0123456789abcdef" * 2 + "01234567",
           "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}", "HOME": str(tmp_path / "home"),
           "LYCOFLOW_WANDB_INIT_TIMEOUT": "2"}
    assert len(env["WANDB_API_KEY"]) == 40
    result = lycoflow_fit(tiny, run, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                          "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1", callbacks(1), env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert (run / "adapters" / "epoch=1.safetensors").is_file()  # it trained
    warning = "W&B could not start online ("
    assert output.count(warning) == 1, output[-3000:]
    line = next(line for line in output.splitlines() if warning in line)
    assert f"127.0.0.1:{env['WANDB_BASE_URL'].rsplit(':', 1)[1]}" in line and "waited at most 2 s" in line
    assert f"logging offline into {run / 'wandb'} instead" in line
    # W&B's own wait was bounded by it (its default is 90 s) ...
    online = list((run / "wandb").glob("run-*"))
    assert len(online) == 1
    assert "communicating run to backend with 2.0 second timeout" in (online[0] / "logs" / "debug.log").read_text()
    # ... and the run was written offline into the run folder.
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert f"W&B run written offline to {offline[0]}" in output
    assert "Changes to your `wandb` environment variables will be ignored" not in output


def test_wandb_init_timeout_is_validated():
    from lycoflow.loggers import WandbLogger

    with pytest.raises(ValueError, match="init_timeout=0 must be > 0"):
        WandbLogger(offline=True, init_timeout=0)
    assert WandbLogger(offline=False, init_timeout=3.5)._wandb_init["settings"] == {"init_timeout": 3.5, "quiet": True}
    assert WandbLogger(offline=False, settings={"quiet": False})._wandb_init["settings"]["quiet"] is False
    assert "settings" not in WandbLogger(offline=True)._wandb_init

