"""Multi-label data (CheXNet / torchxrayvision style): label CSVs in both forms read as the same table, bad ones
refused in one line; grey images with one mean/std through timm's transforms; a 1-channel DenseNet adapted from
3-channel weights; per-label AUROC and thresholds from scikit-learn; and `finetune --multi-label --in-chans 1` from
the command line, which trains a small DenseNet on the generated findings to a mean validation AUROC of 0.95 or more
and writes a hub folder whose config, card and `predict` give each label's threshold."""
import contextlib
import io
import itertools
import json
import re
import shutil
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import save_file

import timm_densenet_ext  # noqa: F401  (registers the variants)
from timm_densenet_ext.cards import render_model_card
from timm_densenet_ext.cli import main
from timm_densenet_ext.hub import write_hub_folder
from timm_densenet_ext.loading import load_model
from workflow_helpers import tiny_hub_folder, write_image_folder
from timm_densenet_ext.multilabel import (
    SHAPES, LabelTable, MultiLabelDataset, auroc_per_label, config_entries, evaluate_multilabel, findings,
    grayscale_data_config, input_img_mode, pick_thresholds, read_labels, thresholds_from_config, write_labels,
    write_shapes_multilabel)

TINY_DENSENET = dict(block_config=(1, 2, 2, 1))  # densenet121's stem and layers, six of them: 0.1M parameters


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """Eight training and four validation images of the generated findings, labelled in the 'pipe' form."""
    root = tmp_path_factory.mktemp('shapes') / 'data'
    table = write_shapes_multilabel(root, 8, 4, size=32, seed=3)
    return root, table


def python_blocks(card_text: str):
    return re.findall(r'^```python\n(.*?)^```$', card_text, flags=re.S | re.M)


def snapshot(root: Path):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob('*'))


def test_both_csv_forms_read_as_the_same_table(tmp_path, shapes):
    root, written = shapes
    columns = write_shapes_multilabel(tmp_path / 'columns', 8, 4, size=32, seed=3, form='columns')
    assert (tmp_path / 'columns' / 'labels.csv').read_text().splitlines()[0] == 'file,bar,disk,ring,square'
    assert (root / 'labels.csv').read_text().splitlines()[0] == 'file,labels'
    from_pipe = read_labels(root / 'labels.csv', root)
    from_columns = read_labels(tmp_path / 'columns' / 'labels.csv', tmp_path / 'columns')
    assert from_pipe == from_columns == written == columns
    assert from_pipe.names == SHAPES and len(from_pipe) == 12
    assert from_pipe.split('train').files == tuple(f'train/{i:05d}.png' for i in range(8))
    assert from_pipe.split('val/').targets == from_pipe.targets[8:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['columns']  # no temporaries left
    with pytest.raises(ValueError, match=r'has no rows for images in test/; add rows naming test/IMAGE'):
        from_pipe.split('test')
    # the order label_names gives wins in both forms; a table written in either form reads back the same
    order = ('square', 'ring', 'disk', 'bar')
    reordered = read_labels(root / 'labels.csv', root, label_names=order)
    assert reordered.names == order and reordered.matrix().tolist() == from_pipe.matrix()[:, ::-1].tolist()
    assert read_labels(root / 'labels.csv', root, label_names='square, ring,disk,bar') == reordered
    for form in ('pipe', 'columns'):
        write_labels(tmp_path / f'{form}.csv', reordered, form)
        assert read_labels(tmp_path / f'{form}.csv', root, label_names=order) == reordered


def write_chexpert(root: Path) -> Path:
    """CheXpert's CSV layout: paths below the data folder, patient columns, blank / 0.0 / 1.0 / -1.0 labels."""
    for i in range(3):
        path = root / 'CheXpert-v1.0-small' / 'train' / f'patient0000{i}' / 'study1' / 'view1_frontal.jpg'
        path.parent.mkdir(parents=True)
        Image.new('L', (12, 10), 90 + i).save(path)
    csv = root / 'train.csv'
    csv.write_text(textwrap.dedent("""\
        Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Edema
        CheXpert-v1.0-small/train/patient00000/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,
        CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Male,87,Frontal,AP,,-1.0,1.0
        CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Female,83,Frontal,AP,,1.0,0.0
        """))
    return csv


def test_chexpert_columns_blank_absent_and_uncertain_by_choice(tmp_path):
    csv = write_chexpert(tmp_path)
    labels = ['No Finding', 'Cardiomegaly', 'Edema']
    with pytest.raises(ValueError) as e:
        read_labels(csv, tmp_path, label_names=labels)
    assert str(e.value) == (f"{csv} line 3: Cardiomegaly is -1 (uncertain); pass uncertain=0 or uncertain=1 to count "
                            f"it as absent or present (CheXpert's U-Zeros, U-Ones).")
    zeros = read_labels(csv, tmp_path, label_names=labels, uncertain=0)
    ones = read_labels(csv, tmp_path, label_names=labels, uncertain=1)
    assert zeros.names == tuple(labels) and zeros.targets == ((1, 0, 0), (0, 0, 1), (0, 1, 0))
    assert ones.targets == ((1, 0, 0), (0, 1, 1), (0, 1, 0))
    assert zeros.files[0] == 'CheXpert-v1.0-small/train/patient00000/study1/view1_frontal.jpg'
    with pytest.raises(ValueError, match=r"line 2: Sex is 'Female', not 1, 0, blank or -1; correct it, or give "
                                         r"label_names=NAMES to leave out columns that are not labels\.$"):
        read_labels(csv, tmp_path, uncertain=0)


CSV_NUMBERS = itertools.count()


def rows(root: Path, text: str) -> Path:
    """A label CSV of its own (labels0.csv, labels1.csv, ...) holding `text`."""
    path = root / f'labels{next(CSV_NUMBERS)}.csv'
    path.write_text(text)
    return path


def bad_inputs(root: Path):
    """(case, csv, read_labels keywords, error type, the message's fix) for each refused input."""
    for name in ('a.png', 'b.png', 'c.png'):
        Image.new('L', (8, 8), 128).save(root / name)
    return [
        ('missing image', rows(root, 'file,labels\na.png,x\nb.png,y\nc.png,\nd.png,x\n'), {}, FileNotFoundError,
         r'line 5: names d\.png, which is not in .*; add the image or remove the row\.$'),
        ('image without a row', rows(root, 'file,labels\na.png,x\nb.png,y\n'), {}, ValueError,
         r'holds c\.png without a row in .*labels\d+\.csv; add a row per image, or move them out\.$'),
        ('unknown label', rows(root, 'file,labels\na.png,x\nb.png,y|z\nc.png,\n'), dict(label_names=['x', 'y']),
         ValueError, r"line 3: unknown label 'z'; add it to label_names=NAMES \(x, y\) or correct the row\.$"),
        ('no label anywhere', rows(root, 'file,labels\na.png,\nb.png,\nc.png,\n'), {}, ValueError,
         r'no row names a label \(an empty label set\); give each image its labels as a\|b\.$'),
        ('all zero', rows(root, 'file,x,y\na.png,0,0\nb.png,0,\nc.png,,0\n'), {}, ValueError,
         r'no image has any label \(an empty label set\)'),
        ('empty label_names', rows(root, 'file,labels\na.png,x\nb.png,\nc.png,\n'), dict(label_names=[]), ValueError,
         r'^label_names=NAMES: names no labels \(an empty label set\); give one or more label names\.$'),
        ('label without a column', rows(root, 'file,x\na.png,1\nb.png,0\nc.png,1\n'), dict(label_names=['x', 'y']),
         ValueError, r"has no column for label 'y'; add a 0/1 column per label, or give label_names=NAMES among"),
        ('duplicate rows', rows(root, 'file,labels\na.png,x\nb.png,y\n./a.png,y\nc.png,\n'), {}, ValueError,
         r'lines 2 and 4: both name a\.png; give each image one row\.$'),
        ('ragged row', rows(root, 'file,labels\na.png,x\nb.png,y,z\nc.png,\n'), {}, ValueError,
         r'line 3: has 3 cells where the header has 2; give every row one cell per column'),
        ('empty file', rows(root, ''), {}, ValueError, r'is empty; give a CSV with a header'),
        ('header only', rows(root, 'file,labels\n'), {}, ValueError, r'has a header but no rows; add a row per image'),
        ('one column', rows(root, 'file\na.png\n'), {}, ValueError, r"its header 'file' has an empty or a single"),
        ('column twice', rows(root, 'file,x,x\na.png,1,0\n'), {}, ValueError, r'names a column twice'),
        ('bad quoting', rows(root, 'file,labels\n"a.png"x,y\n'), {}, ValueError, r'not a readable UTF-8 CSV'),
        ('outside the folder', rows(root, 'file,labels\n../a.png,x\n'), {}, ValueError,
         r"line 2: '\.\./a\.png' is not a file name inside .*; give paths relative to it\.$"),
        ('no csv', root / 'nothing.csv', {}, FileNotFoundError, r'nothing\.csv: no such file'),
        ('uncertain=2', rows(root, 'file,x\na.png,1\nb.png,0\nc.png,1\n'), dict(uncertain=2), ValueError,
         r'^uncertain=2: give 0 or 1'),
    ]


def test_bad_label_csvs_are_refused_in_one_line(tmp_path):
    (tmp_path / 'latin1.csv').write_bytes('file,labels\na.png,caf\xe9\n'.encode('latin-1'))
    cases = bad_inputs(tmp_path) + [('not utf-8', tmp_path / 'latin1.csv', {}, ValueError, 'not a readable UTF-8')]
    before = snapshot(tmp_path)
    for case, csv, keywords, error, message in cases:
        with pytest.raises(error) as e:
            read_labels(csv, tmp_path, **keywords)
        assert type(e.value) is error and '\n' not in str(e.value), case
        assert e.match(message), (case, str(e.value))
        assert snapshot(tmp_path) == before, case  # nothing written
    with pytest.raises(FileNotFoundError, match=r'no-folder: no such folder; give the folder the CSV'):
        read_labels(cases[0][1], tmp_path / 'no-folder')


def test_images_outside_the_listed_folders_are_not_rows_missing(tmp_path):
    """An image in a folder holding none of the listed ones (CheXpert's valid/ beside train.csv) is not refused."""
    csv = write_chexpert(tmp_path)
    other = tmp_path / 'CheXpert-v1.0-small' / 'valid' / 'patient64541' / 'study1' / 'view1_frontal.jpg'
    other.parent.mkdir(parents=True)
    Image.new('L', (12, 10), 90).save(other)
    assert len(read_labels(csv, tmp_path, label_names=['Edema'], uncertain=0)) == 3
    Image.new('L', (12, 10), 90).save(tmp_path / 'CheXpert-v1.0-small' / 'train' / 'patient00001' / 'study1' / 'x.png')
    with pytest.raises(ValueError, match=r'holds CheXpert-v1\.0-small/train/patient00001/study1/x\.png without a row'):
        read_labels(csv, tmp_path, label_names=['Edema'], uncertain=0)


def test_grey_images_take_one_mean_and_std_alike_in_training_and_evaluation(shapes):
    root, table = shapes
    model = timm.create_model('densenet121', in_chans=1, num_classes=len(SHAPES), **TINY_DENSENET)
    imagenet = grayscale_data_config(model)
    assert imagenet['input_size'] == (1, 224, 224)
    assert imagenet['mean'] == pytest.approx((np.mean(timm.data.IMAGENET_DEFAULT_MEAN),))
    assert imagenet['std'] == pytest.approx((np.mean(timm.data.IMAGENET_DEFAULT_STD),))
    config = dict(grayscale_data_config(model, img_size=32), crop_pct=1.0)
    assert input_img_mode(config) == 'L' and input_img_mode(timm.data.resolve_data_config(model=model)) == 'RGB'
    evaluation = timm.data.create_transform(**config)
    training = timm.data.create_transform(**config, is_training=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0,
                                          color_jitter=0.0)
    dataset = MultiLabelDataset(root, table.split('val'), evaluation, input_img_mode(config))
    image, target = dataset[1]
    pixels = np.asarray(Image.open(root / 'val' / '00001.png'), dtype=np.float32) / 255
    expected = (pixels - config['mean'][0]) / config['std'][0]
    assert image.shape == (1, 32, 32) and torch.allclose(image[0], torch.from_numpy(expected), atol=1e-5)
    assert target.dtype == torch.float32 and target.tolist() == list(table.split('val').targets[1])
    trained = MultiLabelDataset(root, table.split('val'), training, 'L')[1][0]
    assert torch.equal(trained, image)
    assert model.eval()(image[None]).shape == (1, len(SHAPES))
    with pytest.raises(ValueError, match='takes 3 input channels; create it with in_chans=1'):
        grayscale_data_config(timm.create_model('densenet121', **TINY_DENSENET))


def test_one_channel_model_sums_the_rgb_weights_of_a_three_channel_checkpoint(tmp_path):
    """timm's builder adapts the first convolution (`adapt_input_conv`) when our DenseNet loads 3-channel weights
    with in_chans=1; every other weight loads unchanged."""
    torch.manual_seed(0)
    rgb = timm.create_model('densenet121', **TINY_DENSENET)
    save_file(rgb.state_dict(), tmp_path / 'model.safetensors')
    grey = timm.create_model('densenet121', pretrained=True, in_chans=1, **TINY_DENSENET,
                             pretrained_cfg_overlay=dict(file=str(tmp_path / 'model.safetensors')))
    conv0 = rgb.features.conv0.weight
    assert grey.features.conv0.weight.shape == (conv0.shape[0], 1, *conv0.shape[2:])
    assert torch.equal(grey.features.conv0.weight, conv0.sum(dim=1, keepdim=True))
    others = {k: v for k, v in rgb.state_dict().items() if k != 'features.conv0.weight'}
    assert all(torch.equal(grey.state_dict()[k], v) for k, v in others.items())
    # on a grey picture the adapted model sees what the RGB model sees when every channel is normalised alike
    picture = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(grey.eval()(picture), rgb.eval()(picture.expand(1, 3, 32, 32)), atol=1e-5)


def test_auroc_per_label_and_thresholds_follow_scikit_learn():
    names = ['a', 'b', 'c']
    probabilities = np.array([[0.1, 0.9, 0.2], [0.4, 0.1, 0.3], [0.35, 0.8, 0.6], [0.8, 0.2, 0.7], [0.2, 0.3, 0.9]])
    targets = np.array([[0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 0, 1]])
    report = auroc_per_label(torch.tensor(probabilities), torch.tensor(targets), names)
    # a: positives 0.35, 0.8 against negatives 0.1, 0.4, 0.2: 5 of 6 pairs ordered; b: all 6 pairs; c: 5 of 6
    assert report['per_label'] == pytest.approx(dict(a=5 / 6, b=1.0, c=5 / 6))
    assert report['mean'] == pytest.approx((5 / 6 + 1 + 5 / 6) / 3) and report['undefined'] == []
    assert report['note'] is None
    targets[:, 1] = 1
    report = auroc_per_label(probabilities, targets, names)
    assert report['per_label']['b'] is None and report['undefined'] == ['b']
    assert report['mean'] == pytest.approx(5 / 6)
    assert report['note'] == ('AUROC undefined for b: the data has only positive or only negative images of it; '
                              'left out of the mean.')
    with pytest.raises(ValueError, match=r'probabilities \(5, 3\) and targets \(5, 2\): give both as'):
        auroc_per_label(probabilities, targets[:, :2], names)

    scores = np.array([[0.1], [0.3], [0.6], [0.7], [0.9]])
    truth = np.array([[0], [1], [0], [1], [1]])
    # F1 at >= 0.9, 0.7, 0.6, 0.3, 0.1: 0.5, 0.8, 0.67, 0.86, 0.75; Youden's J: 0.33, 0.67, 0.17, 0.5, 0
    assert pick_thresholds(scores, truth) == [0.3]
    assert pick_thresholds(scores, truth, rule='youden') == [0.7]
    assert pick_thresholds(probabilities, targets) == [0.35, 0.5, 0.3]  # b has positives only: 0.5
    with pytest.raises(ValueError, match=r"^rule=best: give one of f1, youden\.$"):
        pick_thresholds(scores, truth, rule='best')
    assert findings([0.2, 0.5, 0.9], [0.3, 0.5, 0.6], names) == [('c', 0.9), ('b', 0.5)]
    entries = config_entries([0.25, 0.5, 0.75])
    assert entries == dict(problem_type='multi_label_classification', label_thresholds=[0.25, 0.5, 0.75],
                           threshold_rule='f1')
    assert thresholds_from_config(dict(entries, label_names=names), 3) == [0.25, 0.5, 0.75]
    assert thresholds_from_config(dict(label_names=names), 3) is None
    with pytest.raises(ValueError, match='label_thresholds should hold 4 numbers from 0 to 1'):
        thresholds_from_config(entries, 4)


def test_shapes_generator_writes_grey_pngs_and_refuses_a_used_folder(tmp_path, shapes):
    root, table = shapes
    image = Image.open(root / 'train' / '00000.png')
    assert image.mode == 'L' and image.size == (32, 32)
    assert sorted(p.name for p in root.iterdir()) == ['labels.csv', 'train', 'val']
    again = write_shapes_multilabel(tmp_path / 'again', 8, 4, size=32, seed=3)
    assert again == table and (tmp_path / 'again' / 'train' / '00000.png').read_bytes() == \
        (root / 'train' / '00000.png').read_bytes()
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=r'again: exists and is not an empty folder; choose another'):
        write_shapes_multilabel(tmp_path / 'again', 8, 4)
    with pytest.raises(ValueError, match='give 1 or more images per split'):
        write_shapes_multilabel(tmp_path / 'none', 0, 4)
    assert snapshot(tmp_path) == before


@pytest.fixture(scope='module')
def grey_run(tmp_path_factory):
    """`finetune --multi-label --in-chans 1` from the command line: a tiny RGB densenet121 hub folder (its stem and
    six layers, random weights) adapted to grey input, 6 epochs on 400 generated images at 32 px, 200 for validation."""
    root = tmp_path_factory.mktemp('grey-run')
    torch.manual_seed(0)
    base = write_hub_folder(timm.create_model('densenet121', num_classes=2, **TINY_DENSENET), root / 'base',
                            model_name='densenet121', label_names=['x', 'y'],
                            data_config={'input_size': (3, 32, 32), 'crop_pct': 1.0})
    data = root / 'shapes'
    write_shapes_multilabel(data, 400, 200, size=32, seed=0)
    out, stdout = root / 'shapes-model', io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(['finetune', '-m', f'local-dir:{base}', '--data-dir', str(data), '--multi-label', '--labels',
                     str(data / 'labels.csv'), '--in-chans', '1', '--output', str(out), *GREY_RECIPE])
    assert code == 0
    return SimpleNamespace(root=root, base=base, data=data, out=out, stdout=stdout.getvalue())


GREY_RECIPE = ['--epochs', '6', '-b', '32', '--lr', '5e-3', '--weight-decay', '0.01', '--scale', '1', '1', '--hflip',
               '0', '--color-jitter', '0']


def test_multilabel_finetune_writes_a_grey_folder_with_thresholds_reaching_a_mean_auroc_of_095(grey_run):
    """The best epoch by mean validation AUROC, written with a threshold per label that the reloaded model's own
    validation probabilities give again: the folder holds what was measured."""
    lines = grey_run.stdout.splitlines()
    epochs = [line for line in lines if line.startswith('epoch ')]
    aurocs = [float(re.search(r'val mean AUROC (\d\.\d{4})', line).group(1)) for line in epochs]
    assert len(epochs) == 6 and 'best' in epochs[aurocs.index(max(aurocs))]
    wrote = next(line for line in lines if line.startswith('wrote '))
    mean = float(re.search(r'mean validation AUROC (\d\.\d{4}) \(bar ', wrote).group(1))
    print(f'mean validation AUROC {mean:.4f}: {wrote}')
    assert mean == max(aurocs) and mean >= 0.95

    config = json.loads((grey_run.out / 'config.json').read_text())
    assert config['problem_type'] == 'multi_label_classification' and config['threshold_rule'] == 'f1'
    assert config['label_names'] == list(SHAPES) and config['model_args']['in_chans'] == 1
    assert config['pretrained_cfg']['input_size'] == [1, 32, 32] and len(config['pretrained_cfg']['mean']) == 1
    assert 'label_thresholds' not in config['pretrained_cfg']  # timm refuses unknown keys there
    model = timm.create_model(f'local-dir:{grey_run.out}', pretrained=True)
    assert model.features.conv0.weight.shape[1] == 1
    data_config = timm.data.resolve_data_config(model=model)
    table = read_labels(grey_run.data / 'labels.csv', grey_run.data).split('val')
    measured = evaluate_multilabel(model, MultiLabelDataset(grey_run.data, table, timm.data.create_transform(
        **data_config), input_img_mode(data_config)))
    assert measured['mean'] == pytest.approx(mean, abs=6e-5)
    assert config['label_thresholds'] == pytest.approx(measured['thresholds'], abs=1e-6)
    assert sorted(p.name for p in grey_run.out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']

    card = ModelCard.load(grey_run.out / 'README.md')
    assert '**Multi-label:** 4 labels (bar, disk, ring, square), a sigmoid per label' in card.text
    assert f'**Mean validation AUROC: {mean:.4f}**' in card.text
    for name, threshold in zip(SHAPES, config['label_thresholds']):
        assert f'| {name} | {measured["per_label"][name]:.4f} | {threshold:.4f} | ' in card.text
    result = card.data.eval_results[0]
    assert result.metric_type == 'roc_auc' and result.metric_value == pytest.approx(mean, abs=1e-4)


def test_predict_prints_the_labels_at_or_above_their_thresholds(grey_run, tmp_path, monkeypatch, capsys):
    model = timm.create_model(f'local-dir:{grey_run.out}', pretrained=True).eval()
    thresholds = json.loads((grey_run.out / 'config.json').read_text())['label_thresholds']
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    Image.new('L', (32, 32), 60).save(tmp_path / 'plain.png')  # background only
    images = [grey_run.data / 'val' / f'{i:05d}.png' for i in range(3)] + [tmp_path / 'plain.png']
    assert main(['predict', '-m', f'local-dir:{grey_run.out}', *map(str, images)]) == 0
    expected = []
    for path in images:
        with torch.no_grad():
            probabilities = model(transform(Image.open(path).convert('L'))[None]).sigmoid()[0].tolist()
        found = findings(probabilities, thresholds, SHAPES)
        expected += [str(path)] + [f'  {100 * p:6.2f}%  {name}' for name, p in found] + (
            [] if found else ['  no label at or above its threshold'])
    assert capsys.readouterr().out.splitlines() == expected
    # the card's usage code, run on the folder, prints the same labels
    code = python_blocks(ModelCard.load(grey_run.out / 'README.md').text)[0]
    (tmp_path / 'image.jpg').write_bytes(images[0].read_bytes())  # PIL reads the PNG inside
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("'hf-hub:YOUR-ORG/shapes-model'", repr(f'local-dir:{grey_run.out}')), 'card', 'exec'),
         {})
    usage = [line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:]]
    assert sorted(usage) == sorted(line.split()[-1] for line in expected[1:expected.index(str(images[1]))])


def interrupted_run(model: str, data: Path, out: Path, monkeypatch, *argv: str) -> None:
    """A multi-label run interrupted (Ctrl-C) while validating its first epoch: its state file stays in `out`."""
    import timm_densenet_ext.finetune as finetune_module
    with monkeypatch.context() as patch:
        patch.setattr(finetune_module, 'evaluate_multilabel',
                      lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(['finetune', '-m', model, '--data-dir', str(data), '--output', str(out), '--epochs', '2', '-b',
                     '4', *argv]) == 130
    assert (out / '.finetune-state.pth').is_file()


def test_bad_multilabel_input_is_one_line_exit_code_2_and_writes_nothing(shapes, tmp_path, monkeypatch, capsys):
    root, _ = shapes
    data = tmp_path / 'data'
    shutil.copytree(root, data)
    rows = (data / 'labels.csv').read_text().splitlines()
    csvs = {name: tmp_path / f'{name}.csv' for name in ('missing', 'no-row', 'none')}
    csvs['missing'].write_text('\n'.join(rows + ['val/00009.png,bar']) + '\n')
    csvs['no-row'].write_text('\n'.join(rows[:-1]) + '\n')
    csvs['none'].write_text('\n'.join(['file,labels'] + [r.split(',')[0] + ',' for r in rows[1:]]) + '\n')
    tiny = f'local-dir:{tiny_hub_folder(tmp_path / "tiny", ["x", "y"])}'  # DenseNet-BC, two layers a block, 16 px
    interrupted_run(tiny, data, tmp_path / 'run', monkeypatch, '--multi-label', '--in-chans', '1')
    capsys.readouterr()
    new = ['finetune', '-m', tiny, '--data-dir', str(data), '--output', str(tmp_path / 'out'),
           '--multi-label']
    resume = ['finetune', '--resume', '--output', str(tmp_path / 'run')]
    cases = [
        (new + ['--labels', str(csvs['missing'])], r'line 14: names val/00009\.png, which is not in .*; add the image'),
        (new + ['--labels', str(csvs['no-row'])], r'holds val/00003\.png without a row in .*no-row\.csv; add a row'),
        (new + ['--label-names', 'bar,disk,ring'], r"unknown label 'square'; add it to --label-names NAMES"),
        (new + ['--labels', str(csvs['none'])], r'no row names a label \(an empty label set\)'),
        (new + ['--label-names', ''], r"^--label-names NAMES: '' is not a label name"),
        (new[:-1] + ['--labels', str(data / 'labels.csv')], r'^--labels \.\.\.: is for multi-label runs; add '
                                                           r'--multi-label and --labels CSV, or leave it out\.$'),
        (resume + ['--label-names', 'square,ring,disk,bar'], r"its labels \(square, ring, disk, bar\) are not the "
                                                             r"interrupted run's \(bar, disk, ring, square\); give the"),
        (resume + ['--model', 'densenet_bc_100_k12'], r'--model densenet_bc_100_k12 differs from the interrupted '
                                                      r'run in'),
        (resume + ['--in-chans', '3'], r'--in-chans 3 differs from the interrupted run in'),
    ]
    before = snapshot(tmp_path)
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err.split(': error: ', 1)[-1]), (argv, err)
        assert snapshot(tmp_path) == before, argv  # nothing written
    # the interrupted run resumes as it was started: multi-label, grey, the same labels
    assert main(resume) == 0
    config = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert config['model_args']['in_chans'] == 1 and len(config['label_thresholds']) == len(SHAPES)
    assert 'wrote ' in capsys.readouterr().out and not (tmp_path / 'run' / '.finetune-state.pth').exists()


def test_a_single_label_run_does_not_resume_as_multilabel(tmp_path, monkeypatch, capsys):
    import timm_densenet_ext.finetune as finetune_module
    data = write_image_folder(tmp_path / 'fruit', ['apple', 'banana'], train=2, val=1)
    tiny = tiny_hub_folder(tmp_path / 'tiny', ['x', 'y'])
    with monkeypatch.context() as patch:
        patch.setattr(finetune_module, 'evaluate', lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(['finetune', '-m', f'local-dir:{tiny}', '--data-dir', str(data), '--output',
                     str(tmp_path / 'run'), '--epochs', '2', '-b', '2']) == 130
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert main(['finetune', '--resume', '--output', str(tmp_path / 'run'), '--multi-label']) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and 'its interrupted run is single-label (an image folder of classes); resume ' \
        'it without --multi-label, or start again with --force.' in err
    assert snapshot(tmp_path) == before


def test_a_checkpoint_file_is_adapted_to_one_channel(tmp_path):
    """`--checkpoint` weights (3 channels) with in_chans=1: the first convolution sums the RGB weights, as timm's
    builder does for pretrained weights, and the model reloads from the hub folder it is written to."""
    rgb = timm.create_model('densenet121', num_classes=3).eval()
    torch.save(rgb.state_dict(), tmp_path / 'rgb.pth')
    grey = load_model('densenet121', weights=tmp_path / 'rgb.pth', in_chans=1)
    assert torch.equal(grey.features.conv0.weight, rgb.features.conv0.weight.sum(dim=1, keepdim=True))
    assert grey.in_chans == 1 and grey.pretrained_cfg['input_size'] == (1, 224, 224)
    with torch.no_grad():
        picture = torch.rand(1, 1, 64, 64)
        assert torch.allclose(grey(picture), rgb(picture.expand(1, 3, 64, 64)), atol=1e-5)


def test_a_hub_folder_card_measures_its_own_input_not_the_tags_test_size():
    """densenet121.ra_in1k's registered test_input_size (3, 288, 288) is its published weights' figure: a card of
    other weights (here a 1-channel folder at 32 px) states only its own input size, and can be measured."""
    cfg = dict(input_size=(1, 32, 32), mean=(0.449,), std=(0.226,), crop_pct=1.0, num_classes=4,
               label_names=list(SHAPES), **config_entries([0.5, 0.4, 0.6, 0.5]))
    text = render_model_card('densenet121', repo_id='me/grey', pretrained_cfg=cfg,
                             model_args=dict(in_chans=1, block_config=(1, 2, 2, 1)))
    assert '(test input size)' not in text and '288' not in text and '| 32 x 32 (input size) |' in text
    assert "img = Image.open('image.jpg').convert('L')" in text and 'thresholds = [0.5, 0.4, 0.6, 0.5]' in text
    assert '**Multi-label:** 4 labels (bar, disk, ring, square)' in text
    rgb = render_model_card('densenet121', repo_id='me/rgb', pretrained_cfg=dict(num_classes=3))
    assert "convert('RGB')" in rgb and 'Multi-label' not in rgb and 'top5_probabilities' in rgb


# ---- validate on a multi-label hub folder: per-label AUROC, thresholds picked on the data, stored on request

def sigmoid_outputs(folder: Path, data: Path, files):
    """The model's own sigmoid probabilities for image files under `data`, computed apart from validate: timm's
    model and transform, each image read in grey, one forward."""
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    with torch.no_grad():
        return model(torch.stack([transform(Image.open(data / f).convert('L')) for f in files])).sigmoid().numpy()


def test_validate_reports_scikit_learn_s_per_label_auroc_and_picks_thresholds(grey_run, tmp_path, capsys):
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score
    out = tmp_path / 'results'
    argv = ['validate', '-m', f'local-dir:{grey_run.out}', '--data-dir', str(grey_run.data), '--output', str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = timm_densenet_ext.validate(f'local-dir:{grey_run.out}', grey_run.data, progress=False)
    table = read_labels(grey_run.data / 'labels.csv', grey_run.data).split('val')
    p, t = sigmoid_outputs(grey_run.out, grey_run.data, table.files), table.matrix()
    aurocs = [roc_auc_score(t[:, j], p[:, j]) for j in range(len(SHAPES))]
    assert result.task == 'multi-label' and result.classes == list(SHAPES) and result.evaluated == len(t) == 200
    assert [c.auroc for c in result.per_class] == pytest.approx(aurocs, abs=1e-6)
    assert result.mean_auroc == pytest.approx(np.mean(aurocs), abs=1e-6) and result.mean_auroc >= 0.95
    print(f'validate on the val/ rows: mean AUROC {result.mean_auroc:.4f}')
    stored = json.loads((grey_run.out / 'config.json').read_text())['label_thresholds']
    assert [c.threshold for c in result.per_class] == stored
    assert [c.picked_threshold for c in result.per_class] == pytest.approx(pick_thresholds(p, t, 'f1'), abs=1e-6)
    precision, recall, f1, _ = precision_recall_fscore_support(t, p >= np.array(stored), average=None)
    measured = np.array([(c.precision, c.recall, c.f1) for c in result.per_class])
    assert measured == pytest.approx(np.stack([precision, recall, f1], axis=1), abs=1e-6)
    assert [c.positives for c in result.per_class] == t.sum(axis=0).tolist()
    assert result.top1 is None and result.confusion is None and result.data_dir == grey_run.data / 'val'

    saved = json.loads((out / 'results.json').read_text())
    assert saved['task'] == 'multi-label' and saved['mean_auroc'] == round(result.mean_auroc, 4)
    assert saved['top1'] is None and saved['img_size'] == 32 and saved['evaluated'] == 200
    for record, c in zip(saved['per_class'], result.per_class):
        assert {k: record[k] for k in ('name', 'auroc', 'threshold', 'picked_threshold', 'positives', 'precision',
                                       'recall', 'f1')} == dict(
            name=c.name, auroc=round(c.auroc, 4), threshold=c.threshold, picked_threshold=c.picked_threshold,
            positives=c.positives, precision=round(c.precision, 4), recall=round(c.recall, 4), f1=round(c.f1, 4))
    with Image.open(out / 'roc.png') as picture:
        assert picture.format == 'PNG' and picture.width >= 400 and np.asarray(picture.convert('L')).std() > 20
    assert sorted(p.name for p in out.iterdir()) == ['results.json', 'roc.png']
    assert f'mean AUROC {result.mean_auroc:.4f}  every label right {result.correct}/200' in printed
    for c in result.per_class:
        assert re.search(rf'^{c.name} +{c.auroc:.4f} +{c.threshold:.4f} +{c.picked_threshold:.4f} ', printed, re.M)
    assert f'wrote {out / "roc.png"}' in printed


def test_a_grey_model_s_class_activation_maps(grey_run, tmp_path, capsys):
    """`predict --cam` reads a 1-channel model's images in grey, as its predictions do, and maps its top label."""
    images = [grey_run.data / 'val' / f'{i:05d}.png' for i in range(2)]
    assert main(['predict', '-m', f'local-dir:{grey_run.out}', *map(str, images), '--cam', str(tmp_path / 'cams')]) == 0
    assert sorted(p.name for p in (tmp_path / 'cams').iterdir()) == sorted(p.name for p in images)
    wrote = [line for line in capsys.readouterr().out.splitlines() if line.startswith('wrote ')]
    assert len(wrote) == 2 and all('Grad-CAM of ' in line for line in wrote)
    with Image.open(tmp_path / 'cams' / images[0].name) as overlay:
        assert overlay.mode == 'RGB' and overlay.size == (32, 32)


def test_write_thresholds_stores_the_picked_ones_where_predict_reads_them(grey_run, tmp_path, capsys):
    """Thresholds picked on other images (one of them unreadable: skipped and counted) replace config.json's, the
    unedited card says the same, and predict then decides with them."""
    folder = tmp_path / 'model'
    shutil.copytree(grey_run.out, folder)
    other = tmp_path / 'other'
    write_shapes_multilabel(other, 1, 60, size=32, seed=7, form='columns')
    (other / 'val' / '00000.png').write_bytes(b'not a png')
    before = json.loads((folder / 'config.json').read_text())
    assert main(['validate', '-m', f'local-dir:{folder}', '--data-dir', str(other), '--write-thresholds']) == 0
    out, err = capsys.readouterr()
    assert 'on ' + str(other / 'val') + ': 59 of 60 images, 1 unreadable skipped' in out
    assert len(err.splitlines()) == 1 and 'skipped: ' in err and '00000.png' in err
    table = read_labels(other / 'labels.csv', other).split('val')
    p = sigmoid_outputs(folder, other, table.files[1:])
    picked = pick_thresholds(p, table.matrix()[1:], 'f1')
    config = json.loads((folder / 'config.json').read_text())
    assert config['label_thresholds'] == pytest.approx(picked, abs=1e-6) and config['threshold_rule'] == 'f1'
    assert config['label_thresholds'] != before['label_thresholds']
    assert {k: v for k, v in config.items() if k not in ('label_thresholds', 'timm_densenet_ext_card')} == {
        k: v for k, v in before.items() if k not in ('label_thresholds', 'timm_densenet_ext_card')}
    assert f'wrote {folder / "config.json"}' in out and f'wrote {folder / "README.md"}' in out
    card = (folder / 'README.md').read_text()
    assert f'thresholds = {[round(x, 4) for x in config["label_thresholds"]]}' in card
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert thresholds_from_config(config, 4) == config['label_thresholds']

    images = [other / table.files[i] for i in range(1, 4)]
    assert main(['predict', '-m', f'local-dir:{folder}', *map(str, images)]) == 0
    expected = []
    for path, probabilities in zip(images, sigmoid_outputs(folder, other, table.files[1:4])):
        found = findings(probabilities.tolist(), config['label_thresholds'], SHAPES)
        expected += [str(path)] + [f'  {100 * q:6.2f}%  {name}' for name, q in found] + (
            [] if found else ['  no label at or above its threshold'])
    assert capsys.readouterr().out.splitlines() == expected
    # measured again, the folder's thresholds are those the data picks
    again = timm_densenet_ext.validate(f'local-dir:{folder}', other, progress=False)
    assert [c.threshold for c in again.per_class] == [c.picked_threshold for c in again.per_class]


def test_bad_multilabel_validate_input_is_one_line_exit_code_2_and_writes_nothing(grey_run, tmp_path, capsys):
    model = ['-m', f'local-dir:{grey_run.out}']
    data = tmp_path / 'data'
    write_shapes_multilabel(data, 1, 4, size=32, seed=1)
    rows = (data / 'labels.csv').read_text().splitlines()
    csvs = {name: tmp_path / f'{name}.csv' for name in ('unknown', 'columns', 'missing', 'no-row')}
    csvs['unknown'].write_text('\n'.join(rows[:-1] + [rows[-1].split(',')[0] + ',bar|lump']) + '\n')
    csvs['columns'].write_text('file,bar,disk,ring\n' + ''.join(f'{r.split(",")[0]},0,1,0\n' for r in rows[1:]))
    csvs['missing'].write_text('\n'.join(rows + ['val/00009.png,bar']) + '\n')
    csvs['no-row'].write_text('\n'.join(rows[:-1]) + '\n')
    single = f'local-dir:{tiny_hub_folder(tmp_path / "single", ["x", "y"])}'
    empty = tmp_path / 'empty'
    empty.mkdir()
    validate = ['validate', '--data-dir', str(data), '--output', str(tmp_path / 'out')]
    cases = [
        (['validate', *model, '--data-dir', str(empty)], r'empty/labels\.csv: no such file; local-dir:.* is '
                                                          r'multi-label: give --labels CSV, a row per image'),
        (validate + model + ['--labels', str(csvs['unknown'])], r"names label 'lump', which the model does not know; "
                                                               r'give a CSV of its labels \(bar, disk, ring, square\)'),
        (validate + model + ['--labels', str(csvs['columns'])], r"has no column for the model's label 'square'; give"),
        (validate + model + ['--labels', str(csvs['missing'])], r'names val/00009\.png, which is not in .*; add the '),
        (validate + model + ['--labels', str(csvs['no-row'])], r'holds val/00003\.png without a row in .*no-row\.csv'),
        (validate + ['-m', single, '--write-thresholds'], r'^--write-thresholds: is for multi-label models .*: leave '
                                                         r'it out\.$'),
        (validate + ['-m', single, '--labels', str(csvs['columns'])], r'^--labels \.\.\.: is for multi-label models'),
    ]
    before = snapshot(tmp_path), snapshot(grey_run.out)
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err.split(': error: ', 1)[-1]), (argv, err)
        assert (snapshot(tmp_path), snapshot(grey_run.out)) == before, argv  # nothing written


def test_a_label_the_data_holds_one_class_of_has_no_auroc_and_keeps_its_threshold(grey_run, tmp_path):
    from sklearn.metrics import roc_auc_score
    folder, data = tmp_path / 'model', tmp_path / 'data'
    shutil.copytree(grey_run.out, folder)
    write_shapes_multilabel(data, 1, 4, size=32, seed=1)
    (data / 'labels.csv').write_text('file,labels\ntrain/00000.png,bar\nval/00000.png,bar\nval/00001.png,bar|square\n'
                                     'val/00002.png,disk\nval/00003.png,square\n')  # no ring in val/
    stored = json.loads((folder / 'config.json').read_text())['label_thresholds']
    result = timm_densenet_ext.validate(f'local-dir:{folder}', data, write_thresholds=True, progress=False)
    ring = result.per_class[SHAPES.index('ring')]
    assert (ring.auroc, ring.picked_threshold, ring.positives) == (None, None, 0)
    assert result.auroc_note.startswith('AUROC undefined for ring: ')
    table = read_labels(data / 'labels.csv', data, label_names=SHAPES).split('val')
    p, t = sigmoid_outputs(folder, data, table.files), table.matrix()
    defined = [j for j in range(4) if j != SHAPES.index('ring')]
    assert result.mean_auroc == pytest.approx(np.mean([roc_auc_score(t[:, j], p[:, j]) for j in defined]), abs=1e-6)
    written = json.loads((folder / 'config.json').read_text())['label_thresholds']
    assert written[SHAPES.index('ring')] == stored[SHAPES.index('ring')]
    assert [written[j] for j in defined] == [result.per_class[j].picked_threshold for j in defined]
