"""Checkpoints that survive crashes: the one writer and reader of run state.

A checkpoint is a directory, written under a temporary name and renamed into place, so a crash (even SIGKILL)
leaves either the old checkpoint or the new one, never half of one:

    step-00032000/
        model.safetensors   weights, plus metadata: model name and kwargs, classes, preprocessing, config, version
        state.pt            optimizer, step, warm-up state, RNG states (loaded with weights_only=True)

``load_checkpoint`` also reads a bare ``.safetensors`` file and ``.pt``/``.pth`` state_dicts, the latter only
through ``torch.load(weights_only=True)``: a pickle that would import code is refused, not run.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

FORMAT = "resnets-checkpoint/1"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
PREPROCESS_PREFIX = "preprocess."


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass
class Checkpoint:
    path: Path
    weights: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)   # {"mode": ..., "mean": tensor, "std": tensor|None}
    state: dict[str, Any] | None = None

    @property
    def model_name(self) -> str | None:
        return self.meta.get("model")

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return self.meta.get("model_kwargs", {})

    @property
    def classes(self) -> list[str] | None:
        return self.meta.get("classes")

    @property
    def step(self) -> int | None:
        return self.meta.get("step")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in name order (safetensors has no checksum)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    model = getattr(model, "module", model)      # DistributedDataParallel too
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def _own_storage(obj: Any) -> Any:
    """``obj`` with every tensor that views a larger storage copied out: torch.save writes a view's whole
    storage, and a stacked run's momentum is a view of all the stack's (resnets.train.stacked)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.untyped_storage().nbytes() > obj.numel() * obj.element_size() else obj
    if isinstance(obj, dict):
        return {k: _own_storage(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_own_storage(v) for v in obj)
    return obj


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, meta: dict[str, Any] | None = None,
                    preprocess: dict[str, Any] | None = None, state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically; an existing one at ``path`` is replaced only once the new one is
    complete. Raises CheckpointError (and leaves what was there) when the disk is full or not writable."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tensors = model_weights(model)
    str_meta = {"format": FORMAT}
    if "resnets_version" not in (meta or {}):  # every checkpoint says which resnets wrote it
        from .. import __version__
        meta = {**(meta or {}), "resnets_version": __version__}
    for k, v in (meta or {}).items():
        str_meta[k] = json.dumps(v)
    if preprocess:
        str_meta["preprocess_mode"] = json.dumps(preprocess.get("mode"))
        for k, v in preprocess.items():
            if isinstance(v, torch.Tensor):
                tensors[PREPROCESS_PREFIX + k] = v.detach().to("cpu").contiguous()
    # Serialise in memory, then write plain bytes: a full disk then surfaces as one OSError (torch.save and
    # safetensors report it in their own ways), and the checksums below cover exactly what reaches the disk.
    state_bytes = None
    if state is not None:
        buf = io.BytesIO()
        torch.save(_own_storage(state), buf)
        state_bytes = buf.getvalue()
        str_meta["state_sha256"] = hashlib.sha256(state_bytes).hexdigest()
    str_meta["weights_sha256"] = weights_digest(tensors)
    weight_bytes = save(tensors, metadata=str_meta)
    try:
        tmp.mkdir()
        _write_synced(tmp / WEIGHTS, weight_bytes)
        if state_bytes is not None:
            _write_synced(tmp / STATE, state_bytes)
        _fsync_dir(tmp)
        if final.exists():   # a directory cannot be renamed over a full one: the old one steps aside first
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)   # one left by a save killed here, under a pid used again
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except OSError:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {e.strerror or e}; "
                              "the previous checkpoint is untouched") from e
    return final


def _load_safetensors(file: Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, raw header metadata); ``tensors=False`` reads the header alone and returns no tensors."""
    try:
        from safetensors import safe_open
        with safe_open(str(file), framework="pt") as f:
            raw_meta = f.metadata() or {}
        return (load_file(str(file)) if tensors else {}), raw_meta
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e


def _load_pt(file: Path) -> dict[str, Any]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        from ..models.convert import refusal_reason
        raise CheckpointError(f"{file}: refused to load: it holds Python objects other than tensors and plain data, "
                              f"which could run code when unpickled. Only weights-only checkpoints are loaded. "
                              f"({refusal_reason(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable checkpoint ({str(e).splitlines()[0]})") from None


def _decode_meta(raw: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        if k in ("format", "preprocess_mode"):
            continue
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return meta


def checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's metadata (step, model, config...) from the safetensors header alone: no tensor is read."""
    p = Path(path)
    return _decode_meta(_load_safetensors(p / WEIGHTS if p.is_dir() else p, tensors=False)[1])


def load_checkpoint(path: str | os.PathLike, *, with_state: bool = True) -> Checkpoint:
    """Read a checkpoint directory, a ``model.safetensors`` file, or a ``.pt``/``.pth`` state_dict."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint")
    if p.is_dir():
        wfile = p / WEIGHTS
        if not wfile.exists():
            raise CheckpointError(f"{p}: not a checkpoint directory (no {WEIGHTS})")
    else:
        wfile = p
    if wfile.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        obj = _load_pt(wfile)
        sd = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else obj
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{wfile}: expected a state_dict of tensors")
        return Checkpoint(wfile, dict(sd), {}, {}, None)
    tensors, raw = _load_safetensors(wfile)
    if raw.get("format") not in (None, FORMAT):
        raise CheckpointError(f"{wfile}: unknown checkpoint format {raw.get('format')!r} (expected {FORMAT})")
    meta = _decode_meta(raw)
    preprocess: dict[str, Any] = {}
    if "preprocess_mode" in raw:
        preprocess["mode"] = json.loads(raw["preprocess_mode"])
    if "weights_sha256" in raw and weights_digest(tensors) != raw["weights_sha256"]:
        raise CheckpointError(f"{wfile}: checksum mismatch: the weights were damaged after they were written "
                              "(e.g. a flipped bit); use an earlier checkpoint")
    weights = {}
    for k, v in tensors.items():
        if k.startswith(PREPROCESS_PREFIX):
            preprocess[k[len(PREPROCESS_PREFIX):]] = v
        else:
            weights[k] = v
    state = None
    if with_state and p.is_dir() and (p / STATE).exists():
        if "state_sha256" in raw and hashlib.sha256((p / STATE).read_bytes()).hexdigest() != raw["state_sha256"]:
            raise CheckpointError(f"{p / STATE}: checksum mismatch: the training state was damaged after it was "
                                  "written; use an earlier checkpoint")
        state = _load_pt(p / STATE)
    return Checkpoint(p, weights, meta, preprocess, state)


def model_from_checkpoint(ckpt: Checkpoint | str | os.PathLike, name: str | None = None, **overrides: Any) -> nn.Module:
    """Build the checkpoint's model and load its weights (strictly)."""
    from ..models import create_model
    from ..models.registry import bottleneck_layout_unsaid, refuse_unsaid_layout

    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt, with_state=False)
    model_name = name or ckpt.model_name
    if model_name is None:
        raise CheckpointError(f"{ckpt.path}: the checkpoint does not say which model it holds; pass the model name")
    kwargs = {**ckpt.model_kwargs, **overrides}
    if ckpt.model_name is None and bottleneck_layout_unsaid(model_name, kwargs):   # a bare state dict
        refuse_unsaid_layout(model_name, ckpt.path)
    model = create_model(model_name, **kwargs)
    try:
        model.load_state_dict(ckpt.weights)
    except RuntimeError as e:
        said = f" (it says {ckpt.model_name})" if ckpt.model_name and ckpt.model_name != model_name else ""
        raise CheckpointError(f"{ckpt.path}: weights do not fit {model_name}{said}: "
                              f"{str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else e}") from None
    return model


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete step checkpoints in ``directory``, oldest first (temporary and partial ones are ignored)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    # only the names resnets writes: a user's step-00032000.bak or step-00032000-good is neither read nor pruned
    found = [c for c in d.iterdir() if c.is_dir() and re.fullmatch(r"step-\d+", c.name) and (c / WEIGHTS).exists()]
    return sorted(found, key=lambda c: int(c.name.split("-")[1]))


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> None:
    for old in list_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for junk in Path(directory).glob(".*.tmp-*"):
        shutil.rmtree(junk, ignore_errors=True)
    for old in Path(directory).glob(".*.old-*"):    # a save killed while replacing: put back what it replaced
        final = old.parent / old.name[1:].rsplit(".old-", 1)[0]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def rng_state(device: torch.device) -> dict[str, Any]:
    s: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(s: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)
