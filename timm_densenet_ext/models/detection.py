"""DenseNet backbones for torchvision's detectors (FasterRCNN, MaskRCNN, RetinaNet, FCOS, KeypointRCNN).

`fpn_backbone` is modelled on torchvision's `resnet_fpn_backbone`: timm's `features_only` feature getter over a
DenseNet, torchvision's `FeaturePyramidNetwork` on top, and, with pretrained weights, the stem and early stages
frozen, BatchNorm statistics included. Outputs are named '0', '1', ... (then 'pool', or 'p6' and 'p7'), as
torchvision's heads expect.
"""
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from timm.layers import FrozenBatchNormAct2d, freeze_batch_norm_2d
from timm.models._features import FeatureGetterNet
from timm.utils.model import freeze
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from .densenet import DenseNet

__all__ = ['DenseNetFPN', 'fpn_backbone', 'stage_modules']

_FROZEN_NORMS = (FrozenBatchNorm2d, FrozenBatchNormAct2d)  # timm's FrozenBatchNorm2d is torchvision's


def stage_modules(model: DenseNet) -> List[List[str]]:
    """Names (within `model.features`) of the stem's modules, then of each stage's.

    Stage k is dense block k with the transition after it (as timm's `group_matcher` groups them); the last stage
    ends with norm5. Stages pruned away by `features_only` are left out.
    """
    stages: List[List[str]] = [[]]
    for name, _ in model.features.named_children():
        if name.startswith('denseblock'):
            stages.append([])
        stages[-1].append(name)
    return stages


class DenseNetFPN(nn.Module):
    """A DenseNet feature extractor and a feature pyramid: the `backbone` torchvision's detectors take.

    Attributes:
        body: timm's `features_only` model (its `feature_info` says what each returned map is).
        fpn: torchvision's FeaturePyramidNetwork.
        out_channels: Channels of every pyramid level, which torchvision's detection heads read.
    """

    def __init__(
            self,
            body: nn.Module,
            out_channels: int = 256,
            extra_blocks: Optional[ExtraFPNBlock] = None,
            fpn_norm_layer: Optional[Callable[..., nn.Module]] = None,
    ) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=body.feature_info.channels(),
            out_channels=out_channels,
            extra_blocks=extra_blocks if extra_blocks is not None else LastLevelMaxPool(),
            norm_layer=fpn_norm_layer,
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def _is_frozen_norm(norm_layer: Any) -> bool:
    if isinstance(norm_layer, str):
        return norm_layer.lower().replace('_', '') in ('frozenbatchnorm2d', 'frozenbatchnorm')
    return isinstance(norm_layer, type) and issubclass(norm_layer, _FROZEN_NORMS)


def fpn_backbone(
        model_name: str,
        pretrained: bool = False,
        trainable_stages: Optional[int] = None,
        returned_stages: Sequence[int] = (1, 2, 3, 4),
        output_stride: int = 32,
        norm_layer: Optional[Union[str, Callable[..., nn.Module]]] = None,
        extra_blocks: Optional[ExtraFPNBlock] = None,
        out_channels: int = 256,
        feature_taps: str = 'norm',
        **kwargs: Any,
) -> DenseNetFPN:
    """A DenseNet with a feature pyramid, for torchvision's detection models (like `resnet_fpn_backbone`).

    Defaults follow torchvision's detectors (`fasterrcnn_resnet50_fpn`): with pretrained weights every BatchNorm is
    frozen and the top 3 stages train; from scratch every BatchNorm and every stage trains (frozen norms would be
    identities with random statistics, and training diverges).

    Args:
        model_name: A DenseNet registered by this package (`densenet121`, `tv_densenet121`, ...), or
            `hf-hub:` / `local-dir:` names that timm resolves to one.
        pretrained: Load the variant's pretrained weights (from the Hugging Face Hub or its cache).
        trainable_stages: How many stages, counted from the top, train: 0 freezes the whole DenseNet; one more than
            the number of dense blocks (5 for ImageNet variants) trains the stem too. As torchvision's
            `trainable_layers`. Frozen modules keep their parameters and BatchNorm statistics, also in train mode.
            None: 3 with pretrained weights, all stages without.
        returned_stages: Dense blocks (1 = the first) whose features feed the pyramid.
        output_stride: 32, 16 or 8; below 32 the last stages dilate instead of downsampling.
        norm_layer: FrozenBatchNorm2d (torchvision's, which timm uses too) freezes every BatchNorm, as torchvision
            does for pretrained backbones; nn.BatchNorm2d (or another norm) keeps the trainable stages' norms
            training. None: FrozenBatchNorm2d with pretrained weights, nn.BatchNorm2d without.
        extra_blocks: Extra pyramid levels (torchvision's `LastLevelMaxPool`, the default, or `LastLevelP6P7`).
        out_channels: Channels of every pyramid level.
        feature_taps: 'norm' (after each block's following BN-ReLU) or 'raw' (the block outputs, as timm's
            DenseNet); see the README's detection section for what each does to training.
        **kwargs: Passed to `timm.create_model` (e.g. `memory_efficient=True`, `pretrained_cfg_overlay`).
    """
    if norm_layer is None:
        norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    frozen_norms = _is_frozen_norm(norm_layer)
    if not frozen_norms:
        kwargs['norm_layer'] = norm_layer
    returned_stages = [int(i) for i in returned_stages]
    try:
        model = timm.create_model(
            model_name, pretrained=pretrained, output_stride=output_stride, feature_taps=feature_taps, **kwargs)
    except TypeError as e:  # another architecture refuses our keywords
        if 'unexpected keyword argument' not in str(e):
            raise
        model = e
    if not isinstance(model, DenseNet):
        raise TypeError(f'fpn_backbone builds on timm_densenet_ext DenseNets; {model_name!r} is not one '
                        f'({model if isinstance(model, Exception) else type(model).__name__}). '
                        f'Pick one of timm_densenet_ext.MODEL_NAMES, e.g. densenet121.')
    n_blocks = len(model.feature_info) - 1
    if not returned_stages or any(not 1 <= i <= n_blocks for i in returned_stages):
        raise ValueError(f'returned_stages must name dense blocks 1 to {n_blocks} of {model_name}, '
                         f'got {tuple(returned_stages)}.')
    if trainable_stages is None:
        trainable_stages = min(3, n_blocks + 1) if pretrained else n_blocks + 1
    if not 0 <= trainable_stages <= n_blocks + 1:
        raise ValueError(f'trainable_stages must be 0 to {n_blocks + 1} for {model_name} (the stem and '
                         f'{n_blocks} stages), got {trainable_stages}.')
    # timm's features_only getter: drops the head and the layers after the last returned tap
    body = FeatureGetterNet(model, out_indices=returned_stages)
    if frozen_norms:
        freeze_batch_norm_2d(model)
    # the stem and the lowest stages; stages pruned off above the last returned one have nothing to freeze
    frozen = [name for stage in stage_modules(model)[:n_blocks + 1 - trainable_stages] for name in stage]
    if frozen:
        freeze(model.features, frozen)  # requires_grad off, BatchNorm -> FrozenBatchNorm
    return DenseNetFPN(body, out_channels=out_channels, extra_blocks=extra_blocks)
