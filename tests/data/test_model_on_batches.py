"""The Figure 1 model on real pipeline batches: shapes, per-task masks, learning, bad ids."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pathways import registry
from pathways.data import pipeline
from pathways.nn import budget as budget_lib
from pathways.nn import model as model_lib
from tests.nn import synthetic

MOE = synthetic.moe_kwargs(banks=[(4, 32)], k=2, capacity_factor=2.0)


def _setup(data_dir, names, batch_size=12, tasks=None, seed=0):
  tasks = tasks or [registry.get_task(n) for n in names]
  p = pipeline.MultitaskPipeline(tasks, batch_size, data_dir=data_dir, mixture='uniform')
  m = model_lib.Figure1Model(tasks, p.layout, d_model=32, num_layers=2, num_heads=2,
                             mlp_hidden=64, moe_kwargs=MOE, rngs=nnx.Rngs(seed))
  return p, m


def _trainer(m, extra_loss=lambda out: 0.01 * out.moe[1].metrics['load_balance_loss'],
             lr=3e-3, budget_rate=0.0):
  """A jitted train step: sum of task losses plus `extra_loss(model output)`, Adam at `lr`,
  then a dual-ascent step of the compute-budget multipliers at `budget_rate`.

  Returns (graphdef, state, step); step(state, batch) -> (state, losses, output, grads).
  """
  opt = nnx.Optimizer(m, optax.adam(lr), wrt=nnx.Param)
  graphdef, state = nnx.split((m, opt))

  @jax.jit
  def step(state, batch):
    m, opt = nnx.merge(graphdef, state)

    def loss_fn(m):
      out = m(batch, deterministic=False)
      losses, _ = model_lib.task_losses(m, out, batch)
      return sum(losses.values()) + extra_loss(out), (losses, out)

    (_, (losses, out)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(m)
    opt.update(m, grads)
    budget_lib.update_multipliers(m, out.budget, budget_rate)
    return nnx.state((m, opt)), losses, out, grads

  return graphdef, state, step


def test_mixed_batch_of_two_modalities_in_one_call(data_dir):
  p, m = _setup(data_dir, ['digits', 'stdlib_package', 'addition'])
  res = synthetic.forward(m, next(p))
  out = res.logits
  n = p.layout.slots
  assert out['digits'].shape == (n[0], 10)
  assert out['stdlib_package'].shape == (n[1], 8)
  assert out['addition'].shape == (n[2], 128, 256)
  assert 'fraction_dropped' in res.moe[1].metrics


def test_three_tasks_of_two_modalities_all_learn(data_dir):
  p, m = _setup(data_dir, ['digits', 'stdlib_package', 'addition'])
  _, state, step = _trainer(m)
  history = []
  for _ in range(120):
    state, losses, _, _ = step(state, next(p))
    history.append({k: float(v) for k, v in losses.items()})
  for name in history[0]:
    first = np.mean([h[name] for h in history[:5]])
    last = np.mean([h[name] for h in history[-20:]])
    assert last < 0.8 * first, (name, first, last)


def test_task_masked_to_two_experts_never_routes_elsewhere(data_dir):
  digits = dataclasses.replace(registry.get_task('digits'), connectivity={1: (0, 1)})
  p, m = _setup(data_dir, [], tasks=[digits], batch_size=8)
  # The balance loss (weight 1.0) pushes towards experts 2, 3.
  _, state, step = _trainer(m, lambda out: out.moe[1].metrics['load_balance_loss'])
  for _ in range(20):
    state, _, out, _ = step(state, next(p))
    load = np.asarray(out.moe[1].metrics['router_load'])
    assert load[2:].sum() == 0.0 and load[:2].sum() > 0.99


def test_bad_task_ids_and_connectivity_refused(data_dir):
  p, m = _setup(data_dir, ['digits', 'parity'])
  batch = next(p)
  batch['task_id'] = batch['task_id'].copy()
  batch['task_id'][0] = 5
  with pytest.raises(ValueError, match=r"task_id values \[0, 1, 5\]: must be in \[0, 2\) for tasks "
                                       r"\['digits', 'parity'\]"):
    m(batch)
  digits = dataclasses.replace(registry.get_task('digits'), connectivity={0: (0,)})
  with pytest.raises(ValueError, match=r"task 'digits': connectivity names layer 0, which is not "
                                       r"an MoE layer; MoE layers: \[1\]"):
    _setup(data_dir, [], tasks=[digits])
  digits = dataclasses.replace(registry.get_task('digits'), connectivity={1: (0, 9)})
  with pytest.raises(ValueError, match=r"connectivity layer 1 names experts \[9\]; experts are "
                                       r"0..3"):
    _setup(data_dir, [], tasks=[digits])


def test_flops_accounting_equals_an_independent_count(data_dir):
  """Recount every example's FLOPs from the routing record and the masks with plain loops."""
  names = ['digits', 'addition']
  tasks = [registry.get_task(n) for n in names]
  p = pipeline.MultitaskPipeline(tasks, 6, data_dir=data_dir, mixture='uniform')
  m = model_lib.Figure1Model(tasks, p.layout, d_model=16, num_layers=2, num_heads=2,
                             mlp_hidden=24,
                             moe_kwargs=synthetic.moe_kwargs(banks=[(2, 8), (2, 40)], k=2,
                                                             capacity_factor=0.5,
                                                             num_null_experts=1),
                             rngs=nnx.Rngs(0))
  batch = next(p)
  res = synthetic.forward(m, batch)
  _, mask, task_ids = m.embed(batch)
  mask, task_ids = np.asarray(mask), np.asarray(task_ids)
  record = {k: np.asarray(v) for k, v in res.moe[1].record.items()}
  d = 16
  width = [8, 8, 40, 40]  # experts 0-1 narrow, 2-3 wide; 4 is the null expert
  for b in range(mask.shape[0]):
    n = int(mask[b].sum())
    causal = names[task_ids[b]] == 'addition'
    total = 0.0
    for layer in range(2):
      for i in range(n):
        visible = i + 1 if causal else n
        total += 8 * d * d + 4 * d * visible
        if layer == 0:
          total += 4 * d * 24  # dense FFN
        else:
          pos = np.nonzero(mask[b])[0][i]
          total += 2 * d * 5  # router over 4 experts + 1 null
          for k in range(2):
            if record['kept_BxLxK'][b, pos, k]:
              total += 4 * d * width[record['expert_BxLxK'][b, pos, k]]
    np.testing.assert_allclose(float(res.flops_per_example[b]), total, rtol=1e-6)
  assert record['kept_BxLxK'].sum() < (record['expert_BxLxK'] < 4).sum()  # some were dropped


def _halting_run(data_dir, ponder_weight, steps=60):
  tasks = [registry.get_task('digits')]
  p = pipeline.MultitaskPipeline(tasks, 16, data_dir=data_dir)
  m = model_lib.Figure1Model(tasks, p.layout, d_model=32, num_layers=4, num_heads=2,
                             mlp_hidden=64, moe_every=0, halting=True, rngs=nnx.Rngs(0))
  graphdef, state, step = _trainer(m, lambda out: ponder_weight * out.ponder_cost, lr=1e-2)
  eval_batch = next(p)
  before = nnx.merge(graphdef, state)[0](eval_batch, deterministic=True)
  depths = []
  for i in range(steps):
    state, _, res, grads = step(state, next(p))
    depths.append(float(res.ponder_cost))
    if i == 0:
      assert float(jnp.abs(grads['halt_w_LxD'][...]).sum()) > 0  # gradients reach halting
  model = nnx.merge(graphdef, state)[0]
  after = model(eval_batch, deterministic=True)
  return depths, before, after, after.logits


def test_ponder_cost_lowers_depth_and_flops_and_zero_cost_does_not(data_dir):
  depths0, before0, after0, _ = _halting_run(data_dir, 0.0)
  depths1, before1, after1, out = _halting_run(data_dir, 0.5)
  # Zero cost lets the depth drift where the task loss wants it (digits is easy, so it drifts
  # down too: 3.3 -> ~2.1 layers here); a ponder cost drives it much further down.
  assert depths1[-1] < 0.6 * depths1[0], depths1[::10]
  assert depths1[-1] < 0.7 * depths0[-1], (depths0[::10], depths1[::10])
  # Evaluation stops at the halting layer: fewer layers run, fewer FLOPs counted.
  assert float(np.mean(after1.halting.layer_B)) < float(np.mean(before1.halting.layer_B))
  assert float(np.mean(after1.flops_per_example)) < 0.8 * float(
      np.mean(before1.flops_per_example))
  # FLOPs at evaluation are whole layers: (halting layer + 1) x one layer's FLOPs.
  per_layer = np.asarray(before1.flops_per_example) / 4
  np.testing.assert_allclose(np.asarray(after1.flops_per_example),
                             per_layer * (np.asarray(after1.halting.layer_B) + 1), rtol=1e-6)
  assert out['digits'].shape == (16, 10)


def test_evaluation_does_not_depend_on_batch_composition(data_dir, moe_kwargs=None):
  """Dropless evaluation: an example's logits are the same whatever else is in its batch.

  The other task's rows come first, so under capacity they would take slots first (GShard
  priority) and change which of the digits tokens are dropped.
  """
  tasks = [registry.get_task('stdlib_package'), registry.get_task('digits')]
  p = pipeline.MultitaskPipeline(tasks, 12, data_dir=data_dir, mixture='uniform')
  m = model_lib.Figure1Model(tasks, p.layout, d_model=32, num_layers=2, num_heads=2,
                             mlp_hidden=64, moe_kwargs=moe_kwargs or MOE, rngs=nnx.Rngs(0))
  a = next(p)
  out_a = synthetic.forward(m, a).logits
  rows = np.asarray(p.layout.task_rows(0))  # stdlib_package rows from batch b, digits from a
  for b in (next(p) for _ in range(3)):  # three partners: whether capacity drops a digits
    mixed = {k: v.copy() for k, v in a.items()}  # token depends on the draw
    mixed['tokens'], mixed['tokens_mask'] = b['tokens'].copy(), b['tokens_mask'].copy()
    for k in ('label', 'weight', 'difficulty'):
      mixed[k][rows] = b[k][rows]
    out_mixed = synthetic.forward(m, mixed).logits
    assert not np.allclose(out_a['stdlib_package'], out_mixed['stdlib_package'])
    np.testing.assert_allclose(out_a['digits'], out_mixed['digits'], rtol=1e-5, atol=1e-6)


def test_composition_test_detects_capacity_dependence(data_dir):
  """The test above fails when evaluation uses a small capacity: it can see the problem."""
  with pytest.raises(AssertionError):
    test_evaluation_does_not_depend_on_batch_composition(
        data_dir, dict(MOE, eval_capacity_factor=0.25))


def test_compute_budget_is_met_by_halting_and_null_experts(data_dir):
  """A task whose budget is a third of its initial cost gets there through the Lagrange
  term; its multiplier rises from 0 while it is over budget."""
  def run(budget):
    digits = dataclasses.replace(registry.get_task('digits'), flops_budget=budget)
    p = pipeline.MultitaskPipeline([digits], 16, data_dir=data_dir)
    m = model_lib.Figure1Model([digits], p.layout, d_model=32, num_layers=4, num_heads=2,
                               mlp_hidden=64, halting=True,
                               moe_kwargs=synthetic.moe_kwargs(banks=[(4, 64)], k=2,
                                                               num_null_experts=2),
                               rngs=nnx.Rngs(0))
    _, state, step = _trainer(m, lambda out: out.budget_loss, lr=1e-2, budget_rate=0.05)
    flops, lambdas = [], []
    for _ in range(80):
      state, _, out, _ = step(state, next(p))
      flops.append(float(np.mean(out.flops_per_example)))
      lambdas.append(float(out.budget.get('budget/digits/lambda', 0.0)))
    return flops, lambdas, out.budget

  free, free_lambdas, free_metrics = run(None)
  assert 'budget/digits/target' not in free_metrics and max(free_lambdas) == 0.0
  budget = free[0] / 3
  capped, lambdas, metrics = run(budget)
  assert float(metrics['budget/digits/target']) == pytest.approx(budget)
  assert max(lambdas[:10]) > 0  # over budget at first: the multiplier rises
  late = np.mean(capped[-10:])
  assert late < 1.15 * budget, (budget, capped[::10], lambdas[::10])
  assert late < 0.75 * np.mean(free[-10:]), (free[::10], capped[::10])
