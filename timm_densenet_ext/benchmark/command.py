"""`timm-densenet-ext benchmark` (and `python -m timm_densenet_ext.benchmark`): its arguments, the run, its files."""
import argparse
import contextlib
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

__all__ = ['add_arguments', 'run_from_args', 'main']

RESULT_FILES = ('benchmark.json', 'benchmark.png')


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .._naming import add_option
    from ..deploy import PRECISIONS
    add_option(p, 'model', 'variant to measure (default densenet121)', default='densenet121')
    add_option(p, 'batch_size', 'images per batch (default 16)', default=16)
    add_option(p, 'img_size', 'input height and width (default 224)', default=224)
    p.add_argument('--repeats', type=int, default=5, help='interleaved rounds; the median counts (default 5)')
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16', 'float16'),
                   help='float32, or autocast to bfloat16/float16')
    p.add_argument('--no-train', dest='train', action='store_false', help='inference only')
    p.add_argument('--no-compile', dest='compile', action='store_false', help='skip the torch.compile candidates')
    add_option(p, 'output', 'folder for benchmark.json and benchmark.png (default: print the table only)',
               default=None, metavar='DIR')
    add_option(p, 'force', 'replace benchmark.json/.png already in --output')
    p.add_argument('--no-memory', dest='memory', action='store_false', help='skip the peak-memory measurements')
    p.add_argument('--precision', nargs='+', choices=PRECISIONS, default=['fp32'], metavar='PRECISION',
                   help='also measure our deployment path, optimize_for_inference, at these precisions '
                        f'({", ".join(PRECISIONS)}): fp32 and bf16 compiled by Inductor (not with --no-compile), int8 '
                        'calibrated on the input batch and run by ONNX Runtime and OpenVINO (CPU, float32) '
                        '(default fp32)')


def _exists_message(path: str) -> str:
    from .._naming import arg
    return f'{path} exists; pass {arg("force")} to replace it, or choose another {arg("out", "DIR")}.'


def _claim_outputs(stack: contextlib.ExitStack, output: Optional[str], force: bool) -> List[str]:
    """The result files' paths in `output` (none without one), claimed until `stack` closes; existing ones refused
    unless `force`."""
    from .._files import claim
    if not output:
        return []
    os.makedirs(output, exist_ok=True)
    paths = [os.path.join(output, n) for n in RESULT_FILES]
    for path in paths:  # held from the check to the write: a second run into the same folder is refused
        stack.enter_context(claim(path))
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not force:
        raise FileExistsError(_exists_message(existing[0]))
    return paths


def _write_results(result: Dict[str, Any], paths: List[str], force: bool) -> None:
    """benchmark.json and benchmark.png, each written under a temporary name and moved into place."""
    from .._files import writing
    from .chart import write_chart
    with writing(paths[0], force=force, exists_message=_exists_message(paths[0])) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    with writing(paths[1], force=force, exists_message=_exists_message(paths[1])) as tmp:
        write_chart(result, str(tmp))


def run_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """What `timm-densenet-ext benchmark` and benchmarks/benchmark.py do: run, print the table, write the files."""
    from ..models import resolve_model_name
    from .measure import run_benchmark
    from .table import format_table
    resolve_model_name(args.model)  # an unknown model is a ValueError before anything is measured
    with contextlib.ExitStack() as stack:
        paths = _claim_outputs(stack, args.output, args.force)
        result = run_benchmark(
            args.model, args.batch_size, args.img_size, args.repeats, args.device, args.dtype, args.train,
            args.compile, args.memory, log=lambda s: print(s, file=sys.stderr, flush=True),
            precisions=args.precision)
        result['command'] = 'timm-densenet-ext benchmark ' + ' '.join(
            sys.argv[2:] if sys.argv[1:2] == ['benchmark'] else sys.argv[1:])
        print(format_table(result))
        if paths:
            _write_results(result, paths, args.force)
            print(f'\nwrote {paths[0]} and {paths[1]}')
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .memory import probe
    package_doc = sys.modules[__package__].__doc__  # the package is loaded before any of its modules
    p = argparse.ArgumentParser(prog='benchmark', description=package_doc.split('\n\n')[0])
    add_arguments(p)
    p.add_argument('--memory-probe', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_probe:  # one candidate's peak memory, in the process peak_memory started
        mode, name = args.memory_probe.split(':', 1)
        peak = probe(mode, name, args.model, args.batch_size, args.img_size, args.device, args.dtype, 0, args.repeats)
        print(json.dumps(dict(peak_bytes=peak)))
        return 0
    try:
        run_from_args(args)
    except (ValueError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0
