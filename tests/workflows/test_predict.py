"""`timm-densenet-ext predict`: timm's preprocessing from the pretrained config, ImageNet's or the folder's class
names, top-k probabilities, unreadable images reported by name while the others are classified."""
import json

import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo
from torchvision.transforms import CenterCrop, InterpolationMode, Resize

import timm_densenet_ext  # noqa: F401  (registers the variants)
from hub_fixtures import add_weights_to_hub_cache
from model_helpers import trained
from timm_densenet_ext.cli import main
from timm_densenet_ext.predict import class_names, classify, predict, preprocessing
from workflow_helpers import tiny_hub_folder, write_image

LABELS = ['cat', 'dog', 'fish']


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return tiny_hub_folder(tmp_path_factory.mktemp('predict') / 'tiny', LABELS)


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_preprocessing_is_timms_from_the_pretrained_config():
    with torch.device('meta'):
        model = timm.create_model('densenet121')
    steps = preprocessing(model).transforms
    resize, crop = steps[0], steps[1]
    # crop_pct 0.875, bicubic: the shorter side to 256 = 224 / 0.875, then the central 224 x 224
    assert isinstance(resize, Resize) and resize.size == 256 and resize.interpolation == InterpolationMode.BICUBIC
    assert isinstance(crop, CenterCrop) and tuple(crop.size) == (224, 224)
    assert [round(m, 3) for m in steps[-1].mean.tolist()] == [0.485, 0.456, 0.406]


def test_pretrained_imagenet_model_gives_imagenet_names_and_its_own_probabilities(hub_cache, tmp_path, capsys):
    weights = trained('densenet121').state_dict()
    add_weights_to_hub_cache(hub_cache, 'timm/densenet121.ra_in1k', weights)
    images = [write_image(tmp_path / 'a.jpg', size=(320, 240)), write_image(tmp_path / 'b.png', (30, 90, 200), seed=1)]

    code, out, err = run_cli(['predict', 'densenet121', *map(str, images), '--pretrained', '--top-k', '3'], capsys)
    assert code == 0 and err == ''

    # the same numbers by hand: the cached weights, timm's transform of the config, ImageNet's descriptions
    model = timm.create_model('densenet121')
    model.load_state_dict(weights)
    model.eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    info = ImageNetInfo()
    expected = []
    for path in images:
        with torch.no_grad():
            p = model(transform(Image.open(path).convert('RGB')).unsqueeze(0)).softmax(1)[0]
        top = p.topk(3)
        expected += [str(path)] + [f'  {100 * q:6.2f}%  {info.index_to_description(i)}'
                                   for q, i in zip(top.values.tolist(), top.indices.tolist())]
    assert out.splitlines() == expected
    assert class_names(model)[207] == 'golden retriever'


def test_unreadable_images_are_named_and_the_others_classified(tiny, tmp_path, capsys):
    good = write_image(tmp_path / 'good.png')
    broken = tmp_path / 'broken.jpg'
    broken.write_bytes(b'not an image at all')
    truncated = tmp_path / 'truncated.png'
    truncated.write_bytes(write_image(tmp_path / 'whole.png', size=(64, 64)).read_bytes()[:200])
    missing = tmp_path / 'missing.png'

    argv = ['predict', f'local-dir:{tiny}', str(broken), str(good), str(missing), str(truncated)]
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert out.splitlines()[0] == str(good) and len(out.splitlines()) == 1 + len(LABELS)
    errors = err.splitlines()
    assert len(errors) == 3 and all(line.startswith('timm-densenet-ext predict: error: ') for line in errors)
    assert str(broken) in errors[0] and 'not an image file' in errors[0]
    assert str(missing) in errors[1] and 'no such file' in errors[1]
    assert str(truncated) in errors[2] and 'cannot read it as an image' in errors[2]

    results = predict(f'local-dir:{tiny}', [broken, good])
    assert results[0].error and not results[0].top and results[1].error is None


def test_hub_folder_brings_its_class_names_and_preprocessing(tiny, tmp_path, capsys):
    images = [write_image(tmp_path / f'{i}.png', seed=i) for i in range(3)]
    code, out, err = run_cli(['predict', f'local-dir:{tiny}', *map(str, images), '--json', '--top-k', '10'], capsys)
    assert code == 0 and err == ''
    rows = json.loads(out)
    model = timm.create_model(f'local-dir:{tiny}', pretrained=True).eval()
    assert timm.data.resolve_data_config(model=model)['input_size'] == (3, 16, 16)
    for row, path in zip(rows, images):
        assert row['path'] == str(path) and row['error'] is None
        assert len(row['top']) == len(LABELS)  # top-k stops at the number of classes
        assert sorted(t['label'] for t in row['top']) == sorted(LABELS)
        assert abs(sum(t['probability'] for t in row['top']) - 1) < 1e-5
        with torch.no_grad():
            logits = model(preprocessing(model)(Image.open(path).convert('RGB')).unsqueeze(0))[0]
        assert row['top'][0]['index'] == logits.argmax().item()
        assert row['top'][0]['label'] == LABELS[logits.argmax().item()]

    # a batch gives what one image at a time gives
    batched = classify(model, images, top_k=2, batch_size=2)
    single = [classify(model, [p], top_k=2)[0] for p in images]
    for b, s in zip(batched, single):
        assert [t[:2] for t in b.top] == [t[:2] for t in s.top]
        assert all(abs(x[2] - y[2]) < 1e-5 for x, y in zip(b.top, s.top))


def test_weights_file_loads_through_convert_s_reader(tmp_path, capsys):
    model = trained('densenet_bc_100_k12', num_classes=4)
    torch.save(model.state_dict(), tmp_path / 'bc.pth')
    image = write_image(tmp_path / 'x.png')
    code, out, _ = run_cli(['predict', 'densenet_bc_100_k12', str(image), '--weights', str(tmp_path / 'bc.pth'),
                            '--top-k', '1'], capsys)
    with torch.no_grad():
        expected = model(preprocessing(model)(Image.open(image).convert('RGB')).unsqueeze(0)).argmax().item()
    assert code == 0 and out.splitlines()[1].endswith(f'class {expected}')


@pytest.mark.parametrize('argv, message', [
    (['densenet121', 'x.png'], 'densenet121: no weights given, so its outputs would be random; pass --pretrained'),
    (['densenet264d', 'x.png'],
     'densenet264d: no weights given, so its outputs would be random; pass --checkpoint PATH'),
    (['densenet264d', 'x.png', '--pretrained'], 'densenet264d: has no pretrained weights; leave out --pretrained'),
    (['resnet50', 'x.png', '--pretrained'], "unknown model 'resnet50'"),
    (['local-dir:nowhere', 'x.png'], 'local-dir:nowhere: no such folder nowhere'),
    (['hf-hub:me/nowhere', 'x.png'], 'hf-hub:me/nowhere: not in the local Hugging Face cache'),
    (['densenet121', 'x.png', '--weights', 'nowhere.pth'], 'nowhere.pth: no such file'),
    (['densenet121', 'x.png', '--pretrained', '--top-k', '0'], '--topk 0: give 1 or more'),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, tmp_path, monkeypatch, hub_cache, capsys):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / 'x.png')
    if '--top-k' in argv:
        add_weights_to_hub_cache(hub_cache, 'timm/densenet121.ra_in1k', timm.create_model('densenet121').state_dict())
    code, out, err = run_cli(['predict', *argv], capsys)
    assert code == 2 and out == ''
    assert len(err.splitlines()) == 1 and message in err, err


def test_pretrained_and_weights_together_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(['predict', 'densenet121', 'x.png', '--pretrained', '--weights', 'w.pth'])
    assert e.value.code == 2 and 'not allowed with argument' in capsys.readouterr().err
