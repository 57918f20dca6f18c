"""Exits: deep supervision against a per-layer loop, confidence exits against a per-row,
per-token Python loop (decisions, copied states, FLOPs), bucketed inference taking them, and
PonderNet's KL prior and loss floor against their formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathways.data import layout as layout_lib
from pathways.nn import adaptive
from pathways.nn import inference
from pathways.nn import model as model_lib
from tests.nn import synthetic

MOE = synthetic.moe_kwargs(banks=[(4, 16)], k=2, capacity_factor=None)
NEVER = 2.0


def _model(**kwargs):
  return synthetic.image_and_text(moe_kwargs=MOE, **kwargs)


def _np_confidence(logits):
  z = np.exp(logits - logits.max())
  return float(z.max() / z.sum())


@nnx.jit
def _block(block, x, mask, causal, task_ids, bias, active):
  return block(x, mask, causal, task_ids, bias, True, active)


def _score(m, layer, state, w):
  """What an exit reads: the softmax maximum of the head, or the exit classifier's score."""
  if m.exit_confidence == 'classifier':
    z = state @ np.asarray(m.exit_w_LxD[...])[layer] + np.asarray(m.exit_b_L[...])[layer]
    return float(1.0 / (1.0 + np.exp(-z))), 2.0 * state.shape[-1]
  return _np_confidence(state @ w), 2.0 * state.shape[-1] * w.shape[1]


def _reference(m, batch, thresholds):
  """Confidence exits, written out: blocks run on every token; after each layer but the last
  a Python loop visits every row (pooled) or target position (per-position) still running,
  pays its head check, and freezes it when its softmax maximum reaches the threshold.
  Returns (final normed states, exit layer [B, L], FLOPs [B], confidences seen per task)."""
  x, mask, task_ids = m.embed(batch)
  x, mask, ids = np.asarray(x), np.asarray(mask), np.asarray(task_ids)
  causal = np.asarray(m.causal)[ids]
  b, l, d = x.shape
  n_layers = len(m.blocks)
  frozen = np.zeros((b, l), bool)
  exit_layer = np.full((b, l), n_layers - 1)
  flops = np.zeros(b)
  seen = {name: [] for name in m.task_names}
  targets = np.zeros((b, l), bool)
  text_rows = np.asarray(m.layout.task_rows(1))
  targets[text_rows, :16] = np.asarray(batch['targets']) >= 0
  visible = np.asarray(jnp.sum(model_lib.attention.attention_mask(jnp.asarray(mask),
                                                                  jnp.asarray(causal)), -1))
  for layer, block in enumerate(m.blocks):
    active = mask & ~frozen
    bias = m.router_bias(layer, task_ids, l)
    y, stats = _block(block, jnp.asarray(x), jnp.asarray(mask), jnp.asarray(causal), task_ids,
                      bias, jnp.asarray(active))
    ffn = (np.asarray(stats.flops_BxL) if stats is not None
           else block.ffn.flops_per_token() * active)
    for r in range(b):
      for t in range(l):
        if active[r, t]:
          flops[r] += 8.0 * d * d + 4.0 * d * visible[r, t] + ffn[r, t]
        elif frozen[r, t] and causal[r]:
          flops[r] += 4.0 * d * d  # keys and values of the copied state
    x = np.where(frozen[..., None], x, np.asarray(y))
    h = np.asarray(m.final_norm(jnp.asarray(x)))
    if layer == n_layers - 1:
      break
    for r in range(b):
      name = m.task_names[ids[r]]
      w = np.asarray(m.heads[name][...])
      if thresholds[ids[r]] > 1.0:
        continue
      if m.pooled[ids[r]]:
        if frozen[r].any():
          continue
        conf, cost = _score(m, layer, h[r][mask[r]].mean(0), w)
        flops[r] += cost
        seen[name].append(conf)
        if conf >= thresholds[ids[r]]:
          frozen[r] = mask[r]
          exit_layer[r][mask[r]] = layer
      else:
        for t in range(l):
          if mask[r, t] and targets[r, t] and not frozen[r, t]:
            conf, cost = _score(m, layer, h[r, t], w)
            flops[r] += cost
            seen[name].append(conf)
            if conf >= thresholds[ids[r]]:
              frozen[r, t] = True
              exit_layer[r, t] = layer
  return h, np.where(mask, exit_layer, 0), flops, seen


@nnx.jit
def _forward(m, batch, thresholds):
  return m(batch, deterministic=True, exit_thresholds=thresholds)


def _between(values, q):
  """A threshold at quantile `q` of `values` that no value equals (the two paths may round a
  score differently in the last bit: a tie would decide by rounding)."""
  v = np.unique(values)
  i = min(max(int(q * len(v)), 1), len(v) - 1)
  return float((v[i - 1] + v[i]) / 2)


def _with_classifier():
  """A model whose exit classifier has random weights (zeros would score every state 1/2)."""
  m, batch = _model(exit_weights=adaptive.exit_weights('equal', 4), exit_confidence='classifier')
  rng = np.random.default_rng(1)
  m.exit_w_LxD[...] = jnp.asarray(rng.normal(0, 0.3, m.exit_w_LxD[...].shape), jnp.float32)
  return m, batch


@pytest.mark.parametrize('confidence', ['softmax', 'classifier'])
def test_confidence_exits_equal_the_per_token_loop(confidence):
  m, batch = _model() if confidence == 'softmax' else _with_classifier()
  # thresholds in the middle of what the model's exits see: some stop, some go on
  _, _, _, seen = _reference(m, batch, np.array([1.0, 1.0]))
  q = (0.4, 0.6) if confidence == 'softmax' else (0.8, 0.8)
  thresholds = np.array([_between(seen['images'], q[0]), _between(seen['text'], q[1])],
                        np.float32)
  h, exit_layer, flops, _ = _reference(m, batch, thresholds)
  out = _forward(m, batch, jnp.asarray(thresholds))
  mask = np.asarray(m.embed(batch)[1])
  for rows in (m.layout.task_rows(0), m.layout.task_rows(1)):  # a mix of exits in each task
    early = exit_layer[np.asarray(rows)][mask[np.asarray(rows)]] < 3
    assert 0 < early.mean() < 1
  np.testing.assert_array_equal(np.asarray(out.exits.layer_BxL), exit_layer)
  np.testing.assert_allclose(np.asarray(out.flops_per_example), flops, rtol=1e-5)
  rows = np.asarray(m.layout.task_rows(1))
  ref_text = h[rows] @ np.asarray(m.heads['text'][...])
  np.testing.assert_allclose(np.asarray(out.logits['text']), ref_text, atol=2e-4)
  img = np.asarray(m.layout.task_rows(0))
  pooled = np.stack([h[r][mask[r]].mean(0) for r in img])
  np.testing.assert_allclose(np.asarray(out.logits['images']),
                             pooled @ np.asarray(m.heads['images'][...]), atol=2e-4)
  depth = (np.where(mask, exit_layer + 1, 0).sum(-1) / np.maximum(mask.sum(-1), 1))
  np.testing.assert_allclose(np.asarray(out.exits.depth_B), depth, rtol=1e-6)


def test_thresholds_that_never_exit_give_the_full_path_and_check_nothing():
  m, batch = _model()
  full = synthetic.forward(m, batch)
  never = _forward(m, batch, jnp.full((2,), NEVER))
  for name in full.logits:
    np.testing.assert_allclose(np.asarray(never.logits[name]), np.asarray(full.logits[name]),
                               atol=1e-5)
  np.testing.assert_allclose(np.asarray(never.flops_per_example),
                             np.asarray(full.flops_per_example), rtol=1e-6)
  assert (np.asarray(never.exits.layer_BxL)[np.asarray(full.token_mask)] == 3).all()


def test_a_token_exit_never_reads_later_tokens():
  """Per-token exits keep causality: changing the last tokens of a text row changes neither
  the earlier positions' predictions nor where they exited."""
  m, batch = _model()
  thr = jnp.asarray([NEVER, 0.004])
  a = _forward(m, batch, thr)
  other = dict(batch)
  tokens = np.array(batch['tokens'])
  tokens[:, 10:] = np.where(tokens[:, 10:] > 0, 7, 0)
  other['tokens'] = tokens
  b = _forward(m, other, thr)
  rows = np.asarray(m.layout.task_rows(1))
  np.testing.assert_allclose(np.asarray(a.logits['text'])[:, :10],
                             np.asarray(b.logits['text'])[:, :10], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(a.exits.layer_BxL)[rows, :10],
                                np.asarray(b.exits.layer_BxL)[rows, :10])


def test_deep_supervision_loss_and_gradients_equal_the_per_layer_loop():
  weights = adaptive.exit_weights('linear', 4)
  m, batch = _model(exit_weights=weights)
  _check_deep_supervision(m, batch, weights)
  # evaluation scores the prediction (the last layer), not the weighted mix
  out = synthetic.forward(m, batch)
  assert out.exits.logits == {} and out.exits.weights is None


def test_deep_supervision_of_a_task_shorter_than_the_batch():
  """A 16-byte language model beside a 32-byte classifier: its per-layer logits cover its own
  16 positions only, and the loss still equals the per-layer loop over all 32."""
  tasks = [synthetic.task('text', 'bytes', 'per_position', (16,), 256),
           synthetic.task('doc', 'bytes', 'classify', (32,), 3)]
  layout = layout_lib.make_layout(tasks, (3, 2))
  weights = adaptive.exit_weights('equal', 3)
  m = model_lib.Figure1Model(tasks, layout, d_model=16, num_layers=3, num_heads=2,
                             mlp_hidden=32, moe_kwargs=MOE, exit_weights=weights,
                             exit_confidence='classifier', rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 256, (5, 32)).astype(np.int32)
  lengths = np.array([16, 9, 12, 30, 20])
  mask = np.arange(32)[None] < lengths[:, None]
  targets = np.where(mask, np.roll(tokens * mask, -1, axis=1), -1).astype(np.int32)
  targets[3:] = -1
  batch = {'task_id': np.array([0, 0, 0, 1, 1], np.int32), 'tokens': tokens * mask,
           'tokens_mask': mask, 'targets': targets,
           'label': np.array([-1, -1, -1, 0, 2], np.int32), 'weight': np.ones(5, np.float32)}
  out = m(batch, deterministic=False)
  assert out.exits.logits['text'].shape == (3, 3, 16, 256)
  assert float(out.exits.classifier_loss) > 0
  _check_deep_supervision(m, batch, weights)


def _check_deep_supervision(m, batch, weights):
  """The model's deep-supervision loss and gradients against a per-layer loop."""
  names = m.task_names

  def loss(m):
    out = m(batch, deterministic=False)
    losses, _ = model_lib.task_losses(m, out, batch)
    return sum(losses[n] for n in names)

  def reference(m):
    """Every layer's state through the final norm and the heads, one forward per layer."""
    x, mask, task_ids = m.embed(batch)
    causal = jnp.asarray(m.causal)[task_ids]
    total = 0.0
    for layer, block in enumerate(m.blocks):
      x, _ = block(x, mask, causal, task_ids, m.router_bias(layer, task_ids, x.shape[1]), False)
      h = m.final_norm(x)
      logits = m.apply_heads(model_lib._masked_mean(h, mask), h)  # pylint: disable=protected-access
      out = model_lib.ModelOutput(logits=logits, tokens_per_example=None, token_mask=mask,
                                  flops_per_example=None, aux_loss=0.0, budget_loss=0.0,
                                  budget={}, moe={})
      losses, _ = model_lib.task_losses(m, out, batch)
      total = total + weights[layer] * sum(losses[n] for n in names)
    return total

  value, grads = nnx.jit(nnx.value_and_grad(loss))(m)
  ref_value, ref_grads = nnx.jit(nnx.value_and_grad(reference))(m)
  np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-3, atol=2e-6)


def test_exit_weights_are_parsed_or_refused_naming_the_value():
  assert adaptive.exit_weights('', 4) is None
  assert adaptive.exit_weights('equal', 4) == (0.25,) * 4
  np.testing.assert_allclose(adaptive.exit_weights('linear', 4), [0.1, 0.2, 0.3, 0.4])
  np.testing.assert_allclose(adaptive.exit_weights([0, 0, 1, 1], 4), [0, 0, 0.5, 0.5])
  for bad in ('deep', [1, 1], [1, -1, 1, 1], [0, 0, 0, 0]):
    with pytest.raises(ValueError, match='model.exit_weights'):
      adaptive.exit_weights(bad, 4)
  m, batch = _model(halting=True)
  with pytest.raises(ValueError, match='alternatives'):
    m(batch, exit_thresholds=jnp.ones((2,)))
  with pytest.raises(ValueError, match='inference'):
    _model()[0](batch, deterministic=False, exit_thresholds=jnp.ones((2,)))


@pytest.mark.parametrize('confidence', ['softmax', 'classifier'])
def test_bucketed_inference_takes_the_exits_of_the_full_path(confidence):
  """Pooled rows leave the buckets at their exit layer: the same predictions, exit layers
  and FLOPs as the full path's confidence exits (per-position rows run every layer there and
  never exit in this comparison)."""
  if confidence == 'softmax':
    m, batch = _model(slots=(12, 4))
  else:
    m, batch = _with_classifier()
  _, _, _, seen = _reference(m, batch, np.array([1.0, NEVER]))
  thr = np.array([_between(seen['images'], 0.5), NEVER], np.float32)
  full = _forward(m, batch, jnp.asarray(thr))
  runner = inference.BucketedInference(m, exit_thresholds=thr)
  logits, info = runner(batch)
  for name in logits:
    np.testing.assert_allclose(np.asarray(logits[name]), np.asarray(full.logits[name]),
                               atol=2e-5)
  np.testing.assert_allclose(info['flops_per_example'], np.asarray(full.flops_per_example),
                             rtol=1e-5)
  img = np.asarray(m.layout.task_rows(0))
  np.testing.assert_array_equal(info['halting_layer'][img],
                                np.asarray(full.exits.layer_BxL)[img, 0])
  assert len({nb for _, nb, _ in info['steps']}) > 1  # rows left the buckets
  assert inference.BucketedInference(m, exit_thresholds=[0.5, 0.5]).full_depth_tasks == ['text']


def test_ponder_kl_and_floor_follow_their_formulas():
  p = np.array([[0.5, 0.1], [0.3, 0.2], [0.2, 0.7]], np.float32)  # [L=3, B=2]
  prior = 0.3 * 0.7 ** np.arange(3)
  prior /= prior.sum()
  kl = (p * np.log(p / prior[:, None])).sum(0)
  np.testing.assert_allclose(float(adaptive.ponder_kl(jnp.asarray(p), 0.3, jnp.ones(2))),
                             kl.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(adaptive.ponder_kl(jnp.asarray(p), 0.3,
                                                      jnp.asarray([0.0, 1.0]))), kl[1], rtol=1e-5)
  m, batch = _model(halting=True)
  out = synthetic.forward(m, batch, deterministic=False)
  floor = 0.2
  losses, _ = model_lib.task_losses(m, out, batch, halting_floor=floor)
  rows = np.asarray(m.layout.task_rows(0))
  labels = np.asarray(batch['label'])[rows]
  logp = np.asarray(jax.nn.log_softmax(out.halting.logits['images'], -1))  # [L, n, C]
  ce = -np.take_along_axis(logp, labels[None, :, None], -1)[..., 0]
  w = np.maximum(np.asarray(out.halting.p_LxB)[:, rows], floor)
  np.testing.assert_allclose(float(losses['images']), (w * ce).sum(0).mean(), rtol=1e-5)


def test_the_exit_classifier_learns_from_stopped_states_only():
  """Its loss is the mean binary cross-entropy against 'this layer predicts what the last
  does', and its gradient reaches the classifier alone."""
  m, batch = _with_classifier()

  def loss(m):
    return m(batch, deterministic=False).exits.classifier_loss

  value, grads = nnx.jit(nnx.value_and_grad(loss))(m)
  assert float(value) > 0
  moved = {'/'.join(map(str, path)) for path, g in nnx.to_flat_state(grads)
           if np.any(np.asarray(g[...]) != 0)}
  assert moved == {'exit_w_LxD', 'exit_b_L'}, moved
  with pytest.raises(ValueError, match='exit_weights too'):
    _model(exit_confidence='classifier')
