"""The training engine: one epoch loop for every method, exact resume, honest evaluation.

Small datasets live on the training device as uint8 tensors; a step gathers its batch by
index, augments it with one batched gather (:mod:`otlt.data.augment`), optionally mixes it,
and takes an SGD step under autocast. The validation split drives everything during
training (including OTmix's confusion matrix); the test split is evaluated once, at the end.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Sized
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from otlt.config import RunConfig, dump_config, to_dict
from otlt.data.augment import GPUAugment, eval_transform
from otlt.data.prepare import LongTailedData, prepare_data
from otlt.data.samplers import sample_weights
from otlt.data.streams import is_list_dataset
from otlt.engine.checkpoint import load_checkpoint, save_atomic
from otlt.engine.distributed import (
    all_reduce_sum,
    init_from_env,
    is_distributed,
    is_main_process,
    rank,
    unwrap,
    world_size,
)
from otlt.engine.logging import MetricsLogger
from otlt.errors import OtltError, require
from otlt.losses import batch_loss, create_loss
from otlt.metrics import confusion_matrix, summarize
from otlt.mixing import create_mixer
from otlt.models import create_model


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OtltError(f"train.device={name} but no CUDA device is available (use cpu or auto)")
    return torch.device(name)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA and on CPUs with native bf16; fp16 only when asked; None for off."""
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else None


class DeviceSplit:
    """One split as uint8 ``(N, H, W, 3)`` images and ``(N,)`` labels on the device."""

    def __init__(self, arrays, device: torch.device):
        self.images = torch.from_numpy(arrays.images).to(device)
        self.labels = torch.from_numpy(arrays.labels).long().to(device)

    def __len__(self) -> int:
        return len(self.labels)


def step_lr(cfg, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate at a step: linear warm-up, then the step or cosine schedule."""
    o = cfg.optim
    progress = epoch + step / steps_per_epoch
    if o.warmup_epochs and progress < o.warmup_epochs:
        return o.lr * (progress + 1 / steps_per_epoch) / o.warmup_epochs
    if o.schedule == "cosine":
        span = max(o.epochs - o.warmup_epochs, 1)
        return 0.5 * o.lr * (1 + math.cos(math.pi * (progress - o.warmup_epochs) / span))
    factor = 1.0
    for milestone, gamma in zip(o.milestones, o.gammas, strict=True):
        if epoch >= milestone:
            factor = gamma
    return o.lr * factor


def evaluate(model: torch.nn.Module, split: DeviceSplit, num_classes: int, batch_size: int,
             amp_dtype: torch.dtype | None, channels_last: bool) -> torch.Tensor:
    """Confusion matrix ``(K, K)`` (rows: true class) of ``model`` on a split."""
    batches = ((eval_transform(split.images[start:start + batch_size]),
                split.labels[start:start + batch_size])
               for start in range(0, len(split), batch_size))
    return evaluate_batches(model, batches, num_classes, amp_dtype, channels_last)


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     num_classes: int, amp_dtype: torch.dtype | None,
                     channels_last: bool) -> torch.Tensor:
    """Confusion matrix ``(K, K)`` of ``model`` over ``(x (B, 3, H, W) float, y (B,))``
    batches already on the model's device, in eval mode (train mode is restored)."""
    model.eval()
    preds, labels = [], []
    for x, y in batches:
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
        with _autocast(x.device, amp_dtype):
            preds.append(model(x).argmax(1))
        labels.append(y)
    model.train()
    return confusion_matrix(torch.cat(preds), torch.cat(labels), num_classes).cpu()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def open_run_dir(cfg: RunConfig, run_dir: Path | None, resume: bool) -> Path:
    """Create (or, for resume, check) the run directory without touching an existing run."""
    run_dir = Path(run_dir) if run_dir else Path(cfg.out_dir) / cfg.name
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise OtltError(f"cannot resume: {run_dir / 'last.pt'} does not exist")
        return run_dir
    if (run_dir / "last.pt").exists() or (run_dir / "config.yaml").exists():
        raise OtltError(f"run directory {run_dir} already holds a run; resume it with "
                        f"'otlt train --resume {run_dir}' or choose another name "
                        "(--set name=...)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or exc
        raise OtltError(f"run directory {run_dir} is not writable ({reason})") from None
    return run_dir


class Trainer:
    """Fit one configured run; ``fit()`` returns the final test-split evaluation."""

    def __init__(self, cfg: RunConfig, run_dir: Path | None = None, resume: bool = False,
                 data: LongTailedData | None = None):
        self.cfg = cfg
        self.run_dir = open_run_dir(cfg, run_dir, resume)
        self.device = resolve_device(cfg.train.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        init_from_env(self.device)
        self.amp_dtype = autocast_dtype(cfg.train.amp, self.device)
        self.num_classes = cfg.num_classes
        self.data = data or self._prepare_data()
        self.train_counts = self.data.train_counts
        self._place_data()
        self._build_components()
        self.start_epoch = 0
        if resume:
            self._load_state(load_checkpoint(self.run_dir / "last.pt", self.device))
        elif is_main_process():
            dump_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "splits.json").write_text(json.dumps(
                {"classes": self.data.classes, "counts": self.data.split_counts()}, indent=1))

    def _prepare_data(self) -> Any:
        return prepare_data(self.cfg.data, self.num_classes)

    def _place_data(self) -> None:
        """Put the splits on the training device (small datasets live there as uint8)."""
        self.train = DeviceSplit(self.data.train, self.device)
        self.val = DeviceSplit(self.data.val, self.device) if len(self.data.val) else None
        self.test = DeviceSplit(self.data.test, self.device)

    def _build_components(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.model = create_model(cfg.model.name, self.num_classes, head=cfg.model.head,
                                  generator=torch.Generator().manual_seed(cfg.seed))
        self.model.to(self.device)
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.step_model = torch.compile(self.model) if cfg.train.compile else self.model
        if is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_model = torch.nn.parallel.DistributedDataParallel(self.step_model,
                                                                        device_ids=ids)
        o = cfg.optim
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay, nesterov=o.nesterov)
        self.loss = create_loss(cfg.loss.name, self.train_counts, **cfg.loss.params)
        self.loss.to(self.device)
        self.mixer = None
        if cfg.mix.name != "none":
            # The engine flips the per-batch coin (mix.prob) itself, so a clean batch costs no
            # foreground draw or feature pass; the mixer mixes every batch it is given.
            self.mixer = create_mixer(cfg.mix.name, class_counts=self.train_counts,
                                      fraction=cfg.mix.fraction, **cfg.mix.params)
        self.fore_weights = sample_weights(self.data.train.labels, cfg.mix.sampler_r)
        self.augment = GPUAugment()

    # ---- state -------------------------------------------------------------------------
    def state_dict(self, epoch: int) -> dict[str, Any]:
        state = {"epoch": epoch, "config": to_dict(self.cfg),
                 "model": unwrap(self.model).state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "loss": self.loss.state_dict(),
                 "generator": self.generator.get_state(),
                 "torch_rng": torch.get_rng_state(),
                 "train_counts": list(self.train_counts),
                 "classes": self.data.classes}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.mixer is not None and hasattr(self.mixer, "state_dict"):
            state["mixer"] = self.mixer.state_dict()
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        try:
            unwrap(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.loss.load_state_dict(state["loss"])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if "cuda_rng" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
            if self.mixer is not None and "mixer" in state:
                self.mixer.load_state_dict(state["mixer"])
        except (KeyError, RuntimeError) as exc:
            raise OtltError(f"checkpoint in {self.run_dir} does not match this run's "
                            f"config ({type(exc).__name__}: {str(exc)[:160]})") from None
        self.start_epoch = int(state["epoch"]) + 1

    def save(self, epoch: int) -> None:
        if is_main_process():
            save_atomic(self.state_dict(epoch), self.run_dir / "last.pt")

    # ---- training ----------------------------------------------------------------------
    def _batches(self) -> list[torch.Tensor]:
        """This rank's batches of one epoch: a shared seeded permutation, sharded by rank."""
        order = torch.randperm(len(self.train), generator=self.generator)
        order = order[rank()::world_size()]
        return list(order.split(self.cfg.optim.batch_size))

    def _epoch_batches(self, epoch: int) -> Sized:
        """What :meth:`_train_step` takes, one item per step (here: index tensors)."""
        return self._batches()

    def _mixing_on(self, epoch: int) -> bool:
        m = self.cfg.mix
        last = self.cfg.optim.epochs - m.skip_last
        return self.mixer is not None and m.skip_first <= epoch < last

    def _train_step(self, idx: torch.Tensor, mixing: bool) -> tuple[float, float, int]:
        """One SGD step; returns (summed loss, summed correct, batch size) as floats."""
        idx = idx.to(self.device)
        x = self.augment(self.train.images[idx], self.generator)
        return self._sgd_step(x, self.train.labels[idx], mixing)

    def _sgd_step(self, x: torch.Tensor, y: torch.Tensor,
                  mixing: bool) -> tuple[float, float, int]:
        """Flip the mixing coin, mix, and step on augmented ``x (B, 3, H, W)``, ``y (B,)``."""
        mixed = None
        if mixing and self._mix_coin():
            mixed = self._mix(x, y)
            x = mixed.images
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(self.device, self.amp_dtype):
            logits = self.step_model(x)
        if mixed is None:
            loss = batch_loss(self.loss, logits, y)
            correct = (logits.argmax(1) == y).sum()
        else:
            loss = batch_loss(self.loss, logits, mixed.targets_a, mixed.targets_b, mixed.lam)
            pred = logits.argmax(1)
            correct = (mixed.lam * (pred == mixed.targets_a)
                       + (1 - mixed.lam) * (pred == mixed.targets_b)).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach() * len(y), correct.detach().float(), len(y)

    def _mix_coin(self) -> bool:
        """This step's mixing coin: heads (mix) with probability ``mix.prob``."""
        return torch.rand((), generator=self.generator).item() < self.cfg.mix.prob

    def _mix(self, x: torch.Tensor, y: torch.Tensor):
        """Mix a batch; CMO/OTmix draw their foreground batch from the class-weighted sampler."""
        if not getattr(self.mixer, "needs_partner_batch", False):
            return self.mixer(x, y, generator=self.generator)
        xf, yf = self._foreground(len(y))
        return self.mixer(x, y, xf, yf, generator=self.generator,
                          model=self.model, amp_dtype=self.amp_dtype)

    def _foreground(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An augmented foreground batch of ``n`` images from the class-weighted sampler."""
        fidx = torch.multinomial(self.fore_weights, n, replacement=True,
                                 generator=self.generator).to(self.device)
        return self.augment(self.train.images[fidx], self.generator), self.train.labels[fidx]

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        self.loss.set_epoch(epoch)
        mixing = self._mixing_on(epoch)
        if self.mixer is not None and hasattr(self.mixer, "set_epoch"):
            self.mixer.set_epoch(epoch, self.cfg.optim.epochs, generator=self.generator)
        batches = self._epoch_batches(epoch)
        total_loss = torch.zeros((), device=self.device)
        total_correct = torch.zeros((), device=self.device)
        seen = 0
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}", leave=False,
                   disable=not (self.cfg.train.progress and is_main_process()),
                   file=sys.stderr, dynamic_ncols=True)
        for step, idx in enumerate(bar):
            lr = step_lr(self.cfg, epoch, step, len(batches))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_sum, correct, n = self._train_step(idx, mixing)
            total_loss += loss_sum
            total_correct += correct
            seen += n
        bar.close()
        totals = all_reduce_sum(torch.stack([total_loss, total_correct,
                                             torch.tensor(float(seen), device=self.device)]))
        loss_sum, correct_sum, count = totals.tolist()
        return {"lr": lr, "train_loss": loss_sum / count, "train_acc": 100.0 * correct_sum / count}

    def _summarize(self, confusion: torch.Tensor) -> dict[str, Any]:
        e = self.cfg.eval
        return summarize(confusion, self.train_counts, many=e.many_threshold,
                         few=e.few_threshold)

    def _confusion(self, split: str) -> torch.Tensor | None:
        """Confusion matrix of the current model on ``val`` or ``test`` (None: no such split)."""
        data = self.val if split == "val" else self.test
        if data is None:
            return None
        return evaluate(self.model, data, self.num_classes, self.cfg.train.eval_batch_size,
                        self.amp_dtype, self.cfg.train.channels_last)

    def validate(self) -> tuple[dict[str, Any], torch.Tensor | None]:
        confusion = self._confusion("val")
        if confusion is None:
            return {}, None
        s = self._summarize(confusion)
        record = {"val_acc": s["top1_accuracy"], "val_many_acc": _acc(s["many_error"]),
                  "val_medium_acc": _acc(s["medium_error"]), "val_few_acc": _acc(s["few_error"])}
        return record, confusion

    def fit(self, stop_after: int | None = None) -> dict[str, Any] | None:
        """Train to the configured last epoch (or stop, resumable, after ``stop_after``
        epochs in total) and return the final test evaluation (None when stopped early)."""
        cfg = self.cfg
        end = cfg.optim.epochs if stop_after is None else min(stop_after, cfg.optim.epochs)
        logger = MetricsLogger(self.run_dir, self.start_epoch)
        try:
            for epoch in range(self.start_epoch, end):
                start = time.perf_counter()
                record = {"epoch": epoch, **self.train_one_epoch(epoch)}
                val_record, val_confusion = self.validate()
                record.update(val_record)
                if self.mixer is not None and hasattr(self.mixer, "end_epoch"):
                    record.update(self.mixer.end_epoch(val_confusion))
                    self._write_artifacts(self.mixer.pop_artifacts())
                record["epoch_seconds"] = time.perf_counter() - start
                self.save(epoch)
                logger.log(record)
                if is_main_process():
                    print(_epoch_line(record, cfg.optim.epochs), flush=True)
        finally:
            logger.close()
        return self.final_eval() if end == cfg.optim.epochs else None

    def _write_artifacts(self, artifacts: dict[str, Any]) -> None:
        """Write a method's JSON artifacts (e.g. OTmix sample plans) into the run directory."""
        if not is_main_process():
            return
        for name, obj in artifacts.items():
            path = self.run_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(obj))

    def final_eval(self) -> dict[str, Any]:
        """Evaluate the last epoch's weights on the test split and write ``eval.json``."""
        confusion = self._confusion("test")
        result = {"split": "test", "epoch": self.cfg.optim.epochs - 1,
                  "classes": self.data.classes, **self._summarize(confusion)}
        if is_main_process():
            (self.run_dir / "eval.json").write_text(json.dumps(result, indent=1))
        return result


def create_trainer(cfg: RunConfig, run_dir: Path | None = None, resume: bool = False,
                   data: LongTailedData | None = None) -> Trainer:
    """Return the config's trainer: OT re-weighting's stage 2 if ``reweight.stage1`` is set,
    the streaming trainer for list-file datasets (ImageNet-LT, iNaturalist), else
    :class:`Trainer`."""
    if is_list_dataset(cfg.data):
        require(cfg.reweight.stage1 is None, "OT re-weighting stage 2 needs an in-memory "
                "dataset (CIFAR, image folders); list-file datasets are not supported yet")
        from otlt.engine.stream_trainer import StreamTrainer

        return StreamTrainer(cfg, run_dir=run_dir, resume=resume, data=data)
    if cfg.reweight.stage1 is not None:
        from otlt.engine.reweight_trainer import Stage2Trainer

        return Stage2Trainer(cfg, run_dir=run_dir, resume=resume, data=data)
    return Trainer(cfg, run_dir=run_dir, resume=resume, data=data)


def _acc(error: float | None) -> float | None:
    return None if error is None else 100.0 - error


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch'] + 1:>3}/{epochs}", f"lr {record['lr']:.4g}",
             f"loss {record['train_loss']:.3f}", f"train {record['train_acc']:.1f}%"]
    if "val_acc" in record:
        parts.append(f"val {record['val_acc']:.1f}% (many {_fmt(record['val_many_acc'])} "
                     f"med {_fmt(record['val_medium_acc'])} few {_fmt(record['val_few_acc'])})")
    if "ot_batch_fraction" in record:
        parts.append(f"OT batches {100 * record['ot_batch_fraction']:.0f}%")
        if record.get("ot_converged_fraction", 1.0) < 1.0:
            parts.append(f"Sinkhorn converged {100 * record['ot_converged_fraction']:.0f}%")
    parts.append(f"{record['epoch_seconds']:.1f}s")
    return " | ".join(parts)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
