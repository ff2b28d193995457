"""timm's model contract (GUIDE section 2) for every registered variant, on small inputs.

The per-variant checks run on each variant's layout with two layers per block (`_shallow`): the same stem, growth,
compression, pooling and code paths, and the same feature taps and reductions, at a fraction of the cost. Variants
whose shallow models are identical (densenet121/169/201 and their tv_ twins differ only in depth) are checked once
(`SHALLOW`); tracing, scripting and compiling, whose cost is per layer, run once per code path (`PATHS`: the variants
left out differ from one of these only in channel counts). One variant, densenet121, is also checked at its full
depth; full-depth forward passes of every variant are in test_parity and test_registry.
"""
import copy
from typing import Dict, Optional

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
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


# the grad modes inference code and training code run in
GRAD_MODES = {'grad': torch.enable_grad, 'no_grad': torch.no_grad, 'inference': torch.inference_mode}


def _flat(out) -> list:
    """The tensors of an output (a tensor, a list or tuple of them, nested, or a dict), in order, detached and copied:
    comparable outside the grad mode they were made in."""
    if isinstance(out, torch.Tensor):
        return [out.detach().clone()]
    values = out.values() if isinstance(out, dict) else out
    return [t for v in values for t in _flat(v)]


def _assert_equal(actual: list, expected: list, what: str) -> None:
    assert len(actual) == len(expected) > 0, what
    for i, (a, b) in enumerate(zip(actual, expected)):
        assert a.shape == b.shape and torch.equal(a, b), f'{what}, tensor {i}: max diff {(a - b).abs().max()}'


def _assert_close(actual: list, expected: list, what: str, rtol: float = 1e-5) -> None:
    """Equal to `rtol` of each expected tensor's largest magnitude."""
    assert len(actual) == len(expected) > 0, what
    for i, (a, b) in enumerate(zip(actual, expected)):
        assert a.shape == b.shape, what
        assert (a - b).abs().max() <= rtol * b.abs().max(), f'{what}, tensor {i}: max diff {(a - b).abs().max()}'


def _copy_features(dst: nn.Module, src: nn.Module) -> None:
    """Load `src`'s feature weights (all but the head) into a features_only model, whose keys are renamed."""
    head = set(src.get_classifier().state_dict(prefix='classifier.'))
    values = [v for k, v in src.state_dict().items() if k not in head]
    keys = list(dst.state_dict())
    assert len(keys) == len(values)
    dst.load_state_dict(dict(zip(keys, values)))


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
        with torch.no_grad():
            out = model(x)
            feats = model.forward_features(x)
        if pool:
            assert out.shape == (1, model.num_features * feat_mult) == (1, model.head_hidden_size)
        else:
            assert out.ndim == 4 and out.shape[1] == model.num_features
        avg, mx = feats.mean((2, 3)), feats.amax((2, 3))
        expected = {'avg': avg, 'max': mx, 'avgmax': (avg + mx) / 2, 'catavgmax': torch.cat([avg, mx], 1), '': feats}
        assert torch.allclose(out, expected[pool], rtol=1e-5, atol=1e-6), pool
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
    model = randomize_(_seeded(name, False, in_chans=1, drop_rate=0.5, proj_drop_rate=0.1))
    assert model.features.conv0.in_channels == 1
    x = _input(name, batch=2, in_chans=1)
    assert model.train()(x).shape == (2, model.num_classes)
    # eval: no dropout anywhere, the outputs of the same weights without dropout
    undropped = _seeded(name, False, in_chans=1)
    undropped.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model.eval()(x), undropped.eval()(x))


def test_drop_rate_is_timms_head_dropout():
    """drop_rate: inverted dropout of the pooled features in training, as timm's DenseNet's head applies it."""
    import timm.models.densenet as timm_densenet
    model = randomize_(_seeded('densenet121', False, drop_rate=0.5)).train()
    reference = timm_densenet.DenseNet(block_config=(2, 2, 2, 2), drop_rate=0.5).train()
    reference.load_state_dict(model.state_dict())
    feats = torch.randn(4, model.num_features, 2, 2).relu()
    pooled = feats.mean((2, 3))
    for seed in range(2):
        torch.manual_seed(seed)
        out = model.forward_head(feats, pre_logits=True)
        torch.manual_seed(seed)
        assert torch.equal(out, reference.forward_head(feats, pre_logits=True))
        kept = out != 0
        assert torch.allclose(out[kept], 2 * pooled[kept])  # the survivors scaled by 1 / (1 - p)
        assert 0.4 < 1 - kept[pooled != 0].float().mean() < 0.6  # about half dropped
    torch.manual_seed(0)
    logits = model.forward_head(feats)
    torch.manual_seed(0)
    assert torch.equal(logits, reference.forward_head(feats))
    with torch.no_grad():
        assert torch.equal(model.eval().forward_head(feats, pre_logits=True), pooled)


def test_proj_drop_rate_drops_inside_the_blocks_in_training_only():
    """proj_drop_rate: dropout after each dense layer. In training the output depends on the random stream (batch
    statistics do not), without it it does not; in eval it is the model without dropout."""
    model = randomize_(_seeded('densenet_bc_100_k12', False, proj_drop_rate=0.2)).train()
    plain = _seeded('densenet_bc_100_k12', False).train()
    plain.load_state_dict(model.state_dict())
    x = _input('densenet_bc_100_k12', batch=2)
    outs = {}
    for seed in (0, 0, 1):
        for net, key in ((model, 'drop'), (plain, 'plain')):
            torch.manual_seed(seed)
            with torch.no_grad():
                outs.setdefault(key, []).append(net(x))
    assert torch.equal(outs['drop'][0], outs['drop'][1]) and not torch.equal(outs['drop'][0], outs['drop'][2])
    assert torch.equal(outs['plain'][0], outs['plain'][2])
    assert not torch.equal(outs['drop'][0], outs['plain'][0])
    plain.load_state_dict(model.state_dict())  # the running statistics that training with dropout left
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))


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


@pytest.mark.parametrize('name', NAMES)
def test_features_only_defaults_to_every_tap(name):
    """timm's default out_indices ask for five maps; a DenseNet has one per dense block and one for its stem (four for
    the CIFAR DenseNet-BC's three blocks). With no out_indices, every variant returns all of its taps."""
    model = randomize_(_seeded(name, False)).eval()
    blocks = sum(n.startswith('denseblock') for n, _ in model.features.named_children())
    fm = timm.create_model(name, features_only=True, **_shallow(name)).eval()
    _copy_features(fm, model)
    x = _input(name)
    with torch.no_grad():
        out = fm(x)
        expected = model.forward_intermediates(x, intermediates_only=True)
    assert len(out) == blocks + 1 == len(fm.feature_info.channels())
    assert [t.shape[1] for t in out] == fm.feature_info.channels()
    assert [x.shape[-1] // t.shape[-1] for t in out] == fm.feature_info.reduction()
    _assert_close(out, expected, name)  # not bit for bit: timm's feature wrapper convolves NCHW, the model NHWC


@pytest.mark.parametrize('feature_cls', ['getter', 'hook', 'fx'])
@pytest.mark.parametrize('name', ['densenet_bc_100_k12', 'densenet121'])
def test_features_only_defaults_for_every_feature_class(name, feature_cls):
    model = randomize_(_seeded(name, False)).eval()
    fm = timm.create_model(name, features_only=True, feature_cls=feature_cls, **_shallow(name)).eval()
    _copy_features(fm, model)
    x = _input(name)
    with torch.no_grad():
        out = _flat(fm(x))
        expected = model.forward_intermediates(x, intermediates_only=True)
    assert len(out) == len(model.feature_info) == len(fm.feature_info.channels())
    assert [t.shape[1] for t in out] == fm.feature_info.channels()
    assert [x.shape[-1] // t.shape[-1] for t in out] == fm.feature_info.reduction()
    _assert_close(out, expected, feature_cls)


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


def _train_step(model: nn.Module, x: torch.Tensor, wrapped: Optional[nn.Module] = None) -> Dict[str, list]:
    """Output, every parameter's gradient and every buffer after one training-mode forward and backward of `model`
    (through `wrapped`, a scripted or compiled `model`, when given)."""
    model.train()
    out = (model if wrapped is None else wrapped)(x)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for _, p in sorted(model.named_parameters())]
    assert all(g is not None for g in grads)
    return dict(out=[out.detach()], grads=grads, buffers=[b for _, b in sorted(model.named_buffers())])


def _assert_same_step(actual: Dict[str, list], expected: Dict[str, list], what: str, rtol: float = 1e-5) -> None:
    """Outputs and statistics to `rtol` of each tensor's scale, gradients to `rtol` of the largest gradient: a
    BatchNorm scale's gradient in training is a small difference of large terms, which float32 gets to about 1e-3 of
    itself whichever way it is computed."""
    _assert_close(actual['out'], expected['out'], f'{what}: output', rtol)
    _assert_close(actual['buffers'], expected['buffers'], f'{what}: buffers', rtol)
    scale = max(g.abs().max() for g in expected['grads'])
    assert len(actual['grads']) == len(expected['grads'])
    for i, (a, b) in enumerate(zip(actual['grads'], expected['grads'])):
        assert (a - b).abs().max() <= rtol * scale, f'{what}: gradient {i}, max diff {(a - b).abs().max()}'


def _assert_train_step_matches(wrap, name: str, full: bool, rtol: float = 1e-5) -> None:
    """`wrap(model)` (scripted, compiled) trains as the eager model does: same outputs, gradients and statistics."""
    eager = randomize_(_seeded(name, full))
    other = copy.deepcopy(eager)
    x = _input(name, batch=2)
    _assert_same_step(_train_step(other, x, wrap(other)), _train_step(eager, x), f'{name} training step', rtol)


@pytest.mark.parametrize('name, full', PATH_CASES)
def test_torchscript(name, full, models):
    model = models(name, full)
    x = _input(name)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5, rtol=1e-5)
        _, inter = scripted.forward_intermediates(x)
        assert len(inter) == len(model.feature_info)
    # training: outputs and gradients of eager and scripted copies of the same weights
    _assert_train_step_matches(lambda m: torch.jit.script(m), name, full)


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


@pytest.mark.parametrize('trace_mode', list(GRAD_MODES))
@pytest.mark.parametrize('name', PATHS)
def test_fx_in_every_grad_mode_equals_eager(name, trace_mode):
    """Traced with autograd, under no_grad or under inference_mode (timm's and torchvision's feature extractors,
    features_only with feature_cls='fx'), the graph computes exactly what the eager model does, in train and eval
    mode and in every grad mode, BatchNorm statistics updates included. The weights and statistics change after
    tracing: the graph reads them when it runs, none is frozen into it."""
    from timm.models import create_feature_extractor, get_graph_node_names
    from torchvision.models import feature_extraction as tv_fx
    model = _seeded(name, False)
    tap = model.feature_info[1]['module']
    nodes = {tap: 'tap', 'classifier': 'logits'}
    with GRAD_MODES[trace_mode]():
        train_nodes, eval_nodes = get_graph_node_names(model)
        extractors = {'timm': create_feature_extractor(model, nodes), 'torchvision': tv_fx.create_feature_extractor(
            model, nodes)}
        # a model built under inference_mode holds inference tensors: usable under inference_mode only
        fm = timm.create_model(name, features_only=True, feature_cls='fx', **_shallow(name))
    assert train_nodes == eval_nodes and 'check_input' in train_nodes
    assert any(n.startswith(tap + '.') for n in train_nodes) and 'classifier' in train_nodes
    state = copy.deepcopy(randomize_(model).state_dict())  # in place: the traced graphs hold the same tensors
    x = _input(name, batch=2)

    def run(fn, train, mode, net=model):
        """fn(x) from the same weights and statistics; its outputs and the statistics it leaves in `net`."""
        with GRAD_MODES[mode]():
            model.load_state_dict(state)
            if net is fm:
                _copy_features(fm, model)
            for m in (model, fm, *extractors.values()):
                m.train(train)
            return _flat(fn(x)), _flat(net.state_dict())

    for train in (False, True):
        for mode in GRAD_MODES:
            what = f'traced under {trace_mode}, run in {"train" if train else "eval"} mode under {mode}'
            tap_out, _ = run(lambda t: model.forward_intermediates(t, indices=[1], intermediates_only=True), train,
                             mode)
            logits, stats = run(model, train, mode)
            for tool, extractor in extractors.items():
                out, traced_stats = run(extractor, train, mode)
                _assert_equal(out, tap_out + logits, f'{tool} {what}')
                if tool == 'torchvision':
                    # torchvision's tracer, without timm's leaf modules, traces into timm's BatchNormAct2d and its
                    # dead-code elimination drops the in-place `num_batches_tracked.add_(1)`: compare the rest
                    keep = [not k.endswith('num_batches_tracked') for k in model.state_dict()]
                    traced_stats, stats = [[t for t, k in zip(ts, keep) if k] for ts in (traced_stats, stats)]
                _assert_equal(traced_stats, stats, f'{tool} {what}: statistics')
            if trace_mode == 'inference' and mode != 'inference':
                continue
            taps, fm_stats = run(lambda t: model.forward_intermediates(t, intermediates_only=True), train, mode)
            out, traced_stats = run(fm, train, mode, net=fm)
            _assert_equal(out, taps, f"feature_cls='fx' {what}")


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('name', PATHS)
def test_entry_points_give_the_same_bits_in_every_grad_mode(name, train):
    """forward, forward_features, forward_head(pre_logits), forward_intermediates and features_only: the same bits
    with autograd, under no_grad and under inference_mode; the head pools as torch does."""
    model = randomize_(_seeded(name, False)).train(train)
    fm = timm.create_model(name, features_only=True, **_shallow(name)).train(train)
    _copy_features(fm, model)
    state, fm_state = copy.deepcopy(model.state_dict()), copy.deepcopy(fm.state_dict())
    x = _input(name, batch=2)
    calls = {
        'forward': model,
        'forward_features': model.forward_features,
        'forward_head': lambda t: model.forward_head(t, pre_logits=True),
        'forward_intermediates': model.forward_intermediates,
        'features_only': fm,
    }
    results = {}
    for mode in GRAD_MODES:
        for entry, fn in calls.items():
            model.load_state_dict(state)
            fm.load_state_dict(fm_state)
            with GRAD_MODES[mode]():
                arg = model.forward_features(x).detach() if entry == 'forward_head' else x
                model.load_state_dict(state)
                results[mode, entry] = _flat(fn(arg)) + _flat(dict(model.state_dict(), **fm.state_dict()))
    for mode in ('no_grad', 'inference'):
        for entry in calls:
            _assert_equal(results[mode, entry], results['grad', entry], f'{entry} under {mode}')
    features = results['grad', 'forward_features'][0]
    assert torch.allclose(results['grad', 'forward_head'][0], features.mean((2, 3)), rtol=1e-5, atol=1e-6)
    assert torch.equal(results['grad', 'forward_intermediates'][0], features)
    n_taps = len(model.feature_info)
    # timm's feature wrapper convolves NCHW, the model NHWC: equal to float rounding, which training mode amplifies
    _assert_close(results['grad', 'features_only'][:n_taps], results['grad', 'forward_intermediates'][1:n_taps + 1],
                  'features_only and forward_intermediates', rtol=1e-4)


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_same_as_timms_densenet_in_every_grad_mode(train):
    """An independent reference for every grad mode: timm's built-in DenseNet with the same weights."""
    import timm.models.densenet as timm_densenet
    model = randomize_(_seeded('densenet121', False)).train(train)
    reference = timm_densenet.DenseNet(block_config=(2, 2, 2, 2)).train(train)
    state = copy.deepcopy(model.state_dict())
    reference.load_state_dict(state)
    x = _input('densenet121', batch=2)
    for mode in GRAD_MODES:
        outs = []
        for net in (model, reference):
            net.load_state_dict(state)
            with GRAD_MODES[mode]():
                outs.append(_flat(net(x)) + _flat(net.state_dict()))
        _assert_close(*outs, f'{mode}, {"train" if train else "eval"}')


@pytest.mark.parametrize('name', PATHS)
def test_torchscript_in_every_grad_mode(name):
    model = randomize_(_seeded(name, False))
    state = copy.deepcopy(model.state_dict())
    scripted = torch.jit.script(copy.deepcopy(model))
    x = _input(name, batch=2)
    for train in (False, True):
        for mode in GRAD_MODES:
            outs = []
            for net in (model, scripted):
                assert not net.load_state_dict(state, strict=False).unexpected_keys  # BlurPool's filter is not saved
                net.train(train)
                with GRAD_MODES[mode]():
                    outs.append(_flat(net(x)) + _flat(net.forward_intermediates(x)))
            _assert_close(*outs, f'{mode}, {"train" if train else "eval"}')


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('mode', ['no_grad', 'inference'])
def test_torch_export_and_compile_without_autograd(mode, train):
    """Exported and compiled under no_grad or inference_mode (torch.compile guards on the grad mode and traces
    again), run in that mode: eager's outputs and statistics."""
    name = 'densenet_bc_100_k12'
    model = randomize_(_seeded(name, False)).train(train)
    state = copy.deepcopy(model.state_dict())
    x = _input(name, batch=2)
    with GRAD_MODES[mode]():
        expected = _flat(model(x)) + _flat(model.state_dict())
        model.load_state_dict(state)
        exported = torch.export.export(model, (x,)).module()
        exported.load_state_dict(state)
        _assert_close(_flat(exported(x)) + _flat(exported.state_dict()), expected, f'export under {mode}')
        torch._dynamo.reset()
        model.load_state_dict(state)
        compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
        _assert_close(_flat(compiled(x)) + _flat(model.state_dict()), expected, f'compile under {mode}')


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
    if train:  # outputs, gradients and statistics of a training step, as eager's
        _assert_train_step_matches(lambda m: torch.compile(m, backend='aot_eager', fullgraph=True), name, False)
        return
    model = randomize_(timm.create_model(name, **_shallow(name))).eval()
    x = _input(name)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    out = compiled(x)
    reference = timm.create_model(name, **_shallow(name))
    reference.load_state_dict(model.state_dict())
    reference.eval()
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
    randomize_(model)
    plain = copy.deepcopy(model)
    plain.set_grad_checkpointing(False)
    x = _input('densenet121', batch=2)
    _assert_same_step(_train_step(model, x), _train_step(plain, x), 'checkpointed training step', rtol=1e-4)


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
