"""`torchrun --nproc_per_node 2 -m timm_densenet_ext finetune`: two processes (gloo, CPU, 127.0.0.1) reach the weights
one process reaches with the same global batch, only rank 0 logs and writes, and a run interrupted on two processes
resumes on one to where an uninterrupted run ends."""
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Tuple

import pytest
import timm
import torch
from safetensors.torch import load_file

import timm_densenet_ext
from timm_densenet_ext import finetune as finetune_module
from timm_densenet_ext._distributed import GlobalBatchSampler, synced_batchnorm
from timm_densenet_ext.cli import main
from timm_densenet_ext.finetune import STATE_FILE
from workflow_helpers import TINY_ARCH, TINY_ARGS, tiny_hub_folder, write_image_folder

CLASSES = ['apple', 'banana', 'cherry']
# 24 training images in global batches of 4: 6 steps an epoch, 12 in all. AdamW divides each gradient by its running
# size, so a gradient that is rounding noise (a BatchNorm bias before ReLU, a convolution and another BatchNorm, whose
# batch statistics cancel it) moves its weight by about the learning rate either way: at 1e-3 one process and two
# differ by up to 1.6e-5 there after 12 steps, at 3e-4 by 6e-7.
RECIPE = ['--epochs', '2', '--batch-size', '4', '--lr', '3e-4', '--scale', '0.7', '1']
TIMEOUT_S = 240  # a hang fails the test (torchrun and its two processes start in about 10 s)
TOLERANCE = 1e-5

# Started in place of `-m timm_densenet_ext`: Ctrl-C while rank 0 validates epoch 2, after epoch 1's state is saved
INTERRUPTING = '''
import sys
from timm_densenet_ext import finetune
from timm_densenet_ext.cli import main
calls = []

def interrupted(*args, _evaluate=finetune.evaluate, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise KeyboardInterrupt
    return _evaluate(*args, **kwargs)

finetune.evaluate = interrupted
sys.exit(main(sys.argv[1:]))
'''


def _interrupting(evaluate: Callable) -> Callable:
    """`evaluate` that raises KeyboardInterrupt (Ctrl-C) on its second call, as INTERRUPTING's does."""
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)
    return interrupted


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(program: List[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N` on this machine only, each call its own port; one thread a process, offline."""
    launcher = Path(sys.executable).parent / 'torchrun'
    command = [str(launcher)] if launcher.is_file() else [sys.executable, '-m', 'torch.distributed.run']
    package_root = str(Path(timm_densenet_ext.__file__).parents[1])
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1',
               PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get('PYTHONPATH')) if p))
    return subprocess.run(
        [*command, '--nproc_per_node', str(nproc), '--master_addr', '127.0.0.1', '--master_port', str(_free_port()),
         *program], capture_output=True, text=True, env=env, timeout=TIMEOUT_S)


def _main(argv: List[str]) -> SimpleNamespace:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    return SimpleNamespace(code=code, stdout=stdout.getvalue())


def _epochs(stdout: str) -> List[Tuple[str, float, str]]:
    """Each epoch line's epoch, training loss and validation accuracy with its count."""
    lines = [line.split() for line in stdout.splitlines() if line.startswith('epoch ')]
    return [(words[1], float(words[4]), ' '.join(words[7:9])) for words in lines]


def _assert_close(first: Dict[str, torch.Tensor], second: Dict[str, torch.Tensor]) -> float:
    """Every tensor of the two within TOLERANCE; the largest difference."""
    assert sorted(first) == sorted(second)
    largest = 0.0
    for key in first:
        difference = (first[key].double() - second[key].double()).abs().max().item()
        assert difference <= TOLERANCE, (key, difference)
        largest = max(largest, difference)
    return largest


def _weights(folder: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(folder / 'model.safetensors'))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('torchrun')
    data = write_image_folder(root / 'fruit', CLASSES, train=8, val=4)
    base = tiny_hub_folder(root / 'base', ['x', 'y'])
    argv = ['finetune', '--model', f'local-dir:{base}', '--data-dir', str(data), *RECIPE]
    single = _main([*argv, '--output', str(root / 'one')])
    assert single.code == 0, single.stdout
    two = torchrun(['-m', 'timm_densenet_ext', *argv, '--sync-bn', '--output', str(root / 'two')])
    assert two.returncode == 0, two.stderr[-3000:]
    return SimpleNamespace(root=root, argv=argv, single=single, two=two)


def test_two_processes_reach_one_process_s_weights(runs):
    single, two = _epochs(runs.single.stdout), _epochs(runs.two.stdout)
    assert [e[0] for e in single] == [e[0] for e in two] == ['1/2', '2/2']  # only rank 0 logs
    assert 'batch size 4 (2 on each of 2 processes)' in runs.two.stdout
    assert runs.two.stdout.count('wrote ') == 1 and 'error' not in runs.two.stderr
    for (_, one_loss, one_accuracy), (_, two_loss, two_accuracy) in zip(single, two):
        assert one_loss == pytest.approx(two_loss, abs=2e-4) and one_accuracy == two_accuracy
    best = [line for line in runs.single.stdout.splitlines() if line.startswith('wrote ')]
    assert best == [line.replace('/two', '/one') for line in runs.two.stdout.splitlines() if line.startswith('wrote ')]

    largest = _assert_close(_weights(runs.root / 'one'), _weights(runs.root / 'two'))
    print(f'2 processes vs 1, the best epoch\'s weights: largest difference {largest:.2g}')
    moved = (_weights(runs.root / 'two')['features.conv0.weight'] -
             _weights(runs.root / 'base')['features.conv0.weight']).abs().max().item()
    assert moved > 50 * TOLERANCE  # the steps moved the weights far more than the processes differ
    assert sorted(p.name for p in (runs.root / 'two').iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert sorted(p.name for p in runs.root.iterdir()) == ['base', 'fruit', 'one', 'two']  # no lock, no temporary


def test_a_run_interrupted_on_two_processes_resumes_on_one(runs, monkeypatch):
    script = runs.root / 'interrupting.py'
    script.write_text(INTERRUPTING)
    out = runs.root / 'resumed'
    interrupted = torchrun([str(script), *runs.argv, '--sync-bn', '--output', str(out)])
    assert interrupted.returncode != 0
    assert interrupted.stderr.count(f'interrupted: {out / STATE_FILE} holds the last finished epoch') == 1
    assert [p.name for p in out.iterdir()] == [STATE_FILE]
    state = torch.load(out / STATE_FILE, weights_only=True)
    assert state['epoch'] == 1 and len(state['history']) == 1

    # the state file is what one process saves after the same epoch: the last weights and AdamW's moments
    one_out = runs.root / 'one-interrupted'
    with monkeypatch.context() as patch:
        patch.setattr(finetune_module, 'evaluate', _interrupting(finetune_module.evaluate))
        assert _main([*runs.argv, '--output', str(one_out)]).code == 130
    one_state = torch.load(one_out / STATE_FILE, weights_only=True)
    largest = _assert_close(one_state['model'], state['model'])
    moments = {f'{i}.{k}': v for i, s in state['optimizer']['state'].items() for k, v in s.items()}
    assert _assert_close({f'{i}.{k}': v for i, s in one_state['optimizer']['state'].items() for k, v in s.items()},
                         moments) <= TOLERANCE and len(moments) > 10
    print(f'2 processes vs 1 after epoch 1 (6 steps), the last weights: largest difference {largest:.2g}')

    resumed = _main(['finetune', '--resume', '--output', str(out)])  # one process, no torchrun
    assert resumed.code == 0
    assert f'resuming {out} after epoch 1 of 2' in resumed.stdout
    (epoch, loss, accuracy), = _epochs(resumed.stdout)
    straight = _epochs(runs.single.stdout)[1]
    assert (epoch, accuracy) == (straight[0], straight[2]) and loss == pytest.approx(straight[1], abs=2e-4)
    largest = _assert_close(_weights(runs.root / 'one'), _weights(out))
    print(f'2 processes for epoch 1, resumed on 1 for epoch 2, vs 1 throughout: largest weight difference '
          f'{largest:.2g}')


def test_a_batch_that_does_not_split_is_one_line_and_nothing_is_written(runs):
    out = runs.root / 'odd'
    result = torchrun(['-m', 'timm_densenet_ext', *runs.argv, '--batch-size', '5', '--output', str(out)])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if 'timm-densenet-ext finetune: error' in line]
    assert errors == ['timm-densenet-ext finetune: error: --batch-size 5: the global batch does not split evenly '
                      'between 2 processes; give a multiple of the number of processes (torchrun --nproc_per_node x '
                      '--nnodes).']  # said once, by rank 0
    assert not out.exists()


@pytest.mark.parametrize('size, batch_size, drop_last', [(24, 4, True), (23, 6, True), (5, 8, False)])
def test_processes_share_out_exactly_one_process_s_batches(size, batch_size, drop_last):
    for epoch in (1, 2):
        one = GlobalBatchSampler(size, batch_size, seed=3, drop_last=drop_last)
        one.set_epoch(epoch)
        parts = []
        for rank in range(2):
            sampler = GlobalBatchSampler(size, batch_size, rank, 2, seed=3, drop_last=drop_last)
            sampler.set_epoch(epoch)
            parts.append(list(sampler))
        expected = list(one)
        assert len(expected) == len(one) == (size // batch_size if drop_last else 1)
        assert [a + b for a, b in zip(*parts)] == expected
        assert all(abs(len(a) - len(b)) <= 1 for a, b in zip(*parts))
    # the order one process took before: a shuffling DataLoader's under a progress bar, seeded with seed + epoch
    from tqdm.auto import tqdm
    shuffled = torch.utils.data.DataLoader(range(size), shuffle=True, generator=torch.Generator().manual_seed(3 + 2))
    assert sum(expected, []) == [int(i) for i in tqdm(shuffled, disable=True)][:len(expected) * batch_size]


def test_sync_batchnorm_keeps_timm_s_activation_and_puts_the_layers_back():
    model = timm.create_model(TINY_ARCH, num_classes=3, **TINY_ARGS).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        before = dict(model.named_modules())
        with synced_batchnorm(model):
            norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            assert norms and all(type(m).__name__ == 'CpuSyncBatchNormAct' for m in norms)
            assert torch.allclose(model(x), expected, atol=1e-5)  # the activation still applied
            assert model.features.norm5.weight is before['features.norm5'].weight  # shared, not copied
        assert all(module is before[name] for name, module in model.named_modules())
        torch_converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(
            timm.create_model(TINY_ARCH, num_classes=3, **TINY_ARGS)).eval()
        torch_converted.load_state_dict(model.state_dict())
        assert not torch.allclose(torch_converted(x), expected, atol=1e-3)  # why timm's conversion, not torch's


def test_a_multi_label_grey_run_on_two_processes_reaches_one_process_s(tmp_path):
    """Multi-label (a sigmoid per label, thresholds picked by rank 0) with 1-channel input: the same across process
    counts as a single-label run; the thresholds written are the same too."""
    from timm_densenet_ext.multilabel import write_shapes_multilabel
    data = tmp_path / 'shapes'
    write_shapes_multilabel(data, 24, 8, size=16, seed=0)
    base = tiny_hub_folder(tmp_path / 'base', ['x', 'y'])
    argv = ['finetune', '--model', f'local-dir:{base}', '--data-dir', str(data), '--multi-label', '--in-chans', '1',
            '--color-jitter', '0', *RECIPE]
    single = _main([*argv, '--output', str(tmp_path / 'one')])
    assert single.code == 0, single.stdout
    two = torchrun(['-m', 'timm_densenet_ext', *argv, '--sync-bn', '--output', str(tmp_path / 'two')])
    assert two.returncode == 0, two.stderr[-3000:]
    assert 'mean validation AUROC' in two.stdout and two.stdout.count('wrote ') == 1
    largest = _assert_close(_weights(tmp_path / 'one'), _weights(tmp_path / 'two'))
    print(f'multi-label, 2 processes vs 1: largest difference {largest:.2g}')
    configs = [json.loads((tmp_path / name / 'config.json').read_text()) for name in ('one', 'two')]
    assert configs[0]['problem_type'] == configs[1]['problem_type'] == 'multi_label_classification'
    assert configs[0]['label_thresholds'] == pytest.approx(configs[1]['label_thresholds'], abs=1e-4)
    assert configs[1]['pretrained_cfg']['input_size'][0] == 1  # grey input, on every process
