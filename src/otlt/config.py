"""Run configuration: frozen dataclasses, YAML files with inheritance, ``key=value`` overrides.

A config file is YAML with the sections below. ``base: other.yaml`` (relative to the file)
inherits another file and overrides it key by key, so a short CPU twin states only what it
changes. Unknown keys anywhere are errors that list the valid keys.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from otlt.errors import OtltError, require

DATASET_DEFAULTS = {"cifar10": (10, 5000), "cifar100": (100, 500), "imagenet_lt": (1000, 1280),
                    "inat2018": (8142, 1000)}


@dataclass(frozen=True)
class DataConfig:
    """Which images, how imbalanced, and how the balanced splits are carved.

    ``n_max`` is the nominal size of the largest class (the paper's 5000 for CIFAR-10);
    per-class counts follow the profile and are capped by what is left after the
    validation and meta carve-outs (see :func:`otlt.data.longtail.build_splits`).

    List-file datasets (``imagenet_lt``, ``inat2018``, or any dataset with ``train_list``)
    are streamed from ``path`` (the image root) and used as the lists give them: they are
    long-tailed already, so ``imbalance_ratio``, ``profile``, ``n_max`` and the carve-outs do
    not apply (see :mod:`otlt.data.streams`). ``*_list`` paths are relative to ``path``.
    """

    dataset: str = "cifar10"
    path: str | None = None
    num_classes: int | None = None
    n_max: int | None = None
    imbalance_ratio: float = 100.0
    profile: str = "exp"
    val_per_class: int = 50
    meta_per_class: int = 0
    data_seed: int = 0
    image_size: int = 32
    train_list: str | None = None
    val_list: str | None = None
    test_list: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet32"
    head: str = "linear"


@dataclass(frozen=True)
class OptimConfig:
    """SGD and the learning-rate schedule.

    ``schedule: step`` multiplies the base lr by ``gammas[i]`` (absolute factors) once
    ``epoch >= milestones[i]`` (0-based epochs), the OTmix code's 240-epoch schedule by
    default. ``cosine`` anneals to 0 over the run. Both start with ``warmup_epochs`` of linear
    warm-up (per step).
    """

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    nesterov: bool = False
    batch_size: int = 128
    epochs: int = 240
    schedule: str = "step"
    milestones: tuple[int, ...] = (100, 160, 200)
    gammas: tuple[float, ...] = (0.1, 0.01, 0.0001)
    warmup_epochs: int = 0


@dataclass(frozen=True)
class LossConfig:
    """``name`` from :func:`otlt.losses.list_losses`; ``params`` go to its constructor."""

    name: str = "ce"
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MixConfig:
    """Batch mixing and its schedule (official OTmix code: no mixing in the first and last
    three epochs, each batch mixed with probability 0.5).

    ``name`` from :func:`otlt.mixing.list_mixers`; ``params`` go to its constructor.
    ``skip_first``/``skip_last`` epochs are left clean; ``prob`` is the per-batch mixing
    probability, ``fraction`` the per-sample fraction of a mixed batch (paper Table 7).

    ``sampler_r`` sets the foreground (partner) sampler of CMO/OTmix in the notation of the
    OTmix paper's eq. 3, class probability ``q_k ∝ n_k^-r``. The default ``0`` (every class
    equally likely) is what the official CMO and OTmix code do (per-image weight ``1/n_k``);
    the paper's text states ``r = 1`` (``q_k ∝ 1/n_k``, the tail class drawn ~40% of the time
    on CIFAR-10-LT phi=100), which is available as ``sampler_r: 1``. See README.
    """

    name: str = "none"
    params: dict = field(default_factory=dict)
    skip_first: int = 3
    skip_last: int = 3
    prob: float = 0.5
    fraction: float = 1.0
    sampler_r: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    eval_batch_size: int = 1000
    progress: bool = True
    workers: int = 8
    keep_epochs: tuple[int, ...] = ()
    keep_every: int = 0
    sync_bn: bool = False


BN_STATS = ("running", "train", "clean", "balanced")
SELECT_METRICS = ("balanced_acc", "top1_acc", "many_acc", "medium_acc", "few_acc")


@dataclass(frozen=True)
class EvalConfig:
    """How a run is evaluated (the procedure is fixed before the test split is read).

    ``bn_stats`` names the BatchNorm statistics used for every validation number that drives
    checkpoint selection and for the final test evaluation (``running``, ``train``, ``clean``,
    ``balanced``; :mod:`otlt.engine.batchnorm`), recomputed over ``bn_batches`` batches of
    ``optim.batch_size`` drawn from a generator seeded by (seed, epoch), separate from the
    training generator. ``bn_probe_every: N`` logs validation accuracy under all four
    procedures every N epochs (0: off). ``select_metric`` picks ``best.safetensors`` on
    validation (ties go to the later epoch). ``test_every_epoch`` logs test accuracy each
    epoch as a diagnostic of the official protocol (best test epoch, optimistic); nothing
    reads it to decide anything.
    """

    many_threshold: int = 100
    few_threshold: int = 20
    bn_stats: str = "running"
    bn_batches: int = 20
    bn_probe_every: int = 0
    select_metric: str = "balanced_acc"
    test_every_epoch: bool = False


# Valid values of ReweightConfig's string options (also checked by otlt.reweight).
REWEIGHT_CHOICES = {
    "init": ("class_balanced", "uniform"),
    "cost": ("combined", "label", "feature"),
    "label_distance": ("mse", "binary"),
    "meta": ("prototype", "pixel_prototype", "whole"),
    "trainable": ("fc", "all"),
    "classifier_weights": ("softmax", "raw"),
    "bn": ("frozen", "train_meta"),
}


@dataclass(frozen=True)
class ReweightConfig:
    """OT re-weighting (Guo et al., NeurIPS 2022), stage 2; active when ``stage1`` is set.

    ``stage1`` is the stage-1 (ERM) checkpoint, a ``last.pt`` or its run directory, trained on
    the same data section. Every training example's raw weight starts at its class-balanced
    weight (``init``, ``beta``) and takes one SGD step per batch (``weight_lr``,
    ``weight_momentum``, ``weight_decay``) on the entropic OT loss (``eps``, ``max_iter``)
    between the batch, weighted by softmax(w), and the balanced meta distribution ``meta``:
    ``prototype`` (per-class mean features), ``pixel_prototype`` (features of per-class mean
    images, the official code) or ``whole`` (every meta image). ``cost`` is ``label``,
    ``feature`` or ``combined`` (``feature_weight`` on the feature term); ``label_distance``
    ``mse`` is the official mean squared one-hot difference (2/K between classes), ``binary``
    is 0/1. The classifier step minimises ``sum_i l_i w_i + meta_coef * mean meta loss`` over
    ``trainable`` (``fc``: the final layer, backbone frozen; ``all``) with ``w`` softmax(w_batch)
    (``classifier_weights: softmax``, the paper) or raw (``raw``, the official code), using
    the ``optim`` section. ``bn`` (with ``trainable: fc``): ``frozen`` keeps the backbone's
    BatchNorm in eval mode (ours), ``train_meta`` runs it in train mode for the classifier
    step and forwards the meta set every step (the official code). ``ot_step: false`` skips
    the OT step: the weights stay at their initial values (the ablation "class-balanced
    weights + meta term, nothing learned by OT"). See :mod:`otlt.reweight` and
    :mod:`otlt.engine.reweight_trainer`.
    """

    stage1: str | None = None
    init: str = "class_balanced"
    beta: float = 0.9999
    cost: str = "combined"
    feature_weight: float = 0.5
    label_distance: str = "mse"
    meta: str = "prototype"
    eps: float = 0.1
    max_iter: int = 1000
    weight_lr: float = 0.01
    weight_momentum: float = 0.0
    weight_decay: float = 5e-4
    meta_coef: float = 10.0
    trainable: str = "fc"
    classifier_weights: str = "softmax"
    bn: str = "frozen"
    ot_step: bool = True


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    paper: dict | None = None

    @property
    def num_classes(self) -> int:
        return self.data.num_classes or DATASET_DEFAULTS.get(self.data.dataset, (0, 0))[0]


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise OtltError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise OtltError(f"config {path} is not valid YAML{where}: {problem}") from None
    require(data is not None and data != {}, f"config {path} is empty (a config needs at "
                                             "least a name; see configs/*.yaml)")
    require(isinstance(data, dict), f"config {path} must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "params":
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def presets_dir() -> Path:
    """The folder of the packaged presets (``configs/`` of the checkout, shipped in the wheel
    as ``otlt/presets``)."""
    from importlib.resources import files

    return Path(str(files("otlt") / "presets"))


def list_presets() -> list[str]:
    """Names of the packaged presets (``otlt train --preset NAME``), sorted."""
    folder = presets_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def preset_path(name: str) -> Path:
    """The YAML file of preset ``name`` (a one-line error lists close names)."""
    path = presets_dir() / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        import difflib

        close = difflib.get_close_matches(name, list_presets(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (otlt presets lists them)"
        raise OtltError(f"unknown preset {name!r}{hint}")
    return path


def load_raw(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config and resolve its ``base:`` chain (one path per file, relative to
    the file, acyclic) into one dict."""
    path = Path(path)
    require(path.is_file(), f"config file {path} does not exist (expected a YAML file, "
                            "e.g. configs/cifar10_lt_r100_erm.yaml)")
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, resolved))
        raise OtltError(f"config {path}: the base: chain is a cycle ({cycle})")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    require(isinstance(base, str) and base.strip() != "",
            f"config {path}: base: must be one file path (relative to the config), got {base!r}")
    return _merge(load_raw(path.parent / base, (*_chain, resolved)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], parsed value); the value is read as YAML."""
    require("=" in text, f"override {text!r} must look like key=value (e.g. optim.epochs=30)")
    key, value = text.split("=", 1)
    require(bool(key.strip()), f"override {text!r} has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of ``raw`` with every ``key=value`` override applied."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            require(isinstance(node, dict), f"override {text!r}: {key} is not a section")
        node[keys[-1]] = value
    return raw


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """Check and convert one YAML value to the dataclass field's annotated type."""
    optional = "None" in annotation
    if value is None:
        require(optional, f"config key {where} must not be empty")
        return None
    base = annotation.replace(" | None", "")
    try:
        if base == "bool":
            require(isinstance(value, bool), f"config key {where} must be true or false, "
                                             f"got {value!r}")
            return value
        if base == "int":
            require(not isinstance(value, bool) and float(value) == int(float(value)),
                    f"config key {where} must be an integer, got {value!r}")
            return int(float(value))
        if base == "float":
            require(not isinstance(value, bool), f"config key {where} must be a number, "
                                                 f"got {value!r}")
            out = float(value)
            require(math.isfinite(out), f"config key {where} must be finite, got {value!r}")
            return out
        if base == "str":
            if isinstance(value, bool):  # YAML 1.1 reads a bare off/on as a boolean
                return "on" if value else "off"
            require(isinstance(value, str), f"config key {where} must be a string, got {value!r}")
            return value
        if base.startswith("tuple"):
            require(isinstance(value, (list, tuple)), f"config key {where} must be a list, "
                                                      f"got {value!r}")
            item = "int" if "int" in base else "float"
            return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
        if base == "dict":
            require(isinstance(value, dict), f"config key {where} must be a mapping, "
                                             f"got {value!r}")
            return dict(value)
    except OtltError:
        raise
    except (TypeError, ValueError):
        kind = {"int": "an integer", "float": "a number"}.get(base, base)
        raise OtltError(f"config key {where} must be {kind}, got {value!r}") from None
    return value


def _build(cls: type, raw: dict, where: str) -> Any:
    require(isinstance(raw, dict), f"config section {where or 'root'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise OtltError(f"unknown config key {prefix}{unknown[0]} (valid keys in "
                        f"{where or 'the top level'}: {', '.join(fields)})")
    kwargs = {}
    for name, value in raw.items():
        f = fields[name]
        key = f"{where}.{name}" if where else name
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value or {}, key)
        else:
            kwargs[name] = _coerce(value, str(f.type), key)
    return cls(**kwargs)


def validate(cfg: RunConfig) -> RunConfig:
    """Check value ranges that a type check cannot; return the config unchanged."""
    d, o = cfg.data, cfg.optim
    require(d.imbalance_ratio >= 1, f"data.imbalance_ratio must be a number >= 1 "
                                    f"(n_max / n_min), got {d.imbalance_ratio}")
    require(d.profile in ("exp", "step"), f"data.profile must be 'exp' or 'step', "
                                          f"got {d.profile!r}")
    require(d.val_per_class >= 0 and d.meta_per_class >= 0,
            "data.val_per_class and data.meta_per_class must be >= 0")
    require(d.num_classes is not None or d.dataset in DATASET_DEFAULTS,
            f"data.num_classes is required for dataset {d.dataset!r} "
            f"(known defaults: {', '.join(DATASET_DEFAULTS)})")
    _validate_eval(cfg)
    require(cfg.train.keep_every >= 0, f"train.keep_every must be >= 0 (0: off), "
                                       f"got {cfg.train.keep_every}")
    require(all(0 <= e < o.epochs for e in cfg.train.keep_epochs),
            f"train.keep_epochs must be epochs in [0, {o.epochs - 1}] (counted from 0), "
            f"got {list(cfg.train.keep_epochs)}")
    require(cfg.train.workers >= 0, f"train.workers must be >= 0, got {cfg.train.workers}")
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
    require(o.schedule in ("step", "cosine"), f"optim.schedule must be 'step' or 'cosine', "
                                              f"got {o.schedule!r}")
    require(len(o.milestones) == len(o.gammas),
            f"optim.milestones {list(o.milestones)} and optim.gammas {list(o.gammas)} "
            "must have the same length")
    require(0 <= cfg.mix.prob <= 1 and 0 <= cfg.mix.fraction <= 1,
            "mix.prob and mix.fraction must be in [0, 1]")
    for knob in ("prob", "fraction"):  # the engine owns these; one knob lives in one place
        require(knob not in cfg.mix.params, f"mix.params.{knob} is not a mixer parameter: "
                f"the engine owns it; set mix.{knob} instead")
    require(cfg.train.device in ("auto", "cpu", "cuda") or cfg.train.device.startswith("cuda:"),
            f"train.device must be auto, cpu or cuda[:N], got {cfg.train.device!r}")
    require(cfg.train.amp in ("auto", "off", "bf16", "fp16"),
            f"train.amp must be auto, off, bf16 or fp16, got {cfg.train.amp!r}")
    _validate_reweight(cfg)
    return cfg


def _validate_eval(cfg: RunConfig) -> None:
    e = cfg.eval
    require(e.bn_stats in BN_STATS, f"eval.bn_stats must be one of {', '.join(BN_STATS)}, "
                                    f"got {e.bn_stats!r}")
    require(e.bn_batches >= 1, f"eval.bn_batches must be >= 1, got {e.bn_batches}")
    require(e.bn_probe_every >= 0, f"eval.bn_probe_every must be >= 0 (0: off), "
                                   f"got {e.bn_probe_every}")
    require(e.select_metric in SELECT_METRICS, f"eval.select_metric must be one of "
                                               f"{', '.join(SELECT_METRICS)}, "
                                               f"got {e.select_metric!r}")


def _validate_reweight(cfg: RunConfig) -> None:
    r = cfg.reweight
    for key, allowed in REWEIGHT_CHOICES.items():
        value = getattr(r, key)
        require(value in allowed, f"reweight.{key} must be one of {', '.join(allowed)}, "
                                  f"got {value!r}")
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


def build_config(raw: dict) -> RunConfig:
    """Turn a raw dict into a validated :class:`RunConfig`."""
    if not raw.get("stage2", True):  # the empty placeholder of runs written before `reweight`
        raw = {key: value for key, value in raw.items() if key != "stage2"}
    return validate(_build(RunConfig, raw, ""))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    raw = load_raw(path) if path is not None else {}
    return build_config(apply_overrides(raw, overrides or []))


def config_keys_markdown() -> str:
    """Every config key with its type and default, as the README lists them (a test keeps
    that list and this code in sync)."""
    lines = ["| key | type | default |", "|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if sub is not None and dataclasses.is_dataclass(sub):
                walk(sub, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else \
                (sub() if sub is not None else None)
            shown = "–" if default is None else (yaml.safe_dump(default, default_flow_style=True)
                                                  .strip().removesuffix("...").strip())
            kind = str(f.type).replace("|", "or")
            lines.append(f"| `{prefix}{f.name}` | {kind} | `{shown}` |")

    walk(RunConfig, "")
    return "\n".join(lines)


def to_dict(cfg: RunConfig) -> dict:
    """Plain-dict form of a config (tuples as lists), for YAML and checkpoints."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def dump_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML."""
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
