"""The shared style and file writing of the report's figures: run colours, line styles of the
shot groups, label shortening and wrapping, the panel grid, and the PNG writer.

Every figure of :mod:`otlt.report.plots` and :mod:`otlt.report.heatmaps` is written by
:func:`save_figure`, so all of them share one resolution and one file format (256-colour
palette PNGs, galleries of images excepted).
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from otlt.atomic import write_atomic

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


def save_figure(fig: Figure, path: Path, palette: bool = True) -> Path:
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


def short_name(name: str, width: int = 12) -> str:
    """``name`` cut to ``width`` characters, an ellipsis marking the cut."""
    return name if len(name) <= width else name[: width - 1] + "…"


def panel_grid(n: int, panel: tuple[float, float], max_cols: int = 3) -> tuple[Figure, list]:
    """A figure of ``n`` panels of size ``panel`` (inches), at most ``max_cols`` a row; the
    grid's unused cells are hidden and the ``n`` axes returned in reading order."""
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(panel[0] * cols, panel[1] * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]
