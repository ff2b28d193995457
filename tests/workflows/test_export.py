"""`timm-densenet-ext export`: ONNX with a dynamic batch axis that onnxruntime runs to PyTorch's outputs within
1e-4, TorchScript and torch.export files that load back and match, and outputs never overwritten by accident."""
import onnx
import onnxruntime
import pytest
import timm
import torch

import timm_densenet_ext  # noqa: F401  (registers the variants)
from timm_densenet_ext import export
from timm_densenet_ext.cli import main
from timm_densenet_ext.export import export_model, load_exported
from workflow_helpers import tiny_hub_folder

LABELS = ['a', 'b', 'c', 'd', 'e']


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    folder = tiny_hub_folder(tmp_path_factory.mktemp('export') / 'tiny', LABELS)
    return folder, timm.create_model(f'local-dir:{folder}', pretrained=True).eval()


def test_onnx_has_a_dynamic_batch_and_matches_pytorch_in_onnxruntime(tiny, tmp_path, capsys):
    folder, model = tiny
    out = tmp_path / 'tiny.onnx'
    assert main(['export', f'local-dir:{folder}', '--format', 'onnx', '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f'wrote {out} (onnx, ') and 'dynamic batch axis' in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ['tiny.onnx']  # one file: no external data, no temporary

    graph = onnx.load(str(out)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims][1:] == [3, 16, 16] and dims[0].dim_param  # symbolic batch
    session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    for batch in (1, 2, 5):
        x = torch.randn(batch, 3, 16, 16)
        (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            expected = model(x)
        assert logits.shape == (batch, len(LABELS))
        assert (torch.from_numpy(logits) - expected).abs().max().item() <= 1e-4


@pytest.mark.filterwarnings('ignore:`torch.jit.load` is deprecated')
@pytest.mark.parametrize('fmt, name', [('torchscript', 'tiny.pt'), ('exported-program', 'tiny.pt2')])
def test_torchscript_and_exported_program_load_back_and_match(fmt, name, tiny, tmp_path):
    folder, model = tiny
    result = export_model(f'local-dir:{folder}', fmt, tmp_path / name)
    assert result.path == tmp_path / name and result.max_abs_diff <= export.TOLERANCE
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    loaded = torch.jit.load(str(tmp_path / name)) if fmt == 'torchscript' else torch.export.load(
        str(tmp_path / name)).module()
    for batch in (1, 4):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            assert torch.allclose(loaded(x), model(x), atol=1e-5, rtol=0)
    if fmt == 'torchscript':  # scripted, not traced: the input check stays in the graph
        with pytest.raises(Exception, match='at least 4x4 pixels'):
            loaded(torch.randn(1, 3, 2, 2))


def test_an_existing_output_is_replaced_only_with_force(tiny, tmp_path, capsys):
    folder, model = tiny
    out = tmp_path / 'tiny.pt'
    out.write_bytes(b'keep me')
    argv = ['export', f'local-dir:{folder}', '--format', 'torchscript', '--out', str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f'timm-densenet-ext export: error: {out}: exists; pass --force to replace it, or '
                                f'choose another --output FILE.']
    assert out.read_bytes() == b'keep me'

    assert main(argv + ['--force']) == 0
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(load_exported(out, 'torchscript')(x), model(x), atol=1e-5, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ['tiny.pt']


def test_a_failed_check_keeps_nothing(tiny, tmp_path, monkeypatch):
    folder, _ = tiny
    monkeypatch.setattr(export, 'TOLERANCE', -1.0)  # no file can pass
    with pytest.raises(RuntimeError, match='differs from PyTorch'):
        export_model(f'local-dir:{folder}', 'torchscript', tmp_path / 'x.pt')
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('argv, message', [
    (['densenet121', '--format', 'onnx', '--out', 'm.onnx'], 'densenet121: no weights given'),
    (['local-dir:TINY', '--format', 'exported-program', '--out', 'm.pt'], 'give --output m.pt2'),
    (['local-dir:TINY', '--format', 'onnx', '--out', 'sub/m.onnx'], 'sub: no such folder'),
    (['local-dir:TINY', '--format', 'onnx', '--out', '.'], '.: is a folder'),
    (['local-dir:TINY', '--weights', 'bc.pth', '--format', 'onnx', '--out', 'm.onnx'], 'loads its own weights'),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace('TINY', str(tiny[0])) for a in argv]
    assert main(['export', *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []
