"""Expert clones for a task that joins a trained model, placed where its first batches route.

`choose(config, task)`: `config` names the trained model (`config.init_from`) and the tasks
with the new one among them. The run is built as it would start (the base's weights restored,
the new task's own parameters fresh), `batches` training batches are routed, and the result is
`config.model.grown` entries that clone, in every MoE layer, the `per_layer` routed experts
the new task's tokens chose most often. Each clone starts as a copy of its source
(`grow.init_clones`) and takes the task's assignments to it: the task's function is unchanged
at the first step, the base's experts stay the base's (with `freeze='shared'` they are
frozen, and the clones train).

  config.model.grown = list(config.model.grown) + clones.choose(config, 'new_task')
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from pathways.train import checkpoint as checkpoint_lib
from pathways.train import experiment


def route_counts(config, task: str, batches: int = 4) -> dict[int, np.ndarray]:
  """{MoE layer: [E] how often the task's real tokens chose each routed expert} over the
  first `batches` training batches, on the model as the run would start."""
  if not config.get('init_from'):
    raise ValueError('clones.route_counts needs config.init_from (the trained model the task '
                     'joins).')
  if task not in config.tasks:
    raise ValueError(f'task={task!r}: must be one of config.tasks {list(config.tasks)}.')
  exp = experiment.build(config)
  model = exp.model(exp.init_state())
  state, _, _ = checkpoint_lib.restore_params(config.init_from, nnx.state(model))
  nnx.update(model, state)
  task_id = exp.task_ids[task]
  counts = {}
  with jax.set_mesh(exp.mesh):
    for _ in range(batches):
      batch = exp.put(next(exp.pipeline))
      out = model(batch, deterministic=True)
      rows = np.asarray(batch['task_id']) == task_id
      for layer, stats in out.moe.items():
        num_experts = model.blocks[layer].ffn.num_experts
        expert = np.asarray(stats.record['expert_BxLxK'])[rows]
        kept = np.asarray(stats.record['kept_BxLxK'])[rows]
        chosen = expert[kept & (expert < num_experts)]
        counts[layer] = counts.get(layer, 0) + np.bincount(chosen, minlength=num_experts)
  return counts


def choose(config, task: str, *, batches: int = 4, per_layer: int = 1,
           hidden: int | None = None) -> list[dict]:
  """`config.model.grown` entries: clones of the `per_layer` most-chosen experts of every MoE
  layer for `task` (ties: the lower id), of width `hidden` (None: the source's)."""
  if not isinstance(per_layer, int) or per_layer < 1:
    raise ValueError(f'per_layer={per_layer!r}: must be an int >= 1.')
  return entries(route_counts(config, task, batches), config, task, per_layer, hidden)


def entries(counts: dict[int, np.ndarray], config, task: str, per_layer: int = 1,
            hidden: int | None = None) -> list[dict]:
  """The clone entries `choose` returns, from its routing counts."""
  banks = [tuple(b) for b in config.model.moe.banks]
  granularity = config.model.moe.get('granularity', 1)
  widths = [f // granularity for e, f in banks for _ in range(e * granularity)]
  out = []
  for layer in sorted(counts):
    for expert in np.argsort(-counts[layer], kind='stable')[:per_layer]:
      out.append(dict(kind='clone', task=task, layer=int(layer), expert=int(expert),
                      hidden=int(hidden or widths[expert])))
  return out
