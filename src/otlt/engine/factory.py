"""Choose the trainer a config needs (the one place that knows every trainer class)."""

from __future__ import annotations

from pathlib import Path

from otlt.config import RunConfig
from otlt.data.prepare import LongTailedData
from otlt.data.streams import is_list_dataset
from otlt.engine.reweight_trainer import Stage2Trainer
from otlt.engine.stream_trainer import StreamTrainer
from otlt.engine.trainer import Trainer
from otlt.errors import require


def create_trainer(cfg: RunConfig, run_dir: Path | None = None, resume: bool = False,
                   data: LongTailedData | None = None, evaluate_only: bool = False) -> Trainer:
    """Return the config's trainer: OT re-weighting's stage 2 if ``reweight.stage1`` is set,
    the streaming trainer for list-file datasets (ImageNet-LT, iNaturalist), else
    :class:`Trainer`. ``evaluate_only`` builds it on an existing run directory without
    writing there or loading ``last.pt`` (post-hoc evaluation loads the weights itself)."""
    kwargs = {"run_dir": run_dir, "resume": resume, "data": data,
              "evaluate_only": evaluate_only}
    if is_list_dataset(cfg.data):
        require(cfg.reweight.stage1 is None, "OT re-weighting stage 2 needs an in-memory "
                "dataset (CIFAR, image folders); list-file datasets are not supported yet")
        return StreamTrainer(cfg, **kwargs)
    if cfg.reweight.stage1 is not None:
        return Stage2Trainer(cfg, **kwargs)
    return Trainer(cfg, **kwargs)


__all__ = ["create_trainer"]
