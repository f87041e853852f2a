"""An image file -> the uint8 pixels the data set stores: the one decoding that `predict` uses and
that `export` ships next to the model (copied verbatim as vgg_image.py), so the two cannot differ.

Needs only Pillow and numpy (the export must run without vgg-gluon).
"""
import numpy as np

# The image files predict reads and image-folder data sets are made of.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# Pillow modes of 16-bit and 32-bit grayscale; `convert("L")` would clip them to 2 grey levels.
WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def image_to_array(im, channels, size):
    """A loaded PIL image -> uint8 (size, size, channels): EXIF orientation applied, 16-bit and float
    grayscale rescaled to 0..255, palette images through RGBA, then grayscale (L) for 1 channel or
    RGB for 3, resized with bilinear filtering as image folders are."""
    from PIL import Image, ImageOps
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # broken EXIF: keep the pixels as stored
        pass
    if im.mode in WIDE_GRAY_MODES:
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    im = im.convert("L" if channels == 1 else "RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8).reshape(size, size, channels)


def read_image(path, channels, size):
    """image_to_array of the file at `path`."""
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        return image_to_array(im, channels, size)
