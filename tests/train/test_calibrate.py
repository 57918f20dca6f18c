"""Calibrated exits on a small trained model: the threshold rule, the record in the workdir,
and the evaluation that reads it."""
import dataclasses
import json
import os

import numpy as np
import pytest

from experiments.configs import multitask
from pathways import registry
from pathways.train import calibrate
from pathways.train import evaluate_workdir
from pathways.train import loop
from tools import routing_report


def test_choose_takes_the_cheapest_threshold_within_tolerance():
  curve = [{'threshold': 0.5, 'accuracy': 0.80, 'flops_per_example': 1.0},
           {'threshold': 0.7, 'accuracy': 0.895, 'flops_per_example': 2.0},
           {'threshold': 0.8, 'accuracy': 0.91, 'flops_per_example': 2.0},
           {'threshold': 0.9, 'accuracy': 0.93, 'flops_per_example': 3.0},
           {'threshold': 0.99, 'accuracy': 0.899, 'flops_per_example': 5.0}]
  assert calibrate.choose(curve, 0.9, 0.01, 4.0)['threshold'] == 0.7  # tie: the lower one
  assert calibrate.choose(curve, 0.9, 0.0, 4.0)['threshold'] == 0.8
  assert calibrate.choose(curve, 0.95, 0.01, 4.0) is None  # none is accurate enough
  assert calibrate.choose(curve, 0.9, 0.01, 1.5) is None  # none saves anything


def test_calibration_writes_thresholds_that_evaluation_uses(data_dir, tmp_path):
  c = multitask.get_config('runlocal')
  c.tasks = ['parity_count', 'digits_nocal']  # no calibration split: its train split
  c.data.update(batch_size=16, data_dir=data_dir)
  c.mesh.data = 1
  c.model.update(d_model=16, num_layers=3, num_heads=2, mlp_hidden=32, halting=False,
                 exit_weights='equal')
  c.model.moe.banks = [[2, 16]]
  c.train.update(num_steps=20, log_every=20, eval_every=20, eval_batches=2, routing_batches=0)
  c.ckpt.update(every=20, best_metric='')
  workdir = str(tmp_path / 'run')
  digits = registry.get_task('digits')
  nocal = dataclasses.replace(digits, name='digits_nocal', splits={'train': 'train',
                                                                  'eval': 'test'})
  with registry.TASKS.temporary('digits_nocal', nocal):
    _train_and_calibrate(c, workdir)


def _train_and_calibrate(c, workdir):
  loop.train_and_evaluate(c, workdir)
  record = calibrate.calibrate(workdir, tolerance=0.05, batches=2)
  saved = json.load(open(os.path.join(workdir, calibrate.EXITS_FILE)))
  assert saved == json.loads(json.dumps(record))
  assert 'training split' in record['splits']['digits_nocal']
  assert record['splits']['parity_count'] == 'validation'
  assert os.path.getsize(os.path.join(workdir, 'exits.png')) > 1000
  for name, t in record['tasks'].items():
    assert [p['threshold'] for p in t['curve']] == list(calibrate.GRID)
    ok = [(p['flops_per_example'], p['threshold']) for p in t['curve']
          if p['accuracy'] >= t['full_depth_accuracy'] - 0.05
          and p['flops_per_example'] < t['full_depth_flops_per_example']]
    assert t['threshold'] == (min(ok)[1] if ok else calibrate.NEVER), name
    assert t['accuracy'] >= t['full_depth_accuracy'] - 0.05
    # the lowest threshold exits most: depth never rises as the threshold falls
    depths = [p['depth'] for p in t['curve']]
    assert all(a <= b + 1e-6 for a, b in zip(depths, depths[1:])), depths
    if name == 'parity_count':  # a 2-class softmax maximum is >= 0.5: all exit at layer 1
      assert depths[0] == 1.0, depths
  result = evaluate_workdir.evaluate_workdir(workdir)
  for name, t in record['tasks'].items():
    assert result[f'exit/{name}/threshold'] == pytest.approx(t['threshold'])
    assert result[f'exit/{name}/flops_saved'] == pytest.approx(
        1 - result[f'exit/{name}/flops_per_example'] / result[f'eval/{name}/flops_per_example'])
  assert 'exit/digits_nocal/accuracy' not in evaluate_workdir.evaluate_workdir(workdir, exits=False)
  stats = routing_report.write_report(workdir, eval_batches=1)  # reads the exits too
  for name in record['tasks']:
    assert 1.0 <= stats['tasks'][name]['depth'] <= 3.0
  np.testing.assert_allclose(calibrate.thresholds(record, ['digits_nocal', 'nope']),
                             [record['tasks']['digits_nocal']['threshold'], calibrate.NEVER])


def test_a_halting_model_is_not_calibrated(reference_run):
  with pytest.raises(ValueError, match='halts'):
    calibrate.calibrate(reference_run)
