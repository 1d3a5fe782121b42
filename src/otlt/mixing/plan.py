"""Mix plans and applying them: MixPlan, MixedBatch, boxes, saliency, apply_plan (no state)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from scipy.special import betaincinv

from otlt.errors import OtltError, require, warn_renamed
from otlt.labels import check_labels

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
        base_index: ``(B,)`` long, row of the base batch (CMO's and OTmix's background)
            used for output row ``i``.
        partner_index: ``(B,)`` long, row of the partner batch (the pasted patch or blended
            image; CMO's and OTmix's foreground) for row ``i``.
        mixed: ``(B,)`` bool, which output rows are mixed; the others are the clean base image.
    """

    lam: float
    box: Box | None
    base_index: torch.Tensor
    partner_index: torch.Tensor
    mixed: torch.Tensor

    def __post_init__(self) -> None:
        b, p = self.base_index.shape, self.partner_index.shape
        if len(b) != 1 or p != b or self.mixed.shape != b:
            raise ValueError("base_index, partner_index and mixed must be 1-D of one length, "
                             f"got {tuple(b)}, {tuple(p)}, {tuple(self.mixed.shape)}")
        if self.base_index.dtype != torch.long or self.partner_index.dtype != torch.long:
            raise ValueError("base_index and partner_index must be int64 tensors")
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
    def partner(self) -> torch.Tensor:
        """Deprecated name of :attr:`partner_index`."""
        warn_renamed("MixPlan.partner", "MixPlan.partner_index")
        return self.partner_index

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
            "partner_index": self.partner_index.tolist(),
            "mixed": self.mixed.tolist(),
        }


@dataclass
class MixedBatch:
    """A mixed batch and its two label sets.

    Attributes:
        images: ``(B, C, H, W)``, dtype and device of the input images.
        base_labels: ``(B,)`` long, label of each row's base image.
        partner_labels: ``(B,)`` long, label of each row's partner image (for an unmixed row
            it carries label weight 0).
        lam: ``(B,)`` float32, the label weight of ``base_labels``; ``1 - lam`` goes to
            ``partner_labels``. Equals the plan's ``lam`` on mixed rows, 1 on unmixed rows,
            and differs from it where a mixer rebalances labels (Remix).
        plan: the :class:`MixPlan` that produced this batch.
    """

    images: torch.Tensor
    base_labels: torch.Tensor
    partner_labels: torch.Tensor
    lam: torch.Tensor
    plan: MixPlan

    @property
    def targets_a(self) -> torch.Tensor:
        """Deprecated name of :attr:`base_labels`."""
        warn_renamed("MixedBatch.targets_a", "MixedBatch.base_labels")
        return self.base_labels

    @property
    def targets_b(self) -> torch.Tensor:
        """Deprecated name of :attr:`partner_labels`."""
        warn_renamed("MixedBatch.targets_b", "MixedBatch.partner_labels")
        return self.partner_labels

    def soft_targets(self, num_classes: int) -> torch.Tensor:
        """Return ``lam · onehot(base) + (1 − lam) · onehot(partner)``, ``(B, K)`` float32,
        rows sum to 1."""
        one_base = torch.nn.functional.one_hot(self.base_labels, num_classes).to(torch.float32)
        one_partner = torch.nn.functional.one_hot(self.partner_labels,
                                                  num_classes).to(torch.float32)
        lam = self.lam[:, None]
        return lam * one_base + (1.0 - lam) * one_partner


# ----------------------------------------------------------------------------- primitives


def check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator (plans are drawn on the CPU)")


def sample_lam(alpha: float, generator: torch.Generator) -> float:
    """Draw ``lam ~ Beta(alpha, alpha)`` from ``generator`` by inverting the Beta CDF."""
    check_generator(generator)
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
    check_generator(generator)
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
    first = int(plan.partner_index[int(plan.mixed.nonzero()[0])])
    box = saliency_box(patches[first], plan.lam)
    return dataclasses.replace(plan, box=box, lam=box_lam(box, *patches.shape[-2:]))


def box_lam(box: Box, height: int, width: int) -> float:
    """Return ``1 − area(box) / (H · W)``, the base image's exact share of the pixels."""
    y0, y1, x0, x1 = box
    return 1.0 - (max(y1 - y0, 0) * max(x1 - x0, 0)) / (height * width)


def mixup_images(base: torch.Tensor, patch: torch.Tensor, lam: float) -> torch.Tensor:
    """Return ``lam · base + (1 − lam) · patch`` in ``base``'s dtype (integers are rounded)."""
    if base.shape != patch.shape:
        raise ValueError(f"base {tuple(base.shape)} and patch {tuple(patch.shape)} differ")
    if base.is_floating_point():
        return torch.lerp(patch, base, lam)
    blend = torch.lerp(patch.to(torch.float32), base.to(torch.float32), lam)
    info = torch.iinfo(base.dtype)
    return blend.round_().clamp_(info.min, info.max).to(base.dtype)


TO_MODEL_INPUTS = ("uint8 (B, H, W, 3) images, as otlt's loaders keep them, become model inputs "
                   "with otlt.data.augment.BatchAugment (training) or eval_transform")


def check_model_inputs(x: torch.Tensor, what: str, floating: bool = False) -> None:
    """Refuse images that are not a batch ``(B, C, H, W)`` (one image, a video clip), images
    in the loaders' layout, ``(B, H, W, 3)``, where a mixer expects model inputs (a CutMix
    box would be cut across width and channels), and, with ``floating``, integer images
    where features are computed (OTMix's cost)."""
    if x.ndim != 4:
        raise OtltError(f"{what} takes a batch of images (B, C, H, W), got {tuple(x.shape)}")
    nhwc = x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3)
    if nhwc or (floating and not x.is_floating_point()):
        raise OtltError(f"{what} takes model inputs, float (B, C, H, W); got {x.dtype} "
                        f"{tuple(x.shape)}: {TO_MODEL_INPUTS}")


def check_partner_images(x: torch.Tensor, x_partner: torch.Tensor, what: str) -> None:
    """Refuse partner images whose ``(C, H, W)`` or dtype differ from the base images' (the
    batch size may differ: a mixer draws its partners among them; devices:
    :func:`check_one_device`)."""
    if x_partner.shape[1:] != x.shape[1:] or x_partner.dtype != x.dtype:
        raise OtltError(f"{what}: partner images {tuple(x_partner.shape)} {x_partner.dtype} "
                        f"must match the base images' (C, H, W) and dtype, {tuple(x.shape)} "
                        f"{x.dtype}")


def check_one_device(**tensors: torch.Tensor) -> None:
    """Refuse tensors on several devices (a partner batch left on the CPU) in one line."""
    first = next(iter(tensors.values())).device
    if any(t.device != first for t in tensors.values()):  # the message only when it is raised
        raise OtltError("images and labels must be on one device, got " +
                        ", ".join(f"{name} on {t.device}" for name, t in tensors.items()))


def check_batch(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what} images must be (B, C, H, W), got {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{what} labels must be ({x.shape[0]},), got {tuple(y.shape)}")


def apply_plan(plan: MixPlan, x: torch.Tensor, y: torch.Tensor,
               x_partner: torch.Tensor | None = None,
               y_partner: torch.Tensor | None = None, *, name: str = "apply_plan") -> MixedBatch:
    """Mix a batch as ``plan`` says; the partner batch defaults to the base batch itself.

    ``x``: ``(N, C, H, W)`` base images, ``y``: ``(N,)`` labels; ``x_partner``, ``y_partner``:
    ``(N', C, H, W)``, ``(N',)``. The output has ``plan.batch_size`` rows on ``x``'s device
    and dtype. The inputs are never modified; when no row is mixed and ``base_index`` is the
    identity the returned images are ``x`` itself. ``name`` (the mixer's) begins the
    messages of refused inputs.
    """
    if x_partner is None:
        x_partner, y_partner = x, y
    if y_partner is None:
        raise ValueError("y_partner is required with x_partner")
    check_batch(x, y, f"{name} base")
    check_batch(x_partner, y_partner, f"{name} partner")
    y, y_partner = check_labels(y, f"{name} base"), check_labels(y_partner, f"{name} partner")
    check_partner_images(x, x_partner, name)
    check_one_device(x=x, x_partner=x_partner)
    device = x.device
    base_index = plan.base_index.to(device, non_blocking=True)
    partner = plan.partner_index.to(device, non_blocking=True)
    row_lam = torch.where(plan.mixed, plan.lam, 1.0).to(torch.float32)
    base_labels = y.index_select(0, base_index)
    partner_labels = y_partner.index_select(0, partner)
    lam = row_lam.to(device, non_blocking=True)
    if not bool(plan.mixed.any()):  # plan tensors of unmixed batches are on the CPU: no sync
        identity = plan.base_index.numel() == x.shape[0] and bool(
            torch.equal(plan.base_index, torch.arange(x.shape[0], device=plan.base_index.device)))
        if identity:
            return MixedBatch(x, base_labels, partner_labels, lam, plan)
    # Indexing, not index_select: it keeps a channels-last batch (the engine's augmentation
    # gives one) channels-last, where index_select made it NCHW and the step copied it back.
    images = x[base_index]
    mixed = plan.mixed.to(device, non_blocking=True).view(-1, 1, 1, 1)
    if plan.box is not None:
        y0, y1, x0, x1 = plan.box
        # Gather only the box region of the partners: far less memory traffic than whole images.
        region = x_partner[:, :, y0:y1, x0:x1].index_select(0, partner)
        images[:, :, y0:y1, x0:x1] = torch.where(mixed, region, images[:, :, y0:y1, x0:x1])
    else:
        blended = mixup_images(images, x_partner[partner], plan.lam)
        images = torch.where(mixed, blended, images)
    return MixedBatch(images, base_labels, partner_labels, lam, plan)
