"""Evaluate a workdir's latest checkpoint on every task's evaluation split.

  python -m experiments.evaluate --workdir=/tmp/multitask [--checkpoint=latest|best|STEP] \
      [--eval_batches=20] [--mesh=data=1,expert=2]

Prints the metrics as JSON and writes them to workdir/eval.json. The plugin modules the
workdir was trained with (`config.task_modules` in its config.json) are imported. Where the
workdir holds calibrated exits (`tools/calibrate_exits.py` wrote workdir/exits.json), the same
examples are also run with them: 'exit/<task>/accuracy|loss|flops_per_example|depth|
threshold|flops_saved' beside the full-depth 'eval/...' metrics.
"""
import json
import os

from absl import app
from absl import flags
from absl import logging

from pathways import registry

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A training workdir (holds config.json and checkpoints).')
flags.DEFINE_integer('eval_batches', None, 'Batches per evaluation (default: the config\'s).')
flags.DEFINE_string('checkpoint', 'latest', "Which checkpoint: 'latest', 'best' (the step kept "
                    "by config.ckpt.best_metric) or a step number.")
flags.DEFINE_string('mesh', None, "Another mesh than the training config's, e.g. "
                    "'data=-1,expert=2' (the checkpoint is resharded onto it).")
flags.DEFINE_multi_string('task_module', [], 'Python modules that register extra tasks.')
flags.DEFINE_multi_string('skip_plugin', [], 'Installed task plugins (entry points) not to load.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if not FLAGS['verbosity'].present:  # orbax and TFDS log every step at INFO
    logging.set_verbosity(logging.WARNING)
  del argv
  registry.discover(task_modules=FLAGS.task_module, skip_plugins=FLAGS.skip_plugin)
  from pathways.train import evaluate_workdir  # pylint: disable=g-import-not-at-top
  from pathways.parallel import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.parse_mesh_flag(FLAGS.mesh) if FLAGS.mesh else None
  result = evaluate_workdir.evaluate_workdir(FLAGS.workdir, eval_batches=FLAGS.eval_batches,
                                             mesh=mesh, checkpoint=FLAGS.checkpoint)
  print(json.dumps(result, indent=1))
  with open(os.path.join(FLAGS.workdir, 'eval.json'), 'w') as f:
    json.dump(result, f, indent=1)


if __name__ == '__main__':
  app.run(main)
