"""Class-index labels: the one check that the mixers, the re-weighter and the Lightning
callback apply to the labels a user hands them."""

from __future__ import annotations

import torch

from otlt.errors import OtltError


def check_labels(y: torch.Tensor, what: str, classes: torch.Tensor | None = None) -> torch.Tensor:
    """``y`` as int64 class indices ``(B,)``. Refused: float, bool and uint8 labels (the
    last two index as masks), labels not of shape ``(B,)`` and, given ``classes``
    (``arange(K)`` on ``y``'s device, kept by the caller so a step builds no new one), labels
    outside ``[0, K)``.

    The range is checked by ``classes.index_select(0, y)``, not by reading ``y.min()`` and
    ``y.max()`` (a host sync every batch on a GPU): on the CPU it raises at once, negative
    labels included (plain indexing would wrap -1 to the last class), and the message then
    names a bad label; on CUDA it is expected to be a device-side assert, which ends the
    process's CUDA context, and ROCm builds without device asserts and MPS may not check at
    all, so check a dataset's labels before a GPU run."""
    if y.is_floating_point() or y.is_complex() or y.dtype in (torch.bool, torch.uint8):
        raise OtltError(f"{what} labels must be integer class indices (int64), got {y.dtype}; "
                        "soft targets are what a mixer returns, not what it takes")
    if y.dim() != 1:
        raise OtltError(f"{what} labels must be (B,), got {tuple(y.shape)}")
    y = y.long()
    if classes is None:
        return y
    try:
        return classes.index_select(0, y)
    except IndexError:
        k = len(classes)
        bad = y[(y < 0) | (y >= k)]  # read only to name it: the batch is refused anyway
        raise OtltError(f"{what} labels must be class indices in [0, {k}), got "
                        f"{int(bad[0]) if len(bad) else 'an index out of range'}") from None


__all__ = ["check_labels"]
