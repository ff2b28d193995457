"""Timing: every candidate of a mode called in turn, one timed call each per round, the median of the rounds."""
import gc
import os
import platform
import re
import statistics
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .candidates import REFERENCE, BenchSetup, Step, prepare, select
from .memory import add_peak_memory

__all__ = ['run_benchmark', 'conv_peak_gflops', 'time_candidates', 'machine_info']


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def conv_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 10) -> float:
    """This machine's speed on a large 3x3 convolution (256->256 channels, 56x56, channels-last), in GFLOP/s."""
    batch = 8 if device.type == 'cpu' else 64
    x = torch.randn(batch, 256, 56, 56, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    x, w = x.to(dtype), w.to(dtype)
    flops = 2 * batch * 56 * 56 * 256 * 256 * 9
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            _sync(device)
            t = time.perf_counter()
            F.conv2d(x, w, padding=1)
            _sync(device)
            if i:
                times.append(time.perf_counter() - t)
    return flops / min(times) / 1e9  # the best round: a peak, not a typical speed


def _warm_up(mode: str, setup: BenchSetup, compile: bool, precisions: Sequence[str],
             log: Callable[[str], None]) -> Tuple[Dict[str, Step], Dict[str, float], Dict[str, float]]:
    """Build each candidate and call it once (quantizing, exporting and compiling where it does), outside the timed
    rounds.

    Returns the steps, each candidate's seconds from building to its first output (what its speed costs up front)
    and, in inference, each output's largest difference from the reference's, relative to the reference's largest
    magnitude.
    """
    fns: Dict[str, Step] = {}
    ready_s: Dict[str, float] = {}
    outputs: Dict[str, torch.Tensor] = {}
    for c in select(mode, setup, compile, precisions):
        log(f'  warm-up {mode}: {c.name}')
        t = time.perf_counter()
        fns[c.name] = c.build(setup)
        out = fns[c.name]()
        _sync(setup.device)
        ready_s[c.name] = time.perf_counter() - t
        if mode == 'inference':
            outputs[c.name] = out.float().to(setup.device)
    if REFERENCE not in outputs:  # a variant timm does not have: nothing to compare with
        return fns, ready_s, {}
    ref = outputs[REFERENCE]
    return fns, ready_s, {k: float((v - ref).abs().max() / ref.abs().max()) for k, v in outputs.items()}


def time_candidates(mode: str, fns: Dict[str, Step], repeats: int, device: torch.device,
                    log: Callable[[str], None]) -> Dict[str, List[float]]:
    """name -> the seconds of each round's call; the candidates take turns within each round."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t)
        log(f'  {mode} round {r + 1}/{repeats}')
    return times


def _measure_mode(mode: str, setup: BenchSetup, compile: bool, precisions: Sequence[str], repeats: int, gmacs: float,
                  peak: float, log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """One result row per candidate of `mode`: its times, speed, ratio to the reference, efficiency, difference."""
    log(f'building the {mode} candidates ...')
    fns, ready_s, diffs = _warm_up(mode, setup, compile, precisions, log)
    times = time_candidates(mode, fns, repeats, setup.device, log)
    del fns
    gc.collect()
    batch_size = setup.x.shape[0]
    flops = 2e9 * gmacs * (3 if mode == 'train' else 1)
    rows = []
    for k, ts in times.items():
        med = statistics.median(ts)
        rows.append(dict(
            name=k, mode=mode, times_s=ts, median_s=med, images_per_s=batch_size / med,
            speedup_vs_timm=statistics.median(times[REFERENCE]) / med if REFERENCE in times else None,
            efficiency=batch_size * flops / med / 1e9 / peak,
            max_rel_diff_vs_timm=diffs.get(k) if mode == 'inference' else None, first_output_s=ready_s[k],
            peak_memory_mib=None, memory_vs_timm=None))
    return rows


def machine_info(device: torch.device) -> Dict[str, Any]:
    """The device, CPU, cores, threads and library versions the figures were measured with."""
    import timm
    import torchvision
    from .. import __version__
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = re.search(r'model name\s*:\s*(.*)', f.read()).group(1)
    except (OSError, AttributeError):
        pass
    return dict(
        device=torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu,
        cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), python=platform.python_version(),
        torch=torch.__version__, torchvision=torchvision.__version__, timm=timm.__version__,
        timm_densenet_ext=__version__)


def run_benchmark(
        model_name: str = 'densenet121',
        batch_size: int = 16,
        img_size: int = 224,
        repeats: int = 5,
        device: str = 'cpu',
        dtype: str = 'float32',
        train: bool = True,
        compile: bool = True,
        memory: bool = True,
        seed: int = 0,
        log: Callable[[str], None] = print,
        precisions: Sequence[str] = ('fp32',),
) -> Dict[str, Any]:
    """Time every candidate `repeats` times, interleaved; measure peak memory; return the figures.

    precisions: those of `deploy.PRECISIONS` at which our deployment path (`optimize_for_inference`) is measured too.
    """
    from ..deploy import PRECISIONS
    from ..stats import model_stats
    precisions = (precisions,) if isinstance(precisions, str) else tuple(precisions)
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f'precisions: unknown {unknown[0]!r}; choose from {", ".join(PRECISIONS)}.')
    setup = prepare(model_name, batch_size, img_size, device, dtype, seed)
    gmacs = model_stats(model_name, (3, img_size, img_size)).gmacs
    log(f'measuring the 3x3-convolution peak on {setup.device.type} ...')
    peak = conv_peak_gflops(setup.device, setup.amp_dtype or torch.float32)
    results: List[Dict[str, Any]] = []
    for mode in ('inference', 'train') if train else ('inference',):
        results += _measure_mode(mode, setup, compile, precisions, repeats, gmacs, peak, log)
    if memory:
        add_peak_memory(results, model_name, batch_size, img_size, device, dtype, seed, log)
    return dict(
        config=dict(model=model_name, batch_size=batch_size, img_size=img_size, repeats=repeats, device=device,
                    dtype=dtype, train=train, compile=compile, seed=seed, precision=list(dict.fromkeys(precisions))),
        machine=machine_info(setup.device),
        gmacs_per_image=gmacs,
        conv_peak_gflops=peak,
        results=results,
    )
