"""Multi-label data (CheXNet / torchxrayvision style): label CSVs in both forms read as the same table, bad ones
refused in one line; grey images with one mean/std through timm's transforms; a 1-channel DenseNet adapted from
3-channel weights; per-label AUROC and thresholds from scikit-learn; and a small DenseNet that learns the generated
findings to a mean validation AUROC of 0.95 or more."""
import itertools
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import timm_densenet_ext  # noqa: F401  (registers the variants)
from timm_densenet_ext.multilabel import (
    SHAPES, LabelTable, MultiLabelDataset, auroc_per_label, config_entries, findings, grayscale_data_config,
    input_img_mode, pick_thresholds, read_labels, thresholds_from_config, write_labels, write_shapes_multilabel)

TINY_DENSENET = dict(block_config=(1, 2, 2, 1))  # densenet121's stem and layers, six of them: 0.1M parameters


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """Eight training and four validation images of the generated findings, labelled in the 'pipe' form."""
    root = tmp_path_factory.mktemp('shapes') / 'data'
    table = write_shapes_multilabel(root, 8, 4, size=32, seed=3)
    return root, table


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


def test_a_small_grey_densenet_learns_the_findings_to_a_mean_auroc_of_095(tmp_path):
    """A 1-channel DenseNet (densenet121's stem, six layers) with a sigmoid per finding and binary cross-entropy,
    trained by a plain loop for 6 epochs on 400 generated images at 32 px; measured on 200 others."""
    torch.manual_seed(0)
    write_shapes_multilabel(tmp_path, 400, 200, size=32, seed=0)
    table = read_labels(tmp_path / 'labels.csv', tmp_path)
    model = timm.create_model('densenet121', in_chans=1, num_classes=len(table.names), **TINY_DENSENET)
    config = dict(grayscale_data_config(model, img_size=32), crop_pct=1.0)
    transform = timm.data.create_transform(**config)

    def tensors(split):
        data = MultiLabelDataset(tmp_path, table.split(split), transform, input_img_mode(config))
        return torch.stack([data[i][0] for i in range(len(data))]), data.targets

    (images, targets), (val_images, val_targets) = tensors('train'), tensors('val')
    epochs, batch = 6, 32
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 5e-3, total_steps=epochs * (len(images) // batch),
                                                   pct_start=0.15)
    criterion = torch.nn.BCEWithLogitsLoss()
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        batches = torch.randperm(len(images), generator=order)[:len(images) // batch * batch].view(-1, batch)
        for index in batches:
            loss = criterion(model(images[index]), targets[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        probabilities = model(val_images).sigmoid()
    report = auroc_per_label(probabilities, val_targets, table.names)
    print(f'mean validation AUROC {report["mean"]:.4f}:',
          ', '.join(f'{name} {auroc:.4f}' for name, auroc in report['per_label'].items()))
    assert report['undefined'] == [] and report['mean'] >= 0.95
    assert min(report['per_label'].values()) >= 0.9
    thresholds = pick_thresholds(probabilities, val_targets)
    predicted = (probabilities >= torch.tensor(thresholds)).float()
    assert (predicted == val_targets).float().mean() >= 0.9  # the thresholds turn probabilities into findings
