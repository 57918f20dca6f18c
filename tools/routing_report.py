"""Routing report of a workdir: which experts each task uses, and what each example costs.

  python -m tools.routing_report --workdir=workdirs/multitask [--eval_batches=16] \
      [--over_time] [--baseline=OTHER_WORKDIR]

--over_time adds the training curves of the routing scalars from metrics.jsonl (with the
task-expert NMI the trainer logs at each evaluation: specialization over training);
--baseline puts another workdir's numbers beside these.

Runs the latest checkpoint over each task's evaluation data and writes, under --output
(default WORKDIR/report): routing_stats.json, PNG figures and index.html (self-contained:
figures are embedded, it opens from disk).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

from pathways import registry

FLAGS = flags.FLAGS


def _say(message):
  print(message, file=sys.stderr, flush=True)


def workdir_stats(workdir: str, eval_batches: int | None = None,
                  checkpoint: str = 'latest') -> dict:
  """The report's statistics of a workdir's checkpoint on its evaluation data."""
  from pathways.analysis import collect, summary  # pylint: disable=g-import-not-at-top
  from pathways.train import evaluate_workdir  # pylint: disable=g-import-not-at-top
  _say(f'loading {workdir} ({checkpoint} checkpoint)...')
  loaded = evaluate_workdir.load_workdir(workdir, checkpoint=checkpoint)
  exp = loaded.experiment
  pipe = exp.eval_pipeline()
  n = eval_batches or exp.config.train.eval_batches

  def batches():
    for i in range(n):
      _say(f'  routing evaluation batch {i + 1}/{n} (step {loaded.step})')
      yield next(pipe)

  record = collect.collect(exp.model_graphdef, loaded.model_state, batches())
  _say('  statistics (NMI with shuffled-task baselines)...')
  return dict(summary.summarize(record), step=loaded.step)


def write_report(workdir: str, output: str | None = None, eval_batches: int | None = None,
                 over_time: bool = False, baseline: str | None = None,
                 checkpoint: str = 'latest'):
  """Writes routing_stats.json, the PNGs and index.html; returns the statistics."""
  from pathways.analysis import report  # pylint: disable=g-import-not-at-top
  stats = workdir_stats(workdir, eval_batches, checkpoint)
  if baseline:
    stats['baseline'] = dict(workdir_stats(baseline, eval_batches, checkpoint),
                             workdir=baseline)
  _say('figures...')
  output = output or os.path.join(workdir, 'report')
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, 'routing_stats.json'), 'w') as f:
    json.dump(stats, f, indent=1)
  figures = report.figures(stats)
  if over_time:
    from pathways.train import metric_writer  # pylint: disable=g-import-not-at-top
    figures['over_time.png'] = report.over_time_figure(metric_writer.read_metrics(workdir))
  for name, data in figures.items():
    with open(os.path.join(output, name), 'wb') as f:
      f.write(data)
  with open(os.path.join(output, 'index.html'), 'w') as f:
    f.write(report.page(stats, figures, workdir, stats['step']))
  return stats


def define_flags():
  """The command-line flags (defined only when run as a program: tools import each other's
  functions in one process, and absl refuses a flag defined twice)."""
  flags.DEFINE_string('workdir', None, 'A training workdir.')
  flags.DEFINE_string('output', None, 'Report folder (default: WORKDIR/report).')
  flags.DEFINE_integer('eval_batches', None, 'Evaluation batches (default: the config\'s).')
  flags.DEFINE_multi_string('task_module', [], 'Python modules that register extra tasks.')
  flags.DEFINE_bool('over_time', False, 'Also plot the routing scalars across training.')
  flags.DEFINE_string('baseline', None, 'Another workdir to compare with, side by side.')
  flags.DEFINE_string('checkpoint', 'latest', "Which checkpoint: 'latest', 'best' or a step.")


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if not FLAGS.workdir:
    raise app.UsageError('--workdir is required.')
  registry.discover(task_modules=FLAGS.task_module)
  stats = write_report(FLAGS.workdir, FLAGS.output, FLAGS.eval_batches, FLAGS.over_time,
                       FLAGS.baseline, FLAGS.checkpoint)
  out = FLAGS.output or os.path.join(FLAGS.workdir, 'report')
  print(f"wrote {out}/index.html (step {stats['step']}); NMI per layer: " + ', '.join(
      f"{k} {v['nmi']:.3f} (shuffled {v['nmi_shuffled_mean']:.3f})"
      for k, v in stats['layers'].items()))


if __name__ == '__main__':
  define_flags()
  app.run(main)
