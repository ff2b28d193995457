"""Model cards: the committed cards are what the code renders, their usage code runs offline as written, their
metadata and figures are right, and the `card` command behaves."""
import contextlib
import copy
import functools
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image
from timm.layers import BlurPool2d
from timm.models import get_pretrained_cfg
from timm.models._hub import save_config_for_hf

import timm_densenet_ext
from timm_densenet_ext import cards, cli
from timm_densenet_ext.hub import convert_checkpoint

from hub_fixtures import add_weights_to_hub_cache

CARD_NAMES = cards.card_model_names()
# the repository's committed cards (cards.CARD_DIR is where `card --all` writes, relative to the current folder)
REPO_CARDS = Path(__file__).resolve().parents[2] / 'model_cards'

# what the cards' code prints, as stated in its comments: a shape, a list of ints, or a bool
_OUTPUT = r'(torch\.Size\(\[[\d, ]*\]\)|\[[\d, ]*\]|True|False)'
_STATED = re.compile(r'#\s*' + _OUTPUT + r'\s*$')
_PRINTED = re.compile(_OUTPUT + r'$')
_TOP5_LINE = re.compile(r'^\s*\d+\.\d%  \S')


_render = cards.render_model_card


@functools.lru_cache(maxsize=None)
def rendered(name: str) -> str:
    return _render(name)


def python_blocks(card_text: str) -> List[str]:
    return re.findall(r'^```python\n(.*?)^```$', card_text, flags=re.S | re.M)


def bibtex_keys(card_text: str) -> List[str]:
    return re.findall(r'^```bibtex\n@\w+\{([^,]+),', card_text, flags=re.M)


def run_block(code: str, label: str) -> Dict[str, object]:
    """Run a card's code block as a script (fresh namespace), returning its namespace and `_stdout`."""
    namespace = {'__name__': '__main__'}
    out = io.StringIO()
    with contextlib.redirect_stdout(out), torch.no_grad():
        exec(compile(code, label, 'exec'), namespace)
    namespace['_stdout'] = out.getvalue()
    return namespace


def write_image(folder: Path) -> None:
    """A real JPEG, not square, so that the resize and center crop both act."""
    y, x = np.mgrid[0:240, 0:320]
    rgb = np.stack([x * 255 // 320, y * 255 // 240, ((x // 40 + y // 40) % 2) * 200], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(folder / 'image.jpg', quality=90)


def check_card_code(card_text: str, weights: Dict[str, torch.Tensor], num_classes: int, label: str) -> List[dict]:
    """Run each python block of a card (cwd holds image.jpg) and check it prints what its comments state."""
    blocks = python_blocks(card_text)
    assert len(blocks) == 3, 'classification, feature maps, embeddings'
    results = []
    for i, code in enumerate(blocks):
        lines = code.splitlines()
        assert [l.split('#')[0].strip() for l in lines[:2]] == ['import timm', 'import timm_densenet_ext']
        assert "Image.open('image.jpg')" in code
        assert 'http' not in code and 'urlopen' not in code
        ns = run_block(code, f'<{label} block {i}>')
        stated = [m.group(1) for m in map(_STATED.search, lines) if m]
        printed = [l for l in ns['_stdout'].splitlines() if _PRINTED.match(l)]
        assert stated, f'block {i} states no output'
        assert printed == stated, f'block {i} of {label}:\n{code}'
        if 'features_only=True' not in code:  # the weights came from the hub cache, not a fresh init
            state = ns['model'].state_dict()
            assert torch.equal(state['features.conv0.weight'], weights['features.conv0.weight'])
        results.append(ns)
    classify, features, embed = results
    assert classify['output'].shape == (1, num_classes)
    top5 = [l for l in classify['_stdout'].splitlines() if _TOP5_LINE.match(l)]
    assert len(top5) == min(5, num_classes)
    assert len(features['feature_maps']) == 5
    assert embed['embedding'].dim() == 2 and torch.isfinite(embed['embedding']).all()
    return results


# --- (a) the committed cards are exactly what the code renders ---------------------------------------------------

def test_card_names_are_one_per_hub_repository():
    assert {'densenet121.ra_in1k', 'densenetblur121d.ra_in1k', 'densenet121.tv_in1k', 'densenet161.tv_in1k',
            'densenet169.tv_in1k', 'densenet201.tv_in1k'} <= set(CARD_NAMES)
    assert 'tv_densenet121.tv_in1k' not in CARD_NAMES  # shares timm/densenet121.tv_in1k
    repos = [get_pretrained_cfg(n).hf_hub_id for n in CARD_NAMES]
    assert len(set(repos)) == len(repos)
    with_weights = {get_pretrained_cfg(n).hf_hub_id for n in timm.list_pretrained()
                    if n.split('.')[0] in timm_densenet_ext.MODEL_NAMES}
    assert set(repos) == with_weights
    assert all(r.split('/')[-1] == n for r, n in zip(repos, CARD_NAMES))


def test_a_newly_registered_tag_gets_a_card(monkeypatch):
    extended = dict(timm_densenet_ext.default_cfgs)
    extended['densenet169'] = copy.deepcopy(extended['densenet169'])
    new_cfg = copy.deepcopy(extended['densenet169'].cfgs['tv_in1k'])
    new_cfg.hf_hub_id, new_cfg.tag = 'timm/densenet169.ra_in1k', 'ra_in1k'
    extended['densenet169'].tags.append('ra_in1k')
    extended['densenet169'].cfgs['ra_in1k'] = new_cfg
    monkeypatch.setattr(cards, 'default_cfgs', extended)
    assert cards.card_model_names() == sorted(CARD_NAMES + ['densenet169.ra_in1k'])


def test_card_folder_holds_the_template_and_one_card_per_tag():
    files = {p.name for p in REPO_CARDS.iterdir() if p.is_file()}
    assert files == {'TEMPLATE.md'} | {f'{n}.md' for n in CARD_NAMES}, (
        'model_cards/ is out of date: run `timm-densenet-ext card --all --force` (and delete cards of removed tags)')


@pytest.mark.parametrize('name', CARD_NAMES)
def test_committed_card_is_what_the_code_renders(name):
    committed = cards.card_path(name, REPO_CARDS).read_text(encoding='utf-8')
    assert committed == rendered(name), f'{name}: run `timm-densenet-ext card --all --force` and commit model_cards/'


# --- (b) every code block of every committed card runs offline, printing what it states ---------------------------

@pytest.mark.parametrize('name', CARD_NAMES)
def test_card_code_runs_offline_against_the_cards_repository(name, hub_cache, tmp_path, monkeypatch):
    cfg = get_pretrained_cfg(name)
    torch.manual_seed(0)
    weights = timm.create_model(name).state_dict()  # random init of the right architecture
    add_weights_to_hub_cache(hub_cache, cfg.hf_hub_id, weights)
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path)
    classify, features, embed = check_card_code(
        cards.card_path(name, REPO_CARDS).read_text(encoding='utf-8'), weights, cfg.num_classes, name)
    assert [f.shape[-1] for f in features['feature_maps']] == [224 // 2, 224 // 4, 224 // 8, 224 // 16, 224 // 32]
    assert embed['embedding'].shape == (1, embed['model'].num_features)


def test_card_of_a_fine_tuned_checkpoint_in_another_repository(hub_cache, tmp_path, monkeypatch):
    """What `finetune` writes: a custom repo, 3 classes with label names, the base model it was trained from; its
    card's code loads it by hf-hub:."""
    labels = ['cat', 'dog', 'fox']
    text = cards.render_model_card(
        'densenet121', repo_id='acme/densenet121-pets', pretrained_cfg=dict(num_classes=3, label_names=labels),
        base_model='timm/densenet121.ra_in1k')
    torch.manual_seed(0)
    model = timm.create_model('densenet121.ra_in1k', num_classes=3)
    config_path = tmp_path / 'config.json'
    save_config_for_hf(model, str(config_path), model_config=dict(label_names=labels))
    add_weights_to_hub_cache(hub_cache, 'acme/densenet121-pets', model.state_dict(),
                             config=json.loads(config_path.read_text()))
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path)

    assert "timm.create_model('hf-hub:acme/densenet121-pets', pretrained=True" in text
    assert '# Model card for acme/densenet121-pets' in text
    classify, _, _ = check_card_code(text, model.state_dict(), 3, 'fine-tuned')
    printed_labels = {l.split('%  ')[1] for l in classify['_stdout'].splitlines() if _TOP5_LINE.match(l)}
    assert printed_labels == set(labels)

    data = ModelCard(text).data
    assert data.base_model == 'timm/densenet121.ra_in1k' and data.datasets is None and data.license is None
    assert ('- **Base model:** [timm/densenet121.ra_in1k](https://huggingface.co/timm/densenet121.ra_in1k), the '
            'weights these were trained from') in text
    # the base model's data, recipe and papers are its own, not these weights'
    assert 'ImageNet-1k' not in text and 'RandAugment' not in text and 'wightman2021resnet' not in text
    assert '- **Dataset:** not stated\n' in text and '- **License:** not stated\n' in text
    timm_model = timm.models.densenet.densenet121(num_classes=3)  # timm's own DenseNet-121
    assert f'| {sum(p.numel() for p in timm_model.parameters()):,} |' in text


# --- (c) metadata and figures --------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', CARD_NAMES)
def test_card_metadata(name):
    card = ModelCard.load(cards.card_path(name, REPO_CARDS))
    cfg = get_pretrained_cfg(name)
    data = card.data
    assert data.library_name == 'timm'
    assert data.pipeline_tag == 'image-classification'
    assert data.license == cfg.license and data.license in ('apache-2.0', 'bsd-3-clause')
    assert data.tags[:3] == ['image-classification', 'timm', 'densenet']
    assert data.datasets == ['imagenet-1k']
    assert data.base_model is None and data.eval_results is None  # trained from scratch; no metrics are registered
    assert f'- **License:** {cfg.license}\n' in card.text and '- **Dataset:** ImageNet-1k\n' in card.text
    assert ('the size these weights are evaluated at' in card.text) == (cfg.test_input_size is not None)
    assert ('blurpool' in data.tags) == name.startswith('densenetblur')
    assert card.text.lstrip().startswith(f'# Model card for {name}\n')


def timm_builtin_counts(arch: str, input_size) -> Dict[str, float]:
    """Parameters, and the MACs and output elements of every convolution, linear layer and blur filter, of timm's
    own DenseNet (`timm.models.densenet`, not this package's), counted from the layers' shapes in a forward pass on the
    meta device; with those of the transitions' 1x1 convolutions apart."""
    with torch.device('meta'):
        model = getattr(timm.models.densenet, arch)().eval()
    assert type(model).__module__ == 'timm.models.densenet'
    counts = dict(params=sum(p.numel() for p in model.parameters()), macs=0, outputs=0, transition_macs=0,
                  transition_outputs=0)

    def count(name, module, _, output):
        if isinstance(module, torch.nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, torch.nn.Linear):
            per_output = module.in_features
        else:  # BlurPool2d: a fixed depthwise filter
            per_output = module.filt.shape[-2] * module.filt.shape[-1]
        counts['macs'] += output.numel() * per_output
        if not isinstance(module, BlurPool2d):
            counts['outputs'] += output.numel()
        if 'transition' in name and isinstance(module, torch.nn.Conv2d):
            counts['transition_macs'] += output.numel() * per_output
            counts['transition_outputs'] += output.numel()

    hooks = [m.register_forward_hook(functools.partial(count, n)) for n, m in model.named_modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, BlurPool2d))]
    with torch.no_grad():
        model(torch.empty((1, *input_size), device='meta'))
    for hook in hooks:
        hook.remove()
    return counts


@pytest.mark.parametrize('name', CARD_NAMES)
def test_card_statistics_preprocessing_and_pyramid_are_measured(name):
    text = cards.card_path(name, REPO_CARDS).read_text(encoding='utf-8')
    cfg = get_pretrained_cfg(name)
    rows = re.findall(r'^\| (\d+) x (\d+) \((input size|test input size)\) \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \|$',
                      text, flags=re.M)
    sizes = [cfg.input_size] + ([cfg.test_input_size] if cfg.test_input_size else [])
    assert [(int(h), int(w)) for h, w, *_ in rows] == [tuple(s[1:]) for s in sizes]
    for (_, _, _, params, gmacs, activations), size in zip(rows, sizes):
        # against timm's own DenseNet: the same parameters; the same MACs and outputs but for the transitions, whose
        # 1x1 convolution this package runs after the pooling, on a quarter of the pixels (as the card says)
        ref = timm_builtin_counts(name.split('.')[0], size)
        assert int(params.replace(',', '')) == ref['params']
        assert float(gmacs) == pytest.approx((ref['macs'] - 0.75 * ref['transition_macs']) / 1e9, abs=0.005)
        assert float(activations) == pytest.approx(
            (ref['outputs'] - 0.75 * ref['transition_outputs']) / 1e6, abs=0.005)
    if name.startswith('densenet121.'):  # the GUIDE's timm figures, less 3/4 of the transitions' 0.308 GMACs
        assert rows[0][3:5] == ('7,978,856', '2.60')

    assert f'- **Input size:** {cfg.input_size[1]} x {cfg.input_size[2]}\n' in text
    assert f'- **crop_pct:** {cfg.crop_pct} ' in text
    assert f'- **Interpolation:** {cfg.interpolation}\n' in text
    assert f'- **Mean:** {tuple(cfg.mean)}\n' in text and f'- **Std:** {tuple(cfg.std)}\n' in text
    assert ('- **Test input size:** 288 x 288 (crop_pct 0.95)' in text) == (cfg.test_input_size is not None)

    with torch.device('meta'):  # timm's own DenseNet as a backbone: its maps for a 224 x 224 image
        backbone = getattr(timm.models.densenet, name.split('.')[0])(features_only=True).eval()
        maps = backbone(torch.empty((1, 3, 224, 224), device='meta'))
    pyramid = re.findall(r'^\| (\d) \| (\d+) \| (\d+) \| (\d+) x (\d+) \| `([\w.]+)` \|$', text, flags=re.M)
    assert [int(c) for _, c, *_ in pyramid] == [m.shape[1] for m in maps] == backbone.feature_info.channels()
    assert [int(r) for _, _, r, *_ in pyramid] == backbone.feature_info.reduction()
    assert [(int(h), int(w)) for *_, h, w, _ in pyramid] == [tuple(m.shape[2:]) for m in maps]


@pytest.mark.parametrize('name', CARD_NAMES)
def test_card_weights_source_and_citations(name):
    text = cards.card_path(name, REPO_CARDS).read_text(encoding='utf-8')
    keys = bibtex_keys(text)
    assert keys[0] == 'huang2017densely'
    assert ('zhang2019shiftinvar' in keys) == name.startswith('densenetblur')
    if name.endswith('.ra_in1k'):
        assert {'rw2019timm', 'wightman2021resnet', 'cubuk2020randaugment'} <= set(keys)
        assert 'RandAugment `RA` recipe' in text
    if name.endswith('.tv_in1k'):
        assert 'torchvision2016' in keys
        arch = name.split('.')[0].replace('densenet', 'DenseNet')
        assert f"torchvision's `{arch}_Weights.IMAGENET1K_V1` weights" in text
    assert len(keys) == len(set(keys))
    repo = get_pretrained_cfg(name).hf_hub_id
    aliases = [n for n in timm.list_pretrained() if n != name and n.split('.')[0] in timm_densenet_ext.MODEL_NAMES
               and get_pretrained_cfg(n).hf_hub_id == repo]
    assert (name == 'densenet121.tv_in1k') <= ('tv_densenet121.tv_in1k' in aliases)
    for alias in aliases:
        assert f'`{alias}`' in text


def test_render_arguments_and_errors():
    assert rendered('densenet121') == rendered('densenet121.ra_in1k')  # the default tag
    text = cards.render_model_card('densenet121.tv_in1k', weights_source='Weights from a test.')
    assert '\nWeights from a test.\n' in text and 'IMAGENET1K_V1' not in text
    with pytest.raises(ValueError, match="unknown model 'densenet999'"):
        cards.render_model_card('densenet999')
    with pytest.raises(ValueError, match="unknown pretrained tag 'nope' for densenet121"):
        cards.render_model_card('densenet121.nope')
    with pytest.raises(ValueError, match='no published weights'):
        cards.render_model_card('densenet264d')


# --- (c2) a card states about the weights only what is known -----------------------------------------------------

# what a card may say only of weights whose recipe, data or origin is known
RECIPE_CLAIMS = ['RandAugment', 'ResNet strikes back', 'wightman2021resnet', 'cubuk2020randaugment', 'rw2019timm',
                 'torchvision2016', 'IMAGENET1K', "torchvision's weights", 'https://github.com/pytorch/vision',
                 'evaluated at', 'Trained on', 'Fine-tuned', 'ImageNet', 'bsd-3-clause', 'apache-2.0']


@functools.lru_cache(maxsize=None)
def _user_checkpoint(tmp: Path, num_classes: int) -> Path:
    """A user's randomly initialised torchvision DenseNet-121 checkpoint (torchvision's own code, its own keys)."""
    import torchvision
    torch.manual_seed(num_classes)
    path = tmp / f'densenet121-{num_classes}.pth'
    torch.save(torchvision.models.densenet121(num_classes=num_classes).state_dict(), path)
    return path


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('user-checkpoints')
    return lambda num_classes: _user_checkpoint(tmp, num_classes)


@pytest.mark.parametrize('num_classes', [10, 1000])
@pytest.mark.parametrize('arch', ['densenet121', 'tv_densenet121'])
def test_converted_card_claims_nothing_unknown(checkpoints, tmp_path, arch, num_classes):
    folder = convert_checkpoint(checkpoints(num_classes), arch, tmp_path / 'out')
    card = ModelCard.load(folder / 'README.md')
    data = card.data
    assert (data.base_model, data.datasets, data.license, data.eval_results) == (None, None, None, None)
    assert '- **Dataset:** not stated\n' in card.text and '- **License:** not stated\n' in card.text
    assert '- **Base model:**' not in card.text and '- **Original:**' not in card.text
    assert [claim for claim in RECIPE_CLAIMS if claim in card.content] == []
    assert f'Converted with `timm-densenet-ext convert` from a PyTorch state dict, `densenet121-{num_classes}.pth`.' \
        in card.text
    # the architecture's own paper is always stated
    assert bibtex_keys(card.content) == ['huang2017densely'] and 'https://arxiv.org/abs/1608.06993' in card.text
    if arch == 'densenet121':  # the test size of densenet121's default tag is recorded, but not claimed as measured
        assert '- **Test input size:** 288 x 288 (crop_pct 0.95): from the config, not measured for these weights' \
            in card.text


def test_converted_card_states_what_the_user_passes(checkpoints, tmp_path):
    folder = convert_checkpoint(
        checkpoints(1000), 'tv_densenet121.tv_in1k', tmp_path / 'out', repo_id='me/tv-densenet121',
        base_model='densenet121.tv_in1k', datasets='imagenet-1k', license='bsd-3-clause',
        weights_source="torchvision's DenseNet121_Weights.IMAGENET1K_V1, as downloaded.")
    card = ModelCard.load(folder / 'README.md')
    data = card.data
    assert (data.base_model, data.datasets, data.license) == ('timm/densenet121.tv_in1k', ['imagenet-1k'],
                                                              'bsd-3-clause')
    assert '- **Dataset:** imagenet-1k\n' in card.text and '- **License:** bsd-3-clause\n' in card.text
    assert ("torchvision's DenseNet121_Weights.IMAGENET1K_V1, as downloaded.\n\nConverted with "
            '`timm-densenet-ext convert` from a PyTorch state dict, `densenet121-1000.pth`.') in card.text
    assert "print(f'{probability:5.1f}%  {label_names[index]}')" in card.text  # ImageNet's names, from config.json
    # still no recipe nor papers of a recipe: only what was passed
    assert bibtex_keys(card.content) == ['huang2017densely'] and 'RandAugment' not in card.text

    # other Hub repositories and datasets as given
    folder = convert_checkpoint(checkpoints(10), 'densenet121', tmp_path / 'pets', base_model='acme/densenet121-in21k',
                                datasets=['acme/pets', 'acme/more-pets'], license='cc-by-4.0')
    data = ModelCard.load(folder / 'README.md').data
    assert (data.base_model, data.datasets, data.license) == ('acme/densenet121-in21k', ['acme/pets', 'acme/more-pets'],
                                                              'cc-by-4.0')


@pytest.mark.parametrize('kwargs, message', [
    (dict(license='Apache 2.0'), r"license='Apache 2\.0': give a license identifier as the Hub lists"),
    (dict(base_model='densenet264d'), r"base_model='densenet264d': give the Hub repository of the "
                                      r'weights these were trained from, as ORG/NAME, or a published tag'),
    (dict(base_model='acme/a/b'), r"base_model='acme/a/b': not a Hub repository id"),
    (dict(datasets=['image net']), r"datasets='image net': not a Hub dataset id"),
])
def test_card_facts_are_checked_before_anything_is_written(checkpoints, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(checkpoints(10), 'densenet121', tmp_path / 'out', **kwargs)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=message):
        cards.render_model_card('densenet121', repo_id='me/x', **kwargs)


def test_write_model_cards_refuses_to_overwrite_without_force(rendered_once, tmp_path):
    out_dir = tmp_path / 'cards'
    first = cards.write_model_cards(out_dir)
    assert [p.name for p in first] == [f'{n}.md' for n in CARD_NAMES]
    assert cards.write_model_cards(out_dir) == first  # the same text again: nothing to overwrite
    mine = out_dir / f'{CARD_NAMES[0]}.md'
    mine.write_text('my edits')
    (out_dir / f'{CARD_NAMES[1]}.md').unlink()
    with pytest.raises(FileExistsError) as raised:
        cards.write_model_cards(out_dir)
    assert str(raised.value) == (f'{mine} exists with other text; pass force=True to overwrite it with the '
                                 f'card rendered now.')
    assert mine.read_text() == 'my edits' and not (out_dir / f'{CARD_NAMES[1]}.md').exists()  # nothing written
    cards.write_model_cards(out_dir, force=True)
    assert all(p.read_text(encoding='utf-8') == rendered(n) for p, n in zip(first, CARD_NAMES))
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in first)  # no temporary files


# --- (d) the `card` command ---------------------------------------------------------------------------------------

@pytest.fixture
def rendered_once(monkeypatch):
    """The command renders through this session's cache: rendering is tested above, the command here."""
    def render(model_name, **kwargs):
        return rendered(model_name) if not any(kwargs.values()) else _render(model_name, **kwargs)
    monkeypatch.setattr(cards, 'render_model_card', render)


def test_cli_card_prints_the_card(rendered_once, capsys):
    assert cli.main(['card', 'densenet121']) == 0
    assert capsys.readouterr().out == rendered('densenet121.ra_in1k')


def test_cli_card_all_regenerates_a_folder(rendered_once, tmp_path, capsys):
    out_dir = tmp_path / 'cards'
    assert cli.main(['card', '--all', '--out', str(out_dir)]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f'{n}.md' for n in CARD_NAMES)
    for name in CARD_NAMES:
        committed = cards.card_path(name, REPO_CARDS).read_text(encoding='utf-8')
        assert (out_dir / f'{name}.md').read_text(encoding='utf-8') == committed
    assert capsys.readouterr().out.split() == [str(out_dir / f'{n}.md') for n in CARD_NAMES]


def test_cli_card_all_writes_model_cards_in_the_current_folder(rendered_once, tmp_path, monkeypatch, capsys):
    """Not the package's folder: an installed package has no model_cards/ beside it (nor may write there)."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(['card', '--all']) == 0
    assert capsys.readouterr().out.split() == [str(Path('model_cards') / f'{n}.md') for n in CARD_NAMES]
    assert sorted(p.name for p in (tmp_path / 'model_cards').iterdir()) == sorted(f'{n}.md' for n in CARD_NAMES)
    for name in CARD_NAMES:
        assert (tmp_path / 'model_cards' / f'{name}.md').read_bytes() == (REPO_CARDS / f'{name}.md').read_bytes()


def test_an_installed_wheel_renders_and_writes_cards_without_the_repository(tmp_path):
    """`pip install .` (not editable): the package's files alone, run away from the repository, render the committed
    cards, so whatever it reads at run time is package data that the wheel carries."""
    import shutil
    import zipfile
    pytest.importorskip('setuptools', reason="the wheel is built with this environment's setuptools")
    repo = REPO_CARDS.parent
    source = tmp_path / 'source'
    source.mkdir()
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(repo / name, source / name)
    shutil.copytree(repo / 'timm_densenet_ext', source / 'timm_densenet_ext',
                    ignore=shutil.ignore_patterns('__pycache__'))
    build = subprocess.run(
        [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '-q', '-w',
         str(tmp_path / 'dist'), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    site = tmp_path / 'site'
    with zipfile.ZipFile(next((tmp_path / 'dist').glob('timm_densenet_ext-*.whl'))) as wheel:
        wheel.extractall(site)  # what pip installs from a pure-Python wheel
    elsewhere = tmp_path / 'work'
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE='1')

    def cli_run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, '-c', 'import sys, timm_densenet_ext.cli as c; '
                               'print(c.__file__, file=sys.stderr); sys.exit(c.main(sys.argv[1:]))', *argv],
                              cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)

    name = 'densenet121.tv_in1k'
    one = cli_run('card', '-m', name)
    assert one.returncode == 0, one.stderr
    assert one.stderr.startswith(str(site)), one.stderr  # the wheel's copy, not the repository's
    assert one.stdout == (REPO_CARDS / f'{name}.md').read_text(encoding='utf-8')
    every = cli_run('card', '--all')
    assert every.returncode == 0, every.stderr
    written = elsewhere / 'model_cards'
    assert sorted(p.name for p in written.iterdir()) == sorted(f'{n}.md' for n in CARD_NAMES)
    assert all((written / f'{n}.md').read_bytes() == (REPO_CARDS / f'{n}.md').read_bytes() for n in CARD_NAMES)
    assert not list(site.rglob('model_cards'))  # nothing written into the installed package


def test_cli_card_out_refuses_to_overwrite(rendered_once, tmp_path, capsys):
    out = tmp_path / 'README.md'
    assert cli.main(['card', 'densenet121.tv_in1k', '--out', str(out)]) == 0
    assert out.read_text(encoding='utf-8') == rendered('densenet121.tv_in1k')
    out.write_text('mine')
    capsys.readouterr()
    assert cli.main(['card', 'densenet121.tv_in1k', '--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'exists' in err and '--force' in err
    assert out.read_text() == 'mine'
    assert cli.main(['card', 'densenet121.tv_in1k', '--out', str(out), '--force']) == 0
    assert out.read_text(encoding='utf-8') == rendered('densenet121.tv_in1k')
    assert [p.name for p in tmp_path.iterdir()] == ['README.md']  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600


@pytest.mark.parametrize('argv, message', [
    (['card', 'densenet999'], "unknown model 'densenet999'"),
    (['card', 'densenet121.nope'], "unknown pretrained tag 'nope'"),
    (['card'], 'give -m/--model MODEL[.TAG]'),
])
def test_cli_card_errors_are_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ''
    assert captured.err.count('\n') == 1 and captured.err.startswith('timm-densenet-ext card: error: ')
    assert message in captured.err


def test_cli_unknown_model_from_the_command_line():
    proc = subprocess.run([sys.executable, '-m', 'timm_densenet_ext.cli', 'card', 'densenet999'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr.splitlines() == [
        "timm-densenet-ext card: error: unknown model 'densenet999'; `timm-densenet-ext list` shows the "
        f'{len(timm_densenet_ext.MODEL_NAMES)} variants.']


def test_card_of_a_model_built_with_other_arguments_does_not_quote_the_variant():
    """A DenseNet-BC with two layers per block is not the docstring's L=100 model of 0.8M parameters."""
    model_args = dict(block_config=[2, 2, 2], num_classes=3, in_chans=3)
    cfg = dict(get_pretrained_cfg('densenet_bc_100_k12').to_dict(), num_classes=3)
    text = cards.render_model_card('densenet_bc_100_k12', repo_id='me/tiny', pretrained_cfg=cfg, model_args=model_args)
    assert '0.8M parameters' not in text and 'L=100' not in text
    assert '- **Architecture:** `densenet_bc_100_k12`, densenet_bc_100_k12 built with block_config=[2, 2, 2]\n' in text
    tiny = timm.create_model('densenet_bc_100_k12', block_config=(2, 2, 2), num_classes=3)
    assert f'| 32 x 32 (input size) | {sum(p.numel() for p in tiny.parameters()):,} |' in text
