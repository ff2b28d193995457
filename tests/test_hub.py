"""Hub folders written by `convert` (files, timm's config schema, card, safe replacement) and `push` at HfApi."""
import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import pytest
import timm
import torch
from huggingface_hub import CommitInfo, HfApi, RepoUrl, constants
from safetensors.torch import load_file

import timm_densenet_ext  # noqa: F401  (registers the variants)
from model_helpers import trained
from timm_densenet_ext import hub
from timm_densenet_ext.cli import main
from timm_densenet_ext.hub import convert_checkpoint, push_folder, upload_files

SMALL = 'densenet_bc_100_k12'
REPO = 'me/bc10'


def snapshot(folder: Path) -> Dict[str, bytes]:
    """Every file under `folder`'s parent, hidden ones included, by path: what a failed write must leave unchanged."""
    return {str(p.relative_to(folder.parent)): p.read_bytes() for p in sorted(folder.parent.rglob('*')) if p.is_file()}


def run_cli(argv: List[str], capsys) -> tuple:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """A timm training checkpoint (state_dict + state_dict_ema) of a 10-class CIFAR DenseNet, converted by the CLI."""
    tmp = tmp_path_factory.mktemp('converted')
    model, ema = trained(SMALL, num_classes=10), trained(SMALL, seed=1, num_classes=10)
    checkpoint = tmp / 'last.pth.tar'
    torch.save({'epoch': 9, 'state_dict': model.state_dict(), 'state_dict_ema': ema.state_dict()}, checkpoint)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(['convert', str(checkpoint), '--model', SMALL, '--out', str(tmp / 'bc10'), '--repo-id', REPO])
    assert code == 0
    return SimpleNamespace(folder=tmp / 'bc10', checkpoint=checkpoint, ema=ema, stdout=out.getvalue())


def test_convert_writes_model_config_and_card(converted, tmp_path):
    folder = converted.folder
    assert sorted(p.name for p in folder.parent.iterdir()) == ['bc10', 'last.pth.tar']  # no temporary leftovers
    assert [name for name, _ in upload_files(folder)] == ['README.md', 'config.json', 'model.safetensors']
    assert f'wrote {folder} (densenet_bc_100_k12, 10 classes)' in converted.stdout
    assert f"timm.create_model('local-dir:{folder}')" in converted.stdout

    # the EMA weights, as they are: every tensor of the model
    weights = load_file(str(folder / 'model.safetensors'))
    assert sorted(weights) == sorted(converted.ema.state_dict())
    for key, value in converted.ema.state_dict().items():
        assert torch.equal(weights[key], value), key

    # exactly what timm's save_for_hf writes for the same model
    config = json.loads((folder / 'config.json').read_text())
    timm_model = timm.create_model(SMALL, num_classes=10)
    timm.models.save_for_hf(timm_model, str(tmp_path), safe_serialization=True)
    assert config == json.loads((tmp_path / 'config.json').read_text())
    assert (config['architecture'], config['num_classes'], config['num_features'], config['global_pool']) == (
        SMALL, 10, 342, 'avg')
    assert config['pretrained_cfg']['num_classes'] == 10
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32]
    assert 'hf_hub_id' not in config['pretrained_cfg'] and 'label_names' not in config  # unknown labels: none

    card = (folder / 'README.md').read_text()
    assert card.startswith('---\n') and 'library_name: timm' in card
    assert ('Converted with `timm-densenet-ext convert` from the EMA weights (`state_dict_ema`) of a training '
            'checkpoint, `last.pth.tar`.') in card
    assert f"timm.create_model('hf-hub:{REPO}', pretrained=True)" in card
    assert os.stat(folder / 'model.safetensors').st_mode & 0o044 == os.stat(folder / 'config.json').st_mode & 0o044


def test_imagenet_model_gets_imagenet_label_names(tmp_path):
    from timm.data import ImageNetInfo
    model = trained('densenet121')
    torch.save(model.state_dict(), tmp_path / 'in1k.pth')
    folder = convert_checkpoint(tmp_path / 'in1k.pth', 'densenet121.tv_in1k', tmp_path / 'out')
    config = json.loads((folder / 'config.json').read_text())
    info = ImageNetInfo()
    assert config['num_classes'] == 1000
    assert config['label_names'] == list(info.label_names())
    assert config['label_descriptions']['n01440764'] == info.label_descriptions(as_dict=True)['n01440764']
    assert config['pretrained_cfg']['tag'] == 'tv_in1k' and config['pretrained_cfg']['license'] == 'bsd-3-clause'
    # without --repo-id the card's usage code names a placeholder repository, which push refuses (see below)
    assert "timm.create_model('hf-hub:YOUR-ORG/out', pretrained=True)" in (folder / 'README.md').read_text()
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert list(loaded.pretrained_cfg['label_names']) == list(info.label_names())


@pytest.fixture
def second_checkpoint(tmp_path):
    model = trained(SMALL, seed=2, num_classes=10)
    path = tmp_path / 'second.pth'
    torch.save(model.state_dict(), path)
    return path, model


def test_force_replaces_an_existing_folder(converted, second_checkpoint, tmp_path):
    folder = tmp_path / 'bc10'
    shutil.copytree(converted.folder, folder)
    path, model = second_checkpoint
    with pytest.raises(FileExistsError, match='folder exists and is not empty; pass --force'):
        convert_checkpoint(path, SMALL, folder)
    convert_checkpoint(path, SMALL, folder, force=True, repo_id=REPO)
    weights = load_file(str(folder / 'model.safetensors'))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bc10', 'second.pth']


def test_failed_write_leaves_the_existing_folder(converted, second_checkpoint, tmp_path, monkeypatch):
    folder = tmp_path / 'bc10'
    shutil.copytree(converted.folder, folder)
    before = snapshot(folder)
    path, _ = second_checkpoint

    def no_card(*args, **kwargs):
        raise OSError(28, 'No space left on device')

    with monkeypatch.context() as m:  # the write fails half way: weights and config written, card not
        m.setattr('timm_densenet_ext.cards.render_model_card', no_card)
        with pytest.raises(OSError, match='No space left'):
            convert_checkpoint(path, SMALL, folder, force=True)
    assert snapshot(folder) == before

    rename = os.rename

    def failing_rename(src, dst):  # the new folder cannot be moved into place
        if str(src).endswith('.tmp'):
            raise PermissionError(13, 'Permission denied')
        return rename(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, 'rename', failing_rename)
        with pytest.raises(PermissionError):
            convert_checkpoint(path, SMALL, folder, force=True)
    assert snapshot(folder) == before


def test_force_only_replaces_a_flat_folder_without_the_checkpoint(second_checkpoint, tmp_path):
    path, _ = second_checkpoint
    project = tmp_path / 'project'
    (project / 'src').mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r'holds folders \(src\), so it is not a folder `convert` wrote'):
        convert_checkpoint(path, SMALL, project, force=True)
    flat = tmp_path / 'flat'
    flat.mkdir()
    inside = flat / path.name
    shutil.copyfile(path, inside)
    with pytest.raises(FileExistsError, match='flat: holds the checkpoint being converted; choose another --out'):
        convert_checkpoint(inside, SMALL, flat, force=True)
    assert (project / 'src').is_dir() and inside.read_bytes() == path.read_bytes()


# ---------------------------------------------------------------------------------------------------------------------
# push, tested at the HfApi boundary: no network

@pytest.fixture
def hub_calls(monkeypatch):
    """Record HfApi.create_repo / create_branch / upload_folder calls (and the token the client holds)."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(('create_repo', self.token, repo_id, kwargs))
        return RepoUrl(f'https://huggingface.co/{repo_id}')

    def create_branch(self, repo_id, **kwargs):
        calls.append(('create_branch', self.token, repo_id, kwargs))

    def upload_folder(self, **kwargs):
        uploaded = sorted(p.name for p in Path(kwargs['folder_path']).iterdir())
        calls.append(('upload_folder', self.token, uploaded, kwargs))
        pr = kwargs.get('create_pr')
        return CommitInfo(
            commit_url=f'https://huggingface.co/{kwargs["repo_id"]}/commit/0123abc', commit_message='',
            commit_description='', oid='0123abc', pr_url=f'https://huggingface.co/{kwargs["repo_id"]}/discussions/1'
            if pr else None)

    for name, fn in dict(create_repo=create_repo, create_branch=create_branch, upload_folder=upload_folder).items():
        monkeypatch.setattr(HfApi, name, fn)
    return calls


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.delenv('HUGGING_FACE_HUB_TOKEN', raising=False)
    monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(tmp_path / 'no-token'))


def test_push_creates_repo_and_branch_and_uploads(converted, hub_calls, monkeypatch, capsys):
    monkeypatch.setenv('HF_TOKEN', 'hf_from_env')
    folder = converted.folder
    code, out, err = run_cli(['push', str(folder), '--repo-id', REPO, '--private', '--revision', 'v1',
                              '--commit-message', 'DenseNet-BC weights'], capsys)
    assert (code, err) == (0, '')
    files = ['README.md', 'config.json', 'model.safetensors']
    assert hub_calls == [
        ('create_repo', 'hf_from_env', REPO, dict(private=True, exist_ok=True)),
        ('create_branch', 'hf_from_env', REPO, dict(branch='v1', exist_ok=True)),
        ('upload_folder', 'hf_from_env', files, dict(
            repo_id=REPO, folder_path=str(folder), revision='v1', create_pr=False,
            commit_message='DenseNet-BC weights', allow_patterns=files)),
    ]
    assert out.splitlines()[0] == f'uploaded to {REPO} (branch v1):'
    assert out.splitlines()[-1] == f'https://huggingface.co/{REPO}/commit/0123abc'


def test_push_pull_request_with_the_login_cache_token(converted, hub_calls, no_token, monkeypatch, tmp_path, capsys):
    token_file = tmp_path / 'token'
    token_file.write_text('hf_from_login\n')
    monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(token_file))  # where `hf auth login` keeps it
    code, out, err = run_cli(['push', str(converted.folder), '--repo-id', REPO, '--create-pr'], capsys)
    assert (code, err) == (0, '')
    assert [c[0] for c in hub_calls] == ['create_repo', 'upload_folder']  # no branch without --revision
    assert hub_calls[0][1:] == ('hf_from_login', REPO, dict(private=None, exist_ok=True))
    upload = hub_calls[1][3]
    assert (upload['create_pr'], upload['revision'], upload['commit_message']) == (
        True, None, 'Add densenet_bc_100_k12 weights')
    assert out.splitlines()[-1] == f'https://huggingface.co/{REPO}/discussions/1'


def test_push_without_a_token_stops_before_any_work(converted, hub_calls, no_token, monkeypatch, capsys):
    def validate(*args, **kwargs):
        raise AssertionError('validated the folder without a token')

    monkeypatch.setattr(hub, 'validate_folder', validate)
    code, out, err = run_cli(['push', str(converted.folder), '--repo-id', REPO], capsys)
    assert (code, out) == (2, '')
    assert err.count('\n') == 1
    assert err.startswith(f'timm-densenet-ext push: error: no Hugging Face token to push {converted.folder} with: '
                          'log in with `hf auth login`, or set HF_TOKEN')
    assert hub_calls == []


def test_dry_run_lists_files_and_sizes_without_a_token(converted, hub_calls, no_token, capsys):
    code, out, err = run_cli(['push', str(converted.folder), '--repo-id', REPO, '--dry-run'], capsys)
    assert (code, err) == (0, '')
    lines = out.splitlines()
    assert lines[0] == f'would upload to {REPO}:'
    sizes = {p.name: p.stat().st_size for p in converted.folder.iterdir()}
    for line, (name, size) in zip(lines[1:4], sorted(sizes.items())):
        assert line.split()[0] == name
        shown = float(line.split()[1])
        unit = {'B': 1, 'kB': 1e3, 'MB': 1e6}[line.split()[2]]
        assert abs(shown * unit - size) <= 0.05 * unit, line
    assert lines[4].strip().startswith('3 files, ')
    assert lines[-1] == 'dry run: nothing was uploaded.'
    assert hub_calls == []
    result = push_folder(converted.folder, REPO, dry_run=True)
    assert result.dry_run and result.files == sorted(sizes.items())


def _break_weights(folder: Path) -> None:
    data = (folder / 'model.safetensors').read_bytes()
    (folder / 'model.safetensors').write_bytes(data[:len(data) // 3])


def _other_architecture(folder: Path) -> None:
    from safetensors.torch import save_file
    save_file(timm.create_model('resnet18', num_classes=10).state_dict(), str(folder / 'model.safetensors'))


BAD_FOLDERS = [
    # (how the folder is broken, arguments, what the line says)
    (lambda f: shutil.rmtree(f), [], r'bc10: no such folder; make one with `timm-densenet-ext convert`'),
    (lambda f: (f / 'model.safetensors').unlink(), [], r'bc10: has no model\.safetensors; make the folder with'),
    (lambda f: (f / 'config.json').write_text('{"architecture": "densenet_bc_1'), [],
     r'config\.json: not valid JSON \(.*\); write the folder again with convert'),
    (_break_weights, [], r'model\.safetensors: not a readable safetensors file \(.*\); it is truncated or corrupt'),
    (_other_architecture, [], r'model\.safetensors: looks like another architecture, not densenet_bc_100_k12'),
    (lambda f: None, ['--repo-id', 'me/elsewhere'],
     r'README\.md: its usage code loads hf-hub:me/bc10, not hf-hub:me/elsewhere; convert again with '
     r'--repo-id me/elsewhere --force'),
    (lambda f: None, ['--repo-id', 'bc10'], r"--repo-id 'bc10': give the repository as ORG/NAME"),
]


@pytest.mark.parametrize('breakage, extra, message', BAD_FOLDERS, ids=[
    'missing', 'no-weights', 'bad-json', 'truncated-weights', 'resnet-weights', 'card-for-other-repo', 'repo-id'])
def test_push_refuses_a_bad_folder(converted, hub_calls, monkeypatch, tmp_path, capsys, breakage, extra, message):
    import re
    monkeypatch.setenv('HF_TOKEN', 'hf_from_env')
    folder = tmp_path / 'bc10'
    shutil.copytree(converted.folder, folder)
    breakage(folder)
    argv = ['push', str(folder), '--repo-id', REPO] + extra
    for dry_run in ([], ['--dry-run']):
        code, out, err = run_cli(argv + dry_run, capsys)
        assert (code, out) == (2, '')
        assert err.count('\n') == 1 and err.startswith('timm-densenet-ext push: error: '), err
        assert re.search(message, err), err
    assert hub_calls == []


def test_push_rejected_by_the_hub_is_one_line(converted, monkeypatch, capsys):
    from huggingface_hub.errors import HfHubHTTPError

    def create_repo(self, repo_id, **kwargs):
        raise HfHubHTTPError('403 Forbidden', response=SimpleNamespace(status_code=403, headers={}, request=None))

    monkeypatch.setattr(HfApi, 'create_repo', create_repo)
    monkeypatch.setenv('HF_TOKEN', 'hf_read_only')
    code, out, err = run_cli(['push', str(converted.folder), '--repo-id', REPO], capsys)
    assert code == 2
    assert err == (f'timm-densenet-ext push: error: the Hub refused to write to {REPO} (HTTP 403); log in with '
                   '`hf auth login`, or set HF_TOKEN to a token with write access to it.\n')
