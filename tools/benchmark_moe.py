"""Benchmark: MoE layer throughput against a dense FFN and against the one-hot reference
(`pathways.nn.benchmark` says what each variant is and how they are timed).

Prints one JSON object per line and a table; writes all rows to --output.

  python -m tools.benchmark_moe                        # the README's table
  python -m tools.benchmark_moe --tokens=4096 --experts=8 --repeats=3
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags

import jax

from pathways.nn import benchmark

FLAGS = flags.FLAGS
flags.DEFINE_list('tokens', ['16384', '4096'], 'T values (tokens per step).')
flags.DEFINE_list('experts', ['8', '64', '512'], 'E values.')
flags.DEFINE_integer('d_model', 512, 'D.')
flags.DEFINE_integer('dense_hidden', 2048, 'F of the dense FFN; experts get dense_hidden / k.')
flags.DEFINE_integer('k', 2, 'Experts per token.')
flags.DEFINE_float('capacity_factor', 1.25, 'Capacity factor of the capacity paths.')
flags.DEFINE_list('einsum_groups', ['256', '1024'], 'Group sizes tried for the one-hot reference.')
flags.DEFINE_float('load_cv', 0.3, 'Target coefficient of variation of expert load.')
flags.DEFINE_integer('repeats', 5, 'Timed repeats per variant (median reported).')
flags.DEFINE_integer('ragged_max_groups', 8, 'Run the ragged path only up to this E (XLA lowers '
                     'ragged_dot to per-group dense work on CPU, and on GPU at E=512 its '
                     'autotuner asked for 64 GiB).')
flags.DEFINE_bool('modern', True, 'Also time a shared-expert layer and a fine-grained one '
                  '(granularity 2) at the same active FLOPs.')
flags.DEFINE_bool('forward_only', True, 'Also time forward-only (inference).')
flags.DEFINE_bool('breakdown', True, 'Also time the parts of the MoE layer (fwd+bwd): router, '
                  'expert FFN alone on full buffers, and the rest (ranking, gathers, combine).')
flags.DEFINE_string('output', 'results/benchmark_moe.json', 'Where to write the rows (JSON).')


def main(argv):
  del argv
  log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  setting = benchmark.Setting(
      d_model=FLAGS.d_model, dense_hidden=FLAGS.dense_hidden, k=FLAGS.k,
      capacity_factor=FLAGS.capacity_factor, einsum_groups=tuple(map(int, FLAGS.einsum_groups)),
      load_cv=FLAGS.load_cv, repeats=FLAGS.repeats, ragged_max_groups=FLAGS.ragged_max_groups,
      modern=FLAGS.modern, forward_only=FLAGS.forward_only, breakdown=FLAGS.breakdown)
  rows = []
  for t in map(int, FLAGS.tokens):
    for e in map(int, FLAGS.experts):
      row = benchmark.bench_config(t, e, setting, log)
      print(json.dumps(row), flush=True)
      rows.append(row)
      if FLAGS.output:  # after every row: a crash later keeps what was measured
        os.makedirs(os.path.dirname(FLAGS.output) or '.', exist_ok=True)
        with open(FLAGS.output, 'w') as f:
          json.dump({'device': str(jax.devices()[0]), 'rows': rows}, f, indent=1)
  print(benchmark.table(rows))
  if FLAGS.output:
    log(f'wrote {FLAGS.output}')


if __name__ == '__main__':
  app.run(main)
