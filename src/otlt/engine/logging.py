"""Per-epoch metrics: ``metrics.jsonl`` (one JSON object per epoch) and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from otlt.atomic import write_text_atomic
from otlt.engine.distributed import is_main_process
from otlt.errors import OtltError, is_finite_number, writing


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read every line of a ``metrics.jsonl`` file (missing file: empty list). A last line
    that is not JSON is a write cut short (the process stopped mid-line) and is dropped; a bad
    line before it is damage and raises."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i < len(lines) - 1:
                raise OtltError(f"{path} line {i + 1} is not JSON ({exc.msg}): the file is "
                                "damaged") from None
    return records


def evaluation_share(records: list[dict[str, Any]]) -> float | None:
    """The share of the epochs' time spent outside the training steps (validation,
    BatchNorm recalibration, probes, the test diagnostic, selection, the mixer's epoch end),

        share = 1 - Σ steps_seconds / Σ epoch_seconds    over the epochs that time their steps,

    rounded to 4 digits; None when no record times its steps (runs older than the key)."""
    timed = [r for r in records if is_finite_number(r.get("steps_seconds"))
             and is_finite_number(r.get("epoch_seconds")) and r["epoch_seconds"] > 0]
    if not timed:
        return None
    total = sum(r["epoch_seconds"] for r in timed)
    return round(1.0 - sum(r["steps_seconds"] for r in timed) / total, 4)


_PREFIXES = (("val_running_", "val_running/"), ("test_diag_", "test_diag/"),
             ("val_", "val/"), ("train_", "train/"), ("ot_", "mix/ot_"),
             ("mixed_", "mix/mixed_"), ("same_class_", "mix/same_class_"))


def tensorboard_tag(key: str) -> str:
    """The grouped TensorBoard tag of a ``metrics.jsonl`` key: ``train/loss``, ``val/acc``,
    ``val/many``, ``mix/ot_batch_fraction``, ``time/epoch``, ``lr`` ..."""
    if key.endswith("_seconds"):
        return f"time/{key.removesuffix('_seconds')}"
    if key in ("ot_loss", "meta_loss"):
        return f"reweight/{key}"
    for prefix, group in _PREFIXES:
        if key.startswith(prefix):
            name = key[len(prefix):]
            return group + (name if name == "acc" else name.removesuffix("_acc"))
    return key


def tensorboard_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite scalars of a record by TensorBoard tag (``bn_probe`` as probe/<mode>/...)."""
    out = {}
    for key, value in record.items():
        if key == "bn_probe" and isinstance(value, dict):
            for mode, values in value.items():
                for k, v in values.items():
                    out[f"probe/{mode}/{tensorboard_tag(k).split('/', 1)[-1]}"] = v
        elif key != "epoch":
            out[tensorboard_tag(key)] = value
    return {k: v for k, v in out.items() if is_finite_number(v)}


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
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            with writing(Path(run_dir) / "tb"):
                self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_epoch)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with writing(self.path), self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            with writing(self.writer.get_logdir()):
                for tag, value in tensorboard_scalars(record).items():
                    self.writer.add_scalar(tag, value, record["epoch"])
                self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


HPARAM_KEYS = ("loss.name", "mix.name", "mix.sampler_r", "mix.prob", "model.name",
               "optim.lr", "optim.batch_size", "optim.epochs", "data.imbalance_ratio", "seed",
               "eval.bn_stats")


def log_final(run_dir: Path, config: dict[str, Any], result: dict[str, Any]) -> None:
    """TensorBoard: the final test numbers (``test/*`` at the last epoch, ``test_selected/*``
    for the validation-selected epoch) and the run's hyper-parameters with them (HParams)."""
    if not is_main_process():
        return
    from torch.utils.tensorboard import SummaryWriter

    metrics = {f"test/{k.removesuffix('_error')}_error": result[k]
               for k in ("top1_error", "many_error", "medium_error", "few_error")
               if result.get(k) is not None}
    selected = result.get("selected") or {}
    metrics.update({f"test_selected/{k}": selected[k]
                    for k in ("top1_error", "many_error", "medium_error", "few_error")
                    if selected.get(k) is not None})
    hparams = {}
    for key in HPARAM_KEYS:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float, str, bool)):
            hparams[key] = node
    with SummaryWriter(str(Path(run_dir) / "tb")) as writer:
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, int(result.get("epoch", 0)))
        writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in metrics.items()},
                           run_name="hparams")
