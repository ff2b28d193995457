"""Small real inputs for the workflow tests: image files, image folders and a tiny DenseNet hub folder."""
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import timm
from PIL import Image

from model_helpers import trained
from timm_densenet_ext.hub import write_hub_folder

TINY_ARCH = 'densenet_bc_100_k12'
TINY_ARGS = dict(block_config=(2, 2, 2))  # the paper's DenseNet-BC layout, two layers per block: 44k parameters
TINY_SIZE = 16
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40)]


def write_image(path: Path, colour: Tuple[int, int, int] = (200, 80, 40), size: Tuple[int, int] = (20, 14),
                seed: int = 0) -> Path:
    """A real image file (format from the suffix): a colour with noise and a stripe, not square."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    pixels[h // 3: h // 3 + 2] = 255 - pixels[h // 3: h // 3 + 2]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_image_folder(root: Path, classes: Sequence[str], train: int = 8, val: int = 4) -> Path:
    """root/train/CLASS/*.png and root/val/CLASS/*.png, each class its own colour: learnable in a few steps."""
    for k, name in enumerate(classes):
        for split, n in (('train', train), ('val', val)):
            for i in range(n):
                write_image(root / split / name / f'{i:03d}.png', COLOURS[k % len(COLOURS)],
                            size=(18 + i % 5, 14 + i % 3), seed=1000 * k + 100 * (split == 'val') + i)
    return root


def tiny_hub_folder(folder: Path, label_names: Sequence[str], seed: int = 0, img_size: int = TINY_SIZE) -> Path:
    """A hub folder of a two-layers-per-block DenseNet-BC (16 px unless told), random weights and BatchNorm
    statistics, with class names: a whole model `local-dir:` loads, cheap enough to fine-tune and export in a test."""
    model = trained(timm.create_model(TINY_ARCH, num_classes=len(label_names), **TINY_ARGS), seed=seed)
    return write_hub_folder(model, folder, model_name=TINY_ARCH, label_names=list(label_names),
                            data_config={'input_size': (3, img_size, img_size)})
