"""Full backward hooks (`register_full_backward_hook`, what Grad-CAM and attribution tools hook) on every block of our
DenseNet work and fire, in training and eval mode, with memory-efficient layers and dilated blocks, and change no
gradient. torchvision's DenseNet breaks them (its forward applies an in-place ReLU to the output of `features`,
torchvision issue 4164); ours applies in-place ReLUs only to tensors made inside the module doing it.

A dense layer takes the block's features as a list (as torchvision's does), which a full backward hook does not look
into: its hook gets the gradient of the layer's output, and no input gradients."""
import pytest
import torch

import timm_densenet_ext  # noqa: F401  (registers the variants)
from timm_densenet_ext.models import DenseBlock, DenseLayer, DenseTransition
from model_helpers import trained


def hooked_modules(model):
    """Every block of ours: dense layers, dense blocks, transitions, the stem's modules, norm5 and the model."""
    ours = (DenseLayer, DenseBlock, DenseTransition)
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, ours)}
    stem = {f'features.{name}': m for name, m in model.features.named_children()
            if name[:-1] in ('conv', 'norm', 'pool')}  # conv0, norm0, pool0 (conv1, norm1, ... in deep stems), norm5
    return {'': model, **blocks, **stem}


@pytest.mark.filterwarnings('ignore:Full backward hook is firing when gradients are computed with respect to module')
@pytest.mark.parametrize('kwargs', [dict(), dict(memory_efficient=True), dict(output_stride=8),
                                    dict(stem_type='deep', aa_layer='blur'), dict(stem_type='cifar')])
@pytest.mark.parametrize('training', [True, False])
def test_full_backward_hooks_on_every_block_fire_and_change_no_gradient(kwargs, training):
    model = trained('densenet121', block_config=(1, 2, 2, 1), num_classes=3, **kwargs).train(training)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def gradients(hooks: bool):
        model.load_state_dict(state)  # the same BatchNorm statistics in both runs
        model.zero_grad(set_to_none=True)
        fired, handles = {}, []

        def record(name):
            def hook(module, grad_in, grad_out):
                fired.setdefault(name, (grad_in, grad_out))  # returns None: the gradients stay as they are
            return hook

        if hooks:
            for name, module in hooked_modules(model).items():
                handles.append(module.register_full_backward_hook(record(name)))
        inputs = x.clone().requires_grad_()
        model(inputs).logsumexp(1).sum().backward()
        for h in handles:
            h.remove()
        return fired, inputs.grad, {n: p.grad for n, p in model.named_parameters()}

    fired, grad_x, grads = gradients(hooks=True)
    assert set(fired) == set(hooked_modules(model))
    assert {'features.norm5', 'features.denseblock4.denselayer1', 'features.transition3'} <= set(fired)
    for name, (grad_in, grad_out) in fired.items():
        assert grad_out[0] is not None and grad_out[0].shape[0] == 2, name
        list_input = isinstance(hooked_modules(model)[name], DenseLayer)
        assert (grad_in[0] is None) == list_input, name
    _, expected_x, expected = gradients(hooks=False)
    assert torch.equal(grad_x, expected_x)
    assert all(torch.equal(grads[n], expected[n]) for n in expected)


def test_torchvisions_densenet_breaks_the_same_hook():
    """What the test above guards against: torchvision's DenseNet fails a full backward hook on `features`."""
    from torchvision.models import DenseNet as TorchvisionDenseNet
    model = TorchvisionDenseNet(growth_rate=8, block_config=(1, 1), num_init_features=8, num_classes=3)
    model.features.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    with pytest.raises(RuntimeError, match='modified inplace'):
        model(torch.randn(1, 3, 32, 32, requires_grad=True)).sum().backward()
