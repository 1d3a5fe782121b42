"""Choose the trainer a config needs (the one place that knows every trainer class)."""

from __future__ import annotations

from pathlib import Path

from otlt.config import RunConfig
from otlt.data.prepare import LongTailedData
from otlt.data.streams import is_list_dataset
from otlt.engine.reweight_trainer import Stage2Trainer
from otlt.engine.rundir import abandon_run_dir, first_missing
from otlt.engine.runtime import run_dir_path
from otlt.engine.stream_trainer import StreamTrainer
from otlt.engine.trainer import Trainer
from otlt.errors import require


def create_trainer(cfg: RunConfig, run_dir: Path | None = None, resume: bool = False,
                   data: LongTailedData | None = None, evaluate_only: bool = False) -> Trainer:
    """Return the config's trainer: OT re-weighting's stage 2 if ``reweight.stage1`` is set,
    the streaming trainer for list-file datasets (ImageNet-LT, iNaturalist), else
    :class:`Trainer`. ``evaluate_only`` builds it on an existing run directory without
    writing there or loading ``last.pt`` (post-hoc evaluation loads the weights itself). A
    trainer that fails while it is built (bad data, a refused resume) releases the run
    directory's lock (:mod:`~otlt.engine.rundir`) at once, and removes the directory if this
    call made it and nothing but the lock is in it (a refused config leaves no empty run
    directory behind); ``fit`` releases the lock at its end."""
    kwargs = {"run_dir": run_dir, "resume": resume, "data": data,
              "evaluate_only": evaluate_only}
    if is_list_dataset(cfg.data):
        require(cfg.reweight.stage1 is None, "OT re-weighting stage 2 needs an in-memory "
                "dataset (CIFAR, image folders); list-file datasets are not supported yet")
        cls: type[Trainer] = StreamTrainer
    else:
        cls = Trainer if cfg.reweight.stage1 is None else Stage2Trainer
    path = run_dir_path(cfg, run_dir)
    created = None if evaluate_only else first_missing(path)
    try:
        return cls(cfg, **kwargs)
    except BaseException:  # one that failed while building leaves its run directory free
        if not evaluate_only:
            abandon_run_dir(path, created)
        raise


__all__ = ["create_trainer"]
