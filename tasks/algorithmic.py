"""Algorithmic tasks with a per-example difficulty (the adaptive-computation tasks of ACT).

* `parity`: parity of a bit string of 1..16 bits, written as ASCII '0'/'1' (classify, 2
  classes); difficulty = number of bits.
* `addition`: 'a+b=' followed by the sum, a and b with 1..8 digits each; per-position
  prediction of the sum's digits (targets -1 elsewhere); difficulty = digits of the longer
  operand.

Generated deterministically from a fixed seed per split; byte 0 is padding.
"""
from __future__ import annotations

import numpy as np

from pathways import registry
from pathways.data import tfds_source

PARITY_BITS = 16
ADD_DIGITS = 8
ADD_LENGTH = 32  # 8 + 1 + 8 + 1 + 9 digits of the sum, padded
SIZES = {'train': 20_000, 'test': 2_000}
SEEDS = {'train': 1, 'test': 2}


class PathwaysParity(tfds_source.OfflineBuilder):
  """Bit strings of 1..16 ASCII bits, their parity and their length."""
  FEATURES = {'inputs': ((PARITY_BITS,), np.uint8), 'label': ((), np.int64),
              'difficulty': ((), np.int64)}

  def _generate_examples(self, split):
    rng = np.random.default_rng(SEEDS[split])
    for i in range(SIZES[split]):
      n = int(rng.integers(1, PARITY_BITS + 1))
      bits = rng.integers(0, 2, size=n)
      inputs = np.zeros(PARITY_BITS, np.uint8)
      inputs[:n] = ord('0') + bits
      yield i, {'inputs': inputs, 'label': int(bits.sum() % 2), 'difficulty': n}


def addition_example(a: int, b: int):
  """Bytes of 'a+b=sum' and per-position targets: the next byte where it is a sum digit."""
  text = f'{a}+{b}={a + b}'.encode()
  inputs = np.zeros(ADD_LENGTH, np.uint8)
  inputs[:len(text)] = np.frombuffer(text, np.uint8)
  targets = np.full(ADD_LENGTH, -1, np.int32)
  eq = text.index(b'=')
  targets[eq:len(text) - 1] = inputs[eq + 1:len(text)]
  return inputs, targets


class PathwaysAddition(tfds_source.OfflineBuilder):
  """'a+b=sum' strings with per-position targets on the sum, and the operands' digits."""
  FEATURES = {'inputs': ((ADD_LENGTH,), np.uint8), 'targets': ((ADD_LENGTH,), np.int32),
              'difficulty': ((), np.int64)}

  def _generate_examples(self, split):
    rng = np.random.default_rng(SEEDS[split] + 100)
    for i in range(SIZES[split]):
      da, db = (int(v) for v in rng.integers(1, ADD_DIGITS + 1, size=2))
      a = int(rng.integers(10 ** (da - 1) if da > 1 else 0, 10**da))
      b = int(rng.integers(10 ** (db - 1) if db > 1 else 0, 10**db))
      inputs, targets = addition_example(a, b)
      yield i, {'inputs': inputs, 'targets': targets, 'difficulty': max(da, db)}


registry.register_task(tfds_source.builder_task(
    PathwaysParity, difficulty_feature='difficulty', name='parity', modality='bytes',
    head='classify', num_classes=2,
    input_feature='inputs', target_feature='label', input_shape=(PARITY_BITS,),
    input_dtype='uint8', description='parity of 1..16 bits (difficulty: bits)'))
registry.register_task(tfds_source.builder_task(
    PathwaysAddition, difficulty_feature='difficulty', name='addition', modality='bytes',
    head='per_position', num_classes=256,
    input_feature='inputs', target_feature='targets', input_shape=(ADD_LENGTH,),
    input_dtype='uint8', description='a+b= and the sum, 1..8 digits (difficulty: digits)'))
