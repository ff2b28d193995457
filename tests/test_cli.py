"""`timm-densenet-ext list` and `info`: figures measured from the models, one-line errors."""
import json
import subprocess
import sys

import timm
import torch

import timm_densenet_ext
from timm_densenet_ext.cli import main


def test_list_table_and_json(capsys):
    assert main(['list', '--json']) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r['name'] for r in rows] == list(timm_densenet_ext.MODEL_NAMES)
    by_name = {r['name']: r for r in rows}
    assert by_name['densenet121']['params'] == 7_978_856 and round(by_name['densenet121']['gmacs'], 2) == 2.60  # timm: 2.83
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
    assert main(['info', 'densenet161.tv_in1k', '--json']) == 0
    info = json.loads(capsys.readouterr().out)
    model = timm.create_model('densenet161', features_only=True)
    assert [f['num_chs'] for f in info['feature_info']] == model.feature_info.channels()
    assert [f['reduction'] for f in info['feature_info']] == model.feature_info.reduction()
    assert info['pretrained_cfg']['hf_hub_id'] == 'timm/densenet161.tv_in1k'
    assert info['params'] == 28_681_000 and round(info['gmacs'], 2) == 7.05  # timm: 7.73
    assert main(['info', 'densenet_bc_100_k12']) == 0
    text = capsys.readouterr().out
    assert 'min input size  4x4' in text and 'stride  4  features.norm5' in text and 'CIFAR' not in text


def test_errors_are_one_line_exit_2():
    for args in (['info', 'resnet50'], ['info', 'densenet121.in22k']):
        result = subprocess.run([sys.executable, '-m', 'timm_densenet_ext.cli', *args],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2
        errors = [line for line in result.stderr.splitlines() if 'error:' in line]
        assert len(errors) == 1 and args[1] in errors[0] and 'Traceback' not in result.stderr
