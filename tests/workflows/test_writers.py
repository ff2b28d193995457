"""Two writers, one output: whatever writes an output refuses, in one line and exit code 2, a path another process
is writing, and never reports success for work that is not there."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from timm_densenet_ext.cli import main
from workflow_helpers import TINY_ARCH, tiny_hub_folder, write_image_folder

HOLD = ('import sys, time\n'
        'from timm_densenet_ext._files import claim\n'
        'with claim(sys.argv[1]):\n'
        '    print("held", flush=True)\n'
        '    sys.stdin.read()\n')


class _Holder:
    """Another process holding the claim on `path` until the test ends."""

    def __init__(self, path: Path):
        self.proc = subprocess.Popen([sys.executable, '-c', HOLD, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == 'held'

    def release(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _checkpoint(path: Path, seed: int, num_classes: int = 3) -> Path:
    torch.manual_seed(seed)
    torch.save(timm.create_model(TINY_ARCH, num_classes=num_classes).state_dict(), path)  # convert reads the variant
    return path


def _writers(tmp_path: Path):
    """(the output, the command line that writes it) for each writer."""
    ckpt = _checkpoint(tmp_path / 'a.pth', 0)
    folder = tiny_hub_folder(tmp_path / 'tiny', ['x', 'y'])
    data = write_image_folder(tmp_path / 'data', ['x', 'y'], train=2, val=1)
    return {
        'convert': (tmp_path / 'converted', ['convert', '--checkpoint', str(ckpt), '-m', TINY_ARCH]),
        'export': (tmp_path / 'tiny.onnx', ['export', '-m', f'local-dir:{folder}', '--format', 'onnx']),
        'card': (tmp_path / 'card.md', ['card', '-m', 'densenet121.tv_in1k']),
        'finetune': (tmp_path / 'tuned', ['finetune', '-m', f'local-dir:{folder}', '--data-dir', str(data),
                                          '--epochs', '1', '-b', '2']),
        'demo': (tmp_path / 'demo', ['demo', '--epochs', '1']),
        'benchmark': (tmp_path / 'bench' / 'benchmark.json', ['benchmark', '-b', '1', '--img-size', '32',
                                                              '--repeats', '1', '--no-compile', '--no-train',
                                                              '--no-memory']),
    }


@pytest.mark.parametrize('writer', ['convert', 'export', 'card', 'finetune', 'demo', 'benchmark'])
def test_a_path_another_process_is_writing_is_refused(writer, tmp_path, capsys):
    output, argv = _writers(tmp_path)[writer]
    output.parent.mkdir(exist_ok=True)
    holder = _Holder(output)
    try:
        target = output.parent if writer == 'benchmark' else output
        assert main([*argv, '--output', str(target)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and str(output) in err[0] and f'another process (pid {holder.proc.pid})' in err[0], err
        assert not output.exists()
    finally:
        holder.release()
    assert not list(output.parent.glob(f'.{output.name}.lock'))  # the holder's claim ends with it


def test_a_claim_left_by_an_ended_process_is_taken_over(tmp_path):
    from timm_densenet_ext._files import claim
    out = tmp_path / 'out.bin'
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    (tmp_path / '.out.bin.lock').write_text(dead.stdout.strip())
    with claim(out):
        out.write_bytes(b'mine')
    assert out.read_bytes() == b'mine' and not (tmp_path / '.out.bin.lock').exists()


def test_two_converts_racing_for_one_folder(tmp_path):
    """Started together: exactly one reports success, and the folder holds that one's checkpoint."""
    first, second = _checkpoint(tmp_path / 'first.pth', 1), _checkpoint(tmp_path / 'second.pth', 2)
    out = tmp_path / 'converted'
    procs = [subprocess.Popen([sys.executable, '-m', 'timm_densenet_ext.cli', 'convert', '--checkpoint', str(ckpt),
                               '-m', TINY_ARCH, '--output', str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for ckpt in (first, second)]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = [code for code, _, _ in results]
    assert sorted(codes) == [0, 2], results
    winner, (_, _, loser_err) = results[codes.index(0)], results[codes.index(2)]
    assert f'wrote {out}' in winner[1]
    assert str(out) in loser_err and 'Traceback' not in loser_err
    written = load_file(str(out / 'model.safetensors'))
    expected = torch.load([first, second][codes.index(0)], weights_only=True)
    assert all(torch.equal(written[k], v) for k, v in expected.items() if k in written)
    assert torch.equal(written['classifier.weight'], expected['classifier.weight'])


def test_writing_moves_a_finished_file_into_place_with_new_file_permissions(tmp_path):
    from timm_densenet_ext._files import default_mode, writing
    out = tmp_path / 'model.pt2'
    with writing(out, exists_message='taken') as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith('.model.') and tmp.suffix == '.pt2'
        tmp.write_bytes(b'first')
        tmp.chmod(0o600)  # as mkstemp, safetensors and torch.save may leave it
    assert out.read_bytes() == b'first' and out.stat().st_mode & 0o777 == default_mode()
    with pytest.raises(FileExistsError, match='^taken$'):
        with writing(out, exists_message='taken') as tmp:
            tmp.write_bytes(b'second')
    assert out.read_bytes() == b'first'
    with writing(out, force=True) as tmp:
        tmp.write_bytes(b'second')
    assert out.read_bytes() == b'second'
    with pytest.raises(RuntimeError):
        with writing(out, force=True) as tmp:
            tmp.write_bytes(b'half')
            raise RuntimeError('failed half way')
    assert out.read_bytes() == b'second' and [p.name for p in tmp_path.iterdir()] == ['model.pt2']


def test_writing_folder_replaces_a_folder_only_once_the_new_one_is_complete(tmp_path):
    from timm_densenet_ext._files import default_mode, writing_folder
    out = tmp_path / 'hub'
    with writing_folder(out) as staging:
        (staging / 'a.txt').write_text('one')
        (staging / 'a.txt').chmod(0o600)
    assert (out / 'a.txt').read_text() == 'one' and (out / 'a.txt').stat().st_mode & 0o777 == default_mode()
    with pytest.raises(OSError):
        with writing_folder(out) as staging:
            (staging / 'b.txt').write_text('two')
            raise OSError(28, 'No space left on device')
    assert [p.name for p in tmp_path.iterdir()] == ['hub'] and [p.name for p in out.iterdir()] == ['a.txt']
    with writing_folder(out) as staging:
        (staging / 'b.txt').write_text('two')
    assert [p.name for p in tmp_path.iterdir()] == ['hub'] and [p.name for p in out.iterdir()] == ['b.txt']
