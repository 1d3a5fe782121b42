"""The training engine: one epoch loop for every method, exact resume, honest evaluation.

A :class:`Trainer` composes its parts instead of being subclassed: the run's feed
(:mod:`otlt.engine.feed`: where the images come from, on the device or streamed), its mixing
recipe (:class:`otlt.mixing.MixRecipe`: window, coin, partners, mixer), its step
(:mod:`otlt.engine.step`: an SGD step of the classifier, or OT re-weighting's stage 2 from
:mod:`otlt.engine.reweight_stage`) and its evaluation procedure
(:class:`~otlt.engine.procedure.EvaluationProcedure`: which model is evaluated, the validation
record, the probe, ``best.safetensors``, ``eval.json``). What it keeps itself: building them,
the checkpoint state (``last.pt``: model, optimizer, loss, generator, mixer, step), the epoch
loop and the schedule. The validation split drives everything during training (OTmix's
confusion matrix included); the test split is evaluated once, at the end.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from otlt.config import RunConfig, dump_config, to_dict
from otlt.console import format_epoch
from otlt.data.prepare import LongTailedData
from otlt.engine.checkpoint import load_checkpoint, save_atomic
from otlt.engine.distributed import (
    all_reduce_counters,
    all_reduce_sum,
    average_buffers,
    is_main_process,
    on_main_then_share,
    setup_process,
    world_size,
)
from otlt.engine.logging import MetricsLogger
from otlt.engine.preflight import check_components
from otlt.engine.procedure import EvaluationProcedure
from otlt.engine.provenance import record_sitting
from otlt.engine.reweight_stage import Stage2Step, stage1_state, stage2_parameters
from otlt.engine.rundir import (
    check_splits,
    check_stored_config,
    claim_run_dir,
    holding,
    write_artifacts,
    write_splits,
)
from otlt.engine.runtime import (
    autocast_dtype,
    check_step_options,
    configure_kernels,
    load_optimizer_state,
    resolve_device,
    restore_rng_states,
    rng_states,
    run_dir_path,
    sgd_options,
    step_model_for,
)
from otlt.engine.schedule import step_lr
from otlt.engine.stability import LossGuard, grad_scaler
from otlt.engine.step import SGDStep, Step
from otlt.engine.timelimit import TimeLimit
from otlt.engine.weights import keep_epoch_weights, load_model_state
from otlt.errors import OtltError, reason, require
from otlt.losses import create_loss
from otlt.mixing import Mixer


class Trainer:
    """Fit one configured run; ``fit()`` returns the final test-split evaluation.

    ``data``: splits prepared already (in-memory datasets), else read from ``data.path``.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path | None = None, resume: bool = False,
                 data: LongTailedData | None = None):
        self.cfg = cfg
        check_components(cfg)  # a typo in a loss, mixer or model fails before data is read
        stage2 = cfg.reweight.stage1 is not None
        # Read before the run directory is made; a run that died in its first epoch (no
        # last.pt) starts afresh, so from stage 1 again.
        resumed = resume and (run_dir_path(cfg, run_dir) / "last.pt").is_file()
        stage1 = stage1_state(cfg, resumed) if stage2 else None
        # The process group comes first: only rank 0 touches the run directory, and an error
        # there reaches every rank.
        self.device = setup_process(resolve_device(cfg.train.device), cfg.train.dist_timeout)
        check_step_options(cfg.train, self.device)
        world = world_size()
        require(cfg.optim.batch_size % world == 0,
                f"optim.batch_size={cfg.optim.batch_size} is the global batch and must split "
                f"evenly over the {world} processes")
        self.run_dir = on_main_then_share(lambda: claim_run_dir(cfg, run_dir, resume))
        # Rank 0's file system decides: other nodes need not see the run directory.
        resume = resume and on_main_then_share(lambda: (self.run_dir / "last.pt").is_file())
        configure_kernels(self.device, cfg.train.deterministic)
        # float64 (numerical checks) runs without autocast
        self.amp_dtype = None if cfg.train.float64 else autocast_dtype(cfg.train.amp, self.device)
        self.scaler = grad_scaler(self.amp_dtype, self.device)  # fp16 only
        # The feed, the model, the mixing recipe and the evaluation procedure, as otlt eval
        # builds them (no drift between the in-run and the post-hoc numbers).
        self.evaluation = EvaluationProcedure.build(cfg, self.device, self.run_dir,
                                                    self.amp_dtype, data)
        self.feed, self.model = self.evaluation.feed, self.evaluation.model
        self.recipe, self.embed = self.evaluation.recipe, self.evaluation.embed
        if cfg.optim.batch_size > len(self.feed) and is_main_process():
            print(f"otlt: warning: optim.batch_size={cfg.optim.batch_size} is larger than the "
                  f"training set ({len(self.feed)} images): one step per epoch",
                  file=sys.stderr, flush=True)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        o = cfg.optim
        params = stage2_parameters(self.model, cfg.reweight) if stage2 else \
            list(self.model.parameters())
        self.optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay, nesterov=o.nesterov,
                                         **sgd_options(self.device))
        self.loss = create_loss(cfg.loss.name, self.feed.counts, **cfg.loss.params)
        self.loss.to(self.device)
        self.step: Step = Stage2Step(cfg, self.model, self.feed, self.loss, self.optimizer,
                                     self.scaler, self.amp_dtype, stage1) if stage2 else \
            SGDStep(step_model_for(self.model, cfg.train, self.device), self.loss,
                    self.optimizer, self.scaler, self.amp_dtype, cfg.train.channels_last,
                    graphs=cfg.train.cuda_graphs)
        self.start_epoch = 0
        self.finished_before = False
        self._resume_note: dict[str, Any] = {}
        if resume:  # rank 0 reads; tensors stay on the CPU (RNG states must)
            self._load_state(on_main_then_share(self._read_checkpoint))
        elif is_main_process():
            dump_config(cfg, self.run_dir / "config.yaml")
            write_splits(self.run_dir, self.feed.data)  # classes, counts, digests
        self.evaluation.recover_best()  # a pending best of an earlier process: keep or drop

    @property
    def mixer(self) -> Mixer | None:
        """The run's mixer (``self.recipe.mixer``; None without one)."""
        return self.recipe.mixer

    def _read_checkpoint(self) -> dict[str, Any]:
        """``last.pt`` on the CPU, after checking that ``config.yaml`` is the config ``last.pt``
        was saved with and that the data gives the run's splits."""
        state = load_checkpoint(self.run_dir / "last.pt")
        check_stored_config(state.get("config"), self.cfg, self.run_dir)  # config.yaml edited?
        check_splits(self.run_dir, self.feed.data)  # other images behind the same counts?
        return state

    def record_resume_changes(self, changes: dict[str, Any]) -> None:
        """Note the safe keys a resume changed (``{key: [old, new]}``): written to
        ``config.yaml`` now and, as ``resumed_with``, into the next epoch's record."""
        self._resume_note = {"resumed_with": changes}
        if is_main_process():
            dump_config(self.cfg, self.run_dir / "config.yaml")

    # ---- state -------------------------------------------------------------------------
    def state_dict(self, epoch: int) -> dict[str, Any]:
        state = {"epoch": epoch, "config": to_dict(self.cfg),
                 "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "loss": self.loss.state_dict(),
                 **rng_states(self.generator, self.device),
                 "train_counts": list(self.feed.counts),
                 "classes": self.feed.classes,
                 "best": self.evaluation.best,
                 "world_size": world_size(),
                 **self.step.state_dict()}
        mixer_state = self._mixer_state()
        if mixer_state:
            state["mixer"] = mixer_state
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        saved_world = int(state.get("world_size", 1))
        # A finished run with its eval.json trains nothing more: any launch may show it.
        finished = int(state["epoch"]) + 1 >= self.cfg.optim.epochs
        require(saved_world == world_size() or (
                    finished and self.evaluation.stored_final() is not None),
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
            self.step.load_state_dict(state)
        except (KeyError, RuntimeError, TypeError) as exc:
            raise OtltError(f"checkpoint in {self.run_dir} does not match this run's "
                            f"config ({reason(exc)})") from None
        self.start_epoch = int(state["epoch"]) + 1
        self.evaluation.best = state.get("best")

    def save(self, epoch: int) -> None:
        """``last.pt`` (atomic), then the epoch's new best if any, then the step's own files,
        on rank 0."""
        if is_main_process():
            save_atomic(self.state_dict(epoch), self.run_dir / "last.pt")
            self.evaluation.commit_best()
            self.step.write(self.run_dir, epoch)

    # ---- training ----------------------------------------------------------------------
    def train_one_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch of steps on the feed's batches, mixed by the recipe inside its window;
        returns the epoch's lr, mean loss and accuracy (one host read, at the end)."""
        self.step.start_epoch(self.generator)
        self.model.train()
        self.loss.set_epoch(epoch)
        epochs = self.cfg.optim.epochs
        mixing = self.recipe.start_epoch(epoch, epochs, self.generator)
        batches = self.feed.epoch(epoch, self.recipe if mixing else None, self.generator,
                                  self.embed)
        total_correct = torch.zeros((), device=self.device)
        seen = 0
        guard = LossGuard()  # the steps' losses; a non-finite one stops the run (epoch end)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                   disable=not (self.cfg.train.progress and is_main_process()),
                   file=sys.stderr, dynamic_ncols=True)
        for i, batch in enumerate(bar):
            lr = step_lr(self.cfg, epoch, i, len(batches))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_sum, correct, n = self.step(batch)
            guard.update(loss_sum, n)
            if not bar.disable and i % 10 == 0:  # .item() syncs the device: not every step
                bar.set_postfix(loss=f"{float(loss_sum) / n:.3f}", refresh=False)
            total_correct += correct
            seen += n
        bar.close()
        totals = all_reduce_sum(torch.stack([guard.total().to(self.device), total_correct,
                                             torch.tensor(float(seen), device=self.device)]))
        loss_sum, correct_sum, count = totals.tolist()
        guard.check(loss_sum, epoch, epochs, len(batches))
        return {"lr": lr, "train_loss": loss_sum / count,
                "train_acc": 100.0 * correct_sum / count, **self.step.end_epoch()}

    def fit(self, stop_after: int | None = None,
            time_limit: TimeLimit | None = None) -> dict[str, Any] | None:
        """Train to the configured last epoch (or stop, resumable, after ``stop_after``
        epochs in total, or where ``time_limit`` says what comes next would not fit) and
        return the final test evaluation (None when stopped early). A run that had finished
        before returns its ``eval.json`` as it is and sets ``finished_before``.
        The record is logged before ``last.pt`` is saved, so no checkpointed epoch lacks one."""
        cfg = self.cfg
        finished = self.start_epoch >= cfg.optim.epochs  # a resume of a finished run
        end = cfg.optim.epochs if stop_after is None or finished else \
            min(stop_after, cfg.optim.epochs)
        with holding(self.run_dir):  # the run directory's lock (rundir.py) ends with fit
            if is_main_process() and self.start_epoch < end:
                record_sitting(self.run_dir, self.device, self.start_epoch, world_size())
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
            if end < cfg.optim.epochs or timed_out:
                return None
            stored = self.evaluation.stored_final() if finished else None
            self.finished_before = stored is not None
            return stored if stored is not None else self.evaluation.final()

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch, validate under ``eval.bn_stats`` (and probe, and the opt-in test
        diagnostic), keep ``best`` and the kept weights; return the epoch's record."""
        start = time.perf_counter()
        record = {"epoch": epoch, **self._resume_note, **self.train_one_epoch(epoch)}
        # The steps end with the epoch's one host read, so on a GPU they are done by now; the
        # rest of epoch_seconds is evaluation and bookkeeping (issue 29's per-epoch overhead).
        record["steps_seconds"] = time.perf_counter() - start
        self._resume_note = {}
        if not self.cfg.train.sync_bn:
            average_buffers(self.model)  # every rank evaluates and saves one model
        if self.mixer is not None:  # global mix_pairs
            all_reduce_counters(self.mixer.counters(), self.device)
        trained_mixer = self._mixer_state()
        evaluated, val_confusion = self.evaluation.after_epoch(epoch, trained_mixer)
        record.update(evaluated)
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
