"""Speed and memory of our DenseNet side by side with timm's built-in and torchvision's, in one run.

Every implementation gets the same weights and the same input. The candidates run interleaved (one timed call each
per round, several rounds) and the median counts, so a machine that slows down mid-run slows all of them alike.
Ratios are against timm's built-in eager model on ordinary NCHW input. Peak memory is, on the CPU, the growth of
resident memory during one call, measured in a separate process per candidate (the kernel's high-water mark, reset
before the call, with glibc returning freed buffers at once), and `torch.cuda.max_memory_allocated` on a GPU. Efficiency is the model's nominal FLOPs per second over this machine's
measured speed on a large 3x3 convolution.

    timm-densenet-ext benchmark --model densenet121 --batch-size 16 --img-size 224 --output bench/
"""
import argparse
import contextlib
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['run_benchmark', 'format_table', 'write_chart', 'conv_peak_gflops', 'main']

REFERENCE = 'timm'


class _PeakMemory:
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


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _references(model_name: str) -> Dict[str, Callable[[], nn.Module]]:
    from .parity import reference_builders
    return reference_builders(model_name)


def _inference_candidates(model_name: str, state: Dict[str, torch.Tensor], device: torch.device,
                          compile: bool) -> Dict[str, Callable[[], tuple]]:
    """name -> builder of (module, memory format of its input)."""
    import timm
    from .models.fused import fuse_for_inference
    cl = torch.channels_last
    refs = _references(model_name)

    def load(build: Callable[[], nn.Module]) -> nn.Module:
        m = build()
        m.load_state_dict(state)
        return m.to(device).eval()

    def ours() -> nn.Module:
        return load(lambda: timm.create_model(model_name))

    out: Dict[str, Callable[[], tuple]] = {}
    if 'timm' in refs:
        out['timm'] = lambda: (load(refs['timm']), torch.contiguous_format)
        out['timm channels_last'] = lambda: (load(refs['timm']).to(memory_format=cl), cl)
        if compile:
            out['timm channels_last compiled'] = lambda: (torch.compile(load(refs['timm']).to(memory_format=cl)), cl)
    if 'torchvision' in refs:
        out['torchvision'] = lambda: (load(refs['torchvision']), torch.contiguous_format)
    out['ours'] = lambda: (ours(), torch.contiguous_format)
    out['ours fused'] = lambda: (fuse_for_inference(ours()), torch.contiguous_format)
    if compile:
        out['ours fused compiled'] = lambda: (torch.compile(fuse_for_inference(ours())), torch.contiguous_format)
    return out


def _train_candidates(model_name: str, state: Dict[str, torch.Tensor],
                      device: torch.device) -> Dict[str, Callable[[], nn.Module]]:
    """name -> builder of a model in train mode."""
    import timm
    refs = _references(model_name)

    def load(build: Callable[[], nn.Module], efficient: bool) -> nn.Module:
        m = build()
        m.load_state_dict(state)
        m.set_grad_checkpointing(efficient) if hasattr(m, 'set_grad_checkpointing') else None
        return m.to(device).train()

    out: Dict[str, Callable[[], nn.Module]] = {}
    for efficient in (False, True):
        suffix = ' memory_efficient' if efficient else ''
        if 'timm' in refs:
            out['timm' + suffix] = lambda e=efficient: load(refs['timm'], e)
        if 'torchvision' in refs:
            out['torchvision' + suffix] = lambda e=efficient: load(lambda: refs['torchvision'](memory_efficient=e), e)
        out['ours' + suffix] = lambda e=efficient: load(lambda: timm.create_model(model_name, memory_efficient=e), e)
    order = ['timm', 'timm memory_efficient', 'torchvision', 'torchvision memory_efficient', 'ours',
             'ours memory_efficient']
    return {k: out[k] for k in order if k in out}


def _setup(model_name: str, batch_size: int, img_size: int, device: str, dtype: str, seed: int) -> tuple:
    """The device, an autocast context factory, the shared random weights, an input batch and its labels."""
    import timm
    import timm_densenet_ext  # noqa: F401  (registers the variants)
    from .parity import randomize_
    dev = torch.device(device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda asked for, but torch sees no CUDA GPU; use --device cpu.')
    amp_dtype = {'float32': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    autocast = (lambda: torch.autocast(dev.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    torch.manual_seed(seed)
    state = randomize_(timm.create_model(model_name), seed).state_dict()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(dev)
    target = torch.randint(0, 1000, (batch_size,), generator=gen).to(dev)
    return dev, autocast, amp_dtype, state, x, target


def _workloads(mode: str, model_name: str, state: Dict[str, torch.Tensor], dev: torch.device, compile: bool,
               x: torch.Tensor, target: torch.Tensor, autocast: Callable[[], Any],
               only: Optional[str] = None) -> Dict[str, Callable[[], Any]]:
    """name -> a call that runs one inference batch or one training step of that candidate."""
    fns: Dict[str, Callable[[], Any]] = {}
    if mode == 'inference':
        for k, build in _inference_candidates(model_name, state, dev, compile).items():
            if only is None or k == only:
                m, fmt = build()
                xin = x.contiguous(memory_format=fmt)
                fns[k] = lambda m=m, xin=xin: _infer(m, xin, autocast)
        return fns
    for k, build in _train_candidates(model_name, state, dev).items():
        if only is None or k == only:
            m = build()
            opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
            fns[k] = lambda m=m, opt=opt: _train_step(m, opt, x, target, autocast)
    return fns


def _infer(model: nn.Module, x: torch.Tensor, autocast: Callable[[], Any]) -> torch.Tensor:
    with torch.inference_mode(), autocast():
        return model(x)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor,
                autocast: Callable[[], Any]) -> None:
    with autocast():
        loss = F.cross_entropy(model(x), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def peak_memory(mode: str, name: str, model_name: str = 'densenet121', batch_size: int = 16, img_size: int = 224,
                device: str = 'cpu', dtype: str = 'float32', seed: int = 0, repeats: int = 2,
                timeout: float = 900.0) -> Optional[int]:
    """Peak memory in bytes of one call of candidate `name` (after a warm-up call), the median of `repeats`.

    On the CPU this runs in a fresh process with glibc told to hand freed buffers back at once, so that resident
    memory tracks what is allocated (in the timing process that would slow every allocation down); a probe still
    running after `timeout` seconds is stopped and reported as an error.
    """
    dev = torch.device(device)
    if dev.type == 'cpu':
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
    dev, autocast, _, state, x, target = _setup(model_name, batch_size, img_size, device, dtype, seed)
    fn = _workloads(mode, model_name, state, dev, False, x, target, autocast, only=name)[name]
    return _measure_peak(fn, dev, repeats)


def _measure_peak(fn: Callable[[], Any], dev: torch.device, repeats: int) -> Optional[int]:
    memory = _PeakMemory(dev)
    fn()
    peaks = []
    for _ in range(repeats):
        memory.start()
        fn()
        peaks.append(memory.stop())
    return None if None in peaks else int(statistics.median(peaks))


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
) -> Dict[str, Any]:
    """Time every candidate `repeats` times, interleaved; measure peak memory; return the figures."""
    import timm
    import torchvision
    from . import __version__
    from .stats import model_stats

    dev, autocast, amp_dtype, state, x, target = _setup(model_name, batch_size, img_size, device, dtype, seed)
    gmacs = model_stats(model_name, (3, img_size, img_size)).gmacs
    log(f'measuring the 3x3-convolution peak on {dev.type} ...')
    peak = conv_peak_gflops(dev, amp_dtype or torch.float32)
    results: List[Dict[str, Any]] = []

    for mode in ('inference', 'train') if train else ('inference',):
        log(f'building the {mode} candidates ...')
        fns = _workloads(mode, model_name, state, dev, compile, x, target, autocast)
        diffs: Dict[str, float] = {}
        for k, fn in fns.items():  # warm-up (and compilation) outside the timed rounds
            log(f'  warm-up {mode}: {k}')
            out = fn()
            if mode == 'inference':
                diffs[k] = out.float()
        if REFERENCE in diffs:
            ref = diffs[REFERENCE]
            diffs = {k: float((v - ref).abs().max() / ref.abs().max()) for k, v in diffs.items()}
        times: Dict[str, List[float]] = {k: [] for k in fns}
        for r in range(repeats):
            for k, fn in fns.items():
                _sync(dev)
                t = time.perf_counter()
                fn()
                _sync(dev)
                times[k].append(time.perf_counter() - t)
            log(f'  {mode} round {r + 1}/{repeats}')
        del fns
        gc.collect()
        flops = 2e9 * gmacs * (3 if mode == 'train' else 1)
        for k, ts in times.items():
            med = statistics.median(ts)
            results.append(dict(
                name=k, mode=mode, times_s=ts, median_s=med, images_per_s=batch_size / med,
                speedup_vs_timm=statistics.median(times[REFERENCE]) / med if REFERENCE in times else None,
                efficiency=batch_size * flops / med / 1e9 / peak,
                max_rel_diff_vs_timm=diffs.get(k) if mode == 'inference' else None,
                peak_memory_mib=None, memory_vs_timm=None))

    if memory:
        for r in results:
            if 'compiled' not in r['name']:  # compiling again in a probe process costs minutes
                log(f"  peak memory, {r['mode']}: {r['name']}")
                b = peak_memory(r['mode'], r['name'], model_name, batch_size, img_size, device, dtype, seed)
                r['peak_memory_mib'] = None if b is None else b / 2 ** 20
        for r in results:
            ref = next((q for q in results if q['mode'] == r['mode'] and q['name'] == REFERENCE), None)
            if ref and ref['peak_memory_mib'] and r['peak_memory_mib'] is not None:
                r['memory_vs_timm'] = r['peak_memory_mib'] / ref['peak_memory_mib']

    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = re.search(r'model name\s*:\s*(.*)', f.read()).group(1)
    except (OSError, AttributeError):
        pass
    return dict(
        config=dict(model=model_name, batch_size=batch_size, img_size=img_size, repeats=repeats, device=device,
                    dtype=dtype, train=train, compile=compile, seed=seed),
        machine=dict(
            device=torch.cuda.get_device_name(dev) if dev.type == 'cuda' else cpu,
            cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), python=platform.python_version(),
            torch=torch.__version__, torchvision=torchvision.__version__, timm=timm.__version__,
            timm_densenet_ext=__version__),
        gmacs_per_image=gmacs,
        conv_peak_gflops=peak,
        results=results,
    )


def _fmt(v: Optional[float], spec: str, suffix: str = '') -> str:
    return '-' if v is None else format(v, spec) + suffix


def format_table(result: Dict[str, Any]) -> str:
    """A Markdown table of the results (the README shows one)."""
    cfg, mach = result['config'], result['machine']
    lines = [
        f"{cfg['model']}, batch {cfg['batch_size']}, {cfg['img_size']} px, {cfg['dtype']}, {cfg['device']}: "
        f"{mach['device']}, {mach['torch_threads']} threads; torch {mach['torch']}, timm {mach['timm']}; "
        f"median of {cfg['repeats']} interleaved rounds; 3x3-conv peak {result['conv_peak_gflops']:.0f} GFLOP/s",
        '',
        '| mode | implementation | images/s | vs timm | peak memory (MiB) | memory vs timm | efficiency '
        '| max rel. diff vs timm |',
        '|---|---|---:|---:|---:|---:|---:|---:|',
    ]
    for r in result['results']:
        lines.append(
            f"| {r['mode']} | {r['name']} | {r['images_per_s']:.1f} | {_fmt(r['speedup_vs_timm'], '.2f', 'x')} "
            f"| {_fmt(r['peak_memory_mib'], '.0f')} | {_fmt(r['memory_vs_timm'], '.2f', 'x')} "
            f"| {r['efficiency'] * 100:.0f}% | {_fmt(r.get('max_rel_diff_vs_timm'), '.1e')} |")
    return '\n'.join(lines)


def write_chart(result: Dict[str, Any], path: str) -> None:
    """A PNG: images/s per implementation and mode, and peak memory where measured."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = result['results']
    modes = [m for m in ('inference', 'train') if any(r['mode'] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), 2, figsize=(12, 3.2 * len(modes) + 0.8), squeeze=False)
    for i, mode in enumerate(modes):
        sel = [r for r in rows if r['mode'] == mode]
        names = [r['name'] for r in sel]
        colors = ['tab:orange' if n.startswith('ours') else 'tab:gray' for n in names]
        ax = axes[i][0]
        ax.barh(names, [r['images_per_s'] for r in sel], color=colors)
        ax.set_xlabel('images/s (higher is better)')
        ax.set_title(f'{mode}: speed')
        ax.invert_yaxis()
        ax = axes[i][1]
        mem = [r['peak_memory_mib'] or 0 for r in sel]
        ax.barh(names, mem, color=colors)
        ax.set_xlabel('peak memory, MiB (lower is better)')
        ax.set_title(f'{mode}: memory')
        ax.invert_yaxis()
    cfg = result['config']
    fig.suptitle(f"{cfg['model']}, batch {cfg['batch_size']}, {cfg['img_size']} px, {cfg['dtype']}, "
                 f"{result['machine']['device']}")
    fig.tight_layout()
    tmp = f'{path}.tmp-{os.getpid()}'
    fig.savefig(tmp, format='png', dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('-m', '--model', default='densenet121', metavar='MODEL',
                   help='variant to measure (default densenet121)')
    p.add_argument('-b', '--batch-size', type=int, default=16, metavar='B', help='images per batch (default 16)')
    p.add_argument('--img-size', type=int, default=224, metavar='PX', help='input height and width (default 224)')
    p.add_argument('--repeats', type=int, default=5, help='interleaved rounds; the median counts (default 5)')
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16', 'float16'),
                   help='float32, or autocast to bfloat16/float16')
    p.add_argument('--no-train', dest='train', action='store_false', help='inference only')
    p.add_argument('--no-compile', dest='compile', action='store_false', help='skip the torch.compile candidates')
    p.add_argument('--output', '--out', dest='output', default=None, metavar='DIR',
                   help='folder for benchmark.json and benchmark.png (default: print the table only)')
    p.add_argument('--force', action='store_true', help='replace benchmark.json/.png already in --output')
    p.add_argument('--no-memory', dest='memory', action='store_false', help='skip the peak-memory measurements')


def run_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """What `timm-densenet-ext benchmark` and benchmarks/benchmark.py do: run, print the table, write the files."""
    import timm
    import timm_densenet_ext  # noqa: F401  (registers the variants)

    from ._files import claim
    from ._naming import arg
    if args.model not in timm.list_models() and not timm.is_model(args.model):
        raise ValueError(f'unknown model {args.model!r}; `timm-densenet-ext list` shows the variants.')
    with contextlib.ExitStack() as stack:
        paths = []
        if args.output:
            os.makedirs(args.output, exist_ok=True)
            paths = [os.path.join(args.output, n) for n in ('benchmark.json', 'benchmark.png')]
            for path in paths:  # held from the check to the write: a second run into the same folder is refused
                stack.enter_context(claim(path))
            existing = [p for p in paths if os.path.exists(p)]
            if existing and not args.force:
                raise FileExistsError(
                    f'{existing[0]} exists; pass {arg("force")} to replace it, or choose another {arg("out", "DIR")}.')
        result = run_benchmark(
            args.model, args.batch_size, args.img_size, args.repeats, args.device, args.dtype, args.train,
            args.compile, args.memory, log=lambda s: print(s, file=sys.stderr, flush=True))
        result['command'] = 'timm-densenet-ext benchmark ' + ' '.join(
            sys.argv[2:] if sys.argv[1:2] == ['benchmark'] else sys.argv[1:])
        print(format_table(result))
        if paths:
            tmp = f'{paths[0]}.tmp-{os.getpid()}'
            with open(tmp, 'w') as f:
                json.dump(result, f, indent=2)
            os.replace(tmp, paths[0])
            write_chart(result, paths[1])
            print(f'\nwrote {paths[0]} and {paths[1]}')
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='benchmark', description=__doc__.split('\n\n')[0])
    add_arguments(p)
    p.add_argument('--memory-probe', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_probe:  # one candidate's peak memory, in the process peak_memory started
        mode, name = args.memory_probe.split(':', 1)
        dev, autocast, _, state, x, target = _setup(args.model, args.batch_size, args.img_size, args.device,
                                                    args.dtype, 0)
        fn = _workloads(mode, args.model, state, dev, False, x, target, autocast, only=name)[name]
        print(json.dumps(dict(peak_bytes=_measure_peak(fn, dev, args.repeats))))
        return 0
    try:
        run_from_args(args)
    except (ValueError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
