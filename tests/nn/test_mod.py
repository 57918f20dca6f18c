"""Mixture-of-Depths against a per-row loop: each example's top-C tokens go through the
block (attending among themselves), the rest pass on the residual; FLOPs count what ran."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathways.data import layout as layout_lib
from pathways.nn import model as model_lib
from tests.nn import synthetic

MOE = synthetic.moe_kwargs(banks=[(4, 16)], k=2, capacity_factor=None)


def _model(capacity=0.5, slots=6, seed=0):
  tasks = [synthetic.task('images', 'image', 'classify', (8, 8, 1), 10)]
  layout = layout_lib.make_layout(tasks, (slots,))
  m = model_lib.Figure1Model(tasks, layout, d_model=16, num_layers=2, num_heads=2,
                             mlp_hidden=32, patch=2, moe_kwargs=MOE, mod_every=2,
                             mod_capacity=capacity, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  batch = {'task_id': np.zeros(slots, np.int32),
           'image': rng.integers(0, 256, (slots, 8, 8, 1)).astype(np.uint8),
           'label': rng.integers(0, 10, slots).astype(np.int32),
           'weight': np.ones(slots, np.float32)}
  return m, batch


@nnx.jit
def _block(block, x, mask, causal, ids, bias):
  return block(x, mask, causal, ids, bias, True)


def test_mixture_of_depths_equals_the_per_row_loop():
  m, batch = _model()
  out = synthetic.forward(m, batch)
  x, mask, ids = m.embed(batch)
  causal = jnp.asarray(m.causal)[ids]
  d = x.shape[-1]
  flops = np.zeros(x.shape[0])
  for layer, block in enumerate(m.blocks):
    bias = m.router_bias(layer, ids, x.shape[1])
    if layer not in m.mod_layers:
      x, stats = _block(block, x, mask, causal, ids, bias)
      flops += np.asarray(jnp.sum(model_lib.attention.flops_per_token(d, mask, causal), -1))
      flops += 2 * 2 * d * 32 * np.asarray(mask).sum(-1)  # the dense FFN, hidden 32
      continue
    score = np.asarray(x) @ np.asarray(m.depth_w[...][0])
    c = round(0.5 * x.shape[1])
    chosen = np.zeros(mask.shape, bool)
    for r in range(x.shape[0]):  # each row's top-c real tokens by score
      real = np.nonzero(np.asarray(mask[r]))[0]
      chosen[r, real[np.argsort(-score[r, real], kind='stable')[:c]]] = True
    y, stats = _block(block, x, jnp.asarray(chosen), causal, ids, bias)
    gate = 1 / (1 + np.exp(-score))
    x = np.where(chosen[..., None], np.asarray(x) + gate[..., None] * (np.asarray(y) - x),
                 np.asarray(x))
    x = jnp.asarray(x)
    visible = chosen.sum(-1, keepdims=True)
    flops += ((8.0 * d * d + 4.0 * d * visible) * chosen).sum(-1)  # attention, chosen only
    flops += np.asarray(stats.flops_BxL).sum(-1) + 2.0 * d * np.asarray(mask).sum(-1)
    assert chosen.sum() == x.shape[0] * c
  h = m.final_norm(x)
  pooled = model_lib._masked_mean(h, mask)  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(out.logits['images']),
                             np.asarray(pooled @ m.heads['images'][...]), atol=2e-5)
  np.testing.assert_allclose(np.asarray(out.flops_per_example), flops, rtol=1e-5)


def test_the_depth_router_learns_through_its_gate_and_per_position_tasks_are_refused():
  m, batch = _model()

  def loss(m):
    out = m(batch, deterministic=False)
    return model_lib.task_losses(m, out, batch)[0]['images']

  grads = nnx.jit(nnx.grad(loss))(m)
  assert np.abs(np.asarray(grads['depth_w'][...])).sum() > 0
  full, _ = _model(capacity=1.0)
  less, _ = _model(capacity=0.25)
  f_full = synthetic.forward(full, batch).flops_per_example
  f_less = synthetic.forward(less, batch).flops_per_example
  assert (np.asarray(f_less) < np.asarray(f_full)).all()
  tasks = [synthetic.task('text', 'bytes', 'per_position', (16,), 256)]
  with pytest.raises(ValueError, match='causal predictor'):
    model_lib.Figure1Model(tasks, layout_lib.make_layout(tasks, (2,)), d_model=16,
                           num_layers=2, num_heads=2, mlp_hidden=32, mod_every=2,
                           moe_kwargs=MOE, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='mod_capacity'):
    _model(capacity=1.5)
