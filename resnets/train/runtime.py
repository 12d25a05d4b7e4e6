"""The one place that picks the device, the precision and the memory format for a run."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype | None          # autocast dtype, None for plain fp32
    channels_last: bool

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        # cache_enabled=False keeps autocast usable inside a CUDA-graph capture.
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.is_cuda else f"CPU ({torch.get_num_threads()} threads)"
        prec = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[self.dtype]
        return f"{name}, {prec}, {'channels_last' if self.channels_last else 'NCHW'}"


def pick_runtime(device: str = "auto", precision: str = "auto", channels_last: bool = True) -> Runtime:
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}; choose auto, cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        if dev.type == "cuda" and dev.index is not None:
            if dev.index >= torch.cuda.device_count():
                raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)")
            # the current device, not the tensors', decides where a CUDA graph captures (and the side stream of
            # its warm-up): on another GPU the capture is empty and every replay does nothing
            torch.cuda.set_device(dev)
    if precision == "auto":
        # bf16 on GPUs that compute in it (Ampere and later; torch also reports older ones, which emulate it
        # slowly); fp32 on the CPU, where bf16 convolutions are slower on most machines.
        dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 0) else None
    elif precision in ("fp32", "float32"):
        dtype = None
    elif precision in ("bf16", "bfloat16"):
        dtype = torch.bfloat16
    elif precision in ("fp16", "float16"):
        if dev.type != "cuda":
            raise ValueError("fp16 autocast needs a GPU; use bf16 or fp32 on the CPU")
        dtype = torch.float16
    else:
        raise ValueError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16")
    return Runtime(dev, dtype, bool(channels_last))
