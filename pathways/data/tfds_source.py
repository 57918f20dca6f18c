"""TFDS as the data source, without TensorFlow: array_record files read by grain.

Built-in tasks ship TFDS builders (`GeneratorBasedBuilder` with `file_format='array_record'`)
that prepare offline from data already on the machine; `source()` prepares on first use and
returns a random-access `ArrayRecordDataSource`. Catalogue datasets (mnist, cifar10, ...)
go through `tfds.data_source`, which downloads where the internet is reachable.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from pathways import task as task_lib

DATA_DIR_ENV = 'PATHWAYS_DATA_DIR'


def data_dir(explicit: str | None = None) -> str:
  """The data directory: `explicit`, else $PATHWAYS_DATA_DIR, else ~/pathways_data/tfds."""
  return explicit or os.environ.get(DATA_DIR_ENV) or os.path.join(
      os.path.expanduser('~'), 'pathways_data', 'tfds')


class OfflineBuilder(tfds.core.GeneratorBasedBuilder):
  """Base of the built-in builders: array_record splits 'train' and 'test' from local data.

  Subclasses set FEATURES = {name: (shape, numpy dtype)} and write `_generate_examples(split)`.
  (Abstract, so TFDS does not register it as a dataset.)
  """
  VERSION = tfds.core.Version('1.0.0')
  FEATURES: dict = {}
  SPLITS = ('train', 'test')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        name: tfds.features.Tensor(shape=shape, dtype=np.dtype(dtype))
        for name, (shape, dtype) in self.FEATURES.items()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self.SPLITS}


def builder(builder_cls, data_dir_: str | None = None):
  return builder_cls(data_dir=data_dir(data_dir_), file_format='array_record')


def is_prepared(builder_cls, data_dir_: str | None = None) -> bool:
  return builder(builder_cls, data_dir_).is_prepared()


def source(builder_cls, split: str, data_dir_: str | None = None):
  """Prepares the builder's data on first use (offline), then opens `split` for random access."""
  b = builder(builder_cls, data_dir_)
  if not b.is_prepared():
    b.download_and_prepare()
  return b.as_data_source(split=split)


def catalogue_source(name: str, split: str, data_dir_: str | None = None):
  """A TFDS catalogue dataset as a random-access source (prepared and cached by TFDS)."""
  return tfds.data_source(name, split=split, data_dir=data_dir(data_dir_))


def catalogue_is_prepared(name: str, data_dir_: str | None = None) -> bool:
  try:
    return tfds.builder(name, data_dir=data_dir(data_dir_)).is_prepared()
  except Exception:  # pylint: disable=broad-except
    return False


def builder_task(builder_cls, **task_kwargs) -> task_lib.Task:
  """A Task whose data come from an offline TFDS builder (splits 'train' and 'test')."""
  task_kwargs.setdefault('splits', {'train': 'train', 'eval': 'test'})
  return task_lib.Task(
      data=lambda split, data_dir=None: source(builder_cls, split, data_dir),
      is_prepared=lambda data_dir=None: is_prepared(builder_cls, data_dir), **task_kwargs)


def catalogue_task(tfds_name: str, **task_kwargs) -> task_lib.Task:
  """A Task over a TFDS catalogue dataset (downloaded by TFDS where the internet is reachable)."""
  task_kwargs.setdefault('splits', {'train': 'train', 'eval': 'test'})
  return task_lib.Task(
      data=lambda split, data_dir=None: catalogue_source(tfds_name, split, data_dir),
      is_prepared=lambda data_dir=None: catalogue_is_prepared(tfds_name, data_dir),
      **task_kwargs)
