"""Reading checkpoint files of every supported format and verifying them against the architecture; bad input."""
import argparse
import os
import re
from pathlib import Path
from typing import List

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

import timm_densenet_ext  # noqa: F401  (registers the variants)
from model_helpers import assert_same_tensors, legacy_tv_keys, trained
from timm_densenet_ext.cli import main
from timm_densenet_ext.checkpoints import Checkpoint, model_from_checkpoint, read_checkpoint
from timm_densenet_ext.models import checkpoint_filter_fn

SMALL = 'densenet_bc_100_k12'


@pytest.fixture(scope='module')
def source() -> nn.Module:
    return trained(SMALL, num_classes=10)



# ---------------------------------------------------------------------------------------------------------------------
# reading every format

def _save_plain(sd, path):
    torch.save(sd, path)


def _save_legacy_serialization(sd, path):
    torch.save(sd, path, _use_new_zipfile_serialization=False)


def _save_safetensors(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def _save_data_parallel(sd, path):
    torch.save({f'module.{k}': v for k, v in sd.items()}, path)


def _save_compiled(sd, path):
    torch.save({'model': {f'_orig_mod.{k}': v for k, v in sd.items()}}, path)


def _save_wrapped_state_dict(sd, path):
    torch.save({'state_dict': sd, 'epoch': 3, 'arch': SMALL}, path)


@pytest.mark.parametrize('save, name, fmt, entry', [
    (_save_plain, 'plain.pth', 'pickle', None),
    (_save_legacy_serialization, 'legacy.pth', 'pickle', None),
    (_save_safetensors, 'weights.safetensors', 'safetensors', None),
    (_save_safetensors, 'safetensors-named.bin', 'safetensors', None),  # recognised by content, not by name
    (_save_data_parallel, 'dp.pth', 'pickle', None),
    (_save_compiled, 'compiled.pth', 'pickle', 'model'),
    (_save_wrapped_state_dict, 'wrapped.pth.tar', 'pickle', 'state_dict'),
])
def test_every_format_loads_the_same_weights(source, tmp_path, save, name, fmt, entry):
    path = tmp_path / name
    save(source.state_dict(), path)
    checkpoint = read_checkpoint(path)
    assert (checkpoint.format, checkpoint.entry) == (fmt, entry)
    model = model_from_checkpoint(checkpoint, SMALL)
    assert model.num_classes == 10 and not model.training
    assert_same_tensors(model.state_dict(), source.state_dict())


def test_timm_training_checkpoint_prefers_the_ema_weights(source, tmp_path):
    """A real checkpoint from timm's CheckpointSaver: args (argparse.Namespace), optimizer state, EMA weights."""
    from timm.utils import CheckpointSaver, ModelEmaV3
    model = trained(SMALL, seed=1, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()  # momentum buffers: a checkpoint with optimizer state, as training writes it
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.mul_(0.5)
    saver = CheckpointSaver(
        model, optimizer, args=argparse.Namespace(model=SMALL, lr=0.1), model_ema=ema,
        checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=50.0)
    path = tmp_path / 'last.pth.tar'

    checkpoint = read_checkpoint(path)
    assert checkpoint.entry == 'state_dict_ema'
    assert 'EMA weights' in checkpoint.describe()
    assert_same_tensors(model_from_checkpoint(checkpoint, SMALL).state_dict(), ema.module.state_dict())

    checkpoint = read_checkpoint(path, use_ema=False)
    assert checkpoint.entry == 'state_dict'
    assert_same_tensors(model_from_checkpoint(checkpoint, SMALL).state_dict(), model.state_dict())


@pytest.fixture(scope='module')
def torchvision_densenet121():
    """torchvision's own DenseNet-121 with random weights and statistics, and its outputs for a 64x64 batch."""
    import torchvision
    tv = trained(torchvision.models.densenet121())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        return tv.state_dict(), x, tv(x)


@pytest.mark.parametrize('legacy', [False, True], ids=['current-keys', 'legacy-keys'])
def test_torchvision_checkpoint_gives_torchvision_outputs(tmp_path, torchvision_densenet121, legacy):
    tv_state_dict, x, tv_out = torchvision_densenet121
    state_dict = legacy_tv_keys(tv_state_dict) if legacy else tv_state_dict
    assert ('features.denseblock1.denselayer1.norm.1.weight' in state_dict) == legacy
    path = tmp_path / 'densenet121-a639ec97.pth'
    torch.save(state_dict, path)

    checkpoint = read_checkpoint(path)
    assert checkpoint.legacy_keys == legacy
    assert ("torchvision's legacy key layout" in checkpoint.describe()) == legacy
    model = model_from_checkpoint(checkpoint, 'densenet121')
    assert model.num_classes == 1000
    expected = {k: v for k, v in tv_state_dict.items() if not (legacy and k.endswith('num_batches_tracked'))}
    assert_same_tensors({k: v for k, v in model.state_dict().items() if k in expected}, expected)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv_out, rtol=1e-4, atol=1e-5)


def test_checkpoint_filter_fn_maps_legacy_and_data_parallel_keys():
    value = torch.ones(3)
    out = checkpoint_filter_fn({
        'module.features.denseblock2.denselayer11.norm.2.running_var': value,
        'features.denseblock1.denselayer1.conv.1.weight': value,
        'features.conv0.weight': value,
    })
    assert list(out) == [
        'features.denseblock2.denselayer11.norm2.running_var',
        'features.denseblock1.denselayer1.conv1.weight',
        'features.conv0.weight',
    ]


def test_classes_and_channels_are_read_from_the_checkpoint(tmp_path):
    headless = trained(SMALL, num_classes=0)
    torch.save(headless.state_dict(), tmp_path / 'headless.pth')
    model = model_from_checkpoint(tmp_path / 'headless.pth', SMALL)
    assert model.num_classes == 0 and 'classifier.weight' not in model.state_dict()
    assert_same_tensors(model.state_dict(), headless.state_dict())

    gray = trained(SMALL, num_classes=3, in_chans=1)
    torch.save(gray.state_dict(), tmp_path / 'gray.pth')
    model = model_from_checkpoint(tmp_path / 'gray.pth', SMALL, num_classes=3)
    assert (model.in_chans, model.num_classes) == (1, 3)
    assert_same_tensors(model.state_dict(), gray.state_dict())


def test_a_checkpoint_never_runs_code(tmp_path):
    """A pickle whose loading would call os.mkdir is refused before anything runs."""
    marker = tmp_path / 'code-ran'

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    path = tmp_path / 'payload.pth'
    torch.save({'state_dict': trained(SMALL).state_dict(), 'extra': Payload()}, path)
    with pytest.raises(ValueError, match=r'payload\.pth: holds Python objects other than tensors \(posix\.mkdir\)'):
        read_checkpoint(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# bad input through the command line: exit code 2, one line naming the file and the problem, nothing written

def _write_bad_inputs(tmp: Path) -> None:
    good = trained(SMALL, num_classes=100)
    _save_safetensors(good.state_dict(), tmp / 'good.safetensors')
    data = (tmp / 'good.safetensors').read_bytes()
    (tmp / 'truncated.safetensors').write_bytes(data[:len(data) // 2])
    (tmp / 'corrupt.safetensors').write_bytes(b'\xff' * 8 + b'not a header' + data[20:4096])
    torch.save(good.state_dict(), tmp / 'good.pth')
    data = (tmp / 'good.pth').read_bytes()
    (tmp / 'truncated.pth').write_bytes(data[:len(data) // 2])
    (tmp / 'empty.pth').write_bytes(b'')
    torch.save(timm.create_model('resnet18').state_dict(), tmp / 'resnet18.pth')
    torch.save(good, tmp / 'whole-model.pth')
    torch.save({'epoch': 3, 'optimizer': {'lr': 0.1}}, tmp / 'no-weights.pth')
    broken = good.state_dict()
    broken['features.denseblock2.denselayer3.conv1.weight'][0, 0, 0, 0] = float('nan')
    torch.save(broken, tmp / 'nan.pth')
    (tmp / 'not-empty').mkdir()
    (tmp / 'not-empty' / 'notes.txt').write_text('keep me')
    (tmp / 'a-file').write_text('keep me')


BAD_INPUTS = [
    # (checkpoint, extra arguments, what the line says)
    ('truncated.safetensors', [],
     r'truncated\.safetensors: not a readable safetensors file \(.*\); it is truncated or corrupt'),
    ('corrupt.safetensors', [], r'corrupt\.safetensors: not a readable safetensors file'),
    ('truncated.pth', [], r'truncated\.pth: not a readable PyTorch checkpoint \(.*\); it is truncated or corrupt'),
    ('empty.pth', [], r'empty\.pth: not a readable PyTorch checkpoint \(it ends early\)'),
    ('resnet18.pth', [], r'resnet18\.pth: looks like another architecture, not densenet_bc_100_k12: .* unexpected '
                         r'\(conv1\.weight, .*Expected a densenet_bc_100_k12 checkpoint'),
    ('good.pth', ['--model', 'densenet121_cifar'], r'good\.pth: looks like densenet_bc_100_k12, not densenet121_cifar'
                                                    r': .* tensors missing .*; convert it with --model '
                                                    r'densenet_bc_100_k12\.'),
    ('whole-model.pth', [], r'whole-model\.pth: holds Python objects other than tensors \(timm\..*, \.\.\. \d+ in all\)'
                            r'.*'
                            r'weights_only=True.*torch\.save\(model\.state_dict\(\), PATH\)'),
    ('no-weights.pth', [], r"no-weights\.pth: holds no state dict \(its entries are 'epoch', 'optimizer'\)"),
    ('nan.pth', [], r'nan\.pth: 1 tensor holds NaN or infinite values \(features\.denseblock2\.denselayer3\.conv1'),
    ('good.pth', ['--num-classes', '10'], r'good\.pth: has a classifier of 100 classes, not the 10 given by '
                                          r'--num-classes 10; leave it out'),
    ('good.pth', ['--model', 'densenet_bc_1000'], r"unknown model 'densenet_bc_1000'; `timm-densenet-ext list`"),
    ('good.pth', ['--model', 'densenet121.nope'], r"unknown pretrained tag 'nope' for densenet121; its tags are: "),
    ('missing.pth', [], r'missing\.pth: no such file; check the checkpoint path\.'),
    ('good.pth', ['--out', 'not-empty'], r'not-empty: folder exists and is not empty; pass --force to replace it'),
    ('good.pth', ['--out', 'a-file', '--force'], r'a-file: exists and is not a folder; choose another --output DIR\.'),
    ('good.pth', ['--out', '.', '--force'], r'\.: holds folders \(not-empty\), so it is not a folder `convert` wrote'),
]


def _convert_argv(checkpoint: str, extra: List[str]) -> List[str]:
    """`convert CHECKPOINT --model densenet_bc_100_k12 --out out` with the options in `extra` replacing those."""
    options, flags, rest = {'--model': SMALL, '--out': 'out'}, [], iter(extra)
    for arg in rest:
        if arg == '--force':
            flags.append(arg)
        else:
            options[arg] = next(rest)
    return ['convert', checkpoint] + [a for item in options.items() for a in item] + flags


@pytest.fixture(scope='module')
def bad_inputs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp('bad-inputs')
    _write_bad_inputs(tmp)
    return tmp


@pytest.mark.parametrize('checkpoint, extra, message', BAD_INPUTS, ids=[
    f'{c}{"".join(e)}' for c, e, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_code_2(bad_inputs, monkeypatch, capsys, checkpoint, extra, message):
    monkeypatch.chdir(bad_inputs)
    before = {p: p.stat().st_mtime_ns for p in bad_inputs.rglob('*')}
    assert main(_convert_argv(checkpoint, extra)) == 2
    captured = capsys.readouterr()
    assert captured.out == ''
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith('timm-densenet-ext convert: error: ')
    assert re.search(message, lines[0]), lines[0]
    assert 'Traceback' not in captured.err
    after = {p: p.stat().st_mtime_ns for p in bad_inputs.rglob('*')}
    assert after == before  # nothing written, nothing touched


def test_read_checkpoint_raises_for_a_folder(tmp_path):
    with pytest.raises(ValueError, match='is a folder; give the checkpoint file'):
        read_checkpoint(tmp_path)


def test_checkpoint_dataclass_describes_safetensors(tmp_path, source):
    _save_safetensors(source.state_dict(), tmp_path / 'w.safetensors')
    checkpoint = read_checkpoint(tmp_path / 'w.safetensors')
    assert isinstance(checkpoint, Checkpoint)
    assert checkpoint.describe() == 'a safetensors file'
