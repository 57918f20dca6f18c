"""Which parameters a run leaves untouched: `config.freeze`, regexes over parameter paths
(e.g. 'blocks/1/ffn/banks'), or a preset name.

Presets:
  * 'shared': adding tasks to a trained model (`config.init_from`): everything is frozen but
    the parameters of the tasks the `init_from` workdir did not train (their embedding,
    head and router prior) and the components grown for them (`config.model.grown`: expert
    clones, task FFNs). The old tasks' function cannot change.

A literal regex that happens to equal a preset name is read as the preset; write a longer
one (e.g. 'ffn/shared') to freeze the shared experts.
"""
from __future__ import annotations

import json
import os
import re

from pathways.nn import grow as grow_lib

PRESETS = ('shared',)
TASK_PARAMS = ('task_embed', 'heads', 'router_prior')  # a task's own parameters, by name


def trained_tasks(workdir: str) -> list[str]:
  """The tasks a workdir's run trained (its config.json)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f"freeze='shared': config.init_from={workdir!r} has no "
                            f'config.json, so the tasks it trained are unknown.')
  with open(path) as f:
    return list(json.load(f)['tasks'])


def own_paths(tasks, grown, moe_layers) -> list[str]:
  """Regexes (anchored at the path's start) of the parameters that belong to `tasks`:
  their task parameters and the components grown for them."""
  out = [f'{kind}/{re.escape(t)}$' for t in tasks for kind in TASK_PARAMS]
  ffns = [g for g in grown if g.kind == 'ffn']
  out += [f'task_ffns/{j}/' for j, g in enumerate(ffns) if g.task in tasks]
  for layer in moe_layers:
    clones = [g for g in grown if g.kind == 'clone' and g.layer == layer]
    out += [f'blocks/{layer}/ffn/grown/{j}/' for j, g in enumerate(clones) if g.task in tasks]
  return out


def shared_pattern(config) -> str:
  """The 'shared' preset as one regex: every path that is not the new tasks' own."""
  if not config.get('init_from'):
    raise ValueError("config.freeze names the preset 'shared' (everything but the new tasks' "
                     "own parameters): it needs config.init_from, the workdir whose tasks are "
                     "the old ones.")
  old = trained_tasks(config.init_from)
  new = [t for t in config.tasks if t not in old]
  if not new:
    raise ValueError(f"config.freeze=('shared',): every task of config.tasks "
                     f'{list(config.tasks)} was trained in {config.init_from!r}, so nothing '
                     f'would train; add the new task to config.tasks.')
  m = config.model
  moe_layers = [l for l in range(m.num_layers) if m.moe_every and (l + 1) % m.moe_every == 0]
  grown = grow_lib.parse(m.get('grown', ()), list(config.tasks), m.num_layers, moe_layers)
  return '^(?!(?:' + '|'.join(own_paths(new, grown, moe_layers)) + '))'


def patterns(config) -> list[str]:
  """`config.freeze` with presets expanded into regexes."""
  return [shared_pattern(config) if p == 'shared' else p for p in config.get('freeze', ())]


def is_frozen(path: str, regexes) -> bool:
  return any(re.search(p, path) for p in regexes)
