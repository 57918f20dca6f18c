"""Routers: top-k, top-p, null experts, noise, Task-MoE and per-example routing, expert choice."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathways.nn import router as router_lib
from tests.nn import synthetic


def _router_with_probs(probs_NxE, **kw):
  """A router whose logits for one-hot input row i are log(probs[i])."""
  n, e = probs_NxE.shape
  r = router_lib.TopKRouter(n, e - kw.get('num_null_experts', 0), kw.pop('k'), rngs=nnx.Rngs(0),
                            **kw)
  r.w_DxE[...] = jnp.log(jnp.asarray(probs_NxE, jnp.float32))
  return r, jnp.eye(n)[None]


def test_top_k_picks_largest_and_renormalizes():
  probs = np.array([[0.1, 0.5, 0.3, 0.1], [0.4, 0.05, 0.05, 0.5]])
  r, x = _router_with_probs(probs, k=2)
  routing, metrics, _ = r(x)
  np.testing.assert_array_equal(routing.expert_GxSxK[0], [[1, 2], [3, 0]])
  np.testing.assert_allclose(routing.weight_GxSxK[0], [[0.5 / 0.8, 0.3 / 0.8], [0.5 / 0.9, 0.4 / 0.9]],
                             rtol=1e-5)
  assert float(metrics['experts_per_token']) == 2.0


def test_switch_k1_without_renormalization_keeps_raw_probability():
  r, x = _router_with_probs(np.array([[0.1, 0.6, 0.3]]), k=1, renormalize=False)
  routing, _, _ = r(x)
  assert int(routing.expert_GxSxK[0, 0, 0]) == 1
  assert float(routing.weight_GxSxK[0, 0, 0]) == pytest.approx(0.6, rel=1e-5)


def test_top_p_uses_fewer_experts_for_confident_tokens():
  # Token 0: [0.5, 0.3, ...]: 0.5 < 0.6 so a second expert is kept. Token 1: 0.7 >= 0.6: one.
  probs = np.array([[0.5, 0.3, 0.15, 0.05], [0.7, 0.2, 0.05, 0.05]])
  r, x = _router_with_probs(probs, k=3, top_p=0.6)
  routing, metrics, _ = r(x)
  np.testing.assert_array_equal(routing.valid_GxSxK[0], [[True, True, False], [True, False, False]])
  assert float(metrics['experts_per_token']) == pytest.approx(1.5)
  np.testing.assert_allclose(routing.weight_GxSxK[0, 1], [1.0, 0.0, 0.0], atol=1e-6)


def test_null_expert_choice_costs_nothing_and_shrinks_output_weight():
  # E=2 real + 1 null (id 2). Token 0 puts its top choice on the null expert.
  probs = np.array([[0.2, 0.1, 0.7], [0.6, 0.3, 0.1]])
  r, x = _router_with_probs(probs, k=2, num_null_experts=1)
  routing, metrics, _ = r(x)
  np.testing.assert_array_equal(routing.expert_GxSxK[0], [[2, 0], [0, 1]])
  np.testing.assert_array_equal(routing.valid_GxSxK[0], [[False, True], [True, True]])
  np.testing.assert_allclose(routing.weight_GxSxK[0, 0], [0.0, 0.2 / 0.9], rtol=1e-5)
  assert float(metrics['experts_per_token']) == pytest.approx(1.5)


def test_noisy_gating_only_in_training():
  r = router_lib.TopKRouter(8, 4, 2, noisy=True, rngs=nnx.Rngs(0, router=1))
  x = jax.random.normal(jax.random.key(0), (1, 64, 8))
  a, _, _ = r(x, deterministic=True)
  b, _, _ = r(x, deterministic=True)
  np.testing.assert_array_equal(a.expert_GxSxK, b.expert_GxSxK)
  c, m1, _ = r(x, deterministic=False)
  d, _, _ = r(x, deterministic=False)
  assert not np.array_equal(np.asarray(c.weight_GxSxK), np.asarray(d.weight_GxSxK))
  assert np.isfinite(float(m1['importance_load_loss']))


def test_task_routing_depends_only_on_task():
  layer = synthetic.moe_layer(8, [(4, 16)], 2, route_on='task', num_tasks=3)
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  task_ids = jnp.array([0, 1, 0])
  routing, _, _ = layer.router(x.reshape(1, 15, 8),
                               task_ids_GxS=jnp.repeat(task_ids, 5)[None])
  e = np.asarray(routing.expert_GxSxK[0]).reshape(3, 5, 2)
  assert (e == e[:, :1]).all()          # every token of an example routes alike
  np.testing.assert_array_equal(e[0], e[2])  # same task, same experts
  with pytest.raises(ValueError, match='task_ids'):
    layer(x)


def test_example_routing_is_shared_by_tokens_of_an_example():
  layer = synthetic.moe_layer(8, [(4, 16)], 1, route_on='example', capacity_factor=None)
  x = jax.random.normal(jax.random.key(0), (4, 6, 8))
  mask = jnp.arange(6)[None, :] < jnp.array([6, 3, 5, 2])[:, None]
  signal = router_lib.routing_signal(x, mask, 'example')
  np.testing.assert_allclose(signal[1, 0], x[1, :3].mean(0), rtol=1e-5)
  routing, _, _ = layer.router(signal.reshape(1, 24, 8))
  e = np.asarray(routing.expert_GxSxK[0, :, 0]).reshape(4, 6)
  assert (e == e[:, :1]).all()


def test_expert_choice_takes_top_c_active_tokens():
  r = router_lib.ExpertChoiceRouter(8, 4, 1, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8))
  active = jnp.arange(8)[None, :] < jnp.array([[8], [3]])
  routing, metrics, _ = r(x, active_GxS=active, capacity_factor=1.0)
  assert routing.token_GxExC.shape == (2, 4, 2)  # C = ceil(1.0 * 8 * 1 / 4) = 2
  # Group 0: every slot filled with distinct tokens per expert. Group 1: only tokens 0..2.
  assert bool(routing.valid_GxExC[0].all())
  tok1 = np.asarray(routing.token_GxExC[1])[np.asarray(routing.valid_GxExC[1])]
  assert (tok1 < 3).all()
  probs = jax.nn.softmax(r.logits(x, None), -1)
  for e in range(4):
    expected = set(np.argsort(-np.asarray(probs[0, :, e]))[:2])
    assert set(np.asarray(routing.token_GxExC[0, e])) == expected


def test_masked_experts_are_never_chosen_even_when_k_exceeds_the_allowed_set():
  r = router_lib.TopKRouter(8, 4, 3, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 32, 8))
  bias = jnp.broadcast_to(jnp.array([0.0, -jnp.inf, -jnp.inf, 0.0]), (1, 32, 4))
  routing, metrics, _ = r(x, logit_bias_GxSxE=bias)
  chosen = np.asarray(routing.expert_GxSxK)[np.asarray(routing.valid_GxSxK)]
  assert set(chosen.tolist()) <= {0, 3}
  assert float(metrics['experts_per_token']) == 2.0
  np.testing.assert_allclose(np.asarray(routing.weight_GxSxK).sum(-1), 1.0, rtol=1e-5)


def test_router_is_built_from_a_config_dict_through_the_registry():
  import ml_collections  # pylint: disable=g-import-not-at-top
  r = router_lib.build({'name': 'top_k', 'k': 3, 'num_null_experts': 1}, d_model=8,
                       num_experts=4, rngs=nnx.Rngs(0))
  assert isinstance(r, router_lib.TopKRouter) and r.k == 3 and r.num_logits == 5
  spec = ml_collections.ConfigDict({'name': 'expert_choice', 'k': 2})  # as configs hold it
  assert isinstance(router_lib.build(spec, d_model=8, num_experts=4, rngs=nnx.Rngs(0)),
                    router_lib.ExpertChoiceRouter)
  with pytest.raises(ValueError, match=r"'expert_choice' takes no option \['noisy'\]; its "
                                       r"options are \['k', 'route_on'\]"):
    router_lib.build({'name': 'expert_choice', 'noisy': True}, d_model=8, num_experts=4,
                     rngs=nnx.Rngs(0))
  assert router_lib.resolved('top_k') == {'name': 'top_k', 'k': 2, 'num_null_experts': 0,
                                          'top_p': None, 'renormalize': True, 'noisy': False,
                                          'jitter': 0.0, 'priority': 'position',
                                          'balance_rate': 0.0, 'routed_scale': 1.0,
                                          'route_on': 'token'}


@pytest.mark.parametrize('router', ['top_k', 'expert_choice'])
def test_every_router_loss_reaches_the_loss_when_weighted(router):
  """The router returns its auxiliary loss weighted: weight 0 leaves it out (no gradient),
  a weight puts exactly weight * loss in, and its gradient reaches the router."""
  x = jax.random.normal(jax.random.key(0), (1, 16, 8))
  noisy = {'noisy': True} if router == 'top_k' else {}
  for name in router_lib.AUX_LOSSES:
    grads = {}
    for w in (0.0, 0.5):
      r = router_lib.build(dict(name=router, k=2, **noisy), d_model=8, num_experts=4,
                           loss_weights={name: w}, rngs=nnx.Rngs(0, router=1))

      def aux(r):
        _, metrics, loss = r(x, capacity_factor=2.0, deterministic=False)
        return loss, metrics[name]

      (loss, value), g = nnx.value_and_grad(aux, has_aux=True)(r)
      assert float(loss) == pytest.approx(w * float(value), rel=1e-6), name
      grads[w] = g['w_DxE'][...]
    assert not np.asarray(grads[0.0]).any(), name
    assert np.asarray(grads[0.5]).any(), name  # reaches the router's projection
