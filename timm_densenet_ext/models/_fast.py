"""The speed-ups behind DenseNet and its fused inference copy, in one place.

* Input checks: a clear error for a tensor DenseNet cannot take, and the smallest input its downsampling leaves
  something of.
* BatchNorm as one multiply-add per channel (`bn_scale_shift`), which reads a channel slice of a buffer in place
  (`StridedBatchNormAct2d`) and which `fused` folds into convolutions.
* Buffered dense blocks (`BufferedDenseBlock`): without autograd, each layer writes its output into one preallocated
  tensor instead of concatenating anew (work linear in depth instead of quadratic).
* Memory-efficient training (`checkpointed_dense_layer`, Pleiss et al.): a dense layer keeps only its convolutions'
  inputs for backward and never recomputes a convolution.
"""
import contextlib
import functools
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, register_notrace_function

try:  # True under fx's symbolic tracing only, not under torch.compile or torch.export
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as symbolic_tracing
except ImportError:  # pragma: no cover - torch < 2.6
    from torch.fx._symbolic_trace import is_fx_tracing as symbolic_tracing

__all__ = ['check_input', 'cpu_channels_last', 'min_input_size', 'bn_scale_shift', 'StridedBatchNormAct2d',
           'strided', 'BufferedDenseBlock', 'checkpointed_dense_layer', 'symbolic_tracing']


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


def cpu_channels_last(x: torch.Tensor) -> torch.Tensor:
    """On the CPU, channels-last (NHWC): oneDNN convolves it without reordering, and channel slices stay dense."""
    if x.device.type == 'cpu':
        return x.contiguous(memory_format=torch.channels_last)
    return x


# both are control flow on the input: keep each as one node when torch.fx traces (timm's feature extractor here;
# torchvision's through torch.fx.wrap in the module that calls them)
register_notrace_function(check_input)
register_notrace_function(cpu_channels_last)


def min_input_size(ops: List[Tuple[int, int, int, int]]) -> int:
    """Smallest square input that survives every (kernel, stride, padding, min_in) downsampling op in turn."""
    def survives(size: int) -> bool:
        for kernel, stride, padding, min_in in ops:
            if size < min_in:
                return False
            size = (size + 2 * padding - kernel) // stride + 1
            if size < 1:
                return False
        return True

    size = 1
    while not survives(size):
        size += 1
    return size


def bn_scale_shift(
        mean: torch.Tensor,
        invstd: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with batchnorm(x) == x * scale + shift, the multiply-add the CPU and CUDA
    batch-norm kernels apply."""
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def _batch_norm_eval(
        x: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        eps: float,
) -> torch.Tensor:
    """Eval-mode batch norm as one multiply-add per element, on `x` as it lies in memory."""
    scale, shift = bn_scale_shift(running_mean, torch.rsqrt(running_var + eps), weight, bias)
    return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))


# one node when fx traces: traced through, the statistics arithmetic (no proxy in it) would run once at trace time
# and be frozen into the graph as constants
torch.fx.wrap('_batch_norm_eval')


class StridedBatchNormAct2d(BatchNormAct2d):
    """BatchNormAct2d that in eval mode applies its statistics as one multiply-add per element.

    F.batch_norm copies a strided input (a channel slice of a dense block's buffer) before normalising it, and
    normalises strided and contiguous tensors in different kernels. This reads the slice where it lies and gives the
    same bits either way, so that a block's buffered and concatenating paths agree exactly (`BufferedDenseBlock`).
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


def strided(norm_layer: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
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


class BufferedDenseBlock(nn.ModuleDict):
    """Dense layers (each with `forward_inference(x)` on the concatenated features) that can write their outputs
    into one preallocated tensor: each layer reads a channel slice of it, so the work is linear in depth where
    concatenating anew in every layer is quadratic."""
    growth_rate: int
    num_layers: int

    @torch.jit.unused
    def buffered(self, x: Any) -> bool:
        """Whether `forward_into_buffer` computes this forward: autograd records nothing (later writes would change
        what backward needs), fx is not tracing (a traced graph serves every grad mode), and every norm is per
        element, so the result has the same bits as concatenating."""
        if symbolic_tracing():
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return all(_elementwise_norm(layer.norm1) and _elementwise_norm(layer.norm2) for layer in self.values())

    def forward_into_buffer(self, x: torch.Tensor) -> torch.Tensor:
        """Write the input and each layer's output into one preallocated tensor (no concatenation copies)."""
        n, c, h, w = x.shape
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
            else torch.contiguous_format
        buf = torch.empty(
            (n, c + self.num_layers * self.growth_rate, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
        buf[:, :c].copy_(x)
        for layer in self.values():
            buf[:, c:c + self.growth_rate].copy_(layer.forward_inference(buf[:, :c]))
            c += self.growth_rate
        return buf


# What a checkpointed dense layer keeps for backward: the convolutions' outputs. The concatenation, the
# normalisations and the activations are cheap to redo and are recomputed (Pleiss et al.).
_SAVED_OPS = (torch.ops.aten.convolution.default,)


def _save_convolutions(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


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


@contextlib.contextmanager
def _all_of(*managers: Any) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield


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
        scale, shift = bn_scale_shift(mean, invstd, bn_weight, bn_bias)
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


def checkpointed_dense_layer(layer: nn.Module, features: List[torch.Tensor]) -> torch.Tensor:
    """A DenseLayer's forward keeping only its convolutions' inputs for backward (memory linear in depth, not
    quadratic). Backward recomputes the concatenation, normalisations and activations but not the convolutions, and
    leaves the BN running statistics as the forward pass left them."""
    if _efficient_norm(layer.norm1) and _efficient_norm(layer.norm2):
        x = _NormActConv.apply(layer.norm1, 1, layer.norm1.weight, layer.norm1.bias, layer.conv1.weight, *features)
        x = _NormActConv.apply(
            layer.norm2, layer.conv2.dilation[0], layer.norm2.weight, layer.norm2.bias, layer.conv2.weight, x)
        if layer.drop_rate > 0.:
            x = F.dropout(x, p=layer.drop_rate, training=layer.training)
        return x

    # other norms (or BatchNorm in eval mode): torch's selective checkpointing does the same, more slowly
    def contexts() -> Tuple[Any, Any]:
        forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(_save_convolutions)
        return forward_ctx, _all_of(_running_stats_kept(layer), recompute_ctx)

    return checkpoint(lambda *xs: layer.layer(list(xs)), *features, use_reentrant=False, context_fn=contexts)
