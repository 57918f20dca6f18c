"""Calibrated exits on a small trained model: the threshold rule, the record in the workdir,
and the evaluation that reads it."""
import dataclasses
import json
import math
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


def test_choose_with_a_bound_takes_the_cheapest_threshold_whose_bound_is_within_tolerance():
  curve = [{'threshold': 0.5, 'accuracy': 0.90, 'drop_upper': 0.03, 'flops_per_example': 1.0},
           {'threshold': 0.7, 'accuracy': 0.90, 'drop_upper': None, 'flops_per_example': 1.5},
           {'threshold': 0.8, 'accuracy': 0.90, 'drop_upper': 0.008, 'flops_per_example': 2.0}]
  # the accuracies alone would take 0.5; its bound is over, 0.7 has none
  assert calibrate.choose(curve, 0.9, 0.01, 4.0)['threshold'] == 0.8
  assert calibrate.choose(curve, 0.9, 0.005, 4.0) is None


def test_paired_drop_and_its_bound_equal_a_hand_computed_ratio_estimate():
  full = [{'t': {'accuracy': 0.9, 'count': 10.0}}, {'t': {'accuracy': 0.8, 'count': 30.0}}]
  exited = [{'t': {'accuracy': 0.8, 'count': 10.0}}, {'t': {'accuracy': 0.8, 'count': 30.0}}]
  drop = (10 * 0.1 + 30 * 0.0) / 40
  # batch drops 0.1 and 0: var = n/(n-1) * sum c^2 (d - drop)^2 / (sum c)^2
  se = math.sqrt(2 / 1 * (10 ** 2 * 0.075 ** 2 + 30 ** 2 * 0.025 ** 2) / 40 ** 2)
  z95 = 1.6448536269514722
  assert calibrate.paired_drop(full, exited, 't', None) == pytest.approx((drop, drop))
  assert calibrate.paired_drop(full, exited, 't', 0.95) == pytest.approx((drop, drop + z95 * se))
  # each distinct example drawn 4 times on average: half the evidence's worth, twice the error
  assert calibrate.paired_drop(full, exited, 't', 0.95, repeats=4.0) == pytest.approx(
      (drop, drop + 2 * z95 * se))
  assert calibrate.paired_drop(full[:1], exited[:1], 't', 0.95)[1] == math.inf  # one batch
  with pytest.raises(ValueError, match='confidence=1.0'):
    calibrate.paired_drop(full, exited, 't', 1.0)


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
  # risk control: the bound is never below the drop, and it picks among fewer thresholds
  bounded = calibrate.calibrate(workdir, tolerance=0.05, batches=3, confidence=0.9)
  assert bounded['confidence'] == 0.9
  for name, t in bounded['tasks'].items():
    assert 0 < t['distinct_examples'] <= t['examples_drawn'], name
    for p in t['curve']:
      assert p['drop_upper'] is None or p['drop_upper'] >= p['drop'] - 1e-9, (name, p)
      assert p['drop'] == pytest.approx(t['full_depth_accuracy'] - p['accuracy'], abs=1e-6)
    if t['threshold'] != calibrate.NEVER:
      assert t['drop_upper'] <= 0.05
    point = calibrate.choose([{k: v for k, v in p.items() if k != 'drop_upper'}
                              for p in t['curve']], t['full_depth_accuracy'], 0.05,
                             t['full_depth_flops_per_example'])
    point_flops = (t['full_depth_flops_per_example'] if point is None
                   else point['flops_per_example'])
    assert t['flops_per_example'] >= point_flops - 1e-6, name


def test_a_halting_model_is_not_calibrated(reference_run):
  with pytest.raises(ValueError, match='halts'):
    calibrate.calibrate(reference_run)
