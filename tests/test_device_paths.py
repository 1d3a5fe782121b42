"""What fails on GPUs, emulated on the CPU (issue 28): checkpoints loaded for a training device
that is not the CPU, process groups that cannot carry CPU tensors (NCCL), kernel choice.

The real thing runs in ``scripts/device_check.py`` on a lent GPU; these tests fail here for the
same reasons the GPU paths failed there."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import tiny_overrides, train_stopped
from otlt.cli import main
from otlt.config import build_config, load_raw
from otlt.engine import distributed, runtime
from otlt.engine import trainer as trainer_module
from otlt.engine.checkpoint import load_checkpoint
from otlt.engine.factory import create_trainer

SRC = Path(__file__).resolve().parents[1] / "src" / "otlt"


@pytest.fixture
def stopped_run(tiny_zip, tmp_path, config, capsys) -> Path:
    """A tiny OTmix run stopped after 1 of 3 epochs (mixing from the first)."""
    run = train_stopped(config, tiny_overrides(tiny_zip, tmp_path / "runs", epochs=3) + [
        "mix.name=otmix", "mix.prob=1.0", "mix.skip_first=0", "mix.skip_last=0"])
    capsys.readouterr()
    return run


def test_resume_on_a_device_other_than_the_cpu(stopped_run, monkeypatch):
    """A CUDA resume loaded ``last.pt`` with ``map_location=cuda``: the RNG states landed on
    the GPU and ``Generator.set_state`` refused them (TypeError, a traceback). Here the
    ``meta`` device stands in for CUDA: the checkpoint is read on the CPU, the model and
    optimizer state move to the device, the generators get CPU states."""
    monkeypatch.setattr(trainer_module, "resolve_device", lambda _name: torch.device("meta"))
    cfg = build_config(load_raw(stopped_run / "config.yaml"))
    with pytest.warns(UserWarning, match="meta"):  # copying into meta tensors is a no-op
        trainer = create_trainer(cfg, run_dir=stopped_run, resume=True)
    saved = load_checkpoint(stopped_run / "last.pt")
    assert trainer.device.type == "meta" and trainer.start_epoch == 1
    assert next(trainer.model.parameters()).device.type == "meta"
    assert torch.equal(trainer.generator.get_state(), saved["generator"])
    assert torch.equal(torch.get_rng_state(), saved["torch_rng"])
    assert trainer.mixer.confusion is not None


@pytest.fixture
def one_rank_group():
    """A real one-process group; the test names its backend (``gloo`` or ``cuda:gloo``, the
    latter a group with no CPU backend, as NCCL is)."""
    def join(backend: str) -> None:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)

    yield join
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_group_without_a_cpu_backend_refuses_cpu_tensors_clearly(one_rank_group):
    one_rank_group("cuda:gloo")
    assert distributed.collective_device_types() == {"cuda"}
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.ones(2))  # what NCCL does with a CPU tensor
    with pytest.raises(RuntimeError, match="collective on a cpu tensor.*reduce on the training"):
        distributed.all_reduce_sum(torch.ones(2))


def test_gloo_carries_cpu_tensors(one_rank_group):
    one_rank_group("gloo")
    assert distributed.collective_device_types() == {"cpu", "cuda"}
    assert distributed.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("backend, types", [("nccl", {"cuda"}), ("gloo", {"cpu", "cuda"}),
                                            ("cpu:gloo,cuda:nccl", {"cpu", "cuda"})])
def test_collective_device_types_follow_the_backend(monkeypatch, backend, types):
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: backend)
    assert distributed.collective_device_types() == types
    hits = distributed.backend_device_types.cache_info().hits
    assert distributed.collective_device_types() == types  # parsed once per backend string
    assert distributed.backend_device_types.cache_info().hits == hits + 1


def test_a_model_on_a_device_stays_there_for_the_collective(one_rank_group, monkeypatch):
    """The split's confusion matrix is summed on the split's device, then moved to the CPU
    (the first validation under NCCL died on a matrix moved to the CPU before the sum)."""
    one_rank_group("gloo")
    from otlt.engine import evaluation

    seen = []

    def recording_sum(tensor):
        seen.append(tensor.device.type)
        return tensor

    monkeypatch.setattr(evaluation, "all_reduce_sum", recording_sum)
    monkeypatch.setattr(evaluation, "confusion_matrix",
                        lambda p, t, k: torch.zeros(k, k, dtype=torch.long, device="meta"))

    class Split:
        images = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
        labels = torch.zeros(4, dtype=torch.long)

        def __len__(self):
            return 4

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3))
    with pytest.raises(NotImplementedError):  # meta -> cpu cannot copy data: after the sum
        evaluation.evaluate(model, Split(), 3, 2, None, False)
    assert seen == ["meta"]


COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "gather", "scatter",
               "broadcast_object_list", "all_gather_object"}
ALLOWED = {"engine/distributed.py",  # the checked helpers
           "engine/syncbn.py"}  # GlobalBatchNorm2d: the input's device, used off CUDA only


def test_collectives_go_through_the_checked_helpers():
    """The audit of issue 28: no module calls a torch.distributed collective directly, so
    every collective the engine issues passes :func:`check_collective_device`."""
    offenders = []
    for path in SRC.rglob("*.py"):
        name = path.relative_to(SRC).as_posix()
        if name in ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in COLLECTIVES
                    and isinstance(node.value, ast.Name) and node.value.id == "dist"):
                offenders.append(f"{name}:{node.lineno} dist.{node.attr}")
    assert not offenders, offenders


def test_deterministic_kernels_on_request(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    runtime.configure_kernels(torch.device("cuda"), deterministic=False)
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    try:
        runtime.configure_kernels(torch.device("cuda"), deterministic=True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_dist_timeout_must_be_positive(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("name: x\ntrain: {dist_timeout: 0}\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "train.dist_timeout must be > 0" in capsys.readouterr().err
