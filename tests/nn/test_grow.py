"""Grown components (expert clones, task FFNs): they start as the function they extend, and
whatever they learn, the other tasks' outputs do not move."""
import jax
import numpy as np
import pytest
from flax import nnx

from pathways.nn import grow
from pathways.nn import model as model_lib
from tests.nn import synthetic

MOE = synthetic.moe_kwargs(banks=[(2, 16), (2, 48)], k=2, num_null_experts=1,
                           capacity_factor=None)


@nnx.jit
def _forward(m, batch):
  """(logits per task, the whole ModelOutput)."""
  out = m(batch)
  return out.logits, out


def _grown(*entries):
  return grow.parse(entries, ['images', 'text'], 4, [1, 3])


def _with_parent_weights(grown_entries):
  """(parent, child, batch): the child holds the parent's weights plus new grown ones,
  clones initialized from their sources, as `init_from` does it."""
  parent, batch = synthetic.image_and_text(moe_kwargs=MOE, halting=True)
  child, _ = synthetic.image_and_text(moe_kwargs=MOE, halting=True, grown=_grown(*grown_entries),
                                      seed=1)
  state = nnx.state(child)
  pure = nnx.to_pure_dict(state)
  old = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(
      nnx.to_pure_dict(nnx.state(parent)))}
  new = []

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    if key in old:
      return old[key]
    new.append('/'.join(str(getattr(k, 'key', k)) for k in path))
    return leaf

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(pick, pure))
  nnx.update(child, state)
  assert new, 'the grown components have new parameters'
  inited = grow.init_clones(child, new)
  return parent, child, batch, inited


def _subtree(pure, prefix):
  node = pure
  for part in prefix.strip('/').split('/'):
    node = node[int(part) if part.isdigit() else part]
  return node


@pytest.mark.parametrize('factor', [1, 3])
def test_clone_and_task_ffn_start_as_the_parent_function(factor):
  entries = [dict(kind='clone', task='text', layer=1, expert=1, hidden=16 * factor),
             dict(kind='clone', task='images', layer=3, expert=3, hidden=48 * factor),
             dict(kind='ffn', task='images', layer=0, hidden=24)]
  parent, child, batch, inited = _with_parent_weights(entries)
  assert inited == ['blocks/1/ffn/grown/0/', 'blocks/3/ffn/grown/0/']
  out_p, met_p = _forward(parent, batch)
  out_c, met_c = _forward(child, batch)
  for name in out_p:
    np.testing.assert_allclose(np.asarray(out_c[name]), np.asarray(out_p[name]), atol=2e-5)
  # The clone really takes the task's assignments to its source (ids after the routed ones).
  rec = np.asarray(met_c.moe[1].record['expert_BxLxK'])
  text_rows = batch['task_id'] == 1
  rec_p = np.asarray(met_p.moe[1].record['expert_BxLxK'])
  assert (rec[text_rows] == 4).sum() == (rec_p[text_rows] == 1).sum() > 0
  assert not (rec[text_rows] == 1).any()
  np.testing.assert_array_equal(rec[~text_rows], np.where(rec_p[~text_rows] >= 4,
                                                          rec_p[~text_rows] + 1,
                                                          rec_p[~text_rows]))
  # A wider clone costs more FLOPs for its task only.
  flops_p, flops_c = np.asarray(met_p.flops_per_example), np.asarray(met_c.flops_per_example)
  assert (flops_c >= flops_p).all()
  assert (flops_c[text_rows].sum() > flops_p[text_rows].sum()) == (factor > 1)


def test_narrow_clone_keeps_the_strongest_units():
  w_in = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  w_out = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
  w_out[2] *= 100.0
  a, b = grow.clone_weights(w_in, w_out, None, 2)
  assert a.shape == (4, 2) and b.shape == (2, 4)
  assert any(np.array_equal(b[i], w_out[2]) for i in range(2))
  wide_in, wide_out = grow.clone_weights(w_in, w_out, np.ones((4, 9), np.float32), 9)
  np.testing.assert_array_equal(wide_in[:, :6], w_in)
  np.testing.assert_array_equal(wide_in[:, 6:], 1.0)
  np.testing.assert_array_equal(wide_out[6:], 0.0)


def test_other_tasks_do_not_move_when_grown_components_change():
  entries = [dict(kind='clone', task='text', layer=1, expert=0, hidden=32),
             dict(kind='clone', task='text', layer=1, expert=4, hidden=16),  # a clone's clone
             dict(kind='ffn', task='text', layer=2, hidden=8)]
  _, child, batch, _ = _with_parent_weights(entries)
  out0, met0 = _forward(child, batch)
  rng = np.random.default_rng(0)
  state = nnx.state(child)
  pure = nnx.to_pure_dict(state)
  for prefix in grow.param_prefixes(child.grown):
    node = _subtree(pure, prefix)
    for k in list(node):
      if hasattr(node[k], 'shape'):
        node[k] = node[k] + rng.normal(size=node[k].shape).astype(np.float32)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(child, state)
  out1, met1 = _forward(child, batch)
  np.testing.assert_array_equal(np.asarray(out1['images']), np.asarray(out0['images']))
  assert not np.allclose(np.asarray(out1['text']), np.asarray(out0['text']))
  images = batch['task_id'] == 0
  np.testing.assert_array_equal(np.asarray(met1.flops_per_example)[images],
                                np.asarray(met0.flops_per_example)[images])
  # The chained clone (source 4 = the first clone) took the first clone's assignments.
  rec = np.asarray(met1.moe[1].record['expert_BxLxK'])[~images]
  assert (rec == 5).any() and not (rec == 4).any() and not (rec == 0).any()
  # Gradients of the image loss never reach grown parameters.
  def image_loss(m):
    out = m(batch, deterministic=False)
    return model_lib.task_losses(m, out, batch)[0]['images']
  grads = nnx.to_pure_dict(nnx.jit(nnx.grad(image_loss))(child))
  for prefix in grow.param_prefixes(child.grown):
    for leaf in jax.tree.leaves(_subtree(grads, prefix)):
      assert not np.asarray(leaf).any(), prefix


@pytest.mark.parametrize('entry, match', [
    (dict(kind='widen', task='text', layer=1, hidden=8), 'kind'),
    (dict(kind='clone', task='nope', layer=1, expert=0, hidden=8), 'task'),
    (dict(kind='clone', task='text', layer=2, expert=0, hidden=8), 'layer'),
    (dict(kind='clone', task='text', layer=1, hidden=8), 'exactly the keys'),
    (dict(kind='ffn', task='text', layer=0, hidden=0), 'hidden'),
])
def test_bad_grown_entries_are_refused(entry, match):
  with pytest.raises(ValueError, match=match):
    _grown(entry)


def test_clone_of_a_missing_expert_is_refused():
  with pytest.raises(ValueError, match='source expert 9'):
    synthetic.image_and_text(moe_kwargs=MOE, grown=_grown(
        dict(kind='clone', task='text', layer=1, expert=9, hidden=8)))
