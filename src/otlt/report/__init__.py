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

from otlt.report.bn_sections import bn_batches_rows, bn_probe_series, bn_procedure_rows
from otlt.report.document import by_dataset, slug
from otlt.report.markdown import ReportOptions, linked_figures, write_report
from otlt.report.runs import (
    GROUPS,
    IGNORED_KEYS,
    RunData,
    Sweep,
    best_test_epoch,
    cell,
    class_weight_series,
    comparison_rows,
    comparison_table,
    detect_sweep,
    flatten,
    fmt,
    load_run,
    load_runs,
    mix_statistics,
    paper_name,
    per_class_values,
    read_json,
    scalar_weight_stats,
)
from otlt.report.trained import (
    Gallery,
    load_trained,
    mixed_pairs,
    tsne_embedding,
)

__all__ = [
    "GROUPS",
    "Gallery",
    "IGNORED_KEYS",
    "ReportOptions",
    "RunData",
    "Sweep",
    "best_test_epoch",
    "bn_batches_rows",
    "bn_probe_series",
    "bn_procedure_rows",
    "by_dataset",
    "cell",
    "class_weight_series",
    "comparison_rows",
    "comparison_table",
    "detect_sweep",
    "flatten",
    "fmt",
    "linked_figures",
    "load_run",
    "load_runs",
    "load_trained",
    "mix_statistics",
    "mixed_pairs",
    "paper_name",
    "per_class_values",
    "read_json",
    "scalar_weight_stats",
    "slug",
    "tsne_embedding",
    "write_report",
]
