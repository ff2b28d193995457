"""Deployment on the CPU (and GPU): `optimize_for_inference(model, precision=...)`, the fastest way we know to run a
DenseNet at each precision, and `quantize_onnx`, the int8 model it runs, as a file.

* fp32: `fuse_for_inference` (every BatchNorm folded, see `models.fused`), then `torch.compile` with Inductor's
  freezing (weights become constants, convolutions prepacked for oneDNN and fused with their bias and ReLU).
  Exact to float rounding.
* bf16: the same, with the weights and activations in bfloat16 (float32 in and out). Fast where the CPU has
  bfloat16 arithmetic (AVX512-BF16, AMX) or on a GPU; on a CPU without it oneDNN emulates bfloat16 and it is slower
  than fp32.
* int8: static post-training quantization by ONNX Runtime's tool (`onnxruntime.quantization.quantize_static`) of
  our own ONNX export: every convolution but the first gets int8 weights (per output channel) and uint8 inputs (per
  tensor, scales from the calibration images), as QuantizeLinear/DequantizeLinear pairs (QDQ); the rest stays
  float. Run by OpenVINO where it is installed (the `deploy` extra), else by ONNX Runtime. Why not PyTorch's own
  stack: PT2E quantization has moved out of torch into torchao, and with torch 2.14 and torchao 0.18 Inductor fails
  to compile the quantized DenseNet (`onednn.qconv_prepack` has no meta kernel). Why convolutions only: OpenVINO ran
  that file 1.24x as fast as the one with every quantizable operator in int8 (densenet121, batch 16, 2 threads), and
  it lost no accuracy on the fine-tuned digits model (`benchmarks/precision_accuracy.py`). An int8 ONNX file runs
  anywhere ONNX runs; `export --precision int8` writes it.
"""
import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, List, Optional, Union

import torch
import torch.nn as nn

from ._naming import arg

__all__ = ['PRECISIONS', 'ENGINES', 'OptimizedModel', 'optimize_for_inference', 'quantize_onnx', 'load_int8_onnx',
           'Bfloat16Model', 'check_precision', 'fused_at']

PRECISIONS = ('fp32', 'bf16', 'int8')
ENGINES = ('inductor', 'onnxruntime', 'openvino')
DEFAULT_ENGINE = {'fp32': 'inductor', 'bf16': 'inductor', 'int8': 'openvino'}  # int8: onnxruntime without openvino
_RUNTIME_PACKAGES = {'onnxruntime': "pip install 'timm-densenet-ext[export]'",
                     'openvino': "pip install 'timm-densenet-ext[deploy]'"}


class Bfloat16Model(nn.Module):
    """A model whose weights and activations are bfloat16 behind a float32 interface: images in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.bfloat16)).float()


class OptimizedModel(nn.Module):
    """What `optimize_for_inference` returns: call it on a float32 batch (N, C, H, W) for float32 logits.

    `precision` and `engine` say what runs; `pretrained_cfg` and `num_classes` are the source model's, so timm's
    `resolve_data_config(model=...)` gives the same preprocessing. Inference only: gradients are never recorded.
    """

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], precision: str, engine: str, source: nn.Module,
                 module: Optional[nn.Module] = None, onnx: Optional[bytes] = None) -> None:
        super().__init__()
        self.precision = precision
        self.engine = engine
        self.module = module  # the compiled PyTorch module (inductor engine), else None
        self.onnx = onnx  # the int8 ONNX file's bytes (runtime engines), else None
        self.pretrained_cfg = dict(getattr(source, 'pretrained_cfg', {}) or {})
        self.num_classes = getattr(source, 'num_classes', None)
        self.in_chans: Optional[int] = getattr(source, 'in_chans', None)
        self._run = run
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or (self.in_chans is not None and x.shape[1] != self.in_chans):
            channels = self.in_chans or 'channels'
            raise ValueError(f'expected images shaped (batch, {channels}, height, width), got {list(x.shape)}')
        with torch.no_grad():
            return self._run(x)

    def extra_repr(self) -> str:
        return f'precision={self.precision!r}, engine={self.engine!r}'


def optimize_for_inference(
        model: nn.Module,
        precision: str = 'fp32',
        *,
        calibration: Optional[Iterable[Any]] = None,
        engine: Optional[str] = None,
        threads: Optional[int] = None,
) -> OptimizedModel:
    """`model` (a timm_densenet_ext DenseNet, trained weights, any mode) made as fast as we know for inference.

    precision: 'fp32' (exact to float rounding), 'bf16' or 'int8' (see the module docstring for what runs and why).
    calibration: int8 only, and needed there: an iterable of image batches (float32 tensors (N, C, H, W),
        preprocessed as the model expects, or (images, labels) pairs as a DataLoader yields) whose activation ranges
        set the int8 scales; a few hundred images of the data the model will see are enough.
    engine: 'inductor' (fp32 and bf16: torch.compile), 'onnxruntime' or 'openvino' (int8); None picks
        `DEFAULT_ENGINE[precision]` (int8: ONNX Runtime where OpenVINO is not installed).
    threads: intra-op threads of the ONNX runtimes (default torch.get_num_threads()); Inductor uses torch's.

    With the inductor engine, the first call of each new input shape compiles (tens of seconds for densenet121 on two
    cores; torch's on-disk cache shortens the next process's). Raises ValueError naming the wrong argument.
    """
    check_precision(precision)
    engine = engine or _default_engine(precision)
    usable = ('inductor',) if precision != 'int8' else ('onnxruntime', 'openvino')
    if engine not in usable:
        raise ValueError(f'engine {engine!r} does not run {precision}; choose {" or ".join(usable)}.')
    if precision == 'int8':
        if calibration is None:
            raise ValueError('int8 needs calibration images: pass calibration= an iterable of image batches '
                             '(N, C, H, W), e.g. a DataLoader over a few hundred of your images.')
        device = next(model.parameters()).device
        if device.type != 'cpu':
            raise ValueError(f'int8 runs on the CPU (ONNX Runtime, OpenVINO); the model is on {device}: move it '
                             f'with model.cpu() first.')
        return load_int8_onnx(quantize_onnx(model, calibration), model, engine=engine, threads=threads)
    compiled = torch.compile(fused_at(model, precision), dynamic=False, options={'freezing': True})
    return OptimizedModel(compiled, precision, engine, model, module=compiled)


def check_precision(precision: str) -> None:
    """Raise ValueError unless `precision` is one of `PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f'{arg("precision", repr(precision))}: choose one of {", ".join(PRECISIONS)}.')


def fused_at(model: nn.Module, precision: str) -> nn.Module:
    """`fuse_for_inference(model)`, in bfloat16 behind a float32 interface for 'bf16': what the fp32 and bf16 paths
    compile, and what `export --precision bf16` writes."""
    from .models.fused import fuse_for_inference
    fused = fuse_for_inference(model)
    return Bfloat16Model(fused) if precision == 'bf16' else fused


def _default_engine(precision: str) -> str:
    import importlib.util
    engine = DEFAULT_ENGINE[precision]
    if engine == 'openvino' and importlib.util.find_spec('openvino') is None:
        return 'onnxruntime'
    return engine


def _batches(calibration: Iterable[Any]) -> Iterator[torch.Tensor]:
    """The image tensors of `calibration`: batches as they are, or the first item of (images, labels) pairs."""
    for item in calibration:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f'calibration: expected image batches (N, C, H, W) or (images, labels) pairs, got '
                             f'{type(x).__name__}{list(x.shape) if isinstance(x, torch.Tensor) else ""}')
        yield x.detach().float().cpu()


def quantize_onnx(model: nn.Module, calibration: Iterable[Any], out: Union[str, Path, None] = None, *,
                  exported: Union[str, Path, None] = None) -> bytes:
    """`model` exported to ONNX and statically quantized to int8 (QDQ; weights per channel) with ONNX Runtime's tool,
    its scales set on the `calibration` batches. Returns the file's bytes (and writes them to `out` if given).

    `exported`: `model`'s float32 ONNX file (`export.export_onnx`) if there is one already: the export, most of the
    time this takes, is skipped."""
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ImportError(f'int8 needs onnxruntime and onnx: {_RUNTIME_PACKAGES["onnxruntime"]}.') from None
    batches = iter(_batches(calibration))
    first = next(batches, None)
    if first is None:
        raise ValueError('calibration: no batches; give at least one batch of images.')

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.pending: Optional[torch.Tensor] = first

        def get_next(self) -> Optional[dict]:
            x, self.pending = self.pending, None
            x = x if x is not None else next(batches, None)
            return None if x is None else {'input': x.numpy()}

    with tempfile.TemporaryDirectory(prefix='timm-densenet-ext-int8-') as folder:
        fp32, prepared, quantized = (os.path.join(folder, f) for f in ('fp32.onnx', 'prepared.onnx', 'int8.onnx'))
        if exported is None:
            _export_eval(model, first[:1].repeat(2, 1, 1, 1), Path(fp32))
        quant_pre_process(str(exported or fp32), prepared)
        with _quantizer_warnings_silenced():
            quantize_static(prepared, quantized, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=['Conv'], nodes_to_exclude=_kept_in_float(prepared))
        data = Path(quantized).read_bytes()
    if out is not None:
        Path(out).write_bytes(data)
    return data


@contextlib.contextmanager
def _quantizer_warnings_silenced() -> Iterator[None]:
    """Drop the quantizer's warnings (one per BatchNorm weight, 'Axis 1 is out-of-range ...': per-channel
    quantization does not apply to 1-D tensors, which it then quantizes per tensor, as intended)."""
    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or 'onnxruntime' not in record.pathname

    root = logging.getLogger()  # the quantizer logs with logging.warning: on the root logger, through its filters
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _kept_in_float(path: str) -> List[str]:
    """The convolution of the ONNX file `path` left in float32: the first one, which sees the raw image. On the
    fine-tuned digits model, quantizing it too (and the classifier) cost 0 to 0.8 points of accuracy depending on
    which 256 images calibrated it; without them, 0 in ONNX Runtime for each of four draws."""
    import onnx
    nodes = onnx.load(path, load_external_data=False).graph.node  # in topological order
    return [n.name for n in nodes if n.op_type == 'Conv'][:1]


def _export_eval(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """`model` exported to ONNX in eval mode, its mode restored after."""
    from ._onnx import export_onnx
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            export_onnx(model, example, path)
    finally:
        model.train(was_training)


def load_int8_onnx(
        onnx: Union[bytes, str, Path],
        source: Optional[nn.Module] = None,
        *,
        engine: str = 'onnxruntime',
        threads: Optional[int] = None,
) -> OptimizedModel:
    """An int8 ONNX file (`quantize_onnx`'s bytes, or the path of one `export --precision int8` wrote) run by
    `engine` ('onnxruntime' or 'openvino') as an `OptimizedModel`; `source`, the model it came from, lends it its
    `pretrained_cfg` (preprocessing)."""
    if engine not in ('onnxruntime', 'openvino'):
        raise ValueError(f'engine {engine!r} does not run int8 ONNX; choose onnxruntime or openvino.')
    if not isinstance(onnx, bytes):
        onnx = Path(onnx).read_bytes()
    return OptimizedModel(_runtime(engine, onnx, threads), 'int8', engine, source or nn.Identity(), onnx=onnx)


def _runtime(engine: str, onnx: bytes, threads: Optional[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the ONNX file `onnx` on a batch with `engine` ('onnxruntime' or 'openvino')."""
    threads = threads or torch.get_num_threads()
    try:
        runtime = __import__(engine)
    except ImportError:
        raise ImportError(f'engine {engine!r} is not installed: {_RUNTIME_PACKAGES[engine]}.') from None
    if engine == 'onnxruntime':
        options = runtime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = runtime.InferenceSession(onnx, options, providers=['CPUExecutionProvider'])
        return lambda x: torch.from_numpy(session.run(None, {'input': _numpy(x)})[0])
    core = runtime.Core()
    with tempfile.TemporaryDirectory(prefix='timm-densenet-ext-ov-') as folder:
        path = os.path.join(folder, 'model.onnx')
        Path(path).write_bytes(onnx)
        compiled = core.compile_model(core.read_model(path), 'CPU', {'INFERENCE_NUM_THREADS': threads})
    request = compiled.create_infer_request()
    return lambda x: torch.from_numpy(request.infer({0: _numpy(x)})[0].copy())


def _numpy(x: torch.Tensor) -> Any:
    return x.detach().float().cpu().contiguous().numpy()
