"""Input normalisation, in one place: images (uint8, or float holding 0..255 values) -> network input.

:class:`Normalizer` is used by the CIFAR pipeline (:mod:`resnets.data.augment`), the ImageFolder transforms
(:mod:`resnets.data.imagefolder`), evaluation and ``resnets predict``. Its three modes:

* ``"pixel-mean"`` (the paper's CIFAR, He et al. 2015, Sec. 4.2): ``x/255 - mean`` with the (C, H, W) mean image
  of the training set, in [0, 1] units.
* ``"channel"``: ``(x/255 - mean_c) / std_c`` with per-channel statistics of the training set, in [0, 1] units.
* ``"subtract-mean-255"`` (ImageNet, Sec. 3.4): ``x - mean``, or ``(x - mean) / std`` when a std is given, in
  0..255 units; ``mean`` of shape (C,) (the ImageNet constants of :mod:`resnets.data.imagefolder`) or (C, H, W)
  (a per-pixel mean), given directly, never computed.

One state-dict format, which checkpoints store under ``preprocess.`` (and the shipped weights carry)::

    {"mode": str, "mean": float64 tensor, "std": float64 tensor (absent when there is none)}
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["Normalizer"]

_Stats = torch.Tensor | Sequence[float] | np.ndarray


def _as_uint8_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype != torch.uint8 or t.dim() != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {t.dtype} {tuple(t.shape)}")
    return t


def _float64(x: _Stats) -> torch.Tensor:
    return torch.as_tensor(x if isinstance(x, torch.Tensor) else np.asarray(x), dtype=torch.float64).detach().cpu()


class Normalizer:
    """(N, C, H, W) or (C, H, W) images -> normalised float input (see the module docstring for the modes).

    Statistics come from ``train_images_uint8`` (N, C, H, W) (modes "pixel-mean" and "channel") or are given
    directly as ``mean``/``std`` (shape (C,) or (C, H, W) for the mean, (C,) for the std; [0, 1] units for
    "pixel-mean"/"channel", 0..255 units for "subtract-mean-255"). They are kept in float64 and cast to the
    output dtype once per (device, dtype).

    ``normalizer(images, dtype=None)``: the output dtype is ``dtype``, else the input's if it is a float, else
    float32. Works on one image (C, H, W) (a transform in a torchvision pipeline) or a batch.
    """

    MODES = ("pixel-mean", "channel", "subtract-mean-255")

    def __init__(self, mode: str = "pixel-mean", train_images_uint8: torch.Tensor | np.ndarray | None = None, *,
                 mean: _Stats | None = None, std: _Stats | None = None, chunk: int = 4096):
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
        self.mean = _float64(mean)
        self.std = None if std is None or mode == "pixel-mean" else _float64(std)
        if self.mean.dim() not in (1, 3) or (mode == "channel" and self.mean.dim() != 1):
            shapes = "(C,)" if mode == "channel" else "(C,) or (C, H, W)"
            raise ValueError(f"mode={mode!r} needs a mean of shape {shapes}, got {tuple(self.mean.shape)}")
        if self.std is not None:
            if self.std.shape != (self.mean.shape[0],):
                raise ValueError(f"std must have one value per channel, shape ({self.mean.shape[0]},); "
                                 f"got {tuple(self.std.shape)}")
            if bool((self.std <= 0).any()):
                raise ValueError(f"std must be positive, got {self.std.tolist()}")
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor | None]] = {}

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

    def _constants(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The two tensors ``__call__`` needs, in ``dtype`` on ``device`` (cached)."""
        key = (device, dtype)
        if key not in self._cache:
            mean = self.mean if self.mean.dim() == 3 else self.mean[:, None, None]
            std = None if self.std is None else self.std[:, None, None]
            if self.mode == "subtract-mean-255":
                a, b = mean, std                                            # (x - mean) / std
            elif self.mode == "pixel-mean":
                a, b = torch.full((1, 1, 1), 1.0 / 255.0, dtype=torch.float64), -mean      # scale, shift
            else:
                a, b = 1.0 / (255.0 * std), -mean / std                                   # scale, shift
            self._cache[key] = (a.to(device=device, dtype=dtype),
                                None if b is None else b.to(device=device, dtype=dtype))
        return self._cache[key]

    def __call__(self, images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if dtype is None:
            dtype = images.dtype if images.is_floating_point() else torch.float32
        if self.mean.dim() == 3 and self.mean.shape[1:] != (1, 1) and images.shape[-2:] != self.mean.shape[1:]:
            raise ValueError(f"per-pixel mean of size {tuple(self.mean.shape[1:])} does not match the image size "
                             f"{tuple(images.shape[-2:])}")
        x = images.to(dtype)
        a, b = self._constants(x.device, dtype)
        # Two forms of arithmetic, each exactly as earlier versions computed it (training must stay bit-identical,
        # so do not rewrite one into the other): 0..255 units subtract, then divide; [0, 1] units are one fused
        # x * scale + shift (pixel-mean: x/255 - mean; channel: (x/255 - mean)/std).
        if self.mode == "subtract-mean-255":
            out = x - a
            return out if b is None else out / b
        return torch.addcmul(b, x, a)

    def state_dict(self) -> dict[str, torch.Tensor | str]:
        sd: dict[str, torch.Tensor | str] = {"mode": self.mode, "mean": self.mean.clone()}  # float64: exact
        if self.std is not None:
            sd["std"] = self.std.clone()
        return sd

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(H, W) of the per-pixel mean: the size the statistics were taken at, so the size the images must have
        (a net's training resolution); None for per-channel statistics, which fit any size."""
        return (int(self.mean.shape[1]), int(self.mean.shape[2])) if self.mean.dim() == 3 else None

    @classmethod
    def from_state_dict(cls, state: dict) -> "Normalizer":
        """The inverse of :meth:`state_dict`; reads the ``preprocess`` of every checkpoint resnets has written."""
        return cls(str(state["mode"]), mean=state["mean"], std=state.get("std"))

    def __repr__(self) -> str:
        std = "" if self.std is None else f", std={[round(v, 4) for v in self.std.tolist()]}"
        return f"Normalizer(mode={self.mode!r}, mean shape={tuple(self.mean.shape)}{std})"
