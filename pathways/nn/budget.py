"""Per-task compute budgets: a task's target FLOPs per example, met by a Lagrange multiplier.

A task may declare `flops_budget` (forward FLOPs per example, counted as
`flops_per_example` counts them). Training minimizes

  task losses + sum_n lambda_n * (E[FLOPs]_n / budget_n - 1)

where E[FLOPs]_n is the differentiable expected cost of task n's examples (halting reach
times layer FLOPs; router softmax times each expert's FLOPs, null experts free), so the
gradient steers both adaptive mechanisms: halting earlier and routing to null or narrow
experts. The multipliers are not trained by the optimizer; after each step they follow
dual ascent on the counted cost,

  lambda_n <- max(0, lambda_n + rate * (counted_n / budget_n - 1)),

so a task over budget is pushed harder each step and one under budget is released. Tasks
without a budget keep lambda = 0.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx


class BudgetMultiplier(nnx.Variable):
  """Lagrange multipliers [N]: model state updated by dual ascent, not by the optimizer."""


def budget_terms(names, budgets_N, lambda_N, expected_B, counted_B, task_rows, weight_B=None):
  """Budget loss and per-task metrics.

  Args:
    names: task names, in id order.
    budgets_N: per task, target FLOPs per example or None (static).
    lambda_N: the multipliers [N].
    expected_B, counted_B: differentiable and counted FLOPs per example [B].
    task_rows: task index -> its batch rows (static).
    weight_B: examples that count this step (others are left out of the means).

  Returns:
    (budget_loss scalar, {'budget/<task>/target|actual|lambda': value} for budgeted tasks,
    plus 'budget_violation' [N]: counted / budget - 1, 0 where no budget).
  """
  loss = jnp.zeros((), jnp.float32)
  metrics, violation = {}, []
  for i, name in enumerate(names):
    budget = budgets_N[i]
    if budget is None:
      violation.append(jnp.zeros((), jnp.float32))
      continue
    rows = np.asarray(task_rows(i))
    w = jnp.ones((len(rows),)) if weight_B is None else weight_B[rows]
    denom = jnp.maximum(jnp.sum(w), 1.0)
    expected = jnp.sum(expected_B[rows] * w) / denom
    counted = jnp.sum(counted_B[rows] * w) / denom
    loss = loss + lambda_N[i] * (expected / budget - 1.0)
    violation.append(counted / budget - 1.0)
    metrics[f'budget/{name}/target'] = jnp.asarray(budget, jnp.float32)
    metrics[f'budget/{name}/actual'] = counted
    metrics[f'budget/{name}/lambda'] = lambda_N[i]
  metrics['budget_violation'] = jnp.stack(violation)
  return loss, metrics


def update_multipliers(model, metrics, rate: float) -> None:
  """Dual ascent step on `model.budget_lambda` from a training step's metrics (in place).

  Call it after the optimizer update, inside or outside jit.
  """
  if rate < 0:
    raise ValueError(f'rate={rate!r}: must be >= 0.')
  lam = model.budget_lambda[...]
  model.budget_lambda[...] = jnp.maximum(0.0, lam + rate * metrics['budget_violation'])
