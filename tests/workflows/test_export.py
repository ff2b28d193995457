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


# ---- reduced precision (issue 13): checked against fp32 on real images, the demo's fine-tuned digits model

@pytest.fixture(scope='module')
def digits(digits_demo):
    """The demo's model (fp32), its val/ images preprocessed as timm does, their labels, and the model's logits."""
    from torchvision.datasets import ImageFolder
    model = timm.create_model(f'local-dir:{digits_demo.model_dir}', pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    val = ImageFolder(str(digits_demo.data_dir / 'val'), transform=lambda image: transform(image.convert('RGB')))
    images = torch.stack([image for image, _ in val])
    with torch.no_grad():
        logits = model(images)
    return digits_demo, images, torch.tensor(val.targets), logits


def _export_digits(digits, out, *options):
    demo = digits[0]
    return main(['export', '-m', f'local-dir:{demo.model_dir}', '--output', str(out), *options])


def _assert_accurate(digits, logits):
    """Top-1 agreement with fp32 >= 99% and accuracy drop against the labels <= 0.3 points (issue 13)."""
    _, images, labels, fp32 = digits
    assert logits.shape == fp32.shape and logits.dtype == torch.float32
    agreement = (logits.argmax(1) == fp32.argmax(1)).float().mean().item()
    drop = 100 * ((fp32.argmax(1) == labels).float().mean() - (logits.argmax(1) == labels).float().mean()).item()
    assert agreement >= 0.99 and drop <= 0.3, (agreement, drop)
    return agreement


def _assert_check_line(printed, digits, agreement):
    demo, images = digits[0], digits[1]
    lines = printed.splitlines()
    assert len(lines) == 2 and 'dynamic batch axis' in lines[0], printed
    assert lines[1].startswith(f'checked on {len(images)} images of {demo.data_dir / "val"}: top-1 agrees with fp32 '
                               f'on {100 * agreement:.2f}%, largest logit difference '), printed


def test_int8_onnx_is_quantized_has_a_dynamic_batch_and_agrees_with_fp32(digits, tmp_path, capsys):
    out = tmp_path / 'digits.onnx'
    assert _export_digits(digits, out, '--format', 'onnx', '--precision', 'int8', '--data-dir',
                          str(digits[0].data_dir)) == 0
    assert [p.name for p in tmp_path.iterdir()] == ['digits.onnx']
    graph = onnx.load(str(out)).graph
    assert {'QuantizeLinear', 'DequantizeLinear'} <= {node.op_type for node in graph.node}
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param and \
        graph.output[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch, in and out

    session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    images = digits[1]
    for batch in (1, 5):
        assert session.run(None, {'input': images[:batch].numpy()})[0].shape == (batch, 10)
    logits = torch.from_numpy(session.run(None, {'input': images.numpy()})[0])
    _assert_check_line(capsys.readouterr().out, digits, _assert_accurate(digits, logits))


def test_bf16_exported_program_is_bfloat16_inside_and_agrees_with_fp32(digits, tmp_path, capsys):
    out = tmp_path / 'digits.pt2'
    assert _export_digits(digits, out, '--format', 'exported-program', '--precision', 'bf16', '--data-dir',
                          str(digits[0].data_dir)) == 0
    assert [p.name for p in tmp_path.iterdir()] == ['digits.pt2']
    program = torch.export.load(str(out))
    assert {t.dtype for t in program.state_dict.values()} == {torch.bfloat16}
    module = program.module()
    images = digits[1]
    with torch.no_grad():
        for batch in (1, 5):
            assert module(images[:batch]).shape == (batch, 10)
        logits = module(images)
    _assert_check_line(capsys.readouterr().out, digits, _assert_accurate(digits, logits))


@pytest.mark.filterwarnings('ignore:`torch.jit.load` is deprecated')
def test_fp32_with_data_dir_also_checks_real_images_and_a_failed_check_keeps_nothing(digits, tmp_path, capsys,
                                                                                    monkeypatch):
    out = tmp_path / 'digits.pt'
    assert _export_digits(digits, out, '--format', 'torchscript', '--data-dir', str(digits[0].data_dir)) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f'wrote {out} (torchscript, ') and 'it matches PyTorch to ' in printed
    _assert_check_line(printed, digits, 1.0)

    monkeypatch.setattr(export, 'MIN_TOP1_AGREEMENT', 1.01)  # no file can pass
    with pytest.raises(RuntimeError, match='agrees with the fp32 model .*; nothing was written'):
        export_model(f'local-dir:{digits[0].model_dir}', 'torchscript', tmp_path / 'again.pt',
                     data_dir=digits[0].data_dir)
    assert [p.name for p in tmp_path.iterdir()] == ['digits.pt']


@pytest.mark.parametrize('argv, message', [
    (['--format', 'onnx', '--precision', 'int8', '--out', 'm.onnx'],
     '--precision int8 is checked against fp32 on real images: give --data-dir DIR'),
    (['--format', 'torchscript', '--precision', 'int8', '--data-dir', 'DATA', '--out', 'm.pt'],
     '--precision int8 is written as ONNX (run by ONNX Runtime); give --format onnx.'),
    (['--format', 'onnx', '--precision', 'bf16', '--data-dir', 'DATA', '--out', 'm.onnx'],
     'give --format exported-program (or torchscript), or --precision int8 for ONNX.'),
    (['--format', 'exported-program', '--precision', 'bf16', '--out', 'm.pt2'], 'give --data-dir DIR'),
    (['--format', 'onnx', '--precision', 'int8', '--data-dir', 'nowhere', '--out', 'm.onnx'],
     'nowhere: no such folder; give --data-dir DIR'),
])
def test_reduced_precision_bad_input_is_one_line_and_exit_code_2(argv, message, tiny, tmp_path, monkeypatch, capsys):
    data = tmp_path.parent / f'{tmp_path.name}-data'  # a valid image folder, outside the folder that must stay empty
    for split in ('train', 'val'):
        for label in ('a', 'b'):
            (data / split / label).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    argv = [a.replace('DATA', str(data)) for a in argv]
    assert main(['export', '-m', f'local-dir:{tiny[0]}', *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_precision_options_and_their_help(capsys):
    from timm_densenet_ext import deploy
    from timm_densenet_ext._naming import OPTIONS
    assert OPTIONS['precision'][1]['choices'] == deploy.PRECISIONS == export.PRECISIONS
    with pytest.raises(SystemExit):
        main(['export', '--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert '--precision {fp32,bf16,int8}' in text and '--data-dir DIR, --data DIR' in text
    assert 'int8: ONNX Runtime static quantization' in text and "agrees with fp32's on 99% or more" in text
