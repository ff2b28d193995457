"""What a model's inputs and outputs mean: its eval preprocessing (timm's `resolve_data_config` / `create_transform`
from its pretrained config) and its class names (a hub folder's `label_names`, or ImageNet's from timm's
`ImageNetInfo`). Shared by the workflows that feed a model images (`predict`, `explain`, `export`, ...); `predict`
re-exports them."""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch.nn as nn

__all__ = ['imagenet_label_config', 'class_names', 'preprocessing', 'image_mode', 'folder_config']


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


def image_mode(model: nn.Module) -> str:
    """The PIL mode the model's images are read in before `preprocessing`: 'L' for a 1-channel model, else 'RGB'
    (timm's train.py rule, `multilabel.input_img_mode`, on the model's input channels)."""
    return 'L' if getattr(model, 'in_chans', 3) == 1 else 'RGB'


def folder_config(model_name: str) -> Optional[Dict[str, Any]]:
    """The config.json of the hub folder ('local-dir:DIR') or Hub repository ('hf-hub:ORG/NAME[@REVISION]')
    `model_name` names, read from the folder or the Hub's cache; None for a registered variant."""
    if model_name.startswith('local-dir:'):
        path = Path(model_name[len('local-dir:'):]) / 'config.json'
    elif model_name.startswith('hf-hub:'):
        from huggingface_hub import hf_hub_download
        repo, _, revision = model_name[len('hf-hub:'):].partition('@')
        path = Path(hf_hub_download(repo, 'config.json', revision=revision or None))
    else:
        return None
    return json.loads(path.read_text(encoding='utf-8'))
