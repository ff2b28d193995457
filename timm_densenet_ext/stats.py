"""Model statistics measured from the model itself: parameters, MACs and activations at an input size."""
from dataclasses import dataclass
from typing import Optional, Tuple

import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['ModelStats', 'model_stats']


@dataclass(frozen=True)
class ModelStats:
    params: int
    gmacs: float  # multiply-accumulates of one image, in billions (convolutions and the classifier)
    activations_m: float  # output elements of every convolution and linear layer for one image, in millions
    input_size: Tuple[int, int, int]


def model_stats(model_name: str, input_size: Optional[Tuple[int, int, int]] = None, **kwargs) -> ModelStats:
    """Count a registered model's parameters, GMACs and activations for one image of `input_size`.

    The model is built on the meta device, so nothing is allocated or computed: this is fast for every variant.
    `input_size` defaults to the model's pretrained config; kwargs go to `timm.create_model`.
    """
    with torch.device('meta'):
        model = timm.create_model(model_name, **kwargs)
    return measure(model, input_size or tuple(model.pretrained_cfg['input_size']))


def measure(model: nn.Module, input_size: Tuple[int, int, int]) -> ModelStats:
    """Statistics of an already built model (on any device) for one image of `input_size`."""
    device = next(model.parameters()).device
    params = sum(p.numel() for p in model.parameters())
    activations = 0

    def count(module, inputs, output):
        nonlocal activations
        activations += output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros((1, *input_size), device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return ModelStats(
        params=params,
        gmacs=counter.get_total_flops() / 2e9,
        activations_m=activations / 1e6,
        input_size=tuple(input_size),
    )
