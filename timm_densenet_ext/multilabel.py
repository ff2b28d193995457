"""Multi-label images, CheXNet / torchxrayvision style: several findings per image, a sigmoid per finding and a
threshold per finding.

- `read_labels`: a label CSV in either of its usual forms, checked against the image folder, as a `LabelTable`.
  The form is told by the header. The first column names the image file, relative to the image folder
  (sub-folders allowed: 'train/0001.png', CheXpert's 'CheXpert-v1.0-small/train/patient00001/study1/view1.jpg').
  - 'pipe' form: a column headed `labels` (or `label`, `findings`, `Finding Labels` as in NIH ChestX-ray14) holds
    each image's labels as `a|b`; empty means no finding. Other columns are ignored. Labels are sorted by name
    unless `label_names=` gives their order.
  - 'columns' form (CheXpert's CSV): one column per label holding 1 (present), 0 or blank (absent: CheXpert leaves
    unmentioned findings blank) or -1 (uncertain: refused unless `uncertain=` maps it to 0 or 1, the CheXpert
    paper's U-Zeros and U-Ones). Every column after the first is a label, in the header's order, unless
    `label_names=` names the label columns (then the others, e.g. CheXpert's Sex and Age, are ignored).
  One CSV can serve both splits: rows name 'train/...' and 'val/...' files, and `LabelTable.split('train')` keeps
  the rows under a folder (`write_shapes_multilabel` writes data this way).
- `MultiLabelDataset`: the images (read by `images.read_image`; 'L' for a 1-channel model) with float32 targets.
- `grayscale_data_config`: timm's data config for a 1-channel model: input (1, H, W) and one mean and std, used by
  timm's `create_transform` alike for training and evaluation.
- `auroc_per_label` and `pick_thresholds`: scikit-learn's `roc_auc_score` and `precision_recall_curve` / `roc_curve`
  per label; `findings`: the labels at or above their threshold.
- `evaluate_multilabel`: a model's sigmoid probabilities over a `MultiLabelDataset`, their per-label AUROC, the
  thresholds picked on them and the images whose every label they get right (finetune's per-epoch measure);
  `score_multilabel`: the same probabilities (`_evaluation.predict_probabilities`) as validate's `ValidateResult`.
- `write_shapes_multilabel`: generated grayscale images with four independent findings, for tests and demos.
"""
import csv
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torchvision.datasets.folder import IMG_EXTENSIONS  # the image files ImageFolder reads

from ._evaluation import ClassResult, Probabilities, ValidateResult, predict_probabilities
from ._files import writing
from ._naming import arg
from .images import read_image

__all__ = ['LabelTable', 'LABELS_FILE', 'LABEL_COLUMN_NAMES', 'FORMS', 'SHAPES', 'THRESHOLD_RULES', 'read_labels',
           'write_labels', 'MultiLabelDataset', 'input_img_mode', 'grayscale_data_config', 'auroc_per_label',
           'pick_thresholds', 'findings', 'PROBLEM_TYPE', 'config_entries', 'thresholds_from_config',
           'evaluate_multilabel', 'score_multilabel', 'write_shapes_multilabel']

LABELS_FILE = 'labels.csv'
FORMS = ('pipe', 'columns')
# headers (lower case) of the one column holding `a|b` labels: the 'pipe' form
LABEL_COLUMN_NAMES = ('labels', 'label', 'findings', 'finding labels')
SHAPES = ('bar', 'disk', 'ring', 'square')  # the generated findings, in the label order `read_labels` gives them
THRESHOLD_RULES = {'f1': 'the highest F1', 'youden': "the highest Youden's J"}  # rule: what it picks
PROBLEM_TYPE = 'multi_label_classification'  # config.json's problem_type, as transformers names it


@dataclass(frozen=True)
class LabelTable:
    """Label names in a fixed order, and per image file (a POSIX path relative to the image folder) a 0/1 target per
    label, in the CSV's row order."""
    names: Tuple[str, ...]
    files: Tuple[str, ...]
    targets: Tuple[Tuple[int, ...], ...]
    source: str = field(default='', compare=False)  # the CSV it was read from, for messages

    def __len__(self) -> int:
        return len(self.files)

    def matrix(self) -> np.ndarray:
        """The targets as an (images, labels) float32 array."""
        return np.array(self.targets, dtype=np.float32).reshape(len(self.files), len(self.names))

    def positives(self) -> Dict[str, int]:
        """How many images have each label."""
        return dict(zip(self.names, (int(n) for n in self.matrix().sum(axis=0))))

    def split(self, folder: str) -> 'LabelTable':
        """The rows of images under `folder` ('train', 'val'); ValueError when there are none."""
        prefix = PurePosixPath(folder).as_posix().strip('/') + '/'
        keep = [i for i, f in enumerate(self.files) if f.startswith(prefix)]
        if not keep:
            raise ValueError(f'{self.source or "the label table"}: has no rows for images in {prefix}; add rows '
                             f'naming {prefix}IMAGE for each of its images.')
        return LabelTable(self.names, tuple(self.files[i] for i in keep), tuple(self.targets[i] for i in keep),
                          self.source)


def read_labels(
        csv_path: Union[str, Path],
        image_dir: Union[str, Path],
        *,
        label_names: Optional[Sequence[str]] = None,
        uncertain: Optional[int] = None,
) -> LabelTable:
    """Read a label CSV (the 'pipe' or the 'columns' form, told by its header: see the module) for the images in
    `image_dir`. `label_names`: the labels and their order (a list, or one string 'a,b' as a command line gives it;
    a label outside them is refused); `uncertain`: 0 or 1 for the 'columns' form's -1, which is refused without it.

    Raises FileNotFoundError or ValueError, one line naming the file and the fix, for a malformed CSV, duplicate
    rows, an unknown label, no label anywhere, a row naming a missing image, or an image beside the listed ones
    (in a folder holding one of them) without a row.
    """
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    if uncertain not in (None, 0, 1):
        raise ValueError(f'{arg("uncertain", uncertain)}: give 0 or 1 (what an uncertain -1 counts as), or leave it '
                         f'out to refuse uncertain values.')
    if isinstance(label_names, str):
        label_names = label_names.split(',')
    labels = None if label_names is None else _checked_names(list(label_names), arg('label_names', 'NAMES'))
    if not image_dir.is_dir():
        raise FileNotFoundError(f'{image_dir}: no such folder; give the folder the CSV\'s file names are relative to.')
    header, rows = _read_csv(csv_path)
    column = next((i for i, h in enumerate(header[1:], 1) if h.strip().lower() in LABEL_COLUMN_NAMES), None)
    if column is not None:
        names, targets = _pipe_targets(csv_path, rows, column, labels)
    else:
        names, targets = _column_targets(csv_path, header, rows, labels, uncertain)
    files = _image_files(csv_path, image_dir, rows)
    table = LabelTable(tuple(names), tuple(files), tuple(targets), str(csv_path))
    if not any(any(t) for t in table.targets):
        raise ValueError(f'{csv_path}: no image has any label (an empty label set); give each finding\'s images '
                         f'their labels.')
    return table


def _checked_names(names: List[str], what: str) -> List[str]:
    names = [n.strip() for n in names]
    if not names:
        raise ValueError(f'{what}: names no labels (an empty label set); give one or more label names.')
    bad = next((n for n in names if not n or '|' in n), None)
    if bad is not None:
        raise ValueError(f'{what}: {bad!r} is not a label name; give names that are not empty and hold no |.')
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise ValueError(f'{what}: names {twice!r} twice; give each label once.')
    return names


def _read_csv(csv_path: Path) -> Tuple[List[str], List[Tuple[int, List[str]]]]:
    """The header and the (line number, cells) of each non-blank row, every row as wide as the header."""
    if not csv_path.is_file():
        raise FileNotFoundError(f'{csv_path}: no such file; give the label CSV of the images.')
    fix = 'give a CSV with a header: the file column, then `labels` (a|b) or one 0/1 column per label'
    try:
        with open(csv_path, newline='', encoding='utf-8-sig') as f:
            lines = [(reader.line_num, row) for reader in [csv.reader(f, strict=True)] for row in reader if row]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f'{csv_path}: not a readable UTF-8 CSV ({e}); {fix}.') from None
    if not lines:
        raise ValueError(f'{csv_path}: is empty; {fix}.')
    header = [h.strip() for h in lines[0][1]]
    if len(header) < 2 or not all(header):
        raise ValueError(f'{csv_path}: its header {",".join(header)!r} has an empty or a single column; {fix}.')
    if len(set(header)) < len(header):
        raise ValueError(f'{csv_path}: its header names a column twice; name each column once.')
    for line, row in lines[1:]:
        if len(row) != len(header):
            raise ValueError(f'{csv_path} line {line}: has {len(row)} cells where the header has {len(header)}; '
                             f'give every row one cell per column (quote cells that hold commas).')
    if len(lines) == 1:
        raise ValueError(f'{csv_path}: has a header but no rows; add a row per image.')
    return header, lines[1:]


def _pipe_targets(csv_path: Path, rows: List[Tuple[int, List[str]]], column: int,
                  labels: Optional[List[str]]) -> Tuple[List[str], List[Tuple[int, ...]]]:
    sets = [{n.strip() for n in row[column].split('|')} - {''} for _, row in rows]
    found = set().union(*sets)
    if labels is None:
        names = sorted(found)
        if not names:
            raise ValueError(f'{csv_path}: no row names a label (an empty label set); give each image its labels '
                             f'as a|b.')
    else:
        names = labels
        unknown = sorted(found - set(names))
        if unknown:
            line = next(line for (line, _), s in zip(rows, sets) if unknown[0] in s)
            raise ValueError(f'{csv_path} line {line}: unknown label {unknown[0]!r}'
                             f'{f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""}; add it to '
                             f'{arg("label_names", "NAMES")} ({", ".join(names)}) or correct the row.')
    return names, [tuple(int(n in s) for n in names) for s in sets]


def _column_targets(csv_path: Path, header: List[str], rows: List[Tuple[int, List[str]]],
                    labels: Optional[List[str]], uncertain: Optional[int]) -> Tuple[List[str], List[Tuple[int, ...]]]:
    names = labels if labels is not None else _checked_names(header[1:], f'{csv_path}: its header')
    missing = [n for n in names if n not in header[1:]]
    if missing:
        raise ValueError(f'{csv_path}: has no column for label {missing[0]!r}; add a 0/1 column per label, or give '
                         f'{arg("label_names", "NAMES")} among its columns ({", ".join(header[1:])}).')
    columns = [header.index(n) for n in names]
    values = {'1': 1, '1.0': 1, '0': 0, '0.0': 0, '': 0, '-1': uncertain, '-1.0': uncertain}
    targets = []
    for line, row in rows:
        target = tuple(values.get(row[c].strip(), -2) for c in columns)
        for value, c in zip(target, columns):
            if value is None:
                raise ValueError(f'{csv_path} line {line}: {header[c]} is -1 (uncertain); pass '
                                 f'{arg("uncertain", "0")} or {arg("uncertain", "1")} to count it as absent or '
                                 f'present (CheXpert\'s U-Zeros, U-Ones).')
            if value == -2:
                raise ValueError(f'{csv_path} line {line}: {header[c]} is {row[c]!r}, not 1, 0, blank or -1; correct '
                                 f'it, or give {arg("label_names", "NAMES")} to leave out columns that are not labels.')
        targets.append(target)
    return names, targets


def _image_files(csv_path: Path, image_dir: Path, rows: List[Tuple[int, List[str]]]) -> List[str]:
    """Each row's file as a POSIX path relative to `image_dir`, refusing duplicates, missing images and images
    without a row in the folders that hold listed ones."""
    files, seen = [], {}
    for line, row in rows:
        path = PurePosixPath(row[0].strip().replace('\\', '/'))
        if not row[0].strip() or path.is_absolute() or '..' in path.parts:
            raise ValueError(f'{csv_path} line {line}: {row[0]!r} is not a file name inside {image_dir}; give paths '
                             f'relative to it.')
        name = path.as_posix()
        if name in seen:
            raise ValueError(f'{csv_path} lines {seen[name]} and {line}: both name {name}; give each image one row.')
        seen[name] = line
        files.append(name)
    missing = [(seen[f], f) for f in files if not (image_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f'{csv_path} line {missing[0][0]}: names {missing[0][1]}, which is not in {image_dir}'
            f'{f" (nor are {len(missing) - 1} more)" if len(missing) > 1 else ""}; add the image or remove the row.')
    listed = set(files)
    for folder in sorted({(image_dir / f).parent for f in files} | {image_dir}):
        extra = sorted(p.relative_to(image_dir).as_posix() for p in folder.iterdir()
                       if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()
                       and p.relative_to(image_dir).as_posix() not in listed)
        if extra:
            more = f' and {len(extra) - 1} more images' if len(extra) > 1 else ''
            raise ValueError(f'{image_dir}: holds {extra[0]}{more} without a row in {csv_path}; add a row per image, '
                             f'or move them out.')
    return files


def write_labels(csv_path: Union[str, Path], table: LabelTable, form: str = 'pipe', force: bool = False) -> Path:
    """Write `table` as a label CSV in `form` ('pipe': file,labels with a|b; 'columns': file and a 0/1 column per
    label), which `read_labels` reads back as the same table."""
    if form not in FORMS:
        raise ValueError(f'form={form}: give one of {", ".join(FORMS)}.')
    csv_path = Path(csv_path)
    exists = f'{csv_path}: exists; pass {arg("force")} to replace it.'
    with writing(csv_path, force=force, exists_message=exists) as tmp:
        with open(tmp, 'w', newline='', encoding='utf-8') as f:
            out = csv.writer(f, lineterminator='\n')
            out.writerow(['file', 'labels'] if form == 'pipe' else ['file', *table.names])
            for file, target in zip(table.files, table.targets):
                if form == 'pipe':
                    out.writerow([file, '|'.join(n for n, t in zip(table.names, target) if t)])
                else:
                    out.writerow([file, *target])
    return csv_path


class MultiLabelDataset(torch.utils.data.Dataset):
    """The images of a `LabelTable` in `image_dir` as (transformed image, float32 target per label): read by
    `images.read_image`, converted to `input_img_mode` ('L' for a 1-channel model: `input_img_mode(data_config)`)."""

    def __init__(self, image_dir: Union[str, Path], table: LabelTable, transform: Optional[Callable] = None,
                 input_img_mode: str = 'RGB'):
        if input_img_mode not in ('RGB', 'L'):
            raise ValueError(f'input_img_mode={input_img_mode!r}: give RGB (3 channels) or L (1 channel).')
        self.image_dir, self.table = Path(image_dir), table
        self.transform, self.input_img_mode = transform, input_img_mode
        self.targets = torch.from_numpy(table.matrix())

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> Tuple[Any, torch.Tensor]:
        image = read_image(self.image_dir / self.table.files[index])
        if self.input_img_mode == 'L':
            image = image.convert('L')  # exact for grey pictures: PIL's weights sum to 1 (19595 + 38470 + 7471 = 2^16)
        return (self.transform(image) if self.transform else image), self.targets[index]


def input_img_mode(data_config: Dict[str, Any]) -> str:
    """The PIL mode images are read in for a data config: 'L' for 1 channel, else 'RGB' (timm's train.py rule)."""
    return 'L' if data_config['input_size'][0] == 1 else 'RGB'


def grayscale_data_config(model: nn.Module, img_size: Optional[int] = None) -> Dict[str, Any]:
    """timm's data config for a 1-channel `model`: input (1, H, W) (`img_size` or the config's), and one mean and
    std: the config's when it has one (a 1-channel hub folder), else the average of its three, as timm's
    `resolve_input_data_config` adapts them (the first convolution of weights adapted from RGB sums the three
    channels' weights, so a grey pixel meets about the mean of the three normalisations)."""
    from timm.data import resolve_input_data_config
    cfg = model.pretrained_cfg
    if getattr(model, 'in_chans', 1) != 1:
        raise ValueError(f'the model takes {model.in_chans} input channels; create it with in_chans=1 for grey images.')
    size = cfg.get('input_size', (1, 224, 224))[1:] if img_size is None else (img_size, img_size)
    mean, std = (tuple(cfg.get(k) or default) for k, default in (('mean', (0.5,)), ('std', (0.5,))))
    args = dict(input_size=(1, *size), mean=(sum(mean) / len(mean),), std=(sum(std) / len(std),))
    return resolve_input_data_config(model, args=args)


def _arrays(probabilities: Any, targets: Any, names: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probabilities.detach().cpu() if torch.is_tensor(probabilities) else probabilities, np.float64)
    t = np.asarray(targets.detach().cpu() if torch.is_tensor(targets) else targets, np.float64)
    if p.ndim != 2 or p.shape != t.shape or p.shape[1] != len(names):
        raise ValueError(f'probabilities {tuple(p.shape)} and targets {tuple(t.shape)}: give both as (images, '
                         f'labels) with one column per label name ({len(names)}).')
    return p, t


def auroc_per_label(probabilities: Any, targets: Any, names: Sequence[str]) -> Dict[str, Any]:
    """AUROC per label (scikit-learn's `roc_auc_score`) and their mean, from (images, labels) probabilities and 0/1
    targets. A label whose targets hold one class only has no AUROC: None, left out of the mean, and named in the
    note. Returns dict(per_label={name: AUROC or None}, mean=float or None, undefined=[names], note=str or None)."""
    from sklearn import metrics  # a dependency: imported on first use, not with the package
    p, t = _arrays(probabilities, targets, names)
    per_label: Dict[str, Optional[float]] = {}
    for j, name in enumerate(names):
        one_class = t[:, j].min() == t[:, j].max()
        per_label[name] = None if one_class else float(metrics.roc_auc_score(t[:, j], p[:, j]))
    undefined = [n for n, v in per_label.items() if v is None]
    defined = [v for v in per_label.values() if v is not None]
    note = (f'AUROC undefined for {", ".join(undefined)}: the data has only positive or only negative images of '
            f'{"it" if len(undefined) == 1 else "them"}; left out of the mean.') if undefined else None
    return dict(per_label=per_label, mean=float(np.mean(defined)) if defined else None, undefined=undefined,
                note=note)


def pick_thresholds(probabilities: Any, targets: Any, rule: str = 'f1') -> List[float]:
    """A threshold per label from validation probabilities and 0/1 targets; a label is present when its probability
    is >= its threshold. 'f1': the threshold of the highest F1 (scikit-learn's `precision_recall_curve`); 'youden':
    of the highest Youden's J = TPR - FPR (`roc_curve`). Ties go to the higher threshold. A label with one class only
    in the data gets 0.5."""
    if rule not in THRESHOLD_RULES:
        raise ValueError(f'rule={rule}: give one of {", ".join(THRESHOLD_RULES)}.')
    from sklearn import metrics  # a dependency: imported on first use, not with the package
    p, t = _arrays(probabilities, targets, range(np.shape(probabilities)[-1]))
    thresholds = []
    for j in range(p.shape[1]):
        if t[:, j].min() == t[:, j].max():
            thresholds.append(0.5)
            continue
        if rule == 'f1':
            precision, recall, candidates = metrics.precision_recall_curve(t[:, j], p[:, j])
            precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
            with np.errstate(invalid='ignore', divide='ignore'):
                score = np.nan_to_num(2 * precision * recall / (precision + recall))
        else:
            fpr, tpr, candidates = metrics.roc_curve(t[:, j], p[:, j], drop_intermediate=False)
            score, candidates = (tpr - fpr)[1:], candidates[1:]  # the first threshold is inf: nothing present
        best = np.flatnonzero(score == score.max())
        thresholds.append(float(candidates[best].max()))
    return thresholds


def findings(probabilities: Sequence[float], thresholds: Sequence[float],
             names: Sequence[str]) -> List[Tuple[str, float]]:
    """The (label, probability) of one image's labels at or above their threshold, most probable first."""
    if not len(probabilities) == len(thresholds) == len(names):
        raise ValueError(f'{len(probabilities)} probabilities, {len(thresholds)} thresholds and {len(names)} names: '
                         f'give one of each per label.')
    found = [(n, float(p)) for n, p, t in zip(names, probabilities, thresholds) if p >= t]
    return sorted(found, key=lambda item: -item[1])


def config_entries(thresholds: Sequence[float], rule: str = 'f1') -> Dict[str, Any]:
    """The keys a multi-label hub folder's config.json adds beside `label_names` (timm ignores them; they must stay
    out of `pretrained_cfg`, which timm refuses unknown keys in): transformers' `problem_type`, a threshold per
    label in `label_names`' order, and the rule that picked them."""
    if rule not in THRESHOLD_RULES:
        raise ValueError(f'rule={rule}: give one of {", ".join(THRESHOLD_RULES)}.')
    return dict(problem_type=PROBLEM_TYPE, label_thresholds=[float(t) for t in thresholds], threshold_rule=rule)


def thresholds_from_config(config: Dict[str, Any], num_classes: int) -> Optional[List[float]]:
    """The per-label thresholds of a hub folder's config.json (its parsed dict), or None for a single-label
    model; ValueError naming the fix when they do not match its `num_classes` labels."""
    if config.get('problem_type') != PROBLEM_TYPE:
        return None
    thresholds = config.get('label_thresholds')
    if not (isinstance(thresholds, list) and len(thresholds) == num_classes
            and all(isinstance(t, (int, float)) and 0 <= t <= 1 for t in thresholds)):
        raise ValueError(f'config.json: label_thresholds should hold {num_classes} numbers from 0 to 1, one per '
                         f'label; write the folder again with finetune.')
    return [float(t) for t in thresholds]


def evaluate_multilabel(
        model: nn.Module, dataset, batch_size: int = 64, rule: str = 'f1', progress: Optional[bool] = None,
) -> Dict[str, Any]:
    """`model`'s (put in eval mode) sigmoid probabilities over `dataset` ((image, 0/1 target per label) pairs: a
    `MultiLabelDataset`), measured: `auroc_per_label`'s per_label, mean, undefined and note; `thresholds`
    (`pick_thresholds` with `rule`, on these probabilities); `correct`, the images whose every label is right at
    those thresholds, of `total`; and the `probabilities` and `targets` as (images, labels) tensors. The
    probabilities come from the loop `validate` measures with (`_evaluation.predict_probabilities`)."""
    names = getattr(getattr(dataset, 'table', None), 'names', None) or [f'label {i}' for i in range(model.num_classes)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)  # no workers: small work
    predicted = predict_probabilities(model, loader, progress=progress)
    probabilities, targets = predicted.probabilities, predicted.targets
    report = auroc_per_label(probabilities, targets, names)
    thresholds = pick_thresholds(probabilities, targets, rule)
    decided = probabilities >= torch.tensor(thresholds, dtype=probabilities.dtype)
    correct = int((decided == targets.bool()).all(dim=1).sum())
    return dict(report, thresholds=thresholds, rule=rule, correct=correct, total=len(targets),
                probabilities=probabilities, targets=targets)


def score_multilabel(
        predictions: Probabilities, names: Sequence[str], thresholds: Sequence[float], *, rule: str = 'f1',
        model: str = '', param_count: int = 0,
) -> ValidateResult:
    """The multi-label `ValidateResult` of `predictions` of a model with labels `names` and its own `thresholds`:
    per-label AUROC and their mean, the thresholds `rule` picks on these images, and precision, recall and F1 at
    `thresholds` (scikit-learn's `precision_recall_fscore_support`, 0 where nothing is predicted or present)."""
    from sklearn.metrics import precision_recall_fscore_support
    p, t = predictions.probabilities.double().numpy(), predictions.targets.numpy().astype(np.int64)
    n = len(t)
    decided = (p >= np.asarray(thresholds, dtype=np.float64)).astype(np.int64)
    aurocs = auroc_per_label(p, t, names)
    picked = pick_thresholds(p, t, rule)
    precision, recall, f1, _ = precision_recall_fscore_support(t, decided, average=None, labels=range(len(names)),
                                                               zero_division=0)
    per_label = [ClassResult(
        j, str(name), n, int((decided[:, j] == t[:, j]).sum()), positives=int(t[:, j].sum()),
        auroc=aurocs['per_label'][name], threshold=float(thresholds[j]),
        picked_threshold=None if aurocs['per_label'][name] is None else picked[j],  # one class only: nothing to pick
        precision=float(precision[j]), recall=float(recall[j]), f1=float(f1[j])) for j, name in enumerate(names)]
    return ValidateResult(
        model=model, classes=[str(name) for name in names], images=n, evaluated=n,
        correct=int((decided == t).all(axis=1).sum()), top1=None, top5=None, top5_correct=None,
        loss=predictions.loss_sum / t.size if n else None, per_class=per_label, confusion=None, predicted=[],
        seconds=predictions.seconds, param_count=param_count,
        img_size=predictions.input_size[-1] if predictions.input_size else None, task='multi-label',
        mean_auroc=aurocs['mean'], auroc_note=aurocs['note'], threshold_rule=rule)


def _shape_mask(shape: str, size: int, cx: float, cy: float, vertical: bool) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] + 0.5
    dx, dy = np.abs(xx - cx), np.abs(yy - cy)
    r = np.hypot(dx, dy) / size
    if shape == 'square':
        return (dx <= 0.16 * size) & (dy <= 0.16 * size)
    if shape == 'disk':
        return r <= 0.12
    if shape == 'ring':
        return (r >= 0.11) & (r <= 0.2)
    long, short = (dy, dx) if vertical else (dx, dy)  # bar
    return (long <= 0.22 * size) & (short <= 0.06 * size)


def _shapes_image(rng: np.random.Generator, size: int, present: Sequence[int]) -> np.ndarray:
    """A noisy grey picture with the `present` shapes, each in its own quadrant (chosen at random) at a random
    offset, each at its own random brightness above the background."""
    background = rng.uniform(40, 90)
    pixels = background + rng.normal(0, 18, (size, size))
    quadrants = rng.permutation(4)
    for k, shape in enumerate(SHAPES):
        if present[k]:
            qy, qx = divmod(int(quadrants[k]), 2)
            cx, cy = (np.array([qx, qy]) + 0.5 + rng.uniform(-0.06, 0.06, 2)) * size / 2
            pixels[_shape_mask(shape, size, cx, cy, bool(rng.integers(2)))] += rng.uniform(70, 150)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def write_shapes_multilabel(
        out_dir: Union[str, Path],
        n_train: int,
        n_val: int,
        size: int = 32,
        seed: int = 0,
        form: str = 'pipe',
        p: float = 0.4,
) -> LabelTable:
    """Write generated grey PNGs with four independent findings (`SHAPES`: each present with probability `p`, in a
    random quadrant at a random offset, on a noisy background) as OUT/train/NNNNN.png and OUT/val/NNNNN.png, and one
    label CSV for both, OUT/labels.csv in `form` (rows 'train/00000.png', ...; `LabelTable.split` parts them).
    The folder is written whole under a temporary name, then renamed; an existing non-empty `out_dir` is refused.
    Returns the table written."""
    from PIL import Image
    out_dir = Path(out_dir)
    if form not in FORMS:
        raise ValueError(f'form={form}: give one of {", ".join(FORMS)}.')
    if min(n_train, n_val) < 1 or size < 16 or not 0 < p < 1:
        raise ValueError(f'n_train={n_train}, n_val={n_val}, size={size}, p={p}: give 1 or more images per split, '
                         f'16 px or more, and 0 < p < 1.')
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f'{out_dir}: exists and is not an empty folder; choose another output folder.')
    rng = np.random.default_rng(seed)
    staging = out_dir.absolute().with_name(f'.{out_dir.absolute().name}.{secrets.token_hex(4)}.tmp')
    files, targets = [], []
    try:
        for split, n in (('train', n_train), ('val', n_val)):
            (staging / split).mkdir(parents=True)
            for i in range(n):
                present = tuple(int(x) for x in rng.random(len(SHAPES)) < p)
                Image.fromarray(_shapes_image(rng, size, present), mode='L').save(staging / split / f'{i:05d}.png')
                files.append(f'{split}/{i:05d}.png')
                targets.append(present)
        table = LabelTable(SHAPES, tuple(files), tuple(targets), str(out_dir / LABELS_FILE))
        write_labels(staging / LABELS_FILE, table, form)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty, checked above
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return table
