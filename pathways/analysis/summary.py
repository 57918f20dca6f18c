"""From a collected routing record to the statistics of the routing report (pure)."""
from __future__ import annotations

import numpy as np

from pathways.analysis import routing_stats as rs


def summarize(record: dict, *, shuffle_repeats: int = 10) -> dict:
  """JSON-ready statistics: per MoE layer (load, CV, drops, entropy, experts per token,
  task x expert counts, NMI and its shuffled-task baseline) and per task (examples, FLOPs,
  depth, FLOPs-difficulty rank correlation)."""
  names = record['task_names']
  n = len(names)
  task_B = record['task_id']
  layers = {}
  for layer, num_experts in record['num_experts'].items():
    rec = record[layer]  # token-major for every router (expert choice: K = E)
    b, l, k = rec['expert_BxLxK'].shape
    expert, kept = rec['expert_BxLxK'].reshape(-1, k), rec['kept_BxLxK'].reshape(-1, k)
    counts = rs.expert_counts(expert, kept, num_experts)
    joint = rs.task_expert_counts(np.repeat(task_B, l), expert, kept, n, num_experts)
    base_mean, base_std = rs.shuffled_nmi(task_B, rec['expert_BxLxK'], rec['kept_BxLxK'], n,
                                          num_experts, repeats=shuffle_repeats)
    scalars = {key.split('/')[-1]: v for key, v in record['scalars'].items()
               if key.startswith(layer + '/')}
    null_share = None
    if 'mask_BxL' in record:  # the share of each task's choices a null expert took
      active_T = record['mask_BxL'].reshape(-1)
      null_T = (expert >= num_experts).sum(-1)
      task_T = np.repeat(task_B, l)
      null_share = [_num(null_T[active_T & (task_T == i)].sum() /
                         max(k * (active_T & (task_T == i)).sum(), 1)) for i in range(n)]
    soft = layer in record.get('soft_layers', ())
    if soft:  # every token reaches every expert: what differs is the combine weight
      joint = rs.task_expert_counts(np.repeat(task_B, l), expert, kept, n, num_experts,
                                    rec['weight_BxLxK'].reshape(-1, k))
    extra = {'soft': soft}
    if layer in record.get('balance_bias', {}):
      extra['balance_bias_E'] = record['balance_bias'][layer]
    layers[layer] = dict(scalars, **extra, expert_load=rs.load_fractions(counts).tolist(),
                         null_share=null_share, banks=record.get('banks', {}).get(layer),
                         load_cv=rs.coefficient_of_variation(counts),
                         task_expert_counts=joint.tolist(),
                         nmi=rs.normalized_mutual_information(joint),
                         nmi_shuffled_mean=base_mean, nmi_shuffled_std=base_std)
  tasks = {}
  flops = rs.per_task_mean(record['flops_per_example'], task_B, n)
  depth = None
  if 'halting_layer' in record:
    depth = rs.per_task_mean(record['halting_layer'] + 1.0, task_B, n)
  if 'exit_depth' in record:  # calibrated exits: layers run, mean over the example's tokens
    depth = rs.per_task_mean(record['exit_depth'], task_B, n)
  adaptive = record.get('adaptive_depth', [True] * n)
  for i, name in enumerate(names):
    sel = task_B == i
    entry = {'examples': int(sel.sum()), 'flops_per_example': _num(flops[i])}
    if depth is not None and adaptive[i]:  # depth only where the task can stop early
      entry['depth'] = _num(depth[i])
    difficulty = record['difficulty'][sel]
    if sel.any() and np.isfinite(difficulty).all():
      flops_sel = record['flops_per_example'][sel]
      entry['flops_difficulty_spearman'] = _num(rs.spearman(difficulty, flops_sel))
      entry['flops_by_difficulty'] = {
          str(float(d)): float(flops_sel[difficulty == d].mean()) for d in np.unique(difficulty)}
    tasks[name] = entry
  counts = [np.asarray(v['task_expert_counts']) for v in layers.values()]
  width = max((c.shape[1] for c in counts), default=0)  # grown experts widen some layers
  counts = [np.pad(c, ((0, 0), (0, width - c.shape[1]))) for c in counts]
  traffic = rs.pathway_traffic(counts) if layers else np.zeros((0, n, 0))
  grown = []
  for g in record.get('grown', []):  # traffic of each grown component, from its own rows
    g = dict(g)
    i = names.index(g['task'])
    if g['kind'] == 'clone' and f"layer{g['layer']}" in layers:
      g['assignments'] = layers[f"layer{g['layer']}"]['task_expert_counts'][i][g['id']]
    grown.append(g)
  return {'layers': layers, 'tasks': tasks, 'task_names': names, 'grown': grown,
          'num_layers': record['num_layers'], 'pathway_traffic': traffic.tolist()}


def _num(x):
  x = float(x)
  return None if not np.isfinite(x) else x
