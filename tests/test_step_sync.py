"""No host synchronisation inside the training step (issue 29): ERM, CMO and OTmix epochs on
the in-memory path read the device once, at the end of the epoch.

A host read of a CUDA tensor (``.item()``, ``float(t)``, ``if t:``, ``.tolist()``,
``torch.nonzero``, a boolean-mask index, ``.cpu()``) makes the CPU wait for the GPU and
breaks CUDA-graph capture. Without a GPU the reads are found by *taint*: :class:`HostReads`
is a ``TorchDispatchMode`` that marks every tensor computed from the run's device state (the
model's parameters and buffers, the loss's buffers, the images and labels on the device) and
records each host read of a marked tensor. Draws from the engine's CPU generator (the coin,
λ, the box, crop offsets) are never marked, so reading them is allowed, as it costs no sync
on a GPU either. What the mode sees is every ATen call, forward and backward, so an added
``loss.item()`` anywhere in the step fails the test (checked below by adding one).
Sinkhorn's convergence tests (one read per ``check_every`` block) are counted apart.
"""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

from conftest import tiny_overrides
from otlt.config import load_config
from otlt.engine.step import SGDStep
from otlt.engine.trainer import Trainer
from otlt.reweight import OTReweighter
from otlt.transport.solver import StabilizedSinkhorn

aten = torch.ops.aten
# ATen calls whose result the host must wait for (a scalar, or an output size set by the data).
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.equal.default, aten.bincount.default, aten.repeat_interleave.Tensor,
           aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}
MASK_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                 aten._index_put_impl_.default}


class HostReads(TorchDispatchMode):
    """Record host reads of tensors computed from ``roots`` (see the module docstring).

    ``reads``: ``(what, where)`` outside Sinkhorn's convergence tests; ``solver_reads``: those
    inside them; ``where`` is the innermost ``otlt`` frame of the read.
    """

    def __init__(self, roots) -> None:
        super().__init__()
        self.tainted = WeakTensorKeyDictionary()
        for tensor in roots:
            self.tainted[tensor] = True
        self.reads: list[tuple[str, str]] = []
        self.solver_reads = 0
        self.in_solver_check = False

    def is_tainted(self, tensor: torch.Tensor) -> bool:
        return tensor in self.tainted

    def record(self, what: str) -> None:
        if self.in_solver_check:
            self.solver_reads += 1
            return
        frames = [f for f in traceback.extract_stack() if "/otlt/" in f.filename]
        where = f"{frames[-1].filename.split('/otlt/')[-1]}:{frames[-1].lineno}" if frames \
            else "?"
        self.reads.append((what, where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        hot = any(self.is_tainted(t) for t in leaves)
        if hot and (func in SYNCING or (func in MASK_INDEXING and any(
                t.dtype in (torch.bool, torch.uint8) for t in leaves[1:]))):
            self.record(str(func))
        out = func(*args, **kwargs)
        if hot:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.tainted[t] = True
        return out


@pytest.fixture
def host_reads(monkeypatch):
    """A factory ``host_reads(roots) -> HostReads`` whose mode also catches the reads that
    never reach ATen on the CPU (``tolist``, ``numpy``, ``cpu``, ``to("cpu")``)."""
    modes: list[HostReads] = []

    def watch(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            host = name != "to" or "cpu" in args or kwargs.get("device") == "cpu"
            if modes and host and modes[-1].is_tainted(self):
                modes[-1].record(f"Tensor.{name}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("tolist", "numpy", "cpu", "to"):
        watch(name)
    check = StabilizedSinkhorn._health

    def health(self):
        modes[-1].in_solver_check = True
        try:
            return check(self)
        finally:
            modes[-1].in_solver_check = False

    monkeypatch.setattr(StabilizedSinkhorn, "_health", health)

    def make(roots) -> HostReads:
        modes.append(HostReads(roots))
        return modes[-1]

    return make


MIXES = {
    "erm": "mix: {name: none}\n",
    "cmo": "mix: {name: cmo, prob: 1.0, skip_first: 0, skip_last: 0}\n",
    "otmix": "mix: {name: otmix, prob: 1.0, skip_first: 0, skip_last: 0,"
             " params: {ot_probability: 1.0}}\n",
}


def tiny_trainer(method: str, tiny_zip, tmp_path, device: str = "cpu",
                 overrides: tuple[str, ...] = ()) -> Trainer:
    config = tmp_path / f"{method}.yaml"
    config.write_text(f"name: {method}\nloss: {{name: ce}}\n{MIXES[method]}")
    run = tiny_overrides(tiny_zip, tmp_path / "runs", epochs=3)
    return Trainer(load_config(config, run + [f"name={method}", f"train.device={device}",
                                              *overrides]))


def device_state(trainer: Trainer) -> list[torch.Tensor]:
    """What lives on the training device before the epoch."""
    return [*trainer.model.parameters(), *trainer.model.buffers(), *trainer.loss.buffers(),
            trainer.feed.train.images, trainer.feed.train.labels]


def run_epoch(trainer: Trainer, host_reads) -> tuple[HostReads, int]:
    trainer.step = counted = Counted(trainer.step)
    mode = host_reads(device_state(trainer))
    with mode:
        trainer.train_one_epoch(0)
    return mode, counted.calls


class Counted:
    """A trainer's step that counts its calls and, given the mode, the host reads they make
    (``reads``)."""

    def __init__(self, step, mode: HostReads | None = None) -> None:
        self.inner, self.calls, self.mode, self.reads = step, 0, mode, []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __call__(self, batch):
        self.calls += 1
        before = len(self.mode.reads) if self.mode else 0
        result = self.inner(batch)
        if self.mode:
            self.reads += self.mode.reads[before:]
        return result


@pytest.mark.parametrize("method", ["erm", "cmo", "otmix"])
def test_an_epoch_reads_the_device_once_at_its_end(method, tiny_zip, tmp_path, host_reads):
    trainer = tiny_trainer(method, tiny_zip, tmp_path)
    mode, steps = run_epoch(trainer, host_reads)
    assert steps >= 3
    # The loss, accuracy and count sums, read in one .tolist() after the last step.
    assert [what for what, _ in mode.reads] == ["Tensor.tolist"], mode.reads
    assert mode.reads[0][1].startswith("engine/trainer.py")
    if method == "otmix":  # one read per convergence test, ~3 per batch at check_every 10
        assert steps <= mode.solver_reads <= 10 * steps
    else:
        assert mode.solver_reads == 0


@pytest.mark.parametrize("method", ["erm", "otmix"])
@pytest.mark.parametrize("bn_stats,bn_stack", [("train", 1), ("balanced", 1), ("train", 3)])
def test_batchnorm_recalibration_reads_nothing_from_the_device(method, bn_stats, bn_stack,
                                                               tiny_zip, tmp_path, host_reads):
    """``eval.bn_stats`` other than ``running`` recalibrates a copy of the model before every
    evaluation: its cumulative average must not read each layer's ``num_batches_tracked``
    (``momentum=None`` does: one read per BatchNorm layer and batch, 57 here), batch by batch
    or stacked (``train.bn_stack``)."""
    trainer = tiny_trainer(method, tiny_zip, tmp_path,
                           overrides=(f"eval.bn_stats={bn_stats}", "eval.bn_batches=3",
                                      f"train.bn_stack={bn_stack}"))
    mode = host_reads(device_state(trainer))
    trainer.train_one_epoch(0)
    mode = host_reads(device_state(trainer))
    with mode:
        trainer.evaluation.model_for(0)
    assert mode.reads == []
    if method == "otmix" and bn_stats == "train":  # mixed recalibration batches: OT plans
        assert mode.solver_reads >= 3
    else:
        assert mode.solver_reads == 0


def test_the_reweighting_step_reads_nothing_from_the_device(host_reads):
    """OT re-weighting's weight step (the OT loss, its gradient in the weights, the SGD update
    with momentum over a batch that holds an example twice) reads no device tensor back."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (40,), generator=gen)
    rw = OTReweighter(labels, 3, lr=0.5, momentum=0.9, weight_decay=0.01)
    rw.set_meta(torch.randn(6, 4, generator=gen), torch.tensor([0, 0, 1, 1, 2, 2]))
    idx = torch.tensor([0, 5, 5, 13, 20])
    features = torch.randn(5, 4, generator=gen)
    mode = host_reads([rw.raw, rw.momentum_buffer, rw.meta_features, rw.meta_labels, labels,
                       idx, features])
    with mode:
        for _ in range(2):
            rw.step(features, labels[idx], idx)
    assert mode.reads == [], mode.reads  # before: one a step, checking softmax's marginal
    assert 2 <= mode.solver_reads <= 2 * 20  # Sinkhorn's convergence tests, counted apart
    assert not torch.equal(rw.raw[idx], torch.ones(5))  # it did step


@pytest.fixture(scope="module")
def stage1(tiny_zip, tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny finished stage-1 run, trained once for the module: its config and overrides."""
    root = tmp_path_factory.mktemp("stage1")
    base = tiny_overrides(tiny_zip, root / "runs", epochs=2) + [
        "data.meta_per_class=3", "optim.milestones=[]", "optim.gammas=[]"]
    config = root / "stage.yaml"
    config.write_text("name: stage1\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTLT_CACHE", str(root / "cache"))
        Trainer(load_config(config, base)).fit()
    return config, base


@pytest.mark.parametrize("extra", [[], ["reweight.trainable=all", "reweight.bn=train_meta"]],
                         ids=["fc", "all"])
def test_a_reweighting_epoch_reads_nothing_inside_its_steps(extra, stage1, tmp_path,
                                                              host_reads):
    """OT re-weighting's stage 2 (weight step, classifier step, the per-step sums) on the
    in-memory path: no read inside a step (Sinkhorn's convergence tests apart), the
    epoch's few reads at its start and end."""
    config, base = stage1
    stage1_run = Path(dict(o.split("=", 1) for o in base)["out_dir"]) / "tiny"
    trainer = Trainer(load_config(config, base + [
        f"out_dir={tmp_path / 'runs'}", "name=stage2", f"reweight.stage1={stage1_run}",
        *extra]))
    rw, step = trainer.step.reweighter, trainer.step
    roots = device_state(trainer) + [rw.raw, step.meta_split.images, step.meta_split.labels]
    mode = host_reads(roots + ([rw.momentum_buffer] if rw.momentum_buffer is not None else []))
    trainer.step = counted = Counted(step, mode)
    with mode:
        trainer.train_one_epoch(0)
    assert counted.calls >= 3 and counted.reads == []
    # The epoch's own reads: the meta set's class check when it starts, the sums and the
    # weights' class statistics when it ends (none scales with the steps).
    assert 0 < len(mode.reads) <= 12, mode.reads
    assert mode.solver_reads >= 3  # Sinkhorn's convergence tests, one step or more each


def test_an_item_added_to_the_step_is_caught(tiny_zip, tmp_path, host_reads, monkeypatch):
    trainer = tiny_trainer("erm", tiny_zip, tmp_path)
    sgd_step = SGDStep.__call__

    def with_item(self, batch):
        loss_sum, correct, n = sgd_step(self, batch)
        float(loss_sum)  # what a per-step log line would do
        return loss_sum, correct, n

    monkeypatch.setattr(SGDStep, "__call__", with_item)
    mode, steps = run_epoch(trainer, host_reads)
    assert len(mode.reads) == steps + 1
    assert all(what == "aten._local_scalar_dense.default" for what, _ in mode.reads[:-1])


def test_the_detector_sees_masks_and_host_copies_but_not_generator_draws(host_reads):
    weight = torch.randn(4, 3)
    mode = host_reads([weight])
    with mode:
        g = torch.Generator().manual_seed(0)
        assert torch.rand((), generator=g).item() < 1  # a CPU draw: no device read
        y = weight @ torch.randn(3, generator=g)
        y[y > 0]
        y.cpu()
        y.to("cpu")
        if y.sum() > 0:  # bool()
            pass
        y.nonzero()
    assert [what for what, _ in mode.reads] == [
        "aten.index.Tensor", "Tensor.cpu", "Tensor.to", "aten._local_scalar_dense.default",
        "aten.nonzero.default"]


def cuda_syncs(action, monkeypatch) -> tuple[list[str], int]:
    """The synchronisations CUDA's own detector (``set_sync_debug_mode``) reports while
    ``action()`` runs, and how many of Sinkhorn's convergence tests ran meanwhile."""
    checks = []
    check = StabilizedSinkhorn._health
    monkeypatch.setattr(StabilizedSinkhorn, "_health",
                        lambda self: checks.append(1) or check(self))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            action()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()], \
        len(checks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("method", ["erm", "cmo", "otmix"])
def test_cuda_epoch_synchronises_only_at_its_end(method, tiny_zip, tmp_path, monkeypatch):
    """The same on a GPU, by CUDA's own sync detector."""
    trainer = tiny_trainer(method, tiny_zip, tmp_path, device="cuda")
    trainer.train_one_epoch(0)  # warm-up: lazy initialisation and cuDNN's search synchronise
    syncs, checks = cuda_syncs(lambda: trainer.train_one_epoch(1), monkeypatch)
    assert len(syncs) <= 1 + checks, syncs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("method", ["erm", "otmix"])
@pytest.mark.parametrize("bn_stack", [1, 3])
def test_cuda_batchnorm_recalibration_does_not_synchronise(method, bn_stack, tiny_zip, tmp_path,
                                                           monkeypatch):
    """The recalibration of ``eval.bn_stats: train`` on a GPU, by CUDA's sync detector: at
    most Sinkhorn's convergence tests synchronise (``momentum=None`` would add one per
    BatchNorm layer and batch), batch by batch or stacked."""
    trainer = tiny_trainer(method, tiny_zip, tmp_path, device="cuda",
                           overrides=("eval.bn_stats=train", "eval.bn_batches=3",
                                      f"train.bn_stack={bn_stack}"))
    trainer.train_one_epoch(0)
    trainer.evaluation.model_for(0)  # warm-up
    syncs, checks = cuda_syncs(lambda: trainer.evaluation.model_for(0), monkeypatch)
    assert len(syncs) <= checks, syncs
