"""Loading through timm's real loaders, offline: the Hub cache, local-dir: and hf-hub: folders, torchvision files."""
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from timm.models import adapt_input_conv

import timm_densenet_ext  # noqa: F401  (registers the variants)
from hub_fixtures import add_to_hub_cache, add_weights_to_hub_cache
from model_helpers import assert_same_tensors, legacy_tv_keys, trained
from timm_densenet_ext.hub import convert_checkpoint

SMALL = 'densenet_bc_100_k12'
REPO = 'me/bc10'








def test_cached_hub_weights_load_through_pretrained_true(hub_cache):
    """A real huggingface_hub cache holding timm/densenetblur121d.ra_in1k: pretrained=True loads exactly it."""
    source = trained(timm.create_model('densenetblur121d'))
    add_weights_to_hub_cache(hub_cache, 'timm/densenetblur121d.ra_in1k', source.state_dict())
    model = timm.create_model('densenetblur121d', pretrained=True)
    assert_same_tensors(model.state_dict(), source.state_dict())


def test_offline_without_a_cache_names_the_repository_and_the_way_out(hub_cache):
    with pytest.raises(FileNotFoundError) as raised:
        timm.create_model('densenet121', pretrained=True)
    message = str(raised.value)
    assert isinstance(raised.value, LocalEntryNotFoundError)
    assert isinstance(raised.value.__cause__, LocalEntryNotFoundError)  # huggingface_hub's own error, chained
    assert ('pretrained weights for densenet121 are in the Hugging Face Hub repository timm/densenet121.ra_in1k'
            in message)
    assert str(hub_cache) in message and 'HF_HUB_OFFLINE is set' in message
    assert 'unset HF_HUB_OFFLINE' in message
    assert "pretrained_cfg_overlay=dict(file='path/to/model.safetensors')" in message
    # a model without pretrained weights is built offline as before
    assert timm.create_model(SMALL).num_classes == 100


def test_legacy_torchvision_file_loads_through_pretrained_cfg_overlay(tmp_path):
    """An old torchvision .pth ('denselayer1.norm.1.weight', no num_batches_tracked) gives torchvision's outputs."""
    import torchvision
    tv = trained(torchvision.models.densenet121())
    legacy = legacy_tv_keys(tv.state_dict())
    assert 'features.denseblock4.denselayer16.conv.2.weight' in legacy
    path = tmp_path / 'densenet121-a639ec97.pth'
    torch.save(legacy, path, _use_new_zipfile_serialization=False)

    model = timm.create_model('densenet121', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    expected = {k: v for k, v in tv.state_dict().items() if not k.endswith('num_batches_tracked')}
    assert_same_tensors({k: v for k, v in model.state_dict().items() if k in expected}, expected)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """A 10-class CIFAR DenseNet-BC, its outputs for a batch, and the folder `convert` made of its checkpoint."""
    tmp = tmp_path_factory.mktemp('loading')
    source = trained(timm.create_model(SMALL, num_classes=10))
    torch.save({'state_dict': source.state_dict(), 'epoch': 1}, tmp / 'checkpoint.pth.tar')
    folder = convert_checkpoint(tmp / 'checkpoint.pth.tar', SMALL, tmp / 'bc10', repo_id=REPO)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = source(x)
    return source, folder, x, out


def _cache_as_pushed(cache: Path, folder: Path) -> None:
    add_to_hub_cache(cache, REPO, {p.name: p for p in folder.iterdir()})


def test_converted_folder_loads_through_local_dir(converted):
    source, folder, x, out = converted
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert (model.num_classes, model.pretrained_cfg['input_size']) == (10, (3, 32, 32))
    assert_same_tensors(model.state_dict(), source.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), out)


def test_pushed_folder_loads_through_hf_hub(converted, hub_cache):
    source, folder, x, out = converted
    _cache_as_pushed(hub_cache, folder)
    model = timm.create_model(f'hf-hub:{REPO}', pretrained=True).eval()
    assert model.pretrained_cfg['hf_hub_id'] == REPO and model.num_classes == 10
    assert_same_tensors(model.state_dict(), source.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), out)


@pytest.mark.parametrize('source_kind', ['local-dir', 'hf-hub'])
def test_other_num_classes_reinitialises_the_classifier(converted, hub_cache, source_kind):
    source, folder, x, _ = converted
    _cache_as_pushed(hub_cache, folder)
    name = f'local-dir:{folder}' if source_kind == 'local-dir' else f'hf-hub:{REPO}'
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=True, num_classes=4).eval()
    assert model.num_classes == 4 and model.classifier.weight.shape == (4, source.num_features)
    assert not torch.equal(model.classifier.weight, source.classifier.weight[:4])
    assert_same_tensors(model.state_dict(), {
        **source.state_dict(), 'classifier.weight': model.classifier.weight, 'classifier.bias': model.classifier.bias})
    # the features are the checkpoint's: only the classifier is new
    with torch.no_grad():
        assert torch.equal(model.forward_head(model.forward_features(x), pre_logits=True),
                           source.forward_head(source.forward_features(x), pre_logits=True))
    headless = timm.create_model(name, pretrained=True, num_classes=0).eval()
    assert 'classifier.weight' not in headless.state_dict()


@pytest.mark.parametrize('source_kind', ['local-dir', 'hf-hub'])
def test_one_input_channel_sums_the_first_conv(converted, hub_cache, source_kind):
    source, folder, x, _ = converted
    _cache_as_pushed(hub_cache, folder)
    name = f'local-dir:{folder}' if source_kind == 'local-dir' else f'hf-hub:{REPO}'
    model = timm.create_model(name, pretrained=True, in_chans=1).eval()
    conv0 = source.state_dict()['features.conv0.weight']
    expected = adapt_input_conv(1, conv0)
    assert model.features.conv0.weight.shape == (conv0.shape[0], 1, *conv0.shape[2:])
    torch.testing.assert_close(model.features.conv0.weight, conv0.sum(dim=1, keepdim=True))
    assert_same_tensors(model.state_dict(), {**source.state_dict(), 'features.conv0.weight': expected})
    with torch.no_grad():  # a gray image gives the 3-channel model's output for that image repeated in RGB
        gray = x[:, :1]
        torch.testing.assert_close(model(gray), source(gray.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('model_name, kwargs, expected', [
    ('densenet121', dict(pretrained=True), 'timm/densenet121.ra_in1k'),  # the default tag
    ('densenet121.tv_in1k', dict(pretrained=True), 'timm/densenet121.tv_in1k'),
    ('tv_densenet121', dict(pretrained=True), 'timm/densenet121.tv_in1k'),  # a tag sharing another's repository
    ('hf-hub:acme/pets', {}, 'acme/pets'),
    ('densenet121', {}, None),  # random initialisation
    ('densenet121', dict(weights='model.pth'), None),  # a file: no repository known
    ('local-dir:some/folder', {}, None),
])
def test_weights_repo_id_is_the_repository_pretrained_loads(model_name, kwargs, expected, hub_cache):
    from timm_densenet_ext.loading import weights_repo_id
    assert weights_repo_id(model_name, **kwargs) == expected
    if expected and kwargs.get('pretrained'):  # the repository timm's own loader downloads from (here: the cache)
        source = trained(timm.create_model(model_name))
        add_weights_to_hub_cache(hub_cache, expected, source.state_dict())
        assert_same_tensors(timm.create_model(model_name, pretrained=True).state_dict(), source.state_dict())
