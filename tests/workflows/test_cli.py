"""`timm-densenet-ext list` and `info`: figures measured from the models, one-line errors."""
import argparse
import json
import os
import shlex
import subprocess
import sys

import pytest
import timm
import torch

import timm_densenet_ext
from timm_densenet_ext import cli
from timm_densenet_ext.cli import build_parser, main


def test_list_table_and_json(capsys):
    assert main(['list', '--json']) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r['name'] for r in rows] == list(timm_densenet_ext.MODEL_NAMES)
    by_name = {r['name']: r for r in rows}
    assert by_name['densenet121']['params'] == 7_978_856
    assert round(by_name['densenet121']['gmacs'], 2) == 2.60  # timm: 2.83
    assert by_name['densenet121']['pretrained_tags'] == ['ra_in1k', 'tv_in1k']
    assert by_name['densenet264d']['pretrained_tags'] == []
    assert by_name['densenet_bc_100_k12']['input_size'] == [3, 32, 32]
    with torch.device('meta'):
        bc = timm.create_model('densenet_bc_190_k40')
    assert by_name['densenet_bc_190_k40']['params'] == sum(p.numel() for p in bc.parameters())

    assert main(['list']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ['name', 'params', 'GMACs', 'input', 'pretrained', 'tags']
    row = next(line for line in lines if line.startswith('densenetblur121d '))
    assert row.split() == ['densenetblur121d', '7,998,088', '2.84', '224x224', 'ra_in1k']


def test_info_matches_the_model(capsys):
    assert main(['info', '-m', 'densenet161.tv_in1k', '--json']) == 0
    info = json.loads(capsys.readouterr().out)
    # against timm's own DenseNet-161 (its entrypoint, not the registry name we take over): the maps it returns
    import timm.models.densenet as timm_densenet
    reference = timm_densenet.densenet161(features_only=True).eval()
    with torch.no_grad():
        maps = reference(torch.zeros(1, 3, 64, 64))
    assert [f['num_chs'] for f in info['feature_info']] == [m.shape[1] for m in maps] == [96, 384, 768, 2112, 2208]
    assert [f['reduction'] for f in info['feature_info']] == [64 // m.shape[-1] for m in maps]
    assert info['pretrained_cfg']['hf_hub_id'] == 'timm/densenet161.tv_in1k'
    assert info['params'] == 28_681_000 and round(info['gmacs'], 2) == 7.05  # timm: 7.73
    assert main(['info', 'densenet_bc_100_k12']) == 0  # the earlier, positional form still works
    text = capsys.readouterr().out
    assert 'min input size  4x4' in text and 'stride  4  features.norm5' in text and 'CIFAR' not in text


def test_errors_are_one_line_exit_2():
    for args in (['info', 'resnet50'], ['info', 'densenet121.in22k']):
        result = subprocess.run([sys.executable, '-m', 'timm_densenet_ext.cli', *args],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2
        errors = [line for line in result.stderr.splitlines() if 'error:' in line]
        assert len(errors) == 1 and args[1] in errors[0] and 'Traceback' not in result.stderr


def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_option_has_help_and_timm_s_names():
    parser, commands = _subcommands()
    assert set(commands) == {'list', 'info', 'predict', 'finetune', 'validate', 'export', 'demo', 'benchmark',
                             'convert', 'card', 'push'}
    for name, p in commands.items():
        for action in p._actions:
            assert action.help and action.help != argparse.SUPPRESS, f'{name} {action.option_strings or action.dest}'
        flags = {s for a in p._actions for s in a.option_strings}
        if name not in ('list', 'demo'):
            assert {'-m', '--model'} <= flags, name  # the model is given the same way everywhere
    timm_names = {  # timm's scripts' names, with this tool's earlier ones kept as aliases
        'predict': [('--topk', '--top-k'), ('--checkpoint', '--weights'), ('-b', '--batch-size')],
        'finetune': [('--data-dir', '--data'), ('--output', '--out'), ('--checkpoint', '--weights'),
                     ('-b', '--batch-size'), ('--img-size',), ('--pretrained',)],
        'validate': [('--data-dir', '--data'), ('--output', '--out'), ('--checkpoint', '--weights'),
                     ('-b', '--batch-size'), ('--img-size',), ('--pretrained',)],
        'export': [('--output', '--out'), ('--checkpoint', '--weights')],
        'convert': [('--output', '--out'), ('--checkpoint', '--weights')],
        'benchmark': [('-b', '--batch-size'), ('--output', '--out'), ('--img-size',)],
        'card': [('--output', '--out')],
        'demo': [('--output', '--out')],
    }
    for name, groups in timm_names.items():
        for names in groups:
            action = next(a for a in commands[name]._actions if names[0] in a.option_strings)
            assert set(names) <= set(action.option_strings), (name, names)


@pytest.mark.parametrize('argv, expected', [
    (['predict', '-m', 'densenet121', 'a.png', 'b.png', '--topk', '3', '-b', '4', '--checkpoint', 'w.pth'],
     dict(model='densenet121', images=['a.png', 'b.png'], topk=3, batch_size=4, checkpoint='w.pth')),
    (['predict', 'densenet121', 'a.png', '--top-k', '3', '--weights', 'w.pth'],
     dict(model='densenet121', images=['a.png'], topk=3, checkpoint='w.pth')),
    (['finetune', '-m', 'densenet121', '--data-dir', 'd', '--output', 'o', '-b', '8'],
     dict(model='densenet121', data_dir='d', output='o', batch_size=8)),
    (['finetune', '--model', 'densenet121', '--data', 'd', '--out', 'o', '--batch-size', '8'],
     dict(model='densenet121', data_dir='d', output='o', batch_size=8)),
    (['validate', '-m', 'densenet121', '--pretrained', '--data-dir', 'd', '-b', '8', '--img-size', '256', '--output',
      'o', '--force', '--threads', '1'],
     dict(model='densenet121', pretrained=True, data_dir='d', batch_size=8, img_size=256, output='o', force=True,
          threads=1)),
    (['validate', '--model', 'local-dir:m', '--data', 'd', '--out', 'o', '--checkpoint', 'w.pth'],
     dict(model='local-dir:m', data_dir='d', output='o', checkpoint='w.pth', batch_size=64)),
    (['export', '-m', 'densenet121', '--format', 'onnx', '--output', 'f.onnx'],
     dict(model='densenet121', output='f.onnx')),
    (['export', 'densenet121', '--format', 'onnx', '--out', 'f.onnx'], dict(model='densenet121', output='f.onnx')),
    (['convert', '--checkpoint', 'c.pth', '-m', 'densenet121', '--output', 'o'],
     dict(checkpoint='c.pth', model='densenet121', output='o')),
    (['push', '-m', 'local-dir:some/folder', '--repo-id', 'a/b'], dict(model='local-dir:some/folder', repo_id='a/b')),
    (['push', 'some/folder', '--repo-id', 'a/b'], dict(model='some/folder', repo_id='a/b')),
    (['benchmark', '-m', 'densenet169', '-b', '2', '--output', 'o'],
     dict(model='densenet169', batch_size=2, output='o')),
    (['card', '-m', 'densenet121.tv_in1k', '--output', 'c.md'], dict(model='densenet121.tv_in1k', output='c.md')),
    (['demo', '--output', 'o'], dict(output='o')),
])
def test_timm_grammar_and_earlier_aliases_parse_alike(argv, expected, monkeypatch):
    seen = {}
    parser, commands = _subcommands()
    monkeypatch.setattr(cli, 'build_parser', lambda: parser)
    commands[argv[0]].set_defaults(func=lambda args: seen.update(vars(args)) or 0)
    assert main(argv) == 0
    assert {k: seen[k] for k in expected} == expected


def test_version_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit:
        main(['--version'])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f'timm-densenet-ext {timm_densenet_ext.__version__}'
    for argv in (['info'], ['info', '-m', 'densenet121', 'densenet169'],
                 ['export', '--format', 'onnx', '--output', 'x'], ['predict', 'only-one.png']):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2
        err = capsys.readouterr().err
        assert 'model' in err.splitlines()[-1], argv


@pytest.mark.parametrize('command', ['list', 'info -m densenet121 --json', 'card -m densenet121.tv_in1k'])
def test_piped_into_head_no_traceback(command):
    """`... | head -1`: the reader goes away after one line; no BrokenPipeError traceback, the line arrives."""
    proc = subprocess.run(f'{shlex.quote(sys.executable)} -m timm_densenet_ext.cli {command} | head -1',
                          shell=True, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED='0'))
    assert proc.stdout.count('\n') == 1 and proc.stdout.strip()
    assert 'Traceback' not in proc.stderr and 'BrokenPipe' not in proc.stderr, proc.stderr


def test_errors_name_flags_on_the_command_line_and_arguments_in_python(tmp_path, capsys):
    from timm_densenet_ext.export import export_model
    existing = tmp_path / 'model.onnx'
    existing.write_bytes(b'keep')
    with pytest.raises(FileExistsError, match=r'force=True') as e:
        export_model('densenet121', 'onnx', existing, pretrained=True)
    assert '--force' not in str(e.value)
    assert main(['export', '-m', 'densenet121', '--pretrained', '--format', 'onnx', '--output', str(existing)]) == 2
    err = capsys.readouterr().err
    assert '--force' in err and 'force=True' not in err and '--output' in err
    assert existing.read_bytes() == b'keep'


def test_every_argument_an_error_names_is_a_flag_of_the_cli():
    """Errors raised while the CLI runs name flags through `_naming.arg`: each of those flags must exist."""
    import re
    from pathlib import Path

    from timm_densenet_ext._naming import arg, cli_style
    _, commands = _subcommands()
    flags = {s for p in commands.values() for a in p._actions for s in a.option_strings}
    package = Path(timm_densenet_ext.__file__).parent
    names = {n for f in package.glob('*.py') for n in re.findall(r'arg\("(\w+)"', f.read_text())}
    assert {'force', 'out_dir', 'weights', 'top_k', 'data_dir', 'model_name'} <= names
    with cli_style():
        named = {n: arg(n).split()[0] for n in names}
    assert {n: f for n, f in named.items() if f not in flags} == {}
    assert arg('force') == 'force=True' and arg('weights', 'PATH') == 'weights=PATH'  # outside the CLI: Python's


def test_every_flag_the_errors_may_name_is_a_flag_of_the_cli():
    """`_naming.FLAGS` (Python argument -> flag) and the parser's options name the same flags."""
    from timm_densenet_ext._naming import FLAGS
    _, commands = _subcommands()
    flags = {s for p in commands.values() for a in p._actions for s in a.option_strings}
    assert set(FLAGS.values()) - flags == set()
