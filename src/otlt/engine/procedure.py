"""The evaluation procedure of one run (``eval.*``): which model is evaluated, what is logged
from it, which checkpoint is kept as validation-selected, and the final test evaluation.

Per epoch, after training, :meth:`EvaluationProcedure.after_epoch` does::

    model = procedure.model_for(epoch)       # eval.bn_stats: the training model (running) or a
                                             #   copy with recalibrated BatchNorm statistics
    record, running = procedure.validate(model)   # + the running-statistics confusion that
                                                  #   OTmix's cost reads, whatever bn_stats says
    procedure.probe(epoch)                   # every procedure, every eval.bn_probe_every epochs
    procedure.select(epoch, record, model, mixer_state)   # a new best (ties: the later)

A new best is written as ``.best.pending.safetensors`` and becomes ``best.safetensors`` only
after ``last.pt`` records it (:meth:`EvaluationProcedure.commit_best`), so a stop in between
never leaves a best file from an epoch attempt ``last.pt`` does not know (on a GPU a redone
epoch may train other weights); :meth:`EvaluationProcedure.recover_best` settles a pending
file on resume.

and once, after the last epoch, :meth:`EvaluationProcedure.final` (``eval.json``: the last
epoch and the validation-selected checkpoint on test).

The procedure reads the data only through the run's feed (:mod:`otlt.engine.feed`): the
confusion matrix of a split and the recalibration batches of a procedure other than
``running``, drawn from the ``(seed, epoch)`` recalibration generator
(:func:`otlt.engine.batchnorm.recalibration_generator`), so the same weights give the same
numbers during training and after it (``otlt eval`` builds model, feed and procedure without
a trainer: :mod:`otlt.engine.posthoc`).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from otlt.atomic import write_text_atomic
from otlt.config import BN_STATS, RunConfig, to_dict
from otlt.data.prepare import LongTailedData
from otlt.engine.batchnorm import (
    batchnorm_state,
    preserved_batchnorm,
    recalibrate_batchnorm,
    recalibration_generator,
)
from otlt.engine.distributed import is_main_process, on_main_then_share
from otlt.engine.evaluation import split_record
from otlt.engine.feed import Feed, create_feed
from otlt.engine.logging import log_final
from otlt.engine.runtime import build_model
from otlt.engine.weights import SUFFIX, load_weights, save_weights, weights_epoch
from otlt.errors import OtltError, writing
from otlt.metrics import select_value, summarize
from otlt.mixing import Mixer, MixRecipe
from otlt.models.features import Embed

BEST = f"best{SUFFIX}"
PENDING_BEST = f".best.pending{SUFFIX}"  # a new best until last.pt records its epoch


def pending_best_epoch(run_dir: Path) -> int | None:
    """The epoch of ``run_dir``'s pending best (None: there is none, or it is unreadable);
    the file's header alone is read."""
    pending = Path(run_dir) / PENDING_BEST
    if not pending.is_file():
        return None
    try:
        return weights_epoch(pending)
    except OtltError:  # damaged: no best anyone could use
        return None


def best_weights_file(run_dir: Path, recorded: dict[str, Any] | None) -> Path:
    """``best.safetensors``, or the pending best where ``last.pt`` already names its epoch
    (``recorded``: ``last.pt``'s ``best``; a run stopped between ``last.pt`` and the rename
    and not resumed since)."""
    if recorded is not None and pending_best_epoch(run_dir) == recorded.get("epoch"):
        return Path(run_dir) / PENDING_BEST
    return Path(run_dir) / BEST


class EvaluationProcedure:
    """``eval.*`` for one run, over the run's ``model`` (the bare one, not the compiled or DDP
    step model), its ``feed`` and its mixing ``recipe`` (whose mixer OTmix's cost updates
    from the validation confusion; ``embed``: its feature function, for ``train``
    recalibration batches).

    ``best`` is ``{"epoch", "value"}`` of the checkpoint in ``run_dir/best.safetensors``
    (None before the first validation); the trainer saves and restores it with ``last.pt``.
    """

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, feed: Feed, recipe: MixRecipe,
                 run_dir: Path, *, embed: Embed | None, amp_dtype: torch.dtype | None):
        self.cfg = cfg
        self.model = model
        self.feed = feed
        self.recipe = recipe
        self.run_dir = run_dir
        self.embed = embed
        self.amp_dtype = amp_dtype
        self.best: dict[str, Any] | None = None
        self._pending: int | None = None  # the epoch of the pending best select wrote

    @classmethod
    def build(cls, cfg: RunConfig, device: torch.device, run_dir: Path,
              amp_dtype: torch.dtype | None,
              data: LongTailedData | None = None) -> EvaluationProcedure:
        """The procedure of a run with its parts built from ``cfg``: the feed on ``device``
        (``data``: splits prepared already), the model initialised from ``seed`` (torch's
        global seed set first, as every run has it), the mixing recipe of ``mix.*`` (window,
        coin, partner draw, mixer: a clean batch costs no partner draw or feature pass)
        and its feature function (replayed as CUDA graphs under ``train.cuda_graphs``). The
        trainer and ``otlt eval`` build it alike."""
        feed = create_feed(cfg, device, data)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, device)
        recipe = MixRecipe.from_config(cfg, feed.labels, feed.counts)
        return cls(cfg, model, feed, recipe, run_dir, amp_dtype=amp_dtype,
                   embed=recipe.embed_of(model, amp_dtype, cfg.train.channels_last,
                                         graphs=cfg.train.cuda_graphs))

    @property
    def mixer(self) -> Mixer | None:
        """The run's mixer (None without one)."""
        return self.recipe.mixer

    def confusion_on(self, split: str,
                     model: torch.nn.Module | None = None) -> torch.Tensor | None:
        """Confusion matrix of ``model`` (default: the training model) on ``val`` or
        ``test`` (None: the run has no such split)."""
        return self.feed.confusion(split, model or self.model, self.amp_dtype)

    def recalibration_batches(self, mode: str, epoch: int) -> Iterator[torch.Tensor]:
        """``eval.bn_batches`` input batches ``(B, 3, H, W)`` of procedure ``mode`` after
        ``epoch``, from the ``(seed, epoch)`` recalibration generator: ``clean`` and
        ``balanced`` batches, or for ``train`` clean batches mixed with probability
        ``mix.prob`` by a copy of the run's recipe whose mixer is as it is now and redraws its
        per-epoch switch for each mixed batch (:meth:`MixRecipe.for_recalibration`)."""
        recipe = self.recipe.for_recalibration(epoch, self.cfg.optim.epochs) \
            if mode == "train" else None
        return self.feed.recalibration(mode, epoch, recipe,
                                       recalibration_generator(self.cfg.seed, epoch),
                                       self.embed)

    def model_for(self, epoch: int, mode: str | None = None) -> torch.nn.Module:
        """The model as evaluated under ``mode`` (default ``eval.bn_stats``): the training
        model itself for ``running``, else a copy whose BatchNorm statistics are recalibrated
        on :meth:`recalibration_batches`."""
        mode = mode or self.cfg.eval.bn_stats
        if mode == "running":
            return self.model
        model = copy.deepcopy(self.model)
        with preserved_batchnorm(self.model):  # a feature pass may update the model's BN
            recalibrate_batchnorm(model, self.recalibration_batches(mode, epoch),
                                  amp_dtype=self.amp_dtype,
                                  channels_last=self.cfg.train.channels_last,
                                  stack=self.cfg.train.bn_stack)
        return model

    def after_epoch(self, epoch: int, mixer_state: dict[str, Any] | None,
                    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Evaluate the weights an epoch trained: the model under ``eval.bn_stats``
        (``bn_seconds``: its recalibration), the validation record, the probe when due, the
        opt-in test diagnostic, ``best.safetensors`` (:meth:`select`; ``mixer_state``: the
        mixer as the epoch trained with it). Returns the record's entries and the
        running-statistics validation confusion (OTmix's cost; None without validation)."""
        record: dict[str, Any] = {}
        model = None
        if self.feed.has_val or self.cfg.eval.test_every_epoch:
            start = time.perf_counter()
            model = self.model_for(epoch)
            if self.cfg.eval.bn_stats != "running":
                record["bn_seconds"] = time.perf_counter() - start
        val_record, confusion = self.validate(model)
        record.update(val_record)
        if self.probe_due(epoch):
            record.update(self.probe(epoch))
        if self.cfg.eval.test_every_epoch:
            record.update(self.test_diagnostic(model))
        self.select(epoch, record, model, mixer_state)
        return record, confusion

    def summarize(self, confusion: torch.Tensor) -> dict[str, Any]:
        """Top-1 and many / medium / few errors of a ``(K, K)`` confusion matrix."""
        e = self.cfg.eval
        return summarize(confusion, self.feed.counts, many=e.many_threshold,
                         few=e.few_threshold)

    def validate(self, model: torch.nn.Module) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Validation record of ``model`` (the epoch's evaluation model) and the confusion
        under the running statistics, which OTmix's cost uses whatever ``eval.bn_stats``
        says; ``({}, None)`` without a validation split."""
        if not self.feed.has_val:
            return {}, None
        confusion = self.confusion_on("val", model)
        summary = self.summarize(confusion)
        record = split_record("val", summary)
        record["val_select"] = select_value(summary, self.cfg.eval.select_metric)
        running = confusion
        if model is not self.model and self.mixer is not None:
            running = self.confusion_on("val", None)
            record.update(split_record("val_running", self.summarize(running)))
        return record, running

    def probe_due(self, epoch: int) -> bool:
        """``eval.bn_probe_every`` epochs and the last one (needs a validation split)."""
        every = self.cfg.eval.bn_probe_every
        last = epoch == self.cfg.optim.epochs - 1
        return bool(every) and self.feed.has_val and ((epoch + 1) % every == 0 or last)

    def probe(self, epoch: int) -> dict[str, Any]:
        """Validation accuracy under every ``eval.bn_stats`` procedure (``bn_probe``)."""
        start = time.perf_counter()
        probe = {mode: split_record("val", self.summarize(
                     self.confusion_on("val", self.model_for(epoch, mode))))
                 for mode in BN_STATS}
        return {"bn_probe": probe, "bn_probe_seconds": time.perf_counter() - start}

    def test_diagnostic(self, model: torch.nn.Module) -> dict[str, Any]:
        """The official protocol's per-epoch test accuracy (``eval.test_every_epoch``):
        optimistic, logged as ``test_diag_*`` and never read by anything."""
        return split_record("test_diag", self.summarize(self.confusion_on("test", model)))

    def select(self, epoch: int, record: dict[str, Any], model: torch.nn.Module,
               mixer_state: dict[str, Any] | None) -> None:
        """Write the pending best (the model as trained, the BatchNorm buffers as evaluated,
        the mixer as the epoch trained with it) when the validation metric ties or beats the
        best so far; :meth:`commit_best` makes it ``best.safetensors``."""
        value = record.get("val_select")
        if value is None or (self.best is not None and value < self.best["value"]):
            return
        self.best = {"epoch": epoch, "value": value}
        if is_main_process():
            e = self.cfg.eval
            save_weights(self.run_dir / PENDING_BEST, self.model.state_dict(),
                         epoch=epoch, evaluated_bn=batchnorm_state(model), mixer=mixer_state,
                         meta={"bn_stats": e.bn_stats, "bn_batches": e.bn_batches,
                               "select_metric": e.select_metric, "val_value": value})
            self._pending = epoch

    def commit_best(self) -> None:
        """Rename the epoch's pending best over ``best.safetensors`` (rank 0). The trainer
        calls it once ``last.pt`` records the epoch: a stop before it keeps the previous best,
        which is what ``last.pt`` says is best."""
        if self._pending is None or not is_main_process():
            return  # only the file this process's select wrote, or recover_best vouched for
        with writing(self.run_dir / BEST):
            os.replace(self.run_dir / PENDING_BEST, self.run_dir / BEST)
        self._pending = None

    def recover_best(self) -> None:
        """Settle a pending best left by an earlier process, at the start (``best``: as
        ``last.pt`` records it, None for a run that starts at epoch 0): one of the epoch
        ``last.pt`` records as best (the stop came between ``last.pt`` and the rename) becomes
        ``best.safetensors``; any other is from an epoch attempt ``last.pt`` never saved and
        is removed (the resumed run redoes that epoch)."""
        pending = self.run_dir / PENDING_BEST
        if not is_main_process() or not pending.exists():
            return
        epoch = pending_best_epoch(self.run_dir)
        if self.best is not None and epoch == self.best["epoch"]:
            self._pending = epoch
            self.commit_best()
        else:
            with writing(pending):
                pending.unlink(missing_ok=True)

    def stored_final(self) -> dict[str, Any] | None:
        """``eval.json`` when it holds this run's final evaluation (test split, the last
        epoch), else None; rank 0 reads it for every rank. A resume of a finished run shows
        it instead of computing it again: on another CPU or device the recomputed bf16
        numbers could differ, and the run's record would silently change (``otlt eval``
        recomputes into its own file)."""
        last = self.cfg.optim.epochs - 1

        def read() -> dict[str, Any] | None:
            try:
                record = json.loads((self.run_dir / "eval.json").read_text())
            except (OSError, ValueError):
                return None
            ok = isinstance(record, dict) and record.get("split") == "test" and \
                record.get("checkpoint") == "last" and record.get("epoch") == last
            return record if ok else None

        return on_main_then_share(read)

    def final(self) -> dict[str, Any]:
        """Evaluate on the test split, under ``eval.bn_stats``, the last epoch's weights and
        the validation-selected ``best`` (``selected``); write ``eval.json``."""
        e, last = self.cfg.eval, self.cfg.optim.epochs - 1
        confusion = self.confusion_on("test", self.model_for(last))
        result = {"split": "test", "epoch": last, "checkpoint": "last", "bn_stats": e.bn_stats,
                  "bn_batches": e.bn_batches, "classes": self.feed.classes,
                  **self.summarize(confusion)}
        best_path = self.run_dir / BEST
        # Rank 0 wrote best.safetensors and reads it for every rank: other nodes need not
        # see the run directory.
        best = on_main_then_share(
            lambda: load_weights(best_path) if self.best is not None and best_path.is_file()
            else None)
        if best is not None:
            model = copy.deepcopy(self.model)
            model.load_state_dict(best.evaluated_model())
            result["selected"] = {"checkpoint": "best", "epoch": best.epoch,
                                  "select_metric": e.select_metric,
                                  "val_value": best.meta.get("val_value"),
                                  **self.summarize(self.confusion_on("test", model))}
        if is_main_process():
            write_text_atomic(self.run_dir / "eval.json", json.dumps(result, indent=1))
            log_final(self.run_dir, to_dict(self.cfg), result)
        return result
