"""Runs a model over evaluation batches and gathers one routing record for analysis."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from pathways.nn import model as model_lib

LAYER_SCALARS = ('router_entropy', 'experts_per_token', 'computed_experts_per_token',
                 'fraction_dropped', 'load_balance_loss')


def make_forward(graphdef):
  """forward(state, batch) -> metrics, jitted once (reuse it across evaluations)."""

  @jax.jit
  def forward(state, batch):
    model = nnx.merge(graphdef, state)
    if isinstance(model, tuple):
      model = model[0]
    _, metrics = model(batch, deterministic=True)
    return metrics

  return forward


def collect(graphdef, state, batches, forward=None) -> dict:
  """Concatenated routing record over `batches` (only rows with weight > 0), plus
  'difficulty' [B], per-layer means of the layer scalars ('scalars': {'layer<l>/<name>'}),
  'num_experts' per MoE layer (routed plus grown: global ids), and 'grown': the components
  the architecture search added (`pathways.nn.grow`), with each clone's global id."""
  forward = forward or make_forward(graphdef)
  parts, scalars = [], {}
  model = nnx.merge(graphdef, state)
  model = model[0] if isinstance(model, tuple) else model
  for batch in batches:
    metrics = jax.device_get(forward(state, batch))
    record = model_lib.routing_record(metrics, batch)
    keep = np.asarray(batch['weight']) > 0
    record = _select(record, keep)
    record['difficulty'] = np.asarray(batch['difficulty'])[keep]
    parts.append(record)
    for key, value in metrics.items():
      if key.split('/')[-1] in LAYER_SCALARS and np.ndim(value) == 0:
        scalars.setdefault(key, []).append(float(value))
  out = _concat(parts)
  out['scalars'] = {k: float(np.mean(v)) for k, v in scalars.items()}
  out['num_experts'] = {f'layer{l}': model.blocks[l].ffn.num_total_experts
                        for l in model.moe_layers}
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
