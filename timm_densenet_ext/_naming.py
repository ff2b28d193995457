"""How an error names what the user can change: Python arguments for the Python API (`force=True`), the command
line's flags for the CLI (`--force`). Library code writes `arg('force')`; the CLI switches the style for its run."""
import contextlib
import contextvars
from typing import Iterator, Optional

__all__ = ['arg', 'cli_style', 'FLAGS']

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
