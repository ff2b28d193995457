"""`timm-densenet-ext validate`: the numbers equal an independent computation on the model's own outputs (and
finetune's, which uses the same code), results.json has timm's fields, confusion.png reads at 10 and 100 classes,
unreadable images are counted and listed, and bad folders get one line with nothing written."""
import io
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, recall_score, top_k_accuracy_score
from torchvision.datasets import ImageFolder

import timm_densenet_ext
from timm_densenet_ext.cli import main
from timm_densenet_ext.finetune import evaluate
from timm_densenet_ext.validate import class_indices, confusion_figure, validate, validate_model
from workflow_helpers import TINY_ARCH, TINY_ARGS

TIMM_FIELDS = ['model', 'top1', 'top1_err', 'top5', 'top5_err', 'param_count', 'img_size', 'crop_pct',
               'interpolation']  # timm's validate.py results, in its order


@pytest.fixture(scope='module')
def digits(digits_demo, tmp_path_factory):
    """validate on the demo's hub folder and data (DIR/val is found), writing results.json and confusion.png; and
    the model's own logits on val/, computed apart: torchvision's ImageFolder, timm's transform, one forward."""
    name = f'local-dir:{digits_demo.model_dir}'
    out = tmp_path_factory.mktemp('validate') / 'results'
    result = validate(name, digits_demo.data_dir, output=out, progress=False, threads=1)
    model = timm.create_model(name, pretrained=True).eval()
    dataset = ImageFolder(str(digits_demo.data_dir / 'val'),
                          transform=timm.data.create_transform(**timm.data.resolve_data_config(model=model)))
    images, targets = zip(*(dataset[i] for i in range(len(dataset))))
    with torch.no_grad():
        logits = model(torch.stack(images))
    return SimpleNamespace(name=name, out=out, result=result, model=model, dataset=dataset, logits=logits.numpy(),
                           targets=np.array(targets), classes=dataset.classes)


def test_numbers_equal_scikit_learn_on_the_model_s_outputs(digits):
    r, y, logits = digits.result, digits.targets, digits.logits
    predicted = logits.argmax(1)
    assert r.images == r.evaluated == len(y) == 360 and r.unreadable == []
    assert r.classes == digits.classes == [str(i) for i in range(10)]
    assert r.correct == (predicted == y).sum() and r.top1 == pytest.approx(100 * accuracy_score(y, predicted))
    assert r.top5 == pytest.approx(100 * top_k_accuracy_score(y, logits, k=5, labels=range(10)))
    probabilities = torch.from_numpy(logits).double().softmax(1).numpy()
    assert r.loss == pytest.approx(log_loss(y, probabilities, labels=range(10)), rel=1e-4)
    assert np.array_equal(r.confusion, confusion_matrix(y, predicted)) and r.predicted == r.classes
    recall = recall_score(y, predicted, average=None)
    assert [c.accuracy for c in r.per_class] == pytest.approx(100 * recall)
    assert [c.images for c in r.per_class] == np.bincount(y).tolist()
    worst = r.worst(2)
    assert worst[0].accuracy == min(100 * recall) and worst[0].accuracy <= worst[1].accuracy
    assert r.images_per_second > 0 and r.top1 > 90  # a trained model: the measurement is not trivially 10%


def test_finetune_reports_what_validate_measures(digits, digits_demo):
    r = digits.result
    assert (digits_demo.training.val_correct, digits_demo.training.val_images) == (r.correct, r.evaluated)
    assert 100 * digits_demo.training.val_accuracy == pytest.approx(r.top1)
    assert evaluate(digits.model, digits.dataset) == (r.correct, r.evaluated)
    # the lower-level call, on an nn.Module already loaded and on a dataset of tensors
    assert validate_model(digits.model, digits.dataset, threads=1).correct == r.correct
    # timm_densenet_ext.validate(...), though importing the module bound that name to the module
    again = timm_densenet_ext.validate(digits.name, digits_demo.data_dir, progress=False, threads=1)
    assert (again.correct, again.evaluated, again.files) == (r.correct, r.evaluated, [])


def test_results_json_has_timm_s_fields_and_the_report(digits):
    r, model = digits.result, digits.model
    saved = json.loads((digits.out / 'results.json').read_text())
    assert list(saved)[:len(TIMM_FIELDS)] == TIMM_FIELDS
    cfg = model.pretrained_cfg
    assert saved['model'] == digits.name and saved['img_size'] == 8 == cfg['input_size'][-1]
    assert saved['crop_pct'] == cfg['crop_pct'] and saved['interpolation'] == cfg['interpolation']
    assert saved['param_count'] == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    assert saved['top1'] == round(r.top1, 4) and saved['top1_err'] == round(100 - r.top1, 4)
    assert saved['top5'] == round(r.top5, 4) and saved['top5_err'] == round(100 - r.top5, 4)
    assert (saved['images'], saved['evaluated'], saved['unreadable']) == (360, 360, [])
    assert saved['confusion']['counts'] == r.confusion.tolist() and saved['confusion']['true'] == r.classes
    assert [c['correct'] for c in saved['per_class']] == [c.correct for c in r.per_class]
    assert sorted(p.name for p in digits.out.iterdir()) == ['confusion.png', 'results.json']  # no temporaries
    assert r.files == [digits.out / 'results.json', digits.out / 'confusion.png']


def test_confusion_png_is_a_picture_read_at_a_glance(digits):
    with Image.open(digits.out / 'confusion.png') as picture:
        assert picture.format == 'PNG' and 500 <= picture.width <= 1200 and 500 <= picture.height <= 1200
        pixels = np.asarray(picture.convert('L'))
    assert pixels.std() > 20  # a drawn matrix, not a blank page
    figure = confusion_figure(digits.result)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == digits.result.classes
    counts = [int(t.get_text()) for t in ax.texts]  # ten classes: the counts are written in their cells
    assert sorted(counts) == sorted(digits.result.confusion[digits.result.confusion > 0].tolist())


def test_the_command_line_prints_a_summary_and_refuses_to_overwrite(digits, digits_demo, capsys):
    argv = ['validate', '-m', digits.name, '--data-dir', str(digits_demo.data_dir), '--output', str(digits.out),
            '--threads', '1']
    before = (digits.out / 'results.json').read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'results.json: exists; pass --force' in err and '--output' in err
    assert (digits.out / 'results.json').read_bytes() == before
    assert main(argv + ['--force']) == 0
    out, err = capsys.readouterr()
    r = digits.result
    assert f'top-1 {r.top1:.2f}% ({r.correct}/360)  top-5 {r.top5:.2f}% ' in out and ' images/s' in out
    worst = r.worst(1)[0]
    assert f'worst classes: {worst.name} {worst.accuracy:.1f}% ({worst.correct}/{worst.images})' in out
    assert f'wrote {digits.out / "results.json"}' in out and f'wrote {digits.out / "confusion.png"}' in out
    assert err == ''  # no progress bar when stderr is not a terminal
    assert json.loads((digits.out / 'results.json').read_bytes())['top1'] == round(r.top1, 4)


def test_an_unreadable_image_is_skipped_counted_and_reported(digits_demo, tmp_path, capsys):
    data = tmp_path / 'subset'
    for label in ('3', '7'):  # a subset of the model's classes, in DIR itself (no val/)
        shutil.copytree(digits_demo.data_dir / 'val' / label, data / label)
    (data / '3' / 'broken.png').write_bytes(b'not a png at all')
    n = sum(1 for _ in data.rglob('*.png'))
    out = tmp_path / 'out'
    assert main(['validate', '-m', f'local-dir:{digits_demo.model_dir}', '--data-dir', str(data), '--output',
                 str(out), '--threads', '1']) == 0
    stdout, err = capsys.readouterr()
    assert err.splitlines() == [f'timm-densenet-ext validate: skipped: {data / "3" / "broken.png"}: not an image file '
                                f'PIL can read (JPEG, PNG, ...); check that it is an image.']
    assert f'{n - 1} of {n} images, 1 unreadable skipped, 2 classes' in stdout
    saved = json.loads((out / 'results.json').read_text())
    assert (saved['images'], saved['evaluated']) == (n, n - 1) and len(saved['unreadable']) == 1
    assert 'broken.png' in saved['unreadable'][0]
    assert [(c['name'], c['index'], c['images']) for c in saved['per_class']] == [
        ('3', 3, len(list((data / '3').iterdir())) - 1), ('7', 7, len(list((data / '7').iterdir())))]
    assert saved['top5'] is not None  # the model has ten classes, whatever the data holds


@pytest.mark.parametrize('case', ['unknown class', 'no class folders', 'empty class folder', 'no readable image'])
def test_bad_folders_get_one_line_and_nothing_is_written(case, digits_demo, tmp_path, capsys):
    data = tmp_path / 'data'
    data.mkdir()
    if case in ('unknown class', 'empty class folder'):
        shutil.copytree(digits_demo.data_dir / 'val' / '1', data / '1')
        (data / 'cat').mkdir()
    if case == 'no readable image':
        (data / '1').mkdir()
        (data / '1' / 'a.png').write_bytes(b'truncated')
    if case == 'unknown class':
        shutil.copy(next((data / '1').iterdir()), data / 'cat' / 'x.png')
    out = tmp_path / 'out'
    assert main(['validate', '-m', f'local-dir:{digits_demo.model_dir}', '--data-dir', str(data), '--output',
                 str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('timm-densenet-ext validate: error: ')
    expected = {'unknown class': f"{data / 'cat'}: a class folder the model's labels do not know; name each class "
                                 f'folder as the model names its class (0, 1, 2, 3, 4, ...), or remove it.',
                'no class folders': f'{data}: holds no class folders; arrange the images as',
                'empty class folder': f'{data / "cat"}: holds no image files',
                'no readable image': f'{data}: none of its 1 images could be read ({data / "1" / "a.png"}: '}[case]
    assert expected in lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ['data']


def test_class_folders_map_by_name_or_by_order():
    def model(num_classes):
        return timm.create_model(TINY_ARCH, num_classes=num_classes, **TINY_ARGS)

    nameless = model(3)  # 'class 0' ...: the folders in sorted order, as ImageFolder numbers them
    assert class_indices(nameless, ['b', 'c', 'a']) == {'a': 0, 'b': 1, 'c': 2}
    with pytest.raises(ValueError, match=r'2 class folders, but the model has 3 classes and no class names'):
        class_indices(nameless, ['a', 'b'], 'DIR')
    imagenet = model(1000)  # ImageNet's classes: folders named by WordNet id, as ImageNet's val/ is
    assert class_indices(imagenet, ['n01443537', 'n01440764']) == {'n01443537': 1, 'n01440764': 0}
    with pytest.raises(ValueError, match=r"DIR/dog: a class folder the model's labels do not know; .*n01440764"):
        class_indices(imagenet, ['n01440764', 'dog'], 'DIR')


def test_a_100_class_confusion_picture_stays_readable():
    """A tiny random model with 100 named classes, measured on random tensors: every name on both axes in a
    legible font, each cell at least 12 pixels, the counts left out, the picture within a screen or two."""
    torch.manual_seed(0)
    model = timm.create_model(TINY_ARCH, num_classes=100, **TINY_ARGS).eval()
    names = [f'{kind}_{i}' for i, kind in enumerate(['aquarium_fish', 'sweet_pepper', 'lawn_mower', 'oak'] * 25)]
    model.pretrained_cfg = dict(model.pretrained_cfg, label_names=names)
    data = torch.utils.data.TensorDataset(torch.randn(200, 3, 16, 16), torch.arange(200) % 100)
    result = validate_model(model, data, threads=1)
    with torch.no_grad():
        logits = model(data.tensors[0]).numpy()
    assert result.confusion.shape == (100, 100) and result.evaluated == 200
    assert (result.img_size, result.crop_pct, result.data_dir) == (16, None, None)  # the dataset's own, not a default
    assert result.top5 == pytest.approx(100 * top_k_accuracy_score(data.tensors[1], logits, k=5, labels=range(100)))

    figure = confusion_figure(result)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert min(t.get_fontsize() for t in ax.get_xticklabels()) >= 5 and not ax.texts
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', dpi=100)
    box = ax.get_window_extent()  # the matrix, in the saved picture's pixels
    assert box.width / 100 >= 12 and box.height / 100 >= 12
    with Image.open(buffer) as picture:
        assert picture.format == 'PNG' and 1500 <= picture.width <= 3000 and 1500 <= picture.height <= 3000
