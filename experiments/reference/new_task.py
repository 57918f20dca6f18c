"""Reference result 3: a new task learns from few examples by reusing shared components.

  python -m experiments.reference.new_task --workdir=workdirs/new_task \
      [--examples=100] [--seeds=0,1,2] [--steps=400]

Trains the base model (`experiments/configs/new_task.py`, arm=base: code language modelling
on the standard library without the packages email, xml and http), then, for each seed, the
four arms on the new task `pycode_lm_heldout_<examples>` (language modelling of those
packages from `--examples` training windows): scratch, probe (everything shared frozen),
grown (probe plus an adapter per layer grown for the task) and clones (probe plus clones of
the CLONES_PER_LAYER experts of each MoE layer that the task's first 4 batches route to most,
chosen on the model as the run starts: `pathways.train.clones`). Every arm is early-stopped the
same way: evaluated every 25 steps on 512 validation windows (held-out windows of the
packages' training files, never trained on), and the checkpoint with the lowest validation
loss is evaluated on the packages' test files (1024 windows, 131k bytes). Each run is its own
sub-workdir; an interrupted sweep resumes.

Writes workdir/summary.json (per run: validation curve, best step, test loss; per arm: mean,
standard error and range; `claims` with targets set before the runs and `met` computed here)
and workdir/new_task.png. Targets:
  * probe_beats_best_scratch: the probe's mean test loss at least 0.3 nats per byte below the
    early-stopped scratch model's, and every probe seed below every scratch seed.
  * grown_beats_probe: the grown arm's mean test loss below the probe's, and lower on every
    seed.
  * clones_beat_probe (added with the clones arm, before its runs): the same for the clones
    arm.
  * old_task_unchanged: every parameter the probe and grown runs took from the base is bit for
    bit the base's (the base task's function cannot have changed).
"""
from __future__ import annotations

import dataclasses
import json
import os

from absl import app
from absl import flags

from experiments.reference import common

FLAGS = flags.FLAGS
SOURCE = 'pycode_lm_heldout'
VALIDATION = 512  # windows of the source's train split after the training examples
# (tasks/few_shot.py's VALIDATION)
TEST_WINDOWS = 1024  # of the source's test split (pycode_lm_heldout has 1031)
ARMS = ('scratch', 'probe', 'grown', 'clones')
CLONES_PER_LAYER = 2  # the router's k


def register_few_shot(examples: int, source: str = SOURCE) -> str:
  """`<source>_<examples>` (`tasks/few_shot.py`): the first `examples` training windows;
  validation the next VALIDATION; test the source's test split."""
  from tasks import few_shot  # pylint: disable=g-import-not-at-top
  return few_shot.register(source, examples)


def config_for(arm: str, seed: int, steps: int, task: str, base_workdir: str):
  from experiments.configs import new_task as configs  # pylint: disable=g-import-not-at-top
  from pathways.train import clones  # pylint: disable=g-import-not-at-top
  c = configs.get_config(f'arm={arm},seed={seed},steps={steps},task={task}')
  if arm in ('probe', 'grown', 'clones'):
    c.init_from = os.path.abspath(base_workdir)
  if arm == 'clones':
    c.model.grown = clones.choose(c, task, batches=4, per_layer=CLONES_PER_LAYER)
  return c


def best_step(rows, task, metric: str = 'loss') -> tuple[int, list]:
  """(step of the best validation `metric`, [(step, value)]) from a run's logged rows: the
  lowest loss, or the highest accuracy; ties go to the earliest step."""
  key = f'eval/{task}/{metric}'
  curve = [(r['step'], r[key]) for r in rows if key in r]
  if not curve:
    raise ValueError('the run logged no evaluation')
  sign = 1 if metric == 'loss' else -1
  return min(curve, key=lambda p: (sign * p[1], p[0]))[0], curve


def test_loss(workdir: str, step: int, batches: int) -> dict:
  """The checkpoint of `step` evaluated on its task's test split."""
  import jax  # pylint: disable=g-import-not-at-top
  from pathways.train import evaluate_workdir  # pylint: disable=g-import-not-at-top
  from pathways.train import evaluation  # pylint: disable=g-import-not-at-top
  from pathways.train import experiment  # pylint: disable=g-import-not-at-top
  loaded = evaluate_workdir.load_workdir(workdir, checkpoint=str(step))
  exp = loaded.experiment
  tasks = [dataclasses.replace(t, splits=dict(t.splits, eval='test')) for t in exp.tasks]
  pipe = experiment.pipeline_from_config(exp.config, tasks, split='eval', seed_offset=1,
                                         **exp.data)
  with jax.set_mesh(exp.mesh):
    return evaluation.evaluate(evaluation.make_eval_step(exp.model_graphdef),
                               loaded.model_state, (next(pipe) for _ in range(batches)),
                               tasks=exp.tasks)


def shared_unchanged(base_workdir, workdir):
  """(equal, compared): every parameter the run took from the base, bitwise."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pathways.train import checkpoint  # pylint: disable=g-import-not-at-top
  base = checkpoint.saved_model(base_workdir)
  new = checkpoint.saved_model(workdir)
  common_paths = [p for p in new if p in base and np.shape(base[p]) == np.shape(new[p])
                  and '/rngs/' not in p and not p.startswith('budget')]
  equal = all(np.array_equal(np.asarray(base[p]), np.asarray(new[p])) for p in common_paths)
  return equal, len(common_paths)


def summarize(runs) -> dict:
  out = {}
  for arm in ARMS:
    losses = [r['test_loss'] for r in runs if r['arm'] == arm]
    if losses:
      out[arm] = common.spread(losses, 'loss', 'losses')
  return out


def claims(summary, runs) -> list[dict]:
  """The targets, each with the numbers it was judged on and `met` computed from them."""
  out = []
  by = {arm: {r['seed']: r['test_loss'] for r in runs if r['arm'] == arm} for arm in ARMS}
  if summary.get('probe') and summary.get('scratch'):
    gap = summary['scratch']['mean_loss'] - summary['probe']['mean_loss']
    out.append({'name': 'probe_beats_best_scratch',
                'target': 'probe mean test loss >= 0.3 nats/byte below the early-stopped '
                          'scratch model, every probe seed below every scratch seed',
                'measured': {'probe': summary['probe']['mean_loss'],
                             'scratch': summary['scratch']['mean_loss'], 'gap': gap,
                             'max probe': summary['probe']['max_loss'],
                             'min scratch': summary['scratch']['min_loss']},
                'met': gap >= 0.3 and summary['probe']['max_loss'] < summary['scratch'][
                    'min_loss']})
  for arm, name in (('grown', 'grown_beats_probe'), ('clones', 'clones_beat_probe')):
    seeds = sorted(set(by[arm]) & set(by['probe']))
    if seeds:
      mean_a = sum(by[arm][s] for s in seeds) / len(seeds)
      mean_p = sum(by['probe'][s] for s in seeds) / len(seeds)
      out.append({'name': name,
                  'target': f'{arm} mean test loss below the probe\'s, and lower on every seed',
                  'measured': {arm: mean_a, 'probe': mean_p, 'per_seed_difference': {
                      str(s): by[arm][s] - by['probe'][s] for s in seeds}},
                  'met': mean_a < mean_p and all(by[arm][s] < by['probe'][s] for s in seeds)})
  checked = [r for r in runs if r['arm'] != 'scratch']
  if checked:
    out.append({'name': 'old_task_unchanged',
                'target': 'every parameter the transfer runs took from the base is bitwise '
                          'the base\'s',
                'measured': {f"{r['arm']}_seed{r['seed']}": r['base_parameters_compared']
                             for r in checked},
                'met': all(r['base_parameters_unchanged'] for r in checked)})
  return out


def plot(runs, summary, path):
  arms = [a for a in ARMS if a in summary]
  fig, _ = common.early_stopping_figure(
      runs, summary, colors={'scratch': 'tab:gray', 'probe': 'tab:blue',
                                   'grown': 'tab:green', 'clones': 'tab:orange'},
      metric='loss', ylabel='test loss at the chosen step (nats/byte)',
      title='mean +- s.e. over seeds; dots: seeds',
      ylim=(min(summary[a]['min_loss'] for a in arms) - 0.3,
            max(summary[a]['max_loss'] for a in arms) + 0.1))
  common.save(fig, path)


def define_flags():
  """Only when run as a program (tests import the sweeps into one process)."""
  flags.DEFINE_string('workdir', None, 'Folder for the runs.')
  flags.DEFINE_integer('examples', 100, 'Training windows of the new task.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds of the new-task arms.')
  flags.DEFINE_integer('steps', 400, 'Training steps of every new-task run (batch 8).')
  flags.DEFINE_integer('base_steps', 600, 'Training steps of the base model (batch 32).')
  flags.mark_flags_as_required(['workdir'])


def sweep(workdir, examples, seeds, steps, base_steps) -> dict:
  from experiments.configs import new_task as configs  # pylint: disable=g-import-not-at-top
  from pathways.train import metric_writer  # pylint: disable=g-import-not-at-top
  base_workdir = os.path.join(workdir, 'base')
  print('== base', flush=True)
  common.train(configs.get_config(f'arm=base,steps={base_steps}'), base_workdir)
  task = register_few_shot(examples)
  runs = []
  for seed in seeds:
    for arm in ARMS:
      print(f'== {arm} seed={seed}', flush=True)
      run_dir = os.path.join(workdir, f'{arm}_seed{seed}')
      config = config_for(arm, seed, steps, task, base_workdir)
      _, seconds = common.train(config, run_dir)
      step, curve = best_step(metric_writer.read_metrics(run_dir), task)
      result = test_loss(run_dir, step, TEST_WINDOWS // config.data.batch_size)
      run = {'arm': arm, 'seed': seed, 'best_step': step, 'validation': curve,
             'test_loss': result[f'eval/{task}/loss'],
             'test_accuracy': result[f'eval/{task}/accuracy'], 'train_seconds': seconds}
      if arm != 'scratch':
        run['base_parameters_unchanged'], run['base_parameters_compared'] = shared_unchanged(
            base_workdir, run_dir)
      runs.append(run)
      print(json.dumps({k: v for k, v in run.items() if k != 'validation'}), flush=True)
  summary = summarize(runs)
  result = {'task': task, 'examples': examples, 'steps': steps, 'batch': 8,
            'base_steps': base_steps, 'validation_windows': VALIDATION,
            'test_windows': TEST_WINDOWS, 'by_arm': summary,
            'runs': runs, 'claims': claims(summary, runs)}
  common.write_summary(workdir, result)
  plot(runs, summary, os.path.join(workdir, 'new_task.png'))
  return result


def main(argv):
  del argv
  common.start(FLAGS.workdir)
  result = sweep(FLAGS.workdir, FLAGS.examples, [int(s) for s in FLAGS.seeds], FLAGS.steps,
                 FLAGS.base_steps)
  print(json.dumps({'by_arm': result['by_arm'], 'claims': result['claims']}, indent=1))


if __name__ == '__main__':
  define_flags()
  app.run(main)
