"""``otlt eval``: re-evaluate a saved run on its test (or validation) split."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from otlt.config import build_config
from otlt.data.prepare import prepare_data
from otlt.data.streams import is_list_dataset, prepare_stream_data
from otlt.engine.checkpoint import load_checkpoint
from otlt.engine.trainer import (
    DeviceSplit,
    autocast_dtype,
    evaluate,
    evaluate_batches,
    resolve_device,
)
from otlt.errors import OtltError
from otlt.metrics import summarize
from otlt.models import create_model


def evaluate_run(target: Path, data_path: str | None = None, split: str = "test",
                 many: int | None = None, few: int | None = None) -> dict[str, Any]:
    """Evaluate ``target`` (a run directory or a checkpoint) and write ``eval[_val].json``.

    The many/medium/few groups use the *training* counts stored in the checkpoint, so the
    numbers match those written at the end of training.
    """
    target = Path(target)
    if not target.exists():
        raise OtltError(f"{target} does not exist (expected a run directory or a last.pt)")
    ckpt_path = target / "last.pt" if target.is_dir() else target
    state = load_checkpoint(ckpt_path)
    cfg = build_config(state["config"])
    if data_path is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=data_path))
    device = resolve_device(cfg.train.device)
    model = create_model(cfg.model.name, cfg.num_classes, head=cfg.model.head)
    model.load_state_dict(state["model"])
    model.to(device)
    amp = autocast_dtype(cfg.train.amp, device)
    if is_list_dataset(cfg.data):
        from otlt.engine.stream_trainer import eval_loader

        data = prepare_stream_data(cfg.data, cfg.num_classes, cfg.seed)
        chosen = data.test if split == "test" else data.val
        if chosen is None:
            raise OtltError(f"run {target} has no {split} split (its dataset has no list for it)")
        batches = eval_loader(chosen, cfg.train.eval_batch_size, cfg.train.workers, device)
        confusion = evaluate_batches(model, batches, cfg.num_classes, amp, channels_last=False)
    else:
        data = prepare_data(cfg.data, cfg.num_classes)
        chosen = data.test if split == "test" else data.val
        confusion = evaluate(model, DeviceSplit(chosen, device), cfg.num_classes,
                             cfg.train.eval_batch_size, amp, channels_last=False)
    result = {"split": split, "epoch": int(state["epoch"]), "classes": data.classes,
              **summarize(confusion, state["train_counts"],
                          many=many if many is not None else cfg.eval.many_threshold,
                          few=few if few is not None else cfg.eval.few_threshold)}
    name = "eval.json" if split == "test" else f"eval_{split}.json"
    (ckpt_path.parent / name).write_text(json.dumps(result, indent=1))
    return result
