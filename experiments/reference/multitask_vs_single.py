"""Reference result: the shared multitask model against each task trained alone.

  python -m experiments.reference.multitask_vs_single --workdir=workdirs/multitask_vs_single

The multitask run is `experiments/configs/multitask.py:runlocal` (4 tasks, batch 32 = 8
slots per task, 600 steps). Each single-task run is the same config with one task and
batch 8: the same model, the same examples per step and steps for that task, so the same
active compute per example; only the sharing differs. Writes workdir/results.json (final
evaluation accuracy and loss per task, both ways) and workdir/multitask_vs_single.png.
Reuses finished runs (an interrupted sweep resumes).
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags

from experiments.reference import common

FLAGS = flags.FLAGS


def define_flags():
  """Only when run as a program (tests import both sweeps into one process)."""
  flags.DEFINE_string('workdir', None, 'Folder for the runs.')
  flags.DEFINE_integer('steps', 600, 'Training steps of every run.')
  flags.mark_flags_as_required(['workdir'])


def configs(steps):
  from experiments.configs import multitask  # pylint: disable=g-import-not-at-top
  shared = multitask.get_config(f'runlocal,steps={steps}')
  shared.train.routing_batches = 0
  # the model this result was measured with: PonderNet halting (the default before exits)
  shared.model.update(halting=True, exit_weights='', exit_confidence='softmax')
  per_task = shared.data.batch_size // len(shared.tasks)  # uniform mixture: equal slots
  out = {'multitask': shared}
  for name in shared.tasks:
    c = shared.copy_and_resolve_references()
    c.tasks = [name]
    c.data.batch_size = per_task
    # The same evaluation examples: each task's eval stream is seeded by its name, and the
    # shared run takes 8 of them per batch too.
    out[name] = c
  return out


def main(argv):
  del argv
  common.start(FLAGS.workdir)
  runs = {}
  for name, config in configs(FLAGS.steps).items():
    print(f'== {name}', flush=True)
    row, seconds = common.train(config, os.path.join(FLAGS.workdir, name))
    runs[name] = {'row': row, 'train_seconds': seconds, 'tasks': list(config.tasks)}
  shared = runs.pop('multitask')
  result = {'steps': FLAGS.steps, 'tasks': {}}
  for name, run in runs.items():
    result['tasks'][name] = {
        'multitask_accuracy': shared['row'][f'eval/{name}/accuracy'],
        'single_accuracy': run['row'][f'eval/{name}/accuracy'],
        'multitask_loss': shared['row'][f'eval/{name}/loss'],
        'single_loss': run['row'][f'eval/{name}/loss'],
        'multitask_flops_per_example': shared['row'][f'eval/{name}/flops_per_example'],
        'single_flops_per_example': run['row'][f'eval/{name}/flops_per_example'],
        'single_train_seconds': run['train_seconds']}
  result['multitask_train_seconds'] = shared['train_seconds']
  with open(os.path.join(FLAGS.workdir, 'results.json'), 'w') as f:
    json.dump(result, f, indent=1)
  fig, ax = common.figure()
  names = list(result['tasks'])
  for j, (key, label) in enumerate((('single_accuracy', 'alone'),
                                    ('multitask_accuracy', 'shared model'))):
    ax.bar([i + 0.4 * j for i in range(len(names))], [result['tasks'][n][key] for n in names],
           width=0.4, label=label)
  ax.set_xticks([i + 0.2 for i in range(len(names))], names)
  ax.set_ylabel('eval accuracy')
  ax.legend()
  common.save(fig, os.path.join(FLAGS.workdir, 'multitask_vs_single.png'))
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  define_flags()
  app.run(main)
