"""Model statistics measured from the model itself: parameters, MACs and activations at an input size, and what
`timm-densenet-ext list` and `info` show of every variant."""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .models import default_cfgs, resolve_model_name

__all__ = ['ModelStats', 'model_stats', 'measure', 'list_models_table', 'model_info']


@dataclass(frozen=True)
class ModelStats:
    """What `measure` counts for one image."""
    params: int
    gmacs: float  # multiply-accumulates of one image, in billions (convolutions and the classifier)
    activations_m: float  # output elements of every convolution and linear layer for one image, in millions
    input_size: Tuple[int, int, int]


def _meta_model(model_name: str, **kwargs: Any) -> nn.Module:
    """The model built on the meta device: its structure and config, with no memory allocated."""
    with torch.device('meta'):
        return timm.create_model(model_name, **kwargs)


def model_stats(model_name: str, input_size: Optional[Tuple[int, int, int]] = None, **kwargs) -> ModelStats:
    """Count a registered model's parameters, GMACs and activations for one image of `input_size`.

    The model is built on the meta device, so nothing is allocated or computed: this is fast for every variant.
    `input_size` defaults to the model's pretrained config; kwargs go to `timm.create_model`.
    """
    model = _meta_model(model_name, **kwargs)
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


def list_models_table() -> List[Dict[str, object]]:
    """One row per registered variant: name, parameters, GMACs at its default input size, pretrained tags."""
    rows = []
    for name, cfgs in default_cfgs.items():
        stats = model_stats(name)
        tags = [t for t in cfgs.tags if cfgs.cfgs[t].has_weights]
        rows.append(dict(
            name=name, params=stats.params, gmacs=stats.gmacs, input_size=stats.input_size, pretrained_tags=tags))
    return rows


def model_info(model_name: str) -> Dict[str, object]:
    """A variant's pretrained config, feature pyramid (channels, reductions, modules), parameters and GMACs."""
    arch = model_name.split('.', 1)[0]
    try:
        resolve_model_name(arch)
    except ValueError:
        resolve_model_name(model_name)  # raises the same error, naming the model as given
    try:
        model = _meta_model(model_name)
    except RuntimeError as e:  # unknown pretrained tag: timm's message
        raise ValueError(f'{model_name}: {e}') from None
    cfg = {k: v for k, v in model.pretrained_cfg.items() if v is not None}
    stats = measure(model, tuple(cfg['input_size']))
    return dict(
        name=model_name,
        pretrained_cfg=cfg,
        pretrained_tags=list(default_cfgs[arch].tags),
        feature_info=[dict(index=i, **f) for i, f in enumerate(model.feature_info)],
        params=stats.params,
        gmacs=stats.gmacs,
        activations_m=stats.activations_m,
        input_size=stats.input_size,
        min_input_size=model.min_input_size,
    )
