"""The argparse surface of ``otlt``: every command, its flags and their help.

``build_parser()`` is all the rest of the CLI needs; each command's work is in
``otlt.cli`` (``cmd_<name>``) and the modules it imports lazily.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from otlt import __version__
from otlt.config import BN_STATS
from otlt.errors import OtltError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        raise OtltError(f"{message} (see '{self.prog} --help')")


def set_flags(overrides: Iterable[str]) -> list[str]:
    """``--set KEY=VALUE`` arguments of ``otlt train`` for config overrides
    (``["optim.epochs=3"]`` -> ``["--set", "optim.epochs=3"]``): for scripts and tests that
    build its command line."""
    return [a for o in overrides for a in ("--set", o)]


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config",
                       epilog="Ctrl-C or SIGTERM (a scheduler's preemption) stops a run "
                       "resumably: last.pt holds the last finished epoch (exit 130 or 143).")
    p.add_argument("--config", help="YAML config file (its base: may name a preset)")
    p.add_argument("--preset", help="a packaged preset by name (otlt presets lists them), "
                                    "e.g. cifar10_lt_r100_erm_otmix")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.epochs=30 (repeatable)")
    p.add_argument("--data",
                   help="dataset file or folder (else $OTLT_DATA, ./data, ../shared/data)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--run-dir", help="run directory (default: <out_dir>/<name>)")
    p.add_argument("--stop-after", type=int, metavar="EPOCHS",
                   help="stop (resumable) once this many epochs are done; for time-sliced jobs")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop (resumable) at the first epoch boundary where the next epoch "
                        "(and, before the last one, the final evaluation) would not fit in "
                        "SECONDS from the command's start")
    p.add_argument("--time-margin", type=float, default=1.2, metavar="X",
                   help="with --time-limit: an epoch is budgeted as the longest one seen "
                        "times X (default 1.2)")


DEVICE_HELP = ("cpu, cuda[:N] or auto (default: the run's train.device); e.g. --device cpu for "
               "a GPU-trained run on a machine without one")


def _add_posthoc_flags(p) -> None:
    """The flags otlt eval and otlt probe share: where the data and device are now, and
    whether a result file may be replaced."""
    p.add_argument("--data", help="dataset path, if it moved since training")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing result file that holds other numbers")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run's kept weights under a BatchNorm procedure")
    p.add_argument("target", help="run directory, or a weights file in one (last.pt, "
                                  "best.safetensors, kept/epoch_NNN.safetensors)")
    p.add_argument("--checkpoint", default="last", metavar="last|best|epoch_NNN|PATH",
                   help="which weights of the run directory (default: last)")
    p.add_argument("--bn-stats", choices=BN_STATS,
                   help="BatchNorm statistics for evaluation (default: the run's eval.bn_stats)")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="split to evaluate (default: test)")
    p.add_argument("--many", type=int, help="many-shot threshold (default: the run's, 100)")
    p.add_argument("--few", type=int, help="few-shot threshold (default: the run's, 20)")
    p.add_argument("--out", help="where the JSON goes (default: "
                                 "RUN/eval_<checkpoint>_<bn-stats>[_val].json)")
    _add_posthoc_flags(p)


def _add_probe(sub) -> None:
    p = sub.add_parser("probe", help="kept weights of a run under several BatchNorm procedures "
                                     "(validation by default)")
    p.add_argument("target", help="run directory with kept/ weights (train.keep_every or "
                                  "train.keep_epochs)")
    p.add_argument("--bn-stats", default=",".join(BN_STATS),
                   help=f"comma-separated procedures among {', '.join(BN_STATS)} "
                        "(default: all)")
    p.add_argument("--epochs", help="comma-separated epochs as kept/epoch_NNN names them, "
                                    "counted from 0 (-1: the run's last, as in "
                                    "train.keep_epochs; default: every kept epoch)")
    p.add_argument("--split", default="val", choices=["val", "test"],
                   help="split (default: val; test is for final reporting only)")
    p.add_argument("--bn-batches", type=int, help="recalibration batches (default: the run's)")
    p.add_argument("--out", help="where the JSON goes (default: RUN/probe_<split>[_bnN].json)")
    _add_posthoc_flags(p)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="a few-minute CPU run on CIFAR-10-LT (phi=100), then its "
                                    "evaluation table")
    p.add_argument("--data",
                   help="CIFAR-10 file or folder (default: $OTLT_DATA, ./data, ../shared/data)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the demo preset's)")
    p.add_argument("--out", default="runs", help="where the demo run directory goes")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time ERM, CMO, OTmix and OT re-weighting training "
                       "steps (ratios, JSON)")
    p.add_argument("--config", default=None,
                   help="YAML config whose model, data and batch size are timed (default: the "
                        "packaged preset cifar10_lt_r100_erm)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--data", help="dataset file or folder (default: found like otlt train)")
    p.add_argument("--synthetic", action="store_true",
                   help="random uint8 images of the dataset's size instead of the dataset")
    p.add_argument("--quick", action="store_true", help="fewer repeats (under a minute on CPU)")
    p.add_argument("--scaling", action="store_true",
                   help="time Sinkhorn/assignment for B=64..1024 and OTmix steps for 64..512")
    p.add_argument("--batch-size", type=int, help="batch size (default: the config's)")
    p.add_argument("--device", help="cpu, cuda or auto (default: the config's)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--steps", type=int, help="steps per timed sample")
    p.add_argument("--repeats", type=int, help="interleaved repeats")
    p.add_argument("--warmup", type=int, help="warm-up steps per variant")
    p.add_argument("--compile", action="store_true",
                   help="also time ERM and OTmix steps through torch.compile (ratio to eager)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time ERM, CMO and OTmix steps with CUDA graphs "
                        "(train.cuda_graphs: torch.compile's reduce-overhead mode; CUDA only)")
    p.add_argument("--json", default="bench.json", help="where the JSON result goes")
    p.add_argument("--markdown", default="bench_scaling.md",
                   help="where --scaling writes its Markdown tables")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="Markdown report with figures from run directories")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
    p.add_argument("--out", help="output folder for report.md and figures/ (default: "
                   "reports/<first run directory's name>)")
    p.add_argument("--gallery", action="store_true",
                   help="draw mixed image pairs with each mixing run's model (needs its last.pt "
                        "and the data; fails if no run could be drawn)")
    p.add_argument("--gallery-size", type=int, default=8, metavar="N",
                   help="mixed pairs per run (default: 8)")
    p.add_argument("--tsne", action="store_true",
                   help="t-SNE of test features per run (needs the data and scikit-learn)")
    p.add_argument("--tsne-samples", type=int, default=2000, metavar="N",
                   help="test images in the t-SNE (default: 2000)")
    p.add_argument("--data", help="dataset path for --gallery/--tsne, if it moved since training")
    p.add_argument("--seed", type=int, default=0, help="seed of the gallery and t-SNE draws")
    p.add_argument("--bn-stats", choices=BN_STATS, metavar="MODE",
                   help="read the Rows table under this BatchNorm procedure for every run "
                        "(runs evaluated under another one: from their otlt probe / otlt eval "
                        "files); default: each run's own eval.bn_stats")


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="datasets: download CIFAR-10/100 (verified, resumable)")
    actions = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    d = actions.add_parser("download", help="fetch the official python tarball, check its MD5")
    d.add_argument("dataset", choices=["cifar10", "cifar100"])
    d.add_argument("--root", default="data",
                   help="folder to put it in (default: ./data, where otlt train looks)")
    d.add_argument("--url", help="a mirror of the official file (the MD5 is still checked)")


def _add_presets(sub) -> None:
    p = sub.add_parser("presets", help="list the packaged presets (name, epochs, paper row)")
    p.add_argument("filter", nargs="?", default="", help="only names containing this text")


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="train a config over several values of one key")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--preset", help="a packaged preset by name (otlt presets lists them)")
    p.add_argument("--key", required=True, help="config key to vary, e.g. mix.params.omega")
    p.add_argument("--values", required=True, help="comma-separated values, e.g. 0.0,0.05,0.5")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every run (repeatable)")
    p.add_argument("--data", help="dataset file or folder")
    p.add_argument("--out-dir", help="where the run directories go (default: the config's)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="otlt", description="Long-tailed classification with optimal transport")
    parser.add_argument("--version", action="version", version=f"otlt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_eval(sub)
    _add_probe(sub)
    _add_demo(sub)
    _add_bench(sub)
    _add_report(sub)
    _add_sweep(sub)
    _add_presets(sub)
    _add_data(sub)
    return parser
