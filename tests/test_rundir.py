"""Run directories that never lose work (issue 13): one owner per directory, no silent mixing of runs, a
checkpoint on SIGTERM/SIGINT with an exact resume, time-based checkpoints, an explicit --data obeyed, and every
numeric flag checked."""
import json
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from resnets import cli
from resnets.config import recipe
from resnets.train import load_checkpoint, read_log, train
from resnets.train.rundir import RunDirError, RunLock

REPO = Path(__file__).resolve().parents[1]


def tiny(data, out, **kw):
    base = dict(model="resnet20", model_kwargs={"depth": 8}, data=str(data), out=str(out), steps=20, batch_size=32,
                milestones=(10, 15), eval_every=10, log_every=5, checkpoint_every=10, progress=False, threads=1,
                warmup_lr=None)
    base.update(kw)
    return recipe("cifar-paper", **base)


def final_weights(out: Path, steps: int):
    return load_checkpoint(out / "checkpoints" / f"step-{steps:08d}", with_state=False).weights


def log_rows(out: Path):
    return [{k: v for k, v in r.items() if k not in ("img_per_s", "elapsed_s")} for r in read_log(out / "log.jsonl")]


def assert_same_run(a: Path, b: Path, steps: int):
    wa, wb = final_weights(a, steps), final_weights(b, steps)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert log_rows(a) == log_rows(b)


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


# -- one owner -------------------------------------------------------------------------------------------------

def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from resnets.train.rundir import RunLock\n"
                               "with RunLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
                               str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=rf"in use by pid {holder.pid} on host {socket.gethostname()}"):
            with RunLock(tmp_path / "run"):
                pass
        holder.kill()            # SIGKILL: the kernel drops the flock, no stale lock is left
        holder.wait()
        with RunLock(tmp_path / "run"):
            pass
    finally:
        holder.kill()


def test_two_concurrent_runs_on_one_directory(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "resnet20", "--depth", "8", "--data", str(tiny_cifar), "--out", str(out), "--steps",
            "80", "--batch-size", "32", "--eval-every", "40", "--log-every", "10", "--checkpoint-every", "40",
            "--threads", "1", "--no-progress", "--seed", "3"]
    first = subprocess.Popen([sys.executable, "-m", "resnets.cli", *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "log.jsonl").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.02)
        before = {n: (out / n).read_bytes() for n in ("config.json",)}
        # the second run in this process: another process than the first, which is what the lock is about
        capsys.readouterr()
        assert cli.main([*args[:-1], "7"]) == 1
        err = capsys.readouterr().err
        assert f"in use by pid {first.pid}" in err and "Traceback" not in err, err
        assert {n: (out / n).read_bytes() for n in before} == before     # the second wrote nothing
        # the same run alone, here while the first goes on (one thread each, on the two cores)
        train(tiny(tiny_cifar, tmp_path / "alone", steps=80, eval_every=40, log_every=10, checkpoint_every=40,
                   seed=3, milestones=(40, 60)))
        assert first.wait(timeout=180) == 0, first.stderr.read()
    finally:
        first.kill()
    # the first run is intact: the same as the same run alone
    assert_same_run(out, tmp_path / "alone", 80)


# -- no silent mixing ------------------------------------------------------------------------------------------

def test_fresh_run_into_a_run_directory_is_refused_and_overwrite_moves_it_aside(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny(tiny_cifar, out))
    before = snapshot(out)
    with pytest.raises(RunDirError, match=r"already holds a run .*--resume auto.*--overwrite"):
        train(tiny(tiny_cifar, out, seed=5))
    assert snapshot(out) == before
    assert cli.main(["train", "--model", "resnet20", "--depth", "8", "--data", str(tiny_cifar), "--out", str(out),
                     "--steps", "10", "--no-progress"]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert snapshot(out) == before
    res = train(tiny(tiny_cifar, out, seed=5, overwrite=True))
    assert res.step == 20
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before        # the old run, whole, beside the new one
    assert json.loads((out / "config.json").read_text())["seed"] == 5
    assert json.loads((out / "config.json").read_text())["overwrite"] is False


def test_resume_with_another_runs_config_names_the_differences(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    train(tiny(tiny_cifar, out, steps=10))
    with pytest.raises(RunDirError, match=r"batch_size: 32 in the run, 16 now; seed: 0 in the run, 4 now"):
        train(tiny(tiny_cifar, out, steps=20, seed=4, batch_size=16, resume="auto"))
    res = train(tiny(tiny_cifar, out, steps=20, eval_every=5, log_every=2, resume="auto"))   # cadence may change
    assert res.step == 20


# -- graceful stop -----------------------------------------------------------------------------------------------

STOP_ARGS = ["--model", "resnet20", "--depth", "8", "--steps", "60", "--batch-size", "32", "--milestones", "30,45",
             "--eval-every", "20", "--log-every", "7", "--checkpoint-every", "20", "--keep-last", "10", "--threads",
             "1", "--no-progress", "--no-warmup"]


@pytest.fixture(scope="module")
def straight_run(tiny_cifar, tmp_path_factory):
    straight = tmp_path_factory.mktemp("straight") / "run"
    assert cli.main(["train", *STOP_ARGS, "--data", str(tiny_cifar), "--out", str(straight)]) == 0
    return straight


@pytest.mark.parametrize("sig,code,moments", [(signal.SIGTERM, 143, 3), (signal.SIGINT, 130, 2)])
def test_signal_checkpoints_and_resume_is_bit_identical(tiny_cifar, straight_run, tmp_path, sig, code, moments):
    """Each of `moments` runs gets the signal at a random moment after its first log line; each stops with a
    checkpoint and the exit code, and resumed with --config OUT/config.json --resume auto ends bit-identical to the
    straight run. The runs are separate processes started together (their interpreters start in parallel on
    the two cores; one after another they cost a torch import each), so they stop under each other's load."""
    straight = straight_run
    rng = random.Random(sig)
    runs = []
    for k in range(moments):
        out = tmp_path / f"stopped{k}"
        runs.append({"out": out, "p": subprocess.Popen([sys.executable, "-m", "resnets.cli", "train", *STOP_ARGS,
                                                         "--data", str(tiny_cifar), "--out", str(out)],
                                                        stderr=subprocess.PIPE, text=True)})
    try:
        deadline = time.time() + 120
        while any("exited" not in r for r in runs):
            now = time.perf_counter()
            for r in runs:
                if "exited" in r:
                    continue
                if r["p"].poll() is not None:
                    r["exited"] = now
                elif "at" not in r:                  # a random moment after the first log line
                    if (r["out"] / "log.jsonl").exists():
                        r["at"] = now + rng.uniform(0.0, 0.6)
                    assert time.time() < deadline
                elif "sent" not in r and now >= r["at"]:
                    r["p"].send_signal(sig)
                    r["sent"] = now
                else:
                    assert time.time() < deadline + 60
            time.sleep(0.005)
    finally:
        for r in runs:
            if r["p"].poll() is None:
                r["p"].kill()
    stats = []
    for r in runs:
        p, out = r["p"], r["out"]
        err = p.communicate(timeout=60)[1]
        if p.returncode == 0:               # it finished before the signal: nothing to resume
            continue
        stats.append(r["exited"] - r["sent"])
        assert p.returncode == code, err
        assert "Resume with: resnets train --config" in err and "Traceback" not in err
        stopped_at = int(err.split("after step ")[1].split(",")[0])
        print(f"{signal.Signals(sig).name}: stopped after step {stopped_at} in {stats[-1]:.2f} s")
        assert (out / "checkpoints" / f"step-{stopped_at:08d}").is_dir()
        assert cli.main(["train", "--config", str(out / "config.json"), "--resume", "auto", "--no-progress"]) == 0
        assert_same_run(straight, out, 60)
    assert stats and max(stats) < 30


def test_second_signal_stops_at_once(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "resnets.cli", "train", *STOP_ARGS, "--steps", "100000", "--data",
                          str(tiny_cifar), "--out", str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists():
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=60)
    assert p.returncode in (130, -signal.SIGINT)


def test_time_based_checkpoints(tiny_cifar, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import resnets.train.loop as loop
    clock = {"t": 0.0}

    def tick():                 # every reading of the loop's clock advances it by one second
        clock["t"] += 1.0
        return clock["t"]
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=tick))
    train(tiny(tiny_cifar, tmp_path / "run", steps=40, checkpoint_every=0, checkpoint_minutes=0.25, keep_last=100,
               eval_every=40))
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run/checkpoints").glob("step-*"))
    # checkpoint_every=0 writes no step checkpoint of its own, so each of these is time-based
    assert len(steps) >= 2 and steps[-1] < 40, steps
    # a new best at every evaluation (checkpoints/best, which --resume does not start from) does not put them off
    errors = iter(range(100, 0, -1))
    monkeypatch.setattr(loop, "evaluate_model", lambda *a, **k: {"error": float(next(errors)), "n": 1})
    train(tiny(tiny_cifar, tmp_path / "best", steps=40, checkpoint_every=10**6, checkpoint_minutes=0.25,
               keep_last=100, eval_every=1))
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "best/checkpoints").glob("step-*"))
    assert len(steps) >= 2 and steps[0] < 40 and (tmp_path / "best/checkpoints/best").is_dir(), steps


# -- data and flags ----------------------------------------------------------------------------------------------

def test_explicit_data_path_is_obeyed(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(out), "--steps", "2",
                     "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "does not exist" in err and "never replaced" in err
    assert not (out / "config.json").exists() and not (out / "checkpoints").exists()


BAD = [("--steps", "0"), ("--steps", "-5"), ("--steps", "ten"), ("--steps", "10000000000"), ("--epochs", "0"),
       ("--epochs", "-1"), ("--epochs", "nan"), ("--batch-size", "0"), ("--batch-size", "-1"),
       ("--batch-size", "100000000"), ("--lr", "0"), ("--lr", "-0.1"), ("--lr", "inf"), ("--lr", "1e9"),
       ("--momentum", "-0.5"), ("--momentum", "1"), ("--weight-decay", "-1"), ("--weight-decay", "5"),
       ("--warmup-lr", "0"), ("--warmup-lr", "-1"), ("--val-split", "-1"), ("--val-split", "1000000000"),
       ("--seed", "-1"), ("--seed", "x"), ("--eval-every", "0"), ("--eval-every", "-3"), ("--eval-subset", "0"),
       ("--log-every", "0"), ("--checkpoint-every", "-1"), ("--keep-last", "-1"), ("--checkpoint-minutes", "-1"),
       ("--threads", "0"), ("--threads", "100000"), ("--workers", "-1"), ("--label-smoothing", "1"),
       ("--label-smoothing", "-0.1"), ("--lr-warmup", "1.5"), ("--milestones", "a,b"), ("--milestones", "-5"),
       ("--depth", "7"), ("--depth", "-1"), ("--crop", "0"), ("--resize-min", "0"), ("--lighting", "-1"),
       ("--device", "gpu")]


@pytest.mark.parametrize("flag,value", BAD)
def test_bad_numeric_flag_is_a_clear_error(flag, value, tiny_cifar, tmp_path, capsys):
    out = tmp_path / "run"
    try:
        code = cli.main(["train", "--data", str(tiny_cifar), "--out", str(out), "--no-progress", flag, value])
    except SystemExit as e:       # argparse: not a number at all
        code = e.code
    err = capsys.readouterr().err
    assert code in (1, 2), (code, err)
    assert "Traceback" not in err and err.strip()
    assert not (out / "config.json").exists()


def test_overwrite_in_the_current_folder_moves_only_the_run_beside_it(tmp_path, monkeypatch):
    """--out . with --overwrite: the run's files go to a sibling named after the folder; the user's stay."""
    from resnets.train.rundir import check_fresh_start
    here = tmp_path / "work"
    (here / "checkpoints" / "step-00000010").mkdir(parents=True)
    (here / "config.json").write_text("{}")
    (here / "log.jsonl").write_text("")
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    said = check_fresh_start(Path("."), overwrite=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("work.old-")]
    assert len(aside) == 1 and str(aside[0]) in said
    assert sorted(p.name for p in aside[0].iterdir()) == ["checkpoints", "config.json", "log.jsonl"]
    assert sorted(p.name for p in here.iterdir()) == ["notes.txt"]
