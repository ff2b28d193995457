"""How the user names what they can change: Python arguments for the Python API (`force=True`), the command line's
flags for the CLI (`--force`). Library code writes `arg('force')` in its errors; the CLI switches the style for its run
and declares its options from one table (`OPTIONS`, `add_option`)."""
import argparse
import contextlib
import contextvars
import os
import shlex
import shutil
import sys
from typing import Any, Dict, Iterator, Optional, Tuple

__all__ = ['arg', 'cli_style', 'program', 'FLAGS', 'OPTIONS', 'add_option']

# Python argument -> the CLI flag that sets it (timm's scripts' names)
FLAGS = {
    'model_name': '--model',
    'pretrained': '--pretrained',
    'weights': '--checkpoint',
    'checkpoint': '--checkpoint',
    'out': '--output',
    'out_dir': '--output',
    'data_dir': '--data-dir',
    'force': '--force',
    'resume': '--resume',
    'repo_id': '--repo-id',
    'num_classes': '--num-classes',
    'top_k': '--topk',
    'cam_dir': '--cam',
    'batch_size': '--batch-size',
    'img_size': '--img-size',
    'epochs': '--epochs',
    'lr': '--lr',
    'weight_decay': '--weight-decay',
    'hflip': '--hflip',
    'scale': '--scale',
    'seed': '--seed',
    'threads': '--threads',
    'fmt': '--format',
    'dry_run': '--dry-run',
    'use_ema': '--no-ema',
    'base_model': '--base-model',
    'dataset': '--dataset',
    'datasets': '--dataset',
    'revision': '--revision',
    'weights_source': '--weights-source',
    'license': '--license',
}

# The command line's options, each declared once: its flags (timm's scripts' name first, then this tool's earlier
# names) and argparse settings; a subcommand (the CLI's, the benchmark's) adds the ones it takes with `add_option`,
# with what they mean there. FLAGS names the same flags in the library's errors.
OPTIONS: Dict[str, Tuple[Tuple[str, ...], Dict[str, Any]]] = {
    'model': (('-m', '--model'), dict(metavar='MODEL')),
    'checkpoint': (('--checkpoint', '--weights'), dict(metavar='PATH')),
    'output': (('--output', '--out'), {}),
    'data_dir': (('--data-dir', '--data'), dict(metavar='DIR')),
    'batch_size': (('-b', '--batch-size'), dict(type=int, metavar='B')),
    'img_size': (('--img-size',), dict(type=int, metavar='PX')),
    'topk': (('--topk', '--top-k'), dict(type=int, metavar='K')),
    'epochs': (('--epochs',), dict(type=int, metavar='N')),
    'threads': (('--threads',), dict(type=int, metavar='N', help=(
        "torch's CPU threads (default: chosen for the work, one for small images; OMP_NUM_THREADS keeps torch's "
        'own)'))),
    'repo_id': (('--repo-id',), dict(metavar='ORG/NAME')),
    'force': (('--force',), dict(action='store_true')),
    'json': (('--json',), dict(action='store_true', help='print JSON instead of text')),
    'precision': (('--precision',), dict(choices=('fp32', 'bf16', 'int8'), default='fp32')),  # deploy.PRECISIONS
    # a multi-label model's label CSV (finetune --multi-label, validate): multilabel.read_labels
    'labels': (('--labels',), dict(metavar='CSV')),
    'uncertain': (('--uncertain',), dict(type=int, choices=(0, 1), help=(
        'what a -1 (uncertain, as in CheXpert) counts as (default: refused)'))),
    # what the user states about the weights, for their card; nothing is assumed
    'base_model': (('--base-model',), dict(metavar='REPO|TAG', help=(
        'the Hub repository (ORG/NAME) or published tag (densenet121.ra_in1k) these weights were fine-tuned from; '
        'stated in the card (default: not stated)'))),
    'datasets': (('--dataset',), dict(action='append', metavar='ID', help=(
        'a Hub dataset id the weights were trained on (imagenet-1k, ORG/NAME); repeat for several (default: not '
        'stated)'))),
    'license': (('--license',), dict(metavar='ID', help=(
        "the weights' license as the Hub lists it (apache-2.0, mit, cc-by-4.0, other) (default: not stated)"))),
    'weights_source': (('--weights-source',), dict(metavar='TEXT', help=(
        'a sentence on where the weights come from, put in the card before the conversion note'))),
}


def add_option(p: argparse._ActionsContainer, dest: str, help: Optional[str] = None, **settings: Any) -> None:
    """Add option `dest` of `OPTIONS` to `p`, with the help it has there (`help`: what it means in this subcommand);
    `settings` override its argparse settings (default, required)."""
    flags, defaults = OPTIONS[dest]
    p.add_argument(*flags, dest=dest, **{**defaults, **({} if help is None else dict(help=help)), **settings})


_CLI = contextvars.ContextVar('timm_densenet_ext_cli_style', default=False)


def arg(name: str, value: Optional[str] = None) -> str:
    """`name=True` / `name=value` for Python callers; the flag (`--force`, `--output DIR`) on the command line."""
    if _CLI.get():
        flag = FLAGS.get(name, '--' + name.replace('_', '-'))  # the CLI's rule where no alias is listed
        return flag if value is None else f'{flag} {value}'
    return f'{name}=True' if value is None else f'{name}={value}'


@contextlib.contextmanager
def cli_style() -> Iterator[None]:
    """Name flags instead of Python arguments in the errors raised inside this block."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def program() -> str:
    """This tool's command as the user ran it, for the next steps it prints: `timm-densenet-ext` when that is what
    the shell finds on PATH, else the path they typed (`.venv/bin/timm-densenet-ext` in the README's quick start)."""
    argv0 = sys.argv[0] if sys.argv else ''
    if os.path.basename(argv0) != 'timm-densenet-ext':  # `python -m timm_densenet_ext.cli`, or called from Python
        return 'timm-densenet-ext'
    found = shutil.which('timm-densenet-ext')
    if found and os.path.realpath(found) == os.path.realpath(argv0):
        return 'timm-densenet-ext'
    return shlex.quote(argv0)
