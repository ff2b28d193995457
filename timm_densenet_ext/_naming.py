"""How an error names what the user can change: Python arguments for the Python API (`force=True`), the command
line's flags for the CLI (`--force`). Library code writes `arg('force')`; the CLI switches the style for its run."""
import contextlib
import contextvars
import os
import shlex
import shutil
import sys
from typing import Iterator, Optional

__all__ = ['arg', 'cli_style', 'program', 'FLAGS']

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
