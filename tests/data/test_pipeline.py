"""The batch contract: mixture proportions, determinism, exact resume, fixed shapes, errors."""
import dataclasses

import numpy as np
import pytest

from pathways import registry
from pathways import task as task_lib
from pathways.data import mixture
from pathways.data import pipeline

MIX = ('digits', 'parity', 'addition', 'stdlib_package')


def _pipe(data_dir, **kw):
  args = dict(batch_size=20, data_dir=data_dir, seed=7, mixture='uniform')
  args.update(kw)
  return pipeline.MultitaskPipeline([registry.get_task(n) for n in MIX], **args)


def test_active_counts_realize_fractional_weights_exactly():
  w = np.array([0.5, 0.3, 0.15, 0.05])
  counts = np.stack([mixture.active_counts(w, 10, s, seed=1) for s in range(2000)])
  # Expected per step: 5, 3, 1.5, 0.5 -> exact over 2000 steps (periods 2 and 2).
  np.testing.assert_allclose(counts.mean(0), [5, 3, 1.5, 0.5], atol=1e-3)
  assert (counts <= mixture.slots(w, 10)).all()


def test_mixture_schemes():
  sizes, s = [100, 400], [1.0, 1.0]
  np.testing.assert_allclose(mixture.mixture_weights(sizes, s, 'uniform'), [0.5, 0.5])
  np.testing.assert_allclose(mixture.mixture_weights(sizes, s, 'proportional'), [0.2, 0.8])
  np.testing.assert_allclose(mixture.mixture_weights(sizes, s, 'temperature', 2.0), [1 / 3, 2 / 3])
  with pytest.raises(ValueError, match=r"mixture scheme='mixed': must be one of"):
    mixture.mixture_weights(sizes, s, 'mixed')


def test_pipeline_proportions_over_many_steps(data_dir):
  p = _pipe(data_dir, mixture='proportional', batch_size=16)
  totals = np.zeros(len(MIX))
  for _ in range(300):
    b = next(p)
    totals += np.bincount(b['task_id'], weights=b['weight'], minlength=len(MIX))
  np.testing.assert_allclose(totals / totals.sum(), p.weights, atol=0.01)


def test_coverage_counts_the_examples_drawn_against_the_split_size(data_dir):
  p = _pipe(data_dir, batch_size=16)
  drawn = np.zeros(len(MIX))
  for _ in range(7):
    b = next(p)
    drawn += np.bincount(b['task_id'], weights=b['weight'], minlength=len(MIX))
  cov = p.coverage()
  assert [cov[n][0] for n in MIX] == drawn.astype(int).tolist()
  assert [cov[n][1] for n in MIX] == [len(p._sources[n]) for n in MIX]  # pylint: disable=protected-access


def test_same_seed_same_batches_and_fixed_shapes(data_dir):
  a, b = _pipe(data_dir), _pipe(data_dir)
  shapes = None
  for _ in range(5):
    x, y = next(a), next(b)
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
    s = {k: (v.shape, v.dtype) for k, v in x.items()}
    assert shapes is None or s == shapes
    shapes = s
  c = next(_pipe(data_dir, seed=8))
  assert not np.array_equal(c['tokens'], next(_pipe(data_dir))['tokens'])


def test_restored_pipeline_yields_exactly_the_same_batches(data_dir):
  a = _pipe(data_dir)
  for _ in range(3):
    next(a)
  state = a.get_state()
  expected = [next(a) for _ in range(4)]
  b = _pipe(data_dir)
  b.set_state(state)
  for want in expected:
    got = next(b)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  with pytest.raises(ValueError, match='pipeline state is for tasks'):
    _pipe(data_dir, seed=9).set_state(state)


def test_process_shards_are_disjoint(data_dir):
  t = [registry.get_task('parity')]
  shard = lambda i: pipeline.MultitaskPipeline(t, 8, data_dir=data_dir, process_index=i,
                                               process_count=2)
  a, b = next(shard(0)), next(shard(1))
  assert not {bytes(r) for r in a['tokens']} & {bytes(r) for r in b['tokens']}


def test_layout_rows_by_modality(data_dir):
  p = _pipe(data_dir)
  layout = p.layout
  b = next(p)
  assert b['image'].shape[0] == len(layout.rows['image']) == layout.slots[0]
  assert b['tokens'].shape[0] == len(layout.rows['bytes'])
  assert set(b['task_id'][layout.rows['image']]) == {0}
  np.testing.assert_array_equal(b['tokens_mask'], b['tokens'] != 0)
  # parity rows: 1..16 real tokens, the rest padding.
  parity_rows = np.isin(layout.rows['bytes'], list(layout.task_rows(1)))
  lengths = b['tokens_mask'][parity_rows].sum(-1)
  assert ((lengths >= 1) & (lengths <= 16)).all()


def test_mismatched_data_stops_before_compilation(data_dir):
  digits = registry.get_task('digits')
  wrong = dataclasses.replace(digits, input_shape=(28, 28, 1))
  with pytest.raises(ValueError, match=r"task 'digits', split 'train' example 0: feature 'image' "
                                       r"has shape \(8, 8, 1\) dtype uint8; the task declares "
                                       r"shape \(28, 28, 1\)"):
    pipeline.MultitaskPipeline([wrong], 4, data_dir=data_dir)
  with pytest.raises(ValueError, match=r"batch_size=2: must be an int >= the number of tasks"):
    _pipe(data_dir, batch_size=2)


def test_every_example_is_checked_naming_split_index_and_what_is_allowed():
  """A later example shorter or longer than declared, or a label out of range, stops the
  pipeline at construction (not padded silently, not a bare numpy error, not a NaN loss)."""
  def task(rows):
    return task_lib.Task(name='vec13', modality='vector', head='classify', num_classes=3,
                         data=lambda split, data_dir: rows, splits={'train': 'a', 'eval': 'a'},
                         input_feature='x', target_feature='y', input_shape=(13,),
                         input_dtype='float32')

  good = [{'x': np.zeros(13, np.float32), 'y': 1}] * 5
  for bad, match in (({'x': np.zeros(7, np.float32), 'y': 1}, r"example 5: feature 'x' has "
                      r'shape \(7,\)'),
                     ({'x': np.zeros(20, np.float32), 'y': 1}, r'example 5: .* \(20,\)'),
                     ({'x': np.zeros(13, np.float32), 'y': 5}, r"example 5: target 'y' holds "
                      r"5..5 .* takes integers in \[0, 3\)")):
    with pytest.raises(ValueError, match=match):
      pipeline.MultitaskPipeline([task(good + [bad])], 2)
  with pytest.raises(ValueError, match=r"input_shape=\(-4,\): must be a non-empty tuple"):
    dataclasses.replace(task(good), input_shape=(-4,))
  with pytest.raises(ValueError, match=r"input_dtype='floaty'"):
    dataclasses.replace(task(good), input_dtype='floaty')
  missing = dataclasses.replace(task(good), data=lambda split, data_dir: {'a': good}[split],
                                splits={'train': 'a', 'eval': 'nope'})
  with pytest.raises(ValueError, match=r"task 'vec13': its 'eval' split 'nope' cannot be opened"):
    pipeline.MultitaskPipeline([missing], 2, split='eval')


def test_pipeline_batch_embeds_to_one_token_array(data_dir):
  """The batch contract feeds the stems: every row of a mixed batch becomes [L_max, D]."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from pathways.nn import stems  # pylint: disable=g-import-not-at-top
  p = _pipe(data_dir)
  b = next(p)
  image = stems.ImageStem(8, image_shape=p.layout.shapes['image'], patch=4, rngs=nnx.Rngs(0))
  text = stems.BytesStem(8, max_len=p.layout.shapes['tokens'][0], rngs=nnx.Rngs(1))
  parts = {'image': image(jnp.asarray(b['image'])),
           'bytes': text(jnp.asarray(b['tokens']), jnp.asarray(b['tokens_mask']))}
  x, mask = stems.assemble(parts, p.layout.rows, p.layout.batch_size)
  assert x.shape == (p.layout.batch_size, 128, 8)
  image_rows = p.layout.rows['image']
  np.testing.assert_array_equal(np.asarray(mask)[image_rows].sum(-1), 4)  # 8x8 in 4x4 patches
  np.testing.assert_array_equal(np.asarray(mask)[p.layout.rows['bytes']], b['tokens_mask'])


def test_processes_build_their_blocks_of_the_global_batch(data_dir):
  """Two processes' local batches, stacked block by block, are the batch one process builds
  with the same number of shards: multi-host data loading changes nothing."""
  whole = _pipe(data_dir, num_shards=2)
  parts = [_pipe(data_dir, num_shards=2, process_index=i, process_count=2) for i in range(2)]
  assert whole.layout == parts[0].layout and whole.layout.shards == 2
  assert parts[0].local_layout.batch_size == whole.layout.batch_size // 2
  for _ in range(3):
    want, got = next(whole), [next(p) for p in parts]
    for key in want:
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
  # The two blocks hold different examples, and each block has every task.
  b = next(whole)
  half = len(b['tokens']) // 2
  rows = lambda a: {bytes(r) for r in a if r.any()}  # noqa: E731  (idle slots are all zero)
  assert not rows(b['tokens'][:half]) & rows(b['tokens'][half:])
  ids = b['task_id'].reshape(2, -1)
  np.testing.assert_array_equal(ids[0], ids[1])
  with pytest.raises(ValueError, match=r'batch_size=20: must split into num_shards=3 equal'):
    _pipe(data_dir, num_shards=3)
  with pytest.raises(ValueError, match=r'num_shards=3: must be a multiple of process_count=2'):
    _pipe(data_dir, num_shards=3, process_count=2)


def test_state_refuses_another_shard_count(data_dir):
  state = _pipe(data_dir, num_shards=2).get_state()
  with pytest.raises(ValueError, match=r'pipeline state is for num_shards=2; this pipeline has '
                                       r'num_shards=1 .* --config.data.shards=2'):
    _pipe(data_dir).set_state(state)
