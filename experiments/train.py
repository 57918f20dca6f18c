"""Train (and periodically evaluate) an experiment.

  python -m experiments.train --config=experiments/configs/multitask.py:runlocal \
      --workdir=/tmp/multitask [--config.optim.learning_rate=1e-3] [--task_module=my.tasks]

Re-running with the same workdir resumes from its last checkpoint. Lists from the command
line: `--config.tasks=digits,parity`, `--config.task_modules=my.tasks` (comma strings) or
ml_collections' tuple syntax (`--config.freeze="('blocks/1/ffn/banks',)"`).

Many hosts (the same command on every host; see the README's launch section):
  --distributed=auto                          Cloud TPU pods, SLURM (srun)
  --distributed=explicit --coordinator_address=host0:1234 --num_processes=N --process_id=i

A resume whose config changes the model, the batch size or the learning-rate schedule is
refused; --allow_config_changes accepts such a change (every config a run was started or
resumed with is kept under WORKDIR/configs/).
"""
from pathways.train import signals  # first: SIGTERM during start-up exits cleanly

if __name__ == '__main__':
  signals.exit_cleanly_on_signal()

import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from pathways import registry  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (path[:args]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for config.json, checkpoints and metrics.')
flags.DEFINE_multi_string('task_module', [], 'Python modules that register extra tasks.')
flags.DEFINE_multi_string('skip_plugin', [], 'Installed task plugins (entry points) not to load.')
flags.DEFINE_enum('distributed', 'off', ['off', 'auto', 'explicit'],
                  'jax.distributed: off (one process), auto (TPU pods, SLURM), explicit.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (explicit mode).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (explicit mode).')
flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes) (explicit mode).')
flags.DEFINE_bool('allow_config_changes', False, 'Resume with another batch size or '
                  'learning-rate schedule than the run was started with.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if not FLAGS['verbosity'].present:  # orbax and TFDS log every step at INFO
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from pathways.parallel import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)
  registry.discover(task_modules=FLAGS.task_module, skip_plugins=FLAGS.skip_plugin)
  from pathways.train import loop  # pylint: disable=g-import-not-at-top
  try:
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                            allow_config_changes=FLAGS.allow_config_changes)
  except Exception:  # pylint: disable=broad-except
    # A failed asynchronous save can leave orbax threads waiting forever for the rest of the
    # save, and the interpreter would wait for them at exit: report, then leave at once.
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access
  if FLAGS.distributed != 'off':
    jax.distributed.shutdown()


if __name__ == '__main__':
  app.run(main)
