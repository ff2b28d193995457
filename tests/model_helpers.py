"""Models whose every tensor is random, state-dict comparison, torchvision's legacy key layout, and shallow models of
the variants (two layers per block) with the distinct layouts among them, for tests."""
import functools
import re
from typing import Callable, Dict, List, Sequence, Union

import timm
import torch
import torch.nn as nn

from timm_densenet_ext.parity import randomize_


def trained(model: Union[str, nn.Module], seed: int = 0, **kwargs) -> nn.Module:
    """`model` (or a new one of that name, built with kwargs) in eval mode with every tensor differing from a fresh
    one's: random weights, BatchNorm statistics and batch counts (`parity.randomize_`)."""
    model = timm.create_model(model, **kwargs) if isinstance(model, str) else model
    return randomize_(model, seed).eval()


def assert_same_tensors(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def legacy_tv_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """torchvision < 0.4's layout: 'denselayer1.norm.1.weight' for 'denselayer1.norm1.weight', and no
    num_batches_tracked."""
    return {re.sub(r'(denselayer\d+\.(?:norm|conv))([12])\.', r'\1.\2.', k): v
            for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}


@functools.lru_cache(maxsize=None)
def num_blocks(name: str) -> int:
    """How many dense blocks variant `name` has (built on the meta device: no memory, no initialisation)."""
    with torch.device('meta'):
        return sum(n.startswith('denseblock') for n, _ in timm.create_model(name).features.named_children())


def shallow(name: str) -> dict:
    """create_model arguments for variant `name` with two layers per block: the same stem, growth, compression,
    pooling, feature taps and code paths as registered, at a fraction of the cost."""
    return dict(block_config=(2,) * num_blocks(name))


# attributes that hold channel counts (a growth rate, widths), and nothing else
_CHANNEL_ATTRS = {'growth_rate', 'in_channels', 'out_channels', 'num_features', 'in_features', 'channels',
                  'head_hidden_size'}


def layout(model: nn.Module, channels: bool = True) -> str:
    """Every module's name, type, attributes (the pretrained config aside) and parameters and buffers: two models
    with the same layout compute the same way. With channels=False, channel counts are left out."""
    rows = []
    for name, module in model.named_modules():
        attrs = []
        for key, value in sorted(vars(module).items()):
            if key.startswith('_') or key.endswith('_cfg') or (not channels and key in _CHANNEL_ATTRS):
                continue
            if key == 'feature_info' and not channels:
                value = [{k: v for k, v in info.items() if k != 'num_chs'} for info in value]
            attrs.append((key, repr(value)))
        tensors = [(key, None if t is None else tuple(t.shape) if channels else t.dim())
                   for key, t in [*module._parameters.items(), *module._buffers.items()]]
        rows.append((name, type(module).__name__, attrs, tensors))
    return repr(rows)


def distinct_shallow(names: Sequence[str], input_size: Callable[[str], int], channels: bool = True) -> List[str]:
    """The first of each group of `names` whose shallow models have the same layout (`layout`) and are tested at the
    same `input_size(name)`. densenet121, 169, 201 and their tv_ twins differ only in depth, so their shallow models
    are one. With channels=False, variants that differ only in channel counts (growth rate, stem width) are one
    too: they run the same code, which traces, scripts and compiles alike."""
    seen, distinct = set(), []
    for name in names:
        with torch.device('meta'):
            model = timm.create_model(name, **shallow(name))
        key = (layout(model, channels), input_size(name))
        if key not in seen:
            seen.add(key)
            distinct.append(name)
    return distinct
