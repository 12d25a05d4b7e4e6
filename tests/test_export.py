"""ONNX and TorchScript export: dynamic batch by default, parity with PyTorch, the metadata a client needs to
classify images with the file alone, and clear errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import resnets
from resnets.cli import main
from resnets.data.augment import Normalizer
from resnets.models import pretrained
from resnets.export import (TOLERANCE, ExportError, _torchvision_source, export, export_metadata, export_model,
                            load_source, read_metadata)
from resnets.models import BasicBlock, Bottleneck, create_model
from resnets.predict import Predictor
from resnets.train.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint

CLASSES = ["cat", "dog", "fox"]


@torch.no_grad()
def trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics (so eval-mode BN is not the identity) and small gains on each block's last BN as
    trained ResNets have, so the logits stay O(1) (an untrained 50-layer net's reach ~100, where fp32 rounding
    alone differs by ~1e-4 between runtimes)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    for block in model.modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            [bn for bn in block.children() if isinstance(bn, torch.nn.BatchNorm2d)][-1].weight.mul_(0.3)
    return model.eval()


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    """A fine-tuned checkpoint as `resnets train` writes it, with the user's own 3 classes and a per-pixel mean."""
    torch.manual_seed(0)
    model = trained_like(create_model("resnet20", depth=8, num_classes=3))
    normalizer = Normalizer("pixel-mean", torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "step-00000002", model,
                           meta={"model": "resnet20", "model_kwargs": {"depth": 8, "num_classes": 3},
                                 "classes": CLASSES, "dataset": "cifar10", "step": 2},
                           preprocess=normalizer.state_dict())


@pytest.fixture(scope="module")
def onnx_file(finetuned, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx") / "pets.onnx"
    return out, export(finetuned, out=out)


def _session(path):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_dynamic_batch_by_default_runs_batch_1_and_3(finetuned, onnx_file):
    import onnx
    path, res = onnx_file
    assert res.ok and res.checked_batches == [1, 2, 3], res.summary()
    assert res.input_shape[1:] == (3, 32, 32)                     # CIFAR resolution, from the checkpoint
    assert "input [batch, 3, 32, 32]" in res.summary() and "3 class names" in res.summary()
    onnx.checker.check_model(str(path))
    s = _session(path)
    assert isinstance(s.get_inputs()[0].shape[0], str)           # a symbolic batch axis
    net = model_from_checkpoint(finetuned).eval()
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        got = s.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            assert got.shape == (batch, 3)
            assert np.abs(got - net(x).numpy()).max() <= TOLERANCE


def test_metadata_round_trips(finetuned, onnx_file):
    path, res = onnx_file
    meta = {k: json.loads(v) for k, v in _session(path).get_modelmeta().custom_metadata_map.items()}
    assert meta == read_metadata(path) == res.metadata
    assert meta["classes"] == CLASSES
    assert meta["model"] == "resnet20" and meta["model_kwargs"] == {"depth": 8, "num_classes": 3}
    assert meta["resnets_version"] == resnets.__version__ and meta["dataset"] == "cifar10"
    assert meta["input"]["layout"] == "NCHW" and meta["input"]["dtype"] == "float32"
    assert meta["input"]["shape"] == ["batch", 3, 32, 32] and meta["output"]["shape"] == ["batch", 3]
    stored = load_checkpoint(finetuned).preprocess
    p = meta["preprocess"]
    assert p["mode"] == "pixel-mean" and p["std"] is None and p["size"] == [32, 32]
    assert p["pixel_scale"] == 1 / 255 and p["resize"] == "stretch-to-size"
    assert torch.equal(torch.tensor(p["mean"], dtype=torch.float64), stored["mean"])   # exact, float64


def test_client_classifies_an_image_with_the_onnx_file_alone(finetuned, onnx_file, tmp_path):
    from PIL import Image

    image = tmp_path / "pet.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 40, 3), dtype=np.uint8)).save(image)
    # what a client without resnets does (README's snippet)
    s = _session(onnx_file[0])
    meta = {k: json.loads(v) for k, v in s.get_modelmeta().custom_metadata_map.items()}
    p = meta["preprocess"]
    pixels = np.float32(Image.open(image).convert("RGB").resize(p["size"][::-1], Image.BILINEAR)).transpose(2, 0, 1)
    x = (pixels * p["pixel_scale"] - np.float32(p["mean"])) / np.float32(p["std"] or 1)
    logits = s.run(None, {"input": x[None].astype(np.float32)})[0]
    probs = torch.softmax(torch.from_numpy(logits), 1)
    ours = Predictor.from_checkpoint(finetuned).probabilities([image])
    assert (probs - ours).abs().max() <= 1e-5
    assert meta["classes"][int(logits.argmax())] == CLASSES[int(ours.argmax())]


def test_static_batch(finetuned, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "b2.onnx"
    assert main(["export", "--checkpoint", str(finetuned), "--out", str(out), "--static-batch",
                 "--batch-size", "2"]) == 0
    assert "input [2, 3, 32, 32]" in capsys.readouterr().out
    s = _session(out)
    assert s.get_inputs()[0].shape == [2, 3, 32, 32] and read_metadata(out)["input"]["shape"] == [2, 3, 32, 32]
    assert s.run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})[0].shape == (2, 3)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        s.run(None, {"input": np.zeros((3, 3, 32, 32), np.float32)})
    # the batch is a static model's: asked for without --static-batch, or for TorchScript, it is refused
    assert main(["export", "--checkpoint", str(finetuned), "--out", str(tmp_path / "x.onnx"), "--batch-size", "2"]) == 2
    assert main(["export", "--checkpoint", str(finetuned), "--out", str(tmp_path / "x.pt"), "--format", "torchscript",
                 "--static-batch"]) == 2
    assert "any batch size" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b2.onnx"]


def test_torchscript_parity_metadata_and_cli(finetuned, tmp_path, capsys, monkeypatch):
    out = tmp_path / "pets.pt"
    # --dynamic-batch is the default now; still accepted so existing scripts keep working
    assert main(["export", "--checkpoint", str(finetuned), "--format", "torchscript", "--out", str(out),
                 "--dynamic-batch"]) == 0
    text = capsys.readouterr().out
    assert "torch.jit.load - PyTorch| = 0 over batches of 1, 2, 3" in text and "3 class names" in text
    net = torch.jit.load(str(out)).eval()
    ours = model_from_checkpoint(finetuned).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert (net(x) - ours(x)).abs().max() <= TOLERANCE
    meta = read_metadata(out)
    assert meta["classes"] == CLASSES and meta["preprocess"]["mode"] == "pixel-mean"
    # above the tolerance: non-zero exit, it says so, and the good file at --out stays; the failed one lies beside it
    import resnets.export as ex
    good = out.read_bytes()
    monkeypatch.setattr(ex, "verify_export", lambda *a, **k: (3e-3, 1.0))
    assert main(["export", "--model", "resnet20", "--format", "torchscript", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "FAILED: above the tolerance 0.0001" in err and "no class names" in err
    assert out.read_bytes() == good and f"wrote {tmp_path / 'pets.failed.pt'}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pets.failed.pt", "pets.pt"]
    # a static batch of 0 is refused, not read as 1
    assert main(["export", "--model", "resnet20", "--out", str(tmp_path / "z.onnx"), "--static-batch",
                 "--batch-size", "0"]) != 0
    assert "batch size must be positive" in capsys.readouterr().err


def test_export_leaves_the_callers_model_as_it_was(tmp_path):
    """export_model works on a copy: a model mid-training keeps its dtype and training mode (and device)."""
    net = create_model("resnet20", depth=8).double().train()
    res = export_model(net, tmp_path / "r8.pt", "torchscript")
    assert res.path.exists() and net.training and next(net.parameters()).dtype == torch.float64


def test_onnx_parity_resnet50(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = trained_like(create_model("resnet50"))
    # a static batch: a bottleneck net's parity is the point here, and a dynamic one takes twice as long to export
    res = export_model(model, tmp_path / "r50.onnx", "onnx", image_size=64, dynamic_batch=False)
    assert res.ok and res.max_abs_diff <= TOLERANCE, res.summary()
    assert res.input_shape == (1, 3, 64, 64) and res.checked_batches == [1] and res.max_abs_logit > 0.5
    assert res.metadata["model"] == "resnet50" and "classes" not in res.metadata


def test_shipped_and_torchvision_weights_carry_classes_and_preprocessing():
    src = load_source(model="resnet20", weights="cifar10")
    meta = export_metadata(src, (1, 3, 32, 32), 10, True)
    assert meta["classes"][:3] == ["airplane", "automobile", "bird"] and meta["weights"] == "cifar10"
    assert meta["preprocess"]["mode"] == "pixel-mean" and np.shape(meta["preprocess"]["mean"]) == (3, 32, 32)
    # the same file given by its path (--weights FILE) carries the same classes and preprocessing
    path = str(pretrained.checked_path("resnet20", "cifar10"))
    by_path = export_metadata(load_source(model="resnet20", weights=path), (1, 3, 32, 32), 10, True)
    assert {**by_path, "weights": "cifar10"} == meta and by_path["weights"] == path
    # torchvision's weights: its class names and transforms, known offline (the weights are not fetched here)
    src = _torchvision_source(create_model("resnet18"), "resnet18", "torchvision")
    meta = export_metadata(src, (1, 3, 224, 224), 1000, True)
    p = meta["preprocess"]
    assert len(meta["classes"]) == 1000 and meta["classes"][0] == "tench"
    assert meta["weights"] == "torchvision:IMAGENET1K_V1" and meta["dataset"] == "imagenet"
    assert np.allclose(np.squeeze(p["mean"]), [0.485, 0.456, 0.406])
    assert np.allclose(np.squeeze(p["std"]), [0.229, 0.224, 0.225]) and p["mode"] == "channel"
    assert p["resize"] == "shorter-side-then-center-crop" and p["resize_shorter_side"] == 256
    # --image-size 320: the shorter side scales with the crop (256 would be smaller than the crop)
    assert export_metadata(src, (1, 3, 320, 320), 1000, True)["preprocess"]["resize_shorter_side"] == 366
    assert p["size"] == [224, 224]


@pytest.mark.parametrize("case", ["missing checkpoint", "missing directory", "directory as output"])
def test_errors_are_clear_and_leave_nothing(case, finetuned, tmp_path, capsys):
    out = {"missing directory": tmp_path / "nope" / "m.onnx", "directory as output": tmp_path}.get(case,
                                                                                                  tmp_path / "m.onnx")
    ckpt = tmp_path / "no-such-checkpoint" if case == "missing checkpoint" else finetuned
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("resnets export: error: ") and "Traceback" not in err
    assert {"missing checkpoint": "no such checkpoint", "missing directory": "does not exist",
            "directory as output": "is a directory"}[case] in err
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_and_failed_export_leave_nothing(finetuned, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["export", "--checkpoint", str(finetuned), "--format", "tflite", "--out", str(tmp_path / "m.tflite")])
    assert e.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="format must be one of"):
        export(finetuned, fmt="tflite", out=tmp_path / "m.tflite")
    # an export that fails half-way (here: the check of the written file) leaves neither the file nor a temporary
    import resnets.export as ex

    def broken(*a, **k):
        raise ExportError("the exported model fails on an input of shape (1, 3, 32, 32)")
    monkeypatch.setattr(ex, "verify_export", broken)
    assert main(["export", "--checkpoint", str(finetuned), "--format", "torchscript",
                 "--out", str(tmp_path / "m.pt")]) == 1
    assert "fails on an input" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_class_names_must_fit_the_network(tmp_path):
    bad = save_checkpoint(tmp_path / "ckpt", create_model("resnet20", depth=8, num_classes=3),
                          meta={"model": "resnet20", "model_kwargs": {"depth": 8, "num_classes": 3},
                                "classes": ["cat", "dog"]})
    with pytest.raises(CheckpointError, match="2 class names for a network with 3 outputs"):
        export(bad, out=tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_imagefolder_checkpoint_metadata_reproduces_predict_input(tmp_path):
    """An ImageFolder fine-tune of an ImageNet net: the stored resize (shorter side, centre crop) and normalisation,
    applied by a client without resnets, give the input `resnets predict` feeds the network."""
    from PIL import Image

    from resnets.predict import load_image

    ckpt = save_checkpoint(tmp_path / "ckpt", create_model("resnet18", num_classes=3),
                           meta={"model": "resnet18", "model_kwargs": {"num_classes": 3}, "classes": CLASSES,
                                 "dataset": "imagefolder", "config": {"crop": 224}},
                           preprocess={"mode": "subtract-mean-255", "mean": torch.tensor([123.7, 116.3, 103.5]),
                                       "std": torch.tensor([58.4, 57.1, 57.4])})
    src = load_source(ckpt)
    p = export_metadata(src, (1, 3, 224, 224), 3, True)["preprocess"]
    assert p["resize"] == "shorter-side-then-center-crop" and p["pixel_scale"] == 1.0
    image = tmp_path / "pet.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(image)
    h, w = p["size"]
    img = Image.open(image).convert("RGB")
    scale = p["resize_shorter_side"] / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.BILINEAR)
    left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
    pixels = np.asarray(img.crop((left, top, left + w, top + h)), np.float32).transpose(2, 0, 1)
    x = (pixels * p["pixel_scale"] - np.float32(p["mean"])) / np.float32(p["std"] or 1)
    predictor = Predictor.from_checkpoint(ckpt)
    ours = predictor.normalizer(load_image(image, predictor.size, predictor.center_crop)[None])[0]
    assert np.abs(x - ours.numpy()).max() <= 1e-4


def test_predict_and_export_resize_an_imagefolder_run_as_its_evaluation_did(tmp_path):
    """A CIFAR net fine-tuned on ImageFolder data at crop 32 was evaluated on the centre of each image (shorter
    side to its eval_resize, 32): predict and the exported metadata do the same, not a squash of the whole image."""
    from PIL import Image

    from resnets.predict import load_image
    from resnets.data.imagefolder import decode_image_bytes, standard_eval_transform
    ckpt = save_checkpoint(tmp_path / "ckpt", create_model("resnet20", depth=8, num_classes=3),
                           meta={"model": "resnet20", "model_kwargs": {"depth": 8, "num_classes": 3},
                                 "classes": CLASSES, "dataset": "imagefolder",
                                 "config": {"crop": 32, "eval_resize": 36}},
                           preprocess={"mode": "pixel-mean", "mean": torch.zeros(3, 32, 32)})
    predictor = Predictor.from_checkpoint(ckpt)
    assert (predictor.size, predictor.center_crop, predictor.resize_shorter) == ((32, 32), True, 36)
    p = export_metadata(load_source(ckpt), (1, 3, 32, 32), 3, True)["preprocess"]
    assert p["resize"] == "shorter-side-then-center-crop" and p["resize_shorter_side"] == 36
    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (36, 72, 3), dtype=np.uint8)).save(wide)
    evaluated = standard_eval_transform(36, 32, torch.nn.Identity())(decode_image_bytes(wide.read_bytes()))
    assert torch.equal(load_image(wide, predictor.size, True, predictor.resize_shorter), evaluated.to(torch.uint8))


@pytest.mark.parametrize("preprocess", [
    {"mode": "channel", "mean": torch.tensor([125.3, 123.0, 113.9]), "std": torch.tensor([63.0, 62.1, 66.7])},
    {"mode": "pixel-mean", "mean": torch.zeros(3, 32, 32)}])
def test_an_imagenet_net_trained_on_cifar_is_fed_whole_32_pixel_images(preprocess, tmp_path):
    """CIFAR runs were trained and evaluated on whole 32 x 32 images, whatever the net's family: predict and the
    exported file must not take a 224-pixel centre crop (channel statistics) or zoom in (a per-pixel mean)."""
    ckpt = save_checkpoint(tmp_path / "ckpt", create_model("resnet18", num_classes=3),
                           meta={"model": "resnet18", "model_kwargs": {"num_classes": 3}, "classes": CLASSES,
                                 "dataset": "cifar10", "config": {"crop": 224}}, preprocess=preprocess)
    predictor = Predictor.from_checkpoint(ckpt)
    assert (predictor.size, predictor.center_crop) == ((32, 32), False)
    p = export_metadata(load_source(ckpt), (1, 3, 32, 32), 3, True)["preprocess"]
    assert p["size"] == [32, 32] and p["resize"] != "shorter-side-then-center-crop"
