"""Routing statistics as pure functions of a routing record (numpy in, numpy or floats out).

A record (`pathways.nn.model.routing_record`, concatenated over batches) holds, per MoE
layer, `expert_BxLxK` (global expert id; ids >= E are null experts), `weight_BxLxK` and
`kept_BxLxK` (the assignment was computed), plus `task_id` [B], `flops_per_example` [B]
and, with halting, `halting_layer` [B]. Token-level functions take flattened [T, K] arrays
and the task id of each token.
"""
from __future__ import annotations

import numpy as np


def expert_counts(expert_TxK, kept_TxK, num_experts: int) -> np.ndarray:
  """Computed assignments per real expert [E]."""
  e = np.asarray(expert_TxK)[np.asarray(kept_TxK, bool)]
  e = e[e < num_experts]
  return np.bincount(e, minlength=num_experts).astype(np.float64)


def load_fractions(counts_E) -> np.ndarray:
  counts_E = np.asarray(counts_E, np.float64)
  return counts_E / max(counts_E.sum(), 1.0)


def coefficient_of_variation(counts_E) -> float:
  """std / mean of per-expert counts (0 = perfectly balanced)."""
  counts_E = np.asarray(counts_E, np.float64)
  mean = counts_E.mean()
  return float(counts_E.std() / mean) if mean > 0 else 0.0


def task_expert_counts(task_T, expert_TxK, kept_TxK, num_tasks: int, num_experts: int,
                       weight_TxK=None):
  """[N, E] computed assignments of each task's tokens to each real expert (with
  `weight_TxK`: the sum of their weights instead of their count)."""
  task_T = np.asarray(task_T)
  out = np.zeros((num_tasks, num_experts))
  kept = np.asarray(kept_TxK, bool)
  expert = np.asarray(expert_TxK)
  for k in range(expert.shape[1]):
    sel = kept[:, k] & (expert[:, k] < num_experts)
    w = 1.0 if weight_TxK is None else np.asarray(weight_TxK)[sel, k]
    np.add.at(out, (task_T[sel], expert[sel, k]), w)
  return out


def _entropy(p) -> float:
  p = np.asarray(p, np.float64)
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def mutual_information(counts_NxE) -> float:
  """I(task; expert) in nats from a joint count table."""
  joint = np.asarray(counts_NxE, np.float64)
  total = joint.sum()
  if total == 0:
    return 0.0
  p = joint / total
  return _entropy(p.sum(1)) + _entropy(p.sum(0)) - _entropy(p.reshape(-1))


def normalized_mutual_information(counts_NxE) -> float:
  """2 I(T; E) / (H(T) + H(E)) in [0, 1]: 1 when each task uses its own experts and the
  experts tell the task apart, 0 when routing is independent of the task."""
  joint = np.asarray(counts_NxE, np.float64)
  total = joint.sum()
  if total == 0:
    return 0.0
  p = joint / total
  denom = _entropy(p.sum(1)) + _entropy(p.sum(0))
  return float(2.0 * mutual_information(joint) / denom) if denom > 0 else 0.0


def shuffled_nmi(example_task_B, expert_BxLxK, kept_BxLxK, num_tasks, num_experts, *,
                 repeats: int = 10, seed: int = 0) -> tuple[float, float]:
  """NMI with the task labels permuted across examples (mean, std over `repeats`): what
  NMI reads on this many tokens when routing ignores the task. Specialization is NMI well
  above this baseline."""
  rng = np.random.default_rng(seed)
  b, l, k = np.asarray(expert_BxLxK).shape
  values = []
  for _ in range(repeats):
    task = np.repeat(rng.permutation(np.asarray(example_task_B)), l)
    values.append(normalized_mutual_information(task_expert_counts(
        task, np.reshape(expert_BxLxK, (b * l, k)), np.reshape(kept_BxLxK, (b * l, k)),
        num_tasks, num_experts)))
  return float(np.mean(values)), float(np.std(values))


def per_task_mean(values_B, task_B, num_tasks: int) -> np.ndarray:
  """Mean of a per-example value for each task [N] (NaN for a task with no examples)."""
  values_B, task_B = np.asarray(values_B, np.float64), np.asarray(task_B)
  out = np.full((num_tasks,), np.nan)
  for n in range(num_tasks):
    sel = task_B == n
    if sel.any():
      out[n] = values_B[sel].mean()
  return out


def spearman(x, y) -> float:
  """Rank correlation (ties get their mean rank); NaN when either side is constant."""
  def ranks(v):
    v = np.asarray(v, np.float64)
    order = np.argsort(v, kind='stable')
    r = np.empty(len(v))
    r[order] = np.arange(len(v))
    for value in np.unique(v):  # mean rank for ties
      tie = v == value
      r[tie] = r[tie].mean()
    return r
  rx, ry = ranks(x), ranks(y)
  if rx.std() == 0 or ry.std() == 0:
    return float('nan')
  return float(np.corrcoef(rx, ry)[0, 1])


def pathway_traffic(task_expert_NxE_per_layer) -> np.ndarray:
  """[layers, N, E]: each task's share of its computed assignments per expert and layer
  (rows sum to 1 where the task reached any expert): the edges of the pathway graph."""
  out = []
  for counts in task_expert_NxE_per_layer:
    counts = np.asarray(counts, np.float64)
    out.append(counts / np.maximum(counts.sum(1, keepdims=True), 1.0))
  return np.stack(out)
