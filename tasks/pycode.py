"""Text tasks on the Python standard library's own source files (bytes, offline).

* `pycode_lm`: byte-level language modelling on windows of 128 bytes (per-position head),
  at most 32 windows per file (1.9 MB of training bytes).
* `pycode_lm_full`: the same on every window of every file (max_windows_per_file=None:
  about 10 MB of training bytes), for runs that would see the capped corpus many times.
* `pycode_lm_other`: the uncapped corpus without any of the eight `stdlib_package`
  packages: a code language model that never reads the classification task's files.
* `pycode_lm_seen` / `pycode_lm_heldout`: the uncapped corpus without / with only the
  packages in HELD_OUT (email, xml, http): a base model trains on the first, a new task on
  packages it never saw comes from the second.
* `stdlib_package`: which of 8 standard-library packages a 128-byte snippet comes from;
  `stdlib_package_heldout` the same among the three HELD_OUT packages only (a classification
  task on code `pycode_lm_seen` never read).

Files are listed in sorted order and split by a hash of their path (about 10% to test), so a
file never lands in both splits. `stdlib_package` splits each package's files separately
(stratified): its files in hash order, every tenth to test starting with the first and every
tenth to validation starting with the second (exit calibration), so every package has test
and validation files (a plain hash split left json, http and logging without any test). The
data depend on the installed Python's standard library.
Byte 0 is padding (it does not occur in source text).
"""
from __future__ import annotations

import hashlib
import os
import sysconfig

import numpy as np
import tensorflow_datasets as tfds

from pathways import registry
from pathways.data import tfds_source

WINDOW = 128
PACKAGES = ('asyncio', 'email', 'json', 'unittest', 'xml', 'http', 'multiprocessing', 'logging')
HELD_OUT = ('email', 'xml', 'http')  # packages pycode_lm_seen leaves out


def _stdlib_files(subdir: str = ''):
  root = os.path.join(sysconfig.get_paths()['stdlib'], subdir)
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ('test', 'tests', 'site-packages',
                                                          'idlelib', '__pycache__'))
    out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith('.py')]
  return out


def _split_of(path: str) -> str:
  return 'test' if _hash(path) % 10 == 0 else 'train'


def _hash(path: str) -> int:
  relative = os.path.relpath(path, sysconfig.get_paths()['stdlib'])
  return int(hashlib.sha256(relative.encode()).hexdigest(), 16)


def _stratified_split(files) -> dict[str, str]:
  """{path: 'train' | 'validation' | 'test'} for one class's files: in hash order, every
  tenth file (the first included) to test and every tenth from the second to validation, so a
  class with three files or more has a file in each (deterministic)."""
  ordered = sorted(files, key=_hash)

  def split(i):
    if i % 10 == 0 and len(ordered) > 1:
      return 'test'
    if i % 10 == 1 and len(ordered) > 2:
      return 'validation'
    return 'train'
  return {path: split(i) for i, path in enumerate(ordered)}


def _windows(path: str, width: int, limit: int | None):
  with open(path, 'rb') as f:
    data = f.read().replace(b'\x00', b' ')
  for start in range(0, max(0, len(data) - width), width)[:limit]:
    yield start, np.frombuffer(data[start:start + width], np.uint8)


class PathwaysPycodeLm(tfds_source.OfflineBuilder):
  """Windows of 129 bytes of standard-library source: inputs [128] and next-byte targets;
  at most MAX_WINDOWS_PER_FILE windows from each file (None: all)."""
  FEATURES = {'inputs': ((WINDOW,), np.uint8), 'targets': ((WINDOW,), np.int32)}
  MAX_WINDOWS_PER_FILE: int | None = 32

  def _generate_examples(self, split):
    for path in _stdlib_files():
      if _split_of(path) != split:
        continue
      for start, w in _windows(path, WINDOW + 1, limit=self.MAX_WINDOWS_PER_FILE):
        yield f'{path}:{start}', {'inputs': w[:-1], 'targets': w[1:].astype(np.int32)}


class PathwaysPycodeLmFull(PathwaysPycodeLm):
  """Every window of every file (the uncapped corpus)."""
  MAX_WINDOWS_PER_FILE = None


def _held_out(path: str) -> bool:
  root = sysconfig.get_paths()['stdlib']
  return os.path.relpath(path, root).split(os.sep)[0] in HELD_OUT


class PathwaysPycodeLmOther(PathwaysPycodeLmFull):
  """Every window of every file outside the eight PACKAGES of stdlib_package."""

  def _generate_examples(self, split):
    root = sysconfig.get_paths()['stdlib']
    for key, ex in super()._generate_examples(split):
      if os.path.relpath(key.rsplit(':', 1)[0], root).split(os.sep)[0] not in PACKAGES:
        yield key, ex


class PathwaysPycodeLmSeen(PathwaysPycodeLmFull):
  """Every window of every file outside the HELD_OUT packages."""

  def _generate_examples(self, split):
    for key, ex in super()._generate_examples(split):
      if not _held_out(key.rsplit(':', 1)[0]):
        yield key, ex


class PathwaysPycodeLmHeldout(PathwaysPycodeLmFull):
  """Every window of the HELD_OUT packages' files (split by file, as the rest)."""

  def _generate_examples(self, split):
    for key, ex in super()._generate_examples(split):
      if _held_out(key.rsplit(':', 1)[0]):
        yield key, ex


class PathwaysStdlibPackage(tfds_source.OfflineBuilder):
  """128-byte snippets labelled with the standard-library package they come from; files
  split per package (`_stratified_split`); at most 600 snippets per package and split."""
  # 1.2.0: a validation split from each package's train files (test unchanged); 1.1.0:
  # stratified split (1.0.0: plain hash split)
  VERSION = tfds.core.Version('1.2.0')
  FEATURES = {'inputs': ((WINDOW,), np.uint8), 'label': ((), np.int64)}
  SPLITS = ('train', 'validation', 'test')
  PACKAGES = PACKAGES

  def _generate_examples(self, split):
    for label, package in enumerate(self.PACKAGES):
      count = 0
      files = _stdlib_files(package)
      assignment = _stratified_split(files)
      for path in files:
        if assignment[path] != split or count >= 600:
          continue
        for start, w in _windows(path, WINDOW, limit=40):
          yield f'{path}:{start}', {'inputs': w, 'label': label}
          count += 1


class PathwaysStdlibPackageHeldout(PathwaysStdlibPackage):
  """`stdlib_package` over the HELD_OUT packages only (email, xml, http; labels 0, 1, 2 in
  that order): classification on code that `pycode_lm_seen` never read."""
  VERSION = tfds.core.Version('1.0.0')
  PACKAGES = HELD_OUT


registry.register_task(tfds_source.builder_task(
    PathwaysPycodeLm, name='pycode_lm', modality='bytes', head='per_position',
    num_classes=256,
    input_feature='inputs', target_feature='targets', input_shape=(WINDOW,), input_dtype='uint8',
    metrics=('accuracy', 'loss', 'perplexity', 'bits_per_byte'),
    description='byte-level language modelling on the standard library (pathways_pycode_lm)'))
registry.register_task(tfds_source.builder_task(
    PathwaysPycodeLmFull, name='pycode_lm_full', modality='bytes', head='per_position',
    num_classes=256,
    input_feature='inputs', target_feature='targets', input_shape=(WINDOW,), input_dtype='uint8',
    metrics=('accuracy', 'loss', 'perplexity', 'bits_per_byte'),
    description='pycode_lm on the uncapped corpus: every window of every file '
                '(pathways_pycode_lm_full)'))
for _cls, _name, _what in (
    (PathwaysPycodeLmOther, 'pycode_lm_other', 'without the packages ' + ', '.join(PACKAGES)),
    (PathwaysPycodeLmSeen, 'pycode_lm_seen', 'without the packages ' + ', '.join(HELD_OUT)),
    (PathwaysPycodeLmHeldout, 'pycode_lm_heldout', 'only the packages ' + ', '.join(HELD_OUT))):
  registry.register_task(tfds_source.builder_task(
      _cls, name=_name, modality='bytes', head='per_position', num_classes=256,
      input_feature='inputs', target_feature='targets', input_shape=(WINDOW,),
      input_dtype='uint8', metrics=('accuracy', 'loss', 'perplexity', 'bits_per_byte'),
      description=f'pycode_lm_full {_what} (pathways_{_name})'))
registry.register_task(tfds_source.builder_task(
    PathwaysStdlibPackage, name='stdlib_package', modality='bytes', head='classify',
    num_classes=len(PACKAGES), input_feature='inputs', target_feature='label',
    input_shape=(WINDOW,), input_dtype='uint8',
    splits={'train': 'train', 'eval': 'test', 'calibration': 'validation'},
    description=f'which stdlib package a snippet is from: {", ".join(PACKAGES)}'))
registry.register_task(tfds_source.builder_task(
    PathwaysStdlibPackageHeldout, name='stdlib_package_heldout', modality='bytes',
    head='classify', num_classes=len(HELD_OUT), input_feature='inputs', target_feature='label',
    input_shape=(WINDOW,), input_dtype='uint8',
    splits={'train': 'train', 'eval': 'test', 'calibration': 'validation'},
    description=f'which held-out package ({", ".join(HELD_OUT)}) a snippet is from: a new '
                f'classification task for a base trained on pycode_lm_seen'))
