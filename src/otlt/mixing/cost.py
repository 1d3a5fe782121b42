"""OTmix's transport cost (Gao et al., NeurIPS 2023, eqs. 6-7): pure functions of features,
labels and the validation confusion; :class:`otlt.mixing.OTMix` plans with them.

Rows are partners (the paper's foregrounds) ``i``, columns bases (backgrounds) ``j``::

    C_ij = omega (1 - cos(z_i, z_j)) + (1 - omega) (1 - F^[y_i, y_j])

with ``F^`` the row-normalised validation confusion, diagonal zeroed (eq. 6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from otlt.errors import require, require_choice
from otlt.metrics import row_normalized_confusion

DISTANCES = ("cosine", "euclidean")


def class_affinity(confusion: torch.Tensor, keep_same_class: bool = False) -> torch.Tensor:
    """``F^`` of eq. 6: row-normalised confusion ``(K, K)``, diagonal zeroed unless kept."""
    return row_normalized_confusion(confusion.float(), zero_diagonal=not keep_same_class)


def otmix_cost(z_partner: torch.Tensor, z_base: torch.Tensor, y_partner: torch.Tensor,
               y_base: torch.Tensor, confusion: torch.Tensor, omega: float = 0.05,
               distance: str = "cosine", keep_same_class: bool = False) -> torch.Tensor:
    """Return the OTmix cost ``(B_f, B_b)`` of eq. 7, in float32.

    Args:
        z_partner, z_base: ``(B_f, D)``, ``(B_b, D)`` features of the partners (foregrounds,
            the rows) and the bases (backgrounds, the columns).
        y_partner, y_base: ``(B_f,)``, ``(B_b,)`` labels.
        confusion: ``(K, K)`` validation confusion (counts or rates, rows = true class);
            row-normalised here, diagonal zeroed unless ``keep_same_class``.
        omega: weight of the sample-level term (1 = features only, 0 = classes only).
        distance: ``"cosine"`` (``1 - cos`` in [0, 2]) or ``"euclidean"`` (Table 4's
            variant: ``||z_i - z_j||`` divided by its batch maximum, in [0, 1]).
    """
    require(0.0 <= omega <= 1.0, f"omega must be in [0, 1], got {omega}")
    affinity = class_affinity(confusion.to(z_partner.device), keep_same_class)
    return combine_cost(sample_cost(z_partner, z_base, distance), affinity, y_partner, y_base,
                        omega)


def sample_cost(z_partner: torch.Tensor, z_base: torch.Tensor,
                distance: str = "cosine") -> torch.Tensor:
    """Sample-level cost ``(B_f, B_b)`` in float32: ``1 - cos`` or the scaled distance."""
    require_choice("distance", distance, DISTANCES)
    partner, base = z_partner.float(), z_base.float()
    if distance == "cosine":
        return 1.0 - F.normalize(partner, dim=1) @ F.normalize(base, dim=1).T
    dist = torch.cdist(partner, base)
    return dist / dist.max().clamp_min(1e-12)


def combine_cost(sample: torch.Tensor, affinity: torch.Tensor, y_partner: torch.Tensor,
                 y_base: torch.Tensor, omega: float) -> torch.Tensor:
    """Eq. 7 from its parts: ``omega * sample + (1 - omega) * (1 - F^[y_partner, y_base])``,
    ``sample`` ``(B_f, B_b)``, ``affinity`` ``F^`` ``(K, K)`` on the same device."""
    label = 1.0 - affinity[y_partner[:, None], y_base[None, :]]
    return omega * sample + (1.0 - omega) * label


__all__ = ["DISTANCES", "class_affinity", "combine_cost", "otmix_cost", "sample_cost"]
