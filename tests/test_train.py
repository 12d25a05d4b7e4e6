"""The training engine: exact resume, crash safety, bad input, NaN handling, logs, the CLI, the static-step logic."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import resnets
from resnets.config import TrainConfig, recipe
from resnets.data import DeviceLoader
from resnets.train import CheckpointError, NonFiniteLossError, load_checkpoint, model_from_checkpoint, read_log, train
from resnets.train.rundir import RunDirError
from resnets.train.schedule import learning_rate, resolve_warmup

from conftest import twin_nets


def tiny_cfg(data, out, **kw) -> TrainConfig:
    base = dict(model="resnet20", model_kwargs={"depth": 8}, data=str(data), out=str(out), steps=20, batch_size=32,
                milestones=(10, 15), eval_every=10, log_every=5, checkpoint_every=10, progress=False, threads=1,
                warmup_lr=None)
    base.update(kw)
    return recipe("cifar-paper", **base)


def weights(path):
    return load_checkpoint(path, with_state=False).weights


def test_recipe_is_section_4_2():
    c = recipe("cifar-paper")
    assert (c.lr, c.momentum, c.weight_decay, c.batch_size, c.steps, c.milestones) == (0.1, 0.9, 1e-4, 128, 64000, (32000, 48000))
    short = recipe("cifar-paper", steps=400)
    assert short.milestones == (200, 300)
    assert learning_rate(c, 31999, False) == 0.1
    assert learning_rate(c, 32000, False) == pytest.approx(0.01)
    assert learning_rate(c, 48000, False) == pytest.approx(0.001)
    assert learning_rate(dataclasses.replace(c, warmup_lr=0.01), 10, True) == 0.01
    assert resolve_warmup(c, resnets.create_model("resnet110")) == 0.01
    assert resolve_warmup(c, resnets.create_model("resnet56")) is None
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe("cifar-pape")


def test_exact_resume_is_bit_identical(tiny_cifar, tmp_path):
    straight = train(tiny_cfg(tiny_cifar, tmp_path / "a", steps=60, milestones=(30, 45), eval_every=30,
                              checkpoint_every=30, log_every=5))
    half = train(tiny_cfg(tiny_cifar, tmp_path / "b", steps=30, milestones=(30, 45), eval_every=30,
                          checkpoint_every=30, log_every=5))
    assert half.step == 30
    before = load_checkpoint(tmp_path / "b/checkpoints/step-00000030").state["elapsed_s"]
    assert 0 < before <= half.seconds
    resumed = train(tiny_cfg(tiny_cifar, tmp_path / "b", steps=60, milestones=(30, 45), eval_every=30,
                             checkpoint_every=30, log_every=5, resume="auto"))
    wa, wb = weights(tmp_path / "a/checkpoints/step-00000060"), weights(tmp_path / "b/checkpoints/step-00000060")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [(r["step"], r["loss"]) for r in read_log(tmp_path / "a/log.jsonl") if r["split"] == "train"]
    lb = [(r["step"], r["loss"]) for r in read_log(tmp_path / "b/log.jsonl") if r["split"] == "train"]
    assert la == lb and len(la) == 12
    assert straight.final["error"] == resumed.final["error"]
    # times go on from the checkpoint's: the log's clock never runs backwards and the summary counts both launches
    times = [r["elapsed_s"] for r in read_log(tmp_path / "b/log.jsonl") if "elapsed_s" in r]
    assert times == sorted(times) and resumed.seconds > before


_KILL_SCRIPT = r"""
import sys, time, pathlib
import resnets.train.checkpoint as ck
from resnets.config import recipe
from resnets.train import train
marker = pathlib.Path(sys.argv[3])
real_save = ck.torch.save
calls = {"n": 0}
def slow_save(obj, f, *a, **k):
    calls["n"] += 1
    real_save(obj, f, *a, **k)
    if calls["n"] == 2:          # the second checkpoint: state written, directory not yet renamed into place
        marker.write_text("now")
        time.sleep(120)
ck.torch.save = slow_save
train(recipe("cifar-paper", model="resnet20", model_kwargs={"depth": 8}, data=sys.argv[1], out=sys.argv[2],
             steps=40, batch_size=32, milestones=(30,), eval_every=1000, checkpoint_every=10, log_every=5,
             progress=False, threads=1, warmup_lr=None))
"""


def test_sigkill_mid_checkpoint_leaves_previous_loadable(tiny_cifar, tmp_path):
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tiny_cifar), str(tmp_path / "run"), str(marker)])
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "training exited before reaching the second checkpoint"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpts = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert "step-00000010" in ckpts and "step-00000020" not in ckpts
    c = load_checkpoint(tmp_path / "run/checkpoints/step-00000010")
    assert c.step == 10 and c.state["step"] == 10
    model_from_checkpoint(c)
    # and the run resumes from it, ignoring the half-written directory
    res = train(tiny_cfg(tiny_cifar, tmp_path / "run", steps=30, milestones=(30,), resume="auto", eval_every=1000))
    assert res.step == 30
    assert not list((tmp_path / "run/checkpoints").glob(".*tmp*"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_cifar, tmp_path, monkeypatch):
    real_batch = DeviceLoader.batch

    def poisoned(self, step):
        x, y = real_batch(self, step)
        if self.train and step >= 13:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        return x, y

    monkeypatch.setattr(DeviceLoader, "batch", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"became nan between steps 10 and 15.*step-00000010"):
        train(tiny_cfg(tiny_cifar, tmp_path / "run", steps=20))
    ckpts = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert ckpts == ["best", "step-00000010"]
    w = weights(tmp_path / "run/checkpoints/step-00000010")
    assert all(torch.isfinite(v.float()).all() for v in w.values())
    # a checkpoint due between two log lines is not written from a model that has gone NaN
    with pytest.raises(NonFiniteLossError, match=r"became nan between steps 10 and 14.*step-00000012"):
        train(tiny_cfg(tiny_cifar, tmp_path / "often", steps=20, log_every=10, checkpoint_every=2, keep_last=0))
    ckpts = sorted(p.name for p in (tmp_path / "often/checkpoints").glob("step-*"))
    assert ckpts[-1] == "step-00000012"
    assert all(torch.isfinite(v.float()).all() for c in ckpts for v in weights(tmp_path / "often/checkpoints" / c).values())


def test_nan_loss_skip_mode(tiny_cifar, tmp_path, monkeypatch):
    real_batch = DeviceLoader.batch

    def poisoned(self, step):
        x, y = real_batch(self, step)
        if self.train and step in (3, 7):
            x = x.clone()
            x[:, 0] = float("inf")
        return x, y

    monkeypatch.setattr(DeviceLoader, "batch", poisoned)
    res = train(tiny_cfg(tiny_cifar, tmp_path / "run", steps=12, on_nan="skip", eval_every=12, checkpoint_every=12))
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["skipped_steps"] == 2
    events = [r for r in read_log(tmp_path / "run/log.jsonl") if r["split"] == "event"]
    assert [e["step"] for e in events] == [4, 8]
    w = weights(tmp_path / "run/checkpoints/step-00000012")
    assert all(torch.isfinite(v.float()).all() for v in w.values())
    assert res.final["error"] < 100


def test_resume_checkpoint_of_another_model_says_which(tiny_cifar, tmp_path):
    train(tiny_cfg(tiny_cifar, tmp_path / "run", steps=10))
    with pytest.raises(CheckpointError, match="checkpoint of resnet20, but this run trains plain20"):
        train(tiny_cfg(tiny_cifar, tmp_path / "run", model="plain20", steps=20, resume="auto"))
    with pytest.raises(CheckpointError, match="do not fit resnet20"):
        model_from_checkpoint(tmp_path / "run/checkpoints/step-00000010", "resnet20", depth=14)


def test_csv_log_tensorboard_and_keep_last(tiny_cifar, tmp_path):
    train(tiny_cfg(tiny_cifar, tmp_path / "run", steps=30, log_format="csv", tensorboard=True, keep_last=2,
                   checkpoint_every=5))
    rows = read_log(tmp_path / "run/log.csv")
    assert [r["step"] for r in rows if r["split"] == "train"] == [5, 10, 15, 20, 25, 30]
    assert any(r["split"] == "test" and 0 <= r["error"] <= 100 for r in rows)
    assert list((tmp_path / "run/tensorboard").iterdir())
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert names == ["best", "step-00000025", "step-00000030"]


def test_warmup_switches_back_to_base_lr(tiny_cifar, tmp_path):
    logs = []
    train(tiny_cfg(tiny_cifar, tmp_path / "run", steps=40, warmup_lr=0.01, warmup_until_error=0.95,
                   milestones=(1000,), log_every=1, eval_every=1000), on_log=logs.append)
    lrs = [r["lr"] for r in logs if r["split"] == "train"]
    event = [r for r in logs if r["split"] == "event"]
    assert len(event) == 1 and "warm-up done" in event[0]["event"]
    k = event[0]["step"]
    assert set(lrs[:k]) == {0.01} and set(lrs[k:]) == {0.1}


def test_warmup_ends_at_the_next_read_of_the_test_and_resumes_mid_read(tiny_cifar, tmp_path):
    """The warm-up test reads the errors every 10 steps (one host sync for ten): the warm-up ends at the first
    multiple of 10 at or after the step where the mean of the last 20 batches fell below the threshold. A run
    stopped between that step and the read, and resumed, ends its warm-up at the same step."""
    kw = dict(warmup_lr=0.01, milestones=(1000,), log_every=1, eval_every=1000, checkpoint_every=1000)
    logs = []
    train(tiny_cfg(tiny_cifar, tmp_path / "probe", steps=40, warmup_until_error=0.001, warmup_max_steps=100, **kw),
          on_log=logs.append)
    errors = [r["error"] / 100 for r in logs if r["split"] == "train"]
    means = {s: sum(errors[s - 20:s]) / 20 for s in range(20, 41)}       # after step s, at lr 0.01 throughout
    # a step not divisible by 10 whose mean is below all before it: a threshold between the two crosses there
    cross = next(s for s in range(21, 40) if s % 10 and means[s] < min(means[t] for t in range(20, s)))
    threshold = (means[cross] + min(means[t] for t in range(20, cross))) / 2
    read = -(-cross // 10) * 10

    def lrs_and_event(out, steps, **more):
        rows = []
        train(tiny_cfg(tiny_cifar, out, steps=steps, warmup_until_error=threshold, warmup_max_steps=100, **kw,
                       **more), on_log=rows.append)
        return rows

    unbroken = lrs_and_event(tmp_path / "unbroken", 40)
    assert [r["step"] for r in unbroken if r["split"] == "event"] == [read]
    lrs = [r["lr"] for r in unbroken if r["split"] == "train"]
    assert set(lrs[:read]) == {0.01} and set(lrs[read:]) == {0.1}
    lrs_and_event(tmp_path / "broken", cross)                      # stops at the crossing, before the read
    st = load_checkpoint(tmp_path / f"broken/checkpoints/step-{cross:08d}").state
    assert st["warming_up"] and st["warmup_met"]           # met, not yet acted on: the checkpoint keeps that
    lrs_and_event(tmp_path / "broken", 40, resume="auto")
    log = read_log(tmp_path / "broken" / "log.jsonl")
    assert [r["step"] for r in log if r["split"] == "event"] == [read]
    assert [r["lr"] for r in log if r["split"] == "train"] == lrs


def test_cli_train_and_evaluate(tiny_cifar, tmp_path, capsys, monkeypatch):
    # in-process: `resnets` is cli.main; the process boundary (exit codes of `python -m resnets.cli`, signals) is
    # tested in tests/test_rundir.py and tests/test_reliability.py
    from resnets.cli import main
    out = tmp_path / "cli"
    assert main(["train", "--model", "plain20", "--depth", "8", "--data", str(tiny_cifar), "--steps", "10",
                 "--batch-size", "32", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    assert "plain20: 10 steps" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(out / "checkpoints/step-00000010"), "--data", str(tiny_cifar),
                 "--no-progress"]) == 0
    assert "on 100 test images: top-1 error" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(out / "checkpoints/step-00000010"), "--data", str(tiny_cifar),
                 "--no-progress", "--per-class"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 11 and all(line.rstrip().endswith("%") for line in lines[1:]), lines
    for ignored in (["--scales", "24,32"], ["--flip"], ["--ten-crop", "--per-class"]):   # refused, not dropped
        assert main(["evaluate", "--checkpoint", str(out / "checkpoints/step-00000010"), "--data", str(tiny_cifar),
                     "--no-progress", *ignored]) == 2
        err = capsys.readouterr().err
        assert "add --multi-scale" in err or "--per-class is for CIFAR" in err, err
    # an explicit --data that holds nothing: an error naming it, never the cache, a download or the npm mirror
    monkeypatch.setenv("RESNETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RESNETS_CIFAR_URL", "http://127.0.0.1:9/cifar.tar.gz")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["train", "--data", str(tmp_path / "nothing"), "--steps", "1", "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and str(tmp_path / "nothing") in err
    assert not (tmp_path / "cache").exists()


def test_static_step_matches_eager_step():
    """The CUDA-graph step logic (static buffers, copies out) without the graph: bit-identical to eager on the CPU."""
    from resnets.train.graphs import StaticStep
    from resnets.train.step import make_eager_step
    from resnets.train.runtime import pick_runtime

    rt = pick_runtime("cpu", "fp32", True)
    a, b = twin_nets()
    oa = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    eager = make_eager_step(a, oa, rt)
    static = StaticStep(b, ob, rt.autocast, (16, 3, 32, 32), rt.device, rt.memory_format, capture=False)
    g = torch.Generator().manual_seed(1)
    for i in range(10):
        x = torch.randn(16, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (16,), generator=g)
        if i == 5:
            for opt in (oa, ob):
                opt.param_groups[0]["lr"] = 0.01
        la, wa, _ = eager(x, y)
        lb, wb, _ = static(x, y)
        assert torch.equal(la, lb) and torch.equal(wa, wb)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_graph_falls_back_on_cpu(tiny_cifar, tmp_path):
    from resnets.train.graphs import graph_applies
    from resnets.train.runtime import pick_runtime

    cfg = tiny_cfg(tiny_cifar, tmp_path)
    assert graph_applies(cfg, pick_runtime("cpu")) == (False, "CUDA graphs need a GPU")
    with pytest.warns(UserWarning, match="CUDA graph requested but not used"):
        train(dataclasses.replace(tiny_cfg(tiny_cifar, tmp_path / "g", steps=2, eval_every=2, checkpoint_every=0),
                                  cuda_graph=True))
    gpu = SimpleNamespace(is_cuda=True)         # the reasons a GPU run still trains eagerly, each one named
    assert graph_applies(cfg, gpu) == (True, "")
    assert graph_applies(cfg, gpu, distributed=True) == (False, "the captured step has no DDP gradient all-reduce")
    assert graph_applies(dataclasses.replace(cfg, label_smoothing=0.1), gpu) == (True, "")
    # the lr is a constant of a captured step: a schedule that moves it every step would capture every step
    fast = recipe("cifar-fast", data=str(tiny_cifar), out=str(tmp_path / "f"))
    assert graph_applies(fast, gpu) == (False, "the one-cycle schedule changes the lr every step, and a captured "
                                               "step holds it fixed")
    assert graph_applies(fast, gpu, lr_in_graph=True) == (True, "")     # the stacked runs' SGD reads a tensor
    # and a new lr of any parameter group (a fine-tune's head and backbone) is a new graph
    from resnets.train.graphs import StaticStep
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    opt = torch.optim.SGD([{"params": net[0].parameters(), "lr": 0.0}, {"params": net[1].parameters(), "lr": 0.1}])
    static = StaticStep(net, opt, None, (4, 2), torch.device("cpu"), torch.contiguous_format, capture=False)
    before = static.lr()
    opt.param_groups[1]["lr"] = 0.05
    assert before == (0.0, 0.1) and static.lr() != before


@pytest.mark.realdata
@pytest.mark.slow
def test_cifar_resnet_learns_real_cifar10_in_150_steps(real_cifar, tmp_path):
    """A CIFAR ResNet learns on the real data: 150 steps of the paper's recipe bring the error on the first 2,000
    test images below 75% (chance is 90%), so the real-data path (loading, pixel-mean normalisation, on-device
    augmentation, the loop, evaluation) trains a network. The net is the 8-layer member of the ResNet-20 family
    (n=1) at batch 64 on one thread: about 16 s on the 2-core CPU, measured 63.75% (ResNet-20 at batch 128, this
    test until issue 14, took 45-78 s for 64.25%). A converged net's exact accuracy is checked by
    tests/test_pretrained.py with the shipped weights."""
    res = train(recipe("cifar-paper", model="resnet20", model_kwargs={"depth": 8}, data=str(real_cifar), steps=150,
                       batch_size=64, threads=1, out=str(tmp_path / "r8"), eval_every=150, eval_subset=2000,
                       checkpoint_every=0, log_every=50, progress=False))
    assert res.final["n"] == 2000
    print(f"ResNet-8, 150 steps at batch 64: test error {res.final['error']:.2f}% (first 2000), train error "
          f"{res.train_error:.2f}%, {res.seconds:.0f} s")
    assert res.final["error"] < 75.0


def test_evaluate_model_per_class_error():
    """``evaluate_model(classes=K)``: each class's top-1 error from the predictions, a class without samples is
    None, and summing over ranks (here two identical shards) leaves the rates unchanged."""
    from resnets.train.evaluate import evaluate_model
    from resnets.train.runtime import pick_runtime

    rt = pick_runtime("cpu", "fp32", False)
    table = torch.nn.Embedding(8, 4)               # input i -> logits of row i: predictions chosen by hand
    with torch.no_grad():
        table.weight.copy_(torch.eye(4)[[0, 1, 1, 2, 0, 0, 2, 2]] * 5)
    model = torch.nn.Sequential(table)
    x = torch.arange(8)
    y = torch.tensor([0, 1, 0, 2, 0, 1, 2, 1])     # predictions 0 1 1 2 0 0 2 2: class 0 1 of 3 wrong, 1 2 of 3
    loader = [(x[:5], y[:5]), (x[5:], y[5:])]
    r = evaluate_model(model, loader, rt, classes=4)
    assert r["per_class_error"] == [100 / 3, 200 / 3, 0.0, None] and r["error"] == 37.5
    assert "per_class_error" not in evaluate_model(model, loader, rt)
    r2 = evaluate_model(model, loader, rt, classes=4, reduce=lambda t: t.mul_(2))
    assert r2["per_class_error"] == r["per_class_error"] and r2["n"] == 16 and r2["error"] == 37.5


def test_no_hflip_reaches_the_cifar_loader(tiny_cifar, tmp_path):
    from resnets.train import distributed as ddp
    from resnets.train.runtime import pick_runtime
    from resnets.train.sources import make_source
    rt = pick_runtime("cpu")
    for hflip in (True, False):
        src = make_source(tiny_cfg(tiny_cifar, tmp_path, hflip=hflip), rt, ddp.DistContext())
        assert src.loader.flip is hflip


def test_resume_keeps_the_resumed_steps_tensorboard_points_and_may_drop_the_warm_up(tiny_cifar, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = dict(steps=2, eval_every=2, checkpoint_every=2, log_every=1, tensorboard=True)
    # stopped inside ResNet-110's warm-up (Sec. 4.2), resumed with it turned off: trains at the recipe's lr
    train(tiny_cfg(tiny_cifar, tmp_path, **run, warmup_lr=0.01, warmup_until_error=0.001, warmup_max_steps=100))
    assert load_checkpoint(tmp_path / "checkpoints/step-00000002").state["warming_up"]
    train(tiny_cfg(tiny_cifar, tmp_path, **{**run, "steps": 4}, warmup_lr=None, resume="auto"))
    assert [r["lr"] for r in read_log(tmp_path / "log.jsonl") if r["split"] == "train"] == [0.01, 0.01, 0.1, 0.1]
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("test/error")] == [2, 4]       # step 2's point survives the resume


def test_resuming_a_finished_run_keeps_its_results(tiny_cifar, tmp_path):
    cfg = tiny_cfg(tiny_cifar, tmp_path, steps=2, eval_every=2, checkpoint_every=2, log_every=1)
    first = train(cfg)
    saved = (tmp_path / "summary.json").read_text()
    again = train(dataclasses.replace(cfg, resume="auto"))             # nothing left to train
    assert (tmp_path / "summary.json").read_text() == saved and again.final == first.final
    (tmp_path / "summary.json").unlink()                                # killed before the summary was written
    third = train(dataclasses.replace(cfg, resume="auto"))
    assert third.final["error"] == first.final["error"] and third.final["step"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["final"]["error"] == first.final["error"]
    # settings that would have shaped its training are refused: nothing would train with them, and its results
    # and config.json would stand under them; how it is run or kept may change
    config = (tmp_path / "config.json").read_text()
    with pytest.raises(RunDirError, match="ended at step 2.*lr: 0.1 in the run, 0.05 now"):
        train(dataclasses.replace(cfg, resume="auto", lr=0.05))
    assert (tmp_path / "config.json").read_text() == config
    assert train(dataclasses.replace(cfg, resume="auto", keep_last=1, workers=3)).final["error"] == first.final["error"]


def test_runtime_on_a_named_gpu_makes_it_current_and_bf16_needs_ampere(monkeypatch):
    """--device cuda:1 makes GPU 1 the current device (a CUDA graph captures on the current one: elsewhere its
    capture is empty); "auto" precision is bf16 only on GPUs that compute in it (compute capability 8.0 on).
    torch.cuda is stood in for, as this machine has no GPU."""
    import torch
    from resnets.train.runtime import pick_runtime
    made_current, capability = [], {"cap": (7, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: capability["cap"])
    rt = pick_runtime("cuda:1")
    assert made_current == [torch.device("cuda", 1)] and rt.dtype is None          # a V100: fp32
    capability["cap"] = (9, 0)
    assert pick_runtime("cuda").dtype == torch.bfloat16 and made_current == [torch.device("cuda", 1)]
    with pytest.raises(ValueError, match="has 2 GPU"):
        pick_runtime("cuda:2")


def test_images_per_second_count_training_time_only_across_pauses_and_resumes(monkeypatch):
    """img_per_s: the images since the last log line over the training time they took. An evaluation or a
    checkpoint inside the window is left out of the time, not the images before it counted over the time after
    it; a resumed window goes on with the time its images took before the stop."""
    from resnets.train import log as log_mod
    from resnets.train.distributed import DistContext
    now = {"t": 0.0}
    monkeypatch.setattr(log_mod, "time", SimpleNamespace(perf_counter=lambda: now["t"]))
    ctx, one = DistContext(), torch.zeros(())
    w = log_mod.LogWindow(torch.device("cpu"))
    w.add(one, one.long(), 100)
    w.add(one, one.long(), 100)
    now["t"] = 10.0                      # an evaluation from 10 s to 15 s
    since = now["t"]
    now["t"] = 15.0
    w.leave_out(since)
    w.add(one, one.long(), 100)
    now["t"] = 20.0
    assert w.totals(ctx, 100)[2] / w.seconds() == 300 / 15
    state = w.state(ctx)                 # a checkpoint at 20 s, resumed at 100 s
    now["t"] = 100.0
    resumed = log_mod.LogWindow(torch.device("cpu"))
    resumed.restore(state, ctx)
    resumed.add(one, one.long(), 100)
    now["t"] = 105.0
    assert resumed.totals(ctx, 100)[2] / resumed.seconds() == 400 / 20
    # skipped steps are the run's, whatever the number of processes it resumes on
    other = log_mod.LogWindow(torch.device("cpu"))
    other.restore({**state, "per_rank": state["per_rank"] * 2, "skipped": 3}, ctx)
    assert other.skipped == 3 and other.seen == 0
    # runs side by side share their pauses: while one evaluates, the other does not train either
    shared = log_mod.Pauses()
    a, b, alone = (log_mod.LogWindow(torch.device("cpu"), p) for p in (shared, shared, None))
    since = now["t"]
    now["t"] += 4.0                      # a's evaluation
    a.leave_out(since)
    now["t"] += 1.0
    assert a.seconds() == b.seconds() == 1.0 and alone.seconds() == 5.0
    b.reset()                            # a line of b's: its next window starts after the pause
    now["t"] += 2.0
    assert b.seconds() == 2.0 and a.seconds() == 3.0


def test_a_torn_last_log_line_does_not_block_the_resume(tiny_cifar, tmp_path):
    """A crash or a full disk while a log line was written leaves it cut short: the resume drops it (the log is
    cut back to the checkpoint anyway); reading such a log otherwise names the file and line."""
    cfg = tiny_cfg(tiny_cifar, tmp_path, steps=4, eval_every=2, checkpoint_every=2, log_every=1, keep_last=2)
    train(cfg)
    log = tmp_path / "log.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 5, "spl')
    with pytest.raises(ValueError, match=r"log.jsonl: line \d+ is not a log record"):
        read_log(log)
    train(dataclasses.replace(cfg, resume=str(tmp_path / "checkpoints" / "step-00000002")))
    assert [r["step"] for r in read_log(log) if r["split"] == "train"] == [1, 2, 3, 4]
    assert not list(tmp_path.glob(".log.jsonl.tmp-*"))


def test_tensorboard_missing_leaves_no_half_made_run(tiny_cifar, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)      # as if the package were not installed
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="needs the tensorboard package"):
        train(tiny_cfg(tiny_cifar, out, steps=2, tensorboard=True))
    assert not (out / "config.json").exists()


def test_a_save_killed_mid_replace_under_a_pid_used_again_does_not_block_saves(tmp_path):
    from resnets.train.checkpoint import save_checkpoint
    model = resnets.create_model("resnet20", depth=8)
    best = save_checkpoint(tmp_path / "best", model, meta={"model": "resnet20"})
    stale = tmp_path / f".best.old-{os.getpid()}"           # what a kill between the two renames leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"old")
    save_checkpoint(best, model, meta={"model": "resnet20"})
    assert load_checkpoint(best).model_name == "resnet20" and not stale.exists()


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tiny_cifar, tmp_path):
    """Resumed from step 2 while steps 4 and 6 exist, the run goes another way (here, another lr): the later
    checkpoints are moved aside, not left for pruning (which keeps the highest steps) to prefer over the new
    line's, nor for --resume auto to go back to."""
    cfg = tiny_cfg(tiny_cifar, tmp_path, steps=6, eval_every=2, checkpoint_every=2, log_every=1, keep_last=3)
    train(cfg)
    ckpts = tmp_path / "checkpoints"
    old6 = weights(ckpts / "step-00000006")
    train(dataclasses.replace(cfg, keep_last=1, lr=0.05, resume=str(ckpts / "step-00000002")))
    (aside,) = ckpts.glob("abandoned-*")
    names = {p.name for p in aside.iterdir()}          # (and "best" when the old line's best was after step 2)
    assert {"step-00000004", "step-00000006"} <= names <= {"step-00000004", "step-00000006", "best"}
    if "best" in names:
        assert load_checkpoint(aside / "best", with_state=False).step > 2
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000006"]
    new6 = weights(ckpts / "step-00000006")
    assert any(not torch.equal(a, b) for a, b in zip(old6.values(), new6.values()))
    assert any("moved to" in str(r.get("event", "")) for r in read_log(tmp_path / "log.jsonl"))


def test_checkpoint_meta_reads_the_header_alone(tmp_path, monkeypatch):
    """Setting later checkpoints aside reads best's step: from the safetensors header, without its tensors."""
    import resnets.train.checkpoint as ck
    from resnets.models import create_model
    path = ck.save_checkpoint(tmp_path / "best", create_model("resnet20", depth=8), meta={"step": 7, "model": "resnet20"})
    full = load_checkpoint(path, with_state=False).meta
    monkeypatch.setattr(ck, "load_file", lambda *a, **k: pytest.fail("tensors were read"))
    assert ck.checkpoint_meta(path) == full and full["step"] == 7
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        ck.checkpoint_meta(tmp_path / "junk.safetensors")


def test_a_checkpoint_of_another_directory_starts_a_run_only_where_none_is(tiny_cifar, tmp_path):
    """--resume OTHER/checkpoints/step-N --out DIR branches run OTHER into DIR: a DIR that holds a run of its own
    is refused (its log and config.json would be cut back and rewritten), an empty one is fine."""
    a = tiny_cfg(tiny_cifar, tmp_path / "a", steps=2, eval_every=2, checkpoint_every=2, log_every=1)
    train(a)
    train(dataclasses.replace(a, out=str(tmp_path / "b"), seed=1))
    log_b = (tmp_path / "b" / "log.jsonl").read_text()
    branch = dataclasses.replace(a, steps=4, resume=str(tmp_path / "a" / "checkpoints" / "step-00000002"))
    with pytest.raises(RunDirError, match="already holds a run"):
        train(dataclasses.replace(branch, out=str(tmp_path / "b")))
    assert (tmp_path / "b" / "log.jsonl").read_text() == log_b
    assert train(dataclasses.replace(branch, out=str(tmp_path / "c"))).step == 4
