"""Copy finished run directories into results/ and write their README tables.

    python scripts/collect_results.py GROUP RUN_DIR [RUN_DIR ...] --hardware "..." \
        --command "otlt train --config configs/{preset}.yaml{seed_settings}" [--note "..."]

``--command`` is a template: ``{name}`` is the run's name, ``{preset}`` the preset it was
trained from (the name less a ``_seed<k>`` suffix matching the run's seed, where
``configs/`` has that preset; else the name) and ``{seed_settings}`` what the run added to
the preset's command: `` --set seed=k`` where its seed is not the preset's, `` --set
name=<name>`` where its name is not the preset's. Each run's README thus gives the command
that reproduces it; a template naming ``{preset}`` for a run without a preset in
``configs/`` is refused. Literal braces in a template are written ``{{ }}``.

A RUN_DIR may also be a run folder already committed under results/ (its runs/ directory
being gone): its files are then left in place and only the READMEs are rewritten.

For every run: ``results/GROUP/<name>/`` gets config.yaml, splits.json, metrics.jsonl,
eval.json, plans/, the post-hoc ``eval_*.json`` / ``probe_*.json`` (small JSON only), the
``sittings.jsonl`` of runs that have one (machine, threads, code of each sitting) and a
README.md with the command, the wall time (sum of the logged epoch times), the hardware and
the last-epoch test numbers. ``--weights`` adds the last epoch's and the validation-selected
weights as fp16 safetensors (``last.safetensors``, ``best.safetensors``; ``--keep-epochs``
adds ``kept/epoch_<NNN>.safetensors``), each under 1 MB for a ResNet-32, so
``otlt eval results/GROUP/<name> --checkpoint last|best|epoch_NNN --bn-stats MODE``
re-evaluates them in seconds. ``.gitignore`` covers the weights of seeds 1 and up and the
kept epochs (the script names those it wrote): commit them with ``git add -f``, then move
them to the history with ``scripts/weights_archive.py archive`` and commit again
(results/README.md, "Weights").
``results/GROUP/README.md`` gets the side-by-side table, with the paper's reported error
where the config names a paper row. Every number is read from the runs' own files.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import yaml

from otlt.config import load_config
from otlt.engine.logging import read_metrics
from otlt.engine.posthoc import kept_weights
from otlt.engine.provenance import describe_cpu
from otlt.engine.weights import SUFFIX, read_weights, save_weights

# weights_archive, beside this file, loaded from its path (sys.path stays as it is)
_spec = importlib.util.spec_from_file_location(
    "weights_archive", Path(__file__).resolve().with_name("weights_archive.py"))
weights_archive = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(weights_archive)

SMALL_FILES = ("config.yaml", "splits.json", "metrics.jsonl", "eval.json")
#: the packaged presets a README's command names
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def fmt(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def run_summary(run: Path) -> dict:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    result = json.loads((run / "eval.json").read_text())
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    paper = (cfg.get("paper") or {}).get("top1_error")
    return {"name": cfg["name"], "cfg": cfg, "eval": result, "paper": paper,
            "epochs": len(metrics), "seconds": sum(r["epoch_seconds"] for r in metrics)}


def row(s: dict) -> str:
    e = s["eval"]
    return (f"| {s['name']} | {fmt(e['top1_error'])} | {fmt(e['many_error'])} | "
            f"{fmt(e['medium_error'])} | {fmt(e['few_error'])} | {fmt(s['paper'])} | "
            f"{s['epochs']} | {s['seconds'] / 60:.0f} min |")


HEADER = ("| run | top-1 error | many | medium | few | paper (top-1) | epochs | train time |\n"
          "|---|---|---|---|---|---|---|---|")


MAX_WEIGHT_BYTES = 1_000_000


def export_weights(run: Path, dest: Path, keep_epochs: list[int]) -> list[Path]:
    """fp16 copies of the run's last, best and chosen kept weights (refuses files >= 1 MB)."""
    sources = {dest / f"last{SUFFIX}": run / "last.pt",
               dest / f"best{SUFFIX}": run / f"best{SUFFIX}"}
    kept = kept_weights(run)
    for epoch in keep_epochs:
        if epoch in kept:
            sources[dest / "kept" / f"epoch_{epoch:03d}{SUFFIX}"] = kept[epoch]
    written = []
    for target, source in sources.items():
        if not source.is_file():
            continue
        w = read_weights(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        save_weights(target, w.model, epoch=w.epoch, evaluated_bn=w.evaluated_bn,
                     mixer=w.mixer, meta=w.meta, dtype=torch.float16)
        size = target.stat().st_size
        if size >= MAX_WEIGHT_BYTES:
            target.unlink()
            raise SystemExit(f"{target}: {size} bytes, over the 1 MB limit for committed weights")
        written.append(target)
    return written


def warn_if_ignored(paths: list[Path]) -> None:
    """Say which written weight files git ignores (.gitignore covers later seeds and kept
    epochs): a plain ``git add`` skips them, so they are committed with ``git add -f`` and
    then moved to the history (``scripts/weights_archive.py archive``; results/README.md,
    "Weights")."""
    inside = [rel for rel in (os.path.relpath(Path(p).resolve(), ROOT) for p in paths)
              if not rel.startswith("..")]
    try:
        ignored = weights_archive.ignore_sources(inside, ROOT)
    except SystemExit as err:  # not a git checkout: nothing to warn of, nothing to stop for
        print(f"collect_results: which weight files git ignores is unknown ({err})",
              file=sys.stderr)
        return
    if ignored:
        first, source = next(iter(ignored.items()))
        print(f"collect_results: git ignores {len(ignored)} weight file(s) ({first} by "
              f"{source}, ...): commit them with git add -f, then python "
              "scripts/weights_archive.py archive <group> and commit again", file=sys.stderr)


def sitting_part(s: dict) -> str:
    """One sitting of a run as a clause: when it started, the machine (with the CPU's identity
    where the sitting recorded one; the field came after the first runs), threads, processes,
    torch and code."""
    cpu = f" ({describe_cpu(s['cpu'])})" if s.get("cpu") else ""
    processes = f", {n} processes" if (n := s.get("world_size") or 1) > 1 else ""
    dirty = " (uncommitted changes)" if s.get("git_dirty") else ""
    return (f"from epoch {s['start_epoch'] + 1} on {s['started'].replace('T', ' ')[:16]} UTC, "
            f"{s['device']} {s['hardware']}{cpu}, torch threads {s['threads']}{processes}, "
            f"torch {s['torch_version']}, code {(s.get('git_commit') or 'unknown')[:7]}{dirty}")


def sittings_line(path: Path) -> str | None:
    """One README sentence from a run's ``sittings.jsonl`` (the machine's own record of each
    sitting, so a hand-written hardware string cannot stand alone); None without the file."""
    if not path.is_file():
        return None
    lines = read_metrics(path)  # any JSON-lines file: a last line cut short is dropped
    return (f"Sittings ({len(lines)}, from `sittings.jsonl`): "
            + "; ".join(sitting_part(s) for s in lines) + ".")


def run_command(template: str, name: str, seed: int, configs: Path = CONFIGS) -> str:
    """``template`` (module docstring) filled in for one run."""
    if "{preset}" not in template and "{seed_settings}" not in template:
        return template.format(name=name)
    stripped = re.sub(rf"_seed{seed}$", "", name)
    preset = stripped if (configs / f"{stripped}.yaml").is_file() else name
    path = configs / f"{preset}.yaml"
    if not path.is_file():
        raise SystemExit(f"{name}: no preset {path} to name in its README's command")
    preset_seed = load_config(path).seed
    seed_settings = (f" --set seed={seed}" if seed != preset_seed else "") + (
        f" --set name={name}" if name != preset else "")
    return template.format(name=name, preset=preset, seed_settings=seed_settings)


def group_command(template: str) -> str:
    """``template`` for the group's README: the placeholders stay, a seeded run's additions
    are spelled out."""
    return template.format(name="{name}", preset="{preset}",
                           seed_settings=" (a seed k > 0 adds --set seed=k --set "
                           "name={preset}_seed{k})")


def write_run(s: dict, run: Path, dest: Path, command: str, hardware: str, note: str,
              weights: bool = False, keep_epochs: list[int] | None = None) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if run.resolve() != dest.resolve():
        for name in SMALL_FILES:
            shutil.copy2(run / name, dest / name)
        for extra in (*run.glob("eval_*.json"), *run.glob("probe_*.json"),
                      *run.glob("sittings.jsonl")):  # runs before it have none
            shutil.copy2(extra, dest / extra.name)
        if (run / "plans").is_dir():
            shutil.copytree(run / "plans", dest / "plans", dirs_exist_ok=True)
        if weights:
            warn_if_ignored(export_weights(run, dest, keep_epochs or []))
    cfg = s["cfg"]
    sittings = sittings_line(dest / "sittings.jsonl")
    text = [f"# {s['name']}", "",
            f"Command: `{run_command(command, s['name'], int(cfg['seed']))}`", "",
            f"Hardware: {hardware}", "", *([sittings, ""] if sittings else []),
            f"Seeds: seed {cfg['seed']}, data_seed {cfg['data']['data_seed']}. Wall time of the "
            f"{s['epochs']} epochs (sum of logged epoch times): {s['seconds'] / 60:.1f} min.", "",
            "Last-epoch test split (no selection on the test split; `eval.json`), error in %:",
            "", HEADER, row(s), ""]
    if note:
        text += [note, ""]
    (dest / "README.md").write_text("\n".join(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("group")
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--hardware", required=True)
    parser.add_argument("--command", required=True)
    parser.add_argument("--note", default="")
    parser.add_argument("--title", default="")
    parser.add_argument("--weights", action="store_true",
                        help="commit fp16 last/best (and --keep-epochs) weights")
    parser.add_argument("--weights-for", default="",
                        help="with --weights: only these runs (comma-separated names)")
    parser.add_argument("--keep-epochs", default="",
                        help="comma-separated kept epochs (from 0) to commit with --weights")
    args = parser.parse_args()
    keep = [int(e) for e in args.keep_epochs.split(",") if e.strip()]
    out = Path("results") / args.group
    summaries = []
    for run in args.runs:
        s = run_summary(run)
        chosen = {n for n in args.weights_for.split(",") if n}
        write_run(s, run, out / s["name"], args.command, args.hardware, args.note,
                  weights=args.weights and (not chosen or s["name"] in chosen),
                  keep_epochs=keep)
        summaries.append(s)
    text = [f"# {args.title or args.group}", "", f"Hardware: {args.hardware}", "",
            f"Command per run: `{group_command(args.command)}`", "",
            "Last-epoch test error (%), many / medium / few = classes with > 100, 20-100, "
            "< 20 training images (CIFAR-10-LT phi=100 has no few-shot class).", "",
            HEADER, *(row(s) for s in summaries), ""]
    if args.note:
        text += [args.note, ""]
    (out / "README.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
