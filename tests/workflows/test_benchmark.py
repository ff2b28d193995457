"""The benchmark runs every candidate side by side and writes its table, JSON and chart (figures not asserted)."""
import argparse
import json
import statistics

import pytest
from PIL import Image

from timm_densenet_ext import cli
from timm_densenet_ext.benchmark import CANDIDATES, add_arguments, format_table, peak_memory, run_benchmark
from timm_densenet_ext.benchmark.candidates import prepare, select

INFERENCE = ['timm', 'timm channels_last', 'torchvision', 'ours', 'ours fused', 'onnxruntime', 'openvino f32',
             'openvino default']
INT8 = ['ours int8 onnxruntime', 'ours int8 openvino']
TRAIN = ['timm', 'timm memory_efficient', 'torchvision', 'torchvision memory_efficient', 'ours',
         'ours memory_efficient']


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    # one run for every test below: each ONNX export of densenet121 and the int8 quantization take most of its time
    code = cli.main(['benchmark', '-m', 'densenet121', '-b', '2', '--img-size', '32', '--repeats', '2',
                     '--no-compile', '--no-memory', '--precision', 'fp32', 'int8', '--output', str(out)])
    return code, out


def test_benchmark_writes_json_and_chart(run):
    code, out = run
    assert code == 0
    result = json.loads((out / 'benchmark.json').read_text())
    rows = {(r['mode'], r['name']): r for r in result['results']}
    assert [n for m, n in rows if m == 'inference'] == INFERENCE + INT8
    assert [n for m, n in rows if m == 'train'] == TRAIN
    for (mode, name), r in rows.items():
        assert len(r['times_s']) == 2 and r['images_per_s'] > 0 and 0 < r['efficiency']
        # the figures follow from the recorded times: the median, images per second, the ratio to timm's median
        median = statistics.median(r['times_s'])
        assert r['median_s'] == pytest.approx(median) and r['images_per_s'] == pytest.approx(2 / median)
        timm_median = statistics.median(rows[(mode, 'timm')]['times_s'])
        assert r['speedup_vs_timm'] == pytest.approx(timm_median / median, rel=1e-9)
    # same weights, same outputs: our paths, torchvision's, and the runtimes on our ONNX export in fp32
    for name in ('ours', 'ours fused', 'torchvision', 'timm channels_last', 'onnxruntime', 'openvino f32'):
        assert rows[('inference', name)]['max_rel_diff_vs_timm'] <= 1e-4
    # what each costs before its first output is recorded (an ONNX export and a runtime's compile, for the runtimes)
    assert all(r['first_output_s'] > 0 for r in rows.values())
    assert result['conv_peak_gflops'] > 0 and result['gmacs_per_image'] > 0
    assert result['machine']['torch'] and result['command'].startswith('timm-densenet-ext benchmark')
    with Image.open(out / 'benchmark.png') as im:
        assert im.format == 'PNG' and im.size[0] > 400


def test_benchmark_table_names_every_candidate(run, capsys):
    _, out = run
    table = format_table(json.loads((out / 'benchmark.json').read_text()))
    for name in set(INFERENCE + TRAIN):
        assert f'| {name} |' in table
    assert 'densenet121, batch 2, 32 px' in table


def test_benchmark_keeps_existing_results(run, capsys):
    _, out = run
    before = (out / 'benchmark.json').read_text()
    code = cli.main(['benchmark', '--batch-size', '1', '--img-size', '32', '--repeats', '1', '--no-compile',
                     '--no-train', '--no-memory', '--out', str(out)])
    assert code == 2
    assert 'exists; pass --force' in capsys.readouterr().err
    assert (out / 'benchmark.json').read_text() == before


def test_benchmark_rejects_unknown_model(capsys):
    assert cli.main(['benchmark', '--model', 'resnet9000', '--no-compile']) == 2
    assert "unknown model 'resnet9000'" in capsys.readouterr().err


def test_peak_memory_probe_in_its_own_process():
    """The CPU figure comes from a fresh process; training holds more than inference of the same model, and at
    least the activations a DenseNet-121 step must keep: the first block's concatenated input alone, 2 x 256 x 16 x 16
    float32 at 64 px, is 0.5 MiB, and training keeps every layer's."""
    train = peak_memory('train', 'ours', 'densenet121', batch_size=2, img_size=64, repeats=1, timeout=300)
    infer = peak_memory('inference', 'ours', 'densenet121', batch_size=2, img_size=64, repeats=1, timeout=300)
    assert 2 * 256 * 16 * 16 * 4 < infer < train < 2 ** 30


def test_a_hanging_memory_probe_is_stopped():
    with pytest.raises(RuntimeError, match=r'took over 1 s; .*--no-memory'):
        peak_memory('train', 'ours', 'densenet121', batch_size=2, img_size=64, repeats=1, timeout=1)


def test_candidates_table():
    """One table: its order is the results' order; compiled entries only when compiling, and never re-built (and
    compiled again) in a memory probe."""
    setup = prepare('densenet121', 1, 32, 'cpu', 'float32', 0)
    assert [c.name for c in select('inference', setup, compile=False)] == INFERENCE
    assert [c.name for c in select('train', setup, compile=True)] == TRAIN
    assert [c.name for c in select('inference', setup, compile=True)] == [
        'timm', 'timm channels_last', 'timm channels_last compiled', 'torchvision', 'ours', 'ours fused',
        'ours fused compiled', 'onnxruntime', 'openvino f32', 'openvino default']
    # the runtimes take fp32 ONNX on the CPU: not under autocast
    bf16 = prepare('densenet121', 1, 32, 'cpu', 'bfloat16', 0)
    assert not {'onnxruntime', 'openvino f32'} & {c.name for c in select('inference', bf16, compile=False)}
    assert all(not c.memory_probe for c in CANDIDATES if c.compiled)


def test_a_variant_timm_lacks_is_measured_alone():
    """The CIFAR variants have no timm or torchvision twin: ours alone, nothing to compare with, labels within the
    variant's 100 classes."""
    result = run_benchmark('densenet_bc_100_k12', batch_size=2, img_size=32, repeats=1, compile=False, memory=False,
                           log=lambda s: None)
    assert [(r['mode'], r['name']) for r in result['results']] == [
        ('inference', 'ours'), ('inference', 'ours fused'), ('inference', 'onnxruntime'), ('inference', 'openvino f32'),
        ('inference', 'openvino default'), ('train', 'ours'), ('train', 'ours memory_efficient')]
    assert all(r['speedup_vs_timm'] is None and r['max_rel_diff_vs_timm'] is None for r in result['results'])
    assert '| inference | ours fused | ' in format_table(result)


# --- --precision: our deployment path (optimize_for_inference) next to the peers -----------------------------------


def names(setup, compile, precisions):
    """The inference candidates `select` measures."""
    return [c.name for c in select('inference', setup, compile, precisions)]


def test_benchmark_measures_our_int8_deployment(run):
    """int8 quantized from the shared weights, calibrated on the input batch, run by both runtimes: measured with the
    quantization in its first output's time; fp32 is asked for too, but without compiling its compiled path is not."""
    code, out = run
    assert code == 0
    result = json.loads((out / 'benchmark.json').read_text())
    assert result['config']['precision'] == ['fp32', 'int8'] and result['config']['compile'] is False
    rows = {r['name']: r for r in result['results'] if r['mode'] == 'inference'}
    assert list(rows) == INFERENCE + INT8  # the peers kept, ours optimized fp32 (compiled) dropped
    for name in INT8:
        r = rows[name]
        assert r['first_output_s'] > 0 and r['images_per_s'] > 0 and r['peak_memory_mib'] is None
        # int8 of the same weights: near timm's fp32 output, and not it (something was quantized)
        assert 1e-4 < r['max_rel_diff_vs_timm'] < 0.2, name
    assert all(f'| {name} |' in format_table(result) for name in INT8)


def test_precision_choices_on_the_command_line(capsys):
    p = argparse.ArgumentParser()
    add_arguments(p)  # what the CLI, `python -m timm_densenet_ext.benchmark` and benchmarks/benchmark.py parse with
    assert p.parse_args([]).precision == ['fp32']
    assert p.parse_args(['--precision', 'bf16', 'int8', 'fp32']).precision == ['bf16', 'int8', 'fp32']
    with pytest.raises(SystemExit) as exit:
        cli.main(['benchmark', '--no-train', '--precision', 'fp16'])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --precision: invalid choice: 'fp16'" in err and 'int8' in err, err
    with pytest.raises(ValueError, match=r"precisions: unknown 'fp16'; choose from fp32, bf16, int8"):
        run_benchmark(precisions=('fp16',), log=lambda s: None)


def test_precision_candidates_in_the_table():
    """Each precision adds its own entries, after the peers; the compiled ones only when compiling, none probed for
    memory (a probe would build, quantize or compile them again); int8 only where the runtimes take it (CPU, fp32)."""
    setup = prepare('densenet121', 1, 32, 'cpu', 'float32', 0)
    assert names(setup, True, ('fp32',)) == [
        'timm', 'timm channels_last', 'timm channels_last compiled', 'torchvision', 'ours', 'ours fused',
        'ours fused compiled', 'onnxruntime', 'openvino f32', 'openvino default', 'ours optimized fp32']
    assert names(setup, True, ('fp32', 'bf16', 'int8'))[-4:] == ['ours optimized fp32', 'ours optimized bf16'] + INT8
    assert names(setup, False, ('fp32', 'bf16', 'int8'))[-2:] == INT8  # --no-compile: no Inductor paths
    assert [c.name for c in select('train', setup, True, ('fp32', 'bf16', 'int8'))] == TRAIN
    bf16 = prepare('densenet121', 1, 32, 'cpu', 'bfloat16', 0)
    assert not set(INT8) & set(names(bf16, True, ('int8',)))
    assert all(not c.memory_probe for c in CANDIDATES if c.precision)
