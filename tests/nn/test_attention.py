"""Attention: masks per row (padding, causal) against a per-example loop reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathways.nn import attention


def _reference(layer, x, mask, causal):
  """One example at a time, over its real tokens only, with an explicit causal loop."""
  d = x.shape[-1]
  h = layer.num_heads
  wqkv, wout = np.asarray(layer.w_qkv_Dx3D[...]), np.asarray(layer.w_out_DxD[...])
  out = np.zeros_like(np.asarray(x))
  for b in range(x.shape[0]):
    idx = np.nonzero(np.asarray(mask[b]))[0]
    xb = np.asarray(x[b])[idx]
    q, k, v = np.split((xb @ wqkv).reshape(len(idx), 3, h, d // h), 3, axis=1)
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    for i in range(len(idx)):
      heads = []
      for hh in range(h):
        keys = range(i + 1) if causal[b] else range(len(idx))
        s = np.array([q[i, hh] @ k[j, hh] for j in keys]) / np.sqrt(d // h)
        p = np.exp(s - s.max())
        p /= p.sum()
        heads.append(sum(p[n] * v[j, hh] for n, j in enumerate(keys)))
      out[b, idx[i]] = np.concatenate(heads) @ wout
  return out


def test_masked_attention_equals_per_example_reference():
  layer = attention.SelfAttention(8, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)
  causal = jnp.array([False, True, True])
  y = layer(x, mask, causal)
  ref = _reference(layer, x, mask, causal)
  np.testing.assert_allclose(np.asarray(y)[np.asarray(mask)], ref[np.asarray(mask)], rtol=1e-4,
                             atol=1e-5)
  assert np.isfinite(np.asarray(y)).all()


def test_causal_rows_do_not_see_the_future():
  layer = attention.SelfAttention(8, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 6, 8))
  mask, causal = jnp.ones((1, 6), bool), jnp.array([True])
  x2 = x.at[0, 4:].set(99.0)
  np.testing.assert_allclose(layer(x, mask, causal)[0, :4], layer(x2, mask, causal)[0, :4],
                             rtol=1e-5)


def test_heads_must_divide_width():
  with pytest.raises(ValueError, match='num_heads=3: must divide d_model=8'):
    attention.SelfAttention(8, 3, rngs=nnx.Rngs(0))
