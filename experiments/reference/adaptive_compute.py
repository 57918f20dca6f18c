"""Reference result: compute follows difficulty (ACT / PonderNet) on parity and addition.

  python -m experiments.reference.adaptive_compute --workdir=workdirs/adaptive_compute \
      [--tasks=parity,addition] [--ponder_costs=0.001,0.003] [--seeds=0] [--steps=0]

For every task and seed, trains `experiments/configs/adaptive_compute.py` at fixed depth
(halting off) and with halting on at each ponder cost (sub-workdirs `<task>_fixed_seed<S>`,
`<task>_halting_ponder<C>_seed<S>`; an interrupted sweep resumes). A task that does not
halt (per-position: `addition`) gets one halting run, at the first ponder cost, which has
nothing to weigh there. Then runs every model over the config's evaluation batches (the
examples of the trainer's final evaluation) and records per example its difficulty, its
correct targets, the FLOPs it spent, the FLOPs the same model spends running every layer,
and the layers it ran. Writes workdir/results.json (per run: accuracy and FLOPs per
example, overall and by difficulty; per task and ponder cost: the FLOPs saved, 1 - halting
/ fixed, and `claim`, true only where both models reach chance + MARGIN and the halting
model is within ACCURACY_TOLERANCE of the fixed one, with the reasons where not) and
workdir/adaptive_compute.png (FLOPs per example against difficulty, one panel per task).
"""
from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
from absl import logging

import numpy as np

from experiments.reference import common
from pathways import heads
from pathways import registry

FLAGS = flags.FLAGS

# Chance of the evaluation's accuracy: parity is 2 balanced classes; addition is scored
# per target position (the sum's digits), where a uniform guess among the 10 digits is
# right 1 time in 10.
CHANCE = {'parity': 0.5, 'addition': 0.1}
MARGIN = 0.15  # "well above chance": at least chance + MARGIN, both models
ACCURACY_TOLERANCE = 0.02  # "equal accuracy": halting at most this far below fixed depth


def define_flags():
  """Only when run as a program (tests import several sweeps into one process)."""
  flags.DEFINE_string('workdir', None, 'Folder for the sweep.')
  flags.DEFINE_list('tasks', ['parity', 'addition'], 'Tasks, one model each.')
  flags.DEFINE_list('ponder_costs', ['0.001', '0.003'], 'Ponder costs of the halting runs.')
  flags.DEFINE_list('seeds', ['0'], 'Seeds per task and setting.')
  flags.DEFINE_integer('steps', 0, 'Training steps per run (0: the config\'s, per task).')
  flags.mark_flags_as_required(['workdir'])


def config_for(task, ponder, seed, steps=0, overrides=None):
  """The run's config, halting off where `ponder` is None; `overrides` ({'model.d_model':
  16, ...}) shrink it for tests."""
  from experiments.configs import adaptive_compute  # pylint: disable=g-import-not-at-top
  arg = (f'task={task},seed={seed},' + ('halting=0' if ponder is None else f'ponder={ponder}')
         + (f',steps={steps}' if steps else ''))
  config = adaptive_compute.get_config(arg)
  if overrides:
    config.update_from_flattened_dict(dict(overrides))
  return config


def examples(workdir) -> dict:
  """Per-example record of a finished single-task run over its evaluation batches:
  'difficulty', 'correct' and 'targets' (1 and 1 for a class; correct positions and target
  positions per row for a per-position task), 'flops', 'full_depth_flops' (the same model
  running every layer), 'depth' (layers run)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from pathways.train import evaluate_workdir  # pylint: disable=g-import-not-at-top

  loaded = evaluate_workdir.load_workdir(workdir)
  config, graphdef, state = loaded.config, loaded.experiment.model_graphdef, loaded.model_state
  model = loaded.model()
  (task,) = loaded.tasks
  rows = np.asarray(model.layout.task_rows(0))

  @jax.jit
  def forward(state, batch):
    m = nnx.merge(graphdef, state)
    out = m(batch, deterministic=True)
    full = out.flops_per_example
    if m.halting:  # the same weights and examples through every layer
      m.halting = False
      full = m(batch, deterministic=True).flops_per_example
    halt = None if out.halting is None else out.halting.layer_B
    return out.logits[task.name], out.flops_per_example, halt, full

  pipe = loaded.experiment.eval_pipeline()
  parts = []
  with jax.set_mesh(loaded.experiment.mesh):
    for _ in range(config.train.eval_batches):
      batch = next(pipe)
      logits, flops, halt, full = jax.device_get(forward(state, batch))
      guess = np.asarray(logits).argmax(-1)
      if model.pooled[0]:
        correct = (guess == np.asarray(batch['label'])[rows]).astype(np.float64)
        targets = np.ones_like(correct)
        depth = (np.full(len(rows), float(len(model.blocks))) if halt is None
                 else halt[rows] + 1.0)
      else:  # per position: every layer runs
        t = np.asarray(batch['targets'])[np.searchsorted(model.layout.rows['bytes'], rows)]
        correct = ((guess == t) & (t >= 0)).sum(-1).astype(np.float64)
        targets = (t >= 0).sum(-1).astype(np.float64)
        depth = np.full(len(rows), float(len(model.blocks)))
      keep = np.asarray(batch['weight'])[rows] > 0
      parts.append({'difficulty': np.asarray(batch['difficulty'])[rows], 'correct': correct,
                    'targets': targets, 'flops': np.asarray(flops)[rows],
                    'full_depth_flops': np.asarray(full)[rows], 'depth': depth})
      parts[-1] = {k: v[keep] for k, v in parts[-1].items()}
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _stats(ex, sel):
  return {'examples': int(sel.sum()),
          'accuracy': float(ex['correct'][sel].sum() / max(ex['targets'][sel].sum(), 1.0)),
          'exact_match': float(np.mean(ex['correct'][sel] == ex['targets'][sel])),
          'flops_per_example': float(ex['flops'][sel].mean()),
          'full_depth_flops_per_example': float(ex['full_depth_flops'][sel].mean()),
          'depth': float(ex['depth'][sel].mean())}


def summarize_run(ex) -> dict:
  """Accuracy (correct targets / targets: per example for a class, per position for a
  per-position task), exact match (every target of the example right), FLOPs and layers
  run: overall, by difficulty, and the rank correlation of FLOPs and of depth with
  difficulty (None where one is constant). (The trainer's per-position accuracy averages
  each batch's, weighted by examples, so it can differ from this one in the 4th digit.)"""
  from pathways.analysis import routing_stats  # pylint: disable=g-import-not-at-top
  out = _stats(ex, np.ones(len(ex['difficulty']), bool))
  for key in ('flops', 'depth'):
    rho = routing_stats.spearman(ex['difficulty'], ex[key])
    out[f'{key}_difficulty_spearman'] = float(rho) if np.isfinite(rho) else None
  out['by_difficulty'] = {str(int(d)): _stats(ex, ex['difficulty'] == d)
                          for d in np.unique(ex['difficulty'])}
  return out


def compare(task, halting_runs, fixed_runs) -> dict:
  """The halting model against the fixed-depth one (means over seeds): FLOPs saved and
  whether the saving is claimed, with the reason when it is not."""
  mean = lambda runs, key: float(np.mean([r[key] for r in runs]))  # noqa: E731
  acc_h, acc_f = mean(halting_runs, 'accuracy'), mean(fixed_runs, 'accuracy')
  flops_h, flops_f = mean(halting_runs, 'flops_per_example'), mean(fixed_runs, 'flops_per_example')
  threshold = CHANCE[task] + MARGIN
  lowest = min(r['accuracy'] for r in halting_runs + fixed_runs)
  by_d = {}
  for d in halting_runs[0]['by_difficulty']:
    h = float(np.mean([r['by_difficulty'][d]['flops_per_example'] for r in halting_runs]))
    f = float(np.mean([r['by_difficulty'][d]['flops_per_example'] for r in fixed_runs]))
    by_d[d] = {'halting_flops_per_example': h, 'fixed_flops_per_example': f,
               'flops_saved': 1.0 - h / f,
               'halting_accuracy': float(np.mean([r['by_difficulty'][d]['accuracy']
                                                  for r in halting_runs])),
               'fixed_accuracy': float(np.mean([r['by_difficulty'][d]['accuracy']
                                                for r in fixed_runs])),
               'halting_depth': float(np.mean([r['by_difficulty'][d]['depth']
                                               for r in halting_runs]))}
  saved = 1.0 - flops_h / flops_f
  reasons = []
  if lowest < threshold:
    reasons.append(f'an accuracy ({lowest:.3f}) is below chance + margin ({threshold:.3f})')
  if acc_h < acc_f - ACCURACY_TOLERANCE:
    reasons.append(f'halting accuracy {acc_h:.3f} is more than {ACCURACY_TOLERANCE} below '
                   f'fixed depth {acc_f:.3f}')
  if saved <= 0:
    reasons.append('no FLOPs saved')
  return {'chance': CHANCE[task], 'threshold': threshold, 'seeds': len(halting_runs),
          'halting_accuracy': acc_h, 'fixed_accuracy': acc_f,
          'halting_flops_per_example': flops_h, 'fixed_flops_per_example': flops_f,
          'flops_saved': saved, 'halting_depth': mean(halting_runs, 'depth'),
          'halting_flops_difficulty_spearman': _mean_or_none(halting_runs,
                                                             'flops_difficulty_spearman'),
          'halting_depth_difficulty_spearman': _mean_or_none(halting_runs,
                                                             'depth_difficulty_spearman'),
          'by_difficulty': by_d, 'claim': not reasons, 'not_claimed_because': reasons}


def _mean_or_none(runs, key):
  values = [r[key] for r in runs]
  return None if None in values else float(np.mean(values))


def sweep(workdir, tasks, seeds, ponder_costs, steps=0, overrides=None) -> dict:
  """Trains (or reads back) every run, evaluates it per example; returns the results."""
  start = time.time()
  runs = []
  for task in tasks:
    halts = heads.get(registry.get_task(task).head).pooled
    for seed in seeds:
      for ponder in [None] + list(ponder_costs if halts else ponder_costs[:1]):
        name = (f'{task}_fixed_seed{seed}' if ponder is None else
                f'{task}_halting_ponder{ponder}_seed{seed}')
        print(f'== {name}', flush=True)
        config = config_for(task, ponder, seed, steps, overrides)
        sub = os.path.join(workdir, name)
        row, seconds = common.train(config, sub)
        run = dict(summarize_run(examples(sub)), task=task, seed=seed,
                   halting=ponder is not None, ponder_cost=ponder,
                   steps=config.train.num_steps, batch_size=config.data.batch_size,
                   trainer_accuracy=row[f'eval/{task}/accuracy'],
                   trainer_flops_per_example=row[f'eval/{task}/flops_per_example'],
                   train_seconds=seconds)
        runs.append(run)
        print(json.dumps({k: v for k, v in run.items() if k != 'by_difficulty'}), flush=True)
  result = {'margin': MARGIN, 'accuracy_tolerance': ACCURACY_TOLERANCE, 'runs': runs,
            'tasks': {}}
  for task in tasks:
    mine = [r for r in runs if r['task'] == task]
    fixed = [r for r in mine if not r['halting']]
    by_ponder = {str(p): compare(task, [r for r in mine if r['ponder_cost'] == p], fixed)
                 for p in dict.fromkeys(r['ponder_cost'] for r in mine if r['halting'])}
    result['tasks'][task] = {
        'halts': heads.get(registry.get_task(task).head).pooled,
        'by_ponder_cost': by_ponder, 'claim': any(c['claim'] for c in by_ponder.values())}
  result['wall_seconds'] = time.time() - start
  return result


def plot(result, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(result['tasks'])
  fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.8), squeeze=False)
  for ax, name in zip(axes[0], names):
    comparisons = result['tasks'][name]['by_ponder_cost']
    first = next(iter(comparisons.values()))
    ds = sorted(first['by_difficulty'], key=int)
    x = [int(d) for d in ds]
    ax.plot(x, [first['by_difficulty'][d]['fixed_flops_per_example'] for d in ds], marker='s',
            color='k', label=f"fixed depth (accuracy {first['fixed_accuracy']:.3f})")
    depth_ax = ax.twinx()
    for ponder, c in comparisons.items():
      line, = ax.plot(x, [c['by_difficulty'][d]['halting_flops_per_example'] for d in ds],
                      marker='o', label=f"halting, ponder {ponder} (accuracy "
                                        f"{c['halting_accuracy']:.3f}; {c['flops_saved']:.0%} "
                                        f"saved{', claimed' if c['claim'] else ''})")
      depth_ax.plot(x, [c['by_difficulty'][d]['halting_depth'] for d in ds], linestyle=':',
                    color=line.get_color())
    depth_ax.set_ylim(bottom=0)
    depth_ax.set_ylabel('layers run (dotted)')
    ax.set_xlabel('difficulty (bits)' if name == 'parity' else 'difficulty (digits)')
    ax.set_ylabel('FLOPs per example')
    ax.set_title(f'{name}: FLOPs per example against difficulty', fontsize=10)
    ax.legend(fontsize=7, loc='upper left')
  common.save(fig, path)


def write(result, workdir):
  """workdir/results.json and workdir/adaptive_compute.png."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(result, f, indent=1)
  plot(result, os.path.join(workdir, 'adaptive_compute.png'))


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  registry.discover()
  result = sweep(FLAGS.workdir, FLAGS.tasks, [int(s) for s in FLAGS.seeds],
                 [float(c) for c in FLAGS.ponder_costs], FLAGS.steps)
  write(result, FLAGS.workdir)
  print(json.dumps({n: {p: {k: v for k, v in c.items() if k != 'by_difficulty'}
                        for p, c in t['by_ponder_cost'].items()}
                    for n, t in result['tasks'].items()}, indent=1))

if __name__ == '__main__':
  define_flags()
  app.run(main)
