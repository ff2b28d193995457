"""Inference-only DenseNet with every BatchNorm folded into a convolution.

`fuse_for_inference(model)` rewrites a trained `DenseNet` (eval mode) with exact algebra:

* A BatchNorm that follows a convolution (the stem's, and each bottleneck's `norm2`) folds into that convolution's
  weight and bias.
* A BatchNorm-ReLU that precedes a 1x1 convolution (each layer's `norm1`, each transition's `norm`) folds into the
  convolution too: with scale s and shift b per channel, relu(s*x + b) = s*clamp(x, tau) + b where tau = -b/s is a
  lower bound when s > 0 and an upper bound when s < 0. The scale and shift go into the convolution; what is left
  is one clamp per channel, a single pass over the layer's input instead of normalise, then activate.
* A transition's average pool runs before its 1x1 convolution (they commute), on a quarter of the pixels.
* Each dense block writes its layers' outputs into one preallocated tensor instead of concatenating anew per layer.

The result matches the model to float rounding and works eagerly, under `torch.compile` and under TorchScript.
"""
import copy
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ._fast import BufferedDenseBlock, bn_scale_shift, check_input
from .densenet import DenseBlock, DenseLayer, DenseNet, DenseTransition

__all__ = ['fuse_for_inference', 'FusedDenseNet']


def _check_foldable(norm: nn.Module, where: str) -> None:
    """Raise ValueError unless `norm` is an eval-mode-foldable BatchNorm-ReLU."""
    if not isinstance(norm, BatchNormAct2d) or norm.running_mean is None or norm.running_var is None:
        raise ValueError(
            f'fuse_for_inference folds BatchNorm layers with running statistics; {where} is '
            f'{type(norm).__name__}. Use the model as it is for other norm layers.')
    if not isinstance(norm.act, nn.ReLU) or not isinstance(norm.drop, nn.Identity):
        raise ValueError(
            f'fuse_for_inference folds BatchNorm followed by ReLU; {where} applies {type(norm.act).__name__}. '
            f'Use the model as it is for other activations.')


def _double(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().double()


def _scale_shift(norm: nn.Module, where: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of an eval-mode BatchNorm-ReLU, in float64; anything else cannot be folded."""
    _check_foldable(norm, where)
    invstd = torch.rsqrt(norm.running_var.double() + norm.eps)
    return bn_scale_shift(norm.running_mean.double(), invstd, _double(norm.weight), _double(norm.bias))


def _conv_then_bn(
        weight: torch.Tensor, bias: Optional[torch.Tensor], norm: nn.Module, where: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of `norm(conv(x))` before the ReLU, as one convolution (float64 until stored)."""
    _check_foldable(norm, where)
    weight, bias = fuse_conv_bn_weights(
        weight.double(), _double(bias), norm.running_mean.double(), norm.running_var.double(), norm.eps,
        _double(norm.weight), _double(norm.bias))
    return weight.detach(), bias.detach()


def _bn_relu_then_conv(
        norm: nn.Module,
        conv: nn.Conv2d,
        where: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clamp bounds, weight and bias with conv(relu(bn(x))) == conv'(clamp(x, lo, hi)) for a 1x1 `conv`."""
    scale, shift = _scale_shift(norm, where)
    tau = -shift / torch.where(scale == 0, torch.ones_like(scale), scale)
    inf = torch.full_like(tau, float('inf'))
    lo = torch.where(scale > 0, tau, -inf)
    hi = torch.where(scale < 0, tau, inf)
    # where s == 0 the channel is the constant relu(b): its weight column vanishes and relu(b) goes into the bias
    offset = torch.where(scale == 0, shift.clamp_min(0), shift)
    w = conv.weight.double()
    weight = w * scale.view(1, -1, 1, 1)
    bias = w.sum(dim=(2, 3)) @ offset
    if conv.bias is not None:
        bias = bias + conv.bias.double()
    return lo, hi, weight, bias


class _ClampConv(nn.Module):
    """clamp(x, lo, hi) per channel, a transition's average pool (if any), then a 1x1 convolution with bias."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 pool: nn.Module, relu: bool, like: torch.Tensor) -> None:
        super().__init__()
        dd = dict(device=like.device, dtype=like.dtype)
        self.register_buffer('lo', lo.to(**dd).view(1, -1, 1, 1))
        self.register_buffer('hi', hi.to(**dd).view(1, -1, 1, 1))
        self.register_buffer('weight', weight.to(**dd))
        self.register_buffer('bias', bias.to(**dd))
        self.pool = pool
        self.relu = relu
        self.upper_bounds = bool((hi < float('inf')).any())  # some scale s < 0; usually none, and one bound is cheaper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(x, self.lo, self.hi) if self.upper_bounds else torch.clamp_min(x, self.lo)
        x = self.pool(x)
        x = F.conv2d(x, self.weight, self.bias)
        return F.relu_(x) if self.relu else x


class _FusedDenseLayer(nn.Module):
    """clamp -> 1x1 conv (norm1 and norm2 folded) -> ReLU -> 3x3 conv."""

    def __init__(self, layer: DenseLayer, where: str, memory_format: torch.memory_format) -> None:
        super().__init__()
        lo, hi, weight, bias = _bn_relu_then_conv(layer.norm1, layer.conv1, f'{where}.norm1')
        # norm2 follows conv1: fold it into conv1's weight and bias as well
        weight, bias = _conv_then_bn(weight, bias, layer.norm2, f'{where}.norm2')
        self.bottleneck = _ClampConv(lo, hi, weight, bias, pool=nn.Identity(), relu=True, like=layer.conv1.weight)
        self.register_buffer('weight', layer.conv2.weight.detach().clone().contiguous(memory_format=memory_format))
        self.dilation = layer.conv2.dilation[0]  # output_stride < 32 dilates the later blocks

    def forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.bottleneck(x), self.weight, None, 1, self.dilation, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_inference(x)


class _FusedDenseBlock(BufferedDenseBlock):
    """Fused dense layers (named as the block's) writing into one preallocated tensor."""

    def __init__(self, block: DenseBlock, where: str, memory_format: torch.memory_format) -> None:
        super().__init__()
        self.growth_rate = block.growth_rate
        self.num_layers = block.num_layers
        for name, layer in block.items():
            self.add_module(name, _FusedDenseLayer(layer, f'{where}.{name}', memory_format))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_into_buffer(x)


class _FusedStemConv(nn.Module):
    """Convolution with its BatchNorm folded in, then ReLU."""

    def __init__(self, conv: nn.Conv2d, norm: Optional[nn.Module], where: str,
                 memory_format: torch.memory_format) -> None:
        super().__init__()
        if norm is None:
            weight, bias = conv.weight.detach().double(), torch.zeros(conv.out_channels, dtype=torch.float64)
        else:
            weight, bias = _conv_then_bn(conv.weight, conv.bias, norm, where)
        dd = dict(device=conv.weight.device, dtype=conv.weight.dtype)
        self.register_buffer('weight', weight.to(**dd).contiguous(memory_format=memory_format))
        self.register_buffer('bias', bias.to(**dd))
        self.stride = conv.stride[0]
        self.padding = conv.padding[0]
        self.relu = norm is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        return F.relu_(x) if self.relu else x


class FusedDenseNet(nn.Module):
    """What `fuse_for_inference` returns: the same outputs as the DenseNet it came from, for inference only."""

    def __init__(self, model: DenseNet) -> None:
        super().__init__()
        dev = model.features.conv0.weight.device
        memory_format = torch.channels_last if dev.type == 'cpu' else torch.contiguous_format
        self.in_chans = model.in_chans
        self.min_input_size = model.min_input_size
        self.num_classes = model.num_classes
        self.num_features = model.num_features
        self.channels_last = dev.type == 'cpu'
        stem: List[nn.Module] = []
        stages: List[nn.Module] = []
        norm5: Optional[nn.Module] = None
        children = dict(model.features.named_children())
        if 'norm5' not in children:  # checked first: pruning also strips the last kept transition to its norm
            raise ValueError('fuse_for_inference needs a whole DenseNet; this one has no features.norm5 '
                             '(pruned by prune_intermediate_layers?).')
        for name, m in children.items():
            where = f'features.{name}'
            if isinstance(m, DenseBlock):
                stages.append(_FusedDenseBlock(m, where, memory_format))
            elif isinstance(m, DenseTransition):
                lo, hi, weight, bias = _bn_relu_then_conv(m.norm, m.conv, f'{where}.norm')
                if not m.pool_first:
                    raise ValueError(f'fuse_for_inference folds transitions with average pooling; {where} uses '
                                     f'{type(m.pool).__name__}. Use the model as it is.')
                stages.append(_ClampConv(lo, hi, weight, bias, pool=copy.deepcopy(m.pool), relu=False,
                                         like=m.conv.weight))
            elif name == 'norm5':
                norm5 = m
            elif name.startswith('conv'):
                norm = children.get('norm' + name[4:])
                stem.append(_FusedStemConv(m, norm, where, memory_format))
            elif name == 'pool0':
                stem.append(copy.deepcopy(m))
            elif not name.startswith('norm'):
                raise ValueError(f'fuse_for_inference does not know the module {where} ({type(m).__name__}).')
        assert norm5 is not None
        scale, shift = _scale_shift(norm5, 'features.norm5')
        self.stem = nn.Sequential(*stem)
        self.stages = nn.Sequential(*stages)
        dd = dict(device=dev, dtype=model.features.conv0.weight.dtype)
        self.register_buffer('scale5', scale.to(**dd).view(1, -1, 1, 1))
        self.register_buffer('shift5', shift.to(**dd).view(1, -1, 1, 1))
        self.global_pool = copy.deepcopy(model.global_pool)
        self.classifier = copy.deepcopy(model.classifier)
        self.eval()
        self.requires_grad_(False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = check_input(x, self.in_chans, self.min_input_size)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stages(self.stem(x))
        return F.relu_(torch.addcmul(self.shift5, x, self.scale5))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def fuse_for_inference(model: nn.Module) -> FusedDenseNet:
    """An inference-only copy of `model` with BatchNorms folded into convolutions (see the module docstring).

    The model must be a whole timm_densenet_ext DenseNet with BatchNorm-ReLU norms; its training mode is ignored
    (running statistics are used). The returned module has no trainable parameters and stays in eval mode.
    """
    if not isinstance(model, DenseNet):
        raise TypeError(
            f'fuse_for_inference takes a timm_densenet_ext DenseNet (from timm.create_model after '
            f'`import timm_densenet_ext`), got {type(model).__name__}.')
    with torch.no_grad():
        return FusedDenseNet(model)
