"""TFDS catalogue tasks: the character-recognition set of the mu2Net benchmarks, and cifar10.

These download through TFDS where the internet is reachable; on an offline machine they are
exercised with `tfds.testing.mock_data`.
"""
from __future__ import annotations

from pathways import registry
from pathways.data import tfds_source

_IMAGE_TASKS = {
    # name: (tfds name, image shape, classes)
    'mnist': ('mnist', (28, 28, 1), 10),
    'fashion_mnist': ('fashion_mnist', (28, 28, 1), 10),
    'kmnist': ('kmnist', (28, 28, 1), 10),
    'emnist_balanced': ('emnist/balanced', (28, 28, 1), 47),
    'cifar10': ('cifar10', (32, 32, 3), 10),
}

for _name, (_tfds_name, _shape, _classes) in _IMAGE_TASKS.items():
  registry.register_task(tfds_source.catalogue_task(
      _tfds_name, name=_name, modality='image', head='classify', num_classes=_classes,
      input_feature='image', target_feature='label', input_shape=_shape, input_dtype='uint8',
      description=f'TFDS catalogue {_tfds_name!r}'))
