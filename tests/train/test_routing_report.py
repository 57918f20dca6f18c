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


def test_soft_layers_show_combine_weights_and_balanced_layers_their_bias(tmp_path):
  """Soft MoE: every token reaches every expert, so the heatmap sums combine weights; a
  layer with auxiliary-loss-free balancing gets a figure of its per-expert bias."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pathways.analysis import summary  # pylint: disable=g-import-not-at-top
  b, l, e = 2, 3, 2
  weight = np.zeros((b, l, e))
  weight[0, :, 0], weight[0, :, 1] = 0.9, 0.1  # task 0 reads expert 0
  weight[1, :, 0], weight[1, :, 1] = 0.2, 0.8  # task 1 reads expert 1
  layer = {'expert_BxLxK': np.broadcast_to(np.arange(e), (b, l, e)), 'weight_BxLxK': weight,
           'kept_BxLxK': weight > 0}
  record = {'task_names': ['a', 'b'], 'task_id': np.array([0, 1]), 'num_layers': 2,
            'num_experts': {'layer0': e, 'layer1': e}, 'layer0': layer, 'layer1': layer,
            'soft_layers': ['layer1'], 'balance_bias': {'layer0': [-0.1, 0.1]},
            'flops_per_example': np.ones(2), 'difficulty': np.full(2, np.nan), 'scalars': {}}
  stats = summary.summarize(record, shuffle_repeats=1)
  np.testing.assert_allclose(stats['layers']['layer1']['task_expert_counts'],
                             [[2.7, 0.3], [0.6, 2.4]])
  assert stats['layers']['layer0']['task_expert_counts'] == [[3, 3], [3, 3]]  # counts
  assert stats['layers']['layer0']['balance_bias_E'] == [-0.1, 0.1]
  figures = report.figures(stats)
  assert {'heatmap_layer0.png', 'heatmap_soft_layer1.png', 'balance_bias.png'} <= set(figures)
  page = report.page(stats, figures, 'w', 1)
  assert 'every token reads every slot' in page
  assert 'never to the gates' in page


def test_collect_reads_the_balance_bias_and_the_new_metrics():
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from pathways.analysis import collect  # pylint: disable=g-import-not-at-top
  from tests.nn import synthetic  # pylint: disable=g-import-not-at-top
  m, batch = synthetic.image_and_text(moe_kwargs=synthetic.moe_kwargs(
      banks=[(4, 16)], k=2, balance_rate=0.01, shared_experts=1, capacity_factor=2.0))
  m.blocks[1].ffn.router.balance_bias[...] = np.arange(4, dtype=np.float32)
  batch['difficulty'] = np.zeros(len(batch['task_id']), np.float32)
  graphdef, state = nnx.split(m)
  record = collect.collect(graphdef, state, [batch])
  assert record['balance_bias']['layer1'] == [0.0, 1.0, 2.0, 3.0]
  assert record['soft_layers'] == []
  assert 0 < record['scalars']['layer1/shared_flops_fraction'] < 1
  assert record['scalars']['layer1/balance_bias'] == 1.5
