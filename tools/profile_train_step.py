"""Profile the real train step of a config: its ops' time by category, as JSON.

  python -m tools.profile_train_step --config=experiments/configs/multitask.py \
      [--steps=3] [--top=10] [--out=results/train_step_profile_cpu.json]

Compiles the loop's step (`pathways/train/step_profile.py`), runs --steps under the profiler
and prints one JSON row: the step's wall time, op time per step by category (matmul, element-
wise on the [B, L_max] canonical layout, data movement, layout changes, other) and the --top
ops by time with their output shapes.
"""
from __future__ import annotations

import json

from absl import app
from absl import flags

from pathways.train import step_profile
from tools import start as start_lib

FLAGS = flags.FLAGS


def define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Experiment config (path[:args]).',
                                  lock_config=False)
  flags.DEFINE_integer('steps', 3, 'Profiled steps (after 2 warm-up steps).')
  flags.DEFINE_integer('top', 10, 'Ops listed by time.')
  flags.DEFINE_string('out', None, 'Also write the JSON row here.')
  flags.mark_flags_as_required(['config'])


def main(argv):
  name = start_lib.start(argv)
  row = dict(config=name, **step_profile.profile(FLAGS.config, FLAGS.steps, top=FLAGS.top))
  text = json.dumps(row)
  print(text, flush=True)
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  define_flags()
  app.run(main)
