"""Model options: rematerialization, bfloat16 compute, expert choice, the routing record."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathways.data import layout as layout_lib
from pathways.nn import model as model_lib
from tests.nn import synthetic

MOE = dict(banks=[(2, 16), (2, 48)], k=2, num_null_experts=1, capacity_factor=1.0)


def _loss_and_grads(m, batch):
  def loss_fn(m):
    out, metrics = m(batch, deterministic=False)
    losses, _ = model_lib.task_losses(m, out, batch)
    return sum(losses.values()) + 0.01 * metrics['layer1/load_balance_loss']
  return nnx.value_and_grad(loss_fn)(m)


def test_remat_gives_the_same_loss_and_gradients():
  m, batch = synthetic.image_and_text(moe_kwargs=MOE, halting=True)
  m_remat, _ = synthetic.image_and_text(moe_kwargs=MOE, halting=True, remat=True)
  loss, grads = _loss_and_grads(m, batch)
  loss_r, grads_r = _loss_and_grads(m_remat, batch)
  np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
  flat, flat_r = jax.tree.leaves(grads), jax.tree.leaves(grads_r)
  assert len(flat) == len(flat_r) > 10
  for g, g_r in zip(flat, flat_r):
    np.testing.assert_allclose(np.asarray(g_r), np.asarray(g), rtol=1e-5, atol=1e-6)
  # The rematerialized layer really recomputes: its backward holds a checkpoint.
  jaxpr = str(jax.make_jaxpr(lambda s: _loss_and_grads(
      nnx.merge(*nnx.split(m_remat)[:1], s), batch)[0])(nnx.state(m_remat)))
  assert 'checkpoint' in jaxpr or 'remat' in jaxpr


def test_bfloat16_compute_float32_parameters_and_router():
  m32, batch = synthetic.image_and_text(moe_kwargs=MOE)
  m16, _ = synthetic.image_and_text(moe_kwargs=MOE, dtype=jnp.bfloat16)
  out32, metrics32 = m32(batch)
  out16, metrics16 = m16(batch)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(m16, nnx.Param)))
  assert metrics16['layer1/record']['weight_BxLxK'].dtype == jnp.float32  # router in f32
  for name in ('images', 'text'):
    a, b = np.asarray(out32[name], np.float32), np.asarray(out16[name], np.float32)
    assert np.isfinite(b).all()
    assert np.linalg.norm(a - b) < 0.05 * np.linalg.norm(a), name
  jaxpr = str(jax.make_jaxpr(lambda: m16(batch)[0])())
  assert 'bf16' in jaxpr and 'dot_general' in jaxpr
  assert 'bf16' not in str(jax.make_jaxpr(lambda: m32(batch)[0])())


def test_routing_record_of_a_forward_pass():
  m, batch = synthetic.image_and_text(moe_kwargs=MOE, halting=True)
  _, metrics = m(batch)
  record = model_lib.routing_record(metrics, batch)
  assert set(record) >= {'task_id', 'flops_per_example', 'layer1', 'layer3', 'halting_p_LxB',
                         'halting_layer'}
  assert record['layer1']['expert_BxLxK'].shape == (12, 16, 2)
  assert record['halting_p_LxB'].shape == (4, 12)
  np.testing.assert_allclose(record['halting_p_LxB'].sum(0), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(record['task_id'], batch['task_id'])


def test_expert_choice_model_records_its_slots():
  tasks = [synthetic.task('images', 'image', 'classify', (8, 8, 1), 10)]
  m = model_lib.Figure1Model(tasks, layout_lib.make_layout(tasks, [4]), d_model=32,
                             num_layers=2, num_heads=2, mlp_hidden=48, patch=2,
                             moe_kwargs=dict(banks=[(4, 16)], k=2, router='expert_choice',
                                             capacity_factor=1.0, eval_capacity_factor=1.0),
                             rngs=nnx.Rngs(0))
  batch = {'task_id': np.zeros(4, np.int32), 'image': np.zeros((4, 8, 8, 1), np.uint8)}
  _, metrics = m(batch)
  rec = metrics['layer1/record']
  assert rec['token_GxExC'].shape == rec['weight_GxExC'].shape == rec['kept_GxExC'].shape
  assert rec['token_GxExC'].shape[:2] == (1, 4)


def test_modality_without_a_stem_is_refused_naming_the_task():
  t = synthetic.task('sounds', 'vector', 'classify', (8,), 3)
  object.__setattr__(t, 'modality', 'audio')  # a plugin's modality no stem serves
  with pytest.raises(ValueError, match="task 'sounds': modality 'audio' has no stem"):
    model_lib.Figure1Model([t], layout_lib.make_layout([t], [2]), d_model=8, num_layers=1,
                           num_heads=1, mlp_hidden=8, rngs=nnx.Rngs(0))


def test_forward_shapes_for_every_modality_and_head_in_one_call():
  tasks = [synthetic.task('img', 'image', 'classify', (8, 8, 1), 10),
           synthetic.task('lm', 'bytes', 'per_position', (12,), 256),
           synthetic.task('cls', 'bytes', 'classify', (6,), 4),
           synthetic.task('vec', 'vector', 'classify', (5,), 3)]
  layout = layout_lib.make_layout(tasks, [2, 3, 2, 4])
  m = model_lib.Figure1Model(tasks, layout, d_model=16, num_layers=2, num_heads=2,
                             mlp_hidden=32, patch=4, halting=True, moe_kwargs=MOE,
                             rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 256, (5, 12)).astype(np.int32)
  tokens[3:, 6:] = 0  # the classification rows are 6 long
  batch = {'task_id': np.repeat(np.arange(4), [2, 3, 2, 4]).astype(np.int32),
           'image': rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8),
           'tokens': tokens, 'tokens_mask': tokens != 0,
           'vector': rng.standard_normal((4, 5)).astype(np.float32)}
  out, metrics = m(batch)
  assert out['img'].shape == (2, 10) and out['lm'].shape == (3, 12, 256)
  assert out['cls'].shape == (2, 4) and out['vec'].shape == (4, 3)
  assert metrics['flops_per_example'].shape == (11,)
  assert all(np.isfinite(np.asarray(v)).all() for v in out.values() if not isinstance(v, dict))
