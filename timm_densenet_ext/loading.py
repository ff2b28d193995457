"""A model from its name and where its weights come from: the Hub (`pretrained`), a checkpoint file (`weights`),
or a hub folder / Hub repository named as the model ('local-dir:DIR', 'hf-hub:ORG/NAME').

`predict`, `finetune` and `export` all load their model here, so `--pretrained`, `--checkpoint` and hub folders mean
the same thing in every command.
"""
from pathlib import Path
from typing import Optional, Union

import torch.nn as nn
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg

from ._naming import arg
from .models import resolve_model_name
from .models.densenet import hub_offline_message

__all__ = ['HUB_PREFIXES', 'load_model', 'model_card_name', 'registered_name', 'weights_repo_id']

# timm model names that carry their own weights: a hub folder on disk, a Hub repository
HUB_PREFIXES = ('local-dir:', 'hf-hub:')


def _check_hub_folder(folder: Path, model_name: str) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(
            f'{model_name}: no such folder {folder}; give a folder written by `timm-densenet-ext convert` or '
            f'`finetune`.')
    for name in ('config.json', 'model.safetensors'):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f'{model_name}: {folder} has no {name}, so it is not a hub folder; give a folder written by '
                f'`timm-densenet-ext convert` or `finetune`.')


def load_model(
        model_name: str,
        *,
        pretrained: bool = False,
        weights: Union[str, Path, None] = None,
        require_weights: bool = True,
        in_chans: Optional[int] = None,
) -> nn.Module:
    """Build `model_name` with its weights, in eval mode.

    `model_name` is a registered variant ('densenet121', 'densenet121.tv_in1k'), loaded with the Hub's weights when
    `pretrained` or with a checkpoint file's when `weights` is given (any format `weights.read_checkpoint` reads,
    verified against the architecture; the classifier size comes from the file); or it is a hub folder
    'local-dir:DIR' or a Hub repository 'hf-hub:ORG/NAME', whose own weights, classes and preprocessing always load.
    With `require_weights`, a registered variant given neither `pretrained` nor `weights` is refused: its weights
    would be random. `in_chans` (1 for grey images): the input channels, the first convolution of the weights adapted
    to them (timm's `adapt_input_conv`: a 1-channel model sums the RGB weights); default the weights' own.
    Raises ValueError or FileNotFoundError with a message naming the thing and the fix.
    """
    import timm
    from huggingface_hub.errors import LocalEntryNotFoundError

    from .checkpoints import model_from_checkpoint
    if pretrained and weights is not None:
        raise ValueError(f'give either {arg("pretrained")} (the Hub\'s weights) or {arg("weights", "PATH")} (a file), '
                         f'not both.')
    if in_chans is not None and in_chans < 1:
        raise ValueError(f'{arg("in_chans", in_chans)}: give 1 (grey images), 3 (RGB) or another number of channels.')
    channels = {} if in_chans is None else dict(in_chans=in_chans)

    if model_name.startswith(HUB_PREFIXES):
        if weights is not None:
            raise ValueError(
                f'{model_name} loads its own weights; give {arg("weights", "PATH")} with a variant name '
                f'(densenet121), or leave it out.')
        if model_name.startswith('local-dir:'):
            _check_hub_folder(Path(model_name[len('local-dir:'):]), model_name)
        try:
            model = timm.create_model(model_name, pretrained=True, **channels)
        except LocalEntryNotFoundError:  # huggingface_hub's message names neither the repository nor a way out
            raise FileNotFoundError(hub_offline_message(model_name, 'give a hub folder as local-dir:DIR')) from None
        except RuntimeError as e:  # timm: 'Unknown model (...)' for an architecture it does not know
            raise ValueError(f'{model_name}: timm cannot build it ({e}).') from None
        return model.eval()

    arch, tag = resolve_model_name(model_name)
    has_weights = get_pretrained_cfg(f'{arch}.{tag}').has_weights
    if pretrained and not has_weights:
        raise ValueError(
            f'{model_name}: has no pretrained weights; leave out {arg("pretrained")}, or give {arg("weights", "PATH")} '
            f'(a checkpoint file). `timm-densenet-ext list` shows which variants have them.')
    if weights is not None:
        weights = Path(weights)
        if weights.is_dir() and (weights / 'config.json').is_file():
            raise ValueError(
                f'{weights}: is a hub folder; give it as the model, local-dir:{weights}, instead of '
                f'{arg("weights", "PATH")}.')
        return _adapted_input(model_from_checkpoint(weights, model_name), in_chans)
    if require_weights and not pretrained:
        hint = f'{arg("pretrained")} (the Hub\'s weights), ' if has_weights else ''
        raise ValueError(
            f'{model_name}: no weights given, so its outputs would be random; pass {hint}{arg("weights", "PATH")} '
            f'(a checkpoint file), or give a hub folder as the model, local-dir:DIR.')
    return timm.create_model(model_name, pretrained=pretrained, **channels).eval()


def _adapted_input(model: nn.Module, in_chans: Optional[int]) -> nn.Module:
    """`model` taking `in_chans` input channels: its first convolution's weights adapted as timm's builder adapts
    pretrained ones (`adapt_input_conv`), the config's input size and mean/std left to the caller."""
    from timm.models import adapt_input_conv
    conv = model.get_submodule(model.pretrained_cfg['first_conv'])
    if in_chans is None or in_chans == conv.in_channels:
        return model
    conv.weight = nn.Parameter(adapt_input_conv(in_chans, conv.weight.detach()))
    conv.in_channels = in_chans
    model.in_chans = in_chans
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(in_chans, *model.pretrained_cfg['input_size'][1:]))
    return model


def model_card_name(model: nn.Module) -> str:
    """The registered 'arch' or 'arch.tag' a model was built as: the name its model card is rendered for."""
    cfg = model.pretrained_cfg
    return registered_name(cfg.get('architecture') or type(model).__name__, cfg.get('tag'))


def registered_name(architecture: str, tag: Optional[str] = None) -> str:
    """'arch.tag' for an architecture and the tag a pretrained config records; the variant's default tag when the
    recorded one is not among its own (a config saved from another model, or none)."""
    arch, default_tag = resolve_model_name(architecture)
    known = f'{arch}.{tag}' in get_arch_pretrained_cfgs(arch)
    return f'{arch}.{tag if known else default_tag}'


def weights_repo_id(
        model_name: str,
        *,
        pretrained: bool = False,
        weights: Union[str, Path, None] = None,
) -> Optional[str]:
    """The Hub repository ('ORG/NAME') whose weights `load_model` loads for these arguments: a model card's
    `base_model` when they are fine-tuned. 'hf-hub:ORG/NAME' gives ORG/NAME; a registered variant with `pretrained`
    its tag's repository ('densenet121' -> 'timm/densenet121.ra_in1k'). None where the weights are not a Hub
    repository's: a checkpoint file (`weights`), a local folder ('local-dir:DIR'), or random initialisation.
    """
    if weights is not None or model_name.startswith('local-dir:'):
        return None
    if model_name.startswith('hf-hub:'):
        return model_name[len('hf-hub:'):].split('@', 1)[0] or None
    if not pretrained:
        return None
    arch, tag = resolve_model_name(model_name)
    return get_pretrained_cfg(f'{arch}.{tag}').hf_hub_id or None
