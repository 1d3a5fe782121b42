"""OTmix in a Lightning training loop: one callback does the glue.

:class:`OTMixCallback` holds the OTMix mixer in the presets' recipe
(:class:`otlt.mixing.MixRecipe`: mix a batch with probability ``prob``, not in the first
``skip_first`` and last ``skip_last`` epochs, partners (OTmix's foregrounds) from the
class-weighted sampler).
Your ``LightningModule`` calls :meth:`OTMixCallback.mix` in ``training_step``; the callback
draws the OT-or-random switch each epoch, builds the validation confusion matrix from the
first validation dataloader's batches (``confusion_dataloader`` picks another; one extra
forward pass of each, read back to the host once per validation; not the sanity check's;
summed over the ranks under DDP, tested with two gloo processes on the CPU), hands it to
OTMix when the training epoch ends, logs the mixing statistics (``otmix/<name>``; NaN for a
number an epoch has none of, e.g. ``ot_mean_cost`` without an OT batch), and saves OTMix's state
(confusion matrix, epoch, OT-or-random switch, plans served, and a validation confusion not
yet handed over) and its generator in Lightning checkpoints, so a run resumed from a
checkpoint saved at an epoch's end mixes as the uninterrupted one would (one saved mid-epoch
redraws the epoch's switch). Partners come in the batch's device and floating dtype
(``precision="bf16-true"`` hands the step bf16 images)::

    otmix = OTMixCallback(train_images, train_labels, num_classes=10)
    trainer = lightning.Trainer(callbacks=[otmix], max_epochs=240)

    class Module(lightning.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            mixed = otmix.mix(self, x, y)          # None: this batch stays clean
            if mixed is None:
                return batch_loss(self.criterion, self(x), y)
            return batch_loss(self.criterion, self(mixed.images), mixed.base_labels,
                              mixed.partner_labels, mixed.lam)

Features for the OT cost: ``embed(images (N, C, H, W)) -> (N, D)``, the same function
:class:`otlt.mixing.OTMix` takes (:func:`otlt.models.features.feature_fn` builds one). Give
it as ``OTMixCallback(embed=...)``, or let :func:`find_network` find the network in the module
handed to :meth:`OTMixCallback.mix`: the module itself when :func:`feature_fn` recognises it,
else its one child that it recognises (``self.model``, ``self.net``, ``self.backbone``...).

Length: the schedule ``(t/T)^mu`` and the window count epochs, so ``T`` is ``max_epochs``, or
under ``max_steps`` the epochs those steps make (:func:`planned_epochs`); a run of unknown
length (``max_epochs=-1`` and no ``max_steps``, or an iterable loader without a length) is
refused, and a window that leaves no epoch to mix is warned about when training starts.

Requires Lightning: ``pip install -e '.[lightning]'`` in a checkout (otlt is not on a
package index).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

try:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("otlt.integrations.lightning needs Lightning: pip install "
                      "'lightning>=2.1' (or pip install -e '.[lightning]' in otlt's "
                      "checkout)") from exc

from otlt.errors import OtltError, is_integer, require, warn_renamed
from otlt.labels import check_labels
from otlt.metrics import confusion_matrix
from otlt.mixing import MixedBatch, MixRecipe, OTMix
from otlt.models.features import has_features

NETWORK_NAMES = ("model", "net", "network", "backbone")


def find_network(module: torch.nn.Module) -> torch.nn.Module:
    """The network to take OTmix's features from: ``module`` itself when
    :func:`otlt.models.features.feature_fn` recognises it, else its one direct child that it
    recognises (among several, the one named ``model``, ``net``, ``network`` or
    ``backbone``); otherwise a one-line :class:`OtltError` that says what to pass."""
    if has_features(module):
        return module
    found = [(name, child) for name, child in module.named_children() if has_features(child)]
    named = [(name, child) for name, child in found if name in NETWORK_NAMES]
    if len(found) == 1 or len(named) == 1:
        return (named or found)[0][1]
    which = (f"several candidates ({', '.join(name for name, _ in found)})" if found else
             "no child with features(x), timm's forward_features or a final fc/classifier/head")
    raise OtltError(f"OTMixCallback cannot find the network in {type(module).__name__}: "
                    f"{which}; call mix(self.<network>, x, y), or give OTMixCallback "
                    "embed=otlt.models.features.feature_fn(<network>)")


def planned_epochs(max_epochs: int | None, max_steps: int | None,
                   batches_per_epoch: float, accumulate: int = 1) -> int:
    """Epochs the run will train: ``max_epochs``, or fewer when ``max_steps`` optimizer steps
    (``ceil(batches / accumulate)`` an epoch, as Lightning counts) end it sooner.

    Raises :class:`OtltError` for a run of unknown length."""
    limits = [max_epochs] if max_epochs is not None and max_epochs >= 0 else []
    if max_steps is not None and max_steps >= 0 and 0 < batches_per_epoch < math.inf:
        limits.append(math.ceil(max_steps / math.ceil(batches_per_epoch / accumulate)))
    require(bool(limits), "OTMixCallback needs the run's length (its OT schedule and skip_last "
                          "count epochs): set max_epochs, or max_steps with a train loader "
                          "that has a length")
    return max(min(limits), 1)


def _images_and_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(batch[0], batch[1])``: a ``TensorDataset``'s or a torchvision dataset's batch."""
    try:
        return batch[0], batch[1]
    except (KeyError, IndexError, TypeError):
        raise OtltError(f"OTMixCallback cannot read images and labels from a validation batch "
                        f"of type {type(batch).__name__}; give it unpack=lambda batch: "
                        "(images, labels)") from None


EPOCH_STATISTICS = ("same_class_pair_fraction", "ot_mean_cost", "ot_mean_iters",
                    "ot_converged_fraction")
"""OTMix's per-epoch numbers that an epoch may lack (no pair mixed, no OT batch): the
callback logs them as NaN then."""


class OTMixCallback(Callback):
    """The OTmix recipe for a Lightning ``Trainer`` (see the module docstring).

    Args:
        train_images: ``(N, C, H, W)`` partner (foreground) pool: the training images, on
            any device (moved to the module's device per draw), already as the model takes
            them, or raw with ``partner_transform(images, generator)`` to augment a draw
            (``foreground_transform``, its old name, still works and warns).
        train_labels: ``(N,)`` their labels.
        num_classes: K.
        prob, skip_first, skip_last: the presets' recipe (0.5, 3, 3).
        sampler_r: partner class probability ``q_k ∝ n_k^-r`` (0: every class alike).
        seed: the callback's generator (draws, coins, boxes, OT row sampling).
        embed: ``embed(images (N, C, H, W)) -> (N, D)`` features for the OT cost, as
            :class:`otlt.mixing.OTMix` takes; default: :func:`find_network` in the module
            given to :meth:`mix`, in OTMix's ``feature_mode``.
        unpack: ``unpack(batch) -> (images, labels)`` of a validation batch, for the
            confusion matrix (``pl_module(images)`` must give the logits); default
            ``(batch[0], batch[1])``; a dict batch: ``lambda b: (b["image"], b["label"])``.
        confusion_dataloader: which validation dataloader's batches build the confusion
            (default 0, the first): another one, e.g. a test loader you monitor beside, never
            reaches OTmix's cost (before, every loader's batches were pooled). A validation
            in which it gives no batch (an index past the loaders) warns, and OTMix keeps
            its matrix.
        **otmix_options: :class:`otlt.mixing.OTMix` options (omega, eps, alpha, mu, ...).
    """

    def __init__(self, train_images: torch.Tensor, train_labels: torch.Tensor,
                 num_classes: int, *, prob: float = 0.5, skip_first: int = 3,
                 skip_last: int = 3, sampler_r: float = 0.0, seed: int = 0,
                 partner_transform: Callable[[torch.Tensor, torch.Generator],
                                             torch.Tensor] | None = None,
                 embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 unpack: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 confusion_dataloader: int = 0, **otmix_options: Any) -> None:
        super().__init__()
        if "foreground_transform" in otmix_options:
            warn_renamed("OTMixCallback(foreground_transform=)", "partner_transform=")
            require(partner_transform is None, "OTMixCallback takes partner_transform or "
                                               "its old name foreground_transform, not both")
            partner_transform = otmix_options.pop("foreground_transform")
        require(is_integer(confusion_dataloader) and confusion_dataloader >= 0,
                f"OTMixCallback(confusion_dataloader=) is the index of a validation "
                f"dataloader (0, 1, ...), not {confusion_dataloader!r}")
        require(is_integer(num_classes) and num_classes >= 2,
                f"OTMixCallback needs num_classes >= 2, got {num_classes!r}")
        labels = torch.as_tensor(train_labels)
        # Read once here: a label out of range would otherwise surface at the first mixed
        # batch, epochs into the run (skip_first), deep inside the training step.
        check_labels(labels.cpu(), "OTMixCallback training", torch.arange(num_classes))
        self.images, self.labels = train_images, labels.long()
        counts = torch.bincount(self.labels.cpu(), minlength=num_classes).tolist()
        self.otmix = OTMix(class_counts=counts, num_classes=num_classes, **otmix_options)
        self.recipe = MixRecipe(self.otmix, self.labels, prob=prob, skip_first=skip_first,
                                skip_last=skip_last, sampler_r=sampler_r)
        self.transform = partner_transform
        self.embed = embed
        self.unpack = unpack if unpack is not None else _images_and_labels
        self.confusion_dataloader = int(confusion_dataloader)
        self._found: tuple[torch.nn.Module, torch.nn.Module] | None = None
        self._epochs: int | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        self._confusion: torch.Tensor | None = None
        self._validated: list[torch.Tensor] | None = None
        self._mixing = False

    # ---- what training_step calls --------------------------------------------------------
    def mix(self, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> MixedBatch | None:
        """Mix the batch with OTmix (with probability ``prob`` inside the mixing window), or
        return None for a clean batch. ``module``: your ``LightningModule`` (``self``) or the
        network itself; the features come from ``embed`` or :func:`find_network`, checked at
        every call so a module without one fails at its first batch."""
        features = {"embed": self.embed} if self.embed is not None else \
            {"model": self._network(module)}
        if not self._mixing:
            return None
        return self.recipe.step(x, y, self.generator, load=lambda idx: self._partners(idx, x, y),
                                **features)

    def _partners(self, idx: torch.Tensor, x: torch.Tensor,
                  y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The partners ``idx`` (the recipe's draw) on the batch's devices, transformed."""
        x_partner = self.images[idx.to(self.images.device)].to(x.device)
        if self.transform is not None:
            x_partner = self.transform(x_partner, self.generator)
        if x_partner.is_floating_point() and x.is_floating_point():
            x_partner = x_partner.to(x.dtype)  # precision="bf16-true": the batch is bf16
        return x_partner, self.labels[idx.to(self.labels.device)].to(y.device)

    def _network(self, module: torch.nn.Module) -> torch.nn.Module:
        if self._found is None or self._found[0] is not module:
            self._found = (module, find_network(module))
        return self._found[1]

    # ---- Lightning hooks -----------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._epochs = planned_epochs(trainer.max_epochs, trainer.max_steps,
                                      trainer.num_training_batches,
                                      trainer.accumulate_grad_batches)
        if not self.recipe.window(self._epochs):
            rank_zero_warn(f"OTMixCallback mixes no batch: skip_first={self.recipe.skip_first} "
                           f"and skip_last={self.recipe.skip_last} leave no epoch of the "
                           f"{self._epochs} this run trains")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._epochs is None:
            self.on_train_start(trainer, pl_module)
        self._mixing = self.recipe.start_epoch(trainer.current_epoch, self._epochs,
                                               self.generator)
        self._confusion = None  # not one of a trainer.validate() before fit

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        # The sanity check validates the untrained model on a few batches: not a confusion.
        self._confusion = None
        self._validated = None if trainer.sanity_checking else []

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx: int = 0) -> None:
        if self._validated is None or dataloader_idx != self.confusion_dataloader:
            return
        x, y = self.unpack(batch)
        preds = pl_module(x).argmax(1)
        if y.is_floating_point() or y.numel() != preds.numel():  # metadata: no device read
            raise OtltError(f"OTMixCallback needs integer class labels, one per image, from a "
                            f"validation batch: got {y.dtype} labels of shape "
                            f"{tuple(y.shape)} for {preds.numel()} images (unpack= picks them)")
        # (2, B) (label, prediction) pairs kept on the device: counting them here would read
        # every batch back to the host.
        self._validated.append(torch.stack([y.reshape(-1).to(preds.device, torch.long), preds]))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._validated is None:
            return
        batches, self._validated = self._validated, None
        pairs = torch.cat(batches, 1).cpu() if batches else torch.zeros(2, 0, dtype=torch.long)
        confusion = confusion_matrix(pairs[1], pairs[0], self.num_classes)  # one host read
        if trainer.world_size > 1:
            # Each rank validated its shard: the sum is the whole split's confusion, the
            # same on every rank. Reduced on the module's device (NCCL reduces no CPU tensor).
            # A collective: every rank must run the validation loop, as for Lightning's own
            # sync_dist logging; DistributedSampler's padding counts up to world - 1 images
            # twice.
            confusion = trainer.strategy.reduce(confusion.to(pl_module.device),
                                                reduce_op="sum").cpu()
        if int(confusion.sum()) == 0:  # the same on every rank after the reduce
            # An all-zero matrix would make OTmix's class term constant without a word.
            rank_zero_warn(f"OTMixCallback: validation dataloader {self.confusion_dataloader} "
                           f"gave no batch (confusion_dataloader={self.confusion_dataloader}, "
                           f"{len(trainer.num_val_batches)} validation dataloader(s)): OTMix "
                           "keeps its confusion matrix")
            return
        self._confusion = confusion

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        stats = self.otmix.end_epoch(self._confusion)
        self._confusion = None  # an epoch without validation keeps the matrix OTMix holds
        scalars = {f"otmix/{k}": float(v) for k, v in stats.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # An epoch with no OT batch (or nothing mixed) has no such number: NaN, so a logger
        # does not keep showing the last OT epoch's value beside this epoch's counts.
        for key in EPOCH_STATISTICS:
            scalars.setdefault(f"otmix/{key}", math.nan)
        pl_module.log_dict(scalars, on_epoch=True)

    # ---- checkpoints -----------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        """One key in checkpoints whatever the subclass, so a resume finds the state."""
        return "otlt.OTMixCallback"

    def state_dict(self) -> dict[str, Any]:
        """OTMix's whole state (confusion, epoch, OT-or-random switch, plans served), the
        generator, and a validation confusion not yet handed to OTMix (a checkpoint saved
        when validation ends, as ModelCheckpoint does with ``check_val_every_n_epoch > 1``,
        comes before the epoch's end hands it over)."""
        return {"otmix": self.otmix.state_dict(), "generator": self.generator.get_state(),
                "pending_confusion": self._confusion}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Checkpoints of otlt 0.1's first callback hold the confusion alone.
        self.otmix.load_state_dict(state_dict.get("otmix")
                                   or {"confusion": state_dict.get("confusion")})
        self.generator.set_state(state_dict["generator"])
        pending = state_dict.get("pending_confusion")
        if pending is not None:  # the epoch's end the checkpoint came before
            self.otmix.update_confusion(pending)


__all__ = ["NETWORK_NAMES", "OTMixCallback", "find_network", "planned_epochs"]
