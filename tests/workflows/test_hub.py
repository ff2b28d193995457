"""Hub folders written by `convert` (files, timm's config schema, card, safe replacement) and `push` at HfApi."""
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import pytest
import timm
import torch
from huggingface_hub import ModelCard, constants
from safetensors.torch import load_file

import timm_densenet_ext  # noqa: F401  (registers the variants)
from hub_fixtures import FakeHub, add_to_hub_cache, closed_port
from model_helpers import assert_same_tensors, trained
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
    assert (f"load it in Python: import timm, timm_densenet_ext; model = timm.create_model('local-dir:{folder}', "
            f"pretrained=True)") in converted.stdout  # pretrained=True: without it timm builds random weights

    # the EMA weights, as they are: every tensor of the model
    weights = load_file(str(folder / 'model.safetensors'))
    assert sorted(weights) == sorted(converted.ema.state_dict())
    for key, value in converted.ema.state_dict().items():
        assert torch.equal(weights[key], value), key

    # exactly what timm's save_for_hf writes for the same model, plus the card's inputs under a key timm ignores
    config = json.loads((folder / 'config.json').read_text())
    inputs = config.pop(hub.CARD_INPUTS_KEY)
    timm_model = timm.create_model(SMALL, num_classes=10)
    timm.models.save_for_hf(timm_model, str(tmp_path), safe_serialization=True)
    assert config == json.loads((tmp_path / 'config.json').read_text())
    assert (inputs['model_name'], inputs['repo_id'], inputs['training']) == (SMALL, REPO, None)
    assert inputs['card_sha256'] == hashlib.sha256((folder / 'README.md').read_bytes()).hexdigest()
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
    # without --repo-id the card's usage code names a placeholder repository: push renders it for its repository
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
    with pytest.raises(FileExistsError, match='folder exists and is not empty; pass force=True'):
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
    with pytest.raises(FileExistsError, match='flat: holds the checkpoint being converted; choose another out_dir=DIR'):
        convert_checkpoint(inside, SMALL, flat, force=True)
    assert (project / 'src').is_dir() and inside.read_bytes() == path.read_bytes()


# ---------------------------------------------------------------------------------------------------------------------
# push, tested at the HTTP boundary: the real HfApi against a Hub on 127.0.0.1 (hub_fixtures.FakeHub), no network

@pytest.fixture
def fake_hub(monkeypatch):
    """A Hub on 127.0.0.1 that HfApi talks to (HF_ENDPOINT), with offline mode lifted for loopback only."""
    server = FakeHub()
    monkeypatch.setattr(constants, 'ENDPOINT', server.endpoint)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    yield server
    server.close()


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.delenv('HUGGING_FACE_HUB_TOKEN', raising=False)
    monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(tmp_path / 'no-token'))


def folder_files(folder: Path) -> Dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name, _ in upload_files(folder)}


def test_push_creates_repo_and_branch_and_uploads(converted, fake_hub, monkeypatch, capsys):
    monkeypatch.setenv('HF_TOKEN', 'hf_from_env')
    folder = converted.folder
    code, out, err = run_cli(['push', str(folder), '--repo-id', REPO, '--private', '--revision', 'v1',
                              '--commit-message', 'DenseNet-BC weights'], capsys)
    assert (code, err) == (0, '')
    # the calls the real HfApi makes, in order, each with the token
    assert fake_hub.routes() == ['create_repo', 'create_branch', 'validate_yaml', 'preupload', 'commit']
    assert all(headers['authorization'] == 'Bearer hf_from_env' for _, _, _, headers, _ in fake_hub.requests)
    assert fake_hub.requests[0][4] == dict(name='bc10', organization='me', visibility='private')
    assert fake_hub.repos[REPO]['private'] and set(fake_hub.repos[REPO]['branches']) == {'main', 'v1'}
    (commit,) = fake_hub.commits
    assert (commit['repo_id'], commit['revision'], commit['create_pr'], commit['summary']) == (
        REPO, 'v1', False, 'DenseNet-BC weights')
    # one commit of every file, byte for byte: the card was written for REPO, so it is uploaded as it is
    assert commit['files'] == folder_files(folder) and sorted(commit['files']) == [
        'README.md', 'config.json', 'model.safetensors']
    assert fake_hub.repos[REPO]['branches']['v1'] == commit['files'] and fake_hub.repos[REPO]['branches']['main'] == {}
    assert out.splitlines()[0] == f'uploaded to {REPO} (branch v1):'
    assert re.fullmatch(rf'{fake_hub.endpoint}/{REPO}/commit/[0-9a-f]{{40}}', out.splitlines()[-1])


def test_push_pull_request_with_the_login_cache_token(converted, fake_hub, no_token, monkeypatch, tmp_path, capsys):
    token_file = tmp_path / 'token'
    token_file.write_text('hf_from_login\n')
    monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(token_file))  # where `hf auth login` keeps it
    code, out, err = run_cli(['push', str(converted.folder), '--repo-id', REPO, '--create-pr'], capsys)
    assert (code, err) == (0, '')
    assert fake_hub.routes() == ['create_repo', 'validate_yaml', 'preupload', 'commit']  # no branch without --revision
    assert all(headers['authorization'] == 'Bearer hf_from_login' for _, _, _, headers, _ in fake_hub.requests)
    assert fake_hub.requests[0][4] == dict(name='bc10', organization='me')  # visibility: the Hub's default
    (commit,) = fake_hub.commits
    assert (commit['create_pr'], commit['revision'], commit['summary']) == (
        True, 'main', 'Add densenet_bc_100_k12 weights')
    assert fake_hub.repos[REPO]['branches']['main'] == {}  # a pull request, not a commit to main
    assert out.splitlines()[-1] == f'{fake_hub.endpoint}/{REPO}/discussions/1'


def test_push_without_a_token_stops_before_any_work(converted, fake_hub, no_token, monkeypatch, capsys):
    def validate(*args, **kwargs):
        raise AssertionError('validated the folder without a token')

    monkeypatch.setattr(hub, 'validate_folder', validate)
    code, out, err = run_cli(['push', str(converted.folder), '--repo-id', REPO], capsys)
    assert (code, out) == (2, '')
    assert err.count('\n') == 1
    assert err.startswith(f'timm-densenet-ext push: error: no Hugging Face token to push {converted.folder} with: '
                          'log in with `hf auth login`, or set HF_TOKEN')
    assert fake_hub.requests == []


def test_dry_run_lists_files_and_sizes_without_a_token(converted, fake_hub, no_token, capsys):
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
    assert fake_hub.requests == []
    result = push_folder(converted.folder, REPO, dry_run=True)
    assert result.dry_run and result.files == sorted(sizes.items())
    assert (result.card, result.card_source) == ((converted.folder / 'README.md').read_text(), 'folder')


# --- the card is rendered for the repository pushed to; the rest of the folder is uploaded as it is ----------------

PETS = ['cat', 'dog', 'fox']
TRAINING = dict(  # what finetune records (finetune._training_record)
    data_name='pets', data='the image folder `pets/`', classes=PETS, train_images=30, val_images=12,
    base='`timm/densenet121.ra_in1k`', recipe=['3 epochs, batch size 6', 'seed 0'], best_epoch=2, epochs=3,
    val_accuracy=0.75, val_correct=9,
    history=[dict(epoch=e, train_loss=f'{1.5 / e:.4f}', val_accuracy=f'{a:.2f}%') for e, a in
             ((1, 50.0), (2, 75.0), (3, 66.67))])


def _pets_folder(folder: Path, repo_id=None) -> Path:
    """A hub folder as finetune writes one: class names in config.json, a Training section, weights source."""
    model = trained(timm.create_model(SMALL, num_classes=3, block_config=(2, 2, 2)))
    return hub.write_hub_folder(
        model, folder, model_name=SMALL, repo_id=repo_id, label_names=PETS, training=TRAINING,
        data_config={'input_size': (3, 16, 16)}, base_model='timm/densenet121.ra_in1k',
        weights_source='Fine-tuned with `timm-densenet-ext finetune` on the image folder `pets/`.')


@pytest.fixture(scope='module')
def pets(tmp_path_factory):
    """The folder written without a repository (its card names YOUR-ORG/pets), and one written for me/pets."""
    tmp = tmp_path_factory.mktemp('pets')
    return _pets_folder(tmp / 'pets'), _pets_folder(tmp / 'for-me' / 'pets', repo_id='me/pets')


def test_push_renders_the_card_for_the_repository_pushed_to(pets, hub_cache, fake_hub, monkeypatch):
    folder, written_for_me = pets
    assert "hf-hub:YOUR-ORG/pets'" in (folder / 'README.md').read_text()
    before = snapshot(folder)

    result = push_folder(folder, 'me/pets', dry_run=True)
    assert result.card_source == 'rendered' and fake_hub.requests == []
    # exactly the card the folder would hold had it been written for me/pets: usage code, links, title, model-index
    # name change; the label names, Training section, weights source and base model stay
    assert result.card == (written_for_me / 'README.md').read_text()
    card = ModelCard(result.card)
    assert 'YOUR-ORG' not in result.card and card.text.lstrip().startswith('# Model card for me/pets\n')
    assert "timm.create_model('hf-hub:me/pets', pretrained=True" in result.card
    assert '[me/pets](https://huggingface.co/me/pets)' in result.card
    assert card.data.model_name == 'pets' and card.data.eval_results[0].metric_value == 0.75
    assert card.data.base_model == 'timm/densenet121.ra_in1k'
    assert '## Training' in card.text and '- **Classes:** cat, dog, fox (3' in card.text
    assert 'Fine-tuned with `timm-densenet-ext finetune` on the image folder `pets/`.' in card.text
    assert dict(result.files)['README.md'] == len(result.card.encode())

    monkeypatch.setenv('HF_TOKEN', 'hf_from_env')
    pushed = push_folder(folder, 'me/pets')
    assert pushed.card == result.card and pushed.files == result.files
    (commit,) = fake_hub.commits
    assert commit['files'] == {**folder_files(folder), 'README.md': result.card.encode()}
    assert snapshot(folder) == before  # the folder is not modified

    # what was pushed loads from the Hub by the name its card gives, with its class names
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    add_to_hub_cache(hub_cache, 'me/pets', commit['files'])
    model = timm.create_model('hf-hub:me/pets', pretrained=True)
    assert model.pretrained_cfg['label_names'] == PETS and model.num_classes == 3
    assert_same_tensors(model.state_dict(), load_file(str(folder / 'model.safetensors')))


def test_push_keeps_an_edited_card_and_renders_a_missing_one(pets, tmp_path):
    folder = tmp_path / 'pets'
    shutil.copytree(pets[0], folder)
    card = folder / 'README.md'
    # edited by hand after convert wrote it: uploaded as it is when it names the repository, refused otherwise
    card.write_text(card.read_text().replace('YOUR-ORG/pets', 'me/pets') + '\nMy notes.\n')
    result = push_folder(folder, 'me/pets', dry_run=True)
    assert (result.card, result.card_source) == (card.read_text(), 'folder')
    with pytest.raises(ValueError) as raised:
        push_folder(folder, 'me/other', dry_run=True)
    assert str(raised.value) == (
        f'{card}: its usage code loads hf-hub:me/pets, not hf-hub:me/other, and it was edited after it was written, '
        f'so push does not rewrite it; replace me/pets with me/other in it, or delete it to have push render the '
        f'card for me/other.')
    # deleted: rendered again from what config.json records, Training section included
    card.unlink()
    result = push_folder(folder, 'me/pets', dry_run=True)
    assert (result.card, result.card_source) == ((pets[1] / 'README.md').read_text(), 'rendered')
    assert not card.exists()


def test_push_of_a_folder_that_records_no_card_inputs(pets, tmp_path):
    """A folder from an older version, or with a card written by hand: config.json records no card inputs."""
    folder = tmp_path / 'pets'
    shutil.copytree(pets[0], folder)
    config = json.loads((folder / 'config.json').read_text())
    del config[hub.CARD_INPUTS_KEY]
    (folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r'README\.md: its usage code loads hf-hub:YOUR-ORG/pets, not hf-hub:me/pets, '
                                         r'and it was written by hand or by an older version \(config\.json records '
                                         r'no card inputs\), so push does not rewrite it; replace YOUR-ORG/pets with '
                                         r'me/pets in it, or delete it'):
        push_folder(folder, 'me/pets', dry_run=True)
    (folder / 'README.md').write_text('# My pets model\n\n`hf-hub:me/pets`\n')
    assert push_folder(folder, 'me/pets', dry_run=True).card == '# My pets model\n\n`hf-hub:me/pets`\n'
    # no card at all: one is rendered from config.json, stating nothing config.json does not know
    (folder / 'README.md').unlink()
    result = push_folder(folder, 'me/pets', dry_run=True)
    assert result.card_source == 'config'
    data = ModelCard(result.card).data
    assert (data.base_model, data.datasets, data.license, data.eval_results) == (None, None, None, None)
    assert "timm.create_model('hf-hub:me/pets', pretrained=True" in result.card
    assert "label_names = model.pretrained_cfg['label_names']" in result.card
    assert 'Where these weights come from is not stated.' in result.card and '## Training' not in result.card


def _break_weights(folder: Path) -> None:
    data = (folder / 'model.safetensors').read_bytes()
    (folder / 'model.safetensors').write_bytes(data[:len(data) // 3])


def _other_architecture(folder: Path) -> None:
    from safetensors.torch import save_file
    save_file(timm.create_model('resnet18', num_classes=10).state_dict(), str(folder / 'model.safetensors'))


def _edit_card(folder: Path) -> None:
    (folder / 'README.md').write_text((folder / 'README.md').read_text() + '\nEdited.\n')


BAD_FOLDERS = [
    # (how the folder is broken, arguments, what the line says)
    (lambda f: shutil.rmtree(f), [], r'bc10: no such folder; make one with `timm-densenet-ext convert`'),
    (lambda f: (f / 'model.safetensors').unlink(), [], r'bc10: has no model\.safetensors; make the folder with'),
    (lambda f: (f / 'config.json').write_text('{"architecture": "densenet_bc_1'), [],
     r'config\.json: not valid JSON \(.*\); write the folder again with convert'),
    (_break_weights, [], r'model\.safetensors: not a readable safetensors file \(.*\); it is truncated or corrupt'),
    (_other_architecture, [], r'model\.safetensors: looks like another architecture, not densenet_bc_100_k12'),
    (_edit_card, ['--repo-id', 'me/elsewhere'],
     r'README\.md: its usage code loads hf-hub:me/bc10, not hf-hub:me/elsewhere, and it was edited after it was '
     r'written, so push does not rewrite it; replace me/bc10 with me/elsewhere in it, or delete it'),
    (lambda f: None, ['--repo-id', 'bc10'], r"--repo-id 'bc10': give the repository as ORG/NAME"),
]


@pytest.mark.parametrize('breakage, extra, message', BAD_FOLDERS, ids=[
    'missing', 'no-weights', 'bad-json', 'truncated-weights', 'resnet-weights', 'edited-card-for-other-repo',
    'repo-id'])
def test_push_refuses_a_bad_folder(converted, fake_hub, monkeypatch, tmp_path, capsys, breakage, extra, message):
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
    assert fake_hub.requests == []


# --- the Hub's failures are one line each, naming the repository and what to do -----------------------------------

HUB_FAILURES = [
    # (route that fails, status, error type, the line)
    ('create_repo', 401, PermissionError, rf'the Hub refused to write to {REPO} \(HTTP 401: Invalid credentials in '
     r'Authorization header\); log in with `hf auth login`, or set HF_TOKEN to a token with write access to it\.'),
    ('create_branch', 403, PermissionError, rf'the Hub refused to write to {REPO} \(HTTP 403: You don\'t have the '
     r'rights'),
    ('commit', 404, hub.PushError, rf'the Hub at HUB_URL answered HTTP 404: Repository not found while committing '
     rf'to {REPO} \(branch v1\); check repo_id=ORG/NAME, revision=BRANCH if given, '
     r'and HF_ENDPOINT if set\.'),
    ('create_repo', 503, hub.PushError, rf'the Hub at HUB_URL failed while creating {REPO} \(HTTP 503: Service '
     r'Unavailable\); the problem is on its side: push again later \(https://status\.huggingface\.co\)\.'),
    ('commit', 500, hub.PushError, rf'the Hub at HUB_URL failed while committing to {REPO} \(branch v1\) \(HTTP 500: '
     r'Internal Error\); the problem is on its side'),
]


@pytest.mark.parametrize('route, status, error, message', HUB_FAILURES,
                         ids=[f'{r}-{s}' for r, s, *_ in HUB_FAILURES])
def test_push_failures_of_the_hub_are_one_line(converted, fake_hub, monkeypatch, route, status, error, message):
    monkeypatch.setenv('HF_TOKEN', 'hf_from_env')
    fake_hub.fail[route] = status
    with pytest.raises(error) as raised:
        push_folder(converted.folder, REPO, revision='v1')
    assert type(raised.value) is error and '\n' not in str(raised.value)
    assert re.fullmatch(message.replace('HUB_URL', re.escape(fake_hub.endpoint)) + '.*', str(raised.value))
    assert route in fake_hub.routes() and fake_hub.commits == []


def test_push_of_a_card_whose_metadata_the_hub_rejects(converted, fake_hub, monkeypatch):
    fake_hub.fail['validate_yaml'] = 400
    monkeypatch.setenv('HF_TOKEN', 'hf_from_env')
    with pytest.raises(ValueError) as raised:
        push_folder(converted.folder, REPO)
    assert str(raised.value) == (
        f'{converted.folder / "README.md"}: the Hub rejects its metadata ("license" must be one of [apache-2.0, mit, '
        f'...]); fix the YAML header between its --- lines.')
    assert fake_hub.commits == []


def test_push_rejected_by_the_hub_is_one_line(converted, fake_hub, monkeypatch, capsys):
    fake_hub.fail['create_repo'] = 403
    monkeypatch.setenv('HF_TOKEN', 'hf_read_only')
    code, out, err = run_cli(['push', str(converted.folder), '--repo-id', REPO], capsys)
    assert code == 2
    assert err == (f'timm-densenet-ext push: error: the Hub refused to write to {REPO} (HTTP 403: You don\'t have the '
                   'rights to create a model under this namespace); log in with `hf auth login`, or set HF_TOKEN to a '
                   'token with write access to it.\n')


def test_push_without_a_connection_is_one_line(converted, monkeypatch):
    endpoint = f'http://127.0.0.1:{closed_port()}'  # nothing listens: the connection is refused
    monkeypatch.setattr(constants, 'ENDPOINT', endpoint)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setenv('HF_TOKEN', 'hf_from_env')
    with pytest.raises(hub.PushError) as raised:
        push_folder(converted.folder, REPO)
    assert isinstance(raised.value, ConnectionError) and '\n' not in str(raised.value)
    assert str(raised.value).startswith(f'cannot reach the Hub at {endpoint} while creating {REPO} (')
    assert str(raised.value).endswith('); check the network connection, any proxy (HTTPS_PROXY) and HF_ENDPOINT if '
                                      'set, then push again.')


def test_push_offline_is_one_line_and_sends_nothing(converted, fake_hub, monkeypatch):
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)  # HF_HUB_OFFLINE=1
    monkeypatch.setenv('HF_TOKEN', 'hf_from_env')
    with pytest.raises(hub.PushError) as raised:
        push_folder(converted.folder, REPO)
    assert str(raised.value) == (
        f'cannot push to {REPO}: HF_HUB_OFFLINE is set; unset it (or set HF_HUB_OFFLINE=0) to push, or pass '
        'dry_run=True to see what would be uploaded.')
    assert fake_hub.requests == []
    assert push_folder(converted.folder, REPO, dry_run=True).dry_run  # a dry run needs no network
