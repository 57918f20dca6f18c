"""Reference result 1: more experts keep helping at the same active compute.

  python -m experiments.reference.more_experts --workdir=workdirs/more_experts \
      [--experts=4,16,64] [--seeds=0,1,2] [--steps=300] [--upcycle_steps=100]

Trains `experiments/configs/more_experts.py` on `pycode_lm_full` for every (row, seed) in its
own sub-workdir (an interrupted sweep resumes: finished runs are read back, a cut run resumes
from its checkpoint):

  * dense (E=1), fine-grained + shared experts at each E, coarse top-1 at the largest E;
  * upcycling: from each dense run, `--upcycle_steps` more steps of (a) the dense model and
    (b) the upcycled MoE (every expert a copy of the dense FFN), both with `init_from`.

Then writes workdir/summary.json (every run's final evaluation loss, FLOPs per token and
expert parameters; mean, standard error and range per row; `claims`, each with its target,
the measured numbers and `met` computed here from them) and workdir/loss_vs_experts.png.
The targets were set before the runs:

  * more_experts_monotone: the mean loss falls at every step dense -> E=4 -> 16 -> 64
    (fine-grained + shared).
  * largest_beats_dense_every_seed: every E=64 seed below every dense seed.
  * upcycled_beats_dense_continued: after the same extra steps, the upcycled model's mean
    loss is below the continued dense model's, and lower on every seed.
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags

from experiments.reference import common

FLAGS = flags.FLAGS
TASK = 'pycode_lm_full'
LENGTH = 128  # window bytes


def define_flags():
  """Only when run as a program (tests import the sweeps into one process)."""
  flags.DEFINE_string('workdir', None, 'Folder for the sweep.')
  flags.DEFINE_list('experts', ['4', '16', '64'], 'Routed experts of the fine-grained rows.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds per row.')
  flags.DEFINE_integer('steps', 300, 'Training steps per run.')
  flags.DEFINE_integer('upcycle_steps', 100, 'Extra steps of the upcycling comparison.')
  flags.mark_flags_as_required(['workdir'])


def rows(experts) -> list[tuple[str, str, int]]:
  """(row name, config arm, E): dense, fine-grained at every E, coarse at the largest."""
  out = [('dense', 'dense', 1)]
  out += [(f'fine_E{e}', 'fine', e) for e in experts]
  out.append((f'coarse_E{max(experts)}', 'coarse', max(experts)))
  return out


def expert_params(config) -> int:
  """Parameters of the feed-forward blocks (routed, shared or dense), all layers."""
  m = config.model
  if not m.moe_every:
    return m.num_layers * 2 * m.d_model * m.mlp_hidden
  g = m.moe.get('granularity', 1)
  hidden = sum(e * f for e, f in m.moe.banks)  # unchanged by granularity: E*G x F/G
  shared = m.moe.get('shared_experts', 0) * (m.moe.get('shared_hidden') or m.moe.banks[0][1] // g)
  return m.num_layers * 2 * m.d_model * (hidden + shared)


def run_one(workdir, row, arm, experts, seed, steps, init_from='', warmup=25):
  from experiments.configs import more_experts  # pylint: disable=g-import-not-at-top
  config = more_experts.get_config(f'arm={arm},experts={experts},seed={seed},steps={steps},'
                                   f'warmup={warmup}')
  config.init_from = init_from
  row_, seconds = common.train(config, workdir)
  return {'row': row, 'arm': arm, 'experts': experts, 'seed': seed, 'steps': steps,
          'init_from': os.path.basename(init_from) if init_from else '',
          'eval_loss': row_[f'eval/{TASK}/loss'],
          'eval_accuracy': row_[f'eval/{TASK}/accuracy'],
          'flops_per_token': row_[f'eval/{TASK}/flops_per_example'] / LENGTH,
          'ffn_params': expert_params(config), 'train_seconds': seconds}


def summarize(runs) -> dict:
  """Per row: mean, standard error, min, max of the evaluation loss; FLOPs and parameters."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = {}
  for name in dict.fromkeys(r['row'] for r in runs):
    mine = [r for r in runs if r['row'] == name]
    out[name] = dict(common.spread([r['eval_loss'] for r in mine], 'loss', 'losses'),
                     experts=mine[0]['experts'],
                     flops_per_token=float(np.mean([r['flops_per_token'] for r in mine])),
                     ffn_params=mine[0]['ffn_params'])
  return out


def claims(summary, runs, experts) -> list[dict]:
  """The targets, each with the numbers it was judged on and `met` computed from them."""
  chain = ['dense'] + [f'fine_E{e}' for e in sorted(experts)]
  means = [summary[r]['mean_loss'] for r in chain if r in summary]
  out = [{'name': 'more_experts_monotone',
          'target': 'mean eval loss falls at every step ' + ' > '.join(chain),
          'measured': dict(zip(chain, means)),
          'met': len(means) == len(chain) and all(a > b for a, b in zip(means, means[1:]))}]
  big = f'fine_E{max(experts)}'
  if big in summary and 'dense' in summary:
    worst_big, best_dense = max(summary[big]['losses']), min(summary['dense']['losses'])
    out.append({'name': 'largest_beats_dense_every_seed',
                'target': f'every {big} seed below every dense seed',
                'measured': {'max ' + big: worst_big, 'min dense': best_dense},
                'met': worst_big < best_dense})
  up = {r['seed']: r['eval_loss'] for r in runs if r['row'] == 'upcycled'}
  cont = {r['seed']: r['eval_loss'] for r in runs if r['row'] == 'dense_continued'}
  seeds = sorted(set(up) & set(cont))
  if seeds:
    mean_up = sum(up[s] for s in seeds) / len(seeds)
    mean_cont = sum(cont[s] for s in seeds) / len(seeds)
    out.append({'name': 'upcycled_beats_dense_continued',
                'target': 'upcycled mean loss below the continued dense model\'s after the same '
                          'extra steps, and lower on every seed',
                'measured': {'upcycled': mean_up, 'dense_continued': mean_cont,
                             'per_seed_difference': {str(s): up[s] - cont[s] for s in seeds}},
                'met': mean_up < mean_cont and all(up[s] < cont[s] for s in seeds)})
  return out


def plot(runs, summary, path):
  fig, ax = common.figure()
  colors = {'dense': 'black', 'fine': 'tab:blue', 'coarse': 'tab:red'}
  for arm, label in (('dense', 'dense FFN'), ('fine', 'fine-grained + shared'),
                     ('coarse', 'coarse top-1')):
    mine = [r for r in runs if r['arm'] == arm and not r['init_from']]
    if not mine:
      continue
    ax.scatter([r['experts'] for r in mine], [r['eval_loss'] for r in mine], s=14, alpha=0.5,
               color=colors[arm])
    names = [n for n in summary if n == arm or n.startswith(arm + '_E')]
    es = [summary[n]['experts'] for n in names]
    ax.errorbar(es, [summary[n]['mean_loss'] for n in names],
                yerr=[summary[n]['stderr'] or 0 for n in names], marker='o', color=colors[arm],
                label=label, capsize=3)
  if 'dense' in summary:  # the fine-grained line starts from the dense point
    fine = [n for n in summary if n.startswith('fine_E')]
    if fine:
      ax.plot([1, summary[fine[0]]['experts']],
              [summary['dense']['mean_loss'], summary[fine[0]]['mean_loss']],
              color=colors['fine'], linestyle=':')
  ax.set_xscale('log', base=2)
  ax.set_xlabel('experts per MoE layer (same FFN FLOPs per token)')
  ax.set_ylabel(f'{TASK} eval loss (nats/byte)')
  ax.set_title('mean and standard error over seeds; dots: single seeds', fontsize=8)
  ax.legend(fontsize=8)
  common.save(fig, path)


def sweep(workdir, experts, seeds, steps, upcycle_steps) -> dict:
  runs = []
  for name, arm, e in rows(experts):
    for seed in seeds:
      print(f'== {name} seed={seed}', flush=True)
      runs.append(run_one(os.path.join(workdir, f'{name}_seed{seed}'), name, arm, e, seed,
                          steps))
      print(json.dumps(runs[-1]), flush=True)
  if upcycle_steps:
    for seed in seeds:
      base = os.path.abspath(os.path.join(workdir, f'dense_seed{seed}'))
      for name, arm, e in (('dense_continued', 'dense', 1), ('upcycled', 'upcycled', 8)):
        print(f'== {name} seed={seed}', flush=True)
        runs.append(run_one(os.path.join(workdir, f'{name}_seed{seed}'), name, arm, e, seed,
                            upcycle_steps, init_from=base, warmup=0))
        print(json.dumps(runs[-1]), flush=True)
  summary = summarize(runs)
  result = {'task': TASK, 'steps': steps, 'upcycle_steps': upcycle_steps,
            'seeds': list(seeds), 'by_row': summary, 'runs': runs,
            'claims': claims(summary, runs, experts)}
  common.write_summary(workdir, result)
  plot(runs, summary, os.path.join(workdir, 'loss_vs_experts.png'))
  return result


def main(argv):
  del argv
  common.start(FLAGS.workdir)
  result = sweep(FLAGS.workdir, [int(v) for v in FLAGS.experts], [int(v) for v in FLAGS.seeds],
                 FLAGS.steps, FLAGS.upcycle_steps)
  print(json.dumps({'by_row': {k: {m: v[m] for m in ('mean_loss', 'stderr', 'min_loss',
                                                     'max_loss', 'flops_per_token')}
                               for k, v in result['by_row'].items()},
                    'claims': result['claims']}, indent=1))


if __name__ == '__main__':
  define_flags()
  app.run(main)
