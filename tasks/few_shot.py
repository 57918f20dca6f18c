"""Few-example versions of built-in tasks, for transfer and low-data experiments.

`<source>_<k>` trains on the first k examples of the source's train split; its evaluation
split 'validation' is the next VALIDATION examples of that split (never trained on: early
stopping reads it); 'test' is the source's own evaluation split. Registered here:
`pycode_lm_heldout_100` (reference result 3) and `stdlib_package_200` (reference result 5);
`register(source, k)` adds others.
"""
from __future__ import annotations

import dataclasses

from pathways import registry
from tasks import pycode  # noqa: F401  (the sources)

VALIDATION = 512


class Slice:
  """Examples [start, stop) of a random-access source."""

  def __init__(self, source, start, stop):
    if len(source) < stop:
      raise ValueError(f'the split has {len(source)} examples; {stop} are needed '
                       f'({stop - start} from {start}).')
    self.source, self.start, self.n = source, start, stop - start

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[self.start + i]


def register(source: str, examples: int) -> str:
  """Registers `<source>_<examples>` (idempotent) and returns its name."""
  name = f'{source}_{examples}'
  if name in registry.TASKS:
    return name
  base = registry.get_task(source)

  def data(split, data_dir=None):
    if split == 'test':
      return base.data(base.splits['eval'], data_dir)
    train = base.data(base.splits['train'], data_dir)
    if split == 'train':
      return Slice(train, 0, examples)
    if split == 'validation':
      return Slice(train, examples, examples + VALIDATION)
    raise ValueError(f'split={split!r}: {name} has train, validation and test.')

  registry.register_task(dataclasses.replace(
      base, name=name, data=data, splits={'train': 'train', 'eval': 'validation'},
      description=f'{base.description}; first {examples} training examples, validation = '
                  f'the next {VALIDATION}'))
  return name


register('pycode_lm_heldout', 100)
register('stdlib_package', 200)
