"""Multi-process training with real processes: torchrun, gloo on the CPU, tiny data."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import free_port, sets, tiny_overrides
from otlt.cli import main
from otlt.engine import distributed
from otlt.engine.checkpoint import load_checkpoint
from otlt.errors import OtltError

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TIMEOUT = int(os.environ.get("OTLT_TEST_TIMEOUT", "300"))
OTMIX = ["mix.name=otmix", "mix.prob=1.0", "mix.skip_first=0", "mix.skip_last=0",
         "mix.params={mu: 0.0}", "optim.batch_size=30", "data.imbalance_ratio=7"]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OTLT_CACHE": str(tmp_path / "cache"),
            "PYTHONUNBUFFERED": "1"}


def torchrun(tmp_path: Path, args: list[str], nproc: int = 2,
             extra: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *(extra or ["--standalone"]),
           f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=TIMEOUT)


def cli_args(config: Path, overrides: list[str]) -> list[str]:
    return ["-m", "otlt.cli", "train", "--config", str(config),
            *sets(overrides)]


def test_global_batches_are_disjoint_padded_and_cover_the_epoch():
    order = torch.randperm(71, generator=torch.Generator().manual_seed(0))
    batches = distributed.global_batches(order, 30, world=2)
    assert [len(b) for b in batches] == [30, 30, 12]
    assert set(torch.cat(batches).tolist()) == set(range(71))
    assert torch.cat(batches).tolist()[:71] == order.tolist()  # padding only at the end
    assert [len(b) for b in distributed.global_batches(order, 30, world=1)] == [30, 30, 11]
    padded = distributed.global_batches(order[:3], 30, world=4)[0]
    assert len(padded) == 4 and padded.tolist() == [*order[:3].tolist(), order[0].item()]


def test_local_rank_selects_the_cuda_device(monkeypatch):
    chosen, groups = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    options = []

    def init_process_group(backend, **kwargs):
        groups.append(backend)
        options.append(kwargs)

    monkeypatch.setattr(distributed.dist, "init_process_group", init_process_group)
    monkeypatch.setattr(distributed, "is_distributed", lambda: False)
    at_exit = []
    monkeypatch.setattr(distributed.atexit, "register", at_exit.append)
    device = distributed.setup_process(torch.device("cuda"), timeout=42)
    assert device == torch.device("cuda", 1) and chosen == [device] and groups == ["nccl"]
    # NCCL bound to this process's GPU, and a dead peer fails the others after `timeout` s
    assert options[0]["timeout"].total_seconds() == 42
    if "device_id" in inspect.signature(distributed.dist.init_process_group).parameters:
        assert options[0]["device_id"] == device  # torch >= 2.3 binds NCCL to the GPU
    assert distributed.setup_process(torch.device("cpu")) == torch.device("cpu")
    assert groups == ["nccl", "gloo"] and "device_id" not in options[1]
    # a group joined here is left at exit even when the caller never tears it down
    assert at_exit == [distributed.teardown_process] * 2
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.setup_process(torch.device("cpu")) == torch.device("cpu")
    assert len(at_exit) == 2  # nothing joined, nothing to leave


def test_the_cli_leaves_the_process_group_it_joined(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group",
                        lambda: calls.append("destroy"))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    assert main(["presets"]) == 0  # finished: the ranks meet, then leave
    assert calls == ["barrier", "destroy"]
    # an error leaves it too, without the barrier the other ranks may never reach
    assert main(["train", "--config", "/nonexistent.yaml"]) == 2
    assert calls == ["barrier", "destroy", "destroy"]


def test_stage2_refuses_torchrun_before_writing(tiny_zip, tmp_path, config, monkeypatch,
                                                capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = tiny_overrides(tiny_zip, tmp_path / "runs") + ["data.meta_per_class=3",
                                                          f"reweight.stage1={tmp_path}"]
    assert main(["train", "--config", str(config),
                 *sets(args)]) == 2
    assert "runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_two_processes_train_odd_shards_with_global_mixing(tiny_zip, tmp_path, config):
    """An odd image count and a batch whose last step would be unequal: no hang, one
    eval.json, global mix_pairs, sharded evaluation equal to a 1-process otlt eval."""
    out = tmp_path / "runs"
    result = torchrun(tmp_path, cli_args(config, tiny_overrides(tiny_zip, out, epochs=2)
                                         + OTMIX))
    assert result.returncode == 0, result.stderr[-3000:]
    run = out / "tiny"
    n = sum(json.loads((run / "splits.json").read_text())["counts"]["train"])
    assert n % 2 == 1 and n % 30 % 2 == 1  # unequal last step without padding
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    padded = n + 1
    for r in records:  # every row of every global step mixed once, counted over both ranks
        assert sum(map(sum, r["mix_pairs"])) == padded
    assert result.stdout.count("otlt: done in") == 1  # rank 0 alone prints
    assert not list(run.glob(".write_test*"))
    in_run = json.loads((run / "eval.json").read_text())
    assert sum(map(sum, in_run["confusion_matrix"])) == 80
    assert main(["eval", str(run)]) == 0  # one process, the whole test split
    alone = json.loads((run / "eval_last_running.json").read_text())
    assert alone["confusion_matrix"] == in_run["confusion_matrix"]


def test_step_counts_that_would_differ_do_not_hang(tiny_zip, tmp_path, config):
    """171 images, 17 rows per rank: sharding the epoch order as ``order[rank::2]`` gives
    86 and 85 images, 6 and 5 steps, and the code before the fix hung (rank 0 in DDP's
    all-reduce, rank 1 in the epoch totals; measured: killed after 60 s). Global batches
    of 34 sliced per rank give both ranks 6 equal steps."""
    overrides = tiny_overrides(tiny_zip, tmp_path / "runs", epochs=1) + [
        "data.imbalance_ratio=7", "optim.batch_size=34"]
    result = torchrun(tmp_path, cli_args(config, overrides))
    assert result.returncode == 0, result.stderr[-3000:]
    n = sum(json.loads((tmp_path / "runs" / "tiny" / "splits.json").read_text())
            ["counts"]["train"])
    assert n == 171 and -(-((n + 1) // 2) // 17) != -(-(n // 2) // 17)  # 6 != 5 per rank


# A user's own script: it never calls teardown_process, so the atexit handler that
# setup_process registers is what leaves the gloo group (without it this process aborted
# at exit now and then, SIGABRT, as CI saw).
DRIVER = textwrap.dedent("""
    import sys, torch
    from otlt.config import load_config
    from otlt.engine.distributed import rank
    from otlt.engine.factory import create_trainer
    cfg = load_config(sys.argv[1], sys.argv[3:])
    trainer = create_trainer(cfg)
    trainer.fit()
    torch.save({"model": trainer.model.state_dict(),
                "val": trainer.evaluation.confusion_on("val")}, f"{sys.argv[2]}/rank{rank()}.pt")
""")


def test_every_rank_holds_the_same_model_and_confusion(tiny_zip, tmp_path, config):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    overrides = tiny_overrides(tiny_zip, tmp_path / "runs", epochs=2) + OTMIX
    result = torchrun(tmp_path, [str(driver), str(config), str(tmp_path), *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key  # BN buffers included
    assert torch.equal(a["val"], b["val"]) and int(a["val"].sum()) == 50


def test_resume_under_torchrun_is_exact(tiny_zip, tmp_path, config):
    base = tiny_overrides(tiny_zip, tmp_path / "runs", epochs=3) + OTMIX
    full = torchrun(tmp_path, cli_args(config, base + ["name=full"]))
    assert full.returncode == 0, full.stderr[-3000:]
    part = torchrun(tmp_path, [*cli_args(config, base + ["name=part"]), "--stop-after", "1"])
    assert part.returncode == 0, part.stderr[-3000:]
    from otlt.config import load_config
    from otlt.engine.factory import create_trainer

    def one_process_resume():
        return create_trainer(load_config(tmp_path / "runs" / "part" / "config.yaml"),
                              run_dir=tmp_path / "runs" / "part", resume=True)

    with pytest.raises(OtltError, match="trained by 2 process"):  # one process cannot resume
        one_process_resume()
    again = torchrun(tmp_path, ["-m", "otlt.cli", "train", "--resume",
                                str(tmp_path / "runs" / "part")])
    assert again.returncode == 0, again.stderr[-3000:]
    a = load_checkpoint(tmp_path / "runs" / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "runs" / "part" / "last.pt")
    assert a["world_size"] == b["world_size"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    finished = json.loads((tmp_path / "runs" / "part" / "eval.json").read_text())
    assert one_process_resume().fit() == finished  # shown by any world size, not recomputed


def test_sync_bn_recalibration_with_feature_passes_issues_equal_collectives(
        tiny_zip, tmp_path, config):
    """SyncBatchNorm + OTmix's official feature pass (train-mode BN: collectives) + the
    ``train`` recalibration and the probe: every rank draws the same coins and mixer
    switches, so the ranks issue the same collectives (per-rank draws made gloo abort with
    a collective mismatch; NCCL would hang)."""
    overrides = tiny_overrides(tiny_zip, tmp_path / "runs", epochs=2) + OTMIX + [
        "train.sync_bn=true", "mix.params={mu: 0.0, feature_mode: official}", "mix.prob=0.5",
        "eval.bn_stats=train", "eval.bn_probe_every=1", "eval.bn_batches=6"]
    result = torchrun(tmp_path, cli_args(config, overrides))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(x) for x in
               (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert set(records[-1]["bn_probe"]) == {"running", "train", "clean", "balanced"}


def test_errors_are_printed_once(tiny_zip, tmp_path, config):
    args = tiny_overrides(tiny_zip, tmp_path / "runs", epochs=1) + ["optim.batch_size=31"]
    result = torchrun(tmp_path, cli_args(config, args))
    assert result.returncode != 0
    assert result.stderr.count("otlt: error:") == 1, result.stderr[-2000:]
    assert "must split evenly over the 2 processes" in result.stderr
    assert not (tmp_path / "runs" / "tiny").exists()  # refused before the run directory


def two_nodes(tmp_path: Path, args: list[str], cwds: list[Path]) -> list[tuple[str, str]]:
    """Two launchers with the c10d rendezvous, as on two machines, node k in ``cwds[k]``.
    Node 0 hosts the store (``is_host``): both match 127.0.0.1, and which one bound the port
    first was a race."""
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
         "--rdzv-id=otlt-test", f"--rdzv-conf=is_host={int(k == 0)}", *args],
        env=_env(tmp_path), cwd=cwds[k], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for k in (0, 1)]
    outs = [p.communicate(timeout=TIMEOUT) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [o[1][-2000:] for o in outs]
    return outs


def test_two_nodes_without_a_shared_file_system(tiny_zip, tmp_path, config):
    """Each node runs in its own folder with a relative ``out_dir``, so node 1 never sees
    node 0's run directory (as on two machines without a shared file system): rank 0 alone
    writes, and shares what the others read (``last.pt`` on resume, the validation-selected
    weights at the end). Resume reads ``config.yaml`` on every node (README)."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for folder in nodes:
        folder.mkdir()
    overrides = [o for o in tiny_overrides(tiny_zip, tmp_path, epochs=2)
                 if not o.startswith("out_dir=")] + OTMIX + ["out_dir=runs"]
    two_nodes(tmp_path, [*cli_args(config, overrides), "--stop-after", "1"], nodes)
    run = nodes[0] / "runs" / "tiny"
    assert (run / "last.pt").is_file() and not (nodes[1] / "runs").exists()
    (nodes[1] / "runs" / "tiny").mkdir(parents=True)
    (nodes[1] / "runs" / "tiny" / "config.yaml").write_text((run / "config.yaml").read_text())
    outs = two_nodes(tmp_path, ["-m", "otlt.cli", "train", "--resume", "runs/tiny"], nodes)
    assert "validation-selected epoch" in outs[0][0]
    result = json.loads((run / "eval.json").read_text())
    assert result["epoch"] == 1 and "selected" in result
    assert sorted(p.name for p in (nodes[1] / "runs" / "tiny").iterdir()) == ["config.yaml"]


def _global_bn_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from otlt.engine.syncbn import GlobalBatchNorm2d
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(8, 3, 4, 5, generator=gen, dtype=torch.float64) * 3 + 1
        g = torch.randn(8, 3, 4, 5, generator=gen, dtype=torch.float64)
        bn = GlobalBatchNorm2d(3, dtype=torch.float64)
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
            bn.bias.copy_(torch.tensor([0.1, 0.0, 0.3]))
        mine = slice(rank * 5, 8) if rank else slice(0, 5)  # unequal shards: 5 and 3 rows
        xr = x[mine].clone().requires_grad_(True)
        y = bn(xr)
        (y * g[mine]).sum().backward()
        torch.save({"y": y.detach(), "dx": xr.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
                    "mean": bn.running_mean, "var": bn.running_var}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_global_batchnorm_equals_batchnorm_on_the_whole_batch(tmp_path):
    """train.sync_bn on the CPU: two gloo ranks holding 5 and 3 rows give the output, input
    gradient, summed parameter gradients and running statistics of one BatchNorm2d on all 8."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "gbn")
    mp.spawn(_global_bn_rank, args=(2, free_port(), out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 3, 4, 5, generator=gen, dtype=torch.float64) * 3 + 1).requires_grad_()
    g = torch.randn(8, 3, 4, 5, generator=gen, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
        bn.bias.copy_(torch.tensor([0.1, 0.0, 0.3]))
    y = bn(x)
    (y * g).sum().backward()
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y.detach(), **close)
    torch.testing.assert_close(torch.cat([r0["dx"], r1["dx"]]), x.grad, **close)
    torch.testing.assert_close(r0["dw"] + r1["dw"], bn.weight.grad, **close)
    torch.testing.assert_close(r0["db"] + r1["db"], bn.bias.grad, **close)
    for r in (r0, r1):
        torch.testing.assert_close(r["mean"], bn.running_mean, **close)
        torch.testing.assert_close(r["var"], bn.running_var, **close)


def test_two_processes_equal_one_with_the_same_global_batch(tiny_zip, tmp_path, config):
    """ERM with train.sync_bn and train.float64: 2 processes x 16 rows follow the 1-process
    run with batch 32 to 1e-9 after 2 epochs at lr 0.1. Crops,
    flips and the epoch order are drawn for the global batch, so augmentation stays on;
    BatchNorm statistics cover the global batch and DDP averages the per-rank mean
    gradients. (In float32 the runs part at ~1e-6 per step and lr 0.1 on 80 images
    amplifies it: float64 is what makes the comparison exact.)"""
    base = tiny_overrides(tiny_zip, tmp_path / "runs", epochs=2) + [
        "train.sync_bn=true", "train.float64=true", "eval.bn_probe_every=0",
        "eval.bn_stats=clean"]
    one = subprocess.run([sys.executable, *cli_args(config, base + ["name=one"])],
                         env=_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(tmp_path, cli_args(config, base + ["name=two"]))
    assert two.returncode == 0, two.stderr[-3000:]
    runs = tmp_path / "runs"
    n = sum(json.loads((runs / "one" / "splits.json").read_text())["counts"]["train"])
    assert n % 32 % 2 == 0  # no padding: the 1-process run sees the same rows
    a = load_checkpoint(runs / "one" / "last.pt")
    b = load_checkpoint(runs / "two" / "last.pt")
    assert (a["world_size"], b["world_size"]) == (1, 2)
    worst = 0.0
    for key, value in a["model"].items():
        if value.is_floating_point():
            worst = max(worst, float((value - b["model"][key]).abs().max()))
        else:
            assert torch.equal(value, b["model"][key]), key
    assert worst < 1e-9, worst
    # Recalibration draws the global batches alike on every rank: the same statistics.
    ea, eb = (json.loads((runs / r / "eval.json").read_text()) for r in ("one", "two"))
    assert ea["confusion_matrix"] == eb["confusion_matrix"]


def test_sigterm_to_torchrun_stops_every_rank_resumably(tiny_zip, tmp_path, config):
    """A scheduler preempts a torchrun job with SIGTERM: the agent forwards it to the ranks,
    which stop as on Ctrl-C (rank 0 alone says so, once), and the run resumes under torchrun
    from the last finished epoch with every epoch logged once."""
    import signal
    import time

    out = tmp_path / "runs"
    run = out / "tiny"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *cli_args(config, tiny_overrides(tiny_zip, out, epochs=200))]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (run / "last.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    # the ranks stopped by themselves, not by the agent's SIGKILL 30 s after its SIGTERM
    assert time.monotonic() - sent < 25, stderr[-3000:]
    assert proc.returncode == 1, (proc.returncode, stderr[-3000:])  # torchrun: its own exit code
    assert stderr.count("otlt: terminated (SIGTERM)") == 1, stderr[-3000:]
    assert f"'torchrun ... -m otlt.cli train --resume {run}' goes on" in stderr, stderr[-3000:]
    assert "otlt: done in" not in stdout and not (run / "eval.json").exists()
    done = load_checkpoint(run / "last.pt")["epoch"]
    result = torchrun(tmp_path, ["-m", "otlt.cli", "train", "--resume", str(run),
                                 "--stop-after", str(done + 2)])
    assert result.returncode == 0, result.stderr[-3000:]
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(done + 2))
