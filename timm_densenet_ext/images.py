"""Read an image file as the 8-bit RGB picture it shows, or refuse it in one line: the one reader of `predict`,
`finetune`'s image folders and the demo.

PIL's `convert('RGB')` is right for 8-bit colour but silently wrong elsewhere: it clips 16-bit and 32-bit grey
(a 16-bit PNG turns almost white), drops alpha (showing whatever colour lies under transparent pixels) and ignores
the EXIF orientation. The rules here:

- EXIF orientation is applied first (`PIL.ImageOps.exif_transpose`), as viewers show the picture.
- 1, L, P, RGB, RGBX, CMYK, YCbCr, LAB, HSV: PIL's conversion to RGB (CMYK by the inverse of PIL's own RGB->CMYK).
- High bit depth grey is mapped from the full range of its type to 0..255, rounded:
  I;16 (and I;16B/L/N), 16-bit samples: 0..65535 / 257, so a 16-bit file holding 257 x an 8-bit picture reads
  exactly as that picture. I (32-bit integer) holds 0..65535 when PIL reads a 16-bit file (PGM, older Pillow's PNG):
  read the same way; values outside 0..65535 are refused, and so are 32-bit integer samples that stay within
  0..255, which might be an 8-bit scale (ambiguous). F (32-bit float): 0..1 (the usual scale of float images)
  x 255 when every value lies in 0..1, else 0..255 as is when every value lies there; negative, larger or NaN
  values are refused. A float image on the 0..255 scale whose values all stay within 0..1 (nearly black) is
  therefore read as 0..1: save such pictures as 8-bit.
- Alpha (LA, La, RGBA, RGBa, PA, P or L or RGB with a transparent colour): composited on white, as a browser or a
  page shows a transparent picture (and as the `convert_to_rgb` of Hugging Face's Idefics image processors does);
  dropping alpha instead would show the arbitrary colour stored under transparent pixels. A fully opaque alpha
  gives exactly the RGB picture.
- Any other mode is refused, naming the mode.
"""
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps

__all__ = ['UnreadableImage', 'read_image', 'image_loader']

_RGB_MODES = {'1', 'L', 'P', 'RGB', 'RGBX', 'CMYK', 'YCbCr', 'LAB', 'HSV'}
_ALPHA_MODES = {'LA': 'LA', 'La': 'LA', 'RGBA': 'RGBA', 'RGBa': 'RGBA', 'PA': 'RGBA'}
_BACKGROUND = (255, 255, 255)
_FIX = 'save it as an 8-bit or 16-bit PNG (or as a JPEG)'


class UnreadableImage(ValueError):
    """An image file that cannot be read, or whose pixels have no meaningful 8-bit RGB reading; one line."""


def read_image(path: Union[str, Path]) -> Image.Image:
    """The image at `path` as an 8-bit RGB PIL image, upright by its EXIF orientation (see the module's rules);
    `UnreadableImage` (a ValueError) with a one-line message naming the file, what is wrong and the fix."""
    from PIL import UnidentifiedImageError
    path = Path(path)
    try:
        # from a file object, not a file name: PIL memory-maps an uncompressed TIFF named by its path and then reads
        # one with EXIF orientation 5-8 (a transposed size) scrambled (Pillow 13)
        with path.open('rb') as file, Image.open(file) as image:
            samples = _sample_format(image)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return _to_rgb(image, path, samples)
    except UnreadableImage:
        raise
    except FileNotFoundError:
        raise UnreadableImage(f'{path}: no such file; check the path.') from None
    except IsADirectoryError:
        raise UnreadableImage(f'{path}: is a folder; give image files.') from None
    except UnidentifiedImageError:
        raise UnreadableImage(
            f'{path}: not an image file PIL can read (JPEG, PNG, ...); check that it is an image.') from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise UnreadableImage(
            f'{path}: cannot read it as an image ({e}); check that the file is complete.') from None


def image_loader(path: str) -> Image.Image:
    """`read_image` for torchvision's `ImageFolder(root, loader=image_loader)`."""
    return read_image(path)


def _sample_format(image: Image.Image) -> str:
    """How the file stores its samples, from PIL's raw mode (e.g. 'I;16B', 'I;32S'), before `load` forgets it."""
    try:
        args = image.tile[0].args
        return str(args[0] if isinstance(args, tuple) else args)
    except (IndexError, AttributeError, TypeError):
        return ''


def _to_rgb(image: Image.Image, path: Path, samples: str) -> Image.Image:
    mode = image.mode
    if mode in ('I', 'F') or mode.startswith('I;16'):
        image = _grey_to_8bit(image, path, samples)
        mode = 'L'
    if mode in _ALPHA_MODES or 'transparency' in image.info:
        image = image.convert(_ALPHA_MODES.get(mode, 'RGBA')).convert('RGBA')
        background = Image.new('RGBA', image.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, image).convert('RGB')
    if mode in _RGB_MODES:
        return image.convert('RGB')
    raise UnreadableImage(f'{path}: PIL reads it in mode {mode}, which has no defined RGB reading; {_FIX}.')


def _grey_to_8bit(image: Image.Image, path: Path, samples: str) -> Image.Image:
    import numpy as np
    values = np.asarray(image)
    if values.size == 0:
        return Image.new('L', image.size)
    if image.mode == 'F':
        if not np.isfinite(values).all():
            raise UnreadableImage(f'{path}: a float image (mode F) with NaN or infinite values; {_FIX}.')
        low, high = float(values.min()), float(values.max())
        if low >= 0 and high <= 1:
            scaled = values * 255.0
        elif low >= 0 and high <= 255:
            scaled = values
        else:
            raise UnreadableImage(
                f'{path}: a float image (mode F) with values from {low:g} to {high:g}, outside the 0..1 and '
                f'0..255 of float pictures; {_FIX}.')
    else:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise UnreadableImage(
                f'{path}: an integer image (mode {image.mode}) with values from {low} to {high}, outside the '
                f'0..65535 of 16-bit pictures; {_FIX}.')
        if image.mode == 'I' and (samples == 'I' or '32' in samples) and high <= 255:
            raise UnreadableImage(
                f'{path}: 32-bit integer samples (mode I) from {low} to {high}, which may be on a 0..255 or a '
                f'0..65535 scale; {_FIX}.')
        scaled = values.astype(np.float64) / 257.0
    return Image.fromarray(np.round(scaled).astype(np.uint8))
