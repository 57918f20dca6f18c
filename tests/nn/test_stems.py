"""Stems: shapes and masks per modality, and assembly into batch row order."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathways.nn import stems


def test_image_stem_patches_and_mask_for_smaller_images():
  stem = stems.ImageStem(16, image_shape=(28, 28, 1), patch=7, rngs=nnx.Rngs(0))
  img = jnp.zeros((3, 28, 28, 1), jnp.uint8)
  tokens, mask = stem(img, valid_hw_Bx2=jnp.array([[28, 28], [8, 8], [14, 7]]))
  assert tokens.shape == (3, 16, 16)
  # 4x4 grid of 7x7 patches. An 8x8 image touches patch rows/cols 0-1 -> 4 patches;
  # a 14x7 image touches rows 0-1, col 0 -> 2 patches.
  np.testing.assert_array_equal(mask.sum(-1), [16, 4, 2])
  assert bool(mask[1].reshape(4, 4)[:2, :2].all())


def test_image_patch_order_matches_a_slow_loop():
  stem = stems.ImageStem(4, image_shape=(4, 4, 2), patch=2, rngs=nnx.Rngs(0))
  img = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 4, 4, 2)), jnp.uint8)
  tokens, _ = stem(img)
  x = np.asarray(img[0], np.float32) / 255.0
  w, pos = np.asarray(stem.w_PxD[...]), np.asarray(stem.pos_LxD[...])
  for i in range(2):
    for j in range(2):
      patch = x[2 * i:2 * i + 2, 2 * j:2 * j + 2, :].reshape(-1)
      np.testing.assert_allclose(tokens[0, 2 * i + j], patch @ w + pos[2 * i + j], rtol=1e-5,
                                 atol=1e-6)


def test_bytes_and_vector_stems():
  b = stems.BytesStem(8, max_len=6, rngs=nnx.Rngs(0))
  tokens, mask = b(jnp.array([[5, 6, 0, 0], [1, 2, 3, 4]]))
  assert tokens.shape == (2, 4, 8)
  np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 1, 1]])
  with pytest.raises(ValueError, match='max_len=6'):
    b(jnp.ones((1, 7), jnp.int32))
  v = stems.VectorStem(8, in_dim=3, rngs=nnx.Rngs(0))
  tokens, mask = v(jnp.ones((2, 3)))
  assert tokens.shape == (2, 1, 8) and bool(mask.all())


def test_assemble_restores_row_order_and_pads():
  img = (jnp.ones((2, 4, 3)), jnp.ones((2, 4), bool))
  byt = (2 * jnp.ones((1, 6, 3)), jnp.array([[1, 1, 1, 0, 0, 0]], bool))
  x, mask = stems.assemble({'image': img, 'bytes': byt}, {'image': [0, 2], 'bytes': [1]}, 3)
  assert x.shape == (3, 6, 3)
  np.testing.assert_array_equal(mask.sum(-1), [4, 3, 4])
  assert float(x[1, 0, 0]) == 2.0 and float(x[0, 0, 0]) == 1.0 and float(x[0, 5, 0]) == 0.0
