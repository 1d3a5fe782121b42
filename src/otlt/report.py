"""``otlt report``: run directories in, ``report.md`` with PNG figures out.

Everything is read from the run directories' own files, so a number in the report is the
number the run wrote:

- ``config.yaml``: the resolved config (method, ``paper:`` row, sweep detection);
- ``metrics.jsonl``: learning curves, OTmix ``mix_pairs`` (Fig. 9), re-weighting ``weight_*``
  statistics;
- ``eval.json``: the last epoch's test metrics (table, per-class bars, confusion matrices);
- ``plans/epoch_XXXX.json``: a sampled OTmix transport plan (Fig. 3);
- ``last.pt`` and the dataset, only for ``--gallery`` (mixed pairs, Fig. 5) and ``--tsne``
  (feature embedding, Fig. 4).

Figures go to ``OUT/figures/`` and ``report.md`` links them with relative paths, so the
folder renders on GitHub as it is.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from otlt import plots
from otlt.errors import OtltError, require

if TYPE_CHECKING:  # the engine and data modules load only for --gallery / --tsne
    from otlt.config import RunConfig
    from otlt.data.prepare import LongTailedData

#: config keys that name or place a run rather than define it (ignored by sweep detection)
IGNORED_KEYS = ("name", "out_dir", "data.path", "train.device", "train.amp", "train.progress",
                "train.compile", "train.channels_last", "train.eval_batch_size")
GROUPS = ("many", "medium", "few")


# ---------------------------------------------------------------------- reading runs


@dataclass
class RunData:
    """What a report needs from one run directory (missing files give empty fields)."""

    path: Path
    label: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    eval: dict[str, Any] | None
    splits: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        if self.eval and self.eval.get("classes"):
            return list(self.eval["classes"])
        if self.splits.get("classes"):
            return list(self.splits["classes"])
        return [str(k) for k in range(len(self.counts))]

    @property
    def counts(self) -> list[int]:
        if self.eval and self.eval.get("class_counts_train"):
            return list(self.eval["class_counts_train"])
        return list(self.splits.get("counts", {}).get("train", []))

    @property
    def total_epochs(self) -> int | None:
        return (self.config.get("optim") or {}).get("epochs")

    @property
    def method(self) -> str:
        loss = (self.config.get("loss") or {}).get("name", "?")
        mix_cfg = self.config.get("mix") or {}
        mix = mix_cfg.get("name", "none")
        model = (self.config.get("model") or {}).get("name", "?")
        reweight = (self.config.get("reweight") or {}).get("stage1")
        if mix not in (None, "none"):
            # The foreground sampler changes results a lot (README: "foreground sampler").
            sampler = mix_cfg.get("sampler_r")
            mix += f" (r={sampler:g})" if isinstance(sampler, (int, float)) else ""
        return (f"{model}, {loss}" + ("" if mix in (None, "none") else f" + {mix}")
                + (" + OT re-weighting" if reweight else ""))

    @property
    def paper(self) -> dict[str, Any]:
        paper = self.config.get("paper")
        return paper if isinstance(paper, dict) else {}

    @property
    def is_otmix(self) -> bool:
        return (self.config.get("mix") or {}).get("name") == "otmix"

    def plan_files(self) -> list[Path]:
        """``plans/epoch_XXXX.json`` files, oldest epoch first."""
        return sorted((self.path / "plans").glob("epoch_*.json"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl``, skipping a line a running job is still writing."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OtltError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return data if isinstance(data, dict) else None


def load_run(path: str | Path, label: str | None = None) -> RunData:
    """Read one run directory; a folder without ``config.yaml`` is a user error."""
    path = Path(path)
    config_path = path / "config.yaml"
    require(path.is_dir(), f"run directory {path} does not exist")
    require(config_path.is_file(), f"{path} is not an otlt run directory (no config.yaml; "
                                   "expected the folder 'otlt train' wrote)")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise OtltError(f"{config_path} is not valid YAML: {exc}") from None
    require(isinstance(config, dict), f"{config_path} must be a mapping")
    return RunData(path=path, label=label or path.name, config=config,
                   metrics=read_jsonl(path / "metrics.jsonl"),
                   eval=_read_json(path / "eval.json"),
                   splits=_read_json(path / "splits.json") or {})


def load_runs(paths: Sequence[str | Path]) -> list[RunData]:
    """Read several run directories with unique labels (``parent/name`` on a clash)."""
    require(len(paths) > 0, "give at least one run directory")
    paths = [Path(p) for p in paths]
    names = [p.resolve().name for p in paths]
    labels = []
    for p, name in zip(paths, names, strict=True):
        clash = names.count(name) > 1
        labels.append(f"{p.resolve().parent.name}/{name}" if clash else name)
    require(len(set(labels)) == len(labels),
            f"run directories given twice: {sorted({x for x in labels if labels.count(x) > 1})}")
    return [load_run(p, label) for p, label in zip(paths, labels, strict=True)]


# ---------------------------------------------------------------------- numbers


def comparison_rows(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """One row per run: top-1/many/medium/few error from ``eval.json`` (None when missing)
    and the paper's reported top-1 error when the config names a paper row."""
    rows = []
    for run in runs:
        e = run.eval or {}
        paper = run.paper.get("top1_error")
        ours = e.get("top1_error")
        rows.append({
            "label": run.label, "method": run.method, "split": e.get("split"),
            "epoch": None if "epoch" not in e else int(e["epoch"]) + 1,
            "epochs": run.total_epochs, "epochs_done": len(run.metrics),
            "top1_error": ours, **{f"{g}_error": e.get(f"{g}_error") for g in GROUPS},
            "paper_top1_error": paper, "paper_row": _paper_name(run.paper),
            "delta": None if ours is None or paper is None else ours - float(paper),
            "wall_seconds": sum(r.get("epoch_seconds", 0.0) for r in run.metrics
                                if plots.is_number(r.get("epoch_seconds"))),
        })
    return rows


def _paper_name(paper: dict[str, Any]) -> str | None:
    if not paper.get("row") and not paper.get("table"):
        return None
    return ", ".join(str(paper[k]) for k in ("table", "row") if paper.get(k))


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table; ``–`` for missing."""
    return "–" if value is None else f"{value:.{digits}f}"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def comparison_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`comparison_rows` (errors in %, lower is better)."""
    lines = ["| run | method | epochs | top-1 error | many | medium | few | paper top-1 "
             "| ours − paper |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        done = f"{r['epochs_done']}/{r['epochs'] if r['epochs'] is not None else '?'}"
        paper = fmt(r["paper_top1_error"])
        if r["paper_row"] and r["paper_top1_error"] is not None:
            paper += f" ({_cell(r['paper_row'])})"
        delta = "–" if r["delta"] is None else f"{r['delta']:+.2f}"
        lines.append(f"| {_cell(r['label'])} | {_cell(r['method'])} | {done} | "
                     f"{fmt(r['top1_error'])} | {fmt(r['many_error'])} | "
                     f"{fmt(r['medium_error'])} | {fmt(r['few_error'])} | {paper} | {delta} |")
    return "\n".join(lines)


def mix_statistics(metrics: Sequence[dict[str, Any]]) -> list[tuple[str, int, list]]:
    """The ``mix_pairs`` matrices to show: the last OT epoch and the last random-pairing
    (CMO-like) epoch that mixed anything, as ``(kind, epoch, matrix)``, random first."""
    found: dict[str, tuple[int, list]] = {}
    for record in metrics:
        pairs = record.get("mix_pairs")
        if not isinstance(pairs, list) or not pairs or "ot_epoch" not in record:
            continue
        if sum(sum(row) for row in pairs) <= 0:
            continue  # clean epochs (skip_first / skip_last) count no pairs
        kind = "OT pairing" if record["ot_epoch"] else "random pairing (CMO-like)"
        found[kind] = (int(record.get("epoch", -1)), pairs)
    return [(kind, *found[kind]) for kind in ("random pairing (CMO-like)", "OT pairing")
            if kind in found]


def class_weight_series(metrics: Sequence[dict[str, Any]], num_classes: int,
                        classes: Sequence[str] = (), *,
                        first: bool = False) -> tuple[str, int, list[float]] | None:
    """Per-class weight statistics of a re-weighting run: the last record's (``first``: the
    first record's) ``weight_*`` entry that holds one number per class (a ``mean`` statistic
    preferred), as ``(key, epoch, values)``; None when the run logged none. Read
    defensively: the format belongs to the re-weighting code."""
    for record in (metrics if first else reversed(metrics)):
        candidates = []
        for key, value in record.items():
            if not key.startswith("weight_"):
                continue
            values = _per_class(value, num_classes, classes)
            if values is not None:
                candidates.append((("mean" not in key), key, values))
        if candidates:
            _, key, values = min(candidates, key=lambda c: (c[0], c[1]))
            return key, int(record.get("epoch", -1)), values
    return None


def _per_class(value: Any, num_classes: int, classes: Sequence[str]) -> list[float] | None:
    if isinstance(value, dict):
        names = {str(name): k for k, name in enumerate(classes)}
        keyed = {}
        for key, v in value.items():
            k = names.get(str(key), int(key) if str(key).isdigit() else None)
            if k is not None:
                keyed[k] = v
        value = [keyed.get(k) for k in range(num_classes)]
    if not isinstance(value, list) or len(value) != num_classes:
        return None
    if not all(v is None or plots.is_number(v) for v in value):
        return None
    return [None if v is None else float(v) for v in value]


def scalar_weight_stats(metrics: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Scalar ``weight_*`` entries of the last record that has any."""
    for record in reversed(metrics):
        stats = {k: float(v) for k, v in record.items()
                 if k.startswith("weight_") and plots.is_number(v)}
        if stats:
            return stats
    return {}


# ---------------------------------------------------------------------- sweeps


@dataclass
class Sweep:
    """Runs that differ in exactly one numeric config key, sorted by its value."""

    key: str
    values: list[Any]
    runs: list[RunData]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"mix.params.omega": 0.05, ...}`` (lists become tuples)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def detect_sweep(runs: Sequence[RunData]) -> Sweep | None:
    """Return the sweep when 2+ runs differ in exactly one config key with numeric values
    (names, output folders, device settings and ``paper:`` ignored)."""
    if len(runs) < 2:
        return None
    flat = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat))
    differing = [k for k in keys if not _ignored(k)
                 and len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]
    if len(differing) != 1:
        return None
    key = differing[0]
    values = [f.get(key) for f in flat]
    if not all(plots.is_number(v) for v in values) or len(set(values)) != len(values):
        return None
    order = sorted(range(len(runs)), key=lambda i: values[i])
    return Sweep(key, [values[i] for i in order], [runs[i] for i in order])


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key == "paper" or key.startswith("paper.")


# ---------------------------------------------------------------------- from checkpoints


def load_trained(run_dir: Path, data_path: str | None = None, device: str = "cpu"
                 ) -> tuple[RunConfig, dict[str, Any], LongTailedData, torch.nn.Module]:
    """Load a run's config, checkpoint, data and model (eval mode) for gallery and t-SNE."""
    from otlt.config import build_config
    from otlt.data.prepare import prepare_data
    from otlt.engine.checkpoint import load_checkpoint
    from otlt.models import create_model

    state = load_checkpoint(Path(run_dir) / "last.pt", map_location=device)
    cfg = build_config(state["config"])
    if data_path is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data_path)))
    data = prepare_data(cfg.data, cfg.num_classes)
    model = create_model(cfg.model.name, cfg.num_classes, head=cfg.model.head)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return cfg, state, data, model


@dataclass
class Gallery:
    """Mixed pairs drawn as in training: images ``(N, H, W, 3)`` floats in [0, 1]."""

    fore: np.ndarray
    back: np.ndarray
    mixed: np.ndarray
    fore_labels: list[int]
    back_labels: list[int]
    lams: list[float]
    ot: bool


def mixed_pairs(run_dir: Path, n: int = 8, data_path: str | None = None, seed: int = 0,
                device: str = "cpu") -> Gallery:
    """Mix one background batch (uniform) with one class-weighted foreground batch through
    the run's own mixer and trained model, as a training step would, and return ``n`` of
    the resulting (foreground, chosen background, mixed) triples.

    OTmix is built from the config's ``mix.params`` with ``ot_probability = 1`` (an OT
    epoch) and the confusion matrix of the trained model on the validation split (eq. 6).
    Images are not augmented, so the pictures show the dataset's images; the plan is made
    on normalised images (what the model sees) and applied to the displayable ones.
    """
    from otlt.data.augment import eval_transform

    cfg, state, data, model = load_trained(run_dir, data_path, device)
    require(cfg.mix.name != "none", f"--gallery needs a mixing run; {run_dir} has mix.name none")
    generator = torch.Generator().manual_seed(seed)
    mixer = _trained_mixer(cfg, state["train_counts"], model, data, device, generator)
    (xb, yb), fore = _draw_batches(cfg, data, mixer, device, generator)
    xf, yf = fore if fore is not None else (None, None)
    context = {"model": model, "amp_dtype": None} if mixer.uses_context else {}
    with torch.no_grad():
        plan = mixer.plan(eval_transform(xb), yb, None if xf is None else eval_transform(xf),
                          yf, generator=generator, **context)
        mixed = mixer.apply(plan, _unit(xb), yb, None if xf is None else _unit(xf), yf)
    rows = _pick_rows(plan.mixed, mixed.targets_b, n)
    partner = _unit(xb if xf is None else xf)
    take = rows.to(device)
    return Gallery(fore=_hwc(partner[plan.partner[rows].to(device)]),
                   back=_hwc(_unit(xb)[plan.base_index[rows].to(device)]),
                   mixed=_hwc(mixed.images[take]), fore_labels=mixed.targets_b[take].tolist(),
                   back_labels=mixed.targets_a[take].tolist(), lams=mixed.lam[take].tolist(),
                   ot=bool(getattr(mixer, "ot_epoch", False)))


def _trained_mixer(cfg, train_counts: Sequence[int], model: torch.nn.Module, data,
                   device: str, generator: torch.Generator):
    """The run's mixer in the state of a late OT epoch: validation confusion of the trained
    model (OTmix's ``F``), ``ot_probability = 1``."""
    from otlt.engine.trainer import DeviceSplit, evaluate
    from otlt.mixing import create_mixer

    params = dict(cfg.mix.params)
    if cfg.mix.name == "otmix":
        params["ot_probability"] = 1.0
    mixer = create_mixer(cfg.mix.name, class_counts=train_counts, **params)
    if hasattr(mixer, "update_confusion") and len(data.val):
        confusion = evaluate(model, DeviceSplit(data.val, torch.device(device)), cfg.num_classes,
                             cfg.train.eval_batch_size, None, channels_last=False)
        mixer.update_confusion(confusion)
    if hasattr(mixer, "set_epoch"):
        mixer.set_epoch(cfg.optim.epochs - 1, cfg.optim.epochs, generator=generator)
    return mixer


def _draw_batches(cfg, data, mixer, device: str, generator: torch.Generator):
    """A uniform background batch and, for CMO/OTmix, a class-weighted foreground batch
    (``q_k ∝ n_k^-r``, ``r = mix.sampler_r``), as uint8 ``(B, H, W, 3)`` and labels."""
    from otlt.data.samplers import sample_weights
    from otlt.engine.trainer import DeviceSplit

    train = DeviceSplit(data.train, torch.device(device))
    size = min(cfg.optim.batch_size, len(train))
    back = torch.randperm(len(train), generator=generator)[:size].to(device)
    if not getattr(mixer, "needs_partner_batch", False):
        return (train.images[back], train.labels[back]), None
    weights = sample_weights(data.train.labels, cfg.mix.sampler_r)
    fore = torch.multinomial(weights, size, replacement=True, generator=generator).to(device)
    return (train.images[back], train.labels[back]), (train.images[fore], train.labels[fore])


def _unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [0, 1], for display."""
    return images.permute(0, 3, 1, 2).float() / 255.0


def _hwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).cpu().numpy()


def _pick_rows(mixed: torch.Tensor, fore_labels: torch.Tensor, n: int) -> torch.Tensor:
    """Up to ``n`` mixed rows, one per foreground class first, so the gallery is varied."""
    candidates = torch.nonzero(mixed.cpu()).flatten().tolist()
    labels = fore_labels.cpu().tolist()
    chosen, seen = [], set()
    for i in candidates:
        if labels[i] not in seen:
            chosen.append(i)
            seen.add(labels[i])
    chosen += [i for i in candidates if i not in chosen]
    require(bool(chosen), "the mixer mixed no row of the sampled batch (check mix.fraction)")
    return torch.tensor(sorted(chosen[:n], key=lambda i: labels[i]), dtype=torch.long)


def tsne_embedding(run_dir: Path, n: int = 2000, data_path: str | None = None, seed: int = 0,
                   device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """t-SNE (scikit-learn) of the pooled features ``(n, D)`` of a random subsample of the
    test split; returns ``(embedding (n, 2), labels (n,))``."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise OtltError("--tsne needs scikit-learn, which is not installed (pip install "
                        "scikit-learn, or install otlt with the 'report' extra)") from None
    from otlt.data.augment import eval_transform

    require(n >= 5, f"--tsne-samples must be at least 5, got {n}")
    _, _, data, model = load_trained(run_dir, data_path, device)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.test), generator=generator)[:n].numpy()
    images = torch.from_numpy(data.test.images[idx]).to(device)
    features = []
    with torch.no_grad():
        for start in range(0, len(images), 500):
            features.append(model.features(eval_transform(images[start:start + 500])).float())
    z = torch.cat(features).cpu().numpy()
    perplexity = float(min(30.0, max(2.0, (len(z) - 1) / 3)))
    embedding = TSNE(n_components=2, perplexity=perplexity, init="pca",
                     random_state=seed).fit_transform(z)
    return embedding, data.test.labels[idx]


# ---------------------------------------------------------------------- the report


@dataclass
class ReportOptions:
    """Switches for :func:`write_report`; the checkpoint-based figures are opt-in."""

    gallery: bool = False
    gallery_size: int = 8
    tsne: bool = False
    tsne_samples: int = 2000
    data_path: str | None = None
    seed: int = 0
    device: str = "cpu"


class _Report:
    """Accumulates Markdown and figures under one output folder."""

    def __init__(self, out: Path, runs: Sequence[RunData]):
        self.out = Path(out)
        self.colors = {r.label: plots.run_color(i) for i, r in enumerate(runs)}
        self.figures = self.out / "figures"
        self.lines: list[str] = []

    def figure_path(self, name: str) -> Path:
        return self.figures / f"{slug(name)}.png"

    def image(self, path: Path, alt: str) -> None:
        self.lines += [f"![{alt}]({path.relative_to(self.out).as_posix()})", ""]

    def add(self, *lines: str) -> None:
        self.lines += list(lines)


def slug(text: str) -> str:
    """A file-name-safe version of a run label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def write_report(run_dirs: Sequence[str | Path], out: str | Path,
                 options: ReportOptions | None = None) -> Path:
    """Write ``out/report.md`` and ``out/figures/*.png`` for the given run directories."""
    options = options or ReportOptions()
    runs = load_runs(run_dirs)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OtltError(f"cannot create report folder {out} ({exc.strerror or exc})") from None
    report = _Report(out, runs)
    report.add("# otlt report", "",
               f"{len(runs)} run(s). Errors are top-1 test errors in percent at the last "
               "epoch (lower is better), read from each run's `eval.json`; "
               f"{_groups_sentence(runs)}", "")
    _section_table(report, runs)
    _section_sweep(report, runs)
    _section_curves(report, runs)
    datasets = by_dataset([r for r in runs if r.eval and r.eval.get("per_class_accuracy")])
    for classes, group in datasets:
        _section_per_class(report, classes, group, many_groups=len(datasets) > 1)
    _section_batchnorm(report, runs)
    _section_otmix(report, runs)
    _section_weights(report, runs)
    if options.gallery:
        _section_gallery(report, runs, options)
    if options.tsne:
        _section_tsne(report, runs, options)
    path = out / "report.md"
    path.write_text("\n".join(report.lines).rstrip() + "\n")
    return path


def _groups_sentence(runs: Sequence[RunData]) -> str:
    """How many / medium / few were defined (the thresholds stored in ``eval.json``)."""
    found = {(t.get("many"), t.get("few")) for r in runs if r.eval
             for t in [r.eval.get("shot_thresholds") or {}] if t}
    if len(found) != 1:
        return "many / medium / few thresholds: see each run's `eval.json` (`shot_thresholds`)."
    many, few = found.pop()
    return (f"many / medium / few: classes with more than {many}, {few} to {many}, fewer "
            f"than {few} training images.")


def _section_table(report: _Report, runs: Sequence[RunData]) -> None:
    rows = comparison_rows(runs)
    report.add("## Results", "", comparison_table(rows), "")
    unfinished = [r["label"] for r in rows if r["top1_error"] is None]
    if unfinished:
        report.add(f"No `eval.json` (unfinished or not evaluated): {', '.join(unfinished)}.", "")
    report.add("| run | directory | evaluated | wall time (sum of epochs) |",
               "|---|---|---|---:|")
    for run, r in zip(runs, rows, strict=True):
        evaluated = "–" if r["epoch"] is None else f"{r['split']} split, epoch {r['epoch']}"
        report.add(f"| {_cell(run.label)} | `{run.path}` | {evaluated} | "
                   f"{_duration(r['wall_seconds'])} |")
    report.add("")


def _duration(seconds: float) -> str:
    if seconds <= 0:
        return "–"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def _section_sweep(report: _Report, runs: Sequence[RunData]) -> None:
    sweep = detect_sweep(runs)
    if sweep is None:
        return
    errors = {"overall": [(r.eval or {}).get("top1_error") for r in sweep.runs]}
    for g in GROUPS:
        errors[g] = [(r.eval or {}).get(f"{g}_error") for r in sweep.runs]
    path = plots.sweep_plot(sweep.key, sweep.values, errors, report.figure_path(
        f"sweep_{sweep.key}"), title=f"test error against {sweep.key} ({len(sweep.runs)} runs)")
    report.add(f"## Sweep over `{sweep.key}`", "",
               f"The runs differ only in `{sweep.key}` (paper Fig. 8).", "",
               f"| {sweep.key} | run | top-1 error | many | medium | few |",
               "|---:|---|---:|---:|---:|---:|")
    for value, run, *errs in zip(sweep.values, sweep.runs, errors["overall"],
                                 *(errors[g] for g in GROUPS), strict=True):
        report.add(f"| {value} | {_cell(run.label)} | " + " | ".join(fmt(e) for e in errs) + " |")
    report.add("")
    report.image(path, f"test error against {sweep.key}")


def _section_curves(report: _Report, runs: Sequence[RunData]) -> None:
    with_metrics = [r for r in runs if r.metrics]
    if not with_metrics:
        return
    report.add("## Learning curves", "")
    if len(with_metrics) > 1:
        path = plots.validation_overlay([(_legend(r), r.metrics) for r in with_metrics],
                                        report.figure_path("validation_accuracy"),
                                        colors=[report.colors[r.label] for r in with_metrics])
        report.image(path, "validation accuracy of every run")
    for run in with_metrics:
        path = plots.learning_curves(run.label, run.metrics,
                                     report.figure_path(f"curves_{run.label}"))
        report.image(path, f"learning curves of {run.label}")


def _legend(run: RunData) -> str:
    """A run's legend entry: its label and, for a mixing run, the method with its sampler."""
    mix = (run.config.get("mix") or {}).get("name", "none")
    return run.label if mix in (None, "none") else f"{run.label} ({run.method})"


def by_dataset(runs: Sequence[RunData]) -> list[tuple[list[str], list[RunData]]]:
    """Group runs that share class names and training counts (their per-class figures are
    comparable), in the order they were given."""
    groups: dict[tuple, list[RunData]] = {}
    for run in runs:
        groups.setdefault((tuple(run.classes), tuple(run.counts)), []).append(run)
    return [(list(key[0]), group) for key, group in groups.items()]


def _section_per_class(report: _Report, classes: list[str], group: list[RunData],
                       many_groups: bool) -> None:
    counts = group[0].counts
    suffix = f" ({len(classes)} classes)" if many_groups else ""
    tag = f"_{len(classes)}_{slug(group[0].label)}" if many_groups else ""
    thresholds = (group[0].eval or {}).get("shot_thresholds") or {}
    colors = [report.colors[r.label] for r in group]
    report.add(f"## Per-class test accuracy{suffix}", "",
               "Classes ordered by training count, most frequent first (paper Fig. 7).", "")
    path = plots.per_class_bars(
        classes, counts, [(r.label, r.eval["per_class_accuracy"]) for r in group],
        report.figure_path(f"per_class_accuracy{tag}"),
        title="per-class test accuracy", colors=colors,
        thresholds=(thresholds["many"], thresholds["few"]) if thresholds else None)
    report.image(path, "per-class test accuracy")
    report.add(f"## Confusion matrices{suffix}", "",
               "Test split, rows normalised: row = true class, column = prediction "
               "(paper Fig. 6).", "")
    panels = [(f"{_wrap(r.label, 42)}\ntop-1 error {fmt(r.eval.get('top1_error'))}%",
               r.eval["confusion_matrix"]) for r in group if r.eval.get("confusion_matrix")]
    for start in range(0, len(panels), 6):  # at most 2 rows of 3 panels per figure
        part = f"_{start // 6 + 1}" if len(panels) > 6 else ""
        path = plots.confusion_matrices(panels[start:start + 6], classes,
                                        report.figure_path(f"confusion{tag}{part}"))
        report.image(path, "confusion matrices")


def bn_probe_series(run: RunData) -> dict[str, list[tuple[int, float]]]:
    """Validation accuracy per BatchNorm procedure: the in-run ``bn_probe`` records of
    ``metrics.jsonl``, then ``otlt probe``'s ``probe_val.json`` (epochs counted from 1)."""
    series: dict[str, dict[int, float]] = {}
    for r in run.metrics:
        for mode, values in (r.get("bn_probe") or {}).items():
            series.setdefault(mode, {})[int(r["epoch"]) + 1] = values["val_acc"]
    probe = _read_json(run.path / "probe_val.json") or {}
    for r in probe.get("records", []):
        series.setdefault(r["bn_stats"], {}).setdefault(int(r["epoch"]) + 1,
                                                        100.0 - r["top1_error"])
    return {mode: sorted(points.items()) for mode, points in series.items()}


def bn_procedure_rows(run: RunData) -> list[dict[str, Any]]:
    """One row per (epoch, procedure) found in ``probe_val.json`` and ``probe_test.json``."""
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for split in ("val", "test"):
        for r in (_read_json(run.path / f"probe_{split}.json") or {}).get("records", []):
            row = rows.setdefault((int(r["epoch"]), r["bn_stats"]),
                                  {"epoch": int(r["epoch"]), "bn_stats": r["bn_stats"]})
            for key in ("top1_error", *(f"{g}_error" for g in GROUPS)):
                row[f"{split}_{key}"] = r.get(key)
    return [rows[k] for k in sorted(rows)]


def bn_batches_rows(run: RunData) -> list[tuple[int, str, int, float]]:
    """``(recalibration batches, procedure, epoch, validation error)`` from the run's
    ``probe_val_bn<N>.json`` files (``otlt probe --bn-batches N``), sorted."""
    rows = []
    for path in run.path.glob("probe_val_bn*.json"):
        probe = _read_json(path) or {}
        for r in probe.get("records", []):
            rows.append((int(probe["bn_batches"]), r["bn_stats"], int(r["epoch"]),
                         r["top1_error"]))
    return sorted(rows)


def _bn_batches_table(report: _Report, run: RunData) -> None:
    rows = bn_batches_rows(run)
    if not rows:
        return
    modes = sorted({m for _, m, _, _ in rows})
    counts = sorted({n for n, _, _, _ in rows})
    by = {(n, m): (e, err) for n, m, e, err in rows}
    epochs = sorted({e for _, _, e, _ in rows})
    report.add(f"### {run.label}: validation error (%) against the number of recalibration "
               f"batches (epoch {', '.join(str(e + 1) for e in epochs)})", "",
               "| batches of `optim.batch_size` | " + " | ".join(modes) + " |",
               "|---:|" + "---:|" * len(modes))
    for n in counts:
        report.add(f"| {n} | " + " | ".join(fmt(by[(n, m)][1]) if (n, m) in by else "–"
                                          for m in modes) + " |")
    report.add("")


def _section_batchnorm(report: _Report, runs: Sequence[RunData]) -> None:
    """BatchNorm procedures: per-run probe curves, the (epoch, procedure) table, the
    validation-selected checkpoint and the opt-in official-protocol diagnostic."""
    curves = [(r, bn_probe_series(r)) for r in runs]
    curves = [(r, s) for r, s in curves if s]
    tables = [(r, bn_procedure_rows(r)) for r in runs]
    tables = [(r, t) for r, t in tables if t or bn_batches_rows(r)]
    selected = [r for r in runs if r.eval and r.eval.get("selected")]
    diagnostic = [r for r in runs if any("test_diag_acc" in m for m in r.metrics)]
    if not (curves or tables or selected or diagnostic or any(r.eval and "bn_stats" in r.eval
                                                               for r in runs)):
        return
    report.add("## BatchNorm statistics and checkpoint selection", "",
               "Evaluation-time BatchNorm statistics: `running` (as training left them), "
               "`train` (re-estimated on batches drawn as the run trains, mixing included), "
               "`clean` (clean long-tailed batches), `balanced` (class-balanced clean "
               "batches); see `otlt.engine.batchnorm`.", "")
    report.add("| run | procedure of `eval.json` | last epoch: test error | validation-selected "
               "epoch | its test error |", "|---|---|---:|---:|---:|")
    for run in runs:
        e = run.eval or {}
        sel = e.get("selected") or {}
        report.add(f"| {_cell(run.label)} | {e.get('bn_stats', 'running (before procedures)')} | "
                   f"{fmt(e.get('top1_error'))} | "
                   f"{'–' if 'epoch' not in sel else int(sel['epoch']) + 1} | "
                   f"{fmt(sel.get('top1_error'))} |")
    report.add("")
    for run, rows in tables:
        _bn_batches_table(report, run)
        if not rows:
            continue
        report.add(f"### {run.label}: error (%) by epoch and procedure", "",
                   "Post-hoc `otlt probe` of kept weights (epochs counted from 1).", "",
                   "| epoch | BN statistics | val top-1 | val many | val medium | test top-1 "
                   "| test many | test medium | test few |",
                   "|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            report.add(f"| {r['epoch'] + 1} | {r['bn_stats']} | {fmt(r.get('val_top1_error'))} | "
                       f"{fmt(r.get('val_many_error'))} | {fmt(r.get('val_medium_error'))} | "
                       f"{fmt(r.get('test_top1_error'))} | {fmt(r.get('test_many_error'))} | "
                       f"{fmt(r.get('test_medium_error'))} | {fmt(r.get('test_few_error'))} |")
        report.add("")
    for run, series in curves:
        path = plots.bn_probe_curves(f"{run.label}: validation accuracy by BN statistics",
                                     series, report.figure_path(f"bn_probe_{run.label}"))
        report.image(path, f"validation accuracy of {run.label} under each BN procedure")
    if diagnostic:
        report.add("### Best test epoch (official protocol, optimistic)", "",
                   "`eval.test_every_epoch` logged test accuracy every epoch. The official "
                   "repositories report the best of these; selecting on test is optimistic, so "
                   "this is a diagnostic only and nothing reads it.", "",
                   "| run | best test epoch | its test error | ours: last epoch |",
                   "|---|---:|---:|---:|")
        for run in diagnostic:
            points = [(m["test_diag_acc"], m["epoch"]) for m in run.metrics
                      if plots.is_number(m.get("test_diag_acc"))]
            acc, epoch = max(points)
            report.add(f"| {_cell(run.label)} | {epoch + 1} | {fmt(100.0 - acc)} | "
                       f"{fmt((run.eval or {}).get('top1_error'))} |")
        report.add("")


def _section_otmix(report: _Report, runs: Sequence[RunData]) -> None:
    otmix = [r for r in runs if r.is_otmix or any("mix_pairs" in m for m in r.metrics)]
    if not otmix:
        return
    report.add("## OTmix: mixing statistics and transport plans", "",
               "Mixing statistics: mixed images per (foreground class, background class) in "
               "one epoch, from `metrics.jsonl` `mix_pairs` (paper Fig. 9). Transport plan: "
               "one sampled batch from `plans/` (paper Fig. 3; a run writes them at the epochs "
               "in `mix.params.plan_epochs`).", "")
    for run in otmix:
        report.add(f"### {run.label}", "")
        shown = _mix_pairs_figure(report, run) + _plan_figure(report, run)
        if not shown:
            report.add("No mixed epoch or sampled plan logged yet.", "")


def _mix_pairs_figure(report: _Report, run: RunData) -> int:
    stats = mix_statistics(run.metrics)
    if not stats:
        return 0
    panels = [(f"{kind}, epoch {epoch + 1}", matrix) for kind, epoch, matrix in stats]
    path = plots.mix_pair_matrices(panels, _names_for(run.classes, len(stats[0][2])),
                                   report.figure_path(f"mix_pairs_{run.label}"))
    report.image(path, f"mixing statistics of {run.label}")
    return 1


def _plan_figure(report: _Report, run: RunData) -> int:
    files = run.plan_files()
    plan = _read_json(files[-1]) if files else None
    if not plan or not {"cost", "plan", "fore_labels", "back_labels"} <= set(plan):
        return 0
    title = (f"{run.label}: sampled batch, epoch {int(plan.get('epoch', -1)) + 1} "
             f"(eps={plan.get('eps', '?')}, omega={plan.get('omega', '?')})")
    names = _names_for(run.classes, 1 + max(plan["fore_labels"] + plan["back_labels"]))
    path = plots.transport_plan(plan, names, report.figure_path(f"plan_{run.label}"),
                                _wrap(title))
    report.image(path, f"transport plan of {run.label}")
    if len(files) > 1:
        report.add(f"({len(files)} sampled plans in `{run.path / 'plans'}`; the last is "
                   "shown.)", "")
    return 1


def _wrap(text: str, width: int = 90) -> str:
    return plots.wrap_label(text, width)


def _names_for(classes: Sequence[str], k: int) -> list[str]:
    names = list(classes)
    return names + [str(i) for i in range(len(names), k)]


def _section_weights(report: _Report, runs: Sequence[RunData]) -> None:
    found = {r.label: class_weight_series(r.metrics, len(r.classes), r.classes) for r in runs}
    weighted = [r for r in runs if found[r.label] is not None]
    scalars = {r.label: scalar_weight_stats(r.metrics) for r in runs}
    if not weighted and not any(scalars.values()):
        return
    report.add("## Re-weighting: learned weights per class", "",
               "Per-class statistic of the learned example weights, from `metrics.jsonl` "
               "(the last epoch that logged one).", "")
    for classes, group in by_dataset(weighted):
        name = ", ".join(sorted({found[r.label][0] for r in group}))
        path = plots.per_class_bars(
            classes, group[0].counts,
            [(f"{r.label} (epoch {found[r.label][1] + 1})", found[r.label][2]) for r in group],
            report.figure_path(f"class_weights_{slug(group[0].label)}"),
            title=f"learned weight per class ({name})", ylabel=name,
            colors=[report.colors[r.label] for r in group])
        report.image(path, "learned weight per class")
    for run in weighted:
        _weight_change_table(report, run, found[run.label])
    for label, stats in scalars.items():
        if stats:
            report.add(f"{label}: " + ", ".join(f"`{k}` {v:.4g}" for k, v in sorted(stats.items())),
                       "")


def _weight_change_table(report: _Report, run: RunData,
                         last: tuple[str, int, list[float]]) -> None:
    """How far the per-class statistic moved between the first and the last logged epoch."""
    start = class_weight_series(run.metrics, len(run.classes), run.classes, first=True)
    key, last_epoch, after = last
    if start is None or start[0] != key or start[1] == last_epoch:
        return
    before = start[2]
    report.add(f"{run.label}: `{key}` after epoch {start[1] + 1} and after epoch "
               f"{last_epoch + 1}.", "",
               f"| class | train n | epoch {start[1] + 1} | epoch {last_epoch + 1} | change |",
               "|---|---:|---:|---:|---:|")
    counts = run.counts or [None] * len(run.classes)
    for name, n, a, b in zip(run.classes, counts, before, after, strict=True):
        change = f"{b - a:+.4g}" if a is not None and b is not None else "–"
        report.add(f"| {name} | {'–' if n is None else int(n)} | {_significant(a)} | "
                   f"{_significant(b)} | {change} |")
    moved = [(abs(b - a) / abs(a), name)
             for name, a, b in zip(run.classes, before, after, strict=True)
             if a and b is not None]
    if moved:
        share, name = max(moved)
        report.add("", f"Largest relative change: {100 * share:.2g}% ({name}).")
    report.add("")


def _significant(value: float | None) -> str:
    """Four significant digits; ``–`` for missing (weights span 0.05 to 4 and move by 1e-4)."""
    return "–" if value is None else f"{value:.4g}"


def _section_gallery(report: _Report, runs: Sequence[RunData], options: ReportOptions) -> None:
    mixing = [r for r in runs if (r.config.get("mix") or {}).get("name", "none") != "none"]
    report.add("## Mixed images", "")
    if not mixing:
        report.add("No mixing run among the runs.", "")
        return
    report.add("Drawn with each run's mixer and trained model (`last.pt`) as a training step "
               "would: a uniform background batch, a class-weighted foreground batch; "
               "OTmix uses an OT epoch and the validation confusion matrix. λ is the "
               "background's label weight (paper Fig. 5).", "")
    for run in mixing:
        if not (run.path / "last.pt").is_file():
            report.add(f"{run.label}: no `last.pt`, skipped.", "")
            continue
        g = mixed_pairs(run.path, n=options.gallery_size, data_path=options.data_path,
                        seed=options.seed, device=options.device)
        kind = "OT-chosen backgrounds" if g.ot else "random backgrounds"
        path = plots.mixed_gallery(g.fore, g.back, g.mixed, g.fore_labels, g.back_labels,
                                   g.lams, run.classes, report.figure_path(f"gallery_{run.label}"),
                                   title=f"{run.label}: {kind}; λ = the background's share "
                                         "of the pixels and of the label")
        report.image(path, f"mixed images of {run.label}")


def _section_tsne(report: _Report, runs: Sequence[RunData], options: ReportOptions) -> None:
    with_ckpt = [r for r in runs if (r.path / "last.pt").is_file()]
    report.add("## Feature embedding (t-SNE)", "")
    if not with_ckpt:
        report.add("No run has a `last.pt`.", "")
        return
    for classes, group in by_dataset(with_ckpt):
        panels = []
        for run in group:
            emb, labels = tsne_embedding(run.path, options.tsne_samples, options.data_path,
                                         options.seed, options.device)
            panels.append((run.label, emb, labels))
        path = plots.tsne_panels(panels, classes, group[0].counts,
                                 report.figure_path(f"tsne_{slug(group[0].label)}"))
        report.add(f"t-SNE of the pooled penultimate features of {len(panels[0][1])} random "
                   "test images (scikit-learn), coloured by class (paper Fig. 4).", "")
        report.image(path, "t-SNE of test features")


def linked_figures(report_path: Path) -> list[Path]:
    """The PNG files a report links, in order (for messages and tests)."""
    text = Path(report_path).read_text()
    return [Path(report_path).parent / m for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)]


__all__ = [
    "Gallery",
    "ReportOptions",
    "RunData",
    "Sweep",
    "class_weight_series",
    "comparison_rows",
    "by_dataset",
    "comparison_table",
    "linked_figures",
    "detect_sweep",
    "flatten",
    "load_run",
    "load_runs",
    "mix_statistics",
    "mixed_pairs",
    "tsne_embedding",
    "write_report",
]
