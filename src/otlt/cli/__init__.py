"""Command line: ``otlt train | eval | probe | presets | data | demo | report | sweep | bench``.

User mistakes end with one line ``otlt: error: ...`` and exit code 2, never a traceback.

The flags are in ``otlt.cli.parser``; here each command (``cmd_<name>``) turns its parsed
arguments into a call of the module that does the work, imported lazily so ``otlt --help``
starts fast, and ``main`` maps errors and stops to one line and an exit code.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from pathlib import Path

from otlt.cli.parser import build_parser
from otlt.console import format_eval, format_percent
from otlt.errors import OtltError
from otlt.stopping import Terminated, stop_on_sigterm


def cmd_data(args) -> int:
    from otlt.data.download import download_dataset

    path = download_dataset(args.dataset, args.root, url=args.url)
    print(f"otlt: {path} is verified; otlt train finds it there (or pass --data {path})")
    return 0



def cmd_presets(args) -> int:
    import yaml

    from otlt.config import list_presets, preset_path

    names = [n for n in list_presets() if args.filter in n]
    print(f"{'preset':<48}{'epochs':>7}  paper row (reported top-1 error)")
    for name in names:
        cfg = yaml.safe_load(preset_path(name).read_text()) or {}
        paper = cfg.get("paper") or {}
        row = ", ".join(str(paper[k]) for k in ("table", "row", "dataset") if paper.get(k))
        if paper.get("top1_error") is not None:
            row += f" ({paper['top1_error']})"
        print(f"{name:<48}{(cfg.get('optim') or {}).get('epochs', '?'):>7}  {row or '-'}")
    print(f"otlt: {len(names)} presets; use one with: otlt train --preset NAME")
    return 0



def cmd_train(args) -> int:
    from otlt.config import build_overridden, config_source, load_raw
    from otlt.engine.factory import create_trainer
    from otlt.engine.timelimit import TimeLimit

    # The clock starts before the data is read: the limit covers the whole command.
    limit = TimeLimit(args.time_limit, args.time_margin) if args.time_limit is not None else None
    if args.stop_after is not None and args.stop_after < 1:
        raise OtltError(f"--stop-after must be >= 1 (epochs in total), got {args.stop_after}")
    overrides = list(args.overrides) + ([f"data.path={args.data}"] if args.data else [])
    changes: dict = {}
    if args.resume:
        run_dir = Path(args.resume)
        config_path = run_dir / "config.yaml"
        if args.config is not None or args.preset is not None or args.run_dir is not None:
            raise OtltError(f"--resume {run_dir} continues that run with its own config.yaml; "
                            "drop --config/--preset/--run-dir (or start a new run without "
                            "--resume)")
        if not config_path.is_file():
            raise OtltError(f"cannot resume: {config_path} does not exist (is {run_dir} an "
                            "otlt run directory?)")
        raw = load_raw(config_path)
        changes = resume_changes(build_overridden(raw), build_overridden(raw, overrides),
                                 run_dir)
    else:
        raw = load_raw(config_source(args.config, args.preset, resume_hint=True))
        run_dir = Path(args.run_dir) if args.run_dir else None
    cfg = build_overridden(raw, overrides)
    trainer = create_trainer(cfg, run_dir=run_dir, resume=bool(args.resume))
    _TRAINING.append(trainer.run_dir)  # named by a Ctrl-C/SIGTERM line from here on
    say(f"otlt: run directory {trainer.run_dir}  device {trainer.device}  "
        f"amp {trainer.amp_dtype or 'off'}  train {len(trainer.feed)} images "
        f"{trainer.feed.counts}", flush=True)
    start = time.perf_counter()
    if changes:
        trainer.record_resume_changes(changes)
    result = trainer.fit(stop_after=args.stop_after, time_limit=limit)
    if result is None:
        timed = limit is not None and limit.stopped_at is not None
        say(f"otlt: stopped after epoch {limit.stopped_at if timed else args.stop_after}"
            + (f" (time limit: {max(limit.left(), 0):.0f}s left)" if timed else "")
            + f"; continue with 'otlt train --resume {trainer.run_dir}'")
        return 0
    if trainer.finished_before:
        say(f"otlt: {trainer.run_dir} had trained all {cfg.optim.epochs} epochs already; "
            f"its eval.json as it stands (otlt eval {trainer.run_dir} computes it again "
            "into a file of its own):")
    say(format_eval(result, title=f"{cfg.name}: last epoch, {result['split']} split, "
                                  f"BN {result['bn_stats']}"))
    selected = result.get("selected")
    if selected:
        groups = ", ".join(f"{g} {format_percent(selected[f'{g}_error'])}"
                           for g in ("many", "medium", "few"))
        say(f"validation-selected epoch {selected['epoch'] + 1} ({selected['select_metric']} "
            f"{selected['val_value']:.2f}% on val): test top-1 error "
            f"{selected['top1_error']:.2f}% ({groups})")
    say(f"otlt: done in {time.perf_counter() - start:.0f}s; results in {trainer.run_dir}")
    return 0


def say(*args, **kwargs) -> None:
    """Print on rank 0 only (under torchrun every rank runs the command)."""
    from otlt.engine.distributed import is_main_process

    if is_main_process():
        print(*args, **kwargs)


def resume_changes(old, new, run_dir: Path) -> dict:
    """The keys ``--set``/``--data`` change on resume (``{key: [old, new]}``); any key
    outside ``otlt.config.SAFE_ON_RESUME`` is an error listing them (the comparison is the
    one that also checks ``config.yaml`` against ``last.pt``: ``otlt.config.compare``)."""
    from otlt.config import config_changes, refuse_unsafe_changes

    changed = config_changes(old, new)
    refuse_unsafe_changes(changed, f"--resume {run_dir} would change the run",
                          f"Start a new run instead: otlt train --config "
                          f"{run_dir / 'config.yaml'} --set name=<new> ...")
    return changed


def cmd_eval(args) -> int:
    from otlt.engine.posthoc import evaluate_run

    result, path, written = evaluate_run(
        Path(args.target), checkpoint=args.checkpoint, bn_stats=args.bn_stats, split=args.split,
        data_path=args.data, many=args.many, few=args.few,
        out=Path(args.out) if args.out else None, overwrite=args.overwrite, device=args.device)
    print(format_eval(result, title=f"{args.target}: {result['checkpoint']} (epoch "
                                    f"{result['epoch'] + 1}), {result['split']} split, "
                                    f"BN {result['bn_stats']}"))
    print(_written(path, written))
    return 0


def cmd_probe(args) -> int:
    from otlt.engine.posthoc import probe_kept, write_result

    run = Path(args.target)
    modes = [m.strip() for m in args.bn_stats.split(",") if m.strip()]
    epochs = _int_list(args.epochs, "--epochs") if args.epochs else None
    if args.bn_batches is not None and args.bn_batches < 1:
        raise OtltError(f"--bn-batches must be >= 1, got {args.bn_batches}")
    suffix = f"_bn{args.bn_batches}" if args.bn_batches else ""
    out = Path(args.out) if args.out else run / f"probe_{args.split}{suffix}.json"
    result = probe_kept(run, modes, epochs, split=args.split, data_path=args.data,
                        bn_batches=args.bn_batches, device=args.device,
                        out=None if args.overwrite else out)
    written = write_result(out, result, args.overwrite)
    print(format_probe(result))
    print(_written(out, written))
    return 0


def _written(path: Path, written: bool) -> str:
    return f"otlt: wrote {path}" if written else \
        f"otlt: kept {path} (it holds these numbers already)"


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise OtltError(f"{flag} must be comma-separated integers, got {text!r}") from None


def format_probe(result: dict) -> str:
    """Table of ``otlt probe``: error (%) per epoch and procedure, best-balanced epochs.
    Rows name the weights as ``--epochs`` and the kept files do (from 0), with the epoch
    as the training log counts it (from 1): ``epoch_028 (29)``."""
    modes = list(dict.fromkeys(r["bn_stats"] for r in result["records"]))
    by = {(r["epoch"], r["bn_stats"]): r for r in result["records"]}
    epochs = sorted({r["epoch"] for r in result["records"]})
    title = f"{result['split']} error % (many/medium/few) by BatchNorm procedure"
    lines = [title, "-" * len(title),
             f"{'weights (epoch)':<16}" + "  ".join(f"{m:>24}" for m in modes)]
    for e in epochs:
        cells = []
        for m in modes:
            r = by[(e, m)]
            groups = "/".join("-" if r[k] is None else f"{r[k]:.1f}"
                              for k in ("many_error", "medium_error", "few_error"))
            cells.append(f"{r['top1_error']:6.2f} ({groups})".rjust(24))
        lines.append(f"{f'epoch_{e:03d} ({e + 1})':<16}" + "  ".join(cells))
    if result["split"] == "val" and len(epochs) > 1:
        for m in modes:
            best = max(epochs, key=lambda e: (by[(e, m)]["balanced_acc"] or -1, e))
            lines.append(f"best balanced accuracy under {m}: epoch_{best:03d} (epoch "
                         f"{best + 1}), {by[(best, m)]['balanced_acc']:.2f}%")
    return "\n".join(lines)


def cmd_demo(args) -> int:
    from otlt.demo import run_demo

    return run_demo(data=args.data, epochs=args.epochs, out=Path(args.out))


def cmd_bench(args) -> int:
    from otlt.bench import cli_main

    return cli_main(args)


def cmd_report(args) -> int:
    from otlt.report import ReportOptions, linked_figures, write_report

    options = ReportOptions(gallery=args.gallery, gallery_size=args.gallery_size, tsne=args.tsne,
                            tsne_samples=args.tsne_samples, data_path=args.data, seed=args.seed,
                            bn_stats=args.bn_stats)
    out = args.out or Path("reports") / Path(args.run_dirs[0]).resolve().name
    path = write_report(args.run_dirs, out, options,
                        notice=lambda line: say(f"otlt: {line}", file=sys.stderr))
    print(f"otlt: wrote {path} with {len(linked_figures(path))} figures")
    return 0


def cmd_sweep(args) -> int:
    from otlt.config import config_source
    from otlt.sweep import parse_values, plan_sweep, run_sweep, summary

    runs = plan_sweep(config_source(args.config, args.preset), args.key,
                      parse_values(args.values), args.overrides, out_dir=args.out_dir,
                      data=args.data)
    dirs = run_sweep(runs)
    print(summary(runs, args.key))
    report = ["otlt", "report", *map(str, dirs), "--out",
              str(Path(runs[0].config.out_dir) / "report")]
    print(f"otlt: make the sweep's report with: {shlex.join(report)}")
    return 0


def one_line(message: str) -> str:
    """A user error as one line: a DataLoader worker's re-raised error keeps only the
    original message (not the worker's traceback); other newlines become spaces."""
    if "Original Traceback" in message:
        lines = [line for line in message.splitlines() if line.strip()]
        message = lines[-1].split(": ", 1)[-1] if lines else message
    return " ".join(message.split())


_TRAINING: list[Path] = []
"""The run directory of the ``otlt train`` in progress, once it has one (for the stop line)."""


def _resume_hint() -> str:
    """How to go on after a stopped ``otlt train``: the run directory when it is known, and
    the launcher under torchrun (a resume needs the same number of processes)."""
    from otlt.engine.distributed import launched_world_size

    run = _TRAINING[-1] if _TRAINING else "<run directory>"
    launch = "torchrun ... -m otlt.cli train" if launched_world_size() > 1 else "otlt train"
    return f"'{launch} --resume {run}'"


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "probe": cmd_probe, "demo": cmd_demo,
            "bench": cmd_bench, "report": cmd_report, "sweep": cmd_sweep, "presets": cmd_presets,
            "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    from otlt.engine.distributed import teardown_process

    finished, command = False, None
    _TRAINING.clear()
    on_sigterm = stop_on_sigterm()
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        code = COMMANDS[command](args)
        finished = True
        return code
    except OtltError as exc:
        from otlt.engine.distributed import is_main_process

        if is_main_process():  # under torchrun every rank raises it; one prints it
            print(f"otlt: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `otlt presets | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM to every rank under torchrun
        from otlt.engine.distributed import is_main_process

        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        if command == "train":
            how += ("; the last finished epoch, if one finished, is in the run directory's "
                    f"last.pt: {_resume_hint()} goes on from it (or starts afresh without it)")
        elif command == "sweep":
            how += "; the same otlt sweep command resumes the stopped run and runs the rest"
        if is_main_process():
            print(f"otlt: {how}", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130
    finally:  # every rank that finished meets the others before leaving the group
        teardown_process(synchronize=finished)
        if on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
