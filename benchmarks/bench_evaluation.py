"""Time the per-epoch evaluation passes of a run: BatchNorm recalibration batch by batch
against stacked (``train.bn_stack``), and a 10,000-image test pass at two evaluation batch
sizes (``train.eval_batch_size``), side by side in one process (issue 29's per-epoch
overhead).

    PYTHONPATH=src python benchmarks/bench_evaluation.py --json benchmarks/evaluation_cpu.json
    PYTHONPATH=src python3 benchmarks/bench_evaluation.py --device cuda --json OUT.json

ResNet-32 (CIFAR, 10 classes), bf16 autocast and channels-last as the presets train it,
random inputs (the time of a forward does not depend on the pixels): ``--batches`` (20, the
presets' ``eval.bn_batches``) recalibration batches of ``--batch-size`` (128), clean (a
``train`` recalibration of a mixing run also mixes about half of them, which this does not
time), and ``--test-images`` (10,000) for the test pass. The variants run interleaved
(A B C D, A B C D, ...) ``--repeats`` times after one warm-up round; times are medians (with
min and max), ratios medians of the per-round ratios. On CUDA every timed call ends with a
synchronisation. ``agreement`` is :func:`otlt.engine.batchnorm.statistics_gap` of the stacked
statistics against the batch-by-batch ones (the largest difference over layers of the means,
in units of the channels' standard deviations, and the relative difference of the variances),
next to the same figures for a batch-by-batch recalibration on other random batches (the
scale of the draw's own effect).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from otlt.amp import autocast
from otlt.engine.batchnorm import batchnorm_state, recalibrate_batchnorm, statistics_gap
from otlt.engine.provenance import cpu_name
from otlt.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--test-images", type=int, default=10_000)
    parser.add_argument("--eval-batch-sizes", type=int, nargs=2, default=[1000, 10_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = torch.bfloat16
    torch.manual_seed(0)
    model = create_model("resnet32", 10).to(device, memory_format=torch.channels_last)
    g = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randn(args.batch_size, 3, 32, 32, generator=g, device=device)
               for _ in range(args.batches)]
    test = torch.randn(args.test_images, 3, 32, 32, generator=g, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def recalibrate(stack: int) -> Callable[[], None]:
        return lambda: recalibrate_batchnorm(model, batches, amp_dtype=amp,
                                             channels_last=True, stack=stack)

    def test_pass(batch_size: int) -> Callable[[], None]:
        def run() -> None:
            model.eval()
            for x in test.split(batch_size):
                with torch.no_grad(), autocast(device, amp):
                    model(x.contiguous(memory_format=torch.channels_last)).argmax(1)
        return run

    small, large = args.eval_batch_sizes
    variants = {"recalibrate_by_batch": recalibrate(1),
                f"recalibrate_stack{args.batches}": recalibrate(args.batches),
                f"test_batch{small}": test_pass(small), f"test_batch{large}": test_pass(large)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for round_ in range(args.repeats + 1):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    names = list(variants)

    def ratio(a: str, b: str) -> dict[str, float]:
        r = [x / y for x, y in zip(times[a], times[b], strict=True)]
        return {"median": statistics.median(r), "min": min(r), "max": max(r)}

    recalibrate(1)()
    by_batch = batchnorm_state(model)
    recalibrate(args.batches)()
    stacked = batchnorm_state(model)
    batches[:] = [torch.randn_like(x) for x in batches]
    recalibrate(1)()
    other_draw = batchnorm_state(model)
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else cpu_name(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "model": "resnet32", "amp": "bf16", "channels_last": True,
        "batches": args.batches, "batch_size": args.batch_size,
        "test_images": args.test_images, "repeats": args.repeats,
        "ms": {k: {"median": 1e3 * statistics.median(v), "min": 1e3 * min(v),
                   "max": 1e3 * max(v)} for k, v in times.items()},
        "ratio_stacked_by_batch": ratio(names[1], names[0]),
        "ratio_large_small_eval_batch": ratio(names[3], names[2]),
        "agreement": {"stacked_vs_by_batch": statistics_gap(stacked, by_batch),
                      "other_draw_vs_by_batch": statistics_gap(other_draw, by_batch)},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
