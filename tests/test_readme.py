"""The README: a two-command quick start whose test command is CI's, and every Python code block run as written,
offline, in a folder holding what the blocks read (a demo hub folder, a converted folder, cached Hub weights)."""
import contextlib
import io
import re
import sys
from pathlib import Path

import pytest
import timm

import timm_densenet_ext  # noqa: F401  (registers the variants)
from hub_fixtures import add_weights_to_hub_cache
from timm_densenet_ext.hub import write_hub_folder
from timm_densenet_ext.models import resolve_model_name
from workflow_helpers import tiny_hub_folder, write_image

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / 'README.md').read_text(encoding='utf-8')
BLOCKS = re.findall(r'^```python\n(.*?)^```$', README, flags=re.S | re.M)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None


def section(title: str) -> str:
    return README.split(f'\n## {title}\n', 1)[1].split('\n## ', 1)[0]


def _demo_folder(cwd: Path) -> None:
    """What `timm-densenet-ext demo` leaves: a 10-digit DenseNet-BC hub folder at 8 px, and images."""
    tiny_hub_folder(cwd / 'densenet-demo' / 'densenet_bc_100_k12.digits', [str(d) for d in range(10)], img_size=8)
    for i in range(3):
        write_image(cwd / 'densenet-demo' / 'data' / 'val' / '7' / f'{i:04d}.png', size=(8, 8), seed=i)


def _converted_folder(cwd: Path) -> None:
    """What the Publishing section's `convert` writes: an ImageNet DenseNet-121."""
    write_hub_folder(timm.create_model('densenet121'), cwd / 'densenet121.my_in1k', model_name='densenet121')


# the local folders the README's code reads, and how to make each
FOLDERS = {'densenet-demo/densenet_bc_100_k12.digits': _demo_folder, 'densenet121.my_in1k': _converted_folder}


def test_quick_start_is_two_commands_and_the_second_is_ci_s():
    quick = section('Quick start')
    commands = re.findall(r'^```bash\n(.*?)^```$', quick, flags=re.S | re.M)
    assert len(commands) == 2 and all(c.count('\n') == 1 for c in commands)  # two blocks, one line each
    demo, tests = (c.strip() for c in commands)
    assert demo == ("python3 -m venv .venv && .venv/bin/pip install -e '.[demo]' && HF_HUB_OFFLINE=1 "
                    ".venv/bin/timm-densenet-ext demo")
    ci = (ROOT / '.ci' / 'run').read_text()
    assert ci.rstrip().splitlines()[-1] in tests and "-e '.[test]'" in ci
    assert tests == ("python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && HF_HUB_OFFLINE=1 "
                     ".venv/bin/python -m pytest -q -n auto")


@pytest.mark.skipif(tomllib is None, reason='tomllib is Python 3.11+; the extras are the same on every version')
def test_the_test_extra_brings_what_the_workflows_need():
    extras = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['optional-dependencies']
    assert extras['demo'] == ['scikit-learn>=1.0']
    assert [re.split('[<>=]', r)[0] for r in extras['export']] == ['onnx', 'onnxscript', 'onnxruntime']
    # int8 deployment: ONNX Runtime's quantization and runtime through export, OpenVINO as the other engine; the
    # benchmark measures them all
    assert 'timm-densenet-ext[export]' in extras['deploy'] and any(r.startswith('openvino') for r in extras['deploy'])
    assert 'timm-densenet-ext[deploy]' in extras['bench']
    assert 'timm-densenet-ext[demo,export,bench,validate,explain]' in extras['test']
    assert extras['validate'] == ['matplotlib'] and [re.split('[<>=]', r)[0] for r in extras['explain']] == ['grad-cam']


def test_every_python_block_is_run():
    # a new block that reads a folder nobody makes fails here rather than being skipped
    assert len(BLOCKS) == 7
    for code in BLOCKS:
        for folder in re.findall(r"local-dir:([\w.\-/]+)'", code):
            assert folder in FOLDERS, f'README code loads local-dir:{folder}; add it to FOLDERS in {__file__}'


@pytest.mark.parametrize('index', range(len(BLOCKS)))
def test_readme_python_block_runs_offline(index, tmp_path, monkeypatch, hub_cache):
    code = BLOCKS[index]
    monkeypatch.chdir(tmp_path)
    for folder in set(re.findall(r"local-dir:([\w.\-/]+)'", code)):
        FOLDERS[folder](tmp_path)
    for name in set(re.findall(r"(?:create_model|fpn_backbone)\('([\w.]+)', pretrained=True", code)):
        arch, tag = resolve_model_name(name)
        cfg = timm.models.get_pretrained_cfg(f'{arch}.{tag}')
        add_weights_to_hub_cache(hub_cache, cfg.hf_hub_id, timm.create_model(arch).state_dict())

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f'<README.md python block {index}>', 'exec'), {'__name__': '__main__'})
    printed = out.getvalue().splitlines()
    # what a print's comment says it prints, it prints
    stated = [line.split('#', 1)[1].strip() for line in code.splitlines()
              if line.lstrip().startswith('print(') and '#' in line]
    for expected in stated:
        assert expected in printed, f'block {index} states {expected!r}; printed:\n' + '\n'.join(printed)


def test_every_snippet_naming_a_plugin_only_variant_imports_the_plugin():
    """timm alone does not know densenet_bc_100_k12, densenet121d, ...: a snippet that names one
    (or loads a folder of one) without `import timm_densenet_ext` fails for whoever copies it."""
    import timm.models.densenet as timm_densenet
    plugin_only = {n for n in timm_densenet_ext.MODEL_NAMES if not hasattr(timm_densenet, n)}
    assert {'densenet_bc_100_k12', 'densenet121d'} <= plugin_only
    folders = {'densenet-demo/densenet_bc_100_k12.digits'}  # the demo's hub folder: a DenseNet-BC
    inline = [span for span in re.findall(r'`([^`\n]+)`', README) if 'create_model(' in span]
    assert inline
    for code in BLOCKS + inline:
        names = set(re.findall(r"['\"]([\w.]+)['\"]", code)) | set(re.findall(r"local-dir:([\w.\-/]+)", code))
        named = {n.split('.', 1)[0] for n in names} & plugin_only | (names & folders)
        if named:
            assert re.search(r'\bimport (\w+, )*timm_densenet_ext\b|\bfrom timm_densenet_ext\b', code), (named, code)
