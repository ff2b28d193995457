"""What a model's inputs and outputs mean: its eval preprocessing (timm's `resolve_data_config` / `create_transform`
from its pretrained config) and its class names (a hub folder's `label_names`, or ImageNet's from timm's
`ImageNetInfo`). Shared by the workflows that feed a model images (`predict`, `explain`, `export`, ...); `predict`
re-exports them."""
from typing import Any, Dict, List

import torch.nn as nn

__all__ = ['imagenet_label_config', 'class_names', 'preprocessing']


def imagenet_label_config(model: nn.Module) -> Dict[str, Any]:
    """`label_names` (WordNet ids) and `label_descriptions` of the ImageNet subset whose number of classes the model
    has (timm's `infer_imagenet_subset` and `ImageNetInfo`), as a hub folder's config.json holds them; else {}."""
    from timm.data import ImageNetInfo, infer_imagenet_subset
    subset = infer_imagenet_subset(model)
    if not subset:
        return {}
    info = ImageNetInfo(subset)
    return dict(label_names=list(info.label_names()), label_descriptions=info.label_descriptions(as_dict=True))


def class_names(model: nn.Module) -> List[str]:
    """A name per class: the config's `label_names` (with their `label_descriptions`), ImageNet's descriptions
    for a model with the classes of an ImageNet subset, else 'class N'."""
    cfg, n = model.pretrained_cfg, model.num_classes
    names = cfg.get('label_names')
    if isinstance(names, dict):  # timm allows {index: name} when indices have gaps
        names = [names.get(i, names.get(str(i), f'class {i}')) for i in range(n)]
    descriptions = cfg.get('label_descriptions') or {}
    if not (names and len(names) == n):
        imagenet = imagenet_label_config(model)
        names, descriptions = imagenet.get('label_names'), imagenet.get('label_descriptions')
    if not names:
        return [f'class {i}' for i in range(n)]
    return [str(descriptions.get(name, name)) for name in names]


def preprocessing(model: nn.Module):
    """The model's eval transform from its pretrained config: timm's `resolve_data_config` and `create_transform`
    (for crop_pct 0.875, bicubic, 224 px: resize the shorter side to 256, center-crop 224, normalize)."""
    import timm
    return timm.data.create_transform(**timm.data.resolve_data_config(model=model))
