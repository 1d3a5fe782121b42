"""OTmix on CIFAR-10-LT in a plain PyTorch loop: from the data files to a test report.

    python examples/otmix_cifar_lt.py --data path/to/cifar-10-python.tar.gz   # 240 epochs
    python examples/otmix_cifar_lt.py --data cifar10-jpeg.zip --epochs 30       # a smoke test

The recipe of ``otlt train --preset cifar10_lt_r100_erm_otmix`` written out with otlt's parts,
for readers who put OTmix into their own loop: the long-tailed split (φ = 100, 50 validation
images per class carved out first), batched crop+flip augmentation of uint8 images on the
device, the preset's SGD and learning-rate schedule (:func:`otlt.engine.schedule.step_lr`), a
class-balanced partner (foreground) draw, OT pairing with probability ((t+1)/T)^μ per epoch,
no mixing in the first and last 3 epochs, half the batches mixed, the validation confusion
matrix feeding OTmix's class cost after every epoch, and the test split read once, at the end.
What it leaves out (the CLI has them): checkpoints and resume, the validation-selected epoch,
BatchNorm recalibration (``eval.bn_stats``), autocast, several processes.

Shapes: the splits are uint8 ``(N, H, W, 3)`` images with ``(N,)`` int64 labels;
``BatchAugment`` turns a batch into float ``(B, 3, H, W)`` model inputs, which is what every
mixer takes (OTMix refuses uint8 in one line).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from otlt.config import DataConfig, RunConfig, load_config, preset_path
from otlt.console import format_eval
from otlt.data.augment import BatchAugment
from otlt.data.prepare import prepare_data
from otlt.engine.evaluation import model_confusion
from otlt.engine.schedule import step_lr
from otlt.errors import OtltError
from otlt.losses import batch_loss, create_loss
from otlt.metrics import summarize
from otlt.mixing import MixRecipe, OTMix
from otlt.models import create_model

PRESET = "cifar10_lt_r100_erm_otmix"


def preset_schedule(epochs: int) -> RunConfig:
    """The preset's SGD settings and learning-rate schedule, for
    :func:`otlt.engine.schedule.step_lr`: linear warm-up per step, then ×0.1, ×0.01, ×1e-4
    from epochs 100, 160, 200 of 240. A shorter run scales them as the ``_short`` presets do
    (30 epochs: 1 warm-up epoch, milestones 12, 20, 25)."""
    cfg = load_config(preset_path(PRESET))
    o, scale = cfg.optim, epochs / cfg.optim.epochs
    milestones = tuple(round(m * scale) for m in o.milestones)
    return replace(cfg, optim=replace(o, epochs=epochs, milestones=milestones,
                                      warmup_epochs=max(1, round(o.warmup_epochs * scale))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 tarball, image folder or .zip")
    parser.add_argument("--dataset", default="cifar10", help="cifar10, cifar100 or folder")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--imbalance-ratio", type=float, default=100.0)
    parser.add_argument("--n-max", type=int, default=None, help="images of the largest class")
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--epochs", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args()
    device, num_classes, epochs = torch.device(args.device), args.num_classes, args.epochs
    torch.manual_seed(args.seed)

    # 1. Data: a long-tailed train split, a balanced validation split, the test split.
    data = prepare_data(DataConfig(dataset=args.dataset, path=args.data, n_max=args.n_max,
                                   imbalance_ratio=args.imbalance_ratio,
                                   val_per_class=args.val_per_class), num_classes)

    def on_device(split):  # uint8 (N, H, W, 3) images, (N,) labels
        return (torch.from_numpy(split.images).to(device),
                torch.from_numpy(split.labels).long().to(device))

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = map(
        on_device, (data.train, data.val, data.test))
    counts = data.train_counts
    print(f"train {len(train_y)} images per class {counts}, val {len(val_y)}, test {len(test_y)}")

    # 2. The method: model, loss, OTmix, the class-balanced partner draw.
    model = create_model(args.model, num_classes).to(device)
    cfg = preset_schedule(epochs)                   # the preset's SGD and lr schedule
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    criterion = create_loss("ce", counts)
    otmix = OTMix(class_counts=counts)              # omega=0.05, eps=0.01, alpha=4, mu=1
    recipe = MixRecipe(otmix, train_y.cpu())        # the presets' recipe: no mixing in the
    augment = BatchAugment()                        # first and last 3 epochs, half the
    g = torch.Generator().manual_seed(args.seed)    # batches mixed, class-balanced partners

    def load(idx):  # partners, gathered and augmented like the batch itself
        idx = idx.to(device)
        return augment(train_x[idx], g), train_y[idx]

    # 3. Training.
    for epoch in range(epochs):
        mixing = recipe.start_epoch(epoch, epochs, g)   # OT pairing: probability ((t+1)/T)^μ
        total = 0.0
        batches = torch.randperm(len(train_y), generator=g).split(args.batch_size)
        for step, idx in enumerate(batches):
            for group in opt.param_groups:              # warm-up per step, then the steps
                group["lr"] = step_lr(cfg, epoch, step, len(batches))
            x, y = load(idx)
            mixed = recipe.step(x, y, g, load=load, model=model) if mixing else None
            if mixed is None:                           # a clean batch
                loss = batch_loss(criterion, model(x), y)
            else:
                loss = batch_loss(criterion, model(mixed.images), mixed.base_labels,
                                  mixed.partner_labels, mixed.lam)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        val = model_confusion(model, val_x, val_y, num_classes)
        otmix.end_epoch(val)                        # the class cost of the next OT epochs
        val_acc = 100.0 * val.diagonal().sum().item() / val.sum().item()
        print(f"epoch {epoch + 1}/{epochs}  loss {total / len(batches):.3f}  val {val_acc:.1f}%"
              f"{'  OT pairing' if mixing and otmix.ot_epoch else ''}", flush=True)

    # 4. The report: the test split, read once, for the last epoch.
    result = summarize(model_confusion(model, test_x, test_y, num_classes), counts)
    result["classes"] = data.classes  # the table names them
    print(format_eval(result, title=f"OTmix, last epoch ({epochs}), test split"))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    try:
        main()
    except OtltError as exc:  # a wrong --data and the like: one line, not a traceback
        raise SystemExit(f"otmix_cifar_lt.py: error: {exc}") from None
