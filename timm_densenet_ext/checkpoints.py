"""Reading checkpoint files (torchvision, timm training checkpoints, safetensors) without running code, and verifying
them against an architecture. The key mapping timm applies while loading is the model's `checkpoint_filter_fn`."""
import argparse
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models import get_pretrained_cfg

from ._naming import arg
from .models import MODEL_NAMES, checkpoint_filter_fn, resolve_model_name

__all__ = ['Checkpoint', 'read_checkpoint', 'model_from_checkpoint']

_DENSE_LAYER_KEY = re.compile(r'(^|\.)denseblock\d+\.denselayer\d+\.')

# Entries of a training checkpoint that hold a state dict, in timm's order of preference (timm.models.load_state_dict).
_EMA_ENTRIES = ('state_dict_ema', 'model_ema')
_MODEL_ENTRIES = ('state_dict', 'model')


@dataclass(frozen=True)
class Checkpoint:
    """The state dict read from a checkpoint file, and where in the file it was found."""
    path: Path
    state_dict: Dict[str, torch.Tensor]
    format: str  # 'safetensors' or 'pickle'
    entry: Optional[str] = None  # the training-checkpoint entry read ('state_dict_ema', 'state_dict', ...), if any

    @property
    def legacy_keys(self) -> bool:
        """Whether the keys use torchvision's pre-0.4 layout ('denselayer1.norm.1.weight')."""
        return any(k not in self.state_dict for k in checkpoint_filter_fn(self.state_dict))

    def describe(self) -> str:
        """A few words on what was read: 'the EMA weights (`state_dict_ema`) of a training checkpoint'."""
        if self.entry in _EMA_ENTRIES:
            what = f'the EMA weights (`{self.entry}`) of a training checkpoint'
        elif self.entry:
            what = f'the `{self.entry}` entry of a training checkpoint'
        elif self.format == 'safetensors':
            what = 'a safetensors file'
        else:
            what = 'a PyTorch state dict'
        return what + (" in torchvision's legacy key layout" if self.legacy_keys else '')


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length and the header's JSON."""
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < path.stat().st_size


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device='cpu')
    except SafetensorError as e:
        raise ValueError(
            f'{path}: not a readable safetensors file ({e}); it is truncated or corrupt, so copy or export it '
            f'again.') from None


def _unsafe_globals(path: Path) -> List[str]:
    """The Python objects a pickle would build, read from its opcodes without running anything."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # legacy (non-zip) pickles and damaged files cannot be scanned
        return []
    return sorted(g for g in found if g != 'argparse.Namespace')


def _read_pickle(path: Path) -> object:
    # weights_only=True: only tensors and plain containers are rebuilt, never code. argparse.Namespace is allowed
    # as timm allows it: timm's training checkpoints keep their arguments under 'args'.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = _unsafe_globals(path)
        if found or str(e).startswith('Weights only load failed'):
            more = f', ... {len(found)} in all' if len(found) > 3 else ''
            named = f' ({", ".join(found[:3])}{more})' if found else ''
            raise ValueError(
                f'{path}: holds Python objects other than tensors{named}, and checkpoints are only read with '
                f'torch.load(weights_only=True), which never runs code; save the weights alone, '
                f'torch.save(model.state_dict(), PATH), or export them as .safetensors.') from None
        raise ValueError(f'{path}: not a readable PyTorch checkpoint ({e}); it is truncated or corrupt.') from None
    except EOFError:
        raise ValueError(
            f'{path}: not a readable PyTorch checkpoint (it ends early); it is truncated or empty.') from None
    except (RuntimeError, KeyError, ValueError) as e:
        reason = str(e).split('. ')[0].strip() if isinstance(e, RuntimeError) else 'unrecognised format'
        raise ValueError(
            f'{path}: not a readable PyTorch checkpoint ({reason}); it is truncated or corrupt, or not a '
            f'checkpoint at all.') from None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_checkpoint(path: Union[str, Path], use_ema: bool = True) -> Checkpoint:
    """Read the state dict of a checkpoint file, running no code.

    Reads .safetensors files, and pickles (`torch.save`) with `torch.load(weights_only=True)`: a plain state dict or
    a training checkpoint holding one under 'state_dict_ema'/'model_ema' (preferred when `use_ema`), 'state_dict'
    or 'model'. DataParallel and torch.compile prefixes ('module.', '_orig_mod.') are removed. Raises
    FileNotFoundError, or ValueError naming the file and what is wrong with it.
    """
    from timm.models import clean_state_dict
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'{path}: no such file; check the checkpoint path.')
    if path.is_dir():
        raise ValueError(f'{path}: is a folder; give the checkpoint file (.pth, .pth.tar, .bin or .safetensors).')

    if path.suffix == '.safetensors' or _looks_like_safetensors(path):
        return Checkpoint(path, clean_state_dict(_read_safetensors(path)), 'safetensors')

    obj = _read_pickle(path)
    entry = None
    if isinstance(obj, dict) and not _is_state_dict(obj):
        preferred = (_EMA_ENTRIES if use_ema else ()) + _MODEL_ENTRIES
        entry = next((k for k in preferred if obj.get(k) is not None), None)
        if entry is None:
            keys = ', '.join(repr(k) for k in list(obj)[:6])
            raise ValueError(
                f'{path}: holds no state dict (its entries are {keys}); expected tensors, or a training checkpoint '
                f"with a 'state_dict', 'state_dict_ema' or 'model' entry.")
        obj = obj[entry]
    if not _is_state_dict(obj):
        where = f"its '{entry}' entry" if entry else 'it'
        raise ValueError(
            f'{path}: {where} is a {type(obj).__name__}, not a state dict of named tensors; save the weights with '
            f'torch.save(model.state_dict(), PATH).')
    return Checkpoint(path, clean_state_dict(obj), 'pickle', entry)


def _fmt_shape(shape) -> str:
    return 'x'.join(str(s) for s in shape) or 'scalar'


def _key_diff(
        state_dict: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor],
) -> Tuple[List[str], List[str], List[Tuple[str, tuple, tuple]]]:
    """Missing keys, unexpected keys and (key, checkpoint shape, model shape) of the tensors shaped differently.

    BatchNorm's `num_batches_tracked` may be missing: old torchvision checkpoints have none, and loading sets it.
    """
    missing = [k for k in expected if k not in state_dict and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state_dict.items()
                  if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    return missing, unexpected, mismatched


def _examples(keys: List[str], n: int = 2) -> str:
    return ', '.join(keys[:n]) + (', ...' if len(keys) > n else '')


def _diff_summary(model_name: str, missing, unexpected, mismatched) -> str:
    parts = []
    if missing:
        parts.append(f'{len(missing)} tensors missing ({_examples(missing)})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected ({_examples(unexpected)})')
    if mismatched:
        key, have, want = mismatched[0]
        parts.append(
            f'{len(mismatched)} shaped differently ({key} is {_fmt_shape(have)}, {model_name} has {_fmt_shape(want)})')
    return '; '.join(parts)


def _matching_variants(state_dict: Dict[str, torch.Tensor], num_classes: int, in_chans: int) -> List[str]:
    """The registered variants whose every tensor name and shape the state dict matches (built on the meta device)."""
    import timm
    found = []
    for arch in MODEL_NAMES:
        if arch.startswith('tv_'):  # torchvision's names for the same shapes as densenet121, ...
            continue
        with torch.device('meta'):
            expected = timm.create_model(arch, num_classes=num_classes, in_chans=in_chans).state_dict()
        if not any(_key_diff(state_dict, expected)):
            found.append(arch)
    return found


def model_from_checkpoint(
        checkpoint: Union[Checkpoint, str, Path],
        model_name: str,
        num_classes: Optional[int] = None,
) -> nn.Module:
    """Build `model_name` ('arch' or 'arch.tag') holding the checkpoint's weights, verified against the architecture.

    The keys are mapped with `checkpoint_filter_fn`; every tensor must then match the model's names and shapes,
    and hold finite values. The number of classes is read from the checkpoint's classifier (0 without one) and,
    when `num_classes` is given, checked against it; `in_chans` is read from the first convolution. Returns the
    model in eval mode. Raises ValueError naming the file and what does not fit.
    """
    import timm
    arch, tag = resolve_model_name(model_name)
    cfg = get_pretrained_cfg(f'{arch}.{tag}')
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = read_checkpoint(checkpoint)
    path = checkpoint.path
    state_dict = checkpoint_filter_fn(checkpoint.state_dict)

    classifier = state_dict.get(f'{cfg.classifier}.weight')
    found_classes = classifier.shape[0] if classifier is not None and classifier.ndim == 2 else 0
    first_conv = state_dict.get(f'{cfg.first_conv}.weight')
    in_chans = first_conv.shape[1] if first_conv is not None and first_conv.ndim == 4 else 3

    model = timm.create_model(model_name, num_classes=found_classes, in_chans=in_chans)
    missing, unexpected, mismatched = _key_diff(state_dict, model.state_dict())
    if missing or unexpected or mismatched:
        summary = _diff_summary(arch, missing, unexpected, mismatched)
        if not any(_DENSE_LAYER_KEY.search(k) for k in state_dict):
            raise ValueError(
                f'{path}: looks like another architecture, not {arch}: {summary}. Expected a {arch} checkpoint '
                f'(keys like {cfg.first_conv}.weight, features.denseblock1.denselayer1.conv1.weight).')
        matches = _matching_variants(state_dict, found_classes, in_chans)
        if matches:
            raise ValueError(
                f'{path}: looks like {" or ".join(matches)}, not {arch}: {summary}; convert it with '
                f'{arg("model_name", matches[0])}.')
        raise ValueError(
            f'{path}: does not fit {arch}: {summary}. Check {arg("model_name", "MODEL")}: `timm-densenet-ext list` '
            f'shows the variants.')
    if num_classes is not None and num_classes != found_classes:
        has = f'a classifier of {found_classes} classes' if found_classes else 'no classifier'
        raise ValueError(
            f'{path}: has {has}, not the {num_classes} given by {arg("num_classes", num_classes)}; leave it out to '
            f'keep its classifier (timm.create_model(..., num_classes=N) makes a new one of another size when '
            f'loading).')

    # a sum is NaN or infinite exactly when an element is (float64: no overflow); much faster than isfinite().all()
    not_finite = [k for k, v in state_dict.items()
                  if v.is_floating_point() and not torch.isfinite(v.sum(dtype=torch.float64))]
    if not_finite:
        counted = f'{len(not_finite)} tensors hold' if len(not_finite) > 1 else '1 tensor holds'
        raise ValueError(
            f'{path}: {counted} NaN or infinite values ({_examples(not_finite)}); the training run diverged or the '
            f'file is damaged.')
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
