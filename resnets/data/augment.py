"""The paper's CIFAR input pipeline as batched tensor operations on the data's device.

He et al. 2015, Sec. 4.2: "4 pixels are padded on each side, and a 32x32 crop is randomly sampled from the padded
image or its horizontal flip"; inputs are normalised by subtracting the per-pixel mean (``Normalizer("pixel-mean")``)
or, as is common today, by per-channel mean/std (``Normalizer("channel")``).

Usage::

    norm = Normalizer("pixel-mean", data.train_images)
    train = DeviceLoader(data.train_images, data.train_labels, 128, "cuda", train=True, normalizer=norm, seed=0)
    for step in range(start_step, total_steps):     # exact resume: batch(step) depends only on (seed, step)
        x, y = train.batch(step)
    test = DeviceLoader(data.test_images, data.test_labels, 1000, "cuda", train=False, normalizer=norm)
    for x, y in test: ...

No per-image Python loops: a whole batch is cropped/flipped with one gather, normalised with one fused op.
``DeviceLoader`` augments the uint8 images first and normalises after (as torchvision's RandomCrop + Normalize do),
so the padding is black (0) before normalisation.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = ["pad_crop_flip", "crop_flip", "Normalizer", "DeviceLoader"]


def _as_uint8_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype != torch.uint8 or t.dim() != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {t.dtype} {tuple(t.shape)}")
    return t


def pad_crop_flip(images: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None,
                  flip: bool = True) -> torch.Tensor:
    """Zero-pad each image by ``pad`` pixels, take a random HxW crop and flip it horizontally with p=0.5.

    ``images``: (B, C, H, W), any dtype, any device; the result has the same dtype, shape and device. Every image
    gets its own crop offset and flip, drawn from ``generator`` (a CPU generator is fine: the few random numbers
    are moved to the images' device). Implemented as a single ``gather`` over the padded batch.
    """
    if images.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got shape {tuple(images.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    b = images.shape[0]
    if b == 0 or (pad == 0 and not flip):
        return images.clone()
    gen_device = generator.device if generator is not None else torch.device("cpu")
    dev = images.device
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gen_device).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gen_device).to(dev)
    flips = torch.randint(0, 2, (b,), generator=generator, device=gen_device).to(dev).bool() if flip else None
    return crop_flip(images, oy, ox, flips, pad)


def crop_flip(images: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flips: torch.Tensor | None,
              pad: int) -> torch.Tensor:
    """The deterministic core of :func:`pad_crop_flip`: image ``i`` is cropped at ``(oy[i], ox[i])`` (top-left
    corner, 0..2*pad) of its zero-padded version, then mirrored left-right where ``flips[i]`` is true."""
    b, c, h, w = images.shape
    dev = images.device
    oy, ox = oy.to(dev, torch.int64), ox.to(dev, torch.int64)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad)) if pad else images
    wp = w + 2 * pad
    rows = oy[:, None] + torch.arange(h, device=dev)[None, :]        # (B, H) rows of the padded image
    cols = ox[:, None] + torch.arange(w, device=dev)[None, :]        # (B, W) columns
    if flips is not None:
        cols = torch.where(flips.to(dev, torch.bool)[:, None], cols.flip(1), cols)
    idx = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w)
    out = torch.gather(padded.reshape(b, c, -1), 2, idx.expand(b, c, h * w))
    return out.view(b, c, h, w)


class Normalizer:
    """uint8 NCHW images -> normalised float input.

    ``mode="pixel-mean"`` (the paper): ``x/255 - mean_image`` with the (C, H, W) mean image of the training set.
    ``mode="channel"``: ``(x/255 - mean_c) / std_c`` with per-channel statistics of the training set.
    ``mode="subtract-mean-255"`` (ImageFolder runs, :class:`resnets.data.imagefolder.SubtractMean`): ``x - mean``,
    or ``(x - mean) / std`` when a std is given, all in 0..255 pixel units; given directly, never computed.
    Statistics come from ``train_images_uint8`` (N, C, H, W) or are given directly (``mean``/``std`` in [0, 1]
    units: shape (C,) or (C, H, W) for the mean, (C,) for std).
    """

    MODES = ("pixel-mean", "channel", "subtract-mean-255")

    def __init__(self, mode: str = "pixel-mean", train_images_uint8: torch.Tensor | np.ndarray | None = None, *,
                 mean: torch.Tensor | Sequence[float] | np.ndarray | None = None,
                 std: torch.Tensor | Sequence[float] | np.ndarray | None = None, chunk: int = 4096):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if train_images_uint8 is not None:
            if mode == "subtract-mean-255":
                raise ValueError("mode='subtract-mean-255' takes mean (and std) directly, in 0..255 units")
            if mean is not None or std is not None:
                raise ValueError("give either train_images_uint8 or mean/std, not both")
            mean, std = self._statistics(_as_uint8_tensor(train_images_uint8), mode, chunk)
        elif mean is None or (mode == "channel" and std is None):
            raise ValueError("Normalizer needs train_images_uint8, or mean (and std for mode='channel')")
        self.mean = torch.as_tensor(np.asarray(mean) if not isinstance(mean, torch.Tensor) else mean,
                                    dtype=torch.float64).detach().cpu()
        self.std = None
        if mode == "subtract-mean-255":
            if std is not None:
                self.std = torch.as_tensor(np.asarray(std) if not isinstance(std, torch.Tensor) else std,
                                           dtype=torch.float64).detach().cpu()
                if self.std.shape != (self.mean.shape[0],) or bool((self.std <= 0).any()):
                    raise ValueError("std must be positive, one per channel")
            if self.mean.dim() not in (1, 3):
                raise ValueError("mode='subtract-mean-255' needs a mean of shape (C,) or (C, H, W)")
        elif mode == "channel":
            self.std = torch.as_tensor(np.asarray(std) if not isinstance(std, torch.Tensor) else std,
                                       dtype=torch.float64).detach().cpu()
            if self.mean.dim() != 1 or self.std.shape != self.mean.shape:
                raise ValueError("mode='channel' needs mean and std of shape (C,)")
            if bool((self.std <= 0).any()):
                raise ValueError("std must be positive")
        elif self.mean.dim() not in (1, 3):
            raise ValueError("mode='pixel-mean' needs a mean of shape (C, H, W) (or (C,))")
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _statistics(x: torch.Tensor, mode: str, chunk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = x.shape[0]
        if n == 0:
            raise ValueError("cannot compute statistics of an empty image set")
        if mode == "pixel-mean":
            acc = torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device)
            for part in x.split(chunk):
                acc += part.sum(0, dtype=torch.float64)
            return (acc / (255.0 * n)).cpu(), None
        c = x.shape[1]
        s1 = torch.zeros(c, dtype=torch.float64, device=x.device)
        s2 = torch.zeros(c, dtype=torch.float64, device=x.device)
        for part in x.split(chunk):
            p = part.to(torch.float64)
            s1 += p.sum((0, 2, 3))
            s2 += (p * p).sum((0, 2, 3))
        count = n * x.shape[2] * x.shape[3]
        mean = s1 / count
        var = (s2 / count - mean * mean).clamp_min(0)
        return (mean / 255.0).cpu(), (var.sqrt() / 255.0).cpu()

    def _scale_shift(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            mean = self.mean if self.mean.dim() == 3 else self.mean[:, None, None]
            if self.mode == "pixel-mean":
                scale = torch.full((1, 1, 1), 1.0 / 255.0, dtype=torch.float64)
                shift = -mean
            elif self.mode == "subtract-mean-255":
                std = torch.ones(1, 1, 1, dtype=torch.float64) if self.std is None else self.std[:, None, None]
                scale, shift = 1.0 / std, -mean / std
            else:
                std = self.std[:, None, None]
                scale = 1.0 / (255.0 * std)
                shift = -mean / std
            self._cache[key] = (scale.to(device=device, dtype=dtype), shift.to(device=device, dtype=dtype))
        return self._cache[key]

    def __call__(self, images_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale, shift = self._scale_shift(images_uint8.device, dtype)
        # x * scale + shift, in one fused op: pixel-mean -> x/255 - mean; channel -> (x/255 - mean)/std
        return torch.addcmul(shift, images_uint8.to(dtype), scale)

    def state_dict(self) -> dict[str, torch.Tensor | str]:
        sd: dict[str, torch.Tensor | str] = {"mode": self.mode, "mean": self.mean.clone()}  # float64: exact
        if self.std is not None:
            sd["std"] = self.std.clone()
        return sd

    @classmethod
    def from_state_dict(cls, state: dict) -> "Normalizer":
        return cls(str(state["mode"]), mean=state["mean"], std=state.get("std"))

    def __repr__(self) -> str:
        return f"Normalizer(mode={self.mode!r}, mean shape={tuple(self.mean.shape)})"


def _seed_for(*words: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers (so (seed, epoch) streams do not overlap)."""
    return int(np.random.SeedSequence([int(w) & 0xFFFFFFFFFFFFFFFF for w in words]).generate_state(
        1, dtype=np.uint64)[0] >> np.uint64(1))


_PERM_STREAM, _AUG_STREAM = 0, 1


class DeviceLoader:
    """The whole uint8 dataset lives as one tensor on `device`; batches are augmented there.

    Training (``train=True``): ``batch(step)`` is a pure function of ``(seed, step)``: epoch ``step //
    steps_per_epoch()`` uses a random permutation drawn from a generator seeded by ``(seed, epoch)``, and the
    crop/flip randomness comes from a generator seeded by ``(seed, step)``. Resuming at step k is just asking for
    ``batch(k)``. Iterating a training loader yields the batches of the next epoch (``self.epoch``, starting at 0).

    Evaluation (``train=False``): iteration yields sequential batches over all samples, the last one partial, without
    augmentation.
    """

    def __init__(self, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | Sequence[int],
                 batch_size: int, device: torch.device | str, *, train: bool, normalizer: Normalizer,
                 seed: int = 0, augment: bool = True, drop_last: bool = True, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32, pad: int = 4):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.images = _as_uint8_tensor(images).to(self.device).contiguous()
        lab = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
        self.labels = lab.to(device=self.device, dtype=torch.int64).contiguous()
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")
        self.n = self.images.shape[0]
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.normalizer = normalizer
        self.seed = int(seed)
        self.augment = bool(augment)
        self.drop_last = bool(drop_last)
        self.channels_last = bool(channels_last)
        self.dtype = dtype
        self.pad = int(pad)
        self.epoch = 0
        if self.steps_per_epoch() == 0:
            raise ValueError(f"{self.n} samples give no full batch of {batch_size} (use drop_last=False)")
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def steps_per_epoch(self) -> int:
        if self.train and self.drop_last:
            return self.n // self.batch_size
        return math.ceil(self.n / self.batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch()

    def permutation(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch`` (on the device); cached, so it is computed once per epoch."""
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(_seed_for(self.seed, _PERM_STREAM, epoch))
            self._perm = torch.randperm(self.n, generator=g).to(self.device)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor | slice:
        """Which samples make up ``batch(step)``: a tensor of indices (training) or a slice (evaluation)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        spe = self.steps_per_epoch()
        if not self.train:
            if step >= spe:
                raise IndexError(f"step {step} out of range for {spe} evaluation batches")
            return slice(step * self.batch_size, min((step + 1) * self.batch_size, self.n))
        epoch, i = divmod(step, spe)
        return self.permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

    def batch(self, step: int, out: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) normalised to ``dtype`` and int64 labels (B,) of step ``step``.

        ``out=(x_buf, y_buf)`` copies the batch into the given tensors (e.g. the static inputs of a captured CUDA
        graph) and returns them.
        """
        idx = self.indices(step)
        if isinstance(idx, slice):
            x, y = self.images[idx], self.labels[idx]
        else:
            x, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)
        if self.train and self.augment:
            g = torch.Generator().manual_seed(_seed_for(self.seed, _AUG_STREAM, step))
            x = pad_crop_flip(x, self.pad, generator=g)
        x = self.normalizer(x, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if out is not None:
            x_buf, y_buf = out
            if x_buf.shape != x.shape or y_buf.shape != y.shape:
                raise ValueError(f"out buffers {tuple(x_buf.shape)}/{tuple(y_buf.shape)} do not fit batch "
                                 f"{tuple(x.shape)}/{tuple(y.shape)} (a partial batch? use drop_last=True)")
            x_buf.copy_(x)
            y_buf.copy_(y)
            return x_buf, y_buf
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        spe = self.steps_per_epoch()
        if not self.train:
            for step in range(spe):
                yield self.batch(step)
            return
        epoch = self.epoch
        self.epoch += 1
        for i in range(spe):
            yield self.batch(epoch * spe + i)

    def __repr__(self) -> str:
        return (f"DeviceLoader(n={self.n}, batch_size={self.batch_size}, device={self.device}, train={self.train}, "
                f"augment={self.augment}, steps_per_epoch={self.steps_per_epoch()})")
