"""The benchmark run (``otlt bench``): every variant timed, the ratios, the targets, the output."""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from otlt.atomic import write_text_atomic
from otlt.bench.harness import BenchOptions, open_bench, reweight_step
from otlt.bench.scaling import run_scaling, scaling_markdown
from otlt.bench.timing import interleaved_times, paired_ratio, summarize_times
from otlt.engine.provenance import environment, load_average
from otlt.engine.step import counters_since, cudagraph_counters

#: Targets of the performance issue (CPU, ResNet-32, batch 128): result key -> upper bound.
TARGETS = {
    "ratio_cmo_erm": 1.10,
    "ratio_otmix_erm_epoch": 1.45,
    "pairing_share_of_otmix_step": 0.03,
    "data_share_of_erm_step": 0.05,
    "ratio_erm_model_only": 1.10,
}


#: Table 9 of the OTmix paper (one GPU, CIFAR-LT-10, seconds per epoch): ERM 2.85,
#: ERM+CMO 3.35, ERM+OTmix 4.59.
PAPER_TABLE9 = {"ratio_cmo_erm": 3.35 / 2.85, "ratio_otmix_erm": 4.59 / 2.85}


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Time every variant and return the JSON-ready result (see the module docstring)."""
    steps, repeats, warmup = options.resolved()
    graph_counters = cudagraph_counters()  # this bench's own, whatever compiled before
    with tempfile.TemporaryDirectory(prefix="otlt-bench-") as work:
        bench, cfg = open_bench(options, Path(work))
        variants = {"model_only": bench.model_only, "erm": bench.erm, "cmo": bench.cmo_step,
                    "otmix": bench.otmix_step, "data": bench.data,
                    "fore_data": bench.fore_data, "features": bench.features,
                    "pairing": bench.pairing}
        variants["reweight"] = reweight_step(bench, Path(work))
        if options.compile:
            variants["erm_compiled"] = bench.compiled(bench.erm)
            variants["otmix_compiled"] = bench.compiled(bench.otmix_step)
        if options.cuda_graphs:
            variants["erm_graphed"] = bench.compiled(bench.erm, graphs=True)
            variants["cmo_graphed"] = bench.compiled(bench.cmo_step, graphs=True)
            variants["otmix_graphed"] = bench.compiled(bench.otmix_step, graphs=True)
        env = {**environment(bench.device), "threads_reason": bench.threads_reason}
        samples = interleaved_times(variants, steps=steps, repeats=repeats, warmup=warmup,
                                    sync=bench.sync)
        stats = bench.otmix.stats
        iters = stats["ot_iters"] / stats["ot_batches"] if stats["ot_batches"] else None
    result = {**env, "load_average_1m_end": load_average(),
              "config": options.config, "data": "synthetic" if options.synthetic else
              str(options.data or "found by find_data"),
              "model": cfg.model.name, "batch_size": cfg.optim.batch_size,
              "amp": str(bench.trainer.amp_dtype), "channels_last": cfg.train.channels_last,
              "quick": options.quick, "steps_per_sample": steps, "repeats": repeats,
              "warmup": warmup, "sinkhorn_mean_iters": iters,
              # CUDA-graph fallbacks and split graphs of this bench (engine.step.
              # cudagraph_counters); None: not asked
              "cuda_graph_counters": counters_since(graph_counters)
              if options.cuda_graphs else None,
              "times": {name: summarize_times(s) for name, s in samples.items()}}
    result.update(derived_ratios(samples, mix_prob=0.5))
    result["targets"] = check_targets(result)
    result["paper_table9"] = PAPER_TABLE9
    return result


def derived_ratios(samples: dict[str, list[float]], mix_prob: float) -> dict[str, Any]:
    """Ratios and shares from the paired samples.

    ``ratio_*_erm`` compare steps where every batch is mixed; ``ratio_*_erm_epoch`` the
    expected epoch when a batch is mixed with probability ``mix_prob`` (the official code's
    0.5): ``1 + mix_prob (ratio - 1)``.
    """
    pairs = {"ratio_cmo_erm": ("cmo", "erm"), "ratio_otmix_erm": ("otmix", "erm"),
             "ratio_erm_model_only": ("erm", "model_only"),
             "pairing_share_of_otmix_step": ("pairing", "otmix"),
             "feature_share_of_otmix_step": ("features", "otmix"),
             "data_share_of_erm_step": ("data", "erm"),
             "ratio_reweight_erm": ("reweight", "erm"),
             "ratio_compiled_erm": ("erm_compiled", "erm"),
             "ratio_compiled_otmix": ("otmix_compiled", "otmix"),
             "ratio_graphed_erm": ("erm_graphed", "erm"),
             "ratio_graphed_cmo_erm": ("cmo_graphed", "erm_graphed"),
             "ratio_graphed_otmix_erm": ("otmix_graphed", "erm_graphed")}
    out: dict[str, Any] = {"spread": {}}
    for key, (num, den) in pairs.items():
        if num not in samples:
            out[key] = None
            continue
        r = paired_ratio(samples[num], samples[den])
        out[key] = r["median"]
        out["spread"][key] = [r["min"], r["max"]]
    out["mix_prob_epoch"] = mix_prob
    for key in ("ratio_cmo_erm", "ratio_otmix_erm"):
        out[f"{key}_epoch"] = 1.0 + mix_prob * (out[key] - 1.0)
    out["reweight_step_s"] = statistics.median(samples["reweight"]) \
        if "reweight" in samples else None
    return out


def check_targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of the issue with the measured value and whether it is met."""
    return {key: {"target": bound, "value": result.get(key),
                  "met": result.get(key) is not None and result[key] <= bound}
            for key, bound in TARGETS.items()}


def _fmt(value: float | None, pattern: str = "{:.3f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def format_table(result: dict[str, Any]) -> str:
    """The human-readable table of :func:`run_bench`'s result."""
    erm = result["times"]["erm"]["median_s"]
    lines = [f"otlt bench: {result['model']} batch {result['batch_size']} on "
             f"{result['device']} ({result['hardware']}, {result['threads']} threads "
             f"[{result['threads_reason']}], amp "
             f"{result['amp']}), torch {result['torch_version']}, load "
             f"{result['load_average_1m']} -> {result['load_average_1m_end']}",
             f"{result['repeats']} interleaved repeats x {result['steps_per_sample']} steps, "
             f"{result['warmup']} warm-up; ms per step",
             f"{'variant':<16}{'median':>10}{'min':>10}{'max':>10}{'/ ERM':>8}"]
    for name, t in result["times"].items():
        lines.append(f"{name:<16}{1e3 * t['median_s']:>10.1f}{1e3 * t['min_s']:>10.1f}"
                     f"{1e3 * t['max_s']:>10.1f}{t['median_s'] / erm:>8.3f}")
    lines.append("")
    lines.append(f"{'ratio / share':<30}{'median':>8}{'spread':>18}{'target':>8}  met")
    for key in ("ratio_cmo_erm", "ratio_otmix_erm", "ratio_cmo_erm_epoch",
                "ratio_otmix_erm_epoch", "ratio_erm_model_only", "pairing_share_of_otmix_step",
                "feature_share_of_otmix_step", "data_share_of_erm_step", "ratio_reweight_erm",
                "ratio_compiled_erm", "ratio_compiled_otmix", "ratio_graphed_erm",
                "ratio_graphed_cmo_erm", "ratio_graphed_otmix_erm"):
        spread = result["spread"].get(key)
        target = result["targets"].get(key)
        spread_text = "" if spread is None else f"[{spread[0]:.3f}, {spread[1]:.3f}]"
        bound = "" if target is None else f"{target['target']:.2f}"
        met = "" if target is None else ("yes" if target["met"] else "NO")
        lines.append(f"{key:<30}{_fmt(result.get(key)):>8}{spread_text:>18}{bound:>8}  {met}")
    iters = _fmt(result["sinkhorn_mean_iters"], "{:.0f}")
    lines.append(f"(*_epoch: a batch mixed with probability {result['mix_prob_epoch']}; "
                 f"Sinkhorn iterations per OT batch: {iters}; "
                 f"paper Table 9: CMO/ERM {PAPER_TABLE9['ratio_cmo_erm']:.2f}, "
                 f"OTmix/ERM {PAPER_TABLE9['ratio_otmix_erm']:.2f})")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write ``result`` as indented JSON (creating the parent folder)."""
    write_text_atomic(path, json.dumps(result, indent=1), parents=True)


def cli_main(args: Any) -> int:
    """``otlt bench``: run the benchmark (or ``--scaling``), print tables, write JSON."""
    options = BenchOptions(config=args.config, overrides=tuple(args.overrides),
                           data=args.data, synthetic=args.synthetic, quick=args.quick,
                           batch_size=args.batch_size, device=args.device,
                           threads=args.threads, steps=args.steps, repeats=args.repeats,
                           warmup=args.warmup, compile=args.compile,
                           cuda_graphs=args.cuda_graphs)
    if args.scaling:
        result = run_scaling(options)
        text = scaling_markdown(result)
        write_text_atomic(args.markdown, text)
        print(text, end="")
        print(f"otlt: wrote {args.markdown}")
    else:
        result = run_bench(options)
        print(format_table(result))
    write_json(result, Path(args.json))
    print(f"otlt: wrote {args.json}")
    return 0
