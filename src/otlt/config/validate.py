"""Checks across a config's fields, each failing with a one-line :class:`~otlt.errors.OtltError`
that names the key and the valid values."""

from __future__ import annotations

from otlt.config.epochs import check_epoch_knobs
from otlt.config.schema import (
    AMP_MODES,
    BN_STATS,
    DATASET_DEFAULTS,
    PROFILES,
    REWEIGHT_CHOICES,
    SCHEDULES,
    SELECT_METRICS,
    RunConfig,
)
from otlt.errors import require, require_choice


def is_device_name(name: object) -> bool:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``: what ``train.device`` and ``--device`` take."""
    return isinstance(name, str) and (name in ("auto", "cpu", "cuda") or (
        name.startswith("cuda:") and name[5:].isdigit()))


def validate(cfg: RunConfig, written_for: int | None = None) -> RunConfig:
    """Check value ranges that a type check cannot; return the config unchanged.
    ``written_for``: the run length the config file gave (:func:`check_epoch_knobs`)."""
    d, o = cfg.data, cfg.optim
    # The run directory is out_dir/name: a name with a separator or '..' writes elsewhere.
    require(cfg.name not in ("", ".", "..") and "/" not in cfg.name and "\\" not in cfg.name,
            f"name must be a plain folder name (the run directory is out_dir/name; set "
            f"out_dir for where runs go): no '/' or '\\', not '.' or '..', got {cfg.name!r}")
    require(d.imbalance_ratio >= 1, f"data.imbalance_ratio must be a number >= 1 "
                                    f"(n_max / n_min), got {d.imbalance_ratio}")
    require_choice("data.profile", d.profile, PROFILES)
    require(d.val_per_class >= 0 and d.meta_per_class >= 0,
            "data.val_per_class and data.meta_per_class must be >= 0")
    require(d.num_classes is not None or d.dataset in DATASET_DEFAULTS,
            f"data.num_classes is required for dataset {d.dataset!r} "
            f"(known defaults: {', '.join(DATASET_DEFAULTS)})")
    _validate_eval(cfg)
    require(cfg.train.keep_every >= 0, f"train.keep_every must be >= 0 (0: off), "
                                       f"got {cfg.train.keep_every}")
    require(cfg.train.workers >= 0, f"train.workers must be >= 0, got {cfg.train.workers}")
    require(cfg.train.dist_timeout > 0, f"train.dist_timeout must be > 0 seconds, got "
                                        f"{cfg.train.dist_timeout}")
    require(not cfg.train.float64 or cfg.train.amp in ("auto", "off"),
            f"train.float64 runs without autocast; train.amp={cfg.train.amp} asks for it "
            "(set train.amp=off or auto)")
    require(o.batch_size > 0, f"optim.batch_size must be a positive integer, got {o.batch_size}")
    require(o.epochs > 0, f"optim.epochs must be a positive integer, got {o.epochs}")
    require(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    require(o.momentum >= 0, f"optim.momentum must be >= 0, got {o.momentum}")
    require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    require(o.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {o.warmup_epochs}")
    require(d.n_max is None or d.n_max >= 1,
            f"data.n_max must be >= 1 (the largest class's nominal size), got {d.n_max}")
    require(cfg.train.eval_batch_size > 0,
            f"train.eval_batch_size must be a positive integer, got {cfg.train.eval_batch_size}")
    require_choice("optim.schedule", o.schedule, SCHEDULES)
    require(len(o.milestones) == len(o.gammas),
            f"optim.milestones {list(o.milestones)} and optim.gammas {list(o.gammas)} "
            "must have the same length")
    require(all(g > 0 for g in o.gammas),
            f"optim.gammas must be factors > 0 of optim.lr (a factor <= 0 gives a learning "
            f"rate <= 0), got {list(o.gammas)}")
    check_epoch_knobs(cfg, written_for=written_for)  # milestones, DRW start, kept, plan epochs
    require(0 <= cfg.mix.prob <= 1 and 0 <= cfg.mix.fraction <= 1,
            "mix.prob and mix.fraction must be in [0, 1]")
    for knob in ("prob", "fraction"):  # the engine owns these; one knob lives in one place
        require(knob not in cfg.mix.params, f"mix.params.{knob} is not a mixer parameter: "
                f"the engine owns it; set mix.{knob} instead")
    require(is_device_name(cfg.train.device),
            f"train.device must be auto, cpu or cuda[:N], got {cfg.train.device!r}")
    require_choice("train.amp", cfg.train.amp, AMP_MODES)
    require(cfg.train.bn_stack >= 1, f"train.bn_stack must be >= 1, got {cfg.train.bn_stack}")
    _validate_reweight(cfg)
    return cfg


def _validate_eval(cfg: RunConfig) -> None:
    e = cfg.eval
    require_choice("eval.bn_stats", e.bn_stats, BN_STATS)
    require(e.bn_batches >= 1, f"eval.bn_batches must be >= 1, got {e.bn_batches}")
    require(e.bn_probe_every >= 0, f"eval.bn_probe_every must be >= 0 (0: off), "
                                   f"got {e.bn_probe_every}")
    require_choice("eval.select_metric", e.select_metric, SELECT_METRICS)


def _validate_reweight(cfg: RunConfig) -> None:
    r = cfg.reweight
    for key, allowed in REWEIGHT_CHOICES.items():
        require_choice(f"reweight.{key}", getattr(r, key), allowed)
    require(0 <= r.beta < 1, f"reweight.beta must be in [0, 1), got {r.beta}")
    require(0 <= r.feature_weight <= 1,
            f"reweight.feature_weight must be in [0, 1], got {r.feature_weight}")
    require(r.eps > 0, f"reweight.eps must be > 0, got {r.eps}")
    require(r.max_iter >= 1, f"reweight.max_iter must be >= 1, got {r.max_iter}")
    require(r.weight_lr > 0, f"reweight.weight_lr must be > 0, got {r.weight_lr}")
    require(0 <= r.weight_momentum < 1,
            f"reweight.weight_momentum must be in [0, 1), got {r.weight_momentum}")
    require(r.weight_decay >= 0 and r.meta_coef >= 0,
            "reweight.weight_decay and reweight.meta_coef must be >= 0")
    if r.stage1 is None:
        return
    require(cfg.data.meta_per_class > 0,
            "reweight.stage1 is set (OT re-weighting stage 2) but data.meta_per_class is 0; "
            "the balanced meta set needs >= 1 image per class (the official code uses 10)")
    require(cfg.mix.name == "none",
            f"OT re-weighting stage 2 does not mix batches; set mix.name=none, "
            f"got {cfg.mix.name!r}")
