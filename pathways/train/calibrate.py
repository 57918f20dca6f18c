"""Calibrating confidence exits: each task's threshold, picked on held-out data.

For every threshold of a grid, the model runs the calibration examples with confidence exits
(`Figure1Model(..., exit_thresholds=...)`, one compiled step for the whole grid: thresholds are
a traced argument); a task's threshold is the lowest one whose accuracy stays within
`tolerance` of the same model at full depth on the same examples (the lowest exits most, so
saves most). Tasks never compete: evaluation is dropless and examples never mix, so one pass
per threshold calibrates every task at once.

Two rules for "within tolerance": the point estimate (the calibration examples' accuracy drop
at most `tolerance`), or, with `confidence` set (e.g. 0.95), risk control in the spirit of
CALM (Schuster et al. 2022): the one-sided upper confidence bound of the drop at most
`tolerance`. The bound is paired (full depth and exits on the same batches): the mean drop
plus z(confidence) standard errors, the standard error taken over batches (each batch's drop
weighted by its examples, so tokens of one window and examples of one batch count as one
draw) and inflated by drawn / distinct examples where the draws cycle a small split (digits'
180 validation images drawn 512 times are 180 examples' worth of evidence, not 512). A small
split thus earns a cautious threshold, a large one a threshold near the point estimate's.

The examples come from each task's 'calibration' split (held out from training and from
evaluation); a task without one is calibrated on its training split, and `exits.json` says
so. The result lives in the workdir (`EXITS_FILE`): evaluation (`evaluate_workdir`), the
routing report and bucketed inference read it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics

import numpy as np

from pathways.train import workdir as workdir_lib

EXITS_FILE = 'exits.json'
GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.825, 0.85, 0.875, 0.9, 0.91, 0.93, 0.95,
        0.97, 0.98, 0.99, 0.995, 0.999)
NEVER = 2.0  # a threshold no softmax maximum reaches: full depth


def read(workdir: str) -> dict | None:
  """The workdir's calibrated exits ({'tasks': {task: {'threshold': t, ...}}, ...}), or None."""
  path = os.path.join(workdir, EXITS_FILE)
  if not os.path.exists(path):
    return None
  return workdir_lib.read_json(path, 'calibrated exits')


def thresholds(exits: dict, task_names) -> np.ndarray:
  """[N] thresholds in the model's task order; a task the calibration did not cover never
  exits."""
  return np.array([exits['tasks'].get(n, {}).get('threshold', NEVER) for n in task_names],
                  np.float32)


def calibration_tasks(tasks):
  """The tasks with their 'calibration' role set (the training split where a task has no
  held-out one), and {task: split used}."""
  out, used = [], {}
  for t in tasks:
    if 'calibration' not in t.splits:
      t = dataclasses.replace(t, splits=dict(t.splits, calibration=t.splits['train']))
      used[t.name] = f"{t.splits['train']} (training split: the task has no calibration split)"
    else:
      used[t.name] = t.splits['calibration']
    out.append(t)
  return out, used


def choose(curve: list[dict], full_accuracy: float, tolerance: float,
           full_flops: float = float('inf')) -> dict | None:
  """The cheapest point of `curve` (one dict per threshold: threshold, accuracy,
  flops_per_example, and optionally drop_upper, an upper confidence bound of the accuracy
  drop, None where there is none) whose drop (drop_upper where given, else
  full_accuracy - accuracy) is at most
  `tolerance` and whose FLOPs are below full depth's `full_flops` (the checks cost FLOPs
  too); ties go to the lowest threshold. None where no point qualifies: full depth."""
  def drop(p):
    if 'drop_upper' not in p:
      return full_accuracy - p['accuracy']
    return math.inf if p['drop_upper'] is None else p['drop_upper']  # None: no bound
  ok = [p for p in curve if drop(p) <= tolerance and p.get('flops_per_example', 0.0) < full_flops]
  return min(ok, key=lambda p: (p.get('flops_per_example', 0.0), p['threshold'])) if ok else None


def paired_drop(full: list[dict], exited: list[dict], name: str, confidence: float | None,
                repeats: float = 1.0) -> tuple[float, float]:
  """(drop, upper): task `name`'s accuracy drop from full depth to exits over the same
  batches (`evaluation.per_batch` results of each), and its one-sided upper bound at
  `confidence` (None: the drop itself). The standard error is taken over batches (a ratio
  estimator: each batch's drop weighted by its example count) and multiplied by
  sqrt(repeats), the times each distinct example was drawn on average (>= 1)."""
  counts = [b[name]['count'] for b in full]
  total = sum(counts)
  if total <= 0:
    return 0.0, 0.0
  drops = [f[name]['accuracy'] - e[name]['accuracy'] for f, e in zip(full, exited)]
  drop = sum(c * d for c, d in zip(counts, drops)) / total
  if confidence is None:
    return drop, drop
  if not 0.5 <= confidence < 1.0:
    raise ValueError(f'confidence={confidence!r}: must be in [0.5, 1) (a one-sided level, '
                     f'e.g. 0.95), or None for the point estimate.')
  used = [c for c in counts if c > 0]
  if len(used) < 2:  # one batch: no spread to measure, so no bound to trust
    return drop, math.inf
  var = (len(used) / (len(used) - 1) * sum(c * c * (d - drop) ** 2 for c, d in zip(counts, drops))
         / total ** 2)
  z = statistics.NormalDist().inv_cdf(confidence)
  return drop, drop + z * math.sqrt(var * max(repeats, 1.0))


def calibrate(workdir: str, tolerance: float = 0.01, batches: int | None = None,
              grid=GRID, checkpoint: str = 'latest', confidence: float | None = None) -> dict:
  """Calibrates every task of the workdir's model, writes `workdir/exits.json` and
  `exits.png` (accuracy against FLOPs per example along the grid), and returns the record.
  `confidence` (e.g. 0.95): the upper confidence bound of the drop must stay within
  `tolerance` (risk control); None: the calibration examples' drop itself."""
  import jax  # pylint: disable=g-import-not-at-top
  from pathways.train import evaluate_workdir  # pylint: disable=g-import-not-at-top
  from pathways.train import evaluation  # pylint: disable=g-import-not-at-top
  from pathways.train import experiment  # pylint: disable=g-import-not-at-top

  if not 0.0 <= tolerance < 1.0:
    raise ValueError(f'tolerance={tolerance!r}: must be in [0, 1) (accuracy points as a '
                     f'fraction).')
  if confidence is not None and not 0.5 <= confidence < 1.0:
    raise ValueError(f'confidence={confidence!r}: must be in [0.5, 1) (a one-sided level, '
                     f'e.g. 0.95), or None for the point estimate.')
  loaded = evaluate_workdir.load_workdir(workdir, checkpoint=checkpoint)
  exp = loaded.experiment
  if exp.config.model.halting:
    raise ValueError(f'--workdir={workdir!r}: the model halts (model.halting=True); exits are '
                     f'calibrated for models without PonderNet halting.')
  tasks, used = calibration_tasks(exp.tasks)
  n = batches or exp.config.train.eval_batches
  if confidence is not None and n < 2:
    raise ValueError(f'batches={n} with confidence={confidence}: the bound is measured over '
                     f'batches; calibrate on at least 2.')
  pipe_batches = []
  pipe = experiment.pipeline_from_config(exp.config, tasks, split='calibration', seed_offset=2,
                                         **exp.data)
  for _ in range(n):
    pipe_batches.append(next(pipe))
  coverage = pipe.coverage()
  step = evaluation.make_eval_step(exp.model_graphdef)
  names = [t.name for t in exp.tasks]
  with jax.set_mesh(exp.mesh):
    def run(value):
      thr = None if value is None else np.full((len(names),), value, np.float32)
      return evaluation.per_batch(step, loaded.model_state, pipe_batches, exit_thresholds=thr)
    full_batches = run(None)
    point_batches = {value: run(value) for value in grid}
  full = evaluation.aggregate(full_batches, exp.tasks)
  record = {'step': loaded.step, 'tolerance': tolerance, 'confidence': confidence,
            'batches': n, 'batch_size': exp.config.data.batch_size, 'splits': used, 'tasks': {}}
  for name in names:
    drawn, distinct = coverage[name]
    repeats = drawn / distinct if distinct else 1.0
    full_acc = full[f'eval/{name}/accuracy']
    full_flops = full[f'eval/{name}/flops_per_example']
    curve = []
    for v, per in point_batches.items():
      r = evaluation.aggregate(per, exp.tasks)
      drop, upper = paired_drop(full_batches, per, name, confidence, repeats)
      curve.append({'threshold': float(v), 'accuracy': r[f'eval/{name}/accuracy'],
                    'loss': r[f'eval/{name}/loss'], 'drop': drop,
                    'drop_upper': upper if math.isfinite(upper) else None,
                    'flops_per_example': r[f'eval/{name}/flops_per_example'],
                    'depth': r.get(f'eval/{name}/depth')})
    pick = choose(curve, full_acc, tolerance, full_flops)
    entry = {'full_depth_accuracy': full_acc, 'full_depth_loss': full[f'eval/{name}/loss'],
             'full_depth_flops_per_example': full_flops, 'examples_drawn': drawn,
             'distinct_examples': min(drawn, distinct), 'curve': curve}
    if pick is None:
      entry.update(threshold=NEVER, accuracy=full_acc, flops_per_example=full_flops,
                   flops_saved=0.0, depth=float(exp.config.model.num_layers),
                   note='no threshold of the grid keeps accuracy within tolerance and saves '
                        'FLOPs: full depth')
    else:
      entry.update(threshold=pick['threshold'], accuracy=pick['accuracy'],
                   drop_upper=pick['drop_upper'],
                   flops_per_example=pick['flops_per_example'], depth=pick['depth'],
                   flops_saved=1.0 - pick['flops_per_example'] / full_flops)
    record['tasks'][name] = entry
  workdir_lib.write_text(os.path.join(workdir, EXITS_FILE), json.dumps(record, indent=1))
  plot(record, os.path.join(workdir, 'exits.png'))
  return record


def plot(record: dict, path: str) -> None:
  """Accuracy against FLOPs per example along the threshold grid, one line per task; the
  chosen threshold ringed, full depth a square."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, t in record['tasks'].items():
    full = t['full_depth_flops_per_example']
    xs = [p['flops_per_example'] / full for p in t['curve']]
    line, = ax.plot(xs, [p['accuracy'] for p in t['curve']], marker='.',
                    label=f"{name}: threshold {t['threshold']:g}, {t['flops_saved']:.0%} saved")
    ax.plot([1.0], [t['full_depth_accuracy']], marker='s', color=line.get_color())
    ax.plot([t['flops_per_example'] / full], [t['accuracy']], marker='o', markersize=12,
            fillstyle='none', color=line.get_color())
  ax.set_xlabel('FLOPs per example / full depth')
  ax.set_ylabel('accuracy (calibration examples)')
  rule = (f", upper bound at {record['confidence']:g}" if record.get('confidence') is not None
          else '')
  ax.set_title(f"Confidence exits, tolerance {record['tolerance']}{rule}", fontsize=10)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summary(record: dict) -> str:
  return json.dumps({n: {k: v for k, v in t.items() if k != 'curve'}
                     for n, t in record['tasks'].items()}, indent=1)
