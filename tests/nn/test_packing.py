"""Sequence packing: the plan, segment-local attention, and a packed model equal to the padded
one on a mixed batch of every modality (logits, per-example FLOPs, losses, gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import multitask
from pathways import registry
from pathways.data import layout as layout_lib
from pathways.nn import attention
from pathways.nn import grow as grow_lib
from pathways.nn import model as model_lib
from pathways.nn import packing
from pathways.train import scale
from tests.nn import synthetic

SLOTS = (3, 4, 5, 3)


def _tasks(lm_head='per_position'):
  return [synthetic.task('img', 'image', 'classify', (8, 8, 1), 10),
          synthetic.task('lm', 'bytes', lm_head, (16,), 256),
          synthetic.task('cls', 'bytes', 'classify', (6,), 4),
          synthetic.task('vec', 'vector', 'classify', (5,), 3)]


def _batch(seed=0, shards=1):
  rng = np.random.default_rng(seed)
  n = shards
  img, lm, cls, vec = (s * n for s in SLOTS)
  tokens = np.zeros((lm + cls, 16), np.int32)
  lengths = np.concatenate([rng.integers(2, 17, lm), rng.integers(1, 7, cls)])
  for r, length in enumerate(lengths):
    tokens[r, :length] = rng.integers(1, 256, length)
  layout = layout_lib.make_layout(_tasks(), SLOTS, shards)
  task_id = np.zeros(layout.batch_size, np.int32)
  label = -np.ones(layout.batch_size, np.int32)
  for i, classes in enumerate((10, 256, 4, 3)):
    rows = layout.task_rows(i)
    task_id[rows] = i
    if i != 1:
      label[rows] = rng.integers(0, classes, len(rows))
  targets = np.where(tokens != 0, np.roll(tokens, -1, axis=1), -1).astype(np.int32)
  targets[lm:] = -1
  return {'task_id': task_id, 'label': label,
          'weight': np.ones(layout.batch_size, np.float32),
          'image': rng.integers(0, 256, (img, 8, 8, 1), dtype=np.uint8),
          'tokens': tokens, 'tokens_mask': tokens != 0, 'targets': targets,
          'vector': rng.standard_normal((vec, 5)).astype(np.float32)}


def _models(shards=1, lm_head='per_position', **kwargs):
  tasks = _tasks(lm_head)
  layout = layout_lib.make_layout(tasks, SLOTS, shards)
  args = dict(d_model=16, num_layers=2, num_heads=2, mlp_hidden=32, patch=4,
              moe_kwargs=synthetic.moe_kwargs(banks=[(4, 16)], k=2, capacity_factor=None,
                                              noisy=False))
  args.update(kwargs)
  return [model_lib.Figure1Model(tasks, layout, pack=p, rngs=nnx.Rngs(0), **args)
          for p in (False, True)]


def test_plan_places_every_possible_slot_once_and_round_trips():
  rng = np.random.default_rng(0)
  lengths = rng.integers(0, 9, 12)
  possible = np.arange(8)[None] < lengths[:, None]
  plan = packing.make_plan(np.tile(possible, (2, 1)), shards=2, length=8)
  assert plan.rows == int(np.ceil(lengths.sum() / 8)) or plan.rows == int(
      np.ceil(lengths.sum() / 8)) + 1  # first-fit decreasing: at most one row over the bound
  computed = plan.target_T[plan.target_T >= 0]
  assert len(computed) == possible.sum() and len(set(computed.tolist())) == len(computed)
  assert np.array_equal(plan.target_T >= 0, possible.reshape(-1))
  x = jnp.asarray(rng.standard_normal((24, 8, 3)), jnp.float32)
  back = packing.unpack(plan, packing.pack(plan, x), jnp.full_like(x, -7.0))
  want = np.where(np.tile(possible, (2, 1))[..., None], np.asarray(x), -7.0)
  np.testing.assert_array_equal(np.asarray(back), want)
  seg = plan.segment_RxL
  for r in range(plan.rows):  # segments are contiguous and in canonical position order
    for s in set(seg[r][seg[r] >= 0].tolist()):
      cols = np.flatnonzero(seg[r] == s)
      assert np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols)))
      np.testing.assert_array_equal(plan.source_T.reshape(plan.rows, 8)[r, cols] % 8,
                                    np.flatnonzero(possible[s]))


def test_example_sums_and_take_rows_read_the_packed_rows_like_the_canonical_ones():
  """Pooling per segment and reading some rows' first positions in the packed layout equal
  the same on the canonical layout (two shard blocks; slots no example fills hold junk)."""
  rng = np.random.default_rng(1)
  lengths = np.array([3, 8, 5, 1, 6, 2])
  possible = np.tile(np.arange(8)[None] < lengths[:, None], (2, 1))
  plan = packing.make_plan(possible, shards=2, length=8)
  x = rng.standard_normal((12, 8, 3)).astype(np.float32)
  mask = possible & (rng.random((12, 8)) < 0.8)
  packed = packing.pack(plan, jnp.asarray(x * mask[..., None]))
  junk = jnp.where(packing.filled(plan)[..., None], packed, 100.0)
  sums = packing.example_sums(plan, jnp.where(packing.filled(plan)[..., None], junk, 0.0), 12)
  np.testing.assert_allclose(np.asarray(sums), (x * mask[..., None]).sum(1), rtol=1e-6,
                             atol=1e-6)
  rows = np.array([1, 4])
  own = 6  # the shorter row's length
  got = packing.take_rows(plan, packing.pack(plan, jnp.asarray(x)), rows, own)
  np.testing.assert_array_equal(np.asarray(got), x[np.concatenate([rows, rows + 6]), :own])
  with pytest.raises(ValueError, match='no packed slot computes'):
    packing.take_rows(plan, packed, rows, own + 1)


def test_row_length_is_chosen_to_compute_the_fewest_slots():
  """Four examples of 16, 128, 16 and 32 slots (one of each default task per data shard, as
  in the `large` shape): one row of 192, not two of 128; with groups of 512 tokens, the
  cheapest plan whose tokens divide into groups."""
  possible = np.arange(128)[None] < np.array([16, 128, 16, 32])[:, None]
  plan = packing.make_plan(possible)
  assert (plan.rows, plan.length) == (1, 192) and plan.filled_RxL.all()
  grouped = packing.make_plan(np.tile(possible, (8, 1)), shards=8, group_size=512)
  assert grouped.computed_slots == 8 * 192  # 3 groups of 512
  odd = packing.make_plan(np.tile(possible, (4, 1)), shards=4, group_size=512)
  assert odd.computed_slots == 1024  # 4 x 192 does not divide: two rows of 128 per block do
  equal = np.ones((6, 16), bool)  # every example already fills its row: nothing to pack
  assert (packing.make_plan(equal).rows, packing.make_plan(equal).length) == (6, 16)


def test_segments_never_attend_across_each_other_and_are_causal_within():
  segment = jnp.asarray([[0, 0, 0, 1, 1, 2, 2, -1]])
  mask = segment >= 0
  causal = jnp.asarray([[True, True, True, False, False, True, True, False]])
  allowed = np.asarray(attention.attention_mask(mask, causal, segment))[0]
  for q in range(7):
    for k in range(8):
      same = segment[0, q] == segment[0, k] and mask[0, k]
      want = bool(same and (k <= q if causal[0, q] else True))
      assert allowed[q, k] == want, (q, k)
  assert allowed[7].tolist() == [False] * 7 + [True]  # an empty slot sees itself only


def _same_logits_and_flops(padded, packed, batch):
  """Asserts both models give the same logits and per-example FLOPs; returns both outputs."""
  a, b = synthetic.forward(padded, batch), synthetic.forward(packed, batch)
  for name in a.logits:
    np.testing.assert_allclose(np.asarray(b.logits[name]), np.asarray(a.logits[name]),
                               rtol=2e-5, atol=2e-5, err_msg=name)
  np.testing.assert_allclose(np.asarray(b.flops_per_example), np.asarray(a.flops_per_example),
                             rtol=1e-6)
  return a, b


def test_packed_model_equals_padded_on_every_modality():
  padded, packed = _models()
  assert packed.computed_token_slots < padded.computed_token_slots
  batch = _batch()
  a, b = _same_logits_and_flops(padded, packed, batch)
  for layer in a.moe:
    for key, v in a.moe[layer].record.items():  # the routing record on real tokens
      m = np.asarray(a.token_mask)
      np.testing.assert_allclose(np.asarray(b.moe[layer].record[key])[m], np.asarray(v)[m],
                                 rtol=1e-6, atol=1e-6, err_msg=key)


@pytest.mark.parametrize('options', [
    {}, {'halting': True}, {'exit_weights': (0.5, 1.0), 'exit_confidence': 'classifier'},
    {'grown': (grow_lib.Grown('clone', 'cls', 1, 16, expert=2),  # per-token task ids
               grow_lib.Grown('ffn', 'lm', 0, 8))}])
def test_packed_training_losses_and_gradients_equal_padded(options):
  padded, packed = _models(**options)
  batch = _batch(seed=1)

  @nnx.jit
  def loss_and_grad(m):
    def loss_fn(m):
      out = m(batch, deterministic=False)
      losses, _ = model_lib.task_losses(m, out, batch)
      return sum(losses.values()) + out.aux_loss, losses
    return nnx.value_and_grad(loss_fn, has_aux=True)(m)

  (la, per_a), ga = loss_and_grad(padded)
  (lb, per_b), gb = loss_and_grad(packed)
  for name in per_a:
    np.testing.assert_allclose(float(per_b[name]), float(per_a[name]), rtol=2e-5, err_msg=name)
  np.testing.assert_allclose(float(lb), float(la), rtol=2e-5)
  for path, g in nnx.to_flat_state(nnx.state(ga, nnx.Param)):
    want = np.asarray(g[...] if hasattr(g, '__getitem__') else g)
    got = dict(nnx.to_flat_state(nnx.state(gb, nnx.Param)))[path]
    np.testing.assert_allclose(np.asarray(got[...]), want, rtol=1e-4, atol=1e-6,
                               err_msg=str(path))


def test_packed_mixture_of_depths_equals_padded():
  """Mixture-of-Depths (pooled tasks only: the 16-byte task classifies here): the chosen
  tokens attend among themselves within their own segment, packed or padded."""
  padded, packed = _models(lm_head='classify', mod_every=2, mod_capacity=0.5)
  assert packed.mod_layers == (1,) and packed.plan is not None
  batch = _batch(seed=2)
  rows = padded.layout.task_rows(1)
  batch['label'][rows] = np.arange(len(rows)) * 7 % 256
  batch['targets'][:] = -1
  _same_logits_and_flops(padded, packed, batch)


def test_packed_exits_take_the_same_decisions():
  padded, packed = _models(exit_weights=(0.5, 1.0))
  batch = _batch(seed=2)
  thresholds = np.array([0.2, 0.05, 0.3, 0.4], np.float32)
  run = nnx.jit(lambda m, b, t: m(b, exit_thresholds=t))
  a, b = run(padded, batch, thresholds), run(packed, batch, thresholds)
  m = np.asarray(a.token_mask)
  np.testing.assert_array_equal(np.asarray(b.exits.layer_BxL)[m], np.asarray(a.exits.layer_BxL)[m])
  np.testing.assert_allclose(np.asarray(b.flops_per_example), np.asarray(a.flops_per_example),
                             rtol=1e-6)


def test_an_example_cannot_change_its_packed_neighbours():
  _, packed = _models()
  plan = packed.plan
  batch = _batch(seed=3)
  row = int(packed.layout.task_rows(2)[0])  # a 'cls' example
  shared = {int(s) for r in range(plan.rows) if row in plan.segment_RxL[r]
            for s in plan.segment_RxL[r] if s >= 0} - {row}
  assert shared, 'the example shares no packed row: the test would prove nothing'
  changed = dict(batch, tokens=batch['tokens'].copy())
  j = list(packed.layout.rows['bytes']).index(row)
  changed['tokens'][j, :6] = (changed['tokens'][j, :6] % 200) + 7
  changed['tokens_mask'] = changed['tokens'] != 0
  a, b = synthetic.forward(packed, batch), synthetic.forward(packed, changed)
  for i, name in enumerate(packed.task_names):
    rows = list(packed.layout.task_rows(i))
    keep = [k for k, r in enumerate(rows) if r != row]
    np.testing.assert_array_equal(np.asarray(b.logits[name])[keep],
                                  np.asarray(a.logits[name])[keep], err_msg=name)
  k = list(packed.layout.task_rows(2)).index(row)
  assert not np.allclose(np.asarray(b.logits['cls'])[k], np.asarray(a.logits['cls'])[k])


def test_plan_is_static_one_compiled_forward_serves_every_draw():
  _, packed = _models(shards=2)
  assert packed.plan == packing.make_plan(
      packing.possible_mask(_tasks(), packed.layout, 4), 2)
  graphdef, state = nnx.split(packed)
  forward = jax.jit(lambda state, b: nnx.merge(graphdef, state)(b).flops_per_example)
  for seed in range(3):
    batch = _batch(seed, shards=2)
    batch['weight'][seed::3] = 0.0  # idle slots differ between draws
    forward(state, batch)
  assert forward._cache_size() == 1  # pylint: disable=protected-access


def test_rows_per_block_divide_into_moe_groups():
  _, packed = _models(moe_kwargs=synthetic.moe_kwargs(banks=[(4, 16)], k=2, group_size=48))
  assert packed.computed_token_slots % 48 == 0
  synthetic.forward(packed, _batch())


def test_a_layout_packing_cannot_shrink_runs_unpacked():
  """Every task the same length: the plan would compute as many slots as the padded batch,
  so the model keeps no plan and runs no gathers."""
  tasks = [synthetic.task('a', 'bytes', 'classify', (16,), 2),
           synthetic.task('b', 'bytes', 'per_position', (16,), 256)]
  layout = layout_lib.make_layout(tasks, (4, 4), 1)
  m = model_lib.Figure1Model(tasks, layout, d_model=16, num_layers=1, num_heads=2,
                             mlp_hidden=32, pack=True, rngs=nnx.Rngs(0))
  assert m.plan is None and m.computed_token_slots == 8 * 16


def test_a_stack_longer_than_the_bytes_rows_is_refused_for_per_position_tasks():
  """64 image patches beside 16-byte language modelling: the per-position targets cover 16
  positions of a 64-token stack; refused by name instead of failing on shapes in the loss."""
  tasks = [synthetic.task('img', 'image', 'classify', (16, 16, 1), 10),
           synthetic.task('text', 'bytes', 'per_position', (16,), 256)]
  layout = layout_lib.make_layout(tasks, (2, 2), 1)
  with pytest.raises(ValueError, match=r"per-position task 'text': its targets cover the 16 "
                                       r'byte positions, but the image rows make the stack 64'):
    model_lib.Figure1Model(tasks, layout, d_model=16, num_layers=1, num_heads=2,
                           mlp_hidden=32, patch=2, rngs=nnx.Rngs(0))


def test_routers_that_need_one_example_per_row_are_refused():
  with pytest.raises(ValueError, match=r"pack=True: MoE layer 1 uses route_on='example'"):
    _models(moe_kwargs=synthetic.moe_kwargs(banks=[(4, 16)], k=2, route_on='example'))
  pooled = [t for t in _tasks() if t.name != 'lm']  # Soft MoE serves no causal task anyway
  with pytest.raises(ValueError, match=r'pack=True: MoE layer 1 uses router SoftRouter'):
    model_lib.Figure1Model(
        pooled, layout_lib.make_layout(pooled, [2, 2, 2]), d_model=16, num_layers=2,
        num_heads=2, mlp_hidden=32, patch=4, pack=True, rngs=nnx.Rngs(0),
        moe_kwargs=synthetic.moe_kwargs(banks=[(4, 16)], router='soft', slots_per_expert=1,
                                        eval_capacity_factor=1.0))


def test_default_mixture_packs_its_possible_slots_into_full_rows():
  """The default config's layout (no data read): packed rows are >= 99% possible slots,
  against 38% of the padded [B, L_max] slots."""
  registry.discover()
  config = multitask.get_config()
  tasks = [registry.get_task(n) for n in config.tasks]
  layout = scale.abstract_layout(config, tasks, 1)
  possible = packing.possible_mask(tasks, layout, config.model.patch)
  plan = packing.make_plan(possible)
  assert possible.sum() / plan.computed_slots >= 0.99
  assert possible.sum() / possible.size < 0.4
