"""The glyph family: every alphabet prepares offline from matplotlib's fonts, split by font
(test fonts never trained on), every class in every split, at least 1,024 test images; the
low-data members take the first k images of every class."""
import collections

import numpy as np
import pytest

from pathways import registry
from pathways.data import pipeline
from tasks import glyphs


@pytest.mark.parametrize('alphabet', list(glyphs.ALPHABETS))
def test_alphabet_splits_by_font_with_every_class(alphabet, data_dir):
  t = registry.get_task(f'glyphs_{alphabet}')
  assert t.num_classes == len(glyphs.ALPHABETS[alphabet])
  assert t.splits == {'train': 'train', 'eval': 'test', 'calibration': 'validation'}
  names = glyphs.fonts(alphabet)
  assert len(names) >= 16  # DejaVu (12) and STIX (4) have every alphabet
  fonts_of = {}
  for split in ('train', 'validation', 'test'):
    src = t.data(split, data_dir)
    examples = [src[i] for i in range(len(src))]
    labels = collections.Counter(int(e['label']) for e in examples)
    assert set(labels) == set(range(t.num_classes)), split
    assert len(set(labels.values())) == 1, split  # balanced: every class equally often
    fonts_of[split] = {int(e['font']) for e in examples}
    assert all(glyphs.font_split(f) == split for f in fonts_of[split]), split
    for e in examples[:50]:
      assert e['image'].shape == (16, 16, 1) and e['image'].dtype == np.uint8
      assert e['image'].max() > 100  # a glyph was drawn
  assert len(t.data('test', data_dir)) >= glyphs.MIN_TEST
  assert not fonts_of['train'] & fonts_of['test'] and not fonts_of['validation'] & (
      fonts_of['train'] | fonts_of['test'])
  assert len(fonts_of['train']) >= 10 and len(fonts_of['test']) >= 4


def test_rendering_is_seeded():
  path = f"{glyphs._font_dir()}/{glyphs.fonts('greek')[0]}"  # pylint: disable=protected-access
  a = glyphs.render(path, 'Ω', np.random.default_rng(5))
  b = glyphs.render(path, 'Ω', np.random.default_rng(5))
  c = glyphs.render(path, 'Ω', np.random.default_rng(6))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()


def test_unknown_alphabet_is_refused():
  with pytest.raises(ValueError, match=r"alphabet='runic': must be one of \('latin', "):
    glyphs.fonts('runic')


@pytest.mark.parametrize('name', glyphs.LOW_DATA)
def test_low_data_member_takes_k_per_class(name, data_dir):
  t = registry.get_task(name)
  alphabet = name.split('_')[1]
  train = t.data('train', data_dir)
  labels = collections.Counter(int(train[i]['label']) for i in range(len(train)))
  assert labels == {c: 5 for c in range(len(glyphs.ALPHABETS[alphabet]))}
  assert t.splits['eval'] == 'validation'
  assert len(t.data('test', data_dir)) >= glyphs.MIN_TEST
  p = pipeline.MultitaskPipeline([t], 8, data_dir=data_dir, seed=0)
  b = next(p)
  assert b['image'].shape == (8, 16, 16, 1) and (b['label'] < t.num_classes).all()
