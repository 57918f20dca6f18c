"""Bad input is refused with a ValueError that names the argument, the value and what is allowed."""
import jax.numpy as jnp
import pytest
from flax import nnx

from pathways.nn import moe
from tests.nn import synthetic


def _layer(**kw):
  args = dict(d_model=8, banks=[(4, 16)], k=2)
  args.update(kw)
  return synthetic.moe_layer(args.pop('d_model'), args.pop('banks'), args.pop('k'), **args)


@pytest.mark.parametrize('kw,pattern', [
    (dict(k=5), r'k=5: .*1 <= k <= num_experts \+ num_null_experts = 4'),
    (dict(k=0), r'k=0'),
    (dict(capacity_factor=0.0), r'capacity_factor=0.0: must be a number > 0, or None'),
    (dict(capacity_factor=-2), r'capacity_factor=-2'),
    (dict(eval_capacity_factor=0), r'eval_capacity_factor=0'),
    (dict(router='switchy'), r"unknown router 'switchy'; known: \['expert_choice', 'soft', 'top_k'\]"),
    (dict(dispatcher='fastest'), r"unknown dispatcher 'fastest'; known: \['einsum', 'ragged', "
                                 r"'sorted'\]"),
    (dict(router='expert_choice', causal=True), r"expert_choice.*non-causal.*causal=True"),
    (dict(router='expert_choice', capacity_factor=None), r'no dropless mode'),
    (dict(router='expert_choice', num_null_experts=1), r'num_null_experts'),
    (dict(dispatcher='ragged'), r"dispatcher='ragged' is dropless: capacity_factor=1.25"),
    (dict(banks=[]), r'banks=\[\]'),
    (dict(banks=[(4, 0)]), r'hidden=0: must be an int >= 1'),
    (dict(top_p=1.5), r'top_p=1.5: must be in \(0, 1\]'),
    (dict(route_on='sentence'), r"route_on='sentence': must be one of \('token', 'example', 'task'\)"),
    (dict(route_on='task'), r'num_tasks=0'),
    (dict(group_size=0), r'group_size=0'),
    (dict(dtype=jnp.float16), r'dtype=.*float32 or jnp.bfloat16'),
])
def test_construction_refused(kw, pattern):
  with pytest.raises(ValueError, match=pattern):
    _layer(**kw)


def test_call_with_wrong_shapes_refused():
  layer = _layer(group_size=5)
  with pytest.raises(ValueError, match=r'x_BxLxD.shape=\(2, 4, 6\): last axis must be d_model=8'):
    layer(jnp.zeros((2, 4, 6)))
  with pytest.raises(ValueError, match=r'group_size=5 must divide .* T = B \* L = 8'):
    layer(jnp.zeros((2, 4, 8)))
  layer = _layer()
  with pytest.raises(ValueError, match=r'mask_BxL.shape=\(2, 3\): must be \(B, L\) = \(2, 4\)'):
    layer(jnp.zeros((2, 4, 8)), mask_BxL=jnp.ones((2, 3), bool))
  with pytest.raises(ValueError, match=r'task_ids_B.shape=\(3,\)'):
    layer(jnp.zeros((2, 4, 8)), task_ids_B=jnp.zeros((3,), jnp.int32))


def test_top1_with_renormalized_gates_warns_that_the_router_gets_no_gradient(caplog):
  from pathways.nn import moe as moe_lib
  moe_lib._warn_once.cache_clear()
  with caplog.at_level('WARNING'):
    moe_lib.MoELayer(8, ((4, 16),), dict(name='top_k', k=1), rngs=nnx.Rngs(0))
  assert 'k=1, renormalize=True' in caplog.text
  caplog.clear()
  moe_lib._warn_once.cache_clear()
  with caplog.at_level('WARNING'):
    moe_lib.MoELayer(8, ((4, 16),), dict(name='top_k', k=1, renormalize=False),
                     rngs=nnx.Rngs(0))
    moe_lib.MoELayer(8, ((4, 16),), dict(name='top_k', k=2), rngs=nnx.Rngs(0))
  assert 'renormalize' not in caplog.text
