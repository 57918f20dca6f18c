"""Reference result 5: a low-data task gains from a related task trained beside it.

  python -m experiments.reference.multitask --workdir=workdirs/multitask_related \
      [--examples=200] [--seeds=0,1,2] [--steps=400]

For each seed, `experiments/configs/related_tasks.py` in two arms: the low-data task
`stdlib_package_<examples>` trained beside `pycode_lm_other` in one model (shared), and alone
with the same examples, rows per batch and steps (single). Both are early-stopped the same
way: evaluated every 25 steps on 512 validation snippets (the task's other training
snippets, never trained on), and the checkpoint with the lowest validation loss evaluated on
576 of the test split's 597 snippets (every package is among them). Each run is its own
sub-workdir; an interrupted sweep resumes.

Writes workdir/summary.json (per run: validation curve, chosen step, test accuracy and loss;
per arm: mean, standard error, range; `claims` computed here) and workdir/multitask.png.
Target (set before the runs):
  * shared_beats_single: the shared model's mean test accuracy on the low-data task at least
    5 points above the single-task model's, over 3 seeds, early-stopped by validation loss.
Added after the first runs chose steps 25-50 by validation loss (the models grow
overconfident long before their accuracy peaks), and reported as such: the same target
with the checkpoints chosen by validation accuracy (`..._selected_by_accuracy`), from the
same runs.
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags

from experiments.reference import common
from experiments.reference import new_task

FLAGS = flags.FLAGS
SOURCE = 'stdlib_package'
TEST_EXAMPLES = 576
ARMS = ('single', 'shared')


def summarize(runs, key: str = 'test_accuracy') -> dict:
  out = {}
  for arm in ARMS:
    acc = [r[key] for r in runs if r['arm'] == arm]
    if acc:
      out[arm] = common.spread(acc, 'accuracy', 'accuracies')
  return out


def claims(summary, name: str = 'shared_beats_single', how: str = '') -> list[dict]:
  if not (summary.get('shared') and summary.get('single')):
    return []
  gain = summary['shared']['mean_accuracy'] - summary['single']['mean_accuracy']
  return [{'name': name,
           'target': 'shared model\'s mean test accuracy on the low-data task >= 5 points '
                     'above the single-task model\'s (same examples, rows, steps; 3 seeds)'
                     + how,
           'measured': {'shared': summary['shared']['mean_accuracy'],
                        'single': summary['single']['mean_accuracy'], 'gain': gain,
                        'seeds': summary['shared']['seeds']},
           'met': gain >= 0.05 and summary['shared']['seeds'] >= 3}]


def plot(runs, summary, path, task):
  fig, ax = common.early_stopping_figure(
      runs, summary, colors={'single': 'tab:gray', 'shared': 'tab:blue'},
      metric='accuracy', ylabel='test accuracy at the chosen step',
      title=f'{task}: mean +- s.e.; dots: seeds; dotted: majority class')
  ax.axhline(0.253, color='black', lw=0.8, ls=':')  # the test split's majority class
  common.save(fig, path)


def define_flags():
  """Only when run as a program (tests import the sweeps into one process)."""
  flags.DEFINE_string('workdir', None, 'Folder for the runs.')
  flags.DEFINE_integer('examples', 200, 'Labelled training snippets of the low-data task.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds.')
  flags.DEFINE_integer('steps', 400, 'Training steps of every run.')
  flags.mark_flags_as_required(['workdir'])


def sweep(workdir, examples, seeds, steps) -> dict:
  from experiments.configs import related_tasks  # pylint: disable=g-import-not-at-top
  from pathways.train import metric_writer  # pylint: disable=g-import-not-at-top
  task = new_task.register_few_shot(examples, SOURCE)
  runs = []
  for seed in seeds:
    for arm in ARMS:
      print(f'== {arm} seed={seed}', flush=True)
      run_dir = os.path.join(workdir, f'{arm}_seed{seed}')
      config = related_tasks.get_config(f'arm={arm},seed={seed},steps={steps},task={task}')
      _, seconds = common.train(config, run_dir)
      rows = metric_writer.read_metrics(run_dir)
      step, curve = new_task.best_step(rows, task)
      result = new_task.test_loss(run_dir, step, TEST_EXAMPLES // related_tasks.ROWS)
      step_acc, curve_acc = new_task.best_step(rows, task, 'accuracy')
      result_acc = new_task.test_loss(run_dir, step_acc, TEST_EXAMPLES // related_tasks.ROWS)
      run = {'arm': arm, 'seed': seed, 'best_step': step, 'validation': curve,
             'test_accuracy': result[f'eval/{task}/accuracy'],
             'test_loss': result[f'eval/{task}/loss'], 'train_seconds': seconds,
             # post hoc (added after the loss-selected runs chose steps 25-50): selection by
             # validation accuracy, from the same runs' kept checkpoints
             'best_step_by_accuracy': step_acc, 'validation_accuracy': curve_acc,
             'test_accuracy_by_accuracy': result_acc[f'eval/{task}/accuracy']}
      runs.append(run)
      print(json.dumps({k: v for k, v in run.items() if k != 'validation'}), flush=True)
  summary = summarize(runs)
  by_accuracy = summarize(runs, 'test_accuracy_by_accuracy')
  result = {'task': task, 'related_task': related_tasks.RELATED, 'examples': examples,
            'steps': steps, 'rows_per_task': related_tasks.ROWS,
            'test_examples': TEST_EXAMPLES, 'by_arm': summary,
            'by_arm_selected_by_accuracy': by_accuracy, 'runs': runs,
            'claims': claims(summary, how='; early stopping by validation loss') + claims(
                by_accuracy, 'shared_beats_single_selected_by_accuracy',
                '; early stopping by validation accuracy (post hoc: chosen after the '
                'loss-selected runs stopped at steps 25-50)')}
  common.write_summary(workdir, result)
  plot(runs, summary, os.path.join(workdir, 'multitask.png'), task)
  return result


def main(argv):
  del argv
  common.start(FLAGS.workdir)
  result = sweep(FLAGS.workdir, FLAGS.examples, [int(s) for s in FLAGS.seeds], FLAGS.steps)
  print(json.dumps({'by_arm': result['by_arm'], 'claims': result['claims']}, indent=1))


if __name__ == '__main__':
  define_flags()
  app.run(main)
