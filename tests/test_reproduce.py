"""The experiment runner on a tiny generated data set: results files and figures, numbers equal to the runs' logs."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from resnets.config import recipe
from resnets.experiments.reproduce import Preset, interpret, run_experiment
from resnets.experiments.responses import response_layers
from resnets.models import create_model
from resnets.train import read_log

TINY = Preset("tiny", depths=(8, 14), nets=("plain", "resnet"), seeds=2,
              config=recipe("cifar-paper", steps=12, milestones=(10**9,), batch_size=32, eval_every=6, log_every=4,
                            checkpoint_every=12, keep_last=1, warmup_lr=None, threads=1),
              note="tiny test preset", response_subset=50)


@pytest.fixture(scope="module")
def tiny_experiment(tiny_cifar, tmp_path_factory):
    """The TINY preset run once (8 runs): its results and its directory, for the tests below."""
    out = tmp_path_factory.mktemp("exp") / "exp"
    return out, run_experiment(TINY, out=out, data=str(tiny_cifar), progress=False)


def test_runner_writes_results_and_figures(tiny_cifar, tiny_experiment):
    out, res = tiny_experiment
    for f in ("results.json", "results.md", "fig6.png", "fig7.png", "fig7.json"):
        assert (out / f).stat().st_size > 0, f
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["runs"]) == 2 * 2 * 2
    # every number in the table is the one the run logged
    for run in saved["runs"]:
        rows = read_log(Path(run["dir"]) / "log.jsonl")
        last_train = [r for r in rows if r["split"] == "train"][-1]
        last_test = [r for r in rows if r["split"] == "test"][-1]
        assert run["train_error"] == last_train["error"] and last_train["step"] == 12
        assert run["test_error"] == last_test["error"]
    for row in saved["table"]:
        rs = [r for r in saved["runs"] if r["net"] == row["net"] and r["depth"] == row["depth"]]
        assert row["train_error"] == pytest.approx(sum(r["train_error"] for r in rs) / 2)
        assert row["train_error_std"] is not None
    md = (out / "results.md").read_text()
    row8 = next(l for l in md.splitlines() if l.startswith("| 8 |"))
    plain8 = next(r for r in saved["table"] if r["net"] == "plain" and r["depth"] == 8)
    assert f"{plain8['train_error']:.2f} ± {plain8['train_error_std']:.2f}" in row8
    assert "What the numbers show" in md and saved["interpretation"]
    # a second call reuses the finished runs instead of training again
    again = run_experiment(TINY, out=out, data=str(tiny_cifar), progress=False)
    assert [r["test_error"] for r in again["runs"]] == [r["test_error"] for r in res["runs"]]


def test_interpretation_follows_the_numbers():
    def table(p20, p56, r20, r56):
        return [{"net": n, "depth": d, "train_error": e, "test_error": e + 1} for n, d, e in
                [("plain", 20, p20), ("plain", 56, p56), ("resnet", 20, r20), ("resnet", 56, r56)]]

    base = {"depths": [20, 56], "config": {"steps": 500}, "runs": [{"test_images": 2000}]}
    shows = interpret({**base, "table": table(63.8, 79.5, 52.3, 63.7)})
    assert shows[0].startswith("Degradation shows") and shows[1].startswith("Residual learning fixes it")
    assert "has not yet overtaken" in shows[2]
    absent = interpret({**base, "table": table(70.0, 65.0, 60.0, 64.0)})
    assert "does NOT show" in absent[0] and "only slightly" in absent[1]
    close = interpret({**base, "table": table(63.8, 79.5, 60.6, 59.2)})
    assert "too close to call" in close[2] and "one run" in close[2]
    assert "a mean of 5 runs" in interpret({**base, "seeds": 5, "table": table(63.8, 79.5, 60.6, 59.2)})[2]
    # as long as the paper: training errors near 0 (here 0.2% vs 0.1%), so the ResNets are ordered by test error
    paper = {**base, "config": {"steps": 64000}}
    full = interpret({**paper, "table": [{**r, "test_error": t} for r, t in
                                         zip(table(0.5, 1.0, 0.1, 0.2), (8.6, 9.9, 8.1, 7.0))]})
    assert "The deeper ResNet is better: ResNet-56 7.00% vs ResNet-20 8.10%" in full[2]
    assert "`paper` preset" not in " ".join(full)
    worse = interpret({**paper, "table": table(0.5, 1.0, 0.1, 0.2)})     # test errors 1.1 vs 1.2
    assert "The deeper ResNet is NOT better here" in worse[2]


def test_results_note_says_what_the_call_changed_of_the_preset():
    from resnets.experiments.reproduce import DEMO, _note
    assert _note(DEMO, {"device": "cpu"}) == DEMO.note
    longer = _note(DEMO, {"steps": 1000})
    assert longer.startswith(DEMO.note) and longer.endswith("Changed from the preset here: steps 250 -> 1000.")
    split = _note(DEMO, {"val_split": 5000})
    assert "first 2000 test images" not in split and "full 10k test set once" in split


def test_response_layers_are_the_3x3_bns():
    m = create_model("resnet20")
    layers = response_layers(m)
    assert len(layers) == 18 and layers[0][0] == "layer1.0.bn1" and layers[-1][0] == "layer3.2.bn2"


def test_cli_analyze_responses(tiny_cifar, tiny_experiment, tmp_path, capsys):
    ck = sorted((tiny_experiment[0] / "runs").glob("*8-seed0/checkpoints/step-*"))   # plain-8 and ResNet-8
    assert len(ck) == 2
    from resnets.cli import main                # in-process: a new interpreter would prove nothing more
    args = ["analyze", "responses", "--data", str(tiny_cifar), "--out", str(tmp_path / "f7.png")]
    for c in ck:
        args += ["--checkpoint", str(c)]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "plain-8" in out and "ResNet-8" in out
    data = json.loads((tmp_path / "f7.json").read_text())
    assert len(data) == 2 and all(len(d["std"]) == 6 and min(d["std"]) > 0 for d in data)


def test_cli_analyze_responses_of_shipped_weights(tiny_cifar, tmp_path, capsys):
    """--model NAME[:TAG] analyses the shipped weights (cifar10 by default) beside any --checkpoint; with neither,
    or an unknown tag, a clear error."""
    from resnets.cli import main

    out = tmp_path / "f7.png"
    capsys.readouterr()
    assert main(["analyze", "responses", "--data", str(tiny_cifar), "--subset", "50", "--out", str(out),
                 "--model", "plain20", "--model", "resnet20:cifar10-paper"]) == 0
    printed = capsys.readouterr().out
    assert "plain-20" in printed and "ResNet-20" in printed and "plain20-cifar10-paper" in printed
    data = json.loads(out.with_suffix(".json").read_text())
    assert [d["label"] for d in data] == ["plain-20", "ResNet-20"] and all(len(d["std"]) == 18 for d in data)
    assert main(["analyze", "responses", "--data", str(tiny_cifar)]) == 2
    assert "give --checkpoint PATH or --model NAME[:TAG]" in capsys.readouterr().err
    assert main(["analyze", "responses", "--data", str(tiny_cifar), "--model", "resnet20:imagenet"]) == 2
    assert "no shipped 'imagenet' weights for resnet20" in capsys.readouterr().err


def test_a_run_taken_further_is_not_reused_from_its_earlier_end(tiny_cifar, tmp_path):
    """A run's config.json is rewritten when a longer --steps takes it further, its summary.json and test.json
    only at its end: stopped on the way, the earlier end's numbers must not stand for the longer run. A shorter
    --steps than a run has trained is refused, not answered with the longer run's numbers. A depth given twice
    is one run."""
    from resnets.config import TrainConfig
    from resnets.experiments.reproduce import _finished

    base = replace(TINY, depths=(8,), nets=("resnet",), seeds=1)
    kw = dict(out=tmp_path / "exp", data=str(tiny_cifar), progress=False, responses=False, workers=1)
    first = run_experiment(base, depths=[8, 8], overrides={"steps": 6, "val_split": 64}, **kw)
    assert len(first["runs"]) == 1
    run = tmp_path / "exp" / "runs" / "resnet8-seed0"
    assert json.loads((run / "test.json").read_text())["step"] == 6
    further = {**json.loads((run / "config.json").read_text()), "steps": 12}      # as a launch stopped at 9 leaves it
    (run / "config.json").write_text(json.dumps(further))
    assert _finished(run, TrainConfig.from_dict(further)) is None
    second = run_experiment(base, overrides={"steps": 12, "val_split": 64}, **kw)
    assert second["reused"] == 0 and json.loads((run / "summary.json").read_text())["steps"] == 12
    assert second["runs"][0]["best_val_error"] is not None and "best_test_error" not in second["runs"][0]
    assert "1 run(s) at a time" in second["runtime"]
    # a finished run is reused whatever the checkpoint cadence or the logging extras asked for now
    again = run_experiment(base, overrides={"steps": 12, "val_split": 64, "checkpoint_every": 5, "keep_last": 1,
                                            "tensorboard": True}, **kw)
    assert again["reused"] == 1 and "no run trained in this call" in again["runtime"]
    assert json.loads((run / "test.json").read_text())["step"] == 12
    with pytest.raises(RuntimeError, match="is at step 12, past this run's end"):
        run_experiment(base, overrides={"steps": 6, "val_split": 64}, **kw)


def test_side_by_side_with_val_split_matches_processes_and_meets_test_set_once(tiny_cifar, tmp_path):
    """The GPU path (all runs interleaved in one process) gives the numbers the CPU path (one process per run)
    gives; with --val-split the log holds validation errors and the table the final weights' test error."""
    preset = replace(TINY, depths=(8,), seeds=1)
    kw = dict(data=str(tiny_cifar), progress=False, responses=False, overrides={"val_split": 64})
    a = run_experiment(preset, out=tmp_path / "procs", side_by_side=False, **kw)
    b = run_experiment(preset, out=tmp_path / "sbs", side_by_side=True, **kw)
    for ra, rb in zip(a["runs"], b["runs"]):
        assert (ra["train_error"], ra["val_error"], ra["test_error"]) == \
            (rb["train_error"], rb["val_error"], rb["test_error"])
        rows = read_log(Path(rb["dir"]) / "log.jsonl")
        assert rb["val_error"] == [r for r in rows if r["split"] == "val"][-1]["error"]
        assert not [r for r in rows if r["split"] == "test"]
        test = json.loads((Path(rb["dir"]) / "test.json").read_text())
        assert test["n"] == rb["test_images"] == 100 and test["error"] == rb["test_error"] and test["step"] == 12
    assert "held out for validation" in b["note"]


def test_stacked_experiment_through_the_cli(tiny_cifar, tmp_path, capsys, monkeypatch):
    """`resnets reproduce --stack` (with the tiny preset in place of the demo): the 4 runs of depth 8 (plain and
    ResNet, 2 seeds) train as one stack with their own splits, and the table reports each; the results say so."""
    from resnets.cli import main
    from resnets.experiments import reproduce
    real = reproduce.run_experiment
    monkeypatch.setattr(reproduce, "run_experiment", lambda preset, **kw: real(replace(TINY, depths=(8,)), **kw))
    assert main(["reproduce", "cifar10", "--stack", "--data", str(tiny_cifar), "--out", str(tmp_path / "exp"),
                 "--val-split", "64", "--no-progress"]) == 0
    res = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert "stacked into one network" in res["runtime"]
    assert len(res["runs"]) == 4 and len({r["val_error"] for r in res["runs"]}) > 1
    assert "stacked into one network" in capsys.readouterr().out


def test_reproduce_compile_flag_reaches_every_run(monkeypatch):
    """`resnets reproduce --compile` sets ``compile`` in every run's config (the overrides); without it the
    preset's own setting stands."""
    from resnets.cli import main
    from resnets.experiments import reproduce

    class Seen(Exception):
        pass

    def fake(preset, **kw):
        raise Seen(kw["overrides"])
    monkeypatch.setattr(reproduce, "run_experiment", fake)
    with pytest.raises(Seen) as e:
        main(["reproduce", "cifar10", "--preset", "paper", "--compile", "--stack", "--no-progress"])
    assert e.value.args[0] == {"compile": True}
    with pytest.raises(Seen) as e:
        main(["reproduce", "cifar10", "--no-progress"])
    assert "compile" not in e.value.args[0]


def test_reproduce_workers_checkpoint_on_one_signal_to_the_group(tiny_cifar, tmp_path):
    """`resnets reproduce` on a CPU trains its runs in worker processes. A SIGINT to the whole process group (what
    Ctrl-C and `timeout` send) must stop every run with a checkpoint, and the next `reproduce` goes on from them.
    (It had lost work: a worker's StoppedBySignal could not be unpickled, which broke the pool and killed the
    other worker before its checkpoint.) A kill -9 of `reproduce` itself leaves no worker training on, and each
    run checkpoints."""
    import os
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "resnets.cli", "reproduce", "cifar10", "--depths", "8", "--workers", "2",
           "--data", str(tiny_cifar), "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd + ["--steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env, start_new_session=True)
    logs = [out / "runs" / r / "log.jsonl" for r in ("plain8-seed0", "resnet8-seed0")]
    deadline = time.time() + 180
    while not all(f.exists() and f.stat().st_size > 0 for f in logs):    # both runs are in their training loops
        assert p.poll() is None and time.time() < deadline, p.communicate()[0] if p.poll() is not None else "slow"
        time.sleep(0.5)
    os.killpg(p.pid, signal.SIGINT)
    text = p.communicate(timeout=120)[0]
    assert p.returncode == 130, text
    assert "stopped by SIGINT" in text and "plain8-seed0" in text and "resnet8-seed0" in text, text
    stopped = {}
    for f in logs:
        (ck,) = (f.parent / "checkpoints").glob("step-*")
        stopped[f] = int(ck.name.split("-")[1])
    # The next `reproduce` goes on from those checkpoints; then a kill -9 of `reproduce` itself: each worker sees
    # its parent gone, checkpoints and exits (none trains on).
    p = subprocess.Popen(cmd + ["--steps", "100000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                         start_new_session=True)
    deadline = time.time() + 180
    while not all(max((e["step"] for e in read_log(f) if e["split"] == "train"), default=0) > stopped[f] + 5
                  for f in logs):
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.5)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    while subprocess.run(["pgrep", "-s", str(p.pid)], capture_output=True).returncode == 0:   # the workers
        assert time.time() < deadline + 60, "workers still running after their parent was killed"
        time.sleep(0.5)
    for f in logs:
        (ck,) = (f.parent / "checkpoints").glob("step-*")
        assert int(ck.name.split("-")[1]) > stopped[f] + 5
        train = [e["step"] for e in read_log(f) if e["split"] == "train"]    # one unbroken run, resumed once
        assert train == sorted(set(train)) and train[0] < stopped[f], train


@pytest.mark.parametrize("workers", [2, 1])
def test_reproduce_workers_a_failing_run_does_not_stop_the_other(tiny_cifar, tmp_path, workers):
    """In worker processes (the CPU path), or one run after another, a run that cannot start (its directory is
    held by another process) fails alone: the other run trains to its end, the results of the runs that ended are
    written with the failed run named, and the error names it too."""
    from resnets.train.side_by_side import SideBySideError
    from resnets.train.rundir import RunLock
    out = tmp_path / "exp"
    held = out / "runs" / "plain8-seed0"          # the first run: one after another, the next still trains
    with RunLock(held), pytest.raises(SideBySideError) as e:
        run_experiment(replace(TINY, depths=(8,), seeds=1), out=out, data=str(tiny_cifar), progress=False,
                       workers=workers, responses=False)
    assert list(e.value.errors) == [str(held)] and "in use" in str(e.value)
    assert (out / "runs" / "resnet8-seed0" / "summary.json").exists()
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["runs"]] == ["resnet8-seed0"] and list(res["failed"]) == ["plain8-seed0"]
    md = (out / "results.md").read_text()
    assert "1 run(s) failed" in md and "- plain8-seed0: RunDirError: " in md and "is in use by pid" in md


def test_plot_only_draws_the_curves_logged_so_far(tiny_experiment, tmp_path, capsys):
    """`resnets reproduce --plot-only --out DIR`: Fig. 6 from the runs' logs without training (for an experiment
    stopped or still running); a directory without runs is a clear error."""
    from resnets.cli import main
    out, _ = tiny_experiment
    assert main(["reproduce", "cifar10", "--plot-only", "--out", str(out)]) == 0
    assert (out / "fig6-progress.png").stat().st_size > 0 and "fig6-progress.png" in capsys.readouterr().out
    assert main(["reproduce", "cifar10", "--plot-only", "--out", str(tmp_path / "none")]) == 2
    assert "no CIFAR runs with a log" in capsys.readouterr().err


@pytest.mark.parametrize("seeds", ["0", "-1", "two"])
def test_seeds_must_be_a_positive_count(seeds, capsys):
    from resnets.cli import main
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "cifar10", "--preset", "demo", "--seeds", seeds])
    assert e.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


def test_table6_cell_of_resnet110_names_best_and_mean():
    """Table 6 gives ResNet-110 as "6.43 (6.61±0.16)": best of 5 runs, then their mean; a mean over seeds is
    compared with the second."""
    from resnets.experiments.reproduce import _paper_cell
    assert _paper_cell(110) == "6.43 (best of 5; mean 6.61 ± 0.16)" and _paper_cell(56) == "6.97"


def test_side_by_side_groups_after_a_failed_one_still_train(tiny_cifar, tmp_path):
    """Runs side by side in groups (--workers below the number of runs): a run failing in the first group must
    not keep the later groups from training, nor leave results.md unwritten."""
    from resnets.train.rundir import RunLock
    from resnets.train.side_by_side import SideBySideError
    out = tmp_path / "exp"
    held = out / "runs" / "plain8-seed0"           # first group: plain8-seed0, plain8-seed1; second: the resnets
    with RunLock(held), pytest.raises(SideBySideError) as e:
        run_experiment(replace(TINY, depths=(8,), seeds=2), out=out, data=str(tiny_cifar), progress=False,
                       workers=2, side_by_side=True, responses=False)
    assert list(e.value.errors) == [str(held)]
    res = json.loads((out / "results.json").read_text())
    assert sorted(r["name"] for r in res["runs"]) == ["plain8-seed1", "resnet8-seed0", "resnet8-seed1"]
