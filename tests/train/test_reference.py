"""The reference-result sweeps: their configs hold what the comparisons rely on, and the
summaries and figures come out of finished runs (no training here; the sweeps themselves
are the README's commands)."""
import json
import os

from experiments.configs import more_experts
from experiments.reference import common
from experiments.reference import more_experts as more_experts_sweep
from experiments.reference import multitask_vs_single
from pathways import registry
from pathways.train import experiment


def test_more_experts_configs_differ_only_in_the_expert_count():
  registry.import_task_modules(['tasks'])
  a, b = (more_experts.get_config(f'experts={e},seed=0').to_dict() for e in (1, 16))
  assert a['model']['moe'].pop('banks') == [[1, 256]]
  assert b['model']['moe'].pop('banks') == [[16, 256]]
  assert a == b  # same width, k=1: the same active FLOPs per token
  assert not more_experts.get_config('experts=4').model.moe.renormalize  # the router learns


def test_single_task_runs_match_the_shared_run_per_task():
  registry.import_task_modules(['tasks'])
  runs = multitask_vs_single.configs(600)
  shared = runs.pop('multitask')
  assert sorted(runs) == sorted(shared.tasks)
  for name, c in runs.items():
    experiment.validate(c)
    assert c.tasks == [name]
    assert c.data.batch_size * len(shared.tasks) == shared.data.batch_size
    assert c.train.eval_batches == shared.train.eval_batches
    assert c.model.to_dict() == shared.model.to_dict()


def test_sweep_summary_and_plot(tmp_path):
  runs = [{'experts': e, 'seed': s, 'eval_loss': 2.0 + 0.1 * s - 0.01 * e,
           'flops_per_token': 100.0} for e in (1, 4) for s in (0, 1)]
  summary = more_experts_sweep.summarize(runs)
  assert summary['4']['mean_loss'] == 2.0 + 0.05 - 0.04
  assert summary['1']['min_loss'] == 1.99 and summary['1']['seeds'] == 2
  path = str(tmp_path / 'plot.png')
  more_experts_sweep.plot(runs, summary, path)
  assert os.path.getsize(path) > 1000


def test_final_eval_reads_only_finished_runs(tmp_path):
  assert common.final_eval(str(tmp_path), 10) is None
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write(json.dumps({'step': 5, 'eval/mean_accuracy': 0.1}) + '\n')
  assert common.final_eval(str(tmp_path), 10) is None
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write(json.dumps({'step': 10, 'loss': 1.0}) + '\n')
    f.write(json.dumps({'step': 10, 'eval/mean_accuracy': 0.5}) + '\n')
  assert common.final_eval(str(tmp_path), 10)['eval/mean_accuracy'] == 0.5


def test_new_task_transfer_trains_only_the_new_tasks_parameters():
  """The transfer run's freeze pattern leaves exactly the new task's embedding, head and
  router prior trainable; the scratch run trains everything."""
  import jax
  from flax import nnx
  from experiments.configs import multitask
  from experiments.reference import new_task
  from pathways.train import optimizer
  from tools import scale_report
  registry.import_task_modules(['tasks'])
  task = new_task.register_few_shot(7)
  assert new_task.register_few_shot(7) == task == 'pycode_lm_7'  # registering twice: no-op
  transfer, scratch = new_task.configs(multitask.get_config('runlocal'), task, 20, '/base')
  assert transfer.init_from == '/base' and not scratch.init_from and not scratch.freeze
  tasks = [registry.get_task(task)]
  layout = scale_report.abstract_layout(transfer, tasks, 1)
  model = nnx.eval_shape(lambda: experiment.model_from_config(transfer, tasks, layout,
                                                              nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  labels = optimizer.freeze_labels(params, transfer.freeze)
  trained = sorted(optimizer.param_path(k) for k, v in jax.tree_util.tree_leaves_with_path(
      labels) if v == 'train')
  assert trained and all(task in p for p in trained), trained
  assert {p.split('/')[0] for p in trained} == {'task_embed', 'heads', 'router_prior'}
  assert len(new_task._FirstN(list(range(10)), 3)) == 3
