"""OTmix in a Lightning training loop: one callback does the glue.

:class:`OTMixCallback` holds the OTMix mixer, the class-weighted foreground sampler and the
recipe of the presets (mix a batch with probability ``prob``, not in the first ``skip_first``
and last ``skip_last`` epochs). Your ``LightningModule`` calls :meth:`OTMixCallback.mix` in
``training_step``; the callback draws the OT-or-random switch each epoch, builds the
validation confusion matrix from the validation batches (one extra forward pass of each),
hands it to OTMix when the training epoch ends, logs the mixing statistics, and saves the
confusion matrix and its generator in Lightning checkpoints, so a resumed run mixes exactly
as before::

    otmix = OTMixCallback(train_images, train_labels, num_classes=10)
    trainer = lightning.Trainer(callbacks=[otmix], max_epochs=240)

    class Module(lightning.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            mixed = otmix.mix(self, x, y)          # None: this batch stays clean
            if mixed is None:
                return batch_loss(self.criterion, self(x), y)
            return batch_loss(self.criterion, self(mixed.images), mixed.targets_a,
                              mixed.targets_b, mixed.lam)

Requires ``pip install otlt[lightning]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("otlt.integrations.lightning needs Lightning: pip install "
                      "'otlt[lightning]'") from exc

from otlt.data.samplers import sample_weights
from otlt.metrics import confusion_matrix
from otlt.mixing import MixedBatch, OTMix
from otlt.models.features import feature_fn


class OTMixCallback(Callback):
    """The OTmix recipe for a Lightning ``Trainer`` (see the module docstring).

    Args:
        train_images: ``(N, C, H, W)`` foreground pool (the training images, on any device;
            moved to the module's device per draw), already as the model takes them, or
            raw with ``foreground_transform(images, generator)`` to augment a draw.
        train_labels: ``(N,)`` their labels.
        num_classes: K.
        prob, skip_first, skip_last: the presets' recipe (0.5, 3, 3).
        sampler_r: foreground class probability ``q_k ∝ n_k^-r`` (0: every class alike).
        seed: the callback's generator (draws, coins, boxes, OT row sampling).
        embed: ``(module) -> features function``; default :func:`otlt.models.features.feature_fn`.
        **otmix_options: :class:`otlt.mixing.OTMix` options (omega, eps, alpha, mu, ...).
    """

    def __init__(self, train_images: torch.Tensor, train_labels: torch.Tensor,
                 num_classes: int, *, prob: float = 0.5, skip_first: int = 3,
                 skip_last: int = 3, sampler_r: float = 0.0, seed: int = 0,
                 foreground_transform: Callable[[torch.Tensor, torch.Generator],
                                                torch.Tensor] | None = None,
                 embed: Callable[[torch.nn.Module], Callable] | None = None,
                 **otmix_options: Any) -> None:
        super().__init__()
        self.images, self.labels = train_images, train_labels.long()
        counts = torch.bincount(self.labels.cpu(), minlength=num_classes).tolist()
        self.otmix = OTMix(class_counts=counts, num_classes=num_classes, **otmix_options)
        self.weights = sample_weights(self.labels.cpu(), sampler_r)
        self.prob, self.skip_first, self.skip_last = prob, skip_first, skip_last
        self.transform = foreground_transform
        self.embed = embed or (lambda module: feature_fn(module))
        self.generator = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        self._confusion: torch.Tensor | None = None
        self._mixing = False

    # ---- what training_step calls --------------------------------------------------------
    def mix(self, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> MixedBatch | None:
        """Mix the batch with OTmix (with probability ``prob`` inside the mixing window), or
        return None for a clean batch."""
        if not self._mixing or torch.rand((), generator=self.generator).item() >= self.prob:
            return None
        idx = torch.multinomial(self.weights, len(y), replacement=True,
                                generator=self.generator)
        xf = self.images[idx.to(self.images.device)].to(x.device)
        if self.transform is not None:
            xf = self.transform(xf, self.generator)
        yf = self.labels[idx.to(self.labels.device)].to(y.device)
        return self.otmix(x, y, xf, yf, generator=self.generator, embed=self.embed(module))

    # ---- Lightning hooks -----------------------------------------------------------------
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        epoch, total = trainer.current_epoch, trainer.max_epochs or 1
        self._mixing = self.skip_first <= epoch < total - self.skip_last
        self.otmix.set_epoch(epoch, total, generator=self.generator)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx: int = 0) -> None:
        x, y = batch[0], batch[1]
        preds = pl_module(x).argmax(1)
        self._confusion += confusion_matrix(preds, y, self.num_classes).cpu()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        stats = self.otmix.end_epoch(self._confusion)
        scalars = {f"otmix/{k}": float(v) for k, v in stats.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            pl_module.log_dict(scalars, on_epoch=True)

    # ---- checkpoints -----------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        """One key in checkpoints whatever the subclass, so a resume finds the state."""
        return "otlt.OTMixCallback"

    def state_dict(self) -> dict[str, Any]:
        return {"confusion": self.otmix.confusion, "generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.otmix.load_state_dict({"confusion": state_dict.get("confusion")})
        self.generator.set_state(state_dict["generator"])


__all__ = ["OTMixCallback"]
