"""`digits`: the 8x8 handwritten digits bundled with scikit-learn (image, 10 classes).

1,797 images; a fixed seeded 70/10/20 train/validation/test split (test is the same 20% as in
the 80/20 split of version 1.0.0; validation, held out for exit calibration, came out of the
old train split). Pixel values 0..16 are scaled to 0..255.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from pathways import registry
from pathways.data import tfds_source


class PathwaysDigits(tfds_source.OfflineBuilder):
  """scikit-learn's digits as a TFDS dataset (prepared offline)."""
  VERSION = tfds.core.Version('1.1.0')  # 1.1.0: a validation split (1.0.0: train/test 80/20)
  FEATURES = {'image': ((8, 8, 1), np.uint8), 'label': ((), np.int64)}
  SPLITS = ('train', 'validation', 'test')

  def _generate_examples(self, split):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    held, cut = int(0.7 * len(order)), int(0.8 * len(order))
    rows = {'train': order[:held], 'validation': order[held:cut], 'test': order[cut:]}
    for i in rows[split]:
      image = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)[..., None]
      yield int(i), {'image': image, 'label': int(digits.target[i])}


registry.register_task(tfds_source.builder_task(
    PathwaysDigits, name='digits', modality='image', head='classify', num_classes=10,
    input_feature='image', target_feature='label',
    input_shape=(8, 8, 1), input_dtype='uint8',
    splits={'train': 'train', 'eval': 'test', 'calibration': 'validation'},
    description="scikit-learn's 8x8 handwritten digits (TFDS builder 'pathways_digits')"))
