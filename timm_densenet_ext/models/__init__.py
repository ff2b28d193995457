"""The model layer: the DenseNet family registered with timm, its fused inference copy and detection backbones.

Importing it registers every variant with timm; `fused` and `detection` load on first use. Nothing here imports
from the rest of the package.
"""
from typing import Tuple

from timm.models import get_arch_pretrained_cfgs, split_model_name_tag

from .densenet import (  # importing it registers the variants
    CIFAR100_MEAN, CIFAR100_STD, AtrousAvgPool2d, DenseBlock, DenseLayer, DenseNet, DenseTransition,
    checkpoint_filter_fn, default_cfgs)

__all__ = ['DenseNet', 'DenseLayer', 'DenseBlock', 'DenseTransition', 'AtrousAvgPool2d', 'default_cfgs',
           'checkpoint_filter_fn', 'CIFAR100_MEAN', 'CIFAR100_STD', 'MODEL_NAMES', 'resolve_model_name']

MODEL_NAMES = tuple(default_cfgs)


def resolve_model_name(model_name: str) -> Tuple[str, str]:
    """(arch, tag) of a registered 'arch' (its default tag) or 'arch.tag'; a ValueError says what exists."""
    arch, tag = split_model_name_tag(model_name)
    if arch not in default_cfgs:
        raise ValueError(
            f'unknown model {model_name!r}; `timm-densenet-ext list` shows the {len(default_cfgs)} variants.')
    tags = [name.partition('.')[2] for name in get_arch_pretrained_cfgs(arch)]  # the default tag first
    if tag and tag not in tags:
        raise ValueError(f'unknown pretrained tag {tag!r} for {arch}; its tags are: {", ".join(tags)}.')
    return arch, tag or tags[0]
