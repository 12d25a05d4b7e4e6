"""ImageNet-layout data: an ImageFolder dataset decoded with :mod:`torchvision.io`, the paper's training
augmentation as :mod:`torchvision.transforms.v2` transforms, the 10-crop and multi-scale test protocols, and a
DataLoader builder.

He et al. 2015, Sec. 3.4 (ImageNet): "The image is resized with its shorter side randomly sampled in [256, 480]
for scale augmentation. A 224x224 crop is randomly sampled from an image or its horizontal flip, with the per-pixel
mean subtracted. The standard color augmentation in [Krizhevsky et al. 2012] is used." Testing: "For comparison
studies we adopt the standard 10-crop testing. For best results, we adopt the fully-convolutional form as in
[Simonyan & Zisserman] and average the scores at multiple scales (images are resized such that the shorter side is
in {224, 256, 384, 480, 640})."

Pixel units: everything here works in 0..255 pixel units (uint8 images, or float32 holding 0..255 values), as in
the paper's Caffe pipeline; the mean is subtracted by a ``Normalizer("subtract-mean-255")``
(:func:`imagenet_normalizer`, :mod:`resnets.data.normalize`): ``x - mean`` (or ``(x - mean) / std``) in those units.

Usage::

    from resnets.data.imagefolder import (ImageFolderDataset, paper_train_transform, standard_eval_transform,
                                          make_loader, ten_crop_predict, imagenet_normalizer)
    train = ImageFolderDataset("imagenet/train", transform=paper_train_transform(), skip_bad_files=True)
    loader = make_loader(train, 256, train=True, num_workers=8)
    val = ImageFolderDataset("imagenet/val")                   # uint8 (3, H, W), any size
    scores = ten_crop_predict(model, val[0][0], normalize=imagenet_normalizer())

Only the standard library, torch, torchvision, numpy and Pillow are used (Pillow only to *write* test images).
Note: torchvision 0.29 deprecates the torchvision.io image decoders (in favour of TorchCodec) and emits a
DeprecationWarning on each decode (hidden by Python's default warning filters; the tests filter it out).
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .normalize import Normalizer

__all__ = [
    "IMG_EXTENSIONS",
    "IMAGENET_MEAN_255",
    "IMAGENET_STD_255",
    "IMAGENET_PCA_EIGVAL",
    "IMAGENET_PCA_EIGVEC",
    "BadImageError",
    "BadImageWarning",
    "decode_image_bytes",
    "ImageFolderDataset",
    "RandomShortSideResize",
    "PCALighting",
    "imagenet_normalizer",
    "paper_train_transform",
    "random_resized_transform",
    "standard_eval_transform",
    "ten_crop_views",
    "ten_crop_predict",
    "multiscale_predict",
    "ImageCollate",
    "make_loader",
    "write_random_imagefolder",
]

#: File name endings (case-insensitive) that torchvision.io.decode_image can decode.
IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".gif")

#: Per-channel ImageNet RGB mean in 0..255 units: the usual (0.485, 0.456, 0.406) * 255. The paper subtracts the
#: per-*pixel* mean of the training images; this per-channel mean is the common approximation of it.
IMAGENET_MEAN_255: tuple[float, float, float] = (123.675, 116.28, 103.53)
#: Per-channel ImageNet RGB standard deviation in 0..255 units, (0.229, 0.224, 0.225) * 255. The paper does not
#: divide by a std; it is here for the common modern variant.
IMAGENET_STD_255: tuple[float, float, float] = (58.395, 57.12, 57.375)

#: Eigenvalues / eigenvectors (columns) of the 3x3 covariance of ImageNet RGB pixels in [0, 1] units, as widely used
#: for the "PCA lighting" colour augmentation of Krizhevsky, Sutskever & Hinton 2012 (AlexNet, Sec. 4.1).
IMAGENET_PCA_EIGVAL: tuple[float, float, float] = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC: tuple[tuple[float, float, float], ...] = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


class BadImageError(RuntimeError):
    """An image file could not be read or decoded. ``path`` names the file (it is also in the message)."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class BadImageWarning(UserWarning):
    """Issued (once per file and process) when ``skip_bad_files=True`` skips an unreadable image."""


# ----------------------------------------------------------------------------------------------------------------
# decoding and the dataset
# ----------------------------------------------------------------------------------------------------------------

def _as_byte_tensor(data: bytes | bytearray | memoryview | torch.Tensor) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise ValueError(f"encoded image must be a 1-D uint8 tensor, got {data.dtype} {tuple(data.shape)}")
        return data
    if len(data) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _to_rgb_uint8(img: torch.Tensor) -> torch.Tensor:
    if img.dim() == 4:                     # animated GIF: (frames, C, H, W) -> first frame
        img = img[0]
    if img.dtype != torch.uint8:           # 16-bit PNG
        img = F.to_dtype(img, torch.uint8, scale=True)
    return img


def decode_image_bytes(data: bytes | bytearray | memoryview | torch.Tensor, path: str | None = None) -> torch.Tensor:
    """Decode encoded image bytes (JPEG, PNG, WebP, GIF) to a uint8 (3, H, W) RGB tensor with
    ``torchvision.io.decode_image(mode=RGB)``: grayscale, CMYK, RGBA (alpha dropped) and palette images all become
    3-channel; 16-bit PNGs are scaled to 8 bits; an animated GIF gives its first frame; a photo's EXIF orientation
    is applied (upright, as `resnets predict` and image viewers show it).
    Raises :class:`BadImageError` (naming ``path`` if given) when the bytes cannot be decoded."""
    where = f" {path!r}" if path is not None else ""
    data = _as_byte_tensor(data)
    if data.numel() == 0:
        raise BadImageError(f"image file{where} is empty", path)
    try:
        img = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError) as e:
        reason = re.sub(r"^.*?\.(?:cpp|h):\d+,\s*", "", str(e).strip().splitlines()[-1] if str(e).strip() else repr(e))
        raise BadImageError(f"cannot decode image file{where}: {reason}", path) from e
    img = _to_rgb_uint8(img)
    if img.dim() != 3 or img.shape[0] != 3 or img.shape[1] == 0 or img.shape[2] == 0:
        raise BadImageError(f"decoded image{where} has unexpected shape {tuple(img.shape)}", path)
    return img


class ImageFolderDataset(Dataset):
    """Images in the layout ``root/CLASS/.../NAME.ext`` (ImageNet's train folder and the usual val re-layout).

    Class index = position of the class folder in sorted order (``classes``, ``class_to_idx``); ``samples`` is the
    sorted list of ``(path, class_index)``; ``targets`` the labels. Hidden files and folders are ignored, file
    endings are matched case-insensitively (ImageNet uses ``.JPEG``), sub-folders of a class folder are included.

    ``dataset[i]`` reads the file's bytes, decodes them with torchvision.io (:func:`decode_image_bytes`: always
    uint8 (3, H, W) RGB) and returns ``(transform(image), label)``.

    An unreadable or corrupt file raises :class:`BadImageError` naming the file. With ``skip_bad_files=True`` it is
    skipped instead: a :class:`BadImageWarning` naming the file is issued once (per process; each DataLoader worker
    is a process) and the next readable sample (index ``i+1``, ``i+2``, ... wrapping around) is returned with *its*
    label, so a given index always maps to the same sample. With ``skip_bad_files="drop"`` (evaluation: no image
    may count twice) such a sample is ``None``, which :class:`ImageCollate` leaves out of its batch. Raises
    FileNotFoundError if ``root`` is missing, has no
    class folders, has no images, or (unless ``allow_empty_classes``) a class folder has no images.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[torch.Tensor], Any] | None = None,
                 skip_bad_files: bool = False, extensions: Sequence[str] = IMG_EXTENSIONS, *,
                 allow_empty_classes: bool = False):
        self.root = str(root)
        self.transform = transform
        if skip_bad_files not in (True, False, "drop"):
            raise ValueError(f"skip_bad_files must be True, False or 'drop', got {skip_bad_files!r}")
        self.skip_bad_files = skip_bad_files
        if isinstance(extensions, str):     # one ending, not its letters
            extensions = (extensions,)
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if not self.extensions:
            raise ValueError("extensions must not be empty")
        if not os.path.exists(self.root):
            raise FileNotFoundError(f"image folder root {self.root!r} does not exist")
        if not os.path.isdir(self.root):
            raise NotADirectoryError(f"image folder root {self.root!r} is not a directory")
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise FileNotFoundError(f"no class folders in {self.root!r} (expected root/CLASS/image files)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        empty = []
        for c in self.classes:
            files = self._list_images(os.path.join(self.root, c))
            if not files:
                empty.append(c)
            self.samples.extend((f, self.class_to_idx[c]) for f in files)
        if not self.samples:
            raise FileNotFoundError(f"no image files with endings {self.extensions} under {self.root!r} "
                                    f"({len(self.classes)} class folders, all empty)")
        if empty and not allow_empty_classes:
            raise FileNotFoundError(f"{len(empty)} class folder(s) under {self.root!r} contain no images with endings "
                                    f"{self.extensions}: {empty[:5]}{' ...' if len(empty) > 5 else ''} "
                                    f"(pass allow_empty_classes=True to accept)")
        self.targets = [t for _, t in self.samples]
        self._bad: set[int] = set()         # per process: indices found unreadable (with skip_bad_files)

    def _list_images(self, folder: str) -> list[str]:
        out = []
        seen = set()        # linked folders are followed once: a link back up would list its images again

        def unreadable(e: OSError) -> None:     # a folder the scan cannot enter would drop its images silently
            raise PermissionError(f"cannot list {e.filename!r} under {self.root!r}: {e.strerror}") from e

        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unreadable):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out.extend(os.path.join(dirpath, f) for f in filenames
                       if not f.startswith(".") and f.lower().endswith(self.extensions))
        return sorted(out)

    def __len__(self) -> int:
        return len(self.samples)

    def read_bytes(self, index: int) -> torch.Tensor:
        """The raw file contents of sample ``index`` as a 1-D uint8 tensor (BadImageError if unreadable)."""
        path = self.samples[index][0]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BadImageError(f"cannot read image file {path!r}: {e}", path) from e
        if not data:
            raise BadImageError(f"image file {path!r} is empty", path)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def load(self, index: int) -> torch.Tensor:
        """Sample ``index`` decoded to uint8 (3, H, W) RGB, without transform and without skipping."""
        return decode_image_bytes(self.read_bytes(index), self.samples[index][0])

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        drop = self.skip_bad_files == "drop"
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                if drop:
                    return None
                continue
            try:
                img = self.load(i)
            except BadImageError as e:
                if not self.skip_bad_files:
                    raise
                self._bad.add(i)
                warnings.warn(f"leaving out unreadable image: {e}" if drop else
                              f"skipping unreadable image (using the next sample instead): {e}", BadImageWarning,
                              stacklevel=2)
                if drop:
                    return None
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, self.samples[i][1]
        raise BadImageError(f"none of the {n} image files under {self.root!r} could be decoded", self.root)

    def find_bad_files(self) -> list[str]:
        """Decode every file (slow for ImageNet) and return the paths that fail; a pre-flight check."""
        bad = []
        for i, (path, _) in enumerate(self.samples):
            try:
                self.load(i)
            except BadImageError:
                bad.append(path)
        return bad

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, classes={len(self.classes)}, samples={len(self)}, "
                f"skip_bad_files={self.skip_bad_files}, transform={self.transform!r})")


# ----------------------------------------------------------------------------------------------------------------
# transforms (torchvision.transforms.v2 compatible)
# ----------------------------------------------------------------------------------------------------------------

def _is_plain_image(inpt: Any) -> bool:
    """Image-like tensors that colour transforms act on: tv_tensors.Image or a pure tensor (v2 treats a lone pure
    tensor as the image); boxes, masks, videos etc. are passed through."""
    return isinstance(inpt, tv_tensors.Image) or type(inpt) is torch.Tensor


def _rewrap(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return tv_tensors.wrap(out, like=like) if isinstance(like, tv_tensors.TVTensor) else out


class RandomShortSideResize(v2.Transform):
    """Scale augmentation (He et al. 2015, Sec. 3.4): resize so that the shorter side is an integer drawn uniformly
    from ``[min_size, max_size]`` (both included; the paper uses [256, 480]), keeping the aspect ratio. The size is
    drawn with ``torch.randint`` (so ``torch.manual_seed`` / DataLoader worker seeding make it reproducible) and
    applied to all inputs of one call (images, boxes, masks) alike."""

    def __init__(self, min_size: int = 256, max_size: int = 480,
                 interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR, antialias: bool = True):
        super().__init__()
        if not 1 <= int(min_size) <= int(max_size):
            raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = int(min_size), int(max_size)
        self.interpolation = interpolation
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"size": int(torch.randint(self.min_size, self.max_size + 1, (1,)).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, [params["size"]], interpolation=self.interpolation, antialias=self.antialias)

    _get_params = make_params        # torchvision < 0.21 names
    _transform = transform

    def extra_repr(self) -> str:
        return f"min_size={self.min_size}, max_size={self.max_size}, interpolation={self.interpolation}"


class PCALighting(v2.Transform):
    """The colour augmentation of Krizhevsky, Sutskever & Hinton 2012 (AlexNet, Sec. 4.1), used by He et al. 2015:
    add ``eigvec @ (alpha * eigval)`` to every RGB pixel, with ``alpha ~ N(0, alphastd^2)`` drawn once per call
    (``torch.randn(3)``) and eigval/eigvec the principal components of the RGB pixel covariance (ImageNet values
    :data:`IMAGENET_PCA_EIGVAL`, :data:`IMAGENET_PCA_EIGVEC`, which are for pixels in [0, 1]).

    The offset is multiplied by ``max_value``: the pixel value of white in the input's units, by default 255 for
    uint8 and 1.0 for float inputs (pass ``max_value=255`` for float images holding 0..255 values). uint8 images
    are rounded and clamped back to uint8; float images are not clamped (as in the reference implementations).
    Acts on (..., 3, H, W) image tensors (tv_tensors.Image or a pure tensor); other inputs pass through."""

    def __init__(self, alphastd: float = 0.1, eigval: Sequence[float] = IMAGENET_PCA_EIGVAL,
                 eigvec: Sequence[Sequence[float]] = IMAGENET_PCA_EIGVEC, max_value: float | None = None):
        super().__init__()
        if alphastd < 0:
            raise ValueError("alphastd must be >= 0")
        self.alphastd = float(alphastd)
        self.eigval = torch.as_tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.as_tensor(eigvec, dtype=torch.float32)
        if self.eigval.shape != (3,) or self.eigvec.shape != (3, 3):
            raise ValueError("eigval must have shape (3,) and eigvec (3, 3)")
        self.max_value = max_value

    def offset(self, alpha: torch.Tensor) -> torch.Tensor:
        """The per-channel RGB offset (in [0, 1] units) for coefficients ``alpha`` (shape (3,))."""
        return self.eigvec @ (alpha.to(torch.float32) * self.eigval)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        alpha = torch.randn(3) * self.alphastd
        return {"alpha": alpha, "rgb": self.offset(alpha)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor):
            if hasattr(inpt, "getbands"):
                raise TypeError("PCALighting needs tensor images; put v2.PILToTensor() before it")
            return inpt
        if not _is_plain_image(inpt) or self.alphastd == 0:
            return inpt
        if inpt.dim() < 3 or inpt.shape[-3] != 3:
            raise ValueError(f"PCALighting needs RGB images (..., 3, H, W), got shape {tuple(inpt.shape)}")
        is_float = inpt.is_floating_point()
        scale = self.max_value if self.max_value is not None else (1.0 if is_float else 255.0)
        rgb = (params["rgb"] * scale).to(inpt.device).view(3, 1, 1)
        x = inpt.as_subclass(torch.Tensor)
        if is_float:
            out = x + rgb.to(x.dtype)
        else:
            out = (x.to(torch.float32) + rgb).round_().clamp_(0, torch.iinfo(x.dtype).max).to(x.dtype)
        return _rewrap(out, inpt)

    _get_params = make_params
    _transform = transform

    def extra_repr(self) -> str:
        return f"alphastd={self.alphastd}, max_value={self.max_value}"


def imagenet_normalizer(divide_by_std: bool = False) -> Normalizer:
    """The per-channel ImageNet mean (:data:`IMAGENET_MEAN_255`) subtracted in 0..255 units: the common
    approximation of the paper's per-pixel mean; ``divide_by_std`` also divides by :data:`IMAGENET_STD_255` (the
    modern variant). For the paper's exact per-pixel mean, pass ``Normalizer("subtract-mean-255", mean=m)`` with
    ``m`` the (3, crop, crop) mean of your training images in 0..255 units."""
    return Normalizer("subtract-mean-255", mean=IMAGENET_MEAN_255, std=IMAGENET_STD_255 if divide_by_std else None)


def paper_train_transform(normalizer: Normalizer | None = None, *, min_size: int = 256, max_size: int = 480,
                          crop: int = 224, alphastd: float = 0.1, hflip: bool = True) -> v2.Compose:
    """The ImageNet training augmentation of He et al. 2015, Sec. 3.4, on uint8 (3, H, W) images:

    1. :class:`RandomShortSideResize` (shorter side uniform in [256, 480]; scale augmentation),
    2. a random 224x224 crop, 3. horizontal flip with p = 0.5,
    4. :class:`PCALighting` (alphastd 0.1; AlexNet's colour augmentation, on float 0..255 values),
    5. mean subtraction by ``normalizer``, by default :func:`imagenet_normalizer` ``()``: the per-channel ImageNet
       mean * 255, the common approximation of the paper's per-pixel mean (see there for the exact one).

    Output: float32 (3, crop, crop) in 0..255 units minus the mean. ``min_size``, ``max_size``, ``crop``,
    ``alphastd`` and ``hflip`` (False: no step 3) are exposed for experiments; the defaults are the paper's."""
    return v2.Compose([
        RandomShortSideResize(min_size, max_size),
        v2.RandomCrop(crop, pad_if_needed=True),
        *([v2.RandomHorizontalFlip(0.5)] if hflip else []),
        v2.ToDtype(torch.float32, scale=False),
        PCALighting(alphastd, max_value=255.0),
        imagenet_normalizer() if normalizer is None else normalizer,
    ])


def random_resized_transform(normalizer: Normalizer, crop: int, min_area: float, hflip: bool,
                             alphastd: float = 0.0):
    """Fine-tuning's training crops (not the paper): a random part of the image (``min_area`` to all of its area,
    aspect 3/4 to 4/3) resized to ``crop`` x ``crop``, a horizontal flip if ``hflip``, PCA lighting if
    ``alphastd`` > 0, then ``normalizer``."""
    steps = [v2.RandomResizedCrop(crop, scale=(min_area, 1.0), antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.ToDtype(torch.float32, scale=False))
    if alphastd > 0:
        steps.append(PCALighting(alphastd, max_value=255.0))
    return v2.Compose([*steps, normalizer])


def standard_eval_transform(resize: int = 256, crop: int = 224, normalizer: Normalizer | None = None) -> v2.Compose:
    """Single-centre-crop evaluation: shorter side resized to ``resize``, centre ``crop`` x ``crop`` crop, float32,
    mean subtracted as in :func:`paper_train_transform` (same ``normalizer`` default)."""
    return v2.Compose([
        v2.Resize(resize, antialias=True),
        v2.CenterCrop(crop),
        v2.ToDtype(torch.float32, scale=False),
        imagenet_normalizer() if normalizer is None else normalizer,
    ])


# ----------------------------------------------------------------------------------------------------------------
# evaluation protocols
# ----------------------------------------------------------------------------------------------------------------

def _model_device_dtype(model: torch.nn.Module, fallback: torch.device) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return fallback, torch.float32


def _image_list(images: torch.Tensor | Sequence[torch.Tensor]) -> tuple[list[torch.Tensor] | torch.Tensor, bool]:
    """-> (batch tensor (N, C, H, W) or list of (C, H, W), whether the input was a single image)."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            return images.unsqueeze(0), True
        if images.dim() == 4:
            return images, False
        raise ValueError(f"expected an image (C, H, W) or a batch (N, C, H, W), got shape {tuple(images.shape)}")
    imgs = list(images)
    if not imgs or any(not isinstance(t, torch.Tensor) or t.dim() != 3 for t in imgs):
        raise ValueError("expected a non-empty sequence of (C, H, W) image tensors")
    return imgs, False


def _average(outputs: torch.Tensor, average: str) -> torch.Tensor:
    """outputs (N, V, K) per view -> (N, K) mean of softmax scores or of logits."""
    outputs = outputs.float()
    if average == "softmax":
        outputs = outputs.softmax(dim=-1)
    return outputs.mean(dim=1)


def _check_average(average: str) -> None:
    if average not in ("softmax", "logits"):
        raise ValueError(f"average must be 'softmax' or 'logits', got {average!r}")


class _EvalMode:
    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()
        self._grad = torch.no_grad()
        self._grad.__enter__()

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        self.model.train(self.was_training)


def ten_crop_views(images: torch.Tensor | Sequence[torch.Tensor], crop: int = 224,
                   resize: int | None = 256) -> torch.Tensor:
    """The 10 test views of Krizhevsky et al. 2012: shorter side resized to ``resize`` (None: no resize), the four
    corner and the centre ``crop`` x ``crop`` crops, and the same five crops of the horizontally flipped image
    (order of ``torchvision.transforms.v2.functional.ten_crop``). Input: (C, H, W), (N, C, H, W) or a list of
    differently sized (C, H, W) images, uint8 or float. Output: (N, 10, C, crop, crop), the input's dtype."""
    batch, _ = _image_list(images)
    parts = [batch] if isinstance(batch, torch.Tensor) else [t.unsqueeze(0) for t in batch]
    out = []
    for x in parts:
        if resize is not None:
            x = F.resize(x, [int(resize)], antialias=True)
        if min(x.shape[-2:]) < crop:
            raise ValueError(f"image of size {tuple(x.shape[-2:])} is smaller than the crop {crop}")
        out.append(torch.stack(F.ten_crop(x, [crop, crop]), dim=1))        # (n, 10, C, crop, crop)
    return torch.cat(out, dim=0)


def ten_crop_predict(model: torch.nn.Module, images: torch.Tensor | Sequence[torch.Tensor], crop: int = 224,
                     resize: int | None = 256, *, normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     average: str = "softmax", batch_size: int | None = None) -> torch.Tensor:
    """10-crop testing (Krizhevsky et al. 2012; He et al. 2015, Tables 2-3): the :func:`ten_crop_views` of each
    image go through ``model`` and the outputs are averaged over the 10 views.

    ``average="softmax"`` (default, as the paper: it averages *scores*) returns the mean softmax probabilities;
    ``average="logits"`` the mean raw model outputs. Shape (N, K), or (K,) for a single (C, H, W) image.

    uint8 crops are converted to float32 (values 0..255 kept); ``normalize`` (e.g. :func:`imagenet_normalizer` ``()``)
    is then applied to each (B, C, crop, crop) batch of crops; alternatively pass images that are already
    normalised (a per-channel mean subtraction commutes with resizing and cropping). The model runs in eval mode
    under no_grad (its mode is restored afterwards) on its parameters' device and dtype, ``batch_size`` crops at a
    time (default: all at once)."""
    _check_average(average)
    batch, single = _image_list(images)
    first = batch if isinstance(batch, torch.Tensor) else batch[0]
    device, dtype = _model_device_dtype(model, first.device)
    views = ten_crop_views(batch, crop, resize)
    n, v = views.shape[:2]
    flat = views.reshape(n * v, *views.shape[2:])
    step = flat.shape[0] if batch_size is None else max(1, int(batch_size))
    outs = []
    with _EvalMode(model):
        for chunk in flat.split(step):
            x = chunk.to(device)
            x = x.to(torch.float32) if not x.is_floating_point() else x
            if normalize is not None:
                x = normalize(x)
            outs.append(model(x.to(dtype)))
    out = torch.cat(outs).reshape(n, v, -1)
    scores = _average(out, average)
    return scores[0] if single else scores


def multiscale_predict(model: torch.nn.Module, image: torch.Tensor | Sequence[torch.Tensor],
                       scales: Sequence[int] = (224, 256, 384, 480, 640), *, flip: bool = False,
                       normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       average: str = "softmax") -> torch.Tensor:
    """Fully-convolutional multi-scale testing (He et al. 2015, Sec. 3.4, following Simonyan & Zisserman): the whole
    image, its shorter side resized to each of ``scales`` (aspect ratio kept), goes through ``model``, and the scores
    are averaged over the scales (and over horizontal flips with ``flip=True``). The model must accept any input
    size (global adaptive average pooling, as all resnets models do).

    ``image``: (C, H, W), a same-sized batch (N, C, H, W), or a list of (C, H, W) images; uint8 or float.
    ``average="softmax"`` (default; the paper averages scores) or ``"logits"``; ``normalize`` as in
    :func:`ten_crop_predict`. Returns (N, K), or (K,) for a single (C, H, W) image."""
    _check_average(average)
    if not scales:
        raise ValueError("scales must not be empty")
    batch, single = _image_list(image)
    if not isinstance(batch, torch.Tensor):
        return torch.cat([multiscale_predict(model, t.unsqueeze(0), scales, flip=flip, normalize=normalize,
                                             average=average) for t in batch])
    device, dtype = _model_device_dtype(model, batch.device)
    outs = []
    with _EvalMode(model):
        x0 = batch.to(device)
        for s in scales:
            x = F.resize(x0, [int(s)], antialias=True)
            x = x.to(torch.float32) if not x.is_floating_point() else x
            if normalize is not None:
                x = normalize(x)
            x = x.to(dtype)
            outs.append(model(x))
            if flip:
                outs.append(model(x.flip(-1)))
    scores = _average(torch.stack(outs, dim=1), average)
    return scores[0] if single else scores


# ----------------------------------------------------------------------------------------------------------------
# loader
# ----------------------------------------------------------------------------------------------------------------

class ImageCollate:
    """Collate ``(image, label)`` samples: images stacked to one tensor converted to ``dtype`` (default float32;
    values are not rescaled, so uint8 images become float 0..255; ``dtype=None`` keeps the images' dtype), labels to
    an int64 tensor. With ``skip_bad_files="drop"`` a batch whose files were all unreadable is two empty tensors
    (``x.numel() == 0``; its image shape is unknown): a loop of your own must skip it before the model."""

    def __init__(self, dtype: torch.dtype | None = torch.float32):
        self.dtype = dtype

    def __call__(self, batch: Sequence[tuple[Any, int] | None]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = [b for b in batch if b is not None]     # unreadable files left out (skip_bad_files="drop")
        if not batch:
            return torch.empty(0, dtype=self.dtype or torch.uint8), torch.empty(0, dtype=torch.int64)
        images = [b[0] for b in batch]
        labels = torch.as_tensor([int(b[1]) for b in batch], dtype=torch.int64)
        shapes = {tuple(t.shape) for t in images}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack images of different sizes {sorted(shapes)[:4]}; the transform must "
                             f"produce a fixed size (e.g. a crop)")
        x = torch.stack([t.as_subclass(torch.Tensor) for t in images])
        if self.dtype is not None:
            x = x.to(self.dtype)
        return x, labels

    def __repr__(self) -> str:
        return f"ImageCollate(dtype={self.dtype})"


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker with base_seed + worker_id (base_seed drawn from the loader's generator);
    # give numpy and random the same per-worker seed.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, num_workers: int, pin_memory: bool = True,
                sampler: Sampler | None = None, drop_last: bool | None = None, seed: int = 0,
                persistent_workers: bool | None = None, prefetch_factor: int | None = None,
                image_dtype: torch.dtype | None = torch.float32) -> DataLoader:
    """A DataLoader over ``(image, label)`` samples yielding ``(images (B, C, H, W) image_dtype, labels int64)``
    (see :class:`ImageCollate`).

    ``train=True``: shuffled with a generator seeded by ``seed`` (reproducible order and worker seeds), and
    ``drop_last`` defaults to True; ``train=False``: sequential order, ``drop_last`` False. A ``sampler`` (e.g. a
    ``DistributedSampler`` for DDP; call its ``set_epoch(epoch)`` every epoch) replaces the shuffling.
    ``pin_memory`` is only used when CUDA is available. ``persistent_workers`` defaults to ``num_workers > 0``."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if num_workers < 0:
        raise ValueError("num_workers must be >= 0")
    generator = torch.Generator().manual_seed(int(seed))
    if sampler is None:
        sampler = RandomSampler(dataset, generator=generator) if train else SequentialSampler(dataset)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = True if persistent_workers is None else bool(persistent_workers)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = int(prefetch_factor)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        collate_fn=ImageCollate(image_dtype), pin_memory=bool(pin_memory) and torch.cuda.is_available(),
        drop_last=train if drop_last is None else bool(drop_last), generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# synthetic data
# ----------------------------------------------------------------------------------------------------------------

_JPEG_MODES = ("RGB", "L", "CMYK")


def write_random_imagefolder(root: str | os.PathLike, classes: int = 3, per_class: int = 4, seed: int = 0,
                             sizes: Sequence[tuple[int, int]] = ((48, 32), (32, 48), (40, 40), (41, 57), (64, 36)),
                             modes: Sequence[str] = ("RGB", "L", "RGBA", "P", "CMYK"), corrupt: int = 0) -> list[str]:
    """Write random images in the ImageFolder layout ``root/n0000000{c}/img_{j}.{JPEG,png}`` (for tests and docs).

    File ``j`` of class ``c`` gets PIL mode ``modes[(c * per_class + j) % len(modes)]`` (so every mode appears when
    there are enough files) and a random (height, width) from ``sizes``. RGB, L and CMYK images are saved as JPEG
    (extension ``.JPEG``, as ImageNet), other modes (RGBA, P, LA, ...) as PNG. ``corrupt`` randomly chosen files are
    then truncated to a third of their bytes. Deterministic in ``seed``. Returns the sorted corrupt paths."""
    from PIL import Image

    if classes < 1 or per_class < 1:
        raise ValueError("classes and per_class must be >= 1")
    if not 0 <= corrupt <= classes * per_class:
        raise ValueError(f"corrupt must be in [0, {classes * per_class}]")
    rng = np.random.default_rng(seed)
    root = Path(root)
    paths = []
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            mode = modes[(c * per_class + j) % len(modes)]
            h, w = sizes[int(rng.integers(len(sizes)))]
            # smooth-ish random content: a coarse random grid upsampled, plus a little noise
            coarse = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
            base = Image.fromarray(coarse, "RGB").resize((w, h), Image.BILINEAR)
            arr = np.asarray(base, dtype=np.int16) + rng.integers(-20, 21, (h, w, 3))
            img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB").convert(mode)
            if mode in _JPEG_MODES:
                path = folder / f"img_{j:03d}.JPEG"
                img.save(path, "JPEG", quality=90)
            else:
                path = folder / f"img_{j:03d}.png"
                img.save(path, "PNG")
            paths.append(path)
    bad = sorted(str(paths[i]) for i in rng.choice(len(paths), size=corrupt, replace=False)) if corrupt else []
    for p in bad:
        data = Path(p).read_bytes()
        Path(p).write_bytes(data[: max(4, len(data) // 3)])
    return bad
