"""Per-epoch metrics: ``metrics.jsonl`` (one JSON object per epoch) and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from otlt.engine.distributed import is_main_process


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read every line of a ``metrics.jsonl`` file (missing file: empty list)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    """Append epoch records to ``metrics.jsonl`` and scalars to TensorBoard (rank 0 only).

    On resume from epoch ``start_epoch`` the records of later epochs (written after the
    checkpoint that is resumed) are dropped so the file matches the checkpoint.
    """

    def __init__(self, run_dir: Path, start_epoch: int = 0, tensorboard: bool = True):
        self.enabled = is_main_process()
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not self.enabled:
            return
        kept = [r for r in read_metrics(self.path) if r.get("epoch", -1) < start_epoch]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_epoch)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value) and key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
