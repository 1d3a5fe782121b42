"""Batch mixers for long-tailed training: Mixup, CutMix, SaliencyMix, CMO, Remix and OTmix.

Every mixer follows one calling convention::

    mixed = mixer(x, y, x_partner, y_partner, generator=g)   # == mixer.apply(mixer.plan(...), ...)
    loss = batch_loss(criterion, model(mixed.images), mixed.base_labels, mixed.partner_labels,
                      mixed.lam)

*Planning* (:meth:`Mixer.plan`) draws everything random: the mixing ratio ``lam``, the
CutMix box, the partner of every row and which rows are mixed (a mixer mixes every batch it
is given; whether a batch is mixed at all is :class:`MixRecipe`'s coin). The result is a
:class:`MixPlan`, small CPU tensors that fully determine the mix and can be logged
(:meth:`MixPlan.to_dict`). *Applying* (:meth:`Mixer.apply`, :func:`apply_plan`) is
deterministic and runs on the batch's device and dtype; it never modifies its inputs.

**One vocabulary for the mixing pair.** Every row of a mixed batch has a *base* image (it
keeps its pixels outside the box and gets label weight ``lam``) and a *partner* image (it
gives the box, or its share of a blend, and label weight ``1 − lam``). The base batch is
``x, y``, the partner batch ``x_partner, y_partner``; a plan's ``base_index`` and
``partner_index`` pick their rows; a mixed batch's ``base_labels`` and ``partner_labels``
are their labels. CMO and OTmix call the base the *background* (drawn uniformly) and the
partner the *foreground* (drawn class-weighted): those two words are theirs and appear in
their docstrings and in the report's gallery, never as names in code. (Files keep their
keys: the OT plan artifacts' ``fore_labels`` / ``back_labels`` and the bench's
``fore_data`` are read back by committed reports.)

Row ``i`` of the output, for a base batch ``x`` and a partner batch ``x'`` (``x' = x`` for
same-batch mixers), with ``b = base_index[i]`` and ``p = partner_index[i]``::

    not mixed[i]:   x[b]                          label weight 1 on y[b]
    CutMix:         M ⊙ x[b] + (1 − M) ⊙ x'[p]    label weight lam on y[b], 1 − lam on y'[p]
    Mixup:          lam · x[b] + (1 − lam) · x'[p]  (same label weights)

where ``M`` is 0 inside the box and 1 outside (OTmix eq. 1 and 9, appendix 7.1) and ``lam`` is
the base image's share of the pixels. OTMix is CMO with OT-chosen pairs: it can reuse
:func:`apply_plan` with ``base_index[i] = j*(i)`` (the base, OTmix's background, chosen for
partner ``i``) and ``partner_index = arange(B)``.

Randomness comes only from the ``generator`` argument, a CPU :class:`torch.Generator`: plans
are drawn on the CPU (a handful of numbers per batch, no device synchronisation) and the index
tensors are moved to the batch's device when applied. The draws happen in a fixed order:
``lam``, the box centre (CutMix family), the partners, the mixed rows.

Layout: :mod:`~otlt.mixing.plan` (plans and applying them, no state) <- :mod:`~otlt.mixing.base`
(the :class:`Mixer` base, the random-pairing draw, the registry) <- :mod:`~otlt.mixing.random`
(the random-pairing mixers) and :mod:`~otlt.mixing.cost` (eqs. 6-7) <-
:mod:`~otlt.mixing.otmix` (OTMix); this package imports them all, so every built-in mixer is
registered once ``otlt.mixing`` is imported.
:mod:`~otlt.mixing.recipe` (:class:`MixRecipe`) is the recipe around a mixer that every
training loop follows: the epoch window, the per-batch coin, the class-weighted partner draw
and the mixer call.
"""

from otlt.mixing.base import Mixer, NoMix, create_mixer, list_mixers, register_mixer
from otlt.mixing.cost import class_affinity, otmix_cost, sample_cost
from otlt.mixing.otmix import OTMix
from otlt.mixing.plan import (
    Box,
    MixedBatch,
    MixPlan,
    apply_plan,
    box_lam,
    mixup_images,
    saliency_box,
    sample_cutmix_box,
    sample_lam,
    spectral_residual_saliency,
    with_saliency_box,
)
from otlt.mixing.random import CMO, CutMix, Mixup, Remix, SaliencyMix
from otlt.mixing.recipe import MixRecipe

__all__ = [
    "CMO",
    "Box",
    "CutMix",
    "MixPlan",
    "MixRecipe",
    "MixedBatch",
    "Mixer",
    "Mixup",
    "NoMix",
    "OTMix",
    "Remix",
    "SaliencyMix",
    "apply_plan",
    "box_lam",
    "class_affinity",
    "create_mixer",
    "list_mixers",
    "mixup_images",
    "otmix_cost",
    "register_mixer",
    "sample_cost",
    "sample_cutmix_box",
    "sample_lam",
    "saliency_box",
    "spectral_residual_saliency",
    "with_saliency_box",
]
