"""Where a study lives: an Optuna storage (SQLite, PostgreSQL, MySQL or a journal file), opened with heartbeats.

A running trial marks itself alive every `sweep.heartbeat_s`; one silent for `sweep.grace_s` belongs to a
dead worker, and `on_stale` (research/sweep.py) fails its MLflow run and queues the trial again.
"""

from __future__ import annotations

import time
import warnings

from omegaconf import DictConfig
from optuna.exceptions import ExperimentalWarning
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from research.config import resolve_path
from research.database import open_store
from research.store_url import parse, sqlite_url

HEARTBEAT_ATTR = "heartbeat"  # trial system attr on journal storages: last sign of life (unix time)


def storage_url(cfg: DictConfig) -> str:
    return cfg.sweep.storage or sqlite_url(resolve_path(cfg.out_dir) / "optuna.db")


def open_storage(url: str, sweep_cfg, on_stale) -> RDBStorage | JournalStorage:
    """A journal file, or any SQLAlchemy URL (SQLite, PostgreSQL, MySQL), with heartbeats so dead workers' trials get failed."""
    heartbeat = {"heartbeat_interval": sweep_cfg.heartbeat_s, "grace_period": sweep_cfg.grace_s, "heartbeat_stale_trial_callback": on_stale}

    def storage() -> RDBStorage | JournalStorage:
        if (store := parse(url)).kind == "journal":  # a journal file that processes on one machine share
            store.path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorageWithHeartbeat(JournalFileBackend(str(store.path)), **heartbeat)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return RDBStorage(url, **heartbeat)

    return open_store(url, storage, "Optuna storage", "fix sweep.storage (is the server up, the database created, the driver installed?)")


class JournalStorageWithHeartbeat(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with the heartbeat its SQL storage has: the last sign of life is a trial system attr."""

    def __init__(self, backend, heartbeat_interval: int, grace_period: int, heartbeat_stale_trial_callback):
        super().__init__(backend)
        self.heartbeat_interval, self.grace_period, self.on_stale = heartbeat_interval, grace_period, heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [t._trial_id for t in running if now - t.system_attrs.get(HEARTBEAT_ATTR, t.datetime_start.timestamp()) > self.grace_period]

    def get_heartbeat_interval(self) -> int:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.on_stale
