"""DenseNet for timm. Importing this package registers every variant with timm's model registry."""
from .densenet import DenseBlock, DenseLayer, DenseNet, DenseTransition
from .variants import default_cfgs
from .weights import checkpoint_filter_fn

__version__ = '0.1.0'

MODEL_NAMES = tuple(default_cfgs)

__all__ = ['DenseNet', 'DenseLayer', 'DenseBlock', 'DenseTransition', 'MODEL_NAMES', 'checkpoint_filter_fn',
           'default_cfgs', '__version__']
