"""Models whose every tensor is random, state-dict comparison and torchvision's legacy key layout, for tests."""
import re
from typing import Dict, Union

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
