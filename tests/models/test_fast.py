"""The fast paths give the numbers of the plain ones: buffered inference, fused inference, memory-efficient training.

Timings are never asserted here; `timm-densenet-ext benchmark` measures them. What is asserted is the numerics of
every fast path (eval, train, gradients, TorchScript, torch.compile) and the work they avoid (operation counts and
allocator peaks, which are deterministic).

The numerics run on every distinct layout with two layers per block (`CASES`: each registered variant's stem, growth,
compression and pooling, the stem types no variant registers, and densenet121 at full depth); the operation counts and
allocator peaks on full-depth DenseNet-121.
"""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, freeze_batch_norm_2d
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import timm_densenet_ext
from model_helpers import distinct_shallow, shallow
from timm_densenet_ext import fuse_for_inference
from timm_densenet_ext.models.densenet import DenseBlock, DenseLayer
from timm_densenet_ext.models.fused import FusedDenseNet
from timm_densenet_ext.parity import randomize_

ALL = sorted(timm_densenet_ext.MODEL_NAMES)


def _size(name):
    return 32 if 'cifar' in name or '_bc_' in name else 64


# (variant, create_model arguments): every distinct registered layout with two layers per block, the stem types no
# registered variant uses, and one variant at full depth
CASES = [pytest.param(name, shallow(name), id=name) for name in distinct_shallow(ALL, _size)] + [
    pytest.param('densenet121', dict(stem_type=stem, **shallow('densenet121')), id=f'densenet121-{stem}')
    for stem in ('deep_tiered', 'deep_tiered_narrow')] + [
    pytest.param('densenet121', {}, id='densenet121-full')]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _odd_scales_(model):
    """Negative and zero BN scales, which the clamp folding treats separately from positive ones."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight[::7] *= -1
                m.weight[3::11] = 0
    return model


def _model(name, **kwargs):
    return _odd_scales_(randomize_(timm.create_model(name, **kwargs))).eval()


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('name, kwargs', CASES)
def test_buffered_inference_matches_autograd_path(name, kwargs):
    """Without autograd a block writes into one buffer; with it, it concatenates. The same bits either way, and the
    numbers of timm's DenseNet's computation (`plain`: torch's batch norm on concatenated features)."""
    model = _model(name, **kwargs)
    x = torch.randn(2, 3, _size(name), _size(name))
    with torch.no_grad():
        fast = model(x)
    slow = model(x)  # parameters require grad: the concatenating path
    assert slow.requires_grad and not fast.requires_grad
    assert torch.equal(fast, slow.detach())
    plain = copy.deepcopy(model)
    for layer in plain.modules():
        if isinstance(layer, DenseLayer):  # timm's BatchNormAct2d: F.batch_norm, the same weights and statistics
            for key in ('norm1', 'norm2'):
                norm = getattr(layer, key)
                norm.__class__ = BatchNormAct2d
    with torch.no_grad():
        assert _rel(fast, plain(x)) <= 1e-5


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_buffered_path_only_where_it_is_exact(train):
    """The buffer is used without autograd and with per-element norms only (BatchNorm in eval, frozen BatchNorm);
    batch statistics over a strided channel slice would be reduced in another order than over the concatenation."""
    model = _model('densenet121', block_config=(2, 2, 2, 2)).train(train)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), OpCounter() as c:
        model(x)
    assert (c.counts.get('cat', 0) == 0) != train
    frozen = freeze_batch_norm_2d(copy.deepcopy(model)).train(train)
    with torch.no_grad(), OpCounter() as c:
        fast = frozen(x)
    assert c.counts.get('cat', 0) == 0
    assert torch.equal(fast, frozen(x).detach())


def test_buffered_path_avoids_concatenation():
    model = _model('densenet121')
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode(), OpCounter() as fast:
        model(x)
    with OpCounter() as slow:
        model(x)
    assert fast.counts.get('cat', 0) == 0
    assert slow.counts['cat'] == 58 + 4  # one per dense layer and one per block
    # frozen parameters count as no autograd too
    model.requires_grad_(False)
    with OpCounter() as frozen:
        model(x)
    assert frozen.counts.get('cat', 0) == 0


def test_transition_pools_before_its_convolution():
    """The 1x1 convolution runs at the pooled size: a quarter of the MACs of timm's order, the same output."""
    model = _model('densenet121')
    t = model.features.transition1
    x = torch.randn(2, 256, 16, 16)
    seen = []
    t.conv.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    with torch.no_grad():
        out = t(x)
        assert seen == [8]
        reference = t.pool(t.conv(t.norm(x)))
    assert _rel(out, reference) <= 1e-5


@pytest.mark.parametrize('name, kwargs', CASES)
def test_fused_matches_model(name, kwargs):
    model = _model(name, **kwargs)
    fused = fuse_for_inference(model)
    x = torch.randn(2, 3, _size(name), _size(name))
    with torch.no_grad():
        expected = model(x)
        assert _rel(fused(x), expected) <= 1e-4
        assert _rel(fused.forward_head(fused.forward_features(x), pre_logits=True),
                    model.forward_head(model.forward_features(x), pre_logits=True)) <= 1e-4
    assert not any(p.requires_grad for p in fused.parameters()) and not fused.training


@pytest.mark.parametrize('name', ['densenet121', 'densenetblur121d', 'densenet_bc_100_k12'])
def test_fused_torchscript(name):
    model = _model(name)
    fused = fuse_for_inference(model)
    scripted = torch.jit.script(fused)
    x = torch.randn(2, 3, _size(name), _size(name))
    with torch.no_grad():
        assert _rel(scripted(x), model(x)) <= 1e-4
    with pytest.raises(Exception, match='at least'):
        scripted(torch.randn(1, 3, 8, 8)) if _size(name) == 64 else scripted(torch.randn(1, 3, 2, 2))


def test_fused_torch_compile():
    model = _model('densenet121', block_config=(2, 2, 2, 2))
    fused = fuse_for_inference(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        compiled = torch.compile(fused, backend='aot_eager', fullgraph=True)
        assert _rel(compiled(x), model(x)) <= 1e-4


def test_fused_work_saved():
    """Folding leaves no batch norm, concatenation or separate activation pass before a 1x1 convolution."""
    model = _model('densenet121')
    fused = fuse_for_inference(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), OpCounter() as c:
        fused(x)
    assert c.counts.get('native_batch_norm', 0) + c.counts.get('_native_batch_norm_legit_no_training', 0) == 0
    assert c.counts.get('cat', 0) == 0
    assert c.counts.get('clamp', 0) + c.counts.get('clamp_min', 0) == 58 + 3  # one per dense layer and transition
    assert c.counts['convolution'] == 1 + 2 * 58 + 3


def test_fuse_for_inference_errors():
    with pytest.raises(TypeError, match='timm_densenet_ext DenseNet'):
        fuse_for_inference(nn.Conv2d(3, 3, 1))
    pruned = timm.create_model('densenet121')
    pruned.prune_intermediate_layers([1])
    with pytest.raises(ValueError, match='norm5'):
        fuse_for_inference(pruned)
    gelu = timm.create_model('densenet121', act_layer='gelu', block_config=(1, 1, 1, 1))
    with pytest.raises(ValueError, match='ReLU'):
        fuse_for_inference(gelu)
    assert isinstance(fuse_for_inference(timm.create_model('densenet121', block_config=(1, 1, 1, 1))),
                      FusedDenseNet)


def _step(model, x, target):
    """One forward and backward; the loss, every gradient and every buffer afterwards."""
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, {n: b.clone() for n, b in model.state_dict().items()}


@pytest.mark.parametrize('name', ['densenet121', 'densenetblur121d', 'densenet_bc_100_k12'])
def test_memory_efficient_same_gradients_and_statistics(name):
    torch.manual_seed(0)
    base = randomize_(timm.create_model(name, num_classes=10)).train()
    size = _size(name)
    x, target = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
    plain = copy.deepcopy(base)
    efficient = copy.deepcopy(base)
    efficient.set_grad_checkpointing(True)
    loss_a, grads_a, state_a = _step(plain, x, target)
    loss_b, grads_b, state_b = _step(efficient, x, target)
    assert torch.equal(loss_a, loss_b)
    worst = max(_rel(grads_b[k], grads_a[k]) for k in grads_a)
    assert worst <= 1e-4, worst
    for k in state_a:  # running statistics updated once, as without checkpointing
        assert torch.allclose(state_a[k].float(), state_b[k].float(), rtol=1e-6, atol=1e-7), k


def test_memory_efficient_does_not_recompute_convolutions():
    model = randomize_(timm.create_model('densenet121', memory_efficient=True)).train()
    x = torch.randn(2, 3, 64, 64)
    with OpCounter() as c:
        model(x).sum().backward()
    assert c.counts['convolution'] == 1 + 2 * 58 + 3  # each once, in forward
    assert c.counts['convolution_backward'] == 1 + 2 * 58 + 3


def _allocator_peak(fn):
    """Peak bytes held by torch's CPU allocator while `fn` runs (the profiler's allocation events, in order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def test_memory_efficient_halves_training_memory():
    """Activation memory of a training step: half of timm's built-in default or less (timm's checkpointing: ~0.6)."""
    import timm.models.densenet as timm_densenet
    x, target = torch.randn(2, 3, 96, 96), torch.randint(0, 1000, (2,))

    def peak(model):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():  # gradients kept allocated: the peak is what the activations need
            opt.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(x), target).backward()
            opt.step()
        step()
        return _allocator_peak(step)

    reference = peak(timm_densenet.densenet121())
    ours = peak(timm.create_model('densenet121', memory_efficient=True))
    assert ours <= 0.5 * reference, (ours / reference)
    assert peak(timm.create_model('densenet121')) <= 1.05 * reference


def test_memory_efficient_with_frozen_batchnorm_falls_back_to_selective_checkpointing():
    """BatchNorm in eval mode (fine-tuning with frozen statistics): torch's selective checkpointing, same gradients,
    convolutions still computed once."""
    torch.manual_seed(0)
    base = randomize_(timm.create_model('densenet121', num_classes=10, block_config=(2, 3, 2, 2))).eval()
    x, target = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    efficient = copy.deepcopy(base)
    efficient.set_grad_checkpointing(True)
    loss_a, grads_a, state_a = _step(copy.deepcopy(base), x, target)
    with OpCounter() as c:
        loss_b, grads_b, state_b = _step(efficient, x, target)
    assert torch.equal(loss_a, loss_b)
    assert max(_rel(grads_b[k], grads_a[k]) for k in grads_a) <= 1e-5
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert c.counts['convolution'] == 1 + 2 * 9 + 3
