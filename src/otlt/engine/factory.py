"""Build a run's trainer, leaving no trace of a run that could not be built."""

from __future__ import annotations

from pathlib import Path

from otlt.config import RunConfig
from otlt.data.prepare import LongTailedData
from otlt.engine.rundir import abandon_run_dir, first_missing
from otlt.engine.runtime import run_dir_path
from otlt.engine.trainer import Trainer


def create_trainer(cfg: RunConfig, run_dir: Path | None = None, resume: bool = False,
                   data: LongTailedData | None = None) -> Trainer:
    """The :class:`Trainer` of ``cfg`` (its feed streams list-file datasets, its step is OT
    re-weighting's stage 2 when ``reweight.stage1`` is set). A trainer that fails while it is
    built (bad data, a refused resume) releases the run directory's lock
    (:mod:`~otlt.engine.rundir`) at once, and removes the directory if this call made it and
    nothing but the lock is in it (a refused config leaves no empty run directory behind);
    ``fit`` releases the lock at its end."""
    path = run_dir_path(cfg, run_dir)
    created = first_missing(path)
    try:
        return Trainer(cfg, run_dir=run_dir, resume=resume, data=data)
    except BaseException:  # one that failed while building leaves its run directory free
        abandon_run_dir(path, created)
        raise


__all__ = ["create_trainer"]
