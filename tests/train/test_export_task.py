"""Exporting one task's components as a standalone workdir."""
import os

import pytest

from pathways.train import evaluate_workdir
from pathways.search import export as export_task


def test_export_keeps_accuracy_and_drops_parameters(reference_run, tmp_path):
  out = str(tmp_path / 'parity_only')
  result = export_task.export_task(reference_run, 'parity', out, threshold=0.3,
                                   eval_batches=2)
  # The search ends at the first threshold within 0.5 accuracy points (0 keeps every expert
  # the task used: the same predictions).
  assert abs(result['accuracy_difference_points']) <= 0.5, result['thresholds_tried']
  assert result['thresholds_tried'][0]['threshold'] == 0.3
  assert result['params_exported'] < result['params_full_model']  # digits' stem and head go
  assert os.path.exists(os.path.join(out, 'export.json'))
  evaluated = evaluate_workdir.evaluate_workdir(out, eval_batches=1)  # a normal workdir
  assert set(k for k in evaluated if k.startswith('eval/') and k.endswith('accuracy')) == {
      'eval/parity/accuracy', 'eval/mean_accuracy'}


def test_choose_experts_keeps_the_same_count_per_bank_in_every_layer():
  share = [[0.6, 0.4, 0.0, 0.0], [0.1, 0.0, 0.0, 0.9]]  # banks: experts 0-1 and 2-3
  kept, banks, per_bank = export_task.choose_experts(share, [(2, 8), (2, 16)], k=2,
                                                     num_null=0, threshold=0.05)
  # bank 0: layer 0 uses 2, layer 1 uses 1 -> 2 per layer; bank 1: 0 and 1 -> 1 per layer.
  assert per_bank == [2, 1] and banks == [[2, 8], [1, 16]]
  assert kept == [[0, 1, 2], [0, 1, 3]]  # layer 0 tops bank 1 up with its first expert


def test_unknown_task_is_refused(reference_run, tmp_path):
  with pytest.raises(ValueError, match="--task='nope': not a task of"):
    export_task.export_task(reference_run, 'nope', str(tmp_path / 'x'))
