"""Every dispatcher equals the one-hot reference, forwards and gradients.

Gradients are taken with respect to the input, the router and every expert weight of every
bank. Cases cover k in {1, 2, 4}, several E, heterogeneous banks, capacity factors that drop
tokens and ones that do not, groups, token masks and null experts, expert choice, bfloat16.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.nn import synthetic

D = 16


def _layer(dispatcher, **kw):
  return synthetic.moe_layer(D, kw.pop('banks'), kw.pop('k'), dispatcher=dispatcher, **kw)


def _value_and_grads(layer, x, mask, *, deterministic=True):
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  r = jax.random.normal(jax.random.key(7), x.shape)

  @jax.jit
  def f(params, x):
    m = nnx.merge(graphdef, params, rest)
    y, stats = m(x, mask_BxL=mask, deterministic=deterministic)
    return jnp.sum(y.astype(jnp.float32) * r), (y, stats.metrics)

  (_, (y, metrics)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)
  return y, metrics, grads


def _assert_close(a, b, tol):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol,
                             atol=tol)


CASES = {
    # name: (layer kwargs, B, L, mask?)
    'k1_e4_nodrop': (dict(banks=[(4, 32)], k=1, capacity_factor=4.0), 2, 8, False),
    'k1_e8_drop': (dict(banks=[(8, 32)], k=1, capacity_factor=0.5), 2, 16, False),
    'k2_e4_drop_mask': (dict(banks=[(4, 32)], k=2, capacity_factor=0.75), 3, 8, True),
    'k2_e6_hetero': (dict(banks=[(4, 8), (2, 48)], k=2, capacity_factor=1.0), 2, 12, False),
    'k4_e8_groups': (dict(banks=[(8, 16)], k=4, capacity_factor=1.25, group_size=8), 2, 8, True),
    'k2_null_topp': (dict(banks=[(4, 32)], k=2, capacity_factor=1.0, num_null_experts=2,
                          top_p=0.6), 2, 8, True),
    'k4_e16_dropless': (dict(banks=[(12, 16), (4, 40)], k=4, capacity_factor=None), 2, 8, True),
    'expert_choice': (dict(banks=[(4, 32)], k=2, router='expert_choice', capacity_factor=1.0),
                      2, 8, True),
    'expert_choice_hetero_groups': (dict(banks=[(3, 8), (3, 32)], k=1, router='expert_choice',
                                         capacity_factor=1.5, group_size=4), 2, 8, True),
}


def _inputs(b, l, with_mask):
  x = jax.random.normal(jax.random.key(1), (b, l, D))
  mask = None
  if with_mask:
    mask = jax.random.uniform(jax.random.key(2), (b, l)) < 0.75
  return x, mask


@pytest.mark.parametrize('case', sorted(CASES))
def test_sorted_equals_reference(case):
  kw, b, l, with_mask = CASES[case]
  x, mask = _inputs(b, l, with_mask)
  y_ref, met_ref, g_ref = _value_and_grads(_layer('einsum', **dict(kw)), x, mask)
  y, met, g = _value_and_grads(_layer('sorted', **dict(kw)), x, mask)
  _assert_close(y, y_ref, 1e-5)
  jax.tree.map(lambda a, b: _assert_close(a, b, 1e-5), g, g_ref)
  for name in ('fraction_dropped', 'fraction_tokens_dropped', 'expert_load',
               'computed_experts_per_token'):
    _assert_close(met[name], met_ref[name], 1e-6)
  assert float(jnp.abs(y).sum()) > 0
  # Gradients reach the input, the router and every bank's weights.
  params = g[0]
  assert float(jnp.abs(g[1]).sum()) > 0
  assert float(jnp.abs(params['router'][next(iter(params['router']))][...]).sum()) > 0
  for bank in params['banks'].values():
    assert float(jnp.abs(bank['w_in_ExDxF'][...]).sum()) > 0


def test_capacity_cases_do_drop_and_do_not():
  kw, b, l, _ = CASES['k1_e8_drop']
  x, _ = _inputs(b, l, False)
  _, met, _ = _value_and_grads(_layer('sorted', **dict(kw)), x, None)
  assert float(met['fraction_dropped']) > 0.1
  # k=1: a token whose only assignment is dropped is a dropped token.
  assert float(met['fraction_tokens_dropped']) == pytest.approx(float(met['fraction_dropped']))
  kw, b, l, _ = CASES['k1_e4_nodrop']
  _, met, _ = _value_and_grads(_layer('sorted', **dict(kw)), *_inputs(b, l, False))
  assert float(met['fraction_dropped']) == 0.0


@pytest.mark.parametrize('case', ['k4_e16_dropless', 'k2_null_topp_dropless'])
def test_ragged_equals_reference_dropless(case):
  if case == 'k2_null_topp_dropless':
    kw = dict(banks=[(4, 32)], k=2, capacity_factor=None, num_null_experts=2, top_p=0.6)
    b, l, with_mask = 2, 8, True
  else:
    kw, b, l, with_mask = CASES[case]
  x, mask = _inputs(b, l, with_mask)
  y_ref, _, g_ref = _value_and_grads(_layer('einsum', **dict(kw)), x, mask)
  kw = dict(kw, eval_capacity_factor=None)
  y, met, g = _value_and_grads(_layer('ragged', **kw), x, mask)
  _assert_close(y, y_ref, 1e-5)
  jax.tree.map(lambda a, b: _assert_close(a, b, 1e-5), g, g_ref)
  assert float(met['fraction_dropped']) == 0.0


def test_bfloat16_compute_matches_reference_and_router_stays_float32():
  kw = dict(banks=[(4, 32)], k=2, capacity_factor=1.0, dtype=jnp.bfloat16)
  x, mask = _inputs(2, 8, True)
  y_ref, _, _ = _value_and_grads(_layer('einsum', **dict(kw)), x, mask)
  y, _, _ = _value_and_grads(_layer('sorted', **dict(kw)), x, mask)
  _assert_close(y, y_ref, 2e-2)
  layer = _layer('sorted', **dict(kw))
  g = x.reshape(1, 16, D).astype(jnp.bfloat16)
  routing, _, _ = layer.router(g)
  assert routing.weight_GxSxK.dtype == jnp.float32
  assert layer.router.logits(g, None).dtype == jnp.float32


def test_inactive_tokens_get_zero_output():
  kw, b, l, _ = CASES['k2_e4_drop_mask']
  x, mask = _inputs(b, l, True)
  y, met, _ = _value_and_grads(_layer('sorted', **dict(kw)), x, mask)
  assert float(jnp.abs(y[~mask]).max()) == 0.0
  assert float(jnp.abs(y[mask]).min(axis=-1).max()) > 0


@pytest.mark.parametrize('case', ['k2_e6_hetero', 'expert_choice_hetero_groups'])
def test_flops_per_token_count_kept_experts_at_their_widths(case):
  kw, b, l, with_mask = CASES[case]
  x, mask = _inputs(b, l, with_mask)
  layer = _layer('sorted', **dict(kw))
  _, stats = layer(x, mask_BxL=mask)
  metrics = stats.metrics
  widths = [f for e, f in kw['banks'] for _ in range(e)]
  active = np.ones((b, l), bool) if mask is None else np.asarray(mask)
  router = 2 * D * len(widths) * active.sum()
  load = np.asarray(metrics['expert_load']) * float(metrics['computed_experts_per_token']) * \
      active.sum()  # kept assignments per expert
  expected = router + sum(n * 4 * D * f for n, f in zip(load, widths))
  np.testing.assert_allclose(float(stats.flops_BxL.sum()), expected, rtol=1e-5)
  assert float(jnp.abs(stats.flops_BxL[~active]).max(initial=0.0)) == 0.0


@pytest.mark.parametrize('group_size', [None, 4])
def test_expert_choice_with_capacity_factor_times_k_above_experts(group_size):
  """cf * k = 4 > E = 2 asks for more slots than a group has tokens: the router clamps C to
  S and every dispatcher takes C from the routing (the one-hot reference crashed here)."""
  kw = dict(banks=[(2, 8)], k=1, router='expert_choice', capacity_factor=4.0,
            group_size=group_size)
  x, _ = _inputs(2, 4, False)
  y_ref, met_ref, g_ref = _value_and_grads(_layer('einsum', **dict(kw)), x, None)
  y, met, g = _value_and_grads(_layer('sorted', **dict(kw)), x, None)
  _assert_close(y, y_ref, 1e-5)
  jax.tree.map(lambda a, b: _assert_close(a, b, 1e-5), g, g_ref)
  for m in (met, met_ref):  # C = S: each expert takes every token of its group
    assert float(m['fraction_dropped']) == 0.0
    assert float(m['computed_experts_per_token']) == 2.0
  with pytest.raises(ValueError, match="dispatcher='ragged' is dropless"):
    _layer('ragged', **dict(kw))
  with pytest.raises(ValueError, match='no dropless mode'):
    _layer('ragged', **dict(kw, capacity_factor=None, eval_capacity_factor=None))
