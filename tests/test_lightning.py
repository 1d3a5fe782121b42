"""OTMixCallback in a real Lightning loop: mixing, the confusion matrix, checkpoint resume."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch

L = pytest.importorskip("lightning")

from otlt.errors import OtltError  # noqa: E402
from otlt.integrations.lightning import (  # noqa: E402
    OTMixCallback,
    find_network,
    planned_epochs,
)
from otlt.losses import batch_loss, create_loss  # noqa: E402
from otlt.models import create_model  # noqa: E402
from otlt.models.features import feature_fn  # noqa: E402


def _data():
    g = torch.Generator().manual_seed(0)
    y = torch.repeat_interleave(torch.arange(3), torch.tensor([24, 12, 6]))
    x = torch.randn(len(y), 3, 16, 16, generator=g) + y[:, None, None, None]
    return x, y


class _Module(L.LightningModule):
    """The usual module: the network in ``self.model``, ``otmix.mix(self, x, y)``."""

    def __init__(self, callback: OTMixCallback):
        super().__init__()
        self.model = create_model("resnet20", 3, generator=torch.Generator().manual_seed(0))
        self.criterion = create_loss("ce", [24, 12, 6])
        self.otmix = callback
        self.mixed_batches = 0

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        mixed = self.otmix.mix(self, x, y)
        if mixed is None:
            return batch_loss(self.criterion, self(x), y)
        self.mixed_batches += 1
        return batch_loss(self.criterion, self(mixed.images), mixed.base_labels,
                          mixed.partner_labels, mixed.lam)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Spy(OTMixCallback):
    """Records the confusion matrix OTMix holds when each training epoch starts."""

    def on_train_epoch_start(self, trainer, pl_module):
        c = self.otmix.confusion
        self.at_start = None if c is None else c.clone()
        super().on_train_epoch_start(trainer, pl_module)


def _trainer(tmp_path, callback, epochs, **options):
    """A quiet one-CPU Lightning trainer; ``options`` add to or replace its arguments."""
    return L.Trainer(**{"max_epochs": epochs, "accelerator": "cpu", "devices": 1,
                        "logger": False, "enable_progress_bar": False,
                        "enable_model_summary": False, "callbacks": [callback],
                        "default_root_dir": tmp_path, "num_sanity_val_steps": 0, **options})


def test_callback_mixes_builds_the_confusion_and_resumes(tmp_path):
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=14)
    callback = OTMixCallback(x, y, 3, prob=1.0, skip_first=0, skip_last=0, mu=0.0)
    module = _Module(callback)
    trainer = _trainer(tmp_path, callback, epochs=2)
    trainer.fit(module, loader, loader)
    assert module.mixed_batches == 2 * len(loader)  # every batch mixed, all OT-paired (mu=0)
    assert callback.otmix.stats["ot_batches"] == len(loader)  # features found in self.model
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
    a.otmix.epoch, a.otmix.ot_epoch = 7, True
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.otmix.confusion, a.otmix.confusion)
    assert (b.otmix.epoch, b.otmix.ot_epoch) == (7, True)  # OTMix's whole state, not a part
    assert torch.equal(torch.rand(2, generator=a.generator), torch.rand(2, generator=b.generator))


def test_a_checkpoint_of_the_first_callback_still_loads():
    """otlt 0.1's first callback saved ``{"confusion", "generator", "pending_confusion"}``."""
    x, y = _data()
    a = OTMixCallback(x, y, 3)
    b = OTMixCallback(x, y, 3)
    b.load_state_dict({"confusion": torch.eye(3) * 2, "generator": a.generator.get_state(),
                       "pending_confusion": None})
    assert torch.equal(b.otmix.confusion, torch.eye(3) * 2)


def test_network_is_found_in_the_module_or_named_in_one_line():
    net = create_model("resnet20", 3)

    class Holder(torch.nn.Module):
        def __init__(self, **children):
            super().__init__()
            for name, child in children.items():
                setattr(self, name, child)

    loss = create_loss("ce", [2, 1, 1])
    assert find_network(net) is net
    assert find_network(Holder(backbone=net, criterion=loss)) is net
    assert find_network(Holder(model=net, teacher=create_model("resnet20", 3))) is net
    with pytest.raises(OtltError, match=r"^OTMixCallback cannot find the network in Holder: "
                                        r"several candidates \(a, b\); call mix\(self"):
        find_network(Holder(a=net, b=create_model("resnet20", 3)))
    with pytest.raises(OtltError, match="in Holder: no child with features.*embed=otlt.models"):
        find_network(Holder(criterion=loss))


def _mixing_callback(x, y, **options):
    callback = OTMixCallback(x, y, 3, prob=1.0, ot_probability=1.0, **options)
    callback._mixing = True
    callback.otmix.set_epoch(0, 1, generator=callback.generator)
    return callback


def test_embed_is_the_function_otmix_takes():
    """``embed=`` is ``images -> (N, D)`` as in OTMix (it was ``module -> function``)."""
    x, y = _data()
    net = create_model("resnet20", 3)
    calls = []

    def embed(images):
        calls.append(images.shape)
        return feature_fn(net)(images)

    callback = _mixing_callback(x, y, embed=embed)
    mixed = callback.mix(torch.nn.Identity(), x[:6], y[:6])  # the module is not looked at
    assert mixed is not None and calls == [(12, 3, 16, 16)]
    assert callback.otmix.stats["ot_batches"] == 1
    with pytest.raises(OtltError, match="cannot find the network in Identity"):
        _mixing_callback(x, y).mix(torch.nn.Identity(), x[:6], y[:6])


def test_max_steps_without_max_epochs_mixes_by_the_epochs_the_steps_make(tmp_path):
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=14)
    callback = OTMixCallback(x, y, 3, prob=1.0, skip_first=1, skip_last=1, mu=0.0)
    module = _Module(callback)
    trainer = _trainer(tmp_path, callback, epochs=-1, max_steps=4 * len(loader))
    trainer.fit(module, loader, loader)
    assert module.mixed_batches == 2 * len(loader)  # epochs 1 and 2 of 0..3
    assert callback._epochs == 4 and trainer.current_epoch == 4


def test_planned_epochs_and_the_refusals():
    assert planned_epochs(240, -1, 100) == 240
    assert planned_epochs(-1, 1000, 30) == 34  # 33 full epochs and a part
    assert planned_epochs(-1, 1000, 30, accumulate=4) == 125  # 8 steps an epoch
    assert planned_epochs(10, 1000, 30) == 10  # whichever ends the run first
    for max_steps, batches in ((-1, 30), (1000, float("inf"))):
        with pytest.raises(OtltError, match="^OTMixCallback needs the run's length"):
            planned_epochs(-1, max_steps, batches)


def test_a_window_with_no_epoch_warns():
    x, y = _data()
    callback = OTMixCallback(x, y, 3)  # skip 3 first, 3 last
    trainer = SimpleNamespace(max_epochs=5, max_steps=-1, num_training_batches=3,
                              accumulate_grad_batches=1)
    with pytest.warns(UserWarning, match="mixes no batch: skip_first=3 and skip_last=3 leave "
                                         "no epoch of the 5 this run trains"):
        callback.on_train_start(trainer, None)


def test_bf16_true_precision_gets_partners_in_the_batch_dtype(tmp_path):
    """Under ``precision="bf16-true"`` the step's images are bf16; float32 partners met the
    bf16 model in the feature pass ("Input type (float) and bias type (BFloat16)")."""
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=14)
    callback = OTMixCallback(x, y, 3, prob=1.0, skip_first=0, skip_last=0, mu=0.0)
    module = _Module(callback)
    _trainer(tmp_path, callback, epochs=1, precision="bf16-true").fit(module, loader)
    assert module.mixed_batches == len(loader) and callback.otmix.stats["ot_batches"] == 3


class _Handed(OTMixCallback):
    """Records the confusion matrix each training epoch hands to OTMix."""

    def on_train_epoch_end(self, trainer, pl_module):
        self.handed = getattr(self, "handed", [])
        c = self._confusion
        self.handed.append(None if c is None else int(c.sum()))
        super().on_train_epoch_end(trainer, pl_module)


def test_the_sanity_check_and_epochs_without_validation_hand_no_confusion(tmp_path):
    """The sanity check validates an untrained model on two batches: with ``fixed`` confusion
    it became the run's matrix. An epoch that does not validate hands nothing, and OTMix
    keeps the last validation's matrix."""
    x, y = _data()
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=14)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[::2], y[::2]),
                                      batch_size=4)
    callback = _Handed(x, y, 3, confusion_mode="fixed")
    trainer = _trainer(tmp_path, callback, epochs=3, num_sanity_val_steps=2,
                       check_val_every_n_epoch=2, enable_checkpointing=False)
    trainer.fit(_Module(callback), train, val)
    assert callback.handed == [None, len(y[::2]), None]
    assert int(callback.otmix.confusion.sum()) == len(y[::2])


class _RankConfusion(OTMixCallback):
    """Writes the confusion each rank hands to OTMix into ``out/rank<r>.pt``."""

    def __init__(self, *args, out, **kwargs):
        super().__init__(*args, **kwargs)
        self.out = out

    def on_train_epoch_end(self, trainer, pl_module):
        torch.save(self._confusion, f"{self.out}/rank{trainer.global_rank}.pt")
        super().on_train_epoch_end(trainer, pl_module)


@pytest.mark.slow
def test_under_ddp_every_rank_gets_the_whole_validation_confusion(tmp_path):
    """Two gloo processes (ddp_fork): each validates half the split; the matrix handed to
    OTMix is the sum, the same on both ranks, so the ranks plan with one cost."""
    x, y = _data()
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=7)
    callback = _RankConfusion(x, y, 3, out=str(tmp_path))
    trainer = _trainer(tmp_path, callback, epochs=1, devices=2, strategy="ddp_fork",
                       enable_checkpointing=False)
    trainer.fit(_Module(callback), loader, loader)
    confusions = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(confusions[0], confusions[1])
    assert int(confusions[0].sum()) == len(y)


class _DictBatches(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


def test_dict_validation_batches_need_unpack_and_work_with_it(tmp_path):
    x, y = _data()
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=14)
    val = torch.utils.data.DataLoader(_DictBatches(x, y), batch_size=14)
    callback = OTMixCallback(x, y, 3)
    with pytest.raises(OtltError, match="from a validation batch of type dict; give it unpack="):
        _trainer(tmp_path, callback, epochs=1).fit(_Module(callback), train, val)
    callback = OTMixCallback(x, y, 3, unpack=lambda b: (b["image"], b["label"]))
    _trainer(tmp_path, callback, epochs=1).fit(_Module(callback), train, val)
    assert int(callback.otmix.confusion.sum()) == len(y)


@pytest.mark.parametrize("which, images", [(0, 21), (1, 42)])
def test_only_one_validation_loader_builds_the_confusion(tmp_path, which, images):
    """A test loader monitored beside the validation loader must not reach OTmix's cost:
    only ``confusion_dataloader``'s batches are counted (all of them were pooled before)."""
    x, y = _data()
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=14)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[::2], y[::2]),
                                      batch_size=7)
    callback = OTMixCallback(x, y, 3, confusion_dataloader=which)
    _trainer(tmp_path, callback, epochs=1).fit(_Module(callback), train, [val, train])
    assert int(callback.otmix.confusion.sum()) == images


def test_a_confusion_loader_with_no_batch_warns_and_hands_nothing(tmp_path):
    """An index past the validation loaders (or a loader that yields nothing) gave an
    all-zero confusion, which made OTmix's class term constant without a word."""
    x, y = _data()
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=14)
    callback = _Handed(x, y, 3, confusion_dataloader=1)
    with pytest.warns(UserWarning, match=r"validation dataloader 1 gave no batch .*1 "
                                         r"validation dataloader\(s\)"):
        _trainer(tmp_path, callback, epochs=1).fit(_Module(callback), train, train)
    assert callback.handed == [None]
    for bad in (-1, "0", True, 1.0):
        with pytest.raises(OtltError, match="index of a validation dataloader"):
            OTMixCallback(x, y, 3, confusion_dataloader=bad)
    assert OTMixCallback(x, y, 3, confusion_dataloader=torch.tensor(1)).confusion_dataloader == 1


def test_validation_labels_must_be_one_class_index_per_image(tmp_path):
    x, y = _data()
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=14)
    one_hot = torch.nn.functional.one_hot(y, 3)
    for labels, shown in ((one_hot, "shape (14, 3)"), (y.float(), "torch.float32")):
        val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels),
                                          batch_size=14)
        callback = OTMixCallback(x, y, 3)
        with pytest.raises(OtltError, match=f"integer class labels.*{re.escape(shown)}"):
            _trainer(tmp_path, callback, epochs=1).fit(_Module(callback), train, val)


def test_a_checkpoint_saved_when_validation_ends_carries_the_confusion_to_hand(tmp_path):
    """With ``check_val_every_n_epoch=2`` ModelCheckpoint saves when validation ends, before
    the epoch's end hands the new confusion to OTMix; a resume from that file must plan with
    the matrix the uninterrupted run plans with."""
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=14)
    callback = OTMixCallback(x, y, 3)
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = _trainer(tmp_path, callback, epochs=2, callbacks=[callback, saver],
                       check_val_every_n_epoch=2)
    trainer.fit(_Module(callback), loader, loader)
    assert int(callback.otmix.confusion.sum()) == len(y)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    # The scenario: saved between validation's end and the epoch's (were it saved after,
    # the pending matrix would be None and this test would guard nothing).
    assert state["otlt.OTMixCallback"]["otmix"]["confusion"] is None
    assert int(state["otlt.OTMixCallback"]["pending_confusion"].sum()) == len(y)
    resumed = OTMixCallback(x, y, 3)
    resumed.load_state_dict(state["otlt.OTMixCallback"])
    assert torch.equal(resumed.otmix.confusion, callback.otmix.confusion)


def test_training_labels_outside_the_classes_are_refused_when_the_callback_is_built():
    """Read once at construction: before, labels past num_classes built a callback whose
    first mixed batch (epochs later, skip_first) failed deep inside the training step."""
    x, y = _data()
    for bad, needle in ((y + 4, r"OTMixCallback training labels must be class indices in "
                                r"\[0, 3\), got 4"),
                        (y.float(), "training labels must be integer class indices"),
                        (y[:, None], r"training labels must be \(B,\)")):
        with pytest.raises(OtltError, match=needle):
            OTMixCallback(x, bad, 3)
    with pytest.raises(OtltError, match="num_classes >= 2"):
        OTMixCallback(x, y, 1)
    assert OTMixCallback(x, y.tolist(), 3).otmix.class_counts == (24, 12, 6)  # a list is fine


def test_an_epoch_without_ot_batches_logs_nan_not_the_last_ot_epochs_numbers(tmp_path):
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=14)
    callback = OTMixCallback(x, y, 3, prob=1.0, skip_first=0, skip_last=1, mu=0.0)
    seen = []

    class Recorder(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append({k: float(v) for k, v in trainer.callback_metrics.items()
                         if k.startswith("otmix/")})

    trainer = _trainer(tmp_path, callback, epochs=2, callbacks=[callback, Recorder()])
    trainer.fit(_Module(callback), loader)
    assert seen[0]["otmix/mixed_batches"] == len(loader) and seen[0]["otmix/ot_mean_cost"] > 0
    assert seen[1]["otmix/mixed_batches"] == 0  # skip_last: the last epoch mixes nothing
    assert math.isnan(seen[1]["otmix/ot_mean_cost"])
    assert math.isnan(seen[1]["otmix/same_class_pair_fraction"])
