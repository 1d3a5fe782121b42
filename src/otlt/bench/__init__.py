"""Speed harness (``otlt bench``): what ERM, CMO and OTmix cost per training step, as ratios.

Everything is timed through the engine's own code: a :class:`otlt.engine.trainer.Trainer` is
built from a config and its step is called on its feed's batches with mixing off (ERM) or
on, with the mixer set to CMO or to OTMix with ``ot_probability = 1`` (an OT epoch, every
batch mixed).
Beside these, the harness times the floors and parts that explain the ratios:

- ``model_only``: forward + loss + backward + SGD step on a pre-made batch (the floor for this
  model and device; ERM / model_only is the engine's overhead);
- ``data``: one batch's sampling and augmentation (gather + pad-crop-flip + normalise);
- ``fore_data`` (the key committed benchmark files use): the class-weighted partner draw and
  its augmentation (CMO's and OTmix's foregrounds);
- ``features``: OTmix's no-grad feature pass over the ``2B`` partner + base images;
- ``pairing``: the OTMix call with features given (cost eq. 7, Sinkhorn eq. 4, partner choice
  eq. 8, paste eq. 9 and the mixer's statistics), i.e. OTmix minus the network;
- ``reweight``: one stage-2 step of OT re-weighting, when :mod:`otlt.reweight` provides
  ``OTReweighter``.

Variants are interleaved (ABCABC...) over the repeats, so background load hits them alike;
each sample times ``steps`` consecutive steps after warm-up. Ratios are medians of the
per-repeat (paired) ratios; times are medians, with the min and max as the spread.
``run_scaling`` times Sinkhorn and exact assignment for ``B = 64 .. 1024`` and the OTmix step
for batch sizes ``64 .. 512``.
"""

from otlt.bench.harness import (
    DEFAULT_PRESET,
    Bench,
    BenchOptions,
    bench_config,
    open_bench,
    synthetic_data,
    trained_like_confusion,
)
from otlt.bench.run import (
    PAPER_TABLE9,
    TARGETS,
    check_targets,
    cli_main,
    derived_ratios,
    format_table,
    run_bench,
    write_json,
)
from otlt.bench.scaling import run_scaling, scaling_markdown, scaling_transport
from otlt.bench.timing import choose_threads, interleaved_times, paired_ratio, summarize_times

__all__ = ["DEFAULT_PRESET", "PAPER_TABLE9", "TARGETS", "Bench", "BenchOptions", "bench_config",
           "check_targets", "choose_threads", "cli_main", "derived_ratios", "format_table",
           "interleaved_times", "open_bench", "paired_ratio", "run_bench", "run_scaling",
           "scaling_markdown", "scaling_transport", "summarize_times", "synthetic_data",
           "trained_like_confusion", "write_json"]
