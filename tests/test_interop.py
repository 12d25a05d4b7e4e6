"""Interop and deployment: torchvision/timm weights in, published weights by name (served from 127.0.0.1 only),
ONNX/TorchScript out with parity checks, `resnets predict`, and refusal of pickles that would run code."""
import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import resnets
from resnets.cli import main
from resnets.data.augment import Normalizer
from resnets.export import export
from resnets.models import (BasicBlock, Bottleneck, UnsafeWeightsError, WeightsDownloadError, create_model, from_timm, from_torchvision,
                            torchvision_weights_url)
from resnets.models import registry
from resnets.predict import ImageReadError, Predictor, load_image, predict
from resnets.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

from conftest import publish_as_torchvision

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics and affine parameters, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return model.eval()


@torch.no_grad()
def trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics, and small gains on each block's last BN as trained ResNets have, so the logits stay
    O(1) (an untrained 50-layer net's reach ~100, where fp32 rounding alone differs by ~1e-4 between runtimes)."""
    randomize_bn(model, seed)
    for block in model.modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            [bn for bn in block.children() if isinstance(bn, torch.nn.BatchNorm2d)][-1].weight.mul_(0.3)
    return model.eval()


# --------------------------------------------------------------------------------------------- timm and torchvision

@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_from_timm_outputs_equal(name, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    theirs = randomize_bn(timm.create_model(name, pretrained=False))
    x = torch.randn(2, 3, 64, 64)
    torch.save({"state_dict": theirs.state_dict()}, tmp_path / f"{name}.pth")   # as timm's train script saves
    sources = [theirs, tmp_path / f"{name}.pth"] + ([theirs.state_dict()] if name == "resnet18" else [])
    with torch.no_grad():
        ref = theirs(x)
        for source in sources:
            ours = from_timm(source).eval()
            assert ours.model_name == name
            assert torch.allclose(ours(x), ref, atol=1e-5, rtol=0)
    if name == "resnet50":
        assert ours.stride_in == "3x3" and ours.model_kwargs["stride_in"] == "3x3"  # timm is v1.5, like torchvision


def test_from_timm_refuses_variants_it_cannot_reproduce():
    timm = pytest.importorskip("timm")
    for variant, words in [("resnet18d", "deep 3-conv stem"), ("seresnet18", "attention"),
                           ("resnetblur18", "BlurPool2d")]:
        with pytest.raises(ValueError, match=words):
            from_timm(timm.create_model(variant, pretrained=False))
    with pytest.raises(ValueError, match="layer4.0.conv1"):  # dilation instead of stride
        from_timm(timm.create_model("resnet18", pretrained=False, output_stride=16))


def test_torchvision_checkpoint_file_loads(tmp_path):
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18())
    path = tmp_path / "resnet18-weights.pth"
    torch.save(tv.state_dict(), path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tv(x)
        ours = from_torchvision(path).eval()
        assert torch.allclose(ours(x), ref, atol=1e-5, rtol=0)
        by_name = create_model("resnet18", weights=path).eval()   # a file path works as `weights` too
        assert torch.allclose(by_name(x), ref, atol=1e-5, rtol=0)
        # and through export's loader, which takes a bare torchvision state_dict as --checkpoint
        from resnets.export import load_for_export
        net, size = load_for_export(path)
        assert size == 224 and torch.allclose(net.eval()(x), ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- published weights, offline

@pytest.fixture
def http_dir(tmp_path):
    """(folder, base URL) of an HTTP server on 127.0.0.1 serving that folder; the only network the tests use."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv(registry.WEIGHTS_URL_ENV, raising=False)
    return home / "hub" / "checkpoints"


def _closed_port_url() -> str:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_torchvision_weights_download_through_local_server(http_dir, torch_home, monkeypatch):
    root, base = http_dir
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18())
    tmp = root / "upload.pth"
    torch.save(tv.state_dict(), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    name = f"resnet18-{digest[:8]}.pth"        # torchvision's naming: the hash prefix lets torch.hub check it
    tmp.rename(root / name)
    publish_as_torchvision(monkeypatch, "resnet18", name)
    x = torch.randn(2, 3, 64, 64)
    model = create_model("resnet18", weights="torchvision", weights_url=f"{base}/{name}", progress=False).eval()
    with torch.no_grad():
        assert torch.allclose(model(x), tv(x), atol=1e-5, rtol=0)
    assert (torch_home / name).exists()
    # Cached: the server is not asked again.
    (root / name).unlink()
    again = create_model("resnet18", weights="torchvision", weights_url=f"{base}/{name}", progress=False).eval()
    with torch.no_grad():
        assert torch.allclose(again(x), tv(x), atol=1e-5, rtol=0)
    # a mirror URL naming a file of its own is checked against torchvision's name all the same, and cached under it
    (torch_home / name).unlink()
    torch.save(torchvision.models.resnet18().state_dict(), root / "resnet18.pth")     # other weights
    with pytest.raises(WeightsDownloadError, match="not the published file"):
        create_model("resnet18", weights="torchvision", weights_url=f"{base}/resnet18.pth", progress=False)
    assert not (torch_home / name).exists() and not (torch_home / "resnet18.pth").exists()
    # a file in the cache is checked too (torch.hub loads what is there): a damaged one is refused, naming it
    (torch_home / name).write_bytes((root / "resnet18.pth").read_bytes())
    with pytest.raises(ValueError, match=f"{name}: not torchvision's published .*delete it"):
        create_model("resnet18", weights="torchvision", weights_url=f"{base}/{name}", progress=False)


def test_mirror_serving_a_different_file_fails_the_hash_check(http_dir, torch_home, monkeypatch):
    root, base = http_dir
    published = torchvision_weights_url("resnet18").rsplit("/", 1)[1]   # e.g. resnet18-f37072fd.pth
    torch.save(torchvision.models.resnet18().state_dict(), root / published)
    monkeypatch.setenv(registry.WEIGHTS_URL_ENV, base + "/")
    assert torchvision_weights_url("resnet18") == f"{base}/{published}"
    with pytest.raises(WeightsDownloadError, match="not the published file"):
        create_model("resnet18", weights="torchvision", progress=False)
    assert not (torch_home / published).exists()


def test_no_network_says_what_to_do(torch_home):
    with pytest.raises(WeightsDownloadError) as err:
        create_model("resnet34", weights="torchvision", weights_url=_closed_port_url(), progress=False)
    msg = str(err.value)
    assert "could not download" in msg and "weights=" in msg and str(torch_home) in msg
    rc = main(["export", "--model", "resnet34", "--weights", "torchvision", "--out", str(torch_home / "x.onnx")])
    assert rc == 1


def test_weights_by_name_build_torchvision_architecture(monkeypatch):
    tv = randomize_bn(torchvision.models.resnet50())
    seen = []
    monkeypatch.setattr(registry, "_download_state_dict",
                        lambda url, name, progress, file_name=None: seen.append(url) or tv.state_dict())
    ours = create_model("resnet50", weights="torchvision:IMAGENET1K_V1").eval()
    assert seen[0].endswith(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1])
    assert ours.stride_in == "3x3" and ours.model_kwargs == {"stride_in": "3x3"}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), tv(x), atol=1e-5, rtol=0)
    for name, kw, words in [("resnet20", {}, "publishes no weights"), ("plain18", {}, "publishes no weights"),
                            ("resnet50", {"stride_in": "1x1"}, "torchvision architecture"),
                            ("resnet18", {"num_classes": 10}, "replace model.fc"),
                            ("resnet50", {"shortcut": "C"}, "torchvision architecture")]:
        with pytest.raises(ValueError, match=words):
            create_model(name, weights="torchvision", **kw)
    with pytest.raises(ValueError, match="no 'V9' weights"):
        create_model("resnet18", weights="torchvision:V9")
    assert len(seen) == 1


# --------------------------------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def cifar_checkpoint(tmp_path_factory) -> Path:
    """A small random resnet20 checkpoint as `resnets train` writes it: classes and a pixel-mean Normalizer."""
    torch.manual_seed(0)
    model = trained_like(create_model("resnet20"))
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    normalizer = Normalizer("pixel-mean", images)
    path = tmp_path_factory.mktemp("ckpt") / "step-00000002"
    return save_checkpoint(path, model, meta={"model": "resnet20", "model_kwargs": {"num_classes": 10},
                                              "classes": CLASSES, "dataset": "cifar10", "step": 2},
                           preprocess=normalizer.state_dict())


def test_checkpoint_records_package_version(cifar_checkpoint):
    assert load_checkpoint(cifar_checkpoint).meta["resnets_version"] == resnets.__version__


class _CreatesFile:
    """Unpickling this calls open(target, "w"): a stand-in for any code a pickle could run."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.fixture
def malicious(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": _CreatesFile(marker)}, evil)
    return evil, marker


def test_malicious_pickle_is_refused_everywhere(malicious, tmp_path, cifar_checkpoint, capsys, monkeypatch):
    evil, marker = malicious
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(evil)
    for loader in (from_torchvision, from_timm, lambda p: create_model("resnet50", weights=p)):
        with pytest.raises(UnsafeWeightsError, match="refused to load.*GLOBAL .*open"):
            loader(evil)
    with pytest.raises(CheckpointError, match="refused"):
        predict(evil, [evil])
    with pytest.raises(CheckpointError, match="refused"):
        export(evil, out=tmp_path / "x.onnx")
    assert main(["predict", "--checkpoint", str(evil), str(evil)]) == 1
    assert main(["export", "--checkpoint", str(evil), "--format", "torchscript", "--out", str(tmp_path / "x.pt")]) == 1
    assert "refused to load" in capsys.readouterr().err
    # a checkpoint directory whose state.pt was replaced
    import shutil
    d = tmp_path / "ckpt"
    shutil.copytree(cifar_checkpoint, d)
    shutil.copy(evil, d / "state.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(d)
    # a poisoned file already in torch.hub's cache is refused too, without a download
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    name = f"resnet18-{hashlib.sha256(evil.read_bytes()).hexdigest()[:8]}.pth"    # passes the hash check
    shutil.copy(evil, hub / name)
    publish_as_torchvision(monkeypatch, "resnet18", name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(UnsafeWeightsError):
        create_model("resnet18", weights="torchvision", weights_url=_closed_port_url() + "/" + name)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------- predict

@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    from PIL import Image
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("images")
    paths = []
    for name, mode, size in [("rgb32.png", "RGB", (32, 32)), ("wide.png", "RGB", (57, 40)),
                             ("gray.png", "L", (64, 64)), ("alpha.png", "RGBA", (20, 24))]:
        shape = (size[1], size[0]) + ((len(mode),) if len(mode) > 1 else ())
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / name)
        paths.append(d / name)
    return paths


def test_predict_top5_and_full_softmax(cifar_checkpoint, images):
    p = Predictor.from_checkpoint(cifar_checkpoint)
    assert p.size == (32, 32) and p.classes == CLASSES
    probs = p.probabilities(images)
    assert probs.shape == (4, 10)
    assert torch.allclose(probs.sum(1), torch.ones(4), atol=1e-5)
    res = predict(cifar_checkpoint, images)
    assert res["model"] == "resnet20" and len(res["predictions"]) == 4
    for row, r in zip(probs, res["predictions"]):
        top = r["top"]
        assert len(top) == 5 and all(t["class"] == CLASSES[t["index"]] for t in top)
        got = [t["probability"] for t in top]
        assert got == sorted(got, reverse=True)
        assert np.allclose(got, row.sort(descending=True).values[:5].numpy(), atol=1e-6)   # a subset of the softmax
    # the preprocessing is the checkpoint's: a 32x32 image goes through the stored Normalizer unchanged
    ck = load_checkpoint(cifar_checkpoint)
    x = Normalizer.from_state_dict(ck.preprocess)(load_image(images[0], (32, 32))[None])
    with torch.no_grad():
        ref = torch.softmax(resnets.train.model_from_checkpoint(ck).eval()(x), 1)[0]
    assert torch.allclose(probs[0], ref, atol=1e-6)
    assert len(predict(cifar_checkpoint, images[:1], top_k=20)["predictions"][0]["top"]) == 10


def test_predict_cli_text_and_json(cifar_checkpoint, images, capsys):
    assert main(["predict", "--checkpoint", str(cifar_checkpoint), *map(str, images[:2])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(images[0]) and lines[1].lstrip().startswith("1. ") and lines[1].endswith("%")
    assert len(lines) == 12
    assert main(["predict", "--checkpoint", str(cifar_checkpoint), "--json", "--top-k", "3", str(images[1])]) == 0
    out = json.loads(capsys.readouterr().out)
    (r,) = out["predictions"]
    assert r["image"] == str(images[1]) and len(r["top"]) == 3
    assert 0 < sum(t["probability"] for t in r["top"]) <= 1 + 1e-6
    assert set(r["top"][0]) == {"class", "index", "probability"}
    assert main(["predict", "--checkpoint", str(cifar_checkpoint), "--device", "auto", str(images[1])]) == 0


def test_predict_errors(cifar_checkpoint, images, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageReadError, match="broken.png: cannot read"):
        predict(cifar_checkpoint, [images[0], bad])
    with pytest.raises(ImageReadError, match="missing.jpg: no such image"):
        predict(cifar_checkpoint, [tmp_path / "missing.jpg"])
    assert main(["predict", "--checkpoint", str(cifar_checkpoint), str(bad)]) == 2
    assert "broken.png" in capsys.readouterr().err
    model = create_model("resnet20")
    no_classes = save_checkpoint(tmp_path / "a", model, meta={"model": "resnet20"},
                                 preprocess=Normalizer("channel", mean=[0.5] * 3, std=[0.25] * 3).state_dict())
    with pytest.raises(CheckpointError, match="no class names"):
        predict(no_classes, images[:1])
    no_pre = save_checkpoint(tmp_path / "b", model, meta={"model": "resnet20", "classes": CLASSES})
    with pytest.raises(CheckpointError, match="no preprocessing"):
        predict(no_pre, images[:1])
    assert main(["predict", "--checkpoint", str(no_pre), str(images[0])]) == 1


def test_torchvision_file_downloaded_by_hand_builds_torchvision_layout(tmp_path, monkeypatch, capsys):
    """The offline advice: pass the path of torchvision's file. Its name says which weights it holds, so the
    bottleneck net is built as torchvision's v1.5 (same shapes as v1: loading alone could not tell), its hash is
    checked, and an export of it carries torchvision's class names and preprocessing."""
    from resnets.train.finetune import load_initial
    torch.manual_seed(0)
    tv = torchvision.models.resnet50().eval()
    path = tmp_path / "resnet50-0676ba61.pth"                   # torchvision's IMAGENET1K_V1 file name
    torch.save(tv.state_dict(), path)
    with pytest.raises(ValueError, match="not torchvision's published resnet50-0676ba61.pth"):
        resnets.create_model("resnet50", weights=str(path))     # these random weights are not that file
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "not torchvision's published" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
    monkeypatch.setattr(registry, "check_torchvision_file", lambda *a: None)    # from here on: stand-in weights
    from resnets.export import load_source
    for src in (load_source(checkpoint=path, model="resnet50"), load_source(checkpoint=path),
                load_source(model="resnet50", weights=str(path))):
        assert src.net.stride_in == "3x3" and len(src.classes) == 1000 and src.resize_shorter == 256
    ours = resnets.create_model("resnet50", weights=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-4, atol=1e-4)
    got = load_initial("resnet50", str(path), {})
    assert "IMAGENET1K_V1" in got.source and len(got.classes) == 1000 and got.normalizer.std is not None
    assert resnets.models.registry.torchvision_file_tag("resnet50", tmp_path / "mine.pth") is None


def test_a_bare_state_dict_must_say_its_bottleneck_layout(tmp_path, capsys):
    """torchvision's ResNet-50 weights under another file name fit our paper-layout (v1) ResNet-50 too: same
    shapes, other outputs. A bare state dict into a bottleneck net is refused until stride_in is given; a
    resnets checkpoint brings its own layout; basic-block nets have one layout and load as before."""
    from resnets.export import load_source
    from resnets.train.finetune import load_initial
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet50()).eval()
    mine = tmp_path / "mine.pth"
    torch.save(tv.state_dict(), mine)
    with pytest.raises(ValueError, match="bare state dict for resnet50.*stride_in='3x3' or '1x1'"):
        create_model("resnet50", weights=str(mine))
    with pytest.raises(ValueError, match="bare state dict for resnet50"):
        load_initial("resnet50", str(mine), {})
    assert main(["export", "--checkpoint", str(mine), "--model", "resnet50", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "bare state dict for resnet50" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = tv(x)
        for net in (create_model("resnet50", weights=str(mine), stride_in="3x3"),
                    load_initial("resnet50", str(mine), {"stride_in": "3x3"}).model,
                    load_source(checkpoint=mine, model="resnet50", stride_in="3x3").net):
            torch.testing.assert_close(net.eval()(x), want, rtol=1e-4, atol=1e-4)
        v1 = create_model("resnet50", weights=str(mine), stride_in="1x1").eval()
        assert v1.stride_in == "1x1" and not torch.allclose(v1(x), want, rtol=1e-2, atol=1e-2)
    ours = create_model("resnet50", stride_in="3x3", num_classes=10)
    save_checkpoint(tmp_path / "ck", ours, meta={"model": "resnet50", "model_kwargs": {"num_classes": 10,
                                                                                        "stride_in": "3x3"}})
    back = create_model("resnet50", weights=str(tmp_path / "ck"), num_classes=10)
    assert back.stride_in == "3x3"
    with pytest.raises(ValueError, match="stride_in='3x3' \\(its checkpoint says so\\); drop stride_in='1x1'"):
        create_model("resnet50", weights=str(tmp_path / "ck"), num_classes=10, stride_in="1x1")
    with pytest.raises(ValueError, match="says its own layout"):
        load_source(checkpoint=tmp_path / "ck", stride_in="3x3")
    r18 = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), r18)
    assert create_model("resnet18", weights=str(r18)).fc.out_features == 1000


def test_predict_reads_images_as_training_does(tmp_path):
    """16-bit PNGs scaled (not clipped) to 8 bits and EXIF orientation applied, by predict's PIL path and the
    training decoder alike."""
    from PIL import Image

    from resnets.data.imagefolder import decode_image_bytes
    deep = tmp_path / "deep.png"
    Image.fromarray((np.arange(16, dtype=np.uint16) * 4000).reshape(4, 4)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    ours = load_image(deep, (4, 4))
    assert torch.equal(ours, decode_image_bytes(deep.read_bytes())) and ours.max() == 234
    rotated = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6                                                    # Orientation: rotate 90 on display
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255                                                # left half white, as stored
    Image.fromarray(stored).save(rotated, exif=exif.tobytes(), quality=95)
    trained = decode_image_bytes(rotated.read_bytes())
    assert trained.shape == (3, 40, 20) and trained[:, :18].float().mean() > 250   # upright: white on top
    assert (load_image(rotated, (40, 20)).int() - trained.int()).abs().max() <= 3
