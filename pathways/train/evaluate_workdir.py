"""Evaluation of a finished (or running) workdir from its config.json and latest checkpoint."""
from __future__ import annotations

import json
import os

import ml_collections

from pathways.train import checkpoint as checkpoint_lib
from pathways.train import evaluation
from pathways.train import experiment
from pathways.train import loop


def evaluate_workdir(workdir: str, eval_batches: int | None = None) -> dict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'--workdir={workdir!r}: no config.json (not a training workdir).')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  tasks, _, graphdef, state, _, _ = loop.build(config)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.ckpt.keep)
  restored = ckpt.restore_latest(state)
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'--workdir={workdir!r}: no checkpoint to evaluate.')
  step, state = restored[0], restored[1]
  eval_pipe = experiment.pipeline_from_config(config, tasks, split='eval', seed_offset=1)
  n = eval_batches or config.train.eval_batches
  result = evaluation.evaluate(evaluation.make_eval_step(graphdef), state,
                               (next(eval_pipe) for _ in range(n)))
  return dict(result, step=step)
