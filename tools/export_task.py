"""Export one task as a standalone model holding only the components it uses.

  python -m tools.export_task --workdir=workdirs/multitask --task=digits \
      --output=workdirs/digits_only [--threshold=0.01]

See `pathways.search.export`: keeps the experts that receive at least --threshold of the
task's assignments, evaluates both models on the same examples and prints (and writes to
OUTPUT/export.json) the accuracy of each, the parameter and the FLOPs reduction.
"""
from __future__ import annotations

import json

from absl import app
from absl import flags
from absl import logging

from pathways import registry

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined only when run as a program: tools import each other's
  functions in one process, and absl refuses a flag defined twice)."""
  flags.DEFINE_string('workdir', None, 'A training workdir.')
  flags.DEFINE_string('task', None, 'The task to export.')
  flags.DEFINE_string('output', None, 'The new workdir.')
  flags.DEFINE_float('threshold', 0.01, 'Least share of the task\'s assignments an expert keeps.')
  flags.DEFINE_integer('eval_batches', None, 'Evaluation batches (default: the config\'s).')
  flags.DEFINE_float('max_accuracy_drop', 0.5, 'Accuracy points the export may lose; lower '
                     'thresholds are tried until it holds.')
  flags.DEFINE_multi_string('task_module', [], 'Python modules that register extra tasks.')
  flags.DEFINE_string('checkpoint', 'latest', "Which checkpoint: 'latest', 'best' or a step.")


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  for name in ('workdir', 'task', 'output'):
    if not FLAGS[name].value:
      raise app.UsageError(f'--{name} is required.')
  registry.discover(task_modules=FLAGS.task_module)
  from pathways.search import export  # pylint: disable=g-import-not-at-top
  result = export.export_task(FLAGS.workdir, FLAGS.task, FLAGS.output, FLAGS.threshold,
                              FLAGS.eval_batches, FLAGS.max_accuracy_drop, FLAGS.checkpoint)
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  define_flags()
  app.run(main)
