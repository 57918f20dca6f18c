"""Input modalities as a registry: how each kind of input sits in a batch.

  * 'image': uint8 [H, W] or [H, W, C] in the batch array 'image' (zero-padded to the
    largest image task; a small image's patches outside its own size are masked).
  * 'bytes': int token ids [L] in 'tokens' (0 = padding), with 'tokens_mask' and the
    per-position 'targets' beside them.
  * 'vector': float [V] in 'vector', one token.

A modality states its batch array and dtype, the arrays that travel with it, how one
example sits in its array and how many tokens it takes. The layout and the pipeline ask the
modality; none compares modality names. The stem that embeds a modality's rows is registered
under the same name in `pathways.nn.stems.STEMS`. Registration order is the order stems are
built (it fixes their initialization).
"""
from __future__ import annotations

import numpy as np

from pathways import registry

MODALITIES = registry.Registry('modality')


class Modality:
  """Base modality: `array` (its batch array), `dtype`, `extra` ({array: dtype} of the arrays
  of the same rows that come with it)."""
  array: str = ''
  dtype = np.float32
  extra: dict = {}

  def example_shape(self, input_shape) -> tuple[int, ...]:
    """Shape one example takes in the batch array (before padding to the largest)."""
    return tuple(input_shape)

  def check(self, task_name: str, feature: str, x) -> None:
    """Refuses an example this modality cannot hold (beyond the task's declared shape)."""

  def tokens(self, shape, patch: int) -> int:
    """Tokens one example of this padded array shape takes in the stack."""
    raise NotImplementedError

  def token_slots(self, input_shape, shape, patch: int) -> np.ndarray:
    """bool [tokens(shape)]: the positions of the stem's tokens that an example of a task with
    this `input_shape` can fill in an array of padded `shape` (sequence packing computes only
    these). Default: the example's own tokens, first."""
    own = self.tokens(self.example_shape(input_shape), patch)
    return np.arange(self.tokens(shape, patch)) < own

  def finish(self, batch) -> None:
    """Fills the arrays derived from this modality's rows once a numpy batch is written."""

  def write_input(self, batch, modality_row: int, x) -> None:
    """Writes one example into its row of a numpy batch (zero padding stays)."""
    x = np.asarray(x).reshape(self.example_shape(np.shape(x)))
    batch[self.array][(modality_row,) + tuple(slice(0, n) for n in x.shape)] = x


class Image(Modality):
  array, dtype = 'image', np.uint8

  def example_shape(self, input_shape):
    return tuple(input_shape) + (1,) if len(input_shape) == 2 else tuple(input_shape)

  def check(self, task_name, feature, x):
    if np.ndim(x) not in (2, 3):
      raise ValueError(f'task {task_name!r}: image feature {feature!r} has shape '
                       f'{np.shape(x)}; images must be [H, W] or [H, W, C].')


  def tokens(self, shape, patch):
    return (shape[0] // patch) * (shape[1] // patch)

  def token_slots(self, input_shape, shape, patch):
    """The patches that overlap the task's own image (row-major, as the stem orders them)."""
    rows = np.arange(shape[0] // patch) * patch < input_shape[0]
    cols = np.arange(shape[1] // patch) * patch < input_shape[1]
    return (rows[:, None] & cols[None, :]).reshape(-1)


class Bytes(Modality):
  array, dtype = 'tokens', np.int32
  extra = {'targets': np.int32, 'tokens_mask': np.bool_}


  def tokens(self, shape, patch):
    return shape[0]

  def finish(self, batch):
    batch['tokens_mask'] = batch['tokens'] != 0


class Vector(Modality):
  array, dtype = 'vector', np.float32


  def tokens(self, shape, patch):
    return 1


MODALITIES.add('image', Image())
MODALITIES.add('bytes', Bytes())
MODALITIES.add('vector', Vector())


def get(name: str) -> Modality:
  return MODALITIES.lookup(name)


def in_order() -> list[str]:
  """Registered modality names in registration order."""
  return MODALITIES.names(sort=False)
