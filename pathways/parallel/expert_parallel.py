"""Expert parallelism: tokens travel to the devices that hold their experts.

Inside `jax.shard_map` over the whole mesh, each device owns G / N capacity groups (N = all
devices) and, along the 'expert' mesh axis, 1 / X of every expert bank. Per device:

  1. the local dispatcher (sort-ranked slots, `dispatch.dispatch_sorted`) fills [E, g*C, D]
     buffers for its own groups;
  2. one `all_to_all` over 'expert' sends expert e's rows to the device that holds e and
     receives, from each of the X devices, the rows for its own E / X experts;
  3. the local experts run; a second `all_to_all` sends the results back; the dispatcher
     combines them with the gate weights.

Groups are independent, so the result equals the single-device layer with the same groups
(tests: meshes 8x1, 4x2, 2x4, 1x8 on 8 simulated devices, forwards and gradients). On the
'data' axis the experts are replicated; shard_map's autodiff sums their gradients over it.

The dropless path (`dispatcher='ragged'`) sends each device's tokens sorted by expert, with
`ragged_all_to_all` on GPU/TPU (sizes exchanged first, `ragged_dot` on the received rows).
XLA:CPU has no ragged all-to-all: there the same layout travels through a dense
`all_to_all` padded to the worst case (every local assignment to one device), which is what
runs in the CPU tests; the ragged program is only lowered there.
"""
from __future__ import annotations

import functools
import math

import jax
from absl import logging
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pathways.nn import dispatch as dispatch_lib
from pathways.nn import experts as experts_lib
from pathways.nn import grouped_matmul as grouped_lib

EXPERT_AXIS = 'expert'


def context_mesh():
  """The mesh set by `jax.set_mesh` (abstract inside jit), or None when there is none or it
  has a single device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or math.prod(mesh.axis_sizes) == 1:
    return None
  return mesh


def _device_major(bank_sizes, x):
  """Permutation of global expert ids (bank-major) into device-major order: device j's
  experts (its slice of every bank) become rows [j * E / X, (j + 1) * E / X)."""
  order, start = [[] for _ in range(x)], 0
  for e_b in bank_sizes:
    per = e_b // x
    for j in range(x):
      order[j] += list(range(start + j * per, start + (j + 1) * per))
    start += e_b
  perm = np.array(sum(order, []), np.int32)
  return perm, np.argsort(perm).astype(np.int32)


def layout_problem(mesh, num_groups, bank_sizes, expert_axis=EXPERT_AXIS) -> str | None:
  """Why groups or banks do not divide over the mesh (naming the sizes), or None."""
  n = math.prod(mesh.axis_sizes)
  x = dict(zip(mesh.axis_names, mesh.axis_sizes)).get(expert_axis, 1)
  if num_groups % n:
    return (f'expert parallelism: G = {num_groups} capacity groups do not divide over the mesh '
            f'of {n} devices {dict(zip(mesh.axis_names, mesh.axis_sizes))}; choose '
            f'model.moe.group_size so that B * L / group_size is a multiple of {n}.')
  for e_b in bank_sizes:
    if e_b % x:
      return (f'expert parallelism: a bank of {e_b} experts does not divide over the '
              f"'{expert_axis}' mesh axis of size {x}; every bank's expert count must be a "
              f'multiple of it.')
  return None


def check_layout(mesh, num_groups, bank_sizes, expert_axis=EXPERT_AXIS):
  """Raises `layout_problem`'s message."""
  problem = layout_problem(mesh, num_groups, bank_sizes, expert_axis)
  if problem:
    raise ValueError(problem)


@functools.lru_cache(maxsize=None)
def warn_once(message):
  """The layer falls back to the compiler's partitioning of the single-device dispatcher
  (correct, but without the all-to-all layout); says why, once per cause."""
  logging.warning(f'{message} Falling back to the single-device dispatcher, partitioned by '
                  f'the compiler.')


def _sharded(local, mesh, weights, routing, x_GxSxD, expert_axis, check_vma=True):
  """Runs `local(x, routing, weights)` per device: groups over every mesh axis, each bank's
  experts over `expert_axis`; weights marked varying over the other axes (each device's
  weight gradient is its groups' part, and autodiff then sums the parts; custom VJPs need
  the match). `check_vma=False` only where a body cannot be type-checked (the Pallas
  interpreter's block slicing mixes varying and invariant operands)."""
  x = dict(zip(mesh.axis_names, mesh.axis_sizes)).get(expert_axis, 1)
  groups = P(tuple(mesh.axis_names))
  replicated_over = tuple(a for a in mesh.axis_names if a != expert_axis or x == 1)

  def body(x_GxSxD, routing, weights):
    weights = jax.tree.map(lambda w: jax.lax.pcast(w, replicated_over, to='varying'), weights)
    return local(x_GxSxD, routing, weights)

  fn = jax.shard_map(body, mesh=mesh,
                     in_specs=(groups, jax.tree.map(lambda _: groups, routing),
                               P(expert_axis) if x > 1 else P()),
                     out_specs=(groups, groups), check_vma=check_vma)
  return fn(x_GxSxD, routing, weights)


def _exchange(buf_ExMxD, x, expert_axis):
  """[E, M, D] in device-major expert order -> [E / X, X * M, D]: this device's experts,
  rows from every device of the expert axis (source-major)."""
  e, m, d = buf_ExMxD.shape
  buf = jax.lax.all_to_all(buf_ExMxD.reshape(x, e // x, m, d), expert_axis, 0, 0)
  return jnp.transpose(buf, (1, 0, 2, 3)).reshape(e // x, x * m, d)


def _exchange_back(y_ExXMxD, x, expert_axis):
  e_loc, xm, d = y_ExXMxD.shape
  y = jnp.transpose(y_ExXMxD.reshape(e_loc, x, xm // x, d), (1, 0, 2, 3))
  y = jax.lax.all_to_all(y, expert_axis, 0, 0)
  return y.reshape(x * e_loc, xm // x, d)


def dispatch(x_GxSxD, routing, weights, capacity, dtype=jnp.float32, *, mesh,
             remat_hidden=False, dispatch_fn=dispatch_lib.dispatch_sorted,
             expert_axis=EXPERT_AXIS):
  """Expert-parallel capacity dispatch; same signature and result as `dispatch_fn`.

  Args:
    x_GxSxD, routing, weights, capacity, dtype, remat_hidden: as the dispatchers (global
      shapes).
    mesh: the mesh (concrete or abstract); groups go over all its axes, experts over
      `expert_axis` (absent or size 1: data parallel only, no exchange).
    dispatch_fn: the local dispatcher ('sorted').
  """
  bank_sizes = [w_in.shape[0] for w_in, _ in weights]
  e = sum(bank_sizes)
  check_layout(mesh, x_GxSxD.shape[0], bank_sizes, expert_axis)
  x = dict(zip(mesh.axis_names, mesh.axis_sizes)).get(expert_axis, 1)
  perm, inverse = _device_major(bank_sizes, x)

  def local(x_GxSxD, routing, weights):
    def run_experts(buf_ExMxD):
      if x == 1:
        return experts_lib.apply_banks(buf_ExMxD, weights, dtype, remat_hidden)
      mine = _exchange(buf_ExMxD[perm], x, expert_axis)
      y = _exchange_back(experts_lib.apply_banks(mine, weights, dtype, remat_hidden), x,
                         expert_axis)
      return y[inverse]

    return dispatch_fn(x_GxSxD, routing, weights, capacity, dtype, run_experts=run_experts,
                       num_experts=e)

  return _sharded(local, mesh, weights, routing, x_GxSxD, expert_axis)


def _chunk_rows(dest_A, x):
  """Assignments sorted by destination device: (order_A, start_X, size_X, rank_A) with
  rank_A the position of each assignment within its destination's chunk (dest X = none)."""
  order_A = jnp.argsort(dest_A, stable=True)
  size_X = jnp.bincount(dest_A, length=x + 1)[:x].astype(jnp.int32)
  start_X = (jnp.cumsum(size_X) - size_X).astype(jnp.int32)
  position_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(dest_A.shape[0],
                                                                   dtype=order_A.dtype))
  rank_A = position_A - jnp.concatenate([start_X, jnp.zeros((1,), jnp.int32)])[dest_A]
  return order_A, start_X, size_X, rank_A


def _dense_exchange(x_AxD, local_A, dest_A, x, expert_axis):
  """Rows to their destination devices through a dense all_to_all, each destination's chunk
  padded to A rows (the worst case): the CPU stand-in for `ragged_all_to_all`. Returns the
  received [X * A, D] rows (source i's at [i * A, ...)), their local expert ids (E_loc =
  padding) and a function sending per-row results back into assignment order."""
  a, d = x_AxD.shape
  order_A, start_X, size_X, rank_A = _chunk_rows(dest_A, x)
  r = jnp.arange(a)
  take_XxA = jnp.where(r[None] < size_X[:, None],
                       order_A[jnp.minimum(start_X[:, None] + r[None], a - 1)], a)
  pad = lambda v, fill: jnp.concatenate([v, jnp.full((1,) + v.shape[1:], fill, v.dtype)])  # noqa
  send = pad(x_AxD, 0)[take_XxA]  # [X, A, D]
  ids = pad(local_A, -1)[take_XxA]  # -1: padding
  got = jax.lax.all_to_all(send, expert_axis, 0, 0).reshape(x * a, d)
  got_ids = jax.lax.all_to_all(ids, expert_axis, 0, 0).reshape(x * a)

  def back(y_XAxD):
    y = jax.lax.all_to_all(y_XAxD.reshape(x, a, d), expert_axis, 0, 0)
    valid = dest_A < x
    return jnp.where(valid[:, None], y[jnp.minimum(dest_A, x - 1), jnp.maximum(rank_A, 0)], 0)

  return got, got_ids, back


def _ragged_exchange(x_AxD, local_A, dest_A, x, expert_axis):
  """The same exchange with `jax.lax.ragged_all_to_all` (GPU/TPU): only each chunk's real
  rows travel. Same received layout as `_dense_exchange`."""
  a, d = x_AxD.shape
  order_A, start_X, size_X, _ = _chunk_rows(dest_A, x)
  me = jax.lax.axis_index(expert_axis)
  sorted_x = x_AxD[order_A]
  sorted_ids = local_A[order_A]
  recv_X = jax.lax.all_to_all(size_X, expert_axis, 0, 0, tiled=True)
  lands_X = jnp.full((x,), me * a, jnp.int32)  # my chunk's place in each receiver
  got = jax.lax.ragged_all_to_all(sorted_x, jnp.zeros((x * a, d), x_AxD.dtype), start_X,
                                  size_X, lands_X, recv_X, axis_name=expert_axis)
  got_ids = jax.lax.ragged_all_to_all(sorted_ids, jnp.full((x * a,), -1, local_A.dtype),
                                      start_X, size_X, lands_X, recv_X, axis_name=expert_axis)
  start_back_X = jax.lax.all_to_all(start_X, expert_axis, 0, 0, tiled=True)
  received_X = jnp.arange(x, dtype=jnp.int32) * a

  def back(y_XAxD):
    y_sorted = jax.lax.ragged_all_to_all(y_XAxD, jnp.zeros((a, d), y_XAxD.dtype), received_X,
                                         recv_X, start_back_X, size_X, axis_name=expert_axis)
    y_A = jnp.zeros_like(y_sorted).at[order_A].set(y_sorted)
    return jnp.where((dest_A < x)[:, None], y_A, 0)

  return got, got_ids, back


EXCHANGES = {'dense': _dense_exchange, 'ragged': _ragged_exchange}


def default_exchange() -> str:
  """'ragged' where XLA has ragged all-to-all (GPU/TPU); 'dense' on CPU."""
  return 'dense' if jax.default_backend() == 'cpu' else 'ragged'


def dispatch_dropless(x_GxSxD, routing, weights, capacity, dtype=jnp.float32, *, mesh,
                      remat_hidden=False, expert_axis=EXPERT_AXIS, exchange=None,
                      grouped_matmul='ragged_dot'):
  """Expert-parallel dropless dispatch: same result as `dispatch_ragged` on one device.

  Per device: its tokens' assignments go to the devices holding their experts (`exchange`:
  'ragged' all-to-all on GPU/TPU, a padded dense all-to-all on CPU), each device runs its
  experts as grouped matmuls (`grouped_matmul`) over what it received, results come back.
  """
  del capacity
  bank_sizes = [w_in.shape[0] for w_in, _ in weights]
  e = sum(bank_sizes)
  check_layout(mesh, x_GxSxD.shape[0], bank_sizes, expert_axis)
  x = dict(zip(mesh.axis_names, mesh.axis_sizes)).get(expert_axis, 1)
  _, inverse = _device_major(bank_sizes, x)
  e_loc = e // x
  exchange_fn = EXCHANGES[exchange or default_exchange()]

  def local(x_GxSxD, routing, weights):
    def run_rows(x_AxD, expert_A):
      if x == 1:
        return dispatch_lib.ragged_experts(x_AxD, expert_A, weights, dtype, remat_hidden,
                                           grouped_matmul)
      valid = expert_A < e
      place_A = jnp.asarray(inverse)[jnp.minimum(expert_A, e - 1)]  # device-major position
      dest_A = jnp.where(valid, place_A // e_loc, x)
      got, got_ids, back = exchange_fn(x_AxD, (place_A % e_loc).astype(jnp.int32), dest_A, x,
                                       expert_axis)
      got_ids = jnp.where(got_ids < 0, e_loc, got_ids)
      return back(dispatch_lib.ragged_experts(got, got_ids, weights, dtype, remat_hidden,
                                              grouped_matmul))

    return dispatch_lib.dispatch_ragged(x_GxSxD, routing, weights, None, dtype,
                                        run_rows=run_rows, num_experts=e)

  interpreted = grouped_matmul == 'pallas' and grouped_lib.interpreted()
  return _sharded(local, mesh, weights, routing, x_GxSxD, expert_axis,
                  check_vma=not interpreted)


PARALLEL = {dispatch_lib.dispatch_sorted: dispatch, dispatch_lib.dispatch_ragged:
            dispatch_dropless}
