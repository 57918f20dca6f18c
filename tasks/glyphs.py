"""Glyph alphabets: capitals and digits rendered offline from the fonts matplotlib ships.

A family of image tasks with shared structure (Latin, Greek and Cyrillic capitals share many
strokes, several letters outright): `glyphs_latin` (26 classes), `glyphs_greek` (24),
`glyphs_cyrillic` (32) and `glyphs_digits` (10). Each image is 16x16x1, one character of one
font at a random size (32-44 px), angle (-15..15 degrees) and offset (+-4 px), rendered
anti-aliased at 48x48 and averaged down 3x3.

The split is by font, so test glyphs come from fonts never trained on: an alphabet's fonts
(those of DejaVu Sans / Sans Mono / Serif, STIX General and, for Latin and digits, Computer
Modern, that have every character; `fonts`) in sorted order go to test when their index is
3 mod 4, to validation when it is 1 mod 8, to train otherwise (Greek and Cyrillic: 10 / 2 /
4 fonts; Latin and digits: 14 / 3 / 5). Renderings per font and character: 16 in train, 6 in
validation, and in test as many as give every alphabet at least 1,024 test images.
No difficulty: none of the knobs means more compute here.

Low-data members (`register_low_data(alphabet, k)`, `glyphs_<alphabet>_<k>`): the first k
training images of every class; their evaluation split is the validation split (unseen
fonts: early stopping reads it), 'test' the test split. `glyphs_{latin,greek,cyrillic}_5` are
registered here (reference result 5b).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

import numpy as np

from pathways import registry
from pathways.data import tfds_source

SIZE = 16  # image side
RENDER = 3 * SIZE  # rendered at 3x, averaged down
ALPHABETS = {
    'latin': tuple(chr(c) for c in range(ord('A'), ord('Z') + 1)),
    'greek': tuple(chr(c) for c in range(0x391, 0x3AA) if c != 0x3A2),  # no final-sigma slot
    'cyrillic': tuple(chr(c) for c in range(0x410, 0x430)),
    'digits': tuple('0123456789'),
}
_DEJAVU = [f'DejaVu{family}{style}.ttf' for family, styles in (
    ('Sans', ('', '-Bold', '-Oblique', '-BoldOblique')),
    ('SansMono', ('', '-Bold', '-Oblique', '-BoldOblique')),
    ('Serif', ('', '-Bold', '-Italic', '-BoldItalic'))) for style in styles]
_STIX = ['STIXGeneral.ttf', 'STIXGeneralBol.ttf', 'STIXGeneralItalic.ttf',
         'STIXGeneralBolIta.ttf']
_COMPUTER_MODERN = ['cmr10.ttf', 'cmb10.ttf', 'cmti10.ttf', 'cmss10.ttf', 'cmtt10.ttf',
                    'cmmi10.ttf']
PER_FONT = {'train': 16, 'validation': 6}
MIN_TEST = 1024
SEEDS = {'train': 11, 'validation': 12, 'test': 13}


def _font_dir() -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  return os.path.join(matplotlib.get_data_path(), 'fonts', 'ttf')


@functools.cache
def fonts(alphabet: str) -> tuple[str, ...]:
  """The font files (sorted) that have every character of `alphabet`."""
  from matplotlib import ft2font  # pylint: disable=g-import-not-at-top
  if alphabet not in ALPHABETS:
    raise ValueError(f'alphabet={alphabet!r}: must be one of {tuple(ALPHABETS)}.')
  out = []
  for name in sorted(_DEJAVU + _STIX + _COMPUTER_MODERN):
    path = os.path.join(_font_dir(), name)
    if os.path.exists(path):
      charmap = ft2font.FT2Font(path).get_charmap()
      if all(ord(c) in charmap for c in ALPHABETS[alphabet]):
        out.append(name)
  return tuple(out)


def font_split(index: int) -> str:
  """Which split the font at `index` (in the sorted list) belongs to."""
  if index % 4 == 3:
    return 'test'
  return 'validation' if index % 8 == 1 else 'train'


def per_font(alphabet: str, split: str) -> int:
  """Renderings per font and character in `split`."""
  if split != 'test':
    return PER_FONT[split]
  n_fonts = sum(font_split(i) == 'test' for i in range(len(fonts(alphabet))))
  return math.ceil(MIN_TEST / (n_fonts * len(ALPHABETS[alphabet])))


def render(font_path: str, char: str, rng: np.random.Generator) -> np.ndarray:
  """One glyph at a random size, angle and offset: [SIZE, SIZE, 1] uint8."""
  font = _font(font_path)
  font.set_size(float(rng.uniform(32, 44)), 72)
  font.set_text(char, float(rng.uniform(-15, 15)))
  font.draw_glyphs_to_bitmap(antialiased=True)
  glyph = np.asarray(font.get_image(), np.float32)[:RENDER, :RENDER]
  canvas = np.zeros((RENDER, RENDER), np.float32)
  h, w = glyph.shape
  top = (RENDER - h) // 2 + int(rng.integers(-4, 5))
  left = (RENDER - w) // 2 + int(rng.integers(-4, 5))
  top, left = min(max(top, 0), RENDER - h), min(max(left, 0), RENDER - w)
  canvas[top:top + h, left:left + w] = glyph
  small = canvas.reshape(SIZE, 3, SIZE, 3).mean(axis=(1, 3))
  return np.round(small).astype(np.uint8)[..., None]


@functools.cache
def _font(path):
  from matplotlib import ft2font  # pylint: disable=g-import-not-at-top
  return ft2font.FT2Font(path)


class _GlyphBuilder(tfds_source.OfflineBuilder):
  """One alphabet: image, label (the character's index), font (index into `fonts`)."""
  ALPHABET = ''
  FEATURES = {'image': ((SIZE, SIZE, 1), np.uint8), 'label': ((), np.int64),
              'font': ((), np.int64)}
  SPLITS = ('train', 'validation', 'test')

  def _generate_examples(self, split):
    names = fonts(self.ALPHABET)
    rng = np.random.default_rng([SEEDS[split], len(self.ALPHABET)])
    n = per_font(self.ALPHABET, split)
    key = 0
    for f, name in enumerate(names):
      if font_split(f) != split:
        continue
      path = os.path.join(_font_dir(), name)
      for label, char in enumerate(ALPHABETS[self.ALPHABET]):
        for _ in range(n):
          yield key, {'image': render(path, char, rng), 'label': label, 'font': f}
          key += 1


class PathwaysGlyphsLatin(_GlyphBuilder):
  """Latin capitals A-Z."""
  ALPHABET = 'latin'


class PathwaysGlyphsGreek(_GlyphBuilder):
  """Greek capitals Alpha-Omega."""
  ALPHABET = 'greek'


class PathwaysGlyphsCyrillic(_GlyphBuilder):
  """Cyrillic capitals A-Ya (U+0410-U+042F)."""
  ALPHABET = 'cyrillic'


class PathwaysGlyphsDigits(_GlyphBuilder):
  """Digits 0-9."""
  ALPHABET = 'digits'


BUILDERS = {b.ALPHABET: b for b in (PathwaysGlyphsLatin, PathwaysGlyphsGreek,
                                    PathwaysGlyphsCyrillic, PathwaysGlyphsDigits)}

for _alphabet, _builder in BUILDERS.items():
  registry.register_task(tfds_source.builder_task(
      _builder, name=f'glyphs_{_alphabet}', modality='image', head='classify',
      num_classes=len(ALPHABETS[_alphabet]), input_feature='image', target_feature='label',
      input_shape=(SIZE, SIZE, 1), input_dtype='uint8',
      splits={'train': 'train', 'eval': 'test', 'calibration': 'validation'},
      description=f'{_alphabet} glyphs from matplotlib\'s fonts, 16x16, test fonts unseen'))


class Subset:
  """The examples of a random-access source at `indices`."""

  def __init__(self, source, indices):
    self.source, self.indices = source, list(indices)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[self.indices[i]]


def first_per_class(labels, k: int) -> list[int]:
  """Indices of the first k examples of every class, in source order."""
  seen: dict[int, int] = {}
  out = []
  for i, label in enumerate(labels):
    if seen.get(int(label), 0) < k:
      seen[int(label)] = seen.get(int(label), 0) + 1
      out.append(i)
  return out


def register_low_data(alphabet: str, k: int) -> str:
  """Registers `glyphs_<alphabet>_<k>` (idempotent) and returns its name."""
  name = f'glyphs_{alphabet}_{k}'
  if name in registry.TASKS:
    return name
  base = registry.get_task(f'glyphs_{alphabet}')

  @functools.cache  # the labels are read once per data directory, not per pipeline
  def indices(data_dir):
    train = base.data('train', data_dir)
    return tuple(first_per_class((train[i]['label'] for i in range(len(train))), k))

  def data(split, data_dir=None):
    if split == 'train':
      return Subset(base.data('train', data_dir), indices(data_dir))
    if split in ('validation', 'test'):
      return base.data(split, data_dir)
    raise ValueError(f'split={split!r}: {name} has train, validation and test.')

  registry.register_task(dataclasses.replace(
      base, name=name, data=data, splits={'train': 'train', 'eval': 'validation'},
      description=f'{base.description}; {k} training images per class, evaluated on the '
                  f'validation fonts ("test": the test fonts)'))
  return name


LOW_DATA = tuple(register_low_data(a, 5) for a in ('latin', 'greek', 'cyrillic'))
