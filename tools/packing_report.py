"""How full the computed token slots of a config are, padded and packed (`model.pack`).

  python -m tools.packing_report --config=experiments/configs/multitask.py
  python -m tools.packing_report --config=experiments/configs/multitask.py:large --shards=64

Reads `--batches` real training batches from the config's pipeline (no model is built, no
step runs), and prints one JSON line: rows, L_max, the packing plan (packed rows per shard
block and their length), the token slots computed per step padded ([B, L_max]) and packed,
the real tokens per step (mean over the batches; rows that count this step) and
`real_token_fraction` both ways. `--shards`: data-parallel blocks of the batch (each packs
alike); default the config's `data.shards`, or 1.
"""
from __future__ import annotations

import json

import numpy as np
from absl import app
from absl import flags

from pathways.nn import packing
from pathways.train import experiment
from tools import start as start_lib

FLAGS = flags.FLAGS


def define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Experiment config (path[:args]).',
                                  lock_config=False)
  flags.DEFINE_integer('batches', 8, 'Training batches to count real tokens over.')
  flags.DEFINE_integer('shards', 0, "Data-parallel blocks of the batch (0: the config's "
                       'data.shards, or 1).')
  flags.mark_flags_as_required(['config'])


def report(config, batches: int, shards: int) -> dict:
  """The JSON row (see the module docstring)."""
  tasks = experiment.tasks_from_config(config)
  pipe = experiment.pipeline_from_config(config, tasks, num_shards=shards)
  layout, patch = pipe.layout, config.model.patch
  possible = packing.possible_mask(tasks, layout, patch)
  moe = config.model.moe
  plan = packing.plan_for(tasks, layout, patch, moe.get('group_size') if config.model.moe_every
                          else None)
  real = []
  bytes_rows = np.asarray(layout.rows.get('bytes', np.zeros(0, np.int32)))
  for _ in range(batches):
    b = next(pipe)
    # bytes rows: their mask; image and vector rows: every slot of the task's own size
    per_row = possible.sum(1).astype(np.float64)
    if len(bytes_rows):
      per_row[bytes_rows] = b['tokens_mask'].sum(1)
    real.append(float(per_row[b['weight'] > 0].sum()))
  tokens = float(np.mean(real))
  return {'tasks': [t.name for t in tasks],
          'batch_rows': layout.batch_size, 'shards': shards, 'l_max': plan.canonical_length,
          'packed_rows_per_block': plan.rows, 'packed_length': plan.length,
          'possible_slots_per_step': int(possible.sum()),
          'padded_slots_per_step': plan.canonical_slots,
          'packed_slots_per_step': plan.computed_slots, 'tokens_per_step': tokens,
          'real_token_fraction_padded': tokens / plan.canonical_slots,
          'real_token_fraction_packed': tokens / plan.computed_slots}


def main(argv):
  name = start_lib.start(argv)
  config = FLAGS.config
  shards = FLAGS.shards or config.data.get('shards', 0) or 1
  print(json.dumps(dict(config=name, **report(config, FLAGS.batches, shards))), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
