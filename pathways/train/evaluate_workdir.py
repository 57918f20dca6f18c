"""Evaluation of a finished (or running) workdir from its config.json and latest checkpoint."""
from __future__ import annotations

import json
import os

import jax
import ml_collections

from pathways.parallel import sharding as sharding_lib
from pathways.train import checkpoint as checkpoint_lib
from pathways.train import evaluation
from pathways.train import experiment
from pathways.train import loop


def load_workdir(workdir: str, mesh: dict | None = None):
  """(config, tasks, graphdef, restored state, step) of a workdir's latest checkpoint.
  The state is that of (model, optimizer); `nnx.merge(graphdef, state)[0]` is the model.

  `mesh` ({'data': 1, 'expert': 2}) replaces the config's mesh: a checkpoint restores onto
  any device count (orbax reshards each array to the new layout)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'--workdir={workdir!r}: no such folder.')
  if not os.path.exists(path):
    raise FileNotFoundError(f'--workdir={workdir!r}: no config.json (not a training workdir).')
  with open(path) as f:
    config = experiment.upgrade(ml_collections.ConfigDict(json.load(f)))
  if mesh is not None:
    config.mesh = dict(mesh)
  tasks, _, graphdef, state, _, _ = loop.build(config)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.ckpt.keep)
  try:
    restored = ckpt.restore_latest(state)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'--workdir={workdir!r}: no checkpoint to load.')
  return config, tasks, graphdef, restored[1], restored[0]


def eval_pipeline(config, tasks):
  """The evaluation pipeline of a workdir's config, split as its mesh splits batches here."""
  mesh = sharding_lib.make_mesh(config.mesh)
  return experiment.pipeline_from_config(config, tasks, split='eval', seed_offset=1,
                                         **loop.data_kwargs(config, mesh))


def evaluate_workdir(workdir: str, eval_batches: int | None = None,
                     mesh: dict | None = None) -> dict:
  config, tasks, graphdef, state, step = load_workdir(workdir, mesh)
  mesh = sharding_lib.make_mesh(config.mesh)
  eval_pipe = eval_pipeline(config, tasks)
  n = eval_batches or config.train.eval_batches
  with jax.set_mesh(mesh):
    result = evaluation.evaluate(evaluation.make_eval_step(graphdef), state,
                                 (next(eval_pipe) for _ in range(n)))
  return dict(result, step=step)
