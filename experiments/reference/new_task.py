"""Reference result: a new task learns fast from shared components (muNet, Figure 1).

  python -m experiments.reference.new_task --workdir=workdirs/new_task \
      [--base_workdir=workdirs/multitask] [--examples=100] [--steps=200]

Starts from the trained default model (`--base_workdir`, else it trains
`multitask.py:runlocal` into workdir/base) and adds a task it has not seen: byte-level
language modelling of Python source (`pycode_lm`) from only `--examples` labelled windows
(task `pycode_lm_<examples>`, evaluated on pycode_lm's full held-out split). Two runs on the
same examples and steps:
  * transfer: the base model's parameters, everything shared frozen (stems, attention,
    routers, experts, other tasks' heads); only the new task's embedding, head and router
    prior train;
  * scratch: the same architecture, every parameter trained from initialization.
The old tasks cannot change: the transfer run's shared parameters are compared bit for bit
with the base checkpoint. Writes workdir/results.json and workdir/new_task.png.
"""
from __future__ import annotations

import dataclasses
import json
import os

from absl import app
from absl import flags
from absl import logging

from experiments.reference import common
from pathways import registry

FLAGS = flags.FLAGS
SOURCE = 'pycode_lm'


class _FirstN:
  """The first n examples of a random-access source."""

  def __init__(self, source, n):
    if len(source) < n:
      raise ValueError(f'--examples={n}: the split has only {len(source)} examples.')
    self.source, self.n = source, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]


def register_few_shot(examples: int) -> str:
  """Registers `pycode_lm_<examples>`: pycode_lm with `examples` training windows."""
  name = f'{SOURCE}_{examples}'
  if name in registry.TASKS:
    return name
  base = registry.get_task(SOURCE)

  def data(split, data_dir):
    source = base.data(split, data_dir)
    return _FirstN(source, examples) if split == base.splits['train'] else source

  registry.register_task(dataclasses.replace(base, name=name, data=data,
                                             description=f'{base.description}, '
                                             f'{examples} training examples'))
  return name


def configs(base_config, task: str, steps: int, base_workdir: str):
  """(transfer, scratch) configs for the new task on the base model's architecture."""
  def one():
    c = base_config.copy_and_resolve_references()
    c.tasks = [task]
    for section in ('task_loss_weights', 'task_flops_budgets', 'task_connectivity'):
      c[section] = {}
    c.data.batch_size = 8
    c.data.shards = 0
    c.train.update(num_steps=steps, eval_every=steps, log_every=50, routing_batches=0,
                   eval_batches=16)
    c.ckpt.every = steps
    c.optim.warmup_steps = min(c.optim.warmup_steps, steps // 10)
    c.init_from, c.freeze = '', []
    return c

  transfer, scratch = one(), one()
  transfer.init_from = base_workdir
  transfer.freeze = [f'^(?!.*{task})']  # every parameter whose path does not name the task
  return transfer, scratch


def shared_unchanged(base_workdir, transfer_workdir):
  """(equal, compared): every transfer parameter that came from the base, bitwise."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pathways.train import checkpoint  # pylint: disable=g-import-not-at-top
  base = checkpoint.saved_model(base_workdir)
  new = checkpoint.saved_model(transfer_workdir)
  common_paths = [p for p in new if p in base and np.shape(base[p]) == np.shape(new[p])
                  and '/rngs/' not in p]  # random streams advance; parameters must not
  equal = all(np.array_equal(np.asarray(base[p]), np.asarray(new[p])) for p in common_paths)
  return equal, len(common_paths)


def define_flags():
  """Only when run as a program (tests import the sweeps into one process)."""
  flags.DEFINE_string('workdir', None, 'Folder for the runs.')
  flags.DEFINE_string('base_workdir', None, 'A trained default model (else trained here).')
  flags.DEFINE_integer('examples', 100, 'Labelled training examples of the new task.')
  flags.DEFINE_integer('steps', 200, 'Training steps of both runs (batch 8).')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  registry.discover()
  from experiments.configs import multitask  # pylint: disable=g-import-not-at-top
  from pathways.train import evaluate_workdir  # pylint: disable=g-import-not-at-top
  base_workdir = FLAGS.base_workdir or os.path.join(FLAGS.workdir, 'base')
  if not FLAGS.base_workdir:
    print('== base (the default model)', flush=True)
    common.train(multitask.get_config('runlocal'), base_workdir)
  base_config = evaluate_workdir.read_config(base_workdir)
  task = register_few_shot(FLAGS.examples)
  transfer, scratch = configs(base_config, task, FLAGS.steps, os.path.abspath(base_workdir))
  rows = {}
  for name, config in (('transfer', transfer), ('scratch', scratch)):
    print(f'== {name}', flush=True)
    row, seconds = common.train(config, os.path.join(FLAGS.workdir, name))
    rows[name] = {'eval_loss': row[f'eval/{task}/loss'],
                  'eval_accuracy': row[f'eval/{task}/accuracy'], 'train_seconds': seconds}
  equal, compared = shared_unchanged(base_workdir, os.path.join(FLAGS.workdir, 'transfer'))
  result = {'task': task, 'examples': FLAGS.examples, 'steps': FLAGS.steps, 'batch': 8,
            'base_workdir': base_workdir, 'runs': rows,
            'shared_parameters_unchanged': equal, 'shared_parameters_compared': compared}
  with open(os.path.join(FLAGS.workdir, 'results.json'), 'w') as f:
    json.dump(result, f, indent=1)
  fig, ax = common.figure()
  ax.bar(['transfer\n(shared frozen)', 'scratch'], [rows['transfer']['eval_loss'],
                                                    rows['scratch']['eval_loss']])
  ax.set_ylabel(f'{SOURCE} held-out loss (nats/byte)')
  ax.set_title(f'{FLAGS.examples} training examples, {FLAGS.steps} steps')
  common.save(fig, os.path.join(FLAGS.workdir, 'new_task.png'))
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  define_flags()
  app.run(main)
