"""Hub folders: a checkpoint converted into model.safetensors, config.json and README.md, and pushed to the Hub.

A folder is written the way timm's own `save_for_hf` writes one, so `timm.create_model('local-dir:DIR')` and, once
pushed, `timm.create_model('hf-hub:ORG/NAME', pretrained=True)` load it. Uploads go through huggingface_hub's HfApi.
"""
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from .variants import resolve_model_name
from .weights import model_from_checkpoint, read_checkpoint

__all__ = ['convert_checkpoint', 'write_hub_folder', 'check_out_dir', 'validate_folder', 'upload_files', 'push_folder',
           'PushResult']

WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
CARD_FILE = 'README.md'
# the repository a card's usage code names when convert was not told where the folder will be pushed
PLACEHOLDER_ORG = 'YOUR-ORG'

_HF_HUB_REF = re.compile(r'hf-hub:([\w.\-]+/[\w.\-]+)')
_LOGIN_HINT = 'log in with `hf auth login`, or set HF_TOKEN to a token with write access'


def check_out_dir(out_dir: Path, force: bool, source: Optional[Path] = None) -> None:
    """Refuse to write where files would be lost: a file, a folder with contents (unless `force`), or with `force` a
    folder that is not a flat hub folder or that holds the source checkpoint."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not out_dir.is_dir():
        raise FileExistsError(f'{out_dir}: exists and is not a folder; choose another --out.')
    entries = sorted(out_dir.iterdir())
    if not entries:
        return
    if not force:
        raise FileExistsError(
            f'{out_dir}: folder exists and is not empty; pass --force to replace it, or choose another --out.')
    folders = [e.name for e in entries if e.is_dir()]
    if folders:
        raise FileExistsError(
            f'{out_dir}: holds folders ({", ".join(folders[:3])}), so it is not a folder `convert` wrote, and --force '
            f'only replaces those; choose another --out.')
    if source is not None and source.resolve().parent == out_dir.resolve():
        raise FileExistsError(f'{out_dir}: holds the checkpoint being converted; choose another --out.')


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Move the finished `staging` folder to `out_dir`; an existing `out_dir` is kept until the move succeeded."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    backup = out_dir.with_name(f'.{out_dir.name}.{secrets.token_hex(4)}.old')
    os.rename(out_dir, backup)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(backup, out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _chmod_default(folder: Path) -> None:
    """Give the files the permissions of any new file (safetensors writes its file readable by the owner only)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _label_config(model: nn.Module) -> Dict[str, Any]:
    """ImageNet label names and descriptions for a model with the classes of its ImageNet pretrained config."""
    from timm.data import ImageNetInfo, infer_imagenet_subset
    if model.num_classes != model.pretrained_cfg.get('num_classes'):
        return {}
    subset = infer_imagenet_subset(model)
    if not subset:
        return {}
    info = ImageNetInfo(subset)
    return dict(label_names=list(info.label_names()), label_descriptions=info.label_descriptions(as_dict=True))


def write_hub_folder(
        model: nn.Module,
        out_dir: Union[str, Path],
        *,
        model_name: str,
        weights_source: Optional[str] = None,
        repo_id: Optional[str] = None,
        force: bool = False,
        label_names: Optional[Sequence[str]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        training: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write `model` as a hub folder: model.safetensors and config.json (timm's `save_for_hf`) and the model card.

    `model_name` ('arch' or 'arch.tag') selects the card; `repo_id` is the repository its usage code loads
    (default 'YOUR-ORG/<folder name>'). `label_names` names the classes in config.json (default: ImageNet's, for a
    model with ImageNet's classes); `data_config` is the preprocessing the weights were trained for, where it differs
    from the model's pretrained config (e.g. `{'input_size': (3, 16, 16)}`); `training` is what the card's Training
    section records (`finetune` writes it). Everything is written to a temporary folder beside `out_dir`, then
    renamed: a failed write leaves `out_dir` as it was. An existing non-empty `out_dir` is replaced only with `force`.
    """
    from timm.models import save_for_hf

    from .cards import render_model_card
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    target = out_dir.absolute()  # a name to put the temporary folder beside, also for '.'
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f'.{target.name}.{secrets.token_hex(4)}.tmp')
    staging.mkdir()
    try:
        labels = dict(label_names=list(label_names)) if label_names else _label_config(model)
        save_for_hf(model, str(staging), model_config=labels, data_config=data_config, safe_serialization=True)
        config = json.loads((staging / CONFIG_FILE).read_text())
        card_cfg = dict(config['pretrained_cfg'])
        card_cfg.update({k: config[k] for k in ('label_names', 'label_descriptions') if k in config})
        card = render_model_card(
            model_name, repo_id=repo_id or f'{PLACEHOLDER_ORG}/{target.name}', pretrained_cfg=card_cfg,
            weights_source=weights_source, training=training, model_args=config.get('model_args'))
        (staging / CARD_FILE).write_text(card, encoding='utf-8')
        _chmod_default(staging)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def convert_checkpoint(
        checkpoint: Union[str, Path],
        model_name: str,
        out_dir: Union[str, Path],
        num_classes: Optional[int] = None,
        force: bool = False,
        *,
        repo_id: Optional[str] = None,
        use_ema: bool = True,
) -> Path:
    """Convert a checkpoint file of `model_name` into a hub folder `out_dir`, verified before anything is written.

    Reads torchvision (current and legacy keys) and timm checkpoints, training checkpoints (EMA weights preferred
    when `use_ema`) and .safetensors files, never running code from them (`weights.read_checkpoint`), and checks
    every tensor against the architecture (`weights.model_from_checkpoint`); `num_classes` defaults to the
    checkpoint's classifier. `repo_id` is the Hub repository the model card's usage code loads.
    Raises FileNotFoundError, FileExistsError or ValueError with a message naming the file and the fix.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    resolve_model_name(model_name)
    check_out_dir(out_dir, force, source=checkpoint)
    ckpt = read_checkpoint(checkpoint, use_ema=use_ema)
    model = model_from_checkpoint(ckpt, model_name, num_classes=num_classes)
    source = f'Converted with `timm-densenet-ext convert` from {ckpt.describe()}, `{checkpoint.name}`.'
    return write_hub_folder(model, out_dir, model_name=model_name, weights_source=source, repo_id=repo_id, force=force)


def upload_files(folder: Union[str, Path]) -> List[Tuple[str, int]]:
    """(path in the repository, size in bytes) of every file `push_folder` uploads: all but hidden ones."""
    folder = Path(folder)
    files = []
    for path in sorted(folder.rglob('*')):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith('.') for part in rel.parts):
            files.append((rel.as_posix(), path.stat().st_size))
    return files


def validate_folder(folder: Union[str, Path], repo_id: Optional[str] = None) -> Dict[str, Any]:
    """Check that timm loads the hub folder (model.safetensors and config.json) and return its config.

    With `repo_id`, the model card's usage code (if any) must load that repository. Raises FileNotFoundError or
    ValueError naming the file and the fix.
    """
    import timm
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f'{folder}: no such folder; make one with `timm-densenet-ext convert`.')
    if not folder.is_dir():
        raise ValueError(f'{folder}: is a file; give the folder `timm-densenet-ext convert` wrote.')
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f'{folder}: has no {name}; make the folder with `timm-densenet-ext convert`.')
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f'{folder / CONFIG_FILE}: not valid JSON ({e}); write the folder again with convert.') from None
    arch = config.get('architecture') if isinstance(config, dict) else None
    if not isinstance(arch, str):
        raise ValueError(f'{folder / CONFIG_FILE}: names no architecture; write the folder again with convert.')
    resolve_model_name(arch)
    model_from_checkpoint(folder / WEIGHTS_FILE, arch, num_classes=config.get('num_classes'))
    try:  # the config as timm reads it, through timm's own loader
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f'{folder}: timm cannot load it ({reason}); write the folder again with convert.') from None

    card = folder / CARD_FILE
    if repo_id and card.is_file():
        named = {ref.rstrip('.') for ref in _HF_HUB_REF.findall(card.read_text(encoding='utf-8'))}
        others = sorted(named - {repo_id})
        if others:
            raise ValueError(
                f'{card}: its usage code loads hf-hub:{others[0]}, not hf-hub:{repo_id}; convert again with '
                f'--repo-id {repo_id} --force.')
    return config


@dataclass(frozen=True)
class PushResult:
    """What `push_folder` uploaded (or, in a dry run, would upload) and where."""
    repo_id: str
    files: List[Tuple[str, int]]
    revision: Optional[str] = None
    dry_run: bool = False
    commit_url: Optional[str] = None
    pr_url: Optional[str] = None


def push_folder(
        folder: Union[str, Path],
        repo_id: str,
        *,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
        create_pr: bool = False,
        dry_run: bool = False,
        token: Optional[str] = None,
) -> PushResult:
    """Upload a hub folder to the repository `repo_id` ('ORG/NAME'), creating the repository and branch if needed.

    The token comes from `token`, else huggingface_hub's usual places (HF_TOKEN, the `hf auth login` cache); without
    one nothing is done. The folder is validated first (`validate_folder`). `dry_run` validates and lists the files
    without a token or the network. `create_pr` opens a pull request instead of committing to `revision`.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import validate_repo_id

    from . import __version__
    if repo_id.count('/') != 1:
        raise ValueError(f'--repo-id {repo_id!r}: give the repository as ORG/NAME (your user name or an organisation).')
    validate_repo_id(repo_id)
    if not dry_run:
        token = token or get_token()
        if not token:
            raise PermissionError(
                f'no Hugging Face token to push {folder} with: {_LOGIN_HINT} (https://huggingface.co/settings/tokens);'
                f' --dry-run shows what would be uploaded without one.')
    config = validate_folder(folder, repo_id)
    files = upload_files(folder)
    if dry_run:
        return PushResult(repo_id, files, revision, dry_run=True)

    api = HfApi(token=token, library_name='timm-densenet-ext', library_version=__version__)
    try:
        repo_id = api.create_repo(repo_id, private=True if private else None, exist_ok=True).repo_id
        if revision and revision != 'main':
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), revision=revision, create_pr=create_pr,
            commit_message=commit_message or f'Add {config["architecture"]} weights',
            allow_patterns=[name for name, _ in files])
    except HfHubHTTPError as e:
        status = getattr(e.response, 'status_code', None)
        if status in (401, 403):
            raise PermissionError(f'the Hub refused to write to {repo_id} (HTTP {status}); {_LOGIN_HINT} to it.') from e
        raise
    return PushResult(repo_id, files, revision, commit_url=commit.commit_url, pr_url=commit.pr_url)
