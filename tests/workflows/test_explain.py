"""Class activation maps (`explain`, `predict --cam`): pytorch-grad-cam at the right layer of every form of our
DenseNet, the model's own preprocessing, PNG overlays written safely, and maps that point at the evidence."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import timm_densenet_ext  # noqa: F401  (registers the variants)
from model_helpers import trained
from timm_densenet_ext.cli import main
from timm_densenet_ext.explain import explain, target_layer
from timm_densenet_ext.models.fused import fuse_for_inference
from timm_densenet_ext.predict import predict
from workflow_helpers import tiny_hub_folder, write_image

pytest.importorskip('pytorch_grad_cam')
from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

LABELS = ['cat', 'dog', 'fish']
SMALL = dict(block_config=(1, 2, 2, 1), num_classes=3)
CAM_LOCALIZATION = Path(__file__).resolve().parents[2] / 'benchmarks' / 'cam_localization.py'


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return tiny_hub_folder(tmp_path_factory.mktemp('explain') / 'tiny', LABELS)


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize('kwargs', [dict(), dict(output_stride=8), dict(output_stride=16), dict(stem_type='cifar'),
                                    dict(stem_type='deep', aa_layer='blur')])
def test_target_layer_of_a_densenet_is_its_final_norm(kwargs):
    model = timm.create_model('densenet121', **SMALL, **kwargs)
    assert target_layer(model) is model.features.norm5


@pytest.mark.parametrize('feature_cls, taps, module', [
    ('list', 'raw', 'features_denseblock3'), ('hook', 'raw', 'features_denseblock3'),
    ('hook', 'norm', 'features_transition3.norm'), ('getter', 'raw', 'model.features.denseblock3'),
    ('getter', 'norm', 'model.features.transition3.norm'),
    ('fx', 'norm', 'graph_module.features.transition3.norm'),
])
def test_target_layer_of_features_only_is_its_deepest_tap(feature_cls, taps, module):
    model = timm.create_model('densenet121', block_config=(1, 2, 2, 1), features_only=True, out_indices=(1, 3),
                              feature_cls=feature_cls, feature_taps=taps)
    assert target_layer(model) is model.get_submodule(module)
    heatmap = explain(model, torch.randn(3, 32, 32), method='eigencam')  # features only: no class to explain
    assert heatmap.shape == (32, 32) and heatmap.max() == pytest.approx(1, abs=1e-4)
    with pytest.raises(ValueError, match="returns no class scores .* use method='eigencam'"):
        explain(model, torch.randn(3, 32, 32))


def test_target_layer_of_pruned_fused_and_unknown_models():
    model = trained('densenet121', **SMALL)
    fused = fuse_for_inference(model)
    assert target_layer(fused) is fused.stages[-1]
    model.prune_intermediate_layers([2])  # down to the second block; the third transition's norm stays
    assert target_layer(model) is model.features.transition2.norm
    model = trained('densenet121', **SMALL)
    model.prune_intermediate_layers([2], prune_norm=True)
    assert target_layer(model) is model.features.denseblock2
    with pytest.raises(ValueError, match=r"^FeatureGraphNet: torch.fx traced through features.denseblock3"):
        target_layer(timm.create_model('densenet121', block_config=(1, 2, 2, 1), features_only=True,
                                       out_indices=(1, 3), feature_cls='fx'))
    with pytest.raises(ValueError, match=r'^Linear: no layer for a class activation map is known'):
        target_layer(torch.nn.Linear(2, 2))


def test_explain_is_grad_cam_at_the_final_norm_and_leaves_the_model_as_found(tmp_path):
    model = trained('densenet121', **SMALL)
    model.train()
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    model.features.conv0.weight.requires_grad_(False)
    image = write_image(tmp_path / 'x.png', size=(80, 60))

    heatmap = explain(model, image, target=2)
    x = timm.data.create_transform(**timm.data.resolve_data_config(model=model))(Image.open(image).convert('RGB'))
    assert heatmap.shape == tuple(x.shape[1:]) == (224, 224) and heatmap.dtype == np.float32
    assert 0 <= heatmap.min() and heatmap.max() <= 1
    # the model as it was: training mode, requires_grad flags, gradients
    assert model.training and not model.features.conv0.weight.requires_grad
    assert torch.equal(model.classifier.weight.grad, torch.ones_like(model.classifier.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith('classifier.weight'))

    # pytorch-grad-cam's own GradCAM at features.norm5, on the preprocessed tensor, gives the same map
    model.eval()
    expected = GradCAM(model, [model.features.norm5])(x.unsqueeze(0), [ClassifierOutputTarget(2)])[0]
    np.testing.assert_allclose(heatmap, expected, atol=1e-5)
    np.testing.assert_allclose(explain(model, x, 2), expected, atol=1e-5)  # a tensor is taken as preprocessed


def test_targets_by_name_index_or_top_class(tiny, tmp_path):
    model = timm.create_model(f'local-dir:{tiny}', pretrained=True).eval()
    image = write_image(tmp_path / 'x.png')
    with torch.no_grad():
        top = int(model(timm.data.create_transform(**timm.data.resolve_data_config(model=model))(
            Image.open(image).convert('RGB')).unsqueeze(0)).argmax())
    np.testing.assert_array_equal(explain(model, image, 'dog'), explain(model, image, 1))
    np.testing.assert_array_equal(explain(model, image), explain(model, image, top))
    np.testing.assert_array_equal(explain(model, Image.open(image)), explain(model, image, top))
    with pytest.raises(ValueError, match=r"^'zebra': not a class of the model; its classes are 'cat', 'dog', 'fish'"):
        explain(model, image, 'zebra')
    with pytest.raises(ValueError, match=r'^class index 3: the model has classes 0 to 2'):
        explain(model, image, 3)
    with pytest.raises(ValueError, match=r"^method='scorecam': unknown; give one of gradcam, gradcam\+\+"):
        explain(model, image, method='scorecam')
    for method in ('gradcam++', 'hirescam', 'xgradcam', 'layercam', 'eigencam'):
        assert explain(model, image, method=method).shape == (16, 16)


def test_overlay_is_the_seen_image_with_its_map_and_is_not_overwritten(tiny, tmp_path):
    model = timm.create_model(f'local-dir:{tiny}', pretrained=True).eval()
    image = write_image(tmp_path / 'x.png', size=(40, 30))
    out = tmp_path / 'maps' / 'x.png'
    explain(model, image, 'cat', overlay=out)
    picture = Image.open(out)
    assert picture.format == 'PNG' and picture.size == (16, 16) and picture.mode == 'RGB'  # the 16 px the model saw
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match='x.png: exists; pass force=True to replace it'):
        explain(model, image, 'fish', overlay=out)
    assert out.read_bytes() == before and [p.name for p in out.parent.iterdir()] == ['x.png']
    explain(model, image, 'fish', overlay=out, force=True)
    assert out.read_bytes() != before


def test_predict_cam_writes_each_images_overlay_and_keeps_the_predictions(tiny, tmp_path, capsys):
    images = [str(write_image(tmp_path / f'{name}.png', seed=i)) for i, name in enumerate(('a', 'b'))]
    code, plain, _ = run_cli(['predict', '-m', f'local-dir:{tiny}', *images], capsys)
    cams = tmp_path / 'cams'
    code, out, err = run_cli(['predict', '-m', f'local-dir:{tiny}', *images, '--cam', str(cams)], capsys)
    assert code == 0 and err == ''
    assert out.startswith(plain)  # the predictions as they were, then where the maps went
    model = timm.create_model(f'local-dir:{tiny}', pretrained=True).eval()
    tops = [r.top[0][1] for r in predict(f'local-dir:{tiny}', images)]
    assert out[len(plain):].splitlines() == [
        f"wrote {cams / 'a.png'}: Grad-CAM of {tops[0]!r} on {images[0]}",
        f"wrote {cams / 'b.png'}: Grad-CAM of {tops[1]!r} on {images[1]}"]
    maps = sorted(p.name for p in cams.iterdir())
    assert maps == ['a.png', 'b.png'] and Image.open(cams / 'a.png').size == (16, 16)

    # the top class's overlay, as explain writes it
    explain(model, images[0], tops[0], overlay=tmp_path / 'expected' / 'a.png')
    assert (tmp_path / 'expected' / 'a.png').read_bytes() == (cams / 'a.png').read_bytes()

    # existing files are kept without --force; --cam-class picks the class; --json records the file
    code, out, err = run_cli(['predict', '-m', f'local-dir:{tiny}', *images, '--cam', str(cams)], capsys)
    assert code == 2 and out == '' and err == (
        f"timm-densenet-ext predict: error: {cams / 'a.png'}: exists; pass --force to replace it, or give another "
        f"--cam DIR.\n")
    code, out, err = run_cli(['predict', '-m', f'local-dir:{tiny}', *images, '--cam', str(cams), '--cam-class',
                              'fish', '--force', '--json'], capsys)
    assert code == 0 and [row['cam'] for row in json.loads(out)] == [str(cams / 'a.png'), str(cams / 'b.png')]
    explain(model, images[1], 'fish', overlay=tmp_path / 'expected' / 'b.png')
    assert (tmp_path / 'expected' / 'b.png').read_bytes() == (cams / 'b.png').read_bytes()


@pytest.mark.parametrize('images, extra, message', [
    (['a.png'], ['--cam-class', 'zebra'],
     "--cam-class 'zebra': not a class of the model; give one of 'cat', 'dog', 'fish'."),
    (['a.png', 'sub/a.jpg'], [], 'a.png and sub/a.jpg would both be explained in cams/a.png; give images with '
                                 'different names.'),
])
def test_predict_cam_bad_input_is_one_line_and_writes_nothing(images, extra, message, tiny, tmp_path, monkeypatch,
                                                              capsys):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / 'a.png')
    write_image(tmp_path / 'sub' / 'a.jpg')
    code, out, err = run_cli(['predict', '-m', f'local-dir:{tiny}', *images, '--cam', 'cams', *extra], capsys)
    assert code == 2 and out == '' and err == f'timm-densenet-ext predict: error: {message}\n'
    assert not (tmp_path / 'cams').exists()
    with pytest.raises(ValueError, match='cam_class=dog picks the class of the maps; give cam_dir=DIR too'):
        predict(f'local-dir:{tiny}', ['a.png'], cam_class='dog')


def _load_cam_localization():
    spec = importlib.util.spec_from_file_location('cam_localization', CAM_LOCALIZATION)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_maps_point_at_the_shape_that_decides_the_class(tmp_path):
    """benchmarks/cam_localization.py at a smaller size (about 40 s on one thread): a DenseNet fine-tuned by
    `finetune` on generated shapes on clutter; the Grad-CAM peak of correctly classified held-out images lies inside
    the shape's box for 80% or more of them, and far less often in five copies with their weights shuffled."""
    bench = _load_cam_localization()
    samples = bench.write_shapes(tmp_path, train=200, val=20, test=30)
    model, _ = bench.train_model(tmp_path, epochs=6, log=lambda line: None)
    fine_tuned = bench.localization([model], samples)
    shuffled = bench.localization([bench.shuffled(model, seed) for seed in range(5)], samples)
    assert fine_tuned['correct'] >= 0.8 * len(samples)
    assert fine_tuned['fraction'] >= 0.8 and fine_tuned['fraction_true_class'] >= 0.8
    assert shuffled['fraction'] <= fine_tuned['fraction'] - 0.3
    assert shuffled['fraction_true_class'] <= 0.5

    # the fused inference model's map (its last block, before the folded final norm) is nearly the model's
    fused = fuse_for_inference(model)
    for s in samples[:10]:
        x = timm.data.create_transform(**timm.data.resolve_data_config(model=model))(Image.open(s.path))
        assert np.corrcoef(explain(model, x, s.label).ravel(), explain(fused, x, s.label).ravel())[0, 1] > 0.9


def test_without_pytorch_grad_cam_predict_cam_says_what_to_install(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'pytorch_grad_cam', None)  # as if it were not installed
    image = write_image(tmp_path / 'a.png')
    code, out, err = run_cli(['predict', '-m', f'local-dir:{tiny}', str(image), '--cam', str(tmp_path / 'cams')],
                             capsys)
    assert code == 2 and out == '' and err == (
        "timm-densenet-ext predict: error: class activation maps need pytorch-grad-cam: pip install "
        "'timm-densenet-ext[explain]' (pytorch-grad-cam, package grad-cam).\n")
    assert not (tmp_path / 'cams').exists()
