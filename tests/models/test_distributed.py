"""DistributedDataParallel (gloo, two processes on this machine) gives the same step as one process."""
import time
from pathlib import Path
from typing import Callable, Tuple

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import timm_densenet_ext  # noqa: F401  (registers the models, also in the spawned workers)
from timm_densenet_ext.parity import randomize_

WORLD = 2
MODEL_ARGS = dict(block_config=(2, 2, 2, 2), num_classes=5)


def _model(memory_efficient: bool) -> nn.Module:
    model = randomize_(timm.create_model('densenet121', memory_efficient=memory_efficient, **MODEL_ARGS), 0)
    return model.train()


def _micro_batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD, 3, 3, 64, 64, generator=g)
    y = torch.randint(0, MODEL_ARGS['num_classes'], (WORLD, 3), generator=g)
    return x, y


def _optimizer(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


def _worker(rank: int, store: str, out: str, memory_efficient: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(_model(memory_efficient))
        opt = _optimizer(model.parameters())
        x, y = _micro_batches()
        loss = F.cross_entropy(model(x[rank]), y[rank])
        loss.backward()  # DDP averages the gradients of the two micro-batches
        opt.step()
        if rank == 0:
            torch.save({n: p.detach() for n, p in model.module.named_parameters()}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# a DDP step of the shallow model takes about 10 s with process start-up; a hang fails the test after this
TIMEOUT_S = 180.


def spawn(fn: Callable, args: Tuple, nprocs: int, timeout: float = TIMEOUT_S) -> None:
    """mp.spawn with a deadline: processes still running after `timeout` seconds are killed and the test fails
    (a worker's exception is raised as mp.spawn raises it)."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method='spawn')
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0., deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join()
            pytest.fail(f'{nprocs} processes of {fn.__name__} still running after {timeout:.0f} s: killed')


def _sleeper(rank: int, seconds: float) -> None:
    time.sleep(seconds)


def test_spawn_fails_a_hang_and_kills_it():
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match='still running after 1 s'):
        spawn(_sleeper, args=(600.,), nprocs=2, timeout=1.)
    assert time.monotonic() - start < 60


@pytest.mark.parametrize('memory_efficient', [False, True], ids=['plain', 'checkpointed'])
def test_ddp_step_equals_one_process_over_the_same_micro_batches(tmp_path: Path, memory_efficient: bool):
    out = tmp_path / 'ddp.pth'
    spawn(_worker, args=(str(tmp_path / 'store'), str(out), memory_efficient), nprocs=WORLD)
    ddp = torch.load(out)

    model = _model(memory_efficient)
    assert any(m.grad_checkpointing for m in model.modules() if hasattr(m, 'grad_checkpointing')) == memory_efficient
    opt = _optimizer(model.parameters())
    x, y = _micro_batches()
    for i in range(WORLD):  # gradient accumulation: each micro-batch on its own, as each process saw it
        (F.cross_entropy(model(x[i]), y[i]) / WORLD).backward()
    opt.step()

    start = dict(_model(memory_efficient).named_parameters())
    assert sorted(ddp) == sorted(n for n, _ in model.named_parameters())
    for name, p in model.named_parameters():
        assert not torch.equal(p, start[name]), name  # the step moved every parameter
        torch.testing.assert_close(ddp[name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)
