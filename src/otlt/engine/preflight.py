"""Check a run's components before anything is read or written.

A typo in ``loss.params``, ``mix.params`` or ``model.name`` is found by building the loss and
the mixer on placeholder class counts and looking the model up (nothing is trained, no data
is read), so it fails in a second with one line instead of after the dataset is decoded and
the run directory made. The built loss's DRW start (its default too, which the config does
not know) is checked against ``optim.epochs`` here, with the config's other epoch knobs
(:func:`otlt.config.check_epoch_knobs`). The trainer calls :func:`check_components` first;
``otlt sweep`` calls it for every point before the first run starts.
"""

from __future__ import annotations

from otlt.config import RunConfig, check_epoch_knobs
from otlt.losses import create_loss
from otlt.mixing.recipe import build_mixer
from otlt.models import check_model


def check_components(cfg: RunConfig) -> None:
    """Raise the :class:`~otlt.errors.OtltError` that building ``cfg``'s model, loss or
    mixer would raise (an unknown name or option, a bad value), on made-up class counts, and
    refuse a DRW start past the run (``loss.params.drw_epoch`` or the loss's default)."""
    k = cfg.num_classes
    check_model(cfg.model.name, k, cfg.model.head)
    counts = list(range(2 * k, k, -1))  # any imbalanced counts do: the options are checked
    loss = create_loss(cfg.loss.name, counts, **cfg.loss.params)
    check_epoch_knobs(cfg, drw_epoch=getattr(loss, "drw_epoch", None))
    build_mixer(cfg, counts)


__all__ = ["check_components"]
