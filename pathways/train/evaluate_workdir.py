"""A finished (or running) workdir, loaded from its config.json and latest checkpoint, and
its evaluation."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from pathways import registry
from pathways.train import calibrate
from pathways.train import checkpoint as checkpoint_lib
from pathways.train import evaluation
from pathways.train import experiment
from pathways.train import workdir as workdir_lib


@dataclasses.dataclass
class Loaded:
  """A workdir's experiment and the train state of its latest checkpoint."""
  experiment: experiment.Experiment
  state: Any
  step: int

  @property
  def config(self):
    return self.experiment.config

  @property
  def tasks(self):
    return self.experiment.tasks

  @property
  def model_state(self):
    return self.state['model']

  def model(self):
    return self.experiment.model(self.state)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """A workdir's config.json (upgraded to today's keys); names what is missing."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'--workdir={workdir!r}: no such folder.')
  if not os.path.exists(path):
    raise FileNotFoundError(f'--workdir={workdir!r}: no config.json (not a training workdir).')
  return experiment.upgrade(ml_collections.ConfigDict(
      workdir_lib.read_json(path, 'workdir config')))


def load_workdir(workdir: str, mesh: dict | None = None, checkpoint: str = 'latest') -> Loaded:
  """A checkpoint of a workdir ('latest', 'best' or a step number), with its experiment. The
  config's task plugin modules (`config.task_modules`) are imported; a task still unknown
  names the workdir.

  `mesh` ({'data': 1, 'expert': 2}) replaces the config's mesh: a checkpoint restores onto
  any device count (orbax reshards each array to the new layout)."""
  config = read_config(workdir)
  if mesh is not None:
    config.mesh = dict(mesh)
  registry.import_task_modules(experiment.comma_list(config.task_modules))
  missing = [t for t in experiment.comma_list(config.tasks) if t not in registry.TASKS]
  if missing:
    raise ValueError(f'--workdir={workdir!r} was trained with tasks {missing}, which are not '
                     f'registered here; registered: {registry.TASKS.names()}. Install or name '
                     f'the plugin that registers them (--task_module=..., or task_modules in '
                     f'the workdir config).')
  exp = experiment.build(config)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.ckpt.keep)
  try:
    restored = ckpt.restore(exp.init_state(), checkpoint,
                            check=lambda data, meta: exp.pipeline.check_state(data))
  finally:
    ckpt.close()
  return Loaded(exp, restored[1], restored[0])


def evaluate_workdir(workdir: str, eval_batches: int | None = None,
                     mesh: dict | None = None, checkpoint: str = 'latest',
                     exits: bool = True) -> dict:
  """{'eval/...': full-depth metrics, 'step'}; where the workdir holds calibrated exits
  (`tools/calibrate_exits.py`) and `exits`, also 'exit/<task>/accuracy|loss|
  flops_per_example|depth|threshold' and 'exit/<task>/flops_saved' on the same examples."""
  loaded = load_workdir(workdir, mesh, checkpoint)
  exp = loaded.experiment
  n = eval_batches or exp.config.train.eval_batches
  step = evaluation.make_eval_step(exp.model_graphdef)
  with jax.set_mesh(exp.mesh):
    eval_pipe = exp.eval_pipeline()
    batches = [next(eval_pipe) for _ in range(n)]
    result = evaluation.evaluate(step, loaded.model_state, iter(batches), tasks=exp.tasks)
    calibrated = calibrate.read(workdir) if exits else None
    if calibrated is not None:
      names = [t.name for t in exp.tasks]
      thresholds = calibrate.thresholds(calibrated, names)
      exited = evaluation.evaluate(step, loaded.model_state, iter(batches), tasks=exp.tasks,
                                   exit_thresholds=thresholds)
      for name, value in zip(names, thresholds):
        for key in ('accuracy', 'loss', 'flops_per_example', 'depth'):
          if f'eval/{name}/{key}' in exited:
            result[f'exit/{name}/{key}'] = exited[f'eval/{name}/{key}']
        result[f'exit/{name}/threshold'] = float(value)
        result[f'exit/{name}/flops_saved'] = 1.0 - (exited[f'eval/{name}/flops_per_example']
                                                    / result[f'eval/{name}/flops_per_example'])
  return dict(result, step=loaded.step)
