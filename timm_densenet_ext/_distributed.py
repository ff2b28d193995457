"""Training on several processes started by torchrun: the process group, each process's share of a global batch, and
BatchNorm statistics of the global batch (`--sync-bn`), on the CPU (gloo) as on GPUs (nccl).

What one process computes does not depend on how many there are: the epoch's order is one permutation, each global
batch is split between the processes, and BatchNorm layers converted by `synced_batchnorm` normalise with the
statistics of the whole global batch.
"""
import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from timm.utils.distributed import init_distributed_device_so, is_distributed_env
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ['Processes', 'processes', 'in_process_group', 'GlobalBatchSampler', 'synced_batchnorm',
           'CpuSyncBatchNormAct']

T = TypeVar('T')
F = TypeVar('F', bound=Callable)


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes training together: its rank, their number, its device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def primary(self) -> bool:
        """Whether this process logs and writes: rank 0 (the only one without torchrun)."""
        return self.rank == 0

    def from_primary(self, fn: Callable[[], T], shared: Optional[Callable[[T], Any]] = None) -> T:
        """`fn()` run by rank 0 alone: its result there, and on the other processes the result (or `shared(result)`,
        what they need of it); its error is raised on every process."""
        if self.world_size == 1:
            return fn()
        box: List[Any] = [None]
        result = None
        if self.primary:
            try:
                result = fn()
                box = [(result if shared is None else shared(result), None)]
            except Exception as e:  # every process raises it, not only rank 0
                box = [(None, e)]
        dist.broadcast_object_list(box, src=0)
        received, error = box[0]
        if error is not None:
            raise error
        return result if self.primary else received

    def barrier(self) -> None:
        """Wait here for every process (rank 0 evaluating and writing, the others waiting)."""
        if self.world_size > 1:
            dist.barrier()

    def sum(self, values: Sequence[float]) -> List[float]:
        """`values` summed over the processes."""
        if self.world_size == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()


def processes() -> Processes:
    """This process's place among the processes training together: the initialised process group's (its device the
    GPU of this rank with nccl, else the CPU); without one, a single process on the CPU."""
    if not (dist.is_available() and dist.is_initialized()):
        return Processes()
    device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else \
        torch.device('cpu')
    return Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', 0)), device)


def in_process_group(fn: F) -> F:
    """Run `fn` in the process group of the processes torchrun started (WORLD_SIZE above 1, RANK, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT in the environment): initialised for the call by timm's `init_distributed_device_so`
    (nccl and the GPU LOCAL_RANK where CUDA is available, else gloo on the CPU) and destroyed after it. Without
    torchrun, or in a group the caller initialised, `fn` runs as it is."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if (dist.is_available() and dist.is_initialized()) or not is_distributed_env():
            return fn(*args, **kwargs)
        init_distributed_device_so(device='cuda' if torch.cuda.is_available() else 'cpu')
        try:
            return fn(*args, **kwargs)
        finally:
            dist.destroy_process_group()
    return call  # type: ignore[return-value]


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This process's part of each global batch of an epoch. The epoch's order (`order`) is the same whatever the
    number of processes; it is cut into global batches of `batch_size` (a last partial one dropped with `drop_last`,
    else kept), each split into `world_size` consecutive parts as even as can be; process `rank` takes part `rank`.
    Together the processes see exactly the batches one process sees. `set_epoch` chooses the epoch, as for
    DistributedSampler."""

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 drop_last: bool = True):
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.drop_last, self.epoch = seed, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)

    def order(self) -> List[int]:
        """The epoch's permutation of the images: the one `finetune` took on one process before it took several, that
        of a shuffling DataLoader with a generator seeded with seed + epoch under tqdm.auto's bar (whose asyncio
        wrapper starts an iterator of its own): two loader iterators drew a base seed each, then the sampler its
        torch.randperm."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        for _ in range(2):
            torch.empty((), dtype=torch.int64).random_(generator=generator)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[List[int]]:
        indices = self.order()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = indices[start:start + self.batch_size]
            bounds = [len(batch) * part // self.world_size for part in (self.rank, self.rank + 1)]
            yield batch[bounds[0]:bounds[1]]


class CpuSyncBatchNormAct(_BatchNorm):
    """BatchNorm with the statistics of the global batch, then dropout and activation, as timm's SyncBatchNormAct,
    for CPU tensors (gloo), which torch's SyncBatchNorm refuses (and DistributedDataParallel holding one on the CPU):
    the per-channel sums are summed over the processes, and so are their gradients in backward, as SyncBatchNorm's
    backward does. Without several processes, or in eval mode, it is a BatchNorm."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.drop, self.act = nn.Identity(), nn.Identity()

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f'expected 2D or more input (got {x.dim()}D input)')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and dist.is_initialized() and dist.get_world_size() > 1:
            x = self._global_batch_norm(x)
        else:
            x = super().forward(x)
        return self.act(self.drop(x))

    def _global_batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        summed = _SumOverProcesses.apply
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=torch.float64)
        dist.all_reduce(count)
        n = float(count)
        mean = summed(x.sum(dims)) / n
        centred = x - mean.view(shape)
        var = summed((centred * centred).sum(dims)) / n  # two passes, as accurate as F.batch_norm's
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach() * factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (n / max(n - 1, 1)) * factor)
        return y


class _SumOverProcesses(torch.autograd.Function):
    """A tensor summed over the processes; its gradient too (each process's loss depends on every process's part)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _synced(bn: _BatchNorm) -> nn.Module:
    """A BatchNorm over the global batch (timm's SyncBatchNormAct on GPUs, CpuSyncBatchNormAct on the CPU) sharing
    `bn`'s parameters, running statistics, dropout and activation (timm's BatchNormAct2d has them; a plain BatchNorm
    gets none)."""
    cpu = (bn.running_mean if bn.running_mean is not None else bn.weight).device.type == 'cpu'
    sync = (CpuSyncBatchNormAct if cpu else SyncBatchNormAct)(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    sync.act = bn.act if isinstance(bn, BatchNormAct2d) else nn.Identity()
    sync.drop = bn.drop if isinstance(bn, BatchNormAct2d) else nn.Identity()
    if bn.affine:
        sync.weight, sync.bias = bn.weight, bn.bias
    sync.running_mean, sync.running_var, sync.num_batches_tracked = \
        bn.running_mean, bn.running_var, bn.num_batches_tracked
    return sync.train(bn.training)


@contextlib.contextmanager
def synced_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with each BatchNorm layer replaced by one over the global batch (`_synced`), sharing its parameters and
    statistics, for the block, and put back after it. timm's BatchNormAct2d keeps its activation, as timm's
    `convert_sync_batchnorm` keeps it (torch's `SyncBatchNorm.convert_sync_batchnorm` makes it a SyncBatchNorm that
    never applies it)."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, _BatchNorm) and not isinstance(child, (nn.SyncBatchNorm, CpuSyncBatchNormAct))]
    for parent, name, bn in swaps:
        setattr(parent, name, _synced(bn))
    try:
        yield model
    finally:
        for parent, name, bn in reversed(swaps):
            bn.train(getattr(parent, name).training)
            setattr(parent, name, bn)
