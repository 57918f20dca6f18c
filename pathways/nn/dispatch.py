"""Dispatchers: move tokens to their experts' buffers, run the experts, combine back.

Every dispatcher has one signature, works on one group of S tokens (the MoE layer vmaps
over groups), and returns the same numbers within float tolerance:

  fn(x_SxD, routing, weights, capacity, dtype) -> (y_SxD, kept)

`routing` is one group's `Routing`; `weights` a list of (w_in_ExDxF, w_out_ExFxD) per bank;
`kept` marks the assignments that were computed (shape of the routing's assignments).
Dropped assignments contribute nothing: the token's residual carries it past the layer.

  * 'einsum': the reference. One-hot dispatch and combine tensors [S, E, C] (the
    formulation of vmoe, flaxformer and praxis). Test oracle and benchmark baseline.
  * 'sorted': the fast CPU/GPU path. One stable sort ranks assignments; tokens are
    gathered into [E, C, D] buffers, one batched matmul per bank, gathered back. Both the
    forward and the backward pass are gathers (custom VJP): no [S, E, C] tensor and no
    scatter-add on the hot path.
  * 'ragged': dropless grouped matmul with `jax.lax.ragged_dot` over expert-sorted tokens,
    for GPU/TPU. XLA:CPU lowers ragged_dot to one dense matmul per group, so it is correct
    but slow on CPU and never the CPU default.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pathways import registry
from pathways.nn import capacity as capacity_lib
from pathways.nn import experts as experts_lib

DISPATCHERS = registry.Registry('dispatcher')


def _pad_row(x_NxD):
  """Appends one zero row: index N is the 'nothing here' sentinel for gathers."""
  return jnp.concatenate([x_NxD, jnp.zeros((1,) + x_NxD.shape[1:], x_NxD.dtype)], axis=0)


def _num_experts(weights):
  return sum(w_in.shape[0] for w_in, _ in weights)


# ----------------------------------------------------------------------------- reference


@DISPATCHERS.register('einsum')
def dispatch_einsum(x_SxD, routing, weights, capacity, dtype=jnp.float32):
  """Reference: one-hot [S, E, C] dispatch and combine tensors."""
  s = x_SxD.shape[0]
  e = _num_experts(weights)
  if routing.choice == 'token':
    slot_SxK, kept_SxK = capacity_lib.slots_onehot(routing.expert_SxK, routing.valid_SxK, e,
                                                   capacity)
    onehot_e_SxKxE = jax.nn.one_hot(routing.expert_SxK, e, dtype=dtype)
    onehot_c_SxKxC = jax.nn.one_hot(slot_SxK, capacity, dtype=dtype)
    kept = kept_SxK.astype(dtype)
    dispatch_SxExC = jnp.einsum('sk,ske,skc->sec', kept, onehot_e_SxKxE, onehot_c_SxKxC)
    combine_SxExC = jnp.einsum('sk,ske,skc->sec', kept * routing.weight_SxK.astype(dtype),
                               onehot_e_SxKxE, onehot_c_SxKxC)
    kept_out = kept_SxK
  else:
    onehot_s_ExCxS = jax.nn.one_hot(routing.token_ExC, s, dtype=dtype)
    valid = routing.valid_ExC.astype(dtype)
    dispatch_SxExC = jnp.einsum('ec,ecs->sec', valid, onehot_s_ExCxS)
    combine_SxExC = jnp.einsum('ec,ecs->sec', valid * routing.weight_ExC.astype(dtype),
                               onehot_s_ExCxS)
    kept_out = routing.valid_ExC
  buf_ExCxD = jnp.einsum('sec,sd->ecd', dispatch_SxExC, x_SxD.astype(dtype))
  y_ExCxD = experts_lib.apply_banks(buf_ExCxD, weights, dtype)
  y_SxD = jnp.einsum('sec,ecd->sd', combine_SxExC, y_ExCxD)
  return y_SxD.astype(x_SxD.dtype), kept_out


# ----------------------------------------------------------------------------- fast path


@jax.custom_vjp
def gather_dispatch(x_SxD, token_N, slot_SxK):
  """buf[n] = x[token[n]] (zero where token[n] == S).

  `slot_SxK` is the inverse map (slot of each token's k-th assignment, N where none); the
  backward pass uses it to gather instead of scatter-adding: dx[s] = sum_k dbuf[slot[s, k]].
  """
  del slot_SxK
  return _pad_row(x_SxD)[token_N]


def _gather_dispatch_fwd(x_SxD, token_N, slot_SxK):
  return gather_dispatch(x_SxD, token_N, slot_SxK), (slot_SxK,)


def _gather_dispatch_bwd(res, g_NxD):
  (slot_SxK,) = res
  return jnp.sum(_pad_row(g_NxD)[slot_SxK], axis=1), None, None


gather_dispatch.defvjp(_gather_dispatch_fwd, _gather_dispatch_bwd)


@jax.custom_vjp
def gather_combine(y_NxD, w_SxK, slot_SxK, token_N, w_N):
  """out[s] = sum_k w[s, k] * y[slot[s, k]] (slot N means nothing).

  `token_N` and `w_N` (token and weight of the assignment in each slot) make the backward
  pass a gather too: dy[n] = w[n] * dout[token[n]].
  """
  del token_N, w_N
  return jnp.einsum('skd,sk->sd', _pad_row(y_NxD)[slot_SxK], w_SxK.astype(y_NxD.dtype))


def _gather_combine_fwd(y_NxD, w_SxK, slot_SxK, token_N, w_N):
  out = gather_combine(y_NxD, w_SxK, slot_SxK, token_N, w_N)
  return out, (y_NxD, w_SxK, slot_SxK, token_N, w_N)


def _gather_combine_bwd(res, g_SxD):
  y_NxD, w_SxK, slot_SxK, token_N, w_N = res
  dw_SxK = jnp.einsum('skd,sd->sk', _pad_row(y_NxD)[slot_SxK], g_SxD).astype(w_SxK.dtype)
  dy_NxD = _pad_row(g_SxD)[token_N] * w_N[:, None].astype(g_SxD.dtype)
  return dy_NxD.astype(y_NxD.dtype), dw_SxK, None, None, None


gather_combine.defvjp(_gather_combine_fwd, _gather_combine_bwd)


def _choice_major(a_SxK):
  return a_SxK.T.reshape(-1)


@DISPATCHERS.register('sorted')
def dispatch_sorted(x_SxD, routing, weights, capacity, dtype=jnp.float32):
  """Fast path: sort-ranked slots, gathers into [E, C, D] buffers, batched expert matmuls."""
  s, d = x_SxD.shape
  e = _num_experts(weights)
  if routing.choice == 'expert':
    return _expert_choice_gather(x_SxD, routing, weights, dtype)
  k = routing.expert_SxK.shape[-1]
  slot_SxK, kept_SxK, source_ExC = capacity_lib.slots_sorted(
      routing.expert_SxK, routing.valid_SxK, e, capacity)
  n = e * capacity
  flat_SxK = jnp.where(kept_SxK, routing.expert_SxK * capacity + slot_SxK, n)
  assign_N = source_ExC.reshape(-1)                     # choice-major assignment index or A
  token_N = jnp.where(assign_N < s * k, assign_N % s, s)
  w_SxK = jnp.where(kept_SxK, routing.weight_SxK, 0.0)
  w_N = jax.lax.stop_gradient(_pad_row(_choice_major(w_SxK))[assign_N])
  buf_NxD = gather_dispatch(x_SxD.astype(dtype), token_N, flat_SxK)
  y_NxD = experts_lib.apply_banks(buf_NxD.reshape(e, capacity, d), weights, dtype).reshape(n, d)
  out_SxD = gather_combine(y_NxD, w_SxK, flat_SxK, token_N, w_N)
  return out_SxD.astype(x_SxD.dtype), kept_SxK


def _expert_choice_gather(x_SxD, routing, weights, dtype):
  """Expert choice: gather each expert's chosen tokens; combine with a segment sum."""
  s, d = x_SxD.shape
  token_ExC = jnp.where(routing.valid_ExC, routing.token_ExC, s)
  buf_ExCxD = _pad_row(x_SxD.astype(dtype))[token_ExC]
  y_ExCxD = experts_lib.apply_banks(buf_ExCxD, weights, dtype)
  y_ExCxD = y_ExCxD * (routing.weight_ExC * routing.valid_ExC)[..., None].astype(dtype)
  out = jax.ops.segment_sum(y_ExCxD.reshape(-1, d), token_ExC.reshape(-1), num_segments=s + 1)
  return out[:s].astype(x_SxD.dtype), routing.valid_ExC


# ----------------------------------------------------------------------------- dropless


@DISPATCHERS.register('ragged')
def dispatch_ragged(x_SxD, routing, weights, capacity, dtype=jnp.float32):
  """Dropless grouped matmul over expert-sorted assignments (`capacity` is ignored)."""
  del capacity
  if routing.choice != 'token':
    raise ValueError("dispatcher='ragged' serves token-choice routing; expert choice has a fixed "
                     "capacity: use dispatcher='sorted' or 'einsum'.")
  s, _ = x_SxD.shape
  e = _num_experts(weights)
  k = routing.expert_SxK.shape[-1]
  num_assign = s * k
  valid_A = _choice_major(routing.valid_SxK)
  key_A = jnp.where(valid_A, _choice_major(routing.expert_SxK), e)
  order_A = jnp.argsort(key_A, stable=True)
  count_E = jnp.bincount(key_A, length=e + 1)[:e].astype(jnp.int32)
  token_sorted = jnp.where(key_A[order_A] < e, order_A % s, s)
  x_AxD = _pad_row(x_SxD.astype(dtype))[token_sorted]
  y_AxD = jnp.zeros_like(x_AxD)
  for offset, (w_in, w_out) in zip(experts_lib.bank_offsets(weights), weights):
    e_b = w_in.shape[0]
    start = jnp.sum(count_E[:offset])
    xb = jnp.roll(x_AxD, -start, axis=0)  # this bank's rows first; rows past its count -> 0
    sizes = count_E[offset:offset + e_b]
    h = jax.nn.gelu(jax.lax.ragged_dot(xb, w_in.astype(dtype), sizes))
    yb = jax.lax.ragged_dot(h, w_out.astype(dtype), sizes)
    y_AxD = y_AxD + jnp.roll(yb, start, axis=0)
  inverse_A = jnp.zeros((num_assign,), jnp.int32).at[order_A].set(jnp.arange(num_assign))
  y_KxSxD = y_AxD[inverse_A].reshape(k, s, -1)
  w_SxK = routing.weight_SxK * routing.valid_SxK
  out = jnp.einsum('ksd,sk->sd', y_KxSxD, w_SxK.astype(dtype))
  return out.astype(x_SxD.dtype), routing.valid_SxK
