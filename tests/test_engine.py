"""The engine's stateless parts: runtime (device, precision, SGD kernel, run directory), the
learning-rate schedule, the confusion-matrix evaluation. The epoch loop itself is tested end to
end in test_cli (train, resume, eval), test_protocol (the evaluation procedure) and
test_distributed (torchrun)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import one_line_error, sets, tiny_overrides
from otlt.cli import main
from otlt.config import load_config
from otlt.engine.evaluation import eval_logits, evaluate_batches
from otlt.engine.runtime import (
    autocast_dtype,
    load_optimizer_state,
    open_run_dir,
    resolve_device,
    sgd_options,
    step_model_for,
)
from otlt.engine.schedule import step_lr
from otlt.engine.step import SGDStep, TrainBatch
from otlt.errors import OtltError
from otlt.losses import create_loss


def test_warmup_then_steps():
    cfg = load_config(None, ["optim.lr=0.1", "optim.warmup_epochs=2", "optim.epochs=10",
                             "optim.milestones=[5, 8]", "optim.gammas=[0.1, 0.01]"])
    # linear warm-up over 2 epochs of 4 steps: lr * (progress + 1/steps) / warmup
    assert step_lr(cfg, 0, 0, 4) == pytest.approx(0.1 * 0.25 / 2)
    assert step_lr(cfg, 1, 3, 4) == pytest.approx(0.1 * 2.0 / 2)
    assert [step_lr(cfg, e, 0, 4) for e in (2, 4, 5, 7, 8, 9)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_cosine_schedule_closed_form():
    cfg = load_config(None, ["optim.lr=0.2", "optim.schedule=cosine", "optim.epochs=10",
                             "optim.warmup_epochs=0", "optim.milestones=[]",
                             "optim.gammas=[]"])
    for epoch, step in ((0, 0), (2, 1), (5, 0), (9, 3)):
        progress = epoch + step / 4
        assert step_lr(cfg, epoch, step, 4) == pytest.approx(
            0.1 * (1 + math.cos(math.pi * progress / 10)))


def test_autocast_dtype_and_device():
    cpu = torch.device("cpu")
    assert autocast_dtype("off", cpu) is None
    assert autocast_dtype("fp16", cpu) is torch.float16
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    native = torch.cpu._is_avx512_bf16_supported()
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if native else None)
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(OtltError, match="no CUDA device is available: use --set "
                                            "train.device=cpu"):
            resolve_device("cuda")


def test_run_directory_is_created_once(tmp_path):
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=r"])
    run = open_run_dir(cfg, None, resume=False)
    assert run == tmp_path / "r" and run.is_dir() and not list(run.iterdir())
    (run / "last.pt").write_bytes(b"")
    with pytest.raises(OtltError, match="already holds a run"):
        open_run_dir(cfg, None, resume=False)
    assert open_run_dir(cfg, None, resume=True) == run


class Fixed(nn.Module):
    """Predicts class (sum of pixels > 0); records the mode and grad mode of each call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        s = x.flatten(1).sum(1)
        return torch.stack([-s, s], 1)


def test_confusion_of_batches_and_train_mode_restored():
    model = Fixed().train()
    x = torch.tensor([1.0, -1.0, 2.0, -3.0]).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    y = torch.tensor([1, 1, 0, 0])
    confusion = evaluate_batches(model, [(x[:2], y[:2]), (x[2:], y[2:])], 2, None,
                                 channels_last=False)
    assert confusion.tolist() == [[1, 1], [1, 1]]  # rows: true class
    assert model.training and model.calls == [(False, False)] * 2


def test_eval_logits_restores_the_callers_mode_even_when_abandoned():
    x, y = torch.ones(2, 3, 2, 2), torch.tensor([1, 1])
    model = Fixed().eval()
    assert [z.tolist() for z, _ in eval_logits(model, [(x, y)], None, False)] == [
        [[-12.0, 12.0]] * 2]
    assert not model.training  # an eval-mode model stays in eval mode
    model.train()
    batches = eval_logits(model, [(x, y), (x, y)], None, False)
    next(batches)
    assert torch.is_grad_enabled() and not model.training  # between batches: no-grad undone
    batches.close()  # abandoned after one batch
    assert model.training

def test_sgd_is_fused_on_cuda_only_and_torchs_default_on_the_cpu():
    assert sgd_options(torch.device("cuda")) == {"fused": True}
    assert sgd_options(torch.device("cuda", 1)) == {"fused": True}
    assert sgd_options(torch.device("cpu")) == {"fused": None}
    params = [nn.Parameter(torch.ones(3))]
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}
    on_cpu = torch.optim.SGD(params, **kw, **sgd_options(torch.device("cpu")))
    assert on_cpu.param_groups == torch.optim.SGD(params, **kw).param_groups  # CPU unchanged


def test_sgd_options_fall_back_on_a_torch_without_fused_sgd(monkeypatch):
    class OldSGD:
        def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0,
                     nesterov=False):
            pass

    monkeypatch.setattr(torch.optim, "SGD", OldSGD)
    assert sgd_options(torch.device("cuda")) == {}


def test_resume_keeps_this_devices_sgd_kernel_and_the_saved_momentum():
    params = [nn.Parameter(torch.ones(3))]
    saved = torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)  # as a CUDA run saves
    params[0].grad = torch.full((3,), 2.0)
    saved.step()
    cpu = torch.device("cpu")
    resumed = torch.optim.SGD(params, lr=0.1, momentum=0.9, **sgd_options(cpu))
    load_optimizer_state(resumed, saved.state_dict(), cpu)
    assert resumed.param_groups[0]["fused"] is None  # not the saving run's fused kernel
    assert torch.equal(resumed.state[params[0]]["momentum_buffer"], torch.full((3,), 2.0))


# ---- train.cuda_graphs ---------------------------------------------------------------------


def test_cuda_graphs_are_refused_off_cuda_before_any_data_or_run_directory(tmp_path, config,
                                                                           capsys):
    args = tiny_overrides(tmp_path / "never-read.zip", tmp_path / "runs") + [
        "train.cuda_graphs=true"]
    assert main(["train", "--config", str(config), *sets(args)]) == 2
    one_line_error(capsys, "train.cuda_graphs needs a CUDA device (this run's is cpu)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("graphs,compiled,mode", [(True, False, "reduce-overhead"),
                                                  (True, True, "reduce-overhead"),
                                                  (False, True, None), (False, False, "eager")])
def test_the_step_model_is_compiled_in_the_mode_the_config_asks(monkeypatch, graphs,
                                                                compiled, mode):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or "compiled")
    cfg = load_config(None, [f"train.cuda_graphs={str(graphs).lower()}",
                             f"train.compile={str(compiled).lower()}"])
    model = nn.Linear(2, 2)
    step_model = step_model_for(model, cfg.train, torch.device("cuda"))  # nothing moves
    if mode == "eager":
        assert step_model is model and calls == []
    else:
        assert step_model == "compiled" and calls == [{"mode": mode} if mode else {}]
    if graphs:
        with pytest.raises(OtltError, match="needs a CUDA device"):
            step_model_for(model, cfg.train, torch.device("cpu"))


def test_a_graphed_step_begins_a_new_graph_iteration_every_step(monkeypatch):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    for graphs in (False, True):
        step = SGDStep(model, create_loss("ce", [2, 1, 1]), optimizer, None, None,
                       channels_last=False, graphs=graphs)
        for _ in range(3):
            loss_sum, correct, n = step(TrainBatch(x, y))
            assert n == 4 and torch.isfinite(loss_sum)
    assert len(marks) == 3


def test_a_step_that_torch_runs_without_cuda_graphs_is_counted_and_warned(capsys):
    """The CPU stands in for a capture that fails on a GPU: reduce-overhead mode on CPU
    tensors falls back to plain compiled code, as a mutated input or an uncapturable op does
    on CUDA; the record must say so instead of letting a run believe it was graphed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])

    def graphed_step(compiled):
        return SGDStep(compiled, create_loss("ce", [2, 1, 1]), optimizer, None, None,
                       channels_last=False, graphs=True)

    eager = SGDStep(model, create_loss("ce", [2, 1, 1]), optimizer, None, None,
                    channels_last=False)
    graphed = graphed_step(torch.compile(model, mode="reduce-overhead"))
    assert graphed.end_epoch()["cuda_graph_skips"] == 0  # nothing compiled yet
    for _ in range(2):
        graphed(TrainBatch(x, y))
    counts = graphed.end_epoch()
    assert counts["cuda_graph_skips"] >= 1 and set(counts) == {"cuda_graph_skips",
                                                               "cuda_graph_partitions"}
    assert eager.end_epoch() == {}
    assert capsys.readouterr().err.count("warning: train.cuda_graphs: torch.compile fell") == 1
    graphed(TrainBatch(x, y))
    assert graphed.end_epoch()["cuda_graph_skips"] >= counts["cuda_graph_skips"]
    assert "warning" not in capsys.readouterr().err  # said once
    # Counted from the step's construction: a new step starts from 0 whatever came before.
    assert graphed_step(torch.compile(model, mode="reduce-overhead")).end_epoch() == {
        "cuda_graph_skips": 0, "cuda_graph_partitions": 0}


def test_cpu_identity_names_the_model_and_bf16_instructions_a_model_name_hides(monkeypatch):
    from otlt.engine import provenance
    from otlt.engine.provenance import cpu_identity, cpu_name, describe_cpu, environment

    def processor(vendor, family, model, flags):
        # "model name" before "model": a key matched by prefix would read the name as model.
        return (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\n"
                f"model name\t: Intel(R) Xeon(R) Processor\nmodel\t\t: {model}\n"
                f"flags\t\t: {flags}\n\n")

    intel = processor("GenuineIntel", 6, 167, "fpu avx512f amx_bf16 avx512_bf16 amx_tile")
    # The first processor only; flags in BF16_FLAGS order.
    assert cpu_identity(intel + processor("AuthenticAMD", 25, 17, "avx512_bf16")) == {
        "vendor": "GenuineIntel", "family": 6, "model": 167,
        "bf16": ["avx512_bf16", "amx_bf16"]}
    assert cpu_identity(processor("AuthenticAMD", 23, 49, "avx2"))["bf16"] == []
    no_flags = cpu_identity("vendor_id : AuthenticAMD\ncpu family : 25\nmodel : 17\n")
    assert no_flags["bf16"] is None  # unknown, not "none"
    assert cpu_identity("processor\t: 0\nCPU implementer\t: 0x41\n") is None  # arm64
    assert cpu_identity("") is None
    assert describe_cpu({**cpu_identity(intel), "capability": "AVX512"}) == (
        "GenuineIntel family 6 model 167, bf16: avx512_bf16 amx_bf16, kernels AVX512")
    assert describe_cpu(no_flags) == "AuthenticAMD family 25 model 17, bf16: unknown"
    assert describe_cpu({"capability": "AVX2"}) == "kernels AVX2"  # an arm or macOS host
    assert describe_cpu(None) == "not recorded"
    # This machine's record: the identity where cpuinfo has one, the kernel set always.
    record = environment(torch.device("cpu"))
    assert record["cpu"] == {**(cpu_identity() or {}),
                             "capability": torch.backends.cpu.get_cpu_capability()}
    monkeypatch.setattr(provenance, "_read_cpuinfo", lambda: intel)
    assert cpu_name() == "Intel(R) Xeon(R) Processor"
    assert environment(torch.device("cpu"))["cpu"]["model"] == 167
    monkeypatch.setattr(provenance, "_read_cpuinfo", lambda: "")  # no /proc/cpuinfo
    assert cpu_name()  # what platform says, never empty
    assert set(environment(torch.device("cpu"))["cpu"]) == {"capability"}


def test_code_version_names_the_checkout_otlt_is_imported_from(monkeypatch):
    import subprocess

    from otlt.engine import provenance

    version = provenance.code_version()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0 and version["git_commit"] is not None:  # a checkout, as in CI
        assert version["git_commit"] == head.stdout.strip()
        assert isinstance(version["git_dirty"], bool)

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert provenance.code_version()["git_commit"] is None  # no git: recorded as unknown
