"""Reference result 5b: related low-data alphabets help each other in one model.

  python -m experiments.reference.glyph_family --workdir=workdirs/glyph_family \
      [--examples=5] [--seeds=0,1,2] [--steps=300] [--rich=latin]

For each seed, `experiments/configs/glyph_family.py` in two arms: Latin, Greek and Cyrillic
capitals (`glyphs_<alphabet>_<examples>`: that many training images per class) in one model
(shared), and each alphabet alone with the same images, rows of it per batch and steps
(single). Every run is evaluated every 25 steps on 288 validation images per task (fonts never
trained on) with its checkpoints kept; for each task the step of the highest validation
accuracy is chosen (ties: the earliest) and evaluated on TEST_EXAMPLES test images (other
fonts never trained on). The same selection in both arms, fixed before the runs. Each run is
its own sub-workdir; an interrupted sweep resumes.

With --rich=ALPHABET (result 5c) that alphabet trains in the shared arm from all its
training images beside the other two at 5 per class (a data-rich relative, as the code model
is in result 5); the single arms and the claim are the two low-data alphabets.

Writes workdir/summary.json (per run and task: validation curve, chosen step, test accuracy
and loss; per task and arm: mean, standard error, range; `claims` computed here) and
workdir/glyph_family.png. Target (set before the runs):
  * shared_beats_single: over the three low-data alphabets, the shared model's mean test
    accuracy at least 5 points above the single-task models' on average, 3 seeds, at least
    1,000 test images per task.
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags

from experiments.reference import common
from experiments.reference import new_task

FLAGS = flags.FLAGS
TEST_EXAMPLES = 1024
TARGET_GAIN = 0.05


def define_flags():
  """Only when run as a program (tests import the sweep into one process)."""
  flags.DEFINE_string('workdir', None, 'Folder for the runs.')
  flags.DEFINE_integer('examples', 5, 'Training images per class of every alphabet.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds.')
  flags.DEFINE_integer('steps', 300, 'Training steps of every run.')
  flags.DEFINE_enum('rich', '', ['', 'latin', 'greek', 'cyrillic'], 'An alphabet the shared '
                    'arm trains from all its training images beside the low-data ones '
                    '(result 5c); the claim covers the low-data alphabets only.')
  flags.mark_flags_as_required(['workdir'])


def _early_stopped(run_dir, tasks, batches) -> dict:
  """{task: (chosen step, validation curve, test metrics at that step)}; one test evaluation
  per distinct chosen step."""
  from pathways.train import metric_writer  # pylint: disable=g-import-not-at-top
  rows = metric_writer.read_metrics(run_dir)
  tested, out = {}, {}
  for task in tasks:
    step, curve = new_task.best_step(rows, task, 'accuracy')
    if step not in tested:
      tested[step] = new_task.test_loss(run_dir, step, batches)
    out[task] = (step, curve, tested[step])
  return out


def summarize(runs, tasks) -> dict:
  """Per task and arm the spread of test accuracy over seeds, and the gains."""
  by_task = {}
  for task in tasks:
    arms = {}
    for arm in ('single', 'shared'):
      acc = [r['test_accuracy'] for r in runs if r['task'] == task and r['arm'] == arm]
      if acc:
        arms[arm] = common.spread(acc, 'accuracy', 'accuracies')
    if len(arms) == 2:
      arms['gain'] = arms['shared']['mean_accuracy'] - arms['single']['mean_accuracy']
    by_task[task] = arms
  gains = [v['gain'] for v in by_task.values() if 'gain' in v]
  return {'by_task': by_task, 'mean_gain': sum(gains) / len(gains) if gains else None,
          'tasks_with_gain': len(gains)}


def claims(summary, runs, tasks) -> list[dict]:
  if summary['mean_gain'] is None:
    return []
  seeds = min(v[arm]['seeds'] for v in summary['by_task'].values() for arm in
              ('single', 'shared') if arm in v)
  test_min = min(r['test_examples'] for r in runs)
  return [{'name': 'shared_beats_single',
           'target': f'shared model\'s mean test accuracy >= {TARGET_GAIN:.2f} above the '
                     'single-task models\' on average over the low-data alphabets (same '
                     'images, rows, steps; early stopping by validation accuracy; 3 seeds; '
                     '>= 1000 test images per task)',
           'measured': {'mean_gain': summary['mean_gain'],
                        'gain_per_task': {t: summary['by_task'][t].get('gain') for t in tasks},
                        'seeds': seeds, 'test_examples_per_task': test_min},
           'met': (summary['mean_gain'] >= TARGET_GAIN and seeds >= 3
                   and summary['tasks_with_gain'] == len(tasks) and test_min >= 1000)}]


def plot(runs, summary, tasks, path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  fig, ax = common.figure()
  colors = {'single': 'tab:gray', 'shared': 'tab:blue'}
  x = np.arange(len(tasks))
  for j, arm in enumerate(('single', 'shared')):
    means = [summary['by_task'][t][arm]['mean_accuracy'] for t in tasks]
    errs = [summary['by_task'][t][arm]['stderr'] or 0 for t in tasks]
    ax.bar(x + (j - 0.5) * 0.38, means, 0.38, yerr=errs, color=colors[arm], capsize=3,
           label=arm)
    for i, t in enumerate(tasks):
      seeds = [r['test_accuracy'] for r in runs if r['task'] == t and r['arm'] == arm]
      ax.scatter([x[i] + (j - 0.5) * 0.38] * len(seeds), seeds, color='black', s=8, zorder=3)
  ax.set_xticks(x, [t.replace('glyphs_', '') for t in tasks])
  ax.set_ylabel('test accuracy (unseen fonts)')
  ax.set_title(f"alphabets alone vs together: mean gain {summary['mean_gain']:+.3f}",
               fontsize=9)
  ax.legend(fontsize=8)
  common.save(fig, path)


def sweep(workdir, examples, seeds, steps, rich='') -> dict:
  from experiments.configs import glyph_family  # pylint: disable=g-import-not-at-top
  tasks = glyph_family.tasks(examples, rich)
  batches = TEST_EXAMPLES // glyph_family.ROWS
  runs = []
  for seed in seeds:
    arms = [('shared', None)] + [('single', t) for t in tasks]
    for arm, only in arms:
      name = f'shared_seed{seed}' if arm == 'shared' else f'single_{only}_seed{seed}'
      print(f'== {name}', flush=True)
      run_dir = os.path.join(workdir, name)
      arg = f'arm={arm},seed={seed},steps={steps},examples={examples},rich={rich}' + (
          f',task={only}' if only else '')
      _, seconds = common.train(glyph_family.get_config(arg), run_dir)
      for task, (step, curve, result) in _early_stopped(run_dir, [only] if only else tasks,
                                                         batches).items():
        run = {'arm': arm, 'seed': seed, 'task': task, 'best_step': step,
               'validation_accuracy': curve,
               'test_accuracy': result[f'eval/{task}/accuracy'],
               'test_loss': result[f'eval/{task}/loss'],
               'test_examples': batches * glyph_family.ROWS, 'train_seconds': seconds}
        runs.append(run)
        print(json.dumps({k: v for k, v in run.items() if k != 'validation_accuracy'}),
              flush=True)
  summary = summarize(runs, tasks)
  result = {'tasks': list(tasks), 'rich': f'glyphs_{rich}' if rich else None,
            'examples_per_class': examples, 'steps': steps,
            'rows_per_task': glyph_family.ROWS, 'validation_examples': glyph_family.VALIDATION,
            'test_examples': TEST_EXAMPLES, 'selection': 'highest validation accuracy',
            **summary, 'runs': runs, 'claims': claims(summary, runs, tasks)}
  common.write_summary(workdir, result)
  plot(runs, summary, tasks, os.path.join(workdir, 'glyph_family.png'))
  return result


def main(argv):
  del argv
  common.start(FLAGS.workdir)
  result = sweep(FLAGS.workdir, FLAGS.examples, [int(s) for s in FLAGS.seeds], FLAGS.steps,
                 FLAGS.rich)
  print(json.dumps({'mean_gain': result['mean_gain'], 'claims': result['claims']}, indent=1))


if __name__ == '__main__':
  define_flags()
  app.run(main)
