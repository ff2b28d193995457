"""Fine-tune a DenseNet on an image folder and write the best epoch as a hub folder.

The data is torchvision's `ImageFolder` layout, DIR/train/CLASS/*.png and DIR/val/CLASS/*.png; the transforms are
timm's (`create_transform` from the model's pretrained config), the optimiser timm's AdamW (`create_optimizer_v2`)
on timm's per-step cosine schedule with warmup (`CosineLRScheduler`). The result is written by
`hub.write_hub_folder`, the code path of `convert`: model.safetensors, config.json with the class names as
`label_names`, and a model card recording the data, the recipe and the measured accuracy.

Multi-label (CheXNet style, `multi_label=True`): a label CSV (`multilabel.read_labels`: one row per image under
DIR/train and DIR/val) gives each image its labels; the model has a sigmoid per label, trained with binary
cross-entropy; the best epoch is the one of highest mean validation AUROC, and a threshold per label, picked on that
epoch's validation probabilities, goes into config.json (`multilabel.config_entries`). `in_chans=1` trains on grey
images: the first convolution adapted from 3-channel weights, one mean and std (`multilabel.grayscale_data_config`).

Resumable: after every epoch the run's state is saved as OUT/.finetune-state.pth (a hidden file, so `push` leaves it
out); `resume=True` continues from it, and the finished hub folder replaces it.

Started by torchrun, it trains on every process with DistributedDataParallel (`_distributed`): each process takes its
part of every global batch, rank 0 alone logs, validates and writes. The batches, their augmentation and the state
file do not depend on the number of processes, so a run may be resumed with another number.
"""
import contextlib
import copy
import dataclasses
import functools
import hashlib
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.utils import random_seed

from ._distributed import GlobalBatchSampler, Processes, in_process_group, processes, synced_batchnorm
from ._files import claims_output, writing
from ._naming import arg
from .hub import check_out_dir, write_hub_folder
from .images import image_loader
from .loading import HUB_PREFIXES, load_model, model_card_name, weights_repo_id
from .multilabel import (
    LABELS_FILE, THRESHOLD_RULES, LabelTable, MultiLabelDataset, config_entries, evaluate_multilabel,
    grayscale_data_config, input_img_mode, read_labels)

__all__ = ['Recipe', 'FinetuneResult', 'STATE_FILE', 'image_folders', 'image_dataset', 'choose_threads', 'threads_for',
           'finetune', 'evaluate']

STATE_FILE = '.finetune-state.pth'
_STATE_FORMAT = 'timm-densenet-ext finetune state 1'
# batch x height x width x the model's feature width below which one thread is fastest: each operator is too short to
# split (the demo's 32 x 8 x 8 x 342 = 0.7M; densenet121 at 64 px, batch 16: 67M)
_SERIAL_WORK = 1 << 24


@dataclass(frozen=True)
class Recipe:
    """The training settings; a resumed run keeps those it started with."""
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    img_size: Optional[int] = None  # default: the model's pretrained input size
    hflip: float = 0.5
    scale: Tuple[float, float] = (0.08, 1.0)  # of timm's random-resized crop
    color_jitter: float = 0.4
    label_smoothing: float = 0.1
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, f'{arg("epochs", self.epochs)}: give 1 or more.'),
            (self.batch_size >= 1, f'{arg("batch_size", self.batch_size)}: give 1 or more.'),
            (self.lr > 0, f'{arg("lr", self.lr)}: give a learning rate above 0.'),
            (self.weight_decay >= 0, f'{arg("weight_decay", self.weight_decay)}: give 0 or more.'),
            (self.img_size is None or self.img_size >= 1, f'{arg("img_size", self.img_size)}: give a size in pixels.'),
            (0 <= self.hflip <= 1, f'{arg("hflip", self.hflip)}: give a probability from 0 to 1.'),
            (self.color_jitter >= 0, f'{arg("color_jitter", self.color_jitter)}: give 0 (none) or more.'),
            (0 < self.scale[0] <= self.scale[1] <= 1, f'{arg("scale", self.scale)}: give 0 < MIN <= MAX <= 1.'),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class FinetuneResult:
    """Where the hub folder went, its classes, and how each epoch went (`history`: one dict per epoch)."""
    out_dir: Path
    model_name: str
    classes: List[str]
    train_images: int
    val_images: int
    best_epoch: int
    val_accuracy: float  # of the best epoch, the one written, as a fraction
    val_correct: int
    history: List[Dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0  # training and evaluation time of this call (a resumed run: since resuming)
    # a multi-label run's best epoch (else None): mean_auroc, per_label AUROC, thresholds and threshold rule;
    # val_accuracy and val_correct then count the images whose every label is right at those thresholds
    multi_label: Optional[Dict[str, Any]] = None
    rank: int = 0  # this process's among torchrun's; rank 0 logged and wrote `out_dir`


def image_folders(data_dir: Union[str, Path]) -> Tuple[Path, Path, List[str]]:
    """DIR/train and DIR/val, and the class names (sub-folder names) they share; ValueError says what is wrong."""
    from torchvision.datasets.folder import find_classes
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f'{data_dir}: no such folder; give {arg("data_dir", "DIR")}, the folder that holds train/ and val/.')
    layout = 'DIR/train/CLASS/IMAGE and DIR/val/CLASS/IMAGE, one sub-folder per class'
    classes = {}
    for split in ('train', 'val'):
        folder = data_dir / split
        if not folder.is_dir():
            raise FileNotFoundError(f'{data_dir}: has no {split}/ folder; arrange the images as {layout}.')
        try:
            classes[split] = find_classes(str(folder))[0]
        except FileNotFoundError:
            raise FileNotFoundError(
                f'{folder}: holds no class sub-folders; arrange the images as {layout}.') from None
    if classes['train'] != classes['val']:
        only_train = sorted(set(classes['train']) - set(classes['val']))
        only_val = sorted(set(classes['val']) - set(classes['train']))
        diff = '; '.join(part for part in (
            f'only in train/: {", ".join(only_train[:5])}' if only_train else '',
            f'only in val/: {", ".join(only_val[:5])}' if only_val else '') if part)
        raise ValueError(f'{data_dir}: train/ and val/ have different classes ({diff}); give both the same '
                         f'class sub-folders.')
    if len(classes['train']) < 2:
        raise ValueError(f'{data_dir}: has {len(classes["train"])} class; a classifier needs 2 or more.')
    return data_dir / 'train', data_dir / 'val', classes['train']


def _datasets(train_dir: Path, val_dir: Path, model: nn.Module, recipe: Recipe):
    import timm
    overrides = {'input_size': (3, recipe.img_size, recipe.img_size)} if recipe.img_size else {}
    data_config = timm.data.resolve_data_config(overrides, model=model)
    train_tf = timm.data.create_transform(
        **data_config, is_training=True, hflip=recipe.hflip, scale=recipe.scale, color_jitter=recipe.color_jitter)
    val_tf = timm.data.create_transform(**data_config)
    return image_dataset(train_dir, train_tf), image_dataset(val_dir, val_tf), data_config


def image_dataset(folder: Union[str, Path], transform: Optional[Callable] = None):
    """torchvision's `ImageFolder` of `folder` (one sub-folder per class), its images read by `images.read_image`
    (any PIL mode, EXIF orientation; an image without a meaningful RGB reading raises a one-line ValueError)."""
    from torchvision.datasets import ImageFolder
    try:
        return ImageFolder(str(folder), transform=transform, loader=image_loader)
    except FileNotFoundError as e:  # a class folder without a single image file
        raise FileNotFoundError(f'{folder}: {str(e).split(". ")[0]}; put images in every class folder.') from None


class _SeededSamples(torch.utils.data.Dataset):
    """`dataset` whose sample `index` in epoch `epoch` is read with torch's and Python's random generators seeded from
    (seed, epoch, index), and put back after: its random augmentation is the same whichever process reads it, in
    whichever batch."""

    def __init__(self, dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        digest = hashlib.blake2b(f'{self.seed}:{self.epoch}:{index}'.encode(), digest_size=8).digest()
        seed, state = int.from_bytes(digest, 'little'), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(state)


def choose_threads(batch_size: int, input_size: Sequence[int], width: int, threads: Optional[int] = None) -> int:
    """How many CPU threads torch should use for a model `width` features wide on batches of `batch_size` images
    of `input_size` (C, H, W): `threads` if given; torch's own count when OMP_NUM_THREADS sets it; one when
    batch x H x W x width is below 2^24 (the demo's is 0.7M), where each operator is too short to split, so a second
    thread only waits, and beside a busy process waits for the core it shares (the demo took 956 s with two threads
    and 29 s with one); else torch's count less the cores other processes keep busy (the 1-minute load average)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f'{arg("threads", threads)}: give 1 or more.')
        return threads
    available = torch.get_num_threads()
    if os.environ.get('OMP_NUM_THREADS'):
        return available
    if batch_size * input_size[-2] * input_size[-1] * max(width, 1) < _SERIAL_WORK:
        return 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        busy = 0.0
    return max(1, min(available, round(_cpus() - busy)))


def threads_for(model: nn.Module, batch_size: int, threads: Optional[int] = None) -> Callable[[Sequence[int]], int]:
    """`choose_threads` for `model` on batches of `batch_size`, given a batch's shape (B, C, H, W):
    how evaluation sets torch's thread count at its first batch."""
    return lambda shape: choose_threads(batch_size, shape, _width(model), threads)


def _cpus() -> int:
    """The CPUs this process may run on (its affinity, as `taskset` or a container sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _claims_output_on_rank_0(fn: Callable) -> Callable:
    """`claims_output('out_dir')` on the process that writes `out_dir`: the only one, or torchrun's rank 0."""
    claimed = claims_output('out_dir')(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return (claimed if processes().primary else fn)(*args, **kwargs)
    return wrapper


def _restores_threads(fn: Callable) -> Callable:
    """Run `fn` and put torch's thread count back as it was, whatever `fn` sets it to."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(previous)
    return wrapper


@_restores_threads
def evaluate(
        model: nn.Module, dataset, batch_size: int = 64, progress: Optional[bool] = None,
        threads: Optional[int] = None,
) -> Tuple[int, int]:
    """(correct, total) top-1 predictions of `model` (put in eval mode) over a labelled dataset, on the CPU threads
    `choose_threads` picks for its batches (`threads` if given); torch's thread count is restored afterwards.
    Measured by the code `validate` reports with (`_evaluation.evaluate_model`)."""
    from ._evaluation import evaluate_model
    result = evaluate_model(model, dataset, batch_size=batch_size, progress=progress,
                            threads_for=threads_for(model, batch_size, threads))
    return result.correct, result.evaluated


def _width(model: nn.Module) -> int:
    return int(getattr(model, 'num_features', 0) or 1024)


def _disable(progress: Optional[bool]) -> Optional[bool]:
    # tqdm's disable=None: bars only on a terminal
    return None if progress is None else not progress


def _load_state(out_dir: Path) -> Dict[str, Any]:
    path = out_dir / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f'{out_dir}: holds no interrupted run ({STATE_FILE}) to resume; start it without {arg("resume")}.')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(
            f'{path}: cannot be read ({type(e).__name__}); start the run again with {arg("force")}.') from None
    if not isinstance(state, dict) or state.get('format') != _STATE_FORMAT:
        raise ValueError(f'{path}: not a finetune state file; start the run again with {arg("force")}.')
    return state


def _resumed_settings(state: Dict[str, Any], given: Dict[str, Any], out_dir: Path) -> None:
    """Refuse settings that differ from the interrupted run's: its schedule and classes would no longer hold."""
    for name, value in given.items():
        saved = state['run'].get(name) if name in state['run'] else state['recipe'].get(name)
        if isinstance(saved, list):
            saved = tuple(saved)
        if value is not None and value != saved:
            raise ValueError(
                f'{arg(name, value)} differs from the interrupted run in {out_dir} ({saved}); resume with the same '
                f'settings, or start again with {arg("force")}.')


def _training_record(
        result_history: List[Dict[str, float]], best: Dict[str, Any], classes: Sequence[str], recipe: Recipe,
        data_config: Dict[str, Any], data_name: str, data_text: str, base: str, train_n: int, val_n: int,
) -> Dict[str, Any]:
    size = data_config['input_size']
    return dict(
        data_name=data_name,
        data=data_text,
        classes=list(classes),
        train_images=train_n,
        val_images=val_n,
        base=base,
        recipe=[
            f'{recipe.epochs} epochs, batch size {recipe.batch_size}, from {base}',
            f'AdamW (timm `create_optimizer_v2`), learning rate {recipe.lr:g}, weight decay {recipe.weight_decay:g}',
            f'cosine schedule stepped per batch with {recipe.warmup_epochs} warmup epoch'
            f'{"s" if recipe.warmup_epochs != 1 else ""} (timm `CosineLRScheduler`)',
            f'cross-entropy with label smoothing {recipe.label_smoothing:g}',
            f'input {size[1]} x {size[2]}; timm training transform: random-resized crop, scale '
            f'{tuple(recipe.scale)}, horizontal flip {recipe.hflip:g}, colour jitter {recipe.color_jitter:g}; '
            f'validation: `resolve_data_config` / `create_transform` as in Preprocessing above',
            f'seed {recipe.seed}',
        ],
        best_epoch=best['epoch'],
        epochs=recipe.epochs,
        val_accuracy=best['accuracy'],
        val_correct=best['correct'],
        history=[dict(epoch=h['epoch'], train_loss=f'{h["train_loss"]:.4f}',
                      val_accuracy=f'{100 * h["val_accuracy"]:.2f}%') for h in result_history],
    )


@in_process_group
@_claims_output_on_rank_0
@_restores_threads
def finetune(
        model_name: Optional[str],
        data_dir: Union[str, Path, None],
        out_dir: Union[str, Path],
        *,
        epochs: Optional[int] = None,
        batch_size: Optional[int] = None,
        lr: Optional[float] = None,
        weight_decay: Optional[float] = None,
        img_size: Optional[int] = None,
        hflip: Optional[float] = None,
        scale: Optional[Tuple[float, float]] = None,
        seed: Optional[int] = None,
        pretrained: bool = False,
        weights: Union[str, Path, None] = None,
        resume: bool = False,
        force: bool = False,
        repo_id: Optional[str] = None,
        data_name: Optional[str] = None,
        data_description: Optional[str] = None,
        progress: Optional[bool] = None,
        log: Callable[[str], None] = print,
        threads: Optional[int] = None,
        multi_label: bool = False,
        labels: Union[str, Path, None] = None,
        label_names: Union[str, Sequence[str], None] = None,
        uncertain: Optional[int] = None,
        in_chans: Optional[int] = None,
        color_jitter: Optional[float] = None,
        sync_bn: bool = False,
) -> FinetuneResult:
    """Fine-tune `model_name` on the image folders `data_dir`/train and `data_dir`/val; write the best epoch
    (highest validation accuracy) as a hub folder `out_dir`.

    The model is loaded by `loading.load_model` (`pretrained`, `weights` or a 'local-dir:DIR' hub folder; with
    neither, a variant starts from random weights) and its classifier reset to the folders' classes. Settings left
    None take `Recipe`'s defaults, or the interrupted run's with `resume`, which continues from the state saved in
    `out_dir` after its last finished epoch (a setting that differs from that run's is refused). An existing
    non-empty `out_dir` is replaced only with `force`. `progress`: bars on stderr (None: when it is a terminal).
    `data_name` and `data_description` name and describe the data in the model card (default: the folder).
    `threads`: CPU threads for torch (default: `choose_threads` for the batch, image size and model; torch's thread
    count is restored afterwards).
    `multi_label`: train a sigmoid per label on the label CSV `labels` (default DIR/labels.csv; `label_names`
    picks and orders the labels, `uncertain` counts CheXpert's -1 as 0 or 1: `multilabel.read_labels`) and write the
    best epoch by mean validation AUROC with a threshold per label. `in_chans`: 1 for grey images (multi-label runs).
    Started by torchrun (several processes), every process trains its part of each global batch of `batch_size`
    with DistributedDataParallel, and BatchNorm normalises with the global batch's statistics if `sync_bn`; rank 0
    alone logs, validates and writes. The result is the same on every process (`rank` tells them apart).
    Returns a `FinetuneResult`; raises ValueError, FileNotFoundError or FileExistsError with a message naming the
    thing and the fix.
    """
    out_dir = Path(out_dir)
    given = dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, img_size=img_size,
                 hflip=hflip, scale=tuple(scale) if scale is not None else None, seed=seed, color_jitter=color_jitter)
    group = processes()
    if not group.primary:
        progress, log = False, _quiet
    run, state = group.from_primary(functools.partial(
        _run_settings, out_dir, given, model_name, data_dir, pretrained, weights, resume, force),
        shared=lambda settings: (settings[0], settings[1] and _without_weights(settings[1])))
    run = _with_labels(run, state, multi_label, labels, label_names, uncertain, in_chans, out_dir)
    train_dir, val_dir, classes = image_folders(run.data_dir) if run.labels is None else _label_splits(run, state)
    if state is not None:
        _check_resumed_classes(state, classes, run.data_dir)
    training, card_name, data_config = _prepare(run, train_dir, val_dir, classes, group)
    state = _start_state(training, state, out_dir, run, classes, log)

    size, recipe = data_config['input_size'], run.recipe
    torch.set_num_threads(choose_threads(recipe.batch_size // group.world_size, size, _width(training.model), threads))
    log(f'fine-tuning {run.model_name} from {run.base_description()} on {run.data_dir}: {len(classes)} classes, '
        f'{training.describe(size)}')
    started = time.perf_counter()
    with training.across_processes(sync_bn):
        state = _run_epochs(training, state, out_dir, progress, threads, log)
    seconds = time.perf_counter() - started

    def write() -> Dict[str, Any]:  # rank 0 writes; every process returns its state
        _write_best(training, state, out_dir, run, card_name, classes, data_config, repo_id, data_name,
                    data_description)
        return state
    state = group.from_primary(write, shared=_without_weights)
    best = state['best']
    return FinetuneResult(
        out_dir=out_dir, model_name=run.model_name, classes=classes, train_images=len(training.train_set),
        val_images=len(training.val_set), best_epoch=best['epoch'], val_accuracy=best['accuracy'],
        val_correct=best['correct'], history=state['history'], seconds=seconds, rank=group.rank,
        multi_label=_multilabel_result(best) if run.labels is not None else None)


def _quiet(line: str) -> None:
    """The log of the processes other than rank 0."""


def _without_weights(state: Dict[str, Any]) -> Dict[str, Any]:
    """The run's state less the best epoch's weights: what the processes other than rank 0 are told."""
    return dict(state, best={k: v for k, v in state['best'].items() if k != 'state_dict'})


@dataclass(frozen=True)
class _Run:
    """What a run trains: the model and its starting weights, the image folders and the recipe."""
    model_name: str
    pretrained: bool
    weights: Union[str, Path, None]
    data_dir: Path
    recipe: Recipe
    labels: Optional['_Labels'] = None  # a multi-label run's label CSV
    in_chans: Optional[int] = None  # default: the weights' own

    def saved(self) -> Dict[str, Any]:
        """The run as its state file records it: absolute paths, since `resume` may be run from another folder."""
        return dict(model_name=self.model_name, pretrained=self.pretrained,
                    weights=str(Path(self.weights).resolve()) if self.weights else None,
                    data_dir=str(self.data_dir.resolve()), in_chans=self.in_chans,
                    **(self.labels.saved() if self.labels else dict(multi_label=False)))

    def base_description(self) -> str:
        """Where the starting weights came from, for the log and the model card."""
        if self.model_name.startswith(HUB_PREFIXES):
            return f'`{self.model_name}`'
        if self.weights:
            return f'the checkpoint `{Path(self.weights).name}`'
        if self.pretrained:
            return f'`{weights_repo_id(self.model_name, pretrained=True)}`'
        return 'random initialisation (no pretrained weights)'


@dataclass
class _Training:
    """What the epoch loop works on: the model, the data, timm's AdamW on its per-step cosine schedule, the loss, and
    the processes training together (`network`: the model, or its DistributedDataParallel in `across_processes`)."""
    model: nn.Module
    train_set: Any
    val_set: Any
    recipe: Recipe
    optimizer: torch.optim.Optimizer
    scheduler: Any
    criterion: nn.Module
    steps: int  # optimiser steps per epoch
    drop_last: bool
    group: Processes
    batches: GlobalBatchSampler  # this process's part of each global batch
    network: nn.Module
    multi_label: bool = False  # a sigmoid per label: binary cross-entropy, AUROC picks the best epoch

    @classmethod
    def build(cls, model: nn.Module, train_set, val_set, recipe: Recipe, group: Processes) -> '_Training':
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler
        _check_split(recipe, len(train_set), group.world_size)
        optimizer = create_optimizer_v2(model, 'adamw', lr=recipe.lr, weight_decay=recipe.weight_decay)
        drop_last = len(train_set) > recipe.batch_size
        steps = len(train_set) // recipe.batch_size if drop_last else 1
        total_steps = recipe.epochs * steps
        warmup = min(recipe.warmup_epochs * steps, total_steps - 1)
        scheduler = CosineLRScheduler(
            optimizer, t_initial=total_steps, lr_min=recipe.lr * 1e-2, warmup_t=warmup,
            warmup_lr_init=recipe.lr * 1e-2, t_in_epochs=False)
        criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        batches = GlobalBatchSampler(len(train_set), recipe.batch_size, group.rank, group.world_size, recipe.seed,
                                     drop_last)
        return cls(model, train_set, val_set, recipe, optimizer, scheduler, criterion, steps, drop_last, group,
                   batches, model)

    def describe(self, size: Sequence[int]) -> str:
        """The images and the recipe, for the log."""
        recipe, world = self.recipe, self.group.world_size
        split = f' ({recipe.batch_size // world} on each of {world} processes)' if world > 1 else ''
        return (f'{len(self.train_set)} training and {len(self.val_set)} validation images at {size[1]} x {size[2]}; '
                f'{recipe.epochs} epochs, batch size {recipe.batch_size}{split}, AdamW lr {recipe.lr:g}')

    @contextlib.contextmanager
    def across_processes(self, sync_bn: bool) -> Iterator[None]:
        """Train the model through DistributedDataParallel within the block when there are several processes, its
        BatchNorm layers normalising with the global batch's statistics if `sync_bn`."""
        if self.group.world_size == 1:
            yield
            return
        from torch.nn.parallel import DistributedDataParallel
        device = self.group.device
        with synced_batchnorm(self.model) if sync_bn else contextlib.nullcontext():
            self.network = DistributedDataParallel(
                self.model, device_ids=None if device.type == 'cpu' else [device])
            try:
                yield
            finally:
                self.network = self.model

    def evaluated(self) -> nn.Module:
        """The model as `evaluate` runs it: fed from the CPU, its output on the CPU."""
        return self.model if self.group.device.type == 'cpu' else _OnDevice(self.model, self.group.device)

    def save_state(self, state: Dict[str, Any], out_dir: Path) -> None:
        """Save the run's state with the model's and optimiser's as STATE_FILE in `out_dir`, replacing the last."""
        with writing(out_dir / STATE_FILE, force=True) as tmp:
            torch.save(dict(state, model=self.model.state_dict(), optimizer=self.optimizer.state_dict()), tmp)

    def train_epoch(self, epoch: int, progress: Optional[bool]) -> float:
        """Train epoch `epoch` (from 1); the mean training loss (over every process's images)."""
        from tqdm.auto import tqdm
        recipe, world, device = self.recipe, self.group.world_size, self.group.device
        random_seed(recipe.seed + epoch)  # the same batches and augmentations whether resumed or not
        self.batches.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            _SeededSamples(self.train_set, recipe.seed, epoch), batch_sampler=self.batches)
        global_batch = recipe.batch_size if self.drop_last else len(self.train_set)
        self.network.train()
        loss_sum, seen = 0.0, 0
        bar = tqdm(loader, desc=f'epoch {epoch}/{recipe.epochs}', leave=False, disable=_disable(progress),
                   unit='batch')
        for step, (images, targets) in enumerate(bar):
            self.scheduler.step_update(num_updates=(epoch - 1) * self.steps + step)
            images, targets = images.to(device), targets.to(device)
            loss = self.criterion(self.network(images), targets)
            self.optimizer.zero_grad(set_to_none=True)
            # DDP averages the processes' gradients: weighted so, the global batch's mean loss (1 with one process)
            (loss * (len(targets) * world / global_batch)).backward()
            self.optimizer.step()
            loss_sum += loss.item() * len(targets)
            seen += len(targets)
            bar.set_postfix(loss=f'{loss_sum / seen:.4f}')
        bar.close()
        loss_sum, seen = self.group.sum([loss_sum, seen])
        return loss_sum / seen


class _OnDevice(nn.Module):
    """`module` on a GPU, taking and giving CPU tensors (what `evaluate` feeds it); other attributes are its."""

    def __init__(self, module: nn.Module, device: torch.device):
        super().__init__()
        self.module, self.device = module, device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.device)).cpu()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def _check_split(recipe: Recipe, train_n: int, world_size: int) -> None:
    """Refuse a global batch that the processes cannot split evenly, or fewer images than processes."""
    if recipe.batch_size % world_size:
        raise ValueError(
            f'{arg("batch_size", recipe.batch_size)}: the global batch does not split evenly between {world_size} '
            f'processes; give a multiple of the number of processes (torchrun --nproc_per_node x --nnodes).')
    if train_n < world_size:
        raise ValueError(f'{train_n} training images for {world_size} processes: start fewer processes than images.')


def _run_settings(
        out_dir: Path, given: Dict[str, Any], model_name: Optional[str], data_dir: Union[str, Path, None],
        pretrained: bool, weights: Union[str, Path, None], resume: bool, force: bool,
) -> Tuple[_Run, Optional[Dict[str, Any]]]:
    """The run, new or resumed (with its saved state, else None), refusing settings that differ from a resumed
    run's and an `out_dir` whose files would be lost."""
    if not resume:
        if not model_name or data_dir is None:
            raise ValueError(f'give {arg("model_name", "MODEL")} and {arg("data_dir", "DIR")} (or {arg("resume")}, to '
                             f'continue an interrupted run in {arg("out_dir", "DIR")}).')
        if (out_dir / STATE_FILE).is_file() and not force:
            raise FileExistsError(
                f'{out_dir}: holds an interrupted run; pass {arg("resume")} to continue it, or {arg("force")} to start '
                f'again.')
        check_out_dir(out_dir, force)
        recipe = Recipe(**{k: v for k, v in given.items() if v is not None})
        return _Run(model_name, pretrained, weights, Path(data_dir), recipe), None
    if force:
        raise ValueError(f'give {arg("resume")} to continue an interrupted run, or {arg("force")} to start it '
                         f'again, not both.')
    state = _load_state(out_dir)
    _resumed_settings(state, dict(given, model_name=model_name, pretrained=pretrained or None,
                                  weights=str(Path(weights).resolve()) if weights else None), out_dir)
    saved = state['run']
    check_out_dir(out_dir, True)  # the finished folder replaces this one: only flat hub-folder files in it
    recipe = Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in state['recipe'].items()})
    data_dir = Path(data_dir) if data_dir is not None else Path(saved['data_dir'])
    return _Run(saved['model_name'], saved['pretrained'], saved['weights'], data_dir, recipe), state


def _check_resumed_classes(state: Dict[str, Any], classes: List[str], data_dir: Path) -> None:
    if list(state['classes']) != classes:
        raise ValueError(
            f'{data_dir}: its classes ({", ".join(classes[:5])}{", ..." if len(classes) > 5 else ""}) are not the '
            f'interrupted run\'s ({", ".join(state["classes"][:5])}{", ..." if len(state["classes"]) > 5 else ""}); '
            f'give the folder it was started on as {arg("data_dir", "DIR")}, or start again with {arg("force")}.')


def _prepare(run: _Run, train_dir: Path, val_dir: Path, classes: List[str],
             group: Processes) -> Tuple[_Training, str, Dict[str, Any]]:
    """The model with a classifier for `classes` on this process's device, the data and the optimiser (`_Training`);
    the registered name the card describes; the data config of the transforms."""
    random_seed(run.recipe.seed)
    model = load_model(run.model_name, pretrained=run.pretrained, weights=run.weights, require_weights=False,
                       in_chans=run.in_chans)
    card_name = model_card_name(model)
    model.reset_classifier(len(classes))
    if run.labels is not None:
        model.to(group.device)
        training, data_config = _multilabel_training(model, run, train_dir, val_dir, group)
        return training, card_name, data_config
    train_set, val_set, data_config = _datasets(train_dir, val_dir, model, run.recipe)
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError(f'{run.data_dir}: train/ or val/ holds no images; put images in every class folder.')
    model.to(group.device)
    return _Training.build(model, train_set, val_set, run.recipe, group), card_name, data_config


def _start_state(training: _Training, state: Optional[Dict[str, Any]], out_dir: Path, run: _Run,
                 classes: List[str], log: Callable[[str], None]) -> Dict[str, Any]:
    """The resumed run's state, loaded into the model and optimiser; or a new run's, saved (by rank 0) before its
    first epoch."""
    if state is not None:
        training.model.load_state_dict(state['model'])
        training.optimizer.load_state_dict(state['optimizer'])
        log(f'resuming {out_dir} after epoch {state["epoch"]} of {run.recipe.epochs}')
        return state
    state = dict(format=_STATE_FORMAT, run=run.saved(), recipe=dataclasses.asdict(run.recipe), classes=classes,
                 epoch=0, history=[], best=dict(epoch=0, accuracy=-1.0, correct=0, state_dict=None))
    if training.group.primary:
        out_dir.mkdir(parents=True, exist_ok=True)
        training.save_state(state, out_dir)
    return state


def _run_epochs(training: _Training, state: Dict[str, Any], out_dir: Path, progress: Optional[bool],
                threads: Optional[int], log: Callable[[str], None]) -> Dict[str, Any]:
    """Train the epochs after the state's last, validating each and saving the state after it (rank 0, while the
    other processes wait); the final state, whose `best` holds the weights of the epoch with the highest validation
    accuracy (rank 0's: the others keep the state they started with)."""
    recipe, model = training.recipe, training.model
    history, best = list(state['history']), dict(state['best'])
    for epoch in range(state['epoch'] + 1, recipe.epochs + 1):
        epoch_start = time.perf_counter()
        train_loss = training.train_epoch(epoch, progress)
        if not training.group.primary:
            training.group.barrier()
            continue
        if training.multi_label:  # the highest mean AUROC is the best epoch
            state = _multilabel_epoch(training, state, epoch, train_loss, epoch_start, progress, log)
            training.save_state(state, out_dir)
            training.group.barrier()
            continue
        correct, total = evaluate(training.evaluated(), training.val_set, progress=progress, threads=threads)
        accuracy = correct / total
        is_best = accuracy > best['accuracy']
        if is_best:
            best = dict(epoch=epoch, accuracy=accuracy, correct=correct,
                        state_dict=copy.deepcopy(model.state_dict()))
        history.append(dict(epoch=epoch, train_loss=train_loss, val_accuracy=accuracy,
                            lr=training.optimizer.param_groups[0]['lr'], seconds=time.perf_counter() - epoch_start))
        log(f'epoch {epoch:>3}/{recipe.epochs}  train loss {train_loss:.4f}  val accuracy {100 * accuracy:6.2f}% '
            f'({correct}/{total})  {history[-1]["seconds"]:5.1f} s{"  best" if is_best else ""}')
        state = dict(state, epoch=epoch, history=history, best=best)
        training.save_state(state, out_dir)
        training.group.barrier()
    return state


def _write_best(training: _Training, state: Dict[str, Any], out_dir: Path, run: _Run, card_name: str,
                classes: List[str], data_config: Dict[str, Any], repo_id: Optional[str], data_name: Optional[str],
                data_description: Optional[str]) -> None:
    """Write the best epoch's weights as the hub folder `out_dir`, its card recording the data, recipe and accuracy."""
    model, best, base = training.model.cpu(), state['best'], run.base_description()
    model.load_state_dict(best['state_dict'])
    model.eval()
    data_text = data_description or (
        f'the image folder `{run.data_dir.name}/` (torchvision `ImageFolder` layout: train/ and val/, one sub-folder '
        f'per class)' if run.labels is None else run.labels.describe(run.data_dir))
    record = _training_record(state['history'], best, classes, run.recipe, data_config,
                              data_name or run.data_dir.resolve().name, data_text, base, len(training.train_set),
                              len(training.val_set))
    measured = f'{100 * best["accuracy"]:.2f}% validation accuracy'
    extra_config, written_config = None, {'input_size': data_config['input_size']} if run.recipe.img_size else None
    if run.labels is not None:
        record, measured, extra_config, written_config = _multilabel_record(
            record, best, state['history'], training, data_config)
    write_hub_folder(
        model, out_dir, model_name=card_name, repo_id=repo_id, force=True, label_names=classes,
        data_config=written_config, training=record, extra_config=extra_config,
        base_model=weights_repo_id(run.model_name, pretrained=run.pretrained, weights=run.weights),
        weights_source=f'Fine-tuned with `timm-densenet-ext finetune` from {base} on {data_text}: {measured}.')


# ---- multi-label (CheXNet style): a label CSV, a sigmoid per label, AUROC and a threshold per label

@dataclass(frozen=True)
class _Labels:
    """A multi-label run's label CSV, the labels asked for (None: the CSV's) and what its -1 counts as."""
    csv: Path
    names: Optional[Tuple[str, ...]] = None
    uncertain: Optional[int] = None

    def saved(self) -> Dict[str, Any]:
        return dict(multi_label=True, labels=str(self.csv.resolve()), uncertain=self.uncertain,
                    label_names=list(self.names) if self.names is not None else None)

    def describe(self, data_dir: Path) -> str:
        """The data, for the model card."""
        return (f'the images of `{data_dir.name}/` (train/ and val/) with their labels from `{self.csv.name}` (a row '
                f'per image, several labels each)')


def _names(label_names: Union[str, Sequence[str], None]) -> Optional[Tuple[str, ...]]:
    return tuple(label_names.split(',')) if isinstance(label_names, str) else (
        None if label_names is None else tuple(label_names))


def _with_labels(run: _Run, state: Optional[Dict[str, Any]], multi_label: bool, labels: Union[str, Path, None],
                 label_names: Union[str, Sequence[str], None], uncertain: Optional[int], in_chans: Optional[int],
                 out_dir: Path) -> _Run:
    """`run` with its label CSV (a multi-label run) and input channels, new or the interrupted run's (refusing ones
    that differ from it)."""
    if in_chans is not None and in_chans not in (1, 3):
        raise ValueError(f'{arg("in_chans", in_chans)}: give 1 (grey images) or 3 (RGB).')
    saved = state['run'] if state is not None else dict(multi_label=multi_label)
    if state is not None:
        if multi_label and not saved.get('multi_label'):
            raise ValueError(f'{out_dir}: its interrupted run is single-label (an image folder of classes); resume it '
                             f'without {arg("multi_label")}, or start again with {arg("force")}.')
        _resumed_settings(state, dict(in_chans=in_chans, uncertain=uncertain), out_dir)
        in_chans = saved.get('in_chans')
    if not saved.get('multi_label'):
        given = next((n for n, v in (('labels', labels), ('label_names', label_names), ('uncertain', uncertain),
                                     ('in_chans', in_chans if in_chans != 3 else None)) if v is not None), None)
        if given:
            raise ValueError(f'{arg(given, "...")}: is for multi-label runs; add {arg("multi_label")} and '
                             f'{arg("labels", "CSV")}, or leave it out.')
        return dataclasses.replace(run, in_chans=in_chans)
    if state is not None:
        labels = labels if labels is not None else saved['labels']
        label_names = label_names if label_names is not None else saved['label_names']
        uncertain = saved['uncertain']
    csv = Path(labels) if labels is not None else run.data_dir / LABELS_FILE
    return dataclasses.replace(run, labels=_Labels(csv, _names(label_names), uncertain), in_chans=in_chans)


def _label_splits(run: _Run, state: Optional[Dict[str, Any]]) -> Tuple[LabelTable, LabelTable, List[str]]:
    """The label tables of DIR/train and DIR/val, and the label names; refusing a label set other than an
    interrupted run's, and validation images on which no label has an AUROC."""
    labels = run.labels
    table = read_labels(labels.csv, run.data_dir, label_names=labels.names, uncertain=labels.uncertain)
    names = list(table.names)
    if state is not None and list(state['classes']) != names:
        raise ValueError(
            f'{labels.csv}: its labels ({", ".join(names[:5])}{", ..." if len(names) > 5 else ""}) are not the '
            f'interrupted run\'s ({", ".join(state["classes"][:5])}{", ..." if len(state["classes"]) > 5 else ""}); '
            f'give the label CSV and {arg("label_names", "NAMES")} it was started with, or start again with '
            f'{arg("force")}.')
    train, val = table.split('train'), table.split('val')
    one_class = val.matrix().min(axis=0) == val.matrix().max(axis=0)
    if one_class.all():
        raise ValueError(f'{labels.csv}: no label has both positive and negative images in val/, so no AUROC can be '
                         f'measured; put images with and without each label in val/.')
    return train, val, names


def _multilabel_training(model: nn.Module, run: _Run, train: LabelTable, val: LabelTable,
                         group: Processes) -> Tuple[_Training, Dict[str, Any]]:
    """The training of a sigmoid per label (binary cross-entropy) on the label tables' images, and the data config
    of its transforms (one mean and std for a 1-channel model)."""
    import timm
    recipe = run.recipe
    if getattr(model, 'in_chans', 3) == 1:
        data_config = grayscale_data_config(model, recipe.img_size)
    else:
        overrides = {'input_size': (3, recipe.img_size, recipe.img_size)} if recipe.img_size else {}
        data_config = timm.data.resolve_data_config(overrides, model=model)
    train_tf = timm.data.create_transform(
        **data_config, is_training=True, hflip=recipe.hflip, scale=recipe.scale, color_jitter=recipe.color_jitter)
    val_tf = timm.data.create_transform(**data_config)
    mode = input_img_mode(data_config)
    training = _Training.build(model, MultiLabelDataset(run.data_dir, train, train_tf, mode),
                               MultiLabelDataset(run.data_dir, val, val_tf, mode), recipe, group)
    training.criterion, training.multi_label = nn.BCEWithLogitsLoss(), True
    return training, data_config


def _multilabel_epoch(training: _Training, state: Dict[str, Any], epoch: int, train_loss: float, started: float,
                      progress: Optional[bool], log: Callable[[str], None]) -> Dict[str, Any]:
    """Validate epoch `epoch` of a multi-label run (`multilabel.evaluate_multilabel`) and log it; the state after it,
    whose `best` is the epoch of the highest mean AUROC (its weights, per-label AUROC and thresholds)."""
    model = training.model
    measured = evaluate_multilabel(training.evaluated(), training.val_set, progress=progress)
    best, accuracy = dict(state['best']), measured['correct'] / measured['total']
    is_best = measured['mean'] > best.get('mean_auroc', -1.0)
    if is_best:
        best = dict(epoch=epoch, accuracy=accuracy, correct=measured['correct'], mean_auroc=measured['mean'],
                    per_label=measured['per_label'], thresholds=measured['thresholds'], rule=measured['rule'],
                    note=measured['note'], state_dict=copy.deepcopy(model.state_dict()))
    seconds = time.perf_counter() - started
    history = list(state['history']) + [dict(epoch=epoch, train_loss=train_loss, val_auroc=measured['mean'],
                                             val_accuracy=accuracy, lr=training.optimizer.param_groups[0]['lr'],
                                             seconds=seconds)]
    per_label = ', '.join(f'{name} {"-" if a is None else f"{a:.3f}"}' for name, a in measured['per_label'].items())
    log(f'epoch {epoch:>3}/{training.recipe.epochs}  train loss {train_loss:.4f}  val mean AUROC '
        f'{measured["mean"]:.4f} ({per_label})  {seconds:5.1f} s{"  best" if is_best else ""}')
    return dict(state, epoch=epoch, history=history, best=best)


def _multilabel_result(best: Dict[str, Any]) -> Dict[str, Any]:
    return dict(mean_auroc=best['mean_auroc'], per_label=dict(best['per_label']), thresholds=list(best['thresholds']),
                rule=best['rule'])


def _multilabel_record(record: Dict[str, Any], best: Dict[str, Any], history: List[Dict[str, float]],
                       training: _Training, data_config: Dict[str, Any],
                       ) -> Tuple[Dict[str, Any], str, Dict[str, Any], Optional[Dict[str, Any]]]:
    """A multi-label run's card record (its loss, labels with their validation AUROC and threshold, AUROC per
    epoch), the measure its weights source states, config.json's multi-label keys and the data config written."""
    rule = THRESHOLD_RULES[best['rule']]
    recipe = [line if not line.startswith('cross-entropy') else
              'binary cross-entropy per label (`BCEWithLogitsLoss`: a sigmoid per label)' for line in record['recipe']]
    recipe.append(f'best epoch: the highest mean validation AUROC (scikit-learn `roc_auc_score` per label); a '
                  f'threshold per label at {rule} on the validation images')
    positives = training.val_set.table.positives()
    labels = [dict(name=name, auroc='undefined' if a is None else f'{a:.4f}', threshold=f'{t:.4f}',
                   positives=positives[name]) for (name, a), t in zip(best['per_label'].items(), best['thresholds'])]
    history = [dict(epoch=h['epoch'], train_loss=f'{h["train_loss"]:.4f}', val_auroc=f'{h["val_auroc"]:.4f}')
               for h in history]
    record = dict(record, recipe=recipe, history=history, multi_label=dict(
        mean_auroc=best['mean_auroc'], labels=labels, note=best['note'], rule=best['rule']))
    written = {'input_size': data_config['input_size']} if training.recipe.img_size else {}
    if data_config['input_size'][0] == 1:  # one mean and std: timm's own would be the RGB ones
        written.update(input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'])
    return (record, f'mean validation AUROC {best["mean_auroc"]:.4f}', config_entries(best['thresholds'], best['rule']),
            written or None)
