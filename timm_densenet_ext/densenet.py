"""DenseNet: dense layers, blocks, transitions, stems and the classifier network.

Papers:
    * `Densely Connected Convolutional Networks` - https://arxiv.org/abs/1608.06993
    * `Memory-Efficient Implementation of DenseNets` - https://arxiv.org/abs/1707.06990
    * `Making Convolutional Networks Shift-Invariant Again` - https://arxiv.org/abs/1904.11486

Module and parameter names follow torchvision's and timm's DenseNet, so their checkpoints load unchanged.
No variant is named here: `variants.py` states them.
"""
import contextlib
import functools
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from timm.layers import BatchNormAct2d, BlurPool2d, FrozenBatchNormAct2d, create_classifier, get_norm_act_layer
from timm.models._features import feature_take_indices
from timm.models._manipulate import MATCH_PREV_GROUP

try:  # True under fx's symbolic tracing only, not under torch.compile or torch.export
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _symbolic_tracing
except ImportError:  # pragma: no cover - older torch
    from torch.fx._symbolic_trace import is_fx_tracing as _symbolic_tracing

__all__ = ['DenseLayer', 'DenseBlock', 'DenseTransition', 'AtrousAvgPool2d', 'DenseNet', 'StridedBatchNormAct2d',
           'STEM_TYPES', 'FEATURE_TAPS']

STEM_TYPES = ('', 'deep', 'deep_tiered', 'deep_tiered_narrow', 'cifar')
FEATURE_TAPS = ('raw', 'norm')


def check_input(x: torch.Tensor, in_chans: int, min_size: int) -> torch.Tensor:
    """Return `x` unchanged, or raise ValueError saying what input the network expects."""
    if x.dim() != 4:
        raise ValueError(
            f'DenseNet expects a batch of images shaped (N, {in_chans}, H, W), got a tensor of shape '
            f'{list(x.shape)}; add the batch dimension with x.unsqueeze(0) for a single image.')
    if x.shape[1] != in_chans:
        raise ValueError(
            f'DenseNet expects images with {in_chans} channels, shaped (N, {in_chans}, H, W), got shape '
            f'{list(x.shape)}; convert the images to {in_chans} channels, or create the model with '
            f'in_chans={x.shape[1]}.')
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            f'DenseNet expects images of at least {min_size}x{min_size} pixels (its downsampling leaves nothing '
            f'of a smaller one), got {x.shape[2]}x{x.shape[3]}; resize or pad the input.')
    return x


def _cpu_channels_last(x: torch.Tensor) -> torch.Tensor:
    """On the CPU, channels-last (NHWC): oneDNN convolves it without reordering, and channel slices stay dense."""
    if x.device.type == 'cpu':
        return x.contiguous(memory_format=torch.channels_last)
    return x


# both are control flow on the input: keep each as one node when torch.fx traces (torchvision's and timm's
# feature extractors included)
torch.fx.wrap('check_input')
torch.fx.wrap('_cpu_channels_last')
try:
    from timm.layers import register_notrace_function
    register_notrace_function(check_input)
    register_notrace_function(_cpu_channels_last)
except ImportError:  # pragma: no cover - older timm
    pass


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Undo any change to `module`'s buffers (BatchNorm running statistics) made inside the block."""
    saved = [b.detach().clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in zip(module.buffers(), saved):
                buf.copy_(value)


# What a checkpointed dense layer keeps for backward: the convolutions' outputs. The concatenation, the
# normalisations and the activations are cheap to redo and are recomputed (Pleiss et al.).
_SAVED_OPS = (torch.ops.aten.convolution.default,)


def _save_convolutions(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _batch_norm_eval(
        x: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        eps: float,
) -> torch.Tensor:
    """Eval-mode batch norm as one multiply-add per element, on `x` as it lies in memory."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))


# one node when fx traces: traced through, the statistics arithmetic (no proxy in it) would run once at trace time
# and be frozen into the graph as constants
torch.fx.wrap('_batch_norm_eval')


class StridedBatchNormAct2d(BatchNormAct2d):
    """BatchNormAct2d that in eval mode applies its statistics as one multiply-add per element.

    F.batch_norm copies a strided input (a channel slice of a dense block's buffer) before normalising it, and
    normalises strided and contiguous tensors in different kernels. This reads the slice where it lies and gives the
    same bits either way, so that a block's buffered and concatenating paths agree exactly (`DenseBlock.buffered`).
    Parameters, buffers and training-mode behaviour are BatchNormAct2d's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TorchScript concatenates (no buffer) and takes F.batch_norm: its autodiff of the multiply-add, recorded in a
        # grad-mode run, fails a later run under torch.inference_mode()
        if not self.training and self.running_mean is not None and self.running_var is not None \
                and not torch.jit.is_scripting():
            return self.act(self.drop(_batch_norm_eval(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)))
        # BatchNormAct2d.forward (TorchScript compiles no super() call)
        momentum = 0. if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1. / float(self.num_batches_tracked)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            self.training or (self.running_mean is None and self.running_var is None),
            momentum,
            self.eps,
        )
        return self.act(self.drop(x))


def _strided(norm_layer: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """`norm_layer` with StridedBatchNormAct2d for BatchNormAct2d (any other norm as it is)."""
    if isinstance(norm_layer, functools.partial) and norm_layer.func is BatchNormAct2d:
        return functools.partial(StridedBatchNormAct2d, *norm_layer.args, **norm_layer.keywords)
    return StridedBatchNormAct2d if norm_layer is BatchNormAct2d else norm_layer


def _elementwise_norm(norm: nn.Module) -> bool:
    """Whether `norm` treats each element on its own, giving the same bits on a strided channel slice as on a
    contiguous copy. Batch statistics (a BatchNorm in training) reduce over a slice in another order."""
    if isinstance(norm, FrozenBatchNormAct2d):
        return isinstance(norm.drop, nn.Identity)
    return isinstance(norm, StridedBatchNormAct2d) and not norm.training \
        and norm.running_mean is not None and norm.running_var is not None


def _efficient_norm(norm: nn.Module) -> bool:
    """Whether `_NormActConv` can stand in for `norm`: a training-mode BatchNorm with ReLU and nothing else."""
    return isinstance(norm, BatchNormAct2d) and norm.training and isinstance(norm.act, nn.ReLU) \
        and isinstance(norm.drop, nn.Identity) and norm.weight is not None and norm.bias is not None


class _NormActConv(torch.autograd.Function):
    """conv(relu(batchnorm(cat(xs)))) in training mode that keeps only `xs` and the batch statistics for backward.

    Backward concatenates and normalises again (cheap, elementwise) but does not redo the convolution. The
    normalised tensor, the largest in a dense layer, lives only while it is used (Pleiss et al.).
    """

    @staticmethod
    def forward(ctx: Any, norm: nn.Module, dilation: int, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                conv_weight: torch.Tensor, *xs: torch.Tensor) -> torch.Tensor:
        x = xs[0] if len(xs) == 1 else torch.cat(xs, 1)
        momentum = 0.
        if norm.track_running_stats:  # BatchNormAct2d's bookkeeping, as its forward does it
            norm.num_batches_tracked.add_(1)
            momentum = 1. / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            x, bn_weight, bn_bias, norm.running_mean, norm.running_var, True, momentum, norm.eps)
        padding = dilation * (conv_weight.shape[-1] // 2)  # 'same' for the odd kernels of a dense layer
        out = F.conv2d(y.relu_(), conv_weight, None, 1, padding, dilation)
        ctx.save_for_backward(bn_weight, bn_bias, conv_weight, mean, invstd, *xs)
        ctx.eps, ctx.padding, ctx.dilation = norm.eps, padding, dilation
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        bn_weight, bn_bias, conv_weight, mean, invstd, *xs = ctx.saved_tensors
        x = xs[0] if len(xs) == 1 else torch.cat(xs, 1)
        # the same multiply-add the CPU and CUDA batch-norm kernels apply
        scale = invstd * bn_weight
        shift = bn_bias - mean * scale
        y = torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1)).relu_()
        grad_y, grad_conv, _ = torch.ops.aten.convolution_backward(
            grad_out, y, conv_weight, None, [1, 1], [ctx.padding] * 2, [ctx.dilation] * 2, False, [0, 0], 1,
            [True, ctx.needs_input_grad[4], False])
        grad_y = torch.ops.aten.threshold_backward(grad_y, y, 0)
        del y
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, bn_weight, None, None, mean, invstd, True, ctx.eps,
            [any(ctx.needs_input_grad[5:]), ctx.needs_input_grad[2], ctx.needs_input_grad[3]])
        grad_xs = (grad_x,) if len(xs) == 1 else grad_x.split([t.shape[1] for t in xs], 1)
        return (None, None, grad_w, grad_b, grad_conv, *grad_xs)


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
        dd = _factory_kwargs(device, dtype)
        super().__init__()
        norm_layer = _strided(norm_layer)  # BatchNormAct2d reads a channel slice of the block's buffer in place
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
        """The layer keeping only its convolutions' outputs for backward (memory linear in depth, not quadratic).

        Backward recomputes the concatenation, normalisations and activations but not the convolutions, and leaves
        the BN running statistics as the forward pass left them.
        """
        if _efficient_norm(self.norm1) and _efficient_norm(self.norm2):
            x = _NormActConv.apply(self.norm1, 1, self.norm1.weight, self.norm1.bias, self.conv1.weight, *features)
            x = _NormActConv.apply(
                self.norm2, self.conv2.dilation[0], self.norm2.weight, self.norm2.bias, self.conv2.weight, x)
            if self.drop_rate > 0.:
                x = F.dropout(x, p=self.drop_rate, training=self.training)
            return x

        # other norms (or BatchNorm in eval mode): torch's selective checkpointing does the same, more slowly
        def contexts() -> Tuple[Any, Any]:
            forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(_save_convolutions)
            return forward_ctx, _all_of(_running_stats_kept(self), recompute_ctx)

        return checkpoint(lambda *xs: self.layer(list(xs)), *features, use_reentrant=False, context_fn=contexts)

    @torch.jit.unused
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
            if self.grad_checkpointing and torch.is_grad_enabled() and not _symbolic_tracing():
                return self.checkpointed_layer(features)
            return self.layer(features)


@contextlib.contextmanager
def _all_of(*managers: Any) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield


class DenseBlock(nn.ModuleDict):
    """`num_layers` dense layers, each seeing the concatenation of the block input and all earlier outputs."""

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

    @torch.jit.unused
    def buffered(self, x: Any) -> bool:
        """Whether `forward_into_buffer` computes this forward: autograd records nothing, fx is not tracing (a traced
        graph serves every grad mode), and every norm is per element, so the result has the same bits as the
        concatenating path's."""
        if _symbolic_tracing():
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return all(_elementwise_norm(layer.norm1) and _elementwise_norm(layer.norm2) for layer in self.values())

    @torch.jit.unused
    def forward_into_buffer(self, x: torch.Tensor) -> torch.Tensor:
        """Write the input and each layer's output into one preallocated tensor (no concatenation copies).

        Each layer reads a channel slice of the buffer, so the work is linear in depth where concatenating anew
        in every layer is quadratic. Without autograd only (later writes would change what backward needs), and
        with per-element norms only (see `buffered`).
        """
        n, c, h, w = x.shape
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
            else torch.contiguous_format
        buf = torch.empty(
            (n, c + len(self) * self.growth_rate, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
        buf[:, :c].copy_(x)
        for layer in self.values():
            buf[:, c:c + self.growth_rate].copy_(layer.forward_inference(buf[:, :c]))
            c += self.growth_rate
        return buf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.buffered(x):
            return self.forward_into_buffer(x)
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


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
        dd = _factory_kwargs(device, dtype)
        super().__init__()
        self.add_module('norm', norm_layer(num_input_features, **dd))
        self.add_module('conv', nn.Conv2d(num_input_features, num_output_features, 1, bias=False, **dd))
        if stride == 1:
            if aa_layer is not None:
                raise ValueError('output_stride below 32 needs average-pool transitions; this DenseNet blurs in its '
                                 'transitions (aa_stem_only=False). Use output_stride=32 or aa_stem_only=True.')
            self.add_module('pool', AtrousAvgPool2d(dilation))  # no weights: the state dict is unchanged
        elif aa_layer is not None:
            self.add_module('pool', aa_layer(num_output_features, stride=2, **dd))
        else:
            self.add_module('pool', nn.AvgPool2d(kernel_size=2, stride=2))
        self.pool_first = aa_layer is None

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """Everything after the norm: compress and pool the normalised block output."""
        if self.pool_first:
            return self.conv(self.pool(x))
        return self.pool(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.norm(x))


def _factory_kwargs(device, dtype) -> Dict[str, Any]:
    """device/dtype for layer constructors, only when set: timm's layers take them from timm 1.0.20 on."""
    return {k: v for k, v in (('device', device), ('dtype', dtype)) if v is not None}


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _min_input_size(ops: List[Tuple[int, int, int, int]]) -> int:
    """Smallest square input that survives every (kernel, stride, padding, min_in) downsampling op in turn."""
    size = 1
    while True:
        s, ok = size, True
        for kernel, stride, padding, min_in in ops:
            if s < min_in:
                ok = False
                break
            s = _out_size(s, kernel, stride, padding)
            if s < 1:
                ok = False
                break
        if ok:
            return size
        size += 1


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
        stem_type: '' 7x7/2 conv + max-pool; 'deep' three 3x3 convs + max-pool ('deep_tiered', 'deep_tiered_narrow'
            vary their widths); 'cifar' one 3x3/1 conv and no pooling, as in the paper's CIFAR networks.
        stem_width: Stem output channels; 2 * growth_rate when None.
        act_layer: Activation after each norm.
        norm_layer: Norm layer, fused with the activation by timm's norm-act layers.
        aa_layer: Anti-aliasing pool (e.g. BlurPool2d) for the stem's downsampling, None for plain pooling.
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
        if stem_type not in STEM_TYPES:
            raise ValueError(f'Unknown stem_type {stem_type!r}, expected one of {STEM_TYPES}.')
        if output_stride not in (8, 16, 32):
            raise ValueError(f'output_stride must be 32, 16 or 8, got {output_stride!r}.')
        if feature_taps not in FEATURE_TAPS:
            raise ValueError(f'Unknown feature_taps {feature_taps!r}, expected one of {FEATURE_TAPS}.')
        if not 0. < compression <= 1.:
            raise ValueError(f'compression must be in (0, 1], got {compression}.')
        dd = _factory_kwargs(device, dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.growth_rate = growth_rate
        self.drop_rate = drop_rate
        norm_layer = get_norm_act_layer(norm_layer, act_layer=act_layer)
        if isinstance(aa_layer, str):
            aa_layer = {'blur': BlurPool2d, 'blurpool': BlurPool2d}[aa_layer.lower()]
        num_init_features = stem_width or 2 * growth_rate

        # Stem; downsample_ops records (kernel, stride, padding, min input) of each op that shrinks the image.
        self.features, stem_tap, downsample_ops = self._create_stem(
            stem_type, in_chans, num_init_features, growth_rate, norm_layer, aa_layer, dd)
        stride = 2 if stem_type != 'cifar' else 1
        self.feature_info = [dict(num_chs=num_init_features, reduction=stride, module=f'features.{stem_tap}')]
        if stem_type != 'cifar':
            stride *= 2

        num_features = num_init_features
        dilation = 1
        norm_taps = [self.feature_info[0]['module']]  # the module names of the taps with feature_taps='norm'
        for i, num_layers in enumerate(block_config):
            name = f'denseblock{i + 1}'
            self.features.add_module(name, DenseBlock(
                num_layers=num_layers,
                num_input_features=num_features,
                bn_size=bn_size,
                growth_rate=growth_rate,
                norm_layer=norm_layer,
                drop_rate=proj_drop_rate,
                grad_checkpointing=memory_efficient,
                dilation=dilation,
                **dd,
            ))
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                transition = f'transition{i + 1}'
                self.feature_info.append(dict(num_chs=num_features, reduction=stride, module=f'features.{name}'))
                norm_taps.append(f'features.{transition}.norm')
                transition_aa = None if aa_stem_only else aa_layer
                transition_stride = 2 if stride < output_stride else 1
                out_features = int(num_features * compression)
                self.features.add_module(transition, DenseTransition(
                    num_features, out_features, norm_layer=norm_layer, aa_layer=transition_aa,
                    stride=transition_stride, dilation=dilation, **dd))
                num_features = out_features
                if transition_stride == 2:
                    downsample_ops.append((3, 2, 1, 2) if transition_aa is not None else (2, 2, 0, 2))
                    stride *= 2
                else:
                    dilation *= 2
        self.features.add_module('norm5', norm_layer(num_features, **dd))
        self.feature_info.append(dict(num_chs=num_features, reduction=stride, module='features.norm5'))
        norm_taps.append('features.norm5')
        # positions within self.features of the layers whose outputs are the taps (raw), or whose norms give them
        names = [n for n, _ in self.features.named_children()]
        self.feature_ends = [names.index(f['module'].split('.')[1]) for f in self.feature_info]
        self.norm_feature_ends = [names.index(m.split('.')[1]) for m in norm_taps]
        self.feature_taps = feature_taps
        if feature_taps == 'norm':
            for info, module in zip(self.feature_info, norm_taps):
                info['module'] = module
        self.min_input_size = _min_input_size(downsample_ops)

        self.num_features = self.head_hidden_size = num_features
        self.global_pool, self.classifier = create_classifier(num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = num_features * self.global_pool.feat_mult()
        self.head_drop = nn.Dropout(drop_rate)

        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    @staticmethod
    def _create_stem(
            stem_type: str,
            in_chans: int,
            out_chs: int,
            growth_rate: int,
            norm_layer: Type[nn.Module],
            aa_layer: Optional[Type[nn.Module]],
            dd: Dict[str, Any],
    ) -> Tuple[nn.Sequential, str, List[Tuple[int, int, int, int]]]:
        """Return the stem as the start of `features`, the name of its feature tap, and its downsampling ops."""
        if stem_type == 'cifar':
            return nn.Sequential(OrderedDict([
                ('conv0', nn.Conv2d(in_chans, out_chs, 3, stride=1, padding=1, bias=False, **dd)),
            ])), 'conv0', []

        if aa_layer is None:
            pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            pool_ops = [(3, 2, 1, 1)]
        else:
            pool = nn.Sequential(
                nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
                aa_layer(channels=out_chs, stride=2, **dd))
            pool_ops = [(3, 2, 1, 2)]  # reflect padding needs two pixels

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
                ('pool0', pool),
            ]
            return nn.Sequential(OrderedDict(layers)), 'norm2', [(3, 2, 1, 1)] + pool_ops

        layers = [
            ('conv0', nn.Conv2d(in_chans, out_chs, 7, stride=2, padding=3, bias=False, **dd)),
            ('norm0', norm_layer(out_chs, **dd)),
            ('pool0', pool),
        ]
        return nn.Sequential(OrderedDict(layers)), 'norm0', [(7, 2, 3, 1)] + pool_ops

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
        x = _cpu_channels_last(check_input(x, self.in_chans, self.min_input_size))
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
        x = _cpu_channels_last(check_input(x, self.in_chans, self.min_input_size))
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
