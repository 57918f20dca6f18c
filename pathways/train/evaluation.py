"""Evaluation: per-task metrics over a fixed set of evaluation batches (dropless, so an
example's prediction does not depend on the rest of its batch)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathways.nn import model as model_lib


def make_eval_step(graphdef):
  """eval_step(state, batch) -> per-task sums; state of a model or of (model, optimizer)."""
  @jax.jit
  def eval_step(state, batch):
    model = nnx.merge(graphdef, state)
    if isinstance(model, tuple):  # the train state (model, optimizer)
      model = model[0]
    out, metrics = model(batch, deterministic=True)
    losses, accuracy = model_lib.task_losses(model, out, batch)
    weight = jnp.asarray(batch['weight'])
    per_task = {}
    for i, name in enumerate(model.task_names):
      rows = np.asarray(model.layout.task_rows(i))
      w = weight[rows]
      per_task[name] = {'loss': losses[name], 'accuracy': accuracy[name],
                        'count': jnp.sum(w),
                        'flops': jnp.sum(metrics['flops_per_example'][rows] * w)}
      if 'halting_layer' in metrics and model.heads_kind[i] == 'classify':
        per_task[name]['depth'] = jnp.sum((metrics['halting_layer'][rows] + 1.0) * w)
    return per_task
  return eval_step


def evaluate(eval_step, state, batches) -> dict:
  """{'eval/<task>/accuracy|loss|flops_per_example|depth': value, 'eval/mean_accuracy'}.
  Loss and accuracy are averaged over batches weighted by each batch's example count."""
  sums = {}
  for batch in batches:
    out = jax.device_get(eval_step(state, batch))
    for name, m in out.items():
      s = sums.setdefault(name, {'loss': 0.0, 'accuracy': 0.0, 'count': 0.0, 'flops': 0.0,
                                 'depth': 0.0})
      c = float(m['count'])
      s['loss'] += float(m['loss']) * c
      s['accuracy'] += float(m['accuracy']) * c
      s['count'] += c
      s['flops'] += float(m['flops'])
      s['depth'] += float(m.get('depth', 0.0))
  result = {}
  for name, s in sums.items():
    c = max(s['count'], 1.0)
    result[f'eval/{name}/loss'] = s['loss'] / c
    result[f'eval/{name}/accuracy'] = s['accuracy'] / c
    result[f'eval/{name}/flops_per_example'] = s['flops'] / c
    if s['depth']:
      result[f'eval/{name}/depth'] = s['depth'] / c
  result['eval/mean_accuracy'] = float(np.mean([result[f'eval/{n}/accuracy'] for n in sums]))
  return result
