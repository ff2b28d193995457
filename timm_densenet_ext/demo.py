"""The offline demo: fine-tune the paper's CIFAR DenseNet-BC on scikit-learn's handwritten digits through
`finetune`, reload the hub folder it wrote with `timm.create_model('local-dir:...')`, and measure it again.

The digits (`sklearn.datasets.load_digits`: 1,797 real 8x8 scans of handwritten digits, UCI, shipped inside
scikit-learn) are written as an image folder, train/ and val/, exactly what a user's own data looks like. No
pretrained CIFAR weights exist, so the DenseNet starts from random weights: `finetune` with neither --pretrained
nor --checkpoint.
"""
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

from ._files import claims_output
from ._naming import arg, program
from .finetune import FinetuneResult, evaluate, finetune, image_dataset
from .hub import load_code

__all__ = ['DEMO_MODEL', 'MODEL_FOLDER', 'DEMO_RECIPE', 'DemoResult', 'write_digits_folder', 'run_demo']

DEMO_MODEL = 'densenet_bc_100_k12'
MODEL_FOLDER = 'densenet_bc_100_k12.digits'  # named as Hub repositories of timm weights are: architecture.tag
# Measured on 2 CPU cores: see README (Quick start) for the accuracy and time this gives. Three epochs: 99.2% validation
# accuracy in 34 s (98.1-98.6% with two threads or seed 1); four: 99.2% in 47-54 s; eight: 99.4% in 96 s. The time is
# one thread's compute, so a busy second core barely changes it.
# The digits' own 8 x 8 pixels (DenseNet-BC needs 4 or more); no flips, which would turn digits into other shapes.
DEMO_RECIPE = dict(epochs=3, batch_size=32, lr=2e-3, weight_decay=0.05, img_size=8, hflip=0.0, scale=(0.6, 1.0))
_INSTALL_HINT = "pip install 'timm-densenet-ext[demo]' (scikit-learn ships the digits)"


@dataclass(frozen=True)
class DemoResult:
    """What the demo wrote and measured: the training, and the reloaded model's accuracy."""
    out_dir: Path
    data_dir: Path
    model_dir: Path
    training: FinetuneResult
    reloaded_correct: int
    reloaded_total: int
    seconds: float  # the whole demo, data to reloaded accuracy

    @property
    def reloaded_accuracy(self) -> float:
        return self.reloaded_correct / self.reloaded_total


def write_digits_folder(data_dir: Union[str, Path], val_fraction: float = 0.2, seed: int = 0) -> Tuple[int, int]:
    """Write scikit-learn's digits as PNG files in DIR/{train,val}/{0..9}/, split stratified by class with `seed`.

    Returns (training images, validation images).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError(f'the demo needs scikit-learn: {_INSTALL_HINT}.') from None
    import numpy as np
    from PIL import Image

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(
        index, test_size=val_fraction, random_state=seed, stratify=digits.target)
    data_dir = Path(data_dir)
    for split, indices in (('train', train_idx), ('val', val_idx)):
        for i in indices:
            folder = data_dir / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)  # 0..16 ink -> 8-bit grey
            Image.fromarray(pixels, mode='L').save(folder / f'{i:04d}.png')
    return len(train_idx), len(val_idx)


def next_steps(out_dir: Path, model_dir: Path, example: Path, tool: str = 'timm-densenet-ext',
               onnx: Optional[bool] = None) -> List[str]:
    """The demo's last lines: what to do with what it wrote, each runnable exactly as printed (test_next_steps runs
    them). `tool` is how the user ran this tool (`_naming.program()`); the export is to ONNX when its packages are
    installed (`onnx`: None to look), else to torch.export's .pt2, which needs nothing more."""
    import importlib.util
    if onnx is None:
        onnx = all(importlib.util.find_spec(m) is not None for m in ('onnx', 'onnxscript', 'onnxruntime'))
    fmt, suffix = ('onnx', 'onnx') if onnx else ('exported-program', 'pt2')
    folder, model = shlex.quote(str(model_dir)), shlex.quote(f'local-dir:{model_dir}')
    return [
        'next:',
        f'  {tool} predict -m {model} {shlex.quote(str(example))}',
        f'  {tool} validate -m {model} --data-dir {shlex.quote(str(out_dir / "data"))}',
        f'  {tool} export -m {model} --format {fmt} --output {shlex.quote(str(out_dir / ("digits." + suffix)))}',
        f'  {tool} push {folder} --repo-id ORG/NAME --dry-run',
        f'  load it in Python: {load_code(model_dir)}',
    ]


def _reloaded_accuracy(model_dir: Path, val_dir: Path, progress: Optional[bool] = None,
                       threads: Optional[int] = None) -> Tuple[int, int]:
    """The hub folder loaded back the way anyone would load it, and measured on `val_dir`: (correct, total)."""
    import timm
    import timm_densenet_ext  # noqa: F401  (registers the variants, for 'local-dir:' folders naming them)
    reloaded = timm.create_model(f'local-dir:{model_dir}', pretrained=True)
    data_config = timm.data.resolve_data_config(model=reloaded)
    val_set = image_dataset(val_dir, timm.data.create_transform(**data_config))
    return evaluate(reloaded, val_set, progress=progress, threads=threads)


@claims_output('out_dir')
def run_demo(
        out_dir: Union[str, Path] = 'densenet-demo',
        *,
        force: bool = False,
        progress: Optional[bool] = None,
        log: Callable[[str], None] = print,
        threads: Optional[int] = None,
        **recipe,
) -> DemoResult:
    """Run the demo into `out_dir`: data/ (the digits as an image folder) and densenet_bc_100_k12.digits/ (the hub
    folder).

    Existing data/ or densenet_bc_100_k12.digits/ folders in `out_dir` are replaced only with `force`; nothing else
    there is touched. `recipe` overrides `DEMO_RECIPE` (fewer epochs for a quick check). `threads`: CPU threads for
    torch (default: `finetune.choose_threads`, one for these 8 px images). Returns a `DemoResult`.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    data_dir, model_dir = out_dir / 'data', out_dir / MODEL_FOLDER
    for folder in (data_dir, model_dir):
        if folder.exists() and not force:
            raise FileExistsError(
                f'{folder}: exists from an earlier run; pass {arg("force")} to replace it, or give another '
                f'{arg("out_dir", "DIR")}.')
    if data_dir.exists():
        shutil.rmtree(data_dir)
    train_n, val_n = write_digits_folder(data_dir)
    log(f'wrote {train_n} training and {val_n} validation images of scikit-learn\'s handwritten digits to {data_dir}')

    result = finetune(
        DEMO_MODEL, data_dir, model_dir, force=force, progress=progress, log=log,
        threads=threads, data_name='scikit-learn digits',
        data_description=(
            "scikit-learn's handwritten digits (`sklearn.datasets.load_digits`: 1,797 8x8 grey images of the "
            'digits 0-9 from the UCI repository), written as an image folder with a stratified 80/20 split, seed 0'),
        **{**DEMO_RECIPE, **recipe})
    correct, total = _reloaded_accuracy(model_dir, data_dir / 'val', progress=progress, threads=threads)
    seconds = time.perf_counter() - started

    log(f"reloaded timm.create_model('local-dir:{model_dir}', pretrained=True): validation accuracy "
        f'{100 * correct / total:.2f}% ({correct}/{total}), best epoch {result.best_epoch} of {len(result.history)}')
    log(f'done in {seconds:.0f} s. Everything is in {out_dir}/:')
    log(f'  {data_dir}/  the digits as an image folder (train/ and val/, one folder per class)')
    log(f'  {model_dir}/  the hub folder: model.safetensors, config.json (with the label names), README.md '
        f'(the model card: data, recipe, accuracy)')
    example = next(iter(sorted((data_dir / 'val' / '7').iterdir())))
    for line in next_steps(out_dir, model_dir, example, tool=program()):
        log(line)
    return DemoResult(out_dir, data_dir, model_dir, result, correct, total, seconds)
