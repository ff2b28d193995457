"""Registration: our variants replace timm's cleanly, with the pretrained configs the issue specifies."""
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import timm_densenet_ext
from timm_densenet_ext import DenseNet
from timm_densenet_ext.stats import model_stats
from timm_densenet_ext.models.densenet import CIFAR100_MEAN, CIFAR100_STD

IMAGENET = ['densenet121', 'densenet161', 'densenet169', 'densenet201', 'densenet264d', 'densenetblur121d',
            'densenet121d', 'tv_densenet121', 'tv_densenet161', 'tv_densenet169', 'tv_densenet201']
CIFAR = ['densenet_bc_100_k12', 'densenet_bc_250_k24', 'densenet_bc_190_k40', 'densenet121_cifar']

HUB_WEIGHTS = {
    'densenet121.ra_in1k': 'timm/densenet121.ra_in1k',
    'densenetblur121d.ra_in1k': 'timm/densenetblur121d.ra_in1k',
    'densenet121.tv_in1k': 'timm/densenet121.tv_in1k',
    'densenet161.tv_in1k': 'timm/densenet161.tv_in1k',
    'densenet169.tv_in1k': 'timm/densenet169.tv_in1k',
    'densenet201.tv_in1k': 'timm/densenet201.tv_in1k',
    'tv_densenet121.tv_in1k': 'timm/densenet121.tv_in1k',
    'tv_densenet161.tv_in1k': 'timm/densenet161.tv_in1k',
    'tv_densenet169.tv_in1k': 'timm/densenet169.tv_in1k',
    'tv_densenet201.tv_in1k': 'timm/densenet201.tv_in1k',
}

# GUIDE section 2: timm 1.0.31's built-in DenseNet at 224x224
REFERENCE = {
    'densenet121': (7_978_856, 2.83, (64, 256, 512, 1024, 1024)),
    'densenet161': (28_681_000, 7.73, (96, 384, 768, 2112, 2208)),
    'densenet169': (14_149_480, 3.36, (64, 256, 512, 1280, 1664)),
    'densenet201': (20_013_928, 4.29, (64, 256, 512, 1792, 1920)),
    'densenet264d': (72_736_216, 13.47, (96, 384, 768, 3456, 4032)),
    'densenetblur121d': (7_998_088, 3.08, (64, 256, 512, 1024, 1024)),
}

# Huang et al. 2017, Table 2 (CIFAR-10 classifier): parameters in millions
PAPER_CIFAR = {'densenet_bc_100_k12': 0.8, 'densenet_bc_250_k24': 15.3, 'densenet_bc_190_k40': 25.6}


def test_every_name_is_registered_and_ours():
    assert sorted(timm_densenet_ext.MODEL_NAMES) == sorted(IMAGENET + CIFAR)
    for name in IMAGENET + CIFAR:
        assert timm.is_model(name)
        assert timm.models.model_entrypoint(name).__module__ == 'timm_densenet_ext.models.densenet'
        assert name in timm.list_models('*dense*')
    assert sorted(timm.list_models(module='densenet')) == sorted(IMAGENET + CIFAR)


def test_model_is_our_own_class_not_timms():
    import timm.models.densenet as timm_densenet
    model = timm.create_model('densenet121')
    assert type(model) is DenseNet
    assert not isinstance(model, timm_densenet.DenseNet)


def test_pretrained_tags_and_hub_ids():
    assert sorted(timm.list_pretrained('*dense*')) == sorted(HUB_WEIGHTS)
    for tagged, repo in HUB_WEIGHTS.items():
        cfg = timm.models.get_pretrained_cfg(tagged)
        assert cfg.hf_hub_id == repo, tagged
        assert cfg.architecture == tagged.split('.')[0]
    # the default tag of each architecture
    assert timm.models.get_pretrained_cfg('densenet121').tag == 'ra_in1k'
    assert timm.models.get_pretrained_cfg('tv_densenet121').hf_hub_id == 'timm/densenet121.tv_in1k'
    for name in ['densenet264d', 'densenet121d'] + CIFAR:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.tag == 'untrained' and not cfg.has_weights, name
        assert not timm.models.is_model_pretrained(name)


def test_ra_weights_have_test_size():
    for name in ['densenet121.ra_in1k', 'densenetblur121d.ra_in1k']:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.test_input_size == (3, 288, 288) and cfg.test_crop_pct == 0.95


@pytest.mark.parametrize('name', IMAGENET)
def test_imagenet_cfg(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224) and cfg['crop_pct'] == 0.875 and cfg['interpolation'] == 'bicubic'
    assert cfg['mean'] == IMAGENET_DEFAULT_MEAN and cfg['std'] == IMAGENET_DEFAULT_STD
    assert cfg['num_classes'] == model.num_classes == 1000 and cfg['license']
    assert isinstance(model.get_submodule(cfg['first_conv']), torch.nn.Conv2d)
    assert model.get_submodule(cfg['classifier']) is model.get_classifier()


@pytest.mark.parametrize('name', CIFAR)
def test_cifar_cfg(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 32, 32) and cfg['crop_pct'] == 1.0
    assert cfg['mean'] == CIFAR100_MEAN and cfg['std'] == CIFAR100_STD
    assert model.num_classes == 100 and model.get_classifier().out_features == 100
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    assert isinstance(model.get_submodule(cfg['first_conv']), torch.nn.Conv2d)


@pytest.mark.parametrize('name', sorted(REFERENCE))
def test_reference_figures(name):
    """timm's figures, except that our transitions pool before their 1x1 convolution (a quarter of its MACs)."""
    params, gmacs, channels = REFERENCE[name]
    stats = model_stats(name)
    assert stats.params == params
    with torch.device('meta'):
        model = timm.create_model(name)
    transition_macs = []
    for n, m in model.features.named_children():
        if n.startswith('transition'):
            m.conv.register_forward_hook(
                lambda mod, i, o: transition_macs.append(o.shape[1:].numel() * mod.in_channels))
    with torch.device('meta'):
        model(torch.empty(1, 3, 224, 224))
    assert len(transition_macs) == 3
    assert round(stats.gmacs + 3 * sum(transition_macs) / 1e9, 2) == gmacs  # timm's order: 4x at the unpooled size
    with torch.device('meta'):
        model = timm.create_model(name, features_only=True)
    assert tuple(model.feature_info.channels()) == channels
    assert tuple(model.feature_info.reduction()) == (2, 4, 8, 16, 32)


@pytest.mark.parametrize('name', sorted(PAPER_CIFAR))
def test_cifar_paper_sizes(name):
    with torch.device('meta'):
        model = timm.create_model(name, num_classes=10)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(params, 1) == PAPER_CIFAR[name], params  # the paper gives one decimal
    assert len(model.features.denseblock1) == (int(name.split('_')[2]) - 4) // 6
    assert not hasattr(model.features, 'pool0')
    assert model.features.transition1.conv.out_channels == model.features.transition1.conv.in_channels // 2


def test_densenet121_cifar_layout():
    model = timm.create_model('densenet121_cifar')
    conv0 = model.features.conv0
    assert conv0.kernel_size == (3, 3) and conv0.stride == (1, 1) and conv0.out_channels == 64
    assert [len(model.features.get_submodule(f'denseblock{i}')) for i in range(1, 5)] == [6, 12, 24, 16]
    assert model.feature_info[-1]['reduction'] == 8
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 1024, 4, 4)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_import_takes_over_silently():
    result = _run('''
        import warnings
        warnings.simplefilter('always')
        with warnings.catch_warnings(record=True) as caught:
            import timm, timm_densenet_ext
            for name in ['tv_densenet121', 'densenet121', 'densenet121d']:
                timm.create_model(name)
        # timm's registry warnings: 'Overwriting NAME in registry ...', 'Mapping deprecated model name ...'
        print('WARNINGS', [str(w.message) for w in caught if 'densenet' in str(w.message).lower()
                           or 'in registry' in str(w.message) or 'deprecated model name' in str(w.message)])
        print('DEPRECATED', timm.models._registry._deprecated_models.get('tv_densenet121', 'none'))
    ''')
    assert result.returncode == 0, result.stderr
    assert 'WARNINGS []' in result.stdout
    assert 'DEPRECATED none' in result.stdout
    assert 'Overwriting' not in result.stderr and 'deprecated model name' not in result.stderr


def test_works_on_timm_without_densenets():
    result = _run('''
        import sys, types
        stub = types.ModuleType('timm.models.densenet')
        stub.__all__ = []
        sys.modules['timm.models.densenet'] = stub   # a timm that ships no DenseNet
        import timm
        assert not timm.list_models('*densenet*'), timm.list_models('*densenet*')
        import timm_densenet_ext
        names = timm.list_models('*densenet*')
        model = timm.create_model('densenetblur121d', num_classes=3)
        import torch
        print(len(names), tuple(model(torch.randn(1, 3, 64, 64)).shape), timm.list_models(module='densenet') == names)
    ''')
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['15', '(1,', '3)', 'True']
