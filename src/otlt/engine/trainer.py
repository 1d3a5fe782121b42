"""The training engine: one epoch loop for every method, exact resume, honest evaluation.

Small datasets live on the training device as uint8 tensors; a step gathers its batch by
index, augments it with one batched gather (:mod:`otlt.data.augment`), optionally mixes it,
and takes an SGD step under autocast. The validation split drives everything during
training (including OTmix's confusion matrix); the test split is evaluated once, at the end.

The evaluation procedure (``eval.*``: which model is evaluated, the validation record, the
probe, ``best.safetensors``, ``eval.json``) is
:class:`~otlt.engine.procedure.EvaluationProcedure` (``self.evaluation``); the trainer gives
it the data access, :meth:`Trainer.confusion_on` and :meth:`Trainer.bn_batches`, which the
streaming trainer overrides. The module stays whole (about 440 lines, until issue 31's
feeds take the data access out): the epoch loop, the checkpoint state (``last.pt``: model,
optimizer, loss, generator, mixer) and the data access read and write the same run state.
What needs no run state lives below: :mod:`~otlt.engine.runtime` (device, precision, data
on the device, run directory, RNG states), :mod:`~otlt.engine.rundir` (the run
directory's lock, its stored config),
:mod:`~otlt.engine.schedule`, :mod:`~otlt.engine.evaluation` (confusion matrices,
split records), :mod:`~otlt.engine.batchnorm` (recalibration, its generator and index
batches), :mod:`~otlt.engine.distributed` (ranks, shards, counters),
:mod:`~otlt.engine.checkpoint` and :mod:`otlt.console` (the epoch line).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sized
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from otlt.amp import autocast
from otlt.config import BN_STATS, RunConfig, dump_config, to_dict
from otlt.console import format_epoch
from otlt.data.augment import GPUAugment
from otlt.data.prepare import LongTailedData, prepare_data
from otlt.engine.batchnorm import (
    preserved_batchnorm,
    recalibration_generator,
    recalibration_indices,
)
from otlt.engine.checkpoint import load_checkpoint, save_atomic
from otlt.engine.distributed import (
    all_reduce_counters,
    all_reduce_sum,
    average_buffers,
    global_batches,
    is_main_process,
    on_main_then_share,
    rank_slice,
    setup_process,
    world_size,
)
from otlt.engine.evaluation import evaluate
from otlt.engine.logging import MetricsLogger
from otlt.engine.preflight import check_components
from otlt.engine.procedure import EvaluationProcedure
from otlt.engine.rundir import (
    check_splits,
    check_stored_config,
    claim_run_dir,
    holding,
    write_artifacts,
    write_splits,
)
from otlt.engine.runtime import (
    DeviceSplit,
    autocast_dtype,
    configure_kernels,
    load_optimizer_state,
    place_model,
    resolve_device,
    restore_rng_states,
    rng_states,
    sgd_options,
)
from otlt.engine.schedule import step_lr
from otlt.engine.stability import LossGuard, backward_step, grad_scaler
from otlt.engine.timelimit import TimeLimit
from otlt.engine.weights import keep_epoch_weights, load_model_state
from otlt.errors import OtltError, reason, require
from otlt.losses import batch_loss, create_loss
from otlt.mixing import MixedBatch, Mixer, MixRecipe
from otlt.models import create_model
from otlt.models.features import feature_fn


class Trainer:
    """Fit one configured run; ``fit()`` returns the final test-split evaluation."""

    def __init__(self, cfg: RunConfig, run_dir: Path | None = None, resume: bool = False,
                 data: LongTailedData | None = None, evaluate_only: bool = False):
        self.cfg = cfg
        check_components(cfg)  # a typo in a loss, mixer or model fails before data is read
        # The process group comes first: only rank 0 touches the run directory, and an error
        # there reaches every rank.
        self.device = setup_process(resolve_device(cfg.train.device), cfg.train.dist_timeout)
        world = world_size()
        require(cfg.optim.batch_size % world == 0,
                f"optim.batch_size={cfg.optim.batch_size} is the global batch and must split "
                f"evenly over the {world} processes")
        self.run_dir = on_main_then_share(  # locked for training (rundir.py)
            lambda: claim_run_dir(cfg, run_dir, resume, evaluate_only))
        # Rank 0's file system decides: other nodes need not see the run directory.
        resume = resume and on_main_then_share(lambda: (self.run_dir / "last.pt").is_file())
        configure_kernels(self.device, cfg.train.deterministic)
        # float64 (numerical checks) runs without autocast
        self.amp_dtype = None if cfg.train.float64 else autocast_dtype(cfg.train.amp, self.device)
        self.scaler = grad_scaler(self.amp_dtype, self.device)  # fp16 only
        self.num_classes = cfg.num_classes
        self.data = data or self._prepare_data()
        self.train_counts = self.data.train_counts
        self._place_data()
        if cfg.optim.batch_size > len(self.train) and is_main_process() and not evaluate_only:
            print(f"otlt: warning: optim.batch_size={cfg.optim.batch_size} is larger than the "
                  f"training set ({len(self.train)} images): one step per epoch",
                  file=sys.stderr, flush=True)
        self._build_components()
        self.start_epoch = 0
        if evaluate_only:
            return
        self._resume_note: dict[str, Any] = {}
        if resume:  # rank 0 reads; tensors stay on the CPU (RNG states must)
            self._load_state(on_main_then_share(self._read_checkpoint))
        elif is_main_process():
            dump_config(cfg, self.run_dir / "config.yaml")
            write_splits(self.run_dir, self.data)  # classes, counts, digests

    def _read_checkpoint(self) -> dict[str, Any]:
        """``last.pt`` on the CPU, after checking that ``config.yaml`` is the config ``last.pt``
        was saved with and that the data gives the run's splits."""
        state = load_checkpoint(self.run_dir / "last.pt")
        check_stored_config(state.get("config"), self.cfg, self.run_dir)  # config.yaml edited?
        check_splits(self.run_dir, self.data)  # other images behind the same counts?
        return state

    def record_resume_changes(self, changes: dict[str, Any]) -> None:
        """Note the safe keys a resume changed (``{key: [old, new]}``): written to
        ``config.yaml`` now and, as ``resumed_with``, into the next epoch's record."""
        self._resume_note = {"resumed_with": changes}
        if is_main_process():
            dump_config(self.cfg, self.run_dir / "config.yaml")

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
        self.model, self.step_model = place_model(self.model, cfg.train, self.device)
        o = cfg.optim
        self.optimizer = torch.optim.SGD(self.trainable_parameters(), lr=o.lr,
                                         momentum=o.momentum, weight_decay=o.weight_decay,
                                         nesterov=o.nesterov, **sgd_options(self.device))
        self.loss = create_loss(cfg.loss.name, self.train_counts, **cfg.loss.params)
        self.loss.to(self.device)
        # The window, coin and foreground draw of mix.*: a clean batch costs no foreground
        # draw or feature pass; the mixer mixes every batch it is given.
        self.recipe = MixRecipe.from_config(cfg, self.data.train.labels, self.train_counts)
        self._embeds: dict[str, Any] = {}  # feature functions for context mixers, by mode
        self.augment = GPUAugment()
        self.evaluation = EvaluationProcedure(
            cfg, self.model, self.mixer, self.train_counts, self.data.classes,
            self.run_dir, confusion_on=self.confusion_on, bn_batches=self.bn_batches,
            amp_dtype=self.amp_dtype, has_val=self.val is not None)

    @property
    def mixer(self) -> Mixer | None:
        """The run's mixer (``self.recipe.mixer``; None without one)."""
        return self.recipe.mixer

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer steps: every parameter of the model (a subclass may freeze
        some first, e.g. OT re-weighting's backbone)."""
        return list(self.model.parameters())

    # ---- state -------------------------------------------------------------------------
    def state_dict(self, epoch: int) -> dict[str, Any]:
        state = {"epoch": epoch, "config": to_dict(self.cfg),
                 "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "loss": self.loss.state_dict(),
                 **rng_states(self.generator, self.device),
                 "train_counts": list(self.train_counts),
                 "classes": self.data.classes,
                 "best": self.evaluation.best,
                 "world_size": world_size()}
        mixer_state = self._mixer_state()
        if mixer_state:
            state["mixer"] = mixer_state
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        saved_world = int(state.get("world_size", 1))
        require(saved_world == world_size(),
                f"{self.run_dir} was trained by {saved_world} process(es); resume it with "
                f"the same number (this launch has {world_size()}): the shards, and so the "
                "trajectory, depend on it")
        try:
            load_model_state(self.model, state["model"], f"checkpoint in "
                             f"{self.run_dir} does not fit this run's model")
            load_optimizer_state(self.optimizer, state["optimizer"], self.device)
            self.loss.load_state_dict(state["loss"])
            restore_rng_states(state, self.generator, self.device)
            if self.mixer is not None and "mixer" in state:
                self.mixer.load_state_dict(state["mixer"])
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, TypeError) as exc:
            raise OtltError(f"checkpoint in {self.run_dir} does not match this run's "
                            f"config ({reason(exc)})") from None
        self.start_epoch = int(state["epoch"]) + 1
        self.evaluation.best = state.get("best")

    def save(self, epoch: int) -> None:
        if is_main_process():
            save_atomic(self.state_dict(epoch), self.run_dir / "last.pt")

    # ---- training ----------------------------------------------------------------------
    def _batches(self) -> list[torch.Tensor]:
        """The epoch's global index batches: a seeded permutation every rank draws alike,
        cut into ``optim.batch_size`` (the last one padded to split over the ranks)."""
        order = torch.randperm(len(self.train), generator=self.generator)
        return global_batches(order, self.cfg.optim.batch_size, world_size())

    def epoch_batches(self, epoch: int) -> Sized:
        """What :meth:`train_step` takes, one item per step (here: index tensors)."""
        return self._batches()

    def train_step(self, idx: torch.Tensor, mixing: bool) -> tuple[float, float, int]:
        """One SGD step on this rank's rows of the global batch ``idx``, mixed by the recipe
        (coin, foreground, plan) when ``mixing``; returns (summed loss, summed correct, batch
        size) as floats."""
        x, y = self._gather(idx, self.generator)
        mixed = None
        if mixing:
            mixed = self.recipe.step(x, y, self.generator, size=len(idx),
                                     load=lambda i: self._gather(i, self.generator),
                                     embed=self.embed_for(self.mixer))
        return self.sgd_step(x, y, mixed)

    def _gather(self, idx: torch.Tensor, generator: torch.Generator,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the global batch ``idx``, augmented. Crops and flips are drawn
        for the whole global batch from ``generator``, so every rank's generator stays in
        step; each rank keeps its rows."""
        idx = idx.to(self.device)
        x = self.augment(self.train.images[idx], generator)
        mine = rank_slice(len(idx))
        return x[mine], self.train.labels[idx][mine]

    def sgd_step(self, x: torch.Tensor, y: torch.Tensor,
                 mixed: MixedBatch | None) -> tuple[float, float, int]:
        """Step on augmented ``x (B, 3, H, W)``, ``y (B,)``, or on ``mixed`` (the recipe's
        mix of them) when given."""
        if mixed is not None:
            x = mixed.images
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp_dtype):
            logits = self.step_model(x)
        if mixed is None:
            loss = batch_loss(self.loss, logits, y)
            correct = (logits.argmax(1) == y).sum()
        else:
            loss = batch_loss(self.loss, logits, mixed.targets_a, mixed.targets_b, mixed.lam)
            pred = logits.argmax(1)
            correct = (mixed.lam * (pred == mixed.targets_a)
                       + (1 - mixed.lam) * (pred == mixed.targets_b)).sum()
        backward_step(self.optimizer, loss, self.scaler)
        return loss.detach() * len(y), correct.detach().float(), len(y)

    def embed_for(self, mixer: Mixer | None):
        """The feature function ``(N, 3, H, W) -> (N, D)`` handed to a mixer that uses
        features (OTmix; None for the others): the training model under the run's autocast
        and memory format, in the mixer's ``feature_mode`` (built once per mode)."""
        if mixer is None or not mixer.uses_context:
            return None
        mode = mixer.feature_mode
        if mode not in self._embeds:
            self._embeds[mode] = feature_fn(self.model, mode, self.amp_dtype,
                                            self.cfg.train.channels_last)
        return self._embeds[mode]

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        self.loss.set_epoch(epoch)
        mixing = self.recipe.start_epoch(epoch, self.cfg.optim.epochs, self.generator)
        batches = self.epoch_batches(epoch)
        total_correct = torch.zeros((), device=self.device)
        seen = 0
        guard = LossGuard()  # the steps' losses; a non-finite one stops the run (epoch end)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}", leave=False,
                   disable=not (self.cfg.train.progress and is_main_process()),
                   file=sys.stderr, dynamic_ncols=True)
        for step, idx in enumerate(bar):
            lr = step_lr(self.cfg, epoch, step, len(batches))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_sum, correct, n = self.train_step(idx, mixing)
            guard.update(loss_sum, n)
            if not bar.disable and step % 10 == 0:  # .item() syncs the device: not every step
                bar.set_postfix(loss=f"{float(loss_sum) / n:.3f}", refresh=False)
            total_correct += correct
            seen += n
        bar.close()
        totals = all_reduce_sum(torch.stack([guard.total().to(self.device), total_correct,
                                             torch.tensor(float(seen), device=self.device)]))
        loss_sum, correct_sum, count = totals.tolist()
        guard.check(loss_sum, epoch, self.cfg.optim.epochs, len(batches))
        return {"lr": lr, "train_loss": loss_sum / count, "train_acc": 100.0 * correct_sum / count}

    # ---- evaluation procedure (eval.bn_stats) -------------------------------------------
    def bn_generator(self, epoch: int) -> torch.Generator:
        """The recalibration generator of ``epoch`` (:func:`recalibration_generator`)."""
        return recalibration_generator(self.cfg.seed, epoch)

    def bn_batches(self, mode: str, epoch: int) -> Iterator[torch.Tensor]:
        """``eval.bn_batches`` float input batches ``(B, 3, H, W)`` for procedure ``mode``.

        ``clean``: augmented batches of successive random permutations of the training set;
        ``balanced``: augmented class-balanced draws (every class equally likely); ``train``:
        ``clean`` batches mixed with probability ``mix.prob`` by a copy of the run's mixer
        (its state as now; each mixed batch redraws the mixer's per-epoch switch, e.g.
        OTmix's OT-or-random coin), foregrounds from the run's foreground sampler. As in
        training, every rank draws the same global batches, coins and foregrounds from the
        (seed, epoch) generator and keeps its rows, so every rank issues the same collectives
        (SyncBatchNorm, an OTmix feature pass) and B/W-row batches.
        """
        require(mode in BN_STATS[1:], f"no recalibration batches for bn_stats={mode!r}")
        g = self.bn_generator(epoch)
        indices = recalibration_indices(mode, self.data.train.labels, self.cfg.optim.batch_size,
                                        self.cfg.eval.bn_batches, g)
        recipe = self.recalibration_recipe(mode, epoch)
        with preserved_batchnorm(self.model):  # a feature pass may update BN
            for idx in indices:
                x, y = self._gather(idx, g)
                mixed = None if recipe is None else recipe.step(
                    x, y, g, load=lambda i: self._gather(i, g), size=len(idx),
                    embed=self.embed_for(recipe.mixer))
                yield x if mixed is None else mixed.images

    def recalibration_recipe(self, mode: str, epoch: int) -> MixRecipe | None:
        """The recipe of procedure ``mode``'s batches after ``epoch``: for ``train`` a copy
        of the run's (:meth:`MixRecipe.for_recalibration`); None (clean batches) otherwise."""
        if mode == "train":
            return self.recipe.for_recalibration(epoch, self.cfg.optim.epochs)
        return None

    def confusion_on(self, split: str,
                   model: torch.nn.Module | None = None) -> torch.Tensor | None:
        """Confusion matrix of ``model`` (default: the training model) on ``val`` or ``test``
        (None: no such split)."""
        data = self.val if split == "val" else self.test
        if data is None:
            return None
        return evaluate(model or self.model, data, self.num_classes,
                        self.cfg.train.eval_batch_size, self.amp_dtype,
                        self.cfg.train.channels_last)

    def fit(self, stop_after: int | None = None,
            time_limit: TimeLimit | None = None) -> dict[str, Any] | None:
        """Train to the configured last epoch (or stop, resumable, after ``stop_after``
        epochs in total, or where ``time_limit`` says what comes next would not fit) and
        return the final test evaluation (None when stopped early).
        The record is logged before ``last.pt`` is saved, so no checkpointed epoch lacks one."""
        cfg = self.cfg
        end = cfg.optim.epochs if stop_after is None else min(stop_after, cfg.optim.epochs)
        with holding(self.run_dir):  # the run directory's lock (rundir.py) ends with fit
            logger = MetricsLogger(self.run_dir, self.start_epoch)
            try:
                for epoch in range(self.start_epoch, end):
                    record = self.run_epoch(epoch)
                    logger.log(record)
                    self.save(epoch)
                    if is_main_process():
                        print(format_epoch(record, cfg.optim.epochs), flush=True)
                    if time_limit is not None and time_limit.should_stop(
                            epoch + 1, cfg.optim.epochs, record["epoch_seconds"]):
                        break
            finally:
                logger.close()
            timed_out = time_limit is not None and time_limit.stopped_at is not None
            return self.evaluation.final() if end == cfg.optim.epochs and not timed_out else None

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch, validate under ``eval.bn_stats`` (and probe, and the opt-in test
        diagnostic), keep ``best`` and the kept weights; return the epoch's record."""
        start = time.perf_counter()
        record = {"epoch": epoch, **self._resume_note, **self.train_one_epoch(epoch)}
        self._resume_note = {}
        if not self.cfg.train.sync_bn:
            average_buffers(self.model)  # every rank evaluates and saves one model
        if self.mixer is not None:  # global mix_pairs
            all_reduce_counters(self.mixer.counters(), self.device)
        trained_mixer = self._mixer_state()
        model = None
        if self.val is not None or self.cfg.eval.test_every_epoch:
            bn_start = time.perf_counter()
            model = self.evaluation.model_for(epoch)
            if self.cfg.eval.bn_stats != "running":
                record["bn_seconds"] = time.perf_counter() - bn_start
        val_record, val_confusion = self.evaluation.validate(model)
        record.update(val_record)
        if self.evaluation.probe_due(epoch):
            record.update(self.evaluation.probe(epoch))
        if self.cfg.eval.test_every_epoch:
            record.update(self.evaluation.test_diagnostic(model))
        self.evaluation.select(epoch, record, model, trained_mixer)
        if self.mixer is not None:
            record.update(self.mixer.end_epoch(val_confusion))
            artifacts = self.mixer.pop_artifacts()
            if is_main_process():
                write_artifacts(self.run_dir, artifacts)
        record["epoch_seconds"] = time.perf_counter() - start
        if is_main_process():  # kept/epoch_<NNN> at train.keep_epochs / keep_every
            keep_epoch_weights(self.run_dir, self.cfg.train, self.cfg.optim.epochs, epoch,
                               self.model, trained_mixer)
        return record

    def _mixer_state(self) -> dict[str, Any] | None:
        """The mixer's state as the epoch trained with it (before validation updates it)."""
        state = self.mixer.state_dict() if self.mixer is not None else {}
        return dict(state) if state else None
