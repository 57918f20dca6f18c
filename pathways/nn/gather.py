"""Gathers whose backward passes are gathers too: the fast path's token <-> buffer moves.

A scatter-add in the backward pass of a gather is slow on every backend; where the inverse
map is known (which buffer slots each token fills), the gradient is a gather as well.

Vocabulary: T tokens, K assignments per token, N buffer rows (E * G * C), D model width.
Index N (or T) is the "nothing here" sentinel: a padded zero row.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def pad_row(x_NxD):
  """Appends one zero row: index N is the 'nothing here' sentinel for gathers."""
  return jnp.concatenate([x_NxD, jnp.zeros((1,) + x_NxD.shape[1:], x_NxD.dtype)], axis=0)


@jax.custom_vjp
def gather_dispatch(x_TxD, token_N, slot_TxK):
  """buf[n] = x[token[n]] (zero where token[n] == T).

  `slot_TxK` is the inverse map (slot of each token's k-th assignment, N where none); the
  backward pass uses it to gather instead of scatter-adding: dx[t] = sum_k dbuf[slot[t, k]].
  """
  del slot_TxK
  return pad_row(x_TxD)[token_N]


def _gather_dispatch_fwd(x_TxD, token_N, slot_TxK):
  return gather_dispatch(x_TxD, token_N, slot_TxK), (slot_TxK,)


def _gather_dispatch_bwd(res, g_NxD):
  (slot_TxK,) = res
  return jnp.sum(pad_row(g_NxD)[slot_TxK], axis=1), None, None


gather_dispatch.defvjp(_gather_dispatch_fwd, _gather_dispatch_bwd)


@jax.custom_vjp
def gather_combine(y_NxD, w_TxK, slot_TxK, token_N, w_N):
  """out[t] = sum_k w[t, k] * y[slot[t, k]] (slot N means nothing).

  `token_N` and `w_N` (token and weight of the assignment in each slot) make the backward
  pass a gather too: dy[n] = w[n] * dout[token[n]].
  """
  del token_N, w_N
  return jnp.einsum('tkd,tk->td', pad_row(y_NxD)[slot_TxK], w_TxK.astype(y_NxD.dtype))


def _gather_combine_fwd(y_NxD, w_TxK, slot_TxK, token_N, w_N):
  out = gather_combine(y_NxD, w_TxK, slot_TxK, token_N, w_N)
  return out, (y_NxD, w_TxK, slot_TxK, token_N, w_N)


def _gather_combine_bwd(res, g_TxD):
  y_NxD, w_TxK, slot_TxK, token_N, w_N = res
  dw_TxK = jnp.einsum('tkd,td->tk', pad_row(y_NxD)[slot_TxK], g_TxD).astype(w_TxK.dtype)
  dy_NxD = pad_row(g_TxD)[token_N] * w_N[:, None].astype(g_TxD.dtype)
  return dy_NxD.astype(y_NxD.dtype), dw_TxK, None, None, None


gather_combine.defvjp(_gather_combine_fwd, _gather_combine_bwd)
