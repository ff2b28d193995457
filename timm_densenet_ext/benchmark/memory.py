"""Peak memory of one candidate's call: on a GPU the allocator's statistics, on the CPU the growth of resident memory,
measured in a fresh process per candidate (the probe) so that the timing process keeps glibc's fast allocator."""
import gc
import json
import os
import re
import statistics
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional

import torch

from .candidates import REFERENCE, candidate, prepare, workloads

__all__ = ['PeakMemory', 'peak_memory', 'measure_peak', 'probe', 'add_peak_memory']


class PeakMemory:
    """Peak memory of one call, in bytes: CUDA allocator statistics, or the process' resident high-water mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_ok = device.type == 'cpu' and os.path.exists('/proc/self/clear_refs')

    @staticmethod
    def _status(field: str) -> int:
        with open('/proc/self/status') as f:
            return int(re.search(rf'{field}:\s+(\d+) kB', f.read()).group(1)) * 1024

    def start(self) -> None:
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.cpu_ok:
            try:
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')  # reset the high-water mark (VmHWM) to the current resident size
            except OSError:
                self.cpu_ok = False
                return
            self.base = self._status('VmRSS')

    def stop(self) -> Optional[int]:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.cpu_ok:
            return self._status('VmHWM') - self.base
        return None


def measure_peak(fn: Callable[[], Any], dev: torch.device, repeats: int) -> Optional[int]:
    """The median peak memory of `repeats` calls of `fn`, after a warm-up call; None where it cannot be measured."""
    memory = PeakMemory(dev)
    fn()
    peaks = []
    for _ in range(repeats):
        memory.start()
        fn()
        peaks.append(memory.stop())
    return None if None in peaks else int(statistics.median(peaks))


def probe(mode: str, name: str, model_name: str, batch_size: int, img_size: int, device: str, dtype: str,
          seed: int, repeats: int) -> Optional[int]:
    """Peak memory of candidate `name`, measured in this process."""
    setup = prepare(model_name, batch_size, img_size, device, dtype, seed)
    fn = workloads(mode, setup, False, only=name)[name]
    return measure_peak(fn, setup.device, repeats)


def _probe_in_subprocess(mode: str, name: str, model_name: str, batch_size: int, img_size: int, device: str,
                         dtype: str, repeats: int, timeout: float) -> Optional[int]:
    """`probe` in a fresh process (`python -m timm_densenet_ext.benchmark --memory-probe MODE:NAME ...`)."""
    cmd = [sys.executable, '-m', 'timm_densenet_ext.benchmark', '--memory-probe', f'{mode}:{name}',
           '--model', model_name, '--batch-size', str(batch_size), '--img-size', str(img_size),
           '--device', device, '--dtype', dtype, '--repeats', str(repeats)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='65536')
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f'memory probe for {mode} {name!r} took over {timeout:.0f} s; run it with a smaller '
                           f'--batch-size or --img-size, or skip it with --no-memory.') from None
    if proc.returncode != 0:
        raise RuntimeError(f'memory probe for {mode} {name!r} failed:\n{proc.stderr[-2000:]}')
    value = json.loads(proc.stdout.strip().splitlines()[-1])['peak_bytes']
    return None if value is None else int(value)


def peak_memory(mode: str, name: str, model_name: str = 'densenet121', batch_size: int = 16, img_size: int = 224,
                device: str = 'cpu', dtype: str = 'float32', seed: int = 0, repeats: int = 2,
                timeout: float = 900.0) -> Optional[int]:
    """Peak memory in bytes of one call of candidate `name` (after a warm-up call), the median of `repeats`.

    On the CPU this runs in a fresh process with glibc told to hand freed buffers back at once, so that resident
    memory tracks what is allocated (in the timing process that would slow every allocation down); a probe still
    running after `timeout` seconds is stopped and reported as an error.
    """
    if torch.device(device).type == 'cpu':
        return _probe_in_subprocess(mode, name, model_name, batch_size, img_size, device, dtype, repeats, timeout)
    return probe(mode, name, model_name, batch_size, img_size, device, dtype, seed, repeats)


def add_peak_memory(results: List[Dict[str, Any]], model_name: str, batch_size: int, img_size: int, device: str,
                    dtype: str, seed: int, log: Callable[[str], None]) -> None:
    """Fill in each result's `peak_memory_mib` (where its candidate allows a probe) and `memory_vs_timm`."""
    for r in results:
        if candidate(r['mode'], r['name']).memory_probe:
            log(f"  peak memory, {r['mode']}: {r['name']}")
            b = peak_memory(r['mode'], r['name'], model_name, batch_size, img_size, device, dtype, seed)
            r['peak_memory_mib'] = None if b is None else b / 2 ** 20
    for r in results:
        ref = next((q for q in results if q['mode'] == r['mode'] and q['name'] == REFERENCE), None)
        if ref and ref['peak_memory_mib'] and r['peak_memory_mib'] is not None:
            r['memory_vs_timm'] = r['peak_memory_mib'] / ref['peak_memory_mib']
