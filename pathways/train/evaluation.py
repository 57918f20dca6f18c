"""Evaluation: per-task metrics over a fixed set of evaluation batches (dropless, so an
example's prediction does not depend on the rest of its batch)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathways import losses as losses_lib
from pathways.nn import model as model_lib


def make_eval_step(model_graphdef):
  """eval_step(model_state, batch, exit_thresholds=None) -> per-task sums (the model alone: a
  train state's `state['model']`); `exit_thresholds` [N]: with confidence exits (a traced
  argument: changing the thresholds does not recompile)."""
  @jax.jit
  def eval_step(model_state, batch, exit_thresholds=None):
    model = nnx.merge(model_graphdef, model_state)
    out = model(batch, deterministic=True, exit_thresholds=exit_thresholds)
    losses, accuracy = model_lib.task_losses(model, out, batch)
    weight = jnp.asarray(batch['weight'])
    per_task = {}
    for i, name in enumerate(model.task_names):
      rows = np.asarray(model.layout.task_rows(i))
      w = weight[rows]
      per_task[name] = {'loss': losses[name], 'accuracy': accuracy[name],
                        'count': jnp.sum(w),
                        'flops': jnp.sum(out.flops_per_example[rows] * w)}
      if out.halting is not None and model.pooled[i]:
        per_task[name]['depth'] = jnp.sum((out.halting.layer_B[rows] + 1.0) * w)
      if out.exits is not None:
        per_task[name]['depth'] = jnp.sum(out.exits.depth_B[rows] * w)
    return per_task
  return eval_step


def per_batch(eval_step, model_state, batches, exit_thresholds=None) -> list[dict]:
  """One {task: {'loss', 'accuracy', 'count', 'flops', 'depth'}} (host floats; loss and
  accuracy are the batch's means, flops and depth its sums) per batch: what `aggregate`
  averages, and what a paired comparison of two settings on the same batches reads."""
  thresholds = None if exit_thresholds is None else jnp.asarray(exit_thresholds, jnp.float32)
  out = []
  for batch in batches:
    got = jax.device_get(eval_step(model_state, batch) if thresholds is None
                         else eval_step(model_state, batch, thresholds))
    out.append({name: {'loss': float(m['loss']), 'accuracy': float(m['accuracy']),
                       'count': float(m['count']), 'flops': float(m['flops']),
                       'depth': float(m.get('depth', 0.0))} for name, m in got.items()})
  return out


def aggregate(batch_results: list[dict], tasks=()) -> dict:
  """{'eval/<task>/accuracy|loss|flops_per_example|depth': value, 'eval/mean_accuracy'},
  plus each metric a task declares (`Task.metrics`, e.g. perplexity) from its loss and
  accuracy, from `per_batch`'s results. Loss and accuracy are averaged over batches weighted
  by each batch's example count."""
  sums = {}
  for out in batch_results:
    for name, m in out.items():
      s = sums.setdefault(name, {'loss': 0.0, 'accuracy': 0.0, 'count': 0.0, 'flops': 0.0,
                                 'depth': 0.0})
      c = m['count']
      s['loss'] += m['loss'] * c
      s['accuracy'] += m['accuracy'] * c
      s['count'] += c
      s['flops'] += m['flops']
      s['depth'] += m['depth']
  declared = {t.name: t.metrics for t in tasks}
  result = {}
  for name, s in sums.items():
    c = max(s['count'], 1.0)
    loss, accuracy = s['loss'] / c, s['accuracy'] / c
    result[f'eval/{name}/loss'] = loss
    result[f'eval/{name}/accuracy'] = accuracy
    for metric in declared.get(name, ()):
      if metric not in ('loss', 'accuracy'):
        result[f'eval/{name}/{metric}'] = losses_lib.METRICS.lookup(metric)(loss, accuracy)
    result[f'eval/{name}/flops_per_example'] = s['flops'] / c
    if s['depth']:
      result[f'eval/{name}/depth'] = s['depth'] / c
  result['eval/mean_accuracy'] = float(np.mean([result[f'eval/{n}/accuracy'] for n in sums]))
  return result


def evaluate(eval_step, model_state, batches, tasks=(), exit_thresholds=None) -> dict:
  """`aggregate(per_batch(...))`: per-task metrics over `batches`. `exit_thresholds` ([N] or
  None): evaluate with confidence exits (depth: layers run, mean over each example's
  tokens)."""
  return aggregate(per_batch(eval_step, model_state, batches, exit_thresholds), tasks)
