"""The GPU session's scripts run their logic on the CPU (issue 15): the side-by-side benchmark, the stacked step's
profile and the staging of what a lent GPU's calls carry. Their own file, so that pytest-xdist gives these slow
smoke tests a worker apart from test_bench.py's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_side_by_side_benchmark_smoke_with_stacks(tmp_path):
    """benchmarks/side_by_side.py, the script a lent GPU runs for issue 15, on tiny nets here: every row, the
    stacked ones included, is measured and nothing fails. The graphs part's nets are of depths 8, 8 and 14
    here, so the stack of all of them spans two depths."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "side_by_side.py"), "--smoke", "--graph-set",
                        "r20+p20+r110", "--sets", "r20+p20", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "side_by_side.json").read_text())
    assert not res["errors"]
    q = res["parity"]    # the stacked step trains like the nets alone: here eagerly, in fp32
    assert q["finite"] and q["nets"] == ["resnet-14", "resnet-8", "plain-8"]
    assert max(q["max_abs_diff_stacked_vs_alone"]) < 1e-4 and max(q["max_abs_diff_alone_vs_alone"]) == 0
    assert q["other_layout"] in ("channels_last", "contiguous") and max(q["max_abs_diff_other_layout"]) < 1e-2
    assert len(q["curves"]["stacked"]) == 4 and len(q["curves"]["layout"][0]) == 3
    assert res["graphs"]["stacks"] == [2, 1] and res["graphs"]["stacked_one_stream_ms"] > 0
    assert res["graphs"]["stacked_all_ms"] > 0
    assert res["end_to_end"]["r20+p20"]["stacked_ms_per_round"] > 0
    assert res["end_to_end"]["r20+p20"]["stacked_all_ms_per_round"] > 0
    assert "stacked by depth" in r.stdout and "all 3 stacked in one network" in r.stdout


def test_stack_profile_smoke(tmp_path):
    """benchmarks/stack_profile.py, the next lent GPU's look at where a stacked step's time goes, on tiny sizes
    here: every part runs and writes its numbers."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stack_profile.py"), "--smoke", "--out",
                        str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "stack_profile.json").read_text())
    assert not res["errors"] and res["nets"] == ["resnet-14", "plain-8"]
    assert {c["layout"] for c in res["convs"]} == {"channels_last", "NCHW"}
    assert all(c["grouped_ms"] > 0 and c["separate_ms"] > 0 for c in res["convs"])
    assert set(res["layouts"]) == {"as trained", "NCHW"} and min(res["layouts"].values()) > 0
    prof = res["profile"]["all stacked"]
    assert prof["busy_ms_per_step"] > 0 and prof["by_kind"]["convolution"]["kernels_per_step"] > 0
    assert res["profile"]["deepest alone"]["nets"] == ["resnet-14"]
    assert res["syncs"]["runs"] == 2 and res["syncs"]["checked"] is False and res["syncs"]["steps"] == [3, 6]
    assert all(c["captured"] is False for c in res["convs"])      # no GPU: nothing is captured


def test_stack_profile_times_a_width_again_uncaptured_when_its_capture_fails(tmp_path):
    """On 2026-11-28 a capture failed inside cuDNN and poisoned the process for every later part: now each width
    runs in a process of its own, and one whose capture fails is timed again without capture."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stack_profile.py"), "--smoke", "--out",
                        str(tmp_path), "--parts", "convs"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "STACK_PROFILE_FAIL_CAPTURE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "failed with its timings captured; again, each call synchronised" in r.stdout
    res = json.loads((tmp_path / "stack_profile.json").read_text())
    assert not res["errors"] and res["convs"] and all(c["captured"] is False for c in res["convs"])
    assert "syncs" not in res and "profile" not in res


def test_gpu_stage_cuts_the_data_into_parts_that_fit_beside_the_tree_and_unpacks_them(tmp_path):
    """benchmarks/gpu_stage.sh: every part plus the working tree fits one call, and --unpack on the other side
    gives back the staged folders and the resume files byte for byte (here with a 20 MiB call limit)."""
    import shutil
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "gpu_stage.sh", repo / "benchmarks")
    (repo / ".gitignore").write_text(".devdata\n")
    (repo / "big.bin").write_bytes(os.urandom(3 << 20))      # a 3 MiB tracked file: the tree beside the parts
    rng = torch.Generator().manual_seed(0)
    files = {}
    for part, names in {"p1": ["a.png"], "p2": ["b.png"], "p3": ["c.png", "assemble.sh"]}.items():
        (repo / ".devdata" / part).mkdir(parents=True)
        for n in names:
            data = (b"#!/usr/bin/env bash\necho assembled $1 > \"$1/assembled\"\n" if n == "assemble.sh" else
                    torch.randint(0, 256, (9 << 20,), generator=rng, dtype=torch.uint8).numpy().tobytes())
            (repo / ".devdata" / part / n).write_bytes(data)
            files[f"{part}/{n}"] = data
    resume = tmp_path / "resume"
    resume.mkdir()
    for n in ("paper-results.tar.gz", "paper-weights.tar.aa", "paper-weights.tar.ab"):
        (resume / n).write_bytes(os.urandom(4 << 20))
        files[f"resume-staged/{n}"] = (resume / n).read_bytes()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], cwd=repo, check=True)
    subprocess.run(git + ["add", "-A"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "t"], cwd=repo, check=True)
    env = {**os.environ, "GPU_CALL_LIMIT_MIB": "20"}
    r = subprocess.run(["bash", "benchmarks/gpu_stage.sh", str(resume)], cwd=repo, capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    parts = sorted((repo / ".devdata" / "stage").glob("c*/part"))
    assert len(parts) == 3 and "call 3: carry [\".devdata/stage/c03\"]" in r.stdout      # 39 MiB in 15 MiB parts
    assert all(p.stat().st_size + (3 << 20) <= 20 << 20 for p in parts)
    there = tmp_path / "there"                       # the GPU machine: the script, and the parts the calls carried
    (there / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "gpu_stage.sh", there / "benchmarks")
    shutil.copytree(repo / ".devdata" / "stage", there / ".devdata" / "stage")
    r = subprocess.run(["bash", "benchmarks/gpu_stage.sh", "--unpack"], cwd=there, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for rel, data in files.items():
        assert (there / ".devdata" / rel).read_bytes() == data, rel
    assert (there / ".devdata" / "assembled").read_text() == "assembled .devdata\n"
    r = subprocess.run(["bash", "benchmarks/gpu_stage.sh", str(tmp_path / "nothing")], cwd=repo, capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "lacks paper-results.tar.gz" in r.stderr


def test_gpu_keep_saves_checkpoints_in_history_out_of_the_tree_and_restores_them(tmp_path):
    """benchmarks/gpu_keep.sh: `save` leaves the working tree and HEAD's tree without the files (they would travel
    with every device call), a fresh clone restores them byte for byte, and a wrong sum is refused."""
    import shutil
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "gpu_keep.sh", repo / "benchmarks")
    (repo / "README.md").write_text("x\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(git + ["init", "-q"], cwd=repo, check=True)
    subprocess.run(git + ["add", "-A"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "t"], cwd=repo, check=True)
    (repo / "README.md").write_text("a change of the user's, not staged\n")
    resume = tmp_path / "resume"
    resume.mkdir()
    files = {n: os.urandom(1 << 20) for n in ("paper-results.tar.gz", "paper-weights.tar.aa", "paper-weights.tar.ab")}
    for n, data in files.items():
        (resume / n).write_bytes(data)
    keep = ["bash", "benchmarks/gpu_keep.sh"]
    r = subprocess.run(keep + ["save", str(resume), "step 9 of 64k"], cwd=repo, capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert not (repo / "gpu-resume").exists()
    tree = subprocess.run(["git", "ls-tree", "-r", "--name-only", "HEAD"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.split()
    assert sorted(tree) == ["README.md", "benchmarks/gpu_keep.sh", "benchmarks/gpu_resume.txt"]
    assert (repo / "README.md").read_text() == "a change of the user's, not staged\n"    # left as it was
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    r = subprocess.run(keep + ["restore", str(tmp_path / "back")], cwd=clone, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "step 9 of 64k" in r.stdout
    assert {p.name: p.read_bytes() for p in (tmp_path / "back").iterdir()} == files
    record = clone / "benchmarks" / "gpu_resume.txt"
    lines = record.read_text().splitlines()
    record.write_text("\n".join(l.replace(l.split()[1], "0" * 64) if "paper-weights.tar.ab" in l else l
                                for l in lines) + "\n")
    r = subprocess.run(keep + ["restore", str(tmp_path / "again")], cwd=clone, capture_output=True, text=True)
    assert r.returncode == 1 and "do not match" in r.stderr
    r = subprocess.run(keep + ["save", str(tmp_path / "nothing"), "x"], cwd=repo, capture_output=True, text=True,
                       env=env)
    assert r.returncode == 2 and "lacks paper-results.tar.gz" in r.stderr
