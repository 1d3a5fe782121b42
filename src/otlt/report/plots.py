"""Figures for ``otlt report``: one function per figure, each writing one PNG.

The functions take plain numbers (lists, NumPy arrays) and know nothing about run
directories; :mod:`otlt.report` reads the runs and calls them. Figures are built on
:class:`matplotlib.figure.Figure` directly, never through ``pyplot``: the PNG is rendered by
the Agg canvas, so no display is needed and no global figure state leaks between calls.

Figure numbers refer to the OTmix paper (Gao et al., "Enhancing Minority Classes by Mixing:
An Adaptative Optimal Transport Approach for Long-tailed Classification", NeurIPS 2023):
learning curves, per-class accuracy (Fig. 7), mixed-image pairs (Fig. 5), t-SNE of features
(Fig. 4), hyper-parameter sweeps (Fig. 8) and the BatchNorm probe's curves here; confusion
matrices (Fig. 6), mixing statistics (Fig. 9) and a sampled transport plan (Fig. 3) in
:mod:`otlt.report.heatmaps`; the shared style and the PNG writer in
:mod:`otlt.report.figure_style`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from otlt.errors import is_finite_number
from otlt.report.figure_style import (
    GROUP_STYLE,
    MAX_NAMED_CLASSES,
    RUN_COLORS,
    panel_grid,
    run_color,
    save_figure,
    short_name,
    wrap_label,
)

# ---------------------------------------------------------------------- learning curves


def learning_curves(title: str, records: Sequence[dict], path: Path) -> Path:
    """Plot train loss, validation accuracy (overall and per shot group) and learning rate
    against the epoch, from one run's ``metrics.jsonl`` records."""
    epochs = [r["epoch"] + 1 for r in records]
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax_loss, ax_val, ax_lr = fig.subplots(1, 3)
    _series(ax_loss, epochs, records, "train_loss", "train loss", "-")
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    plotted = _series(ax_val, epochs, records, "val_acc", "all classes", "-")
    for group, style in GROUP_STYLE.items():
        plotted |= _series(ax_val, epochs, records, f"val_{group}_acc", group, style)
    ax_val.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy (%)")
    if plotted:
        ax_val.legend(fontsize=8, loc="best")
    else:
        ax_val.text(0.5, 0.5, "no validation split", ha="center", transform=ax_val.transAxes)
    _series(ax_lr, epochs, records, "lr", "lr", "-")
    lrs = [r["lr"] for r in records if is_finite_number(r.get("lr")) and r["lr"] > 0]
    if lrs and max(lrs) / min(lrs) > 20:
        ax_lr.set_yscale("log")
    else:  # a constant lr must read as its value, not as an offset of 1e-16
        ax_lr.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax_lr.set(title="learning rate (end of epoch)", xlabel="epoch", ylabel="lr")
    for ax in (ax_loss, ax_val, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return save_figure(fig, path)


def _series(ax, epochs: Sequence[int], records: Sequence[dict], key: str, label: str,
            style: str, color: str | None = None) -> bool:
    """Plot ``records[*][key]`` where it is a finite number; return whether anything was."""
    points = [(e, r[key]) for e, r in zip(epochs, records, strict=True)
              if is_finite_number(r.get(key))]
    if not points:
        return False
    xs, ys = zip(*points, strict=True)
    # A single epoch has no line to draw: mark the point.
    ax.plot(xs, ys, style, label=label, color=color, lw=1.4,
            marker="o" if len(points) == 1 else None)
    return True


def validation_overlay(runs: Sequence[tuple[str, Sequence[dict]]], path: Path,
                       colors: Sequence[str] | None = None) -> Path:
    """Validation accuracy of several runs on one axis (same colours as the other figures)."""
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (label, records) in enumerate(runs):
        epochs = [r["epoch"] + 1 for r in records]
        color = colors[i] if colors else run_color(i)
        _series(ax, epochs, records, "val_acc", label, "-", color=color)
    ax.set(title="validation accuracy of every run", xlabel="epoch", ylabel="accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncol=min(len(runs), 2), fontsize=8)
    return save_figure(fig, path)


# ---------------------------------------------------------------------- per-class bars


def count_order(counts: Sequence[int]) -> np.ndarray:
    """Class indices from the most to the fewest training images (stable on ties)."""
    return np.argsort(-np.asarray(counts), kind="stable")


def per_class_bars(classes: Sequence[str], counts: Sequence[int],
                   runs: Sequence[tuple[str, Sequence[float | None]]], path: Path, *,
                   title: str, ylabel: str = "test accuracy (%)",
                   thresholds: tuple[int, int] | None = None,
                   colors: Sequence[str] | None = None) -> Path:
    """Grouped bars of a per-class value (accuracy, mean weight) for several runs, classes
    ordered by training count, most frequent on the left (paper Fig. 7).

    ``thresholds = (many, few)`` draws the many/medium/few boundaries.
    """
    order = count_order(counts)
    k, r = len(classes), max(len(runs), 1)
    bars = k <= MAX_NAMED_CLASSES  # beyond that, bars get too thin: one line per run
    width = 0.8 / r
    fig = Figure(figsize=(max(8.0, 0.16 * k * r + 3) if bars else 13.0, 4.6),
                 layout="constrained")
    ax = fig.subplots()
    x = np.arange(k)
    for i, (label, values) in enumerate(runs):
        heights = np.array([np.nan if values[c] is None else values[c] for c in order])
        color = colors[i] if colors else run_color(i)
        if bars:
            ax.bar(x + (i - (r - 1) / 2) * width, heights, width, label=label, color=color)
        else:
            ax.plot(x, heights, "-o", ms=2.5, lw=1.0, label=label, color=color)
    _class_ticks(ax, [classes[c] for c in order], [counts[c] for c in order])
    if thresholds is not None:
        _group_boundaries(ax, [counts[c] for c in order], *thresholds)
    ax.set(ylabel=ylabel, xlim=(-0.6, k - 0.4))
    ax.set_title(title, pad=16 if thresholds is not None else 6)  # room for group names
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=min(len(runs), 3), fontsize=8)
    return save_figure(fig, path)


def _class_ticks(ax, names: Sequence[str], counts: Sequence[int]) -> None:
    """Name every class (with its training count) when few, else number them by rank."""
    k = len(names)
    if k <= MAX_NAMED_CLASSES:
        ax.set_xticks(np.arange(k), [f"{short_name(n)}\n{c}" for n, c in
                                     zip(names, counts, strict=True)], fontsize=8)
        ax.set_xlabel("class (training images), most frequent first")
    else:
        step = 10 if k <= 200 else 50
        ax.set_xticks(np.arange(0, k, step))
        ax.set_xlabel(f"class rank by training count (0 = most, {counts[0]} images; "
                      f"{k - 1} = fewest, {counts[-1]} images)")


def _group_boundaries(ax, sorted_counts: Sequence[int], many: int, few: int) -> None:
    """Dashed lines between many (n > many), medium and few (n < few) classes."""
    n_many = sum(c > many for c in sorted_counts)
    n_few = sum(c < few for c in sorted_counts)
    k = len(sorted_counts)
    edges = [0, n_many, k - n_few, k]
    for edge in edges[1:-1]:
        if 0 < edge < k:
            ax.axvline(edge - 0.5, color="0.4", ls="--", lw=0.8)
    for name, lo, hi in zip(("many", "medium", "few"), edges[:-1], edges[1:], strict=True):
        if hi > lo:
            ax.text((lo + hi - 1) / 2, 1.01, name, transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8, color="0.3")


# ---------------------------------------------------------------------- images


def mixed_gallery(partners: np.ndarray, bases: np.ndarray, mixed: np.ndarray,
                  partner_labels: Sequence[int], base_labels: Sequence[int],
                  lams: Sequence[float], classes: Sequence[str], path: Path,
                  title: str) -> Path:
    """Columns of (partner, chosen base, mixed image), drawn with the paper's words
    (foreground, background), with class names and the base's label weight ``lam`` (paper
    Fig. 5). Images ``(N, H, W, 3)`` in [0, 1]."""
    n = len(partners)
    fig = Figure(figsize=(max(1.55 * n, 6), 5.4), layout="constrained")
    axes = np.asarray(fig.subplots(3, n, squeeze=False))
    rows = (("foreground", partners, partner_labels), ("background", bases, base_labels),
            ("mixed", mixed, None))
    for r, (row_name, images, labels) in enumerate(rows):
        for i in range(n):
            ax = axes[r, i]
            ax.imshow(np.clip(images[i], 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if labels is not None:
                ax.set_title(short_name(classes[labels[i]], 13), fontsize=8)
            else:
                ax.set_title(f"λ={lams[i]:.2f}", fontsize=8)
        axes[r, 0].set_ylabel(row_name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, palette=False)  # images: full colour


def tsne_panels(panels: Sequence[tuple[str, np.ndarray, np.ndarray]], classes: Sequence[str],
                counts: Sequence[int], path: Path) -> Path:
    """2-D t-SNE embeddings of test features, one panel per run, coloured by class
    (paper Fig. 4). ``panels`` holds ``(title, embedding (N, 2), labels (N,))``."""
    k = len(classes)
    fig, axes = panel_grid(len(panels), (5.0, 4.6))
    rank = np.empty(k, dtype=np.int64)
    rank[count_order(counts)] = np.arange(k)
    if k <= 10:
        cmap, colors = None, [RUN_COLORS[c % 10] for c in range(k)]
    else:
        cmap, colors = ("tab20" if k <= 20 else "viridis"), None
    for ax, (title, emb, labels) in zip(axes, panels, strict=True):
        labels = np.asarray(labels)
        if colors is not None:
            for c in range(k):
                pts = emb[labels == c]
                ax.scatter(pts[:, 0], pts[:, 1], s=6, color=colors[c],
                           label=f"{short_name(classes[c], 14)} ({counts[c]})")
        else:
            values = rank[labels] if k > 20 else labels
            sc = ax.scatter(emb[:, 0], emb[:, 1], s=6, c=values, cmap=cmap,
                            vmin=0, vmax=k - 1)
        ax.set_title(wrap_label(title), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if colors is not None:
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside right center", fontsize=8, markerscale=2.5,
                   title="class (train n)", title_fontsize=8)
    elif k > 20:
        fig.colorbar(sc, ax=axes, shrink=0.8, label="class rank by training count (0 = most)")
    else:
        fig.colorbar(sc, ax=axes, shrink=0.8, label="class index")
    return save_figure(fig, path)


# ---------------------------------------------------------------------- sweeps


def sweep_plot(key: str, values: Sequence[object],
               errors: dict[str, Sequence[float | None]], path: Path, title: str) -> Path:
    """Test error (overall and per shot group) against one hyper-parameter's values
    (paper Fig. 8). Values sit at equal spacing, labelled with the value, as in the paper."""
    fig = Figure(figsize=(7.5, 4.4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(values))
    styles = {"overall": ("-", "o", "k"), "many": (":", "s", "#1f77b4"),
              "medium": ("--", "^", "#ff7f0e"), "few": ("-.", "v", "#d62728")}
    for name, series in errors.items():
        ys = np.array([np.nan if v is None else v for v in series], dtype=np.float64)
        if np.isnan(ys).all():
            continue
        ls, marker, color = styles.get(name, ("-", "o", None))
        ax.plot(x, ys, ls=ls, marker=marker, color=color, label=f"{name} error")
        if name == "overall":
            for xi, yi in zip(x, ys, strict=True):
                if not np.isnan(yi):
                    ax.annotate(f"{yi:.2f}", (xi, yi), textcoords="offset points",
                                xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(x, [str(v) for v in values])
    ax.set(xlabel=key, ylabel="test error (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)




def bn_probe_curves(title: str, series: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """Validation accuracy against the epoch, one line per BatchNorm procedure:
    ``series[procedure] = [(epoch counted from 1, accuracy %), ...]``."""
    fig = Figure(figsize=(8, 3.8), layout="constrained")
    ax = fig.subplots()
    for i, (mode, points) in enumerate(series.items()):
        if points:
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, "-o", ms=2.5, lw=1.3, label=mode, color=run_color(i))
    ax.set(title=wrap_label(title, 70), xlabel="epoch", ylabel="validation accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="BN statistics", title_fontsize=8, loc="best")
    return save_figure(fig, path)


__all__ = [
    "bn_probe_curves",
    "count_order",
    "learning_curves",
    "mixed_gallery",
    "per_class_bars",
    "sweep_plot",
    "tsne_panels",
    "validation_overlay",
]
