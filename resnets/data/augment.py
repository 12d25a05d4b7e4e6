"""The paper's CIFAR input pipeline as batched tensor operations on the data's device.

He et al. 2015, Sec. 4.2: "4 pixels are padded on each side, and a 32x32 crop is randomly sampled from the padded
image or its horizontal flip"; inputs are normalised by subtracting the per-pixel mean (``Normalizer("pixel-mean")``)
or, as is common today, by per-channel mean/std (``Normalizer("channel")``; :mod:`resnets.data.normalize`).

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

from .normalize import Normalizer, _as_uint8_tensor

__all__ = ["pad_crop_flip", "crop_flip", "Normalizer", "DeviceLoader"]


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
    draws = torch.stack([torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gen_device),
                         torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gen_device)]
                        + ([torch.randint(0, 2, (b,), generator=generator, device=gen_device)] if flip else []))
    draws = to_device(draws, images.device)
    return crop_flip(images, draws[0], draws[1], draws[2].bool() if flip else None, pad)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; from the CPU to a GPU through pinned memory, without blocking. A plain ``.to("cuda")``
    of a CPU tensor waits for the GPU to finish all the work queued before it, so the GPU would idle while the
    next batch is built, once per copy: every step of every run side by side."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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
                 dtype: torch.dtype = torch.float32, pad: int = 4, flip: bool = True):
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
        self.flip = bool(flip)
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
            self._perm = to_device(torch.randperm(self.n, generator=g), self.device)
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

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) normalised to ``dtype`` and int64 labels (B,) of step ``step``."""
        idx = self.indices(step)
        if isinstance(idx, slice):
            x, y = self.images[idx], self.labels[idx]
        else:
            x, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)
        if self.train and self.augment:
            g = torch.Generator().manual_seed(_seed_for(self.seed, _AUG_STREAM, step))
            x = pad_crop_flip(x, self.pad, generator=g, flip=self.flip)
        x = self.normalizer(x, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
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
