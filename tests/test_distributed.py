"""Data-parallel training under torchrun on the CPU (gloo): 2 ranks x B/2 == 1 process x B, rank-0-only output,
exact resume under DDP, and the pieces (batch split, sampler, SyncBN on the CPU) on their own."""
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnets.config import recipe
from resnets.train import load_checkpoint, read_log, train
from resnets.train.distributed import DistContext, local_batch_size
from resnets.train.sources import GlobalBatchSampler

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N`` on the CPU, one thread per rank (gloo)."""
    for attempt in range(3):
        r = _torchrun_once(args, nproc, timeout)
        # free_port() lets the port go before torchrun binds it: another process can take it in between, and
        # then nothing has run yet, so trying another port is safe
        if r.returncode == 0 or "address already in use" not in (r.stdout + r.stderr).lower():
            break
    assert r.returncode == 0, f"torchrun failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def _torchrun_once(args: list[str], nproc: int, timeout: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), *args]
    # A stuck collective fails in 120 s, well before the timeout here; a hang past it prints every rank's stack.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "RESNETS_DIST_TIMEOUT_S": "120", "PYTHONFAULTHANDLER": "1"}
    # Its own session, so that a hung collective is killed with every rank: subprocess.run's timeout kills only
    # the agent, and the ranks it leaves behind slow the rest of the suite.
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGABRT)       # faulthandler: each process prints where it is stuck
        try:
            out, err = p.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
        pytest.fail(f"torchrun still running after {timeout} s, killed with its ranks:\n{out[-3000:]}\n{err[-6000:]}")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


# The same training flags for one process and for two ranks: a 8-layer CIFAR ResNet, global batch 32.
COMMON = dict(model="resnet20", model_kwargs={"depth": 8}, batch_size=32, lr=0.1, milestones=(3,), warmup_lr=None,
              eval_every=2, log_every=1, progress=False, threads=1)


def cli_args(data, out, steps, checkpoint_every, *extra):
    return ["-m", "resnets.cli", "train", "--model", "resnet20", "--depth", "8", "--data", str(data),
            "--steps", str(steps), "--batch-size", "32", "--lr", "0.1", "--milestones", "3", "--no-warmup",
            "--eval-every", "2", "--log-every", "1", "--checkpoint-every", str(checkpoint_every), "--keep-last", "4",
            "--out", str(out), "--no-progress", "--device", "cpu", *extra]


def max_diff(a: dict, b: dict) -> float:
    """Largest difference of any tensor, relative to the tensor's largest magnitude when that exceeds 1 (BN
    running variances of 0..255-unit inputs are in the thousands)."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() / max(1.0, a[k].double().abs().max().item())
               for k in a if a[k].is_floating_point())


def weights(path):
    return load_checkpoint(path, with_state=False).weights


def test_global_batch_must_divide_across_ranks():
    assert local_batch_size(256, DistContext(rank=1, world_size=8)) == 32
    with pytest.raises(ValueError, match="does not divide evenly across 2 processes"):
        local_batch_size(33, DistContext(rank=0, world_size=2))


def test_sampler_ranks_split_each_global_batch_and_resume_mid_epoch():
    data = list(range(23))                       # 23 // 6 = 3 global batches per epoch, 5 samples dropped
    one = GlobalBatchSampler(data, 6, 1, 0, seed=5)
    two = [GlobalBatchSampler(data, 6, 2, r, seed=5) for r in range(2)]
    for epoch in (0, 1):
        for s in [one, *two]:
            s.set_epoch(epoch)
        whole = list(one)
        halves = [list(s) for s in two]
        assert len(whole) == len(one) == 18 and all(len(h) == len(s) == 9 for h, s in zip(halves, two))
        for k in range(3):                       # global batch k = rank 0's slice + rank 1's slice
            assert whole[6 * k:6 * k + 6] == halves[0][3 * k:3 * k + 3] + halves[1][3 * k:3 * k + 3]
        assert {e for e, _ in whole} == {epoch} and len({i for _, i in whole}) == 18
    one.set_epoch(0)
    first = list(one)
    one.set_epoch(1)
    assert list(one) != first                    # a new order each epoch
    one.set_epoch(0)
    one.start_batch = 2                          # a run resumed at step 2 of epoch 0 skips 2 batches unread
    assert list(one) == first[12:] and len(one) == 6


def test_two_ranks_equal_one_process_rank0_writes_and_resume_is_exact(tiny_cifar, tmp_path):
    # unbroken 2-rank run, checkpoint after every step
    r = torchrun(cli_args(tiny_cifar, tmp_path / "ddp", 4, 1, "--sync-bn"))
    # only rank 0 reports, logs and checkpoints
    assert r.stdout.count("resnet20: 4 steps") == 1, r.stdout
    log = read_log(tmp_path / "ddp/log.jsonl")
    assert [(x["step"], x["split"]) for x in log] == [(1, "train"), (2, "train"), (2, "test"), (3, "train"),
                                                     (4, "train"), (4, "test")]
    assert all(x["n"] == 100 for x in log if x["split"] == "test")  # each rank evaluated half; counts summed
    assert sorted(p.name for p in (tmp_path / "ddp/checkpoints").iterdir()) == \
        ["best", "step-00000001", "step-00000002", "step-00000003", "step-00000004"]
    summary = json.loads((tmp_path / "ddp/summary.json").read_text())
    assert summary["world_size"] == 2
    assert load_checkpoint(tmp_path / "ddp/checkpoints/step-00000004").meta["world_size"] == 2

    # one process, same global batch of 32 (plain BatchNorm over all 32 = SyncBN over 2 x 16)
    one = recipe("cifar-paper", **COMMON, data=str(tiny_cifar), out=str(tmp_path / "one"), steps=4,
                 checkpoint_every=1, keep_last=4, device="cpu")
    train(one)
    # After one step the weights agree to float32 rounding: the same SGD step. (Without --sync-bn they already
    # differ by ~5e-3 here.) Training amplifies rounding differences step by step (~1e-4 after 4 steps at
    # lr 0.1); in float64 the same comparison agrees to 1e-15 (tests below).
    d1 = max_diff(weights(tmp_path / "one/checkpoints/step-00000001"), weights(tmp_path / "ddp/checkpoints/step-00000001"))
    d4 = max_diff(weights(tmp_path / "one/checkpoints/step-00000004"), weights(tmp_path / "ddp/checkpoints/step-00000004"))
    assert d1 < 5e-6, d1
    assert d4 < 2e-3, d4
    l_one = [x["loss"] for x in read_log(tmp_path / "one/log.jsonl") if x["split"] == "train"]
    l_ddp = [x["loss"] for x in log if x["split"] == "train"]
    assert l_one == pytest.approx(l_ddp, rel=1e-4)   # the log shows the global batch's loss

    # the unbroken run's directory cut back to step 2 (checkpoints 3, 4, best and the summary removed; its log
    # lines past step 2 left for the resume to drop), resumed under DDP to 4: bit-identical to the unbroken run,
    # the log written again from step 3. One launch: until issue 14 a 2-step run was launched and then extended
    # to 4 steps, a third torchrun start (extending a finished run: tests/test_rundir.py, resume tests).
    shutil.copytree(tmp_path / "ddp", tmp_path / "resumed")
    for name in ("step-00000003", "step-00000004", "best"):
        shutil.rmtree(tmp_path / "resumed/checkpoints" / name)
    (tmp_path / "resumed/summary.json").unlink()
    torchrun(cli_args(tiny_cifar, tmp_path / "resumed", 4, 1, "--sync-bn", "--resume", "auto"))
    a, b = weights(tmp_path / "ddp/checkpoints/step-00000004"), weights(tmp_path / "resumed/checkpoints/step-00000004")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in x.items() if k not in ("img_per_s", "elapsed_s")} for x in log]
    assert strip == [{k: v for k, v in x.items() if k not in ("img_per_s", "elapsed_s")}
                     for x in read_log(tmp_path / "resumed/log.jsonl")]
    assert json.loads((tmp_path / "resumed/summary.json").read_text())["world_size"] == 2


_F64_SCRIPT = r"""
import torch, torch.nn.functional as F
from resnets.models import create_model
from resnets.train import distributed as ddp
torch.set_default_dtype(torch.float64)
ctx, _ = ddp.setup("cpu")
assert ctx.world_size == 2 and ctx.backend == "gloo"
torch.manual_seed(0)
ref = create_model("resnet20", depth=8)
model = ddp.convert_sync_batchnorm(create_model("resnet20", depth=8), torch.device("cpu"))
model.load_state_dict(ref.state_dict())
wrapped = ddp.wrap_ddp(model, ctx, torch.device("cpu"))
opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for m in (ref, model)]
g = torch.Generator().manual_seed(1)
worst = 0.0
for step in range(5):
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    lo = 16 * ctx.rank
    for m, opt, xs, ys in ((ref, opts[0], x, y), (wrapped, opts[1], x[lo:lo + 16], y[lo:lo + 16])):
        opt.zero_grad()
        F.cross_entropy(m(xs), ys).backward()
        opt.step()
    worst = max(worst, max((a - b).abs().max().item() for a, b in zip(ref.state_dict().values(),
                                                                    model.state_dict().values())
                           if a.is_floating_point()))
if ctx.rank == 0:
    print(f"WORST {worst:.3e}")
ddp.teardown(ctx)
"""


def test_ddp_with_cpu_syncbn_is_the_one_process_step_in_float64(tmp_path):
    """torch's nn.SyncBatchNorm refuses CPU tensors; GlooSyncBatchNorm + DDP on 2 ranks x 16 gives the SGD step of
    one process on 32 samples, to float64 rounding, for 5 steps at lr 0.1 (weights and BN running statistics)."""
    script = tmp_path / "f64.py"
    script.write_text(_F64_SCRIPT)
    r = torchrun([str(script)])
    worst = float(r.stdout.split("WORST")[1].split()[0])
    assert worst < 1e-12, worst


def test_restart_scoped_store_only_on_one_node_with_the_agent_store(monkeypatch):
    """Under torchrun on one node the process group's keys go under resnets/restart-N, so a restarted round never
    reads the keys of the round that was killed; elsewhere torch's default store is kept."""
    import datetime
    import torch.distributed as dist
    from resnets.train.distributed import _restart_scoped_store

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    timeout = datetime.timedelta(seconds=10)
    for k in ["TORCHELASTIC_USE_AGENT_STORE", "GROUP_WORLD_SIZE", "TORCHELASTIC_MAX_RESTARTS", "RANK"]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    assert _restart_scoped_store(timeout) is None                       # not torchrun's agent store

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    for restart in ("0", "2"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
        _restart_scoped_store(timeout).set("rank_0", f"address of round {restart}")
    assert server.get("resnets/restart-0/rank_0") == b"address of round 0"
    assert server.get("resnets/restart-2/rank_0") == b"address of round 2"

    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")                          # several nodes: counts can differ
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.warns(RuntimeWarning, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        assert _restart_scoped_store(timeout) is None


class _Rank(DistContext):
    """One rank of two, in this process: rank 0's broadcast and every rank's gathered failures are given."""

    def __init__(self, rank: int, from_rank0=None, others_failure: str | None = None):
        super().__init__(rank=rank, world_size=2)
        self.from_rank0, self.others_failure = from_rank0, others_failure

    def broadcast_object(self, obj):
        return obj if self.is_main else self.from_rank0


def test_resume_failing_on_one_rank_stops_every_rank_with_the_reason(tiny_cifar, tmp_path, monkeypatch):
    """A checkpoint that one rank cannot find or load must stop all ranks, each saying why; before, the rank
    that raised left the others waiting at the next collective until the timeout."""
    import torch.distributed as dist

    from resnets.train.rundir import load_resume

    def gather(box, mine, **kw):     # rank r's own message at r, the other rank's as the test says
        for r in range(len(box)):
            box[r] = mine if r == ctx.rank else ctx.others_failure
    monkeypatch.setattr(dist, "all_gather_object", gather)

    run = tmp_path / "run"
    train(recipe("cifar-paper", model="resnet20", model_kwargs={"depth": 8}, data=str(tiny_cifar), out=str(run),
                 steps=2, batch_size=8, eval_every=2, checkpoint_every=2, progress=False, threads=1, device="cpu",
                 warmup_lr=None, val_split=0, milestones=()))
    cfg = recipe("cifar-paper", model="resnet20", model_kwargs={"depth": 8}, data=str(tiny_cifar), out=str(run),
                 steps=4, batch_size=8, progress=False, threads=1, device="cpu", warmup_lr=None, val_split=0,
                 milestones=())
    good = str(load_checkpoint(run / "checkpoints" / "step-00000002").path)

    # rank 0 finds no such checkpoint: rank 1 raises rank 0's reason, without looking for itself
    ctx = _Rank(1, from_rank0=(None, "--resume /nowhere: no such checkpoint"))
    with pytest.raises(ValueError, match="/nowhere: no such checkpoint"):
        load_resume(dataclasses.replace(cfg, resume=good), ctx)
    # rank 0 chose a checkpoint that rank 1 cannot read (--out not shared): rank 1 raises its own error...
    ctx = _Rank(1, from_rank0=(str(tmp_path / "only-on-rank-0"), None))
    with pytest.raises(Exception, match="only-on-rank-0"):
        load_resume(dataclasses.replace(cfg, resume="auto"), ctx)
    # ...and rank 0, which loaded it, stops too, naming rank 1 and its reason
    ctx = _Rank(0, others_failure="CheckpointError: /x/only-on-rank-0: not found")
    with pytest.raises(RuntimeError, match="failed on rank 1 .*only-on-rank-0: not found"):
        load_resume(dataclasses.replace(cfg, resume=good), ctx)
    ctx = _Rank(0)                                   # every rank loads it: rank 0 goes on from it
    assert load_resume(dataclasses.replace(cfg, resume="auto"), ctx).state["step"] == 2
