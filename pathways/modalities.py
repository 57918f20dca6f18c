"""Input modalities as a registry: how each kind of input sits in a batch and is embedded.

  * 'image': uint8 [H, W] or [H, W, C] in the batch array 'image' (zero-padded to the
    largest image task; a small image's patches outside its own size are masked).
  * 'bytes': int token ids [L] in 'tokens' (0 = padding), with 'tokens_mask' and the
    per-position 'targets' beside them.
  * 'vector': float [V] in 'vector', one token.

A modality states its batch array and dtype, the arrays that travel with it, how one
example sits in its array, and builds the stem that embeds its rows. The layout, the
pipeline and the model ask the modality; none compares modality names. Registration order
is the order stems are built (it fixes their initialization).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pathways import registry
from pathways.nn import stems

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

  def make_stem(self, d_model: int, *, tasks, layout, patch: int, rngs):
    raise NotImplementedError

  def embed(self, stem, batch):
    """(tokens [B_m, L_m, D], mask [B_m, L_m]) of this modality's rows."""
    raise NotImplementedError

  def tokens(self, shape, patch: int) -> int:
    """Tokens one example of this padded array shape takes in the stack."""
    raise NotImplementedError

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

  def make_stem(self, d_model, *, tasks, layout, patch, rngs):
    # Each image row's own size (static per task), for patch masks.
    hw = {i: t.input_shape[:2] for i, t in enumerate(tasks) if t.modality == 'image'}
    owner = [next(i for i in hw if r in layout.task_rows(i)) for r in layout.rows['image']]
    return stems.ImageStem(d_model, image_shape=layout.shapes['image'], patch=patch,
                           row_hw=np.array([hw[i] for i in owner], np.int32), rngs=rngs)

  def embed(self, stem, batch):
    return stem(jnp.asarray(batch['image']), jnp.asarray(stem.row_hw))

  def tokens(self, shape, patch):
    return (shape[0] // patch) * (shape[1] // patch)


class Bytes(Modality):
  array, dtype = 'tokens', np.int32
  extra = {'targets': np.int32, 'tokens_mask': np.bool_}

  def make_stem(self, d_model, *, tasks, layout, patch, rngs):
    return stems.BytesStem(d_model, max_len=layout.shapes['tokens'][0], rngs=rngs)

  def embed(self, stem, batch):
    return stem(jnp.asarray(batch['tokens']), jnp.asarray(batch['tokens_mask']))

  def tokens(self, shape, patch):
    return shape[0]

  def finish(self, batch):
    batch['tokens_mask'] = batch['tokens'] != 0


class Vector(Modality):
  array, dtype = 'vector', np.float32

  def make_stem(self, d_model, *, tasks, layout, patch, rngs):
    return stems.VectorStem(d_model, in_dim=layout.shapes['vector'][0], rngs=rngs)

  def embed(self, stem, batch):
    return stem(jnp.asarray(batch['vector']))

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
