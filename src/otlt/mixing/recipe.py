"""The mixing recipe: which epochs mix, which batches, with which partners, by which call.

:class:`MixRecipe` is the one owner of the recipe every caller follows (the engine's training
step and its BatchNorm ``train`` recalibration, the streaming path, the Lightning callback,
the report gallery, the bench, a plain loop). For a run of ``T`` epochs:

- **window**: epoch ``t`` (counted from 0) mixes iff ``skip_first <= t < T - skip_last``
  (``mix.skip_first``, ``mix.skip_last``; the official OTmix code leaves 3 and 3 clean);
- **coin**: inside the window a batch is mixed with probability ``prob`` (``mix.prob``): one
  draw ``u ~ U[0, 1)``, heads (mix) iff ``u < prob``;
- **partners**: a mixer with a partner batch (CMO, OTmix: their foregrounds; the base batch
  is the caller's, their backgrounds) gets ``B`` training images drawn with replacement,
  image ``i`` with probability ``w_i = q_{y_i} / n_{y_i}``, so class ``k`` with probability
  ``q_k ∝ n_k^{-r}`` (``r = mix.sampler_r``; OTmix paper eq. 3,
  :func:`otlt.data.samplers.sample_weights`);
- **mixer call**: ``mixer(x, y, x_partner, y_partner, generator=g, embed=embed)``; the
  feature function ``embed(images (N, C, H, W)) -> (N, D)`` reaches every mixer that uses
  features (OTMix's cost), the others ignore it.

Every draw comes from the caller's generator in one fixed order, which the committed results
depend on: the caller's augmentation of the batch, the coin, the partner indices (then the
caller's augmentation of the partners, in its ``load``), the mixer's plan.

Indices are global: under ``torch.distributed`` every rank draws the same ones from a
generator in the same state and keeps its own rows of each batch (the caller's ``load``
slices them: the recipe knows no ranks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from otlt.config import RunConfig, mixer_params
from otlt.data.samplers import LabelsLike, draw_class_weighted, sample_weights
from otlt.errors import require, warn_renamed
from otlt.mixing.base import Mixer, create_mixer
from otlt.mixing.plan import MixedBatch
from otlt.models.features import feature_fn

Batch = tuple[torch.Tensor, torch.Tensor]
Load = Callable[[torch.Tensor], Batch]
Embed = Callable[[torch.Tensor], torch.Tensor]


def build_mixer(cfg: RunConfig, class_counts: Sequence[int], **params: Any) -> Mixer | None:
    """The mixer ``mix.name`` of ``cfg`` (None for ``none``), built from ``mix.params`` (plan
    epochs resolved against the run; ``params`` override them) and ``mix.fraction``: the one
    place a run's mixer is built (the recipe, the preflight check)."""
    m = cfg.mix
    if m.name == "none":
        return None
    return create_mixer(m.name, class_counts=class_counts, fraction=m.fraction,
                        **{**mixer_params(cfg), **params})


class MixRecipe:
    """The window, the coin, the partner draw and the mixer call of one run.

    Args:
        mixer: the mixer (None: nothing is mixed; the recipe draws nothing).
        labels: ``(N,)`` training labels, the partner pool's classes.
        prob: per-batch mixing probability inside the window.
        skip_first, skip_last: clean epochs at the start and at the end.
        sampler_r: partner class probability ``q_k ∝ n_k^-r`` (0: every class alike, as
            the official CMO/OTmix code; 1: the OTmix paper's text).

    The defaults are the presets' (``otlt.config.MixConfig``).
    """

    def __init__(self, mixer: Mixer | None, labels: LabelsLike, *, prob: float = 0.5,
                 skip_first: int = 3, skip_last: int = 3, sampler_r: float = 0.0) -> None:
        require(0.0 <= prob <= 1.0, f"mixing prob must be in [0, 1], got {prob}")
        require(skip_first >= 0 and skip_last >= 0,
                f"skip_first and skip_last must be >= 0, got {skip_first} and {skip_last}")
        self.mixer = mixer
        self.prob = float(prob)
        self.skip_first, self.skip_last = int(skip_first), int(skip_last)
        self.sampler_r = float(sampler_r)
        self.weights = sample_weights(labels, sampler_r)  # (N,) float64, sums to 1

    @classmethod
    def from_config(cls, cfg: RunConfig, labels: LabelsLike, class_counts: Sequence[int],
                    **params: Any) -> MixRecipe:
        """The recipe of ``cfg.mix``: the mixer ``mix.name`` (None for ``none``) built from
        ``mix.params`` (plan epochs resolved against the run; ``params`` override them) and
        ``mix.fraction``, with the run's window, coin and partner sampler."""
        m = cfg.mix
        return cls(build_mixer(cfg, class_counts, **params), labels, prob=m.prob,
                   skip_first=m.skip_first, skip_last=m.skip_last, sampler_r=m.sampler_r)

    # ---- when ------------------------------------------------------------------------------
    def window(self, epochs: int) -> range:
        """The epochs of a ``epochs``-epoch run that mix (empty when the skips leave none)."""
        return range(self.skip_first, max(self.skip_first, epochs - self.skip_last))

    def in_window(self, epoch: int, epochs: int) -> bool:
        """Whether ``epoch`` of ``epochs`` mixes (never without a mixer)."""
        return self.mixer is not None and epoch in self.window(epochs)

    def start_epoch(self, epoch: int, epochs: int, generator: torch.Generator) -> bool:
        """Before an epoch: the mixer's per-epoch draw (``Mixer.set_epoch``, e.g. OTmix's
        OT-or-random switch, from ``generator``); returns :meth:`in_window`."""
        if self.mixer is None:
            return False
        self.mixer.set_epoch(epoch, epochs, generator=generator)
        return self.in_window(epoch, epochs)

    def coin(self, generator: torch.Generator) -> bool:
        """One batch's coin: heads (mix) with probability ``prob``; one draw."""
        return torch.rand((), generator=generator, dtype=torch.float32).item() < self.prob

    # ---- which partners ------------------------------------------------------------------
    @property
    def needs_partner_batch(self) -> bool:
        """Whether the mixer takes a class-weighted partner batch (CMO, OTmix: their
        foregrounds)."""
        return self.mixer is not None and self.mixer.needs_partner_batch

    def draw_partners(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` global partner indices ``(n,)`` in ``[0, N)``, with replacement,
        ``P(i) = w_i`` (:func:`otlt.data.samplers.draw_class_weighted`); one draw."""
        return draw_class_weighted(self.weights, n, generator)

    @property
    def needs_foreground(self) -> bool:
        """Deprecated name of :attr:`needs_partner_batch`."""
        warn_renamed("MixRecipe.needs_foreground", "MixRecipe.needs_partner_batch")
        return self.needs_partner_batch

    def foreground(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Deprecated name of :meth:`draw_partners`."""
        warn_renamed("MixRecipe.foreground", "MixRecipe.draw_partners")
        return self.draw_partners(n, generator)

    def epoch_draws(self, sizes: Sequence[int], generator: torch.Generator,
                    ) -> tuple[list[bool], list[torch.Tensor]]:
        """Coins and partners of a whole epoch at once, for a caller that must know them
        before it loads images (the streaming path decodes partners only for mixed steps).

        ``sizes``: the steps' global batch sizes. Returns the steps' coins (one draw of
        ``len(sizes)`` uniforms) and, for a mixer with a partner batch, the global
        partner indices of each heads step in order (one draw of their total, split).
        Without a mixer every coin is tails and nothing is drawn.
        """
        if self.mixer is None:
            return [False] * len(sizes), []
        coins = (torch.rand(len(sizes), generator=generator, dtype=torch.float32)
                 < self.prob).tolist()
        heads = [size for size, coin in zip(sizes, coins, strict=True) if coin]
        if not heads or not self.needs_partner_batch:
            return coins, []
        return coins, list(self.draw_partners(sum(heads), generator).split(heads))

    # ---- the mixer call ------------------------------------------------------------------
    def embed_of(self, model: torch.nn.Module, amp_dtype: torch.dtype | None = None,
                 channels_last: bool = False, graphs: bool = False) -> Embed | None:
        """The feature function ``(N, C, H, W) -> (N, D)`` of ``model`` that this recipe's
        mixer uses (:func:`otlt.models.features.feature_fn` in the mixer's
        ``feature_mode``, under ``amp_dtype``, in ``channels_last``, replayed as CUDA graphs
        with ``graphs``); None for a mixer that uses no features, or none."""
        if self.mixer is None or not self.mixer.uses_context:
            return None
        return feature_fn(model, self.mixer.feature_mode, amp_dtype, channels_last, graphs)

    def mix(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *,
            load: Load | None = None, partner: Batch | None = None, size: int | None = None,
            embed: Embed | None = None, model: torch.nn.Module | None = None) -> MixedBatch:
        """Mix ``x (B, C, H, W)``, ``y (B,)`` (this process's rows) with the recipe's mixer.

        A mixer with a partner batch takes ``partner`` ``(x_partner, y_partner)`` when given
        (drawn earlier, e.g. from :meth:`epoch_draws`), else ``load(idx)`` of ``size`` fresh
        partner indices (:meth:`draw_partners`; ``size`` is the global batch, default
        ``B``): ``load`` gathers, augments and keeps this process's rows as the caller does
        for ``x``. ``embed`` (or ``model``, whose features OTMix takes itself) reaches the
        mixers that use features.
        """
        mixer = self.mixer
        require(mixer is not None, "this MixRecipe has no mixer")
        assert mixer is not None
        context = {k: v for k, v in (("embed", embed), ("model", model)) if v is not None}
        if not mixer.needs_partner_batch:
            return mixer(x, y, generator=generator, **context)
        if partner is None:
            require(load is not None, f"{type(mixer).__name__} needs a partner batch: pass "
                                      "load= (or partner=) to MixRecipe.mix")
            assert load is not None
            partner = load(self.draw_partners(size or len(y), generator))
        return mixer(x, y, *partner, generator=generator, **context)

    def step(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
             **how: Any) -> MixedBatch | None:
        """One batch inside the window: the coin, then on heads :meth:`mix` (``how`` are its
        keywords); None for a clean batch. Without a mixer: None, nothing drawn."""
        if self.mixer is None or not self.coin(generator):
            return None
        return self.mix(x, y, generator, **how)

    def for_recalibration(self, epoch: int, epochs: int) -> MixRecipe:
        """A copy for BatchNorm's ``train`` recalibration batches after ``epoch``: its mixer
        is the mixer's :meth:`~otlt.mixing.Mixer.recalibration_copy` (the run's is left as it
        is; no small OT plans are kept) that redraws its per-epoch switch of
        ``epoch`` before every batch it mixes (after the coin, before the partners)."""
        clone = _RecalibrationRecipe.__new__(_RecalibrationRecipe)
        clone.__dict__.update(self.__dict__)
        clone.mixer = None if self.mixer is None else self.mixer.recalibration_copy()
        clone.redraw = (epoch, epochs)
        return clone


class _RecalibrationRecipe(MixRecipe):
    """:meth:`MixRecipe.for_recalibration`'s copy: the mixer's per-epoch switch is redrawn
    before every mixed batch, so the training step's recipe carries no such case."""

    redraw: tuple[int, int]

    def mix(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
            **how: Any) -> MixedBatch:
        if self.mixer is not None:
            self.mixer.set_epoch(*self.redraw, generator=generator)
        return super().mix(x, y, generator, **how)


__all__ = ["MixRecipe", "build_mixer"]
