"""Random-pairing mixers: Mixup, CutMix, SaliencyMix, CMO, Remix."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from otlt.errors import require
from otlt.mixing.base import (
    Mixer,
    check_knobs,
    draw_pairs,
    register_mixer,
)
from otlt.mixing.plan import (
    MixedBatch,
    MixPlan,
    with_saliency_box,
)


@dataclass(frozen=True)
class _RandomPairing(Mixer):
    """Shared knobs of the random-pairing mixers: ``alpha`` of ``Beta(α, α)`` and the
    per-sample ``fraction`` of mixed rows (every batch given is mixed; the per-batch coin is
    :class:`otlt.mixing.MixRecipe`'s)."""

    alpha: float = 1.0
    fraction: float = 1.0

    def __post_init__(self) -> None:
        check_knobs(self.alpha, self.fraction)

    def _pairs(self, x: torch.Tensor, num_partners: int, boxed: bool,
               generator: torch.Generator) -> MixPlan:
        size = (x.shape[-2], x.shape[-1]) if boxed else None
        return draw_pairs(x.shape[0], num_partners, alpha=self.alpha, fraction=self.fraction,
                          image_size=size, generator=generator)


@register_mixer("mixup")
@dataclass(frozen=True)
class Mixup(_RandomPairing):
    """Mixup (Zhang et al., ICLR 2018): ``lam · x_i + (1 − lam) · x_perm(i)``, ``lam ~ Beta(α, α)``.

    ``fraction`` is the share of a batch's rows that are mixed (OTmix Table 7).
    """

    def plan(self, x: torch.Tensor, y: torch.Tensor, x_partner: torch.Tensor | None = None,
             y_partner: torch.Tensor | None = None, *,
             generator: torch.Generator) -> MixPlan:
        """Draw ``lam`` and a random permutation of the batch as partners."""
        self._check_partner(x_partner, y_partner)
        return self._pairs(x, x.shape[0], boxed=False, generator=generator)


@register_mixer("cutmix")
@dataclass(frozen=True)
class CutMix(_RandomPairing):
    """CutMix (Yun et al., ICCV 2019; OTmix eq. 1, appendix 7.1) within one batch.

    One ``lam ~ Beta(α, α)`` and one box per batch; row ``i`` gets the box from row
    ``perm(i)``; ``lam`` is recomputed from the clipped box. OTmix uses ``α = 4``.
    """

    def plan(self, x: torch.Tensor, y: torch.Tensor, x_partner: torch.Tensor | None = None,
             y_partner: torch.Tensor | None = None, *,
             generator: torch.Generator) -> MixPlan:
        """Draw ``lam``, the box and a random permutation of the batch as partners."""
        self._check_partner(x_partner, y_partner)
        return self._pairs(x, x.shape[0], boxed=True, generator=generator)


@register_mixer("saliencymix")
@dataclass(frozen=True)
class SaliencyMix(_RandomPairing):
    """SaliencyMix (Uddin et al., ICLR 2021): CutMix whose box sits on the patch source's
    most salient region (:func:`saliency_box`); one box per batch, as in the paper's code."""

    def plan(self, x: torch.Tensor, y: torch.Tensor, x_partner: torch.Tensor | None = None,
             y_partner: torch.Tensor | None = None, *,
             generator: torch.Generator) -> MixPlan:
        """Draw ``lam`` and partners, then place the box on the first partner's saliency."""
        self._check_partner(x_partner, y_partner)
        return with_saliency_box(self._pairs(x, x.shape[0], boxed=False, generator=generator), x)


@register_mixer("cmo")
@dataclass(frozen=True)
class CMO(_RandomPairing):
    """Context-rich Minority Oversampling (Park et al., CVPR 2022): CutMix across two batches.

    The base batch ``x, y`` is CMO's background (the ordinary uniform loader), the partner
    batch ``x_partner, y_partner`` its foreground (class-weighted:
    :func:`otlt.data.samplers.draw_class_weighted`). Base row ``i`` receives the box from a
    random partner row (without replacement, so the partner batch needs at least as many
    rows). The base keeps label weight ``lam`` (its area share), the partner gets
    ``1 − lam``. ``alpha = 1`` is the CMO code's default
    (``--beta 1``); the OTmix code mixes its CMO-style epochs with ``alpha = 4``.
    """

    needs_partner_batch: ClassVar[bool] = True

    def plan(self, x: torch.Tensor, y: torch.Tensor, x_partner: torch.Tensor | None = None,
             y_partner: torch.Tensor | None = None, *,
             generator: torch.Generator) -> MixPlan:
        """Draw ``lam``, the box and a random partner row for every base row."""
        self._check_partner(x_partner, y_partner)
        assert x_partner is not None
        if x_partner.shape[0] < x.shape[0]:
            raise ValueError(f"partner batch has {x_partner.shape[0]} rows, fewer than the "
                             f"{x.shape[0]} base rows")
        return self._pairs(x, x_partner.shape[0], boxed=True, generator=generator)


@register_mixer("remix")
@dataclass(frozen=True)
class Remix(Mixer):
    """Remix (Chou et al., ECCV 2020): Mixup/CutMix pixels, labels pushed to the minority class.

    With ``lam`` the base image's pixel share and ``n_a``, ``n_b`` the training-set sizes of
    the base and partner classes, the label weight of the base class is (Remix, section 3)::

        lam_y = 0    if n_a / n_b >= kappa  and  lam < tau        (base is majority, partner wins)
        lam_y = 1    if n_a / n_b <= 1/kappa and  1 − lam < tau   (base is minority, base wins)
        lam_y = lam  otherwise

    Defaults are the paper's CIFAR settings ``kappa = 3``, ``tau = 0.5``, ``alpha = 1``.
    ``mode`` picks the pixel mix: ``"mixup"`` (the paper's main form) or ``"cutmix"``.
    """

    class_counts: tuple[int, ...]
    alpha: float = 1.0
    kappa: float = 3.0
    tau: float = 0.5
    mode: str = "mixup"
    fraction: float = 1.0

    def __post_init__(self) -> None:
        check_knobs(self.alpha, self.fraction)
        counts = tuple(int(c) for c in np.asarray(self.class_counts).reshape(-1))
        require(len(counts) > 0 and min(counts) >= 0,
                f"class_counts must be non-negative counts, one per class, got {counts}")
        object.__setattr__(self, "class_counts", counts)
        require(self.kappa >= 1, f"kappa must be >= 1, got {self.kappa}")
        require(0.0 <= self.tau <= 1.0, f"tau must be in [0, 1], got {self.tau}")
        require(self.mode in ("mixup", "cutmix"),
                f"mode must be 'mixup' or 'cutmix', got {self.mode!r}")

    def plan(self, x: torch.Tensor, y: torch.Tensor, x_partner: torch.Tensor | None = None,
             y_partner: torch.Tensor | None = None, *,
             generator: torch.Generator) -> MixPlan:
        """Draw ``lam`` (and a box in cutmix mode) and a random permutation as partners."""
        self._check_partner(x_partner, y_partner)
        size = (x.shape[-2], x.shape[-1]) if self.mode == "cutmix" else None
        return draw_pairs(x.shape[0], x.shape[0], alpha=self.alpha, fraction=self.fraction,
                          image_size=size, generator=generator)

    def label_weights(self, lam: torch.Tensor, base_labels: torch.Tensor,
                      partner_labels: torch.Tensor) -> torch.Tensor:
        """Return the Remix label weights ``lam_y`` for pixel shares ``lam``, ``(B,)`` float32."""
        counts = torch.tensor(self.class_counts, dtype=torch.float32, device=base_labels.device)
        n_a, n_b = counts[base_labels], counts[partner_labels]
        # Products instead of the ratio n_a / n_b so that the boundary n_a = kappa * n_b is exact.
        to_partner = (n_a >= self.kappa * n_b) & (lam < self.tau)
        to_base = (self.kappa * n_a <= n_b) & (1.0 - lam < self.tau)
        out = torch.where(to_partner, torch.zeros_like(lam), lam)
        return torch.where(to_base, torch.ones_like(lam), out)

    def apply(self, plan: MixPlan, x: torch.Tensor, y: torch.Tensor,
              x_partner: torch.Tensor | None = None,
              y_partner: torch.Tensor | None = None) -> MixedBatch:
        """Mix the pixels as planned, then rebalance the label weights of the mixed rows."""
        batch = super().apply(plan, x, y, x_partner, y_partner)
        mixed = plan.mixed.to(batch.lam.device)
        rebalanced = self.label_weights(batch.lam, batch.base_labels, batch.partner_labels)
        return dataclasses.replace(batch, lam=torch.where(mixed, rebalanced, batch.lam))
