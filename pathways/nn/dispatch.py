"""Dispatchers: move tokens to their experts' buffers, run the experts, combine back.

Every dispatcher has one signature and returns the same numbers within float tolerance:

  fn(x_GxSxD, routing, weights, capacity, dtype, *, remat_hidden=False) -> (y_GxSxD, kept)

`routing` is a `pathways.nn.routing` type (token or expert choice) with a leading group
axis; the dispatchers call its methods and never ask which kind it is. `weights` is a list
of (w_in_ExDxF, w_out_ExFxD) per bank; `kept` marks the assignments that were computed (the
routing's assignment shape); `remat_hidden` makes the experts' backward recompute their hidden
activations instead of keeping them (`experts.bank_ffn`). Capacity is per group. Dropped assignments contribute nothing: the
token's residual carries it past the layer. Groups are handled natively, never by
`vmap`-ing the expert matmuls: expert buffers are laid out [E, G*C, D] so each expert runs
one matmul over all its groups' slots (vmap over groups measured 30% slower on CPU).

  * 'einsum': the reference. One-hot dispatch and combine tensors [S, E, C] (the
    formulation of vmoe, flaxformer and praxis). Test oracle and benchmark baseline.
  * 'sorted': the fast CPU/GPU path. One stable sort ranks assignments; tokens are
    gathered into [E, C, D] buffers, one batched matmul per bank, gathered back. Both the
    forward and the backward pass are gathers (`pathways.nn.gather`): no [S, E, C] tensor
    and no scatter-add on the hot path.
  * 'ragged': dropless grouped matmul over expert-sorted tokens, for GPU/TPU. The grouped
    FFN is `pathways.nn.grouped_matmul.GROUPED_MATMULS[grouped_matmul]`: 'ragged_dot'
    (`jax.lax.ragged_dot`; XLA:CPU lowers it to one dense matmul per group, so it is correct
    but slow on CPU and never the CPU default) or 'pallas' (a tiled grouped-matmul kernel;
    interpret mode on CPU).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pathways import registry
from pathways.nn import experts as experts_lib
from pathways.nn import grouped_matmul as grouped_lib

DISPATCHERS = registry.Registry('dispatcher')


def _num_experts(weights):
  return sum(w_in.shape[0] for w_in, _ in weights)


@DISPATCHERS.register('einsum')
def dispatch_einsum(x_GxSxD, routing, weights, capacity, dtype=jnp.float32, *,
                    remat_hidden=False):
  """Reference: one-hot [G, S, E, C] dispatch and combine tensors."""
  g, s, d = x_GxSxD.shape
  e = _num_experts(weights)
  dispatch_GxSxExC, combine_GxSxExC, kept = routing.onehot(e, capacity, dtype)
  buf_ExGxCxD = jnp.einsum('gsec,gsd->egcd', dispatch_GxSxExC, x_GxSxD.astype(dtype))
  y = experts_lib.apply_banks(buf_ExGxCxD.reshape(e, g * capacity, d), weights, dtype,
                              remat_hidden)
  y_SxD = jnp.einsum('gsec,egcd->gsd', combine_GxSxExC, y.reshape(e, g, capacity, d))
  return y_SxD.astype(x_GxSxD.dtype), kept


@DISPATCHERS.register('sorted')
def dispatch_sorted(x_GxSxD, routing, weights, capacity, dtype=jnp.float32, *,
                    remat_hidden=False, run_experts=None, num_experts=None):
  """Fast path: the routing's buffer plan (`routing.buffers`: gathers into [E, G*C, D]),
  batched expert matmuls, the plan's gate-weighted combine.

  `run_experts(buf_ExMxD) -> y_ExMxD` replaces the local expert matmuls (the expert-parallel
  layer sends the buffers to the devices that hold the experts); `num_experts` is then the
  global E when `weights` hold one device's shard.
  """
  g, s, d = x_GxSxD.shape
  e = num_experts or _num_experts(weights)
  if run_experts is None:
    run_experts = lambda buf: experts_lib.apply_banks(  # noqa: E731
        buf, weights, dtype, remat_hidden)
  plan = routing.buffers(e, capacity)
  buf_NxD = plan.gather(x_GxSxD.reshape(g * s, d).astype(dtype))
  y_NxD = run_experts(buf_NxD.reshape(e, g * capacity, d)).reshape(-1, d)
  return plan.combine(y_NxD).reshape(g, s, d).astype(x_GxSxD.dtype), plan.kept


# ----------------------------------------------------------------------------- dropless


def ragged_experts(x_NxD, expert_N, weights, dtype=jnp.float32, remat_hidden=False,
                   grouped_matmul='ragged_dot'):
  """Each row through its expert (ids over all banks; id E = no expert, output 0), as one
  grouped FFN per bank over the rows sorted by expert (`grouped_lib.GROUPED_MATMULS`)."""
  ffn = grouped_lib.GROUPED_MATMULS.lookup(grouped_matmul)
  ffn = jax.checkpoint(ffn) if remat_hidden else ffn
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
    yb = ffn(xb, w_in.astype(dtype), w_out.astype(dtype), sizes)
    y_sorted = y_sorted + jnp.roll(yb, start, axis=0)
  inverse_N = jnp.zeros((n,), jnp.int32).at[order_N].set(jnp.arange(n, dtype=jnp.int32))
  return y_sorted[inverse_N]


@DISPATCHERS.register('ragged')
def dispatch_ragged(x_GxSxD, routing, weights, capacity, dtype=jnp.float32, *,
                    remat_hidden=False, run_rows=None, num_experts=None,
                    grouped_matmul='ragged_dot'):
  """Dropless grouped matmul over expert-sorted assignments (`capacity` is ignored).

  Dropless, so groups do not matter: all T tokens are sorted together
  (`routing.dropless_rows`). `run_rows(x_AxD, expert_A) -> y_AxD` replaces `ragged_experts`
  (the expert-parallel layer sends the rows to the devices that hold their experts);
  `num_experts` is then the global E (id E = none).
  """
  del capacity
  g, s0, d = x_GxSxD.shape
  e = num_experts or _num_experts(weights)
  expert_A, w_TxK, kept = routing.dropless_rows(e)
  k = w_TxK.shape[-1]
  x_TxD = x_GxSxD.reshape(g * s0, d)
  x_AxD = jnp.tile(x_TxD.astype(dtype), (k, 1))  # choice-major: a = k * T + t
  if run_rows is None:
    y_AxD = ragged_experts(x_AxD, expert_A, weights, dtype, remat_hidden, grouped_matmul)
  else:
    y_AxD = run_rows(x_AxD, expert_A)
  out = jnp.einsum('ktd,tk->td', y_AxD.reshape(k, g * s0, d), w_TxK.astype(dtype))
  return out.reshape(g, s0, d).astype(x_TxD.dtype), kept
