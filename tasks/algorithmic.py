"""Algorithmic tasks with a per-example difficulty (the adaptive-computation tasks of ACT).

* `parity`: parity of a bit string of 1..16 bits, written as ASCII '0'/'1' (classify, 2
  classes); difficulty = number of bits.
* `addition`: 'a+b=' followed by the sum, a and b with 1..8 digits each; per-position
  prediction of the sum's digits (targets -1 elsewhere); difficulty = digits of the longer
  operand.
* `parity_count`: the parity task of ACT and PonderNet: a fixed-length string of 16 elements,
  of which n (uniform in 1..16) are set to +1 or -1 at random and the rest to 0, written as the
  bytes '+', '-' and '0'; the class is the parity of the number of +1s and difficulty = n, the
  number of non-zero elements. Every string has the same length, so depth is the only compute
  knob. (Version 1.0.0 was 16 bits with 0..16 ones: its hardest-looking strings, all ones,
  were as easy as all zeros.)
* `addition_lsd`: `addition` with every number written least-significant digit first
  ('321+54=861' for 123 + 45 = 168), the order in which a left-to-right model can carry;
  difficulty = digits of the longer operand.

Every task here also has a 'validation' split (2,000 examples, its own seed), which exit
thresholds are calibrated on (`tools/calibrate_exits.py`); `parity` and `addition` gained it
in version 1.1.0 (their train and test splits unchanged).

Generated deterministically from a fixed seed per split; byte 0 is padding.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from pathways import registry
from pathways.data import tfds_source

PARITY_BITS = 16
ADD_DIGITS = 8
ADD_LENGTH = 32  # 8 + 1 + 8 + 1 + 9 digits of the sum, padded
SIZES = {'train': 20_000, 'validation': 2_000, 'test': 2_000}
SEEDS = {'train': 1, 'test': 2, 'validation': 3}


class PathwaysParity(tfds_source.OfflineBuilder):
  """Bit strings of 1..16 ASCII bits, their parity and their length."""
  VERSION = tfds.core.Version('1.1.0')  # 1.1.0: a validation split (train and test unchanged)
  FEATURES = {'inputs': ((PARITY_BITS,), np.uint8), 'label': ((), np.int64),
              'difficulty': ((), np.int64)}
  SPLITS = ('train', 'validation', 'test')

  def _generate_examples(self, split):
    rng = np.random.default_rng(SEEDS[split])
    for i in range(SIZES[split]):
      n = int(rng.integers(1, PARITY_BITS + 1))
      bits = rng.integers(0, 2, size=n)
      inputs = np.zeros(PARITY_BITS, np.uint8)
      inputs[:n] = ord('0') + bits
      yield i, {'inputs': inputs, 'label': int(bits.sum() % 2), 'difficulty': n}


class PathwaysParityCount(tfds_source.OfflineBuilder):
  """16 elements in {+1, 0, -1} as '+', '0', '-', n of them non-zero (n uniform in 1..16);
  the parity of the +1s; n."""
  VERSION = tfds.core.Version('2.0.0')  # 2.0.0: +1/-1/0 elements (1.0.0: 0/1 bits, 0..16 ones)
  FEATURES = PathwaysParity.FEATURES
  SPLITS = ('train', 'validation', 'test')

  def _generate_examples(self, split):
    rng = np.random.default_rng(SEEDS[split] + 200)
    for i in range(SIZES[split]):
      n = int(rng.integers(1, PARITY_BITS + 1))
      signs = rng.integers(0, 2, size=n)  # 1: +1, 0: -1
      inputs = np.full(PARITY_BITS, ord('0'), np.uint8)
      inputs[rng.permutation(PARITY_BITS)[:n]] = np.where(signs == 1, ord('+'), ord('-'))
      yield i, {'inputs': inputs, 'label': int(signs.sum() % 2), 'difficulty': n}


def addition_example(a: int, b: int, lsd_first: bool = False):
  """Bytes of 'a+b=sum' and per-position targets: the next byte where it is a sum digit.
  With `lsd_first` every number is written least-significant digit first."""
  write = (lambda n: str(n)[::-1]) if lsd_first else str
  text = f'{write(a)}+{write(b)}={write(a + b)}'.encode()
  inputs = np.zeros(ADD_LENGTH, np.uint8)
  inputs[:len(text)] = np.frombuffer(text, np.uint8)
  targets = np.full(ADD_LENGTH, -1, np.int32)
  eq = text.index(b'=')
  targets[eq:len(text) - 1] = inputs[eq + 1:len(text)]
  return inputs, targets


class PathwaysAddition(tfds_source.OfflineBuilder):
  """'a+b=sum' strings with per-position targets on the sum, and the operands' digits."""
  VERSION = tfds.core.Version('1.1.0')  # 1.1.0: a validation split (train and test unchanged)
  FEATURES = {'inputs': ((ADD_LENGTH,), np.uint8), 'targets': ((ADD_LENGTH,), np.int32),
              'difficulty': ((), np.int64)}
  LSD_FIRST = False
  SPLITS = ('train', 'validation', 'test')

  def _generate_examples(self, split):
    rng = np.random.default_rng(SEEDS[split] + 100)
    for i in range(SIZES[split]):
      da, db = (int(v) for v in rng.integers(1, ADD_DIGITS + 1, size=2))
      a = int(rng.integers(10 ** (da - 1) if da > 1 else 0, 10**da))
      b = int(rng.integers(10 ** (db - 1) if db > 1 else 0, 10**db))
      inputs, targets = addition_example(a, b, self.LSD_FIRST)
      yield i, {'inputs': inputs, 'targets': targets, 'difficulty': max(da, db)}


class PathwaysAdditionLsd(PathwaysAddition):
  """`PathwaysAddition` with every number least-significant digit first."""
  VERSION = tfds.core.Version('1.0.0')
  LSD_FIRST = True


registry.register_task(tfds_source.builder_task(
    PathwaysParity, difficulty_feature='difficulty', name='parity', modality='bytes',
    head='classify', num_classes=2,
    input_feature='inputs', target_feature='label', input_shape=(PARITY_BITS,),
    input_dtype='uint8', splits={'train': 'train', 'eval': 'test', 'calibration': 'validation'},
    description='parity of 1..16 bits (difficulty: bits)'))
registry.register_task(tfds_source.builder_task(
    PathwaysAddition, difficulty_feature='difficulty', name='addition', modality='bytes',
    head='per_position', num_classes=256,
    input_feature='inputs', target_feature='targets', input_shape=(ADD_LENGTH,),
    input_dtype='uint8', splits={'train': 'train', 'eval': 'test', 'calibration': 'validation'},
    description='a+b= and the sum, 1..8 digits (difficulty: digits)'))
registry.register_task(tfds_source.builder_task(
    PathwaysParityCount, difficulty_feature='difficulty', name='parity_count',
    modality='bytes', head='classify', num_classes=2, input_feature='inputs',
    target_feature='label', input_shape=(PARITY_BITS,), input_dtype='uint8',
    splits={'train': 'train', 'eval': 'test', 'calibration': 'validation'},
    description='parity of the +1s among 16 elements of +1/0/-1, 1..16 non-zero '
                '(difficulty: non-zero elements)'))
registry.register_task(tfds_source.builder_task(
    PathwaysAdditionLsd, difficulty_feature='difficulty', name='addition_lsd',
    modality='bytes', head='per_position', num_classes=256, input_feature='inputs',
    target_feature='targets', input_shape=(ADD_LENGTH,), input_dtype='uint8',
    splits={'train': 'train', 'eval': 'test', 'calibration': 'validation'},
    description='addition least-significant digit first, 1..8 digits (difficulty: digits)'))
