"""Stage 2 of OT re-weighting: alternate the OT step on the example weights and the classifier.

Stage 1 is an ordinary ERM run of the engine on the same data (with ``data.meta_per_class``
carving the balanced meta set before the long-tailed subsampling). Stage 2 starts from its
checkpoint (``reweight.stage1``) and, for every batch of the long-tailed training set:

1. features ``z`` of the augmented batch; the weight step of :class:`otlt.reweight.OTReweighter`
   moves the batch's raw weights ``w_B`` by one SGD step on the OT loss to the meta
   distribution, whose features are computed once per epoch from one augmented draw of the
   meta set (as the official code does);
2. the classifier step: ``L = Σ_i ℓ_i ω_i + meta_coef · mean_meta ℓ`` with ``ω = softmax(w_B)``
   (or raw ``w_B``), one step of the ``optim`` section's SGD on the trainable parameters.

``reweight.trainable: fc`` (the official code) trains the final layer only; the backbone then
runs in eval mode under ``no_grad`` (one cheap forward per batch, BatchNorm statistics frozen)
and the meta loss reuses the epoch's meta features. ``reweight.bn: train_meta`` does what the
official code does instead (``OT_train.py`` ~L232-236): the weight step's features in eval
mode, then the classifier step's backbone forward of the batch and of the whole meta set in
train mode at every step, so BatchNorm uses batch statistics and its running statistics
drift towards the balanced meta set. ``all`` trains the whole network and
forwards the meta set every step, as the official code does.

Everything else is the engine's: data on the device, validation each epoch, atomic ``last.pt``
with exact resume (it adds the raw weights and their momentum), ``metrics.jsonl`` (adds
``ot_loss``, ``meta_loss``, ``ot_grad_norm`` (mean per step of ``||dOT/dw_B||``),
``weight_step_change`` (mean per step of the L1 change of ``softmax(w_B)``) and the per-class
``weight_class_mean``, ``weight_class_std``, ``weight_class_mass``; the three OT entries are
null with ``reweight.ot_step: false``, which skips step 1), the final test evaluation.
``weights.json`` holds, after the last finished epoch, every training example's ``labels``,
``raw`` weight and ``probability`` (softmax of all raw weights: the learned training
distribution), in training-split order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from otlt.amp import autocast
from otlt.atomic import write_text_atomic
from otlt.config import ReweightConfig, RunConfig, list_presets, to_dict
from otlt.data.streams import is_list_dataset
from otlt.engine.checkpoint import load_checkpoint
from otlt.engine.distributed import launched_world_size
from otlt.engine.feed import DeviceFeed
from otlt.engine.runtime import DeviceSplit
from otlt.engine.stability import backward_step
from otlt.engine.step import StepResult, TrainBatch
from otlt.engine.weights import SUFFIX, load_weights
from otlt.errors import OtltError, require
from otlt.losses import LongTailLoss
from otlt.reweight import OTReweighter, class_prototypes


def reweighter_from_config(r: ReweightConfig, labels: torch.Tensor,
                           num_classes: int) -> OTReweighter:
    """The :class:`~otlt.reweight.OTReweighter` of a ``reweight`` config section (the
    algorithm itself knows nothing of configs)."""
    return OTReweighter(labels, num_classes, init=r.init, beta=r.beta, cost=r.cost,
                        feature_weight=r.feature_weight, label_distance=r.label_distance,
                        eps=r.eps, lr=r.weight_lr, momentum=r.weight_momentum,
                        weight_decay=r.weight_decay,
                        normalize=r.classifier_weights == "softmax", max_iter=r.max_iter)


def stage1_checkpoint(path: str) -> Path:
    """The checkpoint file of ``reweight.stage1``: a ``last.pt``, or a run directory's
    ``last.pt``, else its committed ``last.safetensors`` (a results folder)."""
    p = Path(path)
    if not p.is_dir():
        return p
    return p / "last.pt" if (p / "last.pt").is_file() or not (p / f"last{SUFFIX}").is_file() \
        else p / f"last{SUFFIX}"


def _stage1_from_weights(path: Path) -> dict[str, Any]:
    """A committed stage-1 folder (``config.yaml``, ``splits.json``, fp16 ``last.safetensors``)
    as the parts of a checkpoint stage 2 reads."""
    folder = path.parent
    for name in ("config.yaml", "splits.json"):
        require((folder / name).is_file(), f"reweight.stage1: {folder / name} is missing; a "
                                           "stage-1 folder needs config.yaml, splits.json and "
                                           "last.safetensors")
    weights = load_weights(path)
    splits = json.loads((folder / "splits.json").read_text())
    return {"config": yaml.safe_load((folder / "config.yaml").read_text()),
            "epoch": weights.epoch, "model": weights.model,
            "train_counts": splits["counts"]["train"]}


def load_stage1(cfg: RunConfig) -> dict[str, Any]:
    """Read the finished stage-1 checkpoint and check it matches this run's data and model."""
    path = stage1_checkpoint(cfg.reweight.stage1)
    if not path.is_file():
        stage1 = path.parent.name  # the run that would have written it: a preset's name?
        how = (f"otlt train --preset {stage1}" if stage1 in list_presets()
               else "otlt train --preset <dataset>_ot_reweight_stage1 (otlt presets)")
        raise OtltError(f"reweight.stage1: {path} does not exist (train stage 1 first: {how}; "
                        "or point reweight.stage1 at a finished stage-1 run, e.g. one "
                        "committed under results/)")
    state = _stage1_from_weights(path) if path.suffix == SUFFIX else load_checkpoint(path)
    first = state["config"]
    done, total = int(state["epoch"]) + 1, int(first["optim"]["epochs"])
    require(done >= total, f"stage-1 run {path.parent} stopped after epoch {done} of {total}; "
                           f"finish it first: otlt train --resume {path.parent}")
    mine = to_dict(cfg)
    for section, ignored in (("data", {"path"}), ("model", set())):
        theirs = first.get(section, {})
        for key, value in mine[section].items():
            if key not in ignored and theirs.get(key) != value:
                raise OtltError(f"stage-1 checkpoint {path} was trained with {section}.{key}="
                                f"{theirs.get(key)!r}, this config has {value!r}; stage 2 must "
                                "use stage 1's data and model sections")
    return state


def stage1_state(cfg: RunConfig, resumed: bool) -> dict[str, Any] | None:
    """Checks of a stage-2 run before anything is built, and the stage-1 checkpoint a fresh
    run starts from (None when ``resumed`` from its own ``last.pt``). Read before the run
    directory is created, so a missing or unfinished stage 1 leaves nothing behind."""
    require(launched_world_size() == 1, "OT re-weighting stage 2 runs in one process (the "
                                        "example weights are not synchronised across ranks); "
                                        "launch it without torchrun")
    require(not is_list_dataset(cfg.data), "OT re-weighting stage 2 needs an in-memory "
                                           "dataset (CIFAR, image folders); list-file datasets "
                                           "are not supported yet")
    require(not (cfg.train.compile or cfg.train.cuda_graphs),
            "OT re-weighting stage 2 steps its model eagerly: drop train.compile and "
            "train.cuda_graphs")
    return None if resumed else load_stage1(cfg)


def stage2_parameters(model: torch.nn.Module, r: ReweightConfig) -> list[torch.nn.Parameter]:
    """What stage 2's optimizer steps: the final layer (``reweight.trainable: fc``; the
    backbone is frozen here) or every parameter (``all``)."""
    if r.trainable != "all":
        for param in model.parameters():
            param.requires_grad_(False)
        model.fc.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


class Stage2Step:
    """OT re-weighting's stage-2 step (the module docstring), called by the trainer for each
    batch of the in-memory ``feed`` (:class:`otlt.engine.step.Step`).

    ``stage1``: the stage-1 state a fresh run loads into ``model`` (:func:`stage1_state`;
    None when resumed); ``optimizer`` steps :func:`stage2_parameters`.
    """

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, feed: DeviceFeed,
                 loss: LongTailLoss, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, amp_dtype: torch.dtype | None,
                 stage1: dict[str, Any] | None) -> None:
        self.cfg, self.model, self.feed, self.loss = cfg, model, feed, loss
        self.optimizer, self.scaler, self.amp_dtype = optimizer, scaler, amp_dtype
        self.device = feed.device
        r = cfg.reweight
        self.train_all = r.trainable == "all"
        self.reweighter = reweighter_from_config(r, feed.train.labels, cfg.num_classes)
        self.meta_split = DeviceSplit(feed.data.meta, self.device)
        if stage1 is not None:
            require(list(stage1["train_counts"]) == list(feed.counts),
                    f"stage-1 checkpoint has training counts {stage1['train_counts']}, this "
                    f"run's data gives {feed.counts}; did the dataset change?")
            model.load_state_dict(stage1["model"])

    # ---- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"reweighter": self.reweighter.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The re-weighter's raw weights and momentum (a KeyError: not a stage-2 checkpoint)."""
        self.reweighter.load_state_dict(state["reweighter"])

    def write(self, run_dir: Path, epoch: int) -> None:
        """``weights.json``: every training example's label, raw weight and probability."""
        raw = self.reweighter.raw
        write_text_atomic(run_dir / "weights.json", json.dumps({
            "epoch": epoch, "labels": self.feed.train.labels.tolist(), "raw": raw.tolist(),
            "probability": torch.softmax(raw.double(), 0).tolist()}))

    # ---- training ----------------------------------------------------------------------
    def start_epoch(self, generator: torch.Generator) -> None:
        """What an epoch does before its first step: draw the meta set
        (:meth:`prepare_meta`) and zero the per-step sums of the OT loss, the meta loss,
        ``||dOT/dw_B||`` and the L1 change of ``softmax(w_B)``."""
        self.prepare_meta(generator)
        self._sums = torch.zeros(4, device=self.device)
        self._steps = 0

    def end_epoch(self) -> dict[str, Any]:
        """The epoch's means of the per-step sums and the re-weighter's class statistics."""
        ot_loss, meta_loss, grad_norm, change = (self._sums / max(self._steps, 1)).tolist()
        if not self.cfg.reweight.ot_step:  # nothing measured: no OT problem was solved
            ot_loss = grad_norm = change = None
        return {"ot_loss": ot_loss, "meta_loss": meta_loss, "ot_grad_norm": grad_norm,
                "weight_step_change": change, **self.reweighter.class_stats()}

    def prepare_meta(self, generator: torch.Generator) -> None:
        """Draw this epoch's augmented meta set and give its features to the re-weighter."""
        x = self.feed.augment(self.meta_split.images, generator)
        y = self.meta_split.labels
        self.meta_x = self.layout(x)
        self.meta_z = self.frozen_features(self.meta_x)
        mode = self.cfg.reweight.meta
        if mode == "pixel_prototype":
            images, labels = class_prototypes(x, y, self.cfg.num_classes)
            self.reweighter.set_meta(self.frozen_features(self.layout(images)), labels,
                                     prototypes=False)
        else:
            self.reweighter.set_meta(self.meta_z, y, prototypes=mode == "prototype")

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the run's memory format (``train.channels_last``)."""
        if self.cfg.train.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    @torch.no_grad()
    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features ``(N, D)`` in eval mode, float32, without gradients."""
        was_training = self.model.training
        self.model.eval()
        with autocast(self.device, self.amp_dtype):
            chunks = x.split(self.cfg.train.eval_batch_size)
            z = torch.cat([self.model.features(c).float() for c in chunks])
        self.model.train(was_training)
        return z

    def __call__(self, batch: TrainBatch) -> StepResult:
        """Weight step, then classifier step; returns (summed loss, correct, batch size)."""
        idx, x, y = batch.indices, self.layout(batch.images), batch.labels
        assert idx is not None  # an in-memory feed gives the indices
        if self.train_all:
            with autocast(self.device, self.amp_dtype):
                z = self.model.features(x)
                logits = self.model.fc(z)
        elif self.cfg.reweight.bn == "train_meta":
            z = self.frozen_features(x)  # the official weight step runs in eval mode
            logits = self.model.fc(self._train_mode_features(x))
        else:
            z = self.frozen_features(x)
            logits = self.model.fc(z)
        if self.cfg.reweight.ot_step:
            weights = self.reweighter.step(z.detach().float(), y, idx)
        else:
            weights = self.reweighter.batch_weights(idx)
        meta_loss = self._meta_loss()
        loss = (self.loss(logits, y) * weights).sum() + self.cfg.reweight.meta_coef * meta_loss
        backward_step(self.optimizer, loss, self.scaler)
        rw = self.reweighter
        self._sums += torch.stack([rw.last_loss.float(), meta_loss.detach().float(),
                                   rw.last_grad_norm.float(), rw.last_change.float()])
        self._steps += 1
        correct = (logits.argmax(1) == y).sum()
        return loss.detach() * len(y), correct.detach().float(), len(y)

    @torch.no_grad()
    def _train_mode_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(N, D)`` of the frozen backbone in train mode (``reweight.bn:
        train_meta``): batch statistics, and the running statistics move, as in the
        official stage 2."""
        with autocast(self.device, self.amp_dtype):
            return self.model.features(x).float()

    def _meta_loss(self) -> torch.Tensor:
        """Mean loss on this epoch's meta draw (0 when ``meta_coef`` is 0). With
        ``reweight.bn: train_meta`` the meta set goes through the backbone in train mode at
        every step (moving BatchNorm towards balanced statistics), whatever ``meta_coef``."""
        if self.cfg.reweight.bn == "train_meta" and not self.train_all:
            meta_z = self._train_mode_features(self.meta_x)
            if self.cfg.reweight.meta_coef == 0:
                return torch.zeros((), device=self.device)
            return self.loss(self.model.fc(meta_z), self.meta_split.labels).float().mean()
        if self.cfg.reweight.meta_coef == 0:
            return torch.zeros((), device=self.device)
        if self.train_all:
            with autocast(self.device, self.amp_dtype):
                logits = self.model(self.meta_x)
        else:
            logits = self.model.fc(self.meta_z)
        return self.loss(logits, self.meta_split.labels).float().mean()

