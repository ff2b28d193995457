"""Classify images: the model's own preprocessing (timm's `resolve_data_config` / `create_transform`), its class
names (a hub folder's `label_names`, or ImageNet's from timm's `ImageNetInfo`), top-k labels and probabilities; for a
multi-label hub folder (config.json's `label_thresholds`), every label whose sigmoid probability reaches its
threshold; and, when asked, each image's class activation map as a PNG overlay (`explain`). A 1-channel model reads
images in grey ('L')."""
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ._naming import arg
from .images import UnreadableImage, read_image
from .loading import load_model
from .model_io import class_names, folder_config, image_mode, imagenet_label_config, preprocessing
from .multilabel import findings, thresholds_from_config

__all__ = ['Prediction', 'imagenet_label_config', 'class_names', 'preprocessing', 'classify', 'classify_multilabel',
           'folder_thresholds', 'predict']


@dataclass(frozen=True)
class Prediction:
    """The top classes of one image, best first, as (class index, class name, probability); or why it failed; and
    the class activation map written for it (`predict(cam_dir=...)`), if any. For a multi-label model
    (`multi_label`), `top` holds every label at or above its threshold, most probable first."""
    path: str
    top: List[Tuple[int, str, float]] = field(default_factory=list)
    error: Optional[str] = None
    cam: Optional[str] = None
    multi_label: bool = False


def classify(
        model: nn.Module,
        images: Sequence[Union[str, Path]],
        top_k: int = 5,
        batch_size: int = 16,
) -> List[Prediction]:
    """Classify image files with `model` (in eval mode) and its pretrained config's preprocessing.

    Images are read by `images.read_image` (any PIL mode, EXIF orientation, alpha on white). One `Prediction` per
    image, in order; an unreadable image gets its `error` and the others are still classified.
    """
    if top_k < 1:
        raise ValueError(f'{arg("top_k", top_k)}: give 1 or more.')
    if not model.num_classes:
        raise ValueError('the model has no classifier (num_classes=0); give a model that classifies.')
    names, k = class_names(model), min(top_k, model.num_classes)

    def top(logits: torch.Tensor) -> List[List[Tuple[int, str, float]]]:
        values, indices = logits.softmax(dim=1).topk(k, dim=1)
        return [[(c, names[c], q) for c, q in zip(idx, p)] for p, idx in zip(values.tolist(), indices.tolist())]
    return _predictions(model, images, batch_size, top)


def _predictions(model: nn.Module, images: Sequence[Union[str, Path]], batch_size: int,
                 top: Callable[[torch.Tensor], List[List[Tuple[int, str, float]]]],
                 multi_label: bool = False) -> List[Prediction]:
    """Each image file read in the model's mode with its preprocessing, run through `model` in batches of
    `batch_size` readable images, and given the `top` its logits make; an unreadable image gets its `error`."""
    transform, mode = preprocessing(model), image_mode(model)
    results: List[Optional[Prediction]] = [None] * len(images)
    batch: List[Tuple[int, torch.Tensor]] = []

    def run(batch: List[Tuple[int, torch.Tensor]]) -> None:
        with torch.no_grad():
            logits = model(torch.stack([x for _, x in batch]))
        for (i, _), classes in zip(batch, top(logits)):
            results[i] = Prediction(str(images[i]), classes, multi_label=multi_label)

    for i, path in enumerate(images):
        try:
            image = read_image(path).convert(mode)
        except UnreadableImage as e:
            results[i] = Prediction(str(path), error=str(e), multi_label=multi_label)
            continue
        batch.append((i, transform(image)))
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    return results


def classify_multilabel(
        model: nn.Module,
        images: Sequence[Union[str, Path]],
        thresholds: Sequence[float],
        batch_size: int = 16,
) -> List[Prediction]:
    """For each image file, the labels whose sigmoid probability under `model` (in eval mode, its pretrained
    config's preprocessing) is at or above their threshold (`multilabel.findings`), most probable first; an
    unreadable image gets its `error` and the others are still classified."""
    if len(thresholds) != model.num_classes:
        raise ValueError(f'{len(thresholds)} thresholds for {model.num_classes} labels: give one per label.')
    names = class_names(model)

    def found(logits: torch.Tensor) -> List[List[Tuple[int, str, float]]]:
        return [[(names.index(n), n, q) for n, q in findings(p, thresholds, names)] for p in logits.sigmoid().tolist()]
    return _predictions(model, images, batch_size, found, multi_label=True)


def folder_thresholds(model_name: str, model: nn.Module) -> Optional[List[float]]:
    """The per-label thresholds in the config.json of the hub folder or Hub repository `model_name` names (a
    multi-label model's), else None."""
    config = folder_config(model_name)
    return None if config is None else thresholds_from_config(config, model.num_classes)


def predict(
        model_name: str,
        images: Sequence[Union[str, Path]],
        *,
        pretrained: bool = False,
        weights: Union[str, Path, None] = None,
        top_k: int = 5,
        batch_size: int = 16,
        cam_dir: Union[str, Path, None] = None,
        cam_class: Optional[str] = None,
        force: bool = False,
) -> List[Prediction]:
    """Classify image files with a model loaded by `loading.load_model` (a variant with `pretrained` or `weights`,
    or a hub folder 'local-dir:DIR'): the top-k class names and probabilities of each image, `batch_size` images
    per forward pass. A multi-label hub folder gives every label at or above its threshold instead (`top_k` unused).

    With `cam_dir`, also write each classified image's Grad-CAM overlay (`explain.explain`) of its top class, or of
    the class named `cam_class`, as `cam_dir`/<image name>.png, recorded in its `Prediction.cam`. Everything is
    checked before anything is written: an unknown class, two images of the same name, and (unless `force`) files
    already there are refused.
    """
    if not images:
        raise ValueError('give one or more image files to classify.')
    if batch_size < 1:
        raise ValueError(f'{arg("batch_size", batch_size)}: give 1 or more.')
    if cam_class is not None and cam_dir is None:
        raise ValueError(f'{arg("cam_class", cam_class)} picks the class of the maps; give {arg("cam_dir", "DIR")} '
                         f'too, the folder they go to.')
    model = load_model(model_name, pretrained=pretrained, weights=weights)
    thresholds = folder_thresholds(model_name, model)

    def run() -> List[Prediction]:
        if thresholds is not None:
            return classify_multilabel(model, images, thresholds, batch_size=batch_size)
        return classify(model, images, top_k=top_k, batch_size=batch_size)

    if cam_dir is None:
        return run()
    from .explain import _cam_class
    _cam_class('gradcam')  # pytorch-grad-cam is installed
    class_index = None if cam_class is None else _class_index(model, cam_class)
    destinations = _cam_paths(images, Path(cam_dir), force)
    results = run()
    return [_with_cam(model, r, path, class_index, force) for r, path in zip(results, destinations)]


def _cam_paths(images: Sequence[Union[str, Path]], cam_dir: Path, force: bool) -> List[Path]:
    """cam_dir/<image name>.png for each image; ValueError or FileExistsError where one cannot be written."""
    if cam_dir.exists() and not cam_dir.is_dir():
        raise FileExistsError(f'{cam_dir}: is a file; give {arg("cam_dir", "DIR")}, a folder for the maps.')
    destinations: Dict[Path, Union[str, Path]] = {}
    for image in images:
        path = cam_dir / f'{Path(image).stem}.png'
        if path in destinations:
            raise ValueError(f'{destinations[path]} and {image} would both be explained in {path}; give images with '
                             f'different names.')
        destinations[path] = image
        if not force and (path.exists() or path.is_symlink()):
            raise FileExistsError(f'{path}: exists; pass {arg("force")} to replace it, or give another '
                                  f'{arg("cam_dir", "DIR")}.')
    return list(destinations)


def _class_index(model: nn.Module, name: str) -> int:
    from .explain import _some
    names = class_names(model)
    if name not in names:
        raise ValueError(f'{arg("cam_class", repr(name))}: not a class of the model; give one of {_some(names)}.')
    return names.index(name)


def _with_cam(model: nn.Module, result: Prediction, path: Path, class_index: Optional[int],
              force: bool) -> Prediction:
    """`result` with its image's class activation map written to `path` (none for an unreadable image)."""
    from .explain import explain
    if result.error is not None:
        return result
    path.parent.mkdir(parents=True, exist_ok=True)
    if class_index is None and result.top:
        class_index = result.top[0][0]  # else (a multi-label image without findings): the most probable label
    explain(model, result.path, class_index, overlay=path, force=force)
    return dataclasses.replace(result, cam=str(path))
