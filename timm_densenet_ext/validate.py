"""Measure a classifier on an image folder, as timm's validate.py does: top-1 and top-5 accuracy, per-class accuracy,
images/s and the confusion matrix, with the model's own preprocessing (timm's `resolve_data_config` /
`create_transform`); optionally written as results.json (timm's field names) and confusion.png.

The data is DIR/val/CLASS/IMAGE when DIR/val exists, else DIR/CLASS/IMAGE. Class folders are matched to the model's
classes by name: its `label_names` (a hub folder's config), or ImageNet's WordNet ids (n01440764) and descriptions
for an ImageNet model. A model without class names takes the folders in sorted order, as torchvision's
`ImageFolder` numbers them, when their number is its number of classes. An image that cannot be read is skipped,
counted and listed in the results.

A multi-label model (a hub folder whose config.json has `problem_type` multi_label_classification and a threshold
per label, as `finetune --multi-label` writes it) is measured on the images of a label CSV (`multilabel.read_labels`,
default DIR/labels.csv: its val/ rows when it has train/ and val/ ones, else all): per-label AUROC and their mean,
precision, recall and F1 at the folder's thresholds, and the thresholds its `threshold_rule` picks on these images,
which `write_thresholds` stores in the folder's config.json (and its card); roc.png instead of confusion.png.
"""
import csv
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

from ._evaluation import ClassResult, Probabilities, ValidateResult, evaluate_model, predict_probabilities
from ._files import claim, writing
from ._naming import arg
from .finetune import threads_for
from .hub import update_folder_config
from .images import UnreadableImage, read_image
from .loading import load_model
from .multilabel import (
    LABEL_COLUMN_NAMES, LABELS_FILE, PROBLEM_TYPE, LabelTable, MultiLabelDataset, config_entries, input_img_mode,
    read_labels, score_multilabel, thresholds_from_config)
from .model_io import class_names, folder_config, imagenet_label_config

__all__ = ['ValidateResult', 'ClassResult', 'validate', 'validate_model', 'class_indices', 'confusion_figure',
           'roc_figure', 'RESULTS_FILE', 'CONFUSION_FILE', 'ROC_FILE']

RESULTS_FILE = 'results.json'
CONFUSION_FILE = 'confusion.png'
ROC_FILE = 'roc.png'  # a multi-label model's picture instead of confusion.png
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
        targets = [target for _, target in read]  # class indices, or a multi-label target tensor per image
        return torch.stack([x for x, _ in read]), (
            torch.stack(targets) if torch.is_tensor(targets[0]) else torch.tensor(targets))


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
            threads_for=threads_for(model, batch_size, threads))
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


def _check_output(output: Path, force: bool, picture: str = CONFUSION_FILE) -> None:
    if output.exists() and not output.is_dir():
        raise ValueError(f'{output}: is a file; give {arg("output", "DIR")}, a folder for {RESULTS_FILE} and '
                         f'{picture}.')
    for name in (RESULTS_FILE, picture):
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
        labels: Union[str, Path, None] = None,
        uncertain: Optional[int] = None,
        write_thresholds: bool = False,
) -> ValidateResult:
    """Measure a model loaded by `loading.load_model` (a variant with `pretrained` or `weights`, or a hub folder
    'local-dir:DIR') on the image folder `data_dir` (DIR/val if it exists, else DIR; see `validate_model`).

    A multi-label hub folder is measured on the images of the label CSV `labels` (default DIR/labels.csv; its
    val/ rows when it has train/ and val/ ones; `uncertain`: what CheXpert's -1 counts as, see
    `multilabel.read_labels`): per-label AUROC, their mean, and the thresholds its rule picks on these images,
    which `write_thresholds` stores in its config.json (and its card, when unedited); a label the images hold only
    one class of has neither AUROC nor a picked threshold, and keeps its own.

    `output`: a folder to write results.json and confusion.png (roc.png for a multi-label model) into (existing
    files are replaced only with `force`). `progress`: a bar on stderr (None: when it is a terminal). Returns a
    `ValidateResult`; bad input raises ValueError, FileNotFoundError or FileExistsError in one line, before
    anything is written.
    """
    if batch_size < 1:
        raise ValueError(f'{arg("batch_size", batch_size)}: give 1 or more.')
    output = Path(output) if output is not None else None
    config = _folder_config(model_name)
    if config is not None and config.get('problem_type') == PROBLEM_TYPE:
        return _validate_multilabel(
            model_name, config, data_dir, output, labels=labels, uncertain=uncertain,
            write_thresholds=write_thresholds, pretrained=pretrained, weights=weights, batch_size=batch_size,
            img_size=img_size, force=force, progress=progress, threads=threads)
    given = next((name for name, value in (('labels', labels), ('uncertain', uncertain),
                                           ('write_thresholds', write_thresholds)) if value not in (None, False)), None)
    if given is not None:
        raise ValueError(f'{arg(given, "...") if given != "write_thresholds" else arg(given)}: is for multi-label '
                         f'models (a hub folder whose config.json says problem_type {PROBLEM_TYPE}); {model_name} '
                         f'is single-label: leave it out.')
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


def _write_outputs(result: ValidateResult, output: Path, force: bool,
                   predictions: Optional[Probabilities] = None) -> List[Path]:
    """Write confusion.png (roc.png for a multi-label model's `predictions`), then results.json, into `output`;
    their paths, results.json first."""
    figure = confusion_figure(result) if predictions is None else roc_figure(result, predictions)
    output.mkdir(exist_ok=True)
    results = output / RESULTS_FILE
    confusion = output / (CONFUSION_FILE if predictions is None else ROC_FILE)
    with writing(confusion, force=force, exists_message=_exists_message(confusion)) as tmp:
        figure.savefig(tmp, format='png', dpi=_DPI)
    with writing(results, force=force, exists_message=_exists_message(results)) as tmp:
        tmp.write_text(json.dumps(result.to_json(), indent=2) + '\n')
    return [results, confusion]


# ---- multi-label models: per-label AUROC on a label CSV's images, and thresholds picked on them

def _folder_config(model_name: str) -> Optional[Dict[str, Any]]:
    """The config.json of the hub folder or Hub repository `model_name` names; None for a variant, and for one that
    cannot be read (`load_model` then says what is wrong)."""
    try:
        config = folder_config(model_name)
    except Exception:  # missing, unreachable or not JSON: not ours to report here
        return None
    return config if isinstance(config, dict) else None


def _validate_multilabel(model_name: str, config: Dict[str, Any], data_dir: Union[str, Path], output: Optional[Path],
                         *, labels: Union[str, Path, None], uncertain: Optional[int], write_thresholds: bool,
                         pretrained: bool, weights: Union[str, Path, None], batch_size: int, img_size: Optional[int],
                         force: bool, progress: Optional[bool], threads: Optional[int]) -> ValidateResult:
    """`validate` for a multi-label hub folder with config.json `config`; everything checked before it measures."""
    folder = _writable_folder(model_name) if write_thresholds else None
    if output is not None:
        _check_output(output, force, ROC_FILE)
        _matplotlib()
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f'{data_dir}: no such folder; give {arg("data_dir", "DIR")}, the folder the label '
                                f'CSV\'s file names are relative to.')
    csv_path = Path(labels) if labels is not None else data_dir / LABELS_FILE
    if not csv_path.is_file():
        raise FileNotFoundError(
            f'{csv_path}: no such file; {model_name} is multi-label: give {arg("labels", "CSV")}, a row per image '
            f'with its labels (default DIR/{LABELS_FILE}).')
    model = load_model(model_name, pretrained=pretrained, weights=weights)
    thresholds = thresholds_from_config(config, model.num_classes)
    rule = config.get('threshold_rule') or 'f1'
    names = [str(n) for n in config.get('label_names') or []]
    if len(names) != model.num_classes:
        raise ValueError(f'{model_name}: config.json names {len(names)} labels for {model.num_classes} outputs; '
                         f'write the folder again with finetune.')
    data = _prepare_multilabel(model, data_dir, _label_table(csv_path, data_dir, names, uncertain), img_size)
    if output is None:
        result, _ = _measure_multilabel(model, data, thresholds, rule, batch_size, progress, threads, model_name)
    else:
        output.absolute().parent.mkdir(parents=True, exist_ok=True)
        with claim(output):
            _check_output(output, force, ROC_FILE)
            result, predictions = _measure_multilabel(model, data, thresholds, rule, batch_size, progress, threads,
                                                      model_name)
            result = dataclasses.replace(result, files=_write_outputs(result, output, force, predictions))
    if folder is not None:
        picked = [c.threshold if c.picked_threshold is None else c.picked_threshold for c in result.per_class]
        result = dataclasses.replace(result, files=result.files + update_folder_config(
            folder, config_entries(picked, rule)))
    return result


def _writable_folder(model_name: str) -> Path:
    """The hub folder `write_thresholds` writes into: a local-dir: one."""
    if not model_name.startswith('local-dir:'):
        raise ValueError(f'{arg("write_thresholds")}: writes into a hub folder; give -m local-dir:DIR (a Hub '
                         f'repository is not written to), or leave it out.')
    return Path(model_name[len('local-dir:'):])


def _label_table(csv_path: Path, data_dir: Path, names: List[str], uncertain: Optional[int]) -> LabelTable:
    """The rows of the label CSV for `data_dir` to measure on (val/ when it has train/ and val/ rows, else all),
    with the model's labels `names` in its order; one line when the CSV's labels are not the model's."""
    header = _csv_header(csv_path)
    listed = ', '.join(names)
    if any(h.lower() in LABEL_COLUMN_NAMES for h in header[1:]):  # 'file,labels' with a|b
        table = read_labels(csv_path, data_dir, uncertain=uncertain)
        unknown = [n for n in table.names if n not in names]
        if unknown:
            more = f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''
            raise ValueError(f'{csv_path}: names label {unknown[0]!r}{more}, which the model does not know; give a '
                             f'CSV of its labels ({listed}).')
        index = [table.names.index(n) if n in table.names else None for n in names]
        targets = tuple(tuple(0 if i is None else t[i] for i in index) for t in table.targets)
        table = LabelTable(tuple(names), table.files, targets, table.source)
    else:  # a 0/1 column per label: the model's; other columns (CheXpert's Sex, Age) are not read
        missing = [n for n in names if n not in header[1:]] if header else []
        if missing:
            more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
            raise ValueError(f'{csv_path}: has no column for the model\'s label {missing[0]!r}{more}; give a CSV '
                             f'with a 0/1 column per label of the model ({listed}).')
        table = read_labels(csv_path, data_dir, label_names=names, uncertain=uncertain)
    split = any(f.startswith(('train/', 'val/')) for f in table.files)
    return table.split('val') if split else table


def _csv_header(csv_path: Path) -> List[str]:
    """The label CSV's header cells, stripped; [] when it cannot be read (`read_labels` then says why)."""
    try:
        with open(csv_path, newline='', encoding='utf-8-sig') as f:
            return [h.strip() for h in next(csv.reader(f), [])]
    except (UnicodeDecodeError, csv.Error):
        return []


class _ReadOrError(torch.utils.data.Dataset):
    """A `MultiLabelDataset`'s items as (image, target, None), or (None, target, error) for an unreadable image."""

    def __init__(self, dataset: MultiLabelDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Tuple[Optional[torch.Tensor], torch.Tensor, Optional[str]]:
        try:
            return (*self.dataset[i], None)
        except UnreadableImage as e:
            return None, self.dataset.targets[i], str(e)


def _prepare_multilabel(model: nn.Module, data_dir: Path, table: LabelTable, img_size: Optional[int]) -> _Data:
    """The label table's images, read in the model's mode ('L' for 1 channel) with its eval preprocessing."""
    import timm
    config = _data_config(model, img_size)
    dataset = MultiLabelDataset(data_dir, table, timm.data.create_transform(**config), input_img_mode(config))
    folder = data_dir / 'val' if all(f.startswith('val/') for f in table.files) else data_dir
    return _Data(_ReadOrError(dataset), _SkipUnreadable(), None, folder, config)


def _measure_multilabel(model: nn.Module, data: _Data, thresholds: List[float], rule: str, batch_size: int,
                        progress: Optional[bool], threads: Optional[int],
                        model_name: str) -> Tuple[ValidateResult, Probabilities]:
    previous = torch.get_num_threads()
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=batch_size, shuffle=False, collate_fn=data.collate)
    try:
        predictions = predict_probabilities(
            model, loader, progress=progress,
            threads_for=threads_for(model, batch_size, threads))
    finally:
        torch.set_num_threads(previous)
    unreadable = data.collate.unreadable
    if not len(predictions.targets):
        raise ValueError(f'{data.folder}: none of its {len(data.dataset)} images could be read ({unreadable[0]}).')
    result = score_multilabel(predictions, data.dataset.dataset.table.names, thresholds, rule=rule,
                              model=model_name, param_count=sum(p.numel() for p in model.parameters()))
    config = data.config
    return dataclasses.replace(
        result, images=len(data.dataset), unreadable=unreadable, data_dir=data.folder,
        img_size=config['input_size'][-1], crop_pct=config.get('crop_pct'),
        interpolation=config.get('interpolation')), predictions


def roc_figure(result: ValidateResult, predictions: Probabilities):
    """A multi-label model's ROC curve per label (scikit-learn's `roc_curve`) as a matplotlib `Figure`, each label
    with its AUROC in the legend and a dot where its threshold puts it; labels without an AUROC are listed, not
    drawn."""
    from sklearn.metrics import roc_curve
    _, Figure = _matplotlib()
    p, t = predictions.probabilities.double().numpy(), predictions.targets.numpy()
    figure = Figure(figsize=(6.4, 5.6), layout='constrained')
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], linestyle='--', color='0.6', linewidth=1, label='chance (AUROC 0.5)')
    for j, label in enumerate(result.per_class):
        color = _color(j, len(result.per_class))
        if label.auroc is None:
            ax.plot([], [], ' ', label=f'{_short(label.name)}: no AUROC (one class only)')
            continue
        fpr, tpr, _ = roc_curve(t[:, j], p[:, j])
        ax.plot(fpr, tpr, color=color, linewidth=1.5, label=f'{_short(label.name)} (AUROC {label.auroc:.3f})')
        present = p[:, j] >= label.threshold
        ax.plot(present[t[:, j] == 0].mean(), present[t[:, j] == 1].mean(), 'o', color=color, markersize=5)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect('equal')
    ax.set_xlabel('false positive rate (1 - specificity)')
    ax.set_ylabel('true positive rate (sensitivity)')
    mean = 'undefined' if result.mean_auroc is None else f'{result.mean_auroc:.4f}'
    ax.set_title(f'{_short(Path(result.model).name, 48)}: mean AUROC {mean} on {result.evaluated} images\n'
                 f'(dots: each label at its threshold)', fontsize=10)
    ax.legend(loc='lower right', fontsize=8 if len(result.per_class) <= 10 else 6)
    return figure


def _color(j: int, n: int) -> Any:
    from matplotlib import colormaps
    return colormaps['tab10' if n <= 10 else 'tab20'](j % (10 if n <= 10 else 20))


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
        raise ImportError("validate draws its pictures (confusion.png, roc.png) with matplotlib: pip install "
                          f"'timm-densenet-ext[validate]', or leave out {arg('output', 'DIR')}.") from None
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
