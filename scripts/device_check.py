"""The GPU check of multi-process training (issue 20) as one prepared command for a lent
device, so that a session with a GPU spends its minutes running, not writing.

    python3 scripts/device_check.py --out $OUT            # on the device (CUDA, NCCL)
    python scripts/device_check.py --out /tmp/dc --device cpu --nproc 2   # dry run (gloo)

What it runs, each step with its own timeout, and writes to ``OUT/device_check.json``
(logs beside it):

1. the CUDA-parametrised tests (``pytest -k cuda`` over the test files that have them);
2. ``torchrun --standalone --nproc_per_node=N`` of a 3-epoch OTmix run on a tiny synthetic
   image folder (an odd image count, so the last global batch is padded), on ``cuda`` with
   NCCL (``--device cpu``: gloo), N = 1 and, with two or more GPUs, N = 2;
3. a 1-process ``otlt eval`` of the same weights: its test confusion matrix must equal the
   in-run ``eval.json``'s (sharded and all-reduced under torchrun);
4. resume under torchrun: ``--stop-after 1`` then ``--resume`` against the uninterrupted
   run; on CUDA the largest weight difference is recorded (cuDNN's kernels need not be
   bit-reproducible), on the CPU it must be 0.

Exit code 0 when every check passed. Needs only the checkout (``PYTHONPATH=src``) and the
packages ``make venv`` installs or the device image holds (torch, pytest, PIL, yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]  # the checkout; tests: write_tiny_zip

from conftest import write_tiny_zip  # noqa: E402
from otlt.engine.checkpoint import load_checkpoint  # noqa: E402

CUDA_TEST_FILES = ["tests/test_losses.py", "tests/test_metrics.py", "tests/test_mixing.py",
                   "tests/test_otmix.py", "tests/test_transport.py"]
# Each step is seconds on a GPU; the limits keep the whole check inside one 10-minute command.
STEP_TIMEOUT = 90
TESTS_TIMEOUT = 180
RUN = ["data.dataset=folder", "data.num_classes=10", "data.n_max=41", "data.imbalance_ratio=7",
       "data.val_per_class=5", "model.name=resnet20", "optim.epochs=3",
       "optim.batch_size=30", "optim.milestones=[2]", "optim.gammas=[0.1]",
       "train.progress=false", "mix.name=otmix", "mix.prob=1.0", "mix.skip_first=0",
       "mix.skip_last=0", "eval.bn_probe_every=0", "train.keep_epochs=[]"]


def command(cmd: list[str], log: Path, timeout: int, env: dict) -> dict:
    """Run ``cmd`` with output to ``log``; ``{"rc", "seconds"}`` (rc 124 on timeout)."""
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - start, 1),
            "log": log.name}


def torchrun(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "otlt.cli", *args]


def train_args(config: Path, overrides: list[str]) -> list[str]:
    return ["train", "--config", str(config), *[a for o in overrides for a in ("--set", o)]]


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return max(float((wa[k].double() - wb[k].double()).abs().max()) if wa[k].numel() else 0.0
               for k in wa)


def check_nproc(nproc: int, device: str, work: Path, out: Path, env: dict) -> dict:
    """Train, evaluate alone and resume under ``torchrun --nproc_per_node=nproc``."""
    data = write_tiny_zip(work / "tiny.zip")
    config = work / "c.yaml"
    config.write_text("name: tiny\nloss: {name: ce}\n")
    runs = work / f"runs{nproc}"
    base = [*RUN, f"data.path={data}", f"train.device={device}", f"out_dir={runs}"]
    result: dict = {"nproc": nproc}
    result["train"] = command(torchrun(nproc, train_args(config, [*base, "name=full"])),
                              out / f"torchrun{nproc}_train.log", STEP_TIMEOUT, env)
    full = runs / "full"
    if result["train"]["rc"] != 0:
        return {**result, "passed": False}
    in_run = json.loads((full / "eval.json").read_text())
    result["alone"] = command([sys.executable, "-m", "otlt.cli", "eval", str(full),
                               "--out", str(work / f"alone{nproc}.json")],
                              out / f"eval{nproc}.log", STEP_TIMEOUT, env)
    if result["alone"]["rc"] != 0:
        return {**result, "passed": False}
    alone = json.loads((work / f"alone{nproc}.json").read_text())
    result["test_top1_error"] = in_run["top1_error"]
    result["confusion_equal_to_one_process_eval"] = (
        alone["confusion_matrix"] == in_run["confusion_matrix"])
    result["part"] = command(torchrun(nproc, [*train_args(config, [*base, "name=part"]),
                                              "--stop-after", "1"]),
                             out / f"torchrun{nproc}_part.log", STEP_TIMEOUT, env)
    result["resume"] = command(torchrun(nproc, ["train", "--resume", str(runs / "part")]),
                               out / f"torchrun{nproc}_resume.log", STEP_TIMEOUT, env)
    resumed = result["part"]["rc"] == 0 and result["resume"]["rc"] == 0
    result["resume_max_weight_difference"] = (
        max_weight_difference(full / "last.pt", runs / "part" / "last.pt") if resumed else None)
    result["world_size_in_checkpoint"] = load_checkpoint(full / "last.pt")["world_size"]
    exact_needed = device == "cpu"
    result["passed"] = bool(
        result["confusion_equal_to_one_process_eval"] and resumed
        and result["world_size_in_checkpoint"] == nproc
        and (not exact_needed or result["resume_max_weight_difference"] == 0.0))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device_out")))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--nproc", type=int, nargs="*", default=None,
                        help="process counts to try (default: 1, and 2 with two GPUs)")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = out.parent / f"{out.name}_work"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "OTLT_CACHE": str(work / "cache")}
    gpus = torch.cuda.device_count()
    if args.device == "cuda" and gpus == 0:
        print("device_check: no CUDA device here (use --device cpu for a dry run)",
              file=sys.stderr)
        return 2
    report = {"torch": torch.__version__, "python": platform.python_version(),
              "device": args.device, "gpus": gpus,
              "gpu_name": torch.cuda.get_device_name(0) if gpus else None,
              "nccl": (".".join(map(str, torch.cuda.nccl.version()))
                       if gpus and hasattr(torch.cuda, "nccl") else None)}
    if not args.skip_tests:
        report["cuda_tests"] = command([sys.executable, "-m", "pytest", "-q", "-k", "cuda",
                                        "-p", "no:cacheprovider", *CUDA_TEST_FILES],
                                       out / "pytest_cuda.log", TESTS_TIMEOUT, env)
    counts = args.nproc or ([1, 2] if gpus >= 2 else [1])
    report["runs"] = []
    for n in counts:  # the JSON is rewritten after every step: a killed command keeps it
        (out / "device_check.json").write_text(json.dumps(report, indent=1))
        report["runs"].append(check_nproc(n, args.device, work, out, env))
    passed = all(r["passed"] for r in report["runs"]) and (
        args.skip_tests or report["cuda_tests"]["rc"] == 0)
    report["passed"] = passed
    (out / "device_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
