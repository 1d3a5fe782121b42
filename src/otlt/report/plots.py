"""Figures for ``otlt report``: one function per figure, each writing one PNG.

The functions take plain numbers (lists, NumPy arrays) and know nothing about run
directories; :mod:`otlt.report` reads the runs and calls them. Figures are built on
:class:`matplotlib.figure.Figure` directly, never through ``pyplot``: the PNG is rendered by
the Agg canvas, so no display is needed and no global figure state leaks between calls.

Figure numbers refer to the OTmix paper (Gao et al., "Enhancing Minority Classes by Mixing:
An Adaptative Optimal Transport Approach for Long-tailed Classification", NeurIPS 2023):
learning curves, per-class accuracy (Fig. 7), confusion matrices (Fig. 6), mixing statistics
(Fig. 9), a sampled transport plan (Fig. 3), mixed-image pairs (Fig. 5), t-SNE of features
(Fig. 4) and hyper-parameter sweeps (Fig. 8).

The module stays whole (over 400 lines): every function is one figure in one shared style
(the helpers at the top), and a reader looking for a figure finds all of them here.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image

from otlt.atomic import write_atomic
from otlt.errors import is_finite_number

DPI = 110
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
              "#7f7f7f", "#bcbd22", "#17becf")
GROUP_STYLE = {"many": ":", "medium": "--", "few": "-."}
MAX_NAMED_CLASSES = 20  # above this, axes show class indices instead of names


def run_color(index: int) -> str:
    """Colour of the ``index``-th run, the same in every figure of a report."""
    return RUN_COLORS[index % len(RUN_COLORS)]


def palette_png(png: bytes) -> bytes:
    """``png`` as a 256-colour palette PNG (median cut, no dithering, optimised): a chart's
    flat colours and anti-aliased edges survive and the file is about a third the size
    (15.4 MB of committed report figures became 5.3), which keeps ``results/`` small enough
    to travel to a GPU machine with the repository."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    out = io.BytesIO()
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                   dither=Image.Dither.NONE).save(out, "PNG", optimize=True)
    return out.getvalue()


def _save(fig: Figure, path: Path, palette: bool = True) -> Path:
    """Write ``fig`` to ``path`` (its suffix names the format); a PNG as a palette PNG unless
    ``palette`` is False (photographs: 256 colours band them visibly)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    rendered = io.BytesIO()
    fig.savefig(rendered, dpi=DPI, format=fmt)
    data = palette_png(rendered.getvalue()) if fmt == "png" and palette else \
        rendered.getvalue()
    write_atomic(path, lambda handle: handle.write(data), parents=True)
    return path


def wrap_label(text: str, width: int = 42) -> str:
    """Break long run names (``cifar100_lt_r100_ldam_drw_otmix_short``) at underscores too."""
    return "\n".join(textwrap.wrap(text.replace("_", "_\u200b"), width)).replace("\u200b", "")


def _short(name: str, width: int = 12) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


def _class_ticks(ax, names: Sequence[str], counts: Sequence[int]) -> None:
    """Name every class (with its training count) when few, else number them by rank."""
    k = len(names)
    if k <= MAX_NAMED_CLASSES:
        ax.set_xticks(np.arange(k), [f"{_short(n)}\n{c}" for n, c in
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


# ---------------------------------------------------------------------- heatmaps


def _heatmap(ax, matrix: np.ndarray, classes: Sequence[str], *, cmap: str, vmax: float,
             fmt: str | None, ylabel: str, xlabel: str, row_labels: Sequence[str] | None = None,
             col_labels: Sequence[str] | None = None, blank_zero: bool = True):
    k_rows, k_cols = matrix.shape
    image = ax.imshow(matrix, cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    rows = list(row_labels) if row_labels is not None else list(classes)
    cols = list(col_labels) if col_labels is not None else list(classes)
    if max(k_rows, k_cols) <= MAX_NAMED_CLASSES:
        ax.set_yticks(np.arange(k_rows), [_short(n, 14) for n in rows], fontsize=8)
        ax.set_xticks(np.arange(k_cols), [_short(n, 14) for n in cols], fontsize=8,
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


def _grid(n: int, panel: tuple[float, float], max_cols: int = 3) -> tuple[Figure, list]:
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(panel[0] * cols, panel[1] * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


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
    fig, axes = _grid(len(panels), size)
    image = None
    for ax, (title, matrix) in zip(axes, panels, strict=True):
        image = _heatmap(ax, normalize_rows(matrix), classes, cmap="Blues", vmax=1.0,
                         fmt=".2f", ylabel="true class", xlabel="predicted class")
        ax.set_title(title, fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="fraction of the true class")
    return _save(fig, path)


def mix_pair_matrices(panels: Sequence[tuple[str, Sequence[Sequence[int]]]],
                      classes: Sequence[str], path: Path) -> Path:
    """Counts of mixed pairs, foreground class (rows) x background class (columns), one
    panel per epoch (paper Fig. 9: CMO-like random pairing beside OT pairing)."""
    k = len(classes)
    size = (5.6, 5.4) if k <= MAX_NAMED_CLASSES else (6.4, 6.2)
    fig, axes = _grid(len(panels), size)
    for ax, (title, matrix) in zip(axes, panels, strict=True):
        m = np.asarray(matrix, dtype=np.float64)
        image = _heatmap(ax, m, classes, cmap="Blues", vmax=max(float(m.max()), 1.0),
                         fmt=".0f", ylabel="foreground class", xlabel="background class")
        ax.set_title(wrap_label(title), fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8, label="mixed images")
    return _save(fig, path)


def transport_plan(plan: dict, classes: Sequence[str], path: Path, title: str) -> Path:
    """Cost and entropic plan of one sampled batch, rows = foregrounds, columns =
    backgrounds, each labelled with its class; the chosen partner ``argmax_j T_ij`` (eq. 8)
    is boxed (paper Fig. 3)."""
    cost = np.asarray(plan["cost"], dtype=np.float64)
    t = np.asarray(plan["plan"], dtype=np.float64)
    m = t.shape[0]
    rows = [f"{i}: {_short(classes[c], 11)}" for i, c in enumerate(plan["fore_labels"])]
    cols = [f"{j}: {_short(classes[c], 11)}" for j, c in enumerate(plan["back_labels"])]
    fig = Figure(figsize=(12, 5.6), layout="constrained")
    ax_cost, ax_plan = fig.subplots(1, 2)
    image = _heatmap(ax_cost, cost, classes, cmap="magma_r", vmax=max(float(cost.max()), 1e-9),
                     fmt=".2f", ylabel="foreground image", xlabel="background image",
                     row_labels=rows, col_labels=cols, blank_zero=False)
    fig.colorbar(image, ax=ax_cost, shrink=0.8, label="cost $C_{ij}$ (eq. 7)")
    ax_cost.set_title("cost")
    scaled = t * m  # uniform marginals: every row of M·T sums to 1
    image = _heatmap(ax_plan, scaled, classes, cmap="Blues", vmax=max(float(scaled.max()), 1e-9),
                     fmt=".2f", ylabel="foreground image", xlabel="background image",
                     row_labels=rows, col_labels=cols)
    fig.colorbar(image, ax=ax_plan, shrink=0.8, label="$M \\cdot T_{ij}$ (rows sum to 1)")
    for i, j in enumerate(np.asarray(plan.get("argmax", t.argmax(1)))):
        ax_plan.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="#d62728", lw=2))
    ax_plan.set_title("transport plan (red box: chosen background)")
    fig.suptitle(wrap_label(title, 110))
    return _save(fig, path)


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
                ax.set_title(_short(classes[labels[i]], 13), fontsize=8)
            else:
                ax.set_title(f"λ={lams[i]:.2f}", fontsize=8)
        axes[r, 0].set_ylabel(row_name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, palette=False)  # images: full colour


def tsne_panels(panels: Sequence[tuple[str, np.ndarray, np.ndarray]], classes: Sequence[str],
                counts: Sequence[int], path: Path) -> Path:
    """2-D t-SNE embeddings of test features, one panel per run, coloured by class
    (paper Fig. 4). ``panels`` holds ``(title, embedding (N, 2), labels (N,))``."""
    k = len(classes)
    fig, axes = _grid(len(panels), (5.0, 4.6))
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
                           label=f"{_short(classes[c], 14)} ({counts[c]})")
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
    return _save(fig, path)


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
    return _save(fig, path)


__all__ = [
    "confusion_matrices",
    "count_order",
    "learning_curves",
    "mix_pair_matrices",
    "mixed_gallery",
    "normalize_rows",
    "per_class_bars",
    "run_color",
    "sweep_plot",
    "transport_plan",
    "tsne_panels",
    "validation_overlay",
    "wrap_label",
]


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
    return _save(fig, path)
