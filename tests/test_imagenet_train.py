"""ImageNet-style training (Sec. 3.4) on tiny generated image folders: the imagenet-paper recipe, the ImageFolder
data source end to end (train, checkpoints, centre-crop / 10-crop / multi-scale evaluation), exact resume
independent of the DataLoader worker count, and 2 ranks under torchrun == 1 process."""
import dataclasses
from pathlib import Path

import pytest
import torch

import resnets
from resnets.config import IMAGENET_STEPS_PER_EPOCH, recipe
from resnets.data.imagefolder import write_random_imagefolder
from resnets.train import load_checkpoint, read_log, train
from resnets.train.evaluate import evaluate_imagefolder_checkpoint
from resnets.train.schedule import learning_rate

# torchvision 0.29 deprecates its image decoders (DeprecationWarning on every decode); not our concern here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """DIR/train: 3 classes x 8 images, DIR/val: 3 classes x 3 images, 32-64 px, mixed JPEG/PNG modes."""
    root = tmp_path_factory.mktemp("imagefolder")
    write_random_imagefolder(root / "train", classes=3, per_class=8, seed=0)
    write_random_imagefolder(root / "val", classes=3, per_class=3, seed=1)
    return root


def tiny(data, out, **kw):
    """imagenet-paper with everything shrunk: ResNet-18, 64 px crops from shorter sides in [72, 96], batch 4."""
    base = dict(model="resnet18", data=str(data), out=str(out), steps=8, batch_size=4, crop=64, resize_min=72,
                resize_max=96, eval_resize=72, workers=0, eval_every=4, checkpoint_every=4, log_every=2,
                progress=False, threads=1, device="cpu")
    base.update(kw)
    return recipe("imagenet-paper", **base)


def test_imagenet_paper_recipe_is_section_3_4():
    c = recipe("imagenet-paper")
    assert (c.model, c.dataset, c.batch_size, c.lr, c.momentum, c.weight_decay) == \
        ("resnet50", "imagefolder", 256, 0.1, 0.9, 1e-4)
    assert IMAGENET_STEPS_PER_EPOCH == 5004                    # 1,281,167 // 256
    assert c.steps == 90 * 5004 and c.milestones == (30 * 5004, 60 * 5004)
    assert (c.crop, c.resize_min, c.resize_max, c.lighting, c.warmup_lr) == (224, 256, 480, 0.1, None)
    assert resnets.create_model(c.model).shortcut == "B"
    assert learning_rate(c, 30 * 5004 - 1, False) == 0.1
    assert learning_rate(c, 30 * 5004, False) == pytest.approx(0.01)
    assert learning_rate(c, 60 * 5004, False) == pytest.approx(0.001)
    assert recipe("imagenet-paper", steps=900).milestones == (300, 600)   # shorter runs keep the 30/60/90 shape
    m = recipe("imagenet-modern")                                        # not the paper; labelled as such
    assert (m.label_smoothing, m.lr_schedule, m.model_kwargs) == (0.1, "cosine", {"zero_init_residual": True})
    assert learning_rate(m, 0, False) == 0.1 and learning_rate(m, m.steps // 2, False) == pytest.approx(0.05)
    assert recipe("imagenet-modern", model_kwargs={"stride_in": "3x3"}).model_kwargs == \
        {"zero_init_residual": True, "stride_in": "3x3"}


def test_imagefolder_training_end_to_end(folders, tmp_path, capsys, monkeypatch):
    # in-process (`resnets` is cli.main): a new interpreter per command would prove nothing more here
    from resnets.cli import main
    out = tmp_path / "run"
    assert main(["train", "--recipe", "imagenet-paper", "--model", "resnet18", "--data", str(folders), "--steps",
                 "6", "--batch-size", "4", "--crop", "64", "--resize-min", "72", "--resize-max", "96",
                 "--eval-resize", "72", "--workers", "2", "--eval-every", "3", "--checkpoint-every", "3",
                 "--log-every", "3", "--out", str(out), "--no-progress", "--threads", "1", "--device", "cpu"]) == 0
    assert "resnet18: 6 steps" in capsys.readouterr().out
    log = read_log(out / "log.jsonl")
    assert [(x["step"], x["split"]) for x in log] == [(3, "train"), (3, "val"), (6, "train"), (6, "val")]
    assert all(x["n"] == 9 for x in log if x["split"] == "val")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "step-00000003", "step-00000006"]
    c = load_checkpoint(out / "checkpoints/step-00000006")
    assert c.meta["dataset"] == "imagefolder" and c.classes == ["n00000000", "n00000001", "n00000002"]
    assert c.meta["model_kwargs"]["num_classes"] == 3 and c.meta["config"]["crop"] == 64
    assert c.preprocess["mode"] == "subtract-mean-255" and c.preprocess["mean"].shape == (3,)

    # evaluation protocols on val: the centre crop repeats what training logged; 10-crop and multi-scale run
    ckpt = out / "checkpoints/step-00000006"
    centre = evaluate_imagefolder_checkpoint(ckpt, folders, device="cpu", workers=0)
    assert centre["n"] == 9 and centre["error"] == log[-1]["error"]
    assert centre["loss"] == pytest.approx(log[-1]["loss"], rel=1e-4)
    # --subset 3 of the 9 class-sorted val images: one of each class, not the first class's three
    from resnets.train.sources import spread_subset
    assert spread_subset(9, 3) == [0, 3, 6] and spread_subset(10, 4) == [0, 2, 5, 7]
    assert spread_subset(5, None) == spread_subset(5, 9) == [0, 1, 2, 3, 4]
    seen = []
    monkeypatch.setattr(resnets.train.evaluate, "evaluate_model",
                        lambda m, loader, rt, **k: seen.extend(y.tolist() for _, y in loader) or {"n": 3})
    evaluate_imagefolder_checkpoint(ckpt, folders, device="cpu", workers=0, subset=3)
    monkeypatch.undo()
    assert sorted(sum(seen, [])) == [0, 1, 2]
    ms = evaluate_imagefolder_checkpoint(ckpt, folders, protocol="multi-scale", scales=(64, 80), flip=True,
                                         device="cpu", workers=0)
    assert ms["n"] == 9 and 0 <= ms["error"] <= 100 and ms["protocol"] == "multi-scale"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(folders), "--ten-crop", "--workers", "0",
                 "--device", "cpu"]) == 0
    assert "on 9 val images, ten-crop: top-1 error" in capsys.readouterr().out

    # `resnets predict` reads the checkpoint's subtract-mean preprocessing and its crop size
    from resnets.predict import predict
    images = sorted((folders / "val").rglob("*.*"))[:2]
    p = predict(ckpt, images, top_k=2)
    assert p["input_size"] == [64, 64] and len(p["predictions"]) == 2
    assert all(0.0 < sum(t["probability"] for t in x["top"]) <= 1.0 + 1e-6 for x in p["predictions"])


def test_imagefolder_resume_is_exact_and_independent_of_workers(folders, tmp_path):
    """24 images / batch 4 = 6 steps per epoch. Stop at step 5 (mid-epoch), resume to 9 (across the epoch
    boundary) with worker processes: bit-identical to an unbroken run without workers."""
    kw = dict(steps=9, milestones=(6,), eval_every=100, checkpoint_every=9, log_every=1)
    train(tiny(folders, tmp_path / "a", **kw))
    train(tiny(folders, tmp_path / "b", **{**kw, "steps": 5, "checkpoint_every": 5}, workers=2))
    train(tiny(folders, tmp_path / "b", **kw, workers=2, resume="auto"))
    a = load_checkpoint(tmp_path / "a/checkpoints/step-00000009", with_state=False).weights
    b = load_checkpoint(tmp_path / "b/checkpoints/step-00000009", with_state=False).weights
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [(x["step"], x["loss"]) for x in read_log(tmp_path / "a/log.jsonl") if x["split"] == "train"]
    lb = [(x["step"], x["loss"]) for x in read_log(tmp_path / "b/log.jsonl") if x["split"] == "train"]
    assert la == lb and len(la) == 9


def test_imagefolder_errors_say_what_is_missing(folders, tmp_path, tiny_cifar):
    with pytest.raises(FileNotFoundError, match="no .*train directory"):
        train(tiny(tmp_path / "nothing", tmp_path / "x"))
    with pytest.raises(ValueError, match="needs --data DIR"):
        train(dataclasses.replace(tiny(folders, tmp_path / "x"), data=None))
    with pytest.raises(ValueError, match="does not divide|no full batch"):
        train(tiny(folders, tmp_path / "x", batch_size=32))
    cifar = train(recipe("cifar-paper", model="resnet20", model_kwargs={"depth": 8}, data=str(tiny_cifar),
                         out=str(tmp_path / "c"), steps=1, batch_size=32, eval_every=1, checkpoint_every=1,
                         progress=False, threads=1, warmup_lr=None, device="cpu"))
    from resnets.train import CheckpointError
    with pytest.raises(CheckpointError, match="not an ImageFolder checkpoint"):
        evaluate_imagefolder_checkpoint(cifar.out / "checkpoints/step-00000001", folders, protocol="ten-crop")


def test_imagefolder_two_ranks_equal_one_process(folders, tmp_path):
    """The DataLoader path under torchrun: each rank loads its half of every global batch (same augmentation,
    seeded per sample), SyncBN on the CPU; after one step the weights equal one process's to float rounding."""
    from test_distributed import max_diff, torchrun

    args = ["--recipe", "imagenet-paper", "--model", "resnet18", "--data", str(folders), "--steps", "2",
            "--batch-size", "4", "--crop", "64", "--resize-min", "72", "--resize-max", "96", "--eval-resize", "72",
            "--workers", "1", "--eval-every", "2", "--checkpoint-every", "1", "--keep-last", "2", "--log-every", "1",
            "--no-progress", "--device", "cpu"]
    torchrun(["-m", "resnets.cli", "train", *args, "--out", str(tmp_path / "ddp"), "--sync-bn"])
    train(tiny(folders, tmp_path / "one", steps=2, checkpoint_every=1, keep_last=2, eval_every=2, log_every=1,
               workers=1))
    for step in (1, 2):
        a = load_checkpoint(tmp_path / f"one/checkpoints/step-0000000{step}", with_state=False).weights
        b = load_checkpoint(tmp_path / f"ddp/checkpoints/step-0000000{step}", with_state=False).weights
        assert max_diff(a, b) < (1e-5 if step == 1 else 1e-3), (step, max_diff(a, b))
    va = [x for x in read_log(tmp_path / "one/log.jsonl") if x["split"] == "val"]
    vb = [x for x in read_log(tmp_path / "ddp/log.jsonl") if x["split"] == "val"]
    assert va[0]["n"] == vb[0]["n"] == 9


def test_sources_give_their_batch_shape_without_reading_a_batch(folders, tmp_path, monkeypatch):
    """The whole-step graph is built for the shape of a batch. Reading batch 0 to learn it would start an
    ImageFolder DataLoader at step 0, and a resumed run would then start it again at its own step."""
    from types import SimpleNamespace

    from resnets.data.cifar import CifarData
    from resnets.train import graphs
    from resnets.train.distributed import DistContext
    from resnets.train.runtime import pick_runtime
    from resnets.train.sources import make_source

    rt, ctx = pick_runtime("cpu", "fp32", False), DistContext()
    g = torch.Generator().manual_seed(0)
    cifar = CifarData("cifar10", torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g).numpy(),
                      torch.randint(0, 10, (64,), generator=g).numpy(),
                      torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g).numpy(),
                      torch.randint(0, 10, (16,), generator=g).numpy(), [str(i) for i in range(10)], "generated")
    sources = [make_source(tiny(folders, tmp_path / "a", batch_size=6), rt, ctx),
               make_source(recipe("cifar-paper", batch_size=8, progress=False, device="cpu"), rt, ctx, data=cifar)]
    for source in sources:
        assert source.batch_shape == tuple(source.batch(3)[0].shape)
        source.close()

    built = []
    monkeypatch.setattr(graphs, "graph_applies", lambda *a, **k: (True, ""))
    never_read = SimpleNamespace(batch_shape=(6, 3, 64, 64), batch=lambda step: pytest.fail("a batch was read"))
    graphs.maybe_graph_step(SimpleNamespace(cuda_graph=True), None, None, rt, never_read, None,
                            static_cls=lambda *a, **k: built.append(a[3]))
    assert built == [(6, 3, 64, 64)]
