"""The bench harness: one engine trainer and the timed callables, each one step of a variant."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from otlt.amp import autocast
from otlt.bench.timing import choose_threads
from otlt.config import (
    DATASET_DEFAULTS,
    RunConfig,
    apply_overrides,
    build_config,
    load_raw,
    preset_path,
)
from otlt.data.longtail import long_tailed_counts
from otlt.data.prepare import LongTailedData, prepare_data
from otlt.data.types import ImageArrays
from otlt.engine.checkpoint import save_atomic
from otlt.engine.runtime import resolve_device
from otlt.engine.schedule import step_lr
from otlt.engine.trainer import Trainer
from otlt.errors import require
from otlt.losses import batch_loss
from otlt.mixing import create_mixer
from otlt.models import feature_fn

DEFAULT_PRESET = "cifar10_lt_r100_erm"


@dataclass(frozen=True)
class BenchOptions:
    """What to time and how precisely.

    ``steps``, ``repeats`` and ``warmup`` default to 1 / 3 / 1 with ``quick`` and
    3 / 7 / 2 otherwise. ``overrides`` are ``key=value`` config overrides. ``compile`` adds
    ``erm_compiled`` and ``otmix_compiled``: the same steps through ``torch.compile`` of the
    same model, interleaved with the eager ones (ratio ``ratio_compiled_erm``);
    ``cuda_graphs`` adds ``erm_graphed``, ``cmo_graphed`` and ``otmix_graphed``: the steps of
    ``train.cuda_graphs`` (CUDA only).
    """

    config: str | None = None  # None: the packaged preset DEFAULT_PRESET
    overrides: tuple[str, ...] = ()
    data: str | None = None
    synthetic: bool = False
    quick: bool = False
    batch_size: int | None = None
    device: str | None = None
    threads: int | None = None
    steps: int | None = None
    repeats: int | None = None
    warmup: int | None = None
    compile: bool = False
    cuda_graphs: bool = False

    def resolved(self) -> tuple[int, int, int]:
        """``(steps, repeats, warmup)`` after the quick/default presets."""
        steps, repeats, warmup = (1, 3, 1) if self.quick else (3, 7, 2)
        out = tuple(default if given is None else given for given, default in
                    ((self.steps, steps), (self.repeats, repeats), (self.warmup, warmup)))
        require(out[0] >= 1 and out[1] >= 1 and out[2] >= 0,
                f"--steps and --repeats must be >= 1 and --warmup >= 0, got steps={out[0]}, "
                f"repeats={out[1]}, warmup={out[2]}")
        return out


def bench_config(options: BenchOptions) -> RunConfig:
    """The run config of the benchmark: the given file plus overrides, every batch mixed."""
    raw = load_raw(options.config or preset_path(DEFAULT_PRESET))
    extra = list(options.overrides) + ["mix.prob=1.0", "train.progress=false"]
    if not apply_overrides(raw, extra).get("data", {}).get("meta_per_class"):
        # Stage 2 of OT re-weighting needs a meta set; 10 per class as in the paper.
        extra.append("data.meta_per_class=10")
    if options.data:
        extra.append(f"data.path={options.data}")
    if options.batch_size is not None:
        extra.append(f"optim.batch_size={options.batch_size}")
    if options.device:
        extra.append(f"train.device={options.device}")
    return build_config(apply_overrides(raw, extra))


def synthetic_data(cfg: RunConfig, generator: torch.Generator) -> LongTailedData:
    """Random uint8 images with the config's long-tailed class counts and image size."""
    d = cfg.data
    k = cfg.num_classes
    n_max = d.n_max or DATASET_DEFAULTS.get(d.dataset, (0, 5000))[1]
    counts = long_tailed_counts(k, n_max, d.imbalance_ratio, d.profile)
    classes = [f"class{c}" for c in range(k)]

    def split(per_class: Sequence[int]) -> ImageArrays:
        labels = np.repeat(np.arange(k), per_class).astype(np.int64)
        shape = (len(labels), d.image_size, d.image_size, 3)
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        return ImageArrays(images.numpy(), labels, classes)

    val = split([max(d.val_per_class, 1)] * k)
    meta = split([d.meta_per_class] * k)
    return LongTailedData(split(counts), val, meta, val, list(counts))


def trained_like_confusion(num_classes: int, generator: torch.Generator,
                           accuracy: float = 0.75) -> torch.Tensor:
    """A row-stochastic ``(K, K)`` confusion: ``accuracy`` on the diagonal, the rest spread
    at random over the other classes (a mid-training classifier).

    The bench uses it instead of a validation pass: a freshly initialised model's confusion
    (one predicted class) would make an unrealistic cost, and the pass costs seconds.
    """
    eye = torch.eye(num_classes)
    off = torch.rand(num_classes, num_classes, generator=generator) * (1 - eye)
    return accuracy * eye + (1 - accuracy) * off / off.sum(1, keepdim=True)


class Bench:
    """One trainer and the timed callables (each runs one step of its variant)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, data: LongTailedData):
        self.trainer = t = Trainer(cfg, run_dir=run_dir, data=data)
        self.device = t.device
        self.threads_reason = "torch default"
        # The warm-up learning rate of the first step: a fresh model at lr 0.1 on random
        # labels can blow up, and non-finite values would time differently on some CPUs.
        for group in t.optimizer.param_groups:
            group["lr"] = step_lr(cfg, 0, 0, 1000)
        counts = t.feed.counts
        self.cmo = create_mixer("cmo", class_counts=counts, alpha=1.0)
        self.otmix = create_mixer("otmix", class_counts=counts, ot_probability=1.0)
        self.otmix.set_epoch(0, cfg.optim.epochs, generator=t.generator)
        self.otmix.update_confusion(trained_like_confusion(cfg.num_classes, t.generator))
        t.recipe.mixer = self.otmix
        self.embed = t.recipe.embed_of(t.model, t.amp_dtype, cfg.train.channels_last)
        self.order = torch.cat(list(t.feed.epoch(0, None, t.generator, None).items))
        self.cursor = 0
        self._compiled: dict[bool, torch.nn.Module] = {}
        self._graphed_embed: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.batch_size = cfg.optim.batch_size
        self._make_fixed_batches()

    def next_idx(self, batch_size: int | None = None) -> torch.Tensor:
        """The next full batch of training indices (cycling over the epoch's order)."""
        b = batch_size or self.batch_size
        n = len(self.trainer.feed)
        start = (self.cursor * b) % max(n - b + 1, 1)
        self.cursor += 1
        if n < b:
            return self.order.repeat(math.ceil(b / n))[:b]
        return self.order[start:start + b]

    def _augmented(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.trainer
        return t.feed.gather(idx, t.generator)

    def _make_fixed_batches(self, batch_size: int | None = None) -> None:
        t = self.trainer
        self.x, self.y = self._augmented(self.next_idx(batch_size))
        if t.cfg.train.channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        partner_idx = t.recipe.draw_partners(len(self.y), t.generator)
        self.x_partner, self.y_partner = self._augmented(partner_idx)
        self.fixed_z = self.embed(torch.cat([self.x_partner, self.x]))

    def set_batch_size(self, batch_size: int) -> None:
        """Use ``batch_size`` for the following steps (scaling study)."""
        self.batch_size = batch_size
        self._make_fixed_batches(batch_size)

    # ---- timed callables ----------------------------------------------------------------
    def model_only(self) -> None:
        """Forward, loss, backward, SGD step on the pre-made batch: the floor."""
        t = self.trainer
        with autocast(self.device, t.amp_dtype):
            logits = t.step.step_model(self.x)
        loss = batch_loss(t.loss, logits, self.y)
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.optimizer.step()

    def data(self) -> None:
        """The data part of a training step: gather and augment one batch."""
        self._augmented(self.next_idx())

    def fore_data(self) -> None:
        """The data part CMO/OTmix add: the class-weighted draw and its augmentation."""
        t = self.trainer
        self._augmented(t.recipe.draw_partners(self.batch_size, t.generator))

    def _train_step(self, mixing: bool) -> None:
        t = self.trainer
        t.step(t.feed.batch(self.next_idx(), t.recipe if mixing else None, t.generator,
                            self.embed))

    def erm(self) -> None:
        self.trainer.recipe.mixer = None
        self._train_step(mixing=False)

    def cmo_step(self) -> None:
        """A training step through the run's recipe (coin of ``mix.prob = 1``, class-weighted
        partners, plan) with CMO."""
        self.trainer.recipe.mixer = self.cmo
        self._train_step(mixing=True)

    def otmix_step(self) -> None:
        self.trainer.recipe.mixer = self.otmix
        self._train_step(mixing=True)

    def compiled(self, step: Callable[[], None], graphs: bool = False) -> Callable[[], None]:
        """``step`` with the trainer's forward through ``torch.compile`` (same weights);
        ``graphs``: in ``reduce-overhead`` mode, as ``train.cuda_graphs`` runs it."""
        t = self.trainer
        eager, was_graphed, eager_embed = t.step.step_model, t.step.graphs, self.embed
        if graphs:
            require(self.device.type == "cuda", "--cuda-graphs needs --device cuda")
        if graphs not in self._compiled:  # one compiled module per mode, for every variant
            self._compiled[graphs] = torch.compile(t.model, mode="reduce-overhead") \
                if graphs else torch.compile(t.model)
            if graphs:  # OTmix's feature pass replays its own graph, as in the engine
                self._graphed_embed = feature_fn(t.model, self.otmix.feature_mode,
                                                 t.amp_dtype, t.cfg.train.channels_last,
                                                 graphs=True)
        fast = self._compiled[graphs]
        embed = self._graphed_embed if graphs else eager_embed

        def run() -> None:
            t.step.step_model, t.step.graphs, self.embed = fast, graphs, embed
            try:
                step()
            finally:
                t.step.step_model, t.step.graphs, self.embed = eager, was_graphed, eager_embed

        return run

    def features(self) -> None:
        """OTmix's no-grad feature pass over the ``2B`` partner and base images."""
        self.embed(torch.cat([self.x_partner, self.x]))

    def pairing(self) -> None:
        """The OTMix call with the features given: cost, Sinkhorn, partners, paste."""
        self.otmix(self.x, self.y, self.x_partner, self.y_partner, generator=self.trainer.generator,
                   embed=lambda _images: self.fixed_z)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def reweight_step(bench: Bench, work: Path) -> Callable[[], None]:
    """One step of OT re-weighting's stage 2 (:class:`otlt.engine.reweight_stage.Stage2Step`).

    Stage 2 starts from the bench model, saved as a finished stage-1 checkpoint, on the same
    data; the step is the weight step (features, cost, Sinkhorn, SGD on ``w``) followed by the
    classifier step of the configured ``reweight.trainable``.
    """
    t = bench.trainer
    stage1 = work / "stage1.pt"
    save_atomic(t.state_dict(t.cfg.optim.epochs - 1), stage1)
    cfg = dataclasses.replace(t.cfg, name="bench-stage2",
                              reweight=dataclasses.replace(t.cfg.reweight, stage1=str(stage1)))
    s2 = Trainer(cfg, run_dir=work / "stage2", data=t.feed.data)
    s2.step.start_epoch(s2.generator)
    for group in s2.optimizer.param_groups:
        group["lr"] = t.optimizer.param_groups[0]["lr"]
    return lambda: s2.step(s2.feed.batch(bench.next_idx(), None, s2.generator, None))


def open_bench(options: BenchOptions, work: Path) -> tuple[Bench, RunConfig]:
    """Build the bench of ``options`` in the scratch directory ``work`` (threads set)."""
    cfg = bench_config(options)
    cfg = dataclasses.replace(cfg, name="bench", out_dir=str(work))
    threads, why = choose_threads(options.threads, resolve_device(cfg.train.device))
    torch.set_num_threads(threads)
    if options.synthetic:
        data = synthetic_data(cfg, torch.Generator().manual_seed(cfg.seed))
    else:
        data = prepare_data(cfg.data, cfg.num_classes)
    bench = Bench(cfg, work / "run", data)
    bench.threads_reason = why
    return bench, cfg
