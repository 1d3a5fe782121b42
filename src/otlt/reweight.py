"""OT re-weighting: learn a weight per training example by optimal transport to a meta set.

Guo, Li, Zheng, Zhao, Zhou, Zha, "Learning to Re-weight Examples with Optimal Transport for
Imbalanced Classification", NeurIPS 2022 (official code ``OT_train.py``).

Every training example ``i`` owns a raw weight ``w_i``. For a batch ``B`` the (imbalanced)
training distribution is ``P(w) = Σ_{j∈B} ν_j δ_{z_j}`` with ``ν = softmax(w_B)``; the balanced
meta distribution is ``Q = Σ_k μ_k δ_{u_k}``, uniform over the K class prototypes ``u_k`` (the
mean feature of class k's meta images) or over all M meta examples. The weights minimise the
entropic OT loss

    L(w) = OT_ε(μ, ν(w), C) = min_{T 1 = μ, Tᵀ 1 = ν}  <T, C> + ε KL(T ‖ μ νᵀ),   ε = 0.1

with the cost ``C_ij = λ (1 − cos(u_i, z_j)) + (1 − λ) d(y_i, y_j)``: label-aware ``λ = 0``,
feature-aware ``λ = 1``, combined ``λ = 0.5``. ``d`` is the official code's mean squared
difference of one-hot labels (``0`` within a class, ``2/K`` across) or a 0/1 indicator.
Features are detached: the OT loss moves only ``w``, by one SGD step per batch.

Gradient. By the envelope theorem ``∂L/∂ν = g``, the column potential of the Sinkhorn solution
(:func:`otlt.transport.entropic_ot_value`), so ``∂L/∂w = ν ⊙ (g − <ν, g>)`` with no graph
through the iterations; ``gradient="unrolled"`` back-propagates through the Sinkhorn iterations
instead. Both give the gradient of the same converged value and agree with finite differences
(``tests/test_reweight.py``; the two differ by ~2e-9 in float32). (The official code unrolls up
to 200 log-domain iterations, stopped once the row potentials move by less than 0.1 in L1, and
differentiates the plan's transport cost ``<T, C>`` without the entropy term.) The
potentials are the default (the cheaper of the two: ``benchmarks/README.md``);
``gradient="unrolled"`` is kept for comparison.

Departures from the official code (options in :class:`otlt.config.ReweightConfig`):
prototypes are feature means (the code averages pixels: ``meta: pixel_prototype``); the
classifier loss uses the normalised ``softmax(w_B)`` (the code uses raw ``w``:
``normalize=False``, ``classifier_weights: raw``); the loss is the entropic value, not
``<T, C>`` (above). The code passes momentum 0.9 to an optimiser it re-creates every batch, so
its momentum never acts: the default here is 0, and a nonzero momentum keeps one buffer entry
per example, updated only when the example is in a batch (torch's SGD on that entry).

Use from any training loop::

    rw = OTReweighter(train_labels, num_classes)       # class-balanced initial weights
    rw.set_meta(meta_features, meta_labels)            # once per epoch (or when features move)
    for x, y, idx in loader:                           # idx: positions in the training set
        z = model.features(x)
        weights = rw.step(z.detach(), y, idx)          # one OT step on w; (B,) weights
        loss = (weights * F.cross_entropy(model.fc(z), y, reduction="none")).sum()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from otlt.config import REWEIGHT_CHOICES
from otlt.errors import OtltError, require, require_choice
from otlt.labels import check_labels
from otlt.losses import class_balanced_weights
from otlt.transport import entropic_ot_value, sinkhorn

__all__ = ["OTReweighter", "class_prototypes", "ot_reweight_loss", "reweight_cost"]

GRADIENTS = ("potentials", "unrolled")
_FEATURE_WEIGHT = {"label": 0.0, "feature": 1.0}


def reweight_cost(meta_features: Tensor, meta_labels: Tensor, features: Tensor, labels: Tensor,
                  *, num_classes: int, feature_weight: float = 0.5,
                  label_distance: str = "mse") -> Tensor:
    """Return the cost ``(M, B)`` between meta points ``(M, D)`` and a training batch ``(B, D)``.

    ``C_ij = λ (1 − cos(u_i, z_j)) + (1 − λ) d(y_i, y_j)`` with ``λ = feature_weight`` and
    ``d = ‖e_{y_i} − e_{y_j}‖² / K`` (``"mse"``: 0 or 2/K, the official code) or
    ``[y_i ≠ y_j]`` (``"binary"``). float64 inputs give float64, anything else float32.
    """
    require_choice("label_distance", label_distance, REWEIGHT_CHOICES["label_distance"])
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    cost = torch.zeros(len(meta_labels), len(labels), dtype=dtype, device=features.device)
    if feature_weight > 0:
        u = F.normalize(meta_features.to(dtype), dim=1, eps=1e-8)
        z = F.normalize(features.to(dtype), dim=1, eps=1e-8)
        cost = cost + feature_weight * (1.0 - u @ z.T)
    if feature_weight < 1:
        step = 2.0 / num_classes if label_distance == "mse" else 1.0
        differ = meta_labels.to(labels.device)[:, None] != labels[None, :]
        cost = cost + (1.0 - feature_weight) * step * differ.to(dtype)
    return cost


def ot_reweight_loss(cost: Tensor, nu: Tensor, *, eps: float, max_iter: int = 1000,
                     tol: float = 1e-6, gradient: str = "potentials",
                     check_marginals: bool = True) -> Tensor:
    """Return ``OT_ε(uniform, ν, C)`` for a cost ``(M, B)`` and batch marginal ``ν`` ``(B,)``.

    Differentiable in ``ν``: through the dual potentials (``"potentials"``, envelope theorem,
    ``∂/∂ν = g``) or by autograd through the Sinkhorn iterations (``"unrolled"``).
    ``check_marginals=False`` skips the check of ``ν`` (a host read), for a ``ν`` that is a
    softmax.
    """
    require_choice("gradient", gradient, GRADIENTS)
    if gradient == "potentials":
        return entropic_ot_value(cost, None, nu, eps=eps, max_iter=max_iter, tol=tol,
                                 check_marginals=check_marginals)
    return sinkhorn(cost, None, nu, eps=eps, max_iter=max_iter, tol=tol,
                    check_marginals=check_marginals).objective


def class_prototypes(x: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Return the per-class means ``(K, ...)`` of ``x`` ``(M, ...)`` and their labels ``(K,)``.

    Works on features ``(M, D)`` and on images ``(M, 3, H, W)`` (the official pixel means).
    """
    counts = torch.bincount(labels, minlength=num_classes)
    if not bool((counts > 0).all()):  # the classes are listed only when one has none
        raise OtltError(f"every class needs at least one meta example; classes "
                        f"{(counts == 0).nonzero().flatten().tolist()} have none")
    sums = torch.zeros((num_classes, *x.shape[1:]), dtype=x.dtype, device=x.device)
    sums.index_add_(0, labels.to(x.device), x)
    shape = (num_classes,) + (1,) * (x.dim() - 1)
    means = sums / counts.to(x.device, x.dtype).reshape(shape)
    return means, torch.arange(num_classes, device=labels.device)


def _check_batch(features: object, labels: object, raw: Tensor, meta: Tensor) -> None:
    """One line for a batch that cannot meet the meta set: features ``(B, D)`` with the meta
    features' ``D``, labels ``(B,)``, one raw weight per row."""
    # Every step comes here: the messages are built only when one is raised.
    if not (isinstance(features, Tensor) and isinstance(labels, Tensor)):
        raise OtltError(f"OTReweighter takes tensors, got features {type(features).__name__} "
                        f"and labels {type(labels).__name__}")
    rows = len(raw)
    if not (features.dim() == 2 and features.shape == (rows, meta.shape[1])
            and labels.shape == (rows,)):
        raise OtltError(f"OTReweighter needs features (B, D) = ({rows}, {meta.shape[1]}) (the "
                        f"meta features' D; pool or flatten first) and labels ({rows},), got "
                        f"{tuple(features.shape)} and {tuple(labels.shape)}")


class OTReweighter:
    """Per-example weights learned by OT to a balanced meta distribution (Guo et al. 2022).

    Args:
        labels: ``(N,)`` training labels; the weights live on their device, one per example.
        num_classes: K.
        init: ``"class_balanced"`` (``w_i`` = class-balanced weight of ``y_i``, ``beta``,
            :func:`otlt.losses.class_balanced_weights`) or ``"uniform"`` (all ones).
        cost: ``"combined"`` (``feature_weight`` on the feature term), ``"label"``, ``"feature"``.
        label_distance: ``"mse"`` (0 or 2/K, official) or ``"binary"`` (0 or 1).
        eps: entropic regularisation ε.
        lr, momentum, weight_decay: the SGD step on ``w`` (momentum per example, lazily).
        normalize: :meth:`step` returns ``softmax(w_B)`` (True, the paper) or raw ``w_B``.
        max_iter, tol: Sinkhorn limits (:func:`otlt.transport.sinkhorn`).
        gradient: ``"potentials"`` (envelope theorem) or ``"unrolled"`` (through the solver).
    """

    def __init__(self, labels: Tensor, num_classes: int, *, init: str = "class_balanced",
                 beta: float = 0.9999, cost: str = "combined", feature_weight: float = 0.5,
                 label_distance: str = "mse", eps: float = 0.1, lr: float = 0.01,
                 momentum: float = 0.0, weight_decay: float = 5e-4, normalize: bool = True,
                 max_iter: int = 1000, tol: float = 1e-6,
                 gradient: str = "potentials") -> None:
        for name, value in (("init", init), ("cost", cost), ("label_distance", label_distance)):
            require_choice(name, value, REWEIGHT_CHOICES[name])
        require_choice("gradient", gradient, GRADIENTS)
        require(eps > 0 and lr > 0, f"eps and lr must be > 0, got eps={eps}, lr={lr}")
        require(0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}")
        labels = torch.as_tensor(labels)  # a list or a NumPy array too
        self.labels = check_labels(labels, "OTReweighter training")
        self.num_classes = num_classes
        if labels.numel():
            low, high = int(self.labels.min()), int(self.labels.max())
            require(low >= 0 and high < num_classes, f"OTReweighter labels must be in "
                    f"[0, {num_classes}) for num_classes={num_classes}, got {low} to {high}")
        self._classes: dict[torch.device, Tensor] = {}
        self.feature_weight = _FEATURE_WEIGHT.get(cost, feature_weight)
        self.label_distance = label_distance
        self.eps, self.max_iter, self.tol, self.gradient = eps, max_iter, tol, gradient
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.normalize = normalize
        counts = torch.bincount(self.labels.cpu(), minlength=num_classes)
        if init == "class_balanced":
            per_class = class_balanced_weights(counts.clamp_min(1), beta)
            self.raw = per_class.to(self.labels.device)[self.labels]
        else:
            self.raw = torch.ones(len(self.labels), device=self.labels.device)
        self.momentum_buffer = torch.zeros_like(self.raw) if momentum > 0 else None
        self.meta_features: Tensor | None = None
        self.meta_labels: Tensor | None = None
        self.last_loss = torch.zeros((), device=self.raw.device)
        self.last_grad_norm = torch.zeros((), device=self.raw.device)
        self.last_change = torch.zeros((), device=self.raw.device)

    # ---- the meta side -----------------------------------------------------------------
    def set_meta(self, features: Tensor, labels: Tensor, *, prototypes: bool = True) -> None:
        """Set the meta distribution: uniform over class prototypes, or over the given points.

        ``features`` ``(M, D)`` with ``labels`` ``(M,)``; ``prototypes=True`` averages each
        class's features (every class needs one meta example), else each point is kept.
        """
        features = features.detach()
        labels = check_labels(torch.as_tensor(labels).cpu(), "OTReweighter meta",
                              torch.arange(self.num_classes)).to(features.device)
        require(len(labels) == len(features), f"OTReweighter.set_meta needs one label per "
                f"meta example: {len(features)} features, {len(labels)} labels")
        if prototypes:
            features, labels = class_prototypes(features, labels, self.num_classes)
        self.meta_features, self.meta_labels = features, labels

    # ---- the OT step -------------------------------------------------------------------
    def ot_loss(self, features: Tensor, labels: Tensor, raw: Tensor) -> Tensor:
        """Return ``OT_ε(μ, softmax(raw), C)`` for a batch ``(B, D)``, differentiable in ``raw``."""
        return self._loss(features, self._batch_labels(features, labels, raw), raw)

    def _batch_labels(self, features: Tensor, labels: Tensor, raw: Tensor) -> Tensor:
        """The batch's labels as int64 class indices, once the batch is known to meet the meta
        set (:func:`_check_batch`, :func:`otlt.labels.check_labels`: no host read)."""
        require(self.meta_features is not None, "OTReweighter.set_meta must be called before "
                                                "the first step (the meta distribution)")
        assert self.meta_features is not None
        _check_batch(features, labels, raw, self.meta_features)
        return check_labels(labels, "OTReweighter batch", self._class_index(labels.device))

    def _loss(self, features: Tensor, labels: Tensor, raw: Tensor) -> Tensor:
        """:meth:`ot_loss` of a batch whose labels :meth:`_batch_labels` gave."""
        cost = reweight_cost(self.meta_features, self.meta_labels, features.detach(), labels,
                             num_classes=self.num_classes, feature_weight=self.feature_weight,
                             label_distance=self.label_distance)
        return ot_reweight_loss(cost, torch.softmax(raw, 0), eps=self.eps,
                                max_iter=self.max_iter, tol=self.tol, gradient=self.gradient,
                                check_marginals=False)  # a softmax: no host read to check it

    def _class_index(self, device: torch.device) -> Tensor:
        """``arange(K)`` on ``device``, made once: the batch labels' range check indexes it
        (:func:`otlt.labels.check_labels`: no host read)."""
        if device not in self._classes:
            self._classes[device] = torch.arange(self.num_classes, device=device)
        return self._classes[device]

    def step(self, features: Tensor, labels: Tensor, indices: Tensor) -> Tensor:
        """Take one SGD step on the batch's raw weights; return its ``(B,)`` loss weights.

        ``indices`` are the examples' positions in the training set (a repeated one is the
        same example twice: its rows' gradients are summed into one step, :meth:`_sgd`).
        The returned weights are detached: ``softmax(w_B)`` after the step (``normalize``) or
        the raw ``w_B``. :attr:`last_loss` holds the OT loss before the step,
        :attr:`last_grad_norm` ``||dOT/dw_B||_2`` and :attr:`last_change` the L1 change
        ``sum_i |softmax(w_B')_i - softmax(w_B)_i|`` the step made (how far it moved the
        batch's weight distribution; 0 <= change <= 2).

        ``labels`` are the examples' training labels, ``labels[i] == train_labels[indices[i]]``.
        Labels outside ``[0, K)`` are refused (:func:`otlt.labels.check_labels`); labels of
        other examples are not caught: comparing them would cost a host read every step.

        Nothing is read back to the host outside Sinkhorn's convergence tests, so nothing
        here can see a far too large ``lr``: each step then throws the batch's raw weights
        further apart, the returned weights turn one-hot (flipping from step to step,
        :attr:`last_change` near its maximum 2) and, once a raw weight overflows, NaN. The
        engine stops a run whose loss is not finite at the epoch's end; in a loop of your
        own, watch ``last_change`` and ``last_loss`` (``torch.isfinite``) now and then.
        """
        idx = indices.to(self.raw.device)
        try:  # on the CPU a position past the training set raises here (CUDA: device assert)
            w = self.raw[idx].clone().requires_grad_(True)
        except IndexError:
            raise OtltError(f"OTReweighter.step: indices must be positions in the training "
                            f"set, 0 to {len(self.raw) - 1}") from None
        labels = self._batch_labels(features, labels, w)
        with torch.enable_grad():
            loss = self._loss(features, labels, w)
            (grad,) = torch.autograd.grad(loss, w)
        before = torch.softmax(w.detach(), 0)
        self._sgd(idx, grad.to(w.dtype))
        self.last_loss = loss.detach()
        self.last_grad_norm = grad.detach().norm()
        self.last_change = (torch.softmax(self.raw[idx], 0) - before).abs().sum()
        return self.batch_weights(idx)

    def _sgd(self, idx: Tensor, grad: Tensor) -> None:
        """``torch.optim.SGD``'s update of ``raw`` restricted to the batch's examples.

        ``w_B = raw[idx]``, so the gradient on ``raw`` sums a repeated index's rows (a sampler
        that draws with replacement) and such an example takes one step, as autograd and
        SGD on ``raw`` itself would; with distinct indices this is the plain per-row update.
        The sums run over the batch (a ``(B, B)`` 0/1 mask times the gradient, summed by row:
        no host sync, and exact, where a matrix product may round under autocast or TF32),
        not over ``raw``; the rows of a repeated example write the same value."""
        same = (idx[:, None] == idx[None, :]).to(grad.dtype)
        grad = (same * grad[None, :]).sum(1)
        w = self.raw[idx]
        if self.weight_decay:
            grad = grad + self.weight_decay * w
        if self.momentum_buffer is not None:
            grad = self.momentum * self.momentum_buffer[idx] + grad
            self.momentum_buffer[idx] = grad
        self.raw[idx] = w - self.lr * grad

    def batch_weights(self, indices: Tensor) -> Tensor:
        """Return the loss weights ``(B,)`` of a batch: ``softmax(w_B)`` or raw ``w_B``."""
        w = self.raw[indices.to(self.raw.device)]
        return torch.softmax(w, 0) if self.normalize else w.clone()

    # ---- inspection and state ----------------------------------------------------------
    def class_stats(self) -> dict[str, list[float | None]]:
        """Return per-class mean and std of the raw weights and each class's share of softmax(w).

        The share is over the whole training set; ``None`` marks a class without examples.
        """
        k, labels, raw = self.num_classes, self.labels, self.raw.double()
        counts = torch.bincount(labels, minlength=k).double()
        mean = torch.zeros(k, dtype=raw.dtype, device=raw.device).index_add_(0, labels, raw)
        mean = mean / counts.clamp_min(1)
        sq = torch.zeros_like(mean).index_add_(0, labels, (raw - mean[labels]) ** 2)
        std = (sq / counts.clamp_min(1)).sqrt()
        mass = torch.zeros_like(mean).index_add_(0, labels, torch.softmax(raw, 0))
        present = (counts > 0).tolist()

        def listed(x: Tensor) -> list[float | None]:
            return [v if ok else None for v, ok in zip(x.tolist(), present, strict=True)]

        return {"weight_class_mean": listed(mean), "weight_class_std": listed(std),
                "weight_class_mass": listed(mass)}

    def state_dict(self) -> dict[str, Tensor | None]:
        return {"raw": self.raw.clone(), "momentum_buffer": None if self.momentum_buffer is None
                else self.momentum_buffer.clone()}

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        raw = state["raw"]
        if raw is None or raw.shape != self.raw.shape:
            raise RuntimeError(f"re-weighter state holds {None if raw is None else raw.numel()} "
                               f"weights, this training set has {self.raw.numel()}")
        self.raw = raw.to(self.raw.device, self.raw.dtype).clone()
        buffer = state.get("momentum_buffer")
        if self.momentum_buffer is not None:
            self.momentum_buffer = (torch.zeros_like(self.raw) if buffer is None
                                    else buffer.to(self.raw.device, self.raw.dtype).clone())
