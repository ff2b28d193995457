"""fpn_backbone under torchvision's detectors, on the CPU with small images."""
import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import FrozenBatchNormAct2d
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from hub_fixtures import add_weights_to_hub_cache
from timm_densenet_ext.models.detection import DenseNetFPN, fpn_backbone, stage_modules
from timm_densenet_ext.parity import randomize_

SHALLOW = dict(block_config=(2, 2, 2, 2))
SIZE = 128


def _images(n: int = 2):
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(n)]


def _targets(masks: bool = False):
    targets = [
        dict(boxes=torch.tensor([[10., 20., 60., 80.]]), labels=torch.tensor([1])),
        dict(boxes=torch.tensor([[30., 30., 100., 90.], [5., 5., 40., 40.]]), labels=torch.tensor([2, 1])),
    ]
    if masks:
        for t in targets:
            m = torch.zeros(len(t['boxes']), SIZE, SIZE, dtype=torch.uint8)
            for i, (x0, y0, x1, y1) in enumerate(t['boxes'].int().tolist()):
                m[i, y0:y1, x0:x1] = 1
            t['masks'] = m
    return targets


def _frozen_state(model: nn.Module, names):
    """Every parameter and buffer of the named modules of model.features, copied."""
    return {f'{n}.{k}': v.detach().clone() for n in names
            for k, v in model.features.get_submodule(n).state_dict().items()}


def _train(detector: nn.Module, steps: int, masks: bool = False, lr: float = 0.005):
    params = [p for p in detector.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    images, targets = _images(), _targets(masks)
    detector.train()
    losses = []
    for _ in range(steps):
        loss_dict = detector(images, targets)
        loss = sum(loss_dict.values())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 5.)  # random weights (no download here) make early steps rough
        opt.step()
        losses.append(loss.item())
    return losses, loss_dict


def test_faster_rcnn_trains_on_a_fixed_batch_and_detects():
    """Frozen norms and the lowest stages frozen: the defaults with pretrained weights, here on random ones."""
    torch.manual_seed(0)
    backbone = fpn_backbone('densenet121', norm_layer=FrozenBatchNorm2d, trainable_stages=3)
    assert isinstance(backbone, DenseNetFPN) and backbone.out_channels == 256
    model = backbone.body.model
    frozen = [n for stage in stage_modules(model)[:2] for n in stage]  # trainable_stages=3: stem and stage 1
    before = _frozen_state(model, frozen)
    detector = FasterRCNN(backbone, num_classes=3, min_size=SIZE, max_size=SIZE, box_batch_size_per_image=64)
    losses, loss_dict = _train(detector, steps=8)
    assert set(loss_dict) == {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses  # measured 0.73 (2.02 -> 1.48)
    after = _frozen_state(model, frozen)
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # bit-identical through training, also in train mode
    detector.eval()
    with torch.no_grad():
        out = detector(_images())
    assert len(out) == 2
    for det in out:
        assert set(det) == {'boxes', 'labels', 'scores'}
        assert det['boxes'].shape[1] == 4 and len(det['boxes']) == len(det['scores']) == len(det['labels'])


def test_retinanet_fcos_and_mask_rcnn_train_and_eval_steps():
    for make in (
            lambda: RetinaNet(fpn_backbone('densenet121', returned_stages=(2, 3, 4),
                                           extra_blocks=LastLevelP6P7(256, 256), **SHALLOW),
                              num_classes=3, min_size=SIZE, max_size=SIZE),
            lambda: FCOS(fpn_backbone('densenet121', returned_stages=(2, 3, 4),
                                      extra_blocks=LastLevelP6P7(256, 256), **SHALLOW),
                         num_classes=3, min_size=SIZE, max_size=SIZE),
            lambda: MaskRCNN(fpn_backbone('densenet121', **SHALLOW), num_classes=3, min_size=SIZE, max_size=SIZE,
                             box_batch_size_per_image=64),
    ):
        torch.manual_seed(0)
        detector = make()
        masks = isinstance(detector, MaskRCNN)
        losses, loss_dict = _train(detector, steps=1, masks=masks)
        assert all(torch.isfinite(v) for v in loss_dict.values())
        if masks:
            assert 'loss_mask' in loss_dict
        detector.eval()
        with torch.no_grad():
            out = detector(_images())
        assert len(out) == 2 and all('boxes' in d and 'scores' in d for d in out)
        if masks:
            assert all(d['masks'].shape[1:] == (1, SIZE, SIZE) for d in out)


@pytest.mark.parametrize('trainable_stages', [0, 3, 5])
def test_trainable_stages_freeze_parameters_and_batchnorm_statistics(trainable_stages):
    """With trainable BatchNorm, frozen stages get FrozenBatchNorm; trainable ones keep updating statistics."""
    torch.manual_seed(0)
    backbone = fpn_backbone('densenet121', trainable_stages=trainable_stages, norm_layer=nn.BatchNorm2d, **SHALLOW)
    model = backbone.body.model
    stages = stage_modules(model)
    assert len(stages) == 5
    frozen = [n for stage in stages[:5 - trainable_stages] for n in stage]
    trainable = [n for stage in stages[5 - trainable_stages:] for n in stage]
    for name in frozen:
        module = model.features.get_submodule(name)
        assert not any(p.requires_grad for p in module.parameters()), name
        assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules()), name
    for name in trainable:
        module = model.features.get_submodule(name)
        assert all(p.requires_grad for p in module.parameters()), name
    assert all(p.requires_grad for p in backbone.fpn.parameters())
    randomize_(model)  # statistics that differ from the init, so a frozen one that moved would show
    before = _frozen_state(model, frozen)
    stats_before = {n: m.running_mean.clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    backbone.train()
    opt = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        out = backbone(torch.randn(2, 3, 64, 64))
        loss = sum(v.square().mean() for v in out.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _frozen_state(model, frozen)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    for n, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert not torch.equal(m.running_mean, stats_before[n]), n  # the trainable stages' norms do train


def test_frozen_norm_layer_freezes_every_norm():
    backbone = fpn_backbone('densenet121', trainable_stages=5, norm_layer=FrozenBatchNorm2d, **SHALLOW)
    model = backbone.body.model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FrozenBatchNormAct2d) for m in model.modules())
    # every convolution trains with trainable_stages=5; the frozen norms have no parameters
    assert all(p.requires_grad for p in model.parameters())
    assert {type(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))} == {nn.Conv2d}


def _norms(model: nn.Module):
    """(trainable BatchNorms, frozen norms) of a model."""
    return ([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)],
            [m for m in model.modules() if isinstance(m, (FrozenBatchNorm2d, FrozenBatchNormAct2d))])


def test_defaults_follow_torchvision_frozen_norms_only_with_pretrained_weights(hub_cache):
    """torchvision's detectors: FrozenBatchNorm2d and 3 trainable stages when pretrained weights are loaded,
    trainable BatchNorm and every stage trainable otherwise. Explicit arguments win either way."""
    scratch = fpn_backbone('densenet121', **SHALLOW).body.model
    trainable, frozen = _norms(scratch)
    assert len(trainable) == 4 * 2 * 2 + 3 + 2 and not frozen  # 2 per dense layer, 1 per transition, norm0, norm5
    assert all(p.requires_grad for p in scratch.parameters())
    assert all(m.weight.requires_grad and m.bias.requires_grad for m in trainable)

    weights = randomize_(timm.create_model('densenet121', **SHALLOW), 1).state_dict()
    add_weights_to_hub_cache(hub_cache, timm.models.get_pretrained_cfg('densenet121').hf_hub_id, weights)
    pretrained = fpn_backbone('densenet121', pretrained=True, **SHALLOW).body.model
    trainable, frozen = _norms(pretrained)
    assert not trainable and len(frozen) == 4 * 2 * 2 + 3 + 2
    for name, m in pretrained.named_modules():  # the loaded statistics, frozen
        if isinstance(m, FrozenBatchNormAct2d):
            assert torch.equal(m.running_var, weights[f'{name}.running_var']), name
    stages = stage_modules(pretrained)
    for i, stage in enumerate(stages):
        params = [p for n in stage for p in pretrained.features.get_submodule(n).parameters()]
        assert params and all(p.requires_grad == (i >= 2) for p in params), stage  # stem and block 1 frozen

    explicit = fpn_backbone('densenet121', pretrained=True, norm_layer=nn.BatchNorm2d, trainable_stages=5,
                            **SHALLOW).body.model
    assert len(_norms(explicit)[0]) == 4 * 2 * 2 + 3 + 2 and all(p.requires_grad for p in explicit.parameters())
    explicit = fpn_backbone('densenet121', norm_layer=FrozenBatchNorm2d, trainable_stages=0, **SHALLOW).body.model
    assert not _norms(explicit)[0] and not any(p.requires_grad for p in explicit.parameters())


def test_faster_rcnn_from_scratch_with_the_defaults_converges():
    """lr 0.01, momentum 0.9, no gradient clipping: the loss falls (measured 2.67 -> 1.26 over 8 steps). Frozen
    norms from scratch, the former default, diverged (2.51 -> 74.8)."""
    torch.manual_seed(0)
    size = 64
    detector = FasterRCNN(fpn_backbone('densenet121', **SHALLOW), num_classes=3, min_size=size, max_size=size,
                          box_batch_size_per_image=64)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(2)]
    targets = [dict(boxes=torch.tensor([[5., 10., 30., 40.]]), labels=torch.tensor([1])),
               dict(boxes=torch.tensor([[15., 15., 50., 45.], [2., 2., 20., 20.]]), labels=torch.tensor([2, 1]))]
    opt = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    detector.train()
    losses = []
    for _ in range(8):
        loss = sum(detector(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses  # measured 0.60


@pytest.mark.parametrize('output_stride', [32, 16, 8])
def test_pyramid_shapes_at_each_output_stride(output_stride):
    backbone = fpn_backbone('densenet121', output_stride=output_stride, **SHALLOW).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, SIZE, SIZE))
    reductions = {32: [4, 8, 16, 32], 16: [4, 8, 16, 16], 8: [4, 8, 8, 8]}[output_stride]
    assert backbone.body.feature_info.reduction() == reductions
    assert list(out) == ['0', '1', '2', '3', 'pool']
    assert [v.shape[-1] for k, v in out.items() if k != 'pool'] == [SIZE // r for r in reductions]
    assert out['pool'].shape[-1] == SIZE // reductions[-1] // 2 + SIZE // reductions[-1] % 2
    assert all(v.shape[1] == 256 for v in out.values())


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match='returned_stages must name dense blocks 1 to 4'):
        fpn_backbone('densenet121', returned_stages=(0, 1), **SHALLOW)
    with pytest.raises(ValueError, match='trainable_stages must be 0 to 5'):
        fpn_backbone('densenet121', trainable_stages=6, **SHALLOW)
    with pytest.raises(ValueError, match='returned_stages must name dense blocks 1 to 3'):
        fpn_backbone('densenet_bc_100_k12')
    with pytest.raises(ValueError, match='trainable_stages must be 0 to 4'):
        fpn_backbone('densenet_bc_100_k12', returned_stages=(1, 2, 3), trainable_stages=5)
    with pytest.raises(TypeError, match='timm_densenet_ext DenseNets'):
        fpn_backbone('resnet18')
