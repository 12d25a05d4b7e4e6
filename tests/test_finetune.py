"""Fine-tuning (issue 16): ``resnets train --weights`` from torchvision-format weights served on 127.0.0.1, a new head
for the user's classes, freeze, resume, predict with the user's class names, ONNX export; and the clear errors."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from resnets.cli import main as cli
from resnets.models import registry
from resnets.train import load_checkpoint, read_log

from conftest import publish_as_torchvision

CLASSES = ["cat", "dog", "newt"]


def write_folder(root, classes=CLASSES, per_class=6, size=40, seed=0):
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for i, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for k in range(per_class if split == "train" else 2):
                img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                img[..., i % 3] //= 4                   # something per class to learn
                Image.fromarray(img).save(d / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("imgs"))


@pytest.fixture
def served_resnet18(tmp_path, monkeypatch):
    """torchvision's resnet18 in torchvision's file format (random weights), served on 127.0.0.1; TORCH_HOME in
    tmp_path. Yields the served state dict."""
    root = tmp_path / "served"
    root.mkdir()
    torch.manual_seed(0)
    sd = torchvision.models.resnet18().state_dict()
    tmp = root / "upload.pth"
    torch.save(sd, tmp)
    name = f"resnet18-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"   # torch.hub checks this prefix
    tmp.rename(root / name)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv(registry.WEIGHTS_URL_ENV, f"http://127.0.0.1:{server.server_address[1]}/{name}")
    publish_as_torchvision(monkeypatch, "resnet18", name)
    try:
        yield sd
    finally:
        server.shutdown()
        server.server_close()


FAST = ["--recipe", "finetune", "--dataset", "imagefolder", "--batch-size", "4", "--workers", "0", "--no-progress",
        "--threads", "1", "--crop", "32", "--eval-resize", "36", "--log-every", "1"]


def test_finetune_torchvision_weights_new_head_resume_predict_export(folder, served_resnet18, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["train", "--model", "resnet18", "--weights", "torchvision", "--data", str(folder), "--out", str(out),
            *FAST, "--freeze", "layer3", "--checkpoint-every", "2", "--lr-schedule", "step", "--milestones", "3"]
    assert cli([*args, "--steps", "2"]) == 0         # (a step schedule: the same lr whether 2 or 4 steps are planned)
    assert cli([*args, "--steps", "4", "--resume", "auto"]) == 0
    c = load_checkpoint(out / "checkpoints" / "step-00000004")
    assert c.classes == CLASSES and c.model_kwargs["num_classes"] == 3 and c.weights["fc.weight"].shape == (3, 512)
    # frozen up to layer3: exactly the served weights; layer4 and the new head trained
    sd = served_resnet18
    for k in ("conv1.weight", "layer1.0.conv1.weight", "layer3.1.bn2.running_mean", "layer3.1.conv2.weight"):
        assert torch.equal(c.weights[k], sd[k]), k
    assert not torch.equal(c.weights["layer4.1.conv2.weight"], sd["layer4.1.conv2.weight"])
    # torchvision's preprocessing came along: ImageNet mean/std, in 0..255 units
    assert c.preprocess["mode"] == "subtract-mean-255"
    assert torch.allclose(c.preprocess["mean"].flatten(), torch.tensor([123.675, 116.28, 103.53], dtype=torch.float64))
    events = [r["event"] for r in read_log(out / "log.jsonl") if r["split"] == "event"]
    assert any("torchvision's resnet18 DEFAULT weights" in e and "new 3-class head" in e for e in events), events

    # the resumed run ends where an unbroken one does
    straight = tmp_path / "straight"
    assert cli([*args[:args.index("--out")], "--out", str(straight), *args[args.index("--out") + 2:], "--steps", "4"]) == 0
    s = load_checkpoint(straight / "checkpoints" / "step-00000004")
    assert all(torch.equal(s.weights[k], c.weights[k]) for k in c.weights)

    capsys.readouterr()
    img = next((folder / "val" / "dog").iterdir())
    assert cli(["predict", "--checkpoint", str(out / "checkpoints" / "step-00000004"), "--json", str(img)]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert {p["class"] for p in pred["predictions"][0]["top"]} == set(CLASSES)

    onnx = tmp_path / "ft.onnx"
    assert cli(["export", "--checkpoint", str(out / "checkpoints" / "step-00000004"), "--format", "onnx",
                "--out", str(onnx)]) == 0
    from resnets.export import read_metadata
    meta = read_metadata(onnx)
    assert meta["classes"] == CLASSES


def test_finetune_shipped_cifar_weights_carries_their_preprocessing(folder, tmp_path):
    out = tmp_path / "r20"
    assert cli(["train", "--model", "resnet20", "--weights", "cifar10", "--data", str(folder), "--out", str(out),
                *[a for a in FAST if a not in ("--crop", "32", "--eval-resize", "36")], "--steps", "2",
                "--backbone-lr", "0.1"]) == 0
    c = load_checkpoint(out / "checkpoints" / "step-00000002")
    shipped = load_checkpoint(registry.pretrained.checked_path("resnet20", "cifar10"), with_state=False)
    assert c.preprocess["mode"] == shipped.preprocess["mode"] == "pixel-mean"
    assert torch.equal(c.preprocess["mean"], shipped.preprocess["mean"])       # (3, 32, 32): the crop is 32
    assert json.loads((out / "config.json").read_text())["crop"] == 32
    groups = c.state["optimizer"]["param_groups"]
    assert sorted(g["lr_scale"] for g in groups) == [0.1, 1.0]


@pytest.mark.parametrize("case", ["other-architecture", "num-classes", "one-class", "empty-class", "freeze-stage",
                                  "freeze-without-weights"])
def test_finetune_errors_are_clear_and_write_nothing(case, folder, tmp_path, capsys):
    data, extra, model = folder, [], "resnet20"
    if case == "other-architecture":         # our ResNet-20 checkpoint file, for a ResNet-32 run
        extra = ["--weights", str(registry.pretrained.checked_path("resnet20", "cifar10"))]
        model = "resnet32"
    elif case == "num-classes":
        extra = ["--num-classes", "5"]
    elif case == "one-class":
        data = write_folder(tmp_path / "one", classes=["only"])
        extra = ["--weights", "cifar10"]
    elif case == "empty-class":
        data = write_folder(tmp_path / "empty")
        for f in (data / "train" / "dog").iterdir():
            f.unlink()
        extra = ["--weights", "cifar10"]
    elif case == "freeze-stage":
        extra = ["--weights", "cifar10", "--freeze", "layer4"]
    elif case == "freeze-without-weights":
        extra = ["--freeze", "layer1"]
    out = tmp_path / "out"
    code = cli(["train", "--model", model, "--data", str(data), "--out", str(out), *FAST, "--steps", "2", *extra])
    err = capsys.readouterr().err
    assert code in (1, 2), err
    assert "Traceback" not in err
    expected = {"other-architecture": "are for resnet20, but this run trains resnet32",
                "num-classes": "--num-classes 5, but the data has 3 classes",
                "one-class": "one class", "empty-class": "dog", "freeze-stage": "has stem, layer1, layer2, layer3",
                "freeze-without-weights": "needs --weights"}[case]
    assert expected in err, err
    assert not out.exists()


def test_the_head_is_replaced_unless_the_classes_are_the_weights_own():
    from resnets.models import create_model
    from resnets.train.finetune import fit_head

    cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    m = create_model("resnet20")
    old = m.fc
    assert not fit_head(m, cifar, cifar) and m.fc is old                  # the same classes: keep the head
    assert fit_head(m, [str(d) for d in range(10)], cifar) and m.fc is not old   # ten other classes: a new one
    m2 = create_model("resnet20", num_classes=3)
    assert not fit_head(m2, ["a", "b", "c"], None)                         # names unknown, same size: keep
    assert fit_head(m2, ["a", "b"], None) and m2.fc.out_features == 2


def test_freeze_keeps_frozen_batchnorm_in_eval_also_in_a_copy():
    """``freeze(model, "layer1")``: the stem and layer1 get no gradients and their BatchNorm stays in eval mode in
    ``train()``; layer2 on trains normally. A deep copy (as BN folding makes) freezes its own modules and leaves the
    original's alone (the first version's train() closed over the original's modules)."""
    import copy
    from resnets.models import create_model
    from resnets.train.finetune import freeze
    model = create_model("resnet18", num_classes=3)
    assert freeze(model, "layer1") == ["stem", "layer1"]
    assert not any(p.requires_grad for p in [*model.conv1.parameters(), *model.layer1.parameters()])
    assert all(p.requires_grad for p in model.layer2.parameters())
    model.train()
    assert not model.bn1.training and not model.layer1[0].bn1.training and model.layer2[0].bn1.training
    twin = copy.deepcopy(model)
    model.eval()
    twin.train()
    assert not twin.bn1.training and not twin.layer1[1].bn2.training and twin.layer3[0].bn1.training
    assert not model.layer3[0].bn1.training         # the original stayed in eval
    with pytest.raises(ValueError, match="layer9"):
        freeze(create_model("resnet18"), "layer9")


def test_weights_start_only_the_net_they_were_built_as():
    """A checkpoint records only the arguments that differ from the net's defaults; asking for another depth, a
    plain net or other shortcuts is still refused, and restating what the weights are is not."""
    from resnets.train.finetune import load_initial
    for asked in ({"depth": 32}, {"residual": False}, {"shortcut": "B"}):
        with pytest.raises(ValueError, match=f"drop {asked}"):
            load_initial("resnet20", "cifar10", asked)
    for same in ({"depth": 20}, {"shortcut": "A"}, {"zero_init_residual": True}):
        assert load_initial("resnet20", "cifar10", same).model.depth == 20


def test_a_checkpoint_folder_named_like_a_shipped_tag_is_read_as_a_path(tmp_path, monkeypatch):
    from resnets.models import create_model
    from resnets.train.checkpoint import save_checkpoint
    from resnets.train.finetune import load_initial
    monkeypatch.chdir(tmp_path)
    net = create_model("resnet20", depth=8)
    save_checkpoint("cifar10-run", net, meta={"model": "resnet20", "model_kwargs": {"depth": 8, "num_classes": 10}})
    got = load_initial("resnet20", "cifar10-run", {})
    assert got.source == "the checkpoint cifar10-run" and got.model.depth == 8
    assert all(torch.equal(a, b) for a, b in zip(got.model.state_dict().values(), net.state_dict().values()))
    # create_model and export take the folder as the file in it, with its class names and preprocessing
    assert all(torch.equal(a, b) for a, b in zip(create_model("resnet20", depth=8, weights="cifar10-run")
                                                 .state_dict().values(), net.state_dict().values()))
    from resnets.export import _checkpoint_of
    assert _checkpoint_of("resnet20", "cifar10-run").model_name == "resnet20"
    (tmp_path / "cifar10").mkdir()          # a data folder of that name is not a checkpoint: the tag still works
    assert create_model("resnet20", weights="cifar10").depth == 20


def test_a_damaged_checkpoint_says_so(tmp_path):
    from resnets.models import create_model
    from resnets.train.checkpoint import CheckpointError, save_checkpoint
    from resnets.train.finetune import load_initial
    ck = save_checkpoint(tmp_path / "ck", create_model("resnet20", depth=8), meta={"model": "resnet20"})
    raw = bytearray((ck / "model.safetensors").read_bytes())
    raw[-3] ^= 0xFF                                   # a flipped bit in the last weight
    (ck / "model.safetensors").write_bytes(bytes(raw))
    for path in (ck, ck / "model.safetensors"):
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            load_initial("resnet20", str(path), {})
