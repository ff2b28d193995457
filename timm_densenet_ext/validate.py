"""Measure a classifier on an image folder, as timm's validate.py does: top-1 and top-5 accuracy, per-class accuracy,
images/s and the confusion matrix, with the model's own preprocessing (timm's `resolve_data_config` /
`create_transform`); optionally written as results.json (timm's field names) and confusion.png.

The data is DIR/val/CLASS/IMAGE when DIR/val exists, else DIR/CLASS/IMAGE. Class folders are matched to the model's
classes by name: its `label_names` (a hub folder's config), or ImageNet's WordNet ids (n01440764) and descriptions
for an ImageNet model. A model without class names takes the folders in sorted order, as torchvision's
`ImageFolder` numbers them, when their number is its number of classes. An image that cannot be read is skipped,
counted and listed in the results.
"""
import dataclasses
import json
import math
import re
import sys
import types
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ._evaluation import ClassResult, ValidateResult, evaluate_model
from ._files import claim, writing
from ._naming import arg
from .finetune import choose_threads
from .images import UnreadableImage, read_image
from .loading import load_model
from .predict import class_names, imagenet_label_config

__all__ = ['ValidateResult', 'ClassResult', 'validate', 'validate_model', 'class_indices', 'confusion_figure',
           'RESULTS_FILE', 'CONFUSION_FILE']

RESULTS_FILE = 'results.json'
CONFUSION_FILE = 'confusion.png'
_LAYOUT = 'DIR/val/CLASS/IMAGE or DIR/CLASS/IMAGE, one sub-folder of images per class'


def _image_folder(data_dir: Union[str, Path]) -> Path:
    """DIR/val if it is a folder, else DIR."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f'{data_dir}: no such folder; give {arg("data_dir", "DIR")}, arranged as {_LAYOUT}.')
    return data_dir / 'val' if (data_dir / 'val').is_dir() else data_dir


def _samples(folder: Path) -> Tuple[List[str], List[Tuple[str, str]]]:
    """The class folders of `folder` (sorted) and its image files as (path, class folder); one-line errors for a
    folder without class folders and a class folder without images."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    try:
        classes = find_classes(str(folder))[0]
    except FileNotFoundError:
        raise ValueError(f'{folder}: holds no class folders; arrange the images as {_LAYOUT}.') from None
    samples = make_dataset(str(folder), {c: i for i, c in enumerate(classes)}, IMG_EXTENSIONS, allow_empty=True)
    counts = np.bincount([i for _, i in samples], minlength=len(classes))
    if not counts.all():
        empty = folder / classes[int(np.argmin(counts))]
        raise ValueError(f'{empty}: holds no image files ({", ".join(IMG_EXTENSIONS)}); put its images in it, or '
                         f'remove the folder.')
    return classes, [(path, classes[i]) for path, i in samples]


def _label_lists(model: nn.Module) -> List[List[str]]:
    """The names a class folder may have, as lists indexed by class: the config's `label_names`, ImageNet's WordNet
    ids, and the names `predict` shows (with their descriptions)."""
    n, names = model.num_classes, model.pretrained_cfg.get('label_names')
    lists = []
    if isinstance(names, dict):  # timm allows {index: name} when indices have gaps
        names = [names.get(i, names.get(str(i))) for i in range(n)]
    if names and len(names) == n:
        lists.append([str(name) for name in names])
    lists.append(imagenet_label_config(model).get('label_names') or [])
    lists.append(class_names(model))
    return lists


def class_indices(model: nn.Module, folders: Sequence[str], root: Union[str, Path] = '') -> Dict[str, int]:
    """The model's class index of each class folder name, matched by name (see the module's rules); ValueError in
    one line for a folder the model's labels do not know. `root` (the folders' parent) names them in errors."""
    n, root = model.num_classes, Path(root)
    if not n:
        raise ValueError('the model has no classifier (num_classes=0); give a model that classifies.')
    lists = _label_lists(model)
    if all(re.fullmatch(r'class \d+', name) for name in lists[-1]):  # no names: torchvision ImageFolder's order
        if len(folders) != n:
            raise ValueError(
                f'{root}: {len(folders)} class folders, but the model has {n} classes and no class names to match '
                f'them by; give a model with class names (a hub folder from finetune), or {n} class folders.')
        return {folder: i for i, folder in enumerate(sorted(folders))}
    known: Dict[str, int] = {}
    for names in lists:
        for i, name in enumerate(names):
            known.setdefault(name, i)
    unknown = [folder for folder in folders if folder not in known]
    if unknown:
        more = f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''
        examples = ', '.join(lists[0][:5] if lists[0] else lists[-1][:5])
        raise ValueError(
            f'{root / unknown[0]}: a class folder the model\'s labels do not know{more}; name each class folder as '
            f'the model names its class ({examples}, ...), or remove it.')
    return {folder: known[folder] for folder in folders}


class _LabelledImages(torch.utils.data.Dataset):
    """Image files with their model class index, read by `images.read_image`; an unreadable one gives its error
    instead of a tensor."""

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Any):
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[Optional[torch.Tensor], int, Optional[str]]:
        path, target = self.samples[i]
        try:
            return self.transform(read_image(path)), target, None
        except UnreadableImage as e:
            return None, target, str(e)


class _SkipUnreadable:
    """A DataLoader's collate_fn that stacks the readable images of a batch and keeps the others' errors."""

    def __init__(self):
        self.unreadable: List[str] = []

    def __call__(self, batch: Sequence[Tuple[Optional[torch.Tensor], int, Optional[str]]]):
        self.unreadable += [error for _, _, error in batch if error is not None]
        read = [(x, target) for x, target, error in batch if error is None]
        if not read:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return torch.stack([x for x, _ in read]), torch.tensor([target for _, target in read])


def _data_config(model: nn.Module, img_size: Optional[int]) -> Dict[str, Any]:
    import timm
    config = timm.data.resolve_data_config(model=model)
    if img_size is None:
        return config
    if img_size < 1:
        raise ValueError(f'{arg("img_size", img_size)}: give a size in pixels.')
    return timm.data.resolve_data_config({'input_size': (config['input_size'][0], img_size, img_size)}, model=model)


@dataclasses.dataclass(frozen=True)
class _Data:
    """What a model is measured on: the dataset, its collate_fn, the model classes it holds (None: those among its
    targets), its folder, and the data config of its transform."""
    dataset: Any
    collate: Optional[_SkipUnreadable]
    labels: Optional[List[int]]
    folder: Optional[Path]
    config: Dict[str, Any]


def _prepare(model: nn.Module, data: Union[str, Path, torch.utils.data.Dataset], img_size: Optional[int]) -> _Data:
    """The data to measure `model` on, checked: one-line errors for a missing or empty folder and for a class folder
    the model does not know."""
    import timm
    if isinstance(data, torch.utils.data.Dataset):
        if img_size is not None:
            raise ValueError(f'{arg("img_size", img_size)} applies to an image folder; a dataset brings its own '
                             f'transform: leave it out.')
        if not len(data):
            raise ValueError('the dataset holds no images; give one with labelled images.')
        return _Data(data, None, None, None, {})  # its own transform: sizes as it makes them
    config = _data_config(model, img_size)
    folder = _image_folder(data)
    folders, files = _samples(folder)
    index = class_indices(model, folders, folder)
    dataset = _LabelledImages([(path, index[c]) for path, c in files], timm.data.create_transform(**config))
    return _Data(dataset, _SkipUnreadable(), [index[c] for c in folders], folder, config)


def _measure(model: nn.Module, data: _Data, batch_size: int, progress: Optional[bool], threads: Optional[int],
             model_name: str) -> ValidateResult:
    previous = torch.get_num_threads()
    try:
        result = evaluate_model(
            model, data.dataset, batch_size=batch_size, progress=progress, names=class_names(model),
            labels=data.labels, model_name=model_name, collate_fn=data.collate,
            threads_for=lambda shape: choose_threads(batch_size, shape, _width(model), threads))
    finally:
        torch.set_num_threads(previous)
    unreadable = data.collate.unreadable if data.collate is not None else []
    if not result.evaluated:
        raise ValueError(f'{data.folder}: none of its {len(data.dataset)} images could be read ({unreadable[0]}).')
    config = data.config
    return dataclasses.replace(
        result, images=len(data.dataset), unreadable=unreadable, data_dir=data.folder,
        img_size=config['input_size'][-1] if config else result.img_size, crop_pct=config.get('crop_pct'),
        interpolation=config.get('interpolation'))


def validate_model(
        model: nn.Module,
        data: Union[str, Path, torch.utils.data.Dataset],
        *,
        batch_size: int = 64,
        img_size: Optional[int] = None,
        progress: Optional[bool] = None,
        threads: Optional[int] = None,
        model_name: Optional[str] = None,
) -> ValidateResult:
    """Measure `model` on `data`: an image folder (DIR/val or DIR, one sub-folder per class, matched to the model's
    classes by name), read with the model's eval preprocessing at `img_size` pixels (default: its own); or a dataset
    of (image tensor, model class index) pairs, used as it is (its own transform). `threads`: CPU threads for torch
    (default: `finetune.choose_threads`; torch's count is restored afterwards). `model_name` names it in the
    results."""
    if batch_size < 1:
        raise ValueError(f'{arg("batch_size", batch_size)}: give 1 or more.')
    model_name = model_name or model.pretrained_cfg.get('architecture') or type(model).__name__
    return _measure(model, _prepare(model, data, img_size), batch_size, progress, threads, model_name)


def _width(model: nn.Module) -> int:
    return int(getattr(model, 'num_features', 0) or 1024)


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ValueError(f'{output}: is a file; give {arg("output", "DIR")}, a folder for {RESULTS_FILE} and '
                         f'{CONFUSION_FILE}.')
    for name in (RESULTS_FILE, CONFUSION_FILE):
        if (output / name).exists() and not force:
            raise FileExistsError(_exists_message(output / name))


def _exists_message(path: Path) -> str:
    return f'{path}: exists; pass {arg("force")} to replace it, or choose another {arg("output", "DIR")}.'


def validate(
        model_name: str,
        data_dir: Union[str, Path],
        *,
        pretrained: bool = False,
        weights: Union[str, Path, None] = None,
        batch_size: int = 64,
        img_size: Optional[int] = None,
        output: Union[str, Path, None] = None,
        force: bool = False,
        progress: Optional[bool] = None,
        threads: Optional[int] = None,
) -> ValidateResult:
    """Measure a model loaded by `loading.load_model` (a variant with `pretrained` or `weights`, or a hub folder
    'local-dir:DIR') on the image folder `data_dir` (DIR/val if it exists, else DIR; see `validate_model`).

    `output`: a folder to write results.json and confusion.png into (existing files are replaced only with
    `force`). `progress`: a bar on stderr (None: when it is a terminal). Returns a `ValidateResult`; bad input
    raises ValueError, FileNotFoundError or FileExistsError in one line, before anything is written.
    """
    if batch_size < 1:
        raise ValueError(f'{arg("batch_size", batch_size)}: give 1 or more.')
    output = Path(output) if output is not None else None
    if output is not None:
        _check_output(output, force)
        _matplotlib()  # before the images are measured
    _image_folder(data_dir)
    model = load_model(model_name, pretrained=pretrained, weights=weights)
    data = _prepare(model, data_dir, img_size)
    if output is None:
        return _measure(model, data, batch_size, progress, threads, model_name)
    output.absolute().parent.mkdir(parents=True, exist_ok=True)
    with claim(output):
        _check_output(output, force)  # again: another process may have written them meanwhile
        result = _measure(model, data, batch_size, progress, threads, model_name)
        return dataclasses.replace(result, files=_write_outputs(result, output, force))


def _write_outputs(result: ValidateResult, output: Path, force: bool) -> List[Path]:
    """Write confusion.png, then results.json, into `output`; their paths, results.json first."""
    figure = confusion_figure(result)
    output.mkdir(exist_ok=True)
    results, confusion = output / RESULTS_FILE, output / CONFUSION_FILE
    with writing(confusion, force=force, exists_message=_exists_message(confusion)) as tmp:
        figure.savefig(tmp, format='png', dpi=_DPI)
    with writing(results, force=force, exists_message=_exists_message(results)) as tmp:
        tmp.write_text(json.dumps(result.to_json(), indent=2) + '\n')
    return [results, confusion]


# ---- the confusion matrix as a picture

_DPI = 100
_MAX_SIDE = 18.0  # inches of the matrix: 100 classes get 0.18 in (13 points, 18 pixels) a cell
_MAX_TICKS = 100  # more classes: every k-th name, so that the names stay apart
_ANNOTATE = 15  # up to this many classes: the counts in the cells


def _short(name: str, width: int = 24) -> str:
    """A class name for an axis: its first comma-separated part (ImageNet's 'tench, Tinca tinca'), cut to `width`."""
    name = name.split(',')[0].strip() or name
    return name if len(name) <= width else name[:width - 1] + '…'


def _matplotlib() -> Tuple[type, type]:
    """matplotlib's PowerNorm and Figure; ImportError with the install hint if it is missing."""
    try:
        from matplotlib.colors import PowerNorm
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("confusion.png is drawn by matplotlib: pip install 'timm-densenet-ext[validate]', or leave "
                          f'out {arg("output", "DIR")}.') from None
    return PowerNorm, Figure


def confusion_figure(result: ValidateResult):
    """The confusion matrix as a matplotlib `Figure`: each row (true class) as fractions of its images, so that
    classes of every size read alike, on a square-root colour scale with its bar; the class names on both axes, and
    the counts in the cells up to 15 classes; the matrix 0.45 in a class up to 18 in (100 classes), names thinned to
    100 beyond that."""
    PowerNorm, Figure = _matplotlib()
    counts = result.confusion
    rows, cols = counts.shape
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = max(rows, cols)
    side = min(_MAX_SIDE, max(3.5, 0.45 * n))
    cell_pt = 72 * side / n
    font = min(10.0, max(4.0, 0.6 * cell_pt * max(1, math.ceil(n / _MAX_TICKS))))
    ylabels, xlabels = [_short(c) for c in result.classes], [_short(c) for c in result.predicted]
    margin = max(len(s) for s in ylabels + xlabels) * font * 0.6 / 72 + 0.9
    figure = Figure(figsize=(side + margin + 1.4, side + margin + 0.9), layout='constrained')
    ax = figure.subplots()
    # a square-root colour scale: one image in fifty still shows (0.02 is drawn as 0.14)
    image = ax.imshow(fractions, cmap='Blues', norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation='nearest',
                      aspect='equal')
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02).set_label("fraction of the true class's images")
    step = max(1, math.ceil(n / _MAX_TICKS))
    rotate = 90 if max(len(s) for s in xlabels) > 3 else 0
    ax.set_xticks(range(0, cols, step), xlabels[::step], fontsize=font, rotation=rotate)
    ax.set_yticks(range(0, rows, step), ylabels[::step], fontsize=font)
    ax.set_xlabel('predicted class')
    ax.set_ylabel('true class')
    top5 = f', top-5 {result.top5:.2f}%' if result.top5 is not None else ''
    ax.set_title(f'{_short(Path(result.model).name, 48)}: top-1 {result.top1:.2f}%{top5} on {result.evaluated} '
                 f'images', fontsize=10)
    if n <= _ANNOTATE:
        for (i, j), count in np.ndenumerate(counts):
            if count:
                ax.text(j, i, str(count), ha='center', va='center', fontsize=font,
                        color='white' if fractions[i, j] > 0.5 else 'black')
    return figure


class _CallableModule(types.ModuleType):
    """This module, callable as its workflow: `timm_densenet_ext.validate(...)` runs `validate` whether the package's
    name is bound to the function (its lazy export) or to this module (bound by any `import timm_densenet_ext.validate`
    or `from timm_densenet_ext.validate import ...`, which takes precedence)."""

    def __call__(self, *args: Any, **kwargs: Any) -> ValidateResult:
        return validate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
