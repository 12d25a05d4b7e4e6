"""Data-parallel training across processes, launched by ``torchrun``: setup, teardown, DDP wrapping, SyncBN.

The same ``resnets train`` command runs on one device or under torchrun, unchanged::

    resnets train --recipe imagenet-paper --data /data/imagenet --out runs/r50                  # one process
    torchrun --nproc_per_node 8 -m resnets.cli train --recipe imagenet-paper --data /data/imagenet --out runs/r50
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 4 --nproc_per_node 8 --max-restarts 3 \\
        --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m resnets.cli train --recipe imagenet-paper --data /data/imagenet --out /shared/runs/r50 --resume auto

(docs/imagenet.md has the full commands; :func:`_restart_scoped_store` says why restarts across nodes want
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``.) torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the
rendezvous); :func:`setup` reads them, joins the process group (NCCL on GPUs, gloo on the CPU) and picks the device
``cuda:LOCAL_RANK``. Node counts and rendezvous are torchrun's job, not ours.

What data parallelism means here: ``--batch-size`` is the *global* batch (the paper's 256 on ImageNet, 128 on
CIFAR), split evenly across the ranks (an error if it does not divide). Rank ``r`` takes the ``r``-th contiguous
slice of the global batch of step ``k``, and DDP averages the gradients, so N ranks x B/N samples take the same
SGD step as one process with batch B. BatchNorm is the exception: each rank normalises with the statistics of
its own B/N samples, unless ``--sync-bn`` computes them over the global batch. torch's ``nn.SyncBatchNorm`` only
runs on GPUs (torch 2.14 raises "SyncBatchNorm expected input tensor to be on GPU" for CPU tensors), so on the
CPU/gloo ``--sync-bn`` uses :class:`GlooSyncBatchNorm` below, the same computation with differentiable
all-reduces; that is what makes "2 CPU ranks x B/2 == 1 process x B" testable (tests/test_distributed.py).
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistContext", "setup", "teardown", "local_batch_size", "convert_sync_batchnorm", "GlooSyncBatchNorm",
           "wrap_ddp", "launched_by_torchrun"]


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass
class DistContext:
    """Who this process is. ``world_size == 1`` (no torchrun, or torchrun with one process) means no process
    group and every collective below is a no-op."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False         # whether setup() created the process group (and teardown() destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks, in place (and returned)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape on all), in rank order."""
        if not self.enabled:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a small picklable value)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def raise_if_any_failed(self, error: BaseException | None, what: str) -> None:
        """Every rank says whether its part of ``what`` failed; all raise if any did (this rank its own error,
        the others an error naming the first rank that failed). A failure on one rank alone would otherwise leave
        the others waiting for it at the next collective until the timeout."""
        if not self.enabled:
            if error is not None:
                raise error
            return
        box: list[Any] = [None] * self.world_size
        dist.all_gather_object(box, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(box) if m is not None]
        if failed:
            r, m = failed[0]
            raise RuntimeError(f"{what} failed on rank {r} (of {len(failed)} that failed): {m}")

    @torch.no_grad()
    def broadcast_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BN running statistics), e.g. before evaluating: without SyncBN each
        rank's running statistics drift from its own B/N samples; rank 0's are the ones its checkpoints hold."""
        if self.enabled:
            for b in model.buffers():
                dist.broadcast(b, src=0)


def setup(device: str = "auto") -> tuple[DistContext, str]:
    """Join the torchrun process group when launched by torchrun with more than one process.

    Returns the context and the device string for :func:`resnets.train.runtime.pick_runtime`: under DDP,
    ``"auto"``/``"cuda"`` become ``"cuda:LOCAL_RANK"`` (one GPU per process), and ``"cpu"`` stays the CPU. The
    backend is NCCL for GPUs and gloo for the CPU. If the process group is already initialised (a Python caller
    did it), it is used as it is and left for the caller to destroy."""
    if dist.is_available() and dist.is_initialized():
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                          dist.get_backend(), owns_group=False)
    elif launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        if not dist.is_available():
            raise RuntimeError("this torch build has no torch.distributed; cannot run under torchrun")
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = device != "cpu" and torch.cuda.is_available() and not str(device).startswith("cpu")
        backend = "nccl" if use_cuda else "gloo"
        # how long a collective waits for the other ranks before it fails (torch's default: 30 min)
        timeout_s = float(os.environ.get("RESNETS_DIST_TIMEOUT_S", 1800))
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
        if use_cuda:
            torch.cuda.set_device(local)
            kwargs["device_id"] = torch.device("cuda", local)
        store = _restart_scoped_store(kwargs["timeout"])
        if store is not None:
            kwargs["store"] = store
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
        ctx = DistContext(rank, world, local, backend, owns_group=True)
    else:
        return DistContext(), device
    if ctx.enabled and device in ("auto", "cuda") and torch.cuda.is_available() and ctx.backend != "gloo":
        device = f"cuda:{ctx.local_rank}"
    elif ctx.enabled and device in ("auto", "cuda") and ctx.backend == "gloo":
        device = "cpu" if device == "auto" else device
    return ctx, device


def _restart_scoped_store(timeout: datetime.timedelta) -> "dist.Store | None":
    """The store to build the process group on when torchrun may have restarted the workers, else ``None``
    (torch's default).

    torchrun's agent hosts one TCPStore for the whole job and hands it to every round of workers
    (``TORCHELASTIC_USE_AGENT_STORE=True``); torch 2.14's ``init_process_group`` uses it without a per-round
    prefix. After ``--max-restarts`` restarts the worker group, the keys the killed round wrote (each rank's gloo
    listening address, NCCL's unique id) are still there, and a new worker can read a dead worker's address before
    its replacement overwrites it: measured here as ``Gloo connectFullMesh failed ... Connection refused`` in the
    first restart and a hang in the next (pytorch/pytorch#135712 reports the NCCL form). On one node every worker
    is started by the same agent, so ``TORCHELASTIC_RESTART_COUNT`` names the round the same way in every worker
    and scopes the keys. Across nodes it does not (an agent whose own workers were healthy restarts them without
    counting), so there torch's default is kept and :func:`setup` warns; launching torchrun with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` gives every round a fresh store instead."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        return None
    if env.get("GROUP_WORLD_SIZE", "1") != "1":
        if int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and env.get("RANK") == "0":
            warnings.warn("torchrun --max-restarts across several nodes with the agent's shared store: a restarted "
                          "round can read the previous round's addresses and fail to connect "
                          "(pytorch/pytorch#135712); launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
                          RuntimeWarning, stacklevel=3)
        return None
    agent_store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"resnets/restart-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent_store)


def teardown(ctx: DistContext, clean: bool = True) -> None:
    """Leave the process group. ``clean`` (every rank got here without an error): a barrier first, so that no rank
    closes its connections while another still uses them (gloo then aborts the other at exit: seen once in 2-rank
    CPU tests, "terminate called without an active exception"). After an error no barrier: a dead rank would
    hold the others until the timeout."""
    if ctx.owns_group and dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:    # also when the barrier fails (a rank died): else gloo is torn down only at interpreter exit
            dist.destroy_process_group()


def local_batch_size(global_batch: int, ctx: DistContext) -> int:
    if global_batch % ctx.world_size:
        raise ValueError(f"--batch-size {global_batch} (the global batch) does not divide evenly across "
                         f"{ctx.world_size} processes; use a multiple of {ctx.world_size}")
    return global_batch // ctx.world_size


# --------------------------------------------------------------------------------------------------------------
# SyncBatchNorm on the CPU (gloo)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its backward sums the incoming gradients over ranks (the gradient of a sum of per-rank
    losses, each of which depends on every rank's input through the shared statistics)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the global batch of all ranks, for CPU tensors (torch's ``nn.SyncBatchNorm`` is GPU-only).

    Training mode with a process group of more than one rank: the per-channel mean is ``sum / count`` all-reduced
    over ranks, then the biased variance from the all-reduced sum of squared deviations (two passes, as
    ``F.batch_norm`` computes it on one device), through an all-reduce whose backward all-reduces the
    gradients, so gradients flow across ranks exactly as through one big batch. Running
    statistics are updated as ``nn.BatchNorm2d`` does (unbiased variance, momentum). Otherwise (eval mode, one
    rank) it is ``nn.BatchNorm2d``. Two small all-reduces per layer and step: meant for tests and CPU runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        local_n = x.numel() // c
        count_t = torch.tensor([float(local_n)], dtype=torch.float64)
        dist.all_reduce(count_t)
        count = count_t.to(xf.dtype)
        mean = all_reduce(xf.sum(dims)) / count
        shape = [1, c] + [1] * (x.dim() - 2)
        centred = xf - mean.view(shape)
        var = all_reduce(centred.pow(2).sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                n = float(count_t)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1.0, 1.0)), alpha=m)
        return out.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every ``BatchNorm*d`` of ``model`` computed over the global batch: ``nn.SyncBatchNorm`` on GPUs,
    :class:`GlooSyncBatchNorm` (2-D BatchNorm only) on the CPU. Parameters and buffers are kept."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(m: nn.Module) -> nn.Module:
        if isinstance(m, nn.BatchNorm2d) and not isinstance(m, GlooSyncBatchNorm):
            new = GlooSyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            new.load_state_dict(m.state_dict())
            new.train(m.training)
            return new
        for name, child in m.named_children():
            setattr(m, name, convert(child))
        return m

    return convert(model)


def wrap_ddp(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)``: rank 0's weights broadcast at construction, gradients averaged (an
    all-reduce sum divided by the world size) during backward; buffers broadcast from rank 0 at each forward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device.type == "cuda":
        return DDP(model, device_ids=[device.index], output_device=device.index)
    return DDP(model)
