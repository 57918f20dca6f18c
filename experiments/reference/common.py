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
