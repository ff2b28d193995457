"""Every next step the tool prints runs exactly as printed: the demo's, convert's and finetune's closing lines, and
the ones the README shows. A command line goes to the shell as it is; a Python line goes to a fresh interpreter."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import timm
import torch
from safetensors.torch import load_file

from timm_densenet_ext.demo import MODEL_FOLDER, next_steps
from hub_fixtures import FakeHub
from workflow_helpers import TINY_ARCH, tiny_hub_folder, write_image_folder

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PYTHON_LINE = 'load it in Python: '


def _env(**extra: str) -> Dict[str, str]:
    # the console script of this environment first on PATH, as in an activated venv; offline, no token
    env = dict(os.environ, PATH=f'{BIN}{os.pathsep}{os.environ.get("PATH", "")}', HF_HUB_OFFLINE='1')
    env.pop('HF_TOKEN', None)
    return dict(env, **extra)


def _run(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=600)


def _next_steps(printed: str) -> List[str]:
    """The lines after 'next:', without their indent."""
    lines = printed.splitlines()
    assert 'next:' in lines, printed
    return [line.strip() for line in lines[lines.index('next:') + 1:] if line.startswith('  ')]


def _run_step(step: str, cwd: Path, hub: Optional[FakeHub] = None) -> subprocess.CompletedProcess:
    """A printed step, exactly as printed: a Python line in `python -c`, anything else in the shell; `publish it`
    with a token, against `hub` (a Hub on 127.0.0.1, HF_ENDPOINT), as after `hf auth login`."""
    if step.startswith(PYTHON_LINE):
        code = step[len(PYTHON_LINE):] + '\nprint(type(model).__name__, model.num_classes)'
        return subprocess.run([sys.executable, '-c', code], cwd=cwd, env=_env(), capture_output=True, text=True,
                              timeout=600)
    name = step.split(':', 1)[0]
    command = step.split(': ', 1)[1] if name in ('check the upload', 'publish it') else step
    if name == 'publish it':
        return _run(command, cwd, HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE='0', HF_TOKEN='hf_user_token')
    return _run(command, cwd)


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
    """The demo run the quick start's way, by the console script's path (`.venv/bin/timm-densenet-ext demo`) with
    the venv not on PATH, in a folder of the user's own (one epoch, to keep the test short)."""
    cwd = tmp_path_factory.mktemp('user')
    path = os.pathsep.join(p for p in os.environ.get('PATH', '').split(os.pathsep) if Path(p) != BIN)
    proc = subprocess.run([str(BIN / 'timm-densenet-ext'), 'demo', '--epochs', '1'], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=dict(_env(), PATH=path))
    assert proc.returncode == 0, proc.stderr
    return cwd, proc.stdout


def test_the_demo_s_next_steps_run_as_printed(demo_dir):
    cwd, printed = demo_dir
    steps = _next_steps(printed)
    tool = shlex.quote(str(BIN / 'timm-densenet-ext'))  # as the user ran it: the shell would not find the bare name
    assert [s.split()[1] if s.startswith(tool) else s.split(':')[0] for s in steps] == [
        'predict', 'validate', 'export', 'push', 'load it in Python']
    results = {step: _run_step(step, cwd) for step in steps}
    for step, proc in results.items():
        assert proc.returncode == 0, f'{step}\n{proc.stderr}'
        assert 'Traceback' not in proc.stderr
    predict, validate, export, push, python = results.values()
    assert predict.stdout.splitlines()[0].endswith('.png') and len(predict.stdout.splitlines()) == 6
    # the quick start's extra (demo) is enough: the summary, no files without --output
    assert ' on densenet-demo/data/val: 360 of 360 images, 10 classes' in validate.stdout
    assert re.search(r'^top-1 \d+\.\d\d% \(\d+/360\)  top-5 ', validate.stdout, flags=re.M), validate.stdout
    assert (cwd / 'densenet-demo' / 'digits.onnx').is_file() and 'matches PyTorch' in export.stdout
    # push --dry-run: the card shown is rendered for the repository given, from the folder's own facts
    assert 'would upload to ORG/NAME' in push.stdout and 'dry run: nothing was uploaded.' in push.stdout
    assert 'hf-hub:ORG/NAME' in push.stdout and "scikit-learn's handwritten digits" in push.stdout
    assert 'YOUR-ORG' not in push.stdout
    assert python.stdout.split() == ['DenseNet', '10']


def test_without_the_export_extra_the_demo_suggests_an_export_that_needs_nothing_more(demo_dir):
    """The quick start installs the demo extra only: no onnx. The export then offered is torch.export's, and runs."""
    cwd, _ = demo_dir
    folder = Path('densenet-demo') / MODEL_FOLDER
    export = next_steps(Path('densenet-demo'), folder, Path('x.png'), onnx=False)[3].strip()
    assert '--format exported-program' in export and 'digits.pt2' in export
    proc = _run(export, cwd)
    assert proc.returncode == 0, proc.stderr
    assert (cwd / 'densenet-demo' / 'digits.pt2').is_file()


def _convert(tmp_path: Path, extra: str = '') -> subprocess.CompletedProcess:
    model = timm.create_model(TINY_ARCH, num_classes=3)  # the variant as registered: convert checks every tensor
    torch.save(model.state_dict(), tmp_path / 'model_best.pth')
    return _run(f'timm-densenet-ext convert --checkpoint model_best.pth -m {TINY_ARCH} --output converted {extra}',
                tmp_path)


def test_convert_s_next_steps_run_as_printed_and_load_the_converted_weights(tmp_path, hub):
    proc = _convert(tmp_path)
    assert proc.returncode == 0, proc.stderr
    steps = _next_steps(proc.stdout)
    python = next(s for s in steps if s.startswith(PYTHON_LINE))
    # the printed line loads the converted weights, not random ones: compare in the same interpreter
    code = (python[len(PYTHON_LINE):] + '\nfrom safetensors.torch import load_file\n'
            "sd = load_file('converted/model.safetensors')\n"
            'own = model.state_dict()\n'
            'print(max(float((own[k].float() - v.float()).abs().max()) for k, v in sd.items()))')
    checked = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert checked.returncode == 0, checked.stderr
    assert float(checked.stdout.split()[-1]) == 0.0
    dry_run = next(s for s in steps if s.startswith('check the upload: '))
    result = _run_step(dry_run, tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'would upload to ORG/NAME' in result.stdout and 'hf-hub:ORG/NAME' in result.stdout
    publish = next(s for s in steps if s.startswith('publish it: '))
    result = _run_step(publish, tmp_path, hub)
    assert result.returncode == 0, result.stderr
    pushed = hub.repos['ORG/NAME']['branches']['main']
    assert sorted(pushed) == ['README.md', 'config.json', 'model.safetensors']
    assert pushed['model.safetensors'] == (tmp_path / 'converted' / 'model.safetensors').read_bytes()
    assert b'hf-hub:ORG/NAME' in pushed['README.md'] and b'YOUR-ORG' not in pushed['README.md']


def test_finetune_s_next_steps_run_as_printed(tmp_path, hub):
    write_image_folder(tmp_path / 'data', ['apple', 'banana'], train=4, val=2)
    tiny_hub_folder(tmp_path / 'start', ['a', 'b', 'c'])
    proc = _run('timm-densenet-ext finetune -m local-dir:start --data-dir data --output tuned --epochs 1 -b 4 '
                '--repo-id me/tuned', tmp_path)
    assert proc.returncode == 0, proc.stderr
    steps = _next_steps(proc.stdout)
    assert 'check the upload: timm-densenet-ext push tuned --repo-id me/tuned --dry-run' in steps
    for step in steps:
        result = _run_step(step, tmp_path, hub)
        assert result.returncode == 0, f'{step}\n{result.stderr}'
    assert sorted(hub.repos['me/tuned']['branches']['main']) == ['README.md', 'config.json', 'model.safetensors']
    tuned = load_file(str(tmp_path / 'tuned' / 'model.safetensors'))
    assert tuned['classifier.weight'].shape[0] == 2


def test_the_readme_shows_the_demo_s_next_steps_as_it_prints_them():
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    shown = re.search(r'^next:\n((?:  .*\n)+)', readme, flags=re.M)
    assert shown, 'README: the demo transcript ends with its next steps'
    example = re.search(r'densenet-demo/data/val/7/\d+\.png', shown.group(1)).group(0)
    # as the quick start runs it: `.venv/bin/timm-densenet-ext demo`, with the demo extra only (no onnx)
    expected = next_steps(Path('densenet-demo'), Path('densenet-demo') / MODEL_FOLDER, Path(example),
                          tool='.venv/bin/timm-densenet-ext', onnx=False)
    assert shown.group(0).rstrip('\n').splitlines() == expected


def test_every_cli_line_in_the_readme_parses():
    """Each `timm-densenet-ext ...` line of the README's bash blocks and transcripts uses flags the CLI has (it is
    run elsewhere, or needs data a user has); a renamed flag or subcommand fails here. (The synopsis in Command line
    is a `text` block.)"""
    from timm_densenet_ext.cli import build_parser
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    lines = []
    for block in re.findall(r'^```(?:bash)?\n(.*?)^```$', readme, flags=re.S | re.M):
        block = block.replace('\\\n', ' ')
        lines += [line.split('#', 1)[0].strip() for line in block.splitlines()
                  if line.strip().startswith('timm-densenet-ext ')]
        # torchrun ... -m timm_densenet_ext ARGS: the tool's part
        lines += ['timm-densenet-ext ' + line.split(' -m timm_densenet_ext ', 1)[1].split('#', 1)[0].strip()
                  for line in block.splitlines() if line.strip().startswith('torchrun ')]
    assert len(lines) >= 10 and sum(' --sync-bn' in line for line in lines) >= 2
    parser = build_parser()
    for line in lines:
        try:
            parser.parse_args(shlex.split(line)[1:])
        except SystemExit:
            raise AssertionError(f'README: `{line}` does not parse') from None
