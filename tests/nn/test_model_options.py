"""Model options: rematerialization, bfloat16 compute, expert choice, the routing record."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathways.data import layout as layout_lib
from pathways.nn import model as model_lib
from tests.nn import synthetic

MOE = synthetic.moe_kwargs(banks=[(2, 16), (2, 48)], k=2, num_null_experts=1,
                           capacity_factor=1.0, loss_weights={'load_balance_loss': 0.01})


def _loss_and_grads(m, batch):
  def loss_fn(m):
    out = m(batch, deterministic=False)
    losses, _ = model_lib.task_losses(m, out, batch)
    return sum(losses.values()) + out.aux_loss  # 0.01 * load balance, one MoE layer
  return nnx.jit(nnx.value_and_grad(loss_fn))(m)


@pytest.mark.parametrize('remat, remat_hidden', [(True, False), ('dots', False),
                                                 ('dots_no_batch', False), ('', True)])
def test_remat_gives_the_same_loss_and_gradients(remat, remat_hidden):
  """Every rematerialization policy of the layers, and the experts' recomputed hidden
  activations, give the loss and gradients of the model that keeps everything."""
  m, batch = synthetic.image_and_text(moe_kwargs=MOE, halting=True)
  m_remat, _ = synthetic.image_and_text(moe_kwargs=dict(MOE, remat_hidden=remat_hidden),
                                        halting=True, remat=remat)
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
  assert ('checkpoint' in jaxpr or 'remat' in jaxpr) == bool(remat)


def test_unknown_remat_policy_refused():
  with pytest.raises(ValueError, match=r"remat='all': must be True, False or one of \('', "
                                       r"'full', 'dots', 'dots_no_batch'\)"):
    model_lib.remat_policy('all')


def test_bfloat16_compute_float32_parameters_and_router():
  m32, batch = synthetic.image_and_text(moe_kwargs=MOE)
  m16, _ = synthetic.image_and_text(moe_kwargs=MOE, dtype=jnp.bfloat16)
  res32, res16 = synthetic.forward(m32, batch), synthetic.forward(m16, batch)
  out32, out16 = res32.logits, res16.logits
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(m16, nnx.Param)))
  assert res16.moe[1].record['weight_BxLxK'].dtype == jnp.float32  # router in f32
  for name in ('images', 'text'):
    a, b = np.asarray(out32[name], np.float32), np.asarray(out16[name], np.float32)
    assert np.isfinite(b).all()
    assert np.linalg.norm(a - b) < 0.05 * np.linalg.norm(a), name
  jaxpr = str(jax.make_jaxpr(lambda: m16(batch).logits)())
  assert 'bf16' in jaxpr and 'dot_general' in jaxpr
  assert 'bf16' not in str(jax.make_jaxpr(lambda: m32(batch).logits)())


def test_routing_record_of_a_forward_pass():
  m, batch = synthetic.image_and_text(moe_kwargs=MOE, halting=True)
  record = synthetic.forward(m, batch).routing_record(batch)
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
                             moe_kwargs=synthetic.moe_kwargs(
                                 banks=[(4, 16)], k=2, router='expert_choice',
                                 capacity_factor=1.0, eval_capacity_factor=1.0),
                             rngs=nnx.Rngs(0))
  batch = {'task_id': np.zeros(4, np.int32), 'image': np.zeros((4, 8, 8, 1), np.uint8)}
  rec = synthetic.forward(m, batch).moe[1].record  # token-major: which of the 4 experts took each token
  assert rec['expert_BxLxK'].shape == rec['weight_BxLxK'].shape == rec['kept_BxLxK'].shape
  assert rec['expert_BxLxK'].shape == (4, 16, 4)
  # Each expert filled its C = ceil(1.0 * 64 tokens * 2 / 4) = 32 slots with distinct tokens.
  np.testing.assert_array_equal(rec['kept_BxLxK'].reshape(-1, 4).sum(0), [32] * 4)


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
  res = synthetic.forward(m, batch)
  out = res.logits
  assert out['img'].shape == (2, 10) and out['lm'].shape == (3, 12, 256)
  assert out['cls'].shape == (2, 4) and out['vec'].shape == (4, 3)
  assert res.flops_per_example.shape == (11,)
  assert all(np.isfinite(np.asarray(v)).all() for v in out.values() if not isinstance(v, dict))


def _routed(route_on, **kwargs):
  return synthetic.image_and_text(moe_kwargs=synthetic.moe_kwargs(
      banks=[(4, 16)], k=2, capacity_factor=None, route_on=route_on), **kwargs)


def test_task_routing_through_the_model_depends_only_on_the_task():
  m, batch = _routed('task')
  rec = synthetic.forward(m, batch).moe[1].record
  expert, kept = np.asarray(rec['expert_BxLxK']), np.asarray(rec['kept_BxLxK'])
  for task in (0, 1):
    rows = batch['task_id'] == task
    chosen = {tuple(e) for e, k in zip(expert[rows].reshape(-1, 2), kept[rows].reshape(-1, 2))
              if k.all()}
    assert len(chosen) == 1, (task, chosen)  # every token of the task: the same two experts


def test_example_routing_shares_experts_per_example_and_stays_causal_for_language_models():
  m, batch = _routed('example')
  out = synthetic.forward(m, batch)
  rec = out.moe[1].record
  expert, kept = np.asarray(rec['expert_BxLxK']), np.asarray(rec['kept_BxLxK'])
  for b in np.nonzero(batch['task_id'] == 0)[0]:  # classification rows: the example's mean
    chosen = {tuple(e) for e, k in zip(expert[b], kept[b]) if k.all()}
    assert len(chosen) == 1, (b, chosen)
  # A per-position row routes each position on its prefix: changing a later token changes
  # no earlier position's output (dropless evaluation), and does change later ones.
  row = 0  # the first text row
  length = int(batch['tokens_mask'][row].sum())
  assert length >= 6
  cut = length - 2
  changed = {k: v.copy() for k, v in batch.items()}
  changed['tokens'][row, cut] = (changed['tokens'][row, cut] % 255) + 1
  after = synthetic.forward(m, changed).logits['text'][row]
  before = out.logits['text'][row]
  np.testing.assert_allclose(np.asarray(after[:cut]), np.asarray(before[:cut]), atol=1e-6)
  assert not np.allclose(np.asarray(after[cut:length]), np.asarray(before[cut:length]))
  # The same layer without the causal prefix would route early positions on later tokens.
  from pathways.nn import router as router_lib  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (1, 6, 4))
  y = x.at[0, 5].add(1.0)
  full = [router_lib.routing_signal(v, None, 'example') for v in (x, y)]
  prefix = [router_lib.routing_signal(v, None, 'example', jnp.array([True])) for v in (x, y)]
  assert not np.allclose(full[0][0, 0], full[1][0, 0])
  np.testing.assert_array_equal(prefix[0][0, :5], prefix[1][0, :5])


def test_importance_load_loss_weighted_from_the_model_reaches_its_gradient():
  grads = {}
  for w in (0.0, 1.0):
    m, batch = synthetic.image_and_text(moe_kwargs=synthetic.moe_kwargs(
        banks=[(4, 16)], k=2, capacity_factor=1.0, noisy=True,
        loss_weights={'importance_load_loss': w}))
    g = nnx.jit(nnx.grad(lambda m: m(batch, deterministic=False).aux_loss))(m)
    grads[w] = np.asarray(g['blocks'][1]['ffn']['router']['w_DxE'][...])
  assert not grads[0.0].any() and grads[1.0].any()
