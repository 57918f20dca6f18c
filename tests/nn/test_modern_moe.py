"""The 2024-era MoE options, each against a slow obvious reference: shared experts, fine-grained
experts, auxiliary-loss-free balancing, Soft MoE, router jitter, batch-priority routing, the
routed gate scale, and sparse upcycling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathways.nn import moe
from pathways.nn import router as router_lib
from pathways.nn import upcycle as upcycle_lib
from pathways.train import checkpoint as checkpoint_lib
from tests.nn import synthetic

D = 16


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol,
                             atol=tol)


def _inputs(b=2, l=8, masked=True):
  x = jax.random.normal(jax.random.key(1), (b, l, D))
  mask = jax.random.uniform(jax.random.key(2), (b, l)) < 0.75 if masked else None
  return x, mask


def _grads(fn, layer, x):
  """(value, d/d params, d/d x) of sum(fn(layer, x) * r) for a fixed random r."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  r = jax.random.normal(jax.random.key(7), x.shape)

  def f(params, x):
    return jnp.sum(fn(nnx.merge(graphdef, params, rest), x) * r)

  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)


# ------------------------------------------------------------------------- shared experts


@pytest.mark.parametrize('dispatcher', ['einsum', 'sorted'])
def test_shared_experts_equal_dense_ffns_plus_the_routed_layer(dispatcher):
  """N shared experts of width h: the routed layer's output plus, for every active token, the
  sum of N separate FFNs (the slow obvious form); forwards and gradients; FLOPs counted for
  every active token."""
  n, h = 2, 8
  layer = synthetic.moe_layer(D, [(4, 12)], 2, capacity_factor=1.0, dispatcher=dispatcher,
                              shared_experts=n, shared_hidden=h)
  routed = synthetic.moe_layer(D, [(4, 12)], 2, capacity_factor=1.0, dispatcher=dispatcher)
  state = nnx.state(layer)
  nnx.update(routed, {k: v for k, v in state.items() if k != 'shared'})
  x, mask = _inputs()

  def with_shared(m, x):
    return m(x, mask_BxL=mask)[0]

  def reference(m, x):
    y = routed(x, mask_BxL=mask)[0]
    w_in, w_out = m.shared.w_in_DxF[...], m.shared.w_out_FxD[...]
    for i in range(n):  # one FFN per shared expert
      s = slice(i * h, (i + 1) * h)
      y = y + jax.nn.gelu(x @ w_in[:, s]) @ w_out[s] * mask[..., None]
    return y

  value, grads = _grads(with_shared, layer, x)
  value_ref, grads_ref = _grads(reference, layer, x)
  _close(value, value_ref)
  _close(grads[1], grads_ref[1])
  _close(grads[0]['shared']['w_in_DxF'][...], grads_ref[0]['shared']['w_in_DxF'][...])
  assert np.abs(np.asarray(grads[0]['shared']['w_out_FxD'][...])).sum() > 0
  _, stats = layer(x, mask_BxL=mask)
  _, stats_routed = routed(x, mask_BxL=mask)
  _close(stats.flops_BxL, stats_routed.flops_BxL + 4 * D * n * h * mask, 1e-6)
  total = float(jnp.sum(stats.flops_BxL))
  assert float(stats.metrics['shared_flops_fraction']) == pytest.approx(
      4 * D * n * h * float(mask.sum()) / total, rel=1e-5)
  assert float(stats_routed.metrics['shared_flops_fraction']) == 0.0


# --------------------------------------------------------------------- fine-grained experts


def test_granularity_one_is_the_layer_as_given_bitwise():
  x, mask = _inputs()
  plain = synthetic.moe_layer(D, [(4, 12)], 2, capacity_factor=1.25)
  g1 = synthetic.moe_layer(D, [(4, 12)], 2, capacity_factor=1.25, granularity=1)
  y, s = plain(x, mask_BxL=mask)
  y1, s1 = g1(x, mask_BxL=mask)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y1))
  np.testing.assert_array_equal(np.asarray(s.flops_BxL), np.asarray(s1.flops_BxL))


def test_granularity_splits_experts_and_multiplies_k_at_equal_expert_flops():
  coarse = synthetic.moe_layer(D, [(4, 12), (2, 24)], 2, capacity_factor=None)
  fine = synthetic.moe_layer(D, [(4, 12), (2, 24)], 2, capacity_factor=None, granularity=3)
  assert [(b.num_experts, b.hidden) for b in fine.banks] == [(12, 4), (6, 8)]
  assert fine.k == 6 and fine.num_experts == 18
  # a token's k coarse experts cost what its G * k fine ones cost when it picks the same banks
  assert coarse.banks[0].flops_per_token(D) == 3 * fine.banks[0].flops_per_token(D)
  x, _ = _inputs(masked=False)
  y, stats = fine(x)
  assert y.shape == x.shape and float(stats.metrics['experts_per_token']) == 6.0
  with pytest.raises(ValueError, match=r"granularity=5: every bank's hidden width must divide"):
    synthetic.moe_layer(D, [(4, 12)], 2, granularity=5)
  with pytest.raises(ValueError, match=r"router 'expert_choice' has no k per token"):
    synthetic.moe_layer(D, [(4, 12)], 2, router='expert_choice', granularity=2)


# --------------------------------------------------------------------- routed gate scale


def _mean_gate_sum(e, **router):
  layer = synthetic.moe_layer(32, [(e, 8)], 1, capacity_factor=None, renormalize=False, **router)
  x = jax.random.normal(jax.random.key(3), (4, 64, 32))
  routing, _, _ = layer.route(x)
  return float(jnp.mean(jnp.sum(routing.weight_GxSxK, -1)))


def test_expected_routed_scale_keeps_the_output_scale_independent_of_experts():
  """Switch's top-1 gate is about 1/E at initialization (x 1/16 from E=4 to 64);
  routed_scale='expected' (E / k without renormalization: a uniform router's gates sum to 1)
  keeps it within a factor 1.6 over the same range (the top of E near-uniform probabilities
  sits a little above the mean: measured 1.4 / 1.7 / 2.0)."""
  plain = [_mean_gate_sum(e) for e in (4, 16, 64)]
  scaled = [_mean_gate_sum(e, routed_scale='expected') for e in (4, 16, 64)]
  assert plain[0] > 3 * plain[1] > 9 * plain[2] and plain[2] < 0.05
  assert all(1.0 < g < 2.2 for g in scaled) and scaled[2] < 1.6 * scaled[0], scaled
  r = router_lib.build({'name': 'top_k', 'k': 2, 'routed_scale': 'expected'}, d_model=4,
                       num_experts=8, rngs=nnx.Rngs(0))
  assert r.routed_scale == 1.0  # renormalized gates already sum to 1
  r = router_lib.build({'name': 'top_k', 'k': 2, 'renormalize': False, 'routed_scale': 2.5},
                       d_model=4, num_experts=8, rngs=nnx.Rngs(0))
  assert r.routed_scale == 2.5


# ------------------------------------------------------------ auxiliary-loss-free balancing


def _skewed_router(balance_rate):
  r = router_lib.TopKRouter(D, 8, 2, renormalize=False, balance_rate=balance_rate,
                            rngs=nnx.Rngs(0))
  w = np.zeros((D, 8), np.float32)
  w[:, 0] = 0.1  # expert 0 (then 1) favoured by most tokens
  w[:, 1] = 0.07
  r.w_DxE[...] = jnp.asarray(w) + 0.1 * jax.random.normal(jax.random.key(4), (D, 8))
  return r


def test_balance_bias_changes_selection_but_not_the_combine_weights():
  r = _skewed_router(0.01)
  x = jax.random.normal(jax.random.key(5), (1, 64, D)) + 1.0
  before, _, _ = r(x)
  r.balance_bias[...] = jnp.asarray([-1.0, -1.0, 0, 0, 0, 0, 0, 0], jnp.float32)
  after, _, _ = r(x)
  assert not np.array_equal(np.asarray(before.expert_GxSxK), np.asarray(after.expert_GxSxK))
  assert not np.isin(np.asarray(after.expert_GxSxK), [0, 1]).any()
  gates = jnp.take_along_axis(after.probs_GxSxE, after.expert_GxSxK, axis=-1)
  _close(after.weight_GxSxK, gates, 1e-7)  # the probabilities, not probabilities + bias
  _close(after.probs_GxSxE, before.probs_GxSxE, 1e-7)


def test_balance_updates_lower_the_load_cv_of_a_skewed_router_over_50_steps():
  r = _skewed_router(0.01)
  cvs = []
  for step in range(50):
    x = jax.random.normal(jax.random.key(100 + step), (1, 256, D)) + 1.0
    _, metrics, _ = r(x, deterministic=False)
    cvs.append(float(metrics['router_load_cv']))
    used = np.abs(np.asarray(r.balance_bias[...])).mean()  # the bias this step selected with
    router_lib.update_balance(r, metrics['router_load'])
  assert cvs[-1] < 0.5 * cvs[0], cvs
  bias = np.asarray(r.balance_bias[...])
  assert bias[0] < 0 and bias[0] == bias.min()  # the favourite pushed down most
  assert float(metrics['balance_bias']) == pytest.approx(used, rel=1e-5)
  # model state, not a parameter: the optimizer never sees it
  assert not nnx.state(r, nnx.Param).get('balance_bias')
  assert 'balance_bias' in nnx.state(r)


def test_the_model_moves_each_layers_balance_bias_by_the_sign_of_its_load_error():
  from pathways.nn import model as model_lib  # pylint: disable=g-import-not-at-top
  m, batch = synthetic.image_and_text(
      moe_kwargs=synthetic.moe_kwargs(banks=[(4, 16)], k=2, balance_rate=0.01,
                                      capacity_factor=2.0))
  out = synthetic.forward(m, batch, deterministic=False)
  layer = m.moe_layers[0]
  before = np.asarray(m.blocks[layer].ffn.router.balance_bias[...])
  m.update_balance(out)
  after = np.asarray(m.blocks[layer].ffn.router.balance_bias[...])
  load = np.asarray(out.moe[layer].metrics['router_load'])
  np.testing.assert_allclose(after - before, 0.01 * np.sign(load.mean() - load), atol=1e-7)
  assert isinstance(m, model_lib.Figure1Model)


# ------------------------------------------------------------------ jitter, batch priority


def test_jitter_only_in_training():
  x, mask = _inputs()
  jittered = synthetic.moe_layer(D, [(4, 12)], 2, capacity_factor=1.0, jitter=0.3,
                                 rngs=nnx.Rngs(0, router=1))
  plain = synthetic.moe_layer(D, [(4, 12)], 2, capacity_factor=1.0)
  y_eval, _ = jittered(x, mask_BxL=mask, deterministic=True)
  np.testing.assert_array_equal(np.asarray(y_eval), np.asarray(plain(x, mask_BxL=mask)[0]))
  r_train, _, _ = jittered.route(x, mask_BxL=mask, deterministic=False)
  r_eval, _, _ = jittered.route(x, mask_BxL=mask, deterministic=True)
  assert not np.allclose(np.asarray(r_train.probs_GxSxE), np.asarray(r_eval.probs_GxSxE))


def _priority_layer(priority, dispatcher):
  layer = synthetic.moe_layer(4, [(2, 8)], 1, capacity_factor=0.5, renormalize=False,
                              priority=priority, dispatcher=dispatcher)
  layer.router.w_DxE[...] = jnp.asarray([[0.5, 0.0], [2.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
  return layer


@pytest.mark.parametrize('dispatcher', ['einsum', 'sorted'])
def test_batch_priority_gives_capacity_to_the_highest_gates_first(dispatcher):
  """Four tokens all prefer expert 0, which has C = ceil(0.5 * 4 * 1 / 2) = 1 slot: position
  order keeps token 0; batch priority keeps token 3 (the highest gate)."""
  x = jnp.eye(4)[None]
  for priority, winner in (('position', 0), ('gate', 3)):
    y, stats = _priority_layer(priority, dispatcher)(x)
    kept = np.asarray(stats.record['kept_BxLxK'])[0, :, 0]
    assert kept.tolist() == [i == winner for i in range(4)], (priority, kept)
    assert np.abs(np.asarray(y[0, winner])).sum() > 0
    assert not np.asarray(y[0, [i for i in range(4) if i != winner]]).any()


def test_batch_priority_dispatchers_agree_when_dropping():
  x, mask = _inputs(3, 8)
  outs = {}
  for dispatcher in ('einsum', 'sorted'):
    layer = synthetic.moe_layer(D, [(4, 12)], 2, capacity_factor=0.75, priority='gate',
                                dispatcher=dispatcher, group_size=8)
    outs[dispatcher] = _grads(lambda m, x: m(x, mask_BxL=mask)[0], layer, x)
  _close(outs['sorted'][0], outs['einsum'][0])
  jax.tree.map(_close, outs['sorted'][1], outs['einsum'][1])


# ------------------------------------------------------------------------------ Soft MoE


def _soft_reference(layer, x, mask):
  """Soft MoE by loops over groups, experts and slots (Puigcerver et al. 2024, Alg. 1)."""
  r = layer.router
  e, c = r.num_experts, r.slots_per_expert
  b, l, _ = x.shape
  w = r.w_DxE[...]
  w = r.scale[...] * w / jnp.linalg.norm(w, axis=0, keepdims=True)
  w_in, w_out = layer.banks[0].weights()
  rows = []
  for i in range(b):  # one group per example
    act = mask[i]
    xi = x[i] / jnp.linalg.norm(x[i], axis=-1, keepdims=True)
    logits = (xi @ w).reshape(l, e, c)
    out = jnp.zeros((l, D))
    combine = jax.nn.softmax(jnp.where(act[:, None], logits.reshape(l, e * c), 0.0), axis=-1)
    for j in range(e):
      for s in range(c):
        d = jax.nn.softmax(jnp.where(act, logits[:, j, s], -jnp.inf))
        slot = jnp.sum(d[:, None] * x[i], axis=0)
        y_slot = jax.nn.gelu(slot @ w_in[j]) @ w_out[j]
        out = out + combine[:, j * c + s, None] * y_slot[None] * act[:, None]
    rows.append(out)
  return jnp.stack(rows)


@pytest.mark.parametrize('dispatcher', ['einsum', 'sorted'])
def test_soft_moe_equals_the_per_slot_loop(dispatcher):
  layer = synthetic.moe_layer(D, [(3, 12)], 1, router='soft', slots_per_expert=2,
                              dispatcher=dispatcher)
  x, mask = _inputs(2, 6)
  value, grads = _grads(lambda m, x: m(x, mask_BxL=mask)[0], layer, x)
  value_ref, grads_ref = _grads(lambda m, x: _soft_reference(m, x, mask), layer, x)
  _close(value, value_ref, 1e-4)
  jax.tree.map(lambda a, b: _close(a, b, 1e-4), grads, grads_ref)
  _, stats = layer(x, mask_BxL=mask)
  # every slot's expert FLOPs counted once, shared by its tokens' dispatch weights
  expert = 4 * D * 12
  router = 2 * D * 3 * 2
  total = float(jnp.sum(stats.flops_BxL))
  assert total == pytest.approx(2 * 3 * 2 * expert + router * float(mask.sum()), rel=1e-5)


def test_soft_moe_keeps_examples_apart_and_refuses_causal_use():
  layer = synthetic.moe_layer(D, [(3, 12)], 1, router='soft')
  x, _ = _inputs(2, 6, masked=False)
  y = layer(x)[0]
  y2 = layer(x.at[1].set(-x[1]))[0]
  np.testing.assert_array_equal(np.asarray(y[0]), np.asarray(y2[0]))
  with pytest.raises(ValueError, match=r"router='soft' is non-causal"):
    synthetic.moe_layer(D, [(3, 12)], 1, router='soft', causal=True)


# ---------------------------------------------------------------------------- upcycling


def test_upcycled_model_computes_the_dense_model_exactly():
  """Every expert a copy of the dense FFN and gates that sum to 1 (top-2 renormalized,
  dropless): the upcycled model's outputs equal the dense model's."""
  dense, batch = synthetic.image_and_text(moe_every=0, seed=3)
  moe_model, _ = synthetic.image_and_text(
      moe_every=2, seed=4, moe_kwargs=synthetic.moe_kwargs(banks=[(4, 48)], k=2,
                                                           capacity_factor=None))
  saved = checkpoint_lib.flat_paths(nnx.to_pure_dict(nnx.state(dense)))
  target = nnx.to_pure_dict(nnx.state(moe_model))
  upcycled, paths = upcycle_lib.upcycle(saved, checkpoint_lib.flat_paths(target))
  assert sorted(paths) == [f'blocks/{i}/ffn/banks/0/{w}' for i in (1, 3)
                           for w in ('w_in_ExDxF', 'w_out_ExFxD')]
  pure, _, kept = checkpoint_lib.copy_matching(upcycled, target)
  assert all('router' in p or p == 'connectivity' for p in kept), kept
  state = nnx.state(moe_model)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(moe_model, state)
  want = synthetic.forward(dense, batch).logits
  got = synthetic.forward(moe_model, batch).logits
  _close(got['images'], want['images'], 2e-5)
  real = batch['tokens_mask']  # padding positions take no expert in an MoE layer
  _close(np.asarray(got['text'])[real], np.asarray(want['text'])[real], 2e-5)
  noisy, _ = upcycle_lib.upcycle(saved, checkpoint_lib.flat_paths(target), noise=0.1)
  p = 'blocks/1/ffn/banks/0/w_in_ExDxF'
  assert not np.allclose(noisy[p][0], noisy[p][1])  # noise breaks the experts' symmetry
  with pytest.raises(ValueError, match=r"each expert must have the dense FFN's shape"):
    narrow, _ = synthetic.image_and_text(moe_every=2, moe_kwargs=synthetic.moe_kwargs(
        banks=[(4, 24)], k=2))
    upcycle_lib.upcycle(saved, checkpoint_lib.flat_paths(nnx.to_pure_dict(nnx.state(narrow))))


def test_routing_metrics_list_names_every_new_metric():
  for name in ('router_load_cv', 'balance_bias', 'shared_flops_fraction'):
    assert name in moe.SCALAR_METRICS
