"""Taking over timm registry names without its overwrite and deprecation warnings.

timm warns when a name is registered twice, and keeps `tv_densenet121` as a deprecated alias. We release each
name we define before registering it, so users see neither warning, and list our models under timm's module name
`densenet` so that `timm.list_models(module='densenet')` keeps describing the family. Works whether or not the
installed timm has DenseNets of its own.
"""
from typing import Iterable

from timm.models import _registry as reg

__all__ = ['release_names', 'relabel_module']

REGISTRY_MODULE = 'densenet'


def release_names(names: Iterable[str]) -> None:
    """Remove every registry entry (entrypoint, pretrained cfgs, deprecation) of these architecture names."""
    for name in names:
        if hasattr(reg, '_clear_model_entries'):
            reg._clear_model_entries(name)
        else:  # older timm: the same bookkeeping by hand
            module = reg._model_to_module.pop(name, None)
            if module is not None:
                reg._module_to_models.get(module, set()).discard(name)
                getattr(reg, '_module_to_deprecated_models', {}).get(module, {}).pop(name, None)
            for tagged in reg._model_with_tags.pop(name, []) + [name]:
                reg._model_pretrained_cfgs.pop(tagged, None)
                reg._model_has_pretrained.discard(tagged)
            reg._model_default_cfgs.pop(name, None)
            getattr(reg, '_deprecated_models', {}).pop(name, None)
        reg._model_entrypoints.pop(name, None)


def relabel_module(names: Iterable[str], from_module: str, to_module: str = REGISTRY_MODULE) -> None:
    """List registered `names` under `to_module` instead of the Python module that registered them."""
    for name in names:
        if reg._model_to_module.get(name) == from_module:
            reg._model_to_module[name] = to_module
            reg._module_to_models[from_module].discard(name)
            reg._module_to_models[to_module].add(name)
    if not reg._module_to_models.get(from_module):
        reg._module_to_models.pop(from_module, None)
