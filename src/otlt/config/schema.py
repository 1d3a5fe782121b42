"""The run configuration's schema: one frozen dataclass per section, the valid values of its
string options, and the schema's two views (a dict, the README's key list)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

DATASET_DEFAULTS = {"cifar10": (10, 5000), "cifar100": (100, 500), "imagenet_lt": (1000, 1280),
                    "inat2018": (8142, 1000)}

# The valid values of the string options with a fixed set: the one home that the validation,
# the command line's choices and the engine read. Mixers, losses and models are registries
# instead (otlt.mixing.list_mixers, otlt.losses.list_losses, otlt.models.list_models), checked
# before any data is read (otlt.engine.preflight).
PROFILES = ("exp", "step")
SCHEDULES = ("step", "cosine")
AMP_MODES = ("auto", "off", "bf16", "fp16")
BN_STATS = ("running", "train", "clean", "balanced")
SELECT_METRICS = ("balanced_acc", "top1_acc", "many_acc", "medium_acc", "few_acc")


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
    cuda_graphs: bool = False  # CUDA only: torch.compile's reduce-overhead mode (CUDA graphs)
    eval_batch_size: int = 1000
    bn_stack: int = 1  # recalibration batches per forward (otlt.engine.stacked_bn); 1: exact
    progress: bool = True
    workers: int = 8
    keep_epochs: tuple[int, ...] = ()
    keep_every: int = 0
    sync_bn: bool = False
    float64: bool = False
    deterministic: bool = False
    dist_timeout: float = 300.0


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
    epoch as a diagnostic of the official protocol (best test epoch, optimistic), under
    ``bn_stats`` like validation; nothing reads it to decide anything.
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
    :mod:`otlt.engine.reweight_stage`.
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
