"""Tests for resnets.data.imagefolder: ImageFolder dataset, paper augmentation, 10-crop / multi-scale testing."""

from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DistributedSampler
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from resnets.data.imagefolder import (
    IMAGENET_MEAN_255,
    IMAGENET_STD_255,
    IMAGENET_PCA_EIGVAL,
    IMAGENET_PCA_EIGVEC,
    BadImageError,
    BadImageWarning,
    ImageCollate,
    ImageFolderDataset,
    PCALighting,
    RandomShortSideResize,
    decode_image_bytes,
    imagenet_normalizer,
    make_loader,
    multiscale_predict,
    paper_train_transform,
    standard_eval_transform,
    ten_crop_predict,
    ten_crop_views,
    write_random_imagefolder,
)
from resnets.data.normalize import Normalizer

# torchvision 0.29 deprecates its image decoders (DeprecationWarning on every decode); not our concern here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")

SMALL_EVAL = dict(resize=40, crop=32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    bad = write_random_imagefolder(root, classes=3, per_class=4, seed=0, corrupt=1)
    return root, bad


def _expected_skip_map(ds: ImageFolderDataset, bad: list[str]) -> list[int]:
    """Index -> index actually returned with skip_bad_files (the next readable one)."""
    n, bad_idx = len(ds), {i for i, (p, _) in enumerate(ds.samples) if p in bad}
    out = []
    for i in range(n):
        j = i
        while j in bad_idx:
            j = (j + 1) % n
        out.append(j)
    return out


# ------------------------------------------------------------------------------------------------ dataset, decoding

def test_random_imagefolder_layout_and_modes(folder):
    root, bad = folder
    ds = ImageFolderDataset(root)
    assert ds.classes == ["n00000000", "n00000001", "n00000002"]
    assert ds.class_to_idx == {c: i for i, c in enumerate(ds.classes)}
    assert len(ds) == 12 and ds.targets == [0] * 4 + [1] * 4 + [2] * 4
    assert [p for p, _ in ds.samples] == sorted(p for p, _ in ds.samples)
    assert len(bad) == 1 and bad[0] in [p for p, _ in ds.samples]
    assert ds.find_bad_files() == bad
    modes = set()
    for i, (path, _) in enumerate(ds.samples):
        if path in bad:
            continue
        pil = Image.open(path)
        modes.add(pil.mode)
        img = ds.load(i)
        assert img.dtype == torch.uint8 and img.shape == (3, pil.height, pil.width)
        ref = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)
        tol = 0 if path.endswith(".png") else 3          # JPEG decoders may differ by rounding
        assert (img.int() - ref.int()).abs().max().item() <= tol, (path, pil.mode)
    assert modes == {"RGB", "L", "RGBA", "P", "CMYK"}


def test_write_random_imagefolder_deterministic(tmp_path):
    a = write_random_imagefolder(tmp_path / "a", classes=2, per_class=3, seed=5, corrupt=2)
    b = write_random_imagefolder(tmp_path / "b", classes=2, per_class=3, seed=5, corrupt=2)
    assert [Path(p).relative_to(tmp_path / "a") for p in a] == [Path(p).relative_to(tmp_path / "b") for p in b]
    files_a = sorted((tmp_path / "a").rglob("*.*"))
    files_b = sorted((tmp_path / "b").rglob("*.*"))
    assert len(files_a) == 6
    assert [f.read_bytes() for f in files_a] == [f.read_bytes() for f in files_b]


def test_corrupt_file_raises_naming_file(folder):
    root, bad = folder
    ds = ImageFolderDataset(root)
    i = [p for p, _ in ds.samples].index(bad[0])
    with pytest.raises(BadImageError, match=re.escape(bad[0])) as ei:
        ds[i]
    assert ei.value.path == bad[0]
    assert isinstance(ei.value, RuntimeError)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_raises_bad_image_error(folder, workers):
    root, bad = folder
    ds = ImageFolderDataset(root, transform=standard_eval_transform(**SMALL_EVAL))
    loader = make_loader(ds, 4, train=False, num_workers=workers, persistent_workers=False)
    with pytest.raises(BadImageError, match=re.escape(bad[0])):
        for _ in loader:
            pass


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_skip_bad_files(folder, workers):
    root, bad = folder
    tf = standard_eval_transform(**SMALL_EVAL)
    ds = ImageFolderDataset(root, transform=tf, skip_bad_files=True)
    ref = ImageFolderDataset(root)
    mapping = _expected_skip_map(ref, bad)
    expected_x = torch.stack([tf(ref.load(j)) for j in mapping])
    expected_y = torch.tensor([ref.targets[j] for j in mapping])
    loader = make_loader(ds, 5, train=False, num_workers=workers)
    if workers == 0:
        with pytest.warns(BadImageWarning, match=re.escape(bad[0])):
            batches = list(loader)
    else:
        batches = list(loader)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert [len(b[1]) for b in batches] == [5, 5, 2]
    assert x.dtype == torch.float32 and x.shape == (12, 3, 32, 32)
    assert y.dtype == torch.int64
    assert torch.equal(y, expected_y) and torch.equal(x, expected_x)
    good = [i for i, (p, _) in enumerate(ref.samples) if p not in bad]
    assert set(mapping) == set(good)                      # every good image is yielded
    # a second pass warns no more (once per process) and gives the same data
    if workers == 0:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error", BadImageWarning)
            again = list(loader)
        assert torch.equal(torch.cat([b[1] for b in again]), expected_y)


def test_train_loader_shuffle_seeded_and_distributed_sampler(folder):
    root, bad = folder
    tf = paper_train_transform(min_size=36, max_size=48, crop=32)
    ds = ImageFolderDataset(root, transform=tf, skip_bad_files=True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        runs = []
        for _ in range(2):
            torch.manual_seed(123)
            runs.append(list(make_loader(ds, 4, train=True, num_workers=0, seed=7)))
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*runs))
        ys = torch.cat([b[1] for b in runs[0]])
        mapping = _expected_skip_map(ImageFolderDataset(root), bad)
        assert sorted(ys.tolist()) == sorted(ds.targets[j] for j in mapping)
        assert not torch.equal(ys, torch.tensor([ds.targets[j] for j in mapping]))   # shuffled
        loader = make_loader(ds, 5, train=True, num_workers=0)
        assert [len(b[1]) for b in loader] == [5, 5]                                  # drop_last for training
        sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=0)
        sampler.set_epoch(0)
        loader = make_loader(ds, 4, train=True, num_workers=0, sampler=sampler, drop_last=False)
        assert loader.sampler is sampler
        assert sum(len(b[1]) for b in loader) == 6


def test_empty_and_missing_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolderDataset(tmp_path / "empty")
    for c in ("a", "b"):
        (tmp_path / "noimg" / c).mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no image files"):
        ImageFolderDataset(tmp_path / "noimg")
    # one class empty -> error naming it, unless allowed; upper-case endings, hidden files and sub-folders
    root = tmp_path / "partial"
    write_random_imagefolder(root, classes=1, per_class=2)
    (root / "n00000001").mkdir()
    (root / ".hidden").mkdir()
    (root / "n00000000" / ".junk.jpg").write_bytes(b"x")
    (root / "n00000000" / "sub").mkdir()
    (root / "n00000000" / "img_000.JPEG").rename(root / "n00000000" / "sub" / "X.JPG")
    with pytest.raises(FileNotFoundError, match="n00000001"):
        ImageFolderDataset(root)
    ds = ImageFolderDataset(root, allow_empty_classes=True)
    assert ds.classes == ["n00000000", "n00000001"] and len(ds) == 2
    assert any(p.endswith("X.JPG") for p, _ in ds.samples)
    assert len(ImageFolderDataset(root, extensions=("jpg",), allow_empty_classes=True)) == 1   # X.JPG only
    assert len(ImageFolderDataset(root, extensions=".jpg", allow_empty_classes=True)) == 1     # one ending, as a str
    # a link back up to the root is followed once (it had listed every image ~40 times, until the path was too long)
    os.symlink("..", root / "n00000000" / "loop")
    assert len(ImageFolderDataset(root, allow_empty_classes=True)) == 2


def test_decode_bytes_and_bad_inputs():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((5, 7), np.uint8) + 200, "L").save(buf, "PNG")
    img = decode_image_bytes(buf.getvalue())
    assert img.shape == (3, 5, 7) and img.dtype == torch.uint8 and int(img.min()) == 200
    buf16 = io.BytesIO()
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(buf16, "PNG")
    img16 = decode_image_bytes(buf16.getvalue())
    assert img16.dtype == torch.uint8 and int(img16.min()) == 255
    for data in (b"", b"not an image at all", buf.getvalue()[:20]):
        with pytest.raises(BadImageError, match="some/file.png"):
            decode_image_bytes(data, "some/file.png")


def test_collate():
    c = ImageCollate()
    x, y = c([(torch.full((3, 2, 2), 7, dtype=torch.uint8), 1), (torch.zeros(3, 2, 2, dtype=torch.uint8), 0)])
    assert x.dtype == torch.float32 and x.shape == (2, 3, 2, 2) and float(x[0].max()) == 7.0
    assert y.dtype == torch.int64 and y.tolist() == [1, 0]
    x, _ = ImageCollate(None)([(torch.zeros(3, 2, 2, dtype=torch.uint8), 0)])
    assert x.dtype == torch.uint8
    with pytest.raises(ValueError, match="different sizes"):
        c([(torch.zeros(3, 2, 2), 0), (torch.zeros(3, 2, 3), 0)])


# ------------------------------------------------------------------------------------------------ transforms

@pytest.mark.parametrize("hw", [(30, 50), (50, 30), (40, 40)])
def test_random_short_side_resize(hw):
    h, w = hw
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    t = RandomShortSideResize(20, 45)
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out = t(img)
        oh, ow = out.shape[-2:]
        short, long_ = min(oh, ow), max(oh, ow)
        assert 20 <= short <= 45
        assert abs(long_ - short * max(h, w) / min(h, w)) < 1.0     # aspect ratio kept (up to rounding)
        assert (oh <= ow) == (h <= w)
        seen.add(short)
        torch.manual_seed(seed)
        assert torch.equal(t(img), out)                                # deterministic under the seed
    assert len(seen) > 10
    small = RandomShortSideResize(10, 12)
    assert {min(small(img).shape[-2:]) for _ in range(100)} == {10, 11, 12}    # both ends included
    ti = small(tv_tensors.Image(img))
    assert isinstance(ti, tv_tensors.Image)
    with pytest.raises(ValueError):
        RandomShortSideResize(10, 5)


def test_pca_lighting():
    eigval = torch.tensor(IMAGENET_PCA_EIGVAL)
    eigvec = torch.tensor(IMAGENET_PCA_EIGVEC)
    img = torch.rand(3, 8, 9) * 255
    t = PCALighting(0.1, max_value=255.0)
    deltas = []
    for seed in range(30):
        torch.manual_seed(seed)
        out = t(img)
        torch.manual_seed(seed)
        assert torch.equal(t(img), out)                                # deterministic
        torch.manual_seed(seed)
        alpha = torch.randn(3) * 0.1
        expected = eigvec @ (alpha * eigval) * 255
        delta = out - img
        # the same RGB offset for every pixel, as in Krizhevsky et al.
        assert torch.allclose(delta, expected.view(3, 1, 1).expand_as(delta), atol=1e-4)
        bound = 255 * (eigvec.abs() @ (alpha.abs() * eigval))
        assert bool((delta.abs() <= bound.view(3, 1, 1) + 1e-4).all())
        deltas.append(delta[:, 0, 0])
    d = torch.stack(deltas)
    assert d.abs().max() < 0.1 * 4 * 0.2175 * 255        # within 4 sigma of the principal component
    assert d.abs().max() > 0.5                            # it does change pixels
    # uint8: rounded, clamped, dtype kept; float in [0, 1] uses max_value 1
    u8 = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1).expand(3, 4, 4).contiguous()
    torch.manual_seed(0)
    out8 = PCALighting(0.1)(u8)
    assert out8.dtype == torch.uint8
    torch.manual_seed(0)
    a = torch.randn(3) * 0.1
    exp8 = (u8.float() + (eigvec @ (a * eigval) * 255).view(3, 1, 1)).round().clamp(0, 255)
    assert torch.equal(out8.float(), exp8)
    torch.manual_seed(0)
    out01 = PCALighting(0.1)(img / 255)
    assert torch.allclose((out01 - img / 255) * 255, deltas[0].view(3, 1, 1).expand(3, 8, 9), atol=1e-3)
    assert torch.equal(PCALighting(0.0)(img), img)


def test_subtract_mean():
    x = torch.tensor(IMAGENET_MEAN_255).view(3, 1, 1).expand(3, 4, 5).round()
    out = imagenet_normalizer()(x.to(torch.uint8))
    assert out.dtype == torch.float32
    assert torch.allclose(out, x - torch.tensor(IMAGENET_MEAN_255).view(3, 1, 1))
    # float32 arithmetic, subtract then divide: what ImageFolder training has always computed (bit for bit)
    img = torch.randint(0, 256, (2, 3, 4, 5)).float()
    mean32, std32 = torch.tensor(IMAGENET_MEAN_255).view(3, 1, 1), torch.tensor(IMAGENET_STD_255).view(3, 1, 1)
    assert torch.equal(imagenet_normalizer(divide_by_std=True)(img), (img - mean32) / std32)
    # the preprocess dict of ImageFolder checkpoints reads back to the same normaliser
    again = Normalizer.from_state_dict({"mode": "subtract-mean-255",
                                        "mean": torch.tensor(IMAGENET_MEAN_255, dtype=torch.float64),
                                        "std": torch.tensor(IMAGENET_STD_255, dtype=torch.float64)})
    assert torch.equal(again(img), (img - mean32) / std32)
    pix = torch.rand(3, 4, 5) * 255
    per_pixel = Normalizer("subtract-mean-255", mean=pix)
    assert torch.allclose(per_pixel(pix), torch.zeros(3, 4, 5))
    assert torch.allclose(Normalizer("subtract-mean-255", mean=[1, 2, 3], std=[2, 2, 2])(
        torch.full((2, 3, 1, 1), 5.0)).flatten(), torch.tensor([2.0, 1.5, 1.0] * 2))
    with pytest.raises(ValueError, match="does not match"):
        per_pixel(torch.zeros(3, 6, 6))
    with pytest.raises(ValueError, match="std must be positive"):
        Normalizer("subtract-mean-255", mean=[1, 2, 3], std=[1, 0, 1])


def test_paper_train_and_eval_transform_default_geometry():
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 250, 300), dtype=torch.uint8)
    tf = paper_train_transform()
    torch.manual_seed(1)
    out = tf(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    torch.manual_seed(1)
    assert torch.equal(tf(img), out)
    # mean subtracted: values live around 0 in 0..255 units
    assert -130 < float(out.mean()) < 140 and float(out.max()) <= 255 - min(IMAGENET_MEAN_255) + 30
    ev = standard_eval_transform()(img)
    assert ev.shape == (3, 224, 224)
    ref = F.center_crop(F.resize(img, [256], antialias=True), [224, 224]).float()
    assert torch.allclose(ev, ref - torch.tensor(IMAGENET_MEAN_255).view(3, 1, 1))
    small = paper_train_transform(min_size=36, max_size=48, crop=32)(img)
    assert small.shape == (3, 32, 32)


# ------------------------------------------------------------------------------------------------ test protocols

class Recorder(nn.Module):
    """A 'model' that records its inputs and returns the mean pixel of each channel as the score vector."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return x.mean(dim=(2, 3))


def _coord_image(h, w, offset=0.0):
    rows = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    cols = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    return torch.stack([rows, cols, torch.full((h, w), 7.0)]) + offset


def test_ten_crop_regions_and_average():
    img = _coord_image(40, 60)
    crop = 32
    # (top, left, flipped): corners + centre, then the same five crops of the horizontally flipped image
    regions = [(0, 0, False), (0, 28, False), (8, 0, False), (8, 28, False), (4, 14, False),
               (0, 28, True), (0, 0, True), (8, 28, True), (8, 0, True), (4, 14, True)]
    expected = []
    for top, left, flip in regions:
        r = img[:, top:top + crop, left:left + crop]
        expected.append(r.flip(-1) if flip else r)
    expected = torch.stack(expected)
    model = Recorder()
    out = ten_crop_predict(model, img, crop=crop, resize=40, average="logits")
    assert len(model.inputs) == 1 and model.inputs[0].shape == (10, 3, crop, crop)
    assert torch.equal(model.inputs[0], expected)
    assert out.shape == (3,)
    assert torch.allclose(out, expected.mean(dim=(2, 3)).mean(0))
    assert torch.allclose(out, torch.tensor([(15.5 * 2 + 23.5 * 2 + 19.5) / 5,
                                             (15.5 * 2 + 43.5 * 2 + 29.5) / 5, 7.0]))
    # softmax averaging (the paper's default) = mean of the per-crop softmax scores
    sm = ten_crop_predict(Recorder(), img, crop=crop, resize=40)
    assert torch.allclose(sm, expected.mean(dim=(2, 3)).softmax(-1).mean(0))
    assert torch.allclose(sm.sum(), torch.tensor(1.0))
    # batch of two (N, C, H, W), chunked forward, uint8 input
    batch = torch.stack([img, img + 100])
    model = Recorder()
    b = ten_crop_predict(model, batch, crop=crop, resize=40, average="logits", batch_size=7)
    assert b.shape == (2, 3) and [t.shape[0] for t in model.inputs] == [7, 7, 6]
    assert torch.allclose(b[0], out) and torch.allclose(b[1], out + 100)
    b8 = ten_crop_predict(Recorder(), batch.to(torch.uint8), crop=crop, resize=40, average="logits")
    assert torch.allclose(b8, b)
    # normalize hook and list of differently sized images
    n = ten_crop_predict(Recorder(), [img, _coord_image(50, 40)], crop=crop, resize=40, average="logits",
                         normalize=Normalizer("subtract-mean-255", mean=[1.0, 2.0, 3.0]))
    assert n.shape == (2, 3) and torch.allclose(n[0], out - torch.tensor([1.0, 2.0, 3.0]))
    # resize then crop
    big = torch.rand(3, 80, 120)
    assert torch.equal(ten_crop_views(big, crop, 40), ten_crop_views(F.resize(big, [40], antialias=True), crop, None))


def test_ten_crop_default_geometry_and_mode_restored():
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8)
    model = Recorder().train()
    out = ten_crop_predict(model, img)
    assert model.training
    assert model.inputs[0].shape == (10, 3, 224, 224) and model.inputs[0].dtype == torch.float32
    assert out.shape == (3,) and torch.allclose(out.sum(), torch.tensor(1.0))
    assert torch.equal(model.inputs[0][4], img[:, 16:240, 48:272].float())        # centre crop
    assert torch.equal(model.inputs[0][9], img[:, 16:240, 48:272].float().flip(-1))


class SizeModel(nn.Module):
    """Returns the input's spatial size (h, w) as the 'score' of every batch element; records inputs."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return torch.tensor([[float(x.shape[2]), float(x.shape[3])]]).expand(x.shape[0], 2)


@pytest.mark.parametrize("hw", [(30, 45), (45, 30)])
def test_multiscale_sizes_and_average(hw):
    img = torch.rand(3, *hw) * 255
    scales = (20, 32, 40)
    model = SizeModel()
    out = multiscale_predict(model, img, scales, average="logits")
    sizes = [tuple(t.shape[-2:]) for t in model.inputs]
    assert [min(s) for s in sizes] == list(scales)
    expected_sizes = [(s, int(s * 1.5)) if hw[0] < hw[1] else (int(s * 1.5), s) for s in scales]
    assert sizes == expected_sizes                                   # shorter side = scale, aspect kept
    assert out.shape == (2,)
    assert torch.allclose(out, torch.tensor(expected_sizes, dtype=torch.float32).mean(0))
    # flips: each scale also runs the mirrored image; batch of two
    model = SizeModel()
    outf = multiscale_predict(model, torch.stack([img, img]), scales, flip=True, average="logits")
    assert len(model.inputs) == 6 and outf.shape == (2, 2)
    for k in range(3):
        assert torch.equal(model.inputs[2 * k + 1], model.inputs[2 * k].flip(-1))
    assert torch.allclose(outf[0], out) and torch.allclose(outf[1], out)


def test_multiscale_default_scales_and_softmax():
    img = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    model = SizeModel()
    out = multiscale_predict(model, img, average="logits")
    assert [tuple(t.shape[-2:]) for t in model.inputs] == [(224, 336), (256, 384), (384, 576), (480, 720),
                                                           (640, 960)]
    assert torch.allclose(out, torch.tensor([(224 + 256 + 384 + 480 + 640) / 5, (336 + 384 + 576 + 720 + 960) / 5]))
    # a real fully-convolutional net (adaptive global average pooling) and softmax score averaging
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 5))
    x = torch.rand(2, 3, 30, 40)
    scales = (24, 33)
    s = multiscale_predict(net, x, scales, flip=True)
    with torch.no_grad():
        views = [F.resize(x, [sc], antialias=True) for sc in scales]
        ref = torch.stack([net(v).softmax(-1) for vv in views for v in (vv, vv.flip(-1))]).mean(0)
    assert s.shape == (2, 5) and torch.allclose(s, ref, atol=1e-6)
    assert torch.allclose(s.sum(-1), torch.ones(2))
    lst = multiscale_predict(net, [x[0], x[1, :, :20]], scales)
    assert lst.shape == (2, 5)


def test_flip_and_lighting_flags_reach_both_crop_styles():
    from torchvision.transforms import v2

    from resnets.data.imagefolder import PCALighting, paper_train_transform, random_resized_transform
    norm = Normalizer("channel", mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    kinds = lambda tf: [type(t) for t in tf.transforms]                                   # noqa: E731
    assert v2.RandomHorizontalFlip in kinds(paper_train_transform(norm))
    assert v2.RandomHorizontalFlip not in kinds(paper_train_transform(norm, hflip=False))
    assert PCALighting not in kinds(random_resized_transform(norm, 32, 0.35, True))
    assert PCALighting in kinds(random_resized_transform(norm, 32, 0.35, False, alphastd=0.1))
    assert v2.RandomHorizontalFlip not in kinds(random_resized_transform(norm, 32, 0.35, False, alphastd=0.1))


def test_evaluation_leaves_unreadable_files_out_instead_of_counting_a_neighbour_twice(tmp_path):
    from resnets.data.imagefolder import BadImageWarning, make_loader, standard_eval_transform
    from resnets.train.evaluate import evaluate_model
    from resnets.train.runtime import pick_runtime
    write_random_imagefolder(tmp_path, classes=2, per_class=2)
    sorted((tmp_path / "n00000000").iterdir())[-1].write_bytes(b"not an image")        # sample 1
    tf = standard_eval_transform(32, 32, Normalizer("channel", mean=[0.0] * 3, std=[1.0] * 3))
    ds = ImageFolderDataset(tmp_path, transform=tf, skip_bad_files="drop")

    def loader(batch, order):
        return make_loader(ds, batch, train=False, num_workers=0, sampler=order, pin_memory=False)

    class Zeros(nn.Module):     # always class 0
        def forward(self, x):
            return torch.zeros(x.shape[0], 2)
    with pytest.warns(BadImageWarning, match="leaving out"):
        assert [y.tolist() for _, y in loader(4, [0, 1, 2, 3])] == [[0, 1, 1]]
    assert [y.numel() for _, y in loader(4, [1])] == [0]
    rt = pick_runtime("cpu")
    assert evaluate_model(Zeros(), loader(1, [0, 1, 2, 3]), rt) == pytest.approx(
        {"error": 200 / 3, "top5_error": 0.0, "loss": math.log(2), "n": 3})


def test_multi_scale_refuses_a_per_pixel_mean_with_a_reason(tmp_path):
    from resnets.models import create_model
    from resnets.train.checkpoint import save_checkpoint
    from resnets.train.evaluate import evaluate_imagefolder_checkpoint
    write_random_imagefolder(tmp_path / "data" / "val", classes=2, per_class=1)
    ckpt = save_checkpoint(tmp_path / "ck", create_model("resnet20", depth=8, num_classes=2),
                           meta={"model": "resnet20", "model_kwargs": {"depth": 8, "num_classes": 2},
                                 "dataset": "imagefolder", "config": {"crop": 32, "eval_resize": 32}},
                           preprocess={"mode": "pixel-mean", "mean": torch.zeros(3, 32, 32)})
    with pytest.raises(ValueError, match="per-pixel mean image of 32x32"):
        evaluate_imagefolder_checkpoint(ckpt, tmp_path / "data", protocol="multi-scale", device="cpu", workers=0)
