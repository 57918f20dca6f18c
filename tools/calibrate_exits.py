"""Calibrate a workdir's confidence exits: each task's threshold on held-out data.

  python -m tools.calibrate_exits --workdir=/tmp/run [--tolerance=0.01] [--confidence=0.95]
      [--batches=16]

For a model trained with exits (`model.exit_weights`), runs the calibration examples (each
task's 'calibration' split; its training split where it has none, said in the output) at
every threshold of a grid, picks per task the lowest threshold whose accuracy stays within
`tolerance` of full depth (with --confidence: whose upper confidence bound of the accuracy
drop does, risk control), and writes workdir/exits.json and workdir/exits.png (accuracy
against FLOPs per example). `experiments.evaluate`, the routing report and bucketed inference
then use those thresholds (`pathways.train.calibrate`).
"""
from absl import app
from absl import flags
from absl import logging

from pathways import registry

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A training workdir of a model with exits.')
flags.DEFINE_float('tolerance', 0.01, 'Largest accuracy loss against full depth allowed.')
flags.DEFINE_float('confidence', None, 'Risk control: the one-sided upper bound of the '
                   'accuracy drop at this level (e.g. 0.95) must be within the tolerance; '
                   'unset: the calibration examples\' drop itself.')
flags.DEFINE_integer('batches', None, 'Calibration batches (default: the config\'s '
                     'train.eval_batches).')
flags.DEFINE_string('checkpoint', 'latest', "'latest', 'best' or a step number.")
flags.DEFINE_multi_string('task_module', [], 'Python modules that register extra tasks.')
flags.DEFINE_bool('skip_without_exits', False, 'Exit quietly (status 0) when the workdir\'s '
                  'model was not trained with exits (model.exit_weights empty), as `make run` '
                  'does for any config.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  registry.discover(task_modules=FLAGS.task_module)
  from pathways.train import calibrate  # pylint: disable=g-import-not-at-top
  if FLAGS.skip_without_exits:
    from pathways.train import evaluate_workdir  # pylint: disable=g-import-not-at-top
    model = evaluate_workdir.read_config(FLAGS.workdir).model
    if not model.get('exit_weights', '') or model.halting:
      print(f'{FLAGS.workdir}: the model was not trained with exits; nothing to calibrate.')
      return
  record = calibrate.calibrate(FLAGS.workdir, tolerance=FLAGS.tolerance, batches=FLAGS.batches,
                               confidence=FLAGS.confidence,
                               checkpoint=FLAGS.checkpoint)
  for name, split in record['splits'].items():
    print(f'{name}: calibrated on {split}')
  print(calibrate.summary(record))


if __name__ == '__main__':
  app.run(main)
