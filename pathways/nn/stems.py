"""Stems: embed each input modality to tokens [B_m, L_m, D] with a padding mask.

One stem per modality, shared by every task of that modality:
  * `ImageStem`: uint8 images [B, H, W, C] -> non-overlapping P x P patches -> linear -> + a
    learned position embedding; patches wholly outside an example's own image size (a small
    image padded into a larger task's array) are masked out.
  * `BytesStem`: int tokens [B, L] (0 = padding) -> embedding + learned positions.
  * `VectorStem`: float [B, V] -> one token.
`assemble` puts the stems' outputs back into batch row order, padded to [B, L_max, D].
`STEMS` maps a modality name (`pathways.modalities`) to the function that builds its stem
for a task list and layout; every stem has `embed_batch(batch) -> (tokens, mask)`.

Matmuls are written 2-D ([rows, in] @ [in, D]): XLA:CPU runs the backward of a 3-D einsum
about 1.5x slower.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathways import registry

STEMS = registry.Registry('stem')


def _linear_init(rngs, shape):
  return nnx.initializers.lecun_normal()(rngs.params(), shape, jnp.float32)


class ImageStem(nnx.Module):
  """Patches of uint8 images [B, H, W, C] (H, W multiples of `patch`) to [B, L, D].

  `row_hw` (optional, [B, 2]): each batch row's own image size, kept for the caller to pass
  back as `valid_hw_Bx2` (small images padded into a larger task's array).
  """

  def __init__(self, d_model: int, *, image_shape: tuple[int, int, int], patch: int,
               row_hw=None, rngs: nnx.Rngs):
    h, w, c = image_shape
    if h % patch or w % patch:
      raise ValueError(f'patch={patch}: must divide the image height and width {h}x{w}.')
    self.patch = patch
    self.image_shape = tuple(image_shape)
    self.num_patches = (h // patch) * (w // patch)
    self.row_hw = nnx.data(None if row_hw is None else np.asarray(row_hw, np.int32))
    self.w_PxD = nnx.Param(_linear_init(rngs, (patch * patch * c, d_model)),
                           logical_axes=(None, 'embed'))
    self.pos_LxD = nnx.Param(0.02 * jax.random.normal(rngs.params(), (self.num_patches, d_model)),
                             logical_axes=(None, 'embed'))

  def embed_batch(self, batch):
    """This stem's rows of a pipeline batch: the 'image' array and each row's own size."""
    return self(jnp.asarray(batch['image']), None if self.row_hw is None else jnp.asarray(
        self.row_hw))

  def __call__(self, image_BxHxWxC, valid_hw_Bx2=None):
    """Returns tokens [B, L, D] and mask [B, L]; `valid_hw_Bx2` is each image's own size."""
    b, h, w, c = image_BxHxWxC.shape
    if (h, w, c) != self.image_shape:
      raise ValueError(f'image shape {(h, w, c)}: this stem embeds {self.image_shape}.')
    p = self.patch
    x = image_BxHxWxC.astype(jnp.float32) / 255.0
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x_RxP = x.reshape(b * self.num_patches, p * p * c)
    tokens = (x_RxP @ self.w_PxD[...]).reshape(b, self.num_patches, -1) + self.pos_LxD[...]
    if valid_hw_Bx2 is None:
      return tokens, jnp.ones((b, self.num_patches), bool)
    rows = jnp.arange(h // p) * p
    cols = jnp.arange(w // p) * p
    inside = ((rows[None, :, None] < valid_hw_Bx2[:, 0, None, None])
              & (cols[None, None, :] < valid_hw_Bx2[:, 1, None, None]))
    return tokens, inside.reshape(b, self.num_patches)


class BytesStem(nnx.Module):
  """Token ids [B, L] (0 = padding) to [B, L, D] with learned positions."""

  def __init__(self, d_model: int, *, vocab: int = 256, max_len: int, rngs: nnx.Rngs):
    self.vocab = vocab
    self.max_len = max_len
    self.embed_VxD = nnx.Param(jax.random.normal(rngs.params(), (vocab, d_model)) * 0.02,
                               logical_axes=('vocab', 'embed'))
    self.pos_LxD = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, d_model)),
                             logical_axes=(None, 'embed'))

  def embed_batch(self, batch):
    """This stem's rows of a pipeline batch: 'tokens' with 'tokens_mask'."""
    return self(jnp.asarray(batch['tokens']), jnp.asarray(batch['tokens_mask']))

  def __call__(self, tokens_BxL, mask_BxL=None):
    b, l = tokens_BxL.shape
    if l > self.max_len:
      raise ValueError(f'tokens length {l}: this stem embeds at most max_len={self.max_len}.')
    x = self.embed_VxD[...][tokens_BxL] + self.pos_LxD[...][:l]
    return x, (tokens_BxL != 0) if mask_BxL is None else mask_BxL


class VectorStem(nnx.Module):
  """Dense vectors [B, V] to one token [B, 1, D]."""

  def __init__(self, d_model: int, *, in_dim: int, rngs: nnx.Rngs):
    self.w_VxD = nnx.Param(_linear_init(rngs, (in_dim, d_model)), logical_axes=(None, 'embed'))
    self.b_D = nnx.Param(jnp.zeros((d_model,)), logical_axes=('embed',))

  def embed_batch(self, batch):
    """This stem's rows of a pipeline batch: the 'vector' array."""
    return self(jnp.asarray(batch['vector']))

  def __call__(self, vector_BxV):
    x = vector_BxV.astype(jnp.float32) @ self.w_VxD[...] + self.b_D[...]
    return x[:, None, :], jnp.ones((vector_BxV.shape[0], 1), bool)


@STEMS.register('image')
def image_stem(d_model, *, tasks, layout, patch, rngs):
  """Patches of the image tasks' rows, each row masked to its own task's image size."""
  hw = {i: t.input_shape[:2] for i, t in enumerate(tasks) if t.modality == 'image'}
  owner = [next(i for i in hw if r in layout.task_rows(i)) for r in layout.rows['image']]
  return ImageStem(d_model, image_shape=layout.shapes['image'], patch=patch,
                   row_hw=np.array([hw[i] for i in owner], np.int32), rngs=rngs)


@STEMS.register('bytes')
def bytes_stem(d_model, *, tasks, layout, patch, rngs):
  del tasks, patch
  return BytesStem(d_model, max_len=layout.shapes['tokens'][0], rngs=rngs)


@STEMS.register('vector')
def vector_stem(d_model, *, tasks, layout, patch, rngs):
  del tasks, patch
  return VectorStem(d_model, in_dim=layout.shapes['vector'][0], rngs=rngs)


def assemble(parts, rows, batch_size: int):
  """Puts each modality's tokens back into batch row order, padded to the longest.

  Args:
    parts: modality -> (tokens [B_m, L_m, D], mask [B_m, L_m]).
    rows: modality -> batch rows of those examples (static numpy ints, as in BatchLayout).
    batch_size: B.

  Returns:
    tokens [B, L_max, D] and mask [B, L_max] (False on padding and on rows no modality fills).
  """
  l_max = max(t.shape[1] for t, _ in parts.values())
  d = next(iter(parts.values()))[0].shape[-1]
  x_BxLxD = jnp.zeros((batch_size, l_max, d), jnp.float32)
  mask_BxL = jnp.zeros((batch_size, l_max), bool)
  for modality, (tokens, mask) in parts.items():
    r = np.asarray(rows[modality])
    pad = l_max - tokens.shape[1]
    x_BxLxD = x_BxLxD.at[r].set(jnp.pad(tokens, ((0, 0), (0, pad), (0, 0))))
    mask_BxL = mask_BxL.at[r].set(jnp.pad(mask, ((0, 0), (0, pad))))
  return x_BxLxD, mask_BxL
