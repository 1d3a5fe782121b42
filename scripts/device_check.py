"""The GPU check of the engine (issues 20 and 28) as one prepared command for a lent device,
so that a session with a GPU spends its minutes running, not writing.

    python3 scripts/device_check.py --data cifar10-jpeg   # on the device
    python scripts/device_check.py --out /tmp/dc --device cpu --skip-tests   # dry run (gloo; CI)

With this project's device tool: ``mkdir -p .devdata && cp ../shared/data/cifar10-jpeg.tar.xz
.devdata/`` here, then run (``carry: [".devdata"]``, ``timeout_s`` 540)::

    (cd .devdata && tar xJf cifar10-jpeg.tar.xz); PYTHONPATH=src timeout 500 python3 \
      scripts/device_check.py --data .devdata/cifar10-jpeg

and commit ``device_check.json`` under ``benchmarks/``. Two files come back in ``$OUT``
(``--bring-back``, which defaults to it): ``device_check.json``, copied there each time it is
rewritten, and ``dc_logs.tgz``, the step logs, written on the way out (a timeout's SIGTERM
included). ``--out`` (a temporary folder by default) holds the JSON and one log per step;
the runs and the data cache go to ``--work`` (another temporary folder by default); neither
may lie in ``--bring-back``, since only 8 files come back from ``$OUT``. Beside a campaign in
the same command, run this check first: ``scripts/campaign.py`` leaves room for the two files
it finds in ``$OUT``. The steps run
in the order below, correctness before speed; ``--only`` runs the named ones in the order
given, so a second command sent within the machine's idle window (30 s) can finish what the
budget cut (``--only graphs``).

What it runs, each step with its own timeout cut to what is left of ``--budget`` (460 s,
inside the command's ``timeout 500`` with room for starting Python and torch: a slow step
leaves the later ones less time, never the whole check without its JSON; a step that finds
no time left is recorded as ``skipped``), and writes ``device_check.json`` in ``--out`` (one log
per step beside it; the JSON is rewritten after every step, so a killed command keeps what
finished):

1. ``cuda_tests``: the CUDA-parametrised tests (``pytest -k cuda`` over the files that have them);
2. ``runs``: ``torchrun --standalone --nproc_per_node=N`` of a 3-epoch OTmix run on a tiny
   synthetic image folder (an odd image count, so the last global batch is padded), N = 1
   and, with two or more GPUs, N = 2 (NCCL): the sharded test confusion equals a 1-process
   ``otlt eval``, ``--stop-after 1`` + ``--resume`` under torchrun, the world size in the
   checkpoint;
3. ``one_rank_group``: the same run inside a one-process NCCL group (gloo for ``--device
   cpu``): every collective of training, validation, BN recalibration, the probe, resume and
   the final evaluation goes through the backend (one GPU suffices: NCCL refuses CPU
   tensors, so a collective on the CPU fails here as on many GPUs); weights equal to the
   same run without a group;
4. ``kill_resume``: a real CIFAR-10-LT training (``--data``; the tiny folder without it) of a
   few epochs with ``train.deterministic=true``, killed with SIGKILL mid-epoch and resumed:
   its final weights must equal an uninterrupted run's bit for bit;
5. ``cross_device``: a CPU-trained checkpoint resumed on the device (``--set
   train.device=...``), then evaluated on the CPU (``otlt eval --device cpu``): the test
   confusion within a few images of the in-run one (kernels differ between devices);
6. ``nan_stops``: a run with ``optim.lr=1e30`` must stop with one ``otlt: error:`` line,
   exit code 2, no traceback;
7. ``graphs``: ``train.cuda_graphs`` (issue 29): ``otlt bench --compile --cuda-graphs``
   (eager and graphed ms/step for ERM, CMO and OTmix, compiled for ERM and OTmix, paired in
   one run),
   ``benchmarks/bench_evaluation.py`` (recalibration batch by batch and stacked, test passes
   at two batch sizes), and an eager, a graphed, and a graphed run with the evaluation
   passes stacked (``train.bn_stack=20``, ``train.eval_batch_size=10000``) of the
   kill-and-resume config with the per-epoch test diagnostic, which must agree within the
   stated tolerance (first-epoch loss, final test error); their epoch seconds and the share of
   each epoch spent outside the training steps (evaluation, recalibration).

Exit code 0 when every check passed. Needs only the checkout (``PYTHONPATH=src``) and the
packages ``make venv`` installs or the device image holds (torch, pytest, PIL, yaml).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]  # the checkout; tests: write_tiny_zip

from conftest import write_tiny_zip  # noqa: E402
from otlt.atomic import write_atomic, write_text_atomic  # noqa: E402
from otlt.cli.parser import set_flags  # noqa: E402
from otlt.engine.checkpoint import load_checkpoint  # noqa: E402
from otlt.engine.logging import evaluation_share  # noqa: E402
from otlt.engine.runtime import sgd_options  # noqa: E402

CUDA_TEST_FILES = ["tests/test_losses.py", "tests/test_metrics.py", "tests/test_mixing.py",
                   "tests/test_models.py", "tests/test_stacked_bn.py",
                   "tests/test_otmix.py", "tests/test_step_sync.py", "tests/test_transport.py"]
# Each step is expected to take seconds on a GPU (not measured yet); a limit stops one that
# hangs, and the budget, which every limit is cut to, keeps the whole check inside one
# command (``--slow F`` multiplies them all, for a dry run on a busy CPU).
STEP_TIMEOUT = 90
TESTS_TIMEOUT = 150
BUDGET = 460
ONLY_CHOICES = ("cuda_tests", "runs", "one_rank_group", "kill_resume", "cross_device",
                "nan_stops", "graphs")
DEADLINE = float("inf")  # time.monotonic() at which the budget ends (set by main)
RUN = ["data.dataset=folder", "data.num_classes=10", "data.n_max=41", "data.imbalance_ratio=7",
       "data.val_per_class=5", "model.name=resnet20", "optim.epochs=3",
       "optim.batch_size=30", "optim.milestones=[2]", "optim.gammas=[0.1]",
       "train.progress=false", "mix.name=otmix", "mix.prob=1.0", "mix.skip_first=0",
       "mix.skip_last=0", "eval.bn_probe_every=0", "train.keep_epochs=[]"]


def limit(seconds: float) -> int:
    """``seconds`` cut to what is left of the budget (0: nothing is)."""
    return max(0, int(min(seconds, DEADLINE - time.monotonic())))


def command(cmd: list[str], log: Path, timeout: int, env: dict) -> dict:
    """Run ``cmd`` with output to ``log`` for at most ``timeout`` seconds, or what is left of
    the budget; ``{"rc", "seconds"}`` (rc 124 on timeout, and ``skipped`` without starting it
    when no time is left)."""
    start = time.perf_counter()
    timeout = limit(timeout)
    if timeout < 1:
        log.write_text("skipped: no time left in --budget\n")
        return {"cmd": " ".join(cmd), "rc": 124, "seconds": 0.0, "log": log.name,
                "skipped": "no time left in --budget"}
    with log.open("w") as f:
        # Its own process group, stopped whole: a step left running (torchrun's workers in a
        # hung NCCL collective) would hold the GPU through every later step.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            rc = 124
        except BaseException:  # the outer timeout's SIGTERM (see main) or Ctrl-C
            stop_group(proc)
            raise
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - start, 1),
            "log": log.name}


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM ``proc``'s process group, SIGKILL it ``grace`` seconds later. SIGTERM first:
    torchrun starts its workers in sessions of their own and passes a SIGTERM on to them,
    while a SIGKILL of its group would leave them running."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def torchrun_reads_shutdown_timeout() -> bool:
    """Whether this torch's torchrun reads TORCH_ELASTIC_SHUTDOWN_TIMEOUT (recent releases;
    older ones always wait 30 s before they SIGKILL workers that ignore a SIGTERM)."""
    from torch.distributed.launcher import api

    return "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in inspect.getsource(api)


def torchrun(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "otlt.cli", *args]


def train_args(config: Path, overrides: list[str]) -> list[str]:
    return ["train", "--config", str(config), *set_flags(overrides)]


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return max(float((wa[k].double() - wb[k].double()).abs().max()) if wa[k].numel() else 0.0
               for k in wa)


def check_nproc(nproc: int, device: str, work: Path, out: Path, env: dict) -> dict:
    """Train, evaluate alone and resume under ``torchrun --nproc_per_node=nproc``."""
    data, config = tiny_setup(work)
    runs = work / f"runs{nproc}"
    # Deterministic kernels: the in-run and the separate evaluation must pick the same
    # cuDNN algorithms for their confusions to agree image for image.
    base = [*RUN, f"data.path={data}", f"train.device={device}", f"out_dir={runs}",
            "train.deterministic=true"]
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


ONE_RANK = ("import sys, torch.distributed as dist; "
            "dist.init_process_group(sys.argv.pop(1), store=dist.HashStore(), rank=0, "
            "world_size=1); from otlt.cli import main; sys.exit(main(sys.argv[1:]))")


def tiny_setup(work: Path) -> tuple[Path, Path]:
    data = work / "tiny.zip"
    if not data.is_file():
        write_tiny_zip(data)
    config = work / "c.yaml"
    config.write_text("name: tiny\nloss: {name: ce}\n")
    return data, config


def check_one_rank_group(device: str, work: Path, out: Path, env: dict) -> dict:
    """The tiny OTmix run inside a one-process group of the device's backend (with SyncBN,
    the ``train`` recalibration and the probe, so every kind of collective runs), stopped
    after one epoch and resumed in the group; its weights against the same run alone."""
    data, config = tiny_setup(work)
    backend = "nccl" if device == "cuda" else "gloo"
    runs = work / "one_rank"
    base = [*RUN, f"data.path={data}", f"train.device={device}", f"out_dir={runs}",
            "train.deterministic=true", "train.sync_bn=true", "eval.bn_stats=train",
            "eval.bn_probe_every=1"]
    grouped = [sys.executable, "-c", ONE_RANK, backend]
    result = {"backend": backend}
    result["part"] = command([*grouped, *train_args(config, [*base, "name=grouped"]),
                              "--stop-after", "1"], out / "one_rank_part.log", STEP_TIMEOUT, env)
    result["resume"] = command([*grouped, "train", "--resume", str(runs / "grouped")],
                               out / "one_rank_resume.log", STEP_TIMEOUT, env)
    result["alone"] = command([sys.executable, "-m", "otlt.cli",
                               *train_args(config, [*base, "name=alone"])],
                              out / "one_rank_alone.log", STEP_TIMEOUT, env)
    ok = all(result[k]["rc"] == 0 for k in ("part", "resume", "alone"))
    result["max_weight_difference"] = (max_weight_difference(
        runs / "grouped" / "last.pt", runs / "alone" / "last.pt") if ok else None)
    result["passed"] = ok and result["max_weight_difference"] == 0.0
    return result


REAL_EPOCHS = 4


def real_run(data: Path | None, work: Path) -> tuple[Path, list[str]]:
    """CIFAR-10-LT (ResNet-32, OTmix, 4 epochs) on ``data``, else the tiny OTmix run."""
    if data is None:
        tiny, config = tiny_setup(work)
        return config, [*RUN, f"data.path={tiny}", f"optim.epochs={REAL_EPOCHS}"]
    config = ROOT / "configs" / "cifar10_lt_r100_erm_otmix.yaml"
    return config, [f"data.path={data}", f"optim.epochs={REAL_EPOCHS}", "optim.milestones=[2, 3]",
                    "optim.gammas=[0.1, 0.01]", "optim.warmup_epochs=1",
                    "train.keep_epochs=[]", "mix.skip_first=1", "mix.skip_last=0",
                    "mix.params.plan_epochs=[]", "eval.bn_probe_every=0",
                    "data.meta_per_class=0", "train.progress=false"]


def check_kill_resume(device: str, data: Path | None, work: Path, out: Path,
                      env: dict) -> dict:
    """SIGKILL mid-epoch, resume: bit-exact against the uninterrupted run
    (``train.deterministic=true``; cuDNN's autotuned kernels need not be)."""
    config, base = real_run(data, work)
    runs = work / "kill"
    base = [*base, f"train.device={device}", f"out_dir={runs}", "train.deterministic=true"]
    train = [sys.executable, "-m", "otlt.cli"]
    result: dict = {"data": str(data) if data else "tiny"}
    result["full"] = command([*train, *train_args(config, [*base, "name=full"])],
                             out / "kill_full.log", 3 * STEP_TIMEOUT, env)
    if result["full"]["rc"] != 0:
        return {**result, "passed": False}
    epoch_seconds = json.loads((runs / "full" / "metrics.jsonl").read_text().splitlines()[0])[
        "epoch_seconds"]
    with (out / "kill_part.log").open("w") as log:
        proc = subprocess.Popen([*train, *train_args(config, [*base, "name=part"])], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        metrics = runs / "part" / "metrics.jsonl"
        deadline = time.time() + limit(3 * STEP_TIMEOUT)
        try:
            while time.time() < deadline and proc.poll() is None and not (
                    metrics.is_file() and metrics.read_text().count("\n") >= 1):
                time.sleep(0.05)
            time.sleep(epoch_seconds / 2)  # into the second epoch
            killed_at = metrics.read_text().count("\n") if metrics.is_file() else 0
            alive = proc.poll() is None  # a run that already ended was not killed mid-run
        finally:  # also when the outer timeout's SIGTERM unwinds this (see main)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    result["killed_after_epochs"] = killed_at
    result["killed_while_running"] = alive
    result["resume"] = command([*train, "train", "--resume", str(runs / "part")],
                               out / "kill_resume.log", 3 * STEP_TIMEOUT, env)
    if result["resume"]["rc"] != 0:
        return {**result, "passed": False}
    result["max_weight_difference"] = max_weight_difference(runs / "full" / "last.pt",
                                                            runs / "part" / "last.pt")
    a, b = (json.loads((runs / r / "eval.json").read_text()) for r in ("full", "part"))
    result["test_top1_error"] = [a["top1_error"], b["top1_error"]]
    result["passed"] = (result["max_weight_difference"] == 0.0 and alive
                        and 1 <= killed_at < REAL_EPOCHS)
    return result


def check_cross_device(device: str, work: Path, out: Path, env: dict) -> dict:
    """Trained on the CPU, resumed on ``device``, evaluated on the CPU."""
    data, config = tiny_setup(work)
    runs = work / "cross"
    base = [*RUN, f"data.path={data}", "train.device=cpu", f"out_dir={runs}"]
    cli = [sys.executable, "-m", "otlt.cli"]
    result = {"part_cpu": command([*cli, *train_args(config, [*base, "name=moved"]),
                                   "--stop-after", "1"], out / "cross_part.log",
                                  STEP_TIMEOUT, env)}
    result["resume_on_device"] = command(
        [*cli, "train", "--resume", str(runs / "moved"), "--set", f"train.device={device}"],
        out / "cross_resume.log", STEP_TIMEOUT, env)
    result["eval_on_cpu"] = command(
        [*cli, "eval", str(runs / "moved"), "--device", "cpu", "--out",
         str(work / "cross_cpu.json")], out / "cross_eval.log", STEP_TIMEOUT, env)
    ok = all(r["rc"] == 0 for r in result.values())
    if ok:
        in_run = json.loads((runs / "moved" / "eval.json").read_text())
        on_cpu = json.loads((work / "cross_cpu.json").read_text())
        moved = sum(abs(x - y) for ra, rb in zip(in_run["confusion_matrix"],
                                                 on_cpu["confusion_matrix"], strict=True)
                    for x, y in zip(ra, rb, strict=True)) // 2
        result["test_images_classified_differently_at_most"] = moved
        ok = moved <= 4 and (device != "cpu" or moved == 0)
    result["passed"] = ok
    return result


def check_nan_stops(device: str, work: Path, out: Path, env: dict) -> dict:
    """A diverging run stops with one ``otlt: error:`` line, exit 2, no traceback."""
    data, config = tiny_setup(work)
    step = command([sys.executable, "-m", "otlt.cli", *train_args(
        config, [*RUN, f"data.path={data}", f"train.device={device}",
                 f"out_dir={work / 'nan'}", "optim.lr=1e30", "name=nan"])],
                   out / "nan.log", STEP_TIMEOUT, env)
    text = (out / "nan.log").read_text()
    step["passed"] = (step["rc"] == 2 and text.count("otlt: error:") == 1
                      and "inf or NaN" in text and "Traceback" not in text)
    return step


# A graphed and an eager run of the same config agree when their first epoch's mean training
# loss differs by at most this fraction and their final test top-1 errors by at most this
# many points: bf16 rounding and compiled kernels differ, so a few epochs of SGD cannot be
# bit-equal, and a real bug (a graph replaying stale inputs or weights) misses both by far.
GRAPHS_LOSS_RTOL = 0.02
GRAPHS_ERROR_POINTS = 3.0
# train.bn_stack's statistics against batch-by-batch ones (statistics_gap, bf16): 2e-4 and 9e-4
# on the CPU, against 1.6% and 2.9% between two draws of batches.
STACKED_GAP = 0.01


# The runs of the graphs step: the eager step, the graphed step, and the graphed step with
# the per-epoch evaluation cut to a few forwards (recalibration batches stacked into one,
# validation and test one batch each).
GRAPH_RUNS = {"eager": ["train.cuda_graphs=false"],
              "graphed_stacked": ["train.cuda_graphs=true", "train.bn_stack=20",
                                  "train.eval_batch_size=10000"],
              "graphed": ["train.cuda_graphs=true"]}


def check_graphs(device: str, data: Path | None, work: Path, out: Path, env: dict) -> dict:
    """``train.cuda_graphs``: the bench's graphed step against the eager one (ERM, CMO, OTmix,
    paired in one run); the evaluation passes' bench (``benchmarks/bench_evaluation.py``:
    recalibration batch by batch and stacked, test passes at two batch sizes); and the runs
    of :data:`GRAPH_RUNS` over the same few epochs with the per-epoch test diagnostic on, as
    the campaign runs them: each agrees with the eager run within :data:`GRAPHS_LOSS_RTOL`
    and :data:`GRAPHS_ERROR_POINTS`, and reports its epoch seconds and the share of each
    epoch spent outside the training steps (issue 29's per-epoch overhead). No graph may
    fall back from CUDA graphs (``cuda_graph_skips``, inductor's counter: the bench's
    ``cuda_graph_counters`` and every epoch record of a graphed run must carry 0; a record
    without it fails too); ``cuda_graph_partitions`` (graphs split around ops that run
    outside CUDA graphs) is reported, not judged. Inductor's messages go to the
    ``cudagraphs`` log artifact, on in this step's logs.
    CUDA only: a CPU dry run records it as not applicable."""
    if device != "cuda":
        return {"passed": True, "skipped": "CUDA graphs need a CUDA device"}
    cli = [sys.executable, "-m", "otlt.cli"]
    bench_json = out / "bench_graphs.json"
    where = ["--data", str(data)] if data else ["--synthetic"]
    # The logs then say why a graph ran without CUDA graphs (a mutated input, a collective,
    # ...); the counters below say whether one did.
    env = {**env, "TORCH_LOGS": "perf_hints,cudagraphs"}
    # 10-step samples, 5 repeats: a GPU step is milliseconds, and --quick's single-step
    # samples (one of them the graph's recording) are too noisy to report.
    result = {"bench": command([*cli, "bench", "--steps", "10", "--repeats", "5",
                                "--warmup", "3", "--device", device, "--compile",
                                "--cuda-graphs", *where, "--json", str(bench_json)],
                               out / "bench_graphs.log", 2 * STEP_TIMEOUT, env)}
    bench = {}
    if result["bench"]["rc"] == 0:
        bench = json.loads(bench_json.read_text())
        result["bench_ms"] = {k: round(1e3 * v["median_s"], 3)
                              for k, v in bench["times"].items()}
        result["bench_ratios"] = {k: bench.get(k) for k in (
            "ratio_cmo_erm", "ratio_otmix_erm", "ratio_erm_model_only", "ratio_compiled_erm",
            "ratio_graphed_erm", "ratio_graphed_cmo_erm", "ratio_graphed_otmix_erm")}
    evaluation_json = out / "bench_evaluation.json"
    result["bench_evaluation"] = command(
        [sys.executable, str(ROOT / "benchmarks" / "bench_evaluation.py"), "--device", device,
         "--json", str(evaluation_json)], out / "bench_evaluation.log", STEP_TIMEOUT, env)
    if result["bench_evaluation"]["rc"] == 0:
        evaluation = json.loads(evaluation_json.read_text())
        result["evaluation_ms"] = {k: round(v["median"], 3)
                                   for k, v in evaluation["ms"].items()}
        result["evaluation_agreement"] = evaluation["agreement"]
    config, base = real_run(data, work)
    runs = work / "graphs"
    base = [*base, f"train.device={device}", f"out_dir={runs}", "eval.test_every_epoch=true"]
    for name, overrides in GRAPH_RUNS.items():
        result[name] = command([*cli, *train_args(config, [*base, f"name={name}",
                                                           *overrides])],
                               out / f"graphs_{name}.log", 3 * STEP_TIMEOUT, env)
    if any(result[n]["rc"] != 0 for n in ("bench", "bench_evaluation", *GRAPH_RUNS)):
        return {**result, "passed": False}
    return {**result, **judge_graph_runs(runs, bench, result["evaluation_agreement"])}


def judge_graph_runs(runs: Path, bench: dict, agreement: dict) -> dict:
    """The figures and verdict of :data:`GRAPH_RUNS` finished in ``runs`` (their
    ``metrics.jsonl`` and ``eval.json``), with the step bench's JSON ``bench`` and the
    evaluation bench's ``agreement`` (stacked recalibration against batch by batch: a
    block-mixing bug moves the statistics by percents, far more than a few epochs' test
    error shows, so it is judged on its own, within :data:`STACKED_GAP`)."""
    logs = {n: [json.loads(x) for x in (runs / n / "metrics.jsonl").read_text().splitlines()]
            for n in GRAPH_RUNS}
    errors = {n: json.loads((runs / n / "eval.json").read_text())["top1_error"]
              for n in GRAPH_RUNS}
    loss = {n: logs[n][0]["train_loss"] for n in GRAPH_RUNS}
    result = {"epoch_seconds": {n: [round(r["epoch_seconds"], 3) for r in logs[n]]
                                for n in logs},
              # issue 29's per-epoch overhead: the share of each epoch outside the steps
              "evaluation_share": {
                  n: [evaluation_share([r]) for r in logs[n]] for n in logs},
              "first_epoch_train_loss": loss, "test_top1_error": errors,
              "tolerance": {"loss_rtol": GRAPHS_LOSS_RTOL,
                            "error_points": GRAPHS_ERROR_POINTS}}
    graphed = [n for n in GRAPH_RUNS if n != "eager"]
    counters = {}
    for n in graphed:
        epochs = [(r.get("cuda_graph_skips"), r.get("cuda_graph_partitions")) for r in logs[n]]
        # cumulative since the run started: the last epoch's; None if any epoch lacks it
        counters[n] = {"skips": None if any(s is None for s, _ in epochs) else epochs[-1][0],
                       "partitions": epochs[-1][1]}
    result["cuda_graph_counters"] = {"bench": bench.get("cuda_graph_counters"), **counters}
    bench_skips = (bench.get("cuda_graph_counters") or {}).get("cuda_graph_skips")
    result["stacked_gap_tolerance"] = STACKED_GAP
    result["passed"] = (
        bench_skips == 0
        and max(agreement["stacked_vs_by_batch"].values()) <= STACKED_GAP
        and all(abs(loss[n] - loss["eager"]) <= GRAPHS_LOSS_RTOL * abs(loss["eager"])
                and abs(errors[n] - errors["eager"]) <= GRAPHS_ERROR_POINTS
                and counters[n]["skips"] == 0 for n in graphed))
    return result


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through command(), which stops the running step


def main() -> int:
    # The documented command's outer `timeout` sends SIGTERM to its process group, which the
    # steps, each in a session of its own, are not in: they are stopped on the way out.
    signal.signal(signal.SIGTERM, _terminated)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON and the step logs (default: a new temporary folder)")
    parser.add_argument("--bring-back", default=os.environ.get("OUT"),
                        help="where device_check.json is copied each time it is written and "
                             "dc_logs.tgz (the logs) on the way out (default: $OUT, the "
                             "device tool's return folder; nothing when unset or empty)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--nproc", type=int, nargs="*", default=None,
                        help="process counts to try (default: 1, and 2 with two GPUs)")
    parser.add_argument("--data", type=Path, default=None,
                        help="CIFAR-10 (e.g. the unpacked cifar10-jpeg folder) for the "
                             "kill-and-resume run (default: the tiny synthetic folder)")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the runs and the data cache go (default: a new temporary "
                             "folder; never under the device tool's $OUT)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--only", nargs="+", choices=ONLY_CHOICES, default=None,
                        help="run only these steps (e.g. --only graphs in a second command "
                             "when the first spent its budget)")
    parser.add_argument("--budget", type=float, default=BUDGET,
                        help=f"seconds for the whole check (default {BUDGET}: inside the "
                             "device command's 'timeout 500')")
    parser.add_argument("--slow", type=float, default=1.0,
                        help="multiply every step's time limit and the budget (a dry run on "
                             "a busy CPU)")
    args = parser.parse_args()
    global STEP_TIMEOUT, TESTS_TIMEOUT, DEADLINE
    STEP_TIMEOUT, TESTS_TIMEOUT = int(STEP_TIMEOUT * args.slow), int(TESTS_TIMEOUT * args.slow)
    DEADLINE = time.monotonic() + args.budget * args.slow
    # Absolute, because the steps run in the repository's root.
    out = (args.out or Path(tempfile.mkdtemp(prefix="otlt_device_check_out_"))).resolve()
    work = (args.work or Path(tempfile.mkdtemp(prefix="otlt_device_check_"))).resolve()
    back = Path(args.bring_back).resolve() if args.bring_back else None  # "" or unset: none
    if args.data is not None:
        args.data = args.data.resolve()
    if back is not None and any(p == back or back in p.parents for p in (out, work)):
        parser.error("--out and --work must lie outside --bring-back: only 8 files come back "
                     "from the device tool's $OUT")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    # TORCH_ELASTIC_SHUTDOWN_TIMEOUT: torchrun SIGKILLs workers that ignore its SIGTERM after
    # this many seconds (30 by default), within stop_group's 15 s grace; a torchrun that does
    # not read it keeps 30 s (the report's torchrun_shutdown_timeout says which).
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "OTLT_CACHE": str(work / "cache"),
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "10"}
    print(f"device_check: logs and JSON in {out}, runs in {work}", flush=True)
    try:
        return run_steps(args, out, work, back, env)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a late SIGTERM cuts no file short
        if back is not None:
            bring_back(out, back)


def bring_back(out: Path, back: Path) -> None:
    """Pack ``out``'s logs into ``back/dc_logs.tgz``, written whole or not at all (the JSON
    is in ``back`` already: ``run_steps`` writes it there each time it writes it)."""

    def pack(handle) -> None:
        with tarfile.open(fileobj=handle, mode="w:gz") as tar:
            for path in sorted(out.iterdir()):
                if path.is_file() and path.name != "device_check.json":
                    tar.add(path, arcname=path.name)

    write_atomic(back / "dc_logs.tgz", pack, parents=True)


def run_steps(args: argparse.Namespace, out: Path, work: Path, back: Path | None,
              env: dict) -> int:
    """The steps of ``args`` in order, the JSON rewritten before each; the exit status."""
    gpus = torch.cuda.device_count()
    if args.device == "cuda" and gpus == 0:
        print("device_check: no CUDA device here (use --device cpu for a dry run)",
              file=sys.stderr)
        return 2
    report = {"torch": torch.__version__, "python": platform.python_version(),
              "device": args.device, "gpus": gpus,
              "gpu_name": torch.cuda.get_device_name(0) if gpus else None,
              "nccl": (".".join(map(str, torch.cuda.nccl.version()))
                       if gpus and hasattr(torch.cuda, "nccl") else None),
              "sgd": sgd_options(torch.device(args.device)),  # fused=True on CUDA
              "torchrun_shutdown_timeout": torchrun_reads_shutdown_timeout()}
    order = list(dict.fromkeys(args.only or ONLY_CHOICES))  # --only: in the order given
    if args.skip_tests and "cuda_tests" in order:
        order.remove("cuda_tests")
    counts = args.nproc or ([1, 2] if gpus >= 2 else [1])
    if "runs" in order and not args.nproc and gpus < 2 and args.device == "cuda":
        report["nproc_2"] = "not run: NCCL across two ranks needs two GPUs"
    report["runs"] = []

    def save() -> None:
        text = json.dumps(report, indent=1)
        for folder in (out,) if back is None else (out, back):  # back: whatever ends it
            write_text_atomic(folder / "device_check.json", text, parents=True)

    def cuda_tests() -> dict:
        return command([sys.executable, "-m", "pytest", "-q", "-rA", "--durations=10",
                        "-o", "faulthandler_timeout=60", "-k", "cuda", "-p", "no:cacheprovider",
                        *CUDA_TEST_FILES], out / "pytest_cuda.log", TESTS_TIMEOUT, env)

    def runs() -> dict:
        for n in counts:  # into report["runs"] one by one: a killed command keeps each
            save()
            report["runs"].append(check_nproc(n, args.device, work, out, env))
        return {"passed": all(r["passed"] for r in report["runs"])}

    steps = {"cuda_tests": cuda_tests, "runs": runs,
             "one_rank_group": lambda: check_one_rank_group(args.device, work, out, env),
             "kill_resume": lambda: check_kill_resume(args.device, args.data, work, out, env),
             "cross_device": lambda: check_cross_device(args.device, work, out, env),
             "nan_stops": lambda: check_nan_stops(args.device, work, out, env),
             "graphs": lambda: check_graphs(args.device, args.data, work, out, env)}
    steps = {name: steps[name] for name in order}
    for name, step in steps.items():
        save()
        start = time.perf_counter()
        result = step()
        if name == "cuda_tests":
            result["passed"] = result["rc"] == 0
        print(f"device_check: {name} passed={result['passed']}", flush=True)
        if name == "runs":  # report["runs"] holds the list of process counts
            report["runs_seconds"] = round(time.perf_counter() - start, 1)
            continue
        report[name] = result
        report[name]["step_seconds"] = round(time.perf_counter() - start, 1)
    passed = (all(r["passed"] for r in report["runs"])
              and all(report[name]["passed"] for name in steps if name != "runs"))
    report["passed"] = passed
    save()
    print(json.dumps(report, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
