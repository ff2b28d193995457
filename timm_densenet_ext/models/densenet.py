"""DenseNet

The DenseNet family for timm: torchvision's and timm's DenseNets with their weights and state-dict keys, the deep
and blur-pool stems, output stride 8/16, normalised feature taps, the paper's CIFAR DenseNet-BC, and the speed-ups of
`_fast` (buffered blocks in inference, memory-efficient training).

Papers:
* `Densely Connected Convolutional Networks` - https://arxiv.org/abs/1608.06993
* `Memory-Efficient Implementation of DenseNets` - https://arxiv.org/abs/1707.06990
* `Making Convolutional Networks Shift-Invariant Again` - https://arxiv.org/abs/1904.11486

Module and parameter names follow torchvision's and timm's DenseNet, so their checkpoints load unchanged.
"""
import re
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import BlurPool2d, create_aa, create_classifier, get_norm_act_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import MATCH_PREV_GROUP

from ._fast import (
    BufferedDenseBlock, check_input, checkpointed_dense_layer, cpu_channels_last, min_input_size, strided,
    symbolic_tracing)

# one node each when torch.fx traces (torch.fx.wrap patches the names in the module that calls them)
torch.fx.wrap('check_input')
torch.fx.wrap('cpu_channels_last')

__all__ = ['DenseLayer', 'DenseBlock', 'DenseTransition', 'AtrousAvgPool2d', 'DenseNet', 'STEM_TYPES', 'FEATURE_TAPS',
           'CIFAR100_MEAN', 'CIFAR100_STD', 'checkpoint_filter_fn', 'default_cfgs', 'hub_offline_message']

STEM_TYPES = ('', 'deep', 'deep_tiered', 'deep_tiered_narrow', 'cifar')
FEATURE_TAPS = ('raw', 'norm')

# (kernel, stride, padding, smallest input) of an op that shrinks the image, for the computed min_input_size
DownsampleOp = Tuple[int, int, int, int]


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 bottleneck then BN-ReLU-Conv3x3, adding `growth_rate` channels to the block."""

    def __init__(
            self,
            num_input_features: int,
            growth_rate: int,
            bn_size: int,
            norm_layer: Type[nn.Module],
            drop_rate: float = 0.,
            grad_checkpointing: bool = False,
            dilation: int = 1,
            device=None,
            dtype=None,
    ) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        norm_layer = strided(norm_layer)  # BatchNormAct2d reads a channel slice of the block's buffer in place
        self.norm1 = norm_layer(num_input_features, **dd)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False, **dd)
        self.norm2 = norm_layer(bn_size * growth_rate, **dd)
        self.conv2 = nn.Conv2d(
            bn_size * growth_rate, growth_rate, 3, padding=dilation, dilation=dilation, bias=False, **dd)
        self.drop_rate = float(drop_rate)
        self.grad_checkpointing = grad_checkpointing

    def bottleneck(self, features: List[torch.Tensor]) -> torch.Tensor:
        """Concatenate the block's features and apply BN-ReLU-Conv1x1."""
        return self.conv1(self.norm1(torch.cat(features, 1)))

    def layer(self, features: List[torch.Tensor]) -> torch.Tensor:
        """The whole layer on the list of the block's features so far."""
        x = self.conv2(self.norm2(self.bottleneck(features)))
        if self.drop_rate > 0.:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x

    @torch.jit.unused
    def checkpointed_layer(self, features: List[torch.Tensor]) -> torch.Tensor:
        """The layer keeping only what its convolutions need for backward (`_fast.checkpointed_dense_layer`)."""
        return checkpointed_dense_layer(self, features)

    def forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on the concatenated features, without autograd (`x` may be a channel slice of a buffer)."""
        x = self.conv1(self.norm1(x))
        x = self.conv2(self.norm2(x))
        if self.drop_rate > 0.:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.layer(features)
        else:  # fx traces the plain layer: checkpointing is an autograd matter, invisible in a graph
            if self.grad_checkpointing and torch.is_grad_enabled() and not symbolic_tracing():
                return self.checkpointed_layer(features)
            return self.layer(features)


class AtrousAvgPool2d(nn.Module):
    """A stride-2 2x2 average pool evaluated at every pixel: stride 1, its taps `dilation` pixels apart.

    With the blocks after it dilated (output_stride < 32), every other pixel of the output is exactly what the
    network computes at stride 32 (the algorithme a trous); the pixels in between are filled in the same way.
    """

    def __init__(self, dilation: int = 1) -> None:
        super().__init__()
        self.dilation = dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dilation
        x = F.pad(x, (0, d, 0, d), mode='replicate')  # only the in-between pixels at the far edges see the padding
        return (x[:, :, :-d, :-d] + x[:, :, d:, :-d] + x[:, :, :-d, d:] + x[:, :, d:, d:]) * 0.25

    def extra_repr(self) -> str:
        return f'dilation={self.dilation}'


class DenseBlock(BufferedDenseBlock):
    """`num_layers` dense layers, each seeing the concatenation of the block input and all earlier outputs.

    Without autograd, and where that gives the same bits, the layers write into one preallocated tensor instead
    (`BufferedDenseBlock`).
    """

    def __init__(
            self,
            num_layers: int,
            num_input_features: int,
            bn_size: int,
            growth_rate: int,
            norm_layer: Type[nn.Module],
            drop_rate: float = 0.,
            grad_checkpointing: bool = False,
            dilation: int = 1,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        self.growth_rate = growth_rate
        self.num_layers = num_layers
        for i in range(num_layers):
            self.add_module(f'denselayer{i + 1}', DenseLayer(
                num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
                norm_layer=norm_layer,
                drop_rate=drop_rate,
                grad_checkpointing=grad_checkpointing,
                dilation=dilation,
                device=device,
                dtype=dtype,
            ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.buffered(x):
            return self.forward_into_buffer(x)
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseTransition(nn.Sequential):
    """BN-ReLU-Conv1x1 compression then 2x downsampling (average or blur pool).

    With `stride=1` (output_stride < 32) the average pool keeps the resolution instead (`AtrousAvgPool2d`, at the
    dilation of the block before it) and the blocks after it dilate their 3x3 convolutions.

    With average pooling the pool runs before the convolution: the two commute (both linear, the pool the same for
    every channel), so the convolution sees a quarter of the pixels. Module names and weights are unchanged.
    """

    def __init__(
            self,
            num_input_features: int,
            num_output_features: int,
            norm_layer: Type[nn.Module],
            aa_layer: Optional[Type[nn.Module]] = None,
            stride: int = 2,
            dilation: int = 1,
            device=None,
            dtype=None,
    ) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        self.add_module('norm', norm_layer(num_input_features, **dd))
        self.add_module('conv', nn.Conv2d(num_input_features, num_output_features, 1, bias=False, **dd))
        if stride == 1:
            if aa_layer:
                raise ValueError('output_stride below 32 needs average-pool transitions; this DenseNet blurs in its '
                                 'transitions (aa_stem_only=False). Use output_stride=32 or aa_stem_only=True.')
            self.add_module('pool', AtrousAvgPool2d(dilation))  # no weights: the state dict is unchanged
        elif aa_layer:
            self.add_module('pool', create_aa(aa_layer, channels=num_output_features, stride=2, **dd))
        else:
            self.add_module('pool', nn.AvgPool2d(kernel_size=2, stride=2))
        self.pool_first = not aa_layer

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """Everything after the norm: compress and pool the normalised block output."""
        if self.pool_first:
            return self.conv(self.pool(x))
        return self.pool(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.norm(x))


def create_stem(
        stem_type: str,
        in_chans: int,
        out_chs: int,
        growth_rate: int,
        norm_layer: Type[nn.Module],
        aa_layer: Optional[Union[str, Type[nn.Module]]] = None,
        device=None,
        dtype=None,
) -> Tuple[List[Tuple[str, nn.Module]], Dict[str, Any], List[DownsampleOp]]:
    """The stem's (name, module) pairs, which begin `features`, its feature info and its downsampling ops.

    '' is a 7x7/2 conv and a max-pool, 'deep' three 3x3 convs and a max-pool ('deep_tiered', 'deep_tiered_narrow'
    vary their widths), 'cifar' one 3x3/1 conv and no pooling. With `aa_layer` the max-pool is stride 1, then blurs.
    """
    dd = dict(device=device, dtype=dtype)
    if stem_type == 'cifar':
        conv = nn.Conv2d(in_chans, out_chs, 3, stride=1, padding=1, bias=False, **dd)
        return [('conv0', conv)], dict(num_chs=out_chs, reduction=1, module='features.conv0'), []

    if aa_layer:
        pool = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            create_aa(aa_layer, channels=out_chs, stride=2, **dd))
        pool_op = (3, 2, 1, 2)  # reflect padding needs two pixels
    else:
        pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        pool_op = (3, 2, 1, 1)

    if 'deep' in stem_type:
        chs_1 = chs_2 = growth_rate
        if 'tiered' in stem_type:
            chs_1 = 3 * (growth_rate // 4)
            chs_2 = out_chs if 'narrow' in stem_type else 6 * (growth_rate // 4)
        layers = [
            ('conv0', nn.Conv2d(in_chans, chs_1, 3, stride=2, padding=1, bias=False, **dd)),
            ('norm0', norm_layer(chs_1, **dd)),
            ('conv1', nn.Conv2d(chs_1, chs_2, 3, stride=1, padding=1, bias=False, **dd)),
            ('norm1', norm_layer(chs_2, **dd)),
            ('conv2', nn.Conv2d(chs_2, out_chs, 3, stride=1, padding=1, bias=False, **dd)),
            ('norm2', norm_layer(out_chs, **dd)),
        ]
        conv_op, tap = (3, 2, 1, 1), 'norm2'
    else:
        layers = [
            ('conv0', nn.Conv2d(in_chans, out_chs, 7, stride=2, padding=3, bias=False, **dd)),
            ('norm0', norm_layer(out_chs, **dd)),
        ]
        conv_op, tap = (7, 2, 3, 1), 'norm0'
    info = dict(num_chs=out_chs, reduction=2, module=f'features.{tap}')
    return layers + [('pool0', pool)], info, [conv_op, pool_op]


def make_stages(
        block_config: Tuple[int, ...],
        num_features: int,
        growth_rate: int,
        bn_size: int,
        compression: float,
        norm_layer: Type[nn.Module],
        aa_layer: Optional[Union[str, Type[nn.Module]]] = None,
        proj_drop_rate: float = 0.,
        memory_efficient: bool = False,
        stride: int = 4,
        output_stride: int = 32,
        device=None,
        dtype=None,
) -> Tuple[List[Tuple[str, nn.Module]], List[Dict[str, Any]], List[str], List[DownsampleOp]]:
    """The dense blocks, the transitions between them and the final norm, after a stem of stride `stride`.

    Returns their (name, module) pairs, the feature info of each block's tap (a block before its transition, then
    norm5), the module names of the normalised taps (`feature_taps='norm'`: the transitions' norms, then norm5) and
    the transitions' downsampling ops. Below `output_stride` the transitions keep the resolution and the blocks after
    them dilate.
    """
    dd = dict(device=device, dtype=dtype)
    stages, feature_info, norm_taps, downsample_ops = [], [], [], []
    dilation = 1
    for i, num_layers in enumerate(block_config):
        name = f'denseblock{i + 1}'
        stages.append((name, DenseBlock(
            num_layers, num_features, bn_size, growth_rate, norm_layer, drop_rate=proj_drop_rate,
            grad_checkpointing=memory_efficient, dilation=dilation, **dd)))
        num_features += num_layers * growth_rate
        if i == len(block_config) - 1:
            break
        feature_info.append(dict(num_chs=num_features, reduction=stride, module=f'features.{name}'))
        norm_taps.append(f'features.transition{i + 1}.norm')
        transition_stride = 2 if stride < output_stride else 1
        out_features = int(num_features * compression)
        stages.append((f'transition{i + 1}', DenseTransition(
            num_features, out_features, norm_layer, aa_layer=aa_layer, stride=transition_stride, dilation=dilation,
            **dd)))
        num_features = out_features
        if transition_stride == 2:
            downsample_ops.append((3, 2, 1, 2) if aa_layer else (2, 2, 0, 2))
            stride *= 2
        else:
            dilation *= 2
    stages.append(('norm5', norm_layer(num_features, **dd)))
    feature_info.append(dict(num_chs=num_features, reduction=stride, module='features.norm5'))
    norm_taps.append('features.norm5')
    return stages, feature_info, norm_taps, downsample_ops


class DenseNet(nn.Module):
    """DenseNet-BC (Huang et al.): a stem, dense blocks joined by compressing transitions, BN-ReLU, pooled classifier.

    Args:
        growth_rate: Channels each dense layer adds (k).
        block_config: Number of dense layers in each block.
        num_classes: Classifier outputs; 0 for none.
        in_chans: Input image channels.
        global_pool: 'avg', 'max', 'avgmax', 'catavgmax' or '' (no pooling).
        bn_size: Bottleneck width as a multiple of the growth rate.
        compression: Fraction of channels a transition keeps (theta).
        stem_type: One of STEM_TYPES (see `create_stem`): '' as torchvision's, 'deep' 3x3 convs, 'cifar' the paper's.
        stem_width: Stem output channels; 2 * growth_rate when None.
        act_layer: Activation after each norm.
        norm_layer: Norm layer, fused with the activation by timm's norm-act layers.
        aa_layer: Anti-aliasing pool (e.g. BlurPool2d or 'blur') for the stem's downsampling, None for plain pooling.
        aa_stem_only: Use `aa_layer` in the stem only, not in the transitions.
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after each dense layer.
        memory_efficient: Start with gradient checkpointing of the bottlenecks (see `set_grad_checkpointing`).
        output_stride: 32, 16 or 8: the largest downsampling of the input. Below 32 the last transitions keep the
            resolution and the blocks after them dilate their 3x3 convolutions instead; the weights are the same.
        feature_taps: What `features_only` and `forward_intermediates` return for the blocks before a transition:
            'raw' their outputs, as timm's DenseNet (pre-activation: not normalised), or 'norm' the same after the
            following transition's BN-ReLU. The stem and last taps are normalised either way.
    """

    def __init__(
            self,
            growth_rate: int = 32,
            block_config: Tuple[int, ...] = (6, 12, 24, 16),
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            bn_size: int = 4,
            compression: float = 0.5,
            stem_type: str = '',
            stem_width: Optional[int] = None,
            act_layer: Union[str, Type[nn.Module]] = 'relu',
            norm_layer: Union[str, Type[nn.Module]] = 'batchnorm2d',
            aa_layer: Optional[Union[str, Type[nn.Module]]] = None,
            aa_stem_only: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            memory_efficient: bool = False,
            output_stride: int = 32,
            feature_taps: str = 'raw',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        _check_args(stem_type, output_stride, feature_taps, compression)
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.growth_rate = growth_rate
        self.drop_rate = drop_rate
        norm_layer = get_norm_act_layer(norm_layer, act_layer=act_layer)
        stem_width = stem_width or 2 * growth_rate

        stem, stem_info, stem_ops = create_stem(
            stem_type, in_chans, stem_width, growth_rate, norm_layer, aa_layer, **dd)
        stages, stage_info, norm_taps, stage_ops = make_stages(
            block_config, stem_width, growth_rate, bn_size, compression, norm_layer,
            aa_layer=None if aa_stem_only else aa_layer, proj_drop_rate=proj_drop_rate,
            memory_efficient=memory_efficient, stride=stem_info['reduction'] * (1 if stem_type == 'cifar' else 2),
            output_stride=output_stride, **dd)
        self.features = nn.Sequential(OrderedDict(stem + stages))
        self.feature_info = [stem_info] + stage_info
        norm_taps = [stem_info['module']] + norm_taps
        # positions within self.features of the layers whose outputs are the taps (raw), or whose norms give them
        names = [n for n, _ in self.features.named_children()]
        self.feature_ends = [names.index(f['module'].split('.')[1]) for f in self.feature_info]
        self.norm_feature_ends = [names.index(m.split('.')[1]) for m in norm_taps]
        self.feature_taps = feature_taps
        if feature_taps == 'norm':
            for info, module in zip(self.feature_info, norm_taps):
                info['module'] = module
        self.min_input_size = min_input_size(stem_ops + stage_ops)

        self.num_features = stage_info[-1]['num_chs']
        self.global_pool, self.classifier = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.head_drop = nn.Dropout(drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay and the like."""
        return dict(
            stem=r'^features\.conv[012]|^features\.norm[012]|^features\.pool0',
            blocks=r'^features\.(?:denseblock|transition)(\d+)' if coarse else [
                (r'^features\.denseblock(\d+)\.denselayer(\d+)', None),
                (r'^features\.transition(\d+)', MATCH_PREV_GROUP),
                (r'^features\.norm5', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each bottleneck in backward instead of storing it (memory linear, not quadratic, in depth)."""
        for m in self.features.modules():
            if isinstance(m, DenseLayer):
                m.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (0 classes: none), optionally with another global pooling."""
        param = self.features.conv0.weight  # where and in what precision the model lives
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.classifier = create_classifier(
            self.num_features, num_classes, pool_type=global_pool)
        self.classifier.to(device=param.device, dtype=param.dtype)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.classifier.train(self.training)

    @torch.jit.export
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features and the feature maps at `feature_info`'s taps (all, the last n, or those indexed).

        Tap 0 is the stem output, taps 1..n-1 the dense blocks before their transitions, the last the final norm.
        `norm=True` returns the block taps normalised, by the BN-ReLU that begins the following transition, as
        `feature_taps='norm'` does; the stem and last taps are normalised either way.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"DenseNet returns NCHW feature maps only, got output_fmt='{output_fmt}'.")
        x = cpu_channels_last(check_input(x, self.in_chans, self.min_input_size))
        intermediates = []
        ends = self.norm_feature_ends if norm or self.feature_taps == 'norm' else self.feature_ends
        take_indices, max_index = feature_take_indices(len(ends), indices)
        if torch.jit.is_scripting() or not stop_early:  # TorchScript cannot slice a Sequential
            layers = self.features
        else:
            layers = self.features[:ends[max_index] + 1]
        feat_idx = 0
        for i, layer in enumerate(layers):
            # a DenseTransition runs in two parts, its norm being a tap; hasattr is resolved per layer as
            # TorchScript unrolls the loop (isinstance is not, for a transition whose submodules differ)
            x = layer.norm(x) if hasattr(layer, 'downsample') else layer(x)
            if i in ends:
                if feat_idx in take_indices:
                    intermediates.append(x)
                feat_idx += 1
            if hasattr(layer, 'downsample'):
                x = layer.downsample(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the layers after the last tap in `indices` (and the head); return the kept indices.

        Before the last block, the following transition's norm stays (its convolution and pool go) unless
        `prune_norm`, so that normalised taps (`feature_taps='norm'`, which always keeps it, or
        `forward_intermediates(norm=True)`) still work.
        """
        take_indices, max_index = feature_take_indices(len(self.feature_ends), indices)
        prune_end = max_index < len(self.feature_ends) - 1
        end = self.feature_ends[max_index]
        keep_norm = prune_end and (self.feature_taps == 'norm' or not prune_norm) \
            and isinstance(self.features[end + 1], DenseTransition)
        self.features = self.features[:end + 2 if keep_norm else end + 1]
        if keep_norm:
            self.features[-1].conv = nn.Identity()
            self.features[-1].pool = nn.Identity()
        self.feature_ends = self.feature_ends[:max_index + 1]
        self.norm_feature_ends = self.norm_feature_ends[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = cpu_channels_last(check_input(x, self.in_chans, self.min_input_size))
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_args(stem_type: str, output_stride: int, feature_taps: str, compression: float) -> None:
    if stem_type not in STEM_TYPES:
        raise ValueError(f'Unknown stem_type {stem_type!r}, expected one of {STEM_TYPES}.')
    if output_stride not in (8, 16, 32):
        raise ValueError(f'output_stride must be 32, 16 or 8, got {output_stride!r}.')
    if feature_taps not in FEATURE_TAPS:
        raise ValueError(f'Unknown feature_taps {feature_taps!r}, expected one of {FEATURE_TAPS}.')
    if not 0. < compression <= 1.:
        raise ValueError(f'compression must be in (0, 1], got {compression}.')


# torchvision < 0.4 named dense-layer modules 'norm.1', 'relu.1', 'conv.1' where they are now 'norm1', ...
_LEGACY_TV_KEY = re.compile(r'^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(weight|bias|running_mean|running_var)$')


def checkpoint_filter_fn(
        state_dict: Dict[str, torch.Tensor],
        model: Optional[nn.Module] = None,
) -> Dict[str, torch.Tensor]:
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


def hub_offline_message(what: str, local_copy: str, repo_id: Optional[str] = None,
                        cache_dir: Optional[str] = None) -> str:
    """One line for weights that are neither in the local Hugging Face cache nor reachable: where they are, why they
    cannot be fetched, and the two ways out."""
    why = 'HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else 'the Hub cannot be reached'
    where = f' are in the Hugging Face Hub repository {repo_id}, which is' if repo_id else ':'
    return (f'{what}{where} not in the local Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}), and {why}; '
            f'go online once (unset HF_HUB_OFFLINE) to download it, or {local_copy}.')


def _create_densenet(variant: str, pretrained: bool = False, **kwargs) -> DenseNet:
    # every tap by default: the stem, each block before its transition, the final norm (4 for the CIFAR variants'
    # three blocks, where timm's default of five would not exist)
    num_taps = len(kwargs['block_config']) + 1  # every entrypoint states its blocks (_MODEL_ARGS)
    feature_cfg = dict(flatten_sequential=True, out_indices=tuple(range(num_taps)))
    feature_cfg.update(kwargs.pop('feature_cfg', None) or {})
    if kwargs.get('features_only') and kwargs.get('feature_taps') == 'norm':
        # the normalised taps are inside the transitions, where timm's FeatureListNet and FeatureDictNet cannot reach
        feature_cls = kwargs.setdefault('feature_cls', 'getter')
        if feature_cls in ('list', 'dict'):
            raise ValueError(f"feature_taps='norm' taps the transitions' norms, which feature_cls='{feature_cls}' "
                             f"cannot reach; use feature_cls='getter' (the default for these taps), 'hook' or 'fx'.")
    try:
        return build_model_with_cfg(
            DenseNet,
            variant,
            pretrained,
            feature_cfg=feature_cfg,
            pretrained_filter_fn=checkpoint_filter_fn,
            **kwargs,
        )
    except LocalEntryNotFoundError as e:
        if not pretrained:  # huggingface_hub's own message names neither the repository nor a way out
            raise
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        raise LocalEntryNotFoundError(hub_offline_message(
            f'pretrained weights for {variant}',
            "load a local copy with pretrained_cfg_overlay=dict(file='path/to/model.safetensors')",
            repo_id=cfg.hf_hub_id, cache_dir=kwargs.get('cache_dir'))) from e


CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _cfg(hf_hub_id: Optional[str] = None, **kwargs) -> Dict[str, Any]:
    return {
        'hf_hub_id': hf_hub_id, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'features.conv0', 'classifier': 'classifier', 'license': 'apache-2.0',
        'paper_name': 'Densely Connected Convolutional Networks', 'paper_ids': 'arXiv:1608.06993', **kwargs,
    }


def _ra_cfg(arch: str) -> Dict[str, Any]:
    """timm's weights, trained with RandAugment."""
    return _cfg(
        f'timm/{arch}.ra_in1k', test_input_size=(3, 288, 288), test_crop_pct=0.95,
        origin_url='https://github.com/huggingface/pytorch-image-models')


def _tv_cfg(arch: str) -> Dict[str, Any]:
    """torchvision's weights (IMAGENET1K_V1), as timm republished them in safetensors."""
    return _cfg(f'timm/{arch}.tv_in1k', license='bsd-3-clause', origin_url='https://github.com/pytorch/vision')


def _cifar_cfg(pool_size: int) -> Dict[str, Any]:
    return _cfg(
        num_classes=100, input_size=(3, 32, 32), pool_size=(pool_size, pool_size), crop_pct=1.0,
        mean=CIFAR100_MEAN, std=CIFAR100_STD)


default_cfgs = generate_default_cfgs({
    'densenet121.ra_in1k': _ra_cfg('densenet121'),
    'densenet121.tv_in1k': _tv_cfg('densenet121'),
    'densenet161.tv_in1k': _tv_cfg('densenet161'),
    'densenet169.tv_in1k': _tv_cfg('densenet169'),
    'densenet201.tv_in1k': _tv_cfg('densenet201'),
    'densenet264d.untrained': _cfg(),
    'densenetblur121d.ra_in1k': _ra_cfg('densenetblur121d'),
    'densenet121d.untrained': _cfg(),
    # torchvision's architectures under torchvision's names, loading the same weights
    'tv_densenet121.tv_in1k': _tv_cfg('densenet121'),
    'tv_densenet161.tv_in1k': _tv_cfg('densenet161'),
    'tv_densenet169.tv_in1k': _tv_cfg('densenet169'),
    'tv_densenet201.tv_in1k': _tv_cfg('densenet201'),
    # CIFAR (32x32): the paper's DenseNet-BC, and DenseNet-121 as popular CIFAR-100 code builds it
    'densenet_bc_100_k12.untrained': _cifar_cfg(8),
    'densenet_bc_250_k24.untrained': _cifar_cfg(8),
    'densenet_bc_190_k40.untrained': _cifar_cfg(8),
    'densenet121_cifar.untrained': _cifar_cfg(4),
})


def _bc_args(depth: int, growth_rate: int) -> Dict[str, Any]:
    """The paper's CIFAR DenseNet-BC: three blocks of (depth - 4) / 6 bottleneck layers, compression 0.5."""
    return dict(growth_rate=growth_rate, block_config=((depth - 4) // 6,) * 3, stem_type='cifar')


# Every variant's architecture; the tv_* variants are torchvision's names for the first four.
_MODEL_ARGS = {
    'densenet121': dict(growth_rate=32, block_config=(6, 12, 24, 16)),
    'densenet161': dict(growth_rate=48, block_config=(6, 12, 36, 24)),
    'densenet169': dict(growth_rate=32, block_config=(6, 12, 32, 32)),
    'densenet201': dict(growth_rate=32, block_config=(6, 12, 48, 32)),
    'densenet264d': dict(growth_rate=48, block_config=(6, 12, 64, 48), stem_type='deep'),
    'densenetblur121d': dict(growth_rate=32, block_config=(6, 12, 24, 16), stem_type='deep', aa_layer=BlurPool2d),
    'densenet121d': dict(growth_rate=32, block_config=(6, 12, 24, 16), stem_type='deep'),
    'densenet_bc_100_k12': _bc_args(100, 12),
    'densenet_bc_250_k24': _bc_args(250, 24),
    'densenet_bc_190_k40': _bc_args(190, 40),
    'densenet121_cifar': dict(growth_rate=32, block_config=(6, 12, 24, 16), stem_type='cifar'),
}


def _densenet(variant: str, pretrained: bool, **kwargs) -> DenseNet:
    model_args = _MODEL_ARGS[variant[len('tv_'):] if variant.startswith('tv_') else variant]
    return _create_densenet(variant, pretrained=pretrained, **dict(model_args, **kwargs))


def _register(fn: Callable[..., DenseNet]) -> Callable[..., DenseNet]:
    """timm's register_model, taking over timm's own DenseNet entry of the same name without its overwrite
    warning (timm then drops that entry's pretrained cfgs and deprecation alias)."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message=f'Overwriting {fn.__name__} in registry')
        return register_model(fn)


@_register
def densenet121(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16)."""
    return _densenet('densenet121', pretrained, **kwargs)


@_register
def densenet161(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24)."""
    return _densenet('densenet161', pretrained, **kwargs)


@_register
def densenet169(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32)."""
    return _densenet('densenet169', pretrained, **kwargs)


@_register
def densenet201(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32)."""
    return _densenet('densenet201', pretrained, **kwargs)


@_register
def densenet264d(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-264 (k=48, blocks 6-12-64-48) with a 3-layer 3x3 stem."""
    return _densenet('densenet264d', pretrained, **kwargs)


@_register
def densenetblur121d(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-121 with blur-pool downsampling in the stem and a 3-layer 3x3 stem."""
    return _densenet('densenetblur121d', pretrained, **kwargs)


@_register
def densenet121d(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-121 with a 3-layer 3x3 stem (no blur-pool)."""
    return _densenet('densenet121d', pretrained, **kwargs)


@_register
def densenet_bc_100_k12(pretrained: bool = False, **kwargs) -> DenseNet:
    """CIFAR DenseNet-BC, L=100, k=12 (0.8M parameters)."""
    return _densenet('densenet_bc_100_k12', pretrained, **kwargs)


@_register
def densenet_bc_250_k24(pretrained: bool = False, **kwargs) -> DenseNet:
    """CIFAR DenseNet-BC, L=250, k=24 (15.3M parameters)."""
    return _densenet('densenet_bc_250_k24', pretrained, **kwargs)


@_register
def densenet_bc_190_k40(pretrained: bool = False, **kwargs) -> DenseNet:
    """CIFAR DenseNet-BC, L=190, k=40 (25.6M parameters)."""
    return _densenet('densenet_bc_190_k40', pretrained, **kwargs)


@_register
def densenet121_cifar(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-121's blocks (6-12-24-16, k=32) on a 3x3 stride-1 stem without max-pool, for 32x32 images."""
    return _densenet('densenet121_cifar', pretrained, **kwargs)


def _register_tv(arch: str) -> None:
    """Register tv_`arch`: torchvision's `arch` with torchvision's weights (entrypoints made from one table)."""
    def entrypoint(pretrained: bool = False, **kwargs) -> DenseNet:
        return _densenet(f'tv_{arch}', pretrained, **kwargs)
    entrypoint.__name__ = entrypoint.__qualname__ = f'tv_{arch}'
    entrypoint.__doc__ = f"torchvision's {arch.replace('densenet', 'DenseNet-')} with torchvision's weights."
    globals()[entrypoint.__name__] = _register(entrypoint)


for _arch in ('densenet121', 'densenet161', 'densenet169', 'densenet201'):
    _register_tv(_arch)
