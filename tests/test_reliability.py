"""The promises of docs/reliability.md, each proved here: crashes, a full disk, corrupt inputs, bad numbers."""
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from resnets.data import CorruptDataError, load_cifar
from resnets.train import CheckpointError, load_checkpoint, read_log

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def train_cmd(data, out, steps=36, *extra):
    return [sys.executable, "-m", "resnets.cli", "train", "--model", "resnet20", "--depth", "8", "--data", str(data),
            "--steps", str(steps), "--batch-size", "32", "--milestones", "20,30", "--checkpoint-every", "3",
            "--log-every", "1", "--eval-every", "1000", "--keep-last", "2", "--out", str(out), "--resume", "auto",
            "--no-progress", "--threads", "1", "--no-warmup", *extra]


def cli_train(data, out, steps=36, *extra):
    """The same ``resnets train`` in this process (cli.main; its exit code): where the process boundary is not
    what a test is about, a new interpreter per run proves nothing more and costs seconds."""
    from resnets.cli import main
    return main(train_cmd(data, out, steps, *extra)[3:])


def final_weights(out, steps=36):
    return load_checkpoint(Path(out) / f"checkpoints/step-{steps:08d}", with_state=False).weights


def train_losses(out):
    return [(r["step"], r["loss"]) for r in read_log(Path(out) / "log.jsonl") if r["split"] == "train"]


def last_logged_step(out):
    try:
        return max((r["step"] for r in read_log(Path(out) / "log.jsonl") if r["split"] == "train"), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0  # not written yet, or a line being written right now


# A Python that has imported torch and resnets and waits for its job on stdin, then runs `resnets train` (cli.main)
# as `python -m resnets.cli` would. The kill test below starts the next one while the current one trains, so the
# ~2-3 s import of each of its 5 processes overlaps the run before it instead of adding to the test's time.
_WARM = r"""
import json, sys
from resnets.cli import main
import resnets.train.loop
job = json.loads(sys.stdin.readline() or "null")
if job is None:
    sys.exit(0)
exec(job["prelude"])
sys.exit(main(job["argv"]))
"""

# prelude of the first kill: block inside the checkpoint write of step >= LIMIT, before its rename into place
_MID_CHECKPOINT = r"""
import time, pathlib
import resnets.train.checkpoint as ck
marker, limit = pathlib.Path(MARKER), LIMIT
real = ck.torch.save
def slow(obj, f, *a, **k):
    real(obj, f, *a, **k)
    if obj.get("step", 0) >= limit:   # checkpoint being written: not yet renamed into place
        marker.write_text("in checkpoint")
        time.sleep(300)
ck.torch.save = slow
"""


def _warm():
    return subprocess.Popen([sys.executable, "-c", _WARM], env=ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)


def _go(p, argv, prelude=""):
    p.stdin.write(json.dumps({"argv": argv, "prelude": prelude}) + "\n")
    p.stdin.close()
    return p


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tiny_cifar, tmp_path):
    """Promise 1: killed with SIGKILL at random moments (one of them inside a checkpoint write), resumed each
    time, the run ends with the same weights and losses, bit for bit, as one that was never interrupted."""
    procs = [_warm()]                              # imports while the reference trains here
    try:
        ref = tmp_path / "unbroken"
        assert cli_train(tiny_cifar, ref) == 0     # in this process: the same computation, bit for bit
        run = tmp_path / "killed"
        rng = random.Random(1234)
        kills = []
        # one kill inside a checkpoint write, before the directory is renamed into place
        marker = tmp_path / "marker"
        p = _go(procs[-1], train_cmd(tiny_cifar, run)[3:],
                _MID_CHECKPOINT.replace("MARKER", repr(str(marker))).replace("LIMIT", "9"))
        procs.append(_warm())
        deadline = time.time() + 120
        while not marker.exists():
            assert p.poll() is None and time.time() < deadline
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills.append(("mid-checkpoint", 9))
        assert [c.name for c in sorted((run / "checkpoints").glob("step-*"))] == ["step-00000003", "step-00000006"]
        # then kills at random moments: after a random number of further logged steps plus a random delay
        for _ in range(4):
            start = last_logged_step(run)
            p = _go(procs[-1], train_cmd(tiny_cifar, run)[3:])
            procs.append(_warm())
            target = start + rng.randint(2, 6)
            while last_logged_step(run) < target and p.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.1))
            if p.poll() is not None:
                break
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills.append(("random", last_logged_step(run)))
    finally:
        for q in procs:
            if q.poll() is None:
                q.kill()
                q.wait()
    assert cli_train(tiny_cifar, run) == 0          # the last resume, to the end
    print("kills survived:", kills)
    assert len(kills) >= 4
    a, b = final_weights(ref), final_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(ref) == train_losses(run)
    assert not list((run / "checkpoints").glob(".*"))


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_while_checkpointing(tiny_cifar, tmp_path, capsys):
    """Promise 2: on a full disk the run stops with a clear error and the previous checkpoint stays intact."""
    disk = tmp_path / "small-disk"
    # one checkpoint of this net is about 0.65 MB: the first fits, the second (written beside it) does not
    if not _mount_tmpfs(disk, "1000k"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        code = cli_train(tiny_cifar, disk / "run")
        err = capsys.readouterr().err
        assert code == 1, err
        assert "No space left on device" in err and "previous checkpoint is untouched" in err
        assert "Traceback" not in err
        kept = sorted(p.name for p in (disk / "run/checkpoints").iterdir())
        assert kept == ["step-00000003"]
        c = load_checkpoint(disk / "run/checkpoints/step-00000003")
        assert c.step == 3 and c.state["step"] == 3
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _tree_digest(path: Path) -> dict:
    # .lock is not the run's: every process that owns the directory writes its pid there (docs/reliability.md, 6)
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_truncated_data_batch_names_the_file(tmp_path, capsys):
    from conftest import write_fake_cifar10
    folder = write_fake_cifar10(tmp_path / "data")
    victim = folder / "data_batch_4"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    code = cli_train(tmp_path / "data", tmp_path / "run")
    err = capsys.readouterr().err
    assert code == 1 and str(victim) in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()   # nothing was written for a run that could not start


@pytest.mark.realdata
def test_bit_flipped_real_batch_names_the_file(real_cifar, tmp_path):
    src = real_cifar / "cifar-10-batches-py"
    dst = tmp_path / "cifar-10-batches-py"
    shutil.copytree(src, dst)
    victim = dst / "data_batch_3"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x04                # one bit in the middle of the pixel array
    victim.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match=r"data_batch_3: the pixels differ from the official CIFAR-10"):
        load_cifar("cifar10", root=tmp_path, download=False)


def test_corrupt_config_files_name_the_file(tiny_cifar, tmp_path, capsys):
    # in-process: what is checked is the CLI's handling, and a new interpreter per case would prove nothing more
    from resnets.cli import main
    good = tmp_path / "config.json"
    assert main(train_cmd(tiny_cifar, tmp_path / "run", 3)[3:]) == 0
    shutil.copy(tmp_path / "run/config.json", good)
    cases = {
        "truncated.json": good.read_text()[:-40],
        "wrong-type.json": good.read_text().replace('"batch_size": 32', '"batch_size": "32"'),
        "unknown-field.json": good.read_text().replace('"batch_size": 32', '"batch_sise": 32'),
        "binary.json": None,
    }
    capsys.readouterr()
    for name, text in cases.items():
        f = tmp_path / name
        if text is None:
            f.write_bytes(bytes(range(256)))
        else:
            f.write_text(text)
        code = main(["train", "--config", str(f), "--out", str(tmp_path / "never")])
        err = capsys.readouterr().err
        assert code == 2 and str(f) in err and "Traceback" not in err, (name, err)
    assert not (tmp_path / "never").exists()
    # the intact copy reproduces the run's config
    code = main(["train", "--config", str(good), "--steps", "3", "--out", str(tmp_path / "again"), "--resume",
                 "none-such"])
    assert code == 2 and "none-such: no such checkpoint" in capsys.readouterr().err


def test_corrupt_checkpoints_name_the_file_and_overwrite_nothing(tiny_cifar, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_train(tiny_cifar, run, 6) == 0
    newest = run / "checkpoints/step-00000006"
    for what, damage in [("truncated", lambda b: b[: len(b) // 3]),
                         ("bit-flipped", lambda b: b[:-100] + bytes([b[-100] ^ 0x10]) + b[-99:])]:
        shutil.rmtree(tmp_path / "copy", ignore_errors=True)
        shutil.copytree(run, tmp_path / "copy")
        f = tmp_path / "copy/checkpoints/step-00000006/model.safetensors"
        f.write_bytes(damage(f.read_bytes()))
        before = _tree_digest(tmp_path / "copy")
        capsys.readouterr()
        code = cli_train(tiny_cifar, tmp_path / "copy", 12)
        err = capsys.readouterr().err
        assert code == 1, (what, err)
        assert str(f) in err and "Traceback" not in err, (what, err)
        assert _tree_digest(tmp_path / "copy") == before, what
        with pytest.raises(CheckpointError, match="model.safetensors"):
            load_checkpoint(f.parent)
    assert load_checkpoint(newest).step == 6


def _torchrun(data, out, rendezvous, steps=12):
    """``torchrun --max-restarts 3`` with 2 CPU ranks, on a free local port, output to ``out/torchrun.txt``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    where = (["--master-addr", "127.0.0.1", "--master-port", str(port)] if rendezvous == "static"
             else ["--rdzv-endpoint", f"127.0.0.1:{port}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--max-restarts", "3", "--rdzv-backend", rendezvous, *where,
           *train_cmd(data, out, steps)[1:], "--device", "cpu"]
    Path(out).mkdir(parents=True, exist_ok=True)
    log = open(Path(out) / "torchrun.txt", "w")
    return subprocess.Popen(cmd, env={**ENV, "CUDA_VISIBLE_DEVICES": "", "LOGLEVEL": "INFO"}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def reap():
    """Kill what a failed test left running: each registered torchrun agent with its workers."""
    procs = []
    yield procs.append
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _local_rank(pid):
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in env if v.startswith(b"LOCAL_RANK=")).split(b"=")[1])


def _tail(out):
    return (Path(out) / "torchrun.txt").read_text()[-4000:]


@pytest.fixture(scope="module")
def torchrun_unbroken(tiny_cifar, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun-unbroken")
    p = _torchrun(tiny_cifar, out, "c10d")
    try:
        assert p.wait(timeout=300) == 0, _tail(out)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_torchrun_max_restarts_resumes_after_killed_workers(tiny_cifar, torchrun_unbroken, tmp_path, rendezvous,
                                                            reap):
    """Promise 5: under torchrun --max-restarts, a worker killed mid-run is restarted and training resumes from the
    last checkpoint, ending with the same weights as an unbroken run (CPU, gloo). Two kills: rank 1 in the first
    round, rank 0 in the restarted one, so the second restart meets keys from two dead rounds in the agent's store
    (the cause of resnets.train.distributed._restart_scoped_store)."""
    run = tmp_path / "killed"
    p = _torchrun(tiny_cifar, run, rendezvous)
    reap(p)
    deadline = time.time() + 300
    killed, seen = [], set()
    for rank, after_step in [(1, 4), (0, 8)]:
        while True:
            assert p.poll() is None and time.time() < deadline, _tail(run)
            workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
            if len(workers) == 2 and not seen & set(workers) and last_logged_step(run) >= after_step:
                break
            time.sleep(0.02)
        seen |= set(workers)
        os.kill(int(next(w for w in workers if _local_rank(w) == rank)), signal.SIGKILL)
        killed.append(last_logged_step(run))
    assert p.wait(timeout=max(deadline - time.time(), 1)) == 0, _tail(run)
    assert killed[-1] < 12, killed
    assert (run / "torchrun.txt").read_text().count("will restart worker group") == 2, _tail(run)
    a, b = final_weights(torchrun_unbroken, 12), final_weights(run, 12)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(torchrun_unbroken) == train_losses(run)


@pytest.mark.slow
def test_torchrun_two_nodes_restart_with_a_fresh_store_per_round(tiny_cifar, torchrun_unbroken, tmp_path, reap):
    """Promise 5 across nodes: two torchrun agents on this machine stand for two nodes (1 worker each, c10d
    rendezvous). Across nodes the restart count differs between agents, so resnets cannot scope the shared store
    (it warns instead); launched with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as docs/imagenet.md says, every round
    gets a fresh store, and killing node 1's worker ends where the unbroken run ends."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "killed"
    run.mkdir()
    agents = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-id", "two-nodes",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--monitor-interval", "0.5",
               *train_cmd(tiny_cifar, run, 12)[1:], "--device", "cpu"]
        env = {**ENV, "CUDA_VISIBLE_DEVICES": "", "LOGLEVEL": "INFO", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        agents.append(subprocess.Popen(cmd, env=env, stdout=open(run / f"node{node}.txt", "w"),
                                       stderr=subprocess.STDOUT, start_new_session=True))
        reap(agents[-1])
    logs = lambda: "\n".join((run / f"node{n}.txt").read_text()[-2000:] for n in range(2))  # noqa: E731
    deadline = time.time() + 300
    while last_logged_step(run) < 4:
        assert all(a.poll() is None for a in agents) and time.time() < deadline, logs()
        time.sleep(0.02)
    worker = subprocess.run(["pgrep", "-P", str(agents[1].pid)], capture_output=True, text=True).stdout.split()
    assert len(worker) == 1, worker
    os.kill(int(worker[0]), signal.SIGKILL)
    assert [a.wait(timeout=max(deadline - time.time(), 1)) for a in agents] == [0, 0], logs()
    assert "will restart worker group" in (run / "node1.txt").read_text()
    a, b = final_weights(torchrun_unbroken, 12), final_weights(run, 12)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(torchrun_unbroken) == train_losses(run)


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_all_ranks_at_one_step_and_resumes_exactly(tiny_cifar, torchrun_unbroken,
                                                                                 tmp_path, reap):
    """Promise 7 under torchrun: SIGTERM to the job (agent and both workers, as SLURM or Kubernetes send it) stops
    both ranks after the same step, rank 0 writes the checkpoint, and a new launch with --resume auto ends as the
    unbroken 2-rank run, bit for bit."""
    run = tmp_path / "stopped"
    p = _torchrun(tiny_cifar, run, "c10d")
    reap(p)
    deadline = time.time() + 300
    while last_logged_step(run) < 4:
        assert p.poll() is None and time.time() < deadline, _tail(run)
        time.sleep(0.02)
    t0 = time.perf_counter()
    os.killpg(p.pid, signal.SIGTERM)
    p.wait(timeout=120)
    took = time.perf_counter() - t0
    log = _tail(run)
    assert "stopped by SIGTERM" in log, log
    stopped_at = int(log.split("after step ")[1].split(",")[0])
    assert stopped_at < 12 and (run / "checkpoints" / f"step-{stopped_at:08d}").is_dir(), log
    assert took < 60, took
    p = _torchrun(tiny_cifar, run, "c10d")
    reap(p)
    assert p.wait(timeout=300) == 0, _tail(run)
    a, b = final_weights(torchrun_unbroken, 12), final_weights(run, 12)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(torchrun_unbroken) == train_losses(run)


def test_replacing_a_checkpoint_never_leaves_none(tmp_path, monkeypatch):
    """``best`` is rewritten in place: a failed swap puts the old one back, and a save killed between the two
    renames is put right by the next prune; folders of names resnets does not write are never read or pruned."""
    from resnets.models import create_model
    from resnets.train import checkpoint as ck
    first, second = create_model("resnet20", depth=8), create_model("resnet20", depth=8)
    best = tmp_path / "checkpoints" / "best"
    ck.save_checkpoint(best, first, meta={"model": "resnet20", "model_kwargs": {"depth": 8}})
    real, calls = os.replace, []

    def second_rename_fails(a, b):
        calls.append(Path(b).name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(a, b)
    monkeypatch.setattr(ck.os, "replace", second_rename_fails)
    with pytest.raises(CheckpointError, match="previous checkpoint is untouched"):
        ck.save_checkpoint(best, second, meta={"model": "resnet20", "model_kwargs": {"depth": 8}})
    monkeypatch.undo()
    kept = load_checkpoint(best, with_state=False).weights
    assert all(torch.equal(kept[k], v) for k, v in first.state_dict().items() if k in kept)
    # killed between the renames: only .best.old-PID is there; prune puts it back
    real(best, best.parent / ".best.old-123")
    for name in ("step-00000002", "step-00000004", "step-00000004.bak", "step-00000006-good"):
        ck.save_checkpoint(best.parent / name, first)
    ck.prune_checkpoints(best.parent, keep_last=1)
    assert sorted(p.name for p in best.parent.iterdir()) == ["best", "step-00000004", "step-00000004.bak",
                                                              "step-00000006-good"]
    assert [p.name for p in ck.list_checkpoints(best.parent)] == ["step-00000004"]
