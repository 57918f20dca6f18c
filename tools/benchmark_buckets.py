"""Benchmark: sequence packing against length buckets, the same examples per step.

Two ways to stop computing padding (`tools/benchmark_train.py` measures each step on its own):
  * packed: the config as given with `model.pack=True`, one step over the whole mixture;
  * buckets: the config's tasks grouped by their token length (an image's patches, a byte
    task's own length), one compiled step per group with `model.pack=False`, its batch the
    group's share of the mixture's batch (`round(B * sum of the group's mixture weights)`), so
    a round of one step per bucket trains on the examples one packed step does. A bucket's
    rows are as long as its tasks: no padding beyond its own modalities' shapes.

Rounds alternate the arms (packed, then every bucket) --rounds times in one process; each
arm's step time is the median over its rounds (each round itself a median over --repeats of
--steps steps, `pathways.train.benchmark.benchmark`). Prints one JSON line per measured step
(the benchmark's row, with `arm` and `round`) and a last line `summary`: per arm the
milliseconds per example (packed: step / examples; buckets: the sum of the buckets' steps /
the sum of their examples), model FLOPs per example, real-token fraction, MFU, and
`buckets_over_packed` (the time ratio: above 1, packing is faster). A bucketed trainer also
steps the optimizer once per bucket (included: each bucket's step is a full train step).

  python -m tools.benchmark_buckets --config=experiments/configs/multitask.py \
      --steps=5 --repeats=3 --rounds=2 --out=/tmp/buckets.jsonl
"""
from __future__ import annotations

import contextlib
import copy
import json
import statistics
import sys

from absl import app
from absl import flags

from pathways import modalities as modalities_lib
from pathways.train import benchmark as benchmark_lib
from tools import start as start_lib

FLAGS = flags.FLAGS


def define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Experiment config (path[:args]).',
                                  lock_config=False)
  flags.DEFINE_string('variant', 'sorted', f'One of {benchmark_lib.VARIANTS}.')
  flags.DEFINE_integer('steps', 5, 'Timed steps per repeat.')
  flags.DEFINE_integer('repeats', 3, 'Timed repeats per round (median).')
  flags.DEFINE_integer('warmup', 1, 'Untimed steps after compilation.')
  flags.DEFINE_integer('batches', 4, 'Distinct real batches drawn from the pipeline, cycled.')
  flags.DEFINE_integer('rounds', 2, 'Alternating rounds of every arm (median over rounds).')
  flags.DEFINE_string('out', None, 'Also write the JSON lines here.')
  flags.mark_flags_as_required(['config'])


def task_tokens(task, patch: int) -> int:
  """Token slots one example of `task` fills in its modality's stem (its own shape)."""
  m = modalities_lib.get(task.modality)
  return int(m.tokens(m.example_shape(task.input_shape), patch))


def buckets(config) -> list[dict]:
  """[{'tokens', 'tasks', 'batch_size'}], longest first: the config's tasks grouped by token
  length, each group's batch its share of the mixture's (the pipeline's own weights)."""
  from pathways import registry  # pylint: disable=g-import-not-at-top
  from pathways.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  tasks = [registry.get_task(n) for n in config.tasks]
  d = config.data
  pipe = pipeline_lib.MultitaskPipeline(tasks, d.batch_size, mixture=d.mixture,
                                        temperature=d.temperature, data_dir=d.data_dir or None)
  groups = {}
  for t, w in zip(tasks, pipe.weights):
    g = groups.setdefault(task_tokens(t, config.model.patch), {'tasks': [], 'weight': 0.0})
    g['tasks'].append(t.name)
    g['weight'] += float(w)
  out = []
  for tokens, g in sorted(groups.items(), reverse=True):
    batch = max(1, round(d.batch_size * g['weight']))
    out.append({'tokens': tokens, 'tasks': g['tasks'], 'batch_size': batch})
  return out


def arm_configs(config) -> dict:
  """{'packed': config, 'bucket<L>': config per bucket}."""
  packed = copy.deepcopy(config)
  packed.model.pack = True
  arms = {'packed': packed}
  for b in buckets(config):
    c = copy.deepcopy(config)
    c.tasks = tuple(b['tasks'])
    c.data.batch_size = b['batch_size']
    c.model.pack = False
    arms[f"bucket{b['tokens']}"] = c
  return arms


def summarize(rows: list[dict]) -> dict:
  """Per arm ('packed', 'buckets'): ms per example (medians over rounds), model FLOPs per
  example, real-token fraction and MFU; `buckets_over_packed`."""
  by_arm = {}
  for r in rows:
    by_arm.setdefault(r['arm'], []).append(r)

  def med(arm, key):
    return statistics.median(r[key] for r in by_arm[arm])

  def totals(arms):
    ms = sum(med(a, 'step_ms_median') for a in arms)
    examples = sum(by_arm[a][0]['examples_per_step'] for a in arms)
    flops = sum(by_arm[a][0]['model_flops_per_step'] for a in arms)
    tokens = sum(by_arm[a][0]['tokens_per_step'] for a in arms)
    slots = sum(by_arm[a][0]['computed_token_slots_per_step'] for a in arms)
    peak = by_arm[arms[0]][0]['peak_flops_per_device']
    return {'arms': {a: {'step_ms': med(a, 'step_ms_median'),
                         'examples_per_step': by_arm[a][0]['examples_per_step'],
                         'tasks': by_arm[a][0]['tasks']} for a in arms},
            'ms_per_example': ms / examples, 'examples': examples,
            'model_flops_per_example': flops / examples, 'real_token_fraction': tokens / slots,
            'mfu': flops / (ms / 1e3) / peak, 'steps_per_round': len(arms)}

  bucket_arms = sorted((a for a in by_arm if a.startswith('bucket')),
                       key=lambda a: -int(a[len('bucket'):]))
  out = {'packed': totals(['packed']), 'buckets': totals(bucket_arms),
         'rounds': max(r['round'] for r in rows) + 1}
  out['buckets_over_packed'] = out['buckets']['ms_per_example'] / out['packed']['ms_per_example']
  return out


def main(argv):
  name = start_lib.start(argv)
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  if FLAGS.variant not in benchmark_lib.VARIANTS:
    raise app.UsageError(f'--variant={FLAGS.variant!r}: must be one of '
                         f'{benchmark_lib.VARIANTS}')
  if FLAGS.rounds < 1:
    raise app.UsageError(f'--rounds={FLAGS.rounds}: must be at least 1')
  named = {'config': name, 'overrides': config_flags.get_override_values(FLAGS['config'])}
  arms = arm_configs(FLAGS.config)
  rows = []
  with open(FLAGS.out, 'w') if FLAGS.out else contextlib.nullcontext() as out:
    def emit(obj):
      line = json.dumps(obj)
      for stream in [sys.stdout] + ([out] if out else []):
        print(line, file=stream, flush=True)
    for rnd in range(FLAGS.rounds):
      for arm, config in arms.items():
        row = benchmark_lib.benchmark(copy.deepcopy(config), FLAGS.variant, steps=FLAGS.steps,
                                      repeats=FLAGS.repeats, warmup=FLAGS.warmup,
                                      num_batches=FLAGS.batches)
        row = dict(named, arm=arm, round=rnd, tasks=list(config.tasks), **row)
        rows.append(row)
        emit(row)  # each row as it comes: a crash keeps the earlier ones
    emit({'summary': summarize(rows)})


if __name__ == '__main__':
  define_flags()
  app.run(main)
