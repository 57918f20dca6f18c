"""The routing report over a trained workdir, and its refusals."""
import json
import os

import pytest

from pathways.analysis import report
from tools import routing_report


def test_report_writes_stats_figures_and_a_self_contained_page(reference_run, tmp_path):
  out = str(tmp_path / 'report')
  stats = routing_report.write_report(reference_run, out, eval_batches=2)
  assert stats['step'] == 12
  files = set(os.listdir(out))
  assert {'routing_stats.json', 'index.html', 'pathways.png', 'compute_per_task.png',
          'heatmap_layer1.png'} <= files
  with open(os.path.join(out, 'routing_stats.json')) as f:
    saved = json.load(f)
  layer = saved['layers']['layer1']
  assert 0.0 <= layer['nmi'] <= 1.0 and len(layer['expert_load']) == 4
  assert abs(sum(layer['expert_load']) - 1.0) < 1e-6
  assert len(layer['task_expert_counts']) == 2  # digits, parity
  assert set(saved['tasks']) == {'digits', 'parity'}
  assert saved['tasks']['parity']['flops_difficulty_spearman'] is not None  # parity: bits
  assert saved['tasks']['parity']['flops_by_difficulty']  # mean FLOPs per number of bits
  assert 'flops_vs_difficulty.png' in files
  page = open(os.path.join(out, 'index.html')).read()
  assert 'data:image/png;base64,' in page and 'src="http' not in page
  assert 'a bright cell is an expert a task relies on' in page  # figures say how to read them
  # Evaluation is dropless; the drops training saw are measured at its capacity factor.
  assert 0.0 <= layer['fraction_dropped_at_training_capacity'] <= 1.0


def test_task_names_are_escaped_in_the_page():
  stats = {'task_names': ['<b>&x'], 'num_layers': 1, 'layers': {},
           'tasks': {'<b>&x': {'examples': 1, 'flops_per_example': 1.0}}}
  page = report.page(stats, {}, 'w', 3)
  assert '&lt;b&gt;&amp;x' in page and '<b>&x' not in page


def test_missing_or_empty_workdir_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match='no such folder'):
    routing_report.write_report(str(tmp_path / 'nothing'))
  with pytest.raises(FileNotFoundError, match='no config.json'):
    routing_report.write_report(str(tmp_path))


def test_over_time_and_baseline(reference_run, tmp_path):
  out = str(tmp_path / 'report')
  stats = routing_report.write_report(reference_run, out, eval_batches=1, over_time=True,
                                      baseline=reference_run)
  assert os.path.getsize(os.path.join(out, 'over_time.png')) > 1000
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  for name in os.listdir(out):  # every figure fits a 1400 px wide window
    if name.endswith('.png'):
      assert matplotlib.image.imread(os.path.join(out, name)).shape[1] <= 1400, name
  assert stats['baseline']['step'] == 12
  # Same checkpoint, same data: the baseline column equals this run's.
  assert stats['baseline']['layers']['layer1']['nmi'] == stats['layers']['layer1']['nmi']
  page = open(os.path.join(out, 'index.html')).read()
  assert 'Against the baseline' in page


def test_checkpoint_of_another_model_shape_is_refused(reference_run, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'reshaped')
  shutil.copytree(reference_run, workdir)
  path = os.path.join(workdir, 'config.json')
  config = json.load(open(path))
  config['model']['d_model'] = 24  # the checkpoint holds d_model=16 arrays
  json.dump(config, open(path, 'w'))
  with pytest.raises(RuntimeError, match='saved by a model of another shape'):
    routing_report.write_report(workdir, str(tmp_path / 'out'), eval_batches=1)
