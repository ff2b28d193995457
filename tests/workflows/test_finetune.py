"""`timm-densenet-ext finetune`: an image folder in, the best epoch out as a hub folder (weights, label names, a card
with data, recipe and accuracy), resumable after an interruption, with one-line errors for bad folders."""
import json
import re
from types import SimpleNamespace

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from torchvision.datasets import ImageFolder

import timm_densenet_ext  # noqa: F401  (registers the variants)
from model_helpers import trained
from timm_densenet_ext import finetune as finetune_module
from timm_densenet_ext.cli import main
from timm_densenet_ext.finetune import STATE_FILE, evaluate, finetune
from timm_densenet_ext.hub import upload_files
from timm_densenet_ext.predict import preprocessing
from workflow_helpers import tiny_hub_folder, write_image_folder

CLASSES = ['apple', 'banana', 'cherry']
RECIPE = ['--epochs', '3', '--batch-size', '6', '--lr', '0.01', '--hflip', '0', '--scale', '0.7', '1']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('finetune')
    return SimpleNamespace(
        root=root, images=write_image_folder(root / 'fruit', CLASSES, train=8, val=4),
        base=tiny_hub_folder(root / 'base', ['x', 'y']))


@pytest.fixture(scope='module')
def trained_run(data):
    """`finetune` from the command line, from a tiny hub folder: three epochs on three classes."""
    import contextlib
    import io
    out, stdout = data.root / 'fruit-model', io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(['finetune', '--model', f'local-dir:{data.base}', '--data', str(data.images), '--out', str(out),
                     *RECIPE, '--repo-id', 'me/fruit'])
    assert code == 0
    return SimpleNamespace(out=out, stdout=stdout.getvalue())


def test_writes_the_best_epoch_as_a_hub_folder(data, trained_run):
    out = trained_run.out
    assert [name for name, _ in upload_files(out)] == ['README.md', 'config.json', 'model.safetensors']
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']  # no state
    assert sorted(p.name for p in data.root.iterdir()) == ['base', 'fruit', 'fruit-model']  # no temporaries

    lines = trained_run.stdout.splitlines()
    epochs = [line for line in lines if line.startswith('epoch ')]
    assert len(epochs) == 3 and all('train loss ' in e and 'val accuracy ' in e and '(' in e for e in epochs)
    accuracies = [float(e.split('val accuracy')[1].split('%')[0]) for e in epochs]
    best_epoch = accuracies.index(max(accuracies)) + 1
    assert 'best' in epochs[best_epoch - 1]
    assert any(line.startswith(f'wrote {out}: epoch {best_epoch}, validation accuracy {max(accuracies):.2f}%')
               for line in lines)

    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'densenet_bc_100_k12' and config['num_classes'] == 3
    assert config['label_names'] == CLASSES and config['model_args']['block_config'] == [2, 2, 2]
    assert config['pretrained_cfg']['input_size'] == [3, 16, 16]

    # the weights written are the best epoch's: the reloaded model measures that epoch's accuracy on val/
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert model.pretrained_cfg['label_names'] == CLASSES
    correct, total = evaluate(model, ImageFolder(str(data.images / 'val'), transform=preprocessing(model)))
    assert total == 12 and 100 * correct / total == pytest.approx(max(accuracies), abs=0.006)
    base = load_file(str(data.base / 'model.safetensors'))
    tuned = load_file(str(out / 'model.safetensors'))
    assert tuned['classifier.weight'].shape == (3, 48) and not torch.equal(
        tuned['features.conv0.weight'], base['features.conv0.weight'])


def test_the_card_records_data_recipe_and_accuracy(data, trained_run):
    card = ModelCard.load(trained_run.out / 'README.md')
    text = card.text
    config = json.loads((trained_run.out / 'config.json').read_text())
    epochs = [line for line in trained_run.stdout.splitlines() if line.startswith('epoch ')]
    best = max(float(e.split('val accuracy')[1].split('%')[0]) for e in epochs)

    assert '## Training' in text and 'the image folder `fruit/`' in text
    assert '- **Images:** 24 for training, 12 for validation\n- **Classes:** apple, banana, cherry (3, in' in text
    assert '- 3 epochs, batch size 6, from `local-dir:' in text
    assert 'AdamW (timm `create_optimizer_v2`), learning rate 0.01, weight decay 0.05' in text
    assert 'input 16 x 16' in text and 'scale (0.7, 1.0), horizontal flip 0' in text
    assert f'**Validation accuracy: {best:.2f}%**' in text
    history = re.findall(r'^\| (\d+) \| \d+\.\d{4} \| (\d+\.\d\d)% \|$', text, flags=re.M)
    assert [int(e) for e, _ in history] == [1, 2, 3] and max(float(a) for _, a in history) == best
    assert '| 224 x 224' not in text and '| 16 x 16 (input size) | 44,' in text  # measured on the tiny model
    assert "timm.create_model('hf-hub:me/fruit', pretrained=True)" in text
    assert "label_names = model.pretrained_cfg['label_names']" in text  # the usage code prints class names
    # the Hub's metadata: the measured accuracy as an evaluation result
    result = card.data.eval_results[0]
    assert result.metric_type == 'accuracy' and result.dataset_name == 'fruit' and result.dataset_split == 'validation'
    assert 100 * result.metric_value == pytest.approx(best, abs=0.01)
    assert config['num_classes'] == 3


def test_an_interrupted_run_resumes_to_the_same_result(data, tmp_path, monkeypatch, capsys):
    argv = ['--model', f'local-dir:{data.base}', '--data', str(data.images), *RECIPE[2:], '--epochs', '2']
    assert main(['finetune', *argv, '--out', str(tmp_path / 'straight')]) == 0

    calls = []

    def interrupted_evaluate(*args, **kwargs):  # Ctrl-C while validating epoch 2
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(finetune_module, 'evaluate', interrupted_evaluate)
    out = tmp_path / 'resumed'
    capsys.readouterr()
    assert main(['finetune', *argv, '--out', str(out)]) == 130
    err = capsys.readouterr().err
    assert f'interrupted: {out / STATE_FILE} holds the last finished epoch' in err and '--resume' in err
    assert [p.name for p in out.iterdir()] == [STATE_FILE]
    state = torch.load(out / STATE_FILE, weights_only=True)
    assert state['epoch'] == 1 and len(state['history']) == 1

    # without --resume the run is not started over by accident
    assert main(['finetune', *argv, '--out', str(out)]) == 2
    assert 'holds an interrupted run; pass --resume to continue it, or --force' in capsys.readouterr().err

    monkeypatch.setattr(finetune_module, 'evaluate', evaluate)
    assert main(['finetune', '--resume', '--out', str(out)]) == 0  # model, data and recipe come from the state
    printed = capsys.readouterr().out
    assert f'resuming {out} after epoch 1 of 2' in printed and 'epoch   2/2' in printed and 'epoch   1/2' not in printed
    straight, resumed = load_file(str(tmp_path / 'straight' / 'model.safetensors')), load_file(
        str(out / 'model.safetensors'))
    assert sorted(straight) == sorted(resumed)
    for key in straight:
        assert torch.allclose(straight[key].float(), resumed[key].float(), atol=1e-5), key
    assert [p.name for p in sorted(out.iterdir())] == ['README.md', 'config.json', 'model.safetensors']


def test_resume_refuses_other_classes_and_settings(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'run'
    monkeypatch.setattr(finetune_module, 'evaluate', lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(['finetune', '--model', f'local-dir:{data.base}', '--data', str(data.images), '--out', str(out),
                 '--epochs', '2', '--batch-size', '6']) == 130
    other = write_image_folder(tmp_path / 'other', ['apple', 'banana', 'durian'], train=2, val=1)
    capsys.readouterr()
    for argv, message in [
        (['--data', str(other)], "its classes (apple, banana, durian) are not the interrupted run's "
                                 "(apple, banana, cherry); give the folder it was started on as --data-dir DIR"),
        (['--lr', '0.5'], '--lr 0.5 differs from the interrupted run in'),
        (['--model', 'densenet121'], '--model densenet121 differs from the interrupted run'),
        (['--force'], 'give --resume to continue an interrupted run, or --force to start it again, not both'),
    ]:
        assert main(['finetune', '--resume', '--out', str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err, err
    assert main(['finetune', '--resume', '--out', str(tmp_path / 'none')]) == 2
    assert 'holds no interrupted run (.finetune-state.pth) to resume' in capsys.readouterr().err


def test_starts_from_a_checkpoint_file(tmp_path, data):
    source = trained('densenet_bc_100_k12', num_classes=7)
    torch.save(source.state_dict(), tmp_path / 'bc.pth')
    # a learning rate so small that the weights stay where they started: the start was the file's
    result = finetune('densenet_bc_100_k12', data.images, tmp_path / 'out', weights=tmp_path / 'bc.pth', epochs=1,
                      batch_size=12, lr=1e-9, img_size=8, progress=False, log=lambda line: None)
    tuned = load_file(str(tmp_path / 'out' / 'model.safetensors'))
    for key, value in source.state_dict().items():
        if key.startswith('classifier.'):
            assert tuned[key].shape[0] == 3
        elif 'running' not in key and 'num_batches' not in key:  # BatchNorm statistics do move in training
            assert torch.allclose(tuned[key], value, atol=1e-6), key
    assert result.best_epoch == 1 and result.classes == CLASSES
    assert 'from the checkpoint `bc.pth`' in (tmp_path / 'out' / 'README.md').read_text()


@pytest.mark.parametrize('layout, message', [
    ('no-train', 'has no train/ folder; arrange the images as DIR/train/CLASS/IMAGE and DIR/val/CLASS/IMAGE'),
    ('no-val', 'has no val/ folder'),
    ('flat', 'train: holds no class sub-folders'),
    ('mismatch', 'train/ and val/ have different classes (only in train/: cherry; only in val/: durian)'),
    ('empty-class', 'put images in every class folder'),
    ('one-class', 'has 1 class; a classifier needs 2 or more'),
])
def test_bad_image_folders_are_one_line_and_exit_code_2(layout, message, tmp_path, capsys):
    root = tmp_path / 'data'
    write_image_folder(root, ['apple', 'banana', 'cherry'] if layout != 'one-class' else ['apple'], train=1, val=1)
    if layout == 'no-train':
        import shutil
        shutil.rmtree(root / 'train')
    elif layout == 'no-val':
        import shutil
        shutil.rmtree(root / 'val')
    elif layout == 'flat':
        import shutil
        shutil.rmtree(root / 'train')
        (root / 'train').mkdir()
        (root / 'train' / 'loose.png').write_bytes((root / 'val' / 'apple' / '000.png').read_bytes())
    elif layout == 'mismatch':
        (root / 'val' / 'cherry').rename(root / 'val' / 'durian')
    elif layout == 'empty-class':
        for image in (root / 'train' / 'banana').iterdir():
            image.unlink()
    code = main(['finetune', '--model', 'densenet_bc_100_k12', '--data', str(root), '--out', str(tmp_path / 'o')])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / 'o').exists()


def test_an_existing_out_folder_is_kept_without_force(data, tmp_path, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    argv = ['finetune', '--model', f'local-dir:{data.base}', '--data', str(data.images), '--out', str(out),
            '--epochs', '1', '--batch-size', '12']
    assert main(argv) == 2
    assert 'folder exists and is not empty; pass --force to replace it' in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ['notes.txt']
    assert main(argv + ['--force']) == 0
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert main(['finetune', '--out', str(out)]) == 2
    assert 'give --model MODEL and --data-dir DIR' in capsys.readouterr().err


def test_threads_are_chosen_for_the_work(monkeypatch):
    from timm_densenet_ext.finetune import choose_threads
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(torch, 'get_num_threads', lambda: 8)
    monkeypatch.setattr(finetune_module, '_cpus', lambda: 8)
    monkeypatch.setattr(finetune_module.os, 'getloadavg', lambda: (0.1, 0.1, 0.1))
    demo = (32, (3, 8, 8), 342)  # the demo: batch 32 of 8 x 8 digits, DenseNet-BC-100 k=12 (342 features)
    assert choose_threads(*demo) == 1
    assert choose_threads(*demo, threads=3) == 3  # an explicit choice wins
    assert choose_threads(32, (3, 224, 224), 1024) == 8  # densenet121 at 224 px: every core
    monkeypatch.setattr(finetune_module.os, 'getloadavg', lambda: (5.2, 5.0, 4.0))
    assert choose_threads(32, (3, 224, 224), 1024) == 3  # beside five busy processes: the cores they leave
    monkeypatch.setattr(finetune_module.os, 'getloadavg', lambda: (9.0, 9.0, 9.0))
    assert choose_threads(32, (3, 224, 224), 1024) == 1
    monkeypatch.setenv('OMP_NUM_THREADS', '4')
    assert choose_threads(*demo) == 8  # OMP_NUM_THREADS set: torch's own count, which it read from there
    with pytest.raises(ValueError, match='threads=0: give 1 or more'):
        choose_threads(*demo, threads=0)


def test_finetune_trains_small_images_on_one_thread_and_restores_torch_s_count(data, tmp_path, monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    seen = []

    def spying_evaluate(*args, **kwargs):
        seen.append(torch.get_num_threads())  # as training left it
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(finetune_module, 'evaluate', spying_evaluate)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        finetune(f'local-dir:{data.base}', data.images, tmp_path / 'out', epochs=1, batch_size=12, progress=False,
                 log=lambda line: None)
        assert seen == [1] and torch.get_num_threads() == 2
        finetune(f'local-dir:{data.base}', data.images, tmp_path / 'out', epochs=1, batch_size=12, progress=False,
                 log=lambda line: None, threads=2, force=True)
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
