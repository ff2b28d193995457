"""Export a model for deployment: ONNX (`torch.onnx`, run by onnxruntime), TorchScript (`torch.jit.script`) or a
`torch.export` ExportedProgram, every one with a dynamic batch axis, and checked before it is kept.

The file is written under a temporary name beside `out`, loaded back (onnxruntime, `torch.jit.load`,
`torch.export.load`), compared with the PyTorch model on random images at two batch sizes, and only then moved to
`out`; an existing `out` is replaced only with `force`.
"""
import contextlib
import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Tuple, Union

import torch
import torch.nn as nn

from ._files import claim, writing
from ._naming import arg
from .loading import load_model

__all__ = ['FORMATS', 'TOLERANCE', 'ExportResult', 'export_model', 'export_onnx', 'load_exported']

FORMATS = ('onnx', 'torchscript', 'exported-program')
SUFFIXES = {'onnx': '.onnx', 'torchscript': '.pt', 'exported-program': '.pt2'}
TOLERANCE = 1e-4  # largest absolute difference from PyTorch's logits that an export may show
CHECK_BATCH_SIZES = (1, 3)  # the traced example has batch 2: other sizes show the batch axis is dynamic


@dataclass(frozen=True)
class ExportResult:
    """The file written and how closely the loaded file reproduces PyTorch's outputs."""
    path: Path
    format: str
    input_size: Tuple[int, int, int]
    max_abs_diff: float  # over CHECK_BATCH_SIZES
    size_bytes: int


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Write `model` to `path` as ONNX with a dynamic batch axis ('input' -> 'logits'); `example` has a batch of 2
    or more (torch.export specialises a batch of 1)."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'timm-densenet-ext[export]'.") from None
    batch = torch.export.Dim('batch', min=1)
    # dynamo=True: torch.export's graph, the exporter torch recommends (the TorchScript-based one is deprecated);
    # external_data=False keeps the weights inside the one file (DenseNets are far below ONNX's 2 GB limit; torch
    # before 2.6 has no such argument and always did)
    one_file = {'external_data': False} if 'external_data' in inspect.signature(torch.onnx.export).parameters else {}
    torch.onnx.export(
        model, (example,), str(path), input_names=['input'], output_names=['logits'],
        dynamic_shapes=({0: batch},), dynamo=True, verbose=False, **one_file)


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
) -> ExportResult:
    """Export a model loaded by `loading.load_model` (a variant with `pretrained` or `weights`, or a hub folder
    'local-dir:DIR') as `fmt` ('onnx', 'torchscript' or 'exported-program') to the file `out`.

    The input is (batch, channels, height, width) at the model's pretrained input size, the batch dynamic. The file is
    checked before it is kept: loaded back, its outputs must match PyTorch's within `TOLERANCE`. Raises ValueError,
    FileNotFoundError or FileExistsError with a message naming the thing and the fix.
    """
    if fmt not in FORMATS:
        raise ValueError(f'{arg("fmt", repr(fmt))}: choose one of {", ".join(FORMATS)}.')
    out = Path(out)
    _check_output(out, fmt, force)
    with claim(out):  # from the check to the rename: a second export to the same file is refused, not lost
        _check_output(out, fmt, force)  # again: another process may have finished it while we waited to claim
        model = load_model(model_name, pretrained=pretrained, weights=weights).eval()
        return _export_checked(model, fmt, out, force)


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


def _export_checked(model: nn.Module, fmt: str, out: Path, force: bool) -> ExportResult:
    """Export to a temporary file, load it back, compare with `model` at CHECK_BATCH_SIZES, then move it to `out`."""
    input_size = tuple(model.pretrained_cfg['input_size'])
    generator = torch.Generator().manual_seed(0)
    example = torch.randn((2, *input_size), generator=generator)

    with writing(out, force=force, exists_message=_exists_message(out)) as tmp:
        with torch.no_grad():
            _EXPORTERS[fmt](model, example, tmp)
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
        if not max_diff <= TOLERANCE:
            raise RuntimeError(f'the exported {fmt} file differs from PyTorch by {max_diff:.2e} (more than '
                               f'{TOLERANCE:g}); nothing was written')
        size = tmp.stat().st_size
    return ExportResult(out, fmt, input_size, max_diff, size)
