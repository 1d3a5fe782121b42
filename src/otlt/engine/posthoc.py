"""``otlt eval`` and ``otlt probe``: evaluate any kept weights of a run under any BatchNorm
procedure.

The run's model, feed, mixing recipe and evaluation procedure are rebuilt from its
``config.yaml`` (no trainer, optimizer or process group: :func:`evaluation_procedure`), the
weights are loaded, and the very code that evaluates during training
(``EvaluationProcedure.model_for`` with the recalibration generator of the weights' epoch)
evaluates them, so a post-hoc number equals the in-run number for the same weights
and procedure, on the same device type and world size (kernels, and bf16 autocast, differ
between CPU and CUDA). ``device`` (``--device``) evaluates on another device than the run's
``train.device`` (a GPU-trained run on a CPU-only machine); weights are read to the CPU and
moved, and ``config.yaml`` is left as it is. Results go beside the run's others as
``eval_<checkpoint>_<bn_stats>.json`` (``_val`` added for the validation split); an existing
file with different numbers is never overwritten silently.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from otlt.atomic import write_text_atomic
from otlt.config import (
    BN_STATS,
    RunConfig,
    build_config,
    is_device_name,
    load_raw,
    resolve_epochs,
    validate,
)
from otlt.engine.checkpoint import load_checkpoint
from otlt.engine.preflight import check_components
from otlt.engine.procedure import EvaluationProcedure, best_weights_file
from otlt.engine.provenance import describe_cpu, provenance
from otlt.engine.rundir import check_stored_config
from otlt.engine.runtime import autocast_dtype, configure_kernels, resolve_device
from otlt.engine.weights import (
    SUFFIX,
    WeightsFile,
    checkpoint_weights,
    load_model_state,
    read_weights,
)
from otlt.errors import OtltError, require, require_choice
from otlt.metrics import select_value

CHECKPOINTS = ("last", "best")


def resolve_run(target: Path) -> tuple[Path, Path | None]:
    """``(run directory, weights file or None)`` of a run directory or a weights file
    inside one (``last.pt``, ``best.safetensors``, ``kept/epoch_<NNN>.*``)."""
    target = Path(target)
    if not target.exists():
        raise OtltError(f"{target} does not exist (expected a run directory or a weights file)")
    if target.is_dir():
        return target, None
    for folder in (target.parent, target.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder, target
    return target.parent, target


def weights_path(run_dir: Path, checkpoint: str, last: dict[str, Any] | None = None) -> Path:
    """The file of ``last`` (``last.pt``, else the committed ``last.safetensors``), ``best``,
    ``epoch_<NNN>`` (under ``kept/``) or a path. ``last``: the run's ``last.pt`` state
    (:func:`read_last`), whose recorded best decides between ``best.safetensors`` and a
    pending best (:func:`~otlt.engine.procedure.best_weights_file`)."""
    if checkpoint == "last":
        candidates = [run_dir / "last.pt", run_dir / f"last{SUFFIX}"]
    elif checkpoint == "best":
        candidates = [best_weights_file(run_dir, (last or {}).get("best"))]
    elif checkpoint.startswith("epoch_") and "/" not in checkpoint:
        candidates = [run_dir / "kept" / f"{checkpoint}{SUFFIX}",
                      run_dir / "kept" / f"{checkpoint}.pt"]
    else:
        candidates = [Path(checkpoint), run_dir / checkpoint]
    candidates = list(dict.fromkeys(candidates))  # an absolute path is both of the last two
    for path in candidates:
        if path.is_file():
            return path
    kept = sorted(kept_weights(run_dir))
    raise OtltError(f"no weights for --checkpoint {checkpoint} in {run_dir} "
                    f"(looked for {', '.join(str(p) for p in candidates)}; kept epochs: "
                    f"{', '.join(f'epoch_{e:03d}' for e in kept) or 'none'})")


def read_last(run_dir: Path) -> dict[str, Any] | None:
    """The state in the run's ``last.pt`` (on the CPU); None for a run without one."""
    path = run_dir / "last.pt"
    return load_checkpoint(path) if path.is_file() else None


def weights_from(path: Path, run_dir: Path, last: dict[str, Any] | None) -> WeightsFile:
    """The weights in ``path``; those of ``last.pt`` from ``last`` (:func:`read_last`), read
    once already."""
    if last is not None and Path(path).resolve() == (run_dir / "last.pt").resolve():
        return checkpoint_weights(last)
    return read_weights(path)


def run_config(run_dir: Path, data_path: str | None, last: dict[str, Any] | None) -> RunConfig:
    """The run's resolved config (``config.yaml``, else the one inside ``last.pt``, whose
    state ``last`` is: :func:`read_last`); a ``config.yaml`` that differs from the config
    inside ``last.pt`` (edited by hand) is refused. A run without ``last.pt`` (a committed
    result: weights only) has nothing to compare."""
    if (run_dir / "config.yaml").is_file():
        cfg = build_config(load_raw(run_dir / "config.yaml"))
        if last is not None:
            check_stored_config(last.get("config"), cfg, run_dir)
    elif last is not None:
        cfg = build_config(last["config"])
    else:
        raise OtltError(f"{run_dir} holds no config.yaml or last.pt (is it an otlt run?)")
    if data_path is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=data_path))
    return cfg


def checkpoint_label(path: Path) -> str:
    """``last``, ``best`` or the file's stem (``epoch_028``), for the output file name."""
    stem = path.name.lstrip(".").split(".")[0]  # .best.pending.safetensors: best
    return stem if stem in CHECKPOINTS or stem.startswith("epoch_") else stem or "weights"


def check_device_flag(device: str) -> None:
    """Refuse a ``--device`` that names no device, or CUDA where there is none, in one line."""
    require(is_device_name(device), f"--device must be auto, cpu or cuda[:N], got {device!r}")
    require(not device.startswith("cuda") or torch.cuda.is_available(),
            f"--device {device}: no CUDA device is available here; use --device cpu")


def evaluation_procedure(run_dir: Path, last: dict[str, Any] | None,
                         data_path: str | None = None, many: int | None = None,
                         few: int | None = None, bn_batches: int | None = None,
                         device: str | None = None) -> EvaluationProcedure:
    """The run's evaluation procedure rebuilt from its config (model, feed, mixing recipe;
    nothing written, no optimizer) on ``device`` (None: the run's ``train.device``; weights
    are read to the CPU, then moved); ``last``: its ``last.pt`` state (:func:`read_last`)."""
    cfg = run_config(run_dir, data_path, last)
    if device is not None:
        check_device_flag(device)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))
    elif cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise OtltError(f"{run_dir} trained with train.device={cfg.train.device} but no CUDA "
                        "device is available here; evaluate it on this machine with --device cpu")
    e = cfg.eval
    if resolve_device(cfg.train.device).type != "cuda":  # a GPU run evaluated elsewhere
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cuda_graphs=False))
    cfg = validate(dataclasses.replace(cfg, eval=dataclasses.replace(
        e, many_threshold=e.many_threshold if many is None else many,
        few_threshold=e.few_threshold if few is None else few,
        bn_batches=e.bn_batches if bn_batches is None else bn_batches)))
    check_components(cfg)
    where = resolve_device(cfg.train.device)
    configure_kernels(where, cfg.train.deterministic)
    amp_dtype = None if cfg.train.float64 else autocast_dtype(cfg.train.amp, where)
    return EvaluationProcedure.build(cfg, where, run_dir, amp_dtype)


def load_into(procedure: EvaluationProcedure, weights: WeightsFile) -> None:
    """Put ``weights`` (model as trained, mixer state) into an evaluation procedure; weights
    of another model are refused naming the keys that differ."""
    load_model_state(procedure.model, weights.model,
                     f"weights do not fit the model of {procedure.run_dir}")
    if procedure.mixer is not None and weights.mixer:
        procedure.mixer.load_state_dict(weights.mixer)


def evaluate_loaded(procedure: EvaluationProcedure, epoch: int, mode: str,
                    split: str) -> dict[str, Any]:
    """The ``eval.json``-style record of the procedure's current weights (trained up to
    ``epoch``) on ``split`` under BatchNorm procedure ``mode``."""
    require_choice("--bn-stats", mode, BN_STATS)
    confusion = procedure.confusion_on(split, procedure.model_for(epoch, mode))
    if confusion is None:
        raise OtltError(f"run {procedure.run_dir} has no {split} split")
    result = {"split": split, "epoch": epoch, "bn_stats": mode,
              "classes": procedure.feed.classes}
    if mode != "running":
        result["bn_batches"] = procedure.cfg.eval.bn_batches
    return {**result, **procedure.summarize(confusion)}


def evaluate_weights(run_dir: Path, weights: WeightsFile, bn_stats: str | None = None,
                     split: str = "test", data_path: str | None = None,
                     many: int | None = None, few: int | None = None,
                     device: str | None = None,
                     last: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate ``weights`` of the run in ``run_dir`` on ``split`` under ``bn_stats``
    (default: the run's ``eval.bn_stats``) on ``device`` (default: the run's); returns the
    ``eval.json``-style record. ``last``: the run's ``last.pt`` state if read already."""
    last = last if last is not None else read_last(run_dir)
    procedure = evaluation_procedure(run_dir, last, data_path, many, few, device=device)
    load_into(procedure, weights)
    result = evaluate_loaded(procedure, weights.epoch,
                             bn_stats or procedure.cfg.eval.bn_stats, split)
    return {**result, PROVENANCE_KEY: evaluated_with(procedure)}


PROVENANCE_KEY = "evaluated_with"


def evaluated_with(procedure: EvaluationProcedure) -> dict[str, Any]:
    """Where a post-hoc number was computed (:func:`otlt.engine.provenance.provenance`: device,
    hardware, on the CPU its model and instruction sets, torch threads and version; the
    code's commit), kept as ``evaluated_with``: bf16 results on the CPU move by an image or
    two with the thread count and the CPU."""
    return provenance(next(procedure.model.parameters()).device)


def kept_weights(run_dir: Path) -> dict[int, Path]:
    """The run's kept weight files by epoch (``kept/epoch_<NNN>.safetensors`` or ``.pt``)."""
    found: dict[int, Path] = {}
    for path in sorted((run_dir / "kept").glob("epoch_*")):
        stem = path.name.split(".")[0]
        if stem[6:].isdigit() and path.suffix in (SUFFIX, ".pt"):
            found.setdefault(int(stem[6:]), path)
    return found


def probe_kept(run_dir: Path, modes: list[str], epochs: list[int] | None = None,
               split: str = "val", data_path: str | None = None,
               bn_batches: int | None = None, progress: bool = True,
               device: str | None = None, out: Path | None = None) -> dict[str, Any]:
    """Evaluate kept weights under several procedures: ``eval.bn_probe_every`` after the
    fact. ``epochs``: counted from 0 as the kept files are named, a negative one from the
    run's end (``-1``: its last, as ``train.keep_epochs``); None: every kept epoch.
    ``device`` None: the run's. Returns ``{"split", "bn_batches", "records"}`` with one
    compact record (errors in %, ``balanced_acc``) per (epoch, procedure). ``out``: the file
    the result will go to; one that holds another probe (other epochs, procedures or split)
    is refused before anything is computed, as :func:`write_result` would refuse it after."""
    run_dir = Path(run_dir)
    if device is not None:  # the flags first, then the files
        check_device_flag(device)
    kept = kept_weights(run_dir)
    last = read_last(run_dir)
    if last is not None:
        kept.setdefault(int(last["epoch"]), run_dir / "last.pt")
    chosen = sorted(kept) if epochs is None else \
        resolved_epochs(epochs, run_config(run_dir, data_path, last).optim.epochs)
    missing = [e for e in chosen if e not in kept]
    require(not missing, f"{run_dir} keeps no weights for epoch(s) {missing} (kept: "
                         f"{sorted(kept) or 'none'}; train with train.keep_epochs or keep_every)")
    for mode in modes:
        require_choice("--bn-stats", mode, BN_STATS)
    if out is not None:
        _refuse_another_probe(out, split, [(e, m) for e in chosen for m in modes])
    procedure = evaluation_procedure(run_dir, last, data_path, bn_batches=bn_batches,
                                     device=device)
    records = []
    for epoch in tqdm(chosen, desc=f"probe {run_dir.name}", disable=not progress,
                      file=sys.stderr, dynamic_ncols=True):
        weights = weights_from(kept[epoch], run_dir, last)
        load_into(procedure, weights)
        for mode in modes:
            r = evaluate_loaded(procedure, weights.epoch, mode, split)
            records.append({"epoch": r["epoch"], "bn_stats": mode,
                            **{k: r[k] for k in ("top1_error", "many_error", "medium_error",
                                                 "few_error")},
                            "balanced_acc": select_value(r, "balanced_acc"),
                            "per_class_accuracy": r["per_class_accuracy"]})
    return {"run": str(run_dir), "split": split, "bn_batches": procedure.cfg.eval.bn_batches,
            "records": records, PROVENANCE_KEY: evaluated_with(procedure)}


def _refuse_another_probe(path: Path, split: str, planned: list[tuple[int, str]]) -> None:
    """Refuse, before the work, a probe file that holds other (epoch, procedure) pairs or
    another split than ``planned`` (a file that cannot be read is left to write_result)."""
    try:
        old = json.loads(path.read_text())
        pairs = [(int(r["epoch"]), r["bn_stats"]) for r in old["records"]]
        theirs = old["split"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if theirs != split or sorted(pairs) != sorted(planned):
        epochs = ", ".join(f"epoch_{e:03d}" for e in sorted({e for e, _ in pairs}))
        modes = ", ".join(dict.fromkeys(m for _, m in pairs))
        raise OtltError(f"{path} exists and holds another probe ({theirs} split, {epochs} "
                        f"under {modes}); choose another file with --out or replace it with "
                        "--overwrite")


def resolved_epochs(epochs: list[int], total: int) -> list[int]:
    """``epochs`` of a run of ``total`` counted from 0 (:func:`otlt.config.resolve_epochs`:
    a negative one from the end), sorted without repeats; one outside the run is refused in
    one line."""
    outside = [e for e in epochs if not -total <= e < total]
    require(not outside, f"--epochs {','.join(map(str, outside))}: the run has {total} epochs, "
                         f"0 to {total - 1} (or -{total} to -1 from the end)")
    return list(resolve_epochs(epochs, total))


def evaluate_run(target: Path, checkpoint: str = "last", bn_stats: str | None = None,
                 split: str = "test", data_path: str | None = None, many: int | None = None,
                 few: int | None = None, out: Path | None = None, overwrite: bool = False,
                 device: str | None = None) -> tuple[dict[str, Any], Path, bool]:
    """Evaluate a run's weights (``target``: run directory, or a weights file) on
    ``device`` (default: the run's) and write the record; returns ``(record, path, written)``.
    A ``checkpoint`` path inside another run directory is refused: evaluated under this
    run's config and filed beside its results, it would pass for this run's. ``written``:
    False when the file held the same numbers already and was left as it is."""
    run_dir, file = resolve_run(Path(target))
    last = read_last(run_dir)  # read once: the config check, best's file, last.pt's weights
    path = file or weights_path(run_dir, checkpoint, last)
    owner = resolve_run(path)[0]
    if owner.resolve() != run_dir.resolve() and any(
            (owner / name).is_file() for name in ("config.yaml", "last.pt")):
        raise OtltError(f"--checkpoint {checkpoint} belongs to run {owner}, not to {run_dir} "
                        f"(it would be evaluated with {run_dir}'s config and filed there); "
                        f"evaluate it in its own run: otlt eval {path}")
    result = evaluate_weights(run_dir, weights_from(path, run_dir, last), bn_stats, split,
                              data_path, many, few, device, last)
    label = checkpoint_label(path)
    result = {**result, "checkpoint": label, "weights": str(path)}
    suffix = "" if split == "test" else f"_{split}"
    if out is None:
        out = run_dir / f"eval_{label}_{result['bn_stats']}{suffix}.json"
    written = write_result(out, result, overwrite)
    return result, out, written


def write_result(path: Path, record: dict[str, Any], overwrite: bool = False) -> bool:
    """Write a JSON result and return True; an existing file is kept unless ``overwrite``:
    left as it is (False) when it holds the same record but where it was computed and read
    (:data:`WHERE_KEYS`: the file keeps its first, so a run moved or copied to another path
    or machine keeps its results), refused when it holds another one or cannot be read as a
    result."""
    if path.exists() and not overwrite:
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise OtltError(f"{path} exists and is not a readable JSON result ({exc}); choose "
                            "another file with --out or replace it with --overwrite") from None
        new = json.loads(json.dumps(record))
        if not isinstance(old, dict):
            raise OtltError(f"{path} exists and holds no result record; choose another file "
                            "with --out or replace it with --overwrite")
        if _what(old) == _what(new):
            return False
        raise OtltError(f"{path} exists and holds other numbers ({_difference(old, new)}); "
                        "choose another file with --out or replace it with --overwrite")
    write_text_atomic(path, json.dumps(record, indent=1))
    return True


WHERE_KEYS = (PROVENANCE_KEY, "weights", "run")
"""A result's keys that say where it was computed and from which path it read (the weights
file, the run directory as typed), not what it holds."""


def _what(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in WHERE_KEYS}


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The keys whose values differ, and where each record was computed when that differs
    too (device, hardware, CPU model, threads, torch, code: CPU bf16 numbers move with the
    threads and the bf16 instructions)."""
    keys = sorted(k for k in set(old) | set(new)
                  if k not in WHERE_KEYS and old.get(k) != new.get(k))
    text = "differing: " + ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
    theirs, mine = old.get(PROVENANCE_KEY), new.get(PROVENANCE_KEY) or {}
    if not isinstance(theirs, dict):
        return text + "; where the file's numbers were computed is not recorded"
    # A file from before the cpu field (or from a GPU) says nothing about it: not a difference.
    changed = [k for k in ("device", "hardware", "cpu", "threads", "torch_version", "git_commit")
               if theirs.get(k) != mine.get(k) and (k != "cpu" or k in theirs and k in mine)]
    if changed:
        def show(record: dict[str, Any], key: str) -> str:
            value = record.get(key)
            return f"{key} {describe_cpu(value) if key == 'cpu' else value}"
        text += ("; computed with " + ", ".join(show(theirs, k) for k in changed)
                 + "; now " + ", ".join(show(mine, k) for k in changed))
    return text


__all__ = ["evaluate_run", "evaluate_weights", "kept_weights", "probe_kept", "resolve_run",
           "weights_path", "write_result"]
