"""Multi-head self-attention over the batch contract's tokens, masked per example.

Each row attends to its own real tokens (padding mask); rows of per-position (language
modelling) tasks attend causally, the others bidirectionally, in the same call.
Vocabulary: B batch, L length, D model, H heads, K = D / H head width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def attention_mask(mask_BxL, causal_B, segment_BxL=None):
  """[B, L, L] bool: query i may see key j. Padding keys are hidden; causal rows see j <= i.

  Packed rows (`pathways.nn.packing`): `segment_BxL` gives each slot's example; a query sees
  keys of its own segment only, and `causal_B` may be per query token ([B, L]: causal within
  the segment, whose positions are contiguous and in order).
  A padding query sees itself only, so its softmax stays finite (its output is ignored).
  """
  b, l = mask_BxL.shape
  tril = jnp.tril(jnp.ones((l, l), bool))
  causal_BxL = causal_B if causal_B.ndim == 2 else jnp.broadcast_to(causal_B[:, None], (b, l))
  allowed = mask_BxL[:, None, :] & jnp.where(causal_BxL[:, :, None], tril[None], True)
  if segment_BxL is not None:
    allowed = allowed & (segment_BxL[:, :, None] == segment_BxL[:, None, :])
  return allowed | (~mask_BxL[:, :, None] & jnp.eye(l, dtype=bool)[None])


class SelfAttention(nnx.Module):
  """Pre-projected multi-head attention; parameters float32, compute in `dtype`."""

  def __init__(self, d_model: int, num_heads: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    if d_model % num_heads:
      raise ValueError(f'num_heads={num_heads}: must divide d_model={d_model}.')
    init = nnx.initializers.lecun_normal()
    self.num_heads = num_heads
    self.dtype = dtype
    self.w_qkv_Dx3D = nnx.Param(init(rngs.params(), (d_model, 3 * d_model), jnp.float32),
                                logical_axes=('embed', 'heads'))
    self.w_out_DxD = nnx.Param(init(rngs.params(), (d_model, d_model), jnp.float32),
                               logical_axes=('heads', 'embed'))

  def __call__(self, x_BxLxD, mask_BxL, causal_B, segment_BxL=None):
    """`causal_B`: [B] per row, or [B, L] per query token with `segment_BxL` (packed rows)."""
    b, l, d = x_BxLxD.shape
    h = self.num_heads
    qkv = x_BxLxD.reshape(b * l, d).astype(self.dtype) @ self.w_qkv_Dx3D[...].astype(self.dtype)
    q, k, v = jnp.split(qkv.reshape(b, l, 3, h, d // h), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [B, L, H, K]
    logits_BxHxLxL = jnp.einsum('bqhk,bshk->bhqs', q, k).astype(jnp.float32) / jnp.sqrt(d // h)
    allowed = attention_mask(mask_BxL, causal_B, segment_BxL)[:, None]
    probs = jax.nn.softmax(jnp.where(allowed, logits_BxHxLxL, -1e30), axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqs,bshk->bqhk', probs, v).reshape(b * l, d)
    return (out @ self.w_out_DxD[...].astype(self.dtype)).reshape(b, l, d).astype(x_BxLxD.dtype)


  def step(self, x_BxD, cache_k_BxLxHxK, cache_v_BxLxHxK, pos):
    """One causal position at index `pos` with a key/value cache [B, L_max, H, K]: the
    position's keys and values go into the cache, its query attends to positions <= pos.
    The same arithmetic as `__call__` on a causal row of real tokens. Returns (y_BxD,
    cache_k, cache_v)."""
    b, d = x_BxD.shape
    h = self.num_heads
    qkv = x_BxD.astype(self.dtype) @ self.w_qkv_Dx3D[...].astype(self.dtype)
    q, k, v = jnp.split(qkv.reshape(b, 3, h, d // h), 3, axis=1)
    q, k, v = q[:, 0], k[:, 0], v[:, 0]  # [B, H, K]
    cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k_BxLxHxK, k[:, None].astype(
        cache_k_BxLxHxK.dtype), pos, axis=1)
    cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v_BxLxHxK, v[:, None].astype(
        cache_v_BxLxHxK.dtype), pos, axis=1)
    logits_BxHxL = jnp.einsum('bhk,bshk->bhs', q, cache_k.astype(self.dtype)).astype(
        jnp.float32) / jnp.sqrt(d // h)
    seen = jnp.arange(cache_k.shape[1]) <= pos
    probs = jax.nn.softmax(jnp.where(seen[None, None], logits_BxHxL, -1e30), axis=-1).astype(
        self.dtype)
    out = jnp.einsum('bhs,bshk->bhk', probs, cache_v.astype(self.dtype)).reshape(b, d)
    y = (out @ self.w_out_DxD[...].astype(self.dtype)).astype(x_BxD.dtype)
    return y, cache_k, cache_v


def flops_per_token(d_model: int, mask_BxL, causal_B):
  """Forward FLOPs of one attention layer per query token: the four D x D projections
  (8 D^2) and scores plus weighted values over the keys it sees (4 D per key); 0 on padding."""
  visible_BxL = jnp.sum(attention_mask(mask_BxL, causal_B), axis=-1)
  return (8.0 * d_model * d_model + 4.0 * d_model * visible_BxL) * mask_BxL
