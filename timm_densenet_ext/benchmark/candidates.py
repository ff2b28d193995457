"""The implementations measured side by side: one table, `CANDIDATES`, in the order the results list them.

A candidate is a name, a mode ('inference' or 'train') and a builder that turns the shared `BenchSetup` (the same
random weights and the same input for everyone) into a `Step`: a call running one inference batch or one training
step. A new peer is a new entry. Our deployment path (`optimize_for_inference`) has an entry per precision, measured
only when that precision is asked for (`select(..., precisions=)`, the benchmark's `--precision`).
"""
import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['BenchSetup', 'Candidate', 'CANDIDATES', 'REFERENCE', 'prepare', 'candidate', 'select', 'workloads']

REFERENCE = 'timm'  # the candidate every ratio is against, in each mode

Step = Callable[[], Any]


@dataclass
class BenchSetup:
    """What every candidate is given: the variant, the device, autocast, the shared weights, one batch and labels."""
    model_name: str
    device: torch.device
    autocast: Callable[[], ContextManager]
    amp_dtype: Optional[torch.dtype]
    state: Dict[str, torch.Tensor]
    x: torch.Tensor
    target: torch.Tensor
    references: Dict[str, Callable[..., nn.Module]]  # 'timm', 'torchvision' -> constructor, where the variant has one
    files: Dict[str, str] = field(default_factory=dict)  # made once for several candidates (the ONNX export)


def _always(setup: BenchSetup) -> bool:
    return True


@dataclass(frozen=True)
class Candidate:
    """One implementation in one mode, and how to build its step."""
    name: str
    mode: str  # 'inference' or 'train'
    build: Callable[[BenchSetup], Step]
    available: Callable[[BenchSetup], bool] = _always  # False: not measured for this variant
    compiled: bool = False  # built with torch.compile: measured only when compiling is asked for
    memory_probe: bool = True  # False: building it again in a probe process would cost minutes
    precision: Optional[str] = None  # our deployment path at this precision: measured only when it is asked for


def prepare(model_name: str, batch_size: int, img_size: int, device: str, dtype: str, seed: int) -> BenchSetup:
    """The shared random weights (seeded), an input batch and its labels on `device`, autocast for `dtype`."""
    import timm
    import timm_densenet_ext  # noqa: F401  (registers the variants)
    from ..parity import randomize_, reference_builders
    dev = torch.device(device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda asked for, but torch sees no CUDA GPU; use --device cpu.')
    amp_dtype = {'float32': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    autocast = (lambda: torch.autocast(dev.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    torch.manual_seed(seed)
    model = randomize_(timm.create_model(model_name), seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(dev)
    target = torch.randint(0, model.num_classes, (batch_size,), generator=gen).to(dev)
    references = reference_builders(model_name)
    return BenchSetup(model_name, dev, autocast, amp_dtype, model.state_dict(), x, target, references)


# --- the networks: variant -> an untrained module; the step builders load the shared weights ----------------------

def _timm(setup: BenchSetup, **kwargs: Any) -> nn.Module:
    """timm's built-in DenseNet; its memory-efficient mode is set through set_grad_checkpointing."""
    return setup.references['timm']()


def _torchvision(setup: BenchSetup, **kwargs: Any) -> nn.Module:
    return setup.references['torchvision'](**kwargs)


def _ours(setup: BenchSetup, **kwargs: Any) -> nn.Module:
    import timm
    return timm.create_model(setup.model_name, **kwargs)


def _loaded(setup: BenchSetup, network: nn.Module) -> nn.Module:
    network.load_state_dict(setup.state)
    return network.to(setup.device)


def _fused(model: nn.Module) -> nn.Module:
    from ..models.fused import fuse_for_inference
    return fuse_for_inference(model)


# --- the steps: a network -> one inference batch or one training step ----------------------------------------------

def _inference(network: Callable[..., nn.Module], convert: Optional[Callable[[nn.Module], nn.Module]] = None,
               channels_last: bool = False, compiled: bool = False) -> Callable[[BenchSetup], Step]:
    """Builder of an inference step in eval mode: the network, `convert`ed, channels-last (model and input),
    torch.compile'd."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def build(setup: BenchSetup) -> Step:
        model = _loaded(setup, network(setup)).eval()
        if convert is not None:
            model = convert(model)
        if channels_last:
            model = model.to(memory_format=memory_format)
        if compiled:
            model = torch.compile(model)
        x = setup.x.contiguous(memory_format=memory_format)
        return lambda: _infer(model, x, setup.autocast)
    return build


def _training(network: Callable[..., nn.Module], memory_efficient: bool) -> Callable[[BenchSetup], Step]:
    """Builder of a training step (SGD with momentum), with or without the memory-efficient mode."""
    def build(setup: BenchSetup) -> Step:
        model = network(setup, memory_efficient=memory_efficient)
        model.load_state_dict(setup.state)
        if hasattr(model, 'set_grad_checkpointing'):
            model.set_grad_checkpointing(memory_efficient)
        model = model.to(setup.device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        return lambda: _train_step(model, opt, setup.x, setup.target, setup.autocast)
    return build


def _infer(model: nn.Module, x: torch.Tensor, autocast: Callable[[], ContextManager]) -> torch.Tensor:
    with torch.inference_mode(), autocast():
        return model(x)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor,
                autocast: Callable[[], ContextManager]) -> None:
    with autocast():
        loss = F.cross_entropy(model(x), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


# --- the deployment runtimes: ONNX Runtime and OpenVINO on our own ONNX export of the same weights -----------------

def _onnx_file(setup: BenchSetup) -> str:
    """Our model with the shared weights exported to ONNX (once per setup), in a temporary folder removed when the
    process ends."""
    if 'onnx' in setup.files:
        return setup.files['onnx']
    import atexit
    import shutil
    import tempfile
    from pathlib import Path
    from ..export import export_onnx
    folder = tempfile.mkdtemp(prefix='timm-densenet-ext-bench-')
    atexit.register(shutil.rmtree, folder, True)
    path = Path(folder) / 'model.onnx'
    model = _loaded(setup, _ours(setup)).eval().cpu()
    export_onnx(model, setup.x[:1].cpu().repeat(2, 1, 1, 1), path)
    setup.files['onnx'] = str(path)
    return str(path)


def _onnx_runtime(setup: BenchSetup) -> Step:
    """ONNX Runtime's CPU session with all graph optimisations, on torch's thread count."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(_onnx_file(setup), options, providers=['CPUExecutionProvider'])
    x = setup.x.cpu().numpy()
    return lambda: torch.from_numpy(session.run(None, {'input': x})[0])


def _openvino(precision: Optional[str]) -> Callable[[BenchSetup], Step]:
    """OpenVINO's CPU plugin on torch's thread count; `precision` its INFERENCE_PRECISION_HINT ('f32'), None its
    default (bf16 where the CPU has it)."""
    def build(setup: BenchSetup) -> Step:
        import openvino as ov
        config = {'INFERENCE_NUM_THREADS': torch.get_num_threads()}
        if precision:
            config['INFERENCE_PRECISION_HINT'] = precision
        request = ov.Core().compile_model(_onnx_file(setup), 'CPU', config).create_infer_request()
        x = setup.x.cpu().numpy()
        return lambda: torch.from_numpy(request.infer({0: x})[0].copy())
    return build


def _runtime(*modules: str) -> Callable[[BenchSetup], bool]:
    """Available where `modules` are installed (the bench extra), on the CPU in float32 (the runtimes take fp32
    ONNX)."""
    def available(setup: BenchSetup) -> bool:
        import importlib.util
        return (setup.device.type == 'cpu' and setup.amp_dtype is None
                and all(importlib.util.find_spec(m) is not None for m in modules))
    return available


# --- our deployment path: optimize_for_inference at each precision, on the same weights ---------------------------

def _optimized(precision: str) -> Callable[[BenchSetup], Step]:
    """Builder of `optimize_for_inference(model, precision)` (fp32, bf16) called as a user calls it (float32 images
    in, float32 logits out). Building includes compiling, so the first output's time is what the speed costs up
    front."""
    def build(setup: BenchSetup) -> Step:
        from ..deploy import optimize_for_inference
        optimized = optimize_for_inference(_loaded(setup, _ours(setup)).eval(), precision)
        return lambda: optimized(setup.x)
    return build


def _int8_file(setup: BenchSetup) -> str:
    """Our ONNX export quantized to int8 (`deploy.quantize_onnx`, calibrated on the input batch), once per setup,
    beside the export it quantizes."""
    if 'int8' not in setup.files:
        import os
        from ..deploy import quantize_onnx
        exported = _onnx_file(setup)
        path = os.path.join(os.path.dirname(exported), 'int8.onnx')
        quantize_onnx(_loaded(setup, _ours(setup)).eval().cpu(), [setup.x.cpu()], path, exported=exported)
        setup.files['int8'] = path
    return setup.files['int8']


def _int8(engine: str) -> Callable[[BenchSetup], Step]:
    """Builder of the int8 model (`optimize_for_inference(model, 'int8', ...)`'s file) run by `engine`, as a user
    calls it; the first int8 row's first output includes the quantization, which the second reuses."""
    def build(setup: BenchSetup) -> Step:
        from ..deploy import load_int8_onnx
        optimized = load_int8_onnx(_int8_file(setup), engine=engine)
        x = setup.x.cpu()
        return lambda: optimized(x)
    return build


def _has(reference: str) -> Callable[[BenchSetup], bool]:
    """Available where the variant has an implementation in `reference` ('timm', 'torchvision')."""
    return lambda setup: reference in setup.references


CANDIDATES: List[Candidate] = [
    Candidate('timm', 'inference', _inference(_timm), _has('timm')),
    Candidate('timm channels_last', 'inference', _inference(_timm, channels_last=True), _has('timm')),
    Candidate('timm channels_last compiled', 'inference', _inference(_timm, channels_last=True, compiled=True),
              _has('timm'), compiled=True, memory_probe=False),
    Candidate('torchvision', 'inference', _inference(_torchvision), _has('torchvision')),
    Candidate('ours', 'inference', _inference(_ours)),
    Candidate('ours fused', 'inference', _inference(_ours, _fused)),
    Candidate('ours fused compiled', 'inference', _inference(_ours, _fused, compiled=True),
              compiled=True, memory_probe=False),
    Candidate('onnxruntime', 'inference', _onnx_runtime, _runtime('onnxruntime'), memory_probe=False),
    Candidate('openvino f32', 'inference', _openvino('f32'), _runtime('openvino'), memory_probe=False),
    Candidate('openvino default', 'inference', _openvino(None), _runtime('openvino'), memory_probe=False),
    Candidate('ours optimized fp32', 'inference', _optimized('fp32'), compiled=True, memory_probe=False,
              precision='fp32'),
    Candidate('ours optimized bf16', 'inference', _optimized('bf16'), compiled=True, memory_probe=False,
              precision='bf16'),
    Candidate('ours int8 onnxruntime', 'inference', _int8('onnxruntime'), _runtime('onnxruntime'),
              memory_probe=False, precision='int8'),
    Candidate('ours int8 openvino', 'inference', _int8('openvino'), _runtime('onnxruntime', 'openvino'),
              memory_probe=False, precision='int8'),
    Candidate('timm', 'train', _training(_timm, False), _has('timm')),
    Candidate('timm memory_efficient', 'train', _training(_timm, True), _has('timm')),
    Candidate('torchvision', 'train', _training(_torchvision, False), _has('torchvision')),
    Candidate('torchvision memory_efficient', 'train', _training(_torchvision, True), _has('torchvision')),
    Candidate('ours', 'train', _training(_ours, False)),
    Candidate('ours memory_efficient', 'train', _training(_ours, True)),
]


def select(mode: str, setup: BenchSetup, compile: bool, precisions: Sequence[str] = ()) -> List[Candidate]:
    """The candidates of `mode` measured for this variant, in table order (the compiled ones only if `compile`; our
    deployment path only at `precisions`, none by default)."""
    return [c for c in CANDIDATES if c.mode == mode and c.available(setup) and (compile or not c.compiled)
            and (c.precision is None or c.precision in precisions)]


def candidate(mode: str, name: str) -> Candidate:
    """The table's entry `name` in `mode`."""
    return next(c for c in CANDIDATES if c.mode == mode and c.name == name)


def workloads(mode: str, setup: BenchSetup, compile: bool, only: Optional[str] = None,
              precisions: Sequence[str] = ()) -> Dict[str, Step]:
    """name -> the step of each candidate of `mode` (or of candidate `only`), built now."""
    return {c.name: c.build(setup) for c in select(mode, setup, compile, precisions) if only is None or c.name == only}
