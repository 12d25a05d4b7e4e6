"""Tests of resnets.data.augment: pad/crop/flip, normalisation, and the on-device loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resnets.data import DeviceLoader, Normalizer, crop_flip, pad_crop_flip


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _all_crops(img: torch.Tensor, pad: int) -> dict[tuple[int, int, bool], torch.Tensor]:
    """Every (oy, ox, flip) crop of one (C, H, W) image, computed the slow, obvious way."""
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=img.dtype)
    padded[:, pad:pad + h, pad:pad + w] = img
    out = {}
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            crop = padded[:, oy:oy + h, ox:ox + w]
            out[(oy, ox, False)] = crop
            out[(oy, ox, True)] = crop.flip(-1)
    return out


def _identify(out: torch.Tensor, img: torch.Tensor, pad: int) -> list[tuple[int, int, bool]]:
    return [k for k, v in _all_crops(img, pad).items() if torch.equal(v, out)]


# ------------------------------------------------------------------------------------------------ pad_crop_flip


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_pad_crop_flip_shape_dtype_and_valid_crops(dtype):
    x = (torch.randperm(6 * 3 * 8 * 8) % 250 + 1).to(dtype).view(6, 3, 8, 8)  # no zeros in the image itself
    y = pad_crop_flip(x, pad=2, generator=_gen(0))
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    for i in range(len(x)):
        assert _identify(y[i], x[i], 2), f"image {i} is not a zero-padded crop (or its flip) of the input"


def test_crop_flip_known_offsets_zero_padding_and_flip():
    x = torch.arange(1, 1 + 2 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)  # strictly positive
    ones = torch.ones(4, 1, 6, 6, dtype=torch.uint8) * 7
    oy = torch.tensor([0, 8, 4, 2])
    ox = torch.tensor([0, 8, 4, 5])
    y = crop_flip(ones, oy, ox, torch.tensor([False, False, False, False]), pad=4)
    # offset (0, 0): the top 4 rows and left 4 columns come from the zero padding
    assert (y[0, :, :4, :] == 0).all() and (y[0, :, :, :4] == 0).all() and (y[0, :, 4:, 4:] == 7).all()
    # offset (8, 8): bottom/right padding
    assert (y[1, :, 2:, :] == 0).all() and (y[1, :, :, 2:] == 0).all() and (y[1, :, :2, :2] == 7).all()
    # offset (pad, pad): the image itself
    assert (y[2] == 7).all()
    # offset (2, 5): 2 zero rows on top, 1 zero column on the right
    assert (y[3, :, :2] == 0).all() and (y[3, :, :, 5] == 0).all() and (y[3, :, 2:, :5] == 7).all()
    # flips
    z = crop_flip(x, torch.tensor([4, 4]), torch.tensor([4, 4]), torch.tensor([True, False]), pad=4)
    assert torch.equal(z[0], x[0].flip(-1)) and torch.equal(z[1], x[1])
    zf = crop_flip(x, torch.tensor([4, 4]), torch.tensor([3, 3]), torch.tensor([True, False]), pad=4)
    assert torch.equal(zf[0], _all_crops(x[0], 4)[(4, 3, True)])
    assert (zf[0, :, :, -1] == 0).all() and (zf[1, :, :, 0] == 0).all()  # shifted padding column, mirrored


def test_pad_crop_flip_deterministic_for_seed():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a = pad_crop_flip(x, generator=_gen(7))
    b = pad_crop_flip(x, generator=_gen(7))
    c = pad_crop_flip(x, generator=_gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, x.clone())  # input untouched


def test_pad_crop_flip_mix_of_offsets_and_flips():
    n, pad = 200, 4
    x = torch.rand(n, 1, 8, 8) + 0.5  # distinct, nonzero values: each output identifies its (oy, ox, flip)
    y = pad_crop_flip(x, pad=pad, generator=_gen(1))
    seen = []
    for i in range(n):
        keys = _identify(y[i], x[i], pad)
        assert len(keys) == 1
        seen.append(keys[0])
    oys = {k[0] for k in seen}
    oxs = {k[1] for k in seen}
    flips = [k[2] for k in seen]
    assert oys == set(range(2 * pad + 1)) and oxs == set(range(2 * pad + 1))
    assert 0.3 < np.mean(flips) < 0.7


def test_pad_crop_flip_no_flip_and_no_pad():
    x = torch.rand(8, 3, 8, 8) + 0.5
    y = pad_crop_flip(x, pad=0, generator=_gen(0))  # flip only
    for i in range(8):
        assert torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(-1))
    y = pad_crop_flip(x, pad=2, generator=_gen(0), flip=False)
    for i in range(8):
        assert all(not k[2] for k in _identify(y[i], x[i], 2)) and _identify(y[i], x[i], 2)


# ------------------------------------------------------------------------------------------------ Normalizer


def test_normalizer_pixel_mean():
    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    norm = Normalizer("pixel-mean", x, chunk=7)  # chunking must not change the result
    mean_img = x.double().mean(0) / 255
    torch.testing.assert_close(norm.mean, mean_img)
    out = norm(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, (x.double() / 255 - mean_img).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.double().mean(0), torch.zeros(3, 8, 8, dtype=torch.float64), atol=1e-6, rtol=0)
    assert norm(x, dtype=torch.float64).dtype == torch.float64
    same = Normalizer("pixel-mean", x.numpy())  # numpy input
    assert torch.equal(same(x), out)
    assert norm.image_size == (8, 8) and Normalizer("pixel-mean", x[:, :, :, :6]).image_size == (8, 6)


def test_normalizer_channel():
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    norm = Normalizer("channel", x, chunk=9)
    xd = x.double() / 255
    mean = xd.mean((0, 2, 3))
    std = xd.permute(1, 0, 2, 3).reshape(3, -1).std(1, unbiased=False)
    torch.testing.assert_close(norm.mean, mean)
    torch.testing.assert_close(norm.std, std)
    assert norm.image_size is None     # per-channel statistics fit any size
    out = norm(x)
    torch.testing.assert_close(out, ((xd - mean[:, None, None]) / std[:, None, None]).float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.double().mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(out.double().permute(1, 0, 2, 3).reshape(3, -1).std(1, unbiased=False),
                               torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)


def test_normalizer_state_dict_round_trip_and_given_stats():
    x = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8)
    for mode in ("pixel-mean", "channel"):
        norm = Normalizer(mode, x)
        sd = norm.state_dict()
        assert sd["mode"] == mode and all(isinstance(v, (str, torch.Tensor)) for v in sd.values())
        again = Normalizer.from_state_dict(sd)
        assert torch.equal(again(x), norm(x))
    given = Normalizer("channel", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    torch.testing.assert_close(given(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)),
                               torch.full((1, 3, 2, 2), 2.0))
    with pytest.raises(ValueError):
        Normalizer("bogus", x)
    with pytest.raises(ValueError):
        Normalizer("channel")


# ------------------------------------------------------------------------------------------------ DeviceLoader


def _data(n: int = 50):
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(n)  # the label is the sample index: batches reveal which samples they hold
    return images, labels, Normalizer("pixel-mean", images)


def test_loader_batch_is_deterministic_function_of_seed_and_step():
    images, labels, norm = _data()
    a = DeviceLoader(images, labels, 8, "cpu", train=True, normalizer=norm, seed=3)
    b = DeviceLoader(images.numpy(), labels.numpy(), 8, "cpu", train=True, normalizer=norm, seed=3)
    c = DeviceLoader(images, labels, 8, "cpu", train=True, normalizer=norm, seed=4)
    for step in (0, 1, 5, 6, 13, 100):  # steps across epochs, and in an order that jumps back and forth
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (8, 3, 8, 8) and xa.dtype == torch.float32 and ya.dtype == torch.int64
    assert torch.equal(a.batch(2)[0], a.batch(2)[0])  # repeat calls, after other epochs were visited
    assert not torch.equal(a.batch(0)[1], c.batch(0)[1])
    # augmentation: each image is the normalised crop/flip of the uint8 sample its label names
    x, y = a.batch(7)
    raw = a.images[y]
    for i in range(len(y)):
        found = any(torch.allclose(norm(crop[None])[0], x[i]) for crop in _all_crops(raw[i], 4).values())
        assert found


def test_loader_epochs_are_permutations():
    images, labels, norm = _data(50)
    loader = DeviceLoader(images, labels, 8, "cpu", train=True, normalizer=norm, seed=0)
    spe = loader.steps_per_epoch()
    assert spe == len(loader) == 6  # drop_last: 50 // 8
    orders = []
    for epoch in range(3):
        ys = torch.cat([loader.batch(epoch * spe + i)[1] for i in range(spe)])
        assert len(ys) == 48 and len(set(ys.tolist())) == 48  # no repeats within an epoch
        orders.append(ys)
    assert not torch.equal(orders[0], orders[1])
    full = DeviceLoader(images, labels, 8, "cpu", train=True, normalizer=norm, seed=0, drop_last=False)
    assert full.steps_per_epoch() == 7
    for epoch in range(2):
        ys = torch.cat([full.batch(epoch * 7 + i)[1] for i in range(7)])
        assert sorted(ys.tolist()) == list(range(50))
    # iterating a training loader walks epoch after epoch, same batches as batch(step)
    it = DeviceLoader(images, labels, 8, "cpu", train=True, normalizer=norm, seed=0)
    for epoch in range(2):
        got = [y for _, y in it]
        assert len(got) == spe
        assert torch.equal(torch.cat(got), orders[epoch])


def test_loader_eval_covers_all_once_without_augmentation():
    images, labels, norm = _data(50)
    loader = DeviceLoader(images, labels, 16, "cpu", train=False, normalizer=norm)
    assert len(loader) == 4
    batches = list(loader)
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), labels)
    assert torch.equal(torch.cat([x for x, _ in batches]), norm(images))
    assert len(list(loader)) == 4  # iterable again


def test_loader_no_augment_and_channels_last():
    images, labels, norm = _data(32)
    loader = DeviceLoader(images, labels, 8, "cpu", train=True, normalizer=norm, augment=False, channels_last=True,
                          dtype=torch.float64)
    x, y = loader.batch(3)
    assert x.dtype == torch.float64 and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, norm(images[y], dtype=torch.float64))


def test_loader_rejects_bad_input():
    images, labels, norm = _data(10)
    with pytest.raises(ValueError):
        DeviceLoader(images.float(), labels, 4, "cpu", train=True, normalizer=norm)
    with pytest.raises(ValueError):
        DeviceLoader(images, labels[:5], 4, "cpu", train=True, normalizer=norm)
    with pytest.raises(ValueError):
        DeviceLoader(images, labels, 11, "cpu", train=True, normalizer=norm)  # no full batch


def test_no_flip_keeps_every_image_unmirrored():
    """--no-hflip reaches CIFAR training: with pad 0 the crop is the image, so only a flip could change it."""
    images = torch.arange(16 * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(16, 3, 4, 4)
    norm = Normalizer("pixel-mean", images)

    def batches(flip):
        dl = DeviceLoader(images, list(range(16)), 8, "cpu", train=True, normalizer=norm, pad=0, flip=flip)
        return [dl.batch(s) for s in range(6)]
    plain = [norm(images.index_select(0, y), torch.float32) for _, y in batches(False)]
    assert all(torch.equal(x, p) for (x, _), p in zip(batches(False), plain))
    assert not all(torch.equal(x, p) for (x, _), p in zip(batches(True), plain))
