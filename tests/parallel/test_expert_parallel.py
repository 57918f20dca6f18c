"""Expert parallelism on 8 simulated devices equals the single-device layer (forwards and
gradients) for every split of the devices between the data and expert axes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathways.parallel import expert_parallel
from pathways.parallel import sharding
from tests.nn import synthetic

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]


def _mesh(shape):
  return sharding.make_mesh({'data': shape[0], 'expert': shape[1]})


def _layer(**kwargs):
  kwargs = dict(dict(banks=((8, 16), (8, 32)), k=2, capacity_factor=1.0, group_size=8), **kwargs)
  return synthetic.moe_layer(16, kwargs.pop('banks'), kwargs.pop('k'), **kwargs)


def _loss_and_grads(layer, x, mesh=None):
  graphdef, params = nnx.split(layer)

  def loss(params, x):
    y, stats = nnx.merge(graphdef, params)(x, deterministic=True)
    return jnp.sum(jnp.sin(y)), (y, stats.metrics['fraction_dropped'])

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  if mesh is None:
    return fn(params, x), fn
  with jax.set_mesh(mesh):
    return fn(params, x), fn


def _x(shape=(8, 16, 16)):
  return jax.random.normal(jax.random.key(1), shape)


@pytest.mark.parametrize('shape', MESHES)
@pytest.mark.parametrize('router', ['top_k', 'expert_choice'])
def test_expert_parallel_equals_single_device(shape, router):
  layer = _layer(router=router)
  x = _x()
  ((_, (y0, drop0)), g0), _ = _loss_and_grads(layer, x)
  ((_, (y1, drop1)), g1), _ = _loss_and_grads(layer, x, _mesh(shape))
  assert float(drop0) > 0  # capacity binds: the slots must match, not just the math
  np.testing.assert_allclose(y1, y0, atol=1e-5)
  np.testing.assert_allclose(drop1, drop0)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, atol=1e-5)


def test_expert_axis_compiles_to_all_to_all():
  layer = _layer()
  mesh = _mesh((2, 4))
  graphdef, params = nnx.split(layer)
  fn = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])
  with jax.set_mesh(mesh):
    hlo = fn.lower(params, _x()).compile().as_text()
  assert hlo.count('all-to-all') >= 2  # there and back
  with jax.set_mesh(_mesh((8, 1))):  # data parallel only: nothing to exchange
    hlo = fn.lower(params, _x()).compile().as_text()
  assert 'all-to-all' not in hlo


def test_groups_that_do_not_divide_fall_back_with_a_warning(caplog):
  layer = _layer(group_size=None)  # one group: cannot split over 8 devices
  x = _x()
  ((_, (y0, _)), _), _ = _loss_and_grads(layer, x)
  with caplog.at_level('WARNING'):
    ((_, (y1, _)), _), _ = _loss_and_grads(layer, x, _mesh((2, 4)))
  np.testing.assert_allclose(y1, y0, atol=1e-5)
  assert 'G = 1 capacity groups do not divide over the mesh of 8 devices' in caplog.text


def test_check_layout_names_the_sizes():
  mesh = _mesh((2, 4))
  with pytest.raises(ValueError, match=r'G = 6 capacity groups .* multiple of 8'):
    expert_parallel.check_layout(mesh, 6, [8])
  with pytest.raises(ValueError, match=r"a bank of 6 experts does not divide over the 'expert' "
                                       r'mesh axis of size 4'):
    expert_parallel.check_layout(mesh, 8, [8, 6])


def _dropless():
  return _layer(dispatcher='ragged', capacity_factor=None)


@pytest.mark.parametrize('shape', MESHES)
def test_dropless_expert_parallel_equals_single_device(shape):
  """CPU runs the padded dense exchange (XLA:CPU has no ragged all-to-all)."""
  layer = _dropless()
  x = _x()
  ((_, (y0, drop0)), g0), _ = _loss_and_grads(layer, x)
  ((_, (y1, _)), g1), _ = _loss_and_grads(layer, x, _mesh(shape))
  assert float(drop0) == 0
  np.testing.assert_allclose(y1, y0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, atol=1e-5)


def test_dropless_expert_parallel_runs_the_kernel_on_each_device():
  """The Pallas grouped matmul (interpret mode) under the expert-parallel dropless layer equals
  the single-device `ragged_dot` layer."""
  x = _x()
  ((_, (y0, _)), g0), _ = _loss_and_grads(_dropless(), x)
  kernel = _layer(dispatcher='ragged', capacity_factor=None, grouped_matmul='pallas')
  ((_, (y1, _)), g1), _ = _loss_and_grads(kernel, x, _mesh((2, 4)))
  np.testing.assert_allclose(y1, y0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, atol=1e-5)


def test_ragged_exchange_lowers_for_accelerators():
  """The GPU/TPU program (ragged_all_to_all) traces and lowers here, forwards and gradients;
  XLA:CPU cannot compile it (UNIMPLEMENTED), so it runs only on GPU/TPU."""
  layer = _dropless()
  graphdef, params = nnx.split(layer)
  x = _x()
  routing, _, _ = layer.route(x)
  weights = [b.weights() for b in layer.banks]
  mesh = _mesh((2, 4))

  def loss(x, weights):
    y, _ = expert_parallel.dispatch_dropless(x.reshape(16, 8, 16), routing, weights, None,
                                             mesh=mesh, exchange='ragged')
    return jnp.sum(y ** 2)

  with jax.set_mesh(mesh):
    forward = jax.jit(loss).lower(x, weights).as_text()
    backward = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, weights).as_text()
  assert forward.count('ragged_all_to_all') == 3  # rows and their expert ids there, results back
  assert 'ragged_all_to_all' in backward
