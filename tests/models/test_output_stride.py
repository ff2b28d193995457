"""output_stride (dilation instead of downsampling) and feature_taps ('raw' or 'norm'), on shallow models."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import get_pretrained_cfg

import timm_densenet_ext
from timm_densenet_ext.models.fused import fuse_for_inference
from timm_densenet_ext.parity import randomize_

from hub_fixtures import add_weights_to_hub_cache

IMAGENET = [n for n in timm_densenet_ext.MODEL_NAMES if get_pretrained_cfg(n).input_size[-1] == 224]
SHALLOW = dict(block_config=(2, 2, 2, 2))
REDUCTIONS = {32: [2, 4, 8, 16, 32], 16: [2, 4, 8, 16, 16], 8: [2, 4, 8, 8, 8]}


def _model(name: str = 'densenet121', seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **dict(SHALLOW, **kwargs))


def _input(size: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('name', IMAGENET)
def test_same_parameters_and_keys_at_every_output_stride(name):
    ref = {k: v.shape for k, v in timm.create_model(name).state_dict().items()}
    for output_stride in (16, 8):
        model = timm.create_model(name, output_stride=output_stride)
        assert {k: v.shape for k, v in model.state_dict().items()} == ref
        assert [f['reduction'] for f in model.feature_info] == REDUCTIONS[output_stride]


def test_pretrained_weights_load_unchanged_at_output_stride_16(hub_cache):
    weights = randomize_(timm.create_model('densenet121'), 1).state_dict()
    add_weights_to_hub_cache(hub_cache, get_pretrained_cfg('densenet121').hf_hub_id, weights)
    model = timm.create_model('densenet121', pretrained=True, output_stride=16)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key


@pytest.mark.parametrize('output_stride', [16, 8])
@pytest.mark.parametrize('name', ['densenet121', 'densenetblur121d'])
def test_dilated_network_is_the_stride_32_network_computed_densely(name, output_stride):
    """A trous: every other pixel (every 4th at 8) of each dilated tap is the stride-32 network's tap exactly."""
    ref = randomize_(_model(name), 3).eval()
    model = _model(name, output_stride=output_stride).eval()
    model.load_state_dict(ref.state_dict())
    x = _input(96)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, intermediates_only=True)
        taps = model.forward_intermediates(x, intermediates_only=True)
    for tap, exp, reduction, ref_reduction in zip(taps, expected, REDUCTIONS[output_stride], REDUCTIONS[32]):
        k = ref_reduction // reduction
        assert tap.shape[-1] == 96 // reduction == exp.shape[-1] * k
        torch.testing.assert_close(tap[..., ::k, ::k], exp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('output_stride', [32, 16, 8])
def test_features_only_shapes_follow_output_stride(output_stride):
    x = _input(64)
    for feature_cls in ('list', 'getter', 'hook', 'fx'):
        fm = _model(features_only=True, feature_cls=feature_cls, output_stride=output_stride).eval()
        with torch.no_grad():
            out = fm(x)
        out = list(out.values()) if isinstance(out, dict) else out
        assert fm.feature_info.reduction() == REDUCTIONS[output_stride]
        assert [64 // t.shape[-1] for t in out] == REDUCTIONS[output_stride], feature_cls
        assert [t.shape[1] for t in out] == fm.feature_info.channels()


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_torchscript_and_fx_at_output_stride_8(train):
    from torchvision.models.feature_extraction import create_feature_extractor
    model = randomize_(_model(output_stride=8, num_classes=5)).train(train)
    x = _input(64)
    scripted = torch.jit.script(model)
    tap = model.feature_info[3]['module']
    traced = create_feature_extractor(model, {tap: 'tap', 'classifier': 'logits'})
    torch.manual_seed(0)
    expected = model(x)
    torch.manual_seed(0)
    torch.testing.assert_close(scripted(x), expected)
    out = traced(x)
    torch.testing.assert_close(out['logits'], expected)
    assert out['tap'].shape[-1] == 64 // 8
    if train:  # the gradients of scripted and eager copies of the same weights
        eager = copy.deepcopy(model)
        scripted = torch.jit.script(copy.deepcopy(model))
        grads = []
        for net in (eager, scripted):
            net(x).logsumexp(1).sum().backward()
            grads.append({n: p.grad for n, p in net.named_parameters()})
        assert sorted(grads[0]) == sorted(grads[1]) and len(grads[0]) > 0
        # relative to the largest gradient: a BatchNorm scale's gradient in training is a small difference of large
        # terms, which float32 gets to about 1e-3 of itself whichever way it is computed
        scale = max(g.abs().max().item() for g in grads[0].values())
        for n, g in grads[0].items():
            torch.testing.assert_close(grads[1][n], g, rtol=0, atol=1e-5 * scale, msg=n)


def test_memory_efficient_gradients_with_dilation():
    x = _input(64)
    grads = []
    for memory_efficient in (False, True):
        model = randomize_(_model(output_stride=8, num_classes=5, memory_efficient=memory_efficient)).train()
        model(x).logsumexp(1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize('output_stride', [16, 8])
def test_fused_model_at_output_stride(output_stride):
    model = randomize_(_model(output_stride=output_stride)).eval()
    x = _input(64)
    with torch.no_grad():
        torch.testing.assert_close(fuse_for_inference(model)(x), model(x), rtol=1e-4, atol=1e-4)


def test_bad_output_stride_and_blur_transitions():
    with pytest.raises(ValueError, match='output_stride must be 32, 16 or 8'):
        _model(output_stride=4)
    with pytest.raises(ValueError, match='aa_stem_only'):
        _model('densenetblur121d', aa_stem_only=False, output_stride=16)


# --- feature_taps ---------------------------------------------------------------------------------------------------

def test_norm_taps_are_the_transitions_bn_relu_of_the_raw_taps():
    model = randomize_(_model(feature_taps='norm')).eval()
    raw = randomize_(_model()).eval()
    x = _input(64)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        raw_taps = raw.forward_intermediates(x, intermediates_only=True)
        flagged = raw.forward_intermediates(x, norm=True, intermediates_only=True)
    assert [m['module'] for m in model.feature_info] == [
        'features.norm0', 'features.transition1.norm', 'features.transition2.norm', 'features.transition3.norm',
        'features.norm5']
    assert [t.shape for t in taps] == [t.shape for t in raw_taps]
    for i, (tap, r) in enumerate(zip(taps, raw_taps)):
        if i in (0, 4):  # stem and last taps are normalised either way
            assert torch.equal(tap, r)
        else:
            assert torch.equal(tap, getattr(raw.features, f'transition{i}').norm(r))
            assert (tap >= 0).all() and not torch.equal(tap, r)
        assert torch.equal(flagged[i], tap)  # forward_intermediates(norm=True) gives the same taps


def test_norm_taps_through_every_feature_class():
    """Models from one seed have the same weights, whatever wraps them."""
    x = _input(64)
    with torch.no_grad():
        expected = _model(feature_taps='norm').eval().forward_intermediates(x, intermediates_only=True)
    default = _model(features_only=True, feature_taps='norm')
    assert type(default).__name__ == 'FeatureGetterNet'
    for feature_cls in ('getter', 'hook', 'fx'):
        fm = _model(features_only=True, feature_taps='norm', feature_cls=feature_cls)
        assert fm.feature_info.channels() == [64, 128, 128, 128, 128]
        with torch.no_grad():
            out = fm.eval()(x)
        out = list(out.values()) if isinstance(out, dict) else out
        for a, b in zip(out, expected):
            torch.testing.assert_close(a, b, msg=feature_cls)
    for feature_cls in ('list', 'dict'):
        with pytest.raises(ValueError, match="feature_cls='getter'"):
            _model(features_only=True, feature_taps='norm', feature_cls=feature_cls)
    with pytest.raises(ValueError, match='feature_taps'):
        _model(feature_taps='relu')


def test_prune_keeps_the_norm_of_the_last_tap():
    x = _input(64)
    full = randomize_(_model()).eval()
    with torch.no_grad():
        expected = full.forward_intermediates(x, norm=True, intermediates_only=True)
    for prune_norm in (False, True):
        model = randomize_(_model()).eval()
        model.prune_intermediate_layers([1, 2], prune_norm=prune_norm)
        last = model.features[-1]
        assert isinstance(last, timm_densenet_ext.DenseTransition) != prune_norm
        if not prune_norm:  # the norm stays, the compression and pool go
            assert isinstance(last.conv, nn.Identity) and isinstance(last.pool, nn.Identity)
            with torch.no_grad():
                out = model.forward_intermediates(x, indices=[1, 2], norm=True, intermediates_only=True)
                assert torch.equal(model.forward_features(x), expected[2])
            assert torch.equal(out[0], expected[1]) and torch.equal(out[1], expected[2])
