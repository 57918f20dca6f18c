"""Two vector tasks for the architecture-search test, built so that width must help.

* `products`: is x0 x1 + x2 x3 + x4 x5 > 0, for Gaussian x in 6 dimensions. Each product
  takes a few hidden units to approximate, so a model whose feed-forward blocks have two
  hidden units each stays far from it and one expert of 64 hidden units gets close.
* `sign`: is x0 > 0 (linear): the other task, which must not move.

Importing this module registers them (`--task_module=tests.train.search_task`).
"""
import numpy as np

from pathways import registry
from pathways import task as task_lib

DIM = 6


class _Gaussian:
  """Random access over a fixed sample of Gaussian inputs (seeded per split)."""

  def __init__(self, split, fn):
    n = 8192 if split == 'train' else 512
    self.x = np.random.default_rng(0 if split == 'train' else 1).normal(
        size=(n, DIM)).astype(np.float32)
    self.fn = fn

  def __len__(self):
    return len(self.x)

  def __getitem__(self, i):
    return {'x': self.x[i], 'y': np.int64(self.fn(self.x[i]))}


def _task(name, fn):
  return task_lib.Task(name=name, modality='vector', head='classify', num_classes=2,
                       data=lambda split, data_dir=None: _Gaussian(split, fn),
                       splits={'train': 'train', 'eval': 'eval'}, input_feature='x',
                       target_feature='y', input_shape=(DIM,), input_dtype='float32',
                       description=f'{name} (architecture-search test)')


for _t in (_task('products', lambda x: x[0] * x[1] + x[2] * x[3] + x[4] * x[5] > 0),
           _task('sign', lambda x: x[0] > 0)):
  if _t.name not in registry.TASKS:
    registry.register_task(_t)
