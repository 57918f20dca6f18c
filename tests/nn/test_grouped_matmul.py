"""The Pallas grouped-matmul kernel (interpret mode on CPU) equals the per-expert Python loop,
forwards and gradients, and serves the dropless MoE layer like `ragged_dot` does."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathways.nn import grouped_matmul as gm
from tests.nn import synthetic
from tests.nn import test_dispatch


def _weights(n, d, f, e, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k[0], (n, d)), jax.random.normal(k[1], (e, d, f)) / np.sqrt(d),
          jax.random.normal(k[2], (e, f, d)) / np.sqrt(f))


def _close(a, b, tol=1e-4):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize('sizes,bm', [([7, 0, 20, 9], 8),     # an empty expert, rows left over
                                      ([0, 0, 40, 0], 8),     # one expert takes every row
                                      ([16, 8, 8, 8], 8),     # whole tiles, no padding
                                      ([3, 5, 1, 2], 16)])    # every expert under one tile
def test_tile_layout_places_every_row_once_in_its_experts_tiles(sizes, bm):
  sizes = jnp.asarray(sizes, jnp.int32)
  n = 40
  src, valid, dest, tile_expert, offsets = map(np.asarray, gm.tile_layout(sizes, n, bm))
  used = int(np.sum(-(-np.asarray(sizes) // bm)))
  assert src.shape == (((n + bm - 1) // bm + 4) * bm,)
  assert list(offsets) == list(np.concatenate([[0], np.cumsum(-(-np.asarray(sizes) // bm))]))
  assert (tile_expert[:used] >= 0).all() and (tile_expert[used:] == -1).all()
  expert_of_row = np.repeat(np.arange(4), np.asarray(sizes))
  total = int(np.sum(sizes))
  assert sorted(src[valid]) == list(range(total))  # every sorted row exactly once
  for r in range(total):
    assert src[dest[r]] == r and valid[dest[r]]
    assert tile_expert[dest[r] // bm] == expert_of_row[r]


@pytest.mark.parametrize('n,d,f,sizes,bm', [
    (40, 16, 32, [7, 0, 20, 9], 8),
    (24, 256, 384, [5, 11, 8], 8),  # two contraction steps, three column blocks
    (12, 8, 16, [0, 12], 16),
])
def test_pallas_ffn_equals_the_per_expert_loop_forwards_and_backwards(n, d, f, sizes, bm):
  x, w_in, w_out = _weights(n, d, f, len(sizes))
  sizes = jnp.asarray(sizes, jnp.int32)
  r = jax.random.normal(jax.random.key(3), (n, d))

  def loss(fn):
    return lambda x, w_in, w_out: jnp.sum(fn(x, w_in, w_out, sizes) * r)
  pallas = lambda *a: gm.pallas_ffn(*a, bm=bm)  # noqa: E731
  y = jax.jit(pallas)(x, w_in, w_out, sizes)
  _close(y, gm.reference_grouped_ffn(x, w_in, w_out, sizes))
  assert not np.asarray(y[int(jnp.sum(sizes)):]).any()  # rows past the groups: zeros
  g = jax.jit(jax.grad(loss(pallas), argnums=(0, 1, 2)))(x, w_in, w_out)
  g_ref = jax.grad(loss(gm.reference_grouped_ffn), argnums=(0, 1, 2))(x, w_in, w_out)
  for a, b in zip(g, g_ref):
    _close(a, b)


def test_no_rows_give_no_rows():
  _, w_in, w_out = _weights(1, 16, 32, 4)
  assert gm.pallas_ffn(jnp.zeros((0, 16)), w_in, w_out, jnp.zeros((4,), jnp.int32)).shape == (
      0, 16)


def test_ragged_dot_equals_the_per_expert_loop():
  x, w_in, w_out = _weights(40, 16, 32, 4)
  sizes = jnp.asarray([7, 0, 20, 9], jnp.int32)
  _close(gm.ragged_dot_ffn(x, w_in, w_out, sizes),
         gm.reference_grouped_ffn(x, w_in, w_out, sizes))


@pytest.mark.parametrize('remat_hidden', [False, True])
def test_dropless_layer_with_the_kernel_equals_ragged_dot(remat_hidden):
  """Heterogeneous banks, null experts and a token mask: every gradient of the layer."""
  kw = dict(banks=[(4, 16), (2, 32)], k=2, capacity_factor=None, eval_capacity_factor=None,
            num_null_experts=1, remat_hidden=remat_hidden)
  x, mask = test_dispatch._inputs(2, 8, True)
  y0, _, g0 = test_dispatch._value_and_grads(test_dispatch._layer('ragged', **dict(kw)), x, mask)
  y1, met, g1 = test_dispatch._value_and_grads(
      test_dispatch._layer('ragged', grouped_matmul='pallas', **dict(kw)), x, mask)
  _close(y1, y0, 1e-5)
  jax.tree.map(lambda a, b: _close(a, b, 1e-5), g1, g0)
  assert float(met['fraction_dropped']) == 0.0


def test_kernel_choice_is_checked():
  with pytest.raises(ValueError, match=r"unknown grouped_matmul 'triton'; known: "
                                       r"\['pallas', 'ragged_dot'\]"):
    synthetic.moe_layer(16, [(4, 16)], 2, dispatcher='ragged', capacity_factor=None,
                        grouped_matmul='triton')
  with pytest.raises(ValueError, match=r"grouped_matmul='pallas' needs the dropless "
                                       r"dispatcher='ragged' \(got dispatcher='sorted'\)"):
    synthetic.moe_layer(16, [(4, 16)], 2, dispatcher='sorted', grouped_matmul='pallas')


def test_benchmark_counts_the_kernels_flops():
  """The train-step benchmark's matmul counter reads each kernel's cost estimate: forward
  2 x (2 M D F) over the padded tiles M."""
  from pathways.train import benchmark  # pylint: disable=g-import-not-at-top
  x, w_in, w_out = _weights(40, 16, 32, 4)
  sizes = jnp.asarray([7, 0, 20, 9], jnp.int32)
  m = ((40 + 7) // 8 + 4) * 8
  jaxpr = jax.make_jaxpr(lambda x: gm.pallas_ffn(x, w_in, w_out, sizes, bm=8))(x)
  assert benchmark.matmul_flops(jaxpr) == 2 * (2 * m * 16 * 32)


def test_kernels_lower_for_gpu_through_triton(monkeypatch):
  """The GPU program (not interpreted) traces and lowers here, forwards and gradients, each
  kernel a Triton call; XLA:CPU cannot compile it, so it runs only on a GPU (untimed here)."""
  monkeypatch.setattr(gm, 'interpreted', lambda: False)
  x, w_in, w_out = _weights(256, 128, 256, 4)
  sizes = jnp.asarray([50, 70, 0, 100], jnp.int32)
  loss = lambda x, w_in, w_out: jnp.sum(gm.pallas_ffn(x, w_in, w_out, sizes))  # noqa: E731
  forward = jax.jit(loss).trace(x, w_in, w_out).lower(lowering_platforms=('cuda',)).as_text()
  backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, w_in, w_out).lower(
      lowering_platforms=('cuda',)).as_text()
  assert forward.count('__gpu$xla.gpu.triton') == 2  # the two grouped matmuls
  assert backward.count('__gpu$xla.gpu.triton') == 6  # + two input and two weight gradients
