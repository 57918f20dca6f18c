"""Grouped matrix multiplication over expert-sorted rows: the dropless MoE layer's experts.

The dropless dispatcher (`dispatch.dispatch_ragged`) sorts every assignment by expert and
runs each expert's FFN over its own contiguous run of rows. Two implementations of that
grouped FFN, chosen by `GROUPED_MATMULS` name (`model.moe.grouped_matmul`):

  * 'ragged_dot': `jax.lax.ragged_dot`, whatever XLA lowers it to (one dense matmul per group
    on CPU; measured slow on an H100 too, 10x the capacity path at the 1.48B shape).
  * 'pallas': a Pallas kernel in the MegaBlocks manner. Each expert's rows are padded to a
    whole number of row tiles (`bm` rows), so every tile belongs to one expert; the kernel's
    grid runs over (row tile, output column block) and multiplies the tile by its expert's
    weight block, accumulating over the contraction in `bk` steps (float32 accumulation).
    Tiles past the last used one are skipped (written as zeros). The backward is two more
    kernels: the input gradient is the same grouped product against the transposed weights;
    the weight gradient ("transposed grouped matmul") runs a grid over (expert, row block,
    column block) and sums x_tile^T dy_tile over the expert's own tiles only.

The Pallas kernel is written for GPU (Triton lowering: block loads with dynamic offsets, a
loop with per-expert bounds; Triton wants every block of a dot at least 16 and widths with a
power-of-two divisor: tiles under 16 rows, or widths such as 99, are CPU-only shapes). On CPU
it runs in Pallas' interpret mode, which checks the
indexing and the numbers against `reference_grouped_ffn` (tests) but says nothing about
speed: it is untimed here. Padding costs at most `bm - 1` rows per expert.

Vocabulary: N rows (sorted by expert), E experts, D input and F output width, M padded rows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pathways import registry

GROUPED_MATMULS = registry.Registry('grouped_matmul')


def _block(dim: int, preferred: int) -> int:
  """The largest power of two <= preferred that divides dim, else dim itself."""
  b = preferred
  while b > 1 and dim % b:
    b //= 2
  return b if b > 1 and dim % b == 0 else dim


def interpreted() -> bool:
  """The kernels run in Pallas' interpret mode (CPU)."""
  return jax.default_backend() == 'cpu'


def _triton():
  """GPU lowering through Triton (the default GPU backend of this jax is Mosaic GPU, which
  stages whole blocks in shared memory: the weights' whole-array block does not fit)."""
  return pl_triton.CompilerParams(num_warps=4, num_stages=2)


def _cost(x_MxK, n: int, out_elements: int, *others) -> pl.CostEstimate:
  """2 M K N multiply-adds (every tile, used or not: an upper bound) and the bytes read and
  written; what the compiler and `pathways.train.benchmark.matmul_flops` count."""
  m, k = x_MxK.shape
  item = x_MxK.dtype.itemsize
  read = sum(a.size * a.dtype.itemsize for a in (x_MxK,) + others)
  return pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                         bytes_accessed=read + out_elements * item)


def _out_shape(shape, dtype, *inputs):
  """The kernel's output type; inside `shard_map` it varies over the mesh axes its inputs
  vary over (the widest input's set; the kernels' inputs nest)."""
  mats = [jax.typeof(a).mat for a in inputs]
  mat = max(mats, key=lambda m: len(m.varying))
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


# ----------------------------------------------------------------------------- kernels


def _gmm_kernel(tile_expert_ref, x_ref, w_ref, o_ref, *, bk, bn, num_k):
  """o[tile, j block] = x[tile] @ w[expert(tile)][:, j block]; zeros on unused tiles."""
  e = tile_expert_ref[pl.program_id(0)]
  j = pl.program_id(1)

  @pl.when(e >= 0)
  def _():
    def step(kk, acc):
      xk = x_ref[:, pl.ds(kk * bk, bk)]
      wk = w_ref[e, pl.ds(kk * bk, bk), pl.ds(j * bn, bn)]
      return acc + jnp.dot(xk, wk, preferred_element_type=jnp.float32)
    acc = jax.lax.fori_loop(0, num_k, step, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)

  @pl.when(e < 0)
  def _():
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def _gmm(x_MxK, w_ExKxN, tile_expert, bm):
  """Per row tile t: x[t] @ w[tile_expert[t]] (tile_expert -1: zeros). [M, N]."""
  m, k = x_MxK.shape
  n = w_ExKxN.shape[2]
  bk, bn = _block(k, 128), _block(n, 128)
  kernel = functools.partial(_gmm_kernel, bk=bk, bn=bn, num_k=k // bk)
  return pl.pallas_call(
      kernel,
      out_shape=_out_shape((m, n), x_MxK.dtype, x_MxK, w_ExKxN),
      grid=(m // bm, n // bn),
      in_specs=[pl.BlockSpec(tile_expert.shape, lambda t, j: (0,)),
                pl.BlockSpec((bm, k), lambda t, j: (t, 0)),
                pl.BlockSpec(w_ExKxN.shape, lambda t, j: (0, 0, 0))],
      out_specs=pl.BlockSpec((bm, bn), lambda t, j: (t, j)),
      interpret=interpreted(), compiler_params=_triton(),
      cost_estimate=_cost(x_MxK, n, m * n, w_ExKxN),
      name='grouped_matmul')(tile_expert, x_MxK, w_ExKxN)


def _tgmm_kernel(tile_offsets_ref, x_ref, dy_ref, o_ref, *, bm, bk, bn):
  """o[e, i block, j block] = sum over e's tiles t of x[t][:, i block]^T dy[t][:, j block]."""
  e, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

  def step(t, acc):
    xt = x_ref[pl.ds(t * bm, bm), pl.ds(i * bk, bk)]
    gt = dy_ref[pl.ds(t * bm, bm), pl.ds(j * bn, bn)]
    return acc + jnp.dot(xt.T, gt, preferred_element_type=jnp.float32)
  acc = jax.lax.fori_loop(tile_offsets_ref[e], tile_offsets_ref[e + 1], step,
                          jnp.zeros((bk, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _tgmm(x_MxK, dy_MxN, tile_offsets, num_experts, bm):
  """Per expert e: x[e's tiles]^T @ dy[e's tiles]. [E, K, N]."""
  m, k = x_MxK.shape
  n = dy_MxN.shape[1]
  bk, bn = _block(k, 128), _block(n, 128)
  kernel = functools.partial(_tgmm_kernel, bm=bm, bk=bk, bn=bn)
  return pl.pallas_call(
      kernel,
      out_shape=_out_shape((num_experts, k, n), x_MxK.dtype, x_MxK, dy_MxN),
      grid=(num_experts, k // bk, n // bn),
      in_specs=[pl.BlockSpec(tile_offsets.shape, lambda e, i, j: (0,)),
                pl.BlockSpec((m, k), lambda e, i, j: (0, 0)),
                pl.BlockSpec((m, n), lambda e, i, j: (0, 0))],
      out_specs=pl.BlockSpec((pl.squeezed, bk, bn), lambda e, i, j: (e, i, j)),
      interpret=interpreted(), compiler_params=_triton(),
      cost_estimate=_cost(x_MxK, n, num_experts * k * n, dy_MxN),
      name='transposed_grouped_matmul')(tile_offsets, x_MxK, dy_MxN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def tiled_grouped_matmul(x_MxK, w_ExKxN, tile_expert, tile_offsets, bm):
  """x (rows in expert tiles of `bm`) times each tile's expert's weights, differentiable in
  x and w. tile_expert [M / bm] (-1: unused tile), tile_offsets [E + 1] (expert e owns tiles
  [offsets[e], offsets[e + 1]))."""
  return _gmm(x_MxK, w_ExKxN, tile_expert, bm)


def _tiled_fwd(x_MxK, w_ExKxN, tile_expert, tile_offsets, bm):
  return _gmm(x_MxK, w_ExKxN, tile_expert, bm), (x_MxK, w_ExKxN, tile_expert, tile_offsets)


def _tiled_bwd(bm, res, dy_MxN):
  x_MxK, w_ExKxN, tile_expert, tile_offsets = res
  dx = _gmm(dy_MxN, jnp.swapaxes(w_ExKxN, 1, 2), tile_expert, bm)
  dw = _tgmm(x_MxK, dy_MxN, tile_offsets, w_ExKxN.shape[0], bm)
  return dx, dw, None, None


tiled_grouped_matmul.defvjp(_tiled_fwd, _tiled_bwd)


# ----------------------------------------------------------------------------- layout


def tile_layout(sizes_E, num_rows: int, bm: int):
  """Where the sorted rows go in the tiled layout (each expert's run padded to whole tiles).

  Returns (src_M, valid_M, dest_N, tile_expert, tile_offsets): padded row p holds sorted row
  src_M[p] when valid_M[p]; sorted row r sits at padded row dest_N[r] (rows past sum(sizes)
  point at row 0 and are masked by the caller); M = (ceil(N / bm) + E) * bm, a static bound.
  """
  e = sizes_E.shape[0]
  sizes_E = sizes_E.astype(jnp.int32)
  tiles_E = (sizes_E + bm - 1) // bm
  tile_end_E = jnp.cumsum(tiles_E)
  tile_offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), tile_end_E]).astype(jnp.int32)
  end_E = jnp.cumsum(sizes_E)
  start_E = end_E - sizes_E
  num_tiles = -(-num_rows // bm) + e
  t = jnp.arange(num_tiles, dtype=jnp.int32)
  owner = jnp.searchsorted(tile_end_E, t, side='right').astype(jnp.int32)
  tile_expert = jnp.where(owner < e, owner, -1)
  p = jnp.arange(num_tiles * bm, dtype=jnp.int32)
  owner_p = jnp.minimum(owner[p // bm], e - 1)
  within = p - tile_offsets[owner_p] * bm
  valid_M = (tile_expert[p // bm] >= 0) & (within < sizes_E[owner_p])
  src_M = jnp.where(valid_M, start_E[owner_p] + within, 0)
  r = jnp.arange(num_rows, dtype=jnp.int32)
  owner_r = jnp.minimum(jnp.searchsorted(end_E, r, side='right'), e - 1)
  dest_N = jnp.where(r < end_E[-1], tile_offsets[owner_r] * bm + r - start_E[owner_r], 0)
  return src_M, valid_M, dest_N, tile_expert, tile_offsets


# ----------------------------------------------------------------------------- the FFNs


def reference_grouped_ffn(x_NxD, w_in_ExDxF, w_out_ExFxD, sizes_E):
  """The slow obvious reference: a Python loop over experts, each a dense FFN on its rows;
  rows past sum(sizes) give 0."""
  out, start = jnp.zeros((x_NxD.shape[0], w_out_ExFxD.shape[2]), x_NxD.dtype), 0
  ends = jnp.cumsum(sizes_E)
  r = jnp.arange(x_NxD.shape[0])
  for e in range(w_in_ExDxF.shape[0]):
    rows = (r >= ends[e] - sizes_E[e]) & (r < ends[e])
    y = jax.nn.gelu(x_NxD @ w_in_ExDxF[e]) @ w_out_ExFxD[e]
    out = jnp.where(rows[:, None], y, out)
  return out


@GROUPED_MATMULS.register('ragged_dot')
def ragged_dot_ffn(x_NxD, w_in_ExDxF, w_out_ExFxD, sizes_E):
  h = jax.nn.gelu(jax.lax.ragged_dot(x_NxD, w_in_ExDxF, sizes_E))
  return jax.lax.ragged_dot(h, w_out_ExFxD, sizes_E)


@GROUPED_MATMULS.register('pallas')
def pallas_ffn(x_NxD, w_in_ExDxF, w_out_ExFxD, sizes_E, *, bm: int = 128):
  """The Pallas grouped FFN (module docstring): rows gathered into expert tiles, two tiled
  grouped matmuls with the GELU between, gathered back. Rows past sum(sizes) give 0."""
  n = x_NxD.shape[0]
  if n == 0:
    return jnp.zeros((0, w_out_ExFxD.shape[2]), x_NxD.dtype)
  bm = min(bm, max(8, pl.next_power_of_2(n)))
  src_M, valid_M, dest_N, tile_expert, tile_offsets = tile_layout(sizes_E, n, bm)
  x_MxD = jnp.where(valid_M[:, None], x_NxD[src_M], 0)
  h_MxF = jax.nn.gelu(tiled_grouped_matmul(x_MxD, w_in_ExDxF, tile_expert, tile_offsets, bm))
  y_MxD = tiled_grouped_matmul(h_MxF, w_out_ExFxD, tile_expert, tile_offsets, bm)
  kept_N = jnp.arange(n) < jnp.sum(sizes_E)
  return jnp.where(kept_N[:, None], y_MxD[dest_N], 0)
