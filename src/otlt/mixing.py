"""Batch mixers for long-tailed training: Mixup, CutMix, CMO and Remix.

Every mixer follows one calling convention::

    mixed = mixer(x, y, x_partner, y_partner, generator=g)   # == mixer.apply(mixer.plan(...), ...)
    loss = mixed.mix_losses(criterion(logits, mixed.targets_a), criterion(logits, mixed.targets_b))

*Planning* (:meth:`Mixer.plan`) draws everything random: whether the batch is mixed, the
mixing ratio ``lam``, the CutMix box, the partner of every row and which rows are mixed. The
result is a :class:`MixPlan`, small CPU tensors that fully determine the mix and can be logged
(:meth:`MixPlan.to_dict`). *Applying* (:meth:`Mixer.apply`, :func:`apply_plan`) is
deterministic and runs on the batch's device and dtype; it never modifies its inputs.

Row ``i`` of the output, for a base batch ``x`` (the background) and a partner batch ``x'``
(the foreground, ``x' = x`` for same-batch mixers), with ``b = base_index[i]`` and
``p = partner[i]``::

    not mixed[i]:   x[b]                          label weight 1 on y[b]
    CutMix:         M ⊙ x[b] + (1 − M) ⊙ x'[p]    label weight lam on y[b], 1 − lam on y'[p]
    Mixup:          lam · x[b] + (1 − lam) · x'[p]  (same label weights)

where ``M`` is 0 inside the box and 1 outside (OTmix eq. 1 and 9, appendix 7.1) and ``lam`` is
the base image's share of the pixels. OTMix is CMO with OT-chosen pairs: it can reuse
:func:`apply_plan` with ``base_index[i] = j*(i)`` (the background chosen for foreground ``i``)
and ``partner = arange(B)``.

Randomness comes only from the ``generator`` argument, a CPU :class:`torch.Generator`: plans
are drawn on the CPU (a handful of numbers per batch, no device synchronisation) and the index
tensors are moved to the batch's device when applied. The draws happen in a fixed order: the
per-batch coin, ``lam``, the box centre (CutMix family), the partners, the mixed rows.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from scipy.special import betaincinv

from otlt.errors import OtltError, require

__all__ = [
    "CMO",
    "Box",
    "CutMix",
    "MixPlan",
    "MixedBatch",
    "Mixer",
    "Mixup",
    "NoMix",
    "Remix",
    "SaliencyMix",
    "apply_plan",
    "box_lam",
    "create_mixer",
    "list_mixers",
    "mixup_images",
    "paste_box",
    "register_mixer",
    "sample_cutmix_box",
    "sample_lam",
    "saliency_box",
    "spectral_residual_saliency",
]

Box = tuple[int, int, int, int]
"""A box ``(y0, y1, x0, x1)``: rows ``y0:y1`` and columns ``x0:x1`` (half-open)."""


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class MixPlan:
    """Everything random about one mixed batch; with the inputs it determines the output.

    Attributes:
        lam: share of the base image in a mixed row: its pixel weight (Mixup) or the area
            fraction outside the box (CutMix, ``box_lam(box, H, W)``). ``1.0`` when unmixed.
        box: CutMix box ``(y0, y1, x0, x1)`` shared by all mixed rows, or ``None`` for a
            pixel-wise blend (Mixup).
        base_index: ``(B,)`` long, row of the base (background) batch used for output row ``i``.
        partner: ``(B,)`` long, row of the partner batch (the patch / foreground) for row ``i``.
        mixed: ``(B,)`` bool, which output rows are mixed; the others are the clean base image.
    """

    lam: float
    box: Box | None
    base_index: torch.Tensor
    partner: torch.Tensor
    mixed: torch.Tensor

    def __post_init__(self) -> None:
        b = self.base_index.shape
        if len(b) != 1 or self.partner.shape != b or self.mixed.shape != b:
            raise ValueError("base_index, partner and mixed must be 1-D of one length, got "
                             f"{tuple(b)}, {tuple(self.partner.shape)}, {tuple(self.mixed.shape)}")
        if self.base_index.dtype != torch.long or self.partner.dtype != torch.long:
            raise ValueError("base_index and partner must be int64 tensors")
        if self.mixed.dtype != torch.bool:
            raise ValueError(f"mixed must be a bool tensor, got {self.mixed.dtype}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if self.box is not None:
            y0, y1, x0, x1 = self.box
            if not (0 <= y0 <= y1 and 0 <= x0 <= x1):
                raise ValueError(f"box must satisfy 0 <= y0 <= y1, 0 <= x0 <= x1, got {self.box}")

    @classmethod
    def identity(cls, batch_size: int) -> MixPlan:
        """Return the plan that leaves a batch of ``batch_size`` rows unmixed."""
        rows = torch.arange(batch_size)
        return cls(1.0, None, rows, rows.clone(), torch.zeros(batch_size, dtype=torch.bool))

    @property
    def batch_size(self) -> int:
        return int(self.base_index.numel())

    @property
    def num_mixed(self) -> int:
        return int(self.mixed.sum())

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as plain Python values (JSON-serialisable), for logs."""
        return {
            "lam": float(self.lam),
            "box": None if self.box is None else [int(v) for v in self.box],
            "base_index": self.base_index.tolist(),
            "partner": self.partner.tolist(),
            "mixed": self.mixed.tolist(),
        }


@dataclass
class MixedBatch:
    """A mixed batch and its two label sets.

    Attributes:
        images: ``(B, C, H, W)``, dtype and device of the input images.
        targets_a: ``(B,)`` long, labels of the base (background) image of each row.
        targets_b: ``(B,)`` long, labels of the partner (pasted patch / foreground) image.
        lam: ``(B,)`` float32, the label weight of ``targets_a``; ``1 - lam`` goes to
            ``targets_b``. Equals the plan's ``lam`` on mixed rows, 1 on unmixed rows, and
            differs from it where a mixer rebalances labels (Remix).
        plan: the :class:`MixPlan` that produced this batch.
    """

    images: torch.Tensor
    targets_a: torch.Tensor
    targets_b: torch.Tensor
    lam: torch.Tensor
    plan: MixPlan

    def soft_targets(self, num_classes: int) -> torch.Tensor:
        """Return ``lam · onehot(a) + (1 − lam) · onehot(b)``, ``(B, K)`` float32, rows sum to 1."""
        one_a = torch.nn.functional.one_hot(self.targets_a, num_classes).to(torch.float32)
        one_b = torch.nn.functional.one_hot(self.targets_b, num_classes).to(torch.float32)
        lam = self.lam[:, None]
        return lam * one_a + (1.0 - lam) * one_b

    def mix_losses(self, loss_a: torch.Tensor, loss_b: torch.Tensor) -> torch.Tensor:
        """Return ``lam · loss_a + (1 − lam) · loss_b`` per row (OTmix eq. 10), ``(B,)``.

        ``loss_a`` and ``loss_b`` are per-example losses (``reduction="none"``) against
        ``targets_a`` and ``targets_b``.
        """
        lam = self.lam.to(loss_a.dtype)
        return lam * loss_a + (1.0 - lam) * loss_b


# ----------------------------------------------------------------------------- primitives


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator (plans are drawn on the CPU)")


def sample_lam(alpha: float, generator: torch.Generator) -> float:
    """Draw ``lam ~ Beta(alpha, alpha)`` from ``generator`` by inverting the Beta CDF."""
    _check_generator(generator)
    require(alpha > 0, f"alpha must be > 0, got {alpha}")
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    return float(betaincinv(alpha, alpha, u))


def sample_cutmix_box(height: int, width: int, lam: float, generator: torch.Generator) -> Box:
    """Draw a CutMix box of area ratio about ``1 − lam`` (OTmix appendix 7.1, eq. 11).

    The box has the image's aspect ratio: ``h = int(H · sqrt(1 − lam))``,
    ``w = int(W · sqrt(1 − lam))``; its centre ``(cy, cx)`` is uniform over the pixel grid and
    the box is clipped at the border, so the pasted area can be smaller than ``1 − lam``. Use
    :func:`box_lam` for the corrected ``lam``. Unlike the official code (which spans
    ``cx ± w // 2`` and so loses a column when ``w`` is odd) an unclipped box is exactly
    ``h × w``.
    """
    _check_generator(generator)
    require(height >= 1 and width >= 1, f"image size must be >= 1, got {height}x{width}")
    require(0.0 <= lam <= 1.0, f"lam must be in [0, 1], got {lam}")
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(torch.randint(height, (), generator=generator))
    cx = int(torch.randint(width, (), generator=generator))
    y0, x0 = cy - cut_h // 2, cx - cut_w // 2
    return (max(y0, 0), min(y0 + cut_h, height), max(x0, 0), min(x0 + cut_w, width))


def spectral_residual_saliency(image: torch.Tensor) -> torch.Tensor:
    """Saliency map ``(H, W)`` of one image ``(C, H, W)`` by the spectral residual.

    Hou & Zhang (CVPR 2007), the static saliency SaliencyMix takes from OpenCV: with the
    grey image's spectrum ``A e^{i P}`` and ``L = log A``, the saliency is
    ``|ifft(exp(L - mean3x3(L) + i P))|^2`` smoothed by a 3x3 mean filter.
    """
    grey = image.float().mean(0)
    spectrum = torch.fft.fft2(grey)
    log_amp = torch.log(spectrum.abs() + 1e-8)
    smooth = torch.nn.functional.avg_pool2d(log_amp[None, None], 3, stride=1, padding=1,
                                            count_include_pad=False)[0, 0]
    residual = torch.polar(torch.exp(log_amp - smooth), torch.angle(spectrum))
    saliency = torch.fft.ifft2(residual).abs() ** 2
    return torch.nn.functional.avg_pool2d(saliency[None, None], 3, stride=1, padding=1,
                                          count_include_pad=False)[0, 0]


def saliency_box(image: torch.Tensor, lam: float) -> Box:
    """SaliencyMix's box (Uddin et al., ICLR 2021): CutMix's size for ``lam``, centred on the
    most salient pixel of the patch source ``image (C, H, W)``, clipped at the border."""
    height, width = image.shape[-2:]
    flat = int(spectral_residual_saliency(image).argmax())
    cy, cx = divmod(flat, width)
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    y0, x0 = cy - cut_h // 2, cx - cut_w // 2
    return (max(y0, 0), min(y0 + cut_h, height), max(x0, 0), min(x0 + cut_w, width))


def with_saliency_box(plan: MixPlan, patches: torch.Tensor) -> MixPlan:
    """Replace a mixed plan's box by the saliency box of its first patch source row.

    ``plan.lam`` must be the drawn (uncorrected) ``lam`` (a plan drawn without a box);
    ``patches`` is the batch the partners index. One box per batch, as in SaliencyMix's code.
    """
    if not bool(plan.mixed.any()):
        return plan
    first = int(plan.partner[int(plan.mixed.nonzero()[0])])
    box = saliency_box(patches[first], plan.lam)
    return dataclasses.replace(plan, box=box, lam=box_lam(box, *patches.shape[-2:]))


def box_lam(box: Box, height: int, width: int) -> float:
    """Return ``1 − area(box) / (H · W)``, the base image's exact share of the pixels."""
    y0, y1, x0, x1 = box
    return 1.0 - (max(y1 - y0, 0) * max(x1 - x0, 0)) / (height * width)


def paste_box(base: torch.Tensor, patch: torch.Tensor, box: Box) -> torch.Tensor:
    """Return a copy of ``base`` whose ``box`` region comes from ``patch``, ``(B, C, H, W)``."""
    if base.shape != patch.shape:
        raise ValueError(f"base {tuple(base.shape)} and patch {tuple(patch.shape)} differ")
    y0, y1, x0, x1 = box
    out = base.clone()
    out[..., y0:y1, x0:x1] = patch[..., y0:y1, x0:x1]
    return out


def mixup_images(base: torch.Tensor, patch: torch.Tensor, lam: float) -> torch.Tensor:
    """Return ``lam · base + (1 − lam) · patch`` in ``base``'s dtype (integers are rounded)."""
    if base.shape != patch.shape:
        raise ValueError(f"base {tuple(base.shape)} and patch {tuple(patch.shape)} differ")
    if base.is_floating_point():
        return torch.lerp(patch, base, lam)
    blend = torch.lerp(patch.to(torch.float32), base.to(torch.float32), lam)
    info = torch.iinfo(base.dtype)
    return blend.round_().clamp_(info.min, info.max).to(base.dtype)


def _check_batch(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what} images must be (B, C, H, W), got {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{what} labels must be ({x.shape[0]},), got {tuple(y.shape)}")


def apply_plan(plan: MixPlan, x: torch.Tensor, y: torch.Tensor,
               x_partner: torch.Tensor | None = None,
               y_partner: torch.Tensor | None = None) -> MixedBatch:
    """Mix a batch as ``plan`` says; the partner batch defaults to the base batch itself.

    ``x``: ``(N, C, H, W)`` base images, ``y``: ``(N,)`` labels; ``x_partner``, ``y_partner``:
    ``(N', C, H, W)``, ``(N',)``. The output has ``plan.batch_size`` rows on ``x``'s device
    and dtype. The inputs are never modified; when no row is mixed and ``base_index`` is the
    identity the returned images are ``x`` itself.
    """
    if x_partner is None:
        x_partner, y_partner = x, y
    if y_partner is None:
        raise ValueError("y_partner is required with x_partner")
    _check_batch(x, y, "base")
    _check_batch(x_partner, y_partner, "partner")
    if x_partner.shape[1:] != x.shape[1:] or x_partner.dtype != x.dtype \
            or x_partner.device != x.device:
        raise ValueError(f"partner images {tuple(x_partner.shape)} {x_partner.dtype} "
                         f"{x_partner.device} must match base images' (C, H, W), dtype, device "
                         f"{tuple(x.shape)} {x.dtype} {x.device}")
    device = x.device
    base_index = plan.base_index.to(device, non_blocking=True)
    partner = plan.partner.to(device, non_blocking=True)
    row_lam = torch.where(plan.mixed, plan.lam, 1.0).to(torch.float32)
    targets_a, targets_b = y.index_select(0, base_index), y_partner.index_select(0, partner)
    lam = row_lam.to(device, non_blocking=True)
    if not bool(plan.mixed.any()):  # plan tensors of unmixed batches are on the CPU: no sync
        identity = plan.base_index.numel() == x.shape[0] and bool(
            torch.equal(plan.base_index, torch.arange(x.shape[0], device=plan.base_index.device)))
        if identity:
            return MixedBatch(x, targets_a, targets_b, lam, plan)
    images = x.index_select(0, base_index)
    mixed = plan.mixed.to(device, non_blocking=True).view(-1, 1, 1, 1)
    if plan.box is not None:
        y0, y1, x0, x1 = plan.box
        # Gather only the box region of the partners: far less memory traffic than whole images.
        region = x_partner[:, :, y0:y1, x0:x1].index_select(0, partner)
        images[:, :, y0:y1, x0:x1] = torch.where(mixed, region, images[:, :, y0:y1, x0:x1])
    else:
        blended = mixup_images(images, x_partner.index_select(0, partner), plan.lam)
        images = torch.where(mixed, blended, images)
    return MixedBatch(images, targets_a, targets_b, lam, plan)


# ----------------------------------------------------------------------------- mixers


def _check_knobs(alpha: float, prob: float, fraction: float) -> None:
    require(alpha > 0, f"alpha must be > 0, got {alpha}")
    require(0.0 <= prob <= 1.0, f"prob must be in [0, 1], got {prob}")
    require(0.0 < fraction <= 1.0, f"fraction must be in (0, 1], got {fraction}")


def _draw_pairs(batch_size: int, num_partners: int, *, alpha: float, prob: float,
                fraction: float, image_size: tuple[int, int] | None,
                generator: torch.Generator) -> MixPlan:
    """Draw a random-pairing plan: the coin, ``lam``, the box, the partners, the mixed rows.

    ``image_size = (H, W)`` asks for a CutMix box, ``None`` for a Mixup blend. Partners are
    ``num_partners`` rows drawn without replacement (a permutation when sizes are equal).
    """
    _check_generator(generator)
    if torch.rand((), generator=generator).item() >= prob:
        return MixPlan.identity(batch_size)
    lam = sample_lam(alpha, generator)
    box = None
    if image_size is not None:
        box = sample_cutmix_box(*image_size, lam, generator)
        lam = box_lam(box, *image_size)
    partner = torch.randperm(num_partners, generator=generator)[:batch_size]
    mixed = torch.ones(batch_size, dtype=torch.bool)
    if fraction < 1.0:
        count = max(1, math.floor(fraction * batch_size + 0.5))
        mixed = torch.zeros(batch_size, dtype=torch.bool)
        mixed[torch.randperm(batch_size, generator=generator)[:count]] = True
    return MixPlan(lam, box, torch.arange(batch_size), partner, mixed)


class Mixer:
    """Base class: ``plan`` draws a :class:`MixPlan`, ``apply`` executes it, ``__call__`` both.

    Subclasses set ``name``, ``needs_partner_batch`` (True when the mixer takes a second,
    separately sampled batch, e.g. CMO's class-weighted foreground batch) and ``uses_context``
    (True when ``plan`` takes extra keyword inputs, e.g. OTMix's ``model`` for features).
    """

    name: ClassVar[str] = ""
    needs_partner_batch: ClassVar[bool] = False
    uses_context: ClassVar[bool] = False

    def _check_partner(self, x_partner: torch.Tensor | None,
                       y_partner: torch.Tensor | None) -> None:
        given = x_partner is not None or y_partner is not None
        if self.needs_partner_batch and (x_partner is None or y_partner is None):
            raise ValueError(f"{type(self).__name__} needs a partner batch (x_partner, y_partner)")
        if given and not self.needs_partner_batch:
            raise ValueError(f"{type(self).__name__} mixes within one batch; "
                             "got an unexpected partner batch")

    def plan(self, x: torch.Tensor, y: torch.Tensor, x_partner: torch.Tensor | None = None,
             y_partner: torch.Tensor | None = None, *,
             generator: torch.Generator) -> MixPlan:
        """Draw the plan for mixing ``x`` (and ``x_partner``) from ``generator``."""
        raise NotImplementedError

    def apply(self, plan: MixPlan, x: torch.Tensor, y: torch.Tensor,
              x_partner: torch.Tensor | None = None,
              y_partner: torch.Tensor | None = None) -> MixedBatch:
        """Execute ``plan`` on the batch (deterministic, on the batch's device)."""
        self._check_partner(x_partner, y_partner)
        return apply_plan(plan, x, y, x_partner, y_partner)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, x_partner: torch.Tensor | None = None,
                 y_partner: torch.Tensor | None = None, *, generator: torch.Generator,
                 **context: Any) -> MixedBatch:
        """Plan and apply in one go: ``apply(plan(...), ...)``.

        ``context`` (e.g. ``model=``, ``amp_dtype=``) goes to :meth:`plan` when the mixer
        ``uses_context``; the others ignore it, so an engine can call every mixer alike.
        """
        extra = context if self.uses_context else {}
        plan = self.plan(x, y, x_partner, y_partner, generator=generator, **extra)
        return self.apply(plan, x, y, x_partner, y_partner)


_REGISTRY: dict[str, type[Mixer]] = {}
M = TypeVar("M", bound=type[Mixer])


def register_mixer(name: str) -> Callable[[M], M]:
    """Register a :class:`Mixer` subclass under ``name`` for :func:`create_mixer`."""

    def decorator(cls: M) -> M:
        if name in _REGISTRY:
            raise ValueError(f"mixer {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


@register_mixer("none")
@dataclass(frozen=True)
class NoMix(Mixer):
    """Leave every batch clean (the ``none`` mixer), with the same interface as the others."""

    def plan(self, x: torch.Tensor, y: torch.Tensor, x_partner: torch.Tensor | None = None,
             y_partner: torch.Tensor | None = None, *,
             generator: torch.Generator) -> MixPlan:
        """Return the identity plan."""
        self._check_partner(x_partner, y_partner)
        return MixPlan.identity(x.shape[0])


@dataclass(frozen=True)
class _RandomPairing(Mixer):
    """Shared knobs of the random-pairing mixers: ``alpha`` of ``Beta(α, α)``, the per-batch
    mixing probability ``prob`` and the per-sample ``fraction`` of mixed rows."""

    alpha: float = 1.0
    prob: float = 1.0
    fraction: float = 1.0

    def __post_init__(self) -> None:
        _check_knobs(self.alpha, self.prob, self.fraction)

    def _pairs(self, x: torch.Tensor, num_partners: int, boxed: bool,
               generator: torch.Generator) -> MixPlan:
        size = (x.shape[-2], x.shape[-1]) if boxed else None
        return _draw_pairs(x.shape[0], num_partners, alpha=self.alpha, prob=self.prob,
                           fraction=self.fraction, image_size=size, generator=generator)


@register_mixer("mixup")
@dataclass(frozen=True)
class Mixup(_RandomPairing):
    """Mixup (Zhang et al., ICLR 2018): ``lam · x_i + (1 − lam) · x_perm(i)``, ``lam ~ Beta(α, α)``.

    ``prob`` is the chance that a batch is mixed at all; ``fraction`` the share of its rows
    that are mixed (OTmix Table 7).
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

    ``x, y`` is the background batch (the ordinary uniform loader), ``x_partner, y_partner``
    the foreground batch from :class:`otlt.data.samplers.ClassWeightedSampler`. Background row
    ``i`` receives the box from a random foreground row (without replacement, so the
    foreground batch needs at least as many rows). The background keeps label weight ``lam``
    (its area share), the foreground gets ``1 − lam``. ``alpha = 1`` is the CMO code's default
    (``--beta 1``); the OTmix code mixes its CMO-style epochs with ``alpha = 4``.
    """

    needs_partner_batch: ClassVar[bool] = True

    def plan(self, x: torch.Tensor, y: torch.Tensor, x_partner: torch.Tensor | None = None,
             y_partner: torch.Tensor | None = None, *,
             generator: torch.Generator) -> MixPlan:
        """Draw ``lam``, the box and a random foreground row for every background row."""
        self._check_partner(x_partner, y_partner)
        assert x_partner is not None
        if x_partner.shape[0] < x.shape[0]:
            raise ValueError(f"foreground batch has {x_partner.shape[0]} rows, fewer than the "
                             f"{x.shape[0]} background rows")
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
    prob: float = 1.0
    fraction: float = 1.0

    def __post_init__(self) -> None:
        _check_knobs(self.alpha, self.prob, self.fraction)
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
        return _draw_pairs(x.shape[0], x.shape[0], alpha=self.alpha, prob=self.prob,
                           fraction=self.fraction, image_size=size, generator=generator)

    def label_weights(self, lam: torch.Tensor, targets_a: torch.Tensor,
                      targets_b: torch.Tensor) -> torch.Tensor:
        """Return the Remix label weights ``lam_y`` for pixel shares ``lam``, ``(B,)`` float32."""
        counts = torch.tensor(self.class_counts, dtype=torch.float32, device=targets_a.device)
        n_a, n_b = counts[targets_a], counts[targets_b]
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
        rebalanced = self.label_weights(batch.lam, batch.targets_a, batch.targets_b)
        return dataclasses.replace(batch, lam=torch.where(mixed, rebalanced, batch.lam))


# ----------------------------------------------------------------------------- registry


def list_mixers() -> list[str]:
    """Return the registered mixer names, sorted."""
    return sorted(_REGISTRY)


def create_mixer(name: str, class_counts: Sequence[int] | None = None, **kwargs: Any) -> Mixer:
    """Build the mixer registered as ``name`` with options ``kwargs``.

    ``class_counts`` (training images per class) is passed to the mixers that need it
    (Remix) and ignored by the others, so an engine can always pass it.
    """
    if name not in _REGISTRY:
        raise OtltError(f"unknown mixer {name!r}; expected one of {', '.join(list_mixers())}")
    cls = _REGISTRY[name]
    params = inspect.signature(cls).parameters
    options = sorted(p for p in params if p != "class_counts")
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise OtltError(f"unknown option(s) {', '.join(unknown)} for mixer {name!r}; expected "
                        f"{', '.join(options) or 'none'}")
    if "class_counts" in params:
        if class_counts is None:
            raise OtltError(f"mixer {name!r} needs class_counts (training images per class)")
        kwargs["class_counts"] = class_counts
    try:
        return cls(**kwargs)
    except TypeError as error:  # e.g. a string where a number was expected
        raise OtltError(f"bad option for mixer {name!r}: {error}") from error


from otlt.otmix import OTMix, otmix_cost  # noqa: E402  (registers "otmix"; needs the above)

__all__ += ["OTMix", "otmix_cost"]
