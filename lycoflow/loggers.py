"""W&B logging that never stops training: offline by itself without credentials, and a no-op if W&B fails."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

# Lightning's own rank-zero logger: its console handler prints a message as one line (a warnings.warn also prints
# the line of code that raised it).
_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")


@rank_zero_only
def _warn(message: str) -> None:
    _log.warning(message)


#: Seconds `WandbLogger` waits for the W&B server before logging offline (W&B's own default is 90).
DEFAULT_INIT_TIMEOUT = 10.0


def wandb_credentials() -> bool:
    """Whether an API key is configured (``WANDB_API_KEY`` or ``wandb login``'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1]) \
            is not None
    except (OSError, netrc.NetrcParseError):
        return False


class _Null:
    """Stands in for a W&B run that could not start: every attribute and call does nothing."""

    def __getattr__(self, _: str) -> _Null:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _Null:
        return self


class WandbLogger(_WandbLogger):
    """Lightning's `WandbLogger`, run offline when there is no API key (``WANDB_MODE=offline`` also forces it),
    retried offline when W&B cannot start online, and replaced by a no-op if it cannot start at all — a
    training run never fails because of W&B. Offline runs are written to ``<save_dir>/wandb/offline-run-*``;
    ``wandb sync <that folder>`` uploads them later.

    Starting online waits at most ``init_timeout`` seconds for the W&B server (W&B's own default is 90 s, spent in
    full when it is unreachable), then says so in one warning and logs offline. Online, W&B's greeting ("Currently
    logged in as ...", looked up on the server, another 10 s when it is unreachable) is left out: the run's link
    still shows, and a ``settings=`` given to the logger (``wandb.Settings`` or a mapping) wins over both.

    Args:
        project: W&B project.
        name: run name; None lets W&B pick one (the CLI uses the run folder's name).
        save_dir: where ``wandb/`` is written; None means the Trainer's ``default_root_dir`` (set by the CLI).
        offline: force offline (True) or online (False); None decides from the credentials.
        group: W&B group, to gather runs of one configuration (e.g. the seeds of a sweep cell).
        init_timeout: seconds to wait for the W&B server when starting online; None reads
            ``$LYCOFLOW_WANDB_INIT_TIMEOUT``, else 10.
        **kwargs: passed to Lightning's `WandbLogger` and ``wandb.init`` (tags, entity, notes, ...).
    """

    def __init__(
        self,
        project: str = "lycoflow",
        name: str | None = None,
        save_dir: str | None = None,
        offline: bool | None = None,
        group: str | None = None,
        init_timeout: float | None = None,
        **kwargs: Any,
    ):
        # WANDB_MODE=disabled turns W&B off whatever else is set (Lightning would override it when offline).
        self.disabled = os.environ.get("WANDB_MODE") == "disabled"
        self.no_credentials = offline is None and not self.disabled and not wandb_credentials()
        if offline is None:
            offline = self.no_credentials or os.environ.get("WANDB_MODE") in ("offline", "dryrun")
        offline = offline and not self.disabled
        super().__init__(project=project, name=name, save_dir=save_dir or ".", offline=offline, group=group, **kwargs)
        # Explicit modes: wandb reads WANDB_MODE once per process, so later changes to it would be ignored.
        if offline or self.disabled:
            self._wandb_init["mode"] = "disabled" if self.disabled else "offline"
        if self._wandb_init.get("anonymous") is None:  # wandb >= 0.19 warns about the key even when unset
            self._wandb_init.pop("anonymous", None)
        if init_timeout is None:
            value = os.environ.get("LYCOFLOW_WANDB_INIT_TIMEOUT") or DEFAULT_INIT_TIMEOUT
            try:
                init_timeout = float(value)
            except ValueError:
                raise ValueError(f"LYCOFLOW_WANDB_INIT_TIMEOUT={value!r} is not a number of seconds") from None
        if init_timeout <= 0:
            raise ValueError(f"WandbLogger: init_timeout={init_timeout} must be > 0 (seconds)")
        self.init_timeout = init_timeout
        self._given_settings = self._wandb_init.get("settings")
        if not offline and not self.disabled and (self._given_settings is None or isinstance(self._given_settings,
                                                                                             dict)):
            self._wandb_init["settings"] = {"init_timeout": init_timeout, "quiet": True, **(self._given_settings or {})}

    def bind_run_folder(self, folder: str | Path, save_dir: bool = True, name: bool = True) -> None:
        """Before the run starts: write it into ``folder`` and/or name it after it (the CLI does this for what the
        recipe left unset)."""
        if save_dir:
            self._save_dir = self._wandb_init["dir"] = str(folder)
        if name:
            self._name = self._wandb_init["name"] = Path(folder).resolve().name

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        Path(self._save_dir).mkdir(parents=True, exist_ok=True)
        if self._offline and self.no_credentials:
            rank_zero_info("W&B: no API key found (set WANDB_API_KEY or run `wandb login`); logging offline")
        try:
            return _WandbLogger.experiment.fget(self)
        except Exception as err:  # noqa: BLE001 — any W&B failure (network, auth, service) must not stop training
            if not self._offline and not self.disabled:
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                _warn(f"W&B could not start online ({reason}; waited at most {self.init_timeout:g} s, "
                      "LYCOFLOW_WANDB_INIT_TIMEOUT=seconds waits longer); logging offline into "
                      f"{Path(self._save_dir) / 'wandb'} instead, `wandb sync` uploads it later")
                self._wandb_init["mode"] = "offline"  # wandb has read WANDB_MODE already: only this counts
                self._wandb_init.pop("settings", None)  # offline: W&B's own output as usual
                if self._given_settings is not None:
                    self._wandb_init["settings"] = self._given_settings
                try:
                    # With _offline set, Lightning would also set WANDB_MODE, which wandb then warns it ignores.
                    return _WandbLogger.experiment.fget(self)
                except Exception as err2:  # noqa: BLE001
                    err = err2
                finally:
                    self._offline = True
            rank_zero_warn(f"W&B could not start ({err}); training goes on without W&B logging")
            self._experiment = _Null()
            return self._experiment

    def finalize(self, status: str) -> None:
        super().finalize(status)
        run = self._experiment
        if run is None or isinstance(run, _Null):
            return
        if self.disabled:  # unfinished, it stays wandb.run, which the next logger in this process would take over
            run.finish()
            return
        # wandb may itself have gone offline (no key, no terminal to ask for one): ask the run.
        folder, url, offline = Path(run.dir).parent, run.url, getattr(run, "offline", self._offline)
        run.finish()
        if offline:
            rank_zero_info(f"W&B run written offline to {folder}; upload it with: wandb sync {folder}")
        else:
            rank_zero_info(f"W&B run: {url}")
