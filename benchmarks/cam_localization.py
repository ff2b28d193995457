"""Do our class activation maps point at the evidence? A small DenseNet fine-tuned by our own `finetune` on generated
images whose class is a small coloured shape (red square, green circle, blue triangle) at a random place on a
cluttered background (coloured noise, lines and blobs); on held-out images, the fraction of correctly classified
images whose Grad-CAM peak (`explain`) falls inside the shape's box, beside the same figure for the model with its
weights shuffled (every parameter tensor's values permuted), over five shuffles: a single shuffled model calls almost
every image one class, and whether its map lands on that class's salient shape varies from shuffle to shuffle (0% to
88% at the test's size), so one would say little.

    OMP_NUM_THREADS=1 python benchmarks/cam_localization.py            # the figures, and docs/cam_example.png
    OMP_NUM_THREADS=1 python benchmarks/cam_localization.py --train 200 --epochs 6 --no-picture   # the test's size

tests/workflows/test_explain.py runs the same functions at a smaller size.
"""
import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
from PIL import Image, ImageDraw

import timm_densenet_ext  # noqa: F401  (registers the variants)
from timm_densenet_ext.explain import explain
from timm_densenet_ext.finetune import finetune
from timm_densenet_ext.hub import write_hub_folder
from timm_densenet_ext.loading import load_model

CLASSES = ('blue triangle', 'green circle', 'red square')  # in the order ImageFolder numbers them
COLOURS = ((40, 60, 230), (30, 190, 40), (220, 30, 30))
# densenet121's stem and dense layers, two blocks of two layers, growth rate 16: an 8 x 8 final feature map at 64 px,
# so a map can tell apart places 8 pixels apart. With four blocks (or three, at output stride 8) the last features
# see most of the picture, and the maps of a model trained this briefly spread far beyond the shape (30-60% inside).
MODEL = 'densenet121'
MODEL_ARGS = dict(block_config=(2, 2), growth_rate=16)
Box = Tuple[int, int, int, int]  # x0, y0, x1, y1, inclusive


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    box: Box


def shape_image(rng: np.random.Generator, label: int, size: int = 64) -> Tuple[Image.Image, Box]:
    """A cluttered background with the class's shape, 12 to 17 pixels wide, drawn at a random place; its box."""
    smooth = np.clip(rng.uniform(60, 190, 3) + rng.normal(0, 45, (size // 8, size // 8, 3)), 0, 255)
    smooth = np.asarray(Image.fromarray(smooth.astype(np.uint8)).resize((size, size), Image.BILINEAR), float)
    pixels = smooth + rng.normal(0, 12, (size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 9))):  # lines of any colour
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, 4))
        draw.line((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(3, 6))):  # blobs of any colour, smaller than the shapes
        x, y = (int(v) for v in rng.integers(0, size - 6, 2))
        w, h = (int(v) for v in rng.integers(3, 8, 2))
        draw.ellipse((x, y, x + w, y + h), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    s = int(rng.integers(12, 18))
    x, y = (int(v) for v in rng.integers(1, size - s - 1, 2))
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[label])
    box = (x, y, x + s - 1, y + s - 1)
    if label == 0:
        draw.polygon([(x + s // 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=colour)
    elif label == 1:
        draw.ellipse(box, fill=colour)
    else:
        draw.rectangle(box, fill=colour)
    return image, box


def write_shapes(root: Path, train: int, val: int, test: int, size: int = 64, seed: int = 0) -> List[Sample]:
    """`train` and `val` images per class as an image folder root/{train,val}/CLASS/*.png (finetune's layout), and
    `test` per class in root/test; returns the test images with their classes and boxes."""
    rng = np.random.default_rng(seed)
    samples = []
    for split, n in (('train', train), ('val', val), ('test', test)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image, box = shape_image(rng, label, size)
                image.save(folder / f'{i:04d}.png')
                if split == 'test':
                    samples.append(Sample(folder / f'{i:04d}.png', label, box))
    return samples


def train_model(root: Path, epochs: int, size: int = 64, seed: int = 0,
                log: Callable[[str], None] = print) -> Tuple[torch.nn.Module, float]:
    """A DenseNet (`MODEL`, `MODEL_ARGS`) from random weights, fine-tuned by `finetune` on root/train and root/val;
    the best epoch reloaded from the hub folder it wrote, and its validation accuracy."""
    torch.manual_seed(seed)
    start = timm.create_model(MODEL, num_classes=len(CLASSES), pretrained_cfg_overlay=dict(
        input_size=(3, size, size), crop_pct=1.0, pool_size=None), **MODEL_ARGS)
    write_hub_folder(start, root / 'start', model_name=MODEL, label_names=list(CLASSES))
    # no flips or crops that could move the shape out of the picture; lr as for a small model from scratch
    result = finetune(f'local-dir:{root / "start"}', root, root / 'model', epochs=epochs, batch_size=16, lr=3e-3,
                      scale=(1.0, 1.0), seed=seed, progress=False, log=log)
    return load_model(f'local-dir:{root / "model"}'), result.val_accuracy


def shuffled(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The model with each parameter tensor's values randomly permuted (the same values, in the wrong places)."""
    import copy
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.flatten()[torch.randperm(p.numel(), generator=generator)].view_as(p))
    return model.eval()


def localization(models: Sequence[torch.nn.Module], samples: Sequence[Sample]) -> Dict[str, float]:
    """Over `models` together: of the correctly classified `samples`, how many have the Grad-CAM peak of their
    (predicted, so true) class inside the shape's box; and over all samples, with the true class's map."""
    from timm_densenet_ext.images import read_image
    from timm_densenet_ext.predict import preprocessing
    images = correct = inside_correct = inside_true = 0
    for model in models:
        x = torch.stack([preprocessing(model)(read_image(s.path)) for s in samples])
        with torch.no_grad():
            predicted = model(x).argmax(1).tolist()
        for s, xs, p in zip(samples, x, predicted):
            inside = _inside(_peak(explain(model, xs, s.label)), s.box)
            images += 1
            inside_true += inside
            correct += p == s.label
            inside_correct += inside and p == s.label
    return dict(images=images, correct=correct, inside=inside_correct,
                fraction=inside_correct / correct if correct else 0.0, fraction_true_class=inside_true / images)


def _peak(heatmap: np.ndarray) -> Tuple[int, int]:
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(x), int(y)


def _inside(point: Tuple[int, int], box: Box) -> bool:
    x, y = point
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def picture(model: torch.nn.Module, samples: Sequence[Sample], out: Path, columns: int = 6, scale: int = 3) -> Path:
    """`columns` held-out images (top row) over their top class's Grad-CAM overlays as `explain` writes them (the
    shape's box outlined in white), each `scale` times enlarged; written as PNG to `out` (replacing it)."""
    rows: List[List[Image.Image]] = [[], []]
    with tempfile.TemporaryDirectory() as tmp:
        for i, s in enumerate(samples[:columns]):
            explain(model, s.path, overlay=Path(tmp) / f'{i}.png')
            for row, path in zip(rows, (s.path, Path(tmp) / f'{i}.png')):
                tile = Image.open(path).convert('RGB')
                row.append(tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST))
            x0, y0, x1, y1 = s.box
            ImageDraw.Draw(rows[1][-1]).rectangle(
                (x0 * scale, y0 * scale, (x1 + 1) * scale - 1, (y1 + 1) * scale - 1), outline=(255, 255, 255))
    w, h, gap = rows[0][0].width, rows[0][0].height, 4
    grid = Image.new('RGB', (len(rows[0]) * (w + gap) - gap, 2 * h + gap), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            grid.paste(tile, (c * (w + gap), r * (h + gap)))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, format='PNG', optimize=True)
    return out


def _interleaved(samples: Sequence[Sample]) -> List[Sample]:
    """The samples with the classes taking turns, for a picture that shows each."""
    by_class = [[s for s in samples if s.label == k] for k in range(len(CLASSES))]
    return [s for group in zip(*by_class) for s in group]


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--train', type=int, default=400, help='training images per class (default 400)')
    p.add_argument('--val', type=int, default=50, help='validation images per class (default 50)')
    p.add_argument('--test', type=int, default=100, help='held-out images per class (default 100)')
    p.add_argument('--epochs', type=int, default=8, help='epochs (default 8)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--shuffles', type=int, default=5, help='shuffled models, measured together (default 5)')
    p.add_argument('--picture', default=str(Path(__file__).resolve().parent.parent / 'docs' / 'cam_example.png'),
                   help='the overlay grid to write (default docs/cam_example.png)')
    p.add_argument('--no-picture', action='store_true', help='write no picture')
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='cam-localization-') as tmp:
        root = Path(tmp)
        samples = write_shapes(root, args.train, args.val, args.test, seed=args.seed)
        model, val_accuracy = train_model(root, args.epochs, seed=args.seed, log=lambda line: print(line, flush=True))
        trained = localization([model], samples)
        random = localization([shuffled(model, seed) for seed in range(args.shuffles)], samples)
        if not args.no_picture:
            print(f'wrote {picture(model, _interleaved(samples), Path(args.picture))}')
    print(f'{MODEL} {MODEL_ARGS}, {args.train} training images per class, {args.epochs} epochs, seed {args.seed}: '
          f'validation accuracy {100 * val_accuracy:.1f}%')
    for name, r in (('fine-tuned', trained), (f'{args.shuffles} x shuffled', random)):
        print(f'{name:>13}: {r["correct"]}/{r["images"]} held-out images correct; CAM peak inside the shape\'s box '
              f'for {100 * r["fraction"]:.1f}% of those ({r["inside"]}/{r["correct"]}), '
              f'{100 * r["fraction_true_class"]:.1f}% of all with the true class\'s map')
    print(f'{time.perf_counter() - started:.0f} s')


if __name__ == '__main__':
    sys.exit(main())
