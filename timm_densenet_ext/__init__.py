"""DenseNet for timm. Importing this package registers every variant with timm's model registry."""
import sys

from . import checkpoints, models
from .models import DenseBlock, DenseLayer, DenseNet, DenseTransition, MODEL_NAMES, checkpoint_filter_fn, default_cfgs
from .models import densenet as _densenet, detection as _detection, fused as _fused

__version__ = '0.1.0'

# The workflows' API, imported on first use so that importing the package only registers models.
_LAZY = {
    'read_checkpoint': 'checkpoints', 'model_from_checkpoint': 'checkpoints',
    'convert_checkpoint': 'hub', 'write_hub_folder': 'hub', 'validate_folder': 'hub', 'push_folder': 'hub',
    'folder_card': 'hub', 'PushError': 'hub', 'read_image': 'images',
    'render_model_card': 'cards', 'write_model_cards': 'cards',
    'model_stats': 'stats',
    'fuse_for_inference': 'models.fused',
    'optimize_for_inference': 'deploy',
    'fpn_backbone': 'models.detection',
    'validate': 'validate', 'ValidateResult': 'validate', 'explain': 'explain',
    'read_labels': 'multilabel', 'auroc_per_label': 'multilabel', 'pick_thresholds': 'multilabel',
}

__all__ = ['DenseNet', 'DenseLayer', 'DenseBlock', 'DenseTransition', 'MODEL_NAMES', 'checkpoint_filter_fn',
           'default_cfgs', '__version__', *_LAZY]

# Module paths of release 0.1.0, before the model layer moved into `models`: they name the same modules.
for _old, _module in (('densenet', _densenet), ('variants', models), ('weights', checkpoints), ('fused', _fused),
                      ('detection', _detection)):
    sys.modules[f'{__name__}.{_old}'] = _module
    globals()[_old] = _module


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f'.{_LAZY[name]}', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
