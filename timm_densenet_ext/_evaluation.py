"""How well a classifier does on labelled images, measured one way for every caller: `validate` (the workflow and
its report) and `finetune` (the validation accuracy of each epoch, and so the epoch it keeps).

`evaluate_model` runs the model over a labelled dataset and `score` turns what it predicted into a `ValidateResult`:
top-1 and top-5 accuracy, the mean cross-entropy, per-class accuracy and the confusion matrix (scikit-learn's
`confusion_matrix`). The targets are the model's class indices.

A multi-label model (a sigmoid per label): `predict_probabilities` keeps each image's probabilities, which
`multilabel.score_multilabel` (validate) and `multilabel.evaluate_multilabel` (finetune) measure.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

__all__ = ['ClassResult', 'ValidateResult', 'Predictions', 'evaluate_model', 'predict_dataset', 'score',
           'Probabilities', 'predict_probabilities']

OTHER = '(other classes)'  # the confusion matrix's column for predictions of classes the data does not hold
TOP5_MIN_CLASSES = 6  # top-5 accuracy says something only with more than 5 classes


@dataclass(frozen=True)
class ClassResult:
    """One class of the data: its index among the model's classes, its name, how many of its images were evaluated
    and how many of them were classified as it.

    For a multi-label model, one label: `images` evaluated, `correct` of them decided right at its `threshold` (the
    model's), and `positives` having it; its AUROC and the threshold the data picks (`picked_threshold`), both None
    when the data has only one class of it; and precision, recall and F1 at `threshold`."""
    index: int
    name: str
    images: int
    correct: int
    positives: Optional[int] = None
    auroc: Optional[float] = None
    threshold: Optional[float] = None
    picked_threshold: Optional[float] = None
    precision: Optional[float] = None
    recall: Optional[float] = None
    f1: Optional[float] = None

    @property
    def accuracy(self) -> float:
        """Percent of this class's images classified as it (its recall)."""
        return 100.0 * self.correct / self.images if self.images else 0.0


@dataclass(frozen=True)
class ValidateResult:
    """What `validate` measured, and what it wrote. Accuracies are in percent, as timm's validate.py reports them.

    `images` image files were found, `evaluated` of them classified; the others are `unreadable` (one line each:
    the file and what is wrong). `confusion[i][j]` counts images of `classes[i]` classified as `predicted[j]`:
    the same classes in the same order, then `OTHER` when some were classified as a class the data does not hold.
    `task` is 'single-label': one class per image, a softmax over the classes; or 'multi-label': a sigmoid per
    label, `classes` the labels, `per_class` a record per label (its AUROC, thresholds, precision, recall, F1),
    `mean_auroc` the mean over the labels that have one (`auroc_note` names the others), `correct` the images whose
    every label is right at the model's thresholds, `loss` the mean binary cross-entropy, `threshold_rule` the rule
    `picked_threshold` follows; top-1, top-5 and the confusion matrix are None.
    """
    model: str
    classes: List[str]
    images: int
    evaluated: int
    correct: Optional[int]
    top1: Optional[float]
    top5: Optional[float]  # None with 5 classes or fewer
    top5_correct: Optional[int]
    loss: Optional[float]  # mean cross-entropy over the evaluated images
    per_class: List[ClassResult]
    confusion: Optional[np.ndarray]
    predicted: List[str]
    seconds: float  # reading, preprocessing and the model, for the evaluated images
    param_count: int
    img_size: Optional[int] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    data_dir: Optional[Path] = None
    unreadable: List[str] = field(default_factory=list)
    files: List[Path] = field(default_factory=list)
    task: str = 'single-label'
    mean_auroc: Optional[float] = None
    auroc_note: Optional[str] = None
    threshold_rule: Optional[str] = None

    @property
    def top1_err(self) -> Optional[float]:
        return None if self.top1 is None else 100.0 - self.top1

    @property
    def top5_err(self) -> Optional[float]:
        return None if self.top5 is None else 100.0 - self.top5

    @property
    def images_per_second(self) -> float:
        return self.evaluated / self.seconds if self.seconds > 0 else 0.0

    def worst(self, n: int = 5) -> List[ClassResult]:
        """The `n` classes with the lowest accuracy (fewest images first among equals), worst first."""
        return sorted((c for c in self.per_class if c.images), key=lambda c: (c.accuracy, c.images))[:n]

    def to_json(self) -> Dict[str, Any]:
        """The results as results.json holds them: timm's validate.py fields first (model, top1, top1_err, top5,
        top5_err, param_count in millions, img_size, crop_pct, interpolation), then this tool's."""
        def rounded(x: Optional[float]) -> Optional[float]:
            return None if x is None else round(x, 4)
        if self.task == 'multi-label':
            return self._multilabel_json(rounded)
        return dict(
            model=self.model, top1=rounded(self.top1), top1_err=rounded(self.top1_err), top5=rounded(self.top5),
            top5_err=rounded(self.top5_err), param_count=round(self.param_count / 1e6, 2), img_size=self.img_size,
            crop_pct=self.crop_pct, interpolation=self.interpolation,
            task=self.task, loss=rounded(self.loss), data_dir=str(self.data_dir) if self.data_dir else None,
            images=self.images, evaluated=self.evaluated, unreadable=list(self.unreadable), correct=self.correct,
            top5_correct=self.top5_correct, seconds=round(self.seconds, 3),
            images_per_second=round(self.images_per_second, 2), classes=list(self.classes),
            per_class=[dict(index=c.index, name=c.name, images=c.images, correct=c.correct,
                            accuracy=round(c.accuracy, 4)) for c in self.per_class],
            confusion=None if self.confusion is None else dict(
                true=list(self.classes), predicted=list(self.predicted), counts=self.confusion.tolist()),
        )

    def _multilabel_json(self, rounded: Callable[[Optional[float]], Optional[float]]) -> Dict[str, Any]:
        """results.json of a multi-label model: timm's fields (top-1 and top-5 None), then its per-label records."""
        def exact(x: Optional[float]) -> Optional[float]:  # a threshold as config.json holds it
            return None if x is None else float(x)
        return dict(
            model=self.model, top1=None, top1_err=None, top5=None, top5_err=None,
            param_count=round(self.param_count / 1e6, 2), img_size=self.img_size, crop_pct=self.crop_pct,
            interpolation=self.interpolation, task=self.task, mean_auroc=rounded(self.mean_auroc),
            auroc_note=self.auroc_note, threshold_rule=self.threshold_rule, loss=rounded(self.loss),
            data_dir=str(self.data_dir) if self.data_dir else None, images=self.images, evaluated=self.evaluated,
            unreadable=list(self.unreadable), correct=self.correct, seconds=round(self.seconds, 3),
            images_per_second=round(self.images_per_second, 2), classes=list(self.classes),
            per_class=[dict(index=c.index, name=c.name, auroc=rounded(c.auroc), threshold=exact(c.threshold),
                            picked_threshold=exact(c.picked_threshold), positives=c.positives, images=c.images,
                            correct=c.correct, accuracy=round(c.accuracy, 4), precision=rounded(c.precision),
                            recall=rounded(c.recall), f1=rounded(c.f1)) for c in self.per_class],
        )


@dataclass(frozen=True)
class Predictions:
    """What a model predicted for the evaluated images: their targets, the top classes (best first) and the summed
    cross-entropy; the seconds it took, and the size of its input images (C, H, W)."""
    targets: torch.Tensor
    top: torch.Tensor
    loss_sum: float
    seconds: float
    input_size: Tuple[int, ...] = ()


def predict_dataset(
        model: nn.Module, loader: Any, *, progress: Optional[bool] = None, desc: str = 'validate',
        threads_for: Optional[Callable[[torch.Size], int]] = None,
) -> Predictions:
    """Run `model` (put in eval mode) over a loader of (images, targets) batches; an empty batch (every image of it
    unreadable) is passed over. Keeps the top five classes of each image, not the logits, so memory stays small.
    `threads_for`: torch's CPU threads for the first batch's shape, set before it runs."""
    k = min(5, model.num_classes)
    targets, tops, loss_sum, shape = [], [], 0.0, ()
    started = time.perf_counter()
    for images, logits, batch_targets in _outputs(model, loader, progress, desc, threads_for):
        loss_sum += nn.functional.cross_entropy(logits.float(), batch_targets, reduction='sum').item()
        tops.append(logits.topk(k, dim=1).indices)
        targets.append(batch_targets)
        shape = tuple(images.shape[1:])
    seconds = time.perf_counter() - started
    if not targets:
        return Predictions(torch.zeros(0, dtype=torch.long), torch.zeros(0, k, dtype=torch.long), 0.0, seconds)
    return Predictions(torch.cat(targets), torch.cat(tops), loss_sum, seconds, shape)


def _outputs(
        model: nn.Module, loader: Any, progress: Optional[bool], desc: str,
        threads_for: Optional[Callable[[torch.Size], int]],
) -> Iterator[Tuple[torch.Tensor, torch.Tensor, Any]]:
    """(images, logits, targets) of each batch of `loader` but the empty ones (every image unreadable), `model` in
    eval mode without gradients, behind a progress bar on a terminal; torch's threads set by `threads_for` before the
    first batch runs."""
    from tqdm.auto import tqdm
    model.eval()
    first = True
    with torch.no_grad():
        for images, targets in tqdm(loader, desc=desc, leave=False, unit='batch',
                                    disable=None if progress is None else not progress):
            if len(targets) == 0:
                continue
            if first and threads_for is not None:
                torch.set_num_threads(threads_for(images.shape))
            first = False
            yield images, model(images), targets


def score(
        predictions: Predictions, names: Sequence[str], *, labels: Optional[Sequence[int]] = None,
        model: str = '', param_count: int = 0, num_classes: Optional[int] = None,
) -> ValidateResult:
    """The `ValidateResult` of `predictions` of a model with class `names`: `labels` are the classes the data holds
    (model class indices, in the order of the report; default: those among the targets, ascending)."""
    from sklearn.metrics import confusion_matrix
    targets, top = predictions.targets.numpy(), predictions.top.numpy()
    n = len(targets)
    labels = sorted(set(targets.tolist())) if labels is None else list(labels)
    num_classes = len(names) if num_classes is None else num_classes
    predicted = top[:, 0] if n else np.zeros(0, dtype=np.int64)
    outside = ~np.isin(predicted, labels)
    columns = labels + ([-1] if outside.any() else [])
    confusion = confusion_matrix(targets, np.where(outside, -1, predicted), labels=columns)[:len(labels)] if n else (
        np.zeros((len(labels), len(columns)), dtype=np.int64))
    correct = int(np.trace(confusion[:, :len(labels)]))
    top5_correct = int((top[:, :5] == targets[:, None]).any(axis=1).sum()) if num_classes >= TOP5_MIN_CLASSES else None
    per_class = [ClassResult(c, str(names[c]), int(confusion[i].sum()), int(confusion[i, i]))
                 for i, c in enumerate(labels)]
    return ValidateResult(
        model=model, classes=[str(names[c]) for c in labels], images=n, evaluated=n, correct=correct,
        top1=100.0 * correct / n if n else None,
        top5=100.0 * top5_correct / n if n and top5_correct is not None else None,
        top5_correct=top5_correct, loss=predictions.loss_sum / n if n else None, per_class=per_class,
        confusion=confusion, predicted=[str(names[c]) for c in labels] + ([OTHER] if outside.any() else []),
        seconds=predictions.seconds, param_count=param_count,
        img_size=predictions.input_size[-1] if predictions.input_size else None)


def evaluate_model(
        model: nn.Module, dataset: Any, *, batch_size: int = 64, progress: Optional[bool] = None,
        names: Optional[Sequence[str]] = None, labels: Optional[Sequence[int]] = None, model_name: str = '',
        collate_fn: Any = None, threads_for: Optional[Callable[[torch.Size], int]] = None,
) -> ValidateResult:
    """Classify a labelled dataset ((image tensor, model class index) items) with `model` and score it: the one
    measurement `validate` reports and `finetune` picks its best epoch by. `names`: the model's class names (default
    'class N'); `labels`: as `score` takes them; `collate_fn`: the DataLoader's (one that skips unreadable images);
    `threads_for`: as `predict_dataset` takes it."""
    if not model.num_classes:
        raise ValueError('the model has no classifier (num_classes=0); give a model that classifies.')
    loader = torch.utils.data.DataLoader(  # no worker processes: reading small images is not the slow part
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    predictions = predict_dataset(model, loader, progress=progress, threads_for=threads_for)
    names = list(names) if names is not None else [f'class {i}' for i in range(model.num_classes)]
    return score(predictions, names, labels=labels, model=model_name,
                 param_count=sum(p.numel() for p in model.parameters()), num_classes=model.num_classes)


# ---- multi-label models: a sigmoid per label

@dataclass(frozen=True)
class Probabilities:
    """A multi-label model's sigmoid probabilities for the evaluated images and their 0/1 targets, both (images,
    labels); the summed binary cross-entropy, the seconds it took, and the size of its input images (C, H, W)."""
    probabilities: torch.Tensor
    targets: torch.Tensor
    loss_sum: float
    seconds: float
    input_size: Tuple[int, ...] = ()


def predict_probabilities(
        model: nn.Module, loader: Any, *, progress: Optional[bool] = None, desc: str = 'validate',
        threads_for: Optional[Callable[[torch.Size], int]] = None,
) -> Probabilities:
    """Run `model` (put in eval mode) over a loader of (images, (images, labels) 0/1 targets) batches, keeping each
    image's sigmoid probabilities; an empty batch (every image of it unreadable) is passed over. `threads_for`: as
    `predict_dataset` takes it."""
    probabilities, targets, loss_sum, shape = [], [], 0.0, ()
    started = time.perf_counter()
    for images, logits, batch_targets in _outputs(model, loader, progress, desc, threads_for):
        logits, batch_targets = logits.float(), batch_targets.float()
        loss_sum += nn.functional.binary_cross_entropy_with_logits(logits, batch_targets, reduction='sum').item()
        probabilities.append(logits.sigmoid())
        targets.append(batch_targets)
        shape = tuple(images.shape[1:])
    seconds = time.perf_counter() - started
    k = model.num_classes
    if not targets:
        return Probabilities(torch.zeros(0, k), torch.zeros(0, k), 0.0, seconds)
    return Probabilities(torch.cat(probabilities), torch.cat(targets), loss_sum, seconds, shape)
