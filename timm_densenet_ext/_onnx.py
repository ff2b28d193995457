"""Writing a model as ONNX: the one exporter that `export` (fp32 files) and `deploy` (the int8 model's source) share,
below both of them."""
import inspect
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ['export_onnx']


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
