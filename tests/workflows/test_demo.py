"""`timm-densenet-ext demo`: the digits as an image folder, fine-tuned through `finetune`, the hub folder reloaded
with `local-dir:` and measured again. Run here for one epoch; the full demo's accuracy and time are in the README,
measured by hand."""
import json
import shlex

import numpy as np
import pytest
from huggingface_hub import ModelCard

from timm_densenet_ext import demo
from timm_densenet_ext.cli import main
from timm_densenet_ext.hub import upload_files

READ_IMAGES = []  # every image file the demo run read, in order


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """The demo from the command line, as the README runs it, for one epoch of the recipe's eight."""
    import contextlib
    import io
    from timm_densenet_ext import images
    out = tmp_path_factory.mktemp('demo') / 'densenet-demo'
    stdout = io.StringIO()
    read = READ_IMAGES
    with contextlib.redirect_stdout(stdout), pytest.MonkeyPatch.context() as patch:
        patch.setattr(images, 'read_image', lambda path, _read=images.read_image: read.append(str(path)) or _read(path))
        code = main(['demo', '--out', str(out), '--epochs', '1'])
    assert code == 0
    return out, stdout.getvalue()


def test_writes_the_digits_as_an_image_folder_split_by_class(demo_run):
    from sklearn.datasets import load_digits
    out, printed = demo_run
    counts = {split: {c.name: len(list(c.iterdir())) for c in (out / 'data' / split).iterdir()}
              for split in ('train', 'val')}
    assert sorted(counts['train']) == sorted(counts['val']) == [str(d) for d in range(10)]
    assert sum(counts['train'].values()) == 1437 and sum(counts['val'].values()) == 360
    per_class = np.bincount(load_digits().target)
    for digit, n in enumerate(per_class):  # stratified: every class split 80/20
        assert counts['val'][str(digit)] in (int(n * 0.2), int(n * 0.2) + 1)
    assert f'wrote 1437 training and 360 validation images of scikit-learn\'s handwritten digits to {out / "data"}' \
        in printed


def test_every_image_is_read_by_the_one_image_reader(demo_run):
    """Training, validation and the reloaded model's validation all read images with `images.read_image`."""
    out, _ = demo_run
    train = sorted(str(p) for p in (out / 'data' / 'train').rglob('*.png'))
    val = sorted(str(p) for p in (out / 'data' / 'val').rglob('*.png'))
    read_train = [p for p in READ_IMAGES if '/data/train/' in p]
    read_val = sorted(p for p in READ_IMAGES if '/data/val/' in p)
    assert len(READ_IMAGES) == len(read_train) + len(read_val)
    # one epoch of full batches (the last, partial one is dropped), each image once
    assert len(read_train) == len(set(read_train)) == len(train) // demo.DEMO_RECIPE['batch_size'] * \
        demo.DEMO_RECIPE['batch_size'] and set(read_train) <= set(train)
    assert read_val == sorted(val + val)  # validated by finetune, then by the reloaded model


def test_the_reloaded_hub_folder_measures_what_training_measured(demo_run):
    out, printed = demo_run
    lines = printed.splitlines()
    epoch = next(line for line in lines if line.startswith('epoch   1/1'))
    trained_correct = epoch.split('(')[1].split(')')[0]
    reloaded = next(line for line in lines if line.startswith('reloaded '))
    assert reloaded.startswith(f"reloaded timm.create_model('local-dir:{out / demo.MODEL_FOLDER}', pretrained=True): "
                               f'validation accuracy ')
    assert f'({trained_correct})' in reloaded  # the same images right, after the round trip through the folder
    assert int(trained_correct.split('/')[0]) > 36  # better than chance (10 classes), even after one epoch

    files = [name for name, _ in upload_files(out / demo.MODEL_FOLDER)]
    assert files == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((out / demo.MODEL_FOLDER / 'config.json').read_text())
    assert config['architecture'] == demo.DEMO_MODEL and config['label_names'] == [str(d) for d in range(10)]
    card = ModelCard.load(out / demo.MODEL_FOLDER / 'README.md')
    assert "scikit-learn's handwritten digits" in card.text and 'random initialisation' in card.text
    assert f'batch size {demo.DEMO_RECIPE["batch_size"]}' in card.text
    assert f'learning rate {demo.DEMO_RECIPE["lr"]:g}' in card.text
    assert card.data.eval_results[0].dataset_name == 'scikit-learn digits'


def test_says_where_everything_went_and_the_next_commands_work(demo_run, capsys):
    out, printed = demo_run
    assert f'Everything is in {out}/:' in printed
    assert f'{out / "data"}/' in printed and f'{out / demo.MODEL_FOLDER}/' in printed
    commands = [line.strip() for line in printed.splitlines() if line.strip().startswith('timm-densenet-ext ')]
    assert [c.split()[1] for c in commands] == ['predict', 'validate', 'export', 'push']
    predict = shlex.split(commands[0])[1:]
    assert main(predict) == 0
    result = capsys.readouterr().out.splitlines()
    assert result[0] == predict[-1] and len(result) == 6  # the image, then its top 5 digits


def test_an_earlier_run_is_kept_without_force(demo_run, capsys):
    out, _ = demo_run
    before = (out / demo.MODEL_FOLDER / 'model.safetensors').read_bytes()
    assert main(['demo', '--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f'timm-densenet-ext demo: error: {out / "data"}: exists from an earlier run; pass '
                                f'--force to replace it, or give another --output DIR.']
    assert (out / demo.MODEL_FOLDER / 'model.safetensors').read_bytes() == before
