"""Images are read as the picture they show, or refused in one line: the same picture saved in every PIL mode (and
rotated with an EXIF orientation tag) gets the same probabilities from `predict`, and fine-tuning on it gives the
same weights. The picture is a real one: a handwritten digit of scikit-learn's, upscaled."""
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import timm_densenet_ext  # noqa: F401  (registers the variants)
from timm_densenet_ext.cli import main
from timm_densenet_ext.finetune import finetune
from timm_densenet_ext.predict import predict
from workflow_helpers import tiny_hub_folder

LABELS = [str(d) for d in range(10)]
SIZE = (36, 28)  # not square: a wrong orientation also changes the crop
INK, PAPER = np.array([25, 60, 150]), np.array([245, 236, 215])
# EXIF orientation -> how the picture is stored so that the tag turns it upright (the inverse of exif_transpose's)
STORED = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_270}
ORIENTATIONS = itertools.cycle(STORED)


def digit(index: int = 7) -> np.ndarray:
    """A handwritten digit from scikit-learn, 0..255 grey (ink bright), upscaled bicubically to SIZE."""
    from sklearn.datasets import load_digits
    pixels = (load_digits().images[index] * (255 / 16)).round().astype(np.uint8)
    return np.asarray(Image.fromarray(pixels).resize(SIZE, Image.Resampling.BICUBIC))


def blend(background: np.ndarray, colour: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """`colour` over `background` with coverage `amount` (0..255), rounded: how alpha shows on a background."""
    a = amount[..., None].astype(np.float64) / 255 if np.ndim(colour) else amount.astype(np.float64) / 255
    return np.round(background + (colour - background) * a).astype(np.uint8)


def save(image: Image.Image, path: Path, orientation: int = 0, **kwargs) -> Path:
    """Save `image` as `path`; with `orientation`, stored turned so that the EXIF tag turns it back."""
    if orientation:
        image = image.transpose(STORED[orientation])
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs['exif'] = exif
    image.save(path, **kwargs)
    return path


def palette_image(rgb: np.ndarray, hidden=None) -> Image.Image:
    """A mode P image of `rgb` (256 colours at most) holding it exactly; `hidden`: the colour whose palette entry is
    replaced by black and made transparent, as a stored colour under transparent pixels may be anything."""
    colours, index = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
    assert len(colours) <= 256
    image = Image.fromarray(index.reshape(rgb.shape[:2]).astype(np.uint8), mode='P')
    if hidden is not None:
        k = int(np.flatnonzero((colours == hidden).all(axis=1))[0])
        colours = colours.copy()
        colours[k] = 0
        image.info['transparency'] = k
    image.putpalette(colours.astype(np.uint8).ravel().tolist())
    return image


GREY_MODES = {  # the grey picture g (0..255) in every grey mode, as a file name's ending and the image
    'L.png': lambda g: Image.fromarray(g),
    'RGB.png': lambda g: Image.fromarray(np.repeat(g[..., None], 3, axis=2)),
    'LA-opaque.png': lambda g: Image.merge('LA', [Image.fromarray(g), Image.new('L', g.shape[::-1], 255)]),
    'I;16.png': lambda g: Image.fromarray(g.astype(np.uint16) * 257),  # 0..255 -> 0..65535: the same picture
    'I;16.tif': lambda g: Image.fromarray(g.astype(np.uint16) * 257),
    'I;16B.tif': lambda g: Image.frombytes('I;16B', g.shape[::-1], (g.astype('>u2') * 257).tobytes()),
    'I-32bit.tif': lambda g: Image.fromarray(g.astype(np.int32) * 257),
    'F-0to1.tif': lambda g: Image.fromarray(g.astype(np.float32) / 255),
    'F-0to255.tif': lambda g: Image.fromarray(g.astype(np.float32)),
    'P.png': lambda g: palette_image(np.repeat(g[..., None], 3, axis=2)),
    'RGBA-opaque.png': lambda g: Image.fromarray(np.dstack([g, g, g, np.full_like(g, 255)])),
}


def grey_cases(g: np.ndarray, folder: Path):
    """The grey picture `g` in every grey mode, upright and turned: (name, file) pairs, each read as `g` by a right
    reader."""
    for name, make in GREY_MODES.items():
        yield name, save(make(g), folder / name)
        yield f'{name} turned', save(make(g), folder / f'turned-{name}', next(ORIENTATIONS))
    pgm = folder / 'I;16.pgm'  # opened by PIL as mode I; PGM has no EXIF
    Image.fromarray(g.astype(np.uint16) * 257).save(pgm)
    yield 'I;16.pgm', pgm


def colour_cases(c: np.ndarray, folder: Path):
    """The colour picture `c` in every colour mode that holds it exactly, each read as `c` by a right reader."""
    opaque = Image.new('L', SIZE, 255)
    rgb = Image.fromarray(c)
    pa = palette_image(c).convert('PA')
    images = {
        'RGB.png': rgb,
        'RGBA-opaque.png': Image.merge('RGBA', [*rgb.split(), opaque]),
        'CMYK.tif': rgb.convert('CMYK'),
        'P.png': palette_image(c),
        'PA-opaque.tif': pa,
    }
    for name, image in images.items():
        yield name, save(image, folder / name)
        yield f'{name} turned', save(image, folder / f'turned-{name}', next(ORIENTATIONS))


@pytest.fixture(scope='module')
def model(tmp_path_factory):
    return f'local-dir:{tiny_hub_folder(tmp_path_factory.mktemp("images") / "tiny", LABELS)}'


def probabilities(model: str, paths) -> np.ndarray:
    results = predict(model, list(paths), top_k=len(LABELS))
    assert [r.error for r in results] == [None] * len(results), [r.error for r in results]
    rows = []
    for r in results:
        p = np.zeros(len(LABELS))
        for index, _, q in r.top:
            p[index] = q
        rows.append(p)
    return np.array(rows)


def assert_same_prediction(model, reference: Path, cases, wrong: Path) -> None:
    """Every case within 1e-3 of the reference's probabilities, where a wrong reading (`wrong`) is far off: the
    model tells the pictures apart."""
    names, paths = zip(*cases)
    p = probabilities(model, [reference, wrong, *paths])
    assert np.abs(p[1] - p[0]).max() > 0.02, 'the model does not tell a wrong reading apart; the test proves nothing'
    differences = {name: float(np.abs(q - p[0]).max()) for name, q in zip(names, p[2:])}
    assert {name: d for name, d in differences.items() if d > 1e-3} == {}, differences


def test_a_16_bit_png_gives_what_the_same_pixels_in_8_bit_give(model, tmp_path):
    g = digit()
    eight = save(Image.fromarray(g), tmp_path / 'eight.png')
    sixteen = save(Image.fromarray(g.astype(np.uint16) * 257), tmp_path / 'sixteen.png')
    assert Image.open(sixteen).mode == 'I;16'
    p = probabilities(model, [eight, sixteen])
    assert np.abs(p[0] - p[1]).max() <= 1e-3
    # what `convert('RGB')` made of it: clipped at 255, almost white, and classified otherwise
    clipped = save(Image.fromarray(np.where(g > 0, 255, 0).astype(np.uint8)), tmp_path / 'clipped.png')
    assert np.abs(probabilities(model, [clipped])[0] - p[1]).max() > 0.02


def test_every_grey_mode_and_orientation_gives_the_same_prediction(model, tmp_path):
    g = digit()
    wrong = save(Image.fromarray(g).transpose(Image.Transpose.ROTATE_90), tmp_path / 'wrong.png')
    assert_same_prediction(model, save(Image.fromarray(g), tmp_path / 'reference.png'),
                           list(grey_cases(g, tmp_path)), wrong)


def test_every_colour_mode_and_orientation_gives_the_same_prediction(model, tmp_path):
    c = blend(PAPER, INK, digit())
    wrong = save(Image.fromarray(c).transpose(Image.Transpose.ROTATE_90), tmp_path / 'wrong.png')
    assert_same_prediction(model, save(Image.fromarray(c), tmp_path / 'reference.png'),
                           list(colour_cases(c, tmp_path)), wrong)


def test_a_one_bit_image_gives_what_its_pixels_in_8_bit_give(model, tmp_path):
    b = np.where(digit() > 100, 255, 0).astype(np.uint8)
    wrong = save(Image.fromarray(255 - b), tmp_path / 'wrong.png')
    cases = [('1.png', save(Image.fromarray(b).convert('1'), tmp_path / '1.png')),
             ('1.tif turned', save(Image.fromarray(b).convert('1'), tmp_path / '1.tif', 6))]
    assert_same_prediction(model, save(Image.fromarray(b), tmp_path / 'reference.png'), cases, wrong)


def test_transparency_is_shown_on_white(model, tmp_path):
    """A transparent picture reads as a page shows it: on white. The colour stored under transparent pixels
    (here noise, or black) is not seen; partial alpha blends."""
    g = digit()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (SIZE[1], SIZE[0], 3)).astype(np.uint8)
    white = np.full(3, 255)

    # ink with coverage g: RGBA and LA, and, in one step of alpha, P and PA and an RGB PNG with a transparent colour
    on_white = blend(white, INK, g)
    ink = np.where(g[..., None] > 0, INK, noise).astype(np.uint8)  # noise where fully transparent
    rgba = Image.fromarray(np.dstack([ink, g]), mode='RGBA')
    grey_on_white = blend(np.array(255), np.array(20), g)
    la = Image.fromarray(np.dstack([np.where(g > 0, 20, noise[..., 0]).astype(np.uint8), g]), mode='LA')
    assert_same_prediction(model, save(Image.fromarray(on_white), tmp_path / 'on-white.png'), [
        ('RGBA.png', save(rgba, tmp_path / 'RGBA.png')),
        ('RGBA.tif turned', save(rgba, tmp_path / 'RGBA.tif', 8)),
    ], save(Image.fromarray(ink), tmp_path / 'alpha-dropped.png'))
    assert_same_prediction(model, save(Image.fromarray(grey_on_white), tmp_path / 'grey-on-white.png'), [
        ('LA.png', save(la, tmp_path / 'LA.png')),
        ('LA.png turned', save(la, tmp_path / 'turned-LA.png', 3)),
    ], save(la.getchannel('L'), tmp_path / 'alpha-dropped-L.png'))

    c = blend(PAPER, INK, g)
    shown = np.where((c == PAPER).all(axis=2)[..., None], 255, c).astype(np.uint8)  # the paper is transparent
    pa = palette_image(c).convert('PA')
    pa.putalpha(Image.fromarray(np.where((c == PAPER).all(axis=2), 0, 255).astype(np.uint8)))
    assert_same_prediction(model, save(Image.fromarray(shown), tmp_path / 'shown.png'), [
        ('P.png transparent', save(palette_image(c, hidden=PAPER), tmp_path / 'P.png')),
        ('P.png transparent turned', save(palette_image(c, hidden=PAPER), tmp_path / 'turned-P.png', 5)),
        ('PA.tif', save(pa, tmp_path / 'PA.tif')),
        ('RGB.png transparent colour', save(Image.fromarray(c), tmp_path / 'RGB-trns.png',
                                            transparency=tuple(int(v) for v in PAPER))),
    ], save(Image.fromarray(np.where(shown == 255, 0, shown).astype(np.uint8)), tmp_path / 'on-black.png'))



def test_ycbcr_reads_as_its_rgb(model, tmp_path):
    """YCbCr holds colour to rounding only: the file reads as the RGB of its own values by JPEG's (JFIF) formula."""
    ycbcr = Image.fromarray(blend(PAPER, INK, digit())).convert('YCbCr')
    y, cb, cr = (np.asarray(ycbcr).astype(np.float64)[..., i] for i in range(3))
    rgb = np.dstack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                     y + 1.772 * (cb - 128)])
    reference = save(Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8)), tmp_path / 'reference.png')
    wrong = save(Image.fromarray(np.asarray(ycbcr)), tmp_path / 'channels-as-rgb.png')
    assert_same_prediction(model, reference, [('YCbCr.tif', save(ycbcr, tmp_path / 'YCbCr.tif')),
                                              ('YCbCr.tif turned', save(ycbcr, tmp_path / 'turned.tif', 7))], wrong)


def bad_images(folder: Path):
    """Images whose values have no meaningful 8-bit reading, and what the refusal says about each."""
    ramp = np.linspace(0, 1, 36 * 28, dtype=np.float32).reshape(28, 36)
    cases = {
        'negative.tif': (Image.fromarray(ramp - 0.5), 'a float image (mode F) with values from -0.5 to 0.5'),
        'large.tif': (Image.fromarray(ramp * 300), 'a float image (mode F) with values from 0 to 300'),
        'nan.tif': (Image.fromarray(np.where(ramp > 0.5, np.nan, ramp).astype(np.float32)), 'NaN'),
        'int32.tif': (Image.fromarray((ramp * 70000).astype(np.int32)),
                      'an integer image (mode I) with values from 0 to 70000, outside the 0..65535'),
        'int32-small.tif': (Image.fromarray((ramp * 200).astype(np.int32)),
                            '32-bit integer samples (mode I) from 0 to 200, which may be on a 0..255 or a 0..65535'),
    }
    return {save(image, folder / name): message for name, (image, message) in cases.items()}


def test_images_without_a_meaningful_reading_are_refused_in_one_line_by_predict(model, tmp_path, capsys):
    good = save(Image.fromarray(digit()), tmp_path / 'good.png')
    bad = bad_images(tmp_path)
    code = main(['predict', model, str(good), *map(str, bad)])
    out, err = capsys.readouterr()
    assert code == 2 and out.splitlines()[0] == str(good)  # the good one is still classified
    errors = err.splitlines()
    assert len(errors) == len(bad)
    for line, (path, message) in zip(errors, bad.items()):
        assert line.startswith(f'timm-densenet-ext predict: error: {path}: ') and message in line, line
        assert 'save it as an 8-bit or 16-bit PNG' in line


def grey_folder(root: Path, modes=('L.png',), turn: bool = False) -> Path:
    """root/{train,val}/CLASS/*: three classes of grey noise pictures told apart by brightness, each picture saved in
    the next of `modes` (and with `turn`, every other one turned with an EXIF orientation)."""
    rng = np.random.default_rng(0)
    mode = itertools.cycle(modes)
    for k, level in enumerate((50, 128, 210)):
        for split, n in (('train', 6), ('val', 3)):
            for i in range(n):
                g = np.clip(rng.normal(level, 30, (14 + i % 3, 18 + i % 4)), 0, 255).astype(np.uint8)
                name = next(mode)
                (root / split / f'c{k}').mkdir(parents=True, exist_ok=True)
                save(GREY_MODES[name](g), root / split / f'c{k}' / f'{i:03d}-{name}',
                     next(ORIENTATIONS) if turn and i % 2 else 0)
    return root


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    return tiny_hub_folder(tmp_path_factory.mktemp('images-base') / 'base', ['x', 'y'])


def test_finetuning_on_any_mode_gives_what_8_bit_gives(base, tmp_path):
    """The same pictures as 8-bit PNGs and in a mix of modes and orientations: the same training, to the weight."""
    recipe = dict(epochs=2, batch_size=6, lr=0.01, hflip=0.0, progress=False, log=lambda line: None)
    eight = finetune(f'local-dir:{base}', grey_folder(tmp_path / 'eight'), tmp_path / 'm8', **recipe)
    mixed = finetune(f'local-dir:{base}', grey_folder(tmp_path / 'mixed', list(GREY_MODES), turn=True),
                     tmp_path / 'mixed-model', **recipe)
    assert [h['train_loss'] for h in mixed.history] == pytest.approx([h['train_loss'] for h in eight.history],
                                                                    abs=1e-6)
    assert mixed.val_correct == eight.val_correct
    a, b = load_file(str(tmp_path / 'm8' / 'model.safetensors')), load_file(
        str(tmp_path / 'mixed-model' / 'model.safetensors'))
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


def test_finetune_refuses_an_image_without_a_meaningful_reading_in_one_line(base, tmp_path, capsys):
    data = grey_folder(tmp_path / 'data')
    path, message = next(iter(bad_images(data / 'train' / 'c1').items()))
    code = main(['finetune', '--model', f'local-dir:{base}', '--data', str(data), '--out', str(tmp_path / 'o'),
                 '--epochs', '1'])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [err.strip()] and f'{path}: {message}' in err, err
