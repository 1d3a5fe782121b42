"""The Mixer base class, the per-batch random-pairing draw and the mixer registry."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from otlt.errors import OtltError, require
from otlt.mixing.plan import (
    MixedBatch,
    MixPlan,
    apply_plan,
    box_lam,
    check_generator,
    check_model_inputs,
    check_partner_images,
    sample_cutmix_box,
    sample_lam,
)

# ----------------------------------------------------------------------------- mixers


def check_knobs(alpha: float, fraction: float) -> None:
    require(alpha > 0, f"alpha must be > 0, got {alpha}")
    require(0.0 < fraction <= 1.0, f"fraction must be in (0, 1], got {fraction}")


def draw_pairs(batch_size: int, num_partners: int, *, alpha: float, fraction: float,
               image_size: tuple[int, int] | None, generator: torch.Generator) -> MixPlan:
    """Draw a random-pairing plan: ``lam``, the box, the partners, the mixed rows.

    ``image_size = (H, W)`` asks for a CutMix box, ``None`` for a Mixup blend. Partners are
    ``num_partners`` rows drawn without replacement (a permutation when sizes are equal).
    Every plan mixes (at least one row): whether a batch is mixed at all is the recipe's
    coin (:class:`otlt.mixing.MixRecipe`, ``mix.prob``), drawn before the mixer is called.
    """
    check_generator(generator)
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

    The engine calls the hooks below on every mixer (each a documented no-op here, like a
    Lightning ``Callback``): :meth:`set_epoch` before an epoch, :meth:`end_epoch` and
    :meth:`pop_artifacts` after it (:meth:`counters` summed over ranks before them),
    :meth:`state_dict` / :meth:`load_state_dict` with
    checkpoints, :meth:`update_confusion` when a validation confusion matrix is known, and
    :meth:`recalibration_copy` for BatchNorm's ``train`` recalibration.

    Subclasses set ``name``, ``needs_partner_batch`` (True when the mixer takes a second,
    separately sampled batch, e.g. CMO's class-weighted foreground batch) and ``uses_context``
    (True when ``plan`` takes extra keyword inputs, e.g. OTMix's ``model`` for features),
    and then ``feature_mode``: which features (:data:`otlt.models.features.FEATURE_MODES`)
    the engine's ``embed`` gives it. ``floating_inputs`` (True when ``plan`` computes features
    from the images, OTMix) refuses integer images in :meth:`check_inputs` too.
    """

    name: ClassVar[str] = ""
    needs_partner_batch: ClassVar[bool] = False
    uses_context: ClassVar[bool] = False
    # A mixer whose public ``plan`` checks its inputs itself (OTMix: a direct ``plan`` call
    # must be refused too) sets this, so ``__call__`` does not check the same tensors twice.
    plan_checks_inputs: ClassVar[bool] = False
    needs_confusion: ClassVar[bool] = False  # reads update_confusion (OTMix)
    floating_inputs: ClassVar[bool] = False  # plan computes features from the images (OTMix)
    feature_mode: str = "pooled_eval"  # an OTMix option; read only when uses_context

    # ---- hooks: documented no-ops that stateful mixers (OTMix) override ----------------
    def set_epoch(self, epoch: int, total_epochs: int, generator: torch.Generator) -> bool:
        """Called before each training epoch (and before each recalibration batch that
        mixes); may draw per-epoch randomness from ``generator``. Returns whether the epoch
        uses the mixer's special mode (OTMix: the OT pairing); the base draws nothing."""
        return False

    def update_confusion(self, confusion: torch.Tensor) -> None:
        """Take a validation confusion matrix ``(K, K)``; the base ignores it."""

    def counters(self) -> dict[str, Any]:
        """This process's counters for the epoch so far (name -> tensor or number), which a
        multi-process engine sums over ranks, in place, before :meth:`end_epoch` reports
        them (OTMix: batches, OT batches, ``pairs``...); the base counts nothing."""
        return {}

    def end_epoch(self, val_confusion: torch.Tensor | None) -> dict[str, Any]:
        """Close the epoch: return statistics for ``metrics.jsonl`` (here none) and take the
        epoch's validation confusion ``(K, K)`` (or ``None``)."""
        return {}

    def pop_artifacts(self) -> dict[str, Any]:
        """JSON artifacts to write into the run directory since the last call (name -> obj)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State that a checkpoint must carry for an exact resume (the base has none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""

    def recalibration_copy(self) -> Mixer:
        """A copy for BatchNorm's ``train`` recalibration batches: it draws and mixes as this
        mixer would, leaves this one as it is, and keeps no artifacts (those batches train
        nothing and their mixer is thrown away); here a deep copy."""
        return copy.deepcopy(self)

    def _check_partner(self, x_partner: torch.Tensor | None,
                       y_partner: torch.Tensor | None) -> None:
        given = x_partner is not None or y_partner is not None
        if self.needs_partner_batch and (x_partner is None or y_partner is None):
            raise ValueError(f"{type(self).__name__} needs a partner batch (x_partner, y_partner)")
        if given and not self.needs_partner_batch:
            raise ValueError(f"{type(self).__name__} mixes within one batch; "
                             "got an unexpected partner batch")

    def check_inputs(self, x: torch.Tensor, x_partner: torch.Tensor | None = None) -> None:
        """Refuse images that are not model inputs ``(B, C, H, W)``: the loaders' uint8
        ``(B, H, W, 3)`` and, with ``floating_inputs``, integer images of any layout; and
        partner images unlike the base images (``check_partner_images``), before any
        feature pass meets them."""
        for images in (x, x_partner):
            if images is not None:
                check_model_inputs(images, type(self).__name__, floating=self.floating_inputs)
        if x_partner is not None:
            check_partner_images(x, x_partner, type(self).__name__)

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
        return apply_plan(plan, x, y, x_partner, y_partner, name=type(self).__name__)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, x_partner: torch.Tensor | None = None,
                 y_partner: torch.Tensor | None = None, *, generator: torch.Generator,
                 **context: Any) -> MixedBatch:
        """Plan and apply in one go: ``apply(plan(...), ...)``.

        ``context`` (e.g. ``model=``, ``amp_dtype=``) goes to :meth:`plan` when the mixer
        ``uses_context``; the others ignore it, so an engine can call every mixer alike.
        """
        if not self.plan_checks_inputs:
            self.check_inputs(x, x_partner)
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
