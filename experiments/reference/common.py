"""Shared pieces of the reference-result sweeps: one run per sub-workdir, resumable."""
from __future__ import annotations

import os
import time


def final_eval(workdir: str, steps: int) -> dict | None:
  """The logged row of step `steps` that holds an evaluation, or None (not finished)."""
  from pathways.train import metric_writer  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    return None
  rows = [r for r in metric_writer.read_metrics(workdir)
          if r['step'] == steps and 'eval/mean_accuracy' in r]
  return rows[-1] if rows else None


def train(config, workdir: str) -> tuple[dict, float | None]:
  """Trains `config` in `workdir` unless it already finished (a cut run resumes from its
  checkpoint); returns (final evaluation row, training seconds or None when read back)."""
  from pathways.train import loop  # pylint: disable=g-import-not-at-top
  steps = config.train.num_steps
  row = final_eval(workdir, steps)
  if row is not None:
    return row, None
  start = time.time()
  loop.train_and_evaluate(config, workdir)
  return final_eval(workdir, steps), time.time() - start


def start(workdir: str) -> None:
  """What every reference script does first: quiet logs (orbax and TFDS log every step at
  INFO) unless --verbosity was given, the task plugins registered, the workdir made."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from pathways import registry  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  registry.discover()
  os.makedirs(workdir, exist_ok=True)


def write_summary(workdir: str, result: dict) -> None:
  """workdir/summary.json (the folder made if needed)."""
  import json  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(result, f, indent=1)


def figure():
  """A matplotlib (figure, axes) on the Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt.subplots(figsize=(5.5, 3.5))


def save(fig, path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def early_stopping_figure(runs, summary, *, colors, metric, ylabel, title, ylim=None):
  """(figure, right axes) of an early-stopped comparison. Left: each run's validation loss
  curve ('validation': [(step, loss)]) with its chosen step ('best_step') marked; right: each
  arm's mean test `metric` ('loss' or 'accuracy': summary[arm]['mean_<metric>'], 'stderr',
  and the seeds' values as dots). Arms in the order of `colors`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
  first = min(r['seed'] for r in runs)
  for r in runs:
    steps, losses = zip(*r['validation'])
    ax1.plot(steps, losses, color=colors[r['arm']], alpha=0.7,
             label=r['arm'] if r['seed'] == first else None)
    ax1.scatter([r['best_step']], [dict(r['validation'])[r['best_step']]],
                color=colors[r['arm']], s=14)
  ax1.set_xlabel('step')
  ax1.set_ylabel('validation loss')
  ax1.set_title('early stopping: dots mark the chosen step', fontsize=9)
  ax1.legend(fontsize=8)
  arms = [a for a in colors if a in summary]
  per_seed = 'losses' if metric == 'loss' else 'accuracies'
  ax2.bar(arms, [summary[a][f'mean_{metric}'] for a in arms],
          yerr=[summary[a]['stderr'] or 0 for a in arms], color=[colors[a] for a in arms],
          capsize=4)
  for i, a in enumerate(arms):
    ax2.scatter([i] * summary[a]['seeds'], summary[a][per_seed], color='black', s=10,
                zorder=3)
  if ylim:
    ax2.set_ylim(*ylim)
  ax2.set_ylabel(ylabel)
  ax2.set_title(title, fontsize=9)
  return fig, ax2


def spread(values, name: str, plural: str) -> dict:
  """{'seeds', plural: values, 'mean_<name>', 'stderr' (None for one value), 'min_<name>',
  'max_<name>'} of one arm's per-seed values."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  v = np.asarray(values, np.float64)
  return {'seeds': len(v), plural: [float(x) for x in v], f'mean_{name}': float(v.mean()),
          'stderr': float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None,
          f'min_{name}': float(v.min()), f'max_{name}': float(v.max())}
