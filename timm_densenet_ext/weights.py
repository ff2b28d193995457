"""Checkpoint formats in: key filters applied while timm loads pretrained weights."""
import re
from typing import Dict, Optional

import torch
import torch.nn as nn

__all__ = ['checkpoint_filter_fn']

# torchvision < 0.4 named dense-layer modules 'norm.1', 'relu.1', 'conv.1' where they are now 'norm1', ...
_LEGACY_TV_KEY = re.compile(r'^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(weight|bias|running_mean|running_var)$')


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """Map torchvision (current and legacy), timm and DataParallel state-dict keys onto ours."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith('module.'):
            key = key[len('module.'):]
        match = _LEGACY_TV_KEY.match(key)
        if match:
            key = f'{match.group(1)}{match.group(2)}.{match.group(3)}'
        out[key] = value
    return out
