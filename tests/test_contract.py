"""timm's model contract (GUIDE section 2) for every registered variant, on small inputs.

The per-variant checks run on each variant's layout with two layers per block (`_shallow`): the same stem, growth,
compression, pooling and code paths, and the same feature taps and reductions, at a fraction of the cost. Variants
whose shallow models are identical (densenet121/169/201 and their tv_ twins differ only in depth) are checked once
(`SHALLOW`); tracing, scripting and compiling, whose cost is per layer, run once per code path (`PATHS`: the variants
left out differ from one of these only in channel counts). One variant, densenet121, is also checked at its full
depth; full-depth forward passes of every variant are in test_parity and test_registry.
"""
import pytest
import timm
import torch
import torch.nn as nn
from timm.models import group_parameters

import timm_densenet_ext
from model_helpers import distinct_shallow, shallow
from timm_densenet_ext.parity import randomize_

NAMES = list(timm_densenet_ext.MODEL_NAMES)
POOLS = ['avg', 'max', 'avgmax', 'catavgmax', '']


def _size(name: str) -> int:
    return 32 if timm.models.get_pretrained_cfg(name).input_size[-1] == 32 else 64


def _input(name: str, batch: int = 1, in_chans: int = 3) -> torch.Tensor:
    size = _size(name)
    return torch.randn(batch, in_chans, size, size, generator=torch.Generator().manual_seed(0))


def _shallow(name: str) -> dict:
    """Same stem, growth, pooling and code paths, two layers per block: cheap to compile, export and backprop."""
    return shallow(name)


SHALLOW = distinct_shallow(NAMES, _size)
# one variant per code path (stem, blur, block count): the others differ from one of these only in channel counts
PATHS = distinct_shallow(NAMES, _size, channels=False)
FULL = 'densenet121'
# (variant, full depth): every distinct shallow variant, or one per code path, and densenet121 as registered
CASES = [pytest.param(name, False, id=name) for name in SHALLOW] + [pytest.param(FULL, True, id=f'{FULL}-full')]
PATH_CASES = [pytest.param(name, False, id=name) for name in PATHS] + [pytest.param(FULL, True, id=f'{FULL}-full')]


def _seeded(name: str, full: bool = True, **kwargs) -> nn.Module:
    """The same weights every time: models built from one seed are identical, whatever wraps them."""
    torch.manual_seed(0)
    return timm.create_model(name, **(kwargs if full else dict(_shallow(name), **kwargs)))


@pytest.fixture(scope='module')
def models():
    """One eval-mode model per (variant, full depth), built once for the module from `_seeded`."""
    cache = {}

    def get(name, full):
        if (name, full) not in cache:
            cache.clear()  # keep one model alive at a time
            cache[name, full] = _seeded(name, full).eval()
        return cache[name, full]
    return get


@pytest.mark.parametrize('name, full', CASES)
def test_forward_features_head(name, full, models):
    model = models(name, full)
    x = _input(name)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
        pre = model.forward_head(feats, pre_logits=True)
    last = model.feature_info[-1]
    assert feats.shape == (1, model.num_features, _size(name) // last['reduction'], _size(name) // last['reduction'])
    assert model.num_features == last['num_chs']
    assert logits.shape == (1, model.num_classes)
    assert pre.shape == (1, model.head_hidden_size)
    assert torch.equal(model.forward_head(feats), logits)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize('pool', POOLS)
def test_global_pool_and_num_classes(pool):
    for name in ('densenet121', 'densenet_bc_100_k12'):
        x = _input(name)
        model = timm.create_model(name, num_classes=0, global_pool=pool).eval()
        feat_mult = 2 if pool == 'catavgmax' else 1
        out = model(x)
        if pool:
            assert out.shape == (1, model.num_features * feat_mult) == (1, model.head_hidden_size)
        else:
            assert out.ndim == 4 and out.shape[1] == model.num_features
        model = timm.create_model(name, num_classes=7, global_pool=pool or 'avg').eval()
        assert model(x).shape == (1, 7)


@pytest.mark.parametrize('name, full', CASES)
def test_reset_classifier(name, full, models):
    model = models(name, full)
    x = _input(name)
    with torch.no_grad():
        feats = model.forward_features(x)
    model_copy = _seeded(name, full).eval()
    model_copy.reset_classifier(10)
    assert model_copy(x).shape == (1, 10) and model_copy.get_classifier().out_features == 10
    model_copy.reset_classifier(0, 'catavgmax')
    assert isinstance(model_copy.get_classifier(), nn.Identity)
    assert model_copy.head_hidden_size == 2 * model_copy.num_features
    out = model_copy(x)
    assert out.shape == (1, 2 * model.num_features)
    assert torch.allclose(out[:, :model.num_features], feats.mean((2, 3)), atol=1e-5)


@pytest.mark.parametrize('name', ['densenet121', 'densenetblur121d', 'densenet_bc_100_k12'])
def test_in_chans_and_drop_rate(name):
    model = timm.create_model(name, in_chans=1, drop_rate=0.5, proj_drop_rate=0.1)
    assert model.features.conv0.in_channels == 1
    out_train = model.train()(_input(name, in_chans=1))
    assert out_train.shape == (1, model.num_classes)
    model.eval()
    x = _input(name, in_chans=1)
    assert torch.equal(model(x), model(x))  # dropout off in eval


@pytest.mark.parametrize('name', NAMES)
def test_group_matcher_covers_every_parameter(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    for coarse in (False, True):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        grouped = [p for names in groups.values() for p in names]
        assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())
        assert len(groups) > 3


@pytest.mark.parametrize('feature_cls', ['list', 'dict', 'getter', 'hook', 'fx'])
@pytest.mark.parametrize('name, full', CASES)
def test_features_only(name, full, feature_cls, models):
    n_taps = len(models(name, full).feature_info)
    out_indices = tuple(range(n_taps))
    fm = _seeded(name, full, features_only=True, feature_cls=feature_cls, out_indices=out_indices).eval()
    x = _input(name)
    with torch.no_grad():
        out = fm(x)
    out = list(out.values()) if isinstance(out, dict) else out
    assert len(out) == n_taps
    assert [t.shape[1] for t in out] == fm.feature_info.channels()
    assert [x.shape[-1] // t.shape[-1] for t in out] == fm.feature_info.reduction()
    # same maps as forward_intermediates of the classifier model
    with torch.no_grad():
        ref = models(name, full).forward_intermediates(x, intermediates_only=True)
    for a, b in zip(out, ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', ['densenet121', 'densenet264d', 'densenet_bc_100_k12', 'densenet121_cifar'])
def test_features_only_out_indices(name):
    fm = timm.create_model(name, features_only=True, out_indices=(1, -1))
    out = fm(_input(name))
    assert len(out) == 2 and [t.shape[1] for t in out] == fm.feature_info.channels()
    assert fm.feature_info.channels()[-1] == timm.create_model(name).num_features


@pytest.mark.parametrize('name, full', CASES)
def test_forward_intermediates(name, full, models):
    model = models(name, full)
    x = _input(name)
    n = len(model.feature_info)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [t.shape[1] for t in inter] == [f['num_chs'] for f in model.feature_info]
        assert [x.shape[-1] // t.shape[-1] for t in inter] == [f['reduction'] for f in model.feature_info]
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(last2) == 2 and torch.equal(last2[-1], inter[-1])
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        assert torch.equal(early[1], inter[1])
        _, neg = model.forward_intermediates(x, indices=[-1])
        assert torch.equal(neg[0], inter[n - 1])
    with pytest.raises(Exception):
        model.forward_intermediates(x, indices=[n])


@pytest.mark.parametrize('name', ['densenet121', 'densenetblur121d', 'densenet_bc_100_k12', 'densenet121_cifar'])
def test_prune_intermediate_layers(name, models):
    model = _seeded(name).eval()
    x = _input(name)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
    kept = model.prune_intermediate_layers(indices=[1, 2])
    assert kept == [1, 2]
    assert isinstance(model.get_classifier(), nn.Identity)
    with torch.no_grad():
        pruned = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        feats = model.forward_features(x)
    assert torch.equal(pruned[0], full[1]) and torch.equal(pruned[1], full[2])
    assert feats.shape[1] == model.num_features == model.feature_info[2]['num_chs']
    with torch.no_grad():
        assert torch.equal(model(x), feats)  # as timm: the pruned head neither pools nor classifies


@pytest.mark.parametrize('name, full', PATH_CASES)
def test_torchscript(name, full, models):
    model = models(name, full)
    x = _input(name)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5, rtol=1e-5)
        _, inter = scripted.forward_intermediates(x)
        assert len(inter) == len(model.feature_info)
    scripted.train()
    out = scripted(x)
    out.sum().backward()


@pytest.mark.parametrize('name, full', PATH_CASES)
def test_fx(name, full, models):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    model = models(name, full)
    x = _input(name)
    tap = model.feature_info[1]['module']
    train_nodes, eval_nodes = get_graph_node_names(model)
    for nodes in (train_nodes, eval_nodes):
        assert 'check_input' in nodes  # the input check is one traced node, not traced through
        assert any(n.startswith(tap + '.') for n in nodes)  # a module name selects its last node
    extractor = create_feature_extractor(model, {tap: 'tap', 'classifier': 'logits'})
    with torch.no_grad():
        out = extractor(x)
        assert torch.equal(out['logits'], model(x))
        assert out['tap'].shape[1] == model.feature_info[1]['num_chs']
    # the traced graph keeps the input check
    bad = torch.randn(1, model.in_chans + 1, _size(name), _size(name))
    with pytest.raises(ValueError):
        extractor(bad)


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('name', PATHS)
def test_torch_export(name, train):
    model = randomize_(timm.create_model(name, **_shallow(name))).train(train)
    x = _input(name)
    exported = torch.export.export(model, (x,))
    reference = timm.create_model(name, **_shallow(name))
    reference.load_state_dict(model.state_dict())
    reference.train(train)
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('name', PATHS)
def test_torch_compile(name, train):
    torch._dynamo.reset()
    model = randomize_(timm.create_model(name, **_shallow(name))).train(train)
    x = _input(name)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    out = compiled(x)
    if train:
        out.sum().backward()
        assert model.features.conv0.weight.grad is not None
    reference = timm.create_model(name, **_shallow(name))
    reference.load_state_dict(model.state_dict())
    reference.train(train)
    if not train:
        with torch.no_grad():
            assert torch.allclose(out, reference(x), atol=1e-5, rtol=1e-5)


def test_torch_compile_inductor():
    """The default backend, generating and running C++ kernels, on the smallest variant."""
    torch._dynamo.reset()
    model = randomize_(timm.create_model('densenet_bc_100_k12', **_shallow('densenet_bc_100_k12'))).eval()
    x = _input('densenet_bc_100_k12')
    with torch.no_grad():
        assert torch.allclose(torch.compile(model)(x), model(x), atol=1e-4, rtol=1e-4)


def _grads_and_stats(name, checkpointing, seed=0):
    model = randomize_(timm.create_model(name, **_shallow(name)), seed=seed).train()
    model.set_grad_checkpointing(checkpointing)
    x = _input(name, batch=2)
    loss = model(x).logsumexp(1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return loss.detach(), grads, buffers


@pytest.mark.parametrize('name', SHALLOW)
def test_grad_checkpointing_same_gradients(name):
    loss_a, grads_a, stats_a = _grads_and_stats(name, checkpointing=False)
    loss_b, grads_b, stats_b = _grads_and_stats(name, checkpointing=True)
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for key in grads_a:
        assert torch.allclose(grads_a[key], grads_b[key], rtol=1e-4, atol=1e-6), key
    # recomputation in backward must not update BatchNorm running statistics a second time
    for key in stats_a:
        assert torch.equal(stats_a[key], stats_b[key]), key


def test_grad_checkpointing_full_depth_and_memory_efficient_arg():
    model = timm.create_model('densenet121', memory_efficient=True)
    layers = [m for m in model.modules() if isinstance(m, timm_densenet_ext.DenseLayer)]
    assert len(layers) == 58 and all(m.grad_checkpointing for m in layers)
    model.set_grad_checkpointing(False)
    assert not any(m.grad_checkpointing for m in layers)
    model.set_grad_checkpointing(True)
    model.train()(_input('densenet121', batch=2)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('name, full', CASES)
def test_bad_input_raises_value_error(name, full, models):
    model = models(name, full)
    size = _size(name)
    with pytest.raises(ValueError, match=r'expects images with 3 channels.*in_chans=1'):
        model(torch.randn(1, 1, size, size))
    with pytest.raises(ValueError, match='batch of images'):
        model(torch.randn(3, size, size))
    smallest = model.min_input_size
    with pytest.raises(ValueError, match=f'at least {smallest}x{smallest} pixels'):
        model(torch.randn(1, 3, smallest - 1, smallest + 10))
    with pytest.raises(ValueError, match=f'at least {smallest}x{smallest}'):
        model.forward_intermediates(torch.randn(1, 3, smallest + 10, smallest - 1))
    with torch.no_grad():
        assert model(torch.randn(1, 3, smallest, smallest)).shape == (1, model.num_classes)


@pytest.mark.parametrize('name', ['densenet121', 'densenetblur121d', 'densenet264d'])
def test_min_input_size_matches_timms_limit(name):
    """Our minimum is exactly where timm's own DenseNet stops working, not a guess."""
    from timm_densenet_ext.parity import reference_builders
    reference = reference_builders(name)['timm']().eval()
    smallest = timm.create_model(name).min_input_size
    with torch.no_grad():
        reference(torch.randn(1, 3, smallest, smallest))
        with pytest.raises(RuntimeError):
            reference(torch.randn(1, 3, smallest - 1, smallest - 1))


def test_scripted_model_checks_input():
    scripted = torch.jit.script(timm.create_model('densenet_bc_100_k12', **_shallow('densenet_bc_100_k12')).eval())
    with pytest.raises(Exception, match='expects images with 3 channels'):
        scripted(torch.randn(1, 4, 32, 32))
