"""Dispatchers: move tokens to their experts' buffers, run the experts, combine back.

Every dispatcher has one signature and returns the same numbers within float tolerance:

  fn(x_GxSxD, routing, weights, capacity, dtype) -> (y_GxSxD, kept)

`routing` is a `Routing` with a leading group axis; `weights` a list of (w_in_ExDxF,
w_out_ExFxD) per bank; `kept` marks the assignments that were computed (the routing's
assignment shape). Capacity is per group. Dropped assignments contribute nothing: the
token's residual carries it past the layer. Groups are handled natively, never by
`vmap`-ing the expert matmuls: expert buffers are laid out [E, G*C, D] so each expert runs
one matmul over all its groups' slots (vmap over groups measured 30% slower on CPU).

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
def dispatch_einsum(x_GxSxD, routing, weights, capacity, dtype=jnp.float32):
  """Reference: one-hot [G, S, E, C] dispatch and combine tensors."""
  g, s, d = x_GxSxD.shape
  e = _num_experts(weights)
  if routing.choice == 'token':
    slot_GxSxK, kept_GxSxK = jax.vmap(capacity_lib.slots_onehot, in_axes=(0, 0, None, None))(
        routing.expert_SxK, routing.valid_SxK, e, capacity)
    onehot_e = jax.nn.one_hot(routing.expert_SxK, e, dtype=dtype)
    onehot_c = jax.nn.one_hot(slot_GxSxK, capacity, dtype=dtype)
    kept = kept_GxSxK.astype(dtype)
    dispatch_GxSxExC = jnp.einsum('gsk,gske,gskc->gsec', kept, onehot_e, onehot_c)
    combine_GxSxExC = jnp.einsum('gsk,gske,gskc->gsec', kept * routing.weight_SxK.astype(dtype),
                                 onehot_e, onehot_c)
    kept_out = kept_GxSxK
  else:
    onehot_s = jax.nn.one_hot(routing.token_ExC, s, dtype=dtype)  # [G, E, C, S]
    valid = routing.valid_ExC.astype(dtype)
    dispatch_GxSxExC = jnp.einsum('gec,gecs->gsec', valid, onehot_s)
    combine_GxSxExC = jnp.einsum('gec,gecs->gsec', valid * routing.weight_ExC.astype(dtype),
                                 onehot_s)
    kept_out = routing.valid_ExC
  buf_ExGxCxD = jnp.einsum('gsec,gsd->egcd', dispatch_GxSxExC, x_GxSxD.astype(dtype))
  y = experts_lib.apply_banks(buf_ExGxCxD.reshape(e, g * capacity, d), weights, dtype)
  y_SxD = jnp.einsum('gsec,egcd->gsd', combine_GxSxExC, y.reshape(e, g, capacity, d))
  return y_SxD.astype(x_GxSxD.dtype), kept_out


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
def dispatch_sorted(x_GxSxD, routing, weights, capacity, dtype=jnp.float32, *,
                    run_experts=None, num_experts=None):
  """Fast path: sort-ranked slots, gathers into [E, G*C, D] buffers, batched expert matmuls.

  `run_experts(buf_ExMxD) -> y_ExMxD` replaces the local expert matmuls (the expert-parallel
  layer sends the buffers to the devices that hold the experts); `num_experts` is then the
  global E when `weights` hold one device's shard.
  """
  g, s, d = x_GxSxD.shape
  e = num_experts or _num_experts(weights)
  t = g * s
  x_TxD = x_GxSxD.reshape(t, d).astype(dtype)
  if run_experts is None:
    run_experts = lambda buf: experts_lib.apply_banks(buf, weights, dtype)  # noqa: E731
  if routing.choice == 'expert':
    y_TxD = _expert_choice_gather(x_TxD, g, s, routing, e, run_experts)
    return y_TxD.reshape(g, s, d).astype(x_GxSxD.dtype), routing.valid_ExC
  k = routing.expert_SxK.shape[-1]
  slot_GxSxK, kept_GxSxK, source_GxExC = jax.vmap(
      capacity_lib.slots_sorted, in_axes=(0, 0, None, None))(
          routing.expert_SxK, routing.valid_SxK, e, capacity)
  n = e * g * capacity  # buffer rows, laid out [E, G, C]
  group_G = jnp.arange(g)
  flat_GxSxK = jnp.where(
      kept_GxSxK,
      routing.expert_SxK * (g * capacity) + group_G[:, None, None] * capacity + slot_GxSxK, n)
  source_ExGxC = jnp.transpose(source_GxExC, (1, 0, 2))  # choice-major assignment index or A
  has_ExGxC = source_ExGxC < s * k
  token_N = jnp.where(has_ExGxC, group_G[None, :, None] * s + source_ExGxC % s, t).reshape(-1)
  w_GxSxK = jnp.where(kept_GxSxK, routing.weight_SxK, 0.0)
  w_GxA = jax.vmap(lambda w: _pad_row(_choice_major(w)))(w_GxSxK)  # [G, A + 1]
  w_N = jax.lax.stop_gradient(
      w_GxA[group_G[None, :, None], jnp.where(has_ExGxC, source_ExGxC, s * k)].reshape(-1))
  flat_TxK = flat_GxSxK.reshape(t, k)
  buf_NxD = gather_dispatch(x_TxD, token_N, flat_TxK)
  y_NxD = run_experts(buf_NxD.reshape(e, g * capacity, d)).reshape(n, d)
  out_TxD = gather_combine(y_NxD, w_GxSxK.reshape(t, k), flat_TxK, token_N, w_N)
  return out_TxD.reshape(g, s, d).astype(x_GxSxD.dtype), kept_GxSxK


def _expert_choice_gather(x_TxD, g, s, routing, e, run_experts):
  """Expert choice: gather each expert's chosen tokens; combine with a segment sum."""
  t, d = x_TxD.shape
  token_GxExC = jnp.where(routing.valid_ExC,
                          routing.token_ExC + jnp.arange(g)[:, None, None] * s, t)
  token_ExGxC = jnp.transpose(token_GxExC, (1, 0, 2))
  weight_ExGxC = jnp.transpose(routing.weight_ExC * routing.valid_ExC, (1, 0, 2))
  buf = _pad_row(x_TxD)[token_ExGxC.reshape(e, -1)]
  y = run_experts(buf) * weight_ExGxC.reshape(e, -1, 1).astype(buf.dtype)
  out = jax.ops.segment_sum(y.reshape(-1, d), token_ExGxC.reshape(-1), num_segments=t + 1)
  return out[:t]


# ----------------------------------------------------------------------------- dropless


def ragged_experts(x_NxD, expert_N, weights, dtype=jnp.float32):
  """Each row through its expert (ids over all banks; id E = no expert, output 0), as one
  grouped matmul per bank over the rows sorted by expert (`jax.lax.ragged_dot`)."""
  e = _num_experts(weights)
  n = x_NxD.shape[0]
  order_N = jnp.argsort(expert_N, stable=True)
  count_E = jnp.bincount(expert_N, length=e + 1)[:e].astype(jnp.int32)
  x_sorted = jnp.where((expert_N[order_N] < e)[:, None], x_NxD[order_N].astype(dtype), 0)
  y_sorted = jnp.zeros_like(x_sorted)
  for offset, (w_in, w_out) in zip(experts_lib.bank_offsets(weights), weights):
    e_b = w_in.shape[0]
    start = jnp.sum(count_E[:offset])
    xb = jnp.roll(x_sorted, -start, axis=0)  # this bank's rows first; rows past its count -> 0
    sizes = count_E[offset:offset + e_b]
    h = jax.nn.gelu(jax.lax.ragged_dot(xb, w_in.astype(dtype), sizes))
    yb = jax.lax.ragged_dot(h, w_out.astype(dtype), sizes)
    y_sorted = y_sorted + jnp.roll(yb, start, axis=0)
  inverse_N = jnp.zeros((n,), jnp.int32).at[order_N].set(jnp.arange(n, dtype=jnp.int32))
  return y_sorted[inverse_N]


@DISPATCHERS.register('ragged')
def dispatch_ragged(x_GxSxD, routing, weights, capacity, dtype=jnp.float32, *,
                    run_rows=None, num_experts=None):
  """Dropless grouped matmul over expert-sorted assignments (`capacity` is ignored).

  Dropless, so groups do not matter: all T tokens are sorted together. `run_rows(x_AxD,
  expert_A) -> y_AxD` replaces `ragged_experts` (the expert-parallel layer sends the rows to
  the devices that hold their experts); `num_experts` is then the global E (id E = none).
  """
  del capacity
  if routing.choice != 'token':
    raise ValueError("dispatcher='ragged' serves token-choice routing; expert choice has a fixed "
                     "capacity: use dispatcher='sorted' or 'einsum'.")
  g, s0, d = x_GxSxD.shape
  s = g * s0
  x_SxD = x_GxSxD.reshape(s, d)
  routing = jax.tree.map(lambda a: a.reshape((s,) + a.shape[2:]), routing)
  e = num_experts or _num_experts(weights)
  k = routing.expert_SxK.shape[-1]
  expert_A = jnp.where(_choice_major(routing.valid_SxK), _choice_major(routing.expert_SxK), e)
  x_AxD = jnp.tile(x_SxD.astype(dtype), (k, 1))  # choice-major: a = k * S + s
  if run_rows is None:
    y_AxD = ragged_experts(x_AxD, expert_A, weights, dtype)
  else:
    y_AxD = run_rows(x_AxD, expert_A)
  w_SxK = routing.weight_SxK * routing.valid_SxK
  out = jnp.einsum('ksd,sk->sd', y_AxD.reshape(k, s, d), w_SxK.astype(dtype))
  return out.reshape(g, s0, d).astype(x_SxD.dtype), routing.valid_SxK.reshape(g, s0, k)
