"""Speed harness (``otlt bench``): what ERM, CMO and OTmix cost per training step, as ratios.

Everything is timed through the engine's own code: a :class:`otlt.engine.trainer.Trainer` is
built from a config and its ``_train_step`` is called with mixing off (ERM) or on, with the
mixer set to CMO or to OTMix with ``ot_probability = 1`` (an OT epoch, every batch mixed).
Beside these, the harness times the floors and parts that explain the ratios:

- ``model_only``: forward + loss + backward + SGD step on a pre-made batch (the floor for this
  model and device; ERM / model_only is the engine's overhead);
- ``data``: one batch's sampling and augmentation (gather + pad-crop-flip + normalise);
- ``fore_data``: the class-weighted foreground draw and its augmentation (CMO and OTmix);
- ``features``: OTmix's no-grad feature pass over the ``2B`` foreground + background images;
- ``pairing``: the OTMix call with features given (cost eq. 7, Sinkhorn eq. 4, partner choice
  eq. 8, paste eq. 9 and the mixer's statistics), i.e. OTmix minus the network;
- ``reweight``: one stage-2 step of OT re-weighting, when :mod:`otlt.reweight` provides
  ``OTReweighter``.

Variants are interleaved (ABCABC...) over the repeats, so background load hits them alike;
each sample times ``steps`` consecutive steps after warm-up. Ratios are medians of the
per-repeat (paired) ratios; times are medians, with the min and max as the spread.
``run_scaling`` times Sinkhorn and exact assignment for ``B = 64 .. 1024`` and the OTmix step
for batch sizes ``64 .. 512``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from otlt.amp import autocast
from otlt.config import (
    DATASET_DEFAULTS,
    RunConfig,
    apply_overrides,
    build_config,
    load_raw,
    preset_path,
)
from otlt.data.longtail import long_tailed_counts
from otlt.data.prepare import LongTailedData
from otlt.data.types import ImageArrays
from otlt.errors import require

DEFAULT_PRESET = "cifar10_lt_r100_erm"
SCALING_OT_SIZES = (64, 128, 256, 512, 1024)
SCALING_STEP_SIZES = (64, 128, 256, 512)

#: Targets of the performance issue (CPU, ResNet-32, batch 128): result key -> upper bound.
TARGETS = {
    "ratio_cmo_erm": 1.10,
    "ratio_otmix_erm_epoch": 1.45,
    "pairing_share_of_otmix_step": 0.03,
    "data_share_of_erm_step": 0.05,
    "ratio_erm_model_only": 1.10,
}

#: Table 9 of the OTmix paper (one GPU, CIFAR-LT-10, seconds per epoch): ERM 2.85,
#: ERM+CMO 3.35, ERM+OTmix 4.59.
PAPER_TABLE9 = {"ratio_cmo_erm": 3.35 / 2.85, "ratio_otmix_erm": 4.59 / 2.85}


@dataclass(frozen=True)
class BenchOptions:
    """What to time and how precisely.

    ``steps``, ``repeats`` and ``warmup`` default to 1 / 3 / 1 with ``quick`` and
    3 / 7 / 2 otherwise. ``overrides`` are ``key=value`` config overrides. ``compile`` adds
    ``erm_compiled`` and ``otmix_compiled``: the same steps through ``torch.compile`` of the
    same model, interleaved with the eager ones (ratio ``ratio_compiled_erm``).
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

    def resolved(self) -> tuple[int, int, int]:
        """``(steps, repeats, warmup)`` after the quick/default presets."""
        steps, repeats, warmup = (1, 3, 1) if self.quick else (3, 7, 2)
        out = tuple(default if given is None else given for given, default in
                    ((self.steps, steps), (self.repeats, repeats), (self.warmup, warmup)))
        require(out[0] >= 1 and out[1] >= 1 and out[2] >= 0,
                f"--steps and --repeats must be >= 1 and --warmup >= 0, got steps={out[0]}, "
                f"repeats={out[1]}, warmup={out[2]}")
        return out


# ----------------------------------------------------------------------------- setup


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


class _FixedFeatures(torch.nn.Module):
    """A stand-in model whose ``features`` returns precomputed ``(N, D)`` features, so that
    OTMix's call can be timed without the network."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.z = features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.z


class Bench:
    """One trainer and the timed callables (each runs one step of its variant)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, data: LongTailedData):
        from otlt.engine.trainer import Trainer, step_lr
        from otlt.mixing import create_mixer

        self.trainer = t = Trainer(cfg, run_dir=run_dir, data=data)
        self.device = t.device
        self.threads_reason = "torch default"
        # The warm-up learning rate of the first step: a fresh model at lr 0.1 on random
        # labels can blow up, and non-finite values would time differently on some CPUs.
        for group in t.optimizer.param_groups:
            group["lr"] = step_lr(cfg, 0, 0, 1000)
        counts = t.train_counts
        self.cmo = create_mixer("cmo", class_counts=counts, alpha=1.0)
        self.otmix = create_mixer("otmix", class_counts=counts, ot_probability=1.0)
        self.otmix.set_epoch(0, cfg.optim.epochs, generator=t.generator)
        self.otmix.update_confusion(trained_like_confusion(t.num_classes, t.generator))
        self.order = torch.cat(t._batches())
        self.cursor = 0
        self.batch_size = cfg.optim.batch_size
        self._make_fixed_batches()

    def next_idx(self, batch_size: int | None = None) -> torch.Tensor:
        """The next full batch of training indices (cycling over the epoch's order)."""
        b = batch_size or self.batch_size
        n = len(self.trainer.train)
        start = (self.cursor * b) % max(n - b + 1, 1)
        self.cursor += 1
        if n < b:
            return self.order.repeat(math.ceil(b / n))[:b]
        return self.order[start:start + b]

    def _augmented(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.trainer
        idx = idx.to(self.device)
        return t.augment(t.train.images[idx], t.generator), t.train.labels[idx]

    def _make_fixed_batches(self, batch_size: int | None = None) -> None:
        t = self.trainer
        self.x, self.y = self._augmented(self.next_idx(batch_size))
        if t.cfg.train.channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        fidx = self._fore_idx(len(self.y))
        self.xf, self.yf = self._augmented(fidx)
        z = self.otmix.features(t.model, torch.cat([self.xf, self.x]), t.amp_dtype)
        self.stub = _FixedFeatures(z)

    def _fore_idx(self, batch_size: int) -> torch.Tensor:
        t = self.trainer
        return torch.multinomial(t.fore_weights, batch_size, replacement=True,
                                 generator=t.generator)

    def set_batch_size(self, batch_size: int) -> None:
        """Use ``batch_size`` for the following steps (scaling study)."""
        self.batch_size = batch_size
        self._make_fixed_batches(batch_size)

    # ---- timed callables ----------------------------------------------------------------
    def model_only(self) -> None:
        """Forward, loss, backward, SGD step on the pre-made batch: the floor."""
        from otlt.losses import batch_loss

        t = self.trainer
        with autocast(self.device, t.amp_dtype):
            logits = t.step_model(self.x)
        loss = batch_loss(t.loss, logits, self.y)
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.optimizer.step()

    def data(self) -> None:
        """The data part of ``Trainer._train_step``: gather and augment one batch."""
        self._augmented(self.next_idx())

    def fore_data(self) -> None:
        """The data part CMO/OTmix add: the class-weighted draw and its augmentation."""
        self._augmented(self._fore_idx(self.batch_size))

    def erm(self) -> None:
        self.trainer.mixer = None
        self.trainer._train_step(self.next_idx(), mixing=False)

    def cmo_step(self) -> None:
        self.trainer.mixer = self.cmo
        self.trainer._train_step(self.next_idx(), mixing=True)

    def otmix_step(self) -> None:
        self.trainer.mixer = self.otmix
        self.trainer._train_step(self.next_idx(), mixing=True)

    def compiled(self, step: Callable[[], None]) -> Callable[[], None]:
        """``step`` with the trainer's forward through ``torch.compile`` (same weights)."""
        t = self.trainer
        eager = t.step_model
        fast = torch.compile(t.model)

        def run() -> None:
            t.step_model = fast
            try:
                step()
            finally:
                t.step_model = eager

        return run

    def features(self) -> None:
        """OTmix's no-grad feature pass over the ``2B`` foreground and background images."""
        t = self.trainer
        self.otmix.features(t.model, torch.cat([self.xf, self.x]), t.amp_dtype)

    def pairing(self) -> None:
        """The OTMix call with the features given: cost, Sinkhorn, partners, paste."""
        self.otmix(self.x, self.y, self.xf, self.yf, generator=self.trainer.generator,
                   model=self.stub, amp_dtype=self.trainer.amp_dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def reweight_step(bench: Bench, work: Path) -> Callable[[], None] | None:
    """One step of OT re-weighting's stage 2 (``Stage2Trainer._train_step``), or None when
    :mod:`otlt.reweight` has no ``OTReweighter``.

    Stage 2 starts from the bench model, saved as a finished stage-1 checkpoint, on the same
    data; the step is the weight step (features, cost, Sinkhorn, SGD on ``w``) followed by the
    classifier step of the configured ``reweight.trainable``.
    """
    try:
        from otlt.engine.reweight_trainer import Stage2Trainer
        from otlt.reweight import OTReweighter  # noqa: F401
    except ImportError:
        return None
    from otlt.engine.checkpoint import save_atomic

    t = bench.trainer
    stage1 = work / "stage1.pt"
    save_atomic(t.state_dict(t.cfg.optim.epochs - 1), stage1)
    cfg = dataclasses.replace(t.cfg, name="bench-stage2",
                              reweight=dataclasses.replace(t.cfg.reweight, stage1=str(stage1)))
    s2 = Stage2Trainer(cfg, run_dir=work / "stage2", data=t.data)
    # What Stage2Trainer.train_one_epoch does before its first step.
    s2.prepare_meta()
    s2._sums, s2._steps = torch.zeros(4, device=s2.device), 0
    for group in s2.optimizer.param_groups:
        group["lr"] = t.optimizer.param_groups[0]["lr"]
    return lambda: s2._train_step(bench.next_idx(), mixing=False)


# ----------------------------------------------------------------------------- timing


def interleaved_times(variants: dict[str, Callable[[], None]], *, steps: int, repeats: int,
                      warmup: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per step of every variant, one sample per repeat, variants interleaved.

    Each variant first runs ``warmup`` steps (kernel selection, allocator, caches); then every
    repeat times ``steps`` consecutive steps of A, then of B, ... so slow drifts in background
    load spread over all variants alike.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / steps)
    return samples


def summarize_times(samples: list[float]) -> dict[str, Any]:
    """Median, min, max and the samples (seconds per step)."""
    return {"median_s": statistics.median(samples), "min_s": min(samples),
            "max_s": max(samples), "samples_s": samples}


def paired_ratio(num: list[float], den: list[float]) -> dict[str, float]:
    """Median, min and max of the per-repeat ratios ``num[r] / den[r]``."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


# ----------------------------------------------------------------------------- the benchmark


def environment(device: torch.device) -> dict[str, Any]:
    """Device, hardware, library versions and load: what a number needs beside it."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = _cpu_name()
    return {"device": str(device), "hardware": hardware, "torch_version": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "load_average_1m": _load()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def choose_threads(requested: int | None, device: torch.device) -> tuple[int, str]:
    """Torch CPU threads for the bench, and why: as requested, else 1 on a busy CPU, else
    torch's default.

    On a CPU shared with other jobs, torch's threads wait for each other at every operator
    while the scheduler runs someone else: times swing several-fold. One thread is steadier.
    """
    if requested is not None:
        require(requested >= 1, f"--threads must be >= 1, got {requested}")
        return requested, "requested"
    load, cores = _load(), os.cpu_count() or 1
    if device.type == "cpu" and cores > 1 and load is not None and load > 0.5 * cores:
        return 1, f"auto: CPU busy (load {load} on {cores} cores)"
    return torch.get_num_threads(), "torch default"


def _open_bench(options: BenchOptions, work: Path) -> tuple[Bench, RunConfig]:
    from otlt.engine.trainer import resolve_device

    cfg = bench_config(options)
    cfg = dataclasses.replace(cfg, name="bench", out_dir=str(work))
    threads, why = choose_threads(options.threads, resolve_device(cfg.train.device))
    torch.set_num_threads(threads)
    if options.synthetic:
        data = synthetic_data(cfg, torch.Generator().manual_seed(cfg.seed))
    else:
        from otlt.data.prepare import prepare_data

        data = prepare_data(cfg.data, cfg.num_classes)
    bench = Bench(cfg, work / "run", data)
    bench.threads_reason = why
    return bench, cfg


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Time every variant and return the JSON-ready result (see the module docstring)."""
    steps, repeats, warmup = options.resolved()
    with tempfile.TemporaryDirectory(prefix="otlt-bench-") as work:
        bench, cfg = _open_bench(options, Path(work))
        variants = {"model_only": bench.model_only, "erm": bench.erm, "cmo": bench.cmo_step,
                    "otmix": bench.otmix_step, "data": bench.data,
                    "fore_data": bench.fore_data, "features": bench.features,
                    "pairing": bench.pairing}
        reweight = reweight_step(bench, Path(work))
        if reweight is not None:
            variants["reweight"] = reweight
        if options.compile:
            variants["erm_compiled"] = bench.compiled(bench.erm)
            variants["otmix_compiled"] = bench.compiled(bench.otmix_step)
        env = {**environment(bench.device), "threads_reason": bench.threads_reason}
        samples = interleaved_times(variants, steps=steps, repeats=repeats, warmup=warmup,
                                    sync=bench.sync)
        stats = bench.otmix.stats
        iters = stats["ot_iters"] / stats["ot_batches"] if stats["ot_batches"] else None
    result = {**env, "load_average_1m_end": _load(),
              "config": options.config, "data": "synthetic" if options.synthetic else
              str(options.data or "found by find_data"),
              "model": cfg.model.name, "batch_size": cfg.optim.batch_size,
              "amp": str(bench.trainer.amp_dtype), "channels_last": cfg.train.channels_last,
              "quick": options.quick, "steps_per_sample": steps, "repeats": repeats,
              "warmup": warmup, "sinkhorn_mean_iters": iters,
              "times": {name: summarize_times(s) for name, s in samples.items()}}
    result.update(derived_ratios(samples, mix_prob=0.5))
    result["targets"] = check_targets(result)
    result["paper_table9"] = PAPER_TABLE9
    return result


def derived_ratios(samples: dict[str, list[float]], mix_prob: float) -> dict[str, Any]:
    """Ratios and shares from the paired samples.

    ``ratio_*_erm`` compare steps where every batch is mixed; ``ratio_*_erm_epoch`` the
    expected epoch when a batch is mixed with probability ``mix_prob`` (the official code's
    0.5): ``1 + mix_prob (ratio - 1)``.
    """
    pairs = {"ratio_cmo_erm": ("cmo", "erm"), "ratio_otmix_erm": ("otmix", "erm"),
             "ratio_erm_model_only": ("erm", "model_only"),
             "pairing_share_of_otmix_step": ("pairing", "otmix"),
             "feature_share_of_otmix_step": ("features", "otmix"),
             "data_share_of_erm_step": ("data", "erm"),
             "ratio_reweight_erm": ("reweight", "erm"),
             "ratio_compiled_erm": ("erm_compiled", "erm"),
             "ratio_compiled_otmix": ("otmix_compiled", "otmix")}
    out: dict[str, Any] = {"spread": {}}
    for key, (num, den) in pairs.items():
        if num not in samples:
            out[key] = None
            continue
        r = paired_ratio(samples[num], samples[den])
        out[key] = r["median"]
        out["spread"][key] = [r["min"], r["max"]]
    out["mix_prob_epoch"] = mix_prob
    for key in ("ratio_cmo_erm", "ratio_otmix_erm"):
        out[f"{key}_epoch"] = 1.0 + mix_prob * (out[key] - 1.0)
    out["reweight_step_s"] = statistics.median(samples["reweight"]) \
        if "reweight" in samples else None
    return out


def check_targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of the issue with the measured value and whether it is met."""
    return {key: {"target": bound, "value": result.get(key),
                  "met": result.get(key) is not None and result[key] <= bound}
            for key, bound in TARGETS.items()}


# ----------------------------------------------------------------------------- scaling


def otmix_like_cost(batch: int, num_classes: int, generator: torch.Generator,
                    device: torch.device) -> torch.Tensor:
    """A ``(B, B)`` OTmix cost (eq. 7, omega = 0.05) from random features and confusion."""
    from otlt.mixing import otmix_cost

    z = torch.randn(2 * batch, 64, generator=generator).relu()
    y = torch.randint(0, num_classes, (2 * batch,), generator=generator)
    confusion = torch.rand(num_classes, num_classes, generator=generator) \
        + 5 * torch.eye(num_classes)
    cost = otmix_cost(z[:batch], z[batch:], y[:batch], y[batch:], confusion, omega=0.05)
    return cost.to(device)


def time_call(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scaling_transport(device: torch.device, sizes: Sequence[int], repeats: int,
                      sync: Callable[[], None]) -> list[dict[str, Any]]:
    """Sinkhorn (eps = 0.01, tol = 1e-6) and exact assignment time per batch size."""
    from otlt.transport import assignment, sinkhorn

    rows = []
    for b in sizes:
        cost = otmix_like_cost(b, 10, torch.Generator().manual_seed(b), device)
        solved = sinkhorn(cost, eps=0.01)
        rows.append({"B": b, "sinkhorn_ms": 1e3 * time_call(
            lambda c=cost: sinkhorn(c, eps=0.01), repeats, sync),
            "sinkhorn_iters": solved.n_iter,
            "assignment_ms": 1e3 * time_call(lambda c=cost: assignment(c), repeats, sync)})
    return rows


def run_scaling(options: BenchOptions, ot_sizes: Sequence[int] = SCALING_OT_SIZES,
                step_sizes: Sequence[int] = SCALING_STEP_SIZES) -> dict[str, Any]:
    """Transport times for ``ot_sizes`` and ERM / OTmix step times for ``step_sizes``."""
    _, repeats, warmup = options.resolved()
    repeats = min(repeats, 5)
    with tempfile.TemporaryDirectory(prefix="otlt-bench-") as work:
        bench, cfg = _open_bench(options, Path(work))
        env = {**environment(bench.device), "threads_reason": bench.threads_reason}
        transport = scaling_transport(bench.device, ot_sizes, max(repeats, 3), bench.sync)
        steps = []
        for b in step_sizes:
            bench.set_batch_size(b)
            s = interleaved_times({"erm": bench.erm, "otmix": bench.otmix_step,
                                   "pairing": bench.pairing, "features": bench.features},
                                  steps=1, repeats=repeats, warmup=max(warmup, 1),
                                  sync=bench.sync)
            med = {k: statistics.median(v) for k, v in s.items()}
            steps.append({"B": b, "erm_ms": 1e3 * med["erm"], "otmix_ms": 1e3 * med["otmix"],
                          "ratio_otmix_erm": paired_ratio(s["otmix"], s["erm"])["median"],
                          "features_ms": 1e3 * med["features"],
                          "pairing_ms": 1e3 * med["pairing"],
                          "pairing_share": paired_ratio(s["pairing"], s["otmix"])["median"]})
    return {**env, "load_average_1m_end": _load(), "config": options.config,
            "model": cfg.model.name, "amp": str(bench.trainer.amp_dtype),
            "data": "synthetic" if options.synthetic else str(options.data or "find_data"),
            "repeats": repeats, "transport": transport, "otmix_step": steps}


# ----------------------------------------------------------------------------- output


def _fmt(value: float | None, pattern: str = "{:.3f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def format_table(result: dict[str, Any]) -> str:
    """The human-readable table of :func:`run_bench`'s result."""
    erm = result["times"]["erm"]["median_s"]
    lines = [f"otlt bench: {result['model']} batch {result['batch_size']} on "
             f"{result['device']} ({result['hardware']}, {result['threads']} threads "
             f"[{result['threads_reason']}], amp "
             f"{result['amp']}), torch {result['torch_version']}, load "
             f"{result['load_average_1m']} -> {result['load_average_1m_end']}",
             f"{result['repeats']} interleaved repeats x {result['steps_per_sample']} steps, "
             f"{result['warmup']} warm-up; ms per step",
             f"{'variant':<16}{'median':>10}{'min':>10}{'max':>10}{'/ ERM':>8}"]
    for name, t in result["times"].items():
        lines.append(f"{name:<16}{1e3 * t['median_s']:>10.1f}{1e3 * t['min_s']:>10.1f}"
                     f"{1e3 * t['max_s']:>10.1f}{t['median_s'] / erm:>8.3f}")
    lines.append("")
    lines.append(f"{'ratio / share':<30}{'median':>8}{'spread':>18}{'target':>8}  met")
    for key in ("ratio_cmo_erm", "ratio_otmix_erm", "ratio_cmo_erm_epoch",
                "ratio_otmix_erm_epoch", "ratio_erm_model_only", "pairing_share_of_otmix_step",
                "feature_share_of_otmix_step", "data_share_of_erm_step", "ratio_reweight_erm",
                "ratio_compiled_erm", "ratio_compiled_otmix"):
        spread = result["spread"].get(key)
        target = result["targets"].get(key)
        spread_text = "" if spread is None else f"[{spread[0]:.3f}, {spread[1]:.3f}]"
        bound = "" if target is None else f"{target['target']:.2f}"
        met = "" if target is None else ("yes" if target["met"] else "NO")
        lines.append(f"{key:<30}{_fmt(result.get(key)):>8}{spread_text:>18}{bound:>8}  {met}")
    iters = _fmt(result["sinkhorn_mean_iters"], "{:.0f}")
    lines.append(f"(*_epoch: a batch mixed with probability {result['mix_prob_epoch']}; "
                 f"Sinkhorn iterations per OT batch: {iters}; "
                 f"paper Table 9: CMO/ERM {PAPER_TABLE9['ratio_cmo_erm']:.2f}, "
                 f"OTmix/ERM {PAPER_TABLE9['ratio_otmix_erm']:.2f})")
    return "\n".join(lines)


def scaling_markdown(result: dict[str, Any]) -> str:
    """The scaling study as two small Markdown tables."""
    lines = [f"Device {result['device']} ({result['hardware']}, {result['threads']} threads "
             f"[{result.get('threads_reason', '')}]), "
             f"torch {result['torch_version']}, model {result['model']}, amp {result['amp']}, "
             f"load {result['load_average_1m']} -> {result['load_average_1m_end']}; medians "
             f"of {result['repeats']}+ repeats.", "",
             "| B | Sinkhorn ms (ε = 0.01, tol 1e-6) | iterations | assignment ms |",
             "|---:|---:|---:|---:|"]
    for r in result["transport"]:
        lines.append(f"| {r['B']} | {r['sinkhorn_ms']:.1f} | {r['sinkhorn_iters']} | "
                     f"{r['assignment_ms']:.1f} |")
    lines += ["", "| batch | ERM step ms | OTmix step ms | OTmix / ERM | feature pass ms | "
                  "pairing ms | pairing share |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["otmix_step"]:
        lines.append(f"| {r['B']} | {r['erm_ms']:.0f} | {r['otmix_ms']:.0f} | "
                     f"{r['ratio_otmix_erm']:.2f} | {r['features_ms']:.0f} | "
                     f"{r['pairing_ms']:.1f} | {100 * r['pairing_share']:.1f}% |")
    return "\n".join(lines) + "\n"


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write ``result`` as indented JSON (creating the parent folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


def cli_main(args: Any) -> int:
    """``otlt bench``: run the benchmark (or ``--scaling``), print tables, write JSON."""
    options = BenchOptions(config=args.config, overrides=tuple(args.overrides),
                           data=args.data, synthetic=args.synthetic, quick=args.quick,
                           batch_size=args.batch_size, device=args.device,
                           threads=args.threads, steps=args.steps, repeats=args.repeats,
                           warmup=args.warmup, compile=args.compile)
    if args.scaling:
        result = run_scaling(options)
        text = scaling_markdown(result)
        Path(args.markdown).write_text(text)
        print(text, end="")
        print(f"otlt: wrote {args.markdown}")
    else:
        result = run_bench(options)
        print(format_table(result))
    write_json(result, Path(args.json))
    print(f"otlt: wrote {args.json}")
    return 0


__all__ = ["BenchOptions", "cli_main", "format_table", "run_bench", "run_scaling",
           "scaling_markdown"]
