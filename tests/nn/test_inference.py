"""Bucketed inference equals the full compiled path: predictions, halting layers, FLOPs."""
import jax
import numpy as np
import pytest
from flax import nnx

from pathways.data import layout as layout_lib
from pathways.nn import inference
from pathways.nn import model as model_lib
from tests.nn import synthetic


def _setup(moe_kwargs, halting=True):
  m, batch = synthetic.image_and_text(halting=halting, moe_kwargs=moe_kwargs)
  if halting:  # spread the halting layers: some examples stop at 0, 1, 2 or run to the end
    m.halt_w_LxD[...] = 3.0 * jax.random.normal(jax.random.key(1), m.halt_w_LxD.shape)
    m.halt_b_L[...] = m.halt_b_L[...] * 0.0
  return m, batch


FLAT = dict(banks=[(2, 16), (2, 48)], k=2, num_null_experts=1, capacity_factor=1.0)
MOE = synthetic.moe_kwargs(**FLAT)


@pytest.mark.parametrize('moe_kwargs', [
    MOE, synthetic.moe_kwargs(**dict(FLAT, top_p=0.6, num_null_experts=0)),
    synthetic.moe_kwargs(**dict(FLAT, dispatcher='einsum', group_size=8)),
    synthetic.moe_kwargs(**dict(FLAT, shared_experts=1, granularity=2))])
def test_bucketed_path_equals_full_path(moe_kwargs):
  m, batch = _setup(moe_kwargs)
  res = synthetic.forward(m, batch)
  out = res.logits
  out_b, info = inference.BucketedInference(m)(batch)
  for name in ('images', 'text'):
    np.testing.assert_allclose(np.asarray(out_b[name]), np.asarray(out[name]), rtol=1e-4,
                               atol=1e-5)
  halt = np.asarray(res.halting.layer_B)[:7]
  np.testing.assert_array_equal(info['halting_layer'][:7], halt)
  assert (info['halting_layer'][7:] == -1).all()  # per-position rows never halt
  assert len(set(halt.tolist())) >= 2, halt  # the test exercises compaction
  np.testing.assert_allclose(info['flops_per_example'], np.asarray(res.flops_per_example),
                             rtol=1e-5)
  # Rows leave as they halt: later layers run on smaller row buckets.
  row_buckets = [nb for _, nb, _ in info['steps']]
  assert row_buckets[0] == 16 and row_buckets[-1] < row_buckets[0], info['steps']
  # Expert slots: the largest expert load rounded up to a power of two, never above the
  # full path's dropless T slots.
  assert all(cap is None or cap <= nb * 16 for _, nb, cap in info['steps']), info['steps']


def test_without_halting_every_example_runs_every_layer():
  m, batch = _setup(MOE, halting=False)
  res = synthetic.forward(m, batch)
  out = res.logits
  out_b, info = inference.BucketedInference(m)(batch)
  np.testing.assert_allclose(np.asarray(out_b['images']), np.asarray(out['images']), rtol=1e-4,
                             atol=1e-5)
  assert [nb for _, nb, _ in info['steps']] == [16] * 4
  np.testing.assert_allclose(info['flops_per_example'], np.asarray(res.flops_per_example),
                             rtol=1e-5)


def test_bucket_sizes():
  assert [inference.bucket(n) for n in (0, 1, 2, 3, 5, 8, 9, 256, 257)] == [
      1, 1, 2, 4, 8, 8, 16, 256, 512]


def test_expert_choice_is_refused():
  tasks = [synthetic.task('images', 'image', 'classify', (8, 8, 1), 10)]
  m = model_lib.Figure1Model(tasks, layout_lib.make_layout(tasks, [4]), d_model=32,
                             num_layers=2, num_heads=2, mlp_hidden=48,
                             moe_kwargs=synthetic.moe_kwargs(
                                 banks=[(4, 16)], k=2, router='expert_choice',
                                 capacity_factor=1.0, eval_capacity_factor=1.0),
                             rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='expert choice'):
    inference.BucketedInference(m)
