"""`digits`: the 8x8 handwritten digits bundled with scikit-learn (image, 10 classes).

1,797 images; a fixed seeded 80/20 train/test split. Pixel values 0..16 are scaled to 0..255.
"""
from __future__ import annotations

import numpy as np

from pathways import registry
from pathways.data import tfds_source


class PathwaysDigits(tfds_source.OfflineBuilder):
  """scikit-learn's digits as a TFDS dataset (prepared offline)."""
  FEATURES = {'image': ((8, 8, 1), np.uint8), 'label': ((), np.int64)}

  def _generate_examples(self, split):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    cut = int(0.8 * len(order))
    for i in (order[:cut] if split == 'train' else order[cut:]):
      image = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)[..., None]
      yield int(i), {'image': image, 'label': int(digits.target[i])}


registry.register_task(tfds_source.builder_task(
    PathwaysDigits, name='digits', modality='image', head='classify', num_classes=10,
    input_feature='image', target_feature='label',
    input_shape=(8, 8, 1), input_dtype='uint8',
    description="scikit-learn's 8x8 handwritten digits (TFDS builder 'pathways_digits')"))
