"""Epoch-valued knobs against the run's length ``optim.epochs``.

``train.keep_epochs`` and ``mix.params.plan_epochs`` may count from the end (``-1`` is the last
epoch, ``-4`` the last mixing epoch of the presets' ``skip_last: 3``), so they follow a run that
``--set optim.epochs=N`` shortens; :func:`resolve_epochs` is the one place they become 0-based
epochs. The step milestones and the DRW start are absolute epochs: one the run never reaches
would leave the learning rate or the loss silently unchanged, so :func:`check_epoch_knobs`
refuses every such knob in one line that gives values which fit. The config knows the DRW
start that ``loss.params`` gives; a loss's default start (``drw``: 160) is the loss's to know,
so :func:`otlt.engine.preflight.check_components` checks it with the built loss's
``drw_epoch``, before any data is read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from otlt.config.schema import OptimConfig, RunConfig
from otlt.errors import is_integer, require

PRESET_EPOCHS = OptimConfig().epochs
"""The length the CIFAR presets' schedule is written for (240): the scale of the suggested fix."""


def resolve_epochs(values: Iterable[int], epochs: int) -> tuple[int, ...]:
    """0-based epochs of ``values`` in a run of ``epochs`` (a negative value counts from the
    end: ``-1`` is ``epochs - 1``), sorted and without repeats."""
    return tuple(sorted({int(e) + epochs if e < 0 else int(e) for e in values}))


def mixer_params(cfg: RunConfig) -> dict[str, Any]:
    """``mix.params`` as the mixer takes them: ``plan_epochs`` resolved against the run."""
    params = dict(cfg.mix.params)
    if _epoch_list(params.get("plan_epochs")):
        params["plan_epochs"] = list(resolve_epochs(params["plan_epochs"], cfg.optim.epochs))
    return params


def _epoch_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(is_integer(e) for e in value)


def check_epoch_knobs(cfg: RunConfig, drw_epoch: int | None = None,
                      written_for: int | None = None) -> None:
    """Refuse, in one line with a fix, every milestone (``schedule: step``), DRW start, kept or
    plan epoch that a run of ``optim.epochs`` never reaches.

    The DRW start is ``drw_epoch`` when given (the built loss's, its default included), else
    ``loss.params.drw_epoch``. The fix scales the knobs by ``optim.epochs / written_for``:
    ``written_for`` is the length the config file gave before ``--set`` changed it (30 for a
    ``_short`` preset); without it, the presets' 240."""
    n = cfg.optim.epochs
    absolute = {"optim.milestones": list(cfg.optim.milestones)
                if cfg.optim.schedule == "step" else []}
    start = drw_epoch if drw_epoch is not None else cfg.loss.params.get("drw_epoch")
    if is_integer(start):
        absolute["loss.params.drw_epoch"] = [start]
    relative = {"train.keep_epochs": list(cfg.train.keep_epochs)}
    plan = cfg.mix.params.get("plan_epochs")
    if _epoch_list(plan):
        relative["mix.params.plan_epochs"] = list(plan)
    bad_abs = {k: v for k, v in absolute.items() if any(e >= n for e in v)}
    bad_rel = {k: v for k, v in relative.items() if any(not -n <= e < n for e in v)}
    if not bad_abs and not bad_rel:
        return
    ref = max([written_for or PRESET_EPOCHS]
              + [e + 1 for v in (*absolute.values(), *relative.values()) for e in v])
    named = [_setting(k, v) for k, v in (*bad_abs.items(), *bad_rel.items())]
    fixes = [f"--set {_setting(k, [min(round(e * n / ref), n - 1) for e in v])}"
             for k, v in bad_abs.items()]
    fixes += [f"--set {_setting(k, _from_end(v, n, ref))}" for k, v in bad_rel.items()]
    require(False, f"{', '.join(named)} reach past optim.epochs={n} (epochs count from 0; "
                   f"kept and plan epochs may count from the end, -1 the last): shorten them "
                   f"too, e.g. {' '.join(fixes)} (scaled by {n}/{ref}; the _short presets "
                   f"scale every epoch-valued knob)")


def _from_end(values: list[int], n: int, ref: int) -> list[int]:
    """Each value as an epoch counted from the end of a ``ref``-epoch run, inside ``[-n, -1]``."""
    out: list[int] = []
    for e in values:
        back = min(max(e - ref if e >= 0 else e, -n), -1)
        if back not in out:
            out.append(back)
    return out


def _setting(key: str, values: list[int]) -> str:
    """``key=[a,b]``; ``key=a`` for the one knob that is a single epoch (the DRW start)."""
    if key == "loss.params.drw_epoch":
        return f"{key}={values[0]}"
    return f"{key}=[" + ",".join(str(e) for e in values) + "]"
