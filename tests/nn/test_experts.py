"""Expert banks: the looped implementation equals the batched one, forwards and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathways.nn import experts


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
