"""Hub folders: a checkpoint converted into model.safetensors, config.json and README.md, and pushed to the Hub.

A folder is written the way timm's own `save_for_hf` writes one, so `timm.create_model('local-dir:DIR')` and, once
pushed, `timm.create_model('hf-hub:ORG/NAME', pretrained=True)` load it. Uploads go through huggingface_hub's HfApi.
"""
import contextlib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from ._files import claim, writing, writing_folder
from ._naming import arg
from .checkpoints import model_from_checkpoint, read_checkpoint
from .loading import registered_name
from .models import resolve_model_name
from .predict import imagenet_label_config

__all__ = ['convert_checkpoint', 'write_hub_folder', 'check_out_dir', 'validate_folder', 'load_code', 'upload_files',
           'folder_card', 'update_folder_config', 'push_folder', 'PushResult', 'PushError']

WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
CARD_FILE = 'README.md'
# the repository a card's usage code names when convert was not told where the folder will be pushed
PLACEHOLDER_ORG = 'YOUR-ORG'
# config.json key (timm reads only its own keys) recording what the card was rendered from, so that `push` can render
# it again for the repository it pushes to; it holds nothing the card does not say
CARD_INPUTS_KEY = 'timm_densenet_ext_card'
# config.json's top-level keys of a multi-label model (`multilabel.config_entries`), which its card states
MULTI_LABEL_KEYS = ('problem_type', 'label_thresholds', 'threshold_rule')

_HF_HUB_REF = re.compile(r'hf-hub:([\w.\-]+/[\w.\-]+)')
_LOGIN_HINT = 'log in with `hf auth login`, or set HF_TOKEN to a token with write access'


def check_out_dir(out_dir: Path, force: bool, source: Optional[Path] = None) -> None:
    """Refuse to write where files would be lost: a file, a folder with contents (unless `force`), or with `force` a
    folder that is not a flat hub folder or that holds the source checkpoint."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not out_dir.is_dir():
        raise FileExistsError(f'{out_dir}: exists and is not a folder; choose another {arg("out_dir", "DIR")}.')
    entries = sorted(out_dir.iterdir())
    if not entries:
        return
    if not force:
        raise FileExistsError(
            f'{out_dir}: folder exists and is not empty; pass {arg("force")} to replace it, or choose another '
            f'{arg("out_dir", "DIR")}.')
    folders = [e.name for e in entries if e.is_dir()]
    if folders:
        raise FileExistsError(
            f'{out_dir}: holds folders ({", ".join(folders[:3])}), so it is not a folder `convert` wrote, and '
            f'{arg("force")} only replaces those; choose another {arg("out_dir", "DIR")}.')
    if source is not None and source.resolve().parent == out_dir.resolve():
        raise FileExistsError(
            f'{out_dir}: holds the checkpoint being converted; choose another {arg("out_dir", "DIR")}.')


def _label_config(model: nn.Module) -> Dict[str, Any]:
    """ImageNet label names and descriptions for a model with the classes of its ImageNet pretrained config."""
    if model.num_classes != model.pretrained_cfg.get('num_classes'):
        return {}
    return imagenet_label_config(model)


def _card_cfg(config: Dict[str, Any]) -> Dict[str, Any]:
    """The pretrained config a hub folder's card is rendered with: config.json's, with its class names."""
    card_cfg = dict(config['pretrained_cfg'])
    card_cfg.update({k: config[k] for k in ('label_names', 'label_descriptions', *MULTI_LABEL_KEYS) if k in config})
    return card_cfg


def _render_folder_card(config: Dict[str, Any], inputs: Dict[str, Any], repo_id: str) -> str:
    """The card of a hub folder (its config.json and the recorded card inputs) for the repository `repo_id`."""
    from .cards import render_model_card
    return render_model_card(
        inputs['model_name'], repo_id=repo_id, pretrained_cfg=_card_cfg(config), model_args=config.get('model_args'),
        weights_source=inputs.get('weights_source'), training=inputs.get('training'),
        base_model=inputs.get('base_model'), datasets=inputs.get('datasets'), license=inputs.get('license'))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
        base_model: Optional[str] = None,
        datasets: Union[str, Sequence[str], None] = None,
        license: Optional[str] = None,
        extra_config: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write `model` as a hub folder: model.safetensors and config.json (timm's `save_for_hf`) and the model card.

    `model_name` ('arch' or 'arch.tag') selects the architecture and preprocessing the card describes; `repo_id` is
    the repository its usage code loads (default 'YOUR-ORG/<folder name>'; `push_folder` renders the card again for
    the repository it pushes to). `label_names` names the classes in config.json (default: ImageNet's, for a model
    with ImageNet's classes); `data_config` is the preprocessing the weights were trained for, where it differs
    from the model's pretrained config (e.g. `{'input_size': (3, 16, 16)}`). The card states about the weights only
    what is given: `weights_source` (a sentence), `training` (the Training section and its accuracy, from
    `finetune`), `base_model` (the Hub repository they were trained from), `datasets` (Hub dataset ids), `license`.
    These inputs are recorded in config.json under 'timm_densenet_ext_card', which timm ignores.
    `extra_config`: keys added at config.json's top level, beside `label_names`, which timm ignores (a multi-label
    model's `problem_type`, `label_thresholds` and `threshold_rule`: `multilabel.config_entries`); the card reads them.
    Everything is written to a temporary folder beside `out_dir`, then renamed: a failed write leaves `out_dir` as
    it was. An existing non-empty `out_dir` is replaced only with `force`.
    """
    from .cards import check_card_facts
    out_dir = Path(out_dir)
    check_card_facts(base_model, datasets, license)
    target = out_dir.absolute()  # a name to put the temporary folder beside, also for '.'
    target.parent.mkdir(parents=True, exist_ok=True)
    with claim(target):  # from the check to the rename: a second writer of the same folder is refused, not lost
        check_out_dir(out_dir, force)
        _write_staged(model, target, model_name, repo_id, label_names, data_config,
                      _card_facts(weights_source, training, base_model, datasets, license), extra_config)
    return out_dir


def _card_facts(weights_source: Optional[str], training: Optional[Dict[str, Any]], base_model: Optional[str],
                datasets: Union[str, Sequence[str], None], license: Optional[str]) -> Dict[str, Any]:
    """What the card states about the weights, as config.json records it for `push` to render the card again."""
    return dict(weights_source=weights_source, training=training, base_model=base_model,
                datasets=[datasets] if isinstance(datasets, str) else datasets, license=license)


def _write_staged(model: nn.Module, target: Path, model_name: str, repo_id: Optional[str],
                  label_names: Optional[Sequence[str]], data_config: Optional[Dict[str, Any]],
                  facts: Dict[str, Any], extra_config: Optional[Dict[str, Any]] = None) -> None:
    """Write the folder's files into a temporary folder beside `target`, then swap it in (`_files.writing_folder`)."""
    from timm.models import save_for_hf
    with writing_folder(target) as staging:
        labels = dict(label_names=list(label_names)) if label_names else _label_config(model)
        save_for_hf(model, str(staging), model_config=labels, data_config=data_config, safe_serialization=True)
        config = json.loads((staging / CONFIG_FILE).read_text())
        config.update(extra_config or {})
        repo_id = repo_id or f'{PLACEHOLDER_ORG}/{target.name}'
        inputs = dict(model_name=model_name, repo_id=repo_id, **facts)
        card = _render_folder_card(config, inputs, repo_id).encode('utf-8')
        (staging / CARD_FILE).write_bytes(card)
        config[CARD_INPUTS_KEY] = dict(inputs, card_sha256=_sha256(card))  # what an unedited card hashes to
        with open(staging / CONFIG_FILE, 'w') as f:
            json.dump(config, f, indent=2)  # as timm's save_for_hf writes it


def convert_checkpoint(
        checkpoint: Union[str, Path],
        model_name: str,
        out_dir: Union[str, Path],
        num_classes: Optional[int] = None,
        force: bool = False,
        *,
        repo_id: Optional[str] = None,
        use_ema: bool = True,
        base_model: Optional[str] = None,
        datasets: Union[str, Sequence[str], None] = None,
        license: Optional[str] = None,
        weights_source: Optional[str] = None,
) -> Path:
    """Convert a checkpoint file of `model_name` into a hub folder `out_dir`, verified before anything is written.

    Reads torchvision (current and legacy keys) and timm checkpoints, training checkpoints (EMA weights preferred
    when `use_ema`) and .safetensors files, never running code from them (`weights.read_checkpoint`), and checks
    every tensor against the architecture (`weights.model_from_checkpoint`); `num_classes` defaults to the
    checkpoint's classifier. A tag in `model_name` picks the preprocessing recorded, not facts about the weights.
    `repo_id` is the Hub repository the model card's usage code loads (`push_folder` renders it again for another).
    The card states what the checkpoint is (file, entry read) and, only when given, `base_model` (the Hub repository
    the weights were fine-tuned from, or a published tag), `datasets` (Hub dataset ids), `license` and
    `weights_source` (a sentence on where the weights come from); nothing else about them is claimed.
    Raises FileNotFoundError, FileExistsError or ValueError with a message naming the file and the fix.
    """
    from .cards import check_card_facts
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    resolve_model_name(model_name)
    check_card_facts(base_model, datasets, license)
    out_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
    with claim(out_dir):  # held through reading and checking the checkpoint, which takes the longest
        check_out_dir(out_dir, force, source=checkpoint)
        ckpt = read_checkpoint(checkpoint, use_ema=use_ema)
        model = model_from_checkpoint(ckpt, model_name, num_classes=num_classes)
        source = f'Converted with `timm-densenet-ext convert` from {ckpt.describe()}, `{checkpoint.name}`.'
        if weights_source:
            source = f'{weights_source.strip()}\n\n{source}'
        # write_hub_folder's work less its checks, done above
        _write_staged(model, out_dir.absolute(), model_name, repo_id, None, None,
                      _card_facts(source, None, base_model, datasets, license))
    return out_dir


def load_code(folder: Union[str, Path]) -> str:
    """One line of Python that loads the hub folder with its weights, as the tools print it for a next step (without
    `pretrained=True` timm builds random weights; without the import it does not know the plugin-only variants)."""
    return f"import timm, timm_densenet_ext; model = timm.create_model({f'local-dir:{folder}'!r}, pretrained=True)"


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

    With `repo_id`, also check that the folder has a card for that repository, or one `push_folder` can render for
    it (`folder_card`). Raises FileNotFoundError or ValueError naming the file and the fix.
    """
    import timm

    from .cards import HEAD_ARGS
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f'{folder}: no such folder; make one with `timm-densenet-ext convert`.')
    if not folder.is_dir():
        raise ValueError(f'{folder}: is a file; give the folder `timm-densenet-ext convert` wrote.')
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f'{folder}: has no {name}; make the folder with `timm-densenet-ext convert`.')
    config = _read_config(folder)
    arch = config.get('architecture')
    if not isinstance(arch, str):
        raise ValueError(f'{folder / CONFIG_FILE}: names no architecture; write the folder again with convert.')
    resolve_model_name(arch)
    checkpoint = read_checkpoint(folder / WEIGHTS_FILE)
    # a model built with other arguments than the checkpoint tells (e.g. block_config): timm's strict load checks it
    if not set(config.get('model_args') or {}) - set(HEAD_ARGS):
        model_from_checkpoint(checkpoint, arch, num_classes=config.get('num_classes'))
    try:  # the config as timm reads it, through timm's own loader
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f'{folder}: timm cannot load it ({reason}); write the folder again with convert.') from None
    if repo_id:
        folder_card(folder, repo_id, config=config)
    return config


def _read_config(folder: Path) -> Dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f'{folder / CONFIG_FILE}: not valid JSON ({e}); write the folder again with convert.') from None
    if not isinstance(config, dict):
        raise ValueError(f'{folder / CONFIG_FILE}: names no architecture; write the folder again with convert.')
    return config


def _recorded_inputs(config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    inputs = config.get(CARD_INPUTS_KEY)
    return inputs if isinstance(inputs, dict) and isinstance(inputs.get('model_name'), str) else None


def folder_card(
        folder: Union[str, Path],
        repo_id: str,
        *,
        config: Optional[Dict[str, Any]] = None,
) -> Tuple[str, str]:
    """The model card `push_folder` uploads as README.md to `repo_id`, and where it comes from: 'folder' (the
    folder's README.md, unchanged), 'rendered' (rendered for `repo_id` from the inputs config.json records) or
    'config' (the folder has no card and records none: rendered from config.json, stating nothing about the weights).

    A card `convert` or `finetune` wrote, unedited, is rendered again for `repo_id`: usage code, links, title and
    model-index name change, the rest (weights source, Training section, facts) stays. A card edited since, or
    written by hand or by an older version, is uploaded as it is; when its usage code loads another repository,
    that is refused with a ValueError saying how to fix it. The folder is never modified.
    """
    data, source = _folder_card_bytes(Path(folder), repo_id, config)
    return data.decode('utf-8', errors='replace'), source


def update_folder_config(folder: Union[str, Path], entries: Dict[str, Any]) -> List[Path]:
    """Set `entries` at the top level of the hub folder's config.json (beside `label_names`; timm ignores them), and
    render its card again from the new config when it is the card convert or finetune wrote, unedited, so that both
    say the same; a card edited since, or written by hand, is left as it is. Each file is written whole under a
    temporary name, then renamed. Returns the files rewritten, config.json first."""
    folder = Path(folder)
    with claim(folder.absolute()):
        config = _read_config(folder)
        inputs, card_path = _recorded_inputs(config), folder / CARD_FILE
        unedited = (inputs is not None and card_path.is_file()
                    and inputs.get('card_sha256') == _sha256(card_path.read_bytes()))
        config.update(entries)
        card = None
        if unedited:
            repo_id = inputs.get('repo_id') or f'{PLACEHOLDER_ORG}/{folder.absolute().name}'
            card = _render_folder_card(config, inputs, repo_id).encode('utf-8')
            config[CARD_INPUTS_KEY] = dict(inputs, card_sha256=_sha256(card))
        with writing(card_path, force=True) if card else contextlib.nullcontext() as card_tmp:
            with writing(folder / CONFIG_FILE, force=True) as tmp:
                tmp.write_text(json.dumps(config, indent=2))  # as write_hub_folder writes it
            if card:
                card_tmp.write_bytes(card)
    return [folder / CONFIG_FILE] + ([card_path] if card else [])


def _folder_card_bytes(folder: Path, repo_id: str, config: Optional[Dict[str, Any]]) -> Tuple[bytes, str]:
    """`folder_card` as the bytes `push_folder` uploads: the folder's own file exactly as it is, or the rendering."""
    config = _read_config(folder) if config is None else config
    inputs = _recorded_inputs(config)
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        if inputs is None:  # the registered tag the config was saved from, for its preprocessing
            model_name = registered_name(config['architecture'], config['pretrained_cfg'].get('tag'))
            return _render_folder_card(config, dict(model_name=model_name), repo_id).encode('utf-8'), 'config'
        return _render_folder_card(config, inputs, repo_id).encode('utf-8'), 'rendered'

    data = card_path.read_bytes()
    if inputs is not None and inputs.get('card_sha256') == _sha256(data):
        if inputs.get('repo_id') == repo_id:
            return data, 'folder'
        return _render_folder_card(config, inputs, repo_id).encode('utf-8'), 'rendered'

    others = sorted({ref.rstrip('.') for ref in _HF_HUB_REF.findall(data.decode('utf-8', errors='replace'))} -
                    {repo_id})
    if others:
        why = ('was edited after it was written' if inputs is not None else
               f'was written by hand or by an older version ({CONFIG_FILE} records no card inputs)')
        raise ValueError(
            f'{card_path}: its usage code loads hf-hub:{others[0]}, not hf-hub:{repo_id}, and it {why}, so push '
            f'does not rewrite it; replace {others[0]} with {repo_id} in it, or delete it to have push render the '
            f'card for {repo_id}.')
    return data, 'folder'


@dataclass(frozen=True)
class PushResult:
    """What `push_folder` uploaded (or, in a dry run, would upload) and where.

    `files` are (path in the repository, size in bytes) as uploaded; `card` is the README.md text uploaded and
    `card_source` where it comes from ('folder', 'rendered' or 'config', see `folder_card`).
    """
    repo_id: str
    files: List[Tuple[str, int]]
    revision: Optional[str] = None
    dry_run: bool = False
    commit_url: Optional[str] = None
    pr_url: Optional[str] = None
    card: Optional[str] = None
    card_source: Optional[str] = None


class PushError(ConnectionError):
    """The Hub could not be reached, or failed or refused the upload for a reason other than permissions: one
    line naming the repository and what to do."""


def _transport_errors() -> Tuple[type, ...]:
    """The connection-level exceptions of the HTTP clients huggingface_hub versions use (none are HTTP errors)."""
    errors: List[type] = [OSError]
    for module, name in (('httpx2', 'TransportError'), ('httpx', 'TransportError'), ('requests', 'RequestException')):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _one_line(text: Optional[str], limit: int = 160) -> str:
    line = ' '.join(str(text or '').split())
    return line if len(line) <= limit else line[:limit - 3] + '...'


def _push_error(e: BaseException, repo_id: str, endpoint: str, step: str) -> BaseException:
    """The one-line error for `e`, raised while `step` ('committing to ORG/NAME'); `e` itself if it is not the Hub's."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    if isinstance(e, OfflineModeIsEnabled):
        return _offline_error(repo_id)
    if isinstance(e, HfHubHTTPError):
        response = e.response
        status = getattr(response, 'status_code', None)
        said = _one_line(getattr(e, 'server_message', None) or getattr(response, 'reason_phrase', None) or
                         getattr(response, 'reason', None))
        said = f': {said}' if said else ''
        if status in (401, 403):
            return PermissionError(
                f'the Hub refused to write to {repo_id} (HTTP {status}{said}); {_LOGIN_HINT} to it.')
        if status == 404:
            return PushError(
                f'the Hub at {endpoint} answered HTTP 404{said} while {step}; check {arg("repo_id", "ORG/NAME")}, '
                f'{arg("revision", "BRANCH")} if given, and HF_ENDPOINT if set.')
        if status is not None and status >= 500:
            return PushError(
                f'the Hub at {endpoint} failed while {step} (HTTP {status}{said}); the problem is on its side: push '
                f'again later (https://status.huggingface.co).')
        return PushError(f'the Hub at {endpoint} refused {step} (HTTP {status}{said}); fix what it names, then push '
                         f'again.')
    if isinstance(e, _transport_errors()):
        return PushError(
            f'cannot reach the Hub at {endpoint} while {step} ({_one_line(str(e) or type(e).__name__)}); check the '
            f'network connection, any proxy (HTTPS_PROXY) and HF_ENDPOINT if set, then push again.')
    return e


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

    Every file but hidden ones is uploaded as it is, in one commit, except README.md: the card is rendered for
    `repo_id` when the folder's own card was written for another repository (`folder_card`), and the folder is
    never modified. The token comes from `token`, else huggingface_hub's usual places (HF_TOKEN, the `hf auth login`
    cache); without one nothing is done. The folder is validated first (`validate_folder`). `dry_run` validates and
    returns what would be uploaded, card text included, without a token or the network. `create_pr` opens a pull
    request instead of committing to `revision`. Errors are one line: ValueError, FileNotFoundError (the folder),
    PermissionError (no token, HTTP 401/403), PushError (a ConnectionError: offline, unreachable, HTTP 404, 5xx).
    """
    from huggingface_hub.utils import validate_repo_id
    if repo_id.count('/') != 1:
        raise ValueError(f'{arg("repo_id", repr(repo_id))}: give the repository as ORG/NAME (your user name or an '
                         f'organisation).')
    validate_repo_id(repo_id)
    folder = Path(folder)
    if not dry_run:
        token = _push_token(folder, repo_id, token)
    config = validate_folder(folder)
    card_bytes, card_source = _folder_card_bytes(folder, repo_id, config)
    files = sorted([(name, size) for name, size in upload_files(folder) if name != CARD_FILE] +
                   [(CARD_FILE, len(card_bytes))])
    result = dict(repo_id=repo_id, files=files, revision=revision, card=card_bytes.decode('utf-8', errors='replace'),
                  card_source=card_source)
    if dry_run:
        return PushResult(dry_run=True, **result)
    commit = _commit(folder, repo_id, [name for name, _ in files], card_bytes, token, private=private,
                     revision=revision, create_pr=create_pr,
                     commit_message=commit_message or f'Add {config["architecture"]} weights')
    return PushResult(commit_url=commit.commit_url, pr_url=commit.pr_url, **result)


def _offline_error(repo_id: str) -> PushError:
    return PushError(f'cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it (or set HF_HUB_OFFLINE=0) to push, '
                     f'or pass {arg("dry_run")} to see what would be uploaded.')


def _push_token(folder: Path, repo_id: str, token: Optional[str]) -> str:
    """`token`, else huggingface_hub's (HF_TOKEN, the login cache); refused offline or when there is none."""
    from huggingface_hub import constants, get_token
    if constants.HF_HUB_OFFLINE:  # checked here: huggingface_hub would say it only once a request is made
        raise _offline_error(repo_id)
    token = token or get_token()
    if not token:
        raise PermissionError(
            f'no Hugging Face token to push {folder} with: {_LOGIN_HINT} (https://huggingface.co/settings/tokens);'
            f' {arg("dry_run")} shows what would be uploaded without one.')
    return token


def _commit(folder: Path, repo_id: str, names: List[str], card_bytes: bytes, token: str, *, private: bool,
            revision: Optional[str], create_pr: bool, commit_message: str):
    """Create the repository (and branch) where needed and upload the files `names` of `folder`, README.md as
    `card_bytes`, in one commit (huggingface_hub's CommitInfo); the Hub's errors become one line."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from . import __version__
    api = HfApi(token=token, library_name='timm-densenet-ext', library_version=__version__)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=card_bytes if name == CARD_FILE else
                                     str(folder / name)) for name in names]
    step = f'creating {repo_id}'
    try:
        repo_id = api.create_repo(repo_id, private=True if private else None, exist_ok=True).repo_id
        if revision and revision != 'main':
            step = f'creating branch {revision} of {repo_id}'
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = f'committing to {repo_id}' + (f' (branch {revision})' if revision else '')
        return api.create_commit(repo_id, operations=operations, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message)
    except Exception as e:
        if isinstance(e, ValueError) and str(e).startswith('Invalid metadata in README.md'):
            reasons = '; '.join(line.lstrip('- ') for line in str(e).splitlines()[1:] if line.strip())
            raise ValueError(f'{folder / CARD_FILE}: the Hub rejects its metadata ({_one_line(reasons)}); fix the '
                             f'YAML header between its --- lines.') from e
        error = _push_error(e, repo_id, api.endpoint, step)
        if error is e:
            raise
        raise error from e
