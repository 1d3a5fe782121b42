"""OTMixCallback in a real Lightning loop: mixing, the confusion matrix, checkpoint resume."""

from __future__ import annotations

import pytest
import torch

L = pytest.importorskip("lightning")

from otlt.integrations.lightning import OTMixCallback  # noqa: E402
from otlt.losses import batch_loss, create_loss  # noqa: E402
from otlt.models import create_model  # noqa: E402


def _data():
    g = torch.Generator().manual_seed(0)
    y = torch.repeat_interleave(torch.arange(3), torch.tensor([24, 12, 6]))
    x = torch.randn(len(y), 3, 16, 16, generator=g) + y[:, None, None, None]
    return x, y


class _Module(L.LightningModule):
    def __init__(self, callback: OTMixCallback):
        super().__init__()
        self.net = create_model("resnet20", 3, generator=torch.Generator().manual_seed(0))
        self.criterion = create_loss("ce", [24, 12, 6])
        self.otmix = callback
        self.mixed_batches = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        mixed = self.otmix.mix(self.net, x, y)
        if mixed is None:
            return batch_loss(self.criterion, self(x), y)
        self.mixed_batches += 1
        return batch_loss(self.criterion, self(mixed.images), mixed.targets_a,
                          mixed.targets_b, mixed.lam)

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Spy(OTMixCallback):
    """Records the confusion matrix OTMix holds when each training epoch starts."""

    def on_train_epoch_start(self, trainer, pl_module):
        c = self.otmix.confusion
        self.at_start = None if c is None else c.clone()
        super().on_train_epoch_start(trainer, pl_module)


def _trainer(tmp_path, callback, epochs):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[callback], default_root_dir=tmp_path, num_sanity_val_steps=0)


def test_callback_mixes_builds_the_confusion_and_resumes(tmp_path):
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=14)
    callback = OTMixCallback(x, y, 3, prob=1.0, skip_first=0, skip_last=0, mu=0.0)
    module = _Module(callback)
    trainer = _trainer(tmp_path, callback, epochs=2)
    trainer.fit(module, loader, loader)
    assert module.mixed_batches == 2 * len(loader)  # every batch mixed, all OT-paired (mu=0)
    confusion = callback.otmix.confusion
    assert confusion is not None and int(confusion.sum()) == len(y)
    ckpt = tmp_path / "two.ckpt"
    trainer.save_checkpoint(ckpt)

    again = _Spy(x, y, 3, prob=1.0, skip_first=0, skip_last=0, mu=0.0, seed=5)
    resumed = _Module(again)
    trainer = _trainer(tmp_path, again, epochs=3)
    trainer.fit(resumed, loader, loader, ckpt_path=ckpt)
    assert resumed.mixed_batches == len(loader)  # only epoch 3 ran
    assert torch.equal(again.at_start, confusion)  # restored from the checkpoint


def test_state_round_trips():
    x, y = _data()
    a = OTMixCallback(x, y, 3)
    a.otmix.update_confusion(torch.eye(3) * 4)
    torch.rand(3, generator=a.generator)
    b = OTMixCallback(x, y, 3, seed=9)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.otmix.confusion, a.otmix.confusion)
    assert torch.equal(torch.rand(2, generator=a.generator), torch.rand(2, generator=b.generator))
