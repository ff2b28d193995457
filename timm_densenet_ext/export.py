"""Export a model for deployment: ONNX (`torch.onnx`, run by onnxruntime), TorchScript (`torch.jit.script`) or a
`torch.export` ExportedProgram, every one with a dynamic batch axis, and checked before it is kept.

The file is written under a temporary name beside `out`, loaded back (onnxruntime, `torch.jit.load`,
`torch.export.load`), compared with the PyTorch model on random images at two batch sizes, and only then moved to
`out`; an existing `out` is replaced only with `force`.

In reduced precision (see `deploy`), bf16 is the fused model in bfloat16 (`deploy.Bfloat16Model`, float32 in and out)
as TorchScript or an ExportedProgram, and int8 is ONNX Runtime's static quantization of the ONNX export
(`deploy.quantize_onnx`), calibrated on images of DIR/train. Either is kept only if its top-1 class agrees with the
float32 PyTorch model's on at least `MIN_TOP1_AGREEMENT` of the images of DIR/val.
"""
import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ._files import claim, writing
from ._naming import arg
from ._onnx import export_onnx
from .deploy import PRECISIONS, check_precision, fused_at, quantize_onnx
from .finetune import image_dataset, image_folders
from .loading import load_model
from .predict import preprocessing

__all__ = ['FORMATS', 'PRECISIONS', 'TOLERANCE', 'MIN_TOP1_AGREEMENT', 'ExportResult', 'export_model', 'export_onnx',
           'load_exported']

FORMATS = ('onnx', 'torchscript', 'exported-program')
SUFFIXES = {'onnx': '.onnx', 'torchscript': '.pt', 'exported-program': '.pt2'}
TOLERANCE = 1e-4  # largest absolute difference from PyTorch's logits that an export may show
CHECK_BATCH_SIZES = (1, 3)  # the traced example has batch 2: other sizes show the batch axis is dynamic
MIN_TOP1_AGREEMENT = 0.99  # of a reduced-precision export's top-1 class with the float32 model's, on DIR/val
CALIBRATION_IMAGES = 256  # of DIR/train, a seeded random choice: the int8 scales
CHECK_IMAGES = 1000  # of DIR/val at most, a seeded random choice: the agreement check
IMAGE_BATCH_SIZE = 32


@dataclass(frozen=True)
class ExportResult:
    """The file written and how closely the loaded file reproduces PyTorch's outputs."""
    path: Path
    format: str
    input_size: Tuple[int, int, int]
    max_abs_diff: float  # over CHECK_BATCH_SIZES, random images (bounded by TOLERANCE in fp32 only)
    size_bytes: int
    precision: str = 'fp32'
    checked_on: Optional[Path] = None  # DIR/val, when real images were checked
    images_checked: int = 0  # of checked_on
    top1_agreement: Optional[float] = None  # fraction of images_checked whose top-1 class is the fp32 model's
    max_logit_diff: Optional[float] = None  # from the fp32 model's logits, over images_checked


@contextlib.contextmanager
def _torchscript() -> Iterator[None]:
    """Silence torch's FutureWarning on `torch.jit`: torch deprecates TorchScript for torch.export, but deployments
    still use it."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=FutureWarning, message=r'`torch\.jit')
        yield


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with _torchscript():
        torch.jit.save(torch.jit.script(model), str(path))


def _export_program(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim('batch', min=1)},))
    torch.export.save(program, str(path))


_EXPORTERS: Dict[str, Callable[[nn.Module, torch.Tensor, Path], None]] = {
    'onnx': export_onnx, 'torchscript': _export_torchscript, 'exported-program': _export_program}


def load_exported(path: Union[str, Path], fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running an exported file on a batch of images: onnxruntime, TorchScript or the ExportedProgram."""
    path = str(path)
    if fmt == 'onnx':
        try:
            import onnxruntime
        except ImportError:
            raise ImportError("checking an ONNX export needs onnxruntime: pip install 'timm-densenet-ext[export]'.") \
                from None
        session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    if fmt == 'torchscript':
        with _torchscript():
            return torch.jit.load(path, map_location='cpu')
    if fmt == 'exported-program':
        return torch.export.load(path).module()
    raise ValueError(f'{arg("fmt", repr(fmt))}: choose one of {", ".join(FORMATS)}.')


def export_model(
        model_name: str,
        fmt: str,
        out: Union[str, Path],
        *,
        pretrained: bool = False,
        weights: Union[str, Path, None] = None,
        force: bool = False,
        precision: str = 'fp32',
        data_dir: Union[str, Path, None] = None,
) -> ExportResult:
    """Export a model loaded by `loading.load_model` (a variant with `pretrained` or `weights`, or a hub folder
    'local-dir:DIR') as `fmt` ('onnx', 'torchscript' or 'exported-program') to the file `out`.

    The input is (batch, channels, height, width) at the model's pretrained input size, the batch dynamic. The file is
    checked before it is kept: loaded back, its outputs must match PyTorch's within `TOLERANCE`. Raises ValueError,
    FileNotFoundError or FileExistsError with a message naming the thing and the fix.

    precision: 'fp32', 'bf16' (torchscript or exported-program) or 'int8' (onnx). The reduced precisions need
    `data_dir`, a folder of train/ and val/ class folders as `finetune` takes: int8 is calibrated on images of
    train/, and either is kept only if its top-1 class agrees with the fp32 model's on at least `MIN_TOP1_AGREEMENT`
    of the images of val/ (in fp32, `data_dir` adds the same measurement).
    """
    if fmt not in FORMATS:
        raise ValueError(f'{arg("fmt", repr(fmt))}: choose one of {", ".join(FORMATS)}.')
    _check_precision(precision, fmt, data_dir)
    out = Path(out)
    _check_output(out, fmt, force)
    folders = image_folders(data_dir) if data_dir is not None else None
    with claim(out):  # from the check to the rename: a second export to the same file is refused, not lost
        _check_output(out, fmt, force)  # again: another process may have finished it while we waited to claim
        model = load_model(model_name, pretrained=pretrained, weights=weights).eval()
        return _export_checked(model, fmt, out, force, precision, folders)


def _check_precision(precision: str, fmt: str, data_dir: Union[str, Path, None]) -> None:
    check_precision(precision)
    if precision == 'int8' and fmt != 'onnx':
        raise ValueError(f'{arg("precision", "int8")} is written as ONNX (run by ONNX Runtime); give '
                         f'{arg("fmt", "onnx")}.')
    if precision == 'bf16' and fmt == 'onnx':
        raise ValueError(f'{arg("precision", "bf16")} cannot be ONNX: ONNX Runtime has no bfloat16 convolutions on '
                         f'the CPU; give {arg("fmt", "exported-program")} (or torchscript), or '
                         f'{arg("precision", "int8")} for ONNX.')
    if precision != 'fp32' and data_dir is None:
        raise ValueError(f'{arg("precision", precision)} is checked against fp32 on real images: give '
                         f'{arg("data_dir", "DIR")}, the folder of train/ and val/ class folders that finetune takes.')


def _exists_message(out: Path) -> str:
    return f'{out}: exists; pass {arg("force")} to replace it, or choose another {arg("out", "FILE")}.'


def _check_output(out: Path, fmt: str, force: bool) -> None:
    if out.is_dir():
        raise ValueError(
            f'{out}: is a folder; give {arg("out", "a file name")}, e.g. {out / ("model" + SUFFIXES[fmt])}.')
    if out.exists() and not force:
        raise FileExistsError(_exists_message(out))
    if not out.parent.is_dir():
        raise FileNotFoundError(f'{out.parent}: no such folder; create it, or choose another {arg("out", "FILE")}.')
    if fmt == 'exported-program' and out.suffix != '.pt2':
        raise ValueError(
            f'{out}: torch.export.load reads only files named *.pt2; give {arg("out", out.stem + ".pt2")}.')


def _image_batches(folder: Path, model: nn.Module, limit: int) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
    """Batches (images, labels) of up to `limit` images of the class folders in `folder`, a seeded random choice
    (the same every run), preprocessed by the model's eval transform."""
    dataset = image_dataset(folder, preprocessing(model))
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit].sort().values
    subset = torch.utils.data.Subset(dataset, chosen.tolist())
    return torch.utils.data.DataLoader(subset, batch_size=IMAGE_BATCH_SIZE, shuffle=False)


def _write(model: nn.Module, fmt: str, precision: str, example: torch.Tensor, tmp: Path,
           folders: Optional[Tuple[Path, Path, List[str]]]) -> None:
    """`model` in `precision`, written to `tmp` as `fmt`."""
    with torch.no_grad():
        if precision == 'int8':
            assert folders is not None
            quantize_onnx(model, _image_batches(folders[0], model, CALIBRATION_IMAGES), tmp)
        elif precision == 'bf16':
            _EXPORTERS[fmt](fused_at(model, 'bf16'), example, tmp)
        else:
            _EXPORTERS[fmt](model, example, tmp)


def _agreement(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor],
               batches: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[float, int, float]:
    """How often `run`'s top-1 class is `model`'s on `batches`, over how many images, and the largest logit
    difference."""
    agree, total, max_diff = 0, 0, 0.0
    with torch.no_grad():
        for images, _ in batches:
            expected, actual = model(images), run(images)
            agree += (expected.argmax(1) == actual.argmax(1)).sum().item()
            total += len(images)
            max_diff = max(max_diff, (actual - expected).abs().max().item())
    return agree / max(total, 1), total, max_diff


def _export_checked(model: nn.Module, fmt: str, out: Path, force: bool, precision: str = 'fp32',
                    folders: Optional[Tuple[Path, Path, List[str]]] = None) -> ExportResult:
    """Export to a temporary file, load it back, compare with `model` at CHECK_BATCH_SIZES (and on the images of
    `folders`' val/ when given), then move it to `out`."""
    input_size = tuple(model.pretrained_cfg['input_size'])
    generator = torch.Generator().manual_seed(0)
    example = torch.randn((2, *input_size), generator=generator)
    checked: dict = {}

    with writing(out, force=force, exists_message=_exists_message(out)) as tmp:
        _write(model, fmt, precision, example, tmp, folders)
        run = load_exported(tmp, fmt)
        max_diff = 0.0
        with torch.no_grad():
            for batch in CHECK_BATCH_SIZES:
                x = torch.randn((batch, *input_size), generator=generator)
                expected, actual = model(x), run(x)
                if actual.shape != expected.shape:
                    raise RuntimeError(f'the exported {fmt} file gives outputs shaped {list(actual.shape)}, not '
                                       f'{list(expected.shape)}, at batch size {batch}')
                max_diff = max(max_diff, (actual - expected).abs().max().item())
        if precision == 'fp32' and not max_diff <= TOLERANCE:
            raise RuntimeError(f'the exported {fmt} file differs from PyTorch by {max_diff:.2e} (more than '
                               f'{TOLERANCE:g}); nothing was written')
        if folders is not None:
            val_dir = folders[1]
            agreement, images, logit_diff = _agreement(model, run, _image_batches(val_dir, model, CHECK_IMAGES))
            if not agreement >= MIN_TOP1_AGREEMENT:
                raise RuntimeError(
                    f'the exported {precision} {fmt} file agrees with the fp32 model on the top-1 class of '
                    f'{100 * agreement:.2f}% of {images} images of {val_dir} (less than '
                    f'{100 * MIN_TOP1_AGREEMENT:g}%); nothing was written')
            checked = dict(checked_on=val_dir, images_checked=images, top1_agreement=agreement,
                           max_logit_diff=logit_diff)
        size = tmp.stat().st_size
    return ExportResult(out, fmt, input_size, max_diff, size, precision=precision, **checked)
