"""Reference result: more experts at the same active compute lower the loss.

  python -m experiments.reference.more_experts --workdir=workdirs/more_experts \
      [--experts=1,4,16,64] [--seeds=0,1] [--steps=400]

Trains `experiments/configs/more_experts.py` for every (E, seed) in its own sub-workdir
(an interrupted sweep resumes: finished runs are read back, a cut run resumes from its
checkpoint), then writes workdir/results.json (every run's final evaluation loss,
accuracy, FLOPs per token and expert parameters; mean and spread per E) and
workdir/loss_vs_experts.png.
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging

from experiments.reference import common
from pathways import registry

FLAGS = flags.FLAGS


def define_flags():
  """Only when run as a program (tests import both sweeps into one process)."""
  flags.DEFINE_string('workdir', None, 'Folder for the sweep.')
  flags.DEFINE_list('experts', ['1', '4', '16', '64'], 'Experts per MoE layer (1 = dense).')
  flags.DEFINE_list('seeds', ['0', '1'], 'Seeds per E.')
  flags.DEFINE_integer('steps', 400, 'Training steps per run.')
  flags.mark_flags_as_required(['workdir'])


TASK = 'pycode_lm'


def run_one(workdir, experts, seed, steps):
  from experiments.configs import more_experts  # pylint: disable=g-import-not-at-top
  config = more_experts.get_config(f'experts={experts},seed={seed},steps={steps}')
  row, seconds = common.train(config, workdir)
  m = config.model
  length = 128  # pycode_lm windows
  return {'experts': experts, 'seed': seed, 'steps': steps,
          'eval_loss': row[f'eval/{TASK}/loss'], 'eval_accuracy': row[f'eval/{TASK}/accuracy'],
          'flops_per_token': row[f'eval/{TASK}/flops_per_example'] / length,
          'expert_params': m.num_layers * experts * 2 * m.d_model * m.moe.banks[0][1],
          'train_seconds': seconds}


def summarize(runs):
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = {}
  for e in sorted({r['experts'] for r in runs}):
    losses = [r['eval_loss'] for r in runs if r['experts'] == e]
    out[str(e)] = {'mean_loss': float(np.mean(losses)), 'min_loss': float(min(losses)),
                   'max_loss': float(max(losses)), 'seeds': len(losses),
                   'flops_per_token': float(np.mean([r['flops_per_token'] for r in runs
                                                     if r['experts'] == e]))}
  return out


def plot(runs, summary, path):
  fig, ax = common.figure()
  ax.scatter([r['experts'] for r in runs], [r['eval_loss'] for r in runs], s=16, alpha=0.6,
             label='one seed')
  es = sorted(int(e) for e in summary)
  ax.plot(es, [summary[str(e)]['mean_loss'] for e in es], marker='o', label='mean')
  ax.set_xscale('log', base=2)
  ax.set_xticks(es, [str(e) for e in es])
  ax.set_xlabel('experts per MoE layer (top-1, same FLOPs per token)')
  ax.set_ylabel(f'{TASK} eval loss (nats/byte)')
  ax.legend()
  common.save(fig, path)


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  registry.discover()
  os.makedirs(FLAGS.workdir, exist_ok=True)
  runs = []
  for e in (int(v) for v in FLAGS.experts):
    for seed in (int(v) for v in FLAGS.seeds):
      print(f'== E={e} seed={seed}', flush=True)
      runs.append(run_one(os.path.join(FLAGS.workdir, f'E{e}_seed{seed}'), e, seed,
                          FLAGS.steps))
      print(json.dumps(runs[-1]), flush=True)
  summary = summarize(runs)
  result = {'task': TASK, 'runs': runs, 'by_experts': summary}
  with open(os.path.join(FLAGS.workdir, 'results.json'), 'w') as f:
    json.dump(result, f, indent=1)
  plot(runs, summary, os.path.join(FLAGS.workdir, 'loss_vs_experts.png'))
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  define_flags()
  app.run(main)
