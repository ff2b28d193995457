"""DenseNet for timm. Importing this package registers every variant with timm's model registry."""
from .densenet import DenseBlock, DenseLayer, DenseNet, DenseTransition
from .variants import default_cfgs
from .weights import checkpoint_filter_fn

__version__ = '0.1.0'

MODEL_NAMES = tuple(default_cfgs)

# The publishing API, imported on first use so that importing the package only registers models.
_LAZY = {
    'read_checkpoint': 'weights', 'model_from_checkpoint': 'weights',
    'convert_checkpoint': 'hub', 'write_hub_folder': 'hub', 'validate_folder': 'hub', 'push_folder': 'hub',
    'folder_card': 'hub', 'PushError': 'hub', 'read_image': 'images',
    'render_model_card': 'cards', 'write_model_cards': 'cards',
    'model_stats': 'stats',
    'fuse_for_inference': 'fused',
    'fpn_backbone': 'detection',
}

__all__ = ['DenseNet', 'DenseLayer', 'DenseBlock', 'DenseTransition', 'MODEL_NAMES', 'checkpoint_filter_fn',
           'default_cfgs', '__version__', *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f'.{_LAZY[name]}', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
