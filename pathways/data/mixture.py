"""Multitask mixture: how many examples of each task one training step holds.

One compiled step serves every draw, so the batch layout is static: task i owns n_i = ceil(B
w_i) slots (at least one). Where B w_i is fractional, a seeded schedule decides at which steps
the last slot is used, so that over steps task i averages exactly B w_i examples per step;
an unused slot carries padding and example weight 0.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

SCHEMES = ('proportional', 'uniform', 'temperature')


def mixture_weights(sizes: Sequence[int], sampling_weights: Sequence[float],
                    scheme: str = 'proportional', temperature: float = 2.0) -> np.ndarray:
  """Normalized task weights.

  'uniform': w_i ~ s_i; 'proportional': w_i ~ s_i * size_i; 'temperature': w_i ~ s_i *
  size_i^(1/temperature) (T5/mT5 temperature sampling), where s_i is the task's
  sampling_weight.
  """
  if scheme not in SCHEMES:
    raise ValueError(f'mixture scheme={scheme!r}: must be one of {SCHEMES}.')
  s = np.asarray(sampling_weights, np.float64)
  sizes = np.asarray(sizes, np.float64)
  if scheme == 'uniform':
    w = s
  elif scheme == 'proportional':
    w = s * sizes
  else:
    if not temperature > 0:
      raise ValueError(f'temperature={temperature!r}: must be > 0.')
    w = s * sizes ** (1.0 / temperature)
  return w / w.sum()


def slots(weights: np.ndarray, batch_size: int) -> np.ndarray:
  """Static slots per task: ceil(B w_i), at least 1."""
  if not isinstance(batch_size, int) or batch_size < len(weights):
    raise ValueError(f'batch_size={batch_size!r}: must be an int >= the number of tasks '
                     f'({len(weights)}).')
  return np.array([max(1, math.ceil(batch_size * w - 1e-9)) for w in weights], np.int64)


def active_counts(weights: np.ndarray, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Examples of each task used at `step`: floor(B w_i) plus 1 on a seeded share of steps.

  The extra example of task i falls on the steps where floor((step + phase_i + 1) f_i) grows,
  f_i the fractional part of B w_i and phase_i drawn from `seed`: exactly f_i of the steps
  over any window of 1/f_i steps.
  """
  expected = batch_size * np.asarray(weights, np.float64)
  base = np.floor(expected + 1e-9)
  frac = expected - base
  phase = np.random.default_rng(seed).integers(0, 1 << 30, size=len(weights))
  pos = step + phase
  extra = (np.floor((pos + 1) * frac + 1e-9) - np.floor(pos * frac + 1e-9)) > 0
  return (base + extra).astype(np.int64)
