"""``otlt demo``: a few-minute CPU run on CIFAR-10-LT (phi = 100) and its evaluation table.

The preset is the paper's recipe (ResNet-32, SGD, batch 128) on a very short schedule; it
shows the tool working end to end, not the method's accuracy (that needs 200+ epochs).
"""

from __future__ import annotations

import time
from pathlib import Path

from otlt.config import build_config

DEMO_EPOCHS = 6


def demo_config(epochs: int, out: Path, data: str | None) -> dict:
    """Raw config of the demo run: ERM + OTmix, mixing every batch from epoch 2 on."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return {
        "name": f"demo-{stamp}", "seed": 0, "out_dir": str(out),
        "data": {"dataset": "cifar10", "path": data, "imbalance_ratio": 100,
                 "val_per_class": 50, "data_seed": 0},
        "model": {"name": "resnet32"},
        "optim": {"epochs": epochs, "milestones": [max(epochs - 2, 1)], "gammas": [0.1],
                  "warmup_epochs": 1},
        "loss": {"name": "ce"},
    }


def run_demo(data: str | None = None, epochs: int | None = None,
             out: Path = Path("runs")) -> int:
    from otlt.cli import format_eval
    from otlt.engine.trainer import Trainer

    epochs = epochs or DEMO_EPOCHS
    cfg = build_config(demo_config(epochs, out, data))
    print(f"otlt demo: ERM on CIFAR-10-LT (phi=100), ResNet-32, {epochs} epochs on "
          f"{'the GPU' if cfg.train.device == 'cuda' else 'this machine'}", flush=True)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    print(f"otlt demo: {len(trainer.train)} training images per class {trainer.train_counts}; "
          f"run directory {trainer.run_dir}", flush=True)
    result = trainer.fit()
    print()
    print(format_eval(result, title=f"demo: last epoch ({epochs}), test split"))
    print(f"\notlt demo: finished in {time.perf_counter() - start:.0f}s. A {epochs}-epoch run "
          "is a smoke test; the paper's numbers need the 240-epoch configs in configs/.")
    return 0
