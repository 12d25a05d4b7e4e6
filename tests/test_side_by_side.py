"""Runs trained side by side in one process end bit-identical to the same runs trained alone (issue 15), also
after a kill -9 of the whole process and a resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from resnets.config import recipe
from resnets.data import load_cifar
from resnets.train import load_checkpoint, read_log, train
from resnets.train.side_by_side import SideBySideError, train_side_by_side

REPO = Path(__file__).resolve().parents[1]


def cfgs(data, root: Path, steps: int = 24, **kw):
    common = dict(data=str(data), steps=steps, batch_size=32, milestones=(steps // 2,), eval_every=8, log_every=4,
                  checkpoint_every=8, keep_last=5, progress=False, threads=1, warmup_lr=None)
    common.update(kw)
    return [
        recipe("cifar-paper", model="resnet20", model_kwargs={"depth": 8}, seed=0, out=str(root / "r8"), **common),
        recipe("cifar-paper", model="plain20", model_kwargs={"depth": 8}, seed=1, out=str(root / "p8"), **common),
        # a third run with a different length and its own validation split: runs need not be alike
        recipe("cifar-paper", model="resnet20", model_kwargs={"depth": 14}, seed=2, out=str(root / "r14"),
               **{**common, "steps": steps - 8, "val_split": 64}),
    ]


def assert_same_run(a: Path, b: Path) -> None:
    la = [{k: v for k, v in r.items() if k not in ("img_per_s", "elapsed_s")} for r in read_log(a / "log.jsonl")]
    lb = [{k: v for k, v in r.items() if k not in ("img_per_s", "elapsed_s")} for r in read_log(b / "log.jsonl")]
    assert la == lb and la, f"{a.name}: logs differ"
    ca = sorted(p.name for p in (a / "checkpoints").iterdir())
    assert ca == sorted(p.name for p in (b / "checkpoints").iterdir())
    for name in ca:
        wa, wb = load_checkpoint(a / "checkpoints" / name), load_checkpoint(b / "checkpoints" / name)
        assert wa.weights.keys() == wb.weights.keys()
        assert all(torch.equal(wa.weights[k], wb.weights[k]) for k in wa.weights), f"{a.name}/{name}: weights"
        assert torch.equal(wa.state["rng"]["torch"], wb.state["rng"]["torch"])
        for k in ("step", "best", "warming_up", "recent_wrong"):
            assert wa.state[k] == wb.state[k]


STEPS = 32


@pytest.fixture(scope="module")
def alone(tiny_cifar, tmp_path_factory):
    """The three runs trained alone, one after another: the reference of both tests below."""
    return [train(c) for c in cfgs(tiny_cifar, tmp_path_factory.mktemp("alone"), steps=STEPS)]


def test_side_by_side_is_bit_identical_to_alone(tiny_cifar, alone, tmp_path):
    data = load_cifar("cifar10", root=str(tiny_cifar), progress=False)
    seen: dict[str, int] = {}

    def on_log(cfg, record):
        seen[Path(cfg.out).name] = seen.get(Path(cfg.out).name, 0) + 1

    together = train_side_by_side(cfgs(tiny_cifar, tmp_path / "together", steps=STEPS), data=data, on_log=on_log)
    assert [r.step for r in together] == [32, 32, 24]
    for a, t in zip(alone, together):
        assert a.final == {**t.final, "elapsed_s": a.final["elapsed_s"]}
        assert a.best == t.best and a.train_error == t.train_error and a.train_loss == t.train_loss
        assert_same_run(Path(a.out), Path(t.out))
    assert seen == {"r8": 12, "p8": 12, "r14": 9}    # train and eval records, reported per run


_KILL = r"""
import json, pathlib, sys, time
sys.path.insert(0, sys.argv[3])
from test_side_by_side import cfgs
import resnets.train.side_by_side as sbs
root, hold = pathlib.Path(sys.argv[2]), int(sys.argv[5])

def logged(name):
    try:
        return max(r["step"] for r in map(json.loads, (root / name / "log.jsonl").read_text().splitlines())
                   if r["split"] == "train")
    except (FileNotFoundError, ValueError):
        return 0

real_advance = sbs._advance
def advance(run, is_cuda):      # once every run has logged step `hold`, wait here for the SIGKILL
    out = real_advance(run, is_cuda)
    if all(logged(n) >= hold for n in ("r8", "p8", "r14")):
        (root / "marker").write_text("now")
        time.sleep(300)
    return out
sbs._advance = advance
sbs.train_side_by_side([c.__class__(**{**c.to_dict(), "milestones": tuple(c.milestones), "resume": "auto"})
                        for c in cfgs(sys.argv[1], root, steps=int(sys.argv[4]))], stack=sys.argv[6] == "stack")
"""


def train_and_kill_9(tiny_cifar, root: Path, stack: bool = False) -> None:
    """Train the three runs side by side (``stack``: stacked) in a child process under ``root`` and kill -9 it
    once every run has written its checkpoint at step 16 and logged step 20. The child holds still at that point
    until the kill (it used to be killed by polling while it ran on, which needed 80-step runs so that a loaded
    machine could not finish first)."""
    root.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _KILL, str(tiny_cifar), str(root), str(REPO / "tests"),
                             str(STEPS), "20", "stack" if stack else "alone"])
    try:
        deadline = time.time() + 240
        while not (root / "marker").exists():
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    (root / "marker").unlink()
    for n in ("r8", "p8", "r14"):
        assert sorted(p.name for p in (root / n / "checkpoints").glob("step-*"))[-1] == "step-00000016", n
        assert not (root / n / "summary.json").exists(), "killed too late to test a resume"


def test_kill_9_then_resume_side_by_side_is_bit_identical(tiny_cifar, alone, tmp_path):
    """kill -9 of the process that trains three runs side by side, once every run has written its checkpoint
    at step 16 and logged step 20 (so each loses the steps since its checkpoint and has log lines past it), then
    one resume of all three: each ends bit-identical to the same run trained alone."""
    root = tmp_path / "together"
    train_and_kill_9(tiny_cifar, root)
    resumed = train_side_by_side([c.__class__(**{**c.to_dict(), "milestones": tuple(c.milestones), "resume": "auto"})
                                  for c in cfgs(tiny_cifar, root, steps=STEPS)])
    for a, t in zip(alone, resumed):
        assert a.step == t.step
        assert_same_run(Path(a.out), Path(t.out))


def test_a_failing_run_does_not_stop_the_others(tiny_cifar, tmp_path):
    good, bad, _ = cfgs(tiny_cifar, tmp_path, steps=8)
    bad = bad.__class__(**{**bad.to_dict(), "milestones": tuple(bad.milestones), "model": "no-such-net"})
    with pytest.raises(SideBySideError, match="no-such-net") as e:
        train_side_by_side([good, bad])
    assert list(e.value.errors) == [bad.out]
    assert json.loads((Path(good.out) / "summary.json").read_text())["steps"] == 8


def test_side_by_side_refuses_shared_output_dirs(tiny_cifar, tmp_path):
    a, b, _ = cfgs(tiny_cifar, tmp_path)
    with pytest.raises(ValueError, match="output directory each"):
        train_side_by_side([a, b.__class__(**{**b.to_dict(), "milestones": tuple(b.milestones), "out": a.out})])


@pytest.mark.parametrize("stack", [False, True])
def test_one_runs_evaluation_is_left_out_of_every_runs_img_per_s(tiny_cifar, tmp_path, monkeypatch, stack):
    """Runs side by side share one clock of pauses: while one run evaluates, the others do not train, so their
    logged img/s leaves that time out too (on 2026-11-28 the ten stacked runs' logs dipped 17% at every
    evaluation, for the other nine's evaluations). Each evaluation here takes 1000 s by a clock that the test
    moves on."""
    from types import SimpleNamespace
    import resnets.train.log as log_mod
    import resnets.train.loop as loop
    offset = [0.0]
    clock = SimpleNamespace(**{**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")},
                               "perf_counter": lambda: time.perf_counter() + offset[0]})
    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(log_mod, "time", clock)
    real = loop.evaluate_model

    def slow(*a, **k):
        offset[0] += 1000.0
        return real(*a, **k)
    monkeypatch.setattr(loop, "evaluate_model", slow)
    data = load_cifar("cifar10", root=str(tiny_cifar), progress=False)
    two = cfgs(tiny_cifar, tmp_path, steps=16, checkpoint_every=0)[:2]
    train_side_by_side(two, data=data, stack=stack)
    for c in two:
        rows = [r for r in read_log(Path(c.out) / "log.jsonl") if r["split"] == "train"]
        # the lines at steps 12 and 16 follow the evaluations of step 8 (a line at 8 is written before them)
        assert [r["step"] for r in rows] == [4, 8, 12, 16]
        assert all(4 * 32 / r["img_per_s"] < 100 for r in rows), (c.out, rows)   # > 1000 s if one counted
