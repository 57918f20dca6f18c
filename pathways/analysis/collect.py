"""Runs a model over evaluation batches and gathers one routing record for analysis."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from pathways.nn import moe


def make_forward(model_graphdef, exit_thresholds=None):
  """forward(model_state, batch) -> ModelOutput, jitted once (reuse it across evaluations);
  with `exit_thresholds` ([N]), the model takes its confidence exits."""
  thresholds = None if exit_thresholds is None else np.asarray(exit_thresholds, np.float32)

  @jax.jit
  def forward(model_state, batch):
    return nnx.merge(model_graphdef, model_state)(batch, deterministic=True,
                                                   exit_thresholds=thresholds)

  return forward


def collect(model_graphdef, model_state, batches, forward=None, exit_thresholds=None) -> dict:
  """Concatenated routing record over `batches` (only rows with weight > 0), plus
  'difficulty' [B], per-layer means of the scalar routing metrics ('scalars':
  {'layer<l>/<name>'}, names from `moe.SCALAR_METRICS`), 'num_experts' per MoE layer
  (routed plus grown: global ids), and 'grown': the components the architecture search
  added (`pathways.nn.grow`), with each clone's global id. `exit_thresholds`: the model
  takes its calibrated exits (the record then holds 'exit_depth' per example)."""
  forward = forward or make_forward(model_graphdef, exit_thresholds)
  parts, scalars = [], {}
  model = nnx.merge(model_graphdef, model_state)
  for batch in batches:
    out = jax.device_get(forward(model_state, batch))
    keep = np.asarray(batch['weight']) > 0
    record = _select(out.routing_record(batch), keep)
    record['difficulty'] = np.asarray(batch['difficulty'])[keep]
    parts.append(record)
    for layer, stats in out.moe.items():
      for name in moe.SCALAR_METRICS:
        scalars.setdefault(f'layer{layer}/{name}', []).append(float(stats.metrics[name]))
  out = _concat(parts)
  out['scalars'] = {k: float(np.mean(v)) for k, v in scalars.items()}
  out['num_experts'] = {f'layer{l}': model.blocks[l].ffn.num_total_experts
                        for l in model.moe_layers}
  # Each layer's experts by bank: [(count, hidden)] in global id order (grown ones last).
  out['banks'] = {f'layer{l}': [(b.num_experts, b.hidden) for b in
                                model.blocks[l].ffn.all_banks()] for l in model.moe_layers}
  # Auxiliary-loss-free balancing: each layer's selection bias per expert at this checkpoint.
  out['balance_bias'] = {f'layer{l}': np.asarray(model.blocks[l].ffn.router.balance_bias[...])
                         [:model.blocks[l].ffn.num_experts].tolist() for l in model.moe_layers
                         if getattr(model.blocks[l].ffn.router, 'balance_rate', 0.0)}
  # Layers whose slots mix tokens (Soft MoE): their heatmaps show combine weights.
  out['soft_layers'] = [f'layer{l}' for l in model.moe_layers
                        if model.blocks[l].ffn.router.mixes_tokens]
  out['adaptive_depth'] = [bool((model.halting and p) or exit_thresholds is not None)
                           for p in model.pooled]
  out['grown'] = grown_components(model)
  out['task_names'] = list(model.task_names)
  out['num_layers'] = len(model.blocks)
  return out


def grown_components(model) -> list[dict]:
  """The model's grown components as dicts (clones with their global expert 'id')."""
  out, seen = [], {}
  for g in model.grown:
    entry = dict(kind=g.kind, task=g.task, layer=g.layer, hidden=g.hidden,
                 description=g.describe())
    if g.kind == 'clone':
      j = seen.get(g.layer, 0)
      seen[g.layer] = j + 1
      entry.update(source=g.expert, id=model.blocks[g.layer].ffn.num_experts + j)
    out.append(entry)
  return out


def _select(record, keep):
  out = {}
  for key, value in record.items():
    if isinstance(value, dict):
      out[key] = {k: v[keep] if v.shape[:1] == keep.shape else v for k, v in value.items()}
    elif key == 'halting_p_LxB':
      out[key] = value[:, keep]
    else:
      out[key] = value[keep]
  return out


def _concat(parts):
  out = {}
  for key, value in parts[0].items():
    if isinstance(value, dict):
      out[key] = {k: np.concatenate([p[key][k] for p in parts]) for k in value}
    elif key == 'halting_p_LxB':
      out[key] = np.concatenate([p[key] for p in parts], axis=1)
    else:
      out[key] = np.concatenate([p[key] for p in parts])
  return out
