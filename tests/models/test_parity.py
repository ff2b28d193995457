"""Exactness: same weights, same outputs as timm's built-in DenseNet and torchvision's (fp32, eval)."""
import pytest
import timm
import torch

from model_helpers import layout, legacy_tv_keys
from timm_densenet_ext.parity import compare, randomize_, reference_builders
from timm_densenet_ext.models import checkpoint_filter_fn

SHARED_WITH_TIMM = ['densenet121', 'densenet161', 'densenet169', 'densenet201', 'densenet264d',
                    'densenetblur121d', 'densenet121d']
TORCHVISION = ['tv_densenet121', 'tv_densenet161', 'tv_densenet169', 'tv_densenet201']


def _check(name, expected_refs, sizes=(64, 224)):
    results = compare(name, sizes)
    assert sorted(results) == sorted((ref, size) for ref in expected_refs for size in sizes)
    for (ref, size), r in results.items():
        assert r['same_keys'], f'{name}: state-dict keys differ from {ref}'
        assert r['max_abs_diff'] <= 1e-5 * r['scale'], f'{name} vs {ref} at {size}px: {r}'


@pytest.mark.parametrize('name', SHARED_WITH_TIMM)
def test_same_as_timm(name):
    refs = ['timm', 'torchvision'] if name in ('densenet121', 'densenet161', 'densenet169', 'densenet201') else ['timm']
    _check(name, refs)


def _network(name):
    with torch.device('meta'):
        return layout(timm.create_model(name))


@pytest.mark.parametrize('name', TORCHVISION)
def test_same_as_torchvision(name):
    """tv_densenetX is densenetX's network under torchvision's name: test_same_as_timm checks that network against
    timm and torchvision at both sizes, so here the smaller size suffices."""
    assert _network(name) == _network(name[3:])
    _check(name, ['timm', 'torchvision'], sizes=(64,))


def test_timm_reference_is_timms_class():
    import timm.models.densenet as timm_densenet
    import torchvision
    refs = reference_builders('tv_densenet121')
    assert type(refs['timm']()) is timm_densenet.DenseNet
    assert type(refs['torchvision']()) is torchvision.models.DenseNet


def test_legacy_torchvision_checkpoint_loads_via_pretrained(tmp_path):
    """Keys like 'denselayer1.norm.1.weight' and no num_batches_tracked, as torchvision's first release saved."""
    import torchvision
    source = randomize_(torchvision.models.densenet121(), seed=3).eval()
    legacy = legacy_tv_keys(source.state_dict())
    assert 'features.denseblock1.denselayer1.norm.1.weight' in legacy
    path = tmp_path / 'densenet121-legacy.pth'
    torch.save(legacy, path)

    model = timm.create_model(
        'tv_densenet121', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, expected = model(x), source(x)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_filter_maps_legacy_and_wrapped_keys():
    sd = {'module.features.denseblock2.denselayer3.conv.2.weight': torch.zeros(1),
          'features.norm5.weight': torch.ones(1)}
    out = checkpoint_filter_fn(sd)
    assert set(out) == {'features.denseblock2.denselayer3.conv2.weight', 'features.norm5.weight'}
