"""The MoE layer benchmark runs every variant side by side and tabulates them (tiny shapes;
speed itself is measured by `tools/benchmark_moe.py`, never here)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathways.nn import benchmark
from pathways.nn import experts
from pathways.nn import moe


def test_benchmark_times_every_variant_and_the_table_shows_them():
  setting = benchmark.Setting(d_model=16, dense_hidden=32, k=2, einsum_groups=(32,), repeats=1,
                              forward_only=False, breakdown=True)
  row = benchmark.bench_config(64, 4, setting)
  assert set(row['train_seconds']) == {'dense', 'moe', 'moe_recompute', 'einsum@32', 'ragged',
                                       'shared', 'fine'}
  assert all(v > 0 for v in row['train_seconds'].values())
  assert row['pallas'].startswith('not run: on CPU the Pallas kernel runs interpreted')
  assert set(row['breakdown_seconds']) == {'layer', 'layer_without_expert_ffn', 'expert_ffn',
                                           'expert_ffn_recompute', 'router'}
  assert all(v > 0 for v in row['breakdown_seconds'].values())
  table = benchmark.table([row])
  assert '| moe recompute/dense | shared/dense | fine/dense |' in table
  lines = table.splitlines()
  assert f"{row['train_vs_dense']['fine']:.2f}" in lines[2]
  assert f"{row['breakdown_seconds']['layer_without_expert_ffn']:.2f} s" in lines[-1]
  # The identity experts were swapped in for tracing only.
  assert experts.apply_banks.__name__ == 'apply_banks'


def test_layer_without_expert_ffn_is_the_layer_with_identity_experts():
  """What the breakdown times: the layer with every expert the identity, whose output is each
  token times the sum of its kept gates (dropless here: every assignment kept)."""
  layer = moe.MoELayer(8, [(4, 16)], dict(name='top_k', k=2), capacity_factor=None,
                       dispatcher='sorted', rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 16, 8))
  (loss, _), _ = benchmark._without_expert_ffn(layer, jnp.zeros((4,)), x)()  # pylint: disable=protected-access
  _, stats = layer(x, logit_bias_BxLxE=jnp.zeros((1, 16, 4)), deterministic=False)
  assert bool(jnp.all(stats.record['kept_BxLxK']))
  expected = jnp.sum(x * jnp.sum(stats.record['weight_BxLxK'], -1, keepdims=True))
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5, atol=1e-5)
