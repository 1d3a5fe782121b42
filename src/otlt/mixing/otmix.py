"""OTmix (Gao et al., NeurIPS 2023): minority foregrounds pasted onto OT-chosen backgrounds.

In the mixing package's vocabulary (:mod:`otlt.mixing`) the paper's background is the
*base* and its foreground the *partner*. For a base batch ``(x, y)`` from the uniform
loader and a partner batch ``(x_partner, y_partner)`` from the class-weighted sampler (paper
eqs. 2-3), each of ``B`` images:

1. features ``z = g_1(x)`` of both batches, pooled penultimate, one no-grad pass (eval mode,
   so BatchNorm running statistics are not touched);
2. cost (eq. 7), rows = partners (foregrounds) ``i``, columns = bases (backgrounds) ``j``::

       C_ij = omega (1 - cos(z_i, z_j)) + (1 - omega) (1 - F[y_i, y_j])

   with ``F`` the row-normalised *validation* confusion matrix, diagonal zeroed (eq. 6);
3. entropic plan ``T = argmin <T, C> - eps H(T)`` with uniform marginals (eq. 4),
   log-domain Sinkhorn in float32;
4. partner ``j*(i) = argmax_j T_ij`` (eq. 8);
5. CutMix (eq. 9): ``x~_i = M * x[j*] + (1 - M) * x_partner[i]``, label weight ``lam`` on
   ``y[j*]`` and ``1 - lam`` on ``y_partner[i]``, ``lam ~ Beta(alpha, alpha)`` corrected to the box.

Each epoch ``t`` of ``T`` draws ``OT ~ Bernoulli((t / T)^mu)`` (Algorithm 1; Fig. 8d for
``mu``): OT pairing when 1, CMO's random pairing when 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from otlt.errors import OtltError, is_integer, require, require_choice, warn_renamed
from otlt.labels import check_labels
from otlt.mixing.base import Mixer, check_knobs, draw_pairs, register_mixer
from otlt.mixing.cost import DISTANCES, class_affinity, combine_cost, sample_cost
from otlt.mixing.plan import MixPlan, check_one_device, with_saliency_box
from otlt.mixing.plan_samples import PlanSamples
from otlt.models.features import FEATURE_MODES, feature_fn
from otlt.transport import assignment, sinkhorn

SELECTIONS = ("argmax", "sample", "softmax", "assignment", "confusion")
BLENDS = ("cutmix", "mixup", "saliencymix")
CONFUSION_MODES = ("adaptive", "fixed")


def _sample_rows(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One categorical draw per row of ``probs (B, M)`` by inverse CDF, uniforms from a CPU
    generator (works for tensors on any device without moving the matrix)."""
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float32).to(probs.device)
    cdf = probs.cumsum(1)
    cdf = cdf / cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp_max(probs.shape[1] - 1)


@register_mixer("otmix")
@dataclass(eq=False)
class OTMix(Mixer):
    """OT-guided CutMix of minority foregrounds onto majority backgrounds (paper Algorithm 1).

    Call it like CMO, plus the features: ``mixer(x, y, x_partner, y_partner, generator=g,
    model=model)`` (bases = backgrounds ``x``, partners = foregrounds ``x_partner``) or
    ``embed=f`` with ``f(images (N, C, H, W)) -> (N, D)``
    (:func:`otlt.models.features.feature_fn` builds one); without either it refuses, unless
    ``ot_probability = 0``. Output row ``i`` holds partner ``i`` pasted onto its base
    ``j*(i)``; a random-pairing epoch is exactly :class:`otlt.mixing.CMO`.

    Options (paper defaults): ``omega = 0.05``, ``eps = 0.01``, ``alpha = 4``, ``mu = 1``;
    ``distance`` cosine/euclidean; ``keep_same_class`` keeps ``F``'s diagonal; ``selection``
    ``argmax`` (eq. 8), ``sample`` (draw ``j`` from the row ``T[i, :] / sum_j T[i, j]``),
    ``softmax`` (draw from ``softmax(T[i, :])``, Table 4's literal wording; since every plan
    entry is at most ``1/B``, the softmax is within ``e^{1/B}`` of uniform: in effect random
    pairing, max/min row probability <= 1.008 at B = 128), ``assignment``
    (the exact one-to-one optimum of ``C``, our addition) or ``confusion`` (no OT: the
    background class most confused with the foreground's, Table 4); ``blend``
    cutmix/mixup/saliencymix (Table 3; saliencymix centres the box on the first mixed
    foreground's most salient pixel); ``confusion_mode`` adaptive (updated every epoch) or
    fixed (first one kept); ``feature_mode`` ``pooled_eval`` (ours: pooled penultimate
    features in eval mode; BatchNorm untouched) or ``official`` (the official code's pass:
    ``Sequential(children[:-1])`` in train mode, flattened, backgrounds then foregrounds, so
    every OT step updates the BatchNorm running statistics with both batches);
    ``ot_probability`` forces ``P(OT epoch)`` instead of ``(t/T)^mu``; ``max_iter``, ``tol``
    and ``check_every`` go to :func:`otlt.transport.sinkhorn`: the convergence test (one
    host-device synchronisation on a GPU) comes after the two opening iterations, then every
    ``check_every`` = 10 iterations, so a batch of about 20 iterations synchronises 3 times; a
    larger ``check_every`` (``mix.params.check_every``) synchronises less and may run up to
    ``check_every - 1`` iterations more than needed (same tolerance; the default keeps
    committed results reproducible).

    State (:meth:`state_dict`): the validation confusion behind ``F``, the epoch and its
    OT-or-random switch, the plan epochs served; per-epoch statistics are read by
    :meth:`end_epoch`.
    """

    needs_partner_batch: ClassVar[bool] = True
    uses_context: ClassVar[bool] = True
    plan_checks_inputs: ClassVar[bool] = True
    needs_confusion: ClassVar[bool] = True
    floating_inputs: ClassVar[bool] = True  # the cost's features need float model inputs

    class_counts: Sequence[int] = ()
    num_classes: int = 0
    omega: float = 0.05
    eps: float = 0.01
    alpha: float = 4.0
    mu: float = 1.0
    distance: str = "cosine"
    keep_same_class: bool = False
    selection: str = "argmax"
    blend: str = "cutmix"
    confusion_mode: str = "adaptive"
    feature_mode: str = "pooled_eval"
    ot_probability: float | None = None
    fraction: float = 1.0
    max_iter: int = 1000
    tol: float = 1e-6
    check_every: int = 10
    plan_epochs: Sequence[int] = ()
    plan_size: int = 10
    confusion: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_knobs(self.alpha, self.fraction)
        self.class_counts = tuple(int(c) for c in self.class_counts)
        self.num_classes = self.num_classes or len(self.class_counts)
        require(self.num_classes >= 2, f"OTMix needs num_classes >= 2, got {self.num_classes}")
        require(not self.class_counts or len(self.class_counts) == self.num_classes,
                f"OTMix class_counts has {len(self.class_counts)} entries for num_classes="
                f"{self.num_classes}: one count per class")
        require(self.eps > 0, f"eps must be > 0, got {self.eps}")
        require(is_integer(self.check_every) and self.check_every >= 1,
                f"check_every must be a positive integer, got {self.check_every!r}")
        self.check_every = int(self.check_every)
        require(self.mu >= 0, f"mu must be >= 0, got {self.mu}")
        require(0 <= self.omega <= 1, f"omega must be in [0, 1], got {self.omega}")
        for name, value, valid in (("distance", self.distance, DISTANCES),
                                   ("selection", self.selection, SELECTIONS),
                                   ("blend", self.blend, BLENDS),
                                   ("confusion_mode", self.confusion_mode, CONFUSION_MODES),
                                   ("feature_mode", self.feature_mode, FEATURE_MODES)):
            require_choice(f"OTMix {name}", value, valid)
        require(self.ot_probability is None or 0 <= self.ot_probability <= 1,
                f"ot_probability must be in [0, 1], got {self.ot_probability}")
        self.plan_epochs = tuple(int(e) for e in self.plan_epochs)
        self._plan_samples = PlanSamples(self.plan_epochs)
        self._affinity: torch.Tensor | None = None
        self._class_index: dict[torch.device, torch.Tensor] = {}
        self.epoch = 0
        self.ot_epoch = self.ot_probability != 0  # before set_epoch: OT unless it never is
        self._reset_stats()
        self._artifacts: dict[str, Any] = {}

    # ---- schedule and state ------------------------------------------------------------
    def ot_epoch_probability(self, epoch: int, total_epochs: int) -> float:
        """``(t / T)^mu`` with ``t = epoch + 1`` (epochs counted from 0 here, 1 in the paper)."""
        if self.ot_probability is not None:
            return self.ot_probability
        return ((epoch + 1) / total_epochs) ** self.mu

    def set_epoch(self, epoch: int, total_epochs: int, generator: torch.Generator) -> bool:
        """Draw this epoch's switch ``OT ~ Bernoulli((t/T)^mu)``; returns it."""
        p = self.ot_epoch_probability(epoch, total_epochs)
        self.epoch = epoch
        self._plan_samples.start_epoch(epoch)
        self.ot_epoch = bool(torch.rand((), generator=generator, dtype=torch.float32).item() < p)
        self._reset_stats()
        return self.ot_epoch

    def update_confusion(self, confusion: torch.Tensor) -> None:
        """Take a new validation confusion ``(K, K)`` (adaptive), or only the first (fixed)."""
        self._check_confusion(confusion)
        if self.confusion is None or self.confusion_mode == "adaptive":
            self.confusion = confusion.detach().float().cpu().clone()
            self._affinity = None

    def _classes(self, device: torch.device) -> torch.Tensor:
        """``arange(K)`` on ``device``, made once: the labels' range check indexes it."""
        if device not in self._class_index:
            self._class_index[device] = torch.arange(self.num_classes, device=device)
        return self._class_index[device]

    def _check_confusion(self, confusion: torch.Tensor | None) -> None:
        k = self.num_classes
        require(confusion is None or tuple(confusion.shape) == (k, k),
                f"OTMix with {k} classes needs a ({k}, {k}) confusion matrix, got "
                f"{None if confusion is None else tuple(confusion.shape)}")

    def affinity(self, device: torch.device) -> torch.Tensor:
        """``F^`` on ``device``; before any confusion is known, uniform over other classes."""
        cached = self._affinity
        if cached is None or cached.device != device:
            k = self.num_classes
            source = self.confusion if self.confusion is not None else \
                torch.ones(k, k, dtype=torch.float32)
            cached = class_affinity(source, self.keep_same_class).to(device)
            self._affinity = cached
        return cached

    def state_dict(self) -> dict[str, Any]:
        """The confusion, the epoch and its OT-or-random switch, the plans served. As in
        ``nn.Module.state_dict`` the tensor is the mixer's own, not a copy (``(K, K)``: 265 MB
        at iNaturalist's K); the mixer never changes it in place, and neither should a
        caller."""
        return {"confusion": self.confusion, "epoch": self.epoch, "ot_epoch": self.ot_epoch,
                "plans_served": self._plan_samples.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a state without the epoch keeps the current one)."""
        confusion = state.get("confusion")
        self._check_confusion(confusion)
        self.confusion = None if confusion is None else confusion.float().cpu().clone()
        self._affinity = None
        self.epoch = int(state.get("epoch", self.epoch))
        self.ot_epoch = bool(state.get("ot_epoch", self.ot_epoch))
        self._plan_samples.load_state_dict(state.get("plans_served"))

    def recalibration_copy(self) -> Mixer:
        """A deep copy that keeps no small plans (``plan_epochs``; their solve changes no
        draw, and a plan of a recalibration batch would be thrown away)."""
        clone = super().recalibration_copy()
        clone._plan_samples = PlanSamples(())  # type: ignore[attr-defined]
        return clone

    # ---- planning ----------------------------------------------------------------------
    def cost(self, z_partner: torch.Tensor, z_base: torch.Tensor, y_partner: torch.Tensor,
             y_base: torch.Tensor) -> torch.Tensor:
        """Eq. 7 with this mixer's options and current confusion."""
        return combine_cost(sample_cost(z_partner, z_base, self.distance),
                            self.affinity(z_partner.device), y_partner, y_base, self.omega)

    def choose_bases(self, cost: torch.Tensor, y_partner: torch.Tensor, y_base: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        """Base (background) index ``j*(i)`` for every partner (foreground) row ``i``, and
        solver statistics."""
        if self.selection == "assignment":
            return assignment(cost), {}
        if self.selection == "confusion":
            score = self.affinity(cost.device)[y_partner[:, None], y_base[None, :]]
            noise = torch.rand(score.shape, generator=generator,
                               dtype=torch.float32).to(score.device)
            return (score + 1e-6 * noise).argmax(1), {}
        # Convergence is counted per epoch (``ot_converged_fraction`` in metrics.jsonl and the
        # epoch line) instead of one warning per batch.
        result = sinkhorn(cost, eps=self.eps, max_iter=self.max_iter, tol=self.tol,
                          check_every=self.check_every, warn=False)
        stats = {"cost": result.cost, "n_iter": result.n_iter, "converged": result.converged}
        coupling = result.coupling
        if self.selection == "argmax":
            return coupling.argmax(1), stats
        if self.selection == "softmax":
            return _sample_rows(torch.softmax(coupling, dim=1), generator), stats
        return _sample_rows(coupling, generator), stats

    def choose_backgrounds(self, *args: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """Deprecated name of :meth:`choose_bases`."""
        warn_renamed("OTMix.choose_backgrounds", "OTMix.choose_bases")
        return self.choose_bases(*args)

    def plan(self, x: torch.Tensor, y: torch.Tensor, x_partner: torch.Tensor | None = None,
             y_partner: torch.Tensor | None = None, *, generator: torch.Generator,
             embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
             model: torch.nn.Module | None = None,
             amp_dtype: torch.dtype | None = None) -> MixPlan:
        """Plan a batch: ``x, y`` bases (backgrounds) ``(B, C, H, W)``, ``x_partner,
        y_partner`` partners (foregrounds). The OT cost's features come from
        ``embed(images) -> (N, D)`` (any backbone; the engine passes one), else from ``model`` via
        :func:`otlt.models.feature_fn`; with neither it refuses (on random epochs too, so a
        run fails at its first batch, not at its first OT epoch) unless ``ot_probability``
        is 0. Random draws are the same as CMO's; an OT epoch then replaces the pairing (with
        ``selection`` argmax or assignment it draws nothing more, so OT and random epochs
        consume the generator identically; sample, softmax and confusion draw per row)."""
        self.check_inputs(x, x_partner)  # features need model inputs
        require(embed is not None or model is not None or self.ot_probability == 0,
                "OTMix needs features for its OT epochs: pass model= or embed=, or use CMO "
                "for random pairing")
        self._check_partner(x_partner, y_partner)
        assert x_partner is not None and y_partner is not None
        check_one_device(x=x, y=y, x_partner=x_partner, y_partner=y_partner)
        classes = self._classes(y.device)
        y = check_labels(y, "OTMix base", classes)
        y_partner = check_labels(y_partner, "OTMix partner", classes)
        require(len(y) == len(x) and len(y_partner) == len(x_partner),
                f"OTMix needs one label per image: {len(x)} base images with {len(y)} labels, "
                f"{len(x_partner)} partner images with {len(y_partner)} labels")
        require(x_partner.shape[0] == x.shape[0],
                f"OTMix needs equal partner (foreground) and base (background) batches, got "
                f"{x_partner.shape[0]} and {x.shape[0]}")
        size = (x.shape[-2], x.shape[-1]) if self.blend == "cutmix" else None
        plan = draw_pairs(x.shape[0], x.shape[0], alpha=self.alpha, fraction=self.fraction,
                          image_size=size, generator=generator)
        if self.blend == "saliencymix":  # the box sits on the partner's salient region
            plan = with_saliency_box(
                dataclasses.replace(plan, partner_index=torch.arange(len(x))), x_partner)
        if embed is None and model is not None:
            embed = feature_fn(model, self.feature_mode, amp_dtype,
                               channels_last=_is_channels_last(x))
        self.stats["batches"] += 1
        if self.ot_epoch and embed is not None:  # no embed: refused unless no OT epoch at all
            if self.feature_mode == "official":  # two train-mode passes, as the official code
                z_base, z_partner = _features(embed, x), _features(embed, x_partner)
            else:
                z = _features(embed, torch.cat([x_partner, x]))
                z_partner, z_base = z[: len(x_partner)], z[len(x_partner):]
            cost = self.cost(z_partner, z_base, y_partner, y)
            base, solver = self.choose_bases(cost, y_partner, y, generator)
            self._record_ot(solver)
            self._maybe_keep_sample(cost, y_partner, y)
            plan = MixPlan(plan.lam, plan.box, base, torch.arange(x.shape[0]), plan.mixed)
        self._record_pairs(plan, y, y_partner)
        return plan

    # ---- diagnostics -------------------------------------------------------------------
    def _reset_stats(self) -> None:
        k = self.num_classes
        self.stats: dict[str, Any] = {"batches": 0, "ot_batches": 0, "ot_cost": 0.0,
                                      "ot_iters": 0, "ot_converged": 0,
                                      "pairs": torch.zeros(k, k, dtype=torch.long)}

    def counters(self) -> dict[str, Any]:
        """The epoch's counters, the very dict :meth:`end_epoch` reads (so a sum over ranks
        done in place on it is what gets reported)."""
        return self.stats

    def _record_ot(self, solver: dict[str, Any]) -> None:
        self.stats["ot_batches"] += 1
        if solver:
            self.stats["ot_cost"] = self.stats["ot_cost"] + solver["cost"].detach().float()
            self.stats["ot_iters"] += int(solver["n_iter"])
            self.stats["ot_converged"] += int(bool(solver["converged"]))

    def _record_pairs(self, plan: MixPlan, y_base: torch.Tensor, y_partner: torch.Tensor) -> None:
        """Count (partner, base) classes of every mixed row (Fig. 9's foreground, background)."""
        device = y_base.device
        weights = plan.mixed.to(device, torch.float32)  # weights, not a mask: no device sync
        partner = y_partner.index_select(0, plan.partner_index.to(device))
        base = y_base.index_select(0, plan.base_index.to(device))
        k = self.num_classes
        # index_add_, not bincount: CUDA's bincount reads the largest entry back to size its
        # output (a host sync per batch); the sums are small integers, exact in float32.
        counts = torch.zeros(k * k, device=device, dtype=torch.float32).index_add_(
            0, partner * k + base, weights)
        counts = counts.round().long().view(k, k)
        self.stats["pairs"] = self.stats["pairs"].to(device) + counts

    def _maybe_keep_sample(self, cost: torch.Tensor, y_partner: torch.Tensor,
                           y_base: torch.Tensor) -> None:
        """Keep one small plan for the requested epochs this OT batch serves
        (:mod:`otlt.mixing.plan_samples`)."""
        kept = self._plan_samples.keep(
            self.epoch, cost, y_partner, y_base, size=self.plan_size, eps=self.eps,
            omega=self.omega, max_iter=self.max_iter, tol=self.tol, check_every=self.check_every)
        if kept is not None:
            self._artifacts[kept[0]] = kept[1]

    def pop_artifacts(self) -> dict[str, Any]:
        """JSON artifacts collected since the last call (file name -> object)."""
        out, self._artifacts = self._artifacts, {}
        return out

    def end_epoch(self, val_confusion: torch.Tensor | None) -> dict[str, Any]:
        """Close the epoch: statistics for ``metrics.jsonl``, then update the confusion."""
        s = self.stats
        ot = s["ot_batches"]
        pairs = s["pairs"].cpu()
        total = int(pairs.sum())
        record = {
            "ot_epoch": self.ot_epoch and s["batches"] > 0,  # False when nothing was mixed
            "mixed_batches": s["batches"],
            "ot_batch_fraction": ot / s["batches"] if s["batches"] else 0.0,
            "mix_pairs": pairs.tolist(),
            "same_class_pair_fraction": float(pairs.diagonal().sum()) / total if total else None,
        }
        if ot and self.selection not in ("assignment", "confusion"):
            record["ot_mean_cost"] = float(s["ot_cost"]) / ot
            record["ot_mean_iters"] = s["ot_iters"] / ot
            record["ot_converged_fraction"] = s["ot_converged"] / ot
        if val_confusion is not None:
            self.update_confusion(val_confusion)
        return record


def _features(embed: Callable[[torch.Tensor], torch.Tensor],
              images: torch.Tensor) -> torch.Tensor:
    """``embed(images)``, checked to be ``(N, D)`` features for the ``N`` images."""
    z = embed(images)
    if not (isinstance(z, torch.Tensor) and z.dim() == 2 and len(z) == len(images)):
        got = f"shape {tuple(z.shape)}" if isinstance(z, torch.Tensor) else type(z).__name__
        raise OtltError(f"embed must map images (N, C, H, W) to features (N, D); for "
                        f"{len(images)} images it returned {got}")
    return z


def _is_channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-D batch is laid out channels-last (and not also plain contiguous)."""
    return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous())


__all__ = ["OTMix"]
