"""Expert banks: the looped implementation equals the batched one, forwards and gradients; the
backward that keeps the hidden activations equals the one that recomputes them, one matmul
cheaper."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathways.nn import experts
from pathways.train import benchmark


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_loop_equals_batched(dtype, tol):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  buf = jax.random.normal(k1, (3, 5, 8))
  w_in = jax.random.normal(k2, (3, 8, 16)) * 0.3
  w_out = jax.random.normal(k3, (3, 16, 8)) * 0.3
  r = jax.random.normal(k4, (3, 5, 8))

  def loss(impl):
    return lambda *a: jnp.sum(experts.bank_ffn(*a, dtype=dtype, impl=impl).astype(jnp.float32) * r)

  v_ref, g_ref = jax.value_and_grad(loss('batched'), argnums=(0, 1, 2))(buf, w_in, w_out)
  v, g = jax.value_and_grad(loss('loop'), argnums=(0, 1, 2))(buf, w_in, w_out)
  np.testing.assert_allclose(v, v_ref, rtol=tol)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol,
                               atol=tol)


def test_unknown_impl_refused():
  with pytest.raises(ValueError, match=r"impl='fast': must be one of \('batched', 'loop'\)"):
    experts.bank_ffn(jnp.zeros((1, 2, 4)), jnp.zeros((1, 4, 8)), jnp.zeros((1, 8, 4)), impl='fast')


def _bank(e=3, c=5, d=8, f=16):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
  return (jax.random.normal(k1, (e, c, d)), jax.random.normal(k2, (e, d, f)) * 0.3,
          jax.random.normal(k3, (e, f, d)) * 0.3, jax.random.normal(k4, (e, c, d)))


@pytest.mark.parametrize('impl', experts.BANK_FFN_IMPLS)
@pytest.mark.parametrize('remat_hidden', [False, True])
def test_kept_and_recomputed_hidden_equal_a_per_expert_loop(impl, remat_hidden):
  """Every implementation and backward against autodiff of one expert at a time."""
  buf, w_in, w_out, r = _bank()

  def reference(buf, w_in, w_out):
    return sum(jnp.sum(jax.nn.gelu(buf[i] @ w_in[i]) @ w_out[i] * r[i]) for i in range(3))

  def loss(buf, w_in, w_out):
    return jnp.sum(experts.bank_ffn(buf, w_in, w_out, impl=impl, remat_hidden=remat_hidden) * r)

  v_ref, g_ref = jax.value_and_grad(reference, argnums=(0, 1, 2))(buf, w_in, w_out)
  v, g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(buf, w_in, w_out)
  np.testing.assert_allclose(v, v_ref, rtol=1e-5)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('impl', experts.BANK_FFN_IMPLS)
def test_keeping_the_hidden_saves_one_matmul_of_seven(impl):
  """fwd + bwd: 2 forward matmuls and 4 backward ones when the hidden activation is kept;
  the recomputing backward adds x @ W_in again."""
  buf, w_in, w_out, r = _bank()
  e, c, d = buf.shape
  f = w_in.shape[-1]

  def flops(remat_hidden):
    step = jax.grad(lambda *a: jnp.sum(experts.bank_ffn(
        *a, impl=impl, remat_hidden=remat_hidden) * r), argnums=(0, 1, 2))
    return benchmark.matmul_flops(jax.make_jaxpr(step)(buf, w_in, w_out))

  one = 2.0 * e * c * d * f  # one matmul of the FFN, over every expert
  assert flops(False) == 6 * one
  assert flops(True) == 7 * one
