"""Classify image files with a trained checkpoint: ``resnets predict --checkpoint PATH IMAGE... [--json]``.

Each image is read with PIL, converted to RGB and brought to the training resolution (CIFAR checkpoints: resized to
32x32, as the 32x32 training images of Section 4.2; ImageNet nets: the shorter side resized to 256/224 of the crop,
then the centre crop, as the single-crop testing of Section 3.4; a run on ImageFolder data, whatever the net: the
shorter side to its ``eval_resize``, then the centre crop, as its evaluation), then normalised with the checkpoint's own
``Normalizer`` (the training set's mean image, or per-channel mean/std). The top-k classes are named with the class
names stored in the checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .data.augment import Normalizer
from .export import checkpoint_source
from .train import checkpoint as ck


class ImageReadError(ValueError):
    """An image file that cannot be read; the message names the file."""


def load_image(path: str | os.PathLike, size: tuple[int, int], center_crop: bool = False,
               resize_shorter: int | None = None) -> torch.Tensor:
    """One image file as a uint8 (3, H, W) tensor of the given size: the whole image resized to it, or
    (``center_crop``) the shorter side resized to ``resize_shorter`` (default 256/224 of the crop), then the centre
    crop. EXIF orientation is applied and 16-bit images are scaled to 8 bits, as in training
    (:func:`resnets.data.imagefolder.decode_image_bytes`)."""
    import numpy as np
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):   # convert("RGB") would clip at 255, not scale
                img = Image.fromarray((np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
            img = img.convert("RGB")
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such image file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # UnidentifiedImageError: OSError
        raise ImageReadError(f"{path}: cannot read the image ({e})") from None
    h, w = size
    if center_crop:
        scale = (resize_shorter or (256 / 224) * max(h, w)) / min(img.size)
        img = img.resize((max(w, round(img.size[0] * scale)), max(h, round(img.size[1] * scale))),
                         Image.Resampling.BILINEAR)
        left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
        img = img.crop((left, top, left + w, top + h))
    elif img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)  # PIL filters over the whole footprint when shrinking
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.reshape(h, w, 3).permute(2, 0, 1).contiguous()


@dataclass
class Predictor:
    """A checkpoint's network, class names and preprocessing, ready for image files."""

    model: nn.Module
    classes: list[str]
    normalizer: Normalizer
    size: tuple[int, int]
    center_crop: bool
    name: str | None = None
    source: str | None = None
    resize_shorter: int | None = None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Predictor":
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        c = ck.load_checkpoint(path, with_state=False)
        if not c.classes:
            raise ck.CheckpointError(f"{c.path}: the checkpoint stores no class names, so predictions cannot be "
                                     "named; use a checkpoint written by `resnets train`")
        if not c.preprocess:
            raise ck.CheckpointError(f"{c.path}: the checkpoint stores no preprocessing (normalisation statistics); "
                                     "use a checkpoint written by `resnets train`")
        model = ck.model_from_checkpoint(c).to(device).eval()
        n_out = model.fc.out_features if isinstance(getattr(model, "fc", None), nn.Linear) else len(c.classes)
        if n_out != len(c.classes):
            raise ck.CheckpointError(f"{c.path}: {len(c.classes)} class names for a network with {n_out} outputs")
        src = checkpoint_source(c, model)      # the size and resizing that evaluation and the exported file use
        size = (src.image_size, src.image_size) if isinstance(src.image_size, int) else tuple(src.image_size)
        return cls(model, list(c.classes), Normalizer.from_state_dict(c.preprocess), size, src.center_crop,
                   c.model_name, str(c.path), src.resize_shorter)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def probabilities(self, images: Sequence[str | os.PathLike], batch_size: int = 64) -> torch.Tensor:
        """The full softmax, (N, num_classes), float32 on the CPU. Every file is read before the network runs."""
        pixels = torch.stack([load_image(p, self.size, self.center_crop, self.resize_shorter) for p in images])
        out = []
        for chunk in pixels.split(batch_size):
            x = self.normalizer(chunk.to(self.device))
            out.append(torch.softmax(self.model(x).float(), dim=1).cpu())
        return torch.cat(out)

    def predict(self, images: Sequence[str | os.PathLike], top_k: int = 5) -> list[dict[str, Any]]:
        """Per image: ``{"image": path, "top": [{"class", "index", "probability"}, ...]}``, most likely first."""
        if not images:
            raise ValueError("no images given")
        probs = self.probabilities(images)
        k = max(1, min(top_k, probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        return [{"image": str(path),
                 "top": [{"class": self.classes[i], "index": int(i), "probability": float(v)}
                         for v, i in zip(vals.tolist(), idx.tolist())]}
                for path, vals, idx in zip(images, values, indices)]


def predict(checkpoint: str | os.PathLike, images: Sequence[str | os.PathLike], *, top_k: int = 5,
            device: str = "cpu") -> dict[str, Any]:
    """``resnets predict``: top-k classes with probabilities for each image file."""
    p = Predictor.from_checkpoint(checkpoint, device)
    return {"checkpoint": p.source, "model": p.name, "input_size": list(p.size),
            "predictions": p.predict([Path(i) for i in images], top_k)}


def format_predictions(result: dict[str, Any]) -> str:
    width = max((len(t["class"]) for r in result["predictions"] for t in r["top"]), default=0)
    lines = []
    for r in result["predictions"]:
        lines.append(r["image"])
        for rank, t in enumerate(r["top"], 1):
            lines.append(f"  {rank}. {t['class']:<{width}}  {100 * t['probability']:6.2f}%")
    return "\n".join(lines)
