"""Heatmap figures of ``otlt report``: test confusion matrices (OTmix paper Fig. 6), counts of
mixed pairs by foreground and background class (Fig. 9) and one sampled transport plan with
its cost (Fig. 3). Each function writes one PNG; matrices are plain nested lists or arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from otlt.report.figure_style import (
    MAX_NAMED_CLASSES,
    panel_grid,
    save_figure,
    short_name,
    wrap_label,
)


def heatmap(ax, matrix: np.ndarray, classes: Sequence[str], *, cmap: str, vmax: float,
             fmt: str | None, ylabel: str, xlabel: str, row_labels: Sequence[str] | None = None,
             col_labels: Sequence[str] | None = None, blank_zero: bool = True):
    """Draw ``matrix`` ``(rows, cols)`` on ``ax`` from 0 to ``vmax``; name the rows and columns
    (``classes`` unless ``row_labels``/``col_labels`` are given) when at most
    ``MAX_NAMED_CLASSES``, else number them; print each cell with ``fmt`` when at most 12 a
    side (zero cells left blank unless ``blank_zero`` is False). Returns the image."""
    k_rows, k_cols = matrix.shape
    image = ax.imshow(matrix, cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    rows = list(row_labels) if row_labels is not None else list(classes)
    cols = list(col_labels) if col_labels is not None else list(classes)
    if max(k_rows, k_cols) <= MAX_NAMED_CLASSES:
        ax.set_yticks(np.arange(k_rows), [short_name(n, 14) for n in rows], fontsize=8)
        ax.set_xticks(np.arange(k_cols), [short_name(n, 14) for n in cols], fontsize=8,
                      rotation=45, ha="right", rotation_mode="anchor")
    else:
        step = 10 if max(k_rows, k_cols) <= 200 else 50
        ax.set_yticks(np.arange(0, k_rows, step))
        ax.set_xticks(np.arange(0, k_cols, step))
    if fmt is not None and max(k_rows, k_cols) <= 12:
        for i in range(k_rows):
            for j in range(k_cols):
                text = format(matrix[i, j], fmt)
                if blank_zero and float(text) == 0:
                    continue  # blank zero cells so the structure stands out
                r, g, b, _ = image.cmap(image.norm(matrix[i, j]))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    return image


def normalize_rows(matrix: Sequence[Sequence[float]]) -> np.ndarray:
    """Rows divided by their sums (an empty row stays zero)."""
    m = np.asarray(matrix, dtype=np.float64)
    sums = m.sum(axis=1, keepdims=True)
    return np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)


def confusion_matrices(panels: Sequence[tuple[str, Sequence[Sequence[int]]]],
                       classes: Sequence[str], path: Path) -> Path:
    """Row-normalised test confusion matrices, one panel per run (paper Fig. 6)."""
    k = len(classes)
    size = (4.9, 5.4) if k <= MAX_NAMED_CLASSES else (6.0, 6.2)
    fig, axes = panel_grid(len(panels), size)
    image = None
    for ax, (title, matrix) in zip(axes, panels, strict=True):
        image = heatmap(ax, normalize_rows(matrix), classes, cmap="Blues", vmax=1.0,
                        fmt=".2f", ylabel="true class", xlabel="predicted class")
        ax.set_title(title, fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="fraction of the true class")
    return save_figure(fig, path)


def mix_pair_matrices(panels: Sequence[tuple[str, Sequence[Sequence[int]]]],
                      classes: Sequence[str], path: Path) -> Path:
    """Counts of mixed pairs, foreground class (rows) x background class (columns), one
    panel per epoch (paper Fig. 9: CMO-like random pairing beside OT pairing)."""
    k = len(classes)
    size = (5.6, 5.4) if k <= MAX_NAMED_CLASSES else (6.4, 6.2)
    fig, axes = panel_grid(len(panels), size)
    for ax, (title, matrix) in zip(axes, panels, strict=True):
        m = np.asarray(matrix, dtype=np.float64)
        image = heatmap(ax, m, classes, cmap="Blues", vmax=max(float(m.max()), 1.0),
                        fmt=".0f", ylabel="foreground class", xlabel="background class")
        ax.set_title(wrap_label(title), fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8, label="mixed images")
    return save_figure(fig, path)


def transport_plan(plan: dict, classes: Sequence[str], path: Path, title: str) -> Path:
    """Cost and entropic plan of one sampled batch, rows = foregrounds, columns =
    backgrounds, each labelled with its class; the chosen partner ``argmax_j T_ij`` (eq. 8)
    is boxed (paper Fig. 3)."""
    cost = np.asarray(plan["cost"], dtype=np.float64)
    t = np.asarray(plan["plan"], dtype=np.float64)
    m = t.shape[0]
    rows = [f"{i}: {short_name(classes[c], 11)}" for i, c in enumerate(plan["fore_labels"])]
    cols = [f"{j}: {short_name(classes[c], 11)}" for j, c in enumerate(plan["back_labels"])]
    fig = Figure(figsize=(12, 5.6), layout="constrained")
    ax_cost, ax_plan = fig.subplots(1, 2)
    image = heatmap(ax_cost, cost, classes, cmap="magma_r", vmax=max(float(cost.max()), 1e-9),
                    fmt=".2f", ylabel="foreground image", xlabel="background image",
                    row_labels=rows, col_labels=cols, blank_zero=False)
    fig.colorbar(image, ax=ax_cost, shrink=0.8, label="cost $C_{ij}$ (eq. 7)")
    ax_cost.set_title("cost")
    scaled = t * m  # uniform marginals: every row of M·T sums to 1
    image = heatmap(ax_plan, scaled, classes, cmap="Blues", vmax=max(float(scaled.max()), 1e-9),
                    fmt=".2f", ylabel="foreground image", xlabel="background image",
                    row_labels=rows, col_labels=cols)
    fig.colorbar(image, ax=ax_plan, shrink=0.8, label="$M \\cdot T_{ij}$ (rows sum to 1)")
    for i, j in enumerate(np.asarray(plan.get("argmax", t.argmax(1)))):
        ax_plan.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="#d62728", lw=2))
    ax_plan.set_title("transport plan (red box: chosen background)")
    fig.suptitle(wrap_label(title, 110))
    return save_figure(fig, path)


__all__ = ["confusion_matrices", "heatmap", "mix_pair_matrices", "normalize_rows",
           "transport_plan"]
