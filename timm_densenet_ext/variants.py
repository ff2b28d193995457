"""Every DenseNet variant: its pretrained configs and its timm registry entrypoint.

The one place that names variants. Importing it registers them with timm, replacing timm's own entries of the
same names.
"""
import inspect
from typing import Any, Dict, Optional, Tuple

from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import BlurPool2d
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from timm.models._registry import generate_default_cfgs, register_model

from ._registry import release_names, relabel_module
from .densenet import DenseNet
from .weights import checkpoint_filter_fn

__all__ = ['default_cfgs', 'resolve_model_name', 'CIFAR100_MEAN', 'CIFAR100_STD']

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_DEFAULT_BLOCK_CONFIG = inspect.signature(DenseNet).parameters['block_config'].default
_PAPER = dict(paper_name='Densely Connected Convolutional Networks', paper_ids='arXiv:1608.06993')


def _cfg(hf_hub_id: Optional[str] = None, **kwargs) -> Dict[str, Any]:
    return {
        'hf_hub_id': hf_hub_id, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'features.conv0', 'classifier': 'classifier', 'license': 'apache-2.0', **_PAPER, **kwargs,
    }


def _ra_cfg(arch: str) -> Dict[str, Any]:
    """timm's weights, trained with RandAugment."""
    return _cfg(
        f'timm/{arch}.ra_in1k', test_input_size=(3, 288, 288), test_crop_pct=0.95,
        origin_url='https://github.com/huggingface/pytorch-image-models')


def _tv_cfg(arch: str) -> Dict[str, Any]:
    """torchvision's weights (IMAGENET1K_V1), as timm republished them in safetensors."""
    return _cfg(f'timm/{arch}.tv_in1k', license='bsd-3-clause', origin_url='https://github.com/pytorch/vision')


def _cifar_cfg(pool_size: int) -> Dict[str, Any]:
    return _cfg(
        num_classes=100, input_size=(3, 32, 32), pool_size=(pool_size, pool_size), crop_pct=1.0,
        mean=CIFAR100_MEAN, std=CIFAR100_STD)


default_cfgs = generate_default_cfgs({
    'densenet121.ra_in1k': _ra_cfg('densenet121'),
    'densenet121.tv_in1k': _tv_cfg('densenet121'),
    'densenet161.tv_in1k': _tv_cfg('densenet161'),
    'densenet169.tv_in1k': _tv_cfg('densenet169'),
    'densenet201.tv_in1k': _tv_cfg('densenet201'),
    'densenet264d.untrained': _cfg(),
    'densenetblur121d.ra_in1k': _ra_cfg('densenetblur121d'),
    'densenet121d.untrained': _cfg(),
    # torchvision's architectures under torchvision's names, loading the same weights
    'tv_densenet121.tv_in1k': _tv_cfg('densenet121'),
    'tv_densenet161.tv_in1k': _tv_cfg('densenet161'),
    'tv_densenet169.tv_in1k': _tv_cfg('densenet169'),
    'tv_densenet201.tv_in1k': _tv_cfg('densenet201'),
    # CIFAR (32x32): the paper's DenseNet-BC, and DenseNet-121 as popular CIFAR-100 code builds it
    'densenet_bc_100_k12.untrained': _cifar_cfg(8),
    'densenet_bc_250_k24.untrained': _cifar_cfg(8),
    'densenet_bc_190_k40.untrained': _cifar_cfg(8),
    'densenet121_cifar.untrained': _cifar_cfg(4),
})

release_names(default_cfgs)


def resolve_model_name(model_name: str) -> Tuple[str, str]:
    """(arch, tag) of a registered 'arch' (its default tag) or 'arch.tag'; a ValueError says what exists."""
    arch, _, tag = model_name.partition('.')
    if arch not in default_cfgs:
        raise ValueError(
            f'unknown model {model_name!r}; `timm-densenet-ext list` shows the {len(default_cfgs)} variants.')
    tags = default_cfgs[arch].tags
    if tag and tag not in tags:
        raise ValueError(f'unknown pretrained tag {tag!r} for {arch}; its tags are: {", ".join(tags)}.')
    return arch, tag or tags[0]


def _create_densenet(variant: str, pretrained: bool = False, **kwargs) -> DenseNet:
    # every tap by default: the stem, each block before its transition, the final norm (4 for the CIFAR variants'
    # three blocks, where timm's default of five would not exist)
    num_taps = len(kwargs.get('block_config', _DEFAULT_BLOCK_CONFIG)) + 1
    feature_cfg = dict(flatten_sequential=True, out_indices=tuple(range(num_taps)))
    feature_cfg.update(kwargs.pop('feature_cfg', None) or {})
    if kwargs.get('features_only') and kwargs.get('feature_taps') == 'norm':
        # the normalised taps are inside the transitions, where timm's FeatureListNet and FeatureDictNet cannot reach
        feature_cls = kwargs.setdefault('feature_cls', 'getter')
        if feature_cls in ('list', 'dict'):
            raise ValueError(f"feature_taps='norm' taps the transitions' norms, which feature_cls='{feature_cls}' "
                             f"cannot reach; use feature_cls='getter' (the default for these taps), 'hook' or 'fx'.")
    try:
        return build_model_with_cfg(
            DenseNet,
            variant,
            pretrained,
            feature_cfg=feature_cfg,
            pretrained_filter_fn=checkpoint_filter_fn,
            **kwargs,
        )
    except LocalEntryNotFoundError as e:
        # huggingface_hub's own message names neither the repository nor a way out
        if not pretrained:
            raise
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        why = 'HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else 'the Hub cannot be reached'
        raise LocalEntryNotFoundError(
            f'pretrained weights for {variant} are in the Hugging Face Hub repository {cfg.hf_hub_id}, which is not '
            f'in the local cache ({kwargs.get("cache_dir") or constants.HF_HUB_CACHE}), and {why}. Go online once '
            f'(unset HF_HUB_OFFLINE) to download them, or load a local copy with '
            f"pretrained_cfg_overlay=dict(file='path/to/model.safetensors').") from e


def _densenet_bc_cifar(variant: str, depth: int, growth_rate: int, pretrained: bool, **kwargs) -> DenseNet:
    """The paper's CIFAR DenseNet-BC: three blocks of (depth - 4) / 6 bottleneck layers, compression 0.5."""
    model_args = dict(growth_rate=growth_rate, block_config=((depth - 4) // 6,) * 3, stem_type='cifar')
    return _create_densenet(variant, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def densenet121(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16)."""
    model_args = dict(growth_rate=32, block_config=(6, 12, 24, 16))
    return _create_densenet('densenet121', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def densenet161(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24)."""
    model_args = dict(growth_rate=48, block_config=(6, 12, 36, 24))
    return _create_densenet('densenet161', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def densenet169(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32)."""
    model_args = dict(growth_rate=32, block_config=(6, 12, 32, 32))
    return _create_densenet('densenet169', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def densenet201(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32)."""
    model_args = dict(growth_rate=32, block_config=(6, 12, 48, 32))
    return _create_densenet('densenet201', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def densenet264d(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-264 (k=48, blocks 6-12-64-48) with a 3-layer 3x3 stem."""
    model_args = dict(growth_rate=48, block_config=(6, 12, 64, 48), stem_type='deep')
    return _create_densenet('densenet264d', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def densenetblur121d(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-121 with blur-pool downsampling in the stem and a 3-layer 3x3 stem."""
    model_args = dict(growth_rate=32, block_config=(6, 12, 24, 16), stem_type='deep', aa_layer=BlurPool2d)
    return _create_densenet('densenetblur121d', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def densenet121d(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-121 with a 3-layer 3x3 stem (no blur-pool)."""
    model_args = dict(growth_rate=32, block_config=(6, 12, 24, 16), stem_type='deep')
    return _create_densenet('densenet121d', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def tv_densenet121(pretrained: bool = False, **kwargs) -> DenseNet:
    """torchvision's DenseNet-121 with torchvision's weights."""
    model_args = dict(growth_rate=32, block_config=(6, 12, 24, 16))
    return _create_densenet('tv_densenet121', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def tv_densenet161(pretrained: bool = False, **kwargs) -> DenseNet:
    """torchvision's DenseNet-161 with torchvision's weights."""
    model_args = dict(growth_rate=48, block_config=(6, 12, 36, 24))
    return _create_densenet('tv_densenet161', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def tv_densenet169(pretrained: bool = False, **kwargs) -> DenseNet:
    """torchvision's DenseNet-169 with torchvision's weights."""
    model_args = dict(growth_rate=32, block_config=(6, 12, 32, 32))
    return _create_densenet('tv_densenet169', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def tv_densenet201(pretrained: bool = False, **kwargs) -> DenseNet:
    """torchvision's DenseNet-201 with torchvision's weights."""
    model_args = dict(growth_rate=32, block_config=(6, 12, 48, 32))
    return _create_densenet('tv_densenet201', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def densenet_bc_100_k12(pretrained: bool = False, **kwargs) -> DenseNet:
    """CIFAR DenseNet-BC, L=100, k=12 (0.8M parameters)."""
    return _densenet_bc_cifar('densenet_bc_100_k12', 100, 12, pretrained, **kwargs)


@register_model
def densenet_bc_250_k24(pretrained: bool = False, **kwargs) -> DenseNet:
    """CIFAR DenseNet-BC, L=250, k=24 (15.3M parameters)."""
    return _densenet_bc_cifar('densenet_bc_250_k24', 250, 24, pretrained, **kwargs)


@register_model
def densenet_bc_190_k40(pretrained: bool = False, **kwargs) -> DenseNet:
    """CIFAR DenseNet-BC, L=190, k=40 (25.6M parameters)."""
    return _densenet_bc_cifar('densenet_bc_190_k40', 190, 40, pretrained, **kwargs)


@register_model
def densenet121_cifar(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-121's blocks (6-12-24-16, k=32) on a 3x3 stride-1 stem without max-pool, for 32x32 images."""
    model_args = dict(growth_rate=32, block_config=(6, 12, 24, 16), stem_type='cifar')
    return _create_densenet('densenet121_cifar', pretrained=pretrained, **dict(model_args, **kwargs))


relabel_module(default_cfgs, from_module=__name__.split('.')[-1])
