"""What reduced precision costs in accuracy: a DenseNet fine-tuned by our own `finetune` on real images
(scikit-learn's handwritten digits), measured on its validation images at fp32, bf16 and int8 (ONNX Runtime and
OpenVINO running the same int8 file), with top-1 agreement against fp32.

    OMP_NUM_THREADS=2 python benchmarks/precision_accuracy.py                      # the demo's DenseNet-BC, 8 px
    OMP_NUM_THREADS=2 python benchmarks/precision_accuracy.py -m densenet121 --img-size 32 --epochs 4

The model is trained from random weights (the Hub is out of reach here) into --output (default: a temporary
folder), or taken from --checkpoint (a hub folder 'local-dir:DIR' trained on the same --data-dir). The int8 scales
come from 256 training images; every number is on the validation split.
"""
import argparse
import tempfile
import time
from pathlib import Path

import timm
import torch

import timm_densenet_ext
from timm_densenet_ext.demo import DEMO_MODEL, DEMO_RECIPE, write_digits_folder
from timm_densenet_ext.finetune import finetune, image_dataset


def _tensors(folder: Path, transform) -> tuple:
    dataset = image_dataset(folder, transform)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('-m', '--model', default=DEMO_MODEL)
    p.add_argument('--img-size', type=int, default=None, help='default: the demo recipe\'s 8 px')
    p.add_argument('--epochs', type=int, default=None, help='default: the demo recipe\'s')
    p.add_argument('--data-dir', default=None, help='the digits as train/ and val/ (written there if missing)')
    p.add_argument('--checkpoint', default=None, help="a hub folder 'local-dir:DIR' to measure instead of training")
    p.add_argument('--output', default=None, help='where the fine-tuned hub folder goes (default: temporary)')
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix='precision-accuracy-'))
    data_dir = Path(args.data_dir or work / 'digits')
    if not (data_dir / 'train').is_dir():
        write_digits_folder(data_dir)
    if args.checkpoint:
        model = timm.create_model(args.checkpoint, pretrained=True)
    else:
        out = Path(args.output or work / 'model')
        recipe = {**DEMO_RECIPE, **{k: v for k, v in (('img_size', args.img_size), ('epochs', args.epochs)) if v}}
        started = time.perf_counter()
        finetune(args.model, data_dir, out, progress=False, log=lambda line: None, **recipe)
        print(f'fine-tuned {args.model} on {data_dir} in {time.perf_counter() - started:.0f} s: {recipe}')
        model = timm.create_model(f'local-dir:{out}', pretrained=True)
    model.eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    val_x, val_y = _tensors(data_dir / 'val', transform)
    train_x, _ = _tensors(data_dir / 'train', transform)
    calibration = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:256]].split(32)
    with torch.no_grad():
        reference = model(val_x)
    runs = {'fp32 (PyTorch)': lambda x: model(x)}
    runs['fp32 optimize_for_inference'] = timm_densenet_ext.optimize_for_inference(model, 'fp32')
    runs['bf16 optimize_for_inference'] = timm_densenet_ext.optimize_for_inference(model, 'bf16')
    for engine in ('onnxruntime', 'openvino'):
        runs[f'int8 {engine}'] = timm_densenet_ext.optimize_for_inference(
            model, 'int8', calibration=calibration, engine=engine)
    scale = reference.abs().max().item()
    print(f'{len(val_y)} validation images, {args.model} at {tuple(val_x.shape[-2:])} px')
    print('| run | top-1 accuracy | agreement with fp32 | largest logit difference / largest logit |')
    print('|---|---:|---:|---:|')
    for name, run in runs.items():
        with torch.no_grad():
            logits = torch.cat([run(x) for x in val_x.split(64)])
        accuracy = (logits.argmax(1) == val_y).float().mean().item()
        agreement = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
        diff = (logits - reference).abs().max().item() / scale
        print(f'| {name} | {100 * accuracy:.2f}% | {100 * agreement:.2f}% | {diff:.1e} |')


if __name__ == '__main__':
    main()
