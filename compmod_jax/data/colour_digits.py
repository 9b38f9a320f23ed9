"""The colour digit domains of the `embedded_digits` builder, rebuilt offline from what installed
packages ship, after the recipes of the digit-five benchmark of the domain adaptation literature:

- MNIST-M (Ganin & Lempitsky, 2015): each MNIST digit blended into a crop of a colour photograph,
  per channel |photo - digit|, so strokes take the photo's complementary colours and the
  background is the photo itself. The photographs are scikit-learn's two sample images (china,
  flower) and matplotlib's grace_hopper.jpg; crops of a random side (CROP_SIDE_RANGE) are
  resized to the digit's 28x28. Test crops come from the right quarter of every photograph,
  training crops from the rest, so no background pixel is shared between the splits.
- Synthetic digits (Ganin & Lempitsky's SynNumbers, the SVHN look-alike): a digit rendered with
  one of the fonts matplotlib ships (DejaVu Sans, Serif and Mono in their weights, STIX, Computer
  Modern), with random digit and background colours (a minimum luminance contrast, a background
  gradient), neighbouring digits cut by the crop's edges as SVHN's crops have, position jitter,
  a small rotation, blur and noise. Every image is drawn from its own seed; train and test use
  disjoint seeds.

Every random choice comes from a generator seeded by (domain name, example index), so a domain
is identical on every machine (given the same numpy, scipy, Pillow and FreeType) and independent
of the order in which images are made.
"""
import dataclasses
import functools
import os
import zlib

import numpy as np
import scipy.ndimage as ndi

SIZE = 28  # The digits' canvas, as MNIST's.
# MNIST-M: the photo crop's side before it is resized to SIZE (Ganin's crops were 28 px of larger
# photographs; larger crops give smoother, less textured backgrounds as well).
CROP_SIDE_RANGE = (28, 84)
# The right-hand fraction of every photograph that only test crops come from.
PHOTO_TEST_FRACTION = 0.25

# Synthetic digits: fonts (matplotlib/mpl-data/fonts/ttf) whose digits are lining figures.
SYN_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf",
)
GLYPH_PIXELS = 48            # Glyphs are rendered once at this size, then scaled per image.
DIGIT_HEIGHT_RANGE = (11, 22)  # Pixels of the centre digit's height on the 28 px canvas.
NEIGHBOUR_PROBABILITY = 0.6  # Odds of a digit on each side of the centre one (cut at the edge).
GAP_RANGE = (0.05, 0.35)     # Space between neighbouring digits, as a fraction of the height.
JITTER_PIXELS = 2.5          # Largest shift of the centre digit from the canvas centre.
ROTATION_DEGREES = 12.0      # Largest rotation either way.
MIN_LUMINANCE_CONTRAST = 50  # Of digit vs background colour, 0..255 (SVHN has faint digits too).
GRADIENT_RANGE = 60.0        # Largest brightness change across the background.
BLUR_SIGMA_RANGE = (0.0, 1.0)
NOISE_STD_RANGE = (2.0, 12.0)
_LUMINANCE = np.array([0.299, 0.587, 0.114])


def _rng(domain, index):
  return np.random.default_rng([zlib.crc32(domain.encode()), int(index)])


def to_uint8(pixels):
  """Rounds and clips float pixel values to the uint8 range."""
  return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


# --- MNIST-M ---------------------------------------------------------------------------------


@functools.cache
def load_photos():
  """The background photographs, uint8 [H, W, 3] each, read-only: scikit-learn's china.jpg and
  flower.jpg (427x640) and matplotlib's grace_hopper.jpg (600x512)."""
  from matplotlib import cbook
  from PIL import Image
  from sklearn.datasets import load_sample_images  # Imported here: only preparing data needs it.

  photos = list(load_sample_images().images)
  with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as hopper:
    photos.append(np.asarray(hopper.convert("RGB")))
  for photo in photos:
    photo.flags.writeable = False
  return tuple(photos)


@dataclasses.dataclass(frozen=True)
class Crop:
  """A square of photograph `photo` (an index into load_photos()): rows top..top+side, columns
  left..left+side."""
  photo: int
  top: int
  left: int
  side: int


def first_test_column(photo_width):
  """The first column of a photograph that only test crops use."""
  return photo_width - round(PHOTO_TEST_FRACTION * photo_width)


def mnist_m_crop(index, test):
  """The photo crop behind MNIST digit `index`, inside the test region when `test`."""
  rng = _rng("mnist_m", index)
  photos = load_photos()
  photo = int(rng.integers(len(photos)))
  height, width, _ = photos[photo].shape
  side = int(rng.integers(CROP_SIDE_RANGE[0], CROP_SIDE_RANGE[1] + 1))
  boundary = first_test_column(width)
  first_left, last_left = (boundary, width - side) if test else (0, boundary - side)
  return Crop(photo, top=int(rng.integers(height - side + 1)),
              left=int(rng.integers(first_left, last_left + 1)), side=side)


def crop_pixels(crop):
  """The crop resized (bilinear, pixels as squares) to SIZE x SIZE, float [SIZE, SIZE, 3]."""
  pixels = load_photos()[crop.photo][crop.top:crop.top + crop.side,
                                     crop.left:crop.left + crop.side].astype(np.float64)
  zoom = SIZE / crop.side
  return ndi.zoom(pixels, (zoom, zoom, 1), order=1, grid_mode=True, mode="nearest")


def mnist_m_image(digit, index, test):
  """MNIST digit `index` (uint8 [SIZE, SIZE]) blended into its crop: uint8 [SIZE, SIZE, 3]."""
  photo = crop_pixels(mnist_m_crop(index, test))
  return to_uint8(np.abs(photo - digit[..., None].astype(np.float64)))


def blend_mnist_m(digits, test_mask):
  """MNIST-M from MNIST: uint8 digits [N, SIZE, SIZE] -> uint8 [N, SIZE, SIZE, 3], digit i on
  the crop mnist_m_crop(i, test_mask[i])."""
  return np.stack([mnist_m_image(digit, index, test)
                   for index, (digit, test) in enumerate(zip(digits, test_mask))])


# --- Synthetic digits ------------------------------------------------------------------------


@functools.cache
def glyph_masks(font_file):
  """Coverage (float 0..1, cropped to the ink) of digits 0..9 in matplotlib's font `font_file`
  at GLYPH_PIXELS. Cached: loading a font and rendering its glyphs costs more than an image."""
  import matplotlib
  from matplotlib import ft2font

  font = ft2font.FT2Font(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", font_file))
  font.set_size(GLYPH_PIXELS, 72)  # At 72 dpi a point is a pixel.
  masks = []
  for digit in "0123456789":
    font.set_text(digit, 0.0)
    font.draw_glyphs_to_bitmap(antialiased=True)
    coverage = np.asarray(font.get_image(), np.float64) / 255
    rows, columns = np.flatnonzero(coverage.any(1)), np.flatnonzero(coverage.any(0))
    masks.append(coverage[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1])
  return tuple(masks)


def _scaled_glyph(font_file, digit, height):
  mask = glyph_masks(font_file)[digit]
  zoom = height / mask.shape[0]
  return np.clip(ndi.zoom(mask, zoom, order=1, grid_mode=True, mode="grid-constant"), 0, 1)


def _digit_row_mask(rng, label, font_file):
  """Coverage [2 SIZE, 2 SIZE] of the centre digit `label` (its centre at the middle, jittered)
  and its neighbours, before rotation; a larger canvas than SIZE so the rotation has pixels to
  bring in."""
  height = rng.uniform(*DIGIT_HEIGHT_RANGE)
  glyphs = [_scaled_glyph(font_file, label, height)]
  centre_position = 0
  for side in ("left", "right"):
    if rng.random() < NEIGHBOUR_PROBABILITY:
      neighbour = _scaled_glyph(font_file, int(rng.integers(10)), height)
      if side == "left":
        glyphs.insert(0, neighbour)
        centre_position = 1
      else:
        glyphs.append(neighbour)
  gap = int(round(rng.uniform(*GAP_RANGE) * height))
  canvas = np.zeros((2 * SIZE, 2 * SIZE))
  centre_row, centre_column = SIZE + rng.uniform(-JITTER_PIXELS, JITTER_PIXELS, size=2)
  # Columns of each glyph's left edge relative to the centre glyph's left edge.
  widths = [glyph.shape[1] for glyph in glyphs]
  lefts = np.cumsum([0] + [width + gap for width in widths[:-1]])
  lefts -= lefts[centre_position]
  centre_left = centre_column - widths[centre_position] / 2
  for glyph, left in zip(glyphs, lefts):
    _paste_max(canvas, glyph, int(round(centre_row - glyph.shape[0] / 2)),
               int(round(centre_left + left)))
  return canvas


def _paste_max(canvas, glyph, top, left):
  """canvas = max(canvas, glyph placed at (top, left)), clipped at the canvas's edges."""
  rows = slice(max(top, 0), min(top + glyph.shape[0], canvas.shape[0]))
  columns = slice(max(left, 0), min(left + glyph.shape[1], canvas.shape[1]))
  if rows.start < rows.stop and columns.start < columns.stop:
    part = glyph[rows.start - top:rows.stop - top, columns.start - left:columns.stop - left]
    canvas[rows, columns] = np.maximum(canvas[rows, columns], part)


def _colours(rng):
  """(digit colour, background colour), RGB 0..255, at least MIN_LUMINANCE_CONTRAST apart in
  luminance."""
  while True:
    digit, background = rng.uniform(0, 255, size=(2, 3))
    if abs((digit - background) @ _LUMINANCE) >= MIN_LUMINANCE_CONTRAST:
      return digit, background


def _coverage(rng, label):
  """The ink [SIZE, SIZE] of a synthetic digit `label` and its neighbours, in a font drawn from
  `rng`, rotated and cropped."""
  font_file = SYN_FONTS[int(rng.integers(len(SYN_FONTS)))]
  mask = _digit_row_mask(rng, label, font_file)
  mask = ndi.rotate(mask, rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES), reshape=False,
                    order=1)
  start = SIZE // 2
  return np.clip(mask[start:start + SIZE, start:start + SIZE], 0, 1)


def syn_digit_coverage(index, label):
  """The ink (0..1) of synthetic image `index` showing `label`, before its colours."""
  return _coverage(_rng("syn_digits", index), label)


def render_syn_digit(index, label):
  """Synthetic digit `label` drawn from seed ('syn_digits', index): uint8 [SIZE, SIZE, 3]."""
  rng = _rng("syn_digits", index)
  mask = _coverage(rng, label)[..., None]
  digit_colour, background_colour = _colours(rng)
  direction = rng.normal(size=2)
  rows, columns = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1) - 0.5
  ramp = (direction[0] * rows + direction[1] * columns) / np.linalg.norm(direction)
  background = background_colour + rng.uniform(0, GRADIENT_RANGE) * ramp[..., None]
  image = background * (1 - mask) + digit_colour * mask
  image = ndi.gaussian_filter(image, sigma=(*[rng.uniform(*BLUR_SIGMA_RANGE)] * 2, 0))
  image += rng.normal(scale=rng.uniform(*NOISE_STD_RANGE), size=image.shape)
  return to_uint8(image)


def syn_digits(indices):
  """The synthetic digits of example indices `indices`: (uint8 images [N, SIZE, SIZE, 3], int64
  labels [N]); index i shows digit i % 10, so any 10 consecutive indices are one of each."""
  labels = np.asarray(indices, np.int64) % 10
  images = np.stack([render_syn_digit(index, label) for index, label in zip(indices, labels)])
  return images, labels
